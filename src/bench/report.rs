//! What a benchmark run found, as plain data (`report.json`), and the same as markdown
//! (`report.md`): the machine, both sides, their ratio, and whether they did the same work.

use serde::Serialize;

use super::measure::Sample;

/// The baseline must have cut the same chunks and tokens as ours within this share, or the
/// comparison is of different work (the 2%).
pub const WORK_TOLERANCE: f64 = 0.02;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gb: f64,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn here() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_gb = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gb,
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        }
    }
}

/// One stage's totals over a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageTotal {
    pub name: String,
    pub items_out: u64,
    pub busy_s: f64,
    pub wait_upstream_s: f64,
    pub wait_downstream_s: f64,
}

/// One point of our build's timeline: per stage, the share of the interval before it that the
/// stage was busy and that it waited on the next stage; and tokens embedded a second.
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub t: f64,
    pub busy: Vec<f64>,
    pub waiting_next: Vec<f64>,
    pub embed_tokens_per_s: f64,
}

/// One side of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub name: String,
    pub wall_s: f64,
    /// Of `wall_s`, the interpreter's start and imports (the baseline; 0 for ours): a Celery
    /// worker pays them once, not per build, so the speed-up leaves them out.
    pub startup_s: f64,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
    pub documents_read: u64,
    pub chunks: u64,
    pub tokens: u64,
    /// Of `tokens`, those a chunk repeats from the one before it (the splitter's overlap).
    pub overlap_tokens: u64,
    /// Tokens the embedding server answered for this side (the double's own count).
    pub embedded_tokens: u64,
    pub requests: u64,
    pub refused_429: u64,
    pub stages: Vec<StageTotal>,
    pub rss: Vec<Sample>,
}

impl Side {
    /// The tokens of the text chunked: the work done, whatever each splitter's overlap policy.
    pub fn text_tokens(&self) -> u64 {
        self.tokens.saturating_sub(self.overlap_tokens)
    }

    /// Tokens embedded a second of the build itself (start-up left out).
    pub fn tokens_per_s(&self) -> f64 {
        self.embedded_tokens as f64 / (self.wall_s - self.startup_s).max(1e-9)
    }
}

/// Whether the baseline did our work: chunk counts and the tokens of the text chunked side by
/// side (overlap apart: our chunker repeats exactly the overlap asked for, LangChain's
/// recursive splitter only whole pieces that fit in it, so overlap is reported, not matched).
#[derive(Debug, Clone, Serialize)]
pub struct WorkMatch {
    pub chunks_diff: f64,
    pub tokens_diff: f64,
    pub within_tolerance: bool,
}

/// |a − b| / b.
fn rel_diff(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64).abs() / (b as f64).max(1.0)
}

impl WorkMatch {
    pub fn of(ours: &Side, baseline: &Side) -> WorkMatch {
        let chunks_diff = rel_diff(baseline.chunks, ours.chunks);
        let tokens_diff = rel_diff(baseline.text_tokens(), ours.text_tokens());
        WorkMatch {
            chunks_diff,
            tokens_diff,
            within_tolerance: chunks_diff <= WORK_TOLERANCE && tokens_diff <= WORK_TOLERANCE,
        }
    }
}

/// One corpus size: ours, the baseline if it ran, and what compares them.
#[derive(Debug, Clone, Serialize)]
pub struct SizeRun {
    pub corpus: String,
    pub corpus_mb: f64,
    pub ours: Side,
    pub timeline: Vec<TimelinePoint>,
    pub timeline_stages: Vec<String>,
    pub baseline: Option<Side>,
    pub work: Option<WorkMatch>,
}

impl SizeRun {
    /// Baseline wall without its start-up ÷ ours (how many times faster ours is).
    pub fn speedup(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .map(|b| (b.wall_s - b.startup_s) / (self.ours.wall_s - self.ours.startup_s).max(1e-9))
    }

    /// Ours peak RSS ÷ the baseline's.
    pub fn rss_ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .map(|b| self.ours.peak_rss_mb / b.peak_rss_mb.max(1e-9))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub embedder: String,
    pub store: String,
    /// Tokens a minute of the embedding key; None = unlimited.
    pub tpm: Option<u64>,
    pub latency_ms: u64,
    pub dimensions: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started: String,
    pub machine: Machine,
    pub config: Config,
    pub runs: Vec<SizeRun>,
    /// Seconds per MB and peak RSS against size over a sweep: the fitted slopes.
    pub sweep: Option<SweepFit>,
    pub plots: Vec<String>,
}

/// Least-squares lines through (MB, seconds) and (MB, peak MB) of a sweep, and how far seconds
/// per MB and peak RSS spread (largest ÷ smallest − 1).
#[derive(Debug, Clone, Serialize)]
pub struct SweepFit {
    pub seconds_per_mb: f64,
    pub rss_mb_per_mb: f64,
    pub time_per_mb_spread: f64,
    pub rss_spread: f64,
}

/// Slope of the least-squares line through `pts`.
pub fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

fn spread(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    if v.is_empty() || min <= 0.0 {
        0.0
    } else {
        max / min - 1.0
    }
}

