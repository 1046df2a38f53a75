//! The trainer: a model, its AdamW state and its data and dropout generators, advanced one
//! optimizer step at a time; seeded and deterministic, it stops on a non-finite loss. Files
//! (metrics, checkpoints, resume) are the run directory's business: [`super::run`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use super::checkpoint::{self, TrainState};
use super::optimizer::AdamW;
use super::schedule::lr_at;
use crate::limits::Limits;
use crate::loss::{accuracy, cross_entropy};
use crate::model::{Model, DTYPE};
use crate::params::Params;
use crate::rng::Rng;
use crate::train::config::RunConfig;
use crate::train::task::{Batch, Task};
use crate::{Error, Result};

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

const EVAL_STREAM: u64 = 0xE7A1;
const DATA_STREAM: u64 = 1;
const DROPOUT_STREAM: u64 = 2;

/// Trains a model of `run.model` on one task, in memory: [`Trainer::step`] takes one
/// optimizer step, [`Trainer::evaluate`] scores held-out batches, [`Trainer::model`] is the
/// model. A MatFormer model trains one granularity per step, round-robin
/// (`train.matformer_all`: the mean of all granularities' losses every step).
pub struct Trainer<'t> {
    run: RunConfig,
    task: &'t dyn Task,
    params: Params,
    model: Model,
    /// The same weights built for inference (a frozen view sharing their storage).
    infer: Model,
    vars: Vec<(String, Var)>,
    opt: AdamW,
    state: TrainState,
    tokens: usize,
    started: Option<Instant>,
}

impl<'t> Trainer<'t> {
    /// A fresh model initialised from `run.train.seed`, at step 0, within the default
    /// [`Limits`] (the machine's memory).
    pub fn new(run: &RunConfig, task: &'t dyn Task) -> Result<Self> {
        Self::with_limits(run, task, &Limits::default())
    }

    /// Like [`Trainer::new`]; a run whose training step would need more than
    /// `limits.max_memory` is refused before any tensor exists.
    pub fn with_limits(run: &RunConfig, task: &'t dyn Task, limits: &Limits) -> Result<Self> {
        run.validate()?;
        limits.check_training(run)?;
        let tc = &run.train;
        let params = Params::new(tc.seed, DTYPE, &Device::Cpu);
        let model = Model::new(&run.model, &params)?;
        let (weights, nested) = (tc.matformer_weights.len(), model.granularities());
        if weights > 0 && weights != nested {
            return Err(Error::config(
                "train.matformer_weights",
                format!("{weights} weights for a model with {nested} granularities"),
            ));
        }
        let infer = Model::new(&run.model, &params.frozen())?;
        let vars = params.vars();
        let opt = AdamW::new(tc.beta1, tc.beta2, tc.eps, tc.weight_decay);
        let mut seeds = Rng::new(tc.seed);
        let state = TrainState {
            step: 0,
            data_rng: seeds.fork(DATA_STREAM),
            dropout_rng: seeds.fork(DROPOUT_STREAM),
            adam_t: 0,
            task: task.name().to_string(),
        };
        Ok(Trainer {
            run: run.clone(),
            task,
            params,
            model,
            infer,
            vars,
            opt,
            state,
            tokens: 0,
            started: None,
        })
    }

    /// Continues from a checkpoint: weights, moments and state, after checking it fits
    /// this run ([`checkpoint::Loaded::check`]: step, optimizer count, task, every moment).
    pub fn restore(&mut self, loaded: checkpoint::Loaded) -> Result<()> {
        let params = self.params.tensors();
        loaded.check(self.run.train.steps, self.task.name(), &params)?;
        let source = loaded.dir.join(checkpoint::MODEL_FILE);
        self.params.assign(&loaded.weights, &source)?;
        self.opt.restore(loaded.moments, loaded.state.adam_t);
        self.state = loaded.state;
        Ok(())
    }

    /// Writes a checkpoint of the current step into run directory `out`.
    pub fn save(&self, out: &Path) -> Result<PathBuf> {
        checkpoint::save(
            out,
            &self.params.tensors(),
            &self.opt.moments(),
            &self.state,
        )
    }

    /// The configuration trained.
    pub fn config(&self) -> &RunConfig {
        &self.run
    }

