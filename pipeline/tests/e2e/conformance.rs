//! One store conformance suite over every backend: the embedded SQLite store and a real Qdrant
//! server hold to the same `VectorStore` contract, checked by the same assertions.

use std::sync::Arc;

use orbit_pipeline::embed::HashingEmbedder;
use orbit_pipeline::search::Fusion;
use orbit_pipeline::store::{QdrantSettings, QdrantStore, SqliteStore, StoreError, VectorStore};
use orbit_pipeline::{BuildScope, Chunk, EmbeddedChunk};

use crate::qdrant_server::{unique_alias, QdrantServer};

const DIM: usize = 64;
const MODEL: &str = "hashing-conformance";

/// A fresh, empty store of each backend, with what keeps it alive.
struct Backend {
    name: &'static str,
    store: Arc<dyn VectorStore>,
    qdrant: Option<Arc<QdrantStore>>,
    _dir: Option<tempfile::TempDir>,
}

async fn qdrant_store(alias: &str) -> Arc<QdrantStore> {
    let server = QdrantServer::shared();
    Arc::new(
        QdrantStore::connect(QdrantSettings {
            url: server.url(),
            api_key: None,
            alias: alias.to_string(),
            timeout: std::time::Duration::from_secs(30),
            lexical: true,
            cluster: Default::default(),
        })
        .await
        .unwrap(),
    )
}

async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn VectorStore> = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    let q = qdrant_store(&unique_alias("conformance")).await;
    vec![
        Backend {
            name: "embedded",
            store: sqlite,
            qdrant: None,
            _dir: Some(dir),
        },
        Backend {
            name: "qdrant",
            store: q.clone(),
            qdrant: Some(q),
            _dir: None,
        },
    ]
}

fn vector(text: &str) -> Vec<f32> {
    HashingEmbedder::new(DIM).embed_one(text)
}

fn point(user: i64, source: &str, text: &str) -> EmbeddedChunk {
    EmbeddedChunk {
        chunk: Chunk::note(user, source, text),
        vector: vector(text),
    }
}

/// A build of `points` for `user`: begin, upsert, sweep. Returns (generation, swept).
async fn build(store: &dyn VectorStore, user: i64, points: &[EmbeddedChunk]) -> (i64, u64) {
    store.ensure_model(MODEL, DIM).await.unwrap();
    let gen = store.begin_build().await.unwrap();
    store.upsert(gen, points).await.unwrap();
    let swept = store
        .finish_build(gen, &BuildScope::User(user))
        .await
        .unwrap();
    (gen, swept)
}

fn texts(hits: &[orbit_pipeline::store::SearchHit]) -> Vec<String> {
    hits.iter().map(|h| h.text.clone()).collect()
}

const NOTES: [(&str, &str); 5] = [
    (
        "n1",
        "Our flight TP1352 to Lisbon leaves at nine in the morning",
    ),
    (
        "n2",
        "The hotel is the Pestana Palace, booked under my name",
    ),
    ("n3", "Remember to feed Biscuit the cat twice a day"),
    ("n4", "The band we saw was Radiohead at the Alive festival"),
    ("n5", "Wifi password for the flat is mango-tango-42"),
];

fn notes(user: i64) -> Vec<EmbeddedChunk> {
    NOTES.iter().map(|(s, t)| point(user, s, t)).collect()
}

