//! `make bench-embed`: the whole pipeline with the OpenAI embedder against the shared double in
//! its rate-limit mode (a key of `ORBIT_BENCH_TPM` tokens a minute, default 1 M, starting spent;
//! each answer after 200 ms plus `ORBIT_BENCH_US_PER_TOKEN` µs a token, default 50), on the first
//! `ORBIT_BENCH_MB` megabytes (default 100) of `ORBIT_BENCH_CORPUS` (`make corpus-100m`), into a
//! discarding store. Prints tokens embedded ÷ wall time against the budget, the wall time against
//! tokens ÷ TPM, and the 429s; then the same on `ORBIT_BENCH_BASELINE_MB` (default 10) with one
//! request at a time, as the Python task sent them, for the ratio.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orbit_pipeline::embed::{OpenAiEmbedder, OpenAiSettings};
use orbit_pipeline::secret::Secret;
use orbit_pipeline::source::JsonlSource;
use orbit_pipeline::store::NullStore;
use orbit_pipeline::{BuildScope, Pipeline, PipelineSettings};

#[path = "../tests/support/common.rs"]
mod helpers;
#[path = "../tests/support/openai_double.rs"]
mod openai_double;

use openai_double::{DoubleConfig, OpenAiDouble, RateLimit};

fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The first `mb` megabytes of the corpus, whole lines, as a file of its own.
fn slice(corpus: &std::path::Path, mb: f64, dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::BufRead;
    let out = dir.join(format!("slice-{mb}.jsonl"));
    let mut w = std::io::BufWriter::new(std::fs::File::create(&out).unwrap());
    let r = std::io::BufReader::new(std::fs::File::open(corpus).expect("bench corpus"));
    let max = (mb * 1_048_576.0) as usize;
    let mut n = 0;
    for line in r.lines() {
        let line = line.unwrap();
        if n >= max {
            break;
        }
        n += line.len() + 1;
        writeln!(w, "{line}").unwrap();
    }
    out
}

struct Outcome {
    tokens: u64,
    requests: u64,
    refused: u64,
    oversized: u64,
    peak: usize,
    wall: Duration,
}

fn run(file: &std::path::Path, tpm: f64, per_token: Duration, one_at_a_time: bool) -> Outcome {
    let double = OpenAiDouble::with(DoubleConfig {
        latency: Duration::from_millis(200),
        per_token,
        limit: Some(RateLimit {
            tpm,
            // OpenAI's tier with 1 M TPM has 3 000 RPM on the embedding models.
            rpm: 3_000.0 * tpm / 1_000_000.0,
            start_tokens: 0.0,
        }),
        keep: false,
        ..DoubleConfig::default()
    });
    let mut s = OpenAiSettings::new(
        &double.base_url,
        Some(Secret::new("sk-bench")),
        "text-embedding-3-small",
    );
    if one_at_a_time {
        s.limits.max_in_flight = 1;
        s.adaptive = false;
    }
    s.policy.max_attempts = 8;
    let embedder = Arc::new(OpenAiEmbedder::new(s, reqwest::Client::new()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let p = Pipeline {
        source: Arc::new(JsonlSource::new(&[file]).unwrap()),
        embedder,
        store: Arc::new(NullStore::default()),
        settings: PipelineSettings {
            reuse_vectors: false,
            ..Default::default()
        },
        pool: orbit_pipeline::cpu_pool(2).unwrap(),
    };
    let t = Instant::now();
    let report = rt
        .block_on(p.run(BuildScope::AllUsers, Default::default(), None))
        .unwrap();
    let wall = t.elapsed();
    let c = double.counts();
    assert_eq!(
        c.tokens, report.tokens,
        "the double embedded every token once"
    );
    Outcome {
        tokens: c.tokens,
        requests: c.answered,
        refused: c.refused,
        oversized: c.oversized,
        peak: c.peak_in_progress,
        wall,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let corpus = std::env::var("ORBIT_BENCH_CORPUS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| helpers::fixture("sample.jsonl"));
    let tpm = env_num("ORBIT_BENCH_TPM", 1_000_000.0);
    let per_token = Duration::from_secs_f64(env_num("ORBIT_BENCH_US_PER_TOKEN", 50.0) / 1e6);
    let dir = tempfile::tempdir().unwrap();
    for (label, mb, one) in [
        (
            "adaptive, rate-limit budget",
            env_num("ORBIT_BENCH_MB", 100.0),
            false,
        ),
        (
            "one request at a time",
            env_num("ORBIT_BENCH_BASELINE_MB", 10.0),
            true,
        ),
    ] {
        let file = slice(&corpus, mb, dir.path());
        let o = run(&file, tpm, per_token, one);
        let rate = o.tokens as f64 / o.wall.as_secs_f64() * 60.0;
        let ideal = o.tokens as f64 / tpm * 60.0;
        println!(
            "embed {label}: {mb} MB, {} tokens in {} requests, wall {:.1} s = {:.3} × tokens÷TPM ({ideal:.1} s); \
             {:.0} tokens/min = {:.1} % of {tpm} TPM; 429s {}; over per-request limits {}; peak in flight {}",
            o.tokens,
            o.requests,
            o.wall.as_secs_f64(),
            o.wall.as_secs_f64() / ideal,
            rate,
            rate / tpm * 100.0,
            o.refused,
            o.oversized,
            o.peak
        );
    }
}
