//! The Transformer MLP (Vaswani et al. 2017) with GELU / ReLU, or the gated SwiGLU
//! variant (Shazeer 2020, "GLU Variants Improve Transformer").

use candle_core::Tensor;

use super::kind::{Activation, ChannelMixer, Pointwise};
use crate::linear::Linear;
use crate::params::Params;
use crate::Result;

/// `down(act(up(x)))`, or `down(silu(gate(x)) * up(x))` for SwiGLU.
#[derive(Debug)]
pub struct Mlp {
    up: Linear,
    hidden: Hidden,
    down: Linear,
}

/// What happens between `up` and `down`.
#[derive(Debug)]
enum Hidden {
    Pointwise(Pointwise),
    /// SwiGLU: `silu(gate(x)) * up(x)`.
    Gated {
        gate: Linear,
    },
}

impl Mlp {
    /// Parameters `up`, `down` (and `gate` for SwiGLU) under `p`.
    pub fn new(
        p: &Params,
        d: usize,
        hidden: usize,
        activation: Activation,
        bias: bool,
        rank: Option<usize>,
    ) -> Result<Self> {
        let mid = match Pointwise::of(activation) {
            Some(act) => Hidden::Pointwise(act),
            None => Hidden::Gated {
                gate: Linear::with_rank(&p.pp("gate"), d, hidden, rank, bias)?,
            },
        };
        Ok(Mlp {
            up: Linear::with_rank(&p.pp("up"), d, hidden, rank, bias)?,
            hidden: mid,
            down: Linear::with_rank(&p.pp("down"), hidden, d, rank, bias)?,
        })
    }
}

impl ChannelMixer for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (Hidden::Pointwise(Pointwise::Gelu), None, None, Some(b)) =
            (&self.hidden, &self.up.factor, &self.up.quant, &self.up.bias)
        {
            if let Some(h) = crate::kernels::linear_op::linear_gelu(x, &self.up.weight, b) {
                return self.down.forward(&h?);
            }
        }
        let h = self.up.forward(x)?;
        let h = match &self.hidden {
            Hidden::Pointwise(act) => act.apply(&h)?,
            Hidden::Gated { gate } => (gate.forward(x)?.silu()? * h)?,
        };
        self.down.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, randn};
    use candle_core::{DType, Device};

    #[test]
    fn gradients_match_finite_differences() {
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Relu,
            Activation::Swiglu,
        ] {
            let p = Params::new(2, DType::F64, &Device::Cpu);
            let mlp = Mlp::new(&p, 6, 10, act, true, None).unwrap();
            let x = (randn(&[2, 3, 6], 5) * 3.0).unwrap();
            check_grad(&p, &x, |x| mlp.forward(x));
        }
    }

    #[test]
    fn relu_mlp_matches_hand_computation() {
        let p = Params::new(2, DType::F64, &Device::Cpu);
        let mlp = Mlp::new(&p, 3, 4, Activation::Relu, true, None).unwrap();
        let x = randn(&[1, 3], 6);
        let w1 = mlp.up.weight.to_vec2::<f64>().unwrap();
        let w2 = mlp.down.weight.to_vec2::<f64>().unwrap();
        let xv = x.to_vec2::<f64>().unwrap()[0].clone();
        let h: Vec<f64> = w1
            .iter()
            .map(|r| r.iter().zip(&xv).map(|(a, b)| a * b).sum::<f64>().max(0.0))
            .collect();
        let y: Vec<f64> = w2
            .iter()
            .map(|r| r.iter().zip(&h).map(|(a, b)| a * b).sum())
            .collect();
        let got = mlp.forward(&x).unwrap().to_vec2::<f64>().unwrap()[0].clone();
        for (a, b) in got.iter().zip(&y) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