impl SweepFit {
    pub fn of(runs: &[SizeRun]) -> Option<SweepFit> {
        (runs.len() >= 2).then(|| SweepFit {
            seconds_per_mb: slope(
                &runs
                    .iter()
                    .map(|r| (r.corpus_mb, r.ours.wall_s))
                    .collect::<Vec<_>>(),
            ),
            rss_mb_per_mb: slope(
                &runs
                    .iter()
                    .map(|r| (r.corpus_mb, r.ours.peak_rss_mb))
                    .collect::<Vec<_>>(),
            ),
            time_per_mb_spread: spread(runs.iter().map(|r| r.ours.wall_s / r.corpus_mb)),
            rss_spread: spread(runs.iter().map(|r| r.ours.peak_rss_mb)),
        })
    }
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// `report.md`: the headline table first, then the work check, stages, and plots.
pub fn markdown(r: &Report) -> String {
    let m = &r.machine;
    let c = &r.config;
    let tpm = c
        .tpm
        .map_or("unlimited".to_string(), |t| format!("{t} TPM"));
    let mut s = String::new();
    s += "# orbit-worker bench\n\n";
    s += &format!(
        "Machine: {} cores, {:.1} GB, {} (Linux {}). Run {}.\n\n",
        m.cores, m.memory_gb, m.cpu_model, m.kernel, r.started
    );
    s += &format!(
        "Embedder: {} ({tpm}, {} ms latency, {} dimensions); store: {}.\n\n",
        c.embedder, c.latency_ms, c.dimensions, c.store
    );
    s += &headline(r);
    for run in &r.runs {
        s += &format!("\n## {} ({:.0} MB)\n\n", run.corpus, run.corpus_mb);
        if let (Some(b), Some(w)) = (&run.baseline, &run.work) {
            s += "| the same work | orbit-worker | baseline | difference |\n|---|---|---|---|\n";
            s += &format!(
                "| chunks | {} | {} | {} |\n| tokens of the text chunked | {} | {} | {} |\n| overlap tokens (not compared) | {} | {} | |\n| tokens embedded | {} | {} | |\n\n",
                run.ours.chunks,
                b.chunks,
                pct(w.chunks_diff),
                run.ours.text_tokens(),
                b.text_tokens(),
                pct(w.tokens_diff),
                run.ours.overlap_tokens,
                b.overlap_tokens,
                run.ours.embedded_tokens,
                b.embedded_tokens
            );
            s += &format!(
                "Within {}: **{}**.\n\n",
                pct(WORK_TOLERANCE),
                if w.within_tolerance { "yes" } else { "NO" }
            );
        }
        for side in std::iter::once(&run.ours).chain(run.baseline.as_ref()) {
            s += &format!("{} stages:\n\n| stage | out | busy s | waited on previous s | waited on next s |\n|---|---|---|---|---|\n", side.name);
            for st in &side.stages {
                s += &format!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} |\n",
                    st.name, st.items_out, st.busy_s, st.wait_upstream_s, st.wait_downstream_s
                );
            }
            s += "\n";
        }
    }
    if let Some(f) = &r.sweep {
        s += &format!(
            "\n## Sweep\n\nFitted: {:.3} s per MB, {:.3} MB of peak RSS per MB of corpus. Seconds per MB \
             spread {} across sizes, peak RSS spread {}.\n",
            f.seconds_per_mb,
            f.rss_mb_per_mb,
            pct(f.time_per_mb_spread),
            pct(f.rss_spread)
        );
    }
    if !r.plots.is_empty() {
        s += "\n## Plots\n\n";
        for p in &r.plots {
            s += &format!("![{p}]({p})\n\n");
        }
    }
    s
}

/// The table `bench` prints at the end and `report.md` opens with.
pub fn headline(r: &Report) -> String {
    let mut s = String::from(
        "| corpus | side | wall s | of it start-up s | CPU s | peak RSS MB | chunks | tokens | tokens/s | speed-up | RSS ratio |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in &r.runs {
        for side in std::iter::once(&run.ours).chain(run.baseline.as_ref()) {
            let ours = std::ptr::eq(side, &run.ours);
            let (speed, rss) = if ours {
                (
                    run.speedup().map_or("".into(), |x| format!("**{x:.1}×**")),
                    run.rss_ratio().map_or("".into(), |x| format!("{x:.3}")),
                )
            } else {
                ("1×".to_string(), "1".to_string())
            };
            s += &format!(
                "| {:.0} MB | {} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} | {:.0} | {} | {} |\n",
                run.corpus_mb,
                side.name,
                side.wall_s,
                side.startup_s,
                side.cpu_s,
                side.peak_rss_mb,
                side.chunks,
                side.tokens,
                side.tokens_per_s(),
                speed,
                rss
            );
        }
    }
    if let Some(tpm) = r.config.tpm {
        let budget = tpm as f64 / 60.0;
        for run in &r.runs {
            for side in std::iter::once(&run.ours).chain(run.baseline.as_ref()) {
                s += &format!(
                    "\n{} used {} of the {tpm} TPM budget ({:.0} of {:.0} tokens/s).",
                    side.name,
                    pct(side.tokens_per_s() / budget),
                    side.tokens_per_s(),
                    budget
                );
            }
        }
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_and_spreads() {
        assert_eq!(slope(&[(10.0, 1.0), (100.0, 10.0), (1000.0, 100.0)]), 0.1);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert!((spread([2.0, 2.2, 2.1].into_iter()) - 0.1).abs() < 1e-12);
        assert_eq!(rel_diff(102, 100), 0.02);
        assert_eq!(rel_diff(0, 0), 0.0);
    }
}
