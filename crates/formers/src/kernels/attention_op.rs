//! Exact softmax attention as one candle op with a backward pass (FlashAttention-2, Dao
//! 2023): the forward runs [`flash::forward`] and keeps only the output and each row's
//! log-sum-exp, the backward runs [`flash::backward`], so training memory is O(n·d).
//!
//! The op takes heads either split (`[b, h, n, d]`, [`flash_attention`]) or merged as the
//! projections make them (`[b, n, h·d]`, [`flash_attention_merged`]); merged, the split
//! into heads and the merge back happen inside the op, so a training step has no transpose,
//! copy or reshape nodes around attention (each of which candle's backward pays with a
//! zero-filled gradient buffer and an addition).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::flash::{self, Dims, Opts};
use super::{f32_values, flat, with_values};
use crate::Result;

/// What masks and biases one call: plain vectors, since they take no gradient.
struct FlashAttention {
    causal: bool,
    q_offset: usize,
    scale: f32,
    /// `[batch, m]`.
    key_bias: Option<Vec<f32>>,
    /// `[heads]`.
    alibi: Option<Vec<f32>>,
    window: Option<usize>,
    global: usize,
    /// `Some(heads)`: inputs and output are `[b, n, heads·d]`; `None`: `[b, h, n, d]`.
    merged: Option<usize>,
    /// Each row's log-sum-exp (base 2, as [`flash::forward`] gives it), `[b, h, n]`, saved
    /// by the forward for the backward.
    lse: Mutex<Vec<f32>>,
}

impl FlashAttention {
    fn opts(&self) -> Opts<'_> {
        Opts {
            scale: self.scale,
            causal: self.causal,
            q_offset: self.q_offset,
            key_bias: self.key_bias.as_deref(),
            alibi: self.alibi.as_deref(),
            window: self.window,
            global: self.global,
        }
    }

    /// [`Dims`] of `q` and `k` (`[b, h, n, d]`, or `[b, n, h·d]` when merged).
    fn dims(&self, q: &Shape, k: &Shape) -> candle_core::Result<Dims> {
        let (batch, heads, n, m, d) = match self.merged {
            None => {
                let (batch, heads, n, d) = q.dims4()?;
                (batch, heads, n, k.dims4()?.2, d)
            }
            Some(heads) => {
                let (batch, n, width) = q.dims3()?;
                (batch, heads, n, k.dims3()?.1, width / heads.max(1))
            }
        };
        Ok(Dims {
            batch,
            heads,
            n,
            m,
            d,
        })
    }

    /// `x` in the split layout `[b, h, len, d]` the kernel reads (a copy when merged).
    fn split<'a>(&self, x: &'a [f32], dims: &Dims, len: usize) -> std::borrow::Cow<'a, [f32]> {
        match self.merged {
            None => x.into(),
            Some(h) => split_heads(x, len, h, dims.d, h * dims.d, 0).into(),
        }
    }

    /// [`Self::split`] of a tensor's values, read in place: one copy of the values in all.
    fn split_tensor(&self, t: &Tensor, dims: &Dims, len: usize) -> candle_core::Result<Vec<f32>> {
        with_values(t, |x| self.split(x, dims, len).into_owned())
    }

    /// The kernel's `[b, h, len, d]` result in this op's layout.
    fn unsplit(&self, x: Vec<f32>, dims: &Dims, len: usize) -> Vec<f32> {
        match self.merged {
            None => x,
            Some(h) => {
                let mut out = vec![0f32; x.len()];
                merge_heads(&x, len, h, dims.d, &mut out, h * dims.d, 0);
                out
            }
        }
    }
}

/// Heads `[b, h, len, d]` out of rows of `stride` values (`[b, len, stride]`) in which head
/// `i` is the `d` values at `offset + i·d`.
fn split_heads(
    x: &[f32],
    len: usize,
    h: usize,
    d: usize,
    stride: usize,
    offset: usize,
) -> Vec<f32> {
    let rows = x.len().checked_div(stride).unwrap_or(0);
    let mut out = vec![0f32; rows * h * d];
    if out.is_empty() || len == 0 {
        return out;
    }
    out.par_chunks_mut(len * d)
        .enumerate()
        .for_each(|(bh, dst)| {
            let (bb, hh) = (bh / h, bh % h);
            for (i, chunk) in dst.chunks_exact_mut(d).enumerate() {
                let src = (bb * len + i) * stride + offset + hh * d;
                chunk.copy_from_slice(&x[src..src + d]);
            }
        });
    out
}

