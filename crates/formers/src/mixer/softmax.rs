//! Exact softmax attention (Vaswani et al. 2017), computed in query/key chunks with an
//! online softmax (Rabe & Staats 2021; FlashAttention, Dao et al. 2022) so memory grows
//! linearly with sequence length, and its O(n²) reference. Used by `attention`, `local`
//! (global rows) and `linformer` (over projected keys).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::kind::{MixerCache, MASKED};
use super::route::{route, Case, Route};
use crate::kernels::attention_op::{flash_attention, FlashMask};
use crate::position::alibi_bias;
use crate::{Error, Result};

/// Parameters of the clipped softmax: stretch to `[gamma, zeta]`, then clip to `[0, 1]`
/// (Bondarenko et al. 2023, "Quantizable Transformers").
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Clip {
    /// Lower end, ≤ 0 (e.g. -0.03).
    pub gamma: f64,
    /// Upper end, ≥ 1.
    pub zeta: f64,
}

/// How [`attend`] masks, biases and chunks.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttendOpts<'a> {
    /// Query `i` sees key `j` only if `j <= i + q_offset`.
    pub causal: bool,
    /// Position of the first query among the keys (keys before it come from a cache).
    pub q_offset: usize,
    /// Additive bias on keys, `[b, 1, 1, m]`.
    pub key_bias: Option<&'a Tensor>,
    /// ALiBi slopes `[h]`: scores minus `slope · |i − j|`.
    pub alibi: Option<&'a Tensor>,
    /// Clipped softmax (Quantizable Transformers) instead of the plain one.
    pub clip: Option<Clip>,
    /// Queries per chunk.
    pub q_chunk: usize,
    /// Keys per chunk.
    pub k_chunk: usize,
    /// Inference mode: no gradient will be taken, so a single tile may use candle's fused
    /// (forward-only) softmax.
    pub inference: bool,
}

/// Scaled scores of the tile (queries `q_first..q_first + ql`, keys `ks..ks + kl`) with
/// every mask and bias of `o`; `qi` is already scaled by `1 / sqrt(dh)`.
fn tile_scores(
    qi: &Tensor,
    k: &Tensor,
    q_first: usize,
    ks: usize,
    kl: usize,
    o: &AttendOpts,
) -> Result<Tensor> {
    let ql = qi.dim(2)?;
    let mut s = qi.matmul(&k.narrow(2, ks, kl)?.t()?)?;
    if o.causal && ks + kl - 1 > q_first {
        s = s.broadcast_add(&causal_bias(q_first, ql, ks, kl, &s)?)?;
    }
    if let Some(kb) = o.key_bias {
        s = s.broadcast_add(&kb.narrow(3, ks, kl)?)?;
    }
    if let Some(slopes) = o.alibi {
        s = s.broadcast_add(&alibi_bias(slopes, q_first, ql, ks, kl, &s)?)?;
    }
    Ok(s)
}

/// `clip((ζ − γ)·p + γ, 0, 1)`.
fn clip_probs(p: &Tensor, c: Clip) -> Result<Tensor> {
    Ok(((p * (c.zeta - c.gamma))? + c.gamma)?.clamp(0.0, 1.0)?)
}

