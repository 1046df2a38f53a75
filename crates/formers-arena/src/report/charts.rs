//! SVG charts (plotters): accuracy vs speed (like LRA Figure 3), training-loss curves per task,
//! and speed / memory vs sequence length. Each chart returns `None` when there is nothing finite
//! to draw, so degenerate data skips a chart instead of failing.

use std::collections::BTreeMap;
use std::ops::Range;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::agg::{bytes_to_mib, task_title, Runs, Speeds, BASELINE};

/// One rendered chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File name, e.g. `loss_listops.svg`.
    pub file: String,
    pub title: String,
    /// The SVG document.
    pub svg: String,
}

const SIZE: (u32, u32) = (720, 440);
/// Most points drawn per loss curve (longer curves are averaged into this many bins).
const MAX_CURVE_POINTS: usize = 400;

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A stable colour per variant: its position in the report's variant list.
fn color(variants: &[String], variant: &str) -> RGBColor {
    let i = variants.iter().position(|v| v == variant).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

/// All charts that have data, in report order.
pub fn all(runs: &Runs, speeds: &Speeds, variants: &[String]) -> Vec<Chart> {
    let mut out = Vec::new();
    out.extend(accuracy_vs_speed(runs, variants));
    for task in &runs.tasks {
        out.extend(loss_curves(runs, task, variants));
    }
    out.extend(speed_vs_length(speeds, variants, false));
    out.extend(speed_vs_length(speeds, variants, true));
    out
}

/// A padded axis range over the finite values; a single value or zero range gets a unit pad.
fn axis_range(values: impl IntoIterator<Item = f64>) -> Option<Range<f64>> {
    padded_range(values, 0.08, 0.08)
}

/// Like [`axis_range`] with the low and high padding as fractions of the span.
fn padded_range(values: impl IntoIterator<Item = f64>, low: f64, high: f64) -> Option<Range<f64>> {
    let (lo, hi) =
        values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold(None, |acc: Option<(f64, f64)>, v| match acc {
                None => Some((v, v)),
                Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
            })?;
    let span = match hi - lo {
        s if s > 0.0 => s,
        _ => lo.abs().max(1.0),
    };
    Some(lo - span * low..hi + span * high)
}

/// Tick label: the number without trailing zeros (`100`, `2.5`, `0.125`).
fn tick(x: &f64) -> String {
    let s = super::tables::fmt_num(*x);
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    }
}

/// Legend corner away from the data: upper left when the lines mostly rise, else upper right.
fn legend_corner(lines: &[(String, Vec<(f64, f64)>)]) -> SeriesLabelPosition {
    let rising = lines
        .iter()
        .filter(|(_, p)| p.len() >= 2)
        .map(|(_, p)| p[p.len() - 1].1 - p[0].1)
        .filter(|d| d.is_finite())
        .sum::<f64>();
    if rising > 0.0 {
        SeriesLabelPosition::UpperLeft
    } else {
        SeriesLabelPosition::UpperRight
    }
}

/// A point for the accuracy-vs-speed chart.
struct Bubble {
    label: String,
    x: f64,
    y: f64,
    mem: f64,
}

fn bubbles(runs: &Runs) -> (Vec<Bubble>, &'static str) {
    let relative = runs.variants.iter().any(|v| v == BASELINE)
        && runs
            .variants
            .iter()
            .all(|v| runs.relative_speed(v).is_some());
    let x_desc = if relative {
        "training steps/s relative to vanilla (mean over tasks)"
    } else {
        "training steps/s (mean over tasks)"
    };
    let pts = runs
        .variants
        .iter()
        .filter_map(|v| {
            let x = match relative {
                true => runs.relative_speed(v)?,
                false => runs.mean_speed(v)?,
            };
            let (y, _) = runs.average_pct(v)?;
            let mem = runs.peak_rss(v).map_or(0.0, bytes_to_mib);
            (x.is_finite() && y.is_finite()).then(|| Bubble {
                label: v.clone(),
                x,
                y,
                mem,
            })
        })
        .collect();
    (pts, x_desc)
}

/// LRA Figure 3 style: x = speed, y = average accuracy, marker area ∝ peak memory.
pub fn accuracy_vs_speed(runs: &Runs, variants: &[String]) -> Option<Chart> {
    let (pts, x_desc) = bubbles(runs);
    let xr = padded_range(pts.iter().map(|p| p.x), 0.12, 0.35)?;
    let yr = padded_range(pts.iter().map(|p| p.y), 0.12, 0.12)?;
    let max_mem = pts.iter().map(|p| p.mem).fold(0.0, f64::max);
    let title = "Average accuracy vs training speed (marker area ∝ peak memory)";
    let svg = render(|root| {
        let mut chart = frame(root, title, (xr, yr), (x_desc, "average test accuracy (%)"))?;
        for p in &pts {
            let radius = marker_radius(p.mem, max_mem);
            let c = color(variants, &p.label);
            let label = format!("{} ({:.0} MiB)", p.label, p.mem);
            chart.draw_series(std::iter::once(
                EmptyElement::at((p.x, p.y))
                    + Circle::new((0, 0), radius, c.mix(0.45).filled())
                    + Circle::new((0, 0), radius, c.stroke_width(1))
                    + Text::new(label, (radius + 3, -6), ("sans-serif", 13)),
            ))?;
        }
        Ok(())
    })?;
    Some(Chart {
        file: "accuracy_vs_speed.svg".to_string(),
        title: title.to_string(),
        svg,
    })
}

