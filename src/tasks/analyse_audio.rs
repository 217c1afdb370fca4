//! `blink.analyse_audio(audio_id)`: asks a chat model, under a strict JSON schema, for a Blink
//! transcript's summary, action items, sentiment and speaker count, and stores them, moving
//! `ai_analysis_status` pending → processing → completed | failed. Without a completed
//! transcript it fails at once and never calls the model.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::blink::{load_audio, raises, run_step};
use super::{bind, Raises, RetryPolicy, TaskContext, TaskDef, TaskResult, TimeLimits};
use crate::chat::{ChatClient, ChatError, Message};
use crate::db::{AudioAnalysis, BlinkStep, UsageRow};

pub const NAME: &str = "blink.analyse_audio";
const PARAMS: &[&str] = &["audio_id"];
/// Answer tokens: a summary and a handful of action items fit well inside.
const ANALYSIS_MAX_TOKENS: u32 = 1200;
/// Transcript characters sent: about 30k tokens, inside every gpt-4o context with room to spare.
const MAX_TRANSCRIPT_CHARS: usize = 120_000;

pub static TASK: TaskDef = TaskDef {
    name: NAME,
    retry: RetryPolicy {
        max_retries: 2,
        base_delay: Duration::from_secs(15),
        max_delay: Duration::from_secs(300),
    },
    limits: TimeLimits {
        soft: Duration::from_secs(120),
        hard: Duration::from_secs(150),
    },
    block: super::Block::None,
    run: |ctx| Box::pin(run(ctx)),
};

#[derive(Deserialize)]
struct Args {
    audio_id: i64,
}

/// Strict mode: every property required, no extra ones, optional fields as `[type, "null"]`.
pub fn schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["summary", "action_items", "sentiment", "speaker_count"],
        "properties": {
            "summary": {"type": "string", "description": "Two to four sentences."},
            "action_items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["owner", "task", "due"],
                    "properties": {
                        "owner": {"type": ["string", "null"]},
                        "task": {"type": "string"},
                        "due": {"type": ["string", "null"], "description": "As said, or ISO date"}
                    }
                }
            },
            "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative", "mixed"]},
            "speaker_count": {"type": "integer", "minimum": 1}
        }
    })
}

const SYSTEM: &str = "You analyse transcripts of short voice recordings from the OrbitingFox app. \
Summarise what was said, list concrete action items (owner and due date only when stated), judge \
the overall sentiment, and estimate how many distinct people speak. Answer in the transcript's \
language.";

/// The model's analysis JSON, read and checked.
pub fn parse_analysis(content: &str) -> Result<AudioAnalysis, String> {
    serde_json::from_str::<AudioAnalysis>(content)
        .map_err(|e| format!("the model's JSON does not match the schema: {e}"))
        .and_then(|a| validate(&a).map(|_| a))
}

/// Checks what the schema cannot: the enum and a sane speaker count.
fn validate(a: &AudioAnalysis) -> Result<(), String> {
    if !["positive", "neutral", "negative", "mixed"].contains(&a.sentiment.as_str()) {
        return Err(format!(
            "sentiment {:?} is not one of the four allowed",
            a.sentiment
        ));
    }
    if a.speaker_count < 1 {
        return Err(format!("speaker_count {} is below 1", a.speaker_count));
    }
    Ok(())
}

/// The exceptions of this task.
const R: Raises = raises(NAME);