/// `softmax(q kᵀ / sqrt(dh) + mask) v` for `q [b, h, n, dh]`, `k, v [b, h, m, dh]`.
///
/// f32 on the CPU (the plain softmax) runs the fused FlashAttention op
/// ([`flash_attention`]); other types, devices and the clipped softmax run the candle path
/// below, which keeps the same O(n·d) memory only in inference.
///
/// Scores exist one `q_chunk × k_chunk` tile at a time; a running max, normaliser and
/// accumulator per query row make the result exact. The running max is detached: the
/// output does not depend on it, so gradients stay exact and cheaper. The clipped softmax
/// needs the final normaliser first, so it takes two passes over the tiles.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttendOpts) -> Result<Tensor> {
    let (_, _, n, dh) = q.dims4()?;
    let m = k.dim(2)?;
    let (qc, kc) = (o.q_chunk.max(1), o.k_chunk.max(1));
    let case = Case {
        inference: o.inference,
        fusable: o.clip.is_none(),
        one_tile: n <= qc && m <= kc,
        ..Case::of(q)
    };
    let route = route(case);
    if route == Route::SingleTile {
        let s = tile_scores(&(q * (1.0 / (dh as f64).sqrt()))?, k, o.q_offset, 0, m, o)?;
        return Ok(candle_nn::ops::softmax_last_dim(&s)?.matmul(v)?);
    }
    if route == Route::Fused {
        let mask = FlashMask {
            causal: o.causal,
            q_offset: o.q_offset,
            key_bias: o.key_bias,
            alibi: o.alibi,
            ..Default::default()
        };
        return flash_attention(q, k, v, &mask);
    }
    let scale = 1.0 / (dh as f64).sqrt();
    let mut outs = Vec::with_capacity(n.div_ceil(qc));
    for qs in (0..n).step_by(qc) {
        let ql = qc.min(n - qs);
        let q_first = qs + o.q_offset;
        let q_last = q_first + ql - 1;
        let qi = (q.narrow(2, qs, ql)? * scale)?;
        let tiles: Vec<(usize, usize)> = (0..m)
            .step_by(kc)
            .take_while(|&ks| !(o.causal && ks > q_last))
            .map(|ks| (ks, kc.min(m - ks)))
            .collect();
        let mut state: Option<(Tensor, Tensor, Tensor)> = None;
        for &(ks, kl) in &tiles {
            let s = tile_scores(&qi, k, q_first, ks, kl, o)?;
            let chunk_max = s.max_keepdim(D::Minus1)?.detach();
            state = Some(match state {
                None => {
                    let p = s.broadcast_sub(&chunk_max)?.exp()?;
                    let acc = match o.clip {
                        None => p.matmul(&v.narrow(2, ks, kl)?)?,
                        Some(_) => p.zeros_like()?,
                    };
                    (chunk_max, p.sum_keepdim(D::Minus1)?, acc)
                }
                Some((run_max, l, acc)) => {
                    let new_max = run_max.maximum(&chunk_max)?;
                    let alpha = (run_max - &new_max)?.exp()?;
                    let p = s.broadcast_sub(&new_max)?.exp()?;
                    let l = ((l * &alpha)? + p.sum_keepdim(D::Minus1)?)?;
                    let acc = match o.clip {
                        None => (acc.broadcast_mul(&alpha)? + p.matmul(&v.narrow(2, ks, kl)?)?)?,
                        Some(_) => acc,
                    };
                    (new_max, l, acc)
                }
            });
        }
        let (run_max, l, acc) =
            state.ok_or_else(|| Error::Input("attention over zero keys".into()))?;
        let out = match o.clip {
            None => acc.broadcast_div(&l)?,
            Some(c) => {
                let mut out: Option<Tensor> = None;
                for &(ks, kl) in &tiles {
                    let s = tile_scores(&qi, k, q_first, ks, kl, o)?;
                    let p = s.broadcast_sub(&run_max)?.exp()?.broadcast_div(&l)?;
                    let y = clip_probs(&p, c)?.matmul(&v.narrow(2, ks, kl)?)?;
                    out = Some(match out {
                        None => y,
                        Some(prev) => (prev + y)?,
                    });
                }
                out.expect("at least one tile")
            }
        };
        outs.push(out);
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// The O(n²) reference for [`attend`]: the full score matrix, explicit masks and biases, a
/// plain (or clipped) softmax. Tests check [`attend`] against it; `formers bench attention
/// --naive` measures it.
pub fn reference_attend_with(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttendOpts) -> Result<Tensor> {
    let dh = q.dim(D::Minus1)?;
    let m = k.dim(2)?;
    let s = tile_scores(&(q / (dh as f64).sqrt())?, k, o.q_offset, 0, m, o)?;
    let e = s
        .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let p = match o.clip {
        Some(c) => clip_probs(&p, c)?,
        None => p,
    };
    Ok(p.matmul(v)?)
}

/// [`reference_attend_with`] for a mask alone.
pub fn reference_attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    q_offset: usize,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let o = AttendOpts {
        causal,
        q_offset,
        key_bias,
        ..Default::default()
    };
    reference_attend_with(q, k, v, &o)
}

