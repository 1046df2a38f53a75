//! Exact softmax attention (Vaswani et al. 2017), computed in query/key chunks with an
//! online softmax (Rabe & Staats 2021; FlashAttention, Dao et al. 2022) so memory grows
//! linearly with sequence length. Bidirectional or causal, with a key-padding mask and a
//! KV cache for decoding.

use candle_core::{Tensor, D};

use super::{MixCtx, MixerCache, TokenMixer, MASKED};
use crate::config::ModelConfig;
use crate::linear::Linear;
use crate::params::Params;
use crate::{Error, Result};

/// How [`attend`] masks and chunks.
#[derive(Debug, Clone, Copy)]
pub struct AttendOpts<'a> {
    /// Query `i` sees key `j` only if `j <= i + q_offset`.
    pub causal: bool,
    /// Position of the first query among the keys (keys before it come from a cache).
    pub q_offset: usize,
    /// Additive bias on keys, `[b, 1, 1, m]`.
    pub key_bias: Option<&'a Tensor>,
    /// Queries per chunk.
    pub q_chunk: usize,
    /// Keys per chunk.
    pub k_chunk: usize,
}

/// `softmax(q kᵀ / sqrt(dh) + mask) v` for `q [b, h, n, dh]`, `k, v [b, h, m, dh]`.
///
/// Scores exist one `q_chunk × k_chunk` tile at a time; a running max, normaliser and
/// accumulator per query row make the result exact. The running max is detached: the
/// output does not depend on it, so gradients stay exact and cheaper.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttendOpts) -> Result<Tensor> {
    let (_, _, n, dh) = q.dims4()?;
    let m = k.dim(2)?;
    let (qc, kc) = (o.q_chunk.max(1), o.k_chunk.max(1));
    let inference = !(q.track_op() || k.track_op() || v.track_op());
    if inference
        && n <= qc
        && m <= kc
        && q.dtype() == candle_core::DType::F32
        && q.device().is_cpu()
    {
        return attend_one_tile(q, k, v, o);
    }
    let scale = 1.0 / (dh as f64).sqrt();
    let mut outs = Vec::with_capacity(n.div_ceil(qc));
    for qs in (0..n).step_by(qc) {
        let ql = qc.min(n - qs);
        let q_first = qs + o.q_offset;
        let q_last = q_first + ql - 1;
        let qi = (q.narrow(2, qs, ql)? * scale)?;
        let mut state: Option<(Tensor, Tensor, Tensor)> = None;
        for ks in (0..m).step_by(kc) {
            if o.causal && ks > q_last {
                break;
            }
            let kl = kc.min(m - ks);
            let kj = k.narrow(2, ks, kl)?;
            let vj = v.narrow(2, ks, kl)?;
            let mut s = qi.matmul(&kj.t()?)?;
            if o.causal && ks + kl - 1 > q_first {
                s = s.broadcast_add(&causal_bias(q_first, ql, ks, kl, &s)?)?;
            }
            if let Some(kb) = o.key_bias {
                s = s.broadcast_add(&kb.narrow(3, ks, kl)?)?;
            }
            let chunk_max = s.max_keepdim(D::Minus1)?.detach();
            state = Some(match state {
                None => {
                    let p = s.broadcast_sub(&chunk_max)?.exp()?;
                    (chunk_max, p.sum_keepdim(D::Minus1)?, p.matmul(&vj)?)
                }
                Some((run_max, l, acc)) => {
                    let new_max = run_max.maximum(&chunk_max)?;
                    let alpha = (run_max - &new_max)?.exp()?;
                    let p = s.broadcast_sub(&new_max)?.exp()?;
                    let l = ((l * &alpha)? + p.sum_keepdim(D::Minus1)?)?;
                    let acc = (acc.broadcast_mul(&alpha)? + p.matmul(&vj)?)?;
                    (new_max, l, acc)
                }
            });
        }
        let (_, l, acc) = state.ok_or_else(|| Error::Input("attention over zero keys".into()))?;
        outs.push(acc.broadcast_div(&l)?);
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// Inference when all scores fit in one tile: one score matrix and candle's fused softmax
/// (forward-only, so never used when a graph is tracked).
fn attend_one_tile(q: &Tensor, k: &Tensor, v: &Tensor, o: &AttendOpts) -> Result<Tensor> {
    let (_, _, n, dh) = q.dims4()?;
    let m = k.dim(2)?;
    let mut s = (q * (1.0 / (dh as f64).sqrt()))?.matmul(&k.t()?)?;
    if o.causal && m > 1 && m - 1 > o.q_offset {
        s = s.broadcast_add(&causal_bias(o.q_offset, n, 0, m, &s)?)?;
    }
    if let Some(kb) = o.key_bias {
        s = s.broadcast_add(kb)?;
    }
    Ok(candle_nn::ops::softmax_last_dim(&s)?.matmul(v)?)
}

/// The O(n²) reference for [`attend`]: the full score matrix, an explicit mask and a
/// plain softmax. Tests check [`attend`] against it; `formers bench attention --naive`
/// measures it.
pub fn reference_attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    q_offset: usize,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, _, n, dh) = q.dims4()?;
    let m = k.dim(2)?;
    let mut s = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
    if causal {
        s = s.broadcast_add(&causal_bias(q_offset, n, 0, m, &s)?)?;
    }
    if let Some(kb) = key_bias {
        s = s.broadcast_add(kb)?;
    }
    let e = s
        .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(v)?)
}

