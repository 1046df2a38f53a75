//! The verdict the report opens with: per task, the variants on the Pareto front of accuracy
//! (higher is better) against speed (higher) and memory (lower), and which differences are
//! within seed noise. [`front`] is the computation; [`lines`] says it in sentences.

use super::agg::{self, task_title, ChanceKind, Cost, CostSource, Runs, Speeds, BASELINE};
use super::tables::{fmt_len, fmt_ratio};

/// A relative difference in speed or memory at most this large is not told apart from timing
/// noise (one speed job per variant and length, on a shared machine).
pub const COST_TIE: f64 = 0.05;

/// One variant's figures on one task (or at one length).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub variant: String,
    /// Mean test accuracy (%), its spread (sample standard deviation over seeds) and the
    /// number of seeds; `None` when only speed and memory are compared.
    pub acc: Option<(f64, f64, usize)>,
    /// Training speed, higher is faster (steps/s relative to the baseline).
    pub speed: f64,
    /// Peak memory, MiB; `None` when unknown (then memory is not compared).
    pub mib: Option<f64>,
}

/// Where a point stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// No other point is at least as good on every axis and better on one.
    Front,
    /// Beaten by the point at this index; `within_noise` when each of its advantages is
    /// within seed noise (accuracy intervals overlap) or [`COST_TIE`].
    Dominated { by: usize, within_noise: bool },
}

/// Whether two accuracies cannot be told apart: both have two or more seeds and their
/// mean ± spread intervals overlap. With one seed nothing is known about the noise.
pub fn acc_indistinguishable(a: (f64, f64, usize), b: (f64, f64, usize)) -> bool {
    a.2 >= 2 && b.2 >= 2 && (a.0 - b.0).abs() <= a.1 + b.1
}

fn cost_tie(a: f64, b: f64) -> bool {
    (a - b).abs() <= COST_TIE * a.abs().max(b.abs())
}

/// `a`'s advantages over `b` (accuracy, speed, memory), `None` if `a` is worse on some axis.
fn advantages(a: &Point, b: &Point) -> Option<[bool; 3]> {
    let acc = match (a.acc, b.acc) {
        (Some(x), Some(y)) if x.0 < y.0 => return None,
        (Some(x), Some(y)) => x.0 > y.0,
        _ => false,
    };
    if a.speed < b.speed {
        return None;
    }
    let mem = match (a.mib, b.mib) {
        (Some(x), Some(y)) if x > y => return None,
        (Some(x), Some(y)) => x < y,
        _ => false,
    };
    Some([acc, a.speed > b.speed, mem])
}

/// The standing of every point: on the Pareto front of the means, or dominated by the first
/// point (in input order) that is at least as good on every axis and better on one. Points
/// with non-finite figures are never on the front. The front is never empty when some point
/// is finite.
pub fn front(points: &[Point]) -> Vec<Standing> {
    let finite = |p: &Point| {
        p.speed.is_finite()
            && p.acc.is_none_or(|(m, s, _)| m.is_finite() && s.is_finite())
            && p.mib.is_none_or(f64::is_finite)
    };
    points
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let by = points.iter().enumerate().find_map(|(j, a)| {
                if j == i || !finite(a) {
                    return None;
                }
                let adv = advantages(a, b)?;
                adv.iter().any(|&x| x).then_some((j, a, adv))
            });
            match by {
                Some((j, a, adv)) => {
                    let acc_noise = match (a.acc, b.acc) {
                        (Some(x), Some(y)) => acc_indistinguishable(x, y),
                        _ => false,
                    };
                    let speed_noise = cost_tie(a.speed, b.speed);
                    let mem_noise = match (a.mib, b.mib) {
                        (Some(x), Some(y)) => cost_tie(x, y),
                        _ => true,
                    };
                    let within_noise = (!adv[0] || acc_noise)
                        && (!adv[1] || speed_noise)
                        && (!adv[2] || mem_noise);
                    Standing::Dominated {
                        by: j,
                        within_noise,
                    }
                }
                None if finite(b) => Standing::Front,
                // Nothing finite beats it, but it cannot be ranked either.
                None => Standing::Dominated {
                    by: i,
                    within_noise: false,
                },
            }
        })
        .collect()
}

/// A point's figures: `61.2 ± 0.8 %, 1.32×, 180 MiB`.
fn figures(p: &Point) -> String {
    let mut parts = Vec::new();
    if let Some((m, s, n)) = p.acc {
        parts.push(match n >= 2 {
            true => format!("{m:.1} ± {s:.1}%"),
            false => format!("{m:.1}%"),
        });
    }
    parts.push(format!("{} speed", fmt_ratio(p.speed)));
    if let Some(mib) = p.mib {
        parts.push(format!("{mib:.0} MiB"));
    }
    parts.join(", ")
}

