//! `blink.transcribe_audio(audio_id)`: sends a Blink recording to an OpenAI-compatible
//! `/v1/audio/transcriptions` (`verbose_json`) and stores text, segments and duration, moving
//! `transcription_status` pending → processing → completed | failed. Size and format are checked
//! before any upload.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use orbit_pipeline::http_call::{redact, send};
use orbit_pipeline::Retryable;

use super::blink::{load_audio, raises, run_step};
use super::{bind, Raises, RetryPolicy, TaskContext, TaskDef, TaskError, TaskResult, TimeLimits};
use crate::config::TranscriptionConfig;
use crate::db::{BlinkStep, Db, UsageRow};

pub const NAME: &str = "blink.transcribe_audio";
const PARAMS: &[&str] = &["audio_id"];
/// OpenAI's upload limit: 25 MiB, and the most `ORBIT_MAX_AUDIO_BYTES` may be.
pub const MAX_UPLOAD_BYTES: u64 = 25 * 1024 * 1024;
/// What the transcription API accepts, by file extension (it sniffs nothing else).
pub const FORMATS: &[&str] = &[
    "flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm",
];

/// An upload of minutes of audio: a long soft limit, and retries spaced for rate limits.
pub static TASK: TaskDef = TaskDef {
    name: NAME,
    retry: RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_secs(30),
        max_delay: Duration::from_secs(600),
    },
    limits: TimeLimits {
        soft: Duration::from_secs(270),
        hard: Duration::from_secs(300),
    },
    block: super::Block::Transcription,
    run: |ctx| Box::pin(run(ctx)),
};

#[derive(Deserialize)]
struct Args {
    audio_id: i64,
}

/// The transcription API's `verbose_json` answer.
#[derive(Deserialize)]
pub struct Verbose {
    text: String,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    segments: Option<Value>,
    /// Self-hosted servers leave it out.
    #[serde(default)]
    usage: Option<Value>,
}

fn extension(name: &str) -> Option<String> {
    let last = name.rsplit('/').next().unwrap_or(name);
    let last = last.split(['?', '#']).next().unwrap_or(last);
    last.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())
}

/// A path under MEDIA_ROOT; `..` and absolute paths are refused, so a record cannot read
/// arbitrary files.
fn media_path(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!(
            "audio path {rel:?} is not a plain path under MEDIA_ROOT"
        ));
    }
    Ok(root.join(p))
}

/// `media_path`, then checked again after every symlink is resolved: a link inside MEDIA_ROOT
/// that points outside it (`blink/link.wav → /etc/passwd`) is refused like `..`. The file is
/// then read by its resolved path.
async fn resolve_media(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let path = media_path(root, rel)?;
    let real = tokio::fs::canonicalize(&path)
        .await
        .map_err(|e| format!("recording {rel}: {e}"))?;
    let real_root = tokio::fs::canonicalize(root)
        .await
        .map_err(|e| format!("MEDIA_ROOT {}: {e}", root.display()))?;
    if !real.starts_with(&real_root) {
        return Err(format!(
            "audio path {rel:?} leads out of MEDIA_ROOT through a symbolic link"
        ));
    }
    Ok(real)
}

/// The recording's bytes, refusing anything over the upload limit before reading it all.
/// The exceptions of this task.
const R: Raises = raises(NAME);

/// This task's own settings block, as the worker gave it.
fn config(ctx: &TaskContext) -> Result<&TranscriptionConfig, TaskError> {
    ctx.own_block(R)
}

