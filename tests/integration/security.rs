//! Secrets never reach the logs (docs/security.md): one worker run at debug level with every
//! secret this test owns (Redis passwords as `user:pass@` and as `?password=`, a Postgres
//! password, the OpenAI key, the VAPID private key, an SMTP password, the HTTP token), through
//! builds, an API refusal, an answer, a failing email and bad HTTP tokens; then the captured log
//! is searched for each secret, whole and in the encodings a leak would take.

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;

use crate::app_harness::*;
use crate::celery_harness::*;
use crate::helpers::fixture;

const REDIS_PW: &str = "redis-pw-9137";
const PG_PW: &str = "pg-pw-5521";
const SMTP_PW: &str = "smtp-pw-3301";
const HTTP_TOKEN: &str = "http-tok-7719";

#[test]
fn a_full_run_logs_none_of_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(false);
    let mut con = redis.con();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(REDIS_PW)
        .query(&mut con)
        .unwrap();
    let port = redis.port;
    let broker = format!("redis://default:{REDIS_PW}@127.0.0.1:{port}/0");
    let cache = format!("redis://127.0.0.1:{port}/1?password={REDIS_PW}");
    let db = PgDb::seeded(&fixture("sample.jsonl"));
    // Trust authentication ignores the password; the URL still carries it everywhere it goes.
    let db_url = db.url().replace("postgres@", &format!("postgres:{PG_PW}@"));
    let api = OpenAiDouble::start();
    // One refusal first, as the real API words it (its own message masks the key).
    api.script_embeddings(vec![Reply::Status(
        401,
        vec![],
        json!({"error": {"message": "Incorrect API key provided: sk-tes**********4242.", "type": "invalid_request_error", "code": "invalid_api_key"}}).to_string(),
    )]);
    let (vapid_pem, _) = crate::side::vapid(dir.path());
    let smtp_port = free_port();
    let smtp = format!("smtp://mailer:{SMTP_PW}@127.0.0.1:{smtp_port}");
    let q = unique_queue("secrets");
    let http = format!("127.0.0.1:{}", free_port());
    let mut env: Vec<(&str, String)> = vec![
        ("CELERY_BROKER_URL", broker.clone()),
        ("CELERY_RESULT_BACKEND", broker.clone()),
        ("ORBIT_CACHE_URL", cache),
        ("DATABASE_URL", db_url),
        ("ORBIT_CHAT_MODEL", CHAT_MODEL.into()),
        ("ORBIT_CHAT_BASE_URL", api.base_url.clone()),
        ("VAPID_PRIVATE_KEY", vapid_pem.clone()),
        ("SMTP_URL", smtp),
        ("ORBIT_HTTP_TOKEN", HTTP_TOKEN.into()),
        ("ORBIT_LOG", "debug".into()),
    ];
    env.extend(api.embedder_env());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let w = WorkerProc::start_env(&redis, &["-Q", &q, "--http", &http], &env);
    let client = [("BROKER", broker.as_str())];
    let run = |name: &str, args: serde_json::Value| {
        celery_client_env(
            &redis,
            &q,
            &client,
            json!({"op": "call", "timeout": 60, "tasks": [{"name": name, "args": args}]}),
        )[0]
        .clone()
    };
    let r = run("orbitpilot.build_memory", json!([1]));
    assert_eq!(
        r["state"], "FAILURE",
        "the refused key fails the build: {r}"
    );
    let r = run("orbitpilot.build_memory", json!([1]));
    assert_eq!(r["state"], "SUCCESS", "{r}");
    let r = run(
        "orbitpilot.generate_answer",
        json!([1, "what is the wifi password?"]),
    );
    assert_eq!(r["state"], "SUCCESS", "{r}");
    // The email fails to connect and is retried: its error lines are what matters here.
    celery_client_env(
        &redis,
        &q,
        &client,
        json!({"op": "send", "tasks": [{"name": "config.send_verification_email",
                                        "args": [1, "https://orbitingfox.app/verify/abc"]}]}),
    );
    for token in [None, Some("wrong"), Some(HTTP_TOKEN)] {
        http_get(&http, "/orbitpilot/build/status/?user_id=1", token);
    }
    w.wait_log("the email's retry", "retry: Retry in");
    std::thread::sleep(Duration::from_secs(2));
    let log = w.log();
    assert!(
        log.len() > 10_000,
        "a debug run logs plenty: {} bytes",
        log.len()
    );

    let b64 = base64::engine::general_purpose::STANDARD;
    let vapid_body: String = vapid_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut needles: Vec<(String, String)> = vec![
        ("redis password".into(), REDIS_PW.into()),
        ("postgres password".into(), PG_PW.into()),
        ("smtp password".into(), SMTP_PW.into()),
        ("http token".into(), HTTP_TOKEN.into()),
        ("openai key".into(), API_KEY.into()),
        ("vapid key".into(), vapid_body[..40].to_string()),
        (
            "smtp AUTH PLAIN".into(),
            b64.encode(format!("\0mailer\0{SMTP_PW}")),
        ),
        ("smtp AUTH LOGIN".into(), b64.encode(SMTP_PW)),
        (
            "percent-encoded redis password".into(),
            REDIS_PW.replace('-', "%2D"),
        ),
    ];
    needles.push(("bearer header".into(), format!("Bearer {API_KEY}")));
    for (what, secret) in &needles {
        assert!(
            !log.contains(secret.as_str()),
            "the log shows the {what}: {}",
            log.lines()
                .find(|l| l.contains(secret.as_str()))
                .unwrap_or("")
        );
    }
    // And the redacted forms are there, so the URLs were logged and hidden, not left out.
    assert!(log.contains("***"), "no redacted URL in the log");
}