/// The inverse of [`split_heads`]: writes heads `x [b, h, len, d]` into the rows of `out`.
fn merge_heads(
    x: &[f32],
    len: usize,
    h: usize,
    d: usize,
    out: &mut [f32],
    stride: usize,
    offset: usize,
) {
    if x.is_empty() || len == 0 || d == 0 {
        return;
    }
    out.par_chunks_mut(stride)
        .enumerate()
        .for_each(|(row, dst)| {
            let (bb, i) = (row / len, row % len);
            for hh in 0..h {
                let src = ((bb * h + hh) * len + i) * d;
                dst[offset + hh * d..offset + (hh + 1) * d].copy_from_slice(&x[src..src + d]);
            }
        });
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1.shape(), l2.shape())?;
        let (q, k, v) = (
            f32_values(s1, l1, "flash-attention")?,
            f32_values(s2, l2, "flash-attention")?,
            f32_values(s3, l3, "flash-attention")?,
        );
        let (q, k, v) = (
            self.split(q, &dims, dims.n),
            self.split(k, &dims, dims.m),
            self.split(v, &dims, dims.m),
        );
        let (out, lse) = flash::forward(&dims, &self.opts(), &q, &k, &v);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        let out = self.unsplit(out, &dims, dims.n);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(q.shape(), k.shape())?;
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        if lse.len() != dims.batch * dims.heads * dims.n {
            candle_core::bail!("flash-attention: backward without its forward")
        }
        let (n, m) = (dims.n, dims.m);
        let (dq, dk, dv) = flash::backward(
            &dims,
            &self.opts(),
            &self.split_tensor(q, &dims, n)?,
            &self.split_tensor(k, &dims, m)?,
            &self.split_tensor(v, &dims, m)?,
            &self.split_tensor(res, &dims, n)?,
            &lse,
            &self.split_tensor(grad_res, &dims, n)?,
        );
        let back = |g: Vec<f32>, len: usize, like: &Tensor| {
            Tensor::from_vec(self.unsplit(g, &dims, len), like.shape(), like.device())
        };
        Ok((
            Some(back(dq, n, q)?),
            Some(back(dk, m, k)?),
            Some(back(dv, m, v)?),
        ))
    }
}

/// Attention on one packed projection `qkv [b, n, 3·h·d]` (each row `[q | k | v]`, heads
/// merged in each): the output `[b, n, h·d]` and, backward, one packed gradient, so a layer
/// projects q, k and v in one product and keeps one node where three were.
struct FlashQkv(FlashAttention);

impl FlashQkv {
    fn dims(&self, qkv: &Shape) -> candle_core::Result<Dims> {
        let (batch, n, width) = qkv.dims3()?;
        let heads = self.0.merged.unwrap_or(1).max(1);
        Ok(Dims {
            batch,
            heads,
            n,
            m: n,
            d: width / (3 * heads),
        })
    }

    /// q, k and v of the packed rows, each `[b, h, n, d]`.
    fn parts(&self, qkv: &[f32], dims: &Dims) -> [Vec<f32>; 3] {
        let hd = dims.heads * dims.d;
        [0, 1, 2].map(|i| split_heads(qkv, dims.n, dims.heads, dims.d, 3 * hd, i * hd))
    }
}

