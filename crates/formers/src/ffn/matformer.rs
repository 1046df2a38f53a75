//! MatFormer nested MLP (Devvrit et al. 2023, "MatFormer: Nested Transformer for Elastic
//! Inference"): sub-MLPs of granularity g use the first ⌈g·hidden⌉ hidden units, so every
//! smaller model is a prefix of the larger. Training samples one granularity per step (or
//! sums the losses of all); inference picks one per layer (Mix'n'Match).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Tensor;

use super::kind::{ChannelMixer, Pointwise};
use crate::linear::Linear;
use crate::params::Params;
use crate::Result;

/// No granularity forced: use the layer's configured one.
const CONFIGURED: usize = usize::MAX;

/// The hidden width of granularity `g` (a fraction of `hidden`): `⌈g·hidden⌉`, at least 1.
pub fn width(g: f64, hidden: usize) -> usize {
    ((g * hidden as f64).ceil() as usize).clamp(1, hidden)
}

/// An MLP whose hidden layer can be cut to nested prefixes.
#[derive(Debug)]
pub struct MatMlp {
    up: Linear,
    down: Linear,
    /// Not gated: the nested prefixes cut `up` and `down` only.
    activation: Pointwise,
    /// Hidden widths of the granularities, ascending.
    widths: Vec<usize>,
    /// Index into `widths` used unless one is forced.
    configured: usize,
    forced: AtomicUsize,
}

impl MatMlp {
    /// Parameters `up`, `down` under `p`; `granularities` are fractions of `hidden`.
    pub fn new(
        p: &Params,
        d: usize,
        hidden: usize,
        granularities: &[f64],
        active: usize,
        activation: Pointwise,
        bias: bool,
    ) -> Result<Self> {
        let widths = granularities.iter().map(|&g| width(g, hidden)).collect();
        let up = Linear::new(&p.pp("up"), d, hidden, bias)?;
        let down = Linear::new(&p.pp("down"), hidden, d, bias)?;
        if up.quant.is_some() || down.quant.is_some() {
            // Nested widths slice the weights' columns, which quantised rows (scaled per
            // output channel or per block) do not allow for `down`.
            return Err(crate::Error::config(
                "ffn",
                "a MatFormer MLP cannot be loaded with quantised weights",
            ));
        }
        Ok(MatMlp {
            up,
            down,
            activation,
            widths,
            configured: active,
            forced: AtomicUsize::new(CONFIGURED),
        })
    }

    /// The hidden width in use.
    pub fn width(&self) -> usize {
        let i = match self.forced.load(Ordering::Relaxed) {
            CONFIGURED => self.configured,
            i => i.min(self.widths.len() - 1),
        };
        self.widths[i]
    }
}

impl ChannelMixer for MatMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.width();
        let up = Linear {
            weight: self.up.weight.narrow(0, 0, h)?,
            quant: None,
            factor: None,
            bias: self
                .up
                .bias
                .as_ref()
                .map(|b| b.narrow(0, 0, h))
                .transpose()?,
        };
        let down = Linear {
            weight: self.down.weight.narrow(1, 0, h)?,
            quant: None,
            factor: None,
            bias: self.down.bias.clone(),
        };
        let a = up.forward(x)?;
        down.forward(&self.activation.apply(&a)?)
    }

    fn granularities(&self) -> usize {
        self.widths.len()
    }

    fn set_granularity(&self, index: Option<usize>) {
        self.forced
            .store(index.unwrap_or(CONFIGURED), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffn::mlp::Mlp;
    use crate::ffn::Activation;
    use crate::testutil::{check_grad, max_abs, max_rel, randn};
    use candle_core::{DType, Device};

    #[test]
    fn full_granularity_equals_the_plain_mlp_and_smaller_ones_are_prefixes() {
        let p = Params::new(1, DType::F64, &Device::Cpu);
        let mat = MatMlp::new(&p, 6, 16, &[0.25, 0.5, 1.0], 2, Pointwise::Gelu, true).unwrap();
        let q = Params::new(1, DType::F64, &Device::Cpu);
        let plain = Mlp::new(&q, 6, 16, Activation::Gelu, true, None).unwrap();
        let x = randn(&[2, 3, 6], 2);
        assert!(max_abs(&mat.forward(&x).unwrap(), &plain.forward(&x).unwrap()) < 1e-12);
        mat.set_granularity(Some(0));
        assert_eq!(mat.width(), 4);
        let small = mat.forward(&x).unwrap();
        assert!(max_abs(&small, &plain.forward(&x).unwrap()) > 1e-6);
        check_grad(&p, &x, |x| mat.forward(x));
        mat.set_granularity(None);
        assert_eq!(mat.width(), 16);
    }

    #[test]
    fn f32_gradients_of_a_nested_width_match_the_composed_reference() {
        // Training runs in f32, where the fused linear kernels take the narrowed weights.
        let p = Params::new(3, DType::F32, &Device::Cpu);
        let mat = MatMlp::new(&p, 8, 32, &[0.25, 1.0], 1, Pointwise::Gelu, true).unwrap();
        let x = randn(&[2, 5, 8], 4).to_dtype(DType::F32).unwrap();
        let r = randn(&[2, 5, 8], 5).to_dtype(DType::F32).unwrap();
        for g in [Some(0), None] {
            mat.set_granularity(g);
            let grads = || {
                let loss = (mat.forward(&x).unwrap() * &r).unwrap().sum_all().unwrap();
                let gs = loss.backward().unwrap();
                p.vars()
                    .into_iter()
                    .map(|(n, v)| (n, gs.get(v.as_tensor()).cloned()))
                    .collect::<Vec<_>>()
            };
            let fused = grads();
            let reference = crate::kernels::with_reference(grads);
            for ((n, a), (_, b)) in fused.iter().zip(&reference) {
                let rel = max_rel(a.as_ref().unwrap(), b.as_ref().unwrap());
                assert!(rel <= 1e-4, "{g:?} {n}: {rel}");
            }
        }
    }
}
