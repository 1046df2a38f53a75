//! The arena runner: plans (task, variant, seed) training runs and (variant, length) speed
//! measurements, keeps a shard of them, skips those already in the results store, runs the
//! rest and appends each record the moment it finishes.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use formers::config::{HeadSpec, InputSpec, ModelConfig, Pooling, RunConfig};
use formers::rng::Rng;
use formers::tasks::{Batch, Task};
use formers::train::trainer::{EvalReport, StepReport};
use formers::train::{Observer, RunDir, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

use crate::adapter::{split_accuracy, Adapter};
use crate::jobdir::JobDir;
use crate::results::{self, Record, RunResult, Skipped, SpeedResult};
use crate::suite::{open_task, DataDirs, SuiteSpec};
use crate::task::{ArenaTask, Split};
use crate::variants::Variant;
use crate::{flops, mem};

/// How long each run trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Budget {
    /// Optimizer steps.
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

    /// The budget as it appears in results and reports.
    pub fn label(&self) -> String {
        match self {
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
            } => results::run_key(suite, task, variant, *seed, &opts.budget.label()),
            Job::Speed { variant, length } => results::speed_key(suite, variant, *length),
        }
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

/// Progress of one job, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Training starts and will take `steps` steps.
    Start {
        steps: usize,
    },
    Step {
        step: usize,
        loss: f32,
    },
    Eval {
        step: usize,
        accuracy: f64,
    },
    /// Training is over; `done` of the `total` test examples are scored.
    Testing {
        done: usize,
        total: usize,
    },
}

/// A task opened, or why it cannot run here.
type Opened = Result<Arc<dyn ArenaTask>, String>;

/// The tasks a process has opened, each opened once (shared by the arena loop, which
/// checks which tasks can run, and in-process jobs).
#[derive(Default)]
pub struct Tasks {
    opened: RefCell<BTreeMap<String, Opened>>,
}

impl Tasks {
    /// Task `name` of the suite, or why it cannot run here.
    pub fn get(&self, name: &str, opts: &Options) -> Opened {
        self.opened
            .borrow_mut()
            .entry(name.to_string())
            .or_insert_with(|| open_task(name, opts.suite.setting, &opts.data))
            .clone()
    }
}

/// The variant's model at the suite's size for a task of `vocab` ids, `max_len` positions
/// and `n_classes` classes.
pub fn configure(
    v: &Variant,
    suite: &SuiteSpec,
    vocab: usize,
    max_len: usize,
    n_classes: usize,
) -> ModelConfig {
    let mut m = v.model.clone();
    m.d_model = suite.d_model;
    m.n_heads = suite.n_heads;
    m.n_layers = suite.n_layers;
    m.max_len = max_len;
    m.input = InputSpec::Tokens { vocab_size: vocab };
    m.head = HeadSpec::Classification {
        n_classes,
        pooling: Pooling::Mean,
    };
    m
}

/// Runs `job` in this process, using `work` for run directories; reports progress to
/// `events`.
pub fn run_job(
    job: &Job,
    opts: &Options,
    tasks: &Tasks,
    work: &Path,
    events: &mut dyn FnMut(Event),
) -> Result<Record, String> {
    let variant = |name: &str| {
        opts.variants
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| format!("variant `{name}` is not in this arena"))
    };
    match job {
        Job::Run {
            task,
            variant: name,
            seed,
        } => {
            let task = tasks.get(task, opts)?;
            train_and_test(job, opts, task, variant(name)?, *seed, work, events)
        }
        Job::Speed {
            variant: name,
            length,
        } => speed(opts, variant(name)?, *length, events),
    }
}

/// Times training steps and records the loss curve, excluding evaluation time.
struct Timer<'a> {
    events: &'a mut dyn FnMut(Event),
    last: Instant,
    step_seconds: Vec<f64>,
    curve: Vec<(usize, f32)>,
}

