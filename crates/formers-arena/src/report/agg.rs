//! Aggregation of records into order-independent summaries: every map is a `BTreeMap` and every
//! list of numbers is sorted before it is summed, so the result depends only on the set of
//! records, never on their order (sharded + merged results give the same report as one run).

use std::collections::{BTreeMap, BTreeSet};

use crate::results::{Record, RunResult, SpeedResult};

/// The baseline variant for relative speed and memory.
pub const BASELINE: &str = "vanilla";

/// LRA task order (Table 1 columns) with the paper's column titles.
pub const LRA_TASKS: [(&str, &str); 6] = [
    ("listops", "ListOps"),
    ("text", "Text"),
    ("retrieval", "Retrieval"),
    ("image", "Image"),
    ("pathfinder", "Pathfinder"),
    ("pathx", "Path-X"),
];

/// Position of a task in LRA order (`None` for a task LRA does not have).
pub fn lra_index(task: &str) -> Option<usize> {
    let key: String = task
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    LRA_TASKS.iter().position(|(name, _)| *name == key)
}

/// Column title of a task: the paper's name for LRA tasks, the task name otherwise.
pub fn task_title(task: &str) -> String {
    lra_index(task).map_or_else(|| task.to_string(), |i| LRA_TASKS[i].1.to_string())
}

/// Sorts tasks in LRA order, then any others alphabetically.
pub fn sort_tasks(tasks: &mut [String]) {
    tasks.sort_by(|a, b| {
        let ka = (lra_index(a).unwrap_or(usize::MAX), a.as_str());
        let kb = (lra_index(b).unwrap_or(usize::MAX), b.as_str());
        ka.cmp(&kb)
    });
}

/// Variant row order: `order` first (those present), then the rest alphabetically.
pub fn order_variants(present: &BTreeSet<String>, order: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in order {
        if present.contains(v) && !out.contains(v) {
            out.push(v.clone());
        }
    }
    let rest: Vec<String> = present
        .iter()
        .filter(|v| !out.contains(v))
        .cloned()
        .collect();
    out.extend(rest);
    out
}

/// Mean and sample standard deviation (n − 1); `None` for an empty list. Non-finite values are
/// dropped. Values are sorted first so the result does not depend on their order.
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return Some((mean, 0.0));
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, var.sqrt()))
}

/// Mean of the finite values (order-independent), `None` if there are none.
pub fn mean(values: &[f64]) -> Option<f64> {
    mean_std(values).map(|(m, _)| m)
}

/// A deterministic total order on runs, used to pick one run when the same (task, variant,
/// seed) appears twice with different contents.
fn run_key(r: &RunResult) -> (usize, u64, u64, u64) {
    (
        r.steps,
        r.test_accuracy.to_bits(),
        r.wall_s.to_bits(),
        r.peak_rss_bytes,
    )
}

/// All runs of one (task, variant), one per seed, sorted by seed.
#[derive(Debug, Clone, Default)]
pub struct Cell<'a> {
    pub runs: Vec<&'a RunResult>,
}

impl Cell<'_> {
    /// Test accuracy in %, mean and sample std over seeds.
    pub fn accuracy_pct(&self) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.runs.iter().map(|r| r.test_accuracy * 100.0).collect();
        mean_std(&v)
    }

    pub fn mean_of(&self, f: impl Fn(&RunResult) -> f64) -> Option<f64> {
        mean(&self.runs.iter().map(|r| f(r)).collect::<Vec<_>>())
    }

    pub fn max_of<T: Ord + Copy>(&self, f: impl Fn(&RunResult) -> T) -> Option<T> {
        self.runs.iter().map(|r| f(r)).max()
    }

    pub fn seeds(&self) -> Vec<u64> {
        self.runs.iter().map(|r| r.seed).collect()
    }
}

