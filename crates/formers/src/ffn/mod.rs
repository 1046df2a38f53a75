//! Channel mixers: the part of a block that transforms each position on its own.
//! One file per mixer; [`build`] maps an [`FfnSpec`] to its implementation.

pub mod matformer;
pub mod mlp;

use candle_core::Tensor;

use crate::config::{Activation, FfnSpec, ModelConfig};
use crate::linear::Linear;
use crate::params::Params;
use crate::{Error, Result};

/// A pointwise activation: the [`Activation`]s without a gate. SwiGLU is not one (it needs
/// a second projection, which only the dense MLP has), so a mixer holding a `Pointwise`
/// cannot be asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointwise {
    /// Exact GELU (erf).
    Gelu,
    /// GELU with the tanh approximation.
    GeluTanh,
    Relu,
}

impl Pointwise {
    /// The pointwise activation `a` is, or `None` for the gated SwiGLU.
    pub fn of(a: Activation) -> Option<Self> {
        match a {
            Activation::Gelu => Some(Pointwise::Gelu),
            Activation::GeluTanh => Some(Pointwise::GeluTanh),
            Activation::Relu => Some(Pointwise::Relu),
            Activation::Swiglu => None,
        }
    }

    /// Applies the activation elementwise: the one dispatch every channel mixer uses.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Pointwise::Gelu => crate::kernels::gelu_erf(x)?,
            Pointwise::GeluTanh => x.gelu()?,
            Pointwise::Relu => x.relu()?,
        })
    }
}

/// A channel mixer maps `[.., d]` to `[.., d]` position by position.
pub trait ChannelMixer: std::fmt::Debug + Send + Sync {
    /// Transforms `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// How many nested granularities this mixer offers (1: not nested).
    fn granularities(&self) -> usize {
        1
    }

    /// Forces granularity `index` (MatFormer); `None` returns to the configured one.
    fn set_granularity(&self, _index: Option<usize>) {}
}

/// Parameters of the channel mixer of `spec` in a model of width `d`, as [`build`] makes
/// them (saturating).
pub fn param_count(spec: &FfnSpec, d: usize) -> u128 {
    let hidden = spec.hidden(d);
    match spec {
        FfnSpec::Mlp {
            activation,
            bias,
            rank,
            ..
        } => {
            let up = Linear::param_count(d, hidden, *rank, *bias);
            let ups: u128 = if Pointwise::of(*activation).is_some() {
                1
            } else {
                2
            };
            up.saturating_mul(ups)
                .saturating_add(Linear::param_count(hidden, d, *rank, *bias))
        }
        FfnSpec::MatFormer { bias, .. } => Linear::param_count(d, hidden, None, *bias)
            .saturating_add(Linear::param_count(hidden, d, None, *bias)),
    }
}

/// Values a training forward pass of the channel mixer keeps per token for the backward
/// pass (an estimate for memory bounds): its input, the hidden layer before and after the
/// activation (and the gate's), its output.
pub fn saved_per_token(spec: &FfnSpec, d: usize) -> u128 {
    let hidden = spec.hidden(d) as u128;
    let gated = matches!(
        spec,
        FfnSpec::Mlp {
            activation: Activation::Swiglu,
            ..
        }
    );
    let layers: u128 = if gated { 3 } else { 2 };
    layers.saturating_mul(hidden).saturating_add(2 * d as u128)
}

/// Builds the channel mixer of `spec` with its parameters under `p`.
pub fn build(spec: &FfnSpec, cfg: &ModelConfig, p: &Params) -> Result<Box<dyn ChannelMixer>> {
    Ok(match spec {
        FfnSpec::Mlp {
            activation,
            bias,
            rank,
            ..
        } => Box::new(mlp::Mlp::new(
            p,
            cfg.d_model,
            spec.hidden(cfg.d_model),
            *activation,
            *bias,
            *rank,
        )?),
        FfnSpec::MatFormer {
            granularities,
            active,
            activation,
            bias,
            ..
        } => Box::new(matformer::MatMlp::new(
            p,
            cfg.d_model,
            spec.hidden(cfg.d_model),
            granularities,
            active.unwrap_or(granularities.len() - 1),
            Pointwise::of(*activation).ok_or_else(|| {
                Error::config(
                    "ffn.activation",
                    "the nested MLP takes gelu, gelu_tanh or relu",
                )
            })?,
            *bias,
        )?),
    })
}