async fn load(ctx: &TaskContext, file: &str) -> Result<(String, Vec<u8>), TaskError> {
    let name = file
        .rsplit('/')
        .next()
        .unwrap_or(file)
        .split(['?', '#'])
        .next()
        .unwrap_or("audio")
        .to_string();
    let max = ctx
        .services
        .settings
        .limits
        .audio_bytes
        .min(MAX_UPLOAD_BYTES);
    let too_big = |n: u64| {
        R.permanent(
            "FileTooLarge",
            format!(
                "the recording is {:.1} MiB; at most {:.1} MiB are transcribed \
                 (ORBIT_MAX_AUDIO_BYTES; the transcription API takes 25 MiB)",
                n as f64 / 1048576.0,
                max as f64 / 1048576.0
            ),
        )
    };
    if file.starts_with("http://") || file.starts_with("https://") {
        // The recording's URL is user data: one inside the worker's network is refused, for good.
        let refused = |e: crate::outbound::OutboundError| {
            R.permanent("AudioUrlRefused", format!("recording URL refused: {e}"))
        };
        let url = reqwest::Url::parse(file)
            .map_err(|e| R.permanent("AudioNotFound", format!("not a URL: {e}")))?;
        crate::outbound::check_url(&url, ctx.services.settings.http.allow_private_urls)
            .map_err(refused)?;
        let resp = ctx
            .services
            .user_urls
            .get(url)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| match crate::outbound::refusal(&e) {
                Some(o) => refused(o),
                None => R.retry(
                    "TranscriptionError",
                    format!("cannot download the recording: {}", redact(&e)),
                    None,
                ),
            })?;
        let st = resp.status();
        if st.is_server_error() {
            return Err(R.retry(
                "TranscriptionError",
                format!("recording download: HTTP {st}"),
                None,
            ));
        }
        if !st.is_success() {
            return Err(R.permanent("AudioNotFound", format!("recording download: HTTP {st}")));
        }
        if let Some(n) = resp.content_length().filter(|n| *n > max) {
            return Err(too_big(n));
        }
        let mut out = Vec::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                R.retry(
                    "TranscriptionError",
                    format!("recording download: {e}"),
                    None,
                )
            })?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > max {
                return Err(too_big(out.len() as u64));
            }
        }
        return Ok((name, out));
    }
    let path = resolve_media(&config(ctx)?.media_root, file)
        .await
        .map_err(|e| R.permanent("AudioNotFound", e))?;
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| R.permanent("AudioNotFound", format!("recording {file}: {e}")))?;
    if meta.len() > max {
        return Err(too_big(meta.len()));
    }
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| R.permanent("AudioNotFound", format!("recording {file}: {e}")))?;
    Ok((name, bytes))
}

async fn transcribe(ctx: &TaskContext, db: &Db, audio_id: i64) -> TaskResult {
    let audio = load_audio(db, R, "TranscriptionError", audio_id).await?;
    check_format(&audio.audio_file)?;
    db.set_blink_status(audio_id, BlinkStep::Transcription, "processing", "")
        .await
        .map_err(|e| R.retry("TranscriptionError", e, None))?;
    let (name, bytes) = load(ctx, &audio.audio_file).await?;
    let v = upload(ctx, name, bytes).await?;
    store(ctx, db, audio_id, audio.owner_id, v).await
}

/// A file the transcription API takes, by its extension; checked before any upload.
fn check_format(file: &str) -> Result<(), TaskError> {
    if file.trim().is_empty() {
        return Err(R.permanent("AudioNotFound", "the recording has no file"));
    }
    let ext = extension(file).unwrap_or_default();
    if !FORMATS.contains(&ext.as_str()) {
        return Err(R.permanent(
            "UnsupportedFormat",
            format!("audio format {:?} is not supported (flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm)", ext),
        ));
    }
    Ok(())
}

/// The multipart `verbose_json` upload, in one attempt: an upload of minutes is retried by the
/// task layer alone.
async fn upload(ctx: &TaskContext, name: String, bytes: Vec<u8>) -> Result<Verbose, TaskError> {
    let sv = &ctx.services;
    let cfg = config(ctx)?;
    let url = format!(
        "{}/audio/transcriptions",
        cfg.base_url.trim_end_matches('/')
    );
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name)
        .mime_str("application/octet-stream")
        .map_err(|e| R.permanent("TranscriptionError", e))?;
    let form = reqwest::multipart::Form::new()
        .part("file", part)
        .text("model", cfg.model.clone())
        .text("response_format", "verbose_json")
        .text("timestamp_granularities[]", "segment");
    let req = sv.http.post(&url).timeout(cfg.timeout).multipart(form);
    // One attempt, no inline retry: the file moves into the request instead of being copied for
    // attempts that never come.
    let text = send(req, cfg.api_key.as_ref()).await.map_err(|e| match e {
        e if e.is_config() => R.permanent("ConfigError", format!("transcription API: {e}")),
        e if e.is_retryable() => R.retry(
            "TranscriptionError",
            format!("transcription API {e}"),
            e.retry_after(),
        ),
        e => R.permanent("TranscriptionError", format!("transcription API {e}")),
    })?;
    parse_verbose(&text).map_err(|e| {
        R.retry(
            "TranscriptionError",
            format!("transcription answer malformed: {e}"),
            None,
        )
    })
}

