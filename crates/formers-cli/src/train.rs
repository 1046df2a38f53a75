//! `formers train` and `formers eval`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use formers::generate::{generate_sliding, Sampling};
use formers::model::Model;
use formers::tasks;
use formers::train::RunConfig;
use formers::train::{evaluate, load_trained_with, RunRecord};
use formers::train::{RunDir, Start, TrainConfig, Trainer};
use formers_arena::adapter::split_accuracy;
use formers_arena::plan::{load_options, OPTIONS_FILE};
use formers_arena::suite as arena_suite;
use formers_arena::Split;

use crate::generate::trained_window;
use crate::limits::{LoadArgs, MemoryArgs};
use crate::progress::{bar, TrainBar};

/// The shipped character-level LM config, used when `--config` is absent.
const DEFAULT_CONFIG: &str = include_str!("../../../configs/charlm.json");

/// Flags of `formers train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Config file, JSON or TOML, with a `model` and an optional `train` section
    /// [default: the shipped configs/charlm.json, embedded in the binary]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Built-in task: `copy`, `reverse` (token tagging) or `charlm` (next byte of Shakespeare)
    #[arg(long, default_value = "charlm")]
    pub task: String,
    /// Run directory for checkpoints, metrics.jsonl and run.json
    /// [default: runs/<task>, or runs/<task>-2, -3, ... when taken]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (same config and task; the override
    /// flags below are refused if they differ from the run's values)
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// Start a new run in --out even if one is there: its run.json, metrics.jsonl and
    /// checkpoints are deleted first
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Override train.steps
    #[arg(long)]
    pub steps: Option<usize>,
    /// Override train.seed
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override train.lr (peak learning rate)
    #[arg(long)]
    pub lr: Option<f64>,
    /// Override train.batch_size
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Override train.grad_accum (micro-batches per step)
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Override train.checkpoint_every
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Override train.eval_every
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// After training a causal LM, print a sample of this many tokens (0: none; past the
    /// trained window, the window slides)
    #[arg(long, default_value_t = 300)]
    pub sample_tokens: usize,
    /// Prompt of that sample
    #[arg(long, default_value = "HAMLET.\n")]
    pub prompt: String,
    /// No progress output (results are still printed)
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub limits: MemoryArgs,
}

/// Flags of `formers eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Run directory written by `formers train`, or by `formers arena` (ARENA/runs/LABEL)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Held-out batches to evaluate [default: train.eval_batches of the run; an arena run
    /// is scored on its whole test split]
    #[arg(long)]
    pub batches: Option<usize>,
    /// MatFormer models: evaluate every nested layer at this granularity index
    /// [default: each layer's configured `active` one (Mix'n'Match)]
    #[arg(long)]
    pub granularity: Option<usize>,
    #[command(flatten)]
    pub limits: LoadArgs,
}

fn load_config(args: &TrainArgs, out: &Path) -> Result<(RunConfig, String)> {
    if args.resume && args.config.is_none() {
        let rec = RunRecord::load(out)?;
        return Ok((rec.config, rec.task));
    }
    let cfg = match &args.config {
        Some(path) => RunConfig::from_path(path)?,
        None => RunConfig::from_json(DEFAULT_CONFIG).context("the embedded default config")?,
    };
    Ok((cfg, args.task.clone()))
}

/// Applies the override flags; returns a note for the user when `--steps` made the
/// config's warm-up too long and it was capped.
fn apply_overrides(cfg: &mut RunConfig, a: &TrainArgs) -> Result<Option<String>> {
    let t = &mut cfg.train;
    let mut note = None;
    if let Some(v) = a.steps {
        t.steps = v;
        if let Some(was) = t.cap_warmup() {
            note = Some(format!(
                "note: --steps {v}: warm-up capped from {was} to {} steps (a tenth of the run) \
                 so the learning rate decays",
                t.warmup
            ));
        }
    }
    if let Some(v) = a.seed {
        t.seed = v;
    }
    if let Some(v) = a.lr {
        t.lr = v;
    }
    if let Some(v) = a.batch_size {
        t.batch_size = v;
    }
    if let Some(v) = a.grad_accum {
        t.grad_accum = v;
    }
    if let Some(v) = a.checkpoint_every {
        t.checkpoint_every = v;
    }
    if let Some(v) = a.eval_every {
        t.eval_every = v;
    }
    cfg.validate()?;
    Ok(note)
}