    /// The task trained on.
    pub fn task(&self) -> &'t dyn Task {
        self.task
    }

    /// The model being trained (its forward passes build an autodiff graph).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The same weights for inference: no autodiff graph, intermediates freed as it goes,
    /// forward-only kernels. Shares storage with [`Trainer::model`], so it is always current.
    pub fn inference_model(&self) -> &Model {
        &self.infer
    }

    /// Step, data position and generators.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> usize {
        self.state.step
    }

    /// Whether every configured step is done.
    pub fn is_done(&self) -> bool {
        self.state.step >= self.run.train.steps
    }

    /// Number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.params.count()
    }

    /// Whether the step just taken is one to evaluate after (every `eval_every`, and the last).
    pub fn eval_due(&self) -> bool {
        self.state.step.is_multiple_of(self.run.train.eval_every) || self.is_done()
    }

    /// Training tokens per second since the first step of this trainer.
    pub fn tokens_per_s(&self) -> f64 {
        let secs = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.tokens as f64 / secs.max(1e-9)
    }

    /// One optimizer step (with `grad_accum` micro-batches).
    pub fn step(&mut self) -> Result<StepReport> {
        let start = *self.started.get_or_insert_with(Instant::now);
        let tc = &self.run.train;
        let state = &mut self.state;
        let lr = lr_at(state.step, tc.steps, tc.lr, tc.warmup, tc.min_lr_ratio);
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f32;
        for micro in 0..tc.grad_accum {
            let number = (state.step * tc.grad_accum + micro) as u64;
            let batch =
                self.task
                    .train_batch_numbered(number, &mut state.data_rng, tc.batch_size)?;
            self.tokens += batch.tokens;
            let mut loss: Option<Tensor> = None;
            let schedule =
                granularity_schedule(self.model.granularities(), state.step, tc.matformer_all);
            let count = schedule.len();
            // Each granularity's share of the joint loss (the mean unless weighted).
            let total: f64 = tc.matformer_weights.iter().sum();
            let share = |g: Option<usize>| match (g, count > 1) {
                (Some(g), true) if total > 0.0 => tc.matformer_weights[g] / total,
                (_, true) => 1.0 / count as f64,
                (_, false) => 1.0,
            };
            for g in schedule {
                self.model.set_granularity(g);
                let logits = self.model.forward(
                    &batch.inputs,
                    batch.mask.as_ref(),
                    Some(&mut state.dropout_rng),
                )?;
                let l =
                    (cross_entropy(&logits, &batch.targets, batch.weights.as_ref())? * share(g))?;
                loss = Some(match loss {
                    Some(prev) => (prev + l)?,
                    None => l,
                });
            }
            self.model.set_granularity(None);
            // A weighted mean over granularities: gradient norms, clipping and the reported
            // loss stay on the scale of one model's.
            let loss = loss.expect("at least one granularity");
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    step: state.step + 1,
                    loss: value,
                    kept: format!("the weights of step {} are kept", state.step),
                });
            }
            loss_sum += value;
            let g = loss.backward()?;
            for (name, var) in &self.vars {
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
        let grad_norm = self
            .opt
            .step_clipped(&self.vars, &grads, lr, tc.clip_norm)?;
        state.step += 1;
        state.adam_t = self.opt.t;
        Ok(StepReport {
            step: state.step,
            total: tc.steps,
            loss: loss_sum / tc.grad_accum as f32,
            lr,
            grad_norm,
            tokens_per_s: self.tokens as f64 / start.elapsed().as_secs_f64().max(1e-9),
        })
    }

    /// Mean loss and accuracy over `eval_batches` held-out batches (the same every call).
    pub fn evaluate(&self) -> Result<EvalReport> {
        let tc = &self.run.train;
        evaluate(
            &self.infer,
            self.task,
            tc.seed,
            tc.eval_batches,
            tc.batch_size,
        )
    }

    /// Steps to the end, evaluating when due; reports to `obs`; returns the last evaluation.
    pub fn train(&mut self, obs: &mut dyn Observer) -> Result<EvalReport> {
        let mut last_eval = None;
        while !self.is_done() {
            let report = self.step()?;
            obs.on_step(&report);
            if self.eval_due() {
                let e = self.evaluate()?;
                obs.on_eval(self.state.step, &e);
                last_eval = Some(e);
            }
        }
        match last_eval {
            Some(e) => Ok(e),
            None => self.evaluate(),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels;

    /// A small model with every fused kernel on its path: attention, LayerNorm, GELU, biases,
    /// cross-entropy, and AdamW with decay and (tight) clipping.
    fn config() -> RunConfig {
        serde_json::from_str(
            r#"{
              "model": {
                "d_model": 32, "n_heads": 4, "n_layers": 2, "max_len": 16,
                "input": {"kind": "tokens", "vocab_size": 16},
                "position": {"kind": "learned"},
                "head": {"kind": "lm", "tied": false},
                "defaults": {
                  "mixer": {"kind": "attention", "q_chunk": 4, "k_chunk": 4},
                  "ffn": {"kind": "mlp", "hidden": 64, "activation": "gelu"},
                  "norm": {"kind": "layer_norm"}
                }
              },
              "train": {"steps": 5, "batch_size": 4, "seq_len": 12, "lr": 0.003,
                        "warmup": 0, "weight_decay": 0.1, "clip_norm": 0.5, "seed": 3}
            }"#,
        )
        .unwrap()
    }

    /// The weights after `steps` steps, and the losses.
    fn train(steps: usize) -> (BTreeMap<String, Tensor>, Vec<f32>) {
        let run = config();
        let task = crate::tasks::by_name("reverse", &run.model, &run.train).unwrap();
        let mut t = Trainer::new(&run, task.as_ref()).unwrap();
        let losses = (0..steps).map(|_| t.step().unwrap().loss).collect();
        (t.params.tensors(), losses)
    }

    #[test]
    fn training_through_the_fused_kernels_moves_weights_as_the_reference_does() {
        let (fused, fused_losses) = train(5);
        let (reference, ref_losses) = kernels::with_reference(|| train(5));
        for (a, b) in fused_losses.iter().zip(&ref_losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
        }
        // Five steps of AdamW at lr 3e-3 move a weight by up to ~1.5e-2; the two paths
        // round differently (f32 sums in other orders), and Adam's normalisation can
        // magnify that for gradients near zero, so the bound is a small part of one step.
        let lr = config().train.lr;
        let mut worst = (0f64, String::new());
        for (name, a) in &fused {
            let e = crate::testutil::max_abs(a, &reference[name]);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        assert!(worst.0 <= 0.01 * lr, "{} moved {} apart", worst.1, worst.0);
    }
}