/// The transcription API's answer, read.
pub fn parse_verbose(text: &str) -> Result<Verbose, serde_json::Error> {
    serde_json::from_str(text)
}

/// Text, segments and duration on the recording, the usage row, and the task's result.
async fn store(ctx: &TaskContext, db: &Db, audio_id: i64, owner: i64, v: Verbose) -> TaskResult {
    let sv = &ctx.services;
    let segments = v.segments.clone().unwrap_or(Value::Array(vec![]));
    let seconds = v
        .usage
        .as_ref()
        .and_then(|u| u["seconds"].as_f64())
        .or(v.duration)
        .unwrap_or(0.0);
    db.blink_transcribed(
        audio_id,
        v.text.trim(),
        &segments,
        v.duration,
        v.language.as_deref().unwrap_or(""),
    )
    .await
    .map_err(|e| R.retry("TranscriptionError", e, None))?;
    let model = &config(ctx)?.model;
    sv.log_usage(UsageRow {
        user_id: Some(owner),
        feature: "blink_transcription",
        model: model.clone(),
        audio_seconds: seconds,
        cost_usd: sv.settings.prices.cost(model, 0, 0, seconds),
        task_id: ctx.call.id.clone(),
        ..Default::default()
    })
    .await;
    Ok(json!({
        "audio_id": audio_id,
        "status": "completed",
        "duration": v.duration,
        "language": v.language,
        "characters": v.text.trim().chars().count(),
        "segments": segments.as_array().map(|a| a.len()).unwrap_or(0),
    }))
}

async fn run(ctx: TaskContext) -> TaskResult {
    let args: Args = bind(&ctx.call, PARAMS)?;
    let Some(db) = ctx.services.db.clone() else {
        return Err(R.permanent("ConfigError", "DATABASE_URL is not set"));
    };
    let id = args.audio_id;
    run_step(
        &ctx,
        NAME,
        BlinkStep::Transcription,
        id,
        transcribe(&ctx, &db, id),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13, defect 6: a symlink inside MEDIA_ROOT let a record upload any file.
    #[tokio::test]
    async fn symlinks_out_of_the_media_root_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.wav");
        std::fs::write(&secret, b"not yours").unwrap();
        let media = tempfile::tempdir().unwrap();
        let root = media.path();
        std::fs::create_dir(root.join("blink")).unwrap();
        std::fs::write(root.join("blink/a.wav"), b"RIFF").unwrap();
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, root.join(name)).unwrap();
        };
        link(&secret, "blink/link.wav");
        link(outside.path(), "blink/elsewhere");
        link(&root.join("blink/a.wav"), "blink/alias.wav");

        let err = resolve_media(root, "blink/link.wav").await.unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        let err = resolve_media(root, "blink/elsewhere/secret.wav")
            .await
            .unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        // Inside the root, a link or a plain file is fine.
        let real = resolve_media(root, "blink/alias.wav").await.unwrap();
        assert_eq!(std::fs::read(real).unwrap(), b"RIFF");
        assert!(resolve_media(root, "blink/a.wav").await.is_ok());
        assert!(resolve_media(root, "blink/missing.wav").await.is_err());
        assert!(resolve_media(root, "../secret.wav").await.is_err());
    }

    #[test]
    fn formats_and_paths() {
        assert_eq!(extension("blink/2026/a.WAV").as_deref(), Some("wav"));
        assert_eq!(
            extension("https://x.test/a.ogg?sig=1").as_deref(),
            Some("ogg")
        );
        assert_eq!(extension("noext"), None);
        assert!(media_path(Path::new("/m"), "../etc/passwd").is_err());
        assert!(media_path(Path::new("/m"), "/etc/passwd").is_err());
        assert_eq!(
            media_path(Path::new("/m"), "b/a.wav").unwrap(),
            PathBuf::from("/m/b/a.wav")
        );
    }
}
