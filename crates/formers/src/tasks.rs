//! Built-in toy tasks that make training testable offline: sequence copy / reverse and a
//! character-level language model on the shipped Shakespeare corpus (`data/README.md`), and
//! random tokens for speed measurements.

use candle_core::{Device, Tensor};

use crate::config::{HeadSpec, ModelConfig};
use crate::rng::Rng;
use crate::train::config::TrainConfig;
use crate::train::task::{Batch, Task};
use crate::{Error, Result};

/// The corpus of the `charlm` task, embedded so it works from any directory.
pub const SHAKESPEARE: &str = include_str!("../../../data/shakespeare.txt");

/// Names accepted by [`by_name`].
pub const TASKS: &[&str] = &["copy", "reverse", "charlm"];

/// The task `name` for a model of `cfg` trained with `train`; errors when they do not fit.
pub fn by_name(name: &str, cfg: &ModelConfig, train: &TrainConfig) -> Result<Box<dyn Task>> {
    // The name first: a model's head only matters for a task that exists.
    if !TASKS.contains(&name) {
        return Err(Error::config(
            "task",
            format!(
                "unknown task `{name}`; expected one of {}",
                TASKS.join(", ")
            ),
        ));
    }
    let n = train.seq_len;
    if n > cfg.max_len {
        return Err(Error::config(
            "train.seq_len",
            format!("{n} is longer than model.max_len {}", cfg.max_len),
        ));
    }
    if !matches!(cfg.head, HeadSpec::Lm { .. }) {
        return Err(Error::config(
            "model.head",
            format!("task `{name}` predicts tokens: it needs an `lm` head"),
        ));
    }
    let vocab = cfg.input.vocab_size();
    match name {
        "copy" | "reverse" => {
            if name == "reverse" && cfg.is_causal() {
                return Err(Error::config(
                    "model.causal",
                    "task `reverse` needs a bidirectional model: set causal to false",
                ));
            }
            Ok(Box::new(SeqTask {
                name: name.to_string(),
                vocab,
                len: n,
                reverse: name == "reverse",
            }))
        }
        "charlm" => {
            if vocab < 256 {
                return Err(Error::config(
                    "model.input",
                    "task `charlm` reads bytes: use {\"kind\": \"bytes\"}",
                ));
            }
            if !cfg.is_causal() {
                return Err(Error::config(
                    "model.causal",
                    "task `charlm` is a causal LM: set causal to true",
                ));
            }
            Ok(Box::new(CharLm::new(SHAKESPEARE.as_bytes(), n)))
        }
        other => Err(Error::config(
            "task",
            format!(
                "unknown task `{other}`; expected one of {}",
                TASKS.join(", ")
            ),
        )),
    }
}

/// Predict the input sequence itself (`copy`) or reversed (`reverse`), token by token.
#[derive(Debug, Clone)]
pub struct SeqTask {
    name: String,
    vocab: usize,
    len: usize,
    reverse: bool,
}

impl SeqTask {
    fn batch(&self, rng: &mut Rng, b: usize) -> Result<Batch> {
        let mut inputs = Vec::with_capacity(b * self.len);
        let mut targets = Vec::with_capacity(b * self.len);
        for _ in 0..b {
            let seq: Vec<u32> = (0..self.len)
                .map(|_| rng.below(self.vocab) as u32)
                .collect();
            inputs.extend_from_slice(&seq);
            if self.reverse {
                targets.extend(seq.iter().rev());
            } else {
                targets.extend_from_slice(&seq);
            }
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (b, self.len), &Device::Cpu)?,
            targets: Tensor::from_vec(targets, (b, self.len), &Device::Cpu)?,
            weights: None,
            mask: None,
            tokens: b * self.len,
        })
    }
}

impl Task for SeqTask {
    fn name(&self) -> &str {
        &self.name
    }
    fn train_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch> {
        self.batch(rng, batch_size)
    }
    fn eval_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch> {
        self.batch(rng, batch_size)
    }
}

/// Next-byte prediction on random windows of a text; the last 10% is held out.
#[derive(Debug, Clone)]
pub struct CharLm {
    train: Vec<u8>,
    eval: Vec<u8>,
    len: usize,
}

impl CharLm {
    /// Windows of `len` bytes from `text`.
    pub fn new(text: &[u8], len: usize) -> Self {
        let split = text.len() * 9 / 10;
        CharLm {
            train: text[..split].to_vec(),
            eval: text[split..].to_vec(),
            len,
        }
    }

    fn batch(&self, text: &[u8], rng: &mut Rng, b: usize) -> Result<Batch> {
        let n = self.len;
        if text.len() <= n {
            return Err(Error::Input(format!(
                "text of {} bytes is too short for windows of {n}",
                text.len()
            )));
        }
        let mut inputs = Vec::with_capacity(b * n);
        let mut targets = Vec::with_capacity(b * n);
        for _ in 0..b {
            let start = rng.below(text.len() - n);
            inputs.extend(text[start..start + n].iter().map(|&c| c as u32));
            targets.extend(text[start + 1..start + n + 1].iter().map(|&c| c as u32));
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (b, n), &Device::Cpu)?,
            targets: Tensor::from_vec(targets, (b, n), &Device::Cpu)?,
            weights: None,
            mask: None,
            tokens: b * n,
        })
    }
}

impl Task for CharLm {
    fn name(&self) -> &str {
        "charlm"
    }
    fn train_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch> {
        self.batch(&self.train, rng, batch_size)
    }
    fn eval_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch> {
        self.batch(&self.eval, rng, batch_size)
    }
}

