//! `orbit-worker bench`: the end-to-end benchmark harness. One run on one machine, on one
//! corpus and one embedding server for both sides: our build (this binary's `build --all-users`,
//! as a child process) and, with `--baseline`, the Python pipeline it replaces
//! (`benches/baseline/build_memory.py`, in the test venv). Both are measured from outside the
//! same way (wall, CPU, RSS over time); ours also writes its stage timeline. The result is
//! `report.json`, `report.md` and SVG plots in `--out`.

mod corpus;
mod measure;
mod plots;
mod report;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

pub use corpus::{parse_size, resolve as resolve_corpus};
use measure::Sample;
use report::{
    Config, Machine, Report, Side, SizeRun, StageTotal, SweepFit, TimelinePoint, WorkMatch,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmbedderKind {
    /// The project's OpenAI-compatible double (`openai-double`), with `--tpm` and `--latency-ms`.
    Double,
    /// all-MiniLM-L6-v2 on this machine (ours only: the baseline has no local model).
    Local,
    /// The real API at OPENAI_BASE_URL with OPENAI_API_KEY (costs money).
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Ours: the embedded SQLite store; the baseline: qdrant-client's local mode.
    Embedded,
    /// A Qdrant server for both: QDRANT_URL (gRPC) and QDRANT_HTTP_URL, else one started from
    /// ORBIT_QDRANT_START (../shared/tools/qdrant/start-qdrant).
    Qdrant,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A corpus file, or a size to generate (seeded, cached): 10MB, 100MB, 1GB.
    #[arg(long, default_value = "100MB")]
    pub corpus: String,
    #[arg(long, value_enum, default_value = "double")]
    pub embedder: EmbedderKind,
    #[arg(long, value_enum, default_value = "embedded")]
    pub store: StoreKind,
    /// Tokens a minute of the double's key (0: unlimited); ours is told the same budget.
    #[arg(long, default_value_t = 0)]
    pub tpm: u64,
    /// The double's latency per embeddings request.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// The double's extra latency per token of a request, in µs.
    #[arg(long, default_value_t = 0)]
    pub us_per_token: u64,
    /// Also run the Python baseline on the same corpus and server, and compare.
    #[arg(long)]
    pub baseline: bool,
    /// Sizes to run one after the other (instead of --corpus), for time and RSS against size.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<String>,
    /// Vector size both sides ask for.
    #[arg(long, default_value_t = 384)]
    pub dimensions: usize,
    /// Where report.json, report.md and the plots go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// The Python with the baseline's packages (default ORBIT_TEST_PYTHON, else the Makefile's venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

/// The embedding model both sides name.
const MODEL: &str = "text-embedding-3-small";
const API_KEY: &str = "sk-bench";

/// The double as a child: its address, and a pipe to ask it for its counts.
struct Double {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    base_url: String,
}

impl Double {
    fn start(a: &BenchArgs) -> Result<Double> {
        let exe = sibling("openai-double")?;
        let mut child = Command::new(&exe)
            .args([
                "--tpm",
                &a.tpm.to_string(),
                "--latency-ms",
                &a.latency_ms.to_string(),
            ])
            .args(["--us-per-token", &a.us_per_token.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdin = child.stdin.take().context("double stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("double stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).context("the double's first line")?;
        let base_url = v["base_url"].as_str().context("no base_url")?.to_string();
        Ok(Double {
            child,
            stdin,
            stdout,
            base_url,
        })
    }

    fn counts(&mut self) -> Result<Value> {
        writeln!(self.stdin, "counts")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary built beside this one (`openai-double`).
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release --bins`",
            p.display()
        );
    }
    Ok(p)
}

/// A Qdrant server for one run: gRPC for ours, REST for the baseline's client.
struct Qdrant {
    grpc: String,
    http: String,
    pid: Option<u32>,
    _dir: Option<tempfile::TempDir>,
}

impl Qdrant {
    fn start() -> Result<Qdrant> {
        if let (Ok(grpc), Ok(http)) = (
            std::env::var("QDRANT_URL"),
            std::env::var("QDRANT_HTTP_URL"),
        ) {
            return Ok(Qdrant {
                grpc,
                http,
                pid: None,
                _dir: None,
            });
        }
        let start = std::env::var("ORBIT_QDRANT_START")
            .context("--store qdrant needs QDRANT_URL and QDRANT_HTTP_URL, or ORBIT_QDRANT_START (make qdrant)")?;
        let dir = tempfile::tempdir()?;
        let out = Command::new("bash").arg(&start).arg(dir.path()).output()?;
        let words: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        let [http, grpc, pid] = words.as_slice() else {
            bail!("{start} printed {words:?}, not HTTP_PORT GRPC_PORT PID");
        };
        Ok(Qdrant {
            grpc: format!("http://127.0.0.1:{grpc}"),
            http: format!("http://127.0.0.1:{http}"),
            pid: pid.parse().ok(),
            _dir: Some(dir),
        })
    }
}

impl Drop for Qdrant {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn python(a: &BenchArgs) -> PathBuf {
    if let Some(p) = &a.python {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("ORBIT_TEST_PYTHON") {
        return p.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    Path::new(&home).join(".cache/orbit-worker/venv/bin/python")
}

/// A spinner with the side's elapsed time and RSS; quiet when stderr is not a terminal.
fn spinner(what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let pb = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_prefix(what.to_string());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg}") {
        pb.set_style(style);
    }
    pb
}

/// Tokens and requests the double served between two count readings.
fn served(before: &Value, after: &Value) -> (u64, u64, u64) {
    let d = |k: &str| {
        after[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before[k].as_u64().unwrap_or(0))
    };
    (d("tokens"), d("answered"), d("refused"))
}

/// Timeline points (250 ms apart) each share is measured across.
const TIMELINE_SPAN: usize = 4;

/// Our build's timeline file → per-interval busy and waiting shares per stage, and embed
/// tokens a second.
fn read_timeline(path: &Path) -> (Vec<String>, Vec<TimelinePoint>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (Vec::new(), Vec::new());
    };
    let points: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let names: Vec<String> = points
        .first()
        .and_then(|p| p["stages"].as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let get = |p: &Value, i: usize, k: &str| p["stages"][i][k].as_f64().unwrap_or(0.0);
    let embed = names.iter().position(|n| n == "embed");
    let mut out = Vec::new();
    // Stages publish their times when they hand a batch on, so a 250 ms point can fall between
    // two hand-ons of a busy stage: shares are taken over TIMELINE_SPAN points (1 s).
    for w in points.windows(TIMELINE_SPAN + 1) {
        let w = [&w[0], &w[TIMELINE_SPAN]];
        let dt = w[1]["t"].as_f64().unwrap_or(0.0) - w[0]["t"].as_f64().unwrap_or(0.0);
        if dt <= 0.0 {
            continue;
        }
        let share = |k: &str| -> Vec<f64> {
            (0..names.len())
                .map(|i| ((get(w[1], i, k) - get(w[0], i, k)) / dt).clamp(0.0, 1.0))
                .collect()
        };
        out.push(TimelinePoint {
            t: w[1]["t"].as_f64().unwrap_or(0.0),
            busy: share("busy_s"),
            waiting_next: share("wait_downstream_s"),
            embed_tokens_per_s: embed
                .map(|i| (get(w[1], i, "tokens") - get(w[0], i, "tokens")) / dt)
                .unwrap_or(0.0),
        });
    }
    (names, out)
}

fn ours(
    a: &BenchArgs,
    corpus: &Path,
    double: Option<&str>,
    qdrant: Option<&Qdrant>,
    dir: &Path,
) -> Result<(Side, Vec<String>, Vec<TimelinePoint>)> {
    let data = dir.join("ours-data");
    let _ = std::fs::remove_dir_all(&data);
    let timeline = dir.join("ours-timeline.jsonl");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["build", "--all-users", "--json", "--timeline"])
        .arg(&timeline)
        .arg("--source")
        .arg(corpus)
        .env("ORBIT_DATA_DIR", &data)
        .env_remove("DATABASE_URL");
    match a.embedder {
        EmbedderKind::Double | EmbedderKind::Openai => {
            cmd.env("ORBIT_EMBEDDER", "openai")
                .env("ORBIT_EMBED_MODEL", MODEL)
                .env("ORBIT_EMBED_DIMENSIONS", a.dimensions.to_string());
            if let Some(url) = double {
                cmd.env("OPENAI_BASE_URL", url)
                    .env("OPENAI_API_KEY", API_KEY);
            }
            if a.tpm > 0 {
                cmd.env("ORBIT_EMBED_TPM", a.tpm.to_string());
            }
        }
        EmbedderKind::Local => {
            cmd.env("ORBIT_EMBEDDER", "local");
        }
    }
    match qdrant {
        Some(q) => cmd
            .env("QDRANT_URL", &q.grpc)
            .env("ORBIT_QDRANT_ALIAS", "orbit_bench"),
        None => cmd.env_remove("QDRANT_URL"),
    };
    let m = measured(cmd, "orbit-worker build", "orbit-worker")?;
    let r: Value = serde_json::from_str(&m.stdout).context("our build's --json report")?;
    let stages = r["stages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| StageTotal {
                    name: s["name"].as_str().unwrap_or("").to_string(),
                    items_out: s["items_out"].as_u64().unwrap_or(0),
                    busy_s: s["busy_ms"].as_f64().unwrap_or(0.0) / 1e3,
                    wait_upstream_s: s["wait_upstream_ms"].as_f64().unwrap_or(0.0) / 1e3,
                    wait_downstream_s: s["wait_downstream_ms"].as_f64().unwrap_or(0.0) / 1e3,
                })
                .collect()
        })
        .unwrap_or_default();
    let (names, points) = read_timeline(&timeline);
    let _ = std::fs::remove_dir_all(&data);
    Ok((side("orbit-worker", m, &r, stages), names, points))
}

fn baseline(
    a: &BenchArgs,
    corpus: &Path,
    base_url: &str,
    qdrant: Option<&Qdrant>,
    dir: &Path,
) -> Result<Side> {
    let script = corpus::repo_dir().join("benches/baseline/build_memory.py");
    let store = dir.join("baseline-qdrant");
    let _ = std::fs::remove_dir_all(&store);
    let mut cmd = Command::new(python(a));
    cmd.arg(&script)
        .arg("--corpus")
        .arg(corpus)
        .args(["--base-url", base_url, "--model", MODEL])
        .args(["--dimensions", &a.dimensions.to_string()]);
    if a.embedder == EmbedderKind::Double {
        cmd.args(["--api-key", API_KEY]);
    } else if let Ok(k) = std::env::var("OPENAI_API_KEY") {
        cmd.args(["--api-key", &k]);
    }
    match qdrant {
        Some(q) => cmd.args(["--qdrant-url", &q.http]),
        None => cmd.arg("--qdrant-path").arg(&store),
    };
    // Python tiktoken downloads its rank files unless pointed at the copies `make
    // tiktoken-cache` keeps; there is no internet here to download them from.
    if std::env::var_os("TIKTOKEN_CACHE_DIR").is_none() {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
        cmd.env(
            "TIKTOKEN_CACHE_DIR",
            Path::new(&home).join(".cache/orbit-worker/tiktoken"),
        );
    }
    let m = measured(cmd, "the Python baseline", "baseline")?;
    let _ = std::fs::remove_dir_all(&store);
    let r: Value = serde_json::from_str(m.stdout.trim()).context("the baseline's JSON")?;
    let stages = r["stages"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| StageTotal {
                    name: k.clone(),
                    items_out: 0,
                    busy_s: v.as_f64().unwrap_or(0.0),
                    wait_upstream_s: 0.0,
                    wait_downstream_s: 0.0,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(side("Python baseline", m, &r, stages))
}

/// One side from what measuring it found and the counts it printed. Tokens embedded are the
/// side's own count until the double's replaces them.
fn side(name: &str, m: measure::Measured, r: &Value, stages: Vec<StageTotal>) -> Side {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    Side {
        name: name.into(),
        wall_s: m.wall_s,
        startup_s: r["startup_s"].as_f64().unwrap_or(0.0),
        cpu_s: m.cpu_s,
        peak_rss_mb: m.peak_rss_mb,
        documents_read: n("documents_read"),
        chunks: n("chunks"),
        tokens: n("tokens"),
        overlap_tokens: n("overlap_tokens"),
        embedded_tokens: r
            .get("embedded_tokens")
            .map_or(n("tokens"), |_| n("embedded_tokens")),
        requests: n("requests"),
        refused_429: 0,
        stages,
        rss: m.samples,
    }
}

/// Runs one side under a spinner.
fn measured(cmd: Command, what: &str, label: &str) -> Result<measure::Measured> {
    let pb = spinner(label);
    let m = measure::run(cmd, what, &|s: &Sample| {
        pb.set_message(format!("{:.1} s, RSS {:.0} MB", s.t, s.rss_mb));
        pb.tick();
    });
    pb.finish_and_clear();
    m
}

/// One corpus: ours, then the baseline, against the same server.
fn run_size(a: &BenchArgs, spec: &str, dir: &Path) -> Result<SizeRun> {
    let corpus = corpus::resolve(spec)?;
    let corpus_mb = std::fs::metadata(&corpus)?.len() as f64 / 1e6;
    let mut double = match a.embedder {
        EmbedderKind::Double => Some(Double::start(a)?),
        _ => None,
    };
    let base_url = match &double {
        Some(d) => d.base_url.clone(),
        None => {
            std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "https://api.openai.com/v1".into())
        }
    };
    let qdrant = match a.store {
        StoreKind::Qdrant => Some(Qdrant::start()?),
        StoreKind::Embedded => None,
    };
    let before = double.as_mut().map(|d| d.counts()).transpose()?;
    let (mut ours, timeline_stages, timeline) = ours(
        a,
        &corpus,
        double.as_ref().map(|d| d.base_url.as_str()),
        qdrant.as_ref(),
        dir,
    )?;
    let mid = double.as_mut().map(|d| d.counts()).transpose()?;
    if let (Some(b), Some(m)) = (&before, &mid) {
        (ours.embedded_tokens, ours.requests, ours.refused_429) = served(b, m);
    }
    let baseline = if a.baseline {
        if a.embedder == EmbedderKind::Local {
            bail!("--baseline needs an OpenAI-compatible embedder (double or openai): the Python task had no local model");
        }
        let mut b = baseline(a, &corpus, &base_url, qdrant.as_ref(), dir)?;
        if let (Some(m), Some(d)) = (&mid, double.as_mut()) {
            let after = d.counts()?;
            (b.embedded_tokens, b.requests, b.refused_429) = served(m, &after);
        }
        Some(b)
    } else {
        None
    };
    let work = baseline.as_ref().map(|b| WorkMatch::of(&ours, b));
    Ok(SizeRun {
        corpus: corpus.display().to_string(),
        corpus_mb,
        ours,
        timeline,
        timeline_stages,
        baseline,
        work,
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    let sizes: Vec<String> = if a.sweep.is_empty() {
        vec![a.corpus.clone()]
    } else {
        a.sweep.clone()
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let work = tempfile::tempdir()?;
    let mut runs = Vec::new();
    for s in &sizes {
        eprintln!("bench: {s}");
        runs.push(run_size(&a, s, work.path())?);
    }
    let mut report = Report {
        started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: Machine::here(),
        config: Config {
            embedder: format!("{:?}", a.embedder).to_lowercase(),
            store: format!("{:?}", a.store).to_lowercase(),
            tpm: (a.tpm > 0).then_some(a.tpm),
            latency_ms: a.latency_ms,
            dimensions: a.dimensions,
        },
        sweep: SweepFit::of(&runs),
        runs,
        plots: Vec::new(),
    };
    report.plots = plots::write_all(&report, &a.out)?;
    std::fs::write(
        a.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(a.out.join("report.md"), report::markdown(&report))?;
    crate::outln!("{}", report::headline(&report));
    for r in &report.runs {
        if let Some(w) = &r.work {
            if !w.within_tolerance {
                bail!(
                    "the baseline did different work on {}: chunks {:.2}% and tokens {:.2}% apart (at most {:.0}%)",
                    r.corpus,
                    100.0 * w.chunks_diff,
                    100.0 * w.tokens_diff,
                    100.0 * report::WORK_TOLERANCE
                );
            }
        }
    }
    crate::outln!("report: {}", a.out.join("report.md").display());
    Ok(())
}
