//! Recovery after compression by distillation (Hinton et al. 2015; the short "healing" run
//! that follows post-training factorisation): the compressed model's hidden states — every
//! block's output by default (per-layer distillation, TinyBERT, Jiao et al. 2020), or the
//! last only — are pulled towards the original's on plain text, mean squared error per
//! token and coordinate, with AdamW. By default every block's weights train (the layers
//! around the compressed ones adapt too; [`Scope`]), or only those compression changed;
//! embeddings and head stay the original's. Whatever head pools or reads those states then
//! follows.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::model::{Model, Packed};
use crate::params::Params;
use crate::train::optimizer::AdamW;
use crate::{Error, Result};

/// How long and how hard the compressed model is trained.
#[derive(Debug, Clone, Copy)]
pub struct Heal {
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (cosine decay to 0 after a warm-up of a tenth of the steps).
    pub lr: f64,
    /// Texts per step.
    pub batch: usize,
    /// What is matched: every block's output or only the last.
    pub target: Target,
    /// Which weights train.
    pub scope: Scope,
}

/// The weights healing trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only those the compression replaced.
    Compressed,
    /// Every block's (attention, norms and MLPs), so the layers around the compressed ones
    /// adapt too; embeddings and head stay. The parameter count is unchanged.
    Blocks,
}

impl Scope {
    /// Whether the parameter `name` trains, `compressed` saying whether compression
    /// replaced it.
    pub fn trains(self, name: &str, compressed: bool) -> bool {
        match self {
            Scope::Compressed => compressed,
            Scope::Blocks => compressed || name.starts_with("layers."),
        }
    }
}

/// The hidden states the compressed model is trained to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The last block's output only.
    Last,
    /// Every block's output, the mean of their errors (per-layer distillation, as in
    /// TinyBERT, Jiao et al. 2020): each layer is told what it should give.
    EveryLayer,
}

impl Default for Heal {
    fn default() -> Self {
        Heal {
            steps: 300,
            lr: 5e-4,
            batch: 16,
            target: Target::EveryLayer,
            scope: Scope::Blocks,
        }
    }
}

/// Words per healing text that [`passages`] aims at by default: about a sentence.
pub const PASSAGE_WORDS: usize = 24;