#[tokio::test]
async fn an_empty_store_answers_nothing_and_fails_nothing() {
    for b in backends().await {
        let s = &*b.store;
        assert_eq!(s.model().await.unwrap(), None, "{}", b.name);
        assert_eq!(s.count(1).await.unwrap(), 0, "{}", b.name);
        assert!(s.point_ids(1).await.unwrap().is_empty(), "{}", b.name);
        assert!(
            s.search_dense(1, &vector("x"), 5).await.unwrap().is_empty(),
            "{}",
            b.name
        );
        assert!(
            s.search_lexical(1, "flight", 5).await.unwrap().is_empty(),
            "{}",
            b.name
        );
        let fused = s
            .search_hybrid(1, &vector("x"), "flight", 5, &Fusion::default())
            .await
            .unwrap();
        assert!(fused.is_empty(), "{}", b.name);
        assert!(
            s.vectors_by_hash(&[(1, "00")]).await.unwrap().is_empty(),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn upserts_replace_by_id_and_keep_what_the_app_shows() {
    for b in backends().await {
        let s = &*b.store;
        build(s, 1, &notes(1)).await;
        assert_eq!(s.count(1).await.unwrap(), 5, "{}", b.name);
        let ids = s.point_ids(1).await.unwrap();
        assert_eq!(ids.len(), 5, "{}", b.name);
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{}: ids sorted",
            b.name
        );
        // The same source again with other text: the same point, replaced.
        let mut again = notes(1);
        again[0] = point(1, "n1", "Our flight TP1353 to Porto was moved to noon");
        build(s, 1, &again).await;
        assert_eq!(s.point_ids(1).await.unwrap(), ids, "{}: same ids", b.name);
        let hits = s
            .search_dense(1, &vector("flight TP1353 Porto noon"), 1)
            .await
            .unwrap();
        assert_eq!(hits[0].text, again[0].chunk.text, "{}", b.name);
        let h = &hits[0];
        assert_eq!(h.user_id, 1, "{}", b.name);
        assert_eq!(h.kind, "note", "{}", b.name);
        assert_eq!(h.source_ids, vec!["n1".to_string()], "{}", b.name);
        assert!(
            h.created_at.starts_with("1970-01-01T00:00:00"),
            "{}: {}",
            b.name,
            h.created_at
        );
        assert_eq!(h.dense_score, Some(h.score), "{}", b.name);
    }
}

#[tokio::test]
async fn a_stale_generation_never_overwrites_or_sweeps_a_newer_one() {
    for b in backends().await {
        let s = &*b.store;
        let (gen, _) = build(s, 1, &notes(1)).await;
        let before = s.point_ids(1).await.unwrap();
        // A build that began earlier (a smaller generation) and writes late, as one that lost
        // its lock would: the same ids with other text, and a point of its own.
        let stale = gen - 1_000_000;
        let mut late = notes(1);
        late[1] = point(1, "n2", "stale text that must not win");
        late.push(point(1, "n9", "a point only the stale build wrote"));
        s.upsert(stale, &late).await.unwrap();
        let hits = s
            .search_dense(1, &vector("hotel Pestana Palace"), 1)
            .await
            .unwrap();
        assert_eq!(
            hits[0].text, NOTES[1].1,
            "{}: the newer point stands",
            b.name
        );
        // Its sweep touches nothing of the newer build.
        assert_eq!(
            s.finish_build(stale, &BuildScope::User(1)).await.unwrap(),
            0,
            "{}",
            b.name
        );
        let after = s.point_ids(1).await.unwrap();
        assert_eq!(after.len(), 6, "{}", b.name);
        assert!(before.iter().all(|id| after.contains(id)), "{}", b.name);
        // The next build sweeps what the stale one left.
        let (_, swept) = build(s, 1, &notes(1)).await;
        assert_eq!(swept, 1, "{}", b.name);
        assert_eq!(s.point_ids(1).await.unwrap(), before, "{}", b.name);
    }
}

#[tokio::test]
async fn a_sweep_deletes_what_the_build_did_not_write_and_only_in_its_scope() {
    for b in backends().await {
        let s = &*b.store;
        build(s, 1, &notes(1)).await;
        build(s, 2, &notes(2)).await;
        let (_, swept) = build(s, 1, &notes(1)[..3]).await;
        assert_eq!(swept, 2, "{}", b.name);
        assert_eq!(s.count(1).await.unwrap(), 3, "{}", b.name);
        assert_eq!(
            s.count(2).await.unwrap(),
            5,
            "{}: another user untouched",
            b.name
        );
        let hits = s.search_lexical(1, "Radiohead", 5).await.unwrap();
        assert!(
            hits.is_empty(),
            "{}: a swept point leaves the lexical index: {:?}",
            b.name,
            texts(&hits)
        );
        // A sweep of every user after a build of one.
        let gen = s.begin_build().await.unwrap();
        s.upsert(gen, &notes(2)[..1]).await.unwrap();
        let swept = s.finish_build(gen, &BuildScope::AllUsers).await.unwrap();
        assert_eq!(swept, 3 + 4, "{}", b.name);
        assert_eq!(
            (s.count(1).await.unwrap(), s.count(2).await.unwrap()),
            (0, 1),
            "{}",
            b.name
        );
        // The recorded model survives a sweep of everything.
        assert_eq!(
            s.model().await.unwrap(),
            Some((MODEL.to_string(), DIM)),
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn no_search_reads_another_users_points() {
    for b in backends().await {
        let s = &*b.store;
        // The same texts for both users: only the filter keeps them apart.
        build(s, 1, &notes(1)).await;
        build(s, 2, &notes(2)).await;
        build(
            s,
            3,
            &[point(3, "x", "Biscuit flight hotel Radiohead mango TP1352")],
        )
        .await;
        for (q, text) in NOTES.iter().map(|(_, t)| (vector(t), *t)) {
            for user in [1_i64, 2] {
                let all = [
                    s.search_dense(user, &q, 10).await.unwrap(),
                    s.search_lexical(user, text, 10).await.unwrap(),
                    s.search_hybrid(user, &q, text, 10, &Fusion::default())
                        .await
                        .unwrap(),
                ];
                for hits in all {
                    assert!(!hits.is_empty(), "{}", b.name);
                    assert!(hits.len() <= 5, "{}: {} hits", b.name, hits.len());
                    assert!(hits.iter().all(|h| h.user_id == user), "{}", b.name);
                }
            }
        }
        assert!(
            s.search_dense(4, &vector("flight"), 10)
                .await
                .unwrap()
                .is_empty(),
            "{}",
            b.name
        );
        let ids1 = s.point_ids(1).await.unwrap();
        let ids2 = s.point_ids(2).await.unwrap();
        assert!(
            ids1.iter().all(|i| !ids2.contains(i)),
            "{}: per-user ids",
            b.name
        );
    }
}

#[tokio::test]
async fn stored_vectors_are_found_by_content_hash_per_user() {
    for b in backends().await {
        let s = &*b.store;
        let mine = notes(1);
        build(s, 1, &mine).await;
        let h0 = mine[0].chunk.content_hash.as_str();
        let h3 = mine[3].chunk.content_hash.as_str();
        let got = s
            .vectors_by_hash(&[(1, h0), (1, h3), (1, "missing"), (2, h0)])
            .await
            .unwrap();
        let of1 = &got[&1];
        assert_eq!(of1.len(), 2, "{}", b.name);
        for (i, h) in [(0, h0), (3, h3)] {
            let v = &of1[h];
            let cos: f32 = v.iter().zip(&mine[i].vector).map(|(a, b)| a * b).sum();
            assert!(cos > 0.9999, "{}: the stored vector back ({cos})", b.name);
        }
        assert!(!got.contains_key(&2), "{}: no user 2 points", b.name);
    }
}

#[tokio::test]
async fn searches_rank_as_the_contract_says() {
    for b in backends().await {
        let s = &*b.store;
        build(s, 1, &notes(1)).await;
        // Dense: highest cosine first, scores not rising.
        let q = vector(NOTES[2].1);
        let dense = s.search_dense(1, &q, 5).await.unwrap();
        assert_eq!(dense.len(), 5, "{}", b.name);
        assert_eq!(dense[0].text, NOTES[2].1, "{}", b.name);
        assert!(
            dense.windows(2).all(|w| w[0].score >= w[1].score),
            "{}",
            b.name
        );
        assert!(
            (dense[0].score - 1.0).abs() < 1e-3,
            "{}: {}",
            b.name,
            dense[0].score
        );
        // Lexical: a rare code finds its passage; unmatched passages are not listed.
        let lex = s
            .search_lexical(1, "what was flight TP1352?", 5)
            .await
            .unwrap();
        assert_eq!(lex[0].text, NOTES[0].1, "{}: {:?}", b.name, texts(&lex));
        assert!(lex.iter().all(|h| h.lexical_score.is_some()), "{}", b.name);
        assert!(
            lex.windows(2).all(|w| w[0].score >= w[1].score),
            "{}",
            b.name
        );
        assert!(
            s.search_lexical(1, "zzyzx", 5).await.unwrap().is_empty(),
            "{}",
            b.name
        );
        // Hybrid: a passage first in both lists comes first; top_k is honoured.
        let hyb = s
            .search_hybrid(
                1,
                &vector(NOTES[4].1),
                "wifi password",
                3,
                &Fusion::default(),
            )
            .await
            .unwrap();
        assert_eq!(hyb.len(), 3, "{}", b.name);
        assert_eq!(hyb[0].text, NOTES[4].1, "{}", b.name);
        assert!(
            hyb.windows(2).all(|w| w[0].score >= w[1].score),
            "{}",
            b.name
        );
        // A question of the wrong size is an error, not a silent miss.
        let wrong = s.search_dense(1, &[0.5; DIM + 1], 3).await.unwrap_err();
        assert!(
            matches!(wrong, StoreError::Dimension { .. }),
            "{}: {wrong:?}",
            b.name
        );
    }
}

#[tokio::test]
async fn another_model_is_refused_until_the_store_is_reset() {
    for b in backends().await {
        let s = &*b.store;
        build(s, 1, &notes(1)).await;
        assert_eq!(
            s.model().await.unwrap(),
            Some((MODEL.to_string(), DIM)),
            "{}",
            b.name
        );
        for (m, d) in [("other-model", DIM), (MODEL, DIM * 2)] {
            let e = s.ensure_model(m, d).await.unwrap_err();
            assert!(
                matches!(&e, StoreError::ModelMismatch { stored_model, stored_dim, .. }
                    if stored_model == MODEL && *stored_dim == DIM),
                "{}: {e:?}",
                b.name
            );
        }
        s.ensure_model(MODEL, DIM).await.unwrap();
        s.reset().await.unwrap();
        assert_eq!(s.model().await.unwrap(), None, "{}", b.name);
        assert_eq!(s.count(1).await.unwrap(), 0, "{}", b.name);
        s.ensure_model("other-model", DIM * 2).await.unwrap();
        assert_eq!(
            s.model().await.unwrap(),
            Some(("other-model".to_string(), DIM * 2)),
            "{}",
            b.name
        );
    }
}

/// Qdrant only (the embedded store's versions come with the re-embed command): the alias moves to
/// a new collection in one call; the old collection stays until dropped.
#[tokio::test]
async fn the_alias_swaps_to_a_new_version_in_one_step() {
    for b in backends().await {
        let Some(q) = &b.qdrant else { continue };
        build(q.as_ref(), 1, &notes(1)).await;
        let old = q.aliased_collection().await.unwrap().unwrap();
        let next = orbit_pipeline::store::qdrant_collection_name(
            q.alias(),
            "next-model",
            DIM * 2,
            Some("r1"),
        );
        q.create_version(&next, "next-model", DIM * 2)
            .await
            .unwrap();
        // Until the swap, readers see the old version.
        assert_eq!(q.model().await.unwrap(), Some((MODEL.to_string(), DIM)));
        assert_eq!(q.count(1).await.unwrap(), 5);
        q.swap_alias(&next).await.unwrap();
        assert_eq!(
            q.aliased_collection().await.unwrap().as_deref(),
            Some(next.as_str())
        );
        assert_eq!(
            q.model().await.unwrap(),
            Some(("next-model".to_string(), DIM * 2))
        );
        assert_eq!(q.count(1).await.unwrap(), 0);
        // A second handle (another worker) sees the same.
        let other = qdrant_store(q.alias()).await;
        assert_eq!(
            other.model().await.unwrap(),
            Some(("next-model".to_string(), DIM * 2))
        );
        // Back again: the old collection was kept whole.
        q.swap_alias(&old).await.unwrap();
        assert_eq!(q.count(1).await.unwrap(), 5);
    }
}
