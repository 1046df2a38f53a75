//! Sliding-window attention (Longformer, Beltagy et al. 2020): query `i` attends to keys
//! `j` with `|i - j| <= window` (and `j <= i` when causal), plus the first `global`
//! positions, which attend to and are attended by every position. Queries go in blocks of
//! `chunk`, each against only the keys its band can reach (and the global ones), so cost is
//! O(n·(window + global)), not a masked O(n²).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::heads::{HeadKernel, MultiHead, Projections};
use super::kind::{Capabilities, MASKED, MixCtx, MixerCache, MixerDims, MixerKind, TokenMixer, no_padding_in_cache, positive};
use super::route::{route, Case, Route};
use crate::kernels::attention_op::{flash_attention, FlashMask};
use crate::params::Params;
use crate::Result;

/// Config of sliding-window attention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// Keys at most this far from the query are seen.
    pub window: usize,
    /// Leading positions with global attention (Longformer's global tokens).
    #[serde(default)]
    pub global: usize,
    /// Queries per block.
    #[serde(default = "super::attention::default_chunk")]
    pub chunk: usize,
    /// Biases on the projections.
    #[serde(default = "super::kind::yes")]
    pub bias: bool,
}

impl LocalSpec {
    /// A small spec with global tokens (what tests sweep over).
    pub fn example() -> Self {
        LocalSpec {
            window: 2,
            global: 1,
            chunk: 2,
            bias: true,
        }
    }
}

impl MixerKind for LocalSpec {
    fn name(&self) -> &'static str {
        "local"
    }

    /// The global tokens' keys and values and those of the last `window` tokens.
    fn cache_values(&self, dims: &MixerDims, n: usize) -> u128 {
        let kept = (self.global.min(n) + self.window.min(n)).min(n) as u128;
        (2 * kept).saturating_mul(dims.d_model as u128)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            causal: true,
            alibi: true,
            rope: true,
        }
    }

    fn validate(&self, at: &str, _dims: &MixerDims) -> Result<()> {
        positive(at, &[("window", self.window), ("chunk", self.chunk)])?;
        if self.global > crate::bounds::MAX_LEN {
            positive(at, &[("global", self.global)])?;
        }
        Ok(())
    }

    fn build(&self, dims: &MixerDims, p: &Params) -> Result<Box<dyn TokenMixer>> {
        let kernel = LocalKernel {
            window: self.window,
            global: self.global,
            chunk: self.chunk,
            causal: dims.causal,
        };
        MultiHead::boxed(dims, p, Projections::plain(self.bias), kernel)
    }

    fn flops_per_token(&self, dims: &MixerDims, n: usize) -> f64 {
        let w = self.window as f64;
        let span = if dims.causal { w + 1.0 } else { 2.0 * w + 1.0 };
        let g = self.global as f64;
        // Windowed keys, plus the global keys for every query and all keys for the global
        // queries (amortised over the n tokens).
        Projections::plain(self.bias).flops_per_token(dims.d_model)
            + 4.0 * dims.d_model as f64 * (span.min(n as f64) + g + g)
    }

    fn param_count(&self, dims: &MixerDims) -> u128 {
        Projections::plain(self.bias).param_count(dims)
    }

    fn saved_per_token(&self, dims: &MixerDims, _n: usize) -> u128 {
        // The fused op (f32 on the CPU, as for `attention`) keeps each row's output and
        // log-sum-exp per head, whatever the window; the band's scores are recomputed.
        8 * dims.d_model as u128 + 2 * dims.n_heads as u128
    }
}

/// Banded softmax with global tokens; its decoding cache keeps only the global keys and
/// the last `window` keys.
#[derive(Debug, Clone)]
pub struct LocalKernel {
    window: usize,
    global: usize,
    chunk: usize,
    causal: bool,
}

