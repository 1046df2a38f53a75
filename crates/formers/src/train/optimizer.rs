//! AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019), plus global-norm
//! gradient clipping. State is plain tensors keyed by parameter name, so it checkpoints.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::Result;

/// Adam moments and step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub t: usize,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update of every var that has a gradient. Decay applies to matrices only.
    pub fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else {
                // No gradient this step: no update, but zero moments from the first step on
                // (the same arithmetic as none), so every checkpoint holds every moment.
                if !self.m.contains_key(name) {
                    let zero = var.as_tensor().zeros_like()?;
                    self.m.insert(name.clone(), zero.clone());
                    self.v.insert(name.clone(), zero);
                }
                continue;
            };
            let m = match self.m.get(name) {
                Some(m) => ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?,
                None => (g * (1.0 - self.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                None => (g.sqr()? * (1.0 - self.beta2))?,
            };
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            let w = var.as_tensor();
            let w = if self.weight_decay > 0.0 && w.rank() >= 2 {
                (w * (1.0 - lr * self.weight_decay))?
            } else {
                w.clone()
            };
            var.set(&(w - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// Moments as `m.NAME` / `v.NAME` tensors (for checkpoints).
    pub fn moments(&self) -> BTreeMap<String, Tensor> {
        let m = self.m.iter().map(|(k, t)| (format!("m.{k}"), t.clone()));
        let v = self.v.iter().map(|(k, t)| (format!("v.{k}"), t.clone()));
        m.chain(v).collect()
    }

    /// Restores moments saved by [`AdamW::moments`] and the step count.
    pub fn restore(&mut self, moments: BTreeMap<String, Tensor>, t: usize) {
        self.t = t;
        for (k, tensor) in moments {
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.to_string(), tensor);
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.to_string(), tensor);
            }
        }
    }
}

/// Global L2 norm of all gradients, summed in name order (deterministic).
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let w =
            Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap())
                .unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let g = Tensor::new(&[[0.3f64, -0.1], [2.0, 0.0]], &Device::Cpu).unwrap();
        let grads = BTreeMap::from([("w".to_string(), g)]);
        let mut opt = AdamW::new(0.9, 0.999, 1e-12, 0.1);
        opt.step(&vars, &grads, 0.01).unwrap();
        let got = w.as_tensor().to_vec2::<f64>().unwrap();
        // decay first: w (1 - lr·wd), then -lr·sign(g) (bias-corrected first step).
        let expect = [
            [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01],
            [0.5 * 0.999 - 0.01, 3.0 * 0.999],
        ];
        for (r, e) in got.iter().zip(expect) {
            for (a, b) in r.iter().zip(e) {
                assert!((a - b).abs() < 1e-9, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut grads = BTreeMap::from([
            (
                "a".to_string(),
                Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
            ),
        ]);
        let before = clip_global_norm(&mut grads, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let after = global_norm(&grads).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }
}