impl CustomOp1 for FlashQkv {
    fn name(&self) -> &'static str {
        "flash-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(l.shape())?;
        let qkv = f32_values(s, l, "flash-attention-qkv")?;
        let [q, k, v] = self.parts(qkv, &dims);
        let (out, lse) = flash::forward(&dims, &self.0.opts(), &q, &k, &v);
        *self.0.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        let out = self.0.unsplit(out, &dims, dims.n);
        let shape = Shape::from((dims.batch, dims.n, dims.heads * dims.d));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = self.dims(qkv.shape())?;
        let lse = self.0.lse.lock().unwrap_or_else(|e| e.into_inner());
        if lse.len() != dims.batch * dims.heads * dims.n {
            candle_core::bail!("flash-attention-qkv: backward without its forward")
        }
        let [q, k, v] = with_values(qkv, |x| self.parts(x, &dims))?;
        let n = dims.n;
        let grads = flash::backward(
            &dims,
            &self.0.opts(),
            &q,
            &k,
            &v,
            &self.0.split_tensor(res, &dims, n)?,
            &lse,
            &self.0.split_tensor(grad, &dims, n)?,
        );
        let hd = dims.heads * dims.d;
        let mut packed = vec![0f32; qkv.elem_count()];
        for (i, g) in [grads.0, grads.1, grads.2].iter().enumerate() {
            merge_heads(g, n, dims.heads, dims.d, &mut packed, 3 * hd, i * hd);
        }
        Ok(Some(Tensor::from_vec(packed, qkv.shape(), qkv.device())?))
    }
}

/// Masks and biases of [`flash_attention`], as in `softmax::AttendOpts`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlashMask<'a> {
    /// Query `i` sees key `j` only if `j <= i + q_offset`.
    pub causal: bool,
    /// Position of the first query among the keys.
    pub q_offset: usize,
    /// Additive bias on keys, `[b or 1, 1, 1, m]`.
    pub key_bias: Option<&'a Tensor>,
    /// ALiBi slopes `[h]`.
    pub alibi: Option<&'a Tensor>,
    /// A sliding window: the query at position `p` sees keys within `w` of `p` and the first
    /// `global` keys; the first `global` queries see every key (as `flash::Opts`).
    pub window: Option<usize>,
    /// Leading positions with global attention (with `window` only).
    pub global: usize,
}

/// Whether [`flash_attention`] takes these tensors (f32 on the CPU) and the fused kernels
/// are on ([`super::fused_enabled`]).
pub fn supports(q: &Tensor) -> bool {
    super::fused_f32_cpu(&[q])
}

