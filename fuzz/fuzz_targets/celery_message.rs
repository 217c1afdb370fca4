//! The Celery envelope and body decoder on any bytes (UTF-8 or not), with the limits, the
//! restore and retry re-encoders of what decoded, and the panic guard's identity read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_worker::celery::message::{
    restored_envelope, retry_envelope, DecodeError, MessageLimits, TaskMessage,
};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        let lossy = String::from_utf8_lossy(data);
        let f = TaskMessage::not_utf8(&lossy);
        assert!(matches!(f.error, DecodeError::NotUtf8));
        return;
    };
    let small = MessageLimits {
        message_bytes: 512,
        argument_bytes: 128,
    };
    let _ = TaskMessage::decode_within(raw, small);
    let _ = restored_envelope(raw);
    match TaskMessage::decode(raw) {
        Ok(m) => {
            // A decoded message re-encodes for a retry, and that decodes to the same task.
            let eta = chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap();
            let env = retry_envelope(&m.raw, m.retries.saturating_add(1), eta, "tag-r")
                .expect("a decoded message re-encodes");
            let again = TaskMessage::decode(&env).expect("a retry envelope decodes");
            assert_eq!((again.id.as_str(), again.name.as_str()), (m.id.as_str(), m.name.as_str()));
            assert_eq!(again.delivery_tag, "tag-r");
        }
        Err(f) => {
            // A refused message never names an empty task id it could not read.
            assert!(f.task_id.as_deref() != Some("") || raw.contains("\"\""));
        }
    }
});
