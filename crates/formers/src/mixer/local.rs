//! Sliding-window attention (Longformer, Beltagy et al. 2020): query `i` attends to keys
//! `j` with `|i - j| <= window` (and `j <= i` when causal), plus the first `global`
//! positions, which attend to and are attended by every position. Queries go in blocks of
//! `chunk`, each against only the keys its band can reach (and the global ones), so cost is
//! O(n·(window + global)), not a masked O(n²).

use candle_core::{Tensor, D};

use super::MASKED;
use crate::Result;

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
pub fn attend_local(q: &Tensor, k: &Tensor, v: &Tensor, o: &LocalOpts) -> Result<Tensor> {
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
    let full = super::attention::AttendOpts {
        causal: o.causal,
        q_offset: o.q_offset,
        key_bias: o.key_bias,
        alibi: o.alibi,
        q_chunk: c,
        k_chunk: c,
        ..Default::default()
    };
    let rows = super::attention::attend(&q.narrow(2, 0, gq)?, k, v, &full)?;
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
    use crate::mixer::attention::reference_attend;
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
                assert!(max_rel(&fast, &full) < 1e-5);
                let r = randn(&[2, 2, n, 4], 4);
                let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = (full * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for var in [&q, &k, &v] {
                    assert!(max_rel(gf.get(var).unwrap(), gs.get(var).unwrap()) < 1e-5);
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
                max_rel(&fast, &reference_band(&q, &k, &v, window, causal)) < 1e-5,
                "w={window}"
            );
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
                max_rel(&fast, &slow) < 1e-5,
                "w={window} g={global} causal={causal} {rows}"
            );
            let r = randn(&[1, 2, n, 4], 11);
            let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for var in [&q, &k, &v] {
                assert!(max_rel(gf.get(var).unwrap(), gs.get(var).unwrap()) < 1e-5);
            }
        }
    }
}
