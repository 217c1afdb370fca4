//! The report's SVG plots (plotters' SVG backend: text stays text, no font files needed):
//! throughput per stage, the stage timeline, RSS over time, tokens/s against the TPM budget,
//! and for a sweep time and peak RSS against size.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{slope, Report, SizeRun};

/// One size of plot: wide enough for a stage legend beside the lines.
const SIZE: (u32, u32) = (900, 480);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

type Chart<'a> = ChartContext<
    'a,
    SVGBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The series' legend, boxed on a light background where it hides the least.
fn legend(c: &mut Chart, at: SeriesLabelPosition) -> Result<()> {
    c.configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// The top of an axis for values up to `max`: a little headroom, never an empty range.
fn top(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.1
    } else {
        1.0
    }
}

/// Writes every plot the report has data for into `dir`; returns their file names.
pub fn write_all(r: &Report, dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let Some(run) = r.runs.last() else {
        return Ok(names);
    };
    let mut emit =
        |name: &str, f: &dyn Fn(&DrawingArea<SVGBackend, Shift>) -> Result<()>| -> Result<()> {
            let path = dir.join(name);
            {
                let root = SVGBackend::new(&path, SIZE).into_drawing_area();
                root.fill(&WHITE).map_err(err)?;
                f(&root)?;
                root.present().map_err(err)?;
            }
            names.push(name.to_string());
            Ok(())
        };
    emit("throughput.svg", &|a| throughput(a, run))?;
    if !run.timeline.is_empty() {
        emit("timeline.svg", &|a| timeline(a, run))?;
    }
    emit("rss.svg", &|a| rss(a, run))?;
    if !run.timeline.is_empty() {
        emit("tokens.svg", &|a| tokens(a, run, r.config.tpm))?;
    }
    if r.runs.len() >= 2 {
        emit("sweep.svg", &|a| sweep(a, &r.runs))?;
    }
    Ok(names)
}

