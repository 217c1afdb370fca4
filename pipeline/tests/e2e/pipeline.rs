//! The pipeline end to end with the deterministic embedder and the SQLite store.

use std::sync::Arc;

use async_trait::async_trait;
use orbit_pipeline::embed::{EmbedError, EmbedLimits, Embedder, HashingEmbedder};
use orbit_pipeline::hash::point_id;
use orbit_pipeline::http_call::CallError;
use orbit_pipeline::store::{StoreError, VectorStore};
use orbit_pipeline::{BuildScope, ChunkSettings};
use orbit_pipeline::{PipelineError, Retryable};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::env::{hashing, Env, HASH_DIM};
use crate::helpers::{fixture, sample_lines, to_lines};

#[tokio::test]
async fn building_twice_gives_the_same_points() {
    let env = Env::new().await;
    let src = fixture("sample.jsonl");
    let first = env.build(&src, BuildScope::User(1)).await;
    let ids1 = env.store.point_ids(1).await.unwrap();
    assert!(first.chunks > 50, "{first:?}");
    assert_eq!(ids1.len() as u64, first.chunks);
    let second = env.build(&src, BuildScope::User(1)).await;
    let ids2 = env.store.point_ids(1).await.unwrap();
    assert_eq!(ids1, ids2);
    assert_eq!(second.points_deleted, 0);
    assert_eq!(
        env.store.point_ids(2).await.unwrap().len(),
        0,
        "a user-1 build touched user 2"
    );
}

#[tokio::test]
async fn a_deleted_document_leaves_memory_and_an_edited_one_changes() {
    let env = Env::new().await;
    let mut docs = sample_lines();
    let src = env.write("c.jsonl", &to_lines(&docs));
    env.build(&src, BuildScope::User(1)).await;

    // A long transcript of user 1: several chunks, none of them packed.
    let victim = docs
        .iter()
        .position(|d| {
            d["user_id"] == 1
                && d["kind"] == "blink_transcript"
                && d["text"].as_str().unwrap().len() > 4000
        })
        .expect("a long transcript in the fixture");
    let sid = docs[victim]["source_id"].as_str().unwrap().to_string();
    let its_ids: Vec<_> = (0..2)
        .map(|i| point_id(1, std::slice::from_ref(&sid), i))
        .collect();
    let before = env.store.point_ids(1).await.unwrap();
    assert!(its_ids.iter().all(|id| before.contains(id)));

    docs.remove(victim);
    // And edit the wifi fact.
    let fact = docs
        .iter_mut()
        .find(|d| d["source_id"] == "fact-1-wifi")
        .unwrap();
    fact["text"] = json!("The wifi password for the Lisbon office is now octopus-tram-7.");
    let src = env.write("c.jsonl", &to_lines(&docs));
    let report = env.build(&src, BuildScope::User(1)).await;
    let after = env.store.point_ids(1).await.unwrap();
    assert!(
        its_ids.iter().all(|id| !after.contains(id)),
        "deleted document still in memory"
    );
    assert!(report.points_deleted >= 2, "{report:?}");

    let q = HashingEmbedder::new(HASH_DIM).embed_one("wifi password Lisbon office");
    let hits = env.store.search_dense(1, &q, 3).await.unwrap();
    assert!(hits[0].text.contains("octopus-tram-7"), "{hits:?}");
    assert!(
        hits.iter().all(|h| !h.text.contains("sardine-harbour")),
        "old text still stored"
    );
}