impl<'a> Timer<'a> {
    fn new(events: &'a mut dyn FnMut(Event)) -> Self {
        Timer {
            events,
            last: Instant::now(),
            step_seconds: Vec::new(),
            curve: Vec::new(),
        }
    }
}

impl Observer for Timer<'_> {
    fn on_step(&mut self, s: &StepReport) {
        let now = Instant::now();
        self.step_seconds
            .push(now.duration_since(self.last).as_secs_f64());
        self.last = now;
        self.curve.push((s.step, s.loss));
        (self.events)(Event::Step {
            step: s.step,
            loss: s.loss,
        });
    }
    fn on_eval(&mut self, step: usize, e: &EvalReport) {
        self.last = Instant::now();
        (self.events)(Event::Eval {
            step,
            accuracy: e.accuracy,
        });
    }
}

fn train_config(suite: &SuiteSpec, steps: usize, seq_len: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: suite.batch_size,
        seq_len,
        lr: suite.lr,
        warmup: (steps / 10).max(1),
        eval_every: (steps / 5).max(1),
        eval_batches: 2,
        checkpoint_every: steps,
        seed,
        ..TrainConfig::default()
    }
}

/// Steps that fit `minutes` of training, from the time of a few probe steps (in memory).
fn steps_for_minutes(run: &RunConfig, task: &dyn Task, minutes: f64) -> Result<usize, String> {
    let mut probe = run.clone();
    probe.train.steps = 4;
    probe.train.eval_every = 100;
    probe.train.checkpoint_every = 100;
    let mut ignore = |_: Event| {};
    let mut timer = Timer::new(&mut ignore);
    let mut trainer = Trainer::new(&probe, task).map_err(|e| e.to_string())?;
    while !trainer.is_done() {
        let report = trainer.step().map_err(|e| e.to_string())?;
        timer.on_step(&report);
    }
    // The first step pays for allocations; the rest are typical.
    let t = median(&timer.step_seconds[1..]);
    // Keep a fifth of the budget for evaluations and testing.
    Ok(((minutes * 60.0 * 0.8 / t.max(1e-6)) as usize).max(10))
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn train_and_test(
    job: &Job,
    opts: &Options,
    task: Arc<dyn ArenaTask>,
    variant: &Variant,
    seed: u64,
    work: &Path,
    events: &mut dyn FnMut(Event),
) -> Result<Record, String> {
    let suite = &opts.suite;
    let max_len = task.max_len();
    let model = configure(variant, suite, task.vocab_size(), max_len, task.n_classes());
    let adapter = Adapter::new(task.clone());
    let claim = JobDir::claim(&work.join(job.label()))?;
    let dir = claim.path();
    let mut run = RunConfig {
        model,
        train: train_config(suite, 1, max_len, seed),
    };
    let steps = match opts.budget {
        Budget::Steps(n) => n,
        Budget::Minutes(m) => steps_for_minutes(&run, &adapter, m)?,
    };
    run.train = train_config(suite, steps, max_len, seed);
    mem::reset_peak();
    let start = Instant::now();
    events(Event::Start { steps });
    let mut timer = Timer::new(events);
    let failed = |e: formers::Error| e.to_string();
    let mut trainer = Trainer::new(&run, &adapter).map_err(failed)?;
    let summary = RunDir::open(dir, &mut trainer, false)
        .and_then(|mut d| d.train(&mut trainer, &mut timer))
        .map_err(failed)?;
    let Timer {
        step_seconds,
        curve,
        events,
        ..
    } = timer;
    // Scored as trained, in memory (the run directory keeps the checkpoint for later).
    let model = trainer.inference_model();
    let (test_accuracy, test_examples, infer_tokens_per_s) = split_accuracy(
        model,
        task.as_ref(),
        Split::Test,
        suite.batch_size,
        |done, total| events(Event::Testing { done, total }),
    )
    .map_err(|e| e.to_string())?;
    let train_seconds: f64 = step_seconds.iter().sum();
    Ok(Record::Run(RunResult {
        suite: suite.setting.name().into(),
        task: task.name().into(),
        variant: variant.name.clone(),
        seed,
        budget: opts.budget.label(),
        source: task.source(),
        seq_len: max_len,
        batch_size: suite.batch_size,
        steps: summary.steps,
        test_accuracy,
        test_examples,
        val_accuracy: summary.eval.accuracy,
        train_steps_per_s: summary.steps as f64 / train_seconds.max(1e-9),
        infer_tokens_per_s,
        peak_rss_bytes: mem::peak_rss().unwrap_or(0),
        params: summary.params,
        flops_per_token: flops::per_token(&run.model, max_len),
        wall_s: start.elapsed().as_secs_f64(),
        loss_curve: thin(curve, 500),
    }))
}

/// At most about `max` points of `curve`, evenly spaced, the last always kept.
fn thin(curve: Vec<(usize, f32)>, max: usize) -> Vec<(usize, f32)> {
    let every = curve.len().div_ceil(max).max(1);
    let last = curve.len().saturating_sub(1);
    curve
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % every == 0 || *i == last)
        .map(|(_, p)| p)
        .collect()
}

