//! Token mixers: the part of a block that moves information between positions.
//! One file per mixer; [`build`] maps a [`MixerSpec`] to its implementation.

pub mod attention;
pub mod flow;
pub mod linear;
pub mod linformer;
pub mod local;
pub mod pooling;

use candle_core::Tensor;

use crate::config::{MixerSpec, ModelConfig};
use crate::params::Params;
use crate::position::Rope;
use crate::Result;

/// What a mixer needs to know besides its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct MixCtx<'a> {
    /// Additive key bias `[b, 1, 1, n]`: 0 for real tokens, [`MASKED`] for padding.
    pub key_bias: Option<&'a Tensor>,
    /// Position of the first input token (non-zero when decoding with a cache).
    pub offset: usize,
    /// Rotary tables when the model uses RoPE.
    pub rope: Option<&'a Rope>,
    /// ALiBi head slopes `[h]` when the model uses ALiBi.
    pub alibi: Option<&'a Tensor>,
    /// Value residual (ResFormer): the first attention layer leaves its values here; later
    /// ones mix them into theirs with weight `1 − value_lambda`.
    pub first_values: Option<&'a std::cell::RefCell<Option<Tensor>>>,
    /// `λ` of the value residual.
    pub value_lambda: f64,
    /// `(start, len)` of each sequence when the batch is packed padding-free into one
    /// row (`x` is `[1, total, d]`); mixers must not mix across these boundaries.
    pub segments: Option<&'a [(usize, usize)]>,
}

/// Score added to masked positions: finite, so fully masked rows stay NaN-free.
pub const MASKED: f64 = -1e30;

/// State a mixer keeps between decoding steps (keys and values for attention).
#[derive(Debug, Clone, Default)]
pub struct MixerCache {
    /// Mixer-defined tensors (attention: `[k, v]`, each `[b, h, t, dh]`).
    pub tensors: Vec<Tensor>,
}

/// A token mixer maps `[b, n, d]` to `[b, n, d]`.
pub trait TokenMixer: std::fmt::Debug + Send + Sync {
    /// Mixes `x`; with `cache`, `x` continues the sequence the cache holds.
    fn forward(&self, x: &Tensor, ctx: &MixCtx, cache: Option<&mut MixerCache>) -> Result<Tensor>;
}

/// Builds the mixer of `spec` with its parameters under `p`.
pub fn build(spec: &MixerSpec, cfg: &ModelConfig, p: &Params) -> Result<Box<dyn TokenMixer>> {
    use attention::{Attention, Kernel};
    let (shared_qk, gate, rank) = match spec {
        MixerSpec::Attention {
            shared_qk,
            gate,
            rank,
            ..
        } => (*shared_qk, *gate, *rank),
        _ => (false, false, None),
    };
    let (causal, bias, kernel) = match spec {
        MixerSpec::Attention {
            causal,
            q_chunk,
            k_chunk,
            bias,
            clip,
            ..
        } => (
            *causal,
            *bias,
            Kernel::Full {
                q_chunk: *q_chunk,
                k_chunk: *k_chunk,
                clip: *clip,
            },
        ),
        MixerSpec::Local {
            window,
            global,
            causal,
            chunk,
            bias,
        } => (
            *causal,
            *bias,
            Kernel::Local {
                window: *window,
                global: *global,
                chunk: *chunk,
            },
        ),
        MixerSpec::Linear {
            feature,
            causal,
            features,
            seed,
            chunk,
            bias,
        } => (
            *causal,
            *bias,
            Kernel::Linear(linear::LinearKernel::new(
                *feature,
                *features,
                *seed,
                cfg.head_dim(),
                *chunk,
                p.dtype(),
                p.device(),
            )?),
        ),
        MixerSpec::Linformer { k, shared, bias } => {
            let heads = if *shared { None } else { Some(cfg.n_heads) };
            let proj = linformer::LinformerProj::new(p, *k, cfg.max_len, heads)?;
            (false, *bias, Kernel::Linformer(proj))
        }
        MixerSpec::Flow { bias } => (false, *bias, Kernel::Flow),
        MixerSpec::Pool { window, causal } => {
            return Ok(Box::new(pooling::Pool {
                window: *window,
                causal: *causal,
            }))
        }
    };
    Ok(Box::new(Attention::new(
        cfg,
        p,
        attention::AttentionOpts {
            causal,
            bias,
            shared_qk,
            gate,
            rank,
            kernel,
        },
    )?))
}