async fn analyse(ctx: &TaskContext, audio_id: i64) -> TaskResult {
    let sv = &ctx.services;
    let s = &sv.settings;
    let Some(db) = &sv.db else {
        return Err(R.permanent("ConfigError", "DATABASE_URL is not set"));
    };
    let audio = load_audio(db, R, "AnalysisError", audio_id).await?;
    if audio.transcription_status != "completed" || audio.transcript.trim().is_empty() {
        return Err(R.permanent(
            "TranscriptMissing",
            format!(
                "no completed transcript to analyse (transcription is {})",
                audio.transcription_status
            ),
        ));
    }
    if let Err(e) = db
        .set_blink_status(audio_id, BlinkStep::Analysis, "processing", "")
        .await
    {
        return Err(R.retry("AnalysisError", e.to_string(), None));
    }
    let transcript: String = audio
        .transcript
        .chars()
        .take(MAX_TRANSCRIPT_CHARS)
        .collect();
    let chat = ChatClient::new(
        sv.http.clone(),
        &s.chat.base_url,
        s.chat.api_key.clone(),
        &s.chat.analysis_model,
        s.chat.timeout,
        s.http.max_inline_wait,
    );
    let format = json!({"response_format": {"type": "json_schema", "json_schema": {
        "name": "blink_analysis", "strict": true, "schema": schema()}}});
    let messages = [
        Message {
            role: "system",
            content: SYSTEM.into(),
        },
        Message {
            role: "user",
            content: format!("Transcript:\n\n{transcript}"),
        },
    ];
    let done = match chat.complete(&messages, ANALYSIS_MAX_TOKENS, format).await {
        Ok(d) => d,
        Err(ChatError::Config(m)) => {
            return Err(R.permanent("ConfigError", format!("chat model: {m}")))
        }
        Err(e) => return Err(R.error("AnalysisError", &e)),
    };
    let model = if done.model.is_empty() {
        s.chat.analysis_model.clone()
    } else {
        done.model.clone()
    };
    sv.log_usage(UsageRow {
        user_id: Some(audio.owner_id),
        feature: "blink_analysis",
        model: model.clone(),
        prompt_tokens: done.usage.prompt_tokens,
        completion_tokens: done.usage.completion_tokens,
        cost_usd: s.prices.cost(
            &model,
            done.usage.prompt_tokens,
            done.usage.completion_tokens,
            0.0,
        ),
        task_id: ctx.call.id.clone(),
        ..Default::default()
    })
    .await;
    if let Some(r) = done.refusal.filter(|r| !r.trim().is_empty()) {
        return Err(R.permanent("AnalysisRefused", format!("the model refused: {r}")));
    }
    if done.finish_reason == "length" {
        return Err(R.permanent(
            "AnalysisTruncated",
            format!("the model's answer was cut off at {ANALYSIS_MAX_TOKENS} tokens (finish_reason=length)"),
        ));
    }
    let content = done.content.unwrap_or_default();
    let parsed = parse_analysis(&content);
    let a = match parsed {
        Ok(a) => a,
        // Malformed JSON is worth one more try (the task's retry); then it fails.
        Err(m) if ctx.call.retries == 0 => {
            return Err(R.retry("AnalysisError", m, Some(Duration::ZERO)))
        }
        Err(m) => return Err(R.permanent("AnalysisMalformed", m)),
    };
    if let Err(e) = db.blink_analysed(audio_id, &a).await {
        return Err(R.retry("AnalysisError", e.to_string(), None));
    }
    Ok(json!({"audio_id": audio_id, "status": "completed", "model": model, "analysis": a}))
}

async fn run(ctx: TaskContext) -> TaskResult {
    let args: Args = bind(&ctx.call, PARAMS)?;
    let id = args.audio_id;
    run_step(&ctx, NAME, BlinkStep::Analysis, id, analyse(&ctx, id)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_strict_everywhere() {
        fn check(v: &Value) {
            if v["type"] == "object" {
                assert_eq!(v["additionalProperties"], false, "{v}");
                let props: Vec<&String> = v["properties"].as_object().unwrap().keys().collect();
                let req: Vec<&str> = v["required"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap())
                    .collect();
                assert_eq!(props.len(), req.len(), "every property required: {v}");
                for p in v["properties"].as_object().unwrap().values() {
                    check(p);
                }
            }
            if let Some(items) = v.get("items") {
                check(items);
            }
        }
        check(&schema());
        let ok: AudioAnalysis = serde_json::from_value(json!({"summary": "s", "action_items": [{"owner": null, "task": "t", "due": null}], "sentiment": "mixed", "speaker_count": 2})).unwrap();
        assert!(validate(&ok).is_ok());
        let bad = AudioAnalysis {
            sentiment: "angry".into(),
            ..ok
        };
        assert!(validate(&bad).is_err());
    }
}
