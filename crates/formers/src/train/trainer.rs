//! The training loop: seeded, deterministic, resumable, stops on a non-finite loss.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use super::optimizer::{clip_global_norm, AdamW};
use super::schedule::lr_at;
use crate::config::RunConfig;
use crate::loss::{accuracy, cross_entropy};
use crate::model::{Model, DTYPE};
use crate::params::Params;
use crate::rng::Rng;
use crate::tasks::{self, Batch, Task};
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

/// Progress reports from the loop (the CLI draws a progress bar from them).
pub trait Observer {
    /// After each optimizer step (1-based `step`).
    fn on_step(&mut self, _step: &StepReport) {}
    /// After each evaluation.
    fn on_eval(&mut self, _step: usize, _eval: &EvalReport) {}
}

/// One optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub total: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    /// Training tokens per second since the run (or resume) started.
    pub tokens_per_s: f64,
}

/// One evaluation over held-out batches.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct EvalReport {
    pub loss: f32,
    pub accuracy: f64,
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

const EVAL_STREAM: u64 = 0xE7A1;
const DATA_STREAM: u64 = 1;
const DROPOUT_STREAM: u64 = 2;

/// Trains `run.model` on task `task` into run directory `out`. With `resume`, continues
/// from the checkpoint there; without, refuses to touch a directory that has one.
pub fn train(
    run: &RunConfig,
    task_name: &str,
    out: &Path,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    run.validate()?;
    let task = tasks::by_name(task_name, &run.model, &run.train)?;
    train_task(run, task.as_ref(), out, resume, obs)
}

/// Like [`train`], on any [`Task`] (its name is what `run.json` records). A MatFormer
/// model trains one granularity per step, round-robin (`train.matformer_all`: the sum of
/// all granularities' losses every step).
pub fn train_task(
    run: &RunConfig,
    task: &dyn Task,
    out: &Path,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<Summary> {
    run.validate()?;
    let tc = &run.train;
    let task_name = task.name();
    let existing = checkpoint::locate(out);
    let record = RunRecord {
        task: task_name.to_string(),
        config: run.clone(),
    };
    let params = Params::new(tc.seed, DTYPE, &Device::Cpu);
    let model = Model::new(&run.model, &params)?;
    // Evaluation runs the inference form of the same weights (a frozen view sharing their
    // storage): no autodiff graph, forward-only kernels.
    let infer = Model::new(&run.model, &params.frozen())?;
    let vars = params.vars();
    let mut opt = AdamW::new(tc.beta1, tc.beta2, tc.eps, tc.weight_decay);
    let mut seeds = Rng::new(tc.seed);
    let mut state = TrainState {
        step: 0,
        data_rng: seeds.fork(DATA_STREAM),
        dropout_rng: seeds.fork(DROPOUT_STREAM),
        adam_t: 0,
        task: task_name.to_string(),
    };
    match (resume, existing) {
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
            let saved = RunRecord::load(out)?;
            if saved != record {
                return Err(Error::Checkpoint {
                    path: out.join(RunRecord::FILE),
                    msg:
                        "the run was started with another config or task; resume with the same ones"
                            .into(),
                });
            }
            let checkpoint::Loaded {
                weights,
                moments,
                state: st,
            } = checkpoint::load(out)?;
            params.assign(
                &weights,
                &out.join(checkpoint::DIR).join("model.safetensors"),
            )?;
            opt.restore(moments, st.adam_t);
            state = st;
            truncate_metrics(out, state.step)?;
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
    let mut metrics = Metrics::open(out)?;
    let start = Instant::now();
    let mut tokens = 0usize;
    let mut last_loss = f32::NAN;
    let mut last_eval = None;
    let mut saved_step = state.step;
    let mut last_ckpt = out.join(checkpoint::DIR);
    while state.step < tc.steps {
        let lr = lr_at(state.step, tc.steps, tc.lr, tc.warmup, tc.min_lr_ratio);
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f32;
        for _ in 0..tc.grad_accum {
            let batch = task.train_batch(&mut state.data_rng, tc.batch_size)?;
            tokens += batch.tokens;
            let mut loss: Option<Tensor> = None;
            for g in granularity_schedule(model.granularities(), state.step, tc.matformer_all) {
                model.set_granularity(g);
                let logits = model.forward(
                    &batch.inputs,
                    batch.mask.as_ref(),
                    Some(&mut state.dropout_rng),
                )?;
                let l = cross_entropy(&logits, &batch.targets, batch.weights.as_ref())?;
                loss = Some(match loss {
                    Some(prev) => (prev + l)?,
                    None => l,
                });
            }
            model.set_granularity(None);
            let loss = loss.expect("at least one granularity");
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                let kept = if saved_step > 0 {
                    format!(
                        "last good checkpoint (step {saved_step}) kept at {}",
                        last_ckpt.display()
                    )
                } else {
                    "no checkpoint was written yet".to_string()
                };
                return Err(Error::NonFinite {
                    step: state.step + 1,
                    loss: value,
                    kept,
                });
            }
            loss_sum += value;
            let g = loss.backward()?;
            for (name, var) in &vars {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let acc = match grads.remove(name) {
                        Some(prev) => (prev + gv)?,
                        None => gv.clone(),
                    };
                    grads.insert(name.clone(), acc);
                }
            }
        }
        if tc.grad_accum > 1 {
            for g in grads.values_mut() {
                *g = (&*g / tc.grad_accum as f64)?;
            }
        }
        let grad_norm = clip_global_norm(&mut grads, tc.clip_norm)?;
        opt.step(&vars, &grads, lr)?;
        state.step += 1;
        state.adam_t = opt.t;
        last_loss = loss_sum / tc.grad_accum as f32;
        let report = StepReport {
            step: state.step,
            total: tc.steps,
            loss: last_loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64().max(1e-9),
        };
        metrics.write(&serde_json::json!({"step": state.step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm}))?;
        obs.on_step(&report);
        let last = state.step == tc.steps;
        if state.step.is_multiple_of(tc.eval_every) || last {
            let e = evaluate(&infer, task, tc.seed, tc.eval_batches, tc.batch_size)?;
            metrics.write(&serde_json::json!({"step": state.step, "eval_loss": e.loss, "eval_accuracy": e.accuracy}))?;
            obs.on_eval(state.step, &e);
            last_eval = Some(e);
        }
        if state.step.is_multiple_of(tc.checkpoint_every) || last {
            last_ckpt = checkpoint::save(out, &params.tensors(), &opt.moments(), &state)?;
            saved_step = state.step;
        }
    }
    let eval = match last_eval {
        Some(e) => e,
        None => evaluate(&infer, task, tc.seed, tc.eval_batches, tc.batch_size)?,
    };
    Ok(Summary {
        steps: state.step,
        final_loss: last_loss,
        eval,
        tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64().max(1e-9),
        checkpoint: last_ckpt,
        params: params.count(),
    })
}

