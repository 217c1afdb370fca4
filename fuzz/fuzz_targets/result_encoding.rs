//! The result and exception encoders: any strings and any JSON value give a record that is JSON,
//! names the task id given, and carries the value's own encoding unchanged (what a Python reader
//! parses). Compared as text, not as re-parsed values: serde_json's default float parser can be
//! one unit in the last place off on long literals, where Python's is exact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_worker::celery::result::{
    encode_meta, py_args_repr, py_repr, py_str_repr, to_python_json, ExceptionInfo, Outcome,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(5, '\u{1}');
    let id = parts.next().unwrap_or("");
    let exc_type = parts.next().unwrap_or("");
    let module = parts.next().unwrap_or("");
    let message = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("");
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let value: serde_json::Value =
        serde_json::from_str(rest).unwrap_or(serde_json::Value::String(rest.into()));
    let exc = ExceptionInfo::raised(exc_type, module, message, id);
    let _ = exc.repr();
    let _ = py_str_repr(message);
    // What events show of results and arguments.
    let _ = py_repr(&value);
    if let serde_json::Value::Array(a) = &value {
        let _ = py_args_repr(a);
    }
    for outcome in [
        Outcome::Success(value.clone()),
        Outcome::Failure(exc.clone()),
        Outcome::Retry(exc),
        Outcome::Revoked { reason: "expired" },
    ] {
        let meta = encode_meta(id, Some(message), &outcome, now);
        let back: serde_json::Value = serde_json::from_str(&meta).expect("a record is JSON");
        assert_eq!(back["task_id"], id);
        if let Outcome::Success(_) = outcome {
            let own = to_python_json(&value);
            assert!(
                meta.contains(&format!("\"result\": {own}")),
                "the value's encoding changed: {own} in {meta}"
            );
        }
    }
});
