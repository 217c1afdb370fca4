//! What the CLI prints for people and scripts, on stdout and stderr, without ever panicking: a
//! reader that went away (`orbit-worker build --json | head -1`) or a full disk stops the
//! printing, not the work. `println!` panics there ("failed printing to stdout: Broken pipe"),
//! which would abort a build or a re-embed run half way for a closed pipe.
//!
//! Restoring SIGPIPE's default instead would kill the process mid-run, as `cat` is killed; a run
//! that writes a store must end on its own terms, so output is dropped and the run goes on.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once stdout refused a write: nothing more is tried there.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// The same for stderr (progress lines, not the log, which has its own writer).
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Writes and flushes one piece of output; the first failure marks the stream gone. Returns
/// whether it was written.
fn write_to(w: &mut dyn Write, gone: &AtomicBool, args: std::fmt::Arguments) -> bool {
    if gone.load(Ordering::Relaxed) {
        return false;
    }
    let written = w.write_fmt(args).and_then(|()| w.flush());
    if written.is_err() {
        gone.store(true, Ordering::Relaxed);
    }
    written.is_ok()
}

/// Prints to stdout; use through [`outln!`](crate::outln).
pub fn out(args: std::fmt::Arguments) {
    write_to(&mut std::io::stdout().lock(), &STDOUT_GONE, args);
}

/// Prints to stderr; use through [`errln!`](crate::errln).
pub fn err(args: std::fmt::Arguments) {
    write_to(&mut std::io::stderr().lock(), &STDERR_GONE, args);
}

/// `println!` that never panics: see the module.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that never panics: see the module.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that went away after `room` bytes.
    struct Closing {
        room: usize,
        got: Vec<u8>,
        writes: usize,
    }

    impl Write for Closing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes += 1;
            if self.got.len() + buf.len() > self.room {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_reader_stops_the_output_once_and_nothing_panics() {
        let gone = AtomicBool::new(false);
        let mut w = Closing {
            room: 6,
            got: Vec::new(),
            writes: 0,
        };
        assert!(write_to(&mut w, &gone, format_args!("one\n")));
        assert!(!write_to(&mut w, &gone, format_args!("two\n")));
        assert!(gone.load(Ordering::Relaxed));
        let writes = w.writes;
        assert!(!write_to(&mut w, &gone, format_args!("three\n")));
        assert_eq!(w.writes, writes, "a gone stream is not tried again");
        assert_eq!(w.got, b"one\n");
    }
}