/// `[ql, kl]` bias: 0 where key `ks + j <= q_first + i`, [`MASKED`] elsewhere.
fn causal_bias(q_first: usize, ql: usize, ks: usize, kl: usize, like: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = (0..ql)
        .flat_map(|i| (0..kl).map(move |j| if ks + j <= q_first + i { 0.0 } else { MASKED }))
        .collect();
    Ok(Tensor::from_vec(v, (ql, kl), like.device())?.to_dtype(like.dtype())?)
}

/// How an [`Attention`] mixer turns queries, keys and values into outputs.
#[derive(Debug, Clone)]
pub enum Kernel {
    /// Exact softmax, chunked with an online softmax ([`attend`]).
    Full { q_chunk: usize, k_chunk: usize },
    /// Sliding-window softmax ([`super::local`]).
    Local { window: usize, chunk: usize },
    /// Linear attention with a feature map ([`super::linear`]).
    Linear(super::linear::LinearKernel),
}

/// Settings of an [`Attention`] mixer.
#[derive(Debug, Clone)]
pub struct AttentionOpts {
    pub causal: bool,
    pub bias: bool,
    pub kernel: Kernel,
}

/// Multi-head attention with separate q, k, v, o projections; the [`Kernel`] decides how
/// queries meet keys.
#[derive(Debug)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    opts: AttentionOpts,
}

