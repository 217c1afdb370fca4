//! Task results as Celery's Redis backend stores them, byte for byte in field order and spacing.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use super::message::iso;

/// Celery's states that this worker writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Success,
    Failure,
    Retry,
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Retry => "RETRY",
            State::Revoked => "REVOKED",
        }
    }
}

/// An exception as Celery serialises it, so `AsyncResult.get()` raises a class of that name.
#[derive(Debug, Clone, PartialEq)]
pub struct ExceptionInfo {
    pub exc_type: String,
    pub exc_module: String,
    /// The exception's args; `get()` builds the exception from them.
    pub exc_message: Vec<Value>,
    /// Readable text for `AsyncResult.traceback`; None where Celery stores null.
    pub traceback: Option<String>,
}

impl ExceptionInfo {
    /// An error raised by a task: one message argument and a short traceback naming the task.
    pub fn raised(exc_type: &str, exc_module: &str, message: &str, task: &str) -> Self {
        ExceptionInfo {
            exc_type: exc_type.to_string(),
            exc_module: exc_module.to_string(),
            exc_message: vec![Value::String(message.to_string())],
            traceback: Some(format!(
                "Traceback (most recent call last):\n  File \"orbit-worker\", in {task}\n{exc_type}: {message}\n"
            )),
        }
    }

    pub fn not_registered(name: &str) -> Self {
        Self::bare("NotRegistered", "celery.exceptions", vec![name.into()])
    }

    pub fn revoked(reason: &str) -> Self {
        Self::bare("TaskRevokedError", "celery.exceptions", vec![reason.into()])
    }

    /// Celery reports the hard limit in seconds as the only argument.
    pub fn time_limit_exceeded(limit_s: f64) -> Self {
        let arg = if limit_s.fract() == 0.0 {
            json!(limit_s as i64)
        } else {
            json!(limit_s)
        };
        Self::bare("TimeLimitExceeded", "billiard.exceptions", vec![arg])
    }

    pub fn bare(exc_type: &str, exc_module: &str, exc_message: Vec<Value>) -> Self {
        ExceptionInfo {
            exc_type: exc_type.into(),
            exc_module: exc_module.into(),
            exc_message,
            traceback: None,
        }
    }

    fn to_value(&self) -> Value {
        // serde_json keeps insertion order here (preserve_order): Celery's order.
        json!({"exc_type": self.exc_type, "exc_message": self.exc_message, "exc_module": self.exc_module})
    }

    /// `ValueError('boom')`, the form Celery's log lines use.
    pub fn repr(&self) -> String {
        let args: Vec<String> = self
            .exc_message
            .iter()
            .map(|v| match v {
                Value::String(s) => py_str_repr(s),
                other => other.to_string(),
            })
            .collect();
        format!("{}({})", self.exc_type, args.join(", "))
    }
}

/// Python's `repr()` of a str: single quotes unless only double quotes avoid escaping.
pub fn py_str_repr(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

/// Python's `repr()` of a JSON value as json.loads gives it: `None`, `True`, `'text'`, `[1, 2]`,
/// `{'k': 1}`; what Celery's events show for results and arguments.
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => py_float(f),
            _ => n.to_string(),
        },
        Value::String(s) => py_str_repr(s),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", py_str_repr(k), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Python's `repr()` of a float: the shortest digits that read back, in exponent form (two
/// exponent digits at least) below 1e-4 and from 1e16, as in `succeeded in 1.5e-05s`.
pub fn py_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "nan".into()
        } else if f > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let e = format!("{f:e}");
        let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// Python's `repr()` of the positional arguments as a tuple: `()`, `(1,)`, `(1, 'a')`.
