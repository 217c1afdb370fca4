//! Lexical and hybrid retrieval on the embedded store: isolation between users who share words,
//! no stale index entry after a rebuild, the generation fence over the index, and the scripts
//! the tokenizer promises.

use std::sync::Arc;

use orbit_pipeline::embed::HashingEmbedder;
use orbit_pipeline::search::{search, Fusion, SearchMode, SearchRequest};
use orbit_pipeline::store::{SqliteStore, VectorStore};
use orbit_pipeline::types::{Chunk, EmbeddedChunk};
use orbit_pipeline::BuildScope;
use proptest::prelude::*;
use serde_json::json;

use crate::env::{Env, HASH_DIM};

fn doc(user: i64, sid: &str, text: &str, at: &str) -> String {
    json!({"user_id": user, "kind": "note", "source_id": sid, "text": text, "created_at": at})
        .to_string()
}

fn point(user: i64, sid: &str, text: &str) -> EmbeddedChunk {
    let h = HashingEmbedder::new(HASH_DIM);
    EmbeddedChunk {
        vector: h.embed_one(text),
        chunk: Chunk::note(user, sid, text),
    }
}

async fn lexical(store: &SqliteStore, user: i64, q: &str, k: usize) -> Vec<String> {
    store
        .search_lexical(user, q, k)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|h| h.source_ids)
        .collect()
}

async fn hybrid(store: &SqliteStore, user: i64, q: &str, k: usize) -> Vec<String> {
    let v = HashingEmbedder::new(HASH_DIM).embed_one(q);
    let req = SearchRequest {
        user_id: user,
        text: q,
        vector: Some(&v),
        mode: SearchMode::Hybrid,
        top_k: k,
        fusion: Fusion::default(),
    };
    search(store, &req)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|h| h.source_ids)
        .collect()
}

const WORDS: &[&str] = &[
    "hotel",
    "lisbon",
    "flight",
    "tp1352",
    "pickles",
    "cat",
    "wifi",
    "octopus",
    "budget",
    "porto",
    "москва",
    "مدرسة",
    "会议室",
    "नमस्ते",
    "band",
    "river",
    // What a user prefix looks like in the index (`u1x…`, `n1x…`), so no prefix scheme that
    // lets text pass for another user's term goes unseen.
    "u1x",
    "n1x",
    "u11xwifi",
    "11x",
];

/// User ids that collide in naive encodings: 0, negatives, 1 / 11 / 111, the extremes.
const USERS: &[i64] = &[-3, -1, 0, 1, 2, 11, 111, i64::MAX, i64::MIN + 1];

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Tenant isolation as a property (docs/security.md). Users draw their notes from one
    /// small vocabulary, so every question's words are in other users' memories too: dense,
    /// lexical and hybrid results are still only the asker's.
    #[test]
    fn no_search_of_any_mode_ever_crosses_users(
        notes in prop::collection::vec(
            (prop::sample::select(USERS), prop::collection::vec(0..WORDS.len(), 1..6)), 1..40),
        questions in prop::collection::vec(
            (prop::sample::select(USERS), prop::collection::vec(0..WORDS.len(), 1..4)), 1..8),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let env = Env::new().await;
            env.store.ensure_model("hashing", HASH_DIM).await.unwrap();
            let gen = env.store.begin_build().await.unwrap();
            let points: Vec<EmbeddedChunk> = notes
                .iter()
                .enumerate()
                .map(|(i, (u, w))| {
                    let text: Vec<&str> = w.iter().map(|&j| WORDS[j]).collect();
                    point(*u, &format!("u{u}-n{i}"), &text.join(" "))
                })
                .collect();
            env.store.upsert(gen, &points).await.unwrap();
            for (u, w) in &questions {
                let q: Vec<&str> = w.iter().map(|&j| WORDS[j]).collect();
                let q = q.join(" ");
                let own = format!("u{u}-");
                let v = HashingEmbedder::new(HASH_DIM).embed_one(&q);
                for hits in [
                    env.store.search_dense(*u, &v, 50).await.unwrap(),
                    env.store.search_lexical(*u, &q, 50).await.unwrap(),
                    env.store.search_hybrid(*u, &v, &q, 50, &Fusion::default()).await.unwrap(),
                ] {
                    for h in &hits {
                        assert_eq!(h.user_id, *u, "{q}: {hits:?}");
                        assert!(h.source_ids[0].starts_with(&own), "{q}: {hits:?}");
                    }
                }
                // And every own note holding a question word is found lexically.
                let want = notes.iter().enumerate().filter(|(_, (nu, nw))| {
                    nu == u && nw.iter().any(|j| w.contains(j))
                }).count();
                let got = env.store.search_lexical(*u, &q, 50).await.unwrap().len();
                assert_eq!(got, want, "{q}");
            }
        });
    }
}

