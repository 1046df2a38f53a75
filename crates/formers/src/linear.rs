//! Affine map `y = x Wᵀ + b` over the last dimension, for inputs of any rank.

use candle_core::{Module, Tensor};

use crate::params::{Init, Params};
use crate::Result;

/// Standard deviation of new weight matrices (GPT-2's 0.02).
pub const INIT_STD: f64 = 0.02;

/// A dense layer; `weight` is `[out, in]` as in PyTorch and Hugging Face checkpoints. A
/// low-rank layer (Greenformers LRT, Winata et al. 2020) stores `W = weight · factor` with
/// `weight [out, r]` and `factor [r, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, or `[out, r]` when `factor` is present.
    pub weight: Tensor,
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
        let bias = if bias {
            Some(p.get(&[d_out], "bias", Init::Bias { fan_in: d_in })?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            factor,
            bias,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, max_abs, randn};
    use candle_core::{DType, Device};

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
