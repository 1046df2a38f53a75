//! The run directory on top of the [`Trainer`]: `run.json` (how the run was made),
//! `metrics.jsonl` (one line per step and evaluation) and atomic checkpoints, so a killed
//! run resumes to the same weights bit for bit.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::trainer::{EvalReport, Observer, Trainer};
use crate::fsio;
use crate::limits::Limits;
use crate::model::{Model, DTYPE};
use crate::params::Params;
use crate::tasks;
use crate::train::config::RunConfig;
use crate::train::task::Task;
use crate::{Error, Result};

/// What a run directory records about how it was made (`run.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    /// The task trained on.
    pub task: String,
    /// The full configuration.
    pub config: RunConfig,
}

impl RunRecord {
    /// File name inside a run directory.
    pub const FILE: &'static str = "run.json";

    /// Reads `run.json` of run `out`.
    pub fn load(out: &Path) -> Result<Self> {
        let path = out.join(Self::FILE);
        let text = fsio::read_text_limited(&path, fsio::MAX_CONFIG_BYTES, "a run record")?;
        let rec: RunRecord = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            msg: format!("unreadable run record: {e}"),
        })?;
        rec.config.validate()?;
        Ok(rec)
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f32,
    pub eval: EvalReport,
    pub tokens_per_s: f64,
    pub checkpoint: PathBuf,
    pub params: usize,
}

/// How [`RunDir::open`] treats what is already in the run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run: a directory that holds (part of) a run is refused.
    New,
    /// Continue the checkpoint there (same config and task, checked).
    Resume,
    /// A new run that first deletes the run files there (`--force`).
    Replace,
}

/// Trains `run.model` on task `task` into run directory `out`, starting as `start` says,
/// within the default [`Limits`] (the machine's memory).
pub fn train(
    run: &RunConfig,
    task_name: &str,
    out: &Path,
    start: Start,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    train_with(run, task_name, out, start, &Limits::default(), obs)
}

/// Like [`train`], refusing a run that would need more than `limits.max_memory`.
pub fn train_with(
    run: &RunConfig,
    task_name: &str,
    out: &Path,
    start: Start,
    limits: &Limits,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    run.validate()?;
    limits.check_training(run)?;
    let task = tasks::by_name(task_name, &run.model, &run.train)?;
    train_task(run, task.as_ref(), out, start, limits, obs)
}

/// Like [`train_with`], on any [`Task`] (its name is what `run.json` records).
pub fn train_task(
    run: &RunConfig,
    task: &dyn Task,
    out: &Path,
    start: Start,
    limits: &Limits,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    let mut trainer = Trainer::with_limits(run, task, limits)?;
    let mut dir = RunDir::open(out, &mut trainer, start)?;
    dir.train(&mut trainer, obs)
}

/// A run directory being written by one [`Trainer`].
pub struct RunDir {
    out: PathBuf,
    metrics: Metrics,
    /// Step and place of the last checkpoint written.
    saved: Option<(usize, PathBuf)>,
}

impl RunDir {
    /// Starts run directory `out` for `trainer`, refusing one that holds a run
    /// ([`Start::New`]) or deleting its run files first ([`Start::Replace`]); with
    /// [`Start::Resume`], restores `trainer` from the checkpoint there instead (same config
    /// and task, the checkpoint checked against them). The files written are created new,
    /// never through a symbolic link.
    pub fn open(out: &Path, trainer: &mut Trainer, start: Start) -> Result<RunDir> {
        let record = RunRecord {
            task: trainer.task().name().to_string(),
            config: trainer.config().clone(),
        };
        if start == Start::Replace {
            remove_run_files(out)?;
        }
        let mut saved = None;
        match (start, checkpoint::locate(out)) {
            (Start::Resume, None) => {
                return Err(Error::Checkpoint {
                    path: out.join(checkpoint::DIR),
                    msg: "nothing to resume: no checkpoint found".into(),
                })
            }
            (Start::Resume, Some(_)) => {
                if RunRecord::load(out)? != record {
                    return Err(Error::Checkpoint {
                        path: out.join(RunRecord::FILE),
                        msg: "the run was started with another config or task; resume with the same ones"
                            .into(),
                    });
                }
                let loaded = checkpoint::load(out)?;
                let dir = loaded.dir.clone();
                let finite = Limits::default();
                finite.check_tensors(&loaded.weights, &dir.join(checkpoint::MODEL_FILE))?;
                trainer.restore(loaded)?;
                truncate_metrics(out, trainer.steps_done())?;
                saved = Some((trainer.steps_done(), dir));
            }
            (_, Some(dir)) => {
                return Err(Error::Checkpoint {
                    path: dir,
                    msg: "a run exists here; pass --resume to continue it, --force to replace it, or choose another --out"
                        .into(),
                })
            }
            (_, None) => {
                if let Some(f) = RUN_FILES.iter().map(|f| out.join(f)).find(|p| fsio::exists(p)) {
                    return Err(Error::Checkpoint {
                        path: f,
                        msg: "exists: a run was started here (with no checkpoint yet); pass --force to replace it or choose another --out".into(),
                    });
                }
                fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
                let path = out.join(RunRecord::FILE);
                let json = serde_json::to_string_pretty(&record).expect("record serialises");
                let mut file = fsio::create_new(&path)?;
                file.write_all(json.as_bytes())
                    .map_err(|e| Error::io(&path, e))?;
                fsio::create_new(&out.join(METRICS))?;
            }
        }
        Ok(RunDir {
            out: out.to_path_buf(),
            metrics: Metrics::open(out)?,
            saved,
        })
    }

