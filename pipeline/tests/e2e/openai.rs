//! The OpenAI-compatible embedder against a local double of `/v1/embeddings`: the real response
//! shape (indices out of order), 429 with `retry-after` and `x-ratelimit-reset-*`, 5xx, auth and
//! quota errors, malformed bodies and a stalled server.

use std::sync::Arc;
use std::time::Duration;

use orbit_pipeline::embed::{
    EmbedError, EmbedLimits, Embedder, HashingEmbedder, OpenAiEmbedder, OpenAiSettings,
};
use orbit_pipeline::http_call::CallError;
use orbit_pipeline::secret::Secret;
use orbit_pipeline::store::VectorStore;
use orbit_pipeline::{BuildScope, ChunkSettings, Retryable};
use tokio_util::sync::CancellationToken;

use crate::env::Env;
use crate::helpers::fixture;
use crate::openai_double::{DoubleConfig, OpenAiDouble, RateLimit, Reply};

const DIM: usize = 16;

/// Latency of a successful answer: enough for requests to overlap, as they do against the API.
const LATENCY: Duration = Duration::from_millis(20);

/// The shared double with vectors of `DIM`, answering `script` first, then successes.
fn double(script: Vec<Reply>) -> OpenAiDouble {
    let d = OpenAiDouble::with(DoubleConfig {
        dim: DIM,
        latency: LATENCY,
        ..DoubleConfig::default()
    });
    d.script_embeddings(script);
    d
}

fn embedder(d: &OpenAiDouble, timeout: Duration, attempts: u32) -> OpenAiEmbedder {
    let mut s = OpenAiSettings::new(
        &d.base_url,
        Some(Secret::new("sk-test-123")),
        "text-embedding-3-small",
    );
    s.dimension = DIM;
    s.timeout = timeout;
    s.policy.max_attempts = attempts;
    s.limits = EmbedLimits {
        max_inputs: 8,
        max_batch_tokens: 4000,
        max_in_flight: 3,
    };
    OpenAiEmbedder::new(s, reqwest::Client::new()).unwrap()
}