/// `softmax(q kᵀ / sqrt(d) + masks) v` for `q [b, h, n, d]`, `k, v [b, h, m, d]` (f32, CPU),
/// differentiable in `q`, `k` and `v` with O(n·d) memory.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &FlashMask) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let op = op(b, h, k.dim(2)?, d, None, mask)?;
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// [`flash_attention`] on heads merged as the projections make them: `q [b, n, heads·d]`,
/// `k, v [b, m, heads·d]`, the output `[b, n, heads·d]` (head `i` in columns `i·d..(i+1)·d`).
pub fn flash_attention_merged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &FlashMask,
) -> Result<Tensor> {
    let (b, _, width) = q.dims3()?;
    let (kb, m, kw) = k.dims3()?;
    if heads == 0 || width % heads != 0 || kw != width || kb != b || v.dims() != k.dims() {
        return Err(crate::Error::Input(format!(
            "merged attention: q {:?}, k {:?}, v {:?} for {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let op = op(b, heads, m, width / heads, Some(heads), mask)?;
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// [`flash_attention_merged`] on one packed projection `qkv [b, n, 3·heads·d]` whose rows are
/// `[q | k | v]` (self-attention: as many keys as queries); the output is `[b, n, heads·d]`.
pub fn flash_attention_qkv(qkv: &Tensor, heads: usize, mask: &FlashMask) -> Result<Tensor> {
    let (b, n, width) = qkv.dims3()?;
    if heads == 0 || width % (3 * heads) != 0 {
        return Err(crate::Error::Input(format!(
            "packed attention: qkv {:?} for {heads} heads",
            qkv.dims()
        )));
    }
    let op = op(b, heads, n, width / (3 * heads), Some(heads), mask)?;
    Ok(qkv.contiguous()?.apply_op1(FlashQkv(op))?)
}

/// The op for `b` rows of `h` heads of width `d` over `m` keys.
fn op(
    b: usize,
    h: usize,
    m: usize,
    d: usize,
    merged: Option<usize>,
    mask: &FlashMask,
) -> Result<FlashAttention> {
    let key_bias = match mask.key_bias {
        None => None,
        Some(kb) => {
            let kb = flat(&kb.to_dtype(DType::F32)?)?;
            Some(match kb.len() {
                len if len == b * m => kb,
                len if len == m => kb.repeat(b),
                len => {
                    return Err(crate::Error::Input(format!(
                        "key bias of {len} values for {b} rows of {m} keys"
                    )))
                }
            })
        }
    };
    let alibi = match mask.alibi {
        None => None,
        Some(s) => Some(flat(&s.to_dtype(DType::F32)?)?),
    };
    if alibi.as_ref().is_some_and(|s| s.len() != h) {
        return Err(crate::Error::Input(format!(
            "ALiBi slopes for {h} heads expected"
        )));
    }
    Ok(FlashAttention {
        causal: mask.causal,
        q_offset: mask.q_offset,
        scale: 1.0 / (d as f32).sqrt(),
        key_bias,
        alibi,
        window: mask.window,
        global: mask.global,
        merged,
        lse: Mutex::new(Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::softmax::{reference_attend_with, AttendOpts};
    use crate::mixer::MASKED;
    use crate::testutil::{max_rel, randn};
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_match_the_differentiable_reference() {
        let (b, h, n, d) = (2, 3, 37, 16);
        let slopes = Tensor::new(&[0.5f32, 0.25, 0.125], &Device::Cpu).unwrap();
        for causal in [false, true] {
            for padded in [false, true] {
                for alibi in [false, true] {
                    for m in [n, n + 70] {
                        let (q, k, v) = (
                            var(&[b, h, n, d], 1),
                            var(&[b, h, m, d], 2),
                            var(&[b, h, m, d], 3),
                        );
                        let kb: Vec<f32> = (0..b)
                            .flat_map(|r| {
                                (0..m).map(move |j| {
                                    if r == 1 && j >= m - 5 {
                                        MASKED as f32
                                    } else {
                                        0.0
                                    }
                                })
                            })
                            .collect();
                        let kb = Tensor::from_vec(kb, (b, 1, 1, m), &Device::Cpu).unwrap();
                        let q_offset = if causal { m - n } else { 0 };
                        let mask = FlashMask {
                            causal,
                            q_offset,
                            key_bias: padded.then_some(&kb),
                            alibi: alibi.then_some(&slopes),
                            ..Default::default()
                        };
                        let reference = AttendOpts {
                            causal,
                            q_offset,
                            key_bias: mask.key_bias,
                            alibi: mask.alibi,
                            ..Default::default()
                        };
                        let what = format!("causal={causal} padded={padded} alibi={alibi} m={m}");
                        let fast = flash_attention(&q, &k, &v, &mask).unwrap();
                        let slow = reference_attend_with(&q, &k, &v, &reference).unwrap();
                        assert!(max_rel(&fast, &slow) < 1e-5, "values {what}");
                        let r = randn(&[b, h, n, d], 4).to_dtype(DType::F32).unwrap();
                        let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
                        let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
                        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                            let (a, e) = (gf.get(var).unwrap(), gs.get(var).unwrap());
                            assert!(
                                max_rel(a, e) < 1e-4,
                                "grad {name} {what}: {}",
                                max_rel(a, e)
                            );
                        }
                    }
                }
            }
        }
    }

    /// The reference on merged heads `[b, n, h·d]`: split, `reference_attend_with` (or the
    /// local mixer's candle path for a window), merged back.
    fn reference_merged(q: &Tensor, k: &Tensor, v: &Tensor, h: usize, mask: &FlashMask) -> Tensor {
        let (b, n, width) = q.dims3().unwrap();
        let d = width / h;
        let split = |x: &Tensor| {
            x.reshape((b, n, h, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let out = match mask.window {
            None => {
                let reference = AttendOpts {
                    causal: mask.causal,
                    key_bias: mask.key_bias,
                    alibi: mask.alibi,
                    ..Default::default()
                };
                reference_attend_with(&q, &k, &v, &reference).unwrap()
            }
            Some(w) => {
                let reference = crate::mixer::local::LocalOpts {
                    window: w,
                    chunk: 16,
                    causal: mask.causal,
                    q_offset: 0,
                    key_bias: mask.key_bias,
                    alibi: mask.alibi,
                    global: mask.global,
                };
                crate::kernels::with_reference(|| {
                    crate::mixer::local::attend_local(&q, &k, &v, &reference)
                })
                .unwrap()
            }
        };
        out.transpose(1, 2).unwrap().reshape((b, n, h * d)).unwrap()
    }

    /// The merged layout, and the packed `[q | k | v]` one, against the differentiable
    /// reference on split heads, for the masks the arena's mixers use (causal, padded,
    /// ALiBi, a window with global tokens), in values and gradients.
    #[test]
    fn merged_and_packed_heads_match_the_reference_in_values_and_gradients() {
        let (b, h, n, d) = (2, 3, 45, 8);
        let hd = h * d;
        let slopes = Tensor::new(&[0.5f32, 0.25, 0.125], &Device::Cpu).unwrap();
        let kb: Vec<f32> = (0..b * n)
            .map(|i| if i >= 2 * n - 4 { MASKED as f32 } else { 0.0 })
            .collect();
        let kb = Tensor::from_vec(kb, (b, 1, 1, n), &Device::Cpu).unwrap();
        for (causal, padded, alibi, window) in [
            (false, false, false, None),
            (true, false, false, None),
            (false, true, true, None),
            (true, true, true, None),
            (false, true, false, Some(6)),
            (true, false, true, Some(9)),
        ] {
            let mask = FlashMask {
                causal,
                key_bias: padded.then_some(&kb),
                alibi: alibi.then_some(&slopes),
                window,
                global: if window.is_some() { 2 } else { 0 },
                ..Default::default()
            };
            let what = format!("causal={causal} padded={padded} alibi={alibi} window={window:?}");
            let r = randn(&[b, n, hd], 8).to_dtype(DType::F32).unwrap();
            let grads = |y: Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();

            let (q, k, v) = (
                var(&[b, n, hd], 5),
                var(&[b, n, hd], 6),
                var(&[b, n, hd], 7),
            );
            let fast = flash_attention_merged(&q, &k, &v, h, &mask).unwrap();
            let slow = reference_merged(&q, &k, &v, h, &mask);
            assert!(max_rel(&fast, &slow) < 1e-5, "merged values {what}");
            let (gf, gs) = (grads(fast), grads(slow));
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, e) = (gf.get(var).unwrap(), gs.get(var).unwrap());
                assert!(
                    max_rel(a, e) < 1e-4,
                    "merged grad {name} {what}: {}",
                    max_rel(a, e)
                );
            }

            let qkv = var(&[b, n, 3 * hd], 9);
            let part = |i: usize| qkv.narrow(2, i * hd, hd).unwrap();
            let fast = flash_attention_qkv(&qkv, h, &mask).unwrap();
            let slow = reference_merged(&part(0), &part(1), &part(2), h, &mask);
            assert!(max_rel(&fast, &slow) < 1e-5, "packed values {what}");
            let (a, e) = (grads(fast), grads(slow));
            let (a, e) = (a.get(&qkv).unwrap(), e.get(&qkv).unwrap());
            assert!(
                max_rel(a, e) < 1e-4,
                "packed grad {what}: {}",
                max_rel(a, e)
            );
        }
    }

    #[test]
    fn merged_heads_of_the_wrong_width_are_an_error() {
        let x = Tensor::zeros((1, 4, 10), DType::F32, &Device::Cpu).unwrap();
        let err = flash_attention_merged(&x, &x, &x, 3, &FlashMask::default()).unwrap_err();
        assert!(err.to_string().contains("3 heads"), "{err}");
        let err = flash_attention_qkv(&x, 3, &FlashMask::default()).unwrap_err();
        assert!(err.to_string().contains("3 heads"), "{err}");
    }

    fn var(shape: &[usize], seed: u64) -> Var {
        Var::from_tensor(&randn(shape, seed).to_dtype(DType::F32).unwrap()).unwrap()
    }
}
