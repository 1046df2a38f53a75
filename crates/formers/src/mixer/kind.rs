//! What a token mixer is: the [`TokenMixer`] trait and its context ([`MixCtx`], segments,
//! caches, the value residual), the [`MixerKind`] trait a mixer's config implements, its
//! [`Capabilities`] and [`MixerDims`], and the checks every mixer file shares.

use candle_core::Tensor;

use crate::params::Params;
use crate::position::Rope;
use crate::{Error, Result};

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
    /// The value residual (ResFormer), when the model mixes values across layers.
    pub value_residual: Option<ValueResidual<'a>>,
    /// The sequences packed padding-free into one row (`x` is `[1, total, d]`); mixers
    /// must not mix across their boundaries.
    pub segments: Option<&'a [Segment]>,
}

impl<'a> MixCtx<'a> {
    /// The context of one sequence of a packed batch: its own offset, no segments.
    pub fn sequence(&self, s: &Segment) -> MixCtx<'a> {
        MixCtx {
            offset: s.offset,
            segments: None,
            ..*self
        }
    }
}

/// One sequence of a packed batch: rows `start..start + len`, its first token at position
/// `offset` (the tokens its decoding cache holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First row.
    pub start: usize,
    /// Rows.
    pub len: usize,
    /// Position of its first token.
    pub offset: usize,
}

/// The value residual (ResFormer, Zhou et al. 2024) as a layer sees it: an input of the
/// layer (the first layer's values) whose output ([`Mixed::values`]) the stack hands on.
#[derive(Debug, Clone, Copy)]
pub struct ValueResidual<'a> {
    /// A later layer's values become `lambda · v + (1 − lambda) · first`.
    pub lambda: f64,
    /// The values `[b, h, n, dh]` of the first layer that has values; `None` until then.
    pub first: Option<&'a Tensor>,
}

/// Score added to masked positions: finite, so fully masked rows stay NaN-free.
pub const MASKED: f64 = -1e30;

/// State a mixer keeps between decoding steps (keys and values for attention).
#[derive(Debug, Clone, Default)]
pub struct MixerCache {
    /// Mixer-defined tensors (attention: `[k, v]`, each `[b, h, t, dh]`).
    pub tensors: Vec<Tensor>,
}

/// What a token mixer returns.
#[derive(Debug, Clone)]
pub struct Mixed {
    /// The mixed tokens, `[b, n, d]`.
    pub y: Tensor,
    /// Under a value residual whose first values are not set yet, this layer's values
    /// (`[b, h, n, dh]`), which become the first values of every later layer.
    pub values: Option<Tensor>,
}

/// A token mixer maps `[b, n, d]` to `[b, n, d]`.
pub trait TokenMixer: std::fmt::Debug + Send + Sync {
    /// Mixes `x`. `caches` is empty, or holds what `x` continues (causal models only):
    /// one cache for an unpacked batch, or one per sequence of `ctx.segments` (a decoding
    /// step over independent sequences, each with its own offset).
    fn mix(&self, x: &Tensor, ctx: &MixCtx, caches: &mut [&mut MixerCache]) -> Result<Mixed>;

    /// [`Self::mix`] with at most one cache, the mixed tokens alone.
    fn forward(&self, x: &Tensor, ctx: &MixCtx, cache: Option<&mut MixerCache>) -> Result<Tensor> {
        let mixed = match cache {
            Some(cache) => self.mix(x, ctx, &mut [cache])?,
            None => self.mix(x, ctx, &mut [])?,
        };
        Ok(mixed.y)
    }
}

/// `f(segment, its context, its cache)` for each sequence of a packed batch, in order;
/// `caches` is empty or has one per sequence.
pub(crate) fn per_segment(
    segments: &[Segment],
    ctx: &MixCtx,
    caches: &mut [&mut MixerCache],
    mut f: impl FnMut(&Segment, &MixCtx, Option<&mut MixerCache>) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    if !caches.is_empty() && caches.len() != segments.len() {
        return Err(Error::Input(format!(
            "a packed batch of {} sequences takes one cache per sequence, found {}",
            segments.len(),
            caches.len()
        )));
    }
    let mut caches = caches.iter_mut();
    segments
        .iter()
        .map(|s| f(s, &ctx.sequence(s), caches.next().map(|c| &mut **c)))
        .collect()
}

