//! `openai-double`: the project's one OpenAI-compatible double (pipeline/tests/support), as a
//! process for `orbit-worker bench`, so both sides of a benchmark (our worker and the Python
//! baseline) talk to the same server with the same rate limit and latency.
//!
//! Prints `{"base_url": …}` on one line once it listens. Then, for each line `counts` read on
//! stdin, prints what it has served as one JSON line; it exits when stdin closes, so it never
//! outlives the harness that started it.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{bail, Context};

#[path = "../../pipeline/tests/support/common.rs"]
mod helpers;
#[path = "../../pipeline/tests/support/openai_double.rs"]
mod openai_double;

use openai_double::{DoubleConfig, OpenAiDouble, RateLimit};

const USAGE: &str =
    "openai-double [--tpm N] [--rpm N] [--latency-ms N] [--us-per-token N] [--dim N]";

fn main() -> anyhow::Result<()> {
    let mut cfg = DoubleConfig {
        keep: false,
        ..DoubleConfig::default()
    };
    let (mut tpm, mut rpm) = (None::<f64>, None::<f64>);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        let num: f64 = value
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .with_context(|| format!("{flag} {value:?} is not a number ≥ 0"))?;
        match flag.as_str() {
            "--tpm" => tpm = Some(num),
            "--rpm" => rpm = Some(num),
            "--latency-ms" => cfg.latency = Duration::from_secs_f64(num / 1000.0),
            "--us-per-token" => cfg.per_token = Duration::from_secs_f64(num / 1e6),
            "--dim" if num >= 1.0 => cfg.dim = num as usize,
            _ => bail!("unknown or bad flag {flag}; {USAGE}"),
        }
    }
    // A TPM of 0 means unlimited; the RPM defaults to OpenAI's ratio for the embedding models
    // (3,000 RPM at 1 M TPM).
    cfg.limit = tpm.filter(|t| *t > 0.0).map(|tpm| RateLimit {
        tpm,
        rpm: rpm.unwrap_or(3_000.0 * tpm / 1_000_000.0).max(1.0),
        // Spent at the start, as a key another run has just used: what is measured is the
        // steady rate, not a minute of saved-up budget.
        start_tokens: 0.0,
    });
    let double = OpenAiDouble::with(cfg);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::json!({"base_url": double.base_url}))?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "counts" {
            let c = double.counts();
            let v = serde_json::json!({
                "requests": c.requests, "answered": c.answered, "inputs": c.inputs,
                "tokens": c.tokens, "refused": c.refused, "oversized": c.oversized,
                "peak_in_progress": c.peak_in_progress,
            });
            writeln!(out, "{v}")?;
            out.flush()?;
        }
    }
    Ok(())
}
