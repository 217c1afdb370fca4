//! OrbitPilot's answer: embed the question, retrieve the asking user's chunks (the store filters
//! by user before scoring), then either ask a chat model with numbered passages or, with no
//! model configured, answer extractively with the best passages. Shared by the
//! `orbitpilot.generate_answer` task and `orbit-worker ask`.

use orbit_pipeline::search::{SearchMode, SearchRequest};
use orbit_pipeline::store::SearchHit;
use orbit_pipeline::tokenize::Encoding;
use serde::Serialize;
use serde_json::Value;

use crate::chat::{ChatError, Message};
use crate::db::UsageRow;
use crate::services::Services;
use orbit_pipeline::Retryable;

/// Passages a question may ask for: enough context for a model, never the whole memory.
pub const MAX_TOP_K: usize = 50;
/// Characters of a passage shown in a citation's snippet.
const SNIPPET_CHARS: usize = 280;
/// Tokens a chat answer may take.
const ANSWER_MAX_TOKENS: u32 = 700;
/// Passages below this similarity are not worth citing in an extractive answer (all-MiniLM and
/// OpenAI embeddings put unrelated text well under it), unless the lexical list found them.
const EXTRACTIVE_MIN_SCORE: f32 = 0.05;
/// Passages an extractive answer quotes, whatever top_k asked: it is read by a person, and the
/// first three of a good ranking hold the answer far more often than the next ones add to it.
pub const EXTRACTIVE_PASSAGES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The question itself is unusable: fails at once.
    #[error("{0}")]
    BadRequest(String),
    #[error("user {0} does not exist")]
    UnknownUser(i64),
    #[error("{0}")]
    Config(String),
    #[error("{message}")]
    Upstream {
        message: String,
        retryable: bool,
        retry_after: Option<std::time::Duration>,
    },
}

impl AnswerError {
    fn upstream(message: String, retryable: bool) -> Self {
        AnswerError::Upstream {
            message,
            retryable,
            retry_after: None,
        }
    }
}

impl From<ChatError> for AnswerError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::Config(m) => AnswerError::Config(m),
            e => AnswerError::Upstream {
                retryable: e.is_retryable(),
                retry_after: e.retry_after(),
                message: e.to_string(),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Citation {
    /// The number the answer cites as `[n]`.
    pub n: usize,
    pub kind: String,
    pub source_ids: Vec<String>,
    pub score: f32,
    pub snippet: String,
    pub created_at: String,
    pub conversation_id: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AnswerUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub user_id: i64,
    pub question: String,
    pub answer: String,
    /// `generative` (a chat model wrote it) or `extractive` (the best passages, quoted).
    pub mode: &'static str,
    pub citations: Vec<Citation>,
    /// The chat model that answered; null for extractive answers.
    pub model: Option<String>,
    pub embedding_model: String,
    pub usage: AnswerUsage,
}

pub struct Question<'a> {
    pub user_id: i64,
    pub question: &'a str,
    pub top_k: usize,
    /// The Celery task id, recorded on usage rows.
    pub task_id: &'a str,
    /// None: the configured `ORBIT_SEARCH_MODE`.
    pub mode: Option<SearchMode>,
}

fn snippet(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(SNIPPET_CHARS) {
        None => t.to_string(),
        Some((i, _)) => format!("{}…", t[..i].trim_end()),
    }
}

fn citation(n: usize, h: &SearchHit) -> Citation {
    Citation {
        n,
        kind: h.kind.clone(),
        source_ids: h.source_ids.clone(),
        score: h.score,
        snippet: snippet(&h.text),
        created_at: h.created_at.clone(),
        conversation_id: h.conversation_id.clone(),
    }
}

pub async fn answer(sv: &Services, q: Question<'_>) -> Result<Answer, AnswerError> {
    let (question, tokens) = check(sv, &q, MAX_TOP_K)?;
    if let Some(db) = &sv.db {
        match db.user_active(q.user_id).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(AnswerError::UnknownUser(q.user_id)),
            Err(e) => return Err(AnswerError::upstream(e.to_string(), e.is_retryable())),
        }
    }
    let (hits, embedding_model) = retrieve_checked(sv, &q, question, tokens).await?;
    let base = Answer {
        user_id: q.user_id,
        question: question.to_string(),
        answer: String::new(),
        mode: "extractive",
        citations: Vec::new(),
        model: None,
        embedding_model,
        usage: AnswerUsage::default(),
    };
    if hits.is_empty() {
        return Ok(Answer {
            answer:
                "OrbitPilot has no memory for you yet: build your memory first, then ask again."
                    .into(),
            ..base
        });
    }
    match &sv.chat {
        Some(chat) if !over_budget(sv, q.user_id).await => {
            generative(sv, chat, &q, question, hits, base).await
        }
        _ => Ok(extractive(hits, base)),
    }
}

