//! Remote-control (pidbox) requests on any bytes: the envelope and body reader with its
//! destination, pattern and expiry checks, and the argument readers the answers use (rate
//! limits). Anyone who can PUBLISH on the broker can send these.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orbit_worker::worker::control::read;
use orbit_worker::worker::tuning::parse_rate;

fuzz_target!(|data: &[u8]| {
    for host in ["celery@fuzz", ""] {
        if let Ok(req) = read(data, host, 1.0e9) {
            let _ = parse_rate(req.arguments.get("rate_limit"));
        }
    }
});