/// The one cache of an unpacked batch, if any.
pub(crate) fn single<'c>(caches: &'c mut [&mut MixerCache]) -> Result<Option<&'c mut MixerCache>> {
    match caches {
        [] => Ok(None),
        [cache] => Ok(Some(&mut **cache)),
        _ => Err(Error::Input(format!(
            "an unpacked batch takes one cache, found {}",
            caches.len()
        ))),
    }
}

/// The model-level facts a mixer is configured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MixerDims {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads (divides `d_model`).
    pub n_heads: usize,
    /// Longest sequence.
    pub max_len: usize,
    /// The model is a decoder: position `i` may only see positions `<= i`.
    pub causal: bool,
}

impl MixerDims {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// What a mixer can do; config validation refuses a model that asks for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// It has a causal form (then it also decodes with a cache).
    pub causal: bool,
    /// It applies ALiBi's distance penalties to softmax scores.
    pub alibi: bool,
    /// It has queries and keys for RoPE to rotate.
    pub rope: bool,
}

/// One kind of token mixer: its config struct implements this.
pub trait MixerKind {
    /// Its `kind` tag, for messages.
    fn name(&self) -> &'static str;
    /// What it can honour.
    fn capabilities(&self) -> Capabilities;
    /// Rejects impossible values; `at` is the key of the spec (e.g. `defaults.mixer`).
    fn validate(&self, at: &str, dims: &MixerDims) -> Result<()>;
    /// The mixer with its parameters under `p`; a frozen `p` builds the inference form.
    fn build(&self, dims: &MixerDims, p: &Params) -> Result<Box<dyn TokenMixer>>;
    /// Forward FLOPs per token on sequences of `n` tokens (two per multiply-add of the
    /// matrix products; softmax and activations left out).
    fn flops_per_token(&self, dims: &MixerDims, n: usize) -> f64;
    /// Its parameters in a model of `dims`, exactly what `build` creates (saturating, so
    /// memory bounds can be checked before anything is built).
    fn param_count(&self, dims: &MixerDims) -> u128;
    /// Values a training forward pass keeps for the backward pass, per token of sequences
    /// of `n` tokens: an estimate for memory bounds. By default the q, k, v projections and
    /// the mixed output with their inputs, as for a mixer linear in `n`.
    fn saved_per_token(&self, dims: &MixerDims, _n: usize) -> u128 {
        8 * dims.d_model as u128
    }
    /// Values its decoding cache holds for one sequence after `n` tokens (causal models;
    /// an estimate for memory bounds). By default a key and a value per token: `2·n·d`.
    fn cache_values(&self, dims: &MixerDims, n: usize) -> u128 {
        (2 * n as u128).saturating_mul(dims.d_model as u128)
    }
}

/// Each `(key, value)` must be at least 1, and at most [`crate::bounds::MAX_LEN`] (no
/// mixer size is larger than the longest sequence formers takes).
pub(crate) fn positive(at: &str, pairs: &[(&str, usize)]) -> Result<()> {
    for (key, v) in pairs {
        if *v == 0 {
            return Err(Error::config(format!("{at}.{key}"), "must be at least 1"));
        }
        if *v > crate::bounds::MAX_LEN {
            return Err(Error::config(
                format!("{at}.{key}"),
                format!("must be at most {}, found {v}", crate::bounds::MAX_LEN),
            ));
        }
    }
    Ok(())
}

/// Serde default `true`, shared by every config struct.
pub(crate) fn yes() -> bool {
    true
}

/// `[b, 1, m, 1]`: 1 for keys that a key bias `[b, 1, 1, m]` keeps, 0 for padding.
pub(crate) fn keep_mask(
    key_bias: Option<&Tensor>,
    dtype: candle_core::DType,
) -> Result<Option<Tensor>> {
    key_bias
        .map(|kb| {
            let (b, _, _, m) = kb.dims4()?;
            Ok(kb.ge(-1.0)?.to_dtype(dtype)?.reshape((b, 1, m, 1))?)
        })
        .transpose()
}

/// Refuses a padded batch in a decoding step.
pub(crate) fn no_padding_in_cache(key_bias: Option<&Tensor>) -> Result<()> {
    if key_bias.is_some() {
        return Err(Error::Input("a KV cache takes unpadded sequences".into()));
    }
    Ok(())
}

/// The error of a bidirectional mixer asked to decode.
pub(crate) fn no_cache(name: &str) -> Error {
    Error::Input(format!(
        "{name} is bidirectional: it does not decode with a cache"
    ))
}