impl HeadKernel for LocalKernel {
    fn flash_mask<'a>(&self, ctx: &MixCtx<'a>) -> Option<FlashMask<'a>> {
        Some(FlashMask {
            causal: self.causal,
            key_bias: ctx.key_bias,
            alibi: ctx.alibi,
            window: Some(self.window),
            global: self.global,
            ..Default::default()
        })
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        let opts = LocalOpts {
            window: self.window,
            chunk: self.chunk,
            causal: self.causal,
            q_offset: 0,
            key_bias: ctx.key_bias,
            alibi: ctx.alibi,
            global: self.global,
        };
        let Some(cache) = cache else {
            return attend_local(q, k, v, &opts);
        };
        no_padding_in_cache(ctx.key_bias)?;
        let n = q.dim(2)?;
        let (y, pos, k, v) = match cache.tensors.as_slice() {
            [] => {
                let pos: Vec<usize> = (0..n).collect();
                (attend_local(q, k, v, &opts)?, pos, k.clone(), v.clone())
            }
            [gk, gv, rk, rv] => {
                // Held keys: global positions 0..g, then the recent ones just before offset.
                let (g, r) = (gk.dim(2)?, rk.dim(2)?);
                let pos: Vec<usize> = (0..g)
                    .chain(ctx.offset - r..ctx.offset)
                    .chain(ctx.offset..ctx.offset + n)
                    .collect();
                let k = Tensor::cat(&[gk, rk, k], 2)?;
                let v = Tensor::cat(&[gv, rv, v], 2)?;
                (self.attend_at(q, &k, &v, ctx, &pos)?, pos, k, v)
            }
            _ => unreachable!("the local cache holds four tensors"),
        };
        // Future queries see the global keys and keys less than `window` behind them.
        let end = ctx.offset + n;
        let is_global = |p: usize| p < self.global;
        let is_recent = |p: usize| !is_global(p) && p + self.window >= end;
        let pick = |t: &Tensor, keep: &dyn Fn(usize) -> bool| -> Result<Tensor> {
            let idx: Vec<u32> = (0..pos.len())
                .filter(|&i| keep(pos[i]))
                .map(|i| i as u32)
                .collect();
            let idx = Tensor::from_vec(idx.clone(), idx.len(), t.device())?;
            // `index_select` takes contiguous tensors; a caller's keys may be a strided view
            // (one sequence of a packed decoding step).
            Ok(t.contiguous()?.index_select(&idx, 2)?)
        };
        cache.tensors = vec![
            pick(&k, &is_global)?,
            pick(&v, &is_global)?,
            pick(&k, &is_recent)?,
            pick(&v, &is_recent)?,
        ];
        Ok(y)
    }
}

impl LocalKernel {
    /// Causal banded attention of queries at `ctx.offset..` over keys at positions `pos`.
    fn attend_at(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &MixCtx,
        pos: &[usize],
    ) -> Result<Tensor> {
        let (_, _, n, dh) = q.dims4()?;
        let queries: Vec<usize> = (ctx.offset..ctx.offset + n).collect();
        let bias: Vec<f64> = queries
            .iter()
            .flat_map(|&qi| {
                pos.iter().map(move |&kj| {
                    let seen = kj <= qi
                        && (qi - kj <= self.window || kj < self.global || qi < self.global);
                    if seen {
                        0.0
                    } else {
                        MASKED
                    }
                })
            })
            .collect();
        let bias = Tensor::from_vec(bias, (n, pos.len()), q.device())?.to_dtype(q.dtype())?;
        let mut s = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(&bias)?;
        if let Some(slopes) = ctx.alibi {
            s = s.broadcast_add(&crate::position::alibi_bias_at(slopes, &queries, pos, &s)?)?;
        }
        let p = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
        Ok(p.matmul(v)?.broadcast_div(&p.sum_keepdim(D::Minus1)?)?)
    }
}