/// `[ql, kl]` bias: 0 where key `ks + j <= q_first + i`, [`MASKED`] elsewhere.
fn causal_bias(q_first: usize, ql: usize, ks: usize, kl: usize, like: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = (0..ql)
        .flat_map(|i| (0..kl).map(move |j| if ks + j <= q_first + i { 0.0 } else { MASKED }))
        .collect();
    Ok(Tensor::from_vec(v, (ql, kl), like.device())?.to_dtype(like.dtype())?)
}

/// Appends `k, v [b, h, n, dh]` to the keys and values the cache holds; returns (and
/// keeps) all of them.
pub fn append_kv(cache: &mut MixerCache, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let (k, v) = match cache.tensors.as_slice() {
        [ck, cv] => (Tensor::cat(&[ck, k], 2)?, Tensor::cat(&[cv, v], 2)?),
        _ => (k.clone(), v.clone()),
    };
    cache.tensors = vec![k.clone(), v.clone()];
    Ok((k, v))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_rel, randn};
    use candle_core::{DType, Device, Var};

    /// Key bias masking the last `pad[i]` keys of batch row `i`.
    fn padding_bias(m: usize, pad: &[usize]) -> Tensor {
        let v: Vec<f64> = pad
            .iter()
            .flat_map(|&p| (0..m).map(move |j| if j >= m - p { MASKED } else { 0.0 }))
            .collect();
        Tensor::from_vec(v, (pad.len(), 1, 1, m), &Device::Cpu).unwrap()
    }

    #[test]
    fn chunked_equals_naive_values_and_gradients() {
        let (b, h, n, dh) = (2, 2, 13, 5);
        for causal in [false, true] {
            for masked in [false, true] {
                for (qc, kc) in [(13, 13), (4, 4), (5, 3), (1, 7), (16, 2)] {
                    let q = Var::from_tensor(&randn(&[b, h, n, dh], 1)).unwrap();
                    let k = Var::from_tensor(&randn(&[b, h, n, dh], 2)).unwrap();
                    let v = Var::from_tensor(&randn(&[b, h, n, dh], 3)).unwrap();
                    let kb = masked.then(|| padding_bias(n, &[0, 4]));
                    let opts = AttendOpts {
                        causal,
                        q_offset: 0,
                        key_bias: kb.as_ref(),
                        q_chunk: qc,
                        k_chunk: kc,
                        ..Default::default()
                    };
                    let fast = attend(&q, &k, &v, &opts).unwrap();
                    let slow = reference_attend(&q, &k, &v, causal, 0, kb.as_ref()).unwrap();
                    let what = format!("causal={causal} masked={masked} chunks=({qc},{kc})");
                    assert!(max_rel(&fast, &slow) < 1e-10, "values {what}");
                    let r = randn(&[b, h, n, dh], 4);
                    let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                        let a = gf.get(var).unwrap();
                        let e = gs.get(var).unwrap();
                        assert!(max_rel(a, e) < 1e-10, "grad {name} {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn single_tile_inference_path_equals_the_reference() {
        let f = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (q, k, v) = (
            f(randn(&[2, 3, 7, 6], 11)),
            f(randn(&[2, 3, 9, 6], 12)),
            f(randn(&[2, 3, 9, 6], 13)),
        );
        let kb = padding_bias(9, &[0, 3]).to_dtype(DType::F32).unwrap();
        for (causal, offset, bias) in [(false, 2, Some(&kb)), (true, 2, None), (true, 2, Some(&kb))]
        {
            let opts = AttendOpts {
                causal,
                q_offset: offset,
                key_bias: bias,
                q_chunk: 64,
                k_chunk: 64,
                inference: true,
                ..Default::default()
            };
            let fast = attend(&q, &k, &v, &opts)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let want = reference_attend(&q, &k, &v, causal, offset, bias)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            assert!(max_rel(&fast, &want) < 1e-5, "causal={causal}");
        }
    }

    #[test]
    fn alibi_and_clipped_softmax_equal_the_reference_values_and_gradients() {
        let slopes = Tensor::new(&[0.5f64, 0.125], &Device::Cpu).unwrap();
        let kb = padding_bias(9, &[0, 2]);
        let clip = Some(Clip {
            gamma: -0.05,
            zeta: 1.05,
        });
        for (causal, alibi, clip, kb) in [
            (false, Some(&slopes), None, None),
            (true, Some(&slopes), None, Some(&kb)),
            (false, None, clip, Some(&kb)),
            (true, Some(&slopes), clip, None),
        ] {
            let q = Var::from_tensor(&randn(&[2, 2, 9, 4], 21)).unwrap();
            let k = Var::from_tensor(&randn(&[2, 2, 9, 4], 22)).unwrap();
            let v = Var::from_tensor(&randn(&[2, 2, 9, 4], 23)).unwrap();
            let o = AttendOpts {
                causal,
                key_bias: kb,
                alibi,
                clip,
                q_chunk: 4,
                k_chunk: 3,
                ..Default::default()
            };
            let fast = attend(&q, &k, &v, &o).unwrap();
            let slow = reference_attend_with(&q, &k, &v, &o).unwrap();
            assert!(max_rel(&fast, &slow) < 1e-10, "values causal={causal}");
            let r = randn(&[2, 2, 9, 4], 24);
            let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for var in [&q, &k, &v] {
                assert!(
                    max_rel(gf.get(var).unwrap(), gs.get(var).unwrap()) < 1e-10,
                    "grads causal={causal}"
                );
            }
        }
        // Clipping lets rows reach exact zeros: outputs differ from the plain softmax.
        let (q, k, v) = (
            (randn(&[1, 1, 6, 4], 25) * 4.0).unwrap(),
            randn(&[1, 1, 6, 4], 26),
            randn(&[1, 1, 6, 4], 27),
        );
        let plain = attend(
            &q,
            &k,
            &v,
            &AttendOpts {
                q_chunk: 8,
                k_chunk: 8,
                ..Default::default()
            },
        )
        .unwrap();
        let clipped = attend(
            &q,
            &k,
            &v,
            &AttendOpts {
                clip,
                q_chunk: 8,
                k_chunk: 8,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(max_rel(&plain, &clipped) > 1e-3);
    }

    #[test]
    fn queries_after_a_cache_see_the_right_keys() {
        let (q, k, v) = (
            randn(&[1, 2, 3, 4], 5),
            randn(&[1, 2, 9, 4], 6),
            randn(&[1, 2, 9, 4], 7),
        );
        let opts = AttendOpts {
            causal: true,
            q_offset: 6,
            key_bias: None,
            q_chunk: 2,
            k_chunk: 4,
            ..Default::default()
        };
        let fast = attend(&q, &k, &v, &opts).unwrap();
        assert!(max_rel(&fast, &reference_attend(&q, &k, &v, true, 6, None).unwrap()) < 1e-10);
    }

    #[test]
    fn f32_matches_f64_reference() {
        let (q, k, v) = (
            randn(&[1, 1, 300, 8], 8),
            randn(&[1, 1, 300, 8], 9),
            randn(&[1, 1, 300, 8], 10),
        );
        let slow = reference_attend(&q, &k, &v, true, 0, None).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let opts = AttendOpts {
            causal: true,
            q_offset: 0,
            key_bias: None,
            q_chunk: 64,
            k_chunk: 48,
            ..Default::default()
        };
        let fast = attend(&f(&q), &f(&k), &f(&v), &opts)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(max_rel(&fast, &slow) < 1e-5);
    }
}
