//! The multi-head shell shared by the attention family (Vaswani et al. 2017): q, k, v, o
//! projections, the split into heads, RoPE, the value residual, padding-free segments and
//! the optional per-head output gate. A [`HeadKernel`] decides how queries meet keys.

use candle_core::Tensor;

use super::kind::{per_segment, single, MixCtx, Mixed, MixerCache, MixerDims, TokenMixer};
use super::route::{route, Case, Route};
use crate::kernels::attention_op::{flash_attention_merged, flash_attention_qkv, FlashMask};
use crate::linear::Linear;
use crate::params::Params;
use crate::Result;

/// How queries meet keys and values, per head.
pub trait HeadKernel: std::fmt::Debug + Send + Sync {
    /// Mixes `q [b, h, n, dh]` with `k, v [b, h, n, dh]` of the same tokens (RoPE already
    /// applied). `ctx.offset` is the position of the first token; with `cache` the tokens
    /// continue what earlier calls left there (causal models only).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor>;

    /// The masks under which the fused attention op computes what [`Self::attend`] does
    /// without a cache; `None` when this kernel has no fused form. When [`route`] takes
    /// [`Route::FusedMerged`], [`MultiHead`] projects q, k and v in one product and never
    /// splits the heads out of the projections (the op does, inside).
    fn flash_mask<'a>(&self, _ctx: &MixCtx<'a>) -> Option<FlashMask<'a>> {
        None
    }
}

/// The projections around a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Projections {
    /// Biases on q, k, v and o.
    pub bias: bool,
    /// Queries use the key projection (Key-Value Transformer).
    pub shared_qk: bool,
    /// Per-head sigmoid output gate (gated attention, Bondarenko et al. 2023).
    pub gate: bool,
    /// Low-rank q, k, v, o projections `U·V` (Greenformers LRT).
    pub rank: Option<usize>,
}

impl Projections {
    /// Dense q, k, v, o.
    pub fn plain(bias: bool) -> Self {
        Projections {
            bias,
            shared_qk: false,
            gate: false,
            rank: None,
        }
    }

    /// Parameters of the projections (and gate) in a model of `dims`.
    pub fn param_count(&self, dims: &MixerDims) -> u128 {
        let d = dims.d_model;
        let one = Linear::param_count(d, d, self.rank, self.bias);
        let count: u128 = if self.shared_qk { 3 } else { 4 };
        let gate = if self.gate {
            Linear::param_count(d, dims.n_heads, None, true)
        } else {
            0
        };
        one.saturating_mul(count).saturating_add(gate)
    }

    /// Forward FLOPs per token of the projections in a model of width `d`.
    pub fn flops_per_token(&self, d: usize) -> f64 {
        let d = d as f64;
        let one = match self.rank {
            Some(r) => 2.0 * r as f64 * (d + d),
            None => 2.0 * d * d,
        };
        // The gate (`d → heads`) is counted as one more projection, an upper bound.
        let count = if self.shared_qk { 3.0 } else { 4.0 } + if self.gate { 1.0 } else { 0.0 };
        count * one
    }
}

/// Multi-head mixing with projections `q`, `k`, `v`, `o` (and `gate`) under its prefix.
#[derive(Debug)]
pub struct MultiHead {
    /// `None` when queries share the key projection.
    q: Option<Linear>,
    /// `[d → heads]` gate logits, when gated.
    gate: Option<Linear>,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    kernel: Box<dyn HeadKernel>,
}

impl MultiHead {
    /// The shell around `kernel`, boxed as a token mixer.
    pub fn boxed(
        dims: &MixerDims,
        p: &Params,
        proj: Projections,
        kernel: impl HeadKernel + 'static,
    ) -> Result<Box<dyn TokenMixer>> {
        Ok(Box::new(MultiHead::new(dims, p, proj, Box::new(kernel))?))
    }

    /// The shell around `kernel` with parameters under `p`.
    pub fn new(
        dims: &MixerDims,
        p: &Params,
        proj: Projections,
        kernel: Box<dyn HeadKernel>,
    ) -> Result<Self> {
        let d = dims.d_model;
        let lin = |name: &str| Linear::with_rank(&p.pp(name), d, d, proj.rank, proj.bias);
        Ok(MultiHead {
            q: if proj.shared_qk {
                None
            } else {
                Some(lin("q")?)
            },
            gate: if proj.gate {
                Some(Linear::new(&p.pp("gate"), d, dims.n_heads, true)?)
            } else {
                None
            },
            k: lin("k")?,
            v: lin("v")?,
            o: lin("o")?,
            n_heads: dims.n_heads,
            kernel,
        })
    }

