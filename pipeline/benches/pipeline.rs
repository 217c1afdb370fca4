//! Criterion benchmarks of the CPU stages: clean, token counting, chunk (with the text-splitter
//! crate as the baseline in the same run), single-message throughput, and the whole pipeline
//! with the deterministic embedder and a discarding store.
//!
//! Input: ORBIT_BENCH_CORPUS (a generated mixed corpus, `make corpus-100m`), first
//! ORBIT_BENCH_MB megabytes (default 8); falls back to fixtures/sample.jsonl.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use orbit_pipeline::chunk::{ChunkSettings, Chunker, Packer, Split};
use orbit_pipeline::clean::{clean_text, Cleaner};
use orbit_pipeline::embed::HashingEmbedder;
use orbit_pipeline::progress::BuildProgress;
use orbit_pipeline::source::JsonlSource;
use orbit_pipeline::store::NullStore;
use orbit_pipeline::tokenize::Encoding;
use orbit_pipeline::{BuildScope, Pipeline, PipelineSettings, RawDocument};

fn corpus_path() -> std::path::PathBuf {
    std::env::var("ORBIT_BENCH_CORPUS")
        .map(Into::into)
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/sample.jsonl").into())
}

fn load_docs(max_bytes: usize) -> Vec<RawDocument> {
    let text = std::fs::read_to_string(corpus_path()).expect("bench corpus");
    let mut docs = Vec::new();
    let mut bytes = 0;
    for line in text.lines() {
        if bytes >= max_bytes {
            break;
        }
        if let Ok(d) = serde_json::from_str::<RawDocument>(line) {
            bytes += d.text.len();
            docs.push(d);
        }
    }
    docs
}

fn mb() -> usize {
    std::env::var("ORBIT_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
        << 20
}

fn text_bytes(docs: &[RawDocument]) -> u64 {
    docs.iter().map(|d| d.text.len() as u64).sum()
}

fn bench_clean(c: &mut Criterion) {
    let docs = load_docs(mb());
    let mut g = c.benchmark_group("clean");
    g.throughput(Throughput::Bytes(text_bytes(&docs)));
    g.sample_size(10);
    g.bench_function("clean_text", |b| {
        b.iter(|| {
            docs.iter()
                .map(|d| clean_text(&d.text).len())
                .sum::<usize>()
        })
    });
    g.finish();
}

fn bench_count(c: &mut Criterion) {
    let docs = load_docs(mb());
    let texts: Vec<String> = docs.iter().map(|d| clean_text(&d.text)).collect();
    let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
    let mut g = c.benchmark_group("token_count");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
        // The crate alone: its regex pre-tokenizer and BPE on every piece.
        g.bench_function(BenchmarkId::new("bpe-openai", enc.as_str()), |b| {
            b.iter(|| {
                texts
                    .iter()
                    .map(|t| enc.tokenizer().count(t))
                    .sum::<usize>()
            })
        });
        // What the chunker uses: our pre-tokenizer (cl100k) and the piece cache over its BPE.
        g.bench_function(BenchmarkId::new("orbit", enc.as_str()), |b| {
            b.iter(|| texts.iter().map(|t| enc.count(t)).sum::<usize>())
        });
    }
    let cl = tiktoken_rs::cl100k_base().unwrap();
    let o2 = tiktoken_rs::o200k_base().unwrap();
    g.bench_function(BenchmarkId::new("tiktoken-rs", "cl100k_base"), |b| {
        b.iter(|| {
            texts
                .iter()
                .map(|t| cl.encode_ordinary(t).len())
                .sum::<usize>()
        })
    });
    g.bench_function(BenchmarkId::new("tiktoken-rs", "o200k_base"), |b| {
        b.iter(|| {
            texts
                .iter()
                .map(|t| o2.encode_ordinary(t).len())
                .sum::<usize>()
        })
    });
    g.finish();
}

fn clean_chunk_pack(docs: Vec<RawDocument>, cleaner: &Cleaner, chunker: &Chunker) -> usize {
    chunks_of(docs, cleaner, chunker).len()
}

