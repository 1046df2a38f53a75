//! Executing one job in this process: train a variant on a task and score it on the test
//! split, or time training steps; progress goes out as [`Event`]s.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use formers::config::{HeadSpec, InputSpec, ModelConfig, Pooling};
use formers::params::InitSpec;
use formers::position::PositionSpec;
use formers::tasks::RandomTokens;
use formers::train::RunConfig;
use formers::train::Task;
use formers::train::{EvalReport, StepReport};
use formers::train::{Observer, RunDir, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

use crate::adapter::{split_accuracy, Adapter};
use crate::jobdir::JobDir;
use crate::plan::{Budget, Job, Options};
use crate::results::{Record, RunResult, SpeedResult};
use crate::suite::{open_task, SuiteSpec};
use crate::task::{ArenaTask, Split};
use crate::variants::Variant;
use crate::{flops, mem};

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
    opened: Mutex<BTreeMap<String, Opened>>,
}

impl Tasks {
    /// Task `name` of the suite, or why it cannot run here.
    pub fn get(&self, name: &str, opts: &Options) -> Opened {
        self.opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
    m.init = InitSpec::Torch;
    m.head = HeadSpec::Classification {
        n_classes,
        pooling: Pooling::Mean,
    };
    m
}

/// The variant's model for `task`: [`configure`] with the task's ids, length and classes; for
/// a task of pairs, a matching head over documents of half the task's length; for an image
/// task in a suite with [`SuiteSpec::image_rope_base`], 2-D rotary positions in place of the
/// learned table when the variant uses the table and its mixers accept rotary positions.
pub fn configure_task(v: &Variant, suite: &SuiteSpec, task: &dyn ArenaTask) -> ModelConfig {
    let mut m = configure(
        v,
        suite,
        task.vocab_size(),
        task.max_len(),
        task.n_classes(),
    );
    if task.pairs() {
        m.max_len = task.max_len() / 2;
        m.head = HeadSpec::Matching {
            n_classes: task.n_classes(),
            pooling: Pooling::Mean,
        };
    }
    if let Some(position) = task.grid_width().and_then(|w| grid_positions(&m, suite, w)) {
        m.position = position;
    }
    m
}

/// The 2-D rotary positions that replace `m`'s learned table on an image `width` pixels
/// wide, when the suite asks for them ([`SuiteSpec::image_rope_base`]), `m` uses the learned
/// table and every mixer of `m` accepts rotary positions; `None` keeps `m`'s positions.
pub fn grid_positions(m: &ModelConfig, suite: &SuiteSpec, width: usize) -> Option<PositionSpec> {
    let base = suite.image_rope_base?;
    if m.position != PositionSpec::Learned {
        return None;
    }
    let position = PositionSpec::Rope2d { width, base };
    let grid = ModelConfig {
        position: position.clone(),
        ..m.clone()
    };
    grid.validate().is_ok().then_some(position)
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
    let model = configure_task(variant, suite, task.as_ref());
    let adapter = Adapter::new(task.clone());
    let claim = JobDir::claim(&work.join(job.label()))?;
    let dir = claim.path();
    let mut run = RunConfig {
        model,
        train: train_config(suite, 1, max_len, seed),
    };
    let steps = match opts.budget {
        Budget::Minutes(m) => steps_for_minutes(&run, &adapter, m)?,
        b => b.steps(suite, task.name()).expect("a steps budget"),
    };
    run.train = train_config(suite, steps, max_len, seed);
    mem::reset_peak();
    let start = Instant::now();
    events(Event::Start { steps });
    let mut timer = Timer::new(events);
    let failed = |e: formers::Error| e.to_string();
    let mut trainer = Trainer::new(&run, &adapter).map_err(failed)?;
    let summary = RunDir::open(dir, &mut trainer, formers::train::Start::New)
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
    let score = split_accuracy(
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
        budget: opts.budget.label(suite, task.name()),
        source: task.source(),
        seq_len: max_len,
        batch_size: suite.batch_size,
        steps: summary.steps,
        test_accuracy: score.accuracy,
        test_examples: score.examples,
        majority_accuracy: Some(score.majority),
        val_accuracy: summary.eval.accuracy,
        train_steps_per_s: summary.steps as f64 / train_seconds.max(1e-9),
        threads: crate::pool::arena_threads(),
        infer_tokens_per_s: score.positions_per_s,
        peak_rss_bytes: mem::peak_rss().unwrap_or(0),
        params: summary.params,
        flops_per_token: flops::per_token(&run.model, run.model.max_len),
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

/// How much work a job is, relative to the other jobs of the same arena, for estimating
/// how long the rest of the run takes ([`work`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Work {
    /// The whole job.
    pub total: f64,
    /// The part of it done by the end of training (the rest is evaluation and testing).
    pub training: f64,
}

/// Input positions a worker process costs besides its steps (start, model, task): about a
/// second of the lite model's training on this machine's two cores.
const JOB_OVERHEAD_POSITIONS: f64 = 20_000.0;

/// How much work `job` is: input positions processed with a steps budget (training steps ×
/// batch × length, the evaluations and the test split at a third of a training position
/// each, and [`JOB_OVERHEAD_POSITIONS`]); seconds with a minutes budget (a run then takes
/// its budget, a speed job a few seconds). A task that cannot be opened weighs nothing.
pub fn work(job: &Job, opts: &Options, tasks: &Tasks) -> Work {
    let suite = &opts.suite;
    let speed_positions =
        |length: usize| ((SPEED_WARMUP + SPEED_STEPS) * suite.speed_batch * length) as f64;
    let all_training = |total: f64| Work {
        total,
        training: total,
    };
    match (job, opts.budget) {
        (Job::Speed { length, .. }, Budget::Minutes(_)) => {
            all_training(1.0 + speed_positions(*length) / JOB_OVERHEAD_POSITIONS)
        }
        (Job::Speed { length, .. }, _) => {
            all_training(JOB_OVERHEAD_POSITIONS + speed_positions(*length))
        }
        (Job::Run { task, .. }, budget) => {
            let Ok(t) = tasks.get(task, opts) else {
                return all_training(0.0);
            };
            let steps = match budget {
                Budget::Minutes(m) => {
                    return Work {
                        total: m * 60.0 + 5.0,
                        training: m * 60.0 * 0.8,
                    }
                }
                b => b.steps(suite, task).expect("a steps budget"),
            };
            let tc = train_config(suite, steps, t.max_len(), 0);
            let evals = steps.div_ceil(tc.eval_every.max(1)) * tc.eval_batches * tc.batch_size;
            let len = t.max_len() as f64;
            let training = JOB_OVERHEAD_POSITIONS + (steps * tc.batch_size) as f64 * len;
            let held_out = (evals + t.len(Split::Test)) as f64 / 3.0 * len;
            Work {
                total: training + held_out,
                training,
            }
        }
    }
}

/// Steps timed per speed measurement, after warm-up steps.
pub const SPEED_STEPS: usize = 5;
pub const SPEED_WARMUP: usize = 2;

/// The run a speed measurement of `variant` at `length` trains for `steps` steps: the
/// suite's model with byte ids, `length` positions and a 2-class mean-pooled head, batch
/// `suite.speed_batch` (also what `formers bench train --arena-variant` measures).
pub fn speed_run(variant: &Variant, suite: &SuiteSpec, length: usize, steps: usize) -> RunConfig {
    let mut train = train_config(suite, steps, length, 0);
    train.batch_size = suite.speed_batch;
    train.eval_every = steps;
    train.eval_batches = 1;
    RunConfig {
        model: configure(variant, suite, 256, length, 2),
        train,
    }
}

fn speed(
    opts: &Options,
    variant: &Variant,
    length: usize,
    events: &mut dyn FnMut(Event),
) -> Result<Record, String> {
    let suite = &opts.suite;
    let steps = SPEED_WARMUP + SPEED_STEPS;
    let run = speed_run(variant, suite, length, steps);
    let data = RandomTokens::for_model(&run.model, length).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::DataDirs;
    use crate::task::Setting;

    fn opts(budget: Budget) -> Options {
        Options {
            suite: SuiteSpec::new(Setting::Lite),
            tasks: vec!["listops".into(), "pathfinder".into()],
            variants: Vec::new(),
            budget,
            seeds: 1,
            shard: (1, 1),
            speed: true,
            data: DataDirs::default(),
        }
    }

    fn run(task: &str) -> Job {
        Job::Run {
            task: task.into(),
            variant: "vanilla".into(),
            seed: 0,
        }
    }

    #[test]
    fn work_grows_with_steps_and_length_and_a_run_outweighs_a_speed_job() {
        let tasks = Tasks::default();
        let (o100, o400) = (opts(Budget::Steps(100)), opts(Budget::Steps(400)));
        let w100 = work(&run("listops"), &o100, &tasks).total;
        let w400 = work(&run("listops"), &o400, &tasks).total;
        // Training dominates: 4x the steps is more than 3x the work, less than 4x.
        assert!(w400 > 3.0 * w100 && w400 < 4.0 * w100, "{w100} {w400}");
        let speed = |length| Job::Speed {
            variant: "vanilla".into(),
            length,
        };
        let (s256, s1024) = (
            work(&speed(256), &o100, &tasks).total,
            work(&speed(1024), &o100, &tasks).total,
        );
        // Positions grow 4x, the per-process overhead does not.
        assert!(s1024 > 1.5 * s256 && s1024 < 4.0 * s256, "{s256} {s1024}");
        assert!(w100 > 10.0 * s256, "{w100} {s256}");
        // A task that cannot be opened here weighs nothing.
        assert_eq!(work(&run("image"), &o100, &tasks).total, 0.0);
        let w = work(&run("listops"), &o100, &tasks);
        assert!(w.training > 0.5 * w.total && w.training < w.total, "{w:?}");
        // With a minutes budget a run weighs its seconds.
        let m = opts(Budget::Minutes(2.0));
        assert_eq!(work(&run("pathfinder"), &m, &tasks).total, 125.0);
        assert!(work(&speed(256), &m, &tasks).total < 5.0);
    }

    #[test]
    fn lite_images_get_2d_rotary_positions_where_the_mixers_take_them() {
        use crate::pathfinder::Pathfinder;
        use crate::variants::{builtin, DEFAULT};
        let all = builtin();
        let by_name = |n: &str| all.iter().find(|v| v.name == n).cloned();
        let lite = SuiteSpec::new(Setting::Lite);
        let pf = Pathfinder::for_task("pathfinder", Setting::Lite, 0).unwrap();
        for name in DEFAULT {
            let v = by_name(name).unwrap();
            let m = configure_task(&v, &lite, &pf);
            assert_eq!(
                m.position,
                PositionSpec::Rope2d {
                    width: 12,
                    base: 10.0
                },
                "{name}"
            );
            assert_eq!(m.init, InitSpec::Torch);
            m.validate().unwrap();
            // A sequence task keeps the learned table.
            let lo = crate::listops::ListOps::new(Setting::Lite, 0);
            assert_eq!(
                configure_task(&v, &lite, &lo).position,
                PositionSpec::Learned
            );
        }
        // A mixer with no queries and keys keeps the table.
        let pool = by_name("poolformer").unwrap();
        assert_eq!(
            configure_task(&pool, &lite, &pf).position,
            PositionSpec::Learned
        );
        // The full suite keeps LRA's 1-D positions.
        let full = SuiteSpec::new(Setting::Full);
        let pf32 = Pathfinder::for_task("pathfinder", Setting::Full, 0).unwrap();
        let v = by_name("vanilla").unwrap();
        assert_eq!(
            configure_task(&v, &full, &pf32).position,
            PositionSpec::Learned
        );
    }
}
