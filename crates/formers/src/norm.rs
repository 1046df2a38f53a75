//! LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019): in f32 on the CPU one
//! fused op each (with a backward pass, `kernels::norm_op`); otherwise, and as their
//! reference, a composition of differentiable candle ops.

use candle_core::{DType, Tensor, D};

use serde::{Deserialize, Serialize};

use crate::kernels::norm_op;
use crate::params::{Init, Params};
use crate::{Error, Result};

/// Norms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NormSpec {
    LayerNorm {
        #[serde(default = "default_eps")]
        eps: f64,
    },
    RmsNorm {
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// Compressed RMSNorm (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers"):
    /// the RMS of a zero-mean vector from its first d−1 coordinates.
    CrmsNorm {
        #[serde(default = "default_eps")]
        eps: f64,
    },
}

fn default_eps() -> f64 {
    1e-5
}

impl Default for NormSpec {
    fn default() -> Self {
        NormSpec::LayerNorm { eps: default_eps() }
    }
}

/// Largest norm epsilon accepted: `eps` only guards a division, and one this large
/// flattens every activation (1e12 turns embeddings into zeros).
pub const MAX_NORM_EPS: f64 = 1.0;

impl NormSpec {
    /// Refuses an `eps` outside `(0, MAX_NORM_EPS]`, naming `at.eps`.
    pub fn validate(&self, at: &str) -> Result<()> {
        let eps = match *self {
            NormSpec::LayerNorm { eps }
            | NormSpec::RmsNorm { eps }
            | NormSpec::CrmsNorm { eps } => eps,
        };
        if !(eps > 0.0 && eps <= MAX_NORM_EPS) {
            return Err(Error::config(
                format!("{at}.eps"),
                format!("must be in (0, {MAX_NORM_EPS}], found {eps}"),
            ));
        }
        Ok(())
    }
}

/// A norm over the last dimension with a learned gain (and, for LayerNorm, a bias).
#[derive(Debug, Clone)]
pub struct Norm {
    kind: Kind,
    /// Built for inference (from frozen parameters): candle's fused, forward-only kernels.
    inference: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    /// `(x - mean) / sqrt(var + eps) * weight + bias`.
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    /// `x / sqrt(mean(x²) + eps) * weight`.
    Rms { weight: Tensor, eps: f64 },
    /// `x / sqrt((Σ_{i<d} x_i² + (Σ_{i<d} x_i)²) / d + eps) * weight`: RMSNorm of a zero-mean
    /// `x` read from its first d−1 coordinates (the last one is minus their sum).
    Crms { weight: Tensor, eps: f64 },
}

impl Norm {
    /// Parameters `weight` (and `bias`) under `p`.
    pub fn new(spec: &NormSpec, p: &Params, d: usize) -> Result<Self> {
        let weight = p.get(&[d], "weight", Init::Const(1.0))?;
        let kind = match *spec {
            NormSpec::LayerNorm { eps } => Kind::Layer {
                weight,
                bias: p.get(&[d], "bias", Init::Const(0.0))?,
                eps,
            },
            NormSpec::RmsNorm { eps } => Kind::Rms { weight, eps },
            NormSpec::CrmsNorm { eps } => Kind::Crms { weight, eps },
        };
        Ok(Norm {
            kind,
            inference: !p.is_trainable(),
        })
    }

    /// Parameters of a norm of `spec` over `d` features, as [`Norm::new`] makes them.
    pub fn param_count(spec: &NormSpec, d: usize) -> u128 {
        match spec {
            NormSpec::LayerNorm { .. } => 2 * d as u128,
            NormSpec::RmsNorm { .. } | NormSpec::CrmsNorm { .. } => d as u128,
        }
    }