/// The CPU stages in order on one thread: clean, split, pack.
fn chunks_of(
    docs: Vec<RawDocument>,
    cleaner: &Cleaner,
    chunker: &Chunker,
) -> Vec<orbit_pipeline::Chunk> {
    let mut packer = Packer::new(chunker.settings().clone());
    let mut out = Vec::new();
    for d in docs {
        if let Some(cd) = cleaner.clean(d) {
            match chunker.split(cd) {
                Split::Chunks(cs) => out.extend(cs),
                Split::Packable(item) => packer.push(item, &mut out),
            }
        }
    }
    packer.finish(&mut out);
    out
}

/// The piece cache's worst case: notes of made-up words (Latin, accented and Cyrillic letters),
/// so nearly every piece is new and goes through BPE. The generated corpus repeats its words
/// and hits the cache every time; real text sits between the two.
fn rare_word_docs() -> Vec<RawDocument> {
    const LETTERS: &[&str] = &[
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "k", "l", "m", "n", "o", "p", "r", "s", "t",
        "u", "v", "w", "y", "z", "é", "ü", "ø", "д", "ж", "и", "к",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let created_at = chrono::DateTime::from_timestamp(1_767_225_600, 0).expect("valid time");
    (0..1000)
        .map(|i| {
            let mut text = String::with_capacity(3200);
            while text.len() < 3000 {
                let word_len = 2 + next(10);
                if next(4) == 0 {
                    text.push(char::from(b'A' + next(26) as u8));
                }
                for _ in 0..word_len {
                    text.push_str(LETTERS[next(LETTERS.len() as u64) as usize]);
                }
                text.push_str(match next(20) {
                    0 => ". ",
                    1 => ", ",
                    2 => ".\n\n",
                    _ => " ",
                });
            }
            RawDocument {
                user_id: 1,
                kind: orbit_pipeline::DocKind::Note,
                source_id: format!("rare-{i}"),
                text,
                created_at,
                conversation_id: None,
                title: None,
                author: None,
                meta: None,
            }
        })
        .collect()
}

/// Our clean+chunk against text-splitter's chunking alone (tiktoken cl100k sizing, 512/64), one
/// thread, same documents: the mixed corpus, its long documents (over 2 KB) alone, and notes of
/// made-up words (the piece cache's worst case).
fn bench_chunk(c: &mut Criterion) {
    let all = load_docs(mb());
    let long: Vec<RawDocument> = all
        .iter()
        .filter(|d| d.text.len() > 2048)
        .cloned()
        .collect();
    let chunker = Chunker::new(ChunkSettings::default()).unwrap();
    let cleaner = Cleaner::new();
    let cfg = text_splitter::ChunkConfig::new(512)
        .with_overlap(64)
        .unwrap()
        .with_sizer(tiktoken_rs::cl100k_base().unwrap());
    let splitter = text_splitter::TextSplitter::new(cfg);
    for (name, docs) in [
        ("mixed", all),
        ("long", long),
        ("rare_words", rare_word_docs()),
    ] {
        let (hits0, misses0) = orbit_pipeline::tokenize::piece_cache_stats();
        let mut g = c.benchmark_group(format!("chunk_{name}"));
        g.throughput(Throughput::Bytes(text_bytes(&docs)));
        g.sample_size(10);
        g.bench_function("orbit/clean+chunk+pack", |b| {
            b.iter_batched(
                || docs.clone(),
                |d| clean_chunk_pack(d, &cleaner, &chunker),
                BatchSize::LargeInput,
            )
        });
        let cleaned: Vec<String> = docs.iter().map(|d| clean_text(&d.text)).collect();
        g.bench_function("orbit/chunk-only", |b| {
            b.iter(|| {
                cleaned
                    .iter()
                    .map(|t| chunker.spans(t).len())
                    .sum::<usize>()
            })
        });
        g.measurement_time(Duration::from_secs(30));
        g.bench_function("baseline/text-splitter", |b| {
            b.iter(|| {
                cleaned
                    .iter()
                    .map(|t| splitter.chunks(t).count())
                    .sum::<usize>()
            })
        });
        g.finish();
        let (hits, misses) = orbit_pipeline::tokenize::piece_cache_stats();
        let (hits, misses) = (hits - hits0, misses - misses0);
        eprintln!(
            "piece cache on this thread after chunk_{name}: {hits} hits, {misses} misses ({:.1}% hits)",
            100.0 * hits as f64 / (hits + misses).max(1) as f64
        );
    }
}

/// Single-message documents, the bulk of chat: clean + count + pack per message.
fn bench_messages(c: &mut Criterion) {
    let docs: Vec<RawDocument> = load_docs(mb())
        .into_iter()
        .filter(|d| d.kind.is_chat() && d.conversation_id.is_some())
        .collect();
    let chunker = Chunker::new(ChunkSettings::default()).unwrap();
    let cleaner = Cleaner::new();
    let mut g = c.benchmark_group("messages");
    g.throughput(Throughput::Elements(docs.len() as u64));
    g.sample_size(10);
    g.bench_function("clean+count+pack", |b| {
        b.iter_batched(
            || docs.clone(),
            |d| clean_chunk_pack(d, &cleaner, &chunker),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The whole pipeline (JSONL parse → clean → chunk → deterministic embed → discard), 1 and 2
/// CPU threads.
fn bench_pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = corpus_path();
    let size = std::fs::metadata(&path).unwrap().len().min(mb() as u64);
    // A slice of the corpus as its own file, so every run reads the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let slice = dir.path().join("slice.jsonl");
    {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut end = 0;
        for l in text.split_inclusive('\n') {
            if end as u64 >= size {
                break;
            }
            end += l.len();
        }
        std::fs::write(&slice, &text[..end]).unwrap();
    }
    let bytes = std::fs::metadata(&slice).unwrap().len();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    // `live`: the stages also publish into a BuildProgress, as a worker's build does: its
    // cost, on the fastest path there is (the hashing embedder, no store).
    for (threads, live) in [(1, false), (2, false), (2, true)] {
        let name = if live {
            "hashing-embed/null-store/live"
        } else {
            "hashing-embed/null-store"
        };
        g.bench_function(BenchmarkId::new(name, format!("{threads}t")), |b| {
            let pool = orbit_pipeline::cpu_pool(threads).unwrap();
            b.iter(|| {
                let p = Pipeline {
                    source: Arc::new(JsonlSource::new(&[&slice]).unwrap()),
                    embedder: Arc::new(HashingEmbedder::new(384)),
                    store: Arc::new(NullStore::default()),
                    settings: PipelineSettings {
                        chunk: ChunkSettings::default(),
                        cpu_threads: threads,
                        reuse_vectors: true,
                        ..Default::default()
                    },
                    pool: pool.clone(),
                };
                let progress = live.then(|| Arc::new(BuildProgress::default()));
                rt.block_on(p.run_live(BuildScope::AllUsers, Default::default(), None, progress))
                    .unwrap()
                    .chunks
            })
        });
    }
    g.finish();
}

/// The local model on chunk-sized texts (the fixture corpus chunked at the model's 200 tokens),
/// at several sub-batch sizes. Skipped when the model is not installed (`make model`).
fn bench_local_embed(c: &mut Criterion) {
    let dir = std::env::var("ORBIT_MODEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/orbit-worker/models/all-MiniLM-L6-v2")
        });
    let Ok(model) = orbit_pipeline::embed::LocalEmbedder::load(&dir) else {
        eprintln!(
            "local_embed: model not installed in {}, skipped",
            dir.display()
        );
        return;
    };
    let chunker = Chunker::new(ChunkSettings {
        max_tokens: 200,
        overlap_tokens: 25,
        ..Default::default()
    })
    .unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/sample.jsonl"
    ))
    .unwrap();
    let docs: Vec<RawDocument> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let chunks = chunks_of(docs, &Cleaner::new(), &chunker);
    // 64 chunks spread over the corpus, so lengths are mixed as in a real request.
    let step = (chunks.len() / 64).max(1);
    let texts: Vec<String> = chunks
        .into_iter()
        .step_by(step)
        .take(64)
        .map(|c| c.text)
        .collect();
    let mut g = c.benchmark_group("local_embed");
    g.throughput(Throughput::Elements(texts.len() as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    for sub in [1, 8, 16, 64] {
        let m = model.clone().with_sub_batch(sub);
        g.bench_function(BenchmarkId::new("minilm-l6/sub-batch", sub), |b| {
            b.iter(|| m.embed_blocking(&texts).unwrap().len())
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_clean,
    bench_count,
    bench_chunk,
    bench_messages,
    bench_pipeline,
    bench_local_embed
);
criterion_main!(benches);