    /// q, k and v as one dense layer of stacked weights (`[3d, d]`, rows q then k then v),
    /// when they are trainable, dense and alike in their biases. The stack is a copy made
    /// per call, which training's one product and one gradient node repay; inference (plain
    /// tensors) keeps three products on the weights as they are.
    fn packed_qkv(&self) -> Result<Option<Linear>> {
        let Some(q) = &self.q else { return Ok(None) };
        let parts = [q, &self.k, &self.v];
        if parts
            .iter()
            .any(|l| l.factor.is_some() || !l.weight.is_variable())
        {
            return Ok(None);
        }
        let weight = Tensor::cat(&parts.map(|l| &l.weight), 0)?;
        let bias = match parts.map(|l| l.bias.as_ref()) {
            [Some(a), Some(b), Some(c)] => Some(Tensor::cat(&[a, b, c], 0)?),
            [None, None, None] => None,
            _ => return Ok(None),
        };
        Ok(Some(Linear {
            weight,
            quant: None,
            factor: None,
            bias,
        }))
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        Ok(x.reshape((b, n, self.n_heads, d / self.n_heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// q, k and v of `x [b, n, d]` split into heads `[b, h, n, dh]` (q is k when shared).
    fn qkv_heads(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let k = self.heads(&self.k.forward(x)?)?;
        let q = match &self.q {
            Some(q) => self.heads(&q.forward(x)?)?,
            None => k.clone(),
        };
        Ok((q, k, self.heads(&self.v.forward(x)?)?))
    }

    /// The heads' output `y [b, h, n, dh]` gated (per head, from `x`), merged to
    /// `[b, n, d]` and projected by `o`.
    fn output(&self, x: &Tensor, y: Tensor, (b, n, d): (usize, usize, usize)) -> Result<Tensor> {
        let y = match &self.gate {
            // [b, n, h] → [b, h, n, 1]: one gate per head and token.
            Some(g) => y.broadcast_mul(
                &candle_nn::ops::sigmoid(&g.forward(x)?)?
                    .transpose(1, 2)?
                    .unsqueeze(3)?,
            )?,
            None => y,
        };
        let y = y.transpose(1, 2)?.reshape((b, n, d))?;
        self.o.forward(&y)
    }

    /// One sequence (or a padded batch) given its heads `[b, h, n, dh]`.
    fn attend_one(
        &self,
        mut q: Tensor,
        mut k: Tensor,
        v: Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        if let Some(rope) = ctx.rope {
            q = rope.apply(&q, ctx.offset)?;
            k = rope.apply(&k, ctx.offset)?;
        }
        self.kernel.attend(&q, &k, &v, ctx, cache)
    }
}

impl TokenMixer for MultiHead {
    fn mix(&self, x: &Tensor, ctx: &MixCtx, caches: &mut [&mut MixerCache]) -> Result<Mixed> {
        let (b, n, d) = x.dims3()?;
        let mask = self.kernel.flash_mask(ctx);
        let case = Case {
            fusable: mask.is_some(),
            merged: ctx.rope.is_none()
                && ctx.value_residual.is_none()
                && ctx.segments.is_none()
                && caches.is_empty()
                && self.gate.is_none(),
            ..Case::of(x)
        };
        if let (Route::FusedMerged, Some(mask)) = (route(case), mask) {
            let y = match self.packed_qkv()? {
                Some(qkv) => flash_attention_qkv(&qkv.forward(x)?, self.n_heads, &mask)?,
                None => {
                    let k = self.k.forward(x)?;
                    let q = match &self.q {
                        Some(q) => q.forward(x)?,
                        None => k.clone(),
                    };
                    let v = self.v.forward(x)?;
                    flash_attention_merged(&q, &k, &v, self.n_heads, &mask)?
                }
            };
            return Ok(Mixed {
                y: self.o.forward(&y)?,
                values: None,
            });
        }
        let (q, k, v) = self.qkv_heads(x)?;
        let vr = ctx.value_residual;
        // The first layer with values hands them on; later ones mix them into theirs.
        let values = vr.filter(|r| r.first.is_none()).map(|_| v.clone());
        let first = vr.and_then(|r| r.first.map(|f| (r.lambda, f)));
        let part = |t: &Tensor, s: &super::kind::Segment| t.narrow(2, s.start, s.len);
        let y = match ctx.segments {
            None => {
                let v = mix_values(v, first)?;
                self.attend_one(q, k, v, ctx, single(caches)?)?
            }
            // Decoding: each sequence mixes its own part of the values.
            Some(segments) if !caches.is_empty() => {
                let parts = per_segment(segments, ctx, caches, |s, ctx, cache| {
                    let first = match first {
                        Some((lambda, f)) => Some((lambda, part(f, s)?)),
                        None => None,
                    };
                    let v = mix_values(part(&v, s)?, first.as_ref().map(|(l, f)| (*l, f)))?;
                    self.attend_one(part(&q, s)?, part(&k, s)?, v, ctx, cache)
                })?;
                Tensor::cat(&parts, 2)?
            }
            Some(segments) => {
                let v = mix_values(v, first)?;
                let parts = per_segment(segments, ctx, caches, |s, ctx, cache| {
                    self.attend_one(part(&q, s)?, part(&k, s)?, part(&v, s)?, ctx, cache)
                })?;
                Tensor::cat(&parts, 2)?
            }
        };
        Ok(Mixed {
            y: self.output(x, y, (b, n, d))?,
            values,
        })
    }
}

/// `v` under the value residual: `lambda · v + (1 − lambda) · first`, or `v` itself.
fn mix_values(v: Tensor, first: Option<(f64, &Tensor)>) -> Result<Tensor> {
    Ok(match first {
        None => v,
        Some((lambda, v1)) => ((v * lambda)? + (v1 * (1.0 - lambda))?)?,
    })
}