#[tokio::test]
async fn a_users_search_never_returns_another_users_chunk() {
    let env = Env::new().await;
    env.build(&fixture("sample.jsonl"), BuildScope::AllUsers)
        .await;
    let e = HashingEmbedder::new(HASH_DIM);
    // User 2's own facts, asked by user 1: must not leak.
    for q in [
        "guest wifi Berlin studio kiez-gast",
        "band practice Ostkreuz",
        "candidate Rust experience",
    ] {
        let hits = env
            .store
            .search_dense(1, &e.embed_one(q), 20)
            .await
            .unwrap();
        assert_eq!(hits.len(), 20);
        assert!(hits.iter().all(|h| h.user_id == 1), "{q}: {hits:?}");
        assert!(hits
            .iter()
            .all(|h| !h.source_ids.iter().any(|s| s.starts_with("fact-2"))));
        let own = env.store.search_dense(2, &e.embed_one(q), 1).await.unwrap();
        assert_eq!(own[0].user_id, 2);
        assert!(own[0].source_ids[0].starts_with("fact-2"), "{q}: {own:?}");
    }
    assert!(env
        .store
        .search_dense(999, &e.embed_one("anything"), 5)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn malformed_lines_are_reported_with_file_and_line_and_skipped() {
    let env = Env::new().await;
    let mut lines = to_lines(&sample_lines()[..200]);
    lines.insert(3, "{not json".into());
    lines.insert(10, r#"{"user_id": "one", "kind": "message", "source_id": "x", "text": "t", "created_at": "2026-01-01T00:00:00Z"}"#.into());
    lines.insert(20, r#"{"user_id": 1, "kind": "message", "source_id": "x", "text": "t", "created_at": "yesterday"}"#.into());
    lines.insert(30, "\u{1}\u{2}garbage".into());
    let src = env.write("bad.jsonl", &lines);
    let r = env.build(&src, BuildScope::AllUsers).await;
    assert_eq!(r.rejected_count, 4, "{:?}", r.rejected);
    let locs: Vec<&str> = r.rejected.iter().map(|x| x.location.as_str()).collect();
    for (i, n) in [4, 11, 21, 31].iter().enumerate() {
        assert!(locs[i].ends_with(&format!("bad.jsonl:{n}")), "{locs:?}");
    }
    assert_eq!(r.documents_read, 200);
    assert!(r.chunks > 0);
}

#[tokio::test]
async fn another_model_is_refused_with_a_reembed_hint() {
    let env = Env::new().await;
    let src = fixture("sample.jsonl");
    env.build(&src, BuildScope::User(3)).await;
    let other: Arc<dyn Embedder> = Arc::new(HashingEmbedder::new(HASH_DIM * 2));
    let err = env
        .pipeline(&src, other.clone(), ChunkSettings::default())
        .run(BuildScope::User(3), CancellationToken::new(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PipelineError::Store(StoreError::ModelMismatch { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("re-embed"), "{err}");
    // After a reset the new model is accepted.
    env.store.reset().await.unwrap();
    env.pipeline(&src, other, ChunkSettings::default())
        .run(BuildScope::User(3), CancellationToken::new(), None)
        .await
        .unwrap();
}

/// Fails after a number of requests, like a provider going down mid-build.
struct FailingEmbedder {
    inner: HashingEmbedder,
    ok_requests: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Embedder for FailingEmbedder {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn limits(&self) -> EmbedLimits {
        EmbedLimits {
            max_inputs: 16,
            max_batch_tokens: 100_000,
            max_in_flight: 2,
        }
    }
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let left = self
            .ok_requests
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if left == 0 || left > 1_000_000 {
            return Err(EmbedError::Call(CallError::from_status(503, "down", None)));
        }
        self.inner.embed(texts).await
    }
}

#[tokio::test]
async fn a_failing_embedder_fails_the_build_and_loses_nothing_stored() {
    let env = Env::new().await;
    let src = fixture("sample.jsonl");
    env.build(&src, BuildScope::User(1)).await;
    let before = env.store.point_ids(1).await.unwrap();
    let failing: Arc<dyn Embedder> = Arc::new(FailingEmbedder {
        inner: HashingEmbedder::new(HASH_DIM),
        ok_requests: 3.into(),
    });
    // A full re-embed: with reuse on, the unchanged chunks would never reach the embedder.
    let mut p = env.pipeline(&src, failing, ChunkSettings::default());
    p.settings.reuse_vectors = false;
    let err = p
        .run(BuildScope::User(1), CancellationToken::new(), None)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(
        env.store.point_ids(1).await.unwrap(),
        before,
        "a failed build removed points"
    );
}

#[tokio::test]
async fn a_cancelled_build_stops_and_says_so() {
    let env = Env::new().await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let err = env
        .pipeline(
            &fixture("sample.jsonl"),
            hashing(),
            ChunkSettings::default(),
        )
        .run(BuildScope::AllUsers, cancel, None)
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled), "{err}");
}

#[tokio::test]
async fn the_report_accounts_for_every_stage() {
    let env = Env::new().await;
    let r = env
        .build(&fixture("sample.jsonl"), BuildScope::AllUsers)
        .await;
    let names: Vec<&str> = r.stages.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        ["extract", "clean", "chunk", "reuse", "embed", "store"]
    );
    assert_eq!(r.documents_read, sample_lines().len() as u64);
    assert_eq!(
        r.documents_kept + r.empty_dropped + r.duplicates_dropped,
        r.documents_read
    );
    assert!(
        r.empty_dropped > 0 && r.duplicates_dropped > 0 && r.packed_messages > 0,
        "{r:?}"
    );
    assert_eq!(r.vectors_upserted, r.chunks);
    assert_eq!(r.stage("reuse").unwrap().items_in, r.chunks);
    let embed = r.stage("embed").unwrap();
    assert_eq!(embed.items_in, r.chunks_embedded);
    assert!(
        embed.requests > 0 && embed.bytes_out > embed.requests,
        "{embed:?}"
    );
    assert!(r.tokens > 0 && r.bytes_read > 1_000_000);
    assert!(r
        .stages
        .iter()
        .all(|s| s.busy_ms >= 0.0 && s.busy_ms <= r.wall_ms + 1.0));
    assert!(!r.bottleneck.is_empty());
}

#[tokio::test]
async fn a_stale_build_never_overwrites_or_sweeps_a_newer_ones_points() {
    let env = Env::new().await;
    let src = fixture("sample.jsonl");
    env.build(&src, BuildScope::User(1)).await;
    let ids = env.store.point_ids(1).await.unwrap();
    let q = HashingEmbedder::new(HASH_DIM).embed_one("wifi password Lisbon");
    let before = env.store.search_dense(1, &q, 3).await.unwrap();
    // A build that started earlier (smaller generation) but writes late, as one that lost its
    // lock would: same ids, other vectors.
    let stale = env.store.begin_build().await.unwrap() - 1_000_000_000;
    let hit = &before[0];
    let chunk = orbit_pipeline::Chunk {
        user_id: 1,
        kind: orbit_pipeline::DocKind::Message,
        source_ids: hit.source_ids.clone(),
        conversation_id: hit.conversation_id.clone(),
        title: None,
        author: None,
        chunk_index: 0,
        byte_start: 0,
        byte_end: 5,
        token_start: 0,
        token_end: 1,
        token_count: 1,
        created_at: chrono::Utc::now(),
        text: "stale".into(),
        content_hash: "0".into(),
        terms: String::new(),
    };
    assert!(
        ids.contains(&point_id(1, &chunk.source_ids, 0)),
        "the chunk rewrites a live point"
    );
    let points = [orbit_pipeline::EmbeddedChunk {
        chunk,
        vector: vec![0.0; HASH_DIM],
    }];
    env.store.upsert(stale, &points).await.unwrap();
    assert_eq!(
        env.store
            .finish_build(stale, &BuildScope::User(1))
            .await
            .unwrap(),
        0
    );
    let after = env.store.search_dense(1, &q, 3).await.unwrap();
    assert_eq!(
        after[0].text, before[0].text,
        "a stale write replaced a newer point"
    );
    assert_eq!(env.store.point_ids(1).await.unwrap(), ids);
}

/// Eight builds of different users at once, half through a second handle on the same store file
/// (as a second worker process has): SQLite has one writer, and every build must wait its turn
/// rather than fail with "database is locked" and lean on a task retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_builds_at_once_share_the_store_without_database_is_locked() {
    let env = Env::new().await;
    let other = Arc::new(
        orbit_pipeline::store::SqliteStore::open(&env.dir.path().join("data"))
            .await
            .unwrap(),
    );
    // The fixture's six users, and users 7 and 8 as copies of users 1 and 2.
    let mut docs = sample_lines();
    let copies: Vec<_> = docs
        .iter()
        .filter_map(|d| {
            let u = d["user_id"].as_i64()?;
            (u <= 2).then(|| {
                let mut c = d.clone();
                c["user_id"] = json!(u + 6);
                c
            })
        })
        .collect();
    docs.extend(copies);
    let src = env.write("eight.jsonl", &to_lines(&docs));
    let mut builds = tokio::task::JoinSet::new();
    for user in 1..=8i64 {
        let mut p = env.pipeline(&src, hashing(), ChunkSettings::default());
        if user % 2 == 0 {
            p.store = other.clone() as Arc<dyn VectorStore>;
        }
        builds.spawn(async move {
            let r = p
                .run(BuildScope::User(user), CancellationToken::new(), None)
                .await;
            (user, r)
        });
    }
    let mut chunks = std::collections::BTreeMap::new();
    while let Some(done) = builds.join_next().await {
        let (user, r) = done.unwrap();
        let r = r.unwrap_or_else(|e| panic!("user {user}'s build failed: {e}"));
        chunks.insert(user, r.chunks);
    }
    for user in 1..=8i64 {
        let ids = env.store.point_ids(user).await.unwrap();
        assert_eq!(ids.len() as u64, chunks[&user], "user {user}");
        assert!(chunks[&user] > 0, "user {user} built nothing");
    }
    assert_eq!(chunks[&7], chunks[&1]);
    assert_eq!(chunks[&8], chunks[&2]);
    env.store.check_integrity().await.unwrap();
}
