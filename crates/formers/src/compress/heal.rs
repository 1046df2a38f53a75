//! Recovery after compression by distillation (Hinton et al. 2015; the short "healing" run
//! that follows post-training factorisation): the compressed model's last hidden states are
//! pulled towards the original's on plain text — mean squared error per token and
//! coordinate — with AdamW, only the weights that compression changed training (the rest
//! stays the original's). Whatever head pools or reads those states then follows.

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
}

impl Default for Heal {
    fn default() -> Self {
        Heal {
            steps: 300,
            lr: 5e-4,
            batch: 16,
        }
    }
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
/// give `teacher`'s last hidden states on `texts` (token ids, none empty, each within the
/// position table), taken `h.batch` at a time in order, cycling; only the parameters whose
/// names `trains` accepts are updated; `each(step, loss)` after every step.
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
        let target = teacher.hidden_packed(&packed)?.detach();
        let got = student.hidden_packed(&packed)?;
        let loss = (got - target)?.sqr()?.mean_all()?;
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

    #[test]
    fn healing_brings_a_factorised_encoder_back_towards_the_original() {
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
        let mut losses = Vec::new();
        let h = Heal {
            steps: 60,
            lr: 3e-3,
            batch: 8,
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
}
