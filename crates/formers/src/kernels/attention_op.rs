//! Exact softmax attention as one candle op with a backward pass (FlashAttention-2, Dao
//! 2023): the forward runs [`flash::forward`] and keeps only the output and each row's
//! log-sum-exp, the backward runs [`flash::backward`], so training memory is O(n·d).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::flash::{self, Dims, Opts};
use super::{f32_values, flat};
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
}

/// `q [b, h, n, d]` and `k [b, h, m, d]` as [`Dims`].
fn dims(q: &Shape, k: &Shape) -> candle_core::Result<Dims> {
    let (batch, heads, n, d) = q.dims4()?;
    let m = k.dims4()?.2;
    Ok(Dims {
        batch,
        heads,
        n,
        m,
        d,
    })
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    /// Returns `[b, h, n, d + 1]`: the output with each row's log-sum-exp appended, which
    /// the backward needs; [`flash_attention`] hands on the first `d` columns.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims(l1.shape(), l2.shape())?;
        let (q, k, v) = (
            f32_values(s1, l1, "flash-attention")?,
            f32_values(s2, l2, "flash-attention")?,
            f32_values(s3, l3, "flash-attention")?,
        );
        let (out, lse) = flash::forward(&dims, &self.opts(), q, k, v);
        let d = dims.d;
        let mut packed = Vec::with_capacity(lse.len() * (d + 1));
        for (row, l) in out.chunks_exact(d.max(1)).zip(&lse) {
            packed.extend_from_slice(&row[..d]);
            packed.push(*l);
        }
        let shape = Shape::from((dims.batch, dims.heads, dims.n, d + 1));
        Ok((CpuStorage::F32(packed), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = dims(q.shape(), k.shape())?;
        let d = dims.d;
        let res = res.detach();
        let (out, lse) = (res.narrow(3, 0, d)?, res.narrow(3, d, 1)?);
        let dout = grad_res.narrow(3, 0, d)?;
        let (dq, dk, dv) = flash::backward(
            &dims,
            &self.opts(),
            &flat(q)?,
            &flat(k)?,
            &flat(v)?,
            &flat(&out)?,
            &flat(&lse)?,
            &flat(&dout)?,
        );
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
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
    q.dtype() == DType::F32 && q.device().is_cpu() && super::fused_enabled()
}

/// `softmax(q kᵀ / sqrt(d) + masks) v` for `q [b, h, n, d]`, `k, v [b, h, m, d]` (f32, CPU),
/// differentiable in `q`, `k` and `v` with O(n·d) memory.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &FlashMask) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let m = k.dim(2)?;
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
    let op = FlashAttention {
        causal: mask.causal,
        q_offset: mask.q_offset,
        scale: 1.0 / (d as f32).sqrt(),
        key_bias,
        alibi,
        window: mask.window,
        global: mask.global,
    };
    let packed = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    Ok(packed.narrow(3, 0, d)?)
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

    fn var(shape: &[usize], seed: u64) -> Var {
        Var::from_tensor(&randn(shape, seed).to_dtype(DType::F32).unwrap()).unwrap()
    }
}
