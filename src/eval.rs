//! `orbit-worker eval`: retrieval scored on questions whose evidence is known. Each question is
//! retrieved exactly as `generate_answer` retrieves it (`answer::retrieve`), in each mode asked;
//! the metrics are pure functions over the ranked passages' source ids, table-tested below on a
//! case computed by hand.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use orbit_pipeline::report::percentile;
use orbit_pipeline::search::{fuse, Fusion, SearchMode};
use orbit_pipeline::store::SearchHit;
use orbit_pipeline::tokenize::Encoding;
use serde::{Deserialize, Serialize};

use crate::answer::{retrieve, Question};
use crate::config::Settings;
use crate::services::Services;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// JSONL: {"user_id", "question", "evidence": [source ids], "kind"} per line
    /// (`answer_source_ids` is read as `evidence`).
    #[arg(long)]
    pub questions: PathBuf,
    /// The k of recall@k, nDCG@k and the context tokens; retrieval asks for the largest.
    #[arg(long, value_delimiter = ',', default_values_t = vec![5, 10])]
    pub top_k: Vec<usize>,
    /// Modes to score (comma-separated); default all three.
    #[arg(long, value_delimiter = ',')]
    pub mode: Vec<SearchMode>,
    /// Also fuse each question's dense and lexical lists over a grid of RRF k and lexical
    /// weights (the same `fuse` the store runs), to choose the defaults on measurement.
    #[arg(long)]
    pub sweep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One eval question.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalQuestion {
    pub user_id: i64,
    pub question: String,
    #[serde(alias = "answer_source_ids")]
    pub evidence: Vec<String>,
    #[serde(default = "other")]
    pub kind: String,
}

fn other() -> String {
    "other".into()
}

/// What one ranked list scored for one question.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuestionScore {
    /// 1 when a passage holding any evidence is within the first k, by k.
    pub recall: BTreeMap<usize, f64>,
    /// 1 / the rank of the first passage holding evidence; 0 when none does.
    pub rr: f64,
    /// Binary-gain nDCG: a passage gains 1 for the first time it covers an evidence id not
    /// covered above it; the ideal puts one evidence id in each of the first places.
    pub ndcg: BTreeMap<usize, f64>,
}

/// Scores one ranked list of passages (each its source ids) against the evidence.
pub fn score(ranked: &[Vec<String>], evidence: &[String], ks: &[usize]) -> QuestionScore {
    let mut seen: Vec<&str> = Vec::new();
    // gains[i]: evidence ids passage i newly covers, counted once each (0 or 1 gain).
    let mut gain = Vec::with_capacity(ranked.len());
    let mut first: Option<usize> = None;
    for (i, ids) in ranked.iter().enumerate() {
        let mut new = false;
        for id in ids {
            if evidence.iter().any(|e| e == id) {
                if first.is_none() {
                    first = Some(i);
                }
                if !seen.contains(&id.as_str()) {
                    seen.push(id);
                    new = true;
                }
            }
        }
        gain.push(if new { 1.0 } else { 0.0 });
    }
    let mut out = QuestionScore {
        rr: first.map(|r| 1.0 / (r as f64 + 1.0)).unwrap_or(0.0),
        ..Default::default()
    };
    let mut distinct: Vec<&String> = evidence.iter().collect();
    distinct.sort();
    distinct.dedup();
    for &k in ks {
        out.recall.insert(
            k,
            if first.is_some_and(|r| r < k) {
                1.0
            } else {
                0.0
            },
        );
        let dcg: f64 = gain
            .iter()
            .take(k)
            .enumerate()
            .map(|(i, g)| g / (i as f64 + 2.0).log2())
            .sum();
        let ideal: f64 = (0..distinct.len().min(k))
            .map(|i| 1.0 / (i as f64 + 2.0).log2())
            .sum();
        out.ndcg
            .insert(k, if ideal > 0.0 { dcg / ideal } else { 0.0 });
    }
    out
}

/// Means over a group of questions.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Summary {
    pub questions: usize,
    pub recall: BTreeMap<usize, f64>,
    pub mrr: f64,
    pub ndcg: BTreeMap<usize, f64>,
    /// Mean cl100k tokens of the first k passages' text: what a chat model would be sent.
    pub context_tokens: BTreeMap<usize, f64>,
}