#[tokio::test]
async fn a_rebuild_leaves_no_stale_lexical_entry() {
    let env = Env::new().await;
    let at = "2026-01-05T08:00:00Z";
    let v1 = [
        doc(1, "wifi", "The cabin wifi password is sardine-harbour", at),
        doc(
            1,
            "cat",
            "Pickles the cat takes amoxicillin twice a day",
            at,
        ),
        doc(2, "other", "sardine recipes from Porto", at),
    ];
    let src = env.write("a.jsonl", &v1);
    env.build(&src, BuildScope::AllUsers).await;
    assert_eq!(lexical(&env.store, 1, "sardine harbour", 5).await, ["wifi"]);
    assert_eq!(lexical(&env.store, 1, "amoxicillin", 5).await, ["cat"]);

    // Edit one note, delete the other.
    let v2 = [
        doc(1, "wifi", "The cabin wifi password is now octopus-tram", at),
        doc(2, "other", "sardine recipes from Porto", at),
    ];
    let src = env.write("a.jsonl", &v2);
    let r = env.build(&src, BuildScope::User(1)).await;
    assert!(r.points_deleted >= 1, "{r:?}");
    assert!(lexical(&env.store, 1, "sardine harbour", 5)
        .await
        .is_empty());
    assert!(lexical(&env.store, 1, "amoxicillin pickles", 5)
        .await
        .is_empty());
    assert_eq!(lexical(&env.store, 1, "octopus tram", 5).await, ["wifi"]);
    assert_eq!(hybrid(&env.store, 1, "octopus", 5).await[0], "wifi");
    // User 2's memory was not part of the build and keeps its entry.
    assert_eq!(lexical(&env.store, 2, "sardine", 5).await, ["other"]);
    env.store.check_integrity().await.unwrap();
}

#[tokio::test]
async fn the_generation_fence_holds_for_the_lexical_index() {
    let env = Env::new().await;
    let s = &env.store;
    s.ensure_model("hashing", HASH_DIM).await.unwrap();
    let old = s.begin_build().await.unwrap();
    let new = s.begin_build().await.unwrap();
    assert!(new > old);
    s.upsert(new, &[point(1, "n", "the newer build wrote quokka")])
        .await
        .unwrap();
    // The stale build arrives late with the same point and other text.
    s.upsert(old, &[point(1, "n", "the stale build wrote wombat")])
        .await
        .unwrap();
    assert!(
        lexical(s, 1, "wombat", 5).await.is_empty(),
        "stale text indexed"
    );
    assert_eq!(lexical(s, 1, "quokka", 5).await, ["n"]);
    // Its sweep does not touch the newer build's point or its index entry.
    s.finish_build(old, &BuildScope::User(1)).await.unwrap();
    assert_eq!(lexical(s, 1, "quokka", 5).await, ["n"]);
    // The newer build's sweep removes what the older one alone wrote, from both indexes.
    s.upsert(old, &[point(1, "gone", "only the stale build had wallaby")])
        .await
        .unwrap();
    assert_eq!(lexical(s, 1, "wallaby", 5).await, ["gone"]);
    s.finish_build(new, &BuildScope::User(1)).await.unwrap();
    assert!(lexical(s, 1, "wallaby", 5).await.is_empty());
    assert_eq!(s.count(1).await.unwrap(), 1);
    s.check_integrity().await.unwrap();
    // A reset forgets the lexical index too.
    s.reset().await.unwrap();
    assert!(lexical(s, 1, "quokka", 5).await.is_empty());
    s.check_integrity().await.unwrap();
}

#[tokio::test]
async fn facts_in_other_scripts_are_found_by_questions_in_their_language() {
    let env = Env::new().await;
    let at = "2026-02-01T10:00:00Z";
    let mut lines = vec![
        doc(
            1,
            "ru",
            "Встреча с Ольгой перенесена на четверг, в кафе у вокзала.",
            at,
        ),
        doc(
            1,
            "ar",
            "موعد طبيب الأسنان يوم الثلاثاء في الساعة العاشرة صباحا",
            at,
        ),
        doc(
            1,
            "zh",
            "我们明天上午十点在会议室见面，讨论新项目的预算。",
            at,
        ),
        doc(1, "hi", "कल की बैठक का समय बदल गया है, अब तीन बजे है।", at),
    ];
    // Distractors in the same scripts.
    lines.push(doc(1, "ru2", "Купить хлеб и молоко по дороге домой.", at));
    lines.push(doc(1, "ar2", "الطقس جميل اليوم في المدينة", at));
    lines.push(doc(1, "zh2", "周末我们去公园散步吧。", at));
    lines.push(doc(1, "hi2", "आज मौसम बहुत अच्छा है।", at));
    let src = env.write("m.jsonl", &lines);
    env.build(&src, BuildScope::User(1)).await;
    for (q, want) in [
        ("Когда встреча с Ольгой?", "ru"),
        ("متى موعد طبيب الأسنان؟", "ar"),
        ("明天在哪个会议室见面？", "zh"),
        ("बैठक का समय क्या है?", "hi"),
    ] {
        let lex = lexical(&env.store, 1, q, 3).await;
        assert_eq!(
            lex.first().map(String::as_str),
            Some(want),
            "lexical {q}: {lex:?}"
        );
        let hyb = hybrid(&env.store, 1, q, 3).await;
        assert_eq!(
            hyb.first().map(String::as_str),
            Some(want),
            "hybrid {q}: {hyb:?}"
        );
    }
}