/// Runs grouped by (task, variant), deduplicated by seed, plus skip reasons per task.
#[derive(Debug, Clone, Default)]
pub struct Runs<'a> {
    pub cells: BTreeMap<(String, String), Cell<'a>>,
    /// Tasks in LRA order then alphabetical; includes skipped tasks.
    pub tasks: Vec<String>,
    /// Variants in row order.
    pub variants: Vec<String>,
    /// task → sorted, deduplicated skip reasons.
    pub skipped: BTreeMap<String, BTreeSet<String>>,
}

impl<'a> Runs<'a> {
    pub fn new(records: &'a [Record], order: &[String]) -> Self {
        let mut by_seed: BTreeMap<(String, String, u64), &RunResult> = BTreeMap::new();
        let mut skipped: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for rec in records {
            match rec {
                Record::Run(r) => {
                    let key = (r.task.clone(), r.variant.clone(), r.seed);
                    let keep = by_seed
                        .get(&key)
                        .is_none_or(|old| run_key(r) > run_key(old));
                    if keep {
                        by_seed.insert(key, r);
                    }
                }
                Record::Skipped(s) => {
                    skipped
                        .entry(s.task.clone())
                        .or_default()
                        .insert(s.reason.clone());
                }
                Record::Speed(_) => {}
            }
        }
        let mut cells: BTreeMap<(String, String), Cell<'a>> = BTreeMap::new();
        for ((task, variant, _), r) in by_seed {
            cells.entry((task, variant)).or_default().runs.push(r);
        }
        let task_set: BTreeSet<String> = cells
            .keys()
            .map(|(t, _)| t.clone())
            .chain(skipped.keys().cloned())
            .collect();
        let mut tasks: Vec<String> = task_set.into_iter().collect();
        sort_tasks(&mut tasks);
        let present: BTreeSet<String> = cells.keys().map(|(_, v)| v.clone()).collect();
        Runs {
            variants: order_variants(&present, order),
            cells,
            tasks,
            skipped,
        }
    }

    pub fn cell(&self, task: &str, variant: &str) -> Option<&Cell<'a>> {
        self.cells.get(&(task.to_string(), variant.to_string()))
    }

    /// Tasks with at least one run (the tasks an average is taken over).
    pub fn run_tasks(&self) -> Vec<String> {
        self.tasks
            .iter()
            .filter(|t| self.variants.iter().any(|v| self.cell(t, v).is_some()))
            .cloned()
            .collect()
    }

    /// Tasks with runs on which some variant beat chance ([`Runs::at_chance`] is false): the
    /// tasks an average accuracy is taken over.
    pub fn learned_tasks(&self) -> Vec<String> {
        self.run_tasks()
            .into_iter()
            .filter(|t| !self.at_chance(t))
            .collect()
    }

    /// Mean over the learned tasks of the variant's mean accuracy (%), and how many of them
    /// it has.
    pub fn average_pct(&self, variant: &str) -> Option<(f64, usize)> {
        let accs: Vec<f64> = self
            .learned_tasks()
            .iter()
            .filter_map(|t| self.cell(t, variant)?.accuracy_pct().map(|(m, _)| m))
            .collect();
        mean(&accs).map(|m| (m, accs.len()))
    }

    /// What the task's accuracy is measured against: the test split's majority-class rate
    /// when the runs recorded it, else 1 / classes for tasks whose class count is fixed.
    pub fn chance(&self, task: &str) -> Option<Chance> {
        let cells = self.variants.iter().filter_map(|v| self.cell(task, v));
        let runs: Vec<&RunResult> = cells.flat_map(|c| c.runs.iter().copied()).collect();
        if runs.is_empty() {
            return None;
        }
        let examples = runs.iter().map(|r| r.test_examples).min().unwrap_or(0);
        let majority = runs
            .iter()
            .filter_map(|r| r.majority_accuracy)
            .filter(|p| p.is_finite() && (0.0..=1.0).contains(p))
            .max_by(f64::total_cmp);
        let (p, what) = match majority {
            Some(p) => (p, ChanceKind::Majority),
            None => {
                let n = lra_classes(task)?;
                (1.0 / n as f64, ChanceKind::Uniform(n))
            }
        };
        Some(Chance {
            pct: p * 100.0,
            margin_pct: chance_margin_pct(p, examples),
            kind: what,
        })
    }

    /// Whether the variant's mean accuracy on the task is within [`Chance::margin_pct`] of
    /// chance (false when chance is unknown).
    pub fn cell_at_chance(&self, task: &str, variant: &str) -> bool {
        let Some(c) = self.chance(task) else {
            return false;
        };
        self.cell(task, variant)
            .and_then(|cell| cell.accuracy_pct())
            .is_some_and(|(m, _)| c.reached_by(m))
    }

    /// Whether every variant that ran the task stayed at chance: nothing was learned.
    pub fn at_chance(&self, task: &str) -> bool {
        let accs: Vec<f64> = self
            .variants
            .iter()
            .filter_map(|v| self.cell(task, v)?.accuracy_pct().map(|(m, _)| m))
            .collect();
        match self.chance(task) {
            Some(c) if !accs.is_empty() => accs.iter().all(|&m| c.reached_by(m)),
            _ => false,
        }
    }

    /// The longest input length of the task's runs.
    pub fn seq_len(&self, task: &str) -> Option<usize> {
        self.cells
            .range((task.to_string(), String::new())..)
            .take_while(|((t, _), _)| t == task)
            .filter_map(|(_, c)| c.max_of(|r| r.seq_len))
            .max()
    }
}