#[derive(Default)]
struct Acc {
    n: usize,
    recall: BTreeMap<usize, f64>,
    rr: f64,
    ndcg: BTreeMap<usize, f64>,
    tokens: BTreeMap<usize, f64>,
}

impl Acc {
    fn add(&mut self, s: &QuestionScore, tokens: &BTreeMap<usize, usize>) {
        self.n += 1;
        self.rr += s.rr;
        for (k, v) in &s.recall {
            *self.recall.entry(*k).or_default() += v;
        }
        for (k, v) in &s.ndcg {
            *self.ndcg.entry(*k).or_default() += v;
        }
        for (k, v) in tokens {
            *self.tokens.entry(*k).or_default() += *v as f64;
        }
    }

    fn summary(&self) -> Summary {
        let n = self.n.max(1) as f64;
        let mean = |m: &BTreeMap<usize, f64>| m.iter().map(|(k, v)| (*k, v / n)).collect();
        Summary {
            questions: self.n,
            recall: mean(&self.recall),
            mrr: self.rr / n,
            ndcg: mean(&self.ndcg),
            context_tokens: mean(&self.tokens),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ModeReport {
    pub mode: SearchMode,
    pub all: Summary,
    pub by_kind: BTreeMap<String, Summary>,
    /// Milliseconds per question: embedding the question (dense, hybrid) and searching.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
}

#[derive(Debug, Serialize)]
pub struct SweepPoint {
    pub rrf_k: f32,
    pub lexical_weight: f32,
    pub all: Summary,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub questions: usize,
    pub top_k: Vec<usize>,
    pub embedding_model: String,
    pub fusion: Fusion,
    pub modes: Vec<ModeReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sweep: Vec<SweepPoint>,
}

pub fn read_questions(path: &PathBuf) -> Result<Vec<EvalQuestion>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let q: EvalQuestion = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an eval question", path.display(), i + 1))?;
        if q.evidence.is_empty() {
            bail!(
                "{}:{}: a question needs its evidence ids",
                path.display(),
                i + 1
            );
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("{} holds no questions", path.display());
    }
    Ok(out)
}

fn sources(hits: &[SearchHit]) -> Vec<Vec<String>> {
    hits.iter().map(|h| h.source_ids.clone()).collect()
}

fn context_tokens(hits: &[SearchHit], ks: &[usize]) -> BTreeMap<usize, usize> {
    ks.iter()
        .map(|&k| {
            let n = hits
                .iter()
                .take(k)
                .map(|h| Encoding::Cl100kBase.count(&h.text))
                .sum();
            (k, n)
        })
        .collect()
}

/// Grid of the fusion sweep: RRF k from "first places dominate" to the textbook 60, and lexical
/// weights from equal to lexical-led.
const SWEEP_K: &[f32] = &[1.0, 5.0, 10.0, 20.0, 60.0];
const SWEEP_WEIGHT: &[f32] = &[0.5, 1.0, 1.5, 2.0, 3.0, 5.0];

pub async fn evaluate(sv: &Services, args: &EvalArgs) -> Result<EvalReport> {
    let questions = read_questions(&args.questions)?;
    let mut ks = args.top_k.clone();
    ks.sort_unstable();
    ks.dedup();
    if ks.is_empty() || ks[0] == 0 {
        bail!("--top-k needs positive values");
    }
    let depth = *ks.last().expect("not empty");
    if depth > crate::answer::MAX_TOP_K {
        bail!("--top-k at most {}", crate::answer::MAX_TOP_K);
    }
    let modes = if args.mode.is_empty() {
        SearchMode::ALL.to_vec()
    } else {
        args.mode.clone()
    };
    let mut report = EvalReport {
        questions: questions.len(),
        top_k: ks.clone(),
        embedding_model: sv.embedder().await?.model_id().to_string(),
        fusion: sv.settings.search.fusion,
        modes: Vec::new(),
        sweep: Vec::new(),
    };
    for mode in modes {
        let mut all = Acc::default();
        let mut by_kind: BTreeMap<String, Acc> = BTreeMap::new();
        let mut times = Vec::with_capacity(questions.len());
        for q in &questions {
            let started = Instant::now();
            let hits = retrieve(
                sv,
                &Question {
                    user_id: q.user_id,
                    question: &q.question,
                    top_k: depth,
                    task_id: "eval",
                    mode: Some(mode),
                },
                crate::answer::MAX_TOP_K,
            )
            .await
            .with_context(|| format!("retrieving {:?}", q.question))?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
            let s = score(&sources(&hits), &q.evidence, &ks);
            let t = context_tokens(&hits, &ks);
            all.add(&s, &t);
            by_kind.entry(q.kind.clone()).or_default().add(&s, &t);
        }
        times.sort_by(f64::total_cmp);
        report.modes.push(ModeReport {
            mode,
            all: all.summary(),
            by_kind: by_kind
                .iter()
                .map(|(k, a)| (k.clone(), a.summary()))
                .collect(),
            latency_ms_p50: percentile(&times, 0.5),
            latency_ms_p99: percentile(&times, 0.99),
        });
    }
    if args.sweep {
        report.sweep = sweep(sv, &questions, &ks).await?;
    }
    Ok(report)
}

/// Every grid point fused from the same two lists per question, fetched once.
async fn sweep(sv: &Services, questions: &[EvalQuestion], ks: &[usize]) -> Result<Vec<SweepPoint>> {
    let depth = sv
        .settings
        .search
        .fusion
        .depth
        .max(*ks.last().unwrap_or(&1));
    let mut lists = Vec::with_capacity(questions.len());
    for q in questions {
        let ask = |mode, top_k| Question {
            user_id: q.user_id,
            question: &q.question,
            top_k,
            task_id: "eval",
            mode: Some(mode),
        };
        let dense = retrieve(sv, &ask(SearchMode::Dense, depth), depth).await?;
        let lexical = retrieve(sv, &ask(SearchMode::Lexical, depth), depth).await?;
        lists.push((dense, lexical));
    }
    let mut out = Vec::new();
    for &rrf_k in SWEEP_K {
        for &lexical_weight in SWEEP_WEIGHT {
            let f = Fusion {
                rrf_k,
                lexical_weight,
                dense_weight: 1.0,
                depth,
            };
            let mut acc = Acc::default();
            for (q, (d, l)) in questions.iter().zip(&lists) {
                let fused = fuse(d.clone(), l.clone(), &f, *ks.last().unwrap_or(&1));
                acc.add(&score(&sources(&fused), &q.evidence, ks), &BTreeMap::new());
            }
            out.push(SweepPoint {
                rrf_k,
                lexical_weight,
                all: acc.summary(),
            });
        }
    }
    Ok(out)
}

fn print_row(label: &str, n: usize, s: &Summary, extra: &str) {
    let cols = |m: &BTreeMap<usize, f64>| {
        m.values()
            .map(|v| format!("{v:>7.3}"))
            .collect::<Vec<_>>()
            .join("")
    };
    let toks = s
        .context_tokens
        .values()
        .map(|v| format!("{v:>8.0}"))
        .collect::<Vec<_>>()
        .join("");
    crate::outln!(
        "{label:<24}{n:>6}{}{:>7.3}{}{toks}{extra}",
        cols(&s.recall),
        s.mrr,
        cols(&s.ndcg)
    );
}

pub fn print(r: &EvalReport) {
    let ks = |p: &str| {
        r.top_k
            .iter()
            .map(|k| format!("{:>7}", format!("{p}@{k}")))
            .collect::<String>()
    };
    let tk = r
        .top_k
        .iter()
        .map(|k| format!("{:>8}", format!("tok@{k}")))
        .collect::<String>();
    crate::outln!(
        "{} questions, embedding model {}, fusion: RRF k {} with weights dense {} / lexical {}, {} deep",
        r.questions, r.embedding_model, r.fusion.rrf_k, r.fusion.dense_weight, r.fusion.lexical_weight, r.fusion.depth
    );
    crate::outln!(
        "{:<24}{:>6}{}{:>7}{}{tk}{:>10}{:>10}",
        "mode / kind",
        "n",
        ks("R"),
        "MRR",
        ks("nDCG"),
        "p50 ms",
        "p99 ms"
    );
    for m in &r.modes {
        print_row(
            m.mode.as_str(),
            m.all.questions,
            &m.all,
            &format!("{:>10.1}{:>10.1}", m.latency_ms_p50, m.latency_ms_p99),
        );
        for (kind, s) in &m.by_kind {
            print_row(&format!("  {kind}"), s.questions, s, "");
        }
    }
    if !r.sweep.is_empty() {
        crate::outln!(
            "\nfusion sweep (hybrid):\n{:<24}{:>6}{}{:>7}{}",
            "rrf k / lexical weight",
            "n",
            ks("R"),
            "MRR",
            ks("nDCG")
        );
        for p in &r.sweep {
            print_row(
                &format!("k {} w {}", p.rrf_k, p.lexical_weight),
                p.all.questions,
                &p.all,
                "",
            );
        }
    }
}

pub async fn run(settings: Settings, args: EvalArgs) -> Result<()> {
    let sv = Services::new(settings.split().0)?;
    let report = evaluate(&sv, &args).await?;
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&[&str]]) -> Vec<Vec<String>> {
        v.iter()
            .map(|p| p.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn scores_a_hand_computed_case() {
        let ev = vec!["a".to_string(), "b".to_string()];
        // Ranks: 1 nothing, 2 holds a, 3 holds a again, 4 holds b.
        let ranked = ids(&[&["x"], &["y", "a"], &["a"], &["b", "z"]]);
        let s = score(&ranked, &ev, &[1, 2, 4]);
        assert_eq!(s.recall, BTreeMap::from([(1, 0.0), (2, 1.0), (4, 1.0)]));
        assert_eq!(s.rr, 0.5);
        // DCG@4 = 1/log2(3) + 1/log2(5); ideal with two ids = 1 + 1/log2(3).
        let dcg4 = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2();
        assert!((s.ndcg[&4] - dcg4 / idcg).abs() < 1e-12);
        assert!((s.ndcg[&2] - (1.0 / 3f64.log2()) / idcg).abs() < 1e-12);
        assert_eq!(s.ndcg[&1], 0.0);
    }

    #[test]
    fn score_table() {
        let ev = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // name, ranked, evidence, recall@3, rr, ndcg@3
        type Case = (&'static str, Vec<Vec<String>>, Vec<String>, f64, f64, f64);
        let cases: &[Case] = &[
            // name, ranked, evidence, recall@3, rr, ndcg@3
            (
                "first place",
                ids(&[&["a"], &["x"]]),
                ev(&["a"]),
                1.0,
                1.0,
                1.0,
            ),
            ("missed", ids(&[&["x"], &["y"]]), ev(&["a"]), 0.0, 0.0, 0.0),
            (
                "beyond k",
                ids(&[&["x"], &["y"], &["z"], &["a"]]),
                ev(&["a"]),
                0.0,
                0.25,
                0.0,
            ),
            ("nothing retrieved", ids(&[]), ev(&["a"]), 0.0, 0.0, 0.0),
            // A pack holding both ids gains once (binary gain), against an ideal of two places.
            (
                "pack with both",
                ids(&[&["a", "b"]]),
                ev(&["a", "b"]),
                1.0,
                1.0,
                1.0 / (1.0 + 1.0 / 3f64.log2()),
            ),
            (
                "duplicate evidence ids",
                ids(&[&["a"]]),
                ev(&["a", "a"]),
                1.0,
                1.0,
                1.0,
            ),
        ];
        for (name, ranked, e, r3, rr, n3) in cases {
            let s = score(ranked, e, &[3]);
            assert_eq!(s.recall[&3], *r3, "{name} recall");
            assert_eq!(s.rr, *rr, "{name} rr");
            assert!(
                (s.ndcg[&3] - n3).abs() < 1e-12,
                "{name} ndcg {}",
                s.ndcg[&3]
            );
        }
    }

    #[test]
    fn summaries_average() {
        let mut acc = Acc::default();
        let ev = vec!["a".to_string()];
        acc.add(
            &score(&ids(&[&["a"]]), &ev, &[5]),
            &BTreeMap::from([(5, 10)]),
        );
        acc.add(
            &score(&ids(&[&["x"], &["a"]]), &ev, &[5]),
            &BTreeMap::from([(5, 20)]),
        );
        acc.add(
            &score(&ids(&[&["x"]]), &ev, &[5]),
            &BTreeMap::from([(5, 30)]),
        );
        let s = acc.summary();
        assert_eq!(s.questions, 3);
        assert!((s.recall[&5] - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.mrr - 0.5).abs() < 1e-12);
        assert_eq!(s.context_tokens[&5], 20.0);
    }
}
