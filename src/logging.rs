//! Log output: tracing lines gathered in memory and written to stderr in few writes.
//!
//! A busy worker logs two lines per task. One `write` per line, or a writer thread woken per
//! line, cost a fifth of its CPU. Lines are kept in a buffer that is written out when it fills,
//! at least every `FLUSH_EVERY`, at once for warnings and errors, and at exit.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

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
}