    /// Trains to the end: each step and evaluation logged, checkpoints every
    /// `checkpoint_every` steps and at the end; reports to `obs`.
    pub fn train(&mut self, trainer: &mut Trainer, obs: &mut dyn Observer) -> Result<Summary> {
        let tc = trainer.config().train.clone();
        let mut last_loss = f32::NAN;
        let mut last_eval = None;
        while !trainer.is_done() {
            let report = trainer.step().map_err(|e| self.explain(e))?;
            last_loss = report.loss;
            self.metrics.write(&serde_json::json!({"step": report.step, "loss": report.loss, "lr": report.lr, "grad_norm": report.grad_norm}))?;
            obs.on_step(&report);
            let step = report.step;
            if trainer.eval_due() {
                let e = trainer.evaluate()?;
                self.metrics.write(&serde_json::json!({"step": step, "eval_loss": e.loss, "eval_accuracy": e.accuracy}))?;
                obs.on_eval(step, &e);
                last_eval = Some(e);
            }
            if step.is_multiple_of(tc.checkpoint_every) || trainer.is_done() {
                self.saved = Some((step, trainer.save(&self.out)?));
            }
        }
        let eval = match last_eval {
            Some(e) => e,
            None => trainer.evaluate()?,
        };
        Ok(Summary {
            steps: trainer.steps_done(),
            final_loss: last_loss,
            eval,
            tokens_per_s: trainer.tokens_per_s(),
            checkpoint: match &self.saved {
                Some((_, dir)) => dir.clone(),
                None => self.out.join(checkpoint::DIR),
            },
            params: trainer.param_count(),
        })
    }

    /// A non-finite loss says which checkpoint is kept.
    fn explain(&self, e: Error) -> Error {
        match e {
            Error::NonFinite { step, loss, .. } => Error::NonFinite {
                step,
                loss,
                kept: match &self.saved {
                    Some((s, dir)) => {
                        format!("last good checkpoint (step {s}) kept at {}", dir.display())
                    }
                    None => "no checkpoint was written yet".to_string(),
                },
            },
            e => e,
        }
    }
}

/// A model with the weights of run `out`'s checkpoint, for inference, within the default
/// [`Limits`].
pub fn load_trained(out: &Path) -> Result<(RunRecord, Model)> {
    load_trained_with(out, &Limits::default())
}

/// Like [`load_trained`]: the config is refused before anything is read if its model
/// would need more than `limits.max_memory`, and the weights unless they are finite
/// (or `limits.allow_non_finite`) and exactly as many as the config's parameters.
pub fn load_trained_with(out: &Path, limits: &Limits) -> Result<(RunRecord, Model)> {
    let record = RunRecord::load(out)?;
    limits.check_inference(&record.config.model)?;
    let dir = checkpoint::locate(out).ok_or_else(|| Error::Checkpoint {
        path: out.join(checkpoint::DIR),
        msg: "no checkpoint here; train first".into(),
    })?;
    let weights_path = dir.join("model.safetensors");
    let weights = checkpoint::read_tensors(&weights_path)?;
    let stored: u128 = weights.values().map(|t| t.elem_count() as u128).sum();
    let wanted = crate::limits::param_count(&record.config.model);
    if stored != wanted {
        return Err(Error::Checkpoint {
            path: weights_path,
            msg: format!(
                "holds {stored} values, but the model of {} has {wanted} parameters",
                out.join(RunRecord::FILE).display()
            ),
        });
    }
    limits.check_tensors(&weights, &weights_path)?;
    let params = Params::new(record.config.train.seed, DTYPE, &Device::Cpu);
    let model = Model::new(&record.config.model, &params.frozen())?;
    params.assign(&weights, &weights_path)?;
    Ok((record, model))
}

const METRICS: &str = "metrics.jsonl";

/// The files and directories of a run, as [`Start::Replace`] deletes them.
const RUN_FILES: [&str; 5] = [
    RunRecord::FILE,
    METRICS,
    checkpoint::DIR,
    "checkpoint.old",
    "checkpoint.tmp",
];

/// Deletes the run files in `out` (a symbolic link is removed, not what it points to).
fn remove_run_files(out: &Path) -> Result<()> {
    for p in RUN_FILES.iter().map(|f| out.join(f)) {
        let removed = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

struct Metrics {
    file: fs::File,
    path: PathBuf,
}

impl Metrics {
    fn open(out: &Path) -> Result<Self> {
        let path = out.join(METRICS);
        let file = fsio::append_nofollow(&path)?;
        Ok(Metrics { file, path })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))
    }
}

/// Drops metric lines after `step` (written after the checkpoint a resume starts from),
/// streaming the file and replacing it in one rename.
fn truncate_metrics(out: &Path, step: usize) -> Result<()> {
    let path = out.join(METRICS);
    let mut kept = String::new();
    if fsio::exists(&path) {
        for line in fsio::lines(&path, fsio::MAX_LINE_BYTES)? {
            let line = line?;
            let at = serde_json::from_str::<serde_json::Value>(&line.text)
                .ok()
                .and_then(|v| v["step"].as_u64());
            if line.complete && at.is_some_and(|s| s <= step as u64) {
                kept.push_str(&line.text);
                kept.push('\n');
            }
        }
    }
    fsio::write_atomic(&path, kept.as_bytes(), true)
}