/// Class counts of the LRA tasks whose labels do not depend on the files given (the text
/// task's classes do: the shipped plays, or the labels of `--text-dir`).
fn lra_classes(task: &str) -> Option<usize> {
    match lra_index(task)? {
        0 | 3 => Some(10),
        2 | 4 | 5 => Some(2),
        _ => None,
    }
}

/// Two binomial standard errors of an accuracy of `p` on `examples` test examples, in
/// percentage points, at least [`MIN_CHANCE_MARGIN_PCT`].
pub fn chance_margin_pct(p: f64, examples: usize) -> f64 {
    let se = (p * (1.0 - p) / examples.max(1) as f64).sqrt() * 100.0;
    (2.0 * se).max(MIN_CHANCE_MARGIN_PCT)
}

/// The smallest distance from chance that counts as learning, percentage points.
pub const MIN_CHANCE_MARGIN_PCT: f64 = 0.5;

/// Where chance lies on a task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chance {
    /// Accuracy of the chance answer, %.
    pub pct: f64,
    /// An accuracy at most this far above `pct` is "at chance" (two standard errors).
    pub margin_pct: f64,
    pub kind: ChanceKind,
}

/// Which chance answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChanceKind {
    /// Always the test split's most frequent label.
    Majority,
    /// A uniform guess among this many classes.
    Uniform(usize),
}

impl Chance {
    /// Whether an accuracy (%) is at chance: not above it by more than the margin.
    pub fn reached_by(&self, acc_pct: f64) -> bool {
        acc_pct <= self.pct + self.margin_pct
    }

    /// `majority class 17.9%` or `chance 1/10 = 10.0%`.
    pub fn describe(&self) -> String {
        match self.kind {
            ChanceKind::Majority => format!("majority class {:.1}%", self.pct),
            ChanceKind::Uniform(n) => format!("chance 1/{n} = {:.1}%", self.pct),
        }
    }
}

/// `a / b` when both are finite and `b > 0`.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    let r = a / b;
    (a.is_finite() && b.is_finite() && b > 0.0 && r.is_finite()).then_some(r)
}

/// Speed records grouped by (variant, length).
#[derive(Debug, Clone, Default)]
pub struct Speeds {
    /// (variant, length) → (steps/s values sorted, peak RSS bytes values sorted).
    pub cells: BTreeMap<(String, usize), (Vec<f64>, Vec<u64>)>,
    pub lengths: Vec<usize>,
    pub variants: Vec<String>,
}