/// Random bytes with random binary labels: what a speed measurement trains on (the cost
/// of a step does not depend on the data).
struct RandomBytes {
    len: usize,
}

impl Task for RandomBytes {
    fn name(&self) -> &str {
        "random-bytes"
    }
    fn train_batch(&self, rng: &mut Rng, b: usize) -> formers::Result<Batch> {
        let ids: Vec<u32> = (0..b * self.len).map(|_| rng.below(256) as u32).collect();
        let labels: Vec<u32> = (0..b).map(|_| rng.below(2) as u32).collect();
        Ok(Batch {
            inputs: Tensor::from_vec(ids, (b, self.len), &Device::Cpu)?,
            targets: Tensor::from_vec(labels, b, &Device::Cpu)?,
            weights: None,
            mask: None,
            tokens: b * self.len,
        })
    }
    fn eval_batch(&self, rng: &mut Rng, b: usize) -> formers::Result<Batch> {
        self.train_batch(rng, b)
    }
}

/// Steps timed per speed measurement, after warm-up steps.
const SPEED_STEPS: usize = 5;
const SPEED_WARMUP: usize = 2;

fn speed(
    opts: &Options,
    variant: &Variant,
    length: usize,
    events: &mut dyn FnMut(Event),
) -> Result<Record, String> {
    let suite = &opts.suite;
    let steps = SPEED_WARMUP + SPEED_STEPS;
    let mut train = train_config(suite, steps, length, 0);
    train.batch_size = suite.speed_batch;
    train.eval_every = steps;
    train.eval_batches = 1;
    let run = RunConfig {
        model: configure(variant, suite, 256, length, 2),
        train,
    };
    let data = RandomBytes { len: length };
    mem::reset_peak();
    events(Event::Start { steps });
    let mut timer = Timer::new(events);
    // In memory: no run directory, no checkpoint.
    let mut trainer = Trainer::new(&run, &data).map_err(|e| e.to_string())?;
    trainer.train(&mut timer).map_err(|e| e.to_string())?;
    let peak = mem::peak_rss().unwrap_or(0);
    let t = median(&timer.step_seconds[SPEED_WARMUP..]);
    Ok(Record::Speed(SpeedResult {
        suite: suite.setting.name().into(),
        variant: variant.name.clone(),
        length,
        batch_size: suite.speed_batch,
        steps_per_s: 1.0 / t.max(1e-9),
        peak_rss_bytes: peak,
        params: trainer.param_count(),
    }))
}

/// What the arena loop reports.
pub trait Progress {
    /// The shard has `total` jobs, `done` of them already finished earlier.
    fn start(&mut self, _total: usize, _done: usize) {}
    /// A task is left out (its jobs are not run).
    fn skipped(&mut self, _task: &str, _reason: &str) {}
    /// A job is about to run.
    fn job(&mut self, _job: &Job) {}
    fn finished(&mut self, _job: &Job, _record: &Record) {}
    fn failed(&mut self, _job: &Job, _error: &str) {}
}

