//! `config.send_verification_email(user_id, verify_url)`: a multipart text + HTML email over SMTP
//! (`SMTP_URL`). A 4xx or a network error retries; a 5xx gives up (a refused address is recorded,
//! an authentication failure is logged as a configuration error). The link carries a token: it is
//! never logged, and never part of the result.

use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;
use serde_json::json;

use super::{bind, Raises, RetryPolicy, TaskContext, TaskDef, TaskResult, TimeLimits};
use crate::config::SmtpConfig;

pub const NAME: &str = "config.send_verification_email";
const PARAMS: &[&str] = &["user_id", "verify_url"];
const RAISES: Raises = Raises {
    module: "config.errors",
    task: NAME,
};

/// Mail servers greylist for minutes: retries spread over about half an hour.
pub static TASK: TaskDef = TaskDef {
    name: NAME,
    retry: RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_secs(60),
        max_delay: Duration::from_secs(900),
    },
    limits: TimeLimits {
        soft: Duration::from_secs(90),
        hard: Duration::from_secs(120),
    },
    block: super::Block::Smtp,
    run: |ctx| Box::pin(run(ctx)),
};

#[derive(Deserialize)]
struct Args {
    user_id: i64,
    verify_url: String,
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn message(from: &Mailbox, to: Mailbox, url: &str) -> Result<Message, String> {
    let text = format!(
        "Welcome to OrbitingFox!\n\nConfirm your email address by opening this link:\n\n{url}\n\n\
         If you did not sign up, ignore this email."
    );
    let u = html_escape(url);
    let html = format!(
        "<!doctype html><html><body style=\"font-family:sans-serif\">\
         <h1>Welcome to OrbitingFox!</h1>\
         <p>Confirm your email address:</p>\
         <p><a href=\"{u}\" style=\"padding:10px 16px;background:#ff6a00;color:#fff;text-decoration:none;border-radius:6px\">Verify my email</a></p>\
         <p>Or paste this link into your browser:<br>{u}</p>\
         <p style=\"color:#888\">If you did not sign up, ignore this email.</p></body></html>"
    );
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject("Verify your OrbitingFox email address")
        .multipart(
            MultiPart::alternative()
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_PLAIN)
                        .body(text),
                )
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(html),
                ),
        )
        .map_err(|e| e.to_string())
}

/// `ne…@example.com`: enough to recognise an address in a log, not to harvest it.
fn mask(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let head: String = local.chars().take(2).collect();
            format!("{head}…@{domain}")
        }
        None => "…".into(),
    }
}

async fn run(ctx: TaskContext) -> TaskResult {
    let args: Args = bind(&ctx.call, PARAMS)?;
    let fail = |kind: &str, msg: &str| -> TaskResult { Err(RAISES.permanent(kind, msg)) };
    let retry = |msg: &str| -> TaskResult { Err(RAISES.retry("SMTPError", msg, None)) };
    let sv = &ctx.services;
    let s: &SmtpConfig = ctx.own_block(RAISES)?;
    if !(args.verify_url.starts_with("https://") || args.verify_url.starts_with("http://")) {
        return fail("ValueError", "verify_url must be an http(s) URL");
    }
    let Some(smtp_url) = &s.url else {
        return fail("ConfigError", "SMTP_URL is not set");
    };
    let Some(db) = &sv.db else {
        return fail(
            "ConfigError",
            "DATABASE_URL is not set: user addresses live there",
        );
    };
    let email = match db.user_email(args.user_id).await {
        Ok(Some((e, _))) if !e.trim().is_empty() => e,
        Ok(Some(_)) => {
            return fail(
                "ValueError",
                &format!("user {} has no email address", args.user_id),
            )
        }
        Ok(None) => {
            return fail(
                "UserNotFound",
                &format!("user {} does not exist", args.user_id),
            )
        }
        Err(e) => return retry(&e.to_string()),
    };
    let to: Mailbox = match email.parse() {
        Ok(m) => m,
        Err(_) => {
            let _ = db
                .email_bounced(args.user_id, &email, None, "not a valid address")
                .await;
            return fail(
                "InvalidAddress",
                &format!("{} is not a valid email address", mask(&email)),
            );
        }
    };
    let from = &s.from;
    let msg = match message(from, to, &args.verify_url) {
        Ok(m) => m,
        Err(e) => return fail("ValueError", &e),
    };
    let transport = match AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url.expose()) {
        Ok(b) => b.timeout(Some(s.timeout)).build(),
        Err(e) => return fail("ConfigError", &format!("SMTP_URL: {e}")),
    };
    // lettre's timeout covers only the connect: a server that accepts and never greets would
    // hold the task for ever without this one.
    let sent = tokio::time::timeout(s.timeout, transport.send(msg)).await;
    let to_log = mask(&email);
    match sent {
        Err(_) => retry(&format!(
            "the SMTP server did not answer within {:?}",
            s.timeout
        )),
        Ok(Ok(resp)) => {
            tracing::info!(user_id = args.user_id, to = %to_log, code = %resp.code(), "verification email sent");
            Ok(json!({
                "user_id": args.user_id,
                "to": to_log,
                "smtp_code": resp.code().to_string(),
            }))
        }
        Ok(Err(e)) => {
            let code = e.status().map(|c| c.to_string());
            let text = e.to_string();
            if e.is_permanent() {
                let c: Option<u16> = code.as_deref().and_then(|c| c.parse().ok());
                if matches!(c, Some(530) | Some(534) | Some(535) | Some(538)) {
                    tracing::error!(code = ?c, "SMTP authentication failed: check SMTP_URL credentials");
                    return fail(
                        "ConfigError",
                        &format!("SMTP authentication failed: {text}"),
                    );
                }
                if let Err(err) = db.email_bounced(args.user_id, &email, c, &text).await {
                    tracing::warn!(error = %err, "cannot record the refused address");
                }
                tracing::warn!(user_id = args.user_id, to = %to_log, code = ?c, "address refused by the SMTP server");
                return fail(
                    "AddressRejected",
                    &format!("the SMTP server refused {to_log}: {text}"),
                );
            }
            if e.is_tls() {
                return fail("ConfigError", &format!("SMTP TLS failed: {text}"));
            }
            // lettre's client errors are a mismatch between our settings and the server (no
            // authentication mechanism both speak, STARTTLS not offered): a retry meets the
            // same server.
            if e.is_client() {
                tracing::error!("SMTP client error: check SMTP_URL against the server: {text}");
                return fail("ConfigError", &format!("SMTP: {text}"));
            }
            // 4xx, connection refused or dropped: the server or the network will come back.
            retry(&format!("SMTP send failed: {text}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_multipart_alternative_with_the_link_in_both_parts() {
        let from: Mailbox = "OrbitingFox <no-reply@orbitingfox.app>".parse().unwrap();
        let to: Mailbox = "ana@example.test".parse().unwrap();
        let url = "https://app.test/verify?token=a&b=<x>";
        let m = message(&from, to, url).unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("text/plain") && raw.contains("text/html"));
        assert_eq!(
            html_escape(url),
            "https://app.test/verify?token=a&amp;b=&lt;x&gt;"
        );
        assert_eq!(mask("newuser@example.test"), "ne…@example.test");
    }
}