/// The user's passages for `question` (validated, `tokens` long) in the request's mode, and the
/// embedding model the store is read with. The question is embedded only when the mode needs it.
async fn retrieve_checked(
    sv: &Services,
    q: &Question<'_>,
    question: &str,
    tokens: usize,
) -> Result<(Vec<SearchHit>, String), AnswerError> {
    let mode = q.mode.unwrap_or(sv.settings.search.mode);
    let embedder = sv
        .live_embedder()
        .await
        .map_err(|e| AnswerError::Config(format!("{e:#}")))?;
    let store = sv
        .store()
        .await
        .map_err(|e| AnswerError::Config(format!("{e:#}")))?;
    let qv = if mode.needs_vector() {
        let mut vectors = embedder
            .embed(vec![question.to_string()])
            .await
            .map_err(|e| AnswerError::upstream(e.to_string(), e.is_retryable()))?;
        if sv.settings.pipeline.resolved_embedder() == crate::config::EmbedderKind::OpenAi {
            let model = embedder.model_id().to_string();
            sv.log_usage(UsageRow {
                user_id: Some(q.user_id),
                feature: "orbitpilot_embed",
                cost_usd: sv.settings.prices.cost(&model, tokens as i64, 0, 0.0),
                model,
                prompt_tokens: tokens as i64,
                task_id: q.task_id.to_string(),
                ..Default::default()
            })
            .await;
        }
        vectors.pop()
    } else {
        None
    };
    let req = SearchRequest {
        user_id: q.user_id,
        text: question,
        vector: qv.as_deref(),
        mode,
        top_k: q.top_k,
        fusion: sv.settings.search.fusion,
    };
    let hits = orbit_pipeline::search::search(store.as_ref(), &req)
        .await
        .map_err(|e| AnswerError::upstream(e.to_string(), e.is_retryable()))?;
    Ok((hits, embedder.model_id().to_string()))
}

/// What `search` and `eval` read: the passages `answer` would be given for this question, with
/// the same checks of the question; top_k up to `max_top_k` (the CLI's `search` lists a whole
/// memory with a large one, an answer takes at most `MAX_TOP_K`).
pub async fn retrieve(
    sv: &Services,
    q: &Question<'_>,
    max_top_k: usize,
) -> Result<Vec<SearchHit>, AnswerError> {
    let (question, tokens) = check(sv, q, max_top_k)?;
    Ok(retrieve_checked(sv, q, question, tokens).await?.0)
}

/// The trimmed question and its token count, or why it cannot be asked.
fn check<'q>(
    sv: &Services,
    q: &Question<'q>,
    max_top_k: usize,
) -> Result<(&'q str, usize), AnswerError> {
    let question = q.question.trim();
    if question.is_empty() {
        return Err(AnswerError::BadRequest("the question is empty".into()));
    }
    // Characters first: counting tokens of a megabyte of text is the cost the limit avoids.
    let max_chars = sv.settings.limits.question_chars;
    if question.len() > max_chars && question.chars().count() > max_chars {
        return Err(AnswerError::BadRequest(format!(
            "the question is {} characters long; at most {max_chars} are allowed \
             (ORBIT_MAX_QUESTION_CHARS)",
            question.chars().count()
        )));
    }
    let tokens = Encoding::Cl100kBase.count(question);
    if tokens > sv.settings.chat.max_question_tokens {
        return Err(AnswerError::BadRequest(format!(
            "the question is {tokens} tokens long; at most {} are allowed",
            sv.settings.chat.max_question_tokens
        )));
    }
    if q.top_k == 0 || q.top_k > max_top_k {
        return Err(AnswerError::BadRequest(format!(
            "top_k must be between 1 and {max_top_k}"
        )));
    }
    Ok((question, tokens))
}

