//! Log output: tracing lines gathered in memory and written to stderr in few writes, and the
//! worker's default line format, Celery's own.
//!
//! A busy worker logs two lines per task. One `write` per line, or a writer thread woken per
//! line, cost a fifth of its CPU. Lines are kept in a buffer that is written out when it fills,
//! at least every `FLUSH_EVERY`, at once for warnings and errors, and at exit.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Bytes gathered before a write is forced.
const BUFFER_BYTES: usize = 64 * 1024;
/// Longest an info line waits in memory.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

struct BufferedStderr {
    buf: Mutex<Vec<u8>>,
}

static SINK: BufferedStderr = BufferedStderr {
    buf: Mutex::new(Vec::new()),
};

impl BufferedStderr {
    fn flush(&self) {
        if let Ok(mut b) = self.buf.lock() {
            if !b.is_empty() {
                // Nowhere to report a failed write to stderr.
                let _ = std::io::stderr().write_all(&b);
                b.clear();
            }
        }
    }
}

/// Writes out whatever is buffered: before an exit that skips destructors.
pub fn flush() {
    SINK.flush();
}

/// The writer handle for `tracing_subscriber::fmt`.
#[derive(Clone, Copy)]
pub struct LogSink;

/// The writer for `tracing_subscriber::fmt`, and a thread that flushes on a timer.
pub fn writer() -> LogSink {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                SINK.flush();
            });
    });
    LogSink
}

pub struct Line {
    bytes: Vec<u8>,
    urgent: bool,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let Ok(mut b) = SINK.buf.lock() else { return };
        b.extend_from_slice(&self.bytes);
        if self.urgent || b.len() >= BUFFER_BYTES {
            let _ = std::io::stderr().write_all(&b);
            b.clear();
        }
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            bytes: Vec::with_capacity(256),
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            bytes: Vec::with_capacity(256),
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

/// The fields of a task's span (`task`, `id`, and `slot` once it holds a pool slot), kept in
/// the span for the Celery line format.
#[derive(Default, Debug, PartialEq)]
struct TaskFields {
    name: String,
    id: String,
    slot: Option<u64>,
}

impl Visit for TaskFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "task" => self.name = value.to_string(),
            "id" => self.id = value.to_string(),
            _ => {}
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "slot" {
            self.slot = Some(value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "task" => self.name = format!("{value:?}"),
            "id" => self.id = format!("{value:?}"),
            _ => {}
        }
    }
}

/// Keeps a `task` span's fields in its extensions, so a line logged inside it can name the task
/// and the pool slot that runs it.
pub struct TaskSpans;

impl<S> Layer<S> for TaskSpans
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "task" {
            return;
        }
        let mut f = TaskFields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(f) = span.extensions_mut().get_mut::<TaskFields>() {
                values.record(f);
            }
        }
    }
}

/// Celery's default `worker_log_format` and `worker_task_log_format`:
/// `[2026-05-23 10:12:33,501: INFO/MainProcess] message` for the worker's own lines, and
/// `[…: INFO/ForkPoolWorker-1] orbitpilot.build_memory[abc]: message` for a task's own. A line
/// logged while a task holds pool slot N names `ForkPoolWorker-N`, as the prefork child that
/// runs it would; the rest are the main process's. Local time, as Python's logging writes it.
/// Fields other than the message follow it as `key=value`.
pub struct CeleryFormat;

/// The worker's own modules: their lines use the worker format even inside a task's span (the
/// `Task …[…] succeeded in` lines), as Celery's trace and strategy loggers do.
const WORKER_TARGET: &str = "orbit_worker::worker";