/// The granularities a MatFormer step trains: `None` (the configured model) when nothing
/// is nested, else one per step round-robin, or all of them.
fn granularity_schedule(n: usize, step: usize, all: bool) -> Vec<Option<usize>> {
    match (n, all) {
        (0 | 1, _) => vec![None],
        (n, true) => (0..n).map(Some).collect(),
        (n, false) => vec![Some(step % n)],
    }
}

/// Mean loss and token accuracy over `batches` held-out batches; the same batches every
/// call for a given seed.
pub fn evaluate(
    model: &Model,
    task: &dyn Task,
    seed: u64,
    batches: usize,
    batch_size: usize,
) -> Result<EvalReport> {
    let mut rng = Rng::new(seed ^ EVAL_STREAM);
    let (mut loss, mut correct, mut counted) = (0f64, 0usize, 0usize);
    for _ in 0..batches {
        let Batch {
            inputs,
            targets,
            weights,
            mask,
            ..
        } = task.eval_batch(&mut rng, batch_size)?;
        let logits = model.forward(&inputs, mask.as_ref(), None)?.detach();
        loss += cross_entropy(&logits, &targets, weights.as_ref())?.to_scalar::<f32>()? as f64;
        let (c, n) = accuracy(&logits, &targets, weights.as_ref())?;
        correct += c;
        counted += n;
    }
    Ok(EvalReport {
        loss: (loss / batches as f64) as f32,
        accuracy: correct as f64 / counted.max(1) as f64,
    })
}

/// A model with the weights of run `out`'s checkpoint, for inference.
pub fn load_trained(out: &Path) -> Result<(RunRecord, Model)> {
    let record = RunRecord::load(out)?;
    let dir = checkpoint::locate(out).ok_or_else(|| Error::Checkpoint {
        path: out.join(checkpoint::DIR),
        msg: "no checkpoint here; train first".into(),
    })?;
    let weights_path = dir.join("model.safetensors");
    let weights = checkpoint::read_tensors(&weights_path)?;
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