impl Speeds {
    pub fn new(records: &[Record], order: &[String]) -> Self {
        // Deduplicate identical records (the same record merged twice counts once).
        let mut uniq: BTreeMap<(String, usize, u64, u64, usize), &SpeedResult> = BTreeMap::new();
        for rec in records {
            if let Record::Speed(s) = rec {
                let key = (
                    s.variant.clone(),
                    s.length,
                    s.steps_per_s.to_bits(),
                    s.peak_rss_bytes,
                    s.batch_size,
                );
                uniq.insert(key, s);
            }
        }
        let mut cells: BTreeMap<(String, usize), (Vec<f64>, Vec<u64>)> = BTreeMap::new();
        for s in uniq.values() {
            let cell = cells.entry((s.variant.clone(), s.length)).or_default();
            cell.0.push(s.steps_per_s);
            cell.1.push(s.peak_rss_bytes);
        }
        for cell in cells.values_mut() {
            cell.0.sort_by(f64::total_cmp);
            cell.1.sort();
        }
        let lengths: BTreeSet<usize> = cells.keys().map(|(_, l)| *l).collect();
        let present: BTreeSet<String> = cells.keys().map(|(v, _)| v.clone()).collect();
        Speeds {
            lengths: lengths.into_iter().collect(),
            variants: order_variants(&present, order),
            cells,
        }
    }

    /// Mean steps/s of the variant at the length.
    pub fn steps(&self, variant: &str, length: usize) -> Option<f64> {
        mean(&self.cells.get(&(variant.to_string(), length))?.0)
    }

    /// Largest peak RSS of the variant at the length, MiB.
    pub fn mib(&self, variant: &str, length: usize) -> Option<f64> {
        let max = *self.cells.get(&(variant.to_string(), length))?.1.last()?;
        Some(bytes_to_mib(max))
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}

pub fn bytes_to_mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Where a variant's speed and memory figure on a task comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CostSource {
    /// The speed jobs (Table 2) at this length: the measured length nearest the task's input
    /// length at which both the variant and the baseline were measured.
    Jobs(usize),
    /// The training runs themselves (no speed job to use): their steps/s swing with what ran
    /// beside them.
    InRun,
}

/// Speed and memory of a variant for one task, from one source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// Training steps/s relative to the baseline (from the same source).
    pub speed: f64,
    /// Peak memory, MiB (speed job's peak RSS, or the runs' largest peak RSS).
    pub mib: Option<f64>,
    pub source: CostSource,
}

/// The variant's [`Cost`] on `task`: from the speed jobs at the length nearest the task's
/// input length when the variant and the baseline were both measured, else from the runs on
/// the task relative to the baseline's runs; `None` without a baseline either way.
pub fn cost(runs: &Runs, speeds: &Speeds, task: &str, variant: &str) -> Option<Cost> {
    let len = runs.seq_len(task)?;
    let nearest = speeds
        .lengths
        .iter()
        .copied()
        .filter(|&l| speeds.steps(variant, l).is_some() && speeds.steps(BASELINE, l).is_some())
        .min_by_key(|&l| (l.abs_diff(len), l));
    if let Some(l) = nearest {
        let speed = ratio(speeds.steps(variant, l)?, speeds.steps(BASELINE, l)?)?;
        return Some(Cost {
            speed,
            mib: speeds.mib(variant, l),
            source: CostSource::Jobs(l),
        });
    }
    let cell = runs.cell(task, variant)?;
    let own = cell.mean_of(|r| r.train_steps_per_s)?;
    let base = runs
        .cell(task, BASELINE)?
        .mean_of(|r| r.train_steps_per_s)?;
    Some(Cost {
        speed: ratio(own, base)?,
        mib: cell.max_of(|r| r.peak_rss_bytes).map(bytes_to_mib),
        source: CostSource::InRun,
    })
}
