//! Softmax cross-entropy as one candle op with a backward pass: the forward reads each row
//! of logits once for its log-sum-exp and returns the weighted mean negative
//! log-likelihood; the backward writes `(softmax − onehot) · w / Σw` (times the incoming
//! gradient) in one more pass, recomputing the row's log-sum-exp instead of storing it.
//! Sums run in f64 per block of rows, joined in block order (one order for any thread count).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::f32_values;
use super::simd::{self, Simd, LANES};
use crate::Result;

/// Rows per parallel block.
const BLOCK: usize = 32;

/// `(max, log Σ exp(x − max))` of a row, eight lanes at a time.
#[inline(always)]
unsafe fn row_lse<S: Simd>(x: &[f32]) -> (f32, f32) {
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut mv = S::splat(f32::NEG_INFINITY);
    for c in chunks.clone() {
        mv = S::max(mv, S::load(c));
    }
    let max = tail
        .iter()
        .fold(S::hmax(mv), |m, &v| if v > m { v } else { m });
    let shift = S::splat(max);
    let mut sv = S::splat(0.0);
    for c in chunks {
        sv = S::add(sv, S::exp(S::sub(S::load(c), shift)));
    }
    let sum = tail.iter().fold(S::sum(sv), |s, &v| s + (v - max).exp());
    (max, sum.ln())
}

/// The op: `(logits [n, c], targets [n] u32, weights [n])`.
struct CrossEntropy;

/// The values of a contiguous u32 CPU tensor.
fn u32_values<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(data) = s else {
        candle_core::bail!("fused cross-entropy takes u32 targets")
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("fused cross-entropy takes contiguous targets")
    };
    Ok(&data[start..end])
}

/// Classes per row, logits, targets, weights.
type Inputs<'a> = (usize, &'a [f32], &'a [u32], &'a [f32]);

/// Checked inputs.
fn inputs<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> candle_core::Result<Inputs<'a>> {
    let (n, c) = l1.shape().dims2()?;
    let x = f32_values(s1, l1, "fused cross-entropy")?;
    let t = u32_values(s2, l2)?;
    let w = f32_values(s3, l3, "fused cross-entropy")?;
    if t.len() != n || w.len() != n {
        candle_core::bail!(
            "fused cross-entropy: {n} rows of logits, {} targets, {} weights",
            t.len(),
            w.len()
        )
    }
    if let Some(bad) = t.iter().find(|&&t| t as usize >= c) {
        candle_core::bail!("fused cross-entropy: target {bad} with {c} classes")
    }
    Ok((c, x, t, w))
}

/// `Σ w_i · (lse_i − x_i[t_i])` and `Σ w_i`, each in f64.
fn forward(c: usize, x: &[f32], t: &[u32], w: &[f32]) -> (f64, f64) {
    let parts: Vec<(f64, f64)> = x
        .par_chunks(BLOCK * c)
        .zip(t.par_chunks(BLOCK).zip(w.par_chunks(BLOCK)))
        .map(|(xb, (tb, wb))| {
            simd::dispatch!(|S| {
                let (mut nll, mut total) = (0f64, 0f64);
                for ((row, &ti), &wi) in xb.chunks_exact(c).zip(tb).zip(wb) {
                    let (max, lse) = row_lse::<S>(row);
                    nll += wi as f64 * ((max + lse) - row[ti as usize]) as f64;
                    total += wi as f64;
                }
                (nll, total)
            })
        })
        .collect();
    parts
        .into_iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
}

/// `dx = (softmax(x) − onehot(t)) · w · scale` row by row.
fn backward(c: usize, x: &[f32], t: &[u32], w: &[f32], scale: f32) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(BLOCK * c)
        .zip(x.par_chunks(BLOCK * c))
        .zip(t.par_chunks(BLOCK).zip(w.par_chunks(BLOCK)))
        .for_each(|((db, xb), (tb, wb))| {
            simd::dispatch!(|S| {
                for (((drow, row), &ti), &wi) in db
                    .chunks_exact_mut(c)
                    .zip(xb.chunks_exact(c))
                    .zip(tb)
                    .zip(wb)
                {
                    let (max, lse) = row_lse::<S>(row);
                    let k = wi * scale;
                    let (shift, kv) = (S::splat(max + lse), S::splat(k));
                    let mut dc = drow.chunks_exact_mut(LANES);
                    let mut xc = row.chunks_exact(LANES);
                    for (d, x) in (&mut dc).zip(&mut xc) {
                        S::store(d, S::mul(S::exp(S::sub(S::load(x), shift)), kv));
                    }
                    for (d, &x) in dc.into_remainder().iter_mut().zip(xc.remainder()) {
                        *d = (x - (max + lse)).exp() * k;
                    }
                    drow[ti as usize] -= k;
                }
            })
        });
    dx
}