/// Radius so that marker area is proportional to memory (4..=28 px).
fn marker_radius(mem: f64, max_mem: f64) -> i32 {
    let frac = if max_mem > 0.0 && mem.is_finite() {
        (mem / max_mem).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (4.0 + 24.0 * frac.sqrt()).round() as i32
}

/// Mean training loss over seeds at each step, finite values only, thinned to at most
/// `MAX_CURVE_POINTS` by averaging consecutive points.
fn mean_curve(runs: &Runs, task: &str, variant: &str) -> Vec<(f64, f64)> {
    let Some(cell) = runs.cell(task, variant) else {
        return Vec::new();
    };
    let mut by_step: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for r in &cell.runs {
        for &(step, loss) in &r.loss_curve {
            if loss.is_finite() {
                by_step.entry(step).or_default().push(loss as f64);
            }
        }
    }
    let pts: Vec<(f64, f64)> = by_step
        .into_iter()
        .filter_map(|(s, v)| super::agg::mean(&v).map(|m| (s as f64, m)))
        .collect();
    thin(pts)
}

fn thin(pts: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if pts.len() <= MAX_CURVE_POINTS {
        return pts;
    }
    let chunk = pts.len().div_ceil(MAX_CURVE_POINTS);
    pts.chunks(chunk)
        .map(|c| {
            let n = c.len() as f64;
            let x = c.iter().map(|p| p.0).sum::<f64>() / n;
            let y = c.iter().map(|p| p.1).sum::<f64>() / n;
            (x, y)
        })
        .collect()
}

/// File-name-safe form of a task name.
pub fn slug(s: &str) -> String {
    let out: String = s
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                true => c.to_ascii_lowercase(),
                false => '_',
            },
        )
        .collect();
    if out.is_empty() {
        "task".to_string()
    } else {
        out
    }
}

/// Training-loss curves of every variant on one task (mean over seeds).
pub fn loss_curves(runs: &Runs, task: &str, variants: &[String]) -> Option<Chart> {
    let curves: Vec<(String, Vec<(f64, f64)>)> = runs
        .variants
        .iter()
        .map(|v| (v.clone(), mean_curve(runs, task, v)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let xr = axis_range(curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.0)))?;
    let yr = padded_range(
        curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)),
        0.05,
        0.2,
    )?;
    let corner = legend_corner(&curves);
    let title = format!("Training loss — {} (mean over seeds)", task_title(task));
    let svg = render(|root| {
        let mut chart = frame(root, &title, (xr, yr), ("step", "training loss"))?;
        for (v, c) in &curves {
            let col = color(variants, v);
            chart
                .draw_series(LineSeries::new(c.iter().copied(), col.stroke_width(2)))?
                .label(v.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col));
        }
        draw_legend(&mut chart, corner)
    })?;
    Some(Chart {
        file: format!("loss_{}.svg", slug(task)),
        title,
        svg,
    })
}

/// Steps/s (or peak memory with `memory`) against sequence length, one line per variant.
pub fn speed_vs_length(speeds: &Speeds, variants: &[String], memory: bool) -> Option<Chart> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = speeds
        .variants
        .iter()
        .map(|v| {
            let pts = speeds
                .lengths
                .iter()
                .filter_map(|&l| {
                    let y = if memory {
                        speeds.mib(v, l)?
                    } else {
                        speeds.steps(v, l)?
                    };
                    y.is_finite().then_some((l as f64, y))
                })
                .collect::<Vec<_>>();
            (v.clone(), pts)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let xr = axis_range(lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)))?;
    let yr = padded_range(
        lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)),
        0.05,
        0.2,
    )?;
    let corner = legend_corner(&lines);
    let (file, title, y_desc) = if memory {
        (
            "memory_vs_length.svg",
            "Peak memory vs sequence length",
            "peak RSS (MiB)",
        )
    } else {
        (
            "speed_vs_length.svg",
            "Training speed vs sequence length",
            "training steps/s",
        )
    };
    let svg = render(|root| {
        let mut chart = frame(root, title, (xr, yr), ("sequence length", y_desc))?;
        for (v, pts) in &lines {
            let col = color(variants, v);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), col.stroke_width(2)))?
                .label(v.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))?;
        }
        draw_legend(&mut chart, corner)
    })?;
    Some(Chart {
        file: file.to_string(),
        title: title.to_string(),
        svg,
    })
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

type Frame<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The frame every chart shares: caption, margin, label areas, the `x` × `y` ranges and a mesh
/// with `desc` (x, y) axis descriptions and [`tick`] labels.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    (x, y): (Range<f64>, Range<f64>),
    (x_desc, y_desc): (&str, &str),
) -> Result<Frame<'a, 'b>, Box<dyn std::error::Error>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()?;
    Ok(chart)
}

fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    corner: SeriesLabelPosition,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// Renders onto a white SVG canvas; `None` if plotting fails.
fn render(draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> DrawResult) -> Option<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).ok()?;
        draw(&root).ok()?;
        root.present().ok()?;
    }
    Some(buf)
}