/// The front and the rest in words: `front: a (…), b (…); behind: c (by a), d (by a, within
/// noise)`, plus which front members' accuracies are within seed noise of each other.
fn describe(points: &[Point]) -> String {
    let st = front(points);
    // The front from the most accurate to the least (then fastest first).
    let mut on: Vec<&Point> = points
        .iter()
        .zip(&st)
        .filter(|(_, s)| **s == Standing::Front)
        .map(|(p, _)| p)
        .collect();
    let acc = |p: &Point| p.acc.map_or(0.0, |a| a.0);
    on.sort_by(|a, b| acc(b).total_cmp(&acc(a)).then(b.speed.total_cmp(&a.speed)));
    let on: Vec<String> = on
        .iter()
        .map(|p| format!("{} ({})", p.variant, figures(p)))
        .collect();
    let behind: Vec<String> = points
        .iter()
        .zip(&st)
        .filter_map(|(p, s)| match *s {
            Standing::Front => None,
            Standing::Dominated { by, within_noise } => {
                let by_name = &points[by].variant;
                Some(if by_name == &p.variant {
                    format!("{} (not finite)", p.variant)
                } else if within_noise {
                    format!("{} (behind {by_name} only within noise)", p.variant)
                } else {
                    format!("{} (behind {by_name})", p.variant)
                })
            }
        })
        .collect();
    let mut s = format!("front: {}", on.join(", "));
    if !behind.is_empty() {
        s.push_str(&format!("; behind: {}", behind.join(", ")));
    }
    let front_pts: Vec<&Point> = points
        .iter()
        .zip(&st)
        .filter(|(_, s)| **s == Standing::Front)
        .map(|(p, _)| p)
        .collect();
    let mut ties = Vec::new();
    for (i, a) in front_pts.iter().enumerate() {
        for b in &front_pts[i + 1..] {
            if let (Some(x), Some(y)) = (a.acc, b.acc) {
                if acc_indistinguishable(x, y) {
                    ties.push(format!("{} ≈ {}", a.variant, b.variant));
                }
            }
        }
    }
    if !ties.is_empty() {
        s.push_str(&format!(
            "; accuracy within seed noise (mean ± spread intervals overlap): {}",
            ties.join(", ")
        ));
    }
    s.push('.');
    s
}