#[tokio::test]
async fn an_older_store_file_gains_the_lexical_index_on_open() {
    let dir = tempfile::tempdir().unwrap();
    // A store file as the previous release wrote it: no terms column, no FTS table.
    let path = dir.path().join("vectors.sqlite");
    {
        use sqlx::{ConnectOptions, Connection};
        let mut c = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        for s in [
            "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE points (id BLOB PRIMARY KEY, user_id INTEGER NOT NULL, \
             build_gen INTEGER NOT NULL, kind TEXT NOT NULL, source_ids TEXT NOT NULL, \
             conversation_id TEXT, title TEXT, author TEXT, chunk_index INTEGER NOT NULL, \
             byte_start INTEGER NOT NULL, byte_end INTEGER NOT NULL, token_start INTEGER NOT NULL, \
             token_end INTEGER NOT NULL, token_count INTEGER NOT NULL, created_at TEXT NOT NULL, \
             content_hash TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL)",
            "INSERT INTO store_meta VALUES ('model', 'hashing'), ('dimension', '384')",
        ] {
            sqlx::query(s).execute(&mut c).await.unwrap();
        }
        let p = point(7, "old", "legacy note about the blue heron");
        sqlx::query(
            "INSERT INTO points VALUES (?, 7, 1, 'note', '[\"old\"]', NULL, 'Birds', NULL, 0, 0, 1, \
             0, 1, 1, '2026-01-01T00:00:00Z', 'h', ?, ?)",
        )
        .bind(vec![9u8; 16])
        .bind(&p.chunk.text)
        .bind(p.vector.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
        .execute(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();
    }
    let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    assert_eq!(lexical(&store, 7, "heron", 5).await, ["old"]);
    assert_eq!(
        lexical(&store, 7, "birds", 5).await,
        ["old"],
        "the title is indexed too"
    );
    store.check_integrity().await.unwrap();
}

#[tokio::test]
async fn search_sees_writes_made_after_it_cached_a_user() {
    let env = Env::new().await;
    let s = &env.store;
    s.ensure_model("hashing", HASH_DIM).await.unwrap();
    let h = HashingEmbedder::new(HASH_DIM);
    let g = s.begin_build().await.unwrap();
    s.upsert(g, &[point(1, "a", "alpha beta")]).await.unwrap();
    assert_eq!(
        s.search_dense(1, &h.embed_one("alpha"), 5)
            .await
            .unwrap()
            .len(),
        1
    );
    // The lexical side keeps the user's term counts in memory too.
    assert_eq!(s.search_lexical(1, "alpha", 5).await.unwrap().len(), 1);
    assert!(s.search_lexical(1, "gamma", 5).await.unwrap().is_empty());
    // Another handle on the same file (another worker process) writes; this one must see it.
    let other = SqliteStore::open(&env.dir.path().join("data"))
        .await
        .unwrap();
    let g2 = other.begin_build().await.unwrap();
    other
        .upsert(g2, &[point(1, "b", "gamma delta")])
        .await
        .unwrap();
    let hits = s
        .search_dense(1, &h.embed_one("gamma delta"), 5)
        .await
        .unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].source_ids, ["b"]);
    let hits = s.search_lexical(1, "gamma", 5).await.unwrap();
    assert_eq!(
        hits.len(),
        1,
        "a term new since the counts were read is searched"
    );
    assert_eq!(hits[0].source_ids, ["b"]);
    other.finish_build(g2, &BuildScope::User(1)).await.unwrap();
    let hits = s.search_dense(1, &h.embed_one("alpha"), 5).await.unwrap();
    assert_eq!(hits.len(), 1, "the swept point is still served from memory");
    assert_eq!(hits[0].source_ids, ["b"]);
    assert!(s.search_lexical(1, "alpha", 5).await.unwrap().is_empty());
}
