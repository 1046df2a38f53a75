//! AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019), plus global-norm
//! gradient clipping. State is keyed by parameter name, so it checkpoints.
//!
//! For f32 parameters on the CPU one fused pass per parameter
//! ([`crate::kernels::adamw`]) updates the moments and the weight in place, with the clip
//! factor applied inside it; the composed tensor update is the reference (and the path of
//! other dtypes and devices, and of [`crate::kernels::with_reference`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::kernels::{self, adamw};
use crate::Result;

/// One moment of one parameter: f32 values the fused step updates in place, or a tensor.
#[derive(Debug, Clone)]
enum Moment {
    Flat(Vec<f32>, Shape),
    Tensor(Tensor),
}

impl Moment {
    /// As a tensor (a copy of flat values: for checkpoints and the composed path).
    fn tensor(&self) -> Result<Tensor> {
        Ok(match self {
            Moment::Flat(values, shape) => Tensor::from_slice(values, shape.clone(), &Device::Cpu)?,
            Moment::Tensor(t) => t.clone(),
        })
    }

    /// As f32 values (a copy of a tensor: once, after a restore).
    fn into_flat(self) -> Result<Vec<f32>> {
        Ok(match self {
            Moment::Flat(values, _) => values,
            Moment::Tensor(t) => t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        })
    }
}

/// Adam moments and step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub t: usize,
    m: BTreeMap<String, Moment>,
    v: BTreeMap<String, Moment>,
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
        self.step_scaled(vars, grads, lr, None)
    }

    /// Clips the gradients to global norm `max_norm` (none if 0) and takes one step; returns
    /// the norm before clipping. The fused path sums the squares in one pass (f64, name
    /// order) and scales each gradient inside its update instead of rescaling it first.
    pub fn step_clipped(
        &mut self,
        vars: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        max_norm: f64,
    ) -> Result<f64> {
        if !kernels::fused_enabled() {
            let mut grads = grads.clone();
            let norm = clip_global_norm(&mut grads, max_norm)?;
            self.step(vars, &grads, lr)?;
            return Ok(norm);
        }
        let mut total = 0f64;
        for g in grads.values() {
            total += if adamw::supports(g) {
                adamw::tensor_sum_squares(g)?
            } else {
                sum_squares(g)?
            };
        }
        let norm = total.sqrt();
        let clip = (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6));
        self.step_scaled(vars, grads, lr, clip)?;
        Ok(norm)
    }

    /// The step with every gradient scaled by `clip` first.
    fn step_scaled(
        &mut self,
        vars: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        clip: Option<f64>,
    ) -> Result<()> {
        self.t += 1;
        let fused = kernels::fused_enabled();
        for (name, var) in vars {
            let w = var.as_tensor();
            let Some(g) = grads.get(name) else {
                // No gradient this step: no update, but zero moments from the first step on
                // (the same arithmetic as none), so every checkpoint holds every moment.
                if !self.m.contains_key(name) {
                    let zero = if fused && adamw::supports(w) {
                        Moment::Flat(vec![0.0; w.elem_count()], w.shape().clone())
                    } else {
                        Moment::Tensor(w.zeros_like()?)
                    };
                    self.m.insert(name.clone(), zero.clone());
                    self.v.insert(name.clone(), zero);
                }
                continue;
            };
            let decay = if self.weight_decay > 0.0 && w.rank() >= 2 {
                lr * self.weight_decay
            } else {
                0.0
            };
            if fused && adamw::supports(w) && adamw::supports(g) {
                let n = w.elem_count();
                let take = |map: &mut BTreeMap<String, Moment>| match map.remove(name) {
                    Some(m) => m.into_flat(),
                    None => Ok(vec![0.0; n]),
                };
                let (mut m, mut v) = (take(&mut self.m)?, take(&mut self.v)?);
                let hyper = (self.beta1, self.beta2, self.eps);
                let s = adamw::Scalars::new(hyper, self.t, lr, decay, clip);
                adamw::step(w, g, &mut m, &mut v, &s)?;
                self.m
                    .insert(name.clone(), Moment::Flat(m, w.shape().clone()));
                self.v
                    .insert(name.clone(), Moment::Flat(v, w.shape().clone()));
            } else {
                let g = match clip {
                    Some(c) => (g * c)?,
                    None => g.clone(),
                };
                let (m, v) = self.composed(name, var, &g, lr, decay)?;
                self.m.insert(name.clone(), Moment::Tensor(m));
                self.v.insert(name.clone(), Moment::Tensor(v));
            }
        }
        Ok(())
    }

    /// The update of `name` from candle ops (the reference of the fused pass); returns the
    /// new moments. `decay` is `lr · weight_decay`, or 0.
    fn composed(
        &self,
        name: &str,
        var: &Var,
        g: &Tensor,
        lr: f64,
        decay: f64,
    ) -> Result<(Tensor, Tensor)> {
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let m = match self.m.get(name) {
            Some(m) => ((m.tensor()? * self.beta1)? + (g * (1.0 - self.beta1))?)?,
            None => (g * (1.0 - self.beta1))?,
        };
        let v = match self.v.get(name) {
            Some(v) => ((v.tensor()? * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
            None => (g.sqr()? * (1.0 - self.beta2))?,
        };
        let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
        let w = var.as_tensor();
        let w = if decay != 0.0 {
            (w * (1.0 - decay))?
        } else {
            w.clone()
        };
        var.set(&(w - (update * lr)?)?)?;
        Ok((m, v))
    }

    /// Moments as `m.NAME` / `v.NAME` tensors (for checkpoints).
    pub fn moments(&self) -> BTreeMap<String, Tensor> {
        let m = self.m.iter().map(|(k, t)| (format!("m.{k}"), t));
        let v = self.v.iter().map(|(k, t)| (format!("v.{k}"), t));
        m.chain(v)
            .map(|(k, t)| (k, t.tensor().expect("f32 moments make a tensor")))
            .collect()
    }

    /// Restores moments saved by [`AdamW::moments`] and the step count.
    pub fn restore(&mut self, moments: BTreeMap<String, Tensor>, t: usize) {
        self.t = t;
        for (k, tensor) in moments {
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.to_string(), Moment::Tensor(tensor));
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.to_string(), Moment::Tensor(tensor));
            }
        }
    }
}