/// A resumed run keeps the config it was started with (the learning-rate schedule and the
/// data order depend on it, and the trainer checks it): an override flag that would change
/// it is refused by name rather than dropped.
fn refuse_changes_on_resume(a: &TrainArgs, saved: &TrainConfig, out: &Path) -> Result<()> {
    let given = [
        (
            "steps",
            a.steps.map(|v| v.to_string()),
            saved.steps.to_string(),
        ),
        (
            "seed",
            a.seed.map(|v| v.to_string()),
            saved.seed.to_string(),
        ),
        ("lr", a.lr.map(|v| v.to_string()), saved.lr.to_string()),
        (
            "batch_size",
            a.batch_size.map(|v| v.to_string()),
            saved.batch_size.to_string(),
        ),
        (
            "grad_accum",
            a.grad_accum.map(|v| v.to_string()),
            saved.grad_accum.to_string(),
        ),
        (
            "checkpoint_every",
            a.checkpoint_every.map(|v| v.to_string()),
            saved.checkpoint_every.to_string(),
        ),
        (
            "eval_every",
            a.eval_every.map(|v| v.to_string()),
            saved.eval_every.to_string(),
        ),
    ];
    for (key, flag, was) in given {
        if let Some(v) = flag.filter(|v| *v != was) {
            anyhow::bail!(
                "--{} {v}: the run in {} was started with train.{key} = {was}, and a resumed run \
                 keeps its config; resume without --{0}, or start a new run in another --out",
                key.replace('_', "-"),
                out.display()
            );
        }
    }
    Ok(())
}

fn free_run_dir(task: &str) -> PathBuf {
    let base = PathBuf::from("runs");
    let first = base.join(task);
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|i| base.join(format!("{task}-{i}")))
        .find(|p| !p.exists())
        .expect("some free name")
}

/// Runs `formers train`.
pub fn run(args: TrainArgs) -> Result<()> {
    if !tasks::TASKS.contains(&args.task.as_str()) {
        anyhow::bail!(
            "unknown task `{}`; expected one of {}",
            args.task,
            tasks::TASKS.join(", ")
        );
    }
    let out = args.out.clone().unwrap_or_else(|| free_run_dir(&args.task));
    if args.resume {
        if let Ok(saved) = RunRecord::load(&out) {
            refuse_changes_on_resume(&args, &saved.config.train, &out)?;
        }
    }
    let (mut cfg, task) = load_config(&args, &out)?;
    let note = apply_overrides(&mut cfg, &args)?;
    let pb = bar(cfg.train.steps as u64, "train");
    if args.quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut obs = TrainBar {
        pb,
        quiet: args.quiet,
    };
    let start = match (args.resume, args.force) {
        (true, _) => Start::Resume,
        (false, true) => Start::Replace,
        (false, false) => Start::New,
    };
    // The run directory is checked (and a resume restored) before anything is printed.
    let task_impl = tasks::by_name(&task, &cfg.model, &cfg.train)?;
    let limits = args.limits.limits();
    let mut trainer = Trainer::with_limits(&cfg, task_impl.as_ref(), &limits)?;
    let mut dir = RunDir::open(&out, &mut trainer, start)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    eprintln!("training `{task}` into {}", out.display());
    let summary = dir.train(&mut trainer, &mut obs)?;
    obs.pb.finish_and_clear();
    println!(
        "done: {} steps, {} parameters, final train loss {:.4}, eval loss {:.4}, eval accuracy {:.2}%, {:.0} tokens/s",
        summary.steps,
        summary.params,
        summary.final_loss,
        summary.eval.loss,
        summary.eval.accuracy * 100.0,
        summary.tokens_per_s
    );
    println!("checkpoint: {}", summary.checkpoint.display());
    if args.sample_tokens > 0 && cfg.model.is_causal() && task == "charlm" {
        let (_, model) = load_trained_with(&out, &limits)?;
        let prompt: Vec<u32> = args.prompt.bytes().map(u32::from).collect();
        let window = trained_window(cfg.model.max_len, Some(cfg.train.seq_len));
        // nanoGPT's temperature, and the run's seed: the same run prints the same sample.
        let sampling = Sampling {
            temperature: 0.8,
            top_k: Some(40),
            seed: cfg.train.seed,
            ..Sampling::default()
        };
        let new = generate_sliding(
            &model,
            &prompt,
            args.sample_tokens,
            window,
            &sampling,
            true,
            |_| true,
        )?;
        let text: Vec<u8> = new.iter().map(|&t| t as u8).collect();
        println!("sample:\n{}{}", args.prompt, String::from_utf8_lossy(&text));
    }
    Ok(())
}