impl Attention {
    /// Parameters `q`, `k`, `v`, `o` under `p`.
    pub fn new(cfg: &ModelConfig, p: &Params, opts: AttentionOpts) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Attention {
            q: Linear::new(&p.pp("q"), d, d, opts.bias)?,
            k: Linear::new(&p.pp("k"), d, d, opts.bias)?,
            v: Linear::new(&p.pp("v"), d, d, opts.bias)?,
            o: Linear::new(&p.pp("o"), d, d, opts.bias)?,
            n_heads: cfg.n_heads,
            opts,
        })
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        Ok(x.reshape((b, n, self.n_heads, d / self.n_heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }
}

impl TokenMixer for Attention {
    fn forward(&self, x: &Tensor, ctx: &MixCtx, cache: Option<&mut MixerCache>) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let q = self.heads(&self.q.forward(x)?)?;
        let k = self.heads(&self.k.forward(x)?)?;
        let v = self.heads(&self.v.forward(x)?)?;
        let y = match ctx.segments {
            Some(segments) => {
                if cache.is_some() {
                    return Err(Error::Input(
                        "a KV cache takes one sequence, not a packed batch".into(),
                    ));
                }
                let parts = segments
                    .iter()
                    .map(|&(start, len)| {
                        let part = |t: &Tensor| t.narrow(2, start, len);
                        self.attend_one(part(&q)?, part(&k)?, part(&v)?, ctx, None)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 2)?
            }
            None => self.attend_one(q, k, v, ctx, cache)?,
        };
        let y = y.transpose(1, 2)?.reshape((b, n, d))?;
        self.o.forward(&y)
    }
}

impl Attention {
    /// Attention of one sequence (or a padded batch) given its heads `[b, h, n, dh]`.
    fn attend_one(
        &self,
        mut q: Tensor,
        mut k: Tensor,
        mut v: Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        let n = q.dim(2)?;
        if let Some(rope) = ctx.rope {
            q = rope.apply(&q, ctx.offset)?;
            k = rope.apply(&k, ctx.offset)?;
        }
        if let Kernel::Linear(lin) = &self.opts.kernel {
            return lin.attend(&q, &k, &v, self.opts.causal, ctx.key_bias, cache);
        }
        if let Some(cache) = cache {
            if ctx.key_bias.is_some() {
                return Err(Error::Input("a KV cache takes unpadded sequences".into()));
            }
            if let [ck, cv] = cache.tensors.as_slice() {
                k = Tensor::cat(&[ck, &k], 2)?;
                v = Tensor::cat(&[cv, &v], 2)?;
            }
            cache.tensors = vec![k.clone(), v.clone()];
        }
        let q_offset = k.dim(2)? - n;
        match self.opts.kernel {
            Kernel::Full { q_chunk, k_chunk } => {
                let opts = AttendOpts {
                    causal: self.opts.causal,
                    q_offset,
                    key_bias: ctx.key_bias,
                    q_chunk,
                    k_chunk,
                };
                attend(&q, &k, &v, &opts)
            }
            Kernel::Local { window, chunk } => {
                let opts = super::local::LocalOpts {
                    window,
                    chunk,
                    causal: self.opts.causal,
                    q_offset,
                    key_bias: ctx.key_bias,
                };
                super::local::attend_local(&q, &k, &v, &opts)
            }
            Kernel::Linear(_) => unreachable!("handled above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use candle_core::{DType, Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
        a.iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

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
                    };
                    let fast = attend(&q, &k, &v, &opts).unwrap();
                    let slow = reference_attend(&q, &k, &v, causal, 0, kb.as_ref()).unwrap();
                    let what = format!("causal={causal} masked={masked} chunks=({qc},{kc})");
                    assert!(max_rel(&fast, &slow) < 1e-5, "values {what}");
                    let r = randn(&[b, h, n, dh], 4);
                    let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                        let a = gf.get(var).unwrap();
                        let e = gs.get(var).unwrap();
                        assert!(max_rel(a, e) < 1e-5, "grad {name} {what}");
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
        };
        let fast = attend(&q, &k, &v, &opts).unwrap();
        assert!(max_rel(&fast, &reference_attend(&q, &k, &v, true, 6, None).unwrap()) < 1e-5);
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
        };
        let fast = attend(&f(&q), &f(&k), &f(&v), &opts)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(max_rel(&fast, &slow) < 1e-5);
    }

    #[test]
    fn module_gradients_match_finite_differences() {
        let cfg = crate::config::ModelConfig::from_json(
            r#"{"d_model": 8, "n_heads": 2, "n_layers": 1, "input": {"kind": "bytes"}, "head": {"kind": "lm"}}"#,
        )
        .unwrap();
        let linear = |feature| {
            let k = crate::mixer::linear::LinearKernel::new(
                feature,
                8,
                1,
                4,
                2,
                DType::F64,
                &Device::Cpu,
            );
            Kernel::Linear(k.unwrap())
        };
        for causal in [false, true] {
            for kernel in [
                Kernel::Full {
                    q_chunk: 3,
                    k_chunk: 2,
                },
                Kernel::Local {
                    window: 1,
                    chunk: 2,
                },
                linear(crate::config::FeatureMap::Elu),
                linear(crate::config::FeatureMap::Favor),
            ] {
                let p = crate::params::Params::new(1, DType::F64, &Device::Cpu);
                let opts = AttentionOpts {
                    causal,
                    bias: true,
                    kernel,
                };
                let att = Attention::new(&cfg, &p, opts).unwrap();
                let x = randn(&[2, 5, 8], 2);
                crate::testutil::check_grad(&p, &x, |x| att.forward(x, &MixCtx::default(), None));
            }
        }
    }
}