pub fn py_args_repr(args: &[Value]) -> String {
    match args {
        [one] => format!("({},)", py_repr(one)),
        _ => format!(
            "({})",
            args.iter().map(py_repr).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[derive(Serialize)]
struct Meta<'a> {
    status: &'static str,
    result: Value,
    traceback: Option<&'a str>,
    children: Value,
    date_done: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<&'a str>,
    task_id: &'a str,
}

/// What a result record says, before it is written.
#[derive(Debug, Clone)]
pub enum Outcome {
    Success(Value),
    Failure(ExceptionInfo),
    Retry(ExceptionInfo),
    /// Celery's reason: `revoked` (discarded when it came up), `terminated` (stopped while it
    /// ran) or `expired`. `expired` has `children: []`, the others null, as Celery writes them.
    Revoked {
        reason: &'static str,
    },
}

impl Outcome {
    pub fn state(&self) -> State {
        match self {
            Outcome::Success(_) => State::Success,
            Outcome::Failure(_) => State::Failure,
            Outcome::Retry(_) => State::Retry,
            Outcome::Revoked { .. } => State::Revoked,
        }
    }
}

/// The JSON stored under `celery-task-meta-<id>` and published on the channel of that name.
pub fn encode_meta(
    task_id: &str,
    parent_id: Option<&str>,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> String {
    let (result, traceback, children, date_done) = match outcome {
        Outcome::Success(v) => (v.clone(), None, json!([]), Some(iso(now))),
        Outcome::Failure(e) => (
            e.to_value(),
            e.traceback.as_deref(),
            json!([]),
            Some(iso(now)),
        ),
        // A retry lists the task's own next attempt as its child, and is not done.
        Outcome::Retry(e) => (
            e.to_value(),
            e.traceback.as_deref(),
            json!([[[task_id, null], null]]),
            None,
        ),
        Outcome::Revoked { reason } => {
            let e = ExceptionInfo::revoked(reason);
            let children = if *reason == "expired" {
                json!([])
            } else {
                Value::Null
            };
            (e.to_value(), None, children, Some(iso(now)))
        }
    };
    let meta = Meta {
        status: outcome.state().as_str(),
        result,
        traceback,
        children,
        date_done,
        parent_id,
        task_id,
    };
    to_python_json(&meta)
}

/// JSON with Python's `json.dumps` separators (`", "` and `": "`), so stored records match what a
/// Python worker writes byte for byte.
pub fn to_python_json<T: Serialize>(v: &T) -> String {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    // Serialising plain data into a Vec cannot fail.
    if v.serialize(&mut ser).is_err() {
        return "null".into();
    }
    String::from_utf8(out).unwrap_or_else(|_| "null".into())
}

struct PythonFormatter;

fn separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(w, first)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_as_python_writes_them() {
        for (f, want) in [
            (0.0, "0.0"),
            (1.0, "1.0"),
            (0.0012345, "0.0012345"),
            (0.0001, "0.0001"),
            (1.5e-5, "1.5e-05"),
            (2.25e-7, "2.25e-07"),
            (12.5, "12.5"),
            (1e16, "1e+16"),
            (-3.0e-5, "-3e-05"),
            (f64::NAN, "nan"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn values_are_shown_as_python_reprs_them() {
        let v = json!({"a": [1, 2.5, null, true, "it's"], "b": {}});
        assert_eq!(
            py_repr(&v),
            r#"{'a': [1, 2.5, None, True, "it's"], 'b': {}}"#
        );
        assert_eq!(py_args_repr(&[]), "()");
        assert_eq!(py_args_repr(&[json!(2)]), "(2,)");
        assert_eq!(py_args_repr(&[json!(2), json!("x")]), "(2, 'x')");
    }

    #[test]
    fn repr_reads_like_python() {
        let e = ExceptionInfo::raised("ValueError", "builtins", "boom", "t");
        assert_eq!(e.repr(), "ValueError('boom')");
        assert_eq!(
            ExceptionInfo::time_limit_exceeded(1.0).repr(),
            "TimeLimitExceeded(1)"
        );
        assert_eq!(py_str_repr("it's"), "\"it's\"");
        assert_eq!(py_str_repr("a'b\"c\n"), "'a\\'b\"c\\n'");
    }

    /// Found by the `result_encoding` fuzz target: a record carries its value's own encoding
    /// (a long integer literal read as a float included), never a re-rounded one.
    #[test]
    fn a_value_is_carried_as_it_encodes() {
        let v: Value = serde_json::from_str(&format!(r#"{{"a": [{}]}}"#, "1".repeat(51))).unwrap();
        let meta = encode_meta("id", None, &Outcome::Success(v.clone()), Utc::now());
        assert!(
            meta.contains(&format!("\"result\": {}", to_python_json(&v))),
            "{meta}"
        );
    }

    /// Rebuilt from what each captured record says, our encoding is the captured bytes.
    #[test]
    fn captured_results_are_byte_identical() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/celery");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if !name.starts_with("result_") {
                continue;
            }
            let f: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let raw = f["raw"].as_str().unwrap();
            let m = &f["parsed"];
            let exc = || ExceptionInfo {
                exc_type: m["result"]["exc_type"].as_str().unwrap().into(),
                exc_module: m["result"]["exc_module"].as_str().unwrap().into(),
                exc_message: m["result"]["exc_message"].as_array().unwrap().clone(),
                traceback: m["traceback"].as_str().map(str::to_string),
            };
            let outcome = match m["status"].as_str().unwrap() {
                "SUCCESS" => Outcome::Success(m["result"].clone()),
                "FAILURE" => Outcome::Failure(exc()),
                "RETRY" => Outcome::Retry(exc()),
                "REVOKED" => Outcome::Revoked {
                    reason: if m["children"].is_array() {
                        "expired"
                    } else {
                        "revoked"
                    },
                },
                s => panic!("{name}: state {s}"),
            };
            let done = m["date_done"]
                .as_str()
                .map(|d| DateTime::parse_from_rfc3339(d).unwrap().with_timezone(&Utc));
            let ours = encode_meta(
                m["task_id"].as_str().unwrap(),
                m["parent_id"].as_str(),
                &outcome,
                done.unwrap_or_else(Utc::now),
            );
            assert_eq!(ours, raw, "{name}");
            n += 1;
        }
        assert!(n >= 10, "only {n} result captures");
    }

    #[test]
    fn factory_exceptions_match_captures() {
        assert_eq!(
            ExceptionInfo::not_registered("does.not.exist").to_value(),
            json!({"exc_type": "NotRegistered", "exc_message": ["does.not.exist"], "exc_module": "celery.exceptions"})
        );
        assert_eq!(
            ExceptionInfo::time_limit_exceeded(1.0).to_value(),
            json!({"exc_type": "TimeLimitExceeded", "exc_message": [1], "exc_module": "billiard.exceptions"})
        );
    }
}