/// The lines of `text` joined, within each paragraph (blank-line separated), into texts of
/// at least `words` words (a paragraph's last may be shorter): sentence-length texts from
/// verse or dialogue cut into short lines. `words` ≤ 1: each non-empty line alone.
pub fn passages(text: &str, words: usize) -> Vec<String> {
    let mut out = Vec::new();
    let (mut cur, mut n) = (String::new(), 0);
    for line in text.lines().map(str::trim) {
        if !line.is_empty() {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(line);
            n += line.split_whitespace().count();
        }
        if (line.is_empty() || n >= words) && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            n = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The learning rate of step `t` of `h`.
fn lr_at(h: &Heal, t: usize) -> f64 {
    let warm = (h.steps / 10).max(1);
    if t < warm {
        h.lr * (t + 1) as f64 / warm as f64
    } else {
        let p = (t - warm) as f64 / (h.steps - warm).max(1) as f64;
        h.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// The weights of the model `cfg` (starting from `tensors`) trained for `h.steps` steps to
/// give `teacher`'s hidden states (as `h.target` says) on `texts` (token ids, none empty, each within the
/// position table), taken `h.batch` at a time in order, cycling; only the parameters whose
/// names `trains` accepts are updated (`h.scope` is the caller's to apply); `each(step, loss)` after every step.
pub fn heal(
    cfg: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    teacher: &Model,
    texts: &[Vec<u32>],
    h: &Heal,
    trains: impl Fn(&str) -> bool,
    mut each: impl FnMut(usize, f32),
) -> Result<BTreeMap<String, Tensor>> {
    if texts.is_empty() || h.batch == 0 {
        return Err(Error::Input(
            "healing needs texts and a batch of at least 1".into(),
        ));
    }
    let p = Params::new(0, DType::F32, &Device::Cpu);
    let student = Model::new(cfg, &p)?;
    p.assign(tensors, Path::new("the compressed weights"))?;
    let vars: Vec<_> = p.vars().into_iter().filter(|(n, _)| trains(n)).collect();
    if vars.is_empty() {
        return Err(Error::Input("healing found no parameter to train".into()));
    }
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    for step in 0..h.steps {
        let batch: Vec<&Vec<u32>> = (0..h.batch)
            .map(|i| &texts[(step * h.batch + i) % texts.len()])
            .collect();
        let packed = Packed::new(&batch)?;
        let (got, want) = match h.target {
            Target::Last => (
                vec![student.hidden_packed(&packed)?],
                vec![teacher.hidden_packed(&packed)?],
            ),
            Target::EveryLayer => (
                student.layer_outputs_packed(&packed)?,
                teacher.layer_outputs_packed(&packed)?,
            ),
        };
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        for (g, w) in got.iter().zip(&want) {
            loss = (loss + (g - w.detach())?.sqr()?.mean_all()?)?;
        }
        let loss = (loss / got.len().max(1) as f64)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Input(format!(
                "healing diverged at step {} (loss {value}); try a smaller learning rate",
                step + 1
            )));
        }
        let g = loss.backward()?;
        let grads: BTreeMap<String, Tensor> = vars
            .iter()
            .filter_map(|(n, v)| g.get(v.as_tensor()).map(|t| (n.clone(), t.clone())))
            .collect();
        opt.step_clipped(&vars, &grads, lr_at(h, step), 1.0)?;
        each(step + 1, value);
    }
    Ok(p.tensors())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::lowrank::{lowrank, Layers};
    use crate::compress::svd::Rank;
    use crate::pretrained::{self, native::Stored};
    use crate::testutil::fixture;

    /// tiny-bert with its MLPs at rank 3: the original, the factorised config and weights,
    /// and 64 synthetic token texts to heal on.
    fn factorised_tiny_bert() -> (
        pretrained::Pretrained,
        ModelConfig,
        BTreeMap<String, Tensor>,
        Vec<Vec<u32>>,
    ) {
        let p = pretrained::load(&fixture("tiny-bert")).unwrap();
        let (manifest, stored, _) = lowrank(&p, Rank::Fixed(3), Layers::Ffn).unwrap();
        let cfg = ModelConfig::from_json(&manifest.config.to_string()).unwrap();
        let tensors: BTreeMap<String, Tensor> = stored
            .iter()
            .map(|(k, s)| match s {
                Stored::F32 { shape, values } => (
                    k.clone(),
                    Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu).unwrap(),
                ),
                Stored::Quant(_) => unreachable!("lowrank writes f32"),
            })
            .collect();
        let texts: Vec<Vec<u32>> = (0..64u32)
            .map(|i| {
                (0..5 + i % 7)
                    .map(|j| (i * 31 + j * 17) % 299 + 1)
                    .collect()
            })
            .collect();
        (p, cfg, tensors, texts)
    }

    #[test]
    fn passages_join_the_lines_of_a_paragraph_up_to_the_words() {
        let text = "a b\nc d e\nf\n\n  g h  \ni\n";
        assert_eq!(passages(text, 4), ["a b c d e", "f", "g h i"]);
        assert_eq!(passages(text, 1), ["a b", "c d e", "f", "g h", "i"]);
        assert_eq!(passages(text, 100), ["a b c d e f", "g h i"]);
        assert!(passages("\n\n", 4).is_empty());
    }

    #[test]
    fn healing_brings_a_factorised_encoder_back_towards_the_original() {
        let (p, cfg, tensors, texts) = factorised_tiny_bert();
        let mut losses = Vec::new();
        let h = Heal {
            steps: 60,
            lr: 3e-3,
            batch: 8,
            target: Target::Last,
            scope: Scope::Compressed,
        };
        let ffn = |n: &str| n.contains(".ffn.");
        let healed = heal(&cfg, &tensors, &p.model, &texts, &h, ffn, |_, l| {
            losses.push(l)
        })
        .unwrap();
        // Only the factorised layers moved.
        for (name, t) in &healed {
            let same = crate::testutil::max_abs(t, &tensors[name]) == 0.0;
            assert_eq!(same, !ffn(name), "{name}");
        }
        assert_eq!(losses.len(), 60);
        // Held-out texts: the healed model is closer to the original than the factorised one.
        let held: Vec<Vec<u32>> = (0..8u32)
            .map(|i| vec![7 + i, 100 + i, 3, 250 - i])
            .collect();
        let packed = Packed::new(&held).unwrap();
        let want = p.model.hidden_packed(&packed).unwrap();
        let err = |w: &BTreeMap<String, Tensor>| {
            let q = Params::new(0, DType::F32, &Device::Cpu);
            let m = Model::new(&cfg, &q.frozen()).unwrap();
            q.assign(w, Path::new("t")).unwrap();
            let got = m.hidden_packed(&packed).unwrap();
            let e = (got - &want).unwrap().sqr().unwrap().mean_all().unwrap();
            e.to_scalar::<f32>().unwrap()
        };
        let (before, after) = (err(&tensors), err(&healed));
        assert!(after < 0.5 * before, "{before} → {after}");
    }

    #[test]
    fn per_layer_healing_brings_every_layer_back_closer_than_last_layer_healing() {
        let (p, cfg, tensors, texts) = factorised_tiny_bert();
        let healed = |target| {
            let h = Heal {
                steps: 60,
                lr: 3e-3,
                batch: 8,
                target,
                scope: Scope::Compressed,
            };
            let ffn = |n: &str| n.contains(".ffn.");
            heal(&cfg, &tensors, &p.model, &texts, &h, ffn, |_, _| {}).unwrap()
        };
        // Held-out texts: each block's output error against the original's.
        let held: Vec<Vec<u32>> = (0..8u32)
            .map(|i| vec![7 + i, 100 + i, 3, 250 - i, 40 + 2 * i])
            .collect();
        let packed = Packed::new(&held).unwrap();
        let want = p.model.layer_outputs_packed(&packed).unwrap();
        let errors = |w: &BTreeMap<String, Tensor>| -> Vec<f32> {
            let q = Params::new(0, DType::F32, &Device::Cpu);
            let m = Model::new(&cfg, &q.frozen()).unwrap();
            q.assign(w, Path::new("t")).unwrap();
            let got = m.layer_outputs_packed(&packed).unwrap();
            got.iter()
                .zip(&want)
                .map(|(g, w)| {
                    let e = (g - w).unwrap().sqr().unwrap().mean_all().unwrap();
                    e.to_scalar::<f32>().unwrap()
                })
                .collect()
        };
        let before = errors(&tensors);
        let last = errors(&healed(Target::Last));
        let every = errors(&healed(Target::EveryLayer));
        assert_eq!(every.len(), p.config.n_layers);
        let mean = |e: &[f32]| e.iter().sum::<f32>() / e.len() as f32;
        for (i, (b, e)) in before.iter().zip(&every).enumerate() {
            assert!(e < b, "layer {i}: {b} → {e}");
        }
        assert!(
            mean(&every) < mean(&last),
            "per-layer {every:?} vs last-layer {last:?} (factorised {before:?})"
        );
    }
}
