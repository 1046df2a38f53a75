//! Exact multi-head softmax attention (Vaswani et al. 2017), memory-linear through the
//! chunked online softmax of [`super::softmax`], with the Quantizable Transformers'
//! clipped softmax and output gate, the Key-Value Transformer's shared query-key projection
//! and Greenformers' low-rank projections as options. Decodes with a KV cache.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::heads::{HeadKernel, MultiHead, Projections};
use super::softmax::{append_kv, attend, AttendOpts, Clip};
use super::kind::{Capabilities, MixCtx, MixerCache, MixerDims, MixerKind, TokenMixer, no_padding_in_cache, positive};
use crate::kernels::attention_op::FlashMask;
use crate::params::Params;
use crate::{Error, Result};

/// Config of exact attention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttentionSpec {
    /// Queries per chunk of the online softmax.
    #[serde(default = "default_chunk")]
    pub q_chunk: usize,
    /// Keys per chunk of the online softmax.
    #[serde(default = "default_chunk")]
    pub k_chunk: usize,
    /// Biases on the projections.
    #[serde(default = "super::kind::yes")]
    pub bias: bool,
    /// One projection for queries and keys: symmetric scores, fewer parameters
    /// (Key-Value Transformer).
    #[serde(default)]
    pub shared_qk: bool,
    /// A per-head sigmoid gate on the output (gated attention, Bondarenko et al. 2023,
    /// "Quantizable Transformers").
    #[serde(default)]
    pub gate: bool,
    /// Clipped softmax `clip((ζ − γ)·softmax + γ, 0, 1)` (same paper).
    #[serde(default)]
    pub clip: Option<Clip>,
    /// Factorise the q, k, v, o projections as `U·V` of this rank (Greenformers LRT).
    #[serde(default)]
    pub rank: Option<usize>,
}

/// Default chunk of the online softmax.
pub fn default_chunk() -> usize {
    256
}

impl Default for AttentionSpec {
    fn default() -> Self {
        AttentionSpec {
            q_chunk: default_chunk(),
            k_chunk: default_chunk(),
            bias: true,
            shared_qk: false,
            gate: false,
            clip: None,
            rank: None,
        }
    }
}

impl AttentionSpec {
    /// A small spec with every option on (what tests sweep over).
    pub fn example() -> Self {
        AttentionSpec {
            q_chunk: 3,
            k_chunk: 2,
            shared_qk: true,
            gate: true,
            clip: Some(Clip {
                gamma: -0.1,
                zeta: 1.1,
            }),
            rank: Some(3),
            ..AttentionSpec::default()
        }
    }

    fn projections(&self) -> Projections {
        Projections {
            bias: self.bias,
            shared_qk: self.shared_qk,
            gate: self.gate,
            rank: self.rank,
        }
    }
}

impl MixerKind for AttentionSpec {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            causal: true,
            alibi: true,
            rope: true,
        }
    }

    fn validate(&self, at: &str, _dims: &MixerDims) -> Result<()> {
        positive(
            at,
            &[
                ("q_chunk", self.q_chunk),
                ("k_chunk", self.k_chunk),
                ("rank", self.rank.unwrap_or(1)),
            ],
        )?;
        if let Some(Clip { gamma, zeta }) = self.clip {
            if !(gamma <= 0.0 && zeta >= 1.0 && gamma.is_finite() && zeta.is_finite()) {
                return Err(Error::config(
                    format!("{at}.clip"),
                    format!("needs finite gamma <= 0 and zeta >= 1, found gamma {gamma}, zeta {zeta}"),
                ));
            }
        }
        Ok(())
    }

    fn build(&self, dims: &MixerDims, p: &Params) -> Result<Box<dyn TokenMixer>> {
        let kernel = FullKernel {
            q_chunk: self.q_chunk,
            k_chunk: self.k_chunk,
            clip: self.clip,
            causal: dims.causal,
            inference: !p.is_trainable(),
        };
        MultiHead::boxed(dims, p, self.projections(), kernel)
    }

    fn flops_per_token(&self, dims: &MixerDims, n: usize) -> f64 {
        let n = n as f64;
        // Scores q·k and the weighted sum of values over the keys each query sees.
        let keys = if dims.causal { (n + 1.0) / 2.0 } else { n };
        self.projections().flops_per_token(dims.d_model) + 4.0 * keys * dims.d_model as f64
    }

    fn param_count(&self, dims: &MixerDims) -> u128 {
        self.projections().param_count(dims)
    }

    fn saved_per_token(&self, dims: &MixerDims, n: usize) -> u128 {
        // The fused op (plain softmax) keeps each row's output and log-sum-exp; the
        // clipped softmax keeps the scores and probabilities of every key, per head.
        let per_key = if self.clip.is_none() { 0 } else { n as u128 };
        8 * dims.d_model as u128 + 2 * (dims.n_heads as u128).saturating_mul(per_key.max(1))
    }
}

/// Exact softmax over every key a query may see.
#[derive(Debug, Clone)]
pub struct FullKernel {
    /// Queries per chunk.
    pub q_chunk: usize,
    /// Keys per chunk.
    pub k_chunk: usize,
    /// Clipped softmax.
    pub clip: Option<Clip>,
    /// Query `i` sees keys `<= i`.
    pub causal: bool,
    /// Built for inference (forward-only fast paths allowed).
    pub inference: bool,
}

impl HeadKernel for FullKernel {
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        let (k, v) = match cache {
            Some(cache) => {
                no_padding_in_cache(ctx.key_bias)?;
                append_kv(cache, k, v)?
            }
            None => (k.clone(), v.clone()),
        };
        let opts = AttendOpts {
            causal: self.causal,
            q_offset: k.dim(2)? - q.dim(2)?,
            key_bias: ctx.key_bias,
            alibi: ctx.alibi,
            clip: self.clip,
            q_chunk: self.q_chunk,
            k_chunk: self.k_chunk,
            inference: self.inference,
        };
        attend(q, &k, &v, &opts)
    }

    fn flash_mask<'a>(&self, ctx: &MixCtx<'a>) -> Option<FlashMask<'a>> {
        // Clipping has no fused form. Inference takes the fused op too: without the split
        // into heads it beat `attend`'s single-tile candle path on MiniLM embeddings.
        if self.clip.is_some() {
            return None;
        }
        Some(FlashMask {
            causal: self.causal,
            key_bias: ctx.key_bias,
            alibi: ctx.alibi,
            ..Default::default()
        })
    }
}