/// How [`attend_local`] bands and blocks.
#[derive(Debug, Clone, Copy)]
pub struct LocalOpts<'a> {
    pub window: usize,
    pub chunk: usize,
    pub causal: bool,
    /// Position of the first query among the keys (keys before it come from a cache).
    pub q_offset: usize,
    /// Additive bias on keys, `[b, 1, 1, m]`.
    pub key_bias: Option<&'a Tensor>,
    /// ALiBi slopes `[h]`.
    pub alibi: Option<&'a Tensor>,
    /// Leading positions with global attention.
    pub global: usize,
}

/// Banded softmax attention of `q [b, h, n, dh]` over `k, v [b, h, m, dh]`.
///
/// f32 on the CPU runs the fused FlashAttention op with the band as its mask (key blocks
/// outside every band skipped, O(n·w) time, O(n·d) memory); other types and devices the
/// candle path below (query chunks against their band of keys), its reference.
pub fn attend_local(q: &Tensor, k: &Tensor, v: &Tensor, o: &LocalOpts) -> Result<Tensor> {
    // The band has no single-tile path.
    let case = Case {
        fusable: true,
        ..Case::of(q)
    };
    if route(case) == Route::Fused {
        let mask = FlashMask {
            causal: o.causal,
            q_offset: o.q_offset,
            key_bias: o.key_bias,
            alibi: o.alibi,
            window: Some(o.window),
            global: o.global,
        };
        return flash_attention(q, k, v, &mask);
    }
    let (_, _, n, dh) = q.dims4()?;
    let m = k.dim(2)?;
    let c = o.chunk.max(1);
    let scale = 1.0 / (dh as f64).sqrt();
    let mut outs = Vec::with_capacity(n.div_ceil(c));
    for qs in (0..n).step_by(c) {
        let ql = c.min(n - qs);
        let first = qs + o.q_offset;
        let last = first + ql - 1;
        let lo = first.saturating_sub(o.window);
        let hi = if o.causal {
            last + 1
        } else {
            last + o.window + 1
        }
        .min(m);
        let kl = hi - lo;
        let qi = (q.narrow(2, qs, ql)? * scale)?;
        let mut s = qi.matmul(&k.narrow(2, lo, kl)?.t()?)?;
        s = s.broadcast_add(&band_bias(
            first, ql, lo, kl, o.window, o.global, o.causal, &s,
        )?)?;
        if let Some(kb) = o.key_bias {
            s = s.broadcast_add(&kb.narrow(3, lo, kl)?)?;
        }
        if let Some(slopes) = o.alibi {
            s = s.broadcast_add(&crate::position::alibi_bias(slopes, first, ql, lo, kl, &s)?)?;
        }
        // Global keys left of the band (always earlier than these queries, so causal-safe).
        let g = o.global.min(lo);
        let (s, vj) = if g > 0 {
            let mut sg = qi.matmul(&k.narrow(2, 0, g)?.t()?)?;
            if let Some(kb) = o.key_bias {
                sg = sg.broadcast_add(&kb.narrow(3, 0, g)?)?;
            }
            if let Some(slopes) = o.alibi {
                sg =
                    sg.broadcast_add(&crate::position::alibi_bias(slopes, first, ql, 0, g, &sg)?)?;
            }
            let vj = Tensor::cat(&[&v.narrow(2, 0, g)?, &v.narrow(2, lo, kl)?], 2)?;
            (Tensor::cat(&[&sg, &s], D::Minus1)?, vj)
        } else {
            (s, v.narrow(2, lo, kl)?)
        };
        let p = s
            .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        let y = p.matmul(&vj)?;
        outs.push(y.broadcast_div(&p.sum_keepdim(D::Minus1)?)?);
    }
    let out = Tensor::cat(&outs, 2)?;
    // Global queries attend to every key they may see.
    let gq = o.global.saturating_sub(o.q_offset).min(n);
    if gq == 0 {
        return Ok(out);
    }
    let full = super::softmax::AttendOpts {
        causal: o.causal,
        q_offset: o.q_offset,
        key_bias: o.key_bias,
        alibi: o.alibi,
        q_chunk: c,
        k_chunk: c,
        ..Default::default()
    };
    let rows = super::softmax::attend(&q.narrow(2, 0, gq)?, k, v, &full)?;
    if gq == n {
        return Ok(rows);
    }
    Ok(Tensor::cat(&[&rows, &out.narrow(2, gq, n - gq)?], 2)?)
}

