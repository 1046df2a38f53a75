//! SVG charts (plotters): accuracy vs speed (like LRA Figure 3), training-loss curves per task,
//! and speed / memory vs sequence length. Each chart returns `None` when there is nothing finite
//! to draw, so degenerate data skips a chart instead of failing.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::agg::{self, task_title, Cost, CostSource, Runs, Speeds, BASELINE};
use super::tables::fmt_len;

/// One rendered chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File name, e.g. `loss_listops.svg`.
    pub file: String,
    pub title: String,
    /// What the chart shows and where its figures come from (the figure caption).
    pub note: String,
    /// The SVG document.
    pub svg: String,
}

const SIZE: (u32, u32) = (860, 460);
/// Width of the legend panel right of the plot.
const LEGEND_W: u32 = 150;
/// Most points drawn per loss curve (longer curves are averaged into this many bins).
const MAX_CURVE_POINTS: usize = 400;

/// Twelve distinct colours (Tableau 10, black and dark gold); with [`SHAPES`] (seven, a count
/// coprime with twelve) every one of the first 84 variants gets its own pair.
const PALETTE: [RGBColor; 12] = [
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
    RGBColor(20, 20, 20),
    RGBColor(170, 110, 0),
];

/// Marker shapes, in the order variants take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    TriangleUp,
    Diamond,
    TriangleDown,
    Star,
    Cross,
}

const SHAPES: [Shape; 7] = [
    Shape::Circle,
    Shape::Square,
    Shape::TriangleUp,
    Shape::Diamond,
    Shape::TriangleDown,
    Shape::Star,
    Shape::Cross,
];

/// A variant's colour and marker: from its position in the report's variant list.
pub fn style(variants: &[String], variant: &str) -> (RGBColor, Shape) {
    let i = variants.iter().position(|v| v == variant).unwrap_or(0);
    (PALETTE[i % PALETTE.len()], SHAPES[i % SHAPES.len()])
}

/// The outline of `shape` of radius `r` around (0, 0), in pixels.
fn outline(shape: Shape, r: f64) -> Vec<(i32, i32)> {
    let polar = |n: usize, turn: f64, radius: &dyn Fn(usize) -> f64| -> Vec<(i32, i32)> {
        (0..n)
            .map(|k| {
                let a = std::f64::consts::TAU * (k as f64 / n as f64 + turn);
                let q = radius(k);
                ((q * a.cos()).round() as i32, (q * a.sin()).round() as i32)
            })
            .collect()
    };
    match shape {
        Shape::Circle => polar(24, 0.0, &|_| r),
        Shape::Square => polar(4, 0.125, &|_| r * 1.15),
        Shape::TriangleUp => polar(3, -0.25, &|_| r * 1.3),
        Shape::Diamond => polar(4, 0.0, &|_| r * 1.25),
        Shape::TriangleDown => polar(3, 0.25, &|_| r * 1.3),
        Shape::Star => polar(10, -0.25, &|k| if k % 2 == 0 { r * 1.4 } else { r * 0.6 }),
        Shape::Cross => {
            let (a, b) = (r * 0.35, r * 1.1);
            polar(12, 0.125, &|k| if k % 3 == 1 { b } else { a.hypot(a) })
                .into_iter()
                .collect()
        }
    }
}

/// A marker at `at` (data or pixel coordinates): `shape` of radius `r` filled with `color`
/// at opacity `fill`, outlined in `color`. A macro, as the element's type is not nameable.
macro_rules! marker {
    ($at:expr, $shape:expr, $r:expr, $color:expr, $fill:expr) => {{
        let pts = outline($shape, $r);
        let mut closed = pts.clone();
        closed.extend(pts.first().copied());
        EmptyElement::at($at)
            + Polygon::new(pts, $color.mix($fill).filled())
            + PathElement::new(closed, $color.stroke_width(1))
    }};
}

