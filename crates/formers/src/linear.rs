//! Affine map `y = x Wᵀ + b` over the last dimension, for inputs of any rank.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};

use crate::kernels::quant::QuantMatrix;
use crate::params::{Init, Params, INIT_STD};
use crate::Result;

/// A dense layer; `weight` is `[out, in]` as in PyTorch and Hugging Face checkpoints. A
/// low-rank layer (Greenformers LRT, Winata et al. 2020) stores `W = weight · factor` with
/// `weight [out, r]` and `factor [r, in]`. A layer loaded from a quantised checkpoint keeps
/// its weight quantised (`quant`: int8, Q8_0 or Q4_0) and multiplies in integers.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, or `[out, r]` when `factor` is present; `[out, 0]` (no values) when the
    /// weight is `quant`.
    pub weight: Tensor,
    /// The `[out, in]` weight quantised, in place of `weight`.
    pub quant: Option<Arc<QuantMatrix>>,
    /// `[r, in]` of a low-rank layer.
    pub factor: Option<Tensor>,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Parameters `weight` (and `bias`) under `p`.
    pub fn new(p: &Params, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        Self::with_rank(p, d_in, d_out, None, bias)
    }

    /// Like [`Linear::new`], factorised as `weight [out, r] · factor [r, in]` when `rank` is
    /// given; each factor is drawn so that the product has the dense layer's scale.
    pub fn with_rank(
        p: &Params,
        d_in: usize,
        d_out: usize,
        rank: Option<usize>,
        bias: bool,
    ) -> Result<Self> {
        // The weight is drawn before the bias: the order seeded models' draws depend on.
        let bias_of = |p: &Params| -> Result<Option<Tensor>> {
            if bias {
                Ok(Some(p.get(
                    &[d_out],
                    "bias",
                    Init::Bias { fan_in: d_in },
                )?))
            } else {
                Ok(None)
            }
        };
        if rank.is_none() {
            if let Some(q) = p.get_quantized([d_out, d_in], "weight")? {
                return Ok(Linear {
                    weight: Tensor::zeros((d_out, 0), p.dtype(), p.device())?,
                    quant: Some(Arc::new(q)),
                    factor: None,
                    bias: bias_of(p)?,
                });
            }
        }
        let (weight, factor) = match rank {
            None => (
                p.get(&[d_out, d_in], "weight", Init::Weight { fan_in: d_in })?,
                None,
            ),
            Some(r) => {
                let std = INIT_STD.sqrt() / (r as f64).powf(0.25);
                (
                    p.get(&[d_out, r], "weight", Init::Normal(std))?,
                    Some(p.get(&[r, d_in], "factor", Init::Normal(std))?),
                )
            }
        };
        Ok(Linear {
            weight,
            quant: None,
            factor,
            bias: bias_of(p)?,
        })
    }

    /// Parameters of a `d_in → d_out` layer made by [`Linear::with_rank`] (saturating).
    pub fn param_count(d_in: usize, d_out: usize, rank: Option<usize>, bias: bool) -> u128 {
        let (i, o) = (d_in as u128, d_out as u128);
        let weights = match rank {
            Some(r) => (r as u128).saturating_mul(i.saturating_add(o)),
            None => i.saturating_mul(o),
        };
        weights.saturating_add(if bias { o } else { 0 })
    }

    /// Applies the layer to `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Module::forward(self, x)?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use crate::kernels::linear_op::linear;
        if let Some(q) = &self.quant {
            return quant_forward(q, self.bias.as_ref(), x);
        }
        let fused = match &self.factor {
            None => linear(x, &self.weight, self.bias.as_ref()),
            Some(f) => match linear(x, f, None) {
                Some(Ok(h)) => linear(&h, &self.weight, self.bias.as_ref()),
                failed => failed,
            },
        };
        if let Some(y) = fused {
            return y;
        }
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("linear input has a last dimension");
        let rows = x.elem_count() / d_in.max(1);
        let x = x.reshape((rows, d_in))?;
        let y = match &self.factor {
            Some(f) => x.matmul(&f.t()?)?.matmul(&self.weight.t()?)?,
            None => x.matmul(&self.weight.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => crate::kernels::bias::add(&y, b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// `x Wᵀ + b` with `W` quantised: `x` is quantised on the fly and multiplied in integers
/// ([`QuantMatrix::matmul`]); inputs of other dtypes go through f32.
pub(crate) fn quant_forward(
    q: &QuantMatrix,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let d_in = *dims.last().expect("linear input has a last dimension");
    if d_in != q.cols() {
        candle_core::bail!(
            "{} linear layer takes {} inputs, got {d_in}",
            q.scheme(),
            q.cols()
        );
    }
    let rows = x.elem_count() / d_in.max(1);
    let xf = x.to_dtype(DType::F32)?.flatten_all()?;
    let b = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let mut out = vec![0f32; rows * q.rows()];
    crate::kernels::with_values(&xf, |xs: &[f32]| q.matmul(xs, rows, b.as_deref(), &mut out))?;
    let mut shape = dims;
    *shape.last_mut().expect("non-empty") = q.rows();
    Tensor::from_vec(out, shape, x.device())?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, max_abs, randn};
    use candle_core::{DType, Device};

    #[test]
    fn the_weight_is_drawn_before_the_bias() {
        // Seeded runs (the arena's) depend on this order: PyTorch's init draws both.
        let draw = |bias| {
            let p =
                Params::new(7, DType::F32, &Device::Cpu).with_init(crate::params::InitSpec::Torch);
            Linear::new(&p, 4, 3, bias).unwrap().weight
        };
        assert_eq!(max_abs(&draw(true), &draw(false)), 0.0);
    }

    #[test]
    fn full_rank_factors_whose_product_is_w_equal_the_dense_layer() {
        let p = Params::new(1, DType::F64, &Device::Cpu);
        let dense = Linear::new(&p.pp("dense"), 5, 4, true).unwrap();
        let lr = Linear::with_rank(&p.pp("lr"), 5, 4, Some(5), true).unwrap();
        // U = W, V = I: U·V = W.
        let vars: std::collections::BTreeMap<_, _> = p.vars().into_iter().collect();
        vars["lr.weight"].set(&dense.weight).unwrap();
        vars["lr.factor"]
            .set(&Tensor::eye(5, DType::F64, &Device::Cpu).unwrap())
            .unwrap();
        vars["lr.bias"].set(dense.bias.as_ref().unwrap()).unwrap();
        let x = randn(&[3, 2, 5], 2);
        assert!(max_abs(&dense.forward(&x).unwrap(), &lr.forward(&x).unwrap()) < 1e-12);
        check_grad(&p, &x, |x| lr.forward(x));
    }
}