/// The passages an answer cites, in the order retrieval ranked them: what `eval` scores.
pub fn cited(hits: &[SearchHit], generative: bool) -> Vec<&SearchHit> {
    if generative {
        return hits.iter().collect();
    }
    hits.iter()
        .filter(|h| {
            h.lexical_score.is_some() || h.dense_score.unwrap_or(h.score) >= EXTRACTIVE_MIN_SCORE
        })
        .take(EXTRACTIVE_PASSAGES)
        .collect()
}

/// Whether the user has used this month's chat tokens (read through the `usage:` cache, which
/// every usage row invalidates). An unreadable count never blocks an answer.
async fn over_budget(sv: &Services, user_id: i64) -> bool {
    let (Some(limit), Some(db)) = (sv.settings.chat.monthly_token_limit, &sv.db) else {
        return false;
    };
    match sv.cache.month_usage(db, user_id).await {
        Ok(u) if u.total_tokens >= limit => {
            tracing::info!(
                user_id,
                used = u.total_tokens,
                limit,
                "monthly token limit reached: extractive answer"
            );
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this month's usage");
            false
        }
    }
}

fn extractive(hits: Vec<SearchHit>, base: Answer) -> Answer {
    let kept = cited(&hits, false);
    let citations: Vec<Citation> = kept
        .iter()
        .enumerate()
        .map(|(i, h)| citation(i + 1, h))
        .collect();
    let answer = if citations.is_empty() {
        "Extractive answer (no language model is configured): nothing in your memory matches \
         this question closely."
            .to_string()
    } else {
        let mut s = String::from(
            "Extractive answer (no language model is configured); the closest passages from your memory:\n",
        );
        for c in &citations {
            s.push_str(&format!("\n[{}] {}", c.n, c.snippet));
        }
        s
    };
    Answer {
        answer,
        citations,
        ..base
    }
}

const SYSTEM_PROMPT: &str = "You are OrbitPilot, the assistant of the OrbitingFox app. Answer the \
user's question using only the numbered passages from their own messages, posts and recordings. \
Cite the passages you use as [n]. If the passages do not contain the answer, say that you could \
not find it in their memory. Be brief.";

async fn generative(
    sv: &Services,
    chat: &crate::chat::ChatClient,
    q: &Question<'_>,
    question: &str,
    hits: Vec<SearchHit>,
    base: Answer,
) -> Result<Answer, AnswerError> {
    let mut passages = String::new();
    for (i, h) in hits.iter().enumerate() {
        let date = h.created_at.get(..10).unwrap_or(&h.created_at);
        passages.push_str(&format!(
            "[{}] ({}, {}) {}\n\n",
            i + 1,
            h.kind,
            date,
            h.text.trim()
        ));
    }
    let messages = [
        Message {
            role: "system",
            content: SYSTEM_PROMPT.into(),
        },
        Message {
            role: "user",
            content: format!("Passages:\n\n{passages}Question: {question}"),
        },
    ];
    let done = chat
        .complete(&messages, ANSWER_MAX_TOKENS, Value::Null)
        .await?;
    let model = if done.model.is_empty() {
        chat.model.clone()
    } else {
        done.model.clone()
    };
    let cost = sv.settings.prices.cost(
        &model,
        done.usage.prompt_tokens,
        done.usage.completion_tokens,
        0.0,
    );
    sv.log_usage(UsageRow {
        user_id: Some(q.user_id),
        feature: "orbitpilot_answer",
        model: model.clone(),
        prompt_tokens: done.usage.prompt_tokens,
        completion_tokens: done.usage.completion_tokens,
        audio_seconds: 0.0,
        cost_usd: cost,
        task_id: q.task_id.to_string(),
    })
    .await;
    let text = match (done.content, done.refusal) {
        (Some(c), _) if !c.trim().is_empty() => c,
        (_, Some(r)) => r,
        _ => {
            return Err(AnswerError::upstream(
                format!(
                    "the chat model returned no answer (finish_reason {})",
                    done.finish_reason
                ),
                false,
            ))
        }
    };
    let citations = hits
        .iter()
        .enumerate()
        .map(|(i, h)| citation(i + 1, h))
        .collect();
    Ok(Answer {
        answer: text,
        mode: "generative",
        citations,
        model: Some(model),
        usage: AnswerUsage {
            prompt_tokens: done.usage.prompt_tokens,
            completion_tokens: done.usage.completion_tokens,
            total_tokens: done.usage.prompt_tokens + done.usage.completion_tokens,
            cost_usd: cost,
        },
        ..base
    })
}