/// How an arena invocation went.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Jobs run now.
    pub ran: usize,
    /// Jobs of this shard found finished in the store and not rerun.
    pub already_done: usize,
    /// Jobs that failed, with their errors (the arena goes on without them).
    pub failed: Vec<(Job, String)>,
    /// Every record now in the store.
    pub records: Vec<Record>,
}

/// Runs the shard of `opts` into arena directory `out` (`results.jsonl` plus run
/// directories), with `exec` running each job (in this process or a worker process);
/// `tasks` are opened here to find which can run.
pub fn run_arena(
    opts: &Options,
    out: &Path,
    tasks: &Tasks,
    exec: &mut dyn FnMut(&Job) -> Result<Record, String>,
    progress: &mut dyn Progress,
) -> Result<Outcome, String> {
    let (i, n) = opts.shard;
    if n == 0 || i == 0 || i > n {
        return Err(format!("shard {i}/{n}: expected i/N with 1 ≤ i ≤ N"));
    }
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let store = out.join(results::FILE);
    let mut records = results::load(&store)?;
    let mut done: BTreeSet<String> = records.iter().map(Record::key).collect();
    let jobs = shard(plan(opts), i, n);
    // Tasks that cannot run here are noted once and their jobs left out.
    let mut unavailable = BTreeSet::new();
    for t in &opts.tasks {
        if let Err(reason) = tasks.get(t, opts) {
            progress.skipped(t, &reason);
            unavailable.insert(t.clone());
            let rec = Record::Skipped(Skipped {
                suite: opts.suite.setting.name().into(),
                task: t.clone(),
                reason,
            });
            if done.insert(rec.key()) {
                results::append(&store, &rec)?;
                records.push(rec);
            }
        }
    }
    let jobs: Vec<Job> = jobs
        .into_iter()
        .filter(|j| !matches!(j, Job::Run { task, .. } if unavailable.contains(task)))
        .collect();
    let already_done = jobs.iter().filter(|j| done.contains(&j.key(opts))).count();
    progress.start(jobs.len(), already_done);
    let mut outcome = Outcome {
        already_done,
        ..Outcome::default()
    };
    let pending: Vec<&Job> = jobs
        .iter()
        .filter(|j| !done.contains(&j.key(opts)))
        .collect();
    for job in pending {
        progress.job(job);
        match exec(job) {
            Ok(rec) => {
                results::append(&store, &rec)?;
                progress.finished(job, &rec);
                done.insert(rec.key());
                records.push(rec);
                outcome.ran += 1;
            }
            Err(e) => {
                progress.failed(job, &e);
                outcome.failed.push((job.clone(), e));
            }
        }
    }
    outcome.records = records;
    Ok(outcome)
}

