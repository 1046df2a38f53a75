//! A config file as data: [`RunConfig`] (the model and how to train it) and
//! [`TrainConfig`], its `train` section.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{parse_json, path_error, ModelConfig};
use crate::{Error, Result};

/// A config file: the model and, optionally, how to train it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The architecture.
    pub model: ModelConfig,
    /// Training hyper-parameters (defaults when absent).
    #[serde(default)]
    pub train: TrainConfig,
}

/// Training hyper-parameters (the `train` section of a config file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Decoupled weight decay (AdamW), on matrices only.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub clip_norm: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Held-out batches per evaluation.
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Seed of initialisation, data order and dropout.
    pub seed: u64,
    /// MatFormer models: train on the mean of all granularities' losses each step instead
    /// of sampling one (the joint loss of the MatFormer paper, averaged so clipping and the
    /// learning rate act as on one model).
    pub matformer_all: bool,
    /// With `matformer_all`: each granularity's weight in that joint loss, smallest width
    /// first (normalised to sum 1); empty: equal weights. Up-weighting the widest trades the
    /// small sub-models' quality for the full model's (the MatFormer paper's loss
    /// re-weighting, Devvrit et al. 2023).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matformer_weights: Vec<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch_size: 32,
            seq_len: 64,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup: 100,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            clip_norm: 1.0,
            grad_accum: 1,
            eval_every: 100,
            eval_batches: 4,
            checkpoint_every: 100,
            seed: 0,
            matformer_all: false,
            matformer_weights: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// The longest warm-up [`TrainConfig::cap_warmup`] leaves, as a fraction of `steps`.
    pub const MAX_WARMUP_FRACTION: f64 = 0.1;

    /// Caps `warmup` at a tenth of `steps`, so a shortened run still decays its learning
    /// rate; returns the warm-up it replaced, if it was longer.
    pub fn cap_warmup(&mut self) -> Option<usize> {
        let cap = (self.steps as f64 * Self::MAX_WARMUP_FRACTION) as usize;
        (self.warmup > cap).then(|| std::mem::replace(&mut self.warmup, cap))
    }

    /// Rejects impossible values, naming the key.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("grad_accum", self.grad_accum),
            ("eval_every", self.eval_every),
            ("eval_batches", self.eval_batches),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(Error::config(key, "must be at least 1, found 0"));
            }
        }
        for (key, v, max) in [
            ("batch_size", self.batch_size, crate::bounds::MAX_BATCH),
            ("seq_len", self.seq_len, crate::bounds::MAX_LEN),
        ] {
            if v > max {
                return Err(Error::config(
                    key,
                    format!("must be at most {max}, found {v}"),
                ));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config(
                "lr",
                format!("must be a positive number, found {}", self.lr),
            ));
        }
        for (key, v) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("min_lr_ratio", self.min_lr_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) || (key != "min_lr_ratio" && v == 1.0) {
                return Err(Error::config(key, format!("must be in [0, 1), found {v}")));
            }
        }
        for (key, v) in [
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
            ("clip_norm", self.clip_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("must be >= 0, found {v}")));
            }
        }
        let w = &self.matformer_weights;
        if !w.is_empty() {
            if !self.matformer_all {
                return Err(Error::config(
                    "matformer_weights",
                    "weights the joint loss of `matformer_all`, which is off",
                ));
            }
            if let Some(v) = w.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(Error::config(
                    "matformer_weights",
                    format!("every weight must be >= 0, found {v}"),
                ));
            }
            if w.iter().sum::<f64>() <= 0.0 {
                return Err(Error::config(
                    "matformer_weights",
                    "at least one weight must be positive",
                ));
            }
        }
        Ok(())
    }
}

impl RunConfig {
    /// Reads a JSON or TOML (by extension) config file and validates it.
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = crate::fsio::read_text_limited(path, crate::fsio::MAX_CONFIG_BYTES, "a config")?;
        let origin = path.display().to_string();
        let cfg: RunConfig = if path.extension().is_some_and(|e| e == "toml") {
            let de = toml::Deserializer::new(&text);
            serde_path_to_error::deserialize(de).map_err(|e| path_error(&origin, e))?
        } else {
            parse_json(&text, &origin)?
        };
        cfg.validate().map_err(|e| match e {
            Error::Config { key, msg } => Error::config(key, format!("{msg} (in {origin})")),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses JSON text and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: RunConfig = parse_json(text, "<config>")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Validates the model and the training section.
    pub fn validate(&self) -> Result<()> {
        self.model.validate().map_err(|e| prefix_key("model", e))?;
        self.train.validate().map_err(|e| prefix_key("train", e))
    }
}

fn prefix_key(prefix: &str, e: Error) -> Error {
    match e {
        Error::Config { key, msg } => Error::config(format!("{prefix}.{key}"), msg),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::TrainConfig;
    use crate::train::schedule::lr_at;

    #[test]
    fn a_warm_up_longer_than_a_tenth_of_the_steps_is_capped_so_the_rate_decays() {
        let mut t = TrainConfig {
            steps: 50,
            warmup: 50,
            ..TrainConfig::default()
        };
        let last = |t: &TrainConfig| lr_at(t.steps - 1, t.steps, 1.0, t.warmup, t.min_lr_ratio);
        assert_eq!(last(&t), 1.0, "uncapped, the last step is still warming up");
        assert_eq!(t.cap_warmup(), Some(50));
        assert_eq!(t.warmup, 5);
        assert!(last(&t) < 0.2, "capped, the rate decays: {}", last(&t));
        assert_eq!(t.cap_warmup(), None, "capping twice changes nothing");
        let mut long = TrainConfig {
            steps: 600,
            warmup: 50,
            ..TrainConfig::default()
        };
        assert_eq!(long.cap_warmup(), None);
        assert_eq!(long.warmup, 50);
        let mut tiny = TrainConfig {
            steps: 3,
            warmup: 1,
            ..TrainConfig::default()
        };
        assert_eq!(tiny.cap_warmup(), Some(1));
        assert_eq!(tiny.warmup, 0);
    }
}
