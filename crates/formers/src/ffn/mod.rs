//! Channel mixers: the part of a block that transforms each position on its own.
//! One file per mixer; [`build`] maps an [`FfnSpec`] to its implementation.

mod kind;
pub mod matformer;
pub mod mlp;

pub use kind::{Activation, ChannelMixer, FfnSpec, Pointwise};

use crate::linear::Linear;
use crate::params::Params;
use crate::{Error, Result};

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
pub fn build(spec: &FfnSpec, d_model: usize, p: &Params) -> Result<Box<dyn ChannelMixer>> {
    Ok(match spec {
        FfnSpec::Mlp {
            activation,
            bias,
            rank,
            ..
        } => Box::new(mlp::Mlp::new(
            p,
            d_model,
            spec.hidden(d_model),
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
            d_model,
            spec.hidden(d_model),
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