impl<S, N> FormatEvent<S, N> for CeleryFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            _ => "DEBUG",
        };
        let task = ctx.event_scope().and_then(|scope| {
            scope.from_root().find_map(|span| {
                span.extensions()
                    .get::<TaskFields>()
                    .map(|f| (f.name.clone(), f.id.clone(), f.slot))
            })
        });
        let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S,%3f");
        match task.as_ref().and_then(|t| t.2) {
            Some(slot) => write!(w, "[{now}: {level}/ForkPoolWorker-{slot}] ")?,
            None => write!(w, "[{now}: {level}/MainProcess] ")?,
        }
        // A task id, a name or a message from outside cannot start a line of its own.
        let mut one = OneLine(&mut w);
        if let Some((name, id, _)) = &task {
            if !meta.target().starts_with(WORKER_TARGET) {
                write!(one, "{name}[{id}]: ")?;
            }
        }
        let mut line = LineFields {
            w: &mut one,
            result: Ok(()),
        };
        event.record(&mut line);
        line.result?;
        writeln!(w)
    }
}

/// Writes through to the line, control characters escaped (`\n`, `\r`, `\u{1b}`), so one event is
/// one line whatever it carries: a forged `[…: INFO/MainProcess] …` stays inside its own line.
struct OneLine<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for OneLine<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !s.chars().any(|c| c.is_control() && c != '\t') {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\t' => self.0.write_char(c)?,
                c if c.is_control() => write!(self.0, "{}", c.escape_default())?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Writes the message, then the other fields as ` key=value`.
struct LineFields<'a, 'b, 'w> {
    w: &'a mut OneLine<'b, 'w>,
    result: fmt::Result,
}

impl Visit for LineFields<'_, '_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = if field.name() == "message" {
                fmt::Write::write_str(self.w, value)
            } else {
                write!(self.w, " {}={value}", field.name())
            };
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = if field.name() == "message" {
                write!(self.w, "{value:?}")
            } else {
                write!(self.w, " {}={value:?}", field.name())
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_wait_in_the_buffer_until_flushed() {
        let mut l = Line {
            bytes: Vec::new(),
            urgent: false,
        };
        l.write_all(b"one line\n").unwrap();
        drop(l);
        assert!(SINK.buf.lock().unwrap().ends_with(b"one line\n"));
        flush();
        assert!(SINK.buf.lock().unwrap().is_empty());
    }

    /// A writer into a shared buffer, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn lines_follow_celerys_worker_and_task_formats() {
        use tracing_subscriber::layer::SubscriberExt;
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .event_format(CeleryFormat)
            .finish()
            .with(TaskSpans);
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "orbit_worker::worker", "Connected to redis");
            let span = tracing::info_span!("task", id = %"abc-1", task = "orbit.echo", retries = 0, slot = tracing::field::Empty);
            tracing::info!(target: "orbit_worker::worker::lifecycle", parent: &span, "Task orbit.echo[abc-1] received");
            span.record("slot", 2u64);
            span.in_scope(|| {
                tracing::warn!(target: "orbit_worker::tasks::memory", chunks = 3, "own line");
                tracing::info!(target: "orbit_worker::tasks::memory", "a\n[2026-01-01 00:00:00,000: ERROR/MainProcess] forged\r\x1b");
                tracing::error!(target: "orbit_worker::worker::lifecycle", "Task orbit.echo[abc-1] raised unexpected: ValueError('x')");
            });
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let mut rest = Vec::new();
        for l in &lines {
            // `[2026-05-23 10:12:33,501: ` — the timestamp with a comma before the milliseconds.
            let ts = &l[1..24];
            let b = ts.as_bytes();
            assert!(l.starts_with('[') && &l[24..26] == ": ", "{l}");
            assert!(
                b[4] == b'-' && b[10] == b' ' && b[13] == b':' && b[19] == b',',
                "{l}"
            );
            assert!(
                ts.chars().filter(|c| c.is_ascii_digit()).count() == 17,
                "{l}"
            );
            rest.push(&l[26..]);
        }
        assert_eq!(
            rest,
            [
                "INFO/MainProcess] Connected to redis",
                "INFO/MainProcess] Task orbit.echo[abc-1] received",
                "WARNING/ForkPoolWorker-2] orbit.echo[abc-1]: own line chunks=3",
                "INFO/ForkPoolWorker-2] orbit.echo[abc-1]: a\\n[2026-01-01 00:00:00,000: ERROR/MainProcess] forged\\r\\u{1b}",
                "ERROR/ForkPoolWorker-2] Task orbit.echo[abc-1] raised unexpected: ValueError('x')",
            ]
        );
    }
}
