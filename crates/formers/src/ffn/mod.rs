//! Channel mixers: the part of a block that transforms each position on its own.
//! One file per mixer; [`build`] maps an [`FfnSpec`] to its implementation.

pub mod matformer;
pub mod mlp;

use candle_core::Tensor;

use crate::config::{FfnSpec, ModelConfig};
use crate::params::Params;
use crate::Result;

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
            *activation,
            *bias,
        )?),
    })
}