impl CustomOp3 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
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
        let (c, x, t, w) = inputs((s1, l1), (s2, l2), (s3, l3))?;
        let (nll, total) = forward(c, x, t, w);
        Ok((CpuStorage::F32(vec![(nll / total) as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let dx = logits.apply_op3_no_bwd(targets, weights, &CrossEntropyGrad(g))?;
        Ok((Some(dx), None, None))
    }
}

/// The backward of [`CrossEntropy`] for an incoming gradient, as a forward-only op.
struct CrossEntropyGrad(f32);

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
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
        let (c, x, t, w) = inputs((s1, l1), (s2, l2), (s3, l3))?;
        let total: f64 = w.iter().map(|&w| w as f64).sum();
        let dx = backward(c, x, t, w, (self.0 as f64 / total) as f32);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Whether the fused op takes these logits: f32 on the CPU (and the kernels enabled).
pub fn supports(logits: &Tensor) -> bool {
    super::fused_f32_cpu(&[logits])
}

/// Weighted mean cross-entropy of `logits [n, c]` (f32, CPU) against `targets [n]` (u32)
/// with `weights [n]` (all ones if `None`), differentiable in the logits.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let weights = match weights {
        Some(w) => w.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::ones(n, DType::F32, logits.device())?,
    };
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    Ok(logits
        .contiguous()?
        .apply_op3(&targets, &weights, CrossEntropy)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::cross_entropy_composed;
    use crate::testutil::{max_rel, randn};
    use candle_core::{Device, Var};

    /// Logits `[n, c]` (spread ×3), targets and weights with some zeros.
    fn inputs(n: usize, c: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
        let x = (randn(&[n, c], seed) * 3.0).unwrap();
        let t: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % c) as u32).collect();
        let w: Vec<f64> = (0..n).map(|i| [1.0, 0.0, 0.5, 1.0][i % 4]).collect();
        let dev = &Device::Cpu;
        (
            x,
            Tensor::new(t, dev).unwrap(),
            Tensor::new(w, dev).unwrap(),
        )
    }

    /// Loss and logit gradient of `f` on f32 logits.
    fn loss_and_grad(x: &Tensor, f: impl Fn(&Tensor) -> crate::Result<Tensor>) -> (Tensor, Tensor) {
        let x = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let loss = f(x.as_tensor()).unwrap();
        // Scaled, so the incoming gradient is not 1.
        let g = (&loss * 2.5).unwrap().backward().unwrap();
        (loss, g.get(x.as_tensor()).unwrap().clone())
    }

    #[test]
    fn fused_cross_entropy_matches_the_composed_reference() {
        // 37 rows (not a block multiple), 19 classes (not a lane multiple), and 3 × 256.
        for (n, c) in [(37, 19), (3, 256), (70, 8)] {
            let (x, t, w) = inputs(n, c, n as u64);
            let w32 = w.to_dtype(DType::F32).unwrap();
            for weights in [None, Some(&w32)] {
                let (fused, dfused) = loss_and_grad(&x, |x| cross_entropy(x, &t, weights));
                let (want, dwant) = loss_and_grad(&x, |x| cross_entropy_composed(x, &t, weights));
                assert!(max_rel(&fused, &want) < 1e-6, "loss {fused} vs {want}");
                let e = max_rel(&dfused, &dwant);
                assert!(e < 1e-6, "{n}×{c}: gradient off by {e}");
            }
        }
    }

    #[test]
    fn fused_cross_entropy_gradient_matches_finite_differences() {
        let (x, t, w) = inputs(3, 5, 7);
        let w32 = w.to_dtype(DType::F32).unwrap();
        let (_, grad) = loss_and_grad(&x, |x| cross_entropy(x, &t, Some(&w32)));
        let grad = (grad / 2.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let loss = |v: &[f64]| {
            let x = Tensor::from_slice(v, (3, 5), &Device::Cpu).unwrap();
            cross_entropy_composed(&x, &t, Some(&w))
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-6;
        for i in 0..base.len() {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h);
            let got = grad[i] as f64;
            assert!(
                (got - numeric).abs() < 1e-5,
                "d/dx[{i}]: {got} vs {numeric}"
            );
        }
    }

    #[test]
    fn fused_cross_entropy_refuses_a_target_out_of_range() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        let err = cross_entropy(&x, &t, None).unwrap_err().to_string();
        assert!(err.contains("target 3 with 3 classes"), "{err}");
    }
}