/// Items each stage handed on per second it was busy, ours (log scale: the stages differ by
/// orders of magnitude).
fn throughput(area: &DrawingArea<SVGBackend, Shift>, run: &SizeRun) -> Result<()> {
    let st: Vec<(&str, f64)> = run
        .ours
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.items_out as f64 / s.busy_s.max(1e-6)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let max = st.iter().map(|s| s.1).fold(1.0, f64::max);
    let min = st.iter().map(|s| s.1).fold(max, f64::min);
    let n = st.len().max(1) as f64;
    let mut c = ChartBuilder::on(area)
        .caption(
            "Throughput per stage (items out per busy second, ours)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            -0.5f64..n - 0.5,
            ((min / 2.0).max(0.1)..max * 2.0).log_scale(),
        )
        .map_err(err)?;
    let names: Vec<String> = st.iter().map(|s| s.0.to_string()).collect();
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(st.len().max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("stage")
        .y_desc("items / busy s")
        .draw()
        .map_err(err)?;
    c.draw_series(st.iter().enumerate().map(|(i, (_, v))| {
        let x = i as f64;
        Rectangle::new(
            [(x - 0.35, (min / 2.0).max(0.1)), (x + 0.35, *v)],
            COLORS[i % 6].filled(),
        )
    }))
    .map_err(err)?;
    Ok(())
}

/// Each stage's share of every interval spent busy (top) and waiting on the next stage (bottom).
fn timeline(area: &DrawingArea<SVGBackend, Shift>, run: &SizeRun) -> Result<()> {
    let (upper, lower) = area.split_vertically(SIZE.1 / 2);
    let t_max = top(run.timeline.last().map_or(1.0, |p| p.t) / 1.1);
    for (panel, caption, pick) in [
        (&upper, "Stage busy (share of each interval)", 0),
        (&lower, "Stage waiting on the next stage (share)", 1),
    ] {
        let mut c = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..t_max, 0f64..1.05f64)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("seconds")
            .y_desc("share")
            .draw()
            .map_err(err)?;
        for (i, name) in run.timeline_stages.iter().enumerate() {
            let color = COLORS[i % 6];
            c.draw_series(LineSeries::new(
                run.timeline.iter().map(|p| {
                    let v = if pick == 0 { &p.busy } else { &p.waiting_next };
                    (p.t, v.get(i).copied().unwrap_or(0.0).clamp(0.0, 1.0))
                }),
                &color,
            ))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        legend(&mut c, SeriesLabelPosition::UpperRight)?;
    }
    Ok(())
}

/// Resident memory over time, both sides; the legend carries each peak.
fn rss(area: &DrawingArea<SVGBackend, Shift>, run: &SizeRun) -> Result<()> {
    let sides: Vec<_> = std::iter::once(&run.ours)
        .chain(run.baseline.as_ref())
        .collect();
    let t_max = top(sides.iter().map(|s| s.wall_s).fold(0.0, f64::max));
    let m_max = top(sides.iter().map(|s| s.peak_rss_mb).fold(0.0, f64::max));
    let mut c = ChartBuilder::on(area)
        .caption("Resident memory over time", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..m_max)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("RSS MB")
        .draw()
        .map_err(err)?;
    for (i, s) in sides.iter().enumerate() {
        let color = COLORS[i % 6];
        c.draw_series(LineSeries::new(
            s.rss.iter().map(|p| (p.t, p.rss_mb)),
            &color,
        ))
        .map_err(err)?
        .label(format!("{} (peak {:.0} MB)", s.name, s.peak_rss_mb))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    legend(&mut c, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

/// Tokens embedded a second over time (ours), the budget line, and the baseline's mean rate.
fn tokens(area: &DrawingArea<SVGBackend, Shift>, run: &SizeRun, tpm: Option<u64>) -> Result<()> {
    let budget = tpm.map(|t| t as f64 / 60.0);
    let base = run.baseline.as_ref().map(|b| b.tokens_per_s());
    let peak = run
        .timeline
        .iter()
        .map(|p| p.embed_tokens_per_s)
        .chain(budget)
        .chain(base)
        .fold(0.0, f64::max);
    let t_max = top(run.ours.wall_s);
    let mut c = ChartBuilder::on(area)
        .caption("Tokens embedded per second", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..t_max, 0f64..top(peak))
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("tokens / s")
        .draw()
        .map_err(err)?;
    let color = COLORS[0];
    c.draw_series(LineSeries::new(
        run.timeline.iter().map(|p| (p.t, p.embed_tokens_per_s)),
        &color,
    ))
    .map_err(err)?
    .label(format!(
        "{} (mean {:.0})",
        run.ours.name,
        run.ours.tokens_per_s()
    ))
    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    let flat = |v: f64| vec![(0.0, v), (t_max, v)];
    if let Some(b) = budget {
        c.draw_series(LineSeries::new(flat(b), BLACK.stroke_width(2)))
            .map_err(err)?
            .label(format!("budget ({} TPM = {b:.0}/s)", tpm.unwrap_or(0)))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    }
    if let (Some(b), Some(side)) = (base, &run.baseline) {
        let color = COLORS[1];
        c.draw_series(LineSeries::new(flat(b), &color))
            .map_err(err)?
            .label(format!("{} (mean {b:.0})", side.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    legend(&mut c, SeriesLabelPosition::LowerRight)?;
    Ok(())
}

/// Wall time (left) and peak RSS (right) against corpus size, each with its fitted line.
fn sweep(area: &DrawingArea<SVGBackend, Shift>, runs: &[SizeRun]) -> Result<()> {
    let (left, right) = area.split_horizontally(SIZE.0 / 2);
    let x_max = top(runs.iter().map(|r| r.corpus_mb).fold(0.0, f64::max));
    for (panel, caption, ydesc, pick) in [
        (&left, "Wall time against size", "seconds", 0),
        (&right, "Peak RSS against size", "MB", 1),
    ] {
        let pts: Vec<(f64, f64)> = runs
            .iter()
            .map(|r| {
                (
                    r.corpus_mb,
                    if pick == 0 {
                        r.ours.wall_s
                    } else {
                        r.ours.peak_rss_mb
                    },
                )
            })
            .collect();
        let y_max = top(pts.iter().map(|p| p.1).fold(0.0, f64::max));
        let mut c = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("corpus MB")
            .y_desc(ydesc)
            .draw()
            .map_err(err)?;
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 4, COLORS[0].filled())))
            .map_err(err)?
            .label("measured")
            .legend(|(x, y)| Circle::new((x + 8, y), 4, COLORS[0].filled()));
        let k = slope(&pts);
        let n = pts.len() as f64;
        let (mx, my) = (
            pts.iter().map(|p| p.0).sum::<f64>() / n,
            pts.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let line = |x: f64| (x, (my + k * (x - mx)).max(0.0));
        c.draw_series(LineSeries::new([line(0.0), line(x_max)], &COLORS[3]))
            .map_err(err)?
            .label(format!("fit: {k:.4} per MB"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], COLORS[3]));
        legend(&mut c, SeriesLabelPosition::UpperLeft)?;
    }
    Ok(())
}
