//! One side of a benchmark run as a child process, measured from outside the same way for both
//! sides: wall time, CPU (the child's own rusage), RSS over time and its peak (`/proc`).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// How often RSS is read: a build of a minute gets a few hundred points, and a reading costs
/// the child nothing (the kernel fills `/proc/<pid>/status`).
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// One reading of the child.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t: f64,
    pub rss_mb: f64,
}

/// What running one side cost, and what it printed.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub wall_s: f64,
    pub cpu_s: f64,
    /// The kernel's high-water mark of the child's resident set (`VmHWM`), so a spike between
    /// two samples still counts.
    pub peak_rss_mb: f64,
    pub samples: Vec<Sample>,
    #[serde(skip)]
    pub stdout: String,
}

/// `(VmRSS, VmHWM)` of a process in MB, from `/proc/<pid>/status`.
fn rss_of(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> Option<f64> {
        let line = s.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
}

/// CPU seconds of every child this process has waited for (user + system).
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given; RUSAGE_CHILDREN is always valid.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) } != 0 {
        return 0.0;
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(r.ru_utime) + s(r.ru_stime)
}

/// Runs `cmd` to its end, sampling it; `tick` is called with the latest sample as it runs (the
/// progress bar). A non-zero exit is an error carrying the child's stderr.
pub fn run(mut cmd: Command, what: &str, tick: &dyn Fn(&Sample)) -> Result<Measured> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let cpu_before = children_cpu();
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let pid = child.id();
    let mut out = child.stdout.take().context("child stdout")?;
    let mut err = child.stderr.take().context("child stderr")?;
    // Both pipes drained on threads, so a chatty child never blocks on a full pipe.
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let done = Arc::new(AtomicBool::new(false));
    let readings = Arc::new(Mutex::new((Vec::new(), 0f64)));
    let (d, r) = (done.clone(), readings.clone());
    let sampler = std::thread::spawn(move || {
        while !d.load(Ordering::Relaxed) {
            if let Some((rss, hwm)) = rss_of(pid) {
                let s = Sample {
                    t: started.elapsed().as_secs_f64(),
                    rss_mb: rss,
                };
                if let Ok(mut g) = r.lock() {
                    g.0.push(s);
                    g.1 = g.1.max(hwm);
                }
            }
            std::thread::sleep(SAMPLE_EVERY);
        }
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if let Some(last) = readings.lock().ok().and_then(|g| g.0.last().copied()) {
            tick(&last);
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let wall_s = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        let tail: String = stderr
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!("{what} failed ({status}):\n{tail}");
    }
    let (samples, peak) = std::mem::take(&mut *readings.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Measured {
        wall_s,
        cpu_s: children_cpu() - cpu_before,
        peak_rss_mb: peak,
        samples,
        stdout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_timed_and_sampled_and_its_failure_told() {
        // Python holds 60 MB for a moment: the peak sees it.
        let mut c = Command::new("python3");
        c.args([
            "-c",
            "import time; b = bytearray(60 * 2**20); time.sleep(0.5); print('done')",
        ]);
        let m = run(c, "python", &|_| {}).unwrap();
        assert_eq!(m.stdout.trim(), "done");
        assert!(m.wall_s >= 0.5, "{m:?}");
        assert!(m.peak_rss_mb >= 60.0, "{m:?}");
        assert!(!m.samples.is_empty());
        let mut c = Command::new("sh");
        c.args(["-c", "echo broken >&2; exit 3"]);
        let e = run(c, "sh", &|_| {}).unwrap_err().to_string();
        assert!(e.contains("sh failed") && e.contains("broken"), "{e}");
    }
}