/// `[ql, kl]`: 0 where key `lo + j` is inside query `first + i`'s band or global,
/// [`MASKED`] elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn band_bias(
    first: usize,
    ql: usize,
    lo: usize,
    kl: usize,
    window: usize,
    global: usize,
    causal: bool,
    like: &Tensor,
) -> Result<Tensor> {
    let v: Vec<f64> = (0..ql)
        .flat_map(|i| {
            (0..kl).map(move |j| {
                let (qi, kj) = (first + i, lo + j);
                let inside = (qi.abs_diff(kj) <= window || kj < global) && (!causal || kj <= qi);
                if inside {
                    0.0
                } else {
                    MASKED
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(v, (ql, kl), like.device())?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::softmax::reference_attend;
    use crate::testutil::{max_rel, randn};
    use candle_core::Var;

    /// The O(n²) band reference: full scores, explicit band mask, plain softmax.
    fn reference_band(q: &Tensor, k: &Tensor, v: &Tensor, window: usize, causal: bool) -> Tensor {
        let (_, _, n, dh) = q.dims4().unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (dh as f64).sqrt()).unwrap();
        let s = s
            .broadcast_add(&band_bias(0, n, 0, n, window, 0, causal, &s).unwrap())
            .unwrap();
        let e = s.exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(3).unwrap())
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn window_covering_the_sequence_equals_full_attention_values_and_gradients() {
        let n = 11;
        for causal in [false, true] {
            for chunk in [1, 4, 11] {
                let q = Var::from_tensor(&randn(&[2, 2, n, 4], 1)).unwrap();
                let k = Var::from_tensor(&randn(&[2, 2, n, 4], 2)).unwrap();
                let v = Var::from_tensor(&randn(&[2, 2, n, 4], 3)).unwrap();
                let o = LocalOpts {
                    window: n,
                    chunk,
                    causal,
                    q_offset: 0,
                    key_bias: None,
                    alibi: None,
                    global: 0,
                };
                let fast = attend_local(&q, &k, &v, &o).unwrap();
                let full = reference_attend(&q, &k, &v, causal, 0, None).unwrap();
                assert!(max_rel(&fast, &full) < 1e-10);
                let r = randn(&[2, 2, n, 4], 4);
                let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = (full * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for var in [&q, &k, &v] {
                    assert!(max_rel(gf.get(var).unwrap(), gs.get(var).unwrap()) < 1e-10);
                }
            }
        }
    }

    #[test]
    fn narrow_windows_equal_the_banded_reference() {
        let n = 17;
        let (q, k, v) = (
            randn(&[1, 2, n, 4], 5),
            randn(&[1, 2, n, 4], 6),
            randn(&[1, 2, n, 4], 7),
        );
        for (window, chunk, causal) in [(0, 4, false), (2, 4, false), (3, 5, true), (5, 16, false)]
        {
            let o = LocalOpts {
                window,
                chunk,
                causal,
                q_offset: 0,
                key_bias: None,
                alibi: None,
                global: 0,
            };
            let fast = attend_local(&q, &k, &v, &o).unwrap();
            assert!(
                max_rel(&fast, &reference_band(&q, &k, &v, window, causal)) < 1e-10,
                "w={window}"
            );
        }
    }

    /// The f32 path (the fused kernel with a band mask) against the f64 candle path, values
    /// and gradients, with padding, ALiBi, global tokens and a query offset. Tolerances are
    /// f32 rounding.
    #[test]
    fn the_fused_f32_band_equals_the_candle_path() {
        use candle_core::DType;
        let (b, h, n, d) = (2, 2, 150, 8);
        let slopes = Tensor::new(&[0.5f64, 0.25], &candle_core::Device::Cpu).unwrap();
        let kb: Vec<f64> = (0..b * n)
            .map(|i| if i >= 2 * n - 4 { MASKED } else { 0.0 })
            .collect();
        let kb = Tensor::from_vec(kb, (b, 1, 1, n), &candle_core::Device::Cpu).unwrap();
        for (window, global, causal, off) in [
            (4, 0, false, 0),
            (4, 0, true, 0),
            (70, 3, false, 0),
            (9, 2, true, 0),
            (9, 2, true, 30),
        ] {
            let m = n;
            let nq = n - off;
            let (q, k, v) = (
                randn(&[b, h, nq, d], 12),
                randn(&[b, h, m, d], 13),
                randn(&[b, h, m, d], 14),
            );
            let r = randn(&[b, h, nq, d], 15);
            let run = |dt: DType| {
                let vars: Vec<Var> = [&q, &k, &v]
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap())
                    .collect();
                let (kb, slopes) = (kb.to_dtype(dt).unwrap(), slopes.to_dtype(dt).unwrap());
                let o = LocalOpts {
                    window,
                    chunk: 16,
                    causal,
                    q_offset: off,
                    key_bias: Some(&kb),
                    alibi: Some(&slopes),
                    global,
                };
                let y = attend_local(&vars[0], &vars[1], &vars[2], &o).unwrap();
                let g = (&y * r.to_dtype(dt).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grads: Vec<Tensor> = vars
                    .iter()
                    .map(|x| g.get(x).unwrap().to_dtype(DType::F64).unwrap())
                    .collect();
                (y.to_dtype(DType::F64).unwrap(), grads)
            };
            let (fast, gf) = run(DType::F32);
            let (slow, gs) = run(DType::F64);
            let what = format!("w={window} g={global} causal={causal} off={off}");
            assert!(max_rel(&fast, &slow) < 1e-5, "values {what}");
            for (a, e) in gf.iter().zip(&gs) {
                assert!(max_rel(a, e) < 1e-4, "grads {what}: {}", max_rel(a, e));
            }
        }
    }

    #[test]
    fn global_tokens_attend_and_are_attended_everywhere() {
        let n = 15;
        let q = Var::from_tensor(&randn(&[1, 2, n, 4], 8)).unwrap();
        let k = Var::from_tensor(&randn(&[1, 2, n, 4], 9)).unwrap();
        let v = Var::from_tensor(&randn(&[1, 2, n, 4], 10)).unwrap();
        for (window, global, causal) in [(1, 2, false), (2, 3, true), (0, 15, false)] {
            let o = LocalOpts {
                window,
                chunk: 4,
                causal,
                q_offset: 0,
                key_bias: None,
                alibi: None,
                global,
            };
            let fast = attend_local(&q, &k, &v, &o).unwrap();
            // Reference mask: band, or a global key, or (bidirectional) a global query.
            let mask: Vec<f64> = (0..n)
                .flat_map(|i| {
                    (0..n).map(move |j| {
                        let band = i.abs_diff(j) <= window;
                        let seen = band || j < global || (!causal && i < global);
                        if seen && (!causal || j <= i) {
                            0.0
                        } else {
                            MASKED
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, n), q.device()).unwrap();
            let s = (q.matmul(&k.t().unwrap()).unwrap() / 2.0)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let e = s.exp().unwrap();
            let slow = e
                .broadcast_div(&e.sum_keepdim(3).unwrap())
                .unwrap()
                .matmul(&v)
                .unwrap();
            let rows = (fast.as_ref() - &slow)
                .unwrap()
                .abs()
                .unwrap()
                .max(3)
                .unwrap();
            assert!(
                max_rel(&fast, &slow) < 1e-10,
                "w={window} g={global} causal={causal} {rows}"
            );
            let r = randn(&[1, 2, n, 4], 11);
            let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for var in [&q, &k, &v] {
                assert!(max_rel(gf.get(var).unwrap(), gs.get(var).unwrap()) < 1e-10);
            }
        }
    }
}