    /// Normalises `[.., d]`. Built for inference it takes candle's fused forward kernels;
    /// in training, f32 on the CPU, formers' fused ops with a backward pass; otherwise the
    /// differentiable composition below, the reference of both.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused = self.inference && x.dtype() == DType::F32 && x.device().is_cpu();
        match &self.kind {
            Kind::Layer { weight, bias, eps } if fused => Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                weight,
                bias,
                *eps as f32,
            )?),
            Kind::Rms { weight, eps } if fused => Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                weight,
                *eps as f32,
            )?),
            Kind::Layer { weight, bias, eps } if norm_op::supports(x, weight) => {
                norm_op::layer_norm(x, weight, bias, *eps)
            }
            Kind::Rms { weight, eps } if norm_op::supports(x, weight) => {
                norm_op::rms_norm(x, weight, *eps)
            }
            _ => self.forward_composed(x),
        }
    }

    /// The norm from differentiable ops; computes in at least f32.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = if dtype == DType::F64 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let y = match &self.kind {
            Kind::Layer { weight, bias, eps } => {
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                let y = xc.broadcast_div(&(var + *eps)?.sqrt()?)?;
                y.broadcast_mul(&weight.to_dtype(x.dtype())?)?
                    .broadcast_add(&bias.to_dtype(x.dtype())?)?
            }
            Kind::Rms { weight, eps } => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                let y = x.broadcast_div(&(ms + *eps)?.sqrt()?)?;
                y.broadcast_mul(&weight.to_dtype(x.dtype())?)?
            }
            Kind::Crms { weight, eps } => {
                let d = x.dim(D::Minus1)?;
                let head = x.narrow(D::Minus1, 0, d - 1)?;
                let sq =
                    (head.sqr()?.sum_keepdim(D::Minus1)? + head.sum_keepdim(D::Minus1)?.sqr()?)?;
                let y = x.broadcast_div(&((sq / d as f64)? + *eps)?.sqrt()?)?;
                y.broadcast_mul(&weight.to_dtype(x.dtype())?)?
            }
        };
        Ok(y.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, max_abs, randn};
    use candle_core::Device;

    #[test]
    fn layer_norm_has_zero_mean_unit_variance() {
        let p = Params::new(0, DType::F64, &Device::Cpu);
        let n = Norm::new(&NormSpec::LayerNorm { eps: 1e-12 }, &p, 8).unwrap();
        let x = randn(&[3, 8], 1);
        let y = n.forward(&x).unwrap();
        let mean = y.mean_keepdim(1).unwrap().abs().unwrap().max_all().unwrap();
        assert!(mean.to_scalar::<f64>().unwrap() < 1e-12);
        let var = y.sqr().unwrap().mean_keepdim(1).unwrap();
        for v in var.flatten_all().unwrap().to_vec1::<f64>().unwrap() {
            assert!((v - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn fused_inference_kernels_equal_the_composed_reference() {
        for spec in [
            NormSpec::LayerNorm { eps: 1e-12 },
            NormSpec::RmsNorm { eps: 1e-6 },
        ] {
            let p = Params::new(3, DType::F32, &Device::Cpu);
            let n = Norm::new(&spec, &p.frozen(), 24).unwrap();
            let x = (randn(&[3, 5, 24], 9).to_dtype(DType::F32).unwrap() * 3.0).unwrap();
            let fused = n.forward(&x).unwrap();
            let composed = n.forward_composed(&x).unwrap();
            assert!(max_abs(&fused, &composed) < 1e-5, "{spec:?}");
        }
    }

    #[test]
    fn crms_norm_equals_rms_norm_on_zero_mean_inputs() {
        let p = Params::new(3, DType::F64, &Device::Cpu);
        let rms = Norm::new(&NormSpec::RmsNorm { eps: 1e-6 }, &p.pp("a"), 7).unwrap();
        let crms = Norm::new(&NormSpec::CrmsNorm { eps: 1e-6 }, &p.pp("a"), 7).unwrap();
        let x = randn(&[4, 7], 5);
        let x = x.broadcast_sub(&x.mean_keepdim(1).unwrap()).unwrap();
        assert!(max_abs(&rms.forward(&x).unwrap(), &crms.forward(&x).unwrap()) < 1e-12);
    }

    #[test]
    fn gradients_match_finite_differences() {
        for spec in [
            NormSpec::LayerNorm { eps: 1e-5 },
            NormSpec::RmsNorm { eps: 1e-5 },
            NormSpec::CrmsNorm { eps: 1e-5 },
        ] {
            let p = Params::new(3, DType::F64, &Device::Cpu);
            let n = Norm::new(&spec, &p, 6).unwrap();
            let x = randn(&[2, 3, 6], 4);
            check_grad(&p, &x, |x| n.forward(x));
        }
    }
}