/// Runs every job of `opts` in this process (tests, and `--in-process`).
pub fn run_in_process(
    opts: &Options,
    out: &Path,
    progress: &mut dyn Progress,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome, String> {
    let work: PathBuf = out.join("runs");
    let tasks = Tasks::default();
    run_arena(
        opts,
        out,
        &tasks,
        &mut |job| run_job(job, opts, &tasks, &work, events),
        progress,
    )
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

/// What the report says besides the numbers: which suite ran, the size budget, the data of
/// each task, what each variant is and how speed and memory were measured.
pub fn report_meta(opts: Option<&Options>, records: &[Record]) -> crate::report::ReportMeta {
    let runs: Vec<&RunResult> = records
        .iter()
        .filter_map(|r| match r {
            Record::Run(r) => Some(r),
            _ => None,
        })
        .collect();
    let mut suites: Vec<&str> = runs.iter().map(|r| r.suite.as_str()).collect();
    suites.sort();
    suites.dedup();
    let suite = opts
        .map(|o| o.suite.setting.name().to_string())
        .unwrap_or_else(|| suites.join(" + "));
    let mut notes = Vec::new();
    if let Some(o) = opts {
        let s = &o.suite;
        notes.push(format!(
            "Suite `{}`: every variant is {} layers of width {} with {} heads and a 4× MLP, \
             mean-pooled classification head, learned positions; batch {}, AdamW at lr {} with \
             10% warm-up and cosine decay; budget {} per run ({}); {} seed(s).",
            s.setting.name(),
            s.n_layers,
            s.d_model,
            s.n_heads,
            s.batch_size,
            s.lr,
            o.budget.label(),
            match o.budget {
                Budget::Steps(_) => "optimizer steps",
                Budget::Minutes(_) => "minutes of training, converted to steps per run",
            },
            o.seeds
        ));
    }
    if suite.contains("lite") {
        notes.push(
            "The lite suite is not LRA's setting: sequences of at most 256 tokens, small \
             splits, tiny models and short budgets, so that it runs on two CPU cores. Compare \
             variants with each other; the paper's numbers (full setting, TPU) are printed \
             for reference only."
                .into(),
        );
    }
    let mut by_task: BTreeMap<&str, &RunResult> = BTreeMap::new();
    for r in &runs {
        by_task.entry(r.task.as_str()).or_insert(r);
    }
    for (task, r) in &by_task {
        notes.push(format!(
            "`{task}`: inputs padded to {} tokens, {} test examples; data: {}.",
            r.seq_len, r.test_examples, r.source
        ));
    }
    if by_task.contains_key("retrieval") {
        notes.push(
            "`retrieval` reads its two documents as one sequence (document 1, then \
             document 2), not with LRA's two separate encoders (towers)."
                .into(),
        );
    }
    for r in records {
        if let Record::Skipped(s) = r {
            notes.push(format!("`{}` skipped: {}", s.task, s.reason));
        }
    }
    if let Some((lo, hi)) = param_range(&runs) {
        notes.push(format!(
            "Same size budget: parameters range from {} ({}) to {} ({}) on `{}`; the \
             differences are the variants' own (low-rank factors, Linformer projections, \
             DenseFormer weights).",
            lo.params, lo.variant, hi.params, hi.variant, lo.task
        ));
    }
    if let Some(o) = opts {
        for v in &o.variants {
            notes.push(format!("Variant `{}`: {}", v.name, v.description));
        }
        if o.speed {
            notes.push(format!(
                "Speed and memory (Table 2): one training step (forward, backward, AdamW) on \
                 random bytes at batch {}, median of {SPEED_STEPS} steps after {SPEED_WARMUP} \
                 warm-up steps; memory is the peak resident set of the process, each \
                 measurement in its own process.",
                o.suite.speed_batch
            ));
        }
    }
    let wall: f64 = runs.iter().map(|r| r.wall_s).sum();
    if wall > 0.0 {
        notes.push(format!(
            "Training runs took {:.1} minutes in total (sum of run wall times).",
            wall / 60.0
        ));
    }
    let variant_order = match opts {
        Some(o) => o.variants.iter().map(|v| v.name.clone()).collect(),
        None => crate::variants::builtin_names()
            .into_iter()
            .map(String::from)
            .collect(),
    };
    crate::report::ReportMeta {
        title: format!("formers arena — {suite} suite"),
        notes,
        variant_order,
    }
}

/// The runs with the fewest and most parameters on the first task that has runs.
fn param_range<'a>(runs: &[&'a RunResult]) -> Option<(&'a RunResult, &'a RunResult)> {
    let task = runs.iter().map(|r| r.task.as_str()).min()?;
    let on_task = runs.iter().filter(|r| r.task == task);
    let lo = on_task
        .clone()
        .min_by_key(|r| (r.params, r.variant.clone()))?;
    let hi = on_task.max_by_key(|r| (r.params, r.variant.clone()))?;
    Some((lo, hi))
}
