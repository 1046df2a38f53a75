//! Affine map `y = x Wᵀ + b` over the last dimension, for inputs of any rank.

use candle_core::{Module, Tensor};

use crate::params::{Init, Params};
use crate::Result;

/// Standard deviation of new weight matrices (GPT-2's 0.02).
pub const INIT_STD: f64 = 0.02;

/// A dense layer; `weight` is `[out, in]` as in PyTorch and Hugging Face checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Parameters `weight` (and `bias`) under `p`.
    pub fn new(p: &Params, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = p.get(&[d_out, d_in], "weight", Init::Normal(INIT_STD))?;
        let bias = if bias {
            Some(p.get(&[d_out], "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Applies the layer to `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Module::forward(self, x)?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("linear input has a last dimension");
        let rows = x.elem_count() / d_in.max(1);
        let y = x.reshape((rows, d_in))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.weight.dim(0)?;
        y.reshape(out)
    }
}
