//! Planning: the arena's options, its jobs (training runs and speed measurements) in a fixed
//! order, shards of them, and the options file of an arena directory.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::results;
use crate::suite::{DataDirs, SuiteSpec};
use crate::variants::Variant;

/// How long each run trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Budget {
    /// The suite's optimizer steps for each task ([`SuiteSpec::steps`]): the default.
    Suite,
    /// Optimizer steps, the same for every task.
    Steps(usize),
    /// Wall-clock minutes of training, turned into steps by timing a few first.
    Minutes(f64),
}

impl Budget {
    /// `300` (steps), `2m` / `2min` / `1.5m` (minutes) or `90s` (seconds).
    pub fn parse(s: &str) -> Result<Budget, String> {
        let bad = || format!("budget `{s}`: expected steps (`300`) or minutes (`2m`, `90s`)");
        let s = s.trim();
        if let Some(m) = s.strip_suffix("min").or_else(|| s.strip_suffix('m')) {
            let m: f64 = m.trim().parse().map_err(|_| bad())?;
            return (m > 0.0).then_some(Budget::Minutes(m)).ok_or_else(bad);
        }
        if let Some(sec) = s.strip_suffix('s') {
            let sec: f64 = sec.trim().parse().map_err(|_| bad())?;
            return (sec > 0.0)
                .then_some(Budget::Minutes(sec / 60.0))
                .ok_or_else(bad);
        }
        match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Budget::Steps(n)),
            _ => Err(bad()),
        }
    }

    /// The optimizer steps of a run of `task`, or `None` for a minutes budget.
    pub fn steps(&self, suite: &SuiteSpec, task: &str) -> Option<usize> {
        match *self {
            Budget::Suite => Some(suite.steps(task)),
            Budget::Steps(n) => Some(n),
            Budget::Minutes(_) => None,
        }
    }

    /// The budget of a run of `task` as it appears in results (and in their keys): its
    /// steps, so a default run and `--budget N` with the same steps share records.
    pub fn label(&self, suite: &SuiteSpec, task: &str) -> String {
        match self.steps(suite, task) {
            Some(n) => n.to_string(),
            None => self.summary(),
        }
    }

    /// The budget of the whole arena, for reports: `300`, `2m`, or `suite` (per task).
    pub fn summary(&self) -> String {
        match self {
            Budget::Suite => "suite".into(),
            Budget::Steps(n) => n.to_string(),
            Budget::Minutes(m) => format!("{m}m"),
        }
    }
}

/// Everything a run of the arena needs; serialisable so a worker process can receive it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub suite: SuiteSpec,
    pub tasks: Vec<String>,
    pub variants: Vec<Variant>,
    pub budget: Budget,
    /// Seeds `0..seeds` per (task, variant).
    pub seeds: u64,
    /// Run slice `shard.0` (1-based) of `shard.1`.
    pub shard: (usize, usize),
    /// Also measure speed and memory per length (LRA Table 2).
    pub speed: bool,
    pub data: DataDirs,
}

/// One unit of arena work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    Run {
        task: String,
        variant: String,
        seed: u64,
    },
    Speed {
        variant: String,
        length: usize,
    },
}

impl Job {
    /// The key of the record this job makes (see [`Record::key`]).
    pub fn key(&self, opts: &Options) -> String {
        let suite = opts.suite.setting.name();
        match self {
            Job::Run {
                task,
                variant,
                seed,
            } => results::run_key(
                suite,
                task,
                variant,
                *seed,
                &opts.budget.label(&opts.suite, task),
            ),
            Job::Speed { variant, length } => results::speed_key(suite, variant, *length),
        }
    }

    /// Whether the job must run alone, with all the arena's threads: a speed measurement,
    /// whose timing another job running beside it would corrupt.
    pub fn runs_alone(&self) -> bool {
        matches!(self, Job::Speed { .. })
    }

    /// A short name for progress bars and directories.
    pub fn label(&self) -> String {
        match self {
            Job::Run {
                task,
                variant,
                seed,
            } => format!("{task}-{variant}-s{seed}"),
            Job::Speed { variant, length } => format!("speed-{variant}-{length}"),
        }
    }
}