/// The verdict as sentences: one per task with runs, one per speed-job length, then what the
/// figures mean. Empty when there is nothing to judge.
pub fn lines(runs: &Runs, speeds: &Speeds) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_run = false;
    let mut seeds_max = 0;
    for task in runs.run_tasks() {
        let title = task_title(&task);
        if runs.at_chance(&task) {
            let chance = runs
                .chance(&task)
                .map_or_else(String::new, |c| format!(" ({})", c.describe()));
            out.push(format!(
                "{title}: every variant is at chance{chance}: nothing learned, no verdict; \
                 train longer."
            ));
            continue;
        }
        let mut points = Vec::new();
        let mut sources = Vec::new();
        for v in &runs.variants {
            let Some(cell) = runs.cell(&task, v) else {
                continue;
            };
            let Some((m, s)) = cell.accuracy_pct() else {
                continue;
            };
            let Some(Cost { speed, mib, source }) = agg::cost(runs, speeds, &task, v) else {
                continue;
            };
            if runs.cell_at_chance(&task, v) {
                continue;
            }
            seeds_max = seeds_max.max(cell.runs.len());
            sources.push(source);
            points.push(Point {
                variant: v.clone(),
                acc: Some((m, s, cell.runs.len())),
                speed,
                mib,
            });
        }
        if points.is_empty() {
            out.push(format!(
                "{title}: no variant beat chance with a speed figure relative to `{BASELINE}`; \
                 no verdict."
            ));
            continue;
        }
        sources.sort();
        sources.dedup();
        let from: Vec<String> = sources
            .iter()
            .map(|s| match s {
                CostSource::Jobs(l) => format!("speed jobs at {}", fmt_len(*l)),
                CostSource::InRun => {
                    in_run = true;
                    "in-run figures".to_string()
                }
            })
            .collect();
        let len = runs
            .seq_len(&task)
            .map_or_else(String::new, |l| format!("{l} tokens; "));
        let stuck: Vec<&String> = runs
            .variants
            .iter()
            .filter(|v| runs.cell_at_chance(&task, v))
            .collect();
        let mut line = format!("{title} ({len}{}): {}", from.join(" + "), describe(&points));
        if !stuck.is_empty() {
            let names: Vec<&str> = stuck.iter().map(|s| s.as_str()).collect();
            line.push_str(&format!(" At chance, left out: {}.", names.join(", ")));
        }
        match runs.chance(&task) {
            Some(c) if c.kind == ChanceKind::Majority => {}
            Some(c) => line.push_str(&format!(
                " Compared with {} only: the majority-class rate was not recorded and may \
                 be higher.",
                c.describe()
            )),
            None => line.push_str(
                " Chance unknown (no majority-class rate recorded): these accuracies may all \
                 be at chance.",
            ),
        }
        out.push(line);
    }
    for &len in &speeds.lengths {
        let points: Vec<Point> = speeds
            .variants
            .iter()
            .filter_map(|v| {
                let speed = agg::ratio(speeds.steps(v, len)?, speeds.steps(BASELINE, len)?)?;
                Some(Point {
                    variant: v.clone(),
                    acc: None,
                    speed,
                    mib: speeds.mib(v, len),
                })
            })
            .collect();
        if points.len() >= 2 {
            out.push(format!(
                "Speed and memory alone at {} tokens (speed jobs): {}",
                fmt_len(len),
                describe(&points)
            ));
        }
    }
    if out.is_empty() {
        return out;
    }
    out.push(format!(
        "Front: no other variant is at least as accurate, as fast (training steps/s relative \
         to `{BASELINE}`) and as small (peak memory) and better in one of them; pick from the \
         front by what matters more to you. Speed and memory differences under {:.0}% are \
         within timing noise.",
        COST_TIE * 100.0
    ));
    if seeds_max <= 1 && !runs.run_tasks().is_empty() {
        out.push(
            "One seed per run: a single seed cannot separate close variants (run-to-run \
             spread is unknown), so treat accuracy gaps of a point or two as ties; \
             `--seeds 3` gives intervals."
                .to_string(),
        );
    }
    if in_run {
        out.push(
            "In-run figures: no speed job matched, so speed and memory come from the training \
             runs, which share the machine with other jobs (less reliable than Table 2)."
                .to_string(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &str, acc: Option<(f64, f64, usize)>, speed: f64, mib: Option<f64>) -> Point {
        Point {
            variant: v.into(),
            acc,
            speed,
            mib,
        }
    }

    #[test]
    fn the_front_of_a_hand_made_table() {
        let pts = [
            // Most accurate, slowest, largest: on the front.
            p("vanilla", Some((60.0, 1.0, 3)), 1.0, Some(300.0)),
            // Fastest and smallest: on the front.
            p("local", Some((55.0, 1.0, 3)), 2.0, Some(100.0)),
            // Worse than local on every axis.
            p("linear", Some((50.0, 1.0, 3)), 1.5, Some(150.0)),
            // As fast and small as local, a little more accurate but within noise.
            p("lrt", Some((54.5, 1.0, 3)), 2.0, Some(100.0)),
            // Between: more accurate than local, faster than vanilla.
            p("performer", Some((58.0, 0.5, 3)), 1.2, Some(200.0)),
        ];
        let st = front(&pts);
        assert_eq!(st[0], Standing::Front);
        assert_eq!(st[1], Standing::Front);
        assert_eq!(
            st[2],
            Standing::Dominated {
                by: 1,
                within_noise: false
            }
        );
        assert_eq!(
            st[3],
            Standing::Dominated {
                by: 1,
                within_noise: true
            }
        );
        assert_eq!(st[4], Standing::Front);
        let text = describe(&pts);
        assert!(
            text.contains(
                "front: vanilla (60.0 ± 1.0%, 1.00× speed, 300 MiB), performer (58.0 ± 0.5%, \
                 1.20× speed, 200 MiB), local (55.0 ± 1.0%, 2.00× speed, 100 MiB); behind:"
            ),
            "{text}"
        );
        assert!(
            text.contains("lrt (behind local only within noise)"),
            "{text}"
        );
        assert!(text.contains("linear (behind local)"), "{text}");
        // vanilla (60 ± 1) and performer (58 ± 0.5) do not overlap; local and performer don't.
        assert!(!text.contains('≈'), "{text}");
    }

    #[test]
    fn one_seed_is_never_within_noise_and_missing_memory_is_not_compared() {
        let pts = [
            p("a", Some((60.0, 0.0, 1)), 1.0, None),
            p("b", Some((59.9, 0.0, 1)), 1.0, Some(10.0)),
        ];
        assert_eq!(
            front(&pts),
            [
                Standing::Front,
                Standing::Dominated {
                    by: 0,
                    within_noise: false
                }
            ]
        );
        // Equal points are both on the front.
        let same = [p("a", None, 1.0, Some(5.0)), p("b", None, 1.0, Some(5.0))];
        assert_eq!(front(&same), [Standing::Front, Standing::Front]);
        // A NaN point is never on the front and never beats anyone.
        let nan = [p("a", None, f64::NAN, None), p("b", None, 0.5, None)];
        assert_eq!(front(&nan)[1], Standing::Front);
        assert_ne!(front(&nan)[0], Standing::Front);
        assert!(front(&[]).is_empty());
    }
}