/// Random token ids with random targets of the shape the model's head trains on (one id per
/// position for an `lm` head, one class per sequence for a classifier): what speed
/// measurements train on, since the cost of a step does not depend on the data.
#[derive(Debug, Clone)]
pub struct RandomTokens {
    vocab: usize,
    len: usize,
    /// Classes of a classification head; `None` for per-token targets.
    classes: Option<usize>,
}

impl RandomTokens {
    /// Sequences of `len` tokens for a model of `cfg`; errors when they do not fit it or its
    /// head has no training loss.
    pub fn for_model(cfg: &ModelConfig, len: usize) -> Result<Self> {
        // A matching head takes two documents of up to max_len each.
        let pairs = matches!(cfg.head, HeadSpec::Matching { .. });
        let limit = if pairs { 2 * cfg.max_len } else { cfg.max_len };
        if pairs && !len.is_multiple_of(2) {
            return Err(Error::config(
                "model.head",
                format!("a matching head takes two documents of n/2 tokens: {len} is odd"),
            ));
        }
        if len == 0 || len > limit {
            return Err(Error::config(
                "model.max_len",
                format!(
                    "a sequence of {len} tokens does not fit a model of max_len {}",
                    cfg.max_len
                ) + if pairs { " (two documents)" } else { "" },
            ));
        }
        if let HeadSpec::Embedding { .. } = cfg.head {
            return Err(Error::config(
                "model.head",
                "an `embedding` head has no training loss; use an `lm` or `classification` head",
            ));
        }
        let classes = cfg.head.n_classes();
        Ok(RandomTokens {
            vocab: cfg.input.vocab_size(),
            len,
            classes,
        })
    }

    fn batch(&self, rng: &mut Rng, b: usize) -> Result<Batch> {
        let n = self.len;
        let ids: Vec<u32> = (0..b * n).map(|_| rng.below(self.vocab) as u32).collect();
        let targets = match self.classes {
            Some(c) => {
                let labels: Vec<u32> = (0..b).map(|_| rng.below(c) as u32).collect();
                Tensor::from_vec(labels, b, &Device::Cpu)?
            }
            None => {
                let next: Vec<u32> = (0..b * n).map(|_| rng.below(self.vocab) as u32).collect();
                Tensor::from_vec(next, (b, n), &Device::Cpu)?
            }
        };
        Ok(Batch {
            inputs: Tensor::from_vec(ids, (b, n), &Device::Cpu)?,
            targets,
            weights: None,
            mask: None,
            tokens: b * n,
        })
    }
}

impl Task for RandomTokens {
    fn name(&self) -> &str {
        "random-tokens"
    }
    fn train_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch> {
        self.batch(rng, batch_size)
    }
    fn eval_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch> {
        self.batch(rng, batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_targets_are_reversed_inputs() {
        let t = SeqTask {
            name: "reverse".into(),
            vocab: 7,
            len: 5,
            reverse: true,
        };
        let b = t.train_batch(&mut Rng::new(1), 3).unwrap();
        let x = b.inputs.to_vec2::<u32>().unwrap();
        let y = b.targets.to_vec2::<u32>().unwrap();
        for (xi, yi) in x.iter().zip(&y) {
            assert_eq!(xi.iter().rev().copied().collect::<Vec<_>>(), *yi);
            assert!(xi.iter().all(|&v| v < 7));
        }
    }

    /// A matching head takes two documents of up to `max_len` each: random pairs train it.
    #[test]
    fn random_tokens_for_a_matching_head_are_pairs() {
        let cfg = crate::config::ModelConfig::from_json(
            r#"{"d_model": 8, "n_heads": 2, "n_layers": 1, "max_len": 4, "input": {"kind": "bytes"},
               "head": {"kind": "matching", "n_classes": 2, "pooling": "mean"}}"#,
        )
        .unwrap();
        let data = RandomTokens::for_model(&cfg, 8).unwrap();
        let b = data.batch(&mut Rng::new(2), 3).unwrap();
        let model = crate::model::Model::new(
            &cfg,
            &crate::params::Params::new(1, candle_core::DType::F32, &Device::Cpu),
        )
        .unwrap();
        let logits = model.forward(&b.inputs, None, None).unwrap();
        assert_eq!(logits.dims(), &[3, 2]);
        for bad in [7, 10] {
            let err = RandomTokens::for_model(&cfg, bad).unwrap_err().to_string();
            assert!(err.contains(&bad.to_string()), "{err}");
        }
    }

    #[test]
    fn an_unknown_task_is_named_before_the_head_is_checked() {
        let cfg = crate::train::config::RunConfig::from_json(include_str!(
            "../../../configs/encoder-classifier.json"
        ))
        .unwrap();
        assert!(!matches!(cfg.model.head, HeadSpec::Lm { .. }));
        let e = by_name("listops", &cfg.model, &cfg.train)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown task `listops`"), "{e}");
        assert!(!e.contains("lm` head"), "{e}");
        let e = by_name("copy", &cfg.model, &cfg.train)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lm` head"), "{e}");
    }

    #[test]
    fn charlm_targets_are_shifted_inputs() {
        let t = CharLm::new(SHAKESPEARE.as_bytes(), 16);
        let b = t.eval_batch(&mut Rng::new(2), 2).unwrap();
        let x = b.inputs.to_vec2::<u32>().unwrap();
        let y = b.targets.to_vec2::<u32>().unwrap();
        assert_eq!(x[0][1..], y[0][..15]);
        assert!(SHAKESPEARE.len() < 1_000_000);
    }
}