/// Every job of `opts`, unsharded, in a fixed order: runs by task, variant, seed; then
/// speed measurements by variant and length.
pub fn plan(opts: &Options) -> Vec<Job> {
    let mut jobs = Vec::new();
    for task in &opts.tasks {
        for v in &opts.variants {
            for seed in 0..opts.seeds {
                jobs.push(Job::Run {
                    task: task.clone(),
                    variant: v.name.clone(),
                    seed,
                });
            }
        }
    }
    if opts.speed {
        for v in &opts.variants {
            for &length in &opts.suite.speed_lengths {
                jobs.push(Job::Speed {
                    variant: v.name.clone(),
                    length,
                });
            }
        }
    }
    jobs
}

/// The jobs of shard `i` (1-based) of `n`: every n-th job of the plan, so shards are
/// disjoint, cover the plan and stay balanced across tasks.
pub fn shard(jobs: Vec<Job>, i: usize, n: usize) -> Vec<Job> {
    jobs.into_iter()
        .enumerate()
        .filter(|(k, _)| k % n == i - 1)
        .map(|(_, j)| j)
        .collect()
}

/// The jobs of `opts`' shard, or an error saying that the shard has none.
pub fn shard_jobs(opts: &Options) -> Result<Vec<Job>, String> {
    let (i, n) = opts.shard;
    let all = plan(opts);
    let total = all.len();
    let jobs = shard(all, i, n);
    if jobs.is_empty() {
        let s = if total == 1 { "" } else { "s" };
        let every = if n > 1 {
            format!(", shards take every {}", ordinal(n))
        } else {
            String::new()
        };
        return Err(format!(
            "shard {i}/{n} has no jobs: the plan has {total} job{s}{every}"
        ));
    }
    Ok(jobs)
}

/// `2nd`, `3rd`, `11th`, `21st`.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// `items` with each repeat dropped (the first kept, order unchanged), and one note per
/// repeated item naming `flag` (e.g. "--variants names `vanilla` twice; it runs once").
pub fn dedup(flag: &str, items: &[String]) -> (Vec<String>, Vec<String>) {
    let mut kept: Vec<String> = Vec::with_capacity(items.len());
    let mut notes = Vec::new();
    for item in items {
        if kept.contains(item) {
            continue;
        }
        let times = items.iter().filter(|x| *x == item).count();
        if times > 1 {
            let times = if times == 2 {
                "twice".to_string()
            } else {
                format!("{times} times")
            };
            notes.push(format!("{flag} names `{item}` {times}; it runs once"));
        }
        kept.push(item.clone());
    }
    (kept, notes)
}

/// File in an arena directory holding the [`Options`] it was run with (for `report`).
pub const OPTIONS_FILE: &str = "arena.json";

/// Saves `opts` into arena directory `out`.
pub fn save_options(opts: &Options, out: &Path) -> Result<(), String> {
    let path = out.join(OPTIONS_FILE);
    let json = serde_json::to_string_pretty(opts).expect("options serialise");
    fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))
}

/// The options arena directory `out` was run with, if it says.
pub fn load_options(out: &Path) -> Option<Options> {
    let text = fs::read_to_string(out.join(OPTIONS_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::DataDirs;
    use crate::task::Setting;
    use crate::variants;

    fn opts(shard: (usize, usize)) -> Options {
        Options {
            suite: SuiteSpec::new(Setting::Lite),
            tasks: vec!["listops".into()],
            variants: variants::resolve(&["vanilla".into()]).unwrap(),
            budget: Budget::Suite,
            seeds: 1,
            shard,
            speed: false,
            data: DataDirs::default(),
        }
    }

    #[test]
    fn a_shard_without_jobs_says_so() {
        assert_eq!(shard_jobs(&opts((1, 2))).unwrap().len(), 1);
        assert_eq!(
            shard_jobs(&opts((2, 2))).unwrap_err(),
            "shard 2/2 has no jobs: the plan has 1 job, shards take every 2nd"
        );
        let e = shard_jobs(&opts((13, 13))).unwrap_err();
        assert!(e.ends_with("shards take every 13th"), "{e}");
        assert_eq!(ordinal(21), "21st");
        assert_eq!(ordinal(3), "3rd");
    }

    #[test]
    fn repeated_names_are_dropped_with_a_note() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (kept, notes) = dedup("--variants", &names(&["vanilla", "local", "vanilla"]));
        assert_eq!(kept, names(&["vanilla", "local"]));
        assert_eq!(notes, ["--variants names `vanilla` twice; it runs once"]);
        let (kept, notes) = dedup("--tasks", &names(&["text", "text", "text"]));
        assert_eq!(kept, names(&["text"]));
        assert_eq!(notes, ["--tasks names `text` 3 times; it runs once"]);
        assert!(dedup("--tasks", &names(&["a", "b"])).1.is_empty());
    }
}