/// All charts that have data, in report order.
pub fn all(runs: &Runs, speeds: &Speeds, variants: &[String]) -> Vec<Chart> {
    let mut out = Vec::new();
    out.extend(accuracy_vs_speed(runs, speeds, variants));
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

/// The bubbles and the x axis's description and the chart's note: speed relative to the
/// baseline from the speed jobs (in-run figures only where no speed job exists, labelled),
/// accuracy averaged over the learned tasks; `None` when no task was learned.
fn bubbles(runs: &Runs, speeds: &Speeds) -> Option<(Vec<Bubble>, String, String)> {
    let tasks = runs.learned_tasks();
    if tasks.is_empty() {
        return None;
    }
    let mut sources = BTreeSet::new();
    let mut pts = Vec::new();
    for v in &runs.variants {
        let costs: Vec<Cost> = tasks
            .iter()
            .filter(|t| runs.cell(t, v).is_some())
            .filter_map(|t| agg::cost(runs, speeds, t, v))
            .collect();
        let (Some(x), Some((y, k))) = (
            agg::mean(&costs.iter().map(|c| c.speed).collect::<Vec<_>>()),
            runs.average_pct(v),
        ) else {
            continue;
        };
        let mem = agg::mean(&costs.iter().filter_map(|c| c.mib).collect::<Vec<_>>());
        let in_run = costs.iter().any(|c| c.source == CostSource::InRun);
        sources.extend(costs.iter().map(|c| c.source));
        let mut parts = Vec::new();
        if let Some(m) = mem {
            parts.push(format!("{m:.0} MiB"));
        }
        if k < tasks.len() {
            parts.push(format!("{k}/{} tasks", tasks.len()));
        }
        if in_run {
            parts.push("in-run".to_string());
        }
        let label = match parts.is_empty() {
            true => v.clone(),
            false => format!("{v} ({})", parts.join(", ")),
        };
        if x.is_finite() && y.is_finite() {
            pts.push(Bubble {
                variant: v.clone(),
                label,
                x,
                y,
                mem: mem.unwrap_or(0.0),
            });
        }
    }
    let lengths: BTreeSet<usize> = sources
        .iter()
        .filter_map(|s| match s {
            CostSource::Jobs(l) => Some(*l),
            CostSource::InRun => None,
        })
        .collect();
    let lens: Vec<String> = lengths.iter().map(|l| fmt_len(*l)).collect();
    let jobs = match lens.len() {
        0 => String::new(),
        1 => format!("speed jobs at {} tokens", lens[0]),
        _ => format!(
            "speed jobs at {} tokens, nearest each task's length",
            lens.join("/")
        ),
    };
    let x_desc = match (jobs.is_empty(), sources.contains(&CostSource::InRun)) {
        (false, false) => format!("training steps/s relative to {BASELINE} ({jobs})"),
        (false, true) => format!("steps/s relative to {BASELINE} ({jobs}; in-run where marked)"),
        _ => format!("training steps/s relative to {BASELINE} (in-run, no speed jobs)"),
    };
    let titles: Vec<String> = tasks.iter().map(|t| task_title(t)).collect();
    let note = format!(
        "x: {x_desc}, the same figure as the speed table (mean over tasks when they map to \
         different lengths); \"in-run\" marks variants whose figure comes from their training \
         runs, which share the machine. y: mean test accuracy over the tasks some variant \
         learned ({}); tasks at chance are left out. Marker area ∝ peak memory of the same \
         source.",
        titles.join(", ")
    );
    Some((pts, x_desc, note))
}

/// A label's box in pixels: left, top, right, bottom.
type Rect = (f64, f64, f64, f64);

fn overlap(a: Rect, b: Rect) -> f64 {
    let w = (a.2.min(b.2) - a.0.max(b.0)).max(0.0);
    let h = (a.3.min(b.3) - a.1.max(b.1)).max(0.0);
    w * h
}

/// Approximate pixel width of `text` in the label font (plotters' SVG writes a font of
/// size `s` as `s / 1.24` px; sans-serif letters average about 0.6 em).
fn text_width(text: &str) -> f64 {
    text.chars().count() as f64 * label_px() * 0.6
}

/// Pixel height of the label font as drawn.
fn label_px() -> f64 {
    LABEL_FONT as f64 / 1.24
}

const LABEL_FONT: u32 = 13;

/// Places one label per bubble (centre, radius, label width) inside `area`: among candidate
/// positions around the bubble, nearest rings first, the first that overlaps no placed label
/// and no bubble, else the one that overlaps least. Returns each label's top-left corner and
/// whether it moved off the first ring (then a leader line is drawn). Deterministic.
fn place_labels(items: &[((f64, f64), f64, f64)], area: Rect) -> Vec<((f64, f64), bool)> {
    let h = label_px() + 3.0;
    let discs: Vec<Rect> = items
        .iter()
        .map(|&((x, y), r, _)| (x - r, y - r, x + r, y + r))
        .collect();
    let mut placed: Vec<Rect> = Vec::new();
    let mut out = Vec::new();
    for &((cx, cy), r, w) in items {
        let mut best: Option<(f64, (f64, f64), bool)> = None;
        for (ring, gap) in [3.0, 12.0, 24.0, 40.0, 60.0, 85.0].into_iter().enumerate() {
            let d = r + gap;
            let e = d * std::f64::consts::FRAC_1_SQRT_2;
            let candidates = [
                (cx + d, cy - h / 2.0),
                (cx + e, cy - e - h),
                (cx + e, cy + e),
                (cx - w / 2.0, cy - d - h),
                (cx - w / 2.0, cy + d),
                (cx - d - w, cy - h / 2.0),
                (cx - e - w, cy - e - h),
                (cx - e - w, cy + e),
            ];
            for (x, y) in candidates {
                let rect = (x, y, x + w, y + h);
                let outside = w * h - overlap(rect, area);
                let cost = placed.iter().map(|&p| overlap(rect, p)).sum::<f64>()
                    + discs.iter().map(|&d| overlap(rect, d)).sum::<f64>()
                    + 4.0 * outside;
                if best.is_none_or(|b| cost < b.0) {
                    best = Some((cost, (x, y), ring > 0));
                }
            }
            if best.is_some_and(|b| b.0 <= 0.0) {
                break;
            }
        }
        let (_, at, moved) = best.unwrap_or((0.0, (cx, cy), false));
        placed.push((at.0, at.1, at.0 + w, at.1 + h));
        out.push((at, moved));
    }
    out
}

/// LRA Figure 3 style: x = speed relative to the baseline, y = average accuracy over the
/// learned tasks, marker area ∝ peak memory, labels placed clear of each other.
pub fn accuracy_vs_speed(runs: &Runs, speeds: &Speeds, variants: &[String]) -> Option<Chart> {
    let (pts, x_desc, note) = bubbles(runs, speeds)?;
    let title = "Average accuracy vs training speed (marker area ∝ peak memory)";
    let axes = (x_desc.as_str(), "average test accuracy (%)");
    let svg = scatter(title, axes, &pts, variants)?;
    Some(Chart {
        file: "accuracy_vs_speed.svg".to_string(),
        title: title.to_string(),
        note,
        svg,
    })
}

/// A labelled point of [`scatter`]: `key` picks its colour and marker ([`style`]), `mem`
/// its area (relative to the largest).
#[derive(Debug, Clone)]
pub struct Bubble {
    pub variant: String,
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub mem: f64,
}

/// The SVG of `pts` as labelled markers (area ∝ `mem`) with `title` and axes `(x, y)`;
/// each point's style from its `variant` among `variants`. `None` when nothing is finite.
pub fn scatter(
    title: &str,
    (x_desc, y_desc): (&str, &str),
    pts: &[Bubble],
    variants: &[String],
) -> Option<String> {
    let xr = padded_range(pts.iter().map(|p| p.x), 0.15, 0.3)?;
    let yr = padded_range(pts.iter().map(|p| p.y), 0.15, 0.15)?;
    let max_mem = pts.iter().map(|p| p.mem).fold(0.0, f64::max);
    render(|root| {
        let chart = frame(root, title, (xr, yr), (x_desc, y_desc))?;
        let (px, py) = chart.plotting_area().get_pixel_range();
        let area = (
            px.start as f64,
            py.start as f64,
            px.end as f64,
            py.end as f64,
        );
        let items: Vec<((f64, f64), f64, f64)> = pts
            .iter()
            .map(|p| {
                let (x, y) = chart.backend_coord(&(p.x, p.y));
                let r = marker_radius(p.mem, max_mem) as f64;
                ((x as f64, y as f64), r, text_width(&p.label))
            })
            .collect();
        // Largest first, so small markers stay visible on top.
        let mut order: Vec<usize> = (0..pts.len()).collect();
        order.sort_by(|&a, &b| items[b].1.total_cmp(&items[a].1).then(a.cmp(&b)));
        for &i in &order {
            let ((x, y), r, _) = items[i];
            let (c, shape) = style(variants, &pts[i].variant);
            root.draw(&marker!((x as i32, y as i32), shape, r, c, 0.4))?;
        }
        for (i, (at, moved)) in place_labels(&items, area).into_iter().enumerate() {
            let ((cx, cy), r, w) = items[i];
            let h = label_px() + 3.0;
            if moved {
                // From the bubble's edge to the nearest point of the label box.
                let tx = cx.clamp(at.0, at.0 + w);
                let ty = cy.clamp(at.1, at.1 + h);
                let d = (tx - cx).hypot(ty - cy).max(1e-9);
                let from = (cx + (tx - cx) * r / d, cy + (ty - cy) * r / d);
                root.draw(&PathElement::new(
                    vec![(from.0 as i32, from.1 as i32), (tx as i32, ty as i32)],
                    BLACK.mix(0.5).stroke_width(1),
                ))?;
            }
            root.draw(&Text::new(
                pts[i].label.clone(),
                (at.0 as i32, at.1 as i32 + 1),
                ("sans-serif", LABEL_FONT),
            ))?;
        }
        Ok(())
    })
}

/// Radius so that marker area is proportional to memory (4..=20 px).
fn marker_radius(mem: f64, max_mem: f64) -> i32 {
    let frac = if max_mem > 0.0 && mem.is_finite() {
        (mem / max_mem).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (4.0 + 16.0 * frac.sqrt()).round() as i32
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

/// Centred moving average over `window` points (fewer at the ends, where the window is cut
/// to stay centred): no lag, unlike an exponential average. Same length as `pts`.
pub fn moving_average(pts: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let half = window / 2;
    (0..pts.len())
        .map(|i| {
            let k = half.min(i).min(pts.len() - 1 - i);
            let run = &pts[i - k..=i + k];
            (
                pts[i].0,
                run.iter().map(|p| p.1).sum::<f64>() / run.len() as f64,
            )
        })
        .collect()
}

/// The smoothing window (in logged points, odd) for curves of `n` points: about a
/// twentieth of the curve, 1..=51.
fn smoothing_window(n: usize) -> usize {
    ((n / 20) | 1).clamp(1, 51)
}

/// Training-loss curves of every variant on one task (mean over seeds): smoothed (EMA) in
/// the variant's colour with markers, the raw curve faint behind, the legend beside the plot.
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
        0.08,
    )?;
    let span = smoothing_window(curves.iter().map(|(_, c)| c.len()).max().unwrap_or(1));
    let title = format!("Training loss — {} (mean over seeds)", task_title(task));
    let note = match span {
        1 => {
            "Training loss per logged step (too few points to smooth), mean over seeds.".to_string()
        }
        _ => format!(
            "Bold: centred moving average of the training loss over {span} logged points \
             (fewer at the ends); faint: the raw loss of each logged step. Mean over seeds."
        ),
    };
    let smooth: Vec<(String, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(v, c)| (v.clone(), moving_average(c, span)))
        .collect();
    let svg = render(|root| {
        let (plot, side) = root.split_horizontally(SIZE.0 - LEGEND_W);
        let mut chart = frame(&plot, &title, (xr, yr), ("step", "training loss"))?;
        if span > 1 {
            for (v, c) in &curves {
                let (col, _) = style(variants, v);
                chart.draw_series(LineSeries::new(c.iter().copied(), col.mix(0.25)))?;
            }
        }
        for (i, (v, c)) in smooth.iter().enumerate() {
            let (col, shape) = style(variants, v);
            chart.draw_series(LineSeries::new(c.iter().copied(), col.stroke_width(2)))?;
            chart.draw_series(
                spaced(c.len(), i)
                    .into_iter()
                    .map(|k| marker!(c[k], shape, 4.0, col, 0.9)),
            )?;
        }
        let names: Vec<&String> = curves.iter().map(|(v, _)| v).collect();
        side_legend(&side, &names, variants)
    })?;
    Some(Chart {
        file: format!("loss_{}.svg", slug(task)),
        title,
        note,
        svg,
    })
}

/// Indices of about six evenly spaced marker positions along `n` points, shifted by `i` so
/// the markers of different lines do not all sit at the same steps.
fn spaced(n: usize, i: usize) -> Vec<usize> {
    const MARKS: usize = 6;
    if n == 0 {
        return Vec::new();
    }
    let shift = 0.2 + 0.6 * ((i * 5) % 7) as f64 / 7.0;
    let mut out: Vec<usize> = (0..MARKS)
        .map(|k| (((k as f64 + shift) * n as f64 / MARKS as f64) as usize).min(n - 1))
        .collect();
    out.dedup();
    out
}

/// The legend in its own panel right of the plot: each variant's marker, line and name.
fn side_legend(
    side: &DrawingArea<SVGBackend, Shift>,
    names: &[&String],
    variants: &[String],
) -> DrawResult {
    let (_, h) = side.dim_in_pixel();
    let row = 20;
    let top = (h as i32 - row * names.len() as i32).max(0) / 2;
    for (k, v) in names.iter().enumerate() {
        let (col, shape) = style(variants, v);
        let y = top + row * k as i32;
        side.draw(&PathElement::new(
            vec![(6, y), (30, y)],
            col.stroke_width(2),
        ))?;
        side.draw(&marker!((18, y), shape, 4.0, col, 0.9))?;
        side.draw(&Text::new(
            v.to_string(),
            (36, y - 7),
            ("sans-serif", LABEL_FONT),
        ))?;
    }
    Ok(())
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
        0.08,
    )?;
    let (file, title, y_desc, note) = if memory {
        (
            "memory_vs_length.svg",
            "Peak memory vs sequence length",
            "peak RSS (MiB)",
            "Speed jobs (Table 2): peak resident memory of the process training at each length.",
        )
    } else {
        (
            "speed_vs_length.svg",
            "Training speed vs sequence length",
            "training steps/s",
            "Speed jobs (Table 2): optimizer steps per second at each length, each job alone \
             on the machine.",
        )
    };
    let svg = render(|root| {
        let (plot, side) = root.split_horizontally(SIZE.0 - LEGEND_W);
        let mut chart = frame(&plot, title, (xr, yr), ("sequence length", y_desc))?;
        for (v, pts) in &lines {
            let (col, shape) = style(variants, v);
            chart.draw_series(LineSeries::new(pts.iter().copied(), col.stroke_width(2)))?;
            chart.draw_series(pts.iter().map(|&p| marker!(p, shape, 4.0, col, 0.9)))?;
        }
        let names: Vec<&String> = lines.iter().map(|(v, _)| v).collect();
        side_legend(&side, &names, variants)
    })?;
    Some(Chart {
        file: file.to_string(),
        title: title.to_string(),
        note: note.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_one_of_twelve_variants_has_its_own_colour_and_marker() {
        let names: Vec<String> = (0..12).map(|i| format!("v{i}")).collect();
        let styles: Vec<(RGBColor, Shape)> = names.iter().map(|v| style(&names, v)).collect();
        for (i, a) in styles.iter().enumerate() {
            for b in &styles[i + 1..] {
                assert_ne!(a.0, b.0, "two variants share a colour");
            }
        }
        // Up to 84 variants, no two share both colour and shape.
        let many: Vec<String> = (0..84).map(|i| format!("v{i}")).collect();
        let mut pairs: Vec<String> = many
            .iter()
            .map(|v| format!("{:?}", style(&many, v)))
            .collect();
        pairs.sort();
        pairs.dedup();
        assert_eq!(pairs.len(), 84);
    }

    #[test]
    fn labels_of_crowded_bubbles_do_not_overlap() {
        // Five bubbles within a few pixels of each other, long labels.
        let items: Vec<((f64, f64), f64, f64)> = (0..5)
            .map(|i| {
                (
                    (300.0 + 3.0 * i as f64, 200.0 + 2.0 * i as f64),
                    10.0,
                    120.0,
                )
            })
            .collect();
        let area = (50.0, 40.0, 700.0, 400.0);
        let placed = place_labels(&items, area);
        let h = label_px() + 3.0;
        let rects: Vec<Rect> = placed
            .iter()
            .zip(&items)
            .map(|(((x, y), _), it)| (*x, *y, x + it.2, y + h))
            .collect();
        for (i, a) in rects.iter().enumerate() {
            assert!(
                overlap(*a, area) == it_area(*a),
                "label {i} leaves the plot"
            );
            for b in &rects[i + 1..] {
                assert_eq!(overlap(*a, *b), 0.0, "{a:?} overlaps {b:?}");
            }
        }
        // The crowded ones moved, with a leader line.
        assert!(placed.iter().filter(|(_, moved)| *moved).count() >= 2);
        // A lone bubble keeps its label next to it.
        assert!(!place_labels(&items[..1], area)[0].1);
    }

    fn it_area(r: Rect) -> f64 {
        (r.2 - r.0) * (r.3 - r.1)
    }

    #[test]
    fn the_moving_average_smooths_without_lag() {
        let line: Vec<(f64, f64)> = (0..20).map(|i| (i as f64, 2.0 * i as f64)).collect();
        // A straight line is its own centred average: no lag.
        assert_eq!(moving_average(&line, 5), line);
        let zigzag: Vec<(f64, f64)> = (0..40)
            .map(|i| (i as f64, if i % 2 == 0 { 1.0 } else { 3.0 }))
            .collect();
        let s = moving_average(&zigzag, 11);
        assert_eq!(s.len(), 40);
        assert!(s[5..35].iter().all(|p| (p.1 - 2.0).abs() < 0.1), "{s:?}");
        assert!(moving_average(&[], 5).is_empty());
        assert_eq!(smoothing_window(500), 25);
        assert_eq!(smoothing_window(10), 1);
    }
}
