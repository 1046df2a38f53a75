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
use crate::config::RunConfig;
use crate::limits::Limits;
use crate::model::{Model, DTYPE};
use crate::params::Params;
use crate::tasks::{self, Task};
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
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
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

/// Trains `run.model` on task `task` into run directory `out`. With `resume`, continues
/// from the checkpoint there; without, refuses to touch a directory that has one. Within
/// the default [`Limits`] (the machine's memory).
pub fn train(
    run: &RunConfig,
    task_name: &str,
    out: &Path,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    train_with(run, task_name, out, resume, &Limits::default(), obs)
}

/// Like [`train`], refusing a run that would need more than `limits.max_memory`.
pub fn train_with(
    run: &RunConfig,
    task_name: &str,
    out: &Path,
    resume: bool,
    limits: &Limits,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    run.validate()?;
    limits.check_training(run)?;
    let task = tasks::by_name(task_name, &run.model, &run.train)?;
    train_task(run, task.as_ref(), out, resume, limits, obs)
}

/// Like [`train_with`], on any [`Task`] (its name is what `run.json` records).
pub fn train_task(
    run: &RunConfig,
    task: &dyn Task,
    out: &Path,
    resume: bool,
    limits: &Limits,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    let mut trainer = Trainer::with_limits(run, task, limits)?;
    let mut dir = RunDir::open(out, &mut trainer, resume)?;
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
    /// Starts run directory `out` for `trainer`, refusing one that holds a run; with
    /// `resume`, restores `trainer` from the checkpoint there instead (same config and task).
    pub fn open(out: &Path, trainer: &mut Trainer, resume: bool) -> Result<RunDir> {
        let record = RunRecord {
            task: trainer.task().name().to_string(),
            config: trainer.config().clone(),
        };
        let mut saved = None;
        match (resume, checkpoint::locate(out)) {
            (false, Some(dir)) => {
                return Err(Error::Checkpoint {
                    path: dir,
                    msg: "a run exists here; pass --resume to continue it or choose another --out"
                        .into(),
                })
            }
            (true, None) => {
                return Err(Error::Checkpoint {
                    path: out.join(checkpoint::DIR),
                    msg: "nothing to resume: no checkpoint found".into(),
                })
            }
            (true, Some(_)) => {
                if RunRecord::load(out)? != record {
                    return Err(Error::Checkpoint {
                        path: out.join(RunRecord::FILE),
                        msg: "the run was started with another config or task; resume with the same ones"
                            .into(),
                    });
                }
                let loaded = checkpoint::load(out)?;
                let dir = out.join(checkpoint::DIR);
                let finite = Limits::default();
                finite.check_tensors(&loaded.weights, &dir.join("model.safetensors"))?;
                finite.check_tensors(&loaded.moments, &dir.join("optimizer.safetensors"))?;
                trainer.restore(loaded, &out.join(checkpoint::DIR).join("model.safetensors"))?;
                truncate_metrics(out, trainer.steps_done())?;
                saved = Some((trainer.steps_done(), out.join(checkpoint::DIR)));
            }
            (false, None) => {
                fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
                let path = out.join(RunRecord::FILE);
                let json = serde_json::to_string_pretty(&record).expect("record serialises");
                fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
                let metrics = out.join(METRICS);
                fs::write(&metrics, "").map_err(|e| Error::io(&metrics, e))?;
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

struct Metrics {
    file: fs::File,
    path: PathBuf,
}

impl Metrics {
    fn open(out: &Path) -> Result<Self> {
        let path = out.join(METRICS);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Metrics { file, path })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))
    }
}

/// Drops metric lines after `step` (written after the checkpoint a resume starts from).
fn truncate_metrics(out: &Path, step: usize) -> Result<()> {
    let path = out.join(METRICS);
    let text = fs::read_to_string(&path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&path, kept).map_err(|e| Error::io(&path, e))
}
