//! Sliding-window attention (Longformer, Beltagy et al. 2020): query `i` attends to keys
//! `j` with `|i - j| <= window` (and `j <= i` when causal). Queries go in blocks of
//! `chunk`, each against only the keys its band can reach, so cost is O(n·window), not a
//! masked O(n²).

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
        s = s.broadcast_add(&band_bias(first, ql, lo, kl, o.window, o.causal, &s)?)?;
        if let Some(kb) = o.key_bias {
            s = s.broadcast_add(&kb.narrow(3, lo, kl)?)?;
        }
        if let Some(slopes) = o.alibi {
            s = s.broadcast_add(&crate::position::alibi_bias(slopes, first, ql, lo, kl, &s)?)?;
        }
        let p = s
            .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        let y = p.matmul(&v.narrow(2, lo, kl)?)?;
        outs.push(y.broadcast_div(&p.sum_keepdim(D::Minus1)?)?);
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// `[ql, kl]`: 0 where key `lo + j` is inside query `first + i`'s band, [`MASKED`] elsewhere.
pub fn band_bias(
    first: usize,
    ql: usize,
    lo: usize,
    kl: usize,
    window: usize,
    causal: bool,
    like: &Tensor,
) -> Result<Tensor> {
    let v: Vec<f64> = (0..ql)
        .flat_map(|i| {
            (0..kl).map(move |j| {
                let (qi, kj) = (first + i, lo + j);
                let inside = qi.abs_diff(kj) <= window && (!causal || kj <= qi);
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
    use crate::testutil::randn;
    use candle_core::Var;

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1e-12);
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            / scale
    }

    /// The O(n²) band reference: full scores, explicit band mask, plain softmax.
    fn reference_band(q: &Tensor, k: &Tensor, v: &Tensor, window: usize, causal: bool) -> Tensor {
        let (_, _, n, dh) = q.dims4().unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (dh as f64).sqrt()).unwrap();
        let s = s
            .broadcast_add(&band_bias(0, n, 0, n, window, causal, &s).unwrap())
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
            };
            let fast = attend_local(&q, &k, &v, &o).unwrap();
            assert!(
                max_rel(&fast, &reference_band(&q, &k, &v, window, causal)) < 1e-5,
                "w={window}"
            );
        }
    }
}
