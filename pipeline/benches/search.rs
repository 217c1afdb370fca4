//! Search latency on the embedded store and on a Qdrant server, side by side, inside one process
//! (no process start, no model): a user with 10 k and one with 100 k chunks of chat-like text
//! among other users, 384-dimension vectors, questions of a few words; the same seeded data and
//! questions in both stores. Prints p50 / p99 / max per store and mode, with each mode's first
//! (cold) search shown apart: the embedded dense search reads the user's vectors into memory,
//! lexical their term counts.
//!
//! `cargo bench -p orbit-pipeline --bench search` (ORBIT_BENCH_SEARCH_SIZES=10000,100000). The
//! Qdrant server is the tests' (`make qdrant`; started on free loopback ports), or QDRANT_URL;
//! without either the Qdrant rows are skipped with a line saying so. Under
//! `cargo test --all-targets` (no `--bench` argument) it runs once small, as a smoke test.

use std::time::Instant;

use orbit_pipeline::report::percentile;
use orbit_pipeline::search::{search, Fusion, SearchMode, SearchRequest};
use orbit_pipeline::store::{QdrantSettings, QdrantStore, SqliteStore, VectorStore};
use orbit_pipeline::types::{Chunk, EmbeddedChunk};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

#[path = "../tests/support/common.rs"]
mod helpers;
#[path = "../tests/support/qdrant.rs"]
mod qdrant_server;

const DIM: usize = 384;
/// Questions timed per mode and size: enough for a p99 that is not the maximum.
const QUESTIONS: usize = 400;
/// Vocabulary of the synthetic text: Zipf-like draws make some words common, most rare.
const VOCAB: usize = 20_000;
const WORDS_PER_CHUNK: usize = 60;

fn word(rng: &mut StdRng) -> String {
    // Inverse-power draw: rank ~ VOCAB^u, so low ranks (common words) dominate.
    let u: f64 = rng.random();
    let rank = (VOCAB as f64).powf(u) as usize;
    format!("w{rank}")
}

fn unit_vector(rng: &mut StdRng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

async fn fill(store: &dyn VectorStore, user: i64, n: usize, rng: &mut StdRng) {
    let gen = store.begin_build().await.unwrap();
    let mut batch = Vec::with_capacity(512);
    for i in 0..n {
        let text: Vec<String> = (0..WORDS_PER_CHUNK).map(|_| word(rng)).collect();
        batch.push(EmbeddedChunk {
            chunk: Chunk::note(user, &format!("u{user}-{i}"), &text.join(" ")),
            vector: unit_vector(rng),
        });
        if batch.len() == 512 || i + 1 == n {
            store.upsert(gen, &batch).await.unwrap();
            batch.clear();
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let default_sizes = if benching { "10000,100000" } else { "1000" };
    let questions_per_row = if benching { QUESTIONS } else { 20 };
    let sizes: Vec<usize> = std::env::var("ORBIT_BENCH_SEARCH_SIZES")
        .unwrap_or_else(|_| default_sizes.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("search latency, {DIM} dims, {questions_per_row} questions per row (ms)");
    println!(
        "{:<9} {:>8} {:<8} {:>8} {:>8} {:>8} {:>10}",
        "store", "chunks", "mode", "p50", "p99", "max", "cold"
    );
    let dir = tempfile::tempdir().unwrap();
    let embedded = SqliteStore::open(dir.path()).await.unwrap();
    run("embedded", &embedded, &sizes, questions_per_row, benching).await;
    let _server;
    let url = match std::env::var("QDRANT_URL") {
        Ok(u) => Some(u),
        Err(_) if qdrant_available() => {
            _server = qdrant_server::QdrantServer::start_with(&[]);
            Some(_server.url())
        }
        Err(_) => None,
    };
    let Some(url) = url else {
        println!("qdrant: skipped (no QDRANT_URL and no test server: `make qdrant`)");
        return;
    };
    let qdrant = QdrantStore::connect(QdrantSettings {
        url,
        api_key: std::env::var("QDRANT_API_KEY")
            .ok()
            .map(orbit_pipeline::secret::Secret::new),
        alias: qdrant_server::unique_alias("bench_search"),
        timeout: std::time::Duration::from_secs(60),
        lexical: true,
        cluster: Default::default(),
    })
    .await
    .unwrap();
    run("qdrant", &qdrant, &sizes, questions_per_row, benching).await;
    qdrant.reset().await.unwrap();
}

/// Whether the tests' Qdrant server can be started here.
fn qdrant_available() -> bool {
    let home = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default());
    std::env::var("ORBIT_QDRANT_START").is_ok_and(|p| std::path::Path::new(&p).exists())
        || home
            .join(".cache/orbit-worker/qdrant-tools/start-qdrant")
            .exists()
        || helpers::repo()
            .join("../shared/tools/qdrant/start-qdrant")
            .exists()
}

/// One store's rows: the same seed, so both stores hold the same chunks and get the same
/// questions.
async fn run(
    name: &str,
    store: &dyn VectorStore,
    sizes: &[usize],
    questions_per_row: usize,
    benching: bool,
) {
    store.ensure_model("bench", DIM).await.unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    // Neighbours: other users' chunks share the vocabulary and the store.
    fill(store, 9_999, if benching { 5_000 } else { 200 }, &mut rng).await;
    for (ui, &n) in sizes.iter().enumerate() {
        let user = ui as i64 + 1;
        let t = Instant::now();
        fill(store, user, n, &mut rng).await;
        eprintln!(
            "  {name}: filled {n} chunks in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let questions: Vec<(String, Vec<f32>)> = (0..questions_per_row)
            .map(|_| {
                let q: Vec<String> = (0..6).map(|_| word(&mut rng)).collect();
                (q.join(" "), unit_vector(&mut rng))
            })
            .collect();
        for mode in [SearchMode::Dense, SearchMode::Lexical, SearchMode::Hybrid] {
            // Each mode's first question, which may read the user's vectors or term counts.
            let mut cold = None;
            let mut ms = Vec::with_capacity(QUESTIONS);
            for (text, v) in &questions {
                let req = SearchRequest {
                    user_id: user,
                    text,
                    vector: Some(v),
                    mode,
                    top_k: 5,
                    fusion: Fusion::default(),
                };
                let t = Instant::now();
                let hits = search(store, &req).await.unwrap();
                let took = t.elapsed().as_secs_f64() * 1e3;
                assert!(hits.iter().all(|h| h.user_id == user));
                if cold.is_none() {
                    cold = Some(took);
                    continue;
                }
                ms.push(took);
            }
            ms.sort_by(f64::total_cmp);
            let c = format!("{:>10.1}", cold.unwrap_or(0.0));
            println!(
                "{name:<9} {n:>8} {:<8} {:>8.2} {:>8.2} {:>8.2} {c}",
                mode.as_str(),
                percentile(&ms, 0.5),
                percentile(&ms, 0.99),
                ms[ms.len() - 1]
            );
        }
    }
}