/// `Σ g²` of one tensor from candle ops, in f64 after an in-dtype sum.
fn sum_squares(g: &Tensor) -> Result<f64> {
    Ok(g.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// Global L2 norm of all gradients, summed in name order (deterministic).
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += sum_squares(g)?;
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

    /// Parameters and gradients for [`fused_step_matches_the_composed_reference`]: a
    /// decayed matrix, a bias, a var that never has a gradient and one that has one on
    /// odd steps only; large gradients on even steps (clipped), small on odd ones.
    fn grads_at(step: usize) -> BTreeMap<String, Tensor> {
        let g = |shape: &[usize], seed: u64, scale: f64| {
            (crate::testutil::randn(shape, seed) * scale)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let scale = if step.is_multiple_of(2) { 3.0 } else { 0.01 };
        let mut grads = BTreeMap::from([
            ("w".to_string(), g(&[13, 7], 10 + step as u64, scale)),
            ("b".to_string(), g(&[7], 20 + step as u64, scale)),
        ]);
        if step % 2 == 1 {
            grads.insert("late".to_string(), g(&[3, 5], 30 + step as u64, scale));
        }
        grads
    }

    /// Weights and moments after `steps` clipped steps, fused or composed.
    fn train(reference: bool, steps: usize, max_norm: f64) -> (Vec<Vec<f32>>, Vec<f64>) {
        let var = |shape: &[usize], seed| {
            Var::from_tensor(
                &crate::testutil::randn(shape, seed)
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
            .unwrap()
        };
        let vars = vec![
            ("b".to_string(), var(&[7], 1)),
            ("frozen".to_string(), var(&[4], 2)),
            ("late".to_string(), var(&[3, 5], 3)),
            ("w".to_string(), var(&[13, 7], 4)),
        ];
        let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.1);
        let mut norms = Vec::new();
        for step in 0..steps {
            let grads = grads_at(step);
            let mut go = || opt.step_clipped(&vars, &grads, 0.01, max_norm);
            norms.push(if reference {
                kernels::with_reference(go).unwrap()
            } else {
                go().unwrap()
            });
        }
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut values: Vec<Vec<f32>> = vars.iter().map(|(_, v)| flat(v.as_tensor())).collect();
        values.extend(opt.moments().values().map(flat));
        (values, norms)
    }

    #[test]
    fn fused_step_matches_the_composed_reference() {
        // Clipped on even steps: the norms are summed differently (f64 per value vs f32
        // per tensor), so the clip factors differ in the last bits; within 1e-6 relative.
        let (fused, fused_norms) = train(false, 6, 1.0);
        let (composed, composed_norms) = train(true, 6, 1.0);
        assert_eq!(fused.len(), 4 + 8, "four weights and their eight moments");
        for (a, b) in fused_norms.iter().zip(&composed_norms) {
            assert!((a - b).abs() <= 1e-6 * b, "norm {a} vs {b}");
        }
        // Relative to each tensor's largest value: a moment that nearly cancels (a large
        // clipped gradient, then small ones of the other sign) has no relative digits left.
        for (i, (a, b)) in fused.iter().zip(&composed).enumerate() {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-6 * scale,
                "tensor {i}: {worst} apart at scale {scale}"
            );
        }
        // Unclipped, the fused pass does the composed arithmetic term by term.
        let (fused, _) = train(false, 6, 0.0);
        let (composed, _) = train(true, 6, 0.0);
        assert_eq!(fused, composed);
    }

    #[test]
    fn a_restored_fused_optimizer_continues_bit_for_bit() {
        let vars = vec![(
            "w".to_string(),
            Var::from_tensor(
                &crate::testutil::randn(&[13, 7], 5)
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
            .unwrap(),
        )];
        let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.1);
        opt.step_clipped(&vars, &grads_at(0), 0.01, 1.0).unwrap();
        let (moments, t) = (opt.moments(), opt.t);
        let w = vars[0].1.as_tensor().copy().unwrap();
        opt.step_clipped(&vars, &grads_at(1), 0.01, 1.0).unwrap();
        let straight = vars[0]
            .1
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();

        vars[0].1.set(&w).unwrap();
        let mut again = AdamW::new(0.9, 0.999, 1e-8, 0.1);
        again.restore(moments, t);
        again.step_clipped(&vars, &grads_at(1), 0.01, 1.0).unwrap();
        let resumed = vars[0]
            .1
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(straight, resumed);
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