/// Runs `formers eval`.
pub fn eval(args: EvalArgs) -> Result<()> {
    if args.model.join(OPTIONS_FILE).is_file() {
        anyhow::bail!(
            "{0} is an arena directory, not a run: pass one of its runs (--model {0}/runs/LABEL), \
             or read every run's score in {0}/{1}",
            args.model.display(),
            formers_arena::results::FILE
        );
    }
    let (rec, model) = load_trained_with(&args.model, &args.limits.limits())?;
    if let Some(g) = args.granularity {
        if g >= model.granularities() {
            anyhow::bail!(
                "--granularity {g}: the model has {} granularities",
                model.granularities()
            );
        }
        model.set_granularity(Some(g));
    }
    if !tasks::TASKS.contains(&rec.task.as_str()) {
        return eval_arena_run(&args, &rec, &model);
    }
    let tc = &rec.config.train;
    let task = tasks::by_name(&rec.task, &rec.config.model, tc)?;
    let batches = args.batches.unwrap_or(tc.eval_batches);
    let e = evaluate(&model, task.as_ref(), tc.seed, batches, tc.batch_size)?;
    println!(
        "{}",
        serde_json::json!({"task": rec.task, "batches": batches, "granularity": args.granularity, "loss": e.loss, "accuracy": e.accuracy})
    );
    Ok(())
}

/// `formers eval` of a run `formers arena` trained (`ARENA/runs/LABEL`): accuracy on the
/// task's whole test split, scored as the arena scores it (its `test_accuracy`).
fn eval_arena_run(args: &EvalArgs, rec: &RunRecord, model: &Model) -> Result<()> {
    let name = rec.task.as_str();
    let dir = args.model.display();
    if !arena_suite::TASKS.contains(&name) {
        anyhow::bail!(
            "{dir}: task `{name}` is neither a built-in task ({}) nor an arena task ({})",
            tasks::TASKS.join(", "),
            arena_suite::TASKS.join(", ")
        );
    }
    let arena = args.model.parent().and_then(Path::parent);
    let opts = arena.and_then(load_options).ok_or_else(|| {
        anyhow::anyhow!(
            "{dir}: a run of `formers arena` (task `{name}`, a classification task); eval reads \
             the task's settings from {OPTIONS_FILE} of its arena directory, two levels up \
             (ARENA/runs/LABEL), and finds none there. Evaluate the run inside its arena \
             directory, or read its test accuracy in ARENA/{} (`formers arena report ARENA` \
             prints the tables)",
            formers_arena::results::FILE
        )
    })?;
    if args.batches.is_some() {
        anyhow::bail!(
            "--batches: an arena run is scored on its whole test split, as `formers arena` \
             scores it; leave --batches out"
        );
    }
    let task = arena_suite::open_task(name, opts.suite.setting, &opts.data)
        .map_err(|e| anyhow::anyhow!("task `{name}`: {e}"))?;
    let score = split_accuracy(
        model,
        task.as_ref(),
        Split::Test,
        opts.suite.batch_size,
        |_, _| {},
    )?;
    println!(
        "{}",
        serde_json::json!({"task": name, "split": "test", "examples": score.examples, "granularity": args.granularity, "accuracy": score.accuracy})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn overridden(flags: &[&str]) -> (RunConfig, Option<String>) {
        let args = Cli::try_parse_from(std::iter::once("train").chain(flags.iter().copied()))
            .unwrap()
            .train;
        let mut cfg = RunConfig::from_json(DEFAULT_CONFIG).unwrap();
        let note = apply_overrides(&mut cfg, &args).unwrap();
        (cfg, note)
    }

    #[test]
    fn steps_override_caps_the_warm_up_with_a_note() {
        let (cfg, note) = overridden(&[]);
        assert!(cfg.train.warmup >= 50 && note.is_none());
        let (cfg, note) = overridden(&["--steps", "50"]);
        assert_eq!((cfg.train.steps, cfg.train.warmup), (50, 5));
        let note = note.expect("a note");
        assert!(
            note.contains("warm-up capped") && note.contains("to 5"),
            "{note}"
        );
        let (cfg, note) = overridden(&["--steps", "5000"]);
        assert!(cfg.train.warmup >= 50 && note.is_none());
    }
}