fn texts() -> Vec<String> {
    ["alpha", "beta gamma", "delta"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test]
async fn vectors_come_back_in_input_order_with_auth_and_model() {
    let d = double(vec![]);
    let e = embedder(&d, Duration::from_secs(5), 3);
    let v = e.embed(texts()).await.unwrap();
    let h = HashingEmbedder::new(DIM);
    for (t, got) in texts().iter().zip(&v) {
        assert_eq!(got, &h.embed_one(t), "vector for {t} out of place");
    }
    let seen = d.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/embeddings");
    assert_eq!(seen[0].auth.as_deref(), Some("Bearer sk-test-123"));
    assert_eq!(seen[0].body["model"], "text-embedding-3-small");
    assert_eq!(seen[0].body["encoding_format"], "base64");
    assert!(
        seen[0].body.get("dimensions").is_none(),
        "no dimensions unless set"
    );
}

/// The request asks for base64 vectors (as OpenAI's clients do) and, when set, `dimensions`; the
/// answer's base64 decodes to vectors of that size.
#[tokio::test]
async fn vectors_are_asked_as_base64_with_the_dimensions_set() {
    let d = double(vec![]);
    let mut s = OpenAiSettings::new(&d.base_url, None, "text-embedding-3-small");
    s.dimension = 8;
    s.request_dimensions = Some(8);
    let e = OpenAiEmbedder::new(s, reqwest::Client::new()).unwrap();
    let v = e.embed(texts()).await.unwrap();
    assert_eq!(v.len(), texts().len());
    let want = HashingEmbedder::new(8);
    for (got, t) in v.iter().zip(texts()) {
        assert_eq!(got, &want.embed_one(&t), "{t}");
    }
    let seen = d.seen();
    assert_eq!(seen[0].body["encoding_format"], "base64");
    assert_eq!(seen[0].body["dimensions"], 8);
}

#[tokio::test]
async fn rate_limits_are_honoured_then_succeed() {
    let d = double(vec![
        Reply::status(
            429,
            vec![
                ("retry-after", "0.3"),
                ("x-ratelimit-remaining-requests", "0"),
            ],
            r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
        ),
        Reply::status(
            429,
            vec![("x-ratelimit-reset-tokens", "250ms")],
            r#"{"error":{"message":"Rate limit reached","type":"tokens"}}"#,
        ),
        Reply::status(
            503,
            vec![],
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
        ),
    ]);
    let e = embedder(&d, Duration::from_secs(5), 5);
    assert_eq!(e.embed(texts()).await.unwrap().len(), 3);
    let seen = d.seen();
    assert_eq!(seen.len(), 4);
    // The waits the server asked for were kept (behaviour, not a speed check).
    assert!(
        seen[1].at - seen[0].at >= Duration::from_millis(300),
        "retry-after not honoured"
    );
    assert!(
        seen[2].at - seen[1].at >= Duration::from_millis(250),
        "x-ratelimit-reset not honoured"
    );
}

/// The inline layer's attempts ran out: the error says it gave up and is not retryable, so the
/// task layer does not try the same failure again (one failure, one retry layer).
#[tokio::test]
async fn persistent_5xx_gives_up_after_the_attempts() {
    let d = double(vec![Reply::status(500, vec![], "oops"); 3]);
    let e = embedder(&d, Duration::from_secs(5), 3);
    let err = e.embed(texts()).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(
        matches!(&err, EmbedError::Call(CallError::GaveUp { attempts: 3, last }) if last.contains("HTTP 500")),
        "{err}"
    );
    assert!(err.to_string().contains("gave up"), "{err}");
    assert_eq!(d.seen().len(), 3);
}

/// A wait the server asks for that is longer than the inline budget is not slept on: the call
/// returns at once with the hint, for the task layer to schedule.
#[tokio::test]
async fn a_long_rate_limit_hint_goes_to_the_task_layer_without_sleeping() {
    let d = double(vec![Reply::status(
        429,
        vec![("retry-after", "120")],
        r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
    )]);
    let err = embedder(&d, Duration::from_secs(5), 3)
        .embed(texts())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
    assert_eq!(d.seen().len(), 1);
}

#[tokio::test]
async fn auth_and_quota_errors_fail_at_once_as_config_errors() {
    for (status, body) in [
        (
            401,
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#,
        ),
        (
            429,
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
        ),
    ] {
        let d = double(vec![Reply::status(status, vec![], body)]);
        let err = embedder(&d, Duration::from_secs(5), 5)
            .embed(texts())
            .await
            .unwrap_err();
        assert!(matches!(err, EmbedError::Config(_)), "{status}: {err}");
        assert!(!err.is_retryable());
        assert!(
            !err.to_string().contains("sk-test-123"),
            "key leaked: {err}"
        );
        assert_eq!(d.seen().len(), 1, "{status} was retried");
    }
}

#[tokio::test]
async fn malformed_bodies_are_clear_non_retryable_errors() {
    for body in [
        "not json",
        r#"{"object":"list","data":[]}"#,
        r#"{"data":[{"index":7,"embedding":[0.1]}]}"#,
    ] {
        let d = double(vec![Reply::status(200, vec![], body)]);
        let err = embedder(&d, Duration::from_secs(5), 5)
            .embed(texts())
            .await
            .unwrap_err();
        assert!(matches!(err, EmbedError::Decode(_)), "{body}: {err}");
        assert_eq!(d.seen().len(), 1);
    }
}

#[tokio::test]
async fn a_stalled_server_times_out_and_is_retried() {
    let d = double(vec![Reply::Stall, Reply::Stall]);
    let err = embedder(&d, Duration::from_millis(300), 2)
        .embed(texts())
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "gave up inline: {err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(d.seen().len(), 2);
}

#[tokio::test]
async fn a_build_through_the_double_keeps_several_requests_in_flight_and_order() {
    let d = double(vec![Reply::status(429, vec![("retry-after", "0.1")], "{}")]);
    let e: Arc<dyn Embedder> = Arc::new(embedder(&d, Duration::from_secs(5), 4));
    let env = Env::new().await;
    let r = env
        .pipeline(&fixture("sample.jsonl"), e, ChunkSettings::default())
        .run(BuildScope::User(2), CancellationToken::new(), None)
        .await
        .unwrap();
    let requests = d.seen().len() as u64;
    assert!(
        requests > r.chunks / 8,
        "{requests} requests for {} chunks",
        r.chunks
    );
    // max_in_flight 3 is where the rate budget starts (halved by the 429, then one more per
    // unhindered answer); it never grows past its maximum.
    let peak = d.counts().peak_in_progress;
    assert!(
        (2..=orbit_pipeline::embed::MAX_ADAPTIVE_IN_FLIGHT).contains(&peak),
        "peak concurrent requests {peak}"
    );
    // Each stored vector is the one for its own text: order survived batching and retries.
    let h = HashingEmbedder::new(DIM);
    let fact = "Band practice is now on Wednesdays at the rehearsal room near Ostkreuz, bring your own cables.";
    let hits = env
        .store
        .search_dense(2, &h.embed_one(fact), 1)
        .await
        .unwrap();
    assert_eq!(hits[0].source_ids, vec!["fact-2-band"], "{hits:?}");
    assert!(
        hits[0].score > 0.999,
        "stored vector is not this text's: {hits:?}"
    );
}

/// The shared double in its rate-limit mode: a tokens-per-minute bucket (refilled
/// continuously, starting at `start` tokens), the `x-ratelimit-*` headers on every answer, and a
/// 429 with `retry-after` for a request the bucket cannot pay for.
fn limited_double(tpm: f64, start: f64, latency: Duration) -> OpenAiDouble {
    OpenAiDouble::with(DoubleConfig {
        dim: DIM,
        latency,
        limit: Some(RateLimit {
            tpm,
            rpm: 10_000.0,
            start_tokens: start,
        }),
        ..DoubleConfig::default()
    })
}

/// Batches of about `tokens` tokens each.
fn batches(n: usize, tokens: usize) -> Vec<Vec<String>> {
    (0..n)
        .map(|i| {
            (0..4)
                .map(|j| {
                    (0..tokens / 4)
                        .map(|k| format!("w{}", (i * 7919 + j * 104_729 + k) % 50_000))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        })
        .collect()
}

fn limited_embedder(d: &OpenAiDouble, in_flight: usize) -> Arc<OpenAiEmbedder> {
    let mut s = OpenAiSettings::new(
        &d.base_url,
        Some(Secret::new("sk-test-123")),
        "text-embedding-3-small",
    );
    s.dimension = DIM;
    s.limits = EmbedLimits {
        max_inputs: 8,
        max_batch_tokens: 8_000,
        max_in_flight: in_flight,
    };
    s.policy.max_attempts = 8;
    Arc::new(OpenAiEmbedder::new(s, reqwest::Client::new()).unwrap())
}

/// Embeds every batch, `concurrency` at a time, as the embed stage does.
async fn embed_all(e: Arc<OpenAiEmbedder>, work: Vec<Vec<String>>, concurrency: usize) {
    use futures::StreamExt;
    futures::stream::iter(work)
        .map(|b| {
            let e = e.clone();
            async move { e.embed(b).await.unwrap() }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
}

/// A key whose bucket is nearly spent: the first request finds out (one 429 at most), and from
/// then on requests go out as the budget refills, with no other refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedder_paces_itself_under_the_rate_limit_after_one_429_at_most() {
    // 600 k tokens a minute is 10 k a second; 40 k tokens from a bucket of 1 k take about 4 s.
    let d = limited_double(600_000.0, 1_000.0, Duration::from_millis(30));
    let e = limited_embedder(&d, 4);
    let work = batches(40, 1_000);
    let sent: u64 = work
        .iter()
        .flatten()
        .map(|t| orbit_pipeline::tokenize::Encoding::Cl100kBase.count(t) as u64)
        .sum();
    embed_all(e.clone(), work, 16).await;
    let c = d.counts();
    assert_eq!(c.tokens, sent, "every token embedded once");
    assert_eq!(c.answered, 40);
    assert!(c.refused <= 1, "{} requests refused with 429", c.refused);
}

/// Four workers on one key (four embedders, one double answering after 1.5 s), two joining a
/// second after the others have spent the key down: all finish, every token is embedded exactly
/// once, and no request is refused but a worker's first (sent before it has heard anything of a
/// nearly spent key). Each worker reads from the key's count how much the others spend and takes
/// only its own share: without that, the same fleet is refused again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_one_key_settle_under_the_limit_and_embed_every_token_once() {
    const WORKERS: usize = 4;
    let d = limited_double(600_000.0, 1_000.0, Duration::from_millis(1500));
    let work: Vec<Vec<Vec<String>>> = (0..WORKERS).map(|w| batches(25, 1_000 + w)).collect();
    let sent: u64 = work
        .iter()
        .flatten()
        .flatten()
        .map(|t| orbit_pipeline::tokenize::Encoding::Cl100kBase.count(t) as u64)
        .sum();
    let runs = work.into_iter().enumerate().map(|(w, batches)| {
        let e = limited_embedder(&d, 4);
        async move {
            if w >= 2 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            embed_all(e, batches, 16).await
        }
    });
    futures::future::join_all(runs).await;
    let c = d.counts();
    assert_eq!(c.tokens, sent, "every token embedded once");
    assert_eq!(c.answered, 25 * WORKERS as u64, "every batch answered once");
    assert!(
        c.refused <= WORKERS as u64,
        "{} requests refused with 429",
        c.refused
    );
    assert_eq!(c.oversized, 0, "a batch over the per-request limits");
}

/// Without the budget (each answer's headers ignored) the same work is refused again and again:
/// what the test above rules out does happen here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_at_once_on_a_spent_key_are_refused_repeatedly_without_pacing() {
    let d = limited_double(600_000.0, 1_000.0, Duration::from_millis(30));
    let client = reqwest::Client::new();
    let url = format!("{}/embeddings", d.base_url);
    let mut refused = 0;
    let sends = batches(16, 1_000).into_iter().map(|b| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(&url)
                .json(&serde_json::json!({"model": "m", "input": b}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    for s in futures::future::join_all(sends).await {
        if s == 429 {
            refused += 1;
        }
    }
    assert!(refused > 1, "the double does limit: {refused}");
}

/// The embedding cache in front of the OpenAI embedder: two users whose memories hold the same
/// texts cost one embedding each, and a rebuild of everything from nothing (a re-embed into an
/// empty store, a crashed run started again) sends the provider nothing it has seen.
#[tokio::test]
async fn the_embedding_cache_embeds_each_text_once_across_users_and_rebuilds() {
    use orbit_pipeline::embed::{CachedEmbedder, SqliteEmbeddingCache};
    let d = double(vec![]);
    let env = Env::new().await;
    let mut lines = Vec::new();
    for l in crate::helpers::sample_lines() {
        if l["user_id"] == 2 {
            let mut twin = l.clone();
            twin["user_id"] = 7.into();
            lines.push(l);
            lines.push(twin);
        }
    }
    let src = env.write("twins.jsonl", &crate::helpers::to_lines(&lines));
    let cache = Arc::new(
        SqliteEmbeddingCache::open(&env.dir.path().join("cache"), 64 << 20)
            .await
            .unwrap(),
    );
    let cached = || -> Arc<dyn Embedder> {
        Arc::new(CachedEmbedder::new(
            Arc::new(embedder(&d, Duration::from_secs(5), 3)),
            cache.clone(),
        ))
    };
    let r = env
        .pipeline(&src, cached(), ChunkSettings::default())
        .run(BuildScope::AllUsers, CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(
        env.store.count(2).await.unwrap(),
        env.store.count(7).await.unwrap()
    );
    assert!(r.chunks >= 4, "{} chunks", r.chunks);
    let counts = d.embedded_counts();
    assert_eq!(
        counts.values().sum::<usize>() as u64 * 2,
        r.chunks,
        "each user's twin chunk was embedded once for both"
    );
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    // Everything again into an emptied store: all from the cache.
    env.store.reset().await.unwrap();
    let before = d.counts().inputs;
    let mut p = env.pipeline(&src, cached(), ChunkSettings::default());
    p.settings.reuse_vectors = false;
    let again = p
        .run(BuildScope::AllUsers, CancellationToken::new(), None)
        .await
        .unwrap();
    assert_eq!(again.chunks, r.chunks);
    assert_eq!(d.counts().inputs, before, "the provider saw a text twice");
    assert_eq!(
        env.store.count(7).await.unwrap(),
        env.store.count(2).await.unwrap()
    );
}
