//! LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) as single candle ops with
//! a backward pass: one pass over each row forward, one backward (which recomputes the
//! row's statistics instead of storing them), the gain and bias gradients summed per block of
//! rows in a fixed order (so results do not depend on the thread count).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_values, flat};
use crate::Result;

/// Rows per parallel block (fixed, so the sums of the gain gradient have one order).
const BLOCK: usize = 64;

/// Which norm, with its epsilon.
#[derive(Debug, Clone, Copy)]
struct NormOp {
    /// LayerNorm (centred) or RMSNorm.
    centred: bool,
    eps: f32,
}

/// `(mean, 1 / sqrt(var + eps))` of a row (mean 0 for RMSNorm), accumulated in f64.
#[inline(always)]
fn stats(row: &[f32], op: NormOp) -> (f32, f32) {
    let d = row.len() as f64;
    let mean = if op.centred {
        row.iter().map(|&x| x as f64).sum::<f64>() / d
    } else {
        0.0
    };
    let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / d;
    (mean as f32, (1.0 / (var + op.eps as f64).sqrt()) as f32)
}

impl NormOp {
    /// `y = (x − mean) · rstd · w + b` row by row.
    fn forward(self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(BLOCK * d)
            .zip(x.par_chunks(BLOCK * d))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_exact_mut(d).zip(xb.chunks_exact(d)) {
                    let (mean, rstd) = stats(xr, self);
                    for j in 0..d {
                        let v = (xr[j] - mean) * rstd * w[j];
                        yr[j] = match b {
                            Some(b) => v + b[j],
                            None => v,
                        };
                    }
                }
            });
        y
    }

    /// `(dx, dw, db)` for output gradient `dy`.
    fn backward(self, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = w.len();
        let mut dx = vec![0f32; x.len()];
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(BLOCK * d)
            .zip(x.par_chunks(BLOCK * d).zip(dy.par_chunks(BLOCK * d)))
            .map(|(dxb, (xb, dyb))| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                let mut g = vec![0f32; d];
                let mut xhat = vec![0f32; d];
                for ((dxr, xr), dyr) in dxb
                    .chunks_exact_mut(d)
                    .zip(xb.chunks_exact(d))
                    .zip(dyb.chunks_exact(d))
                {
                    let (mean, rstd) = stats(xr, self);
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    for j in 0..d {
                        xhat[j] = (xr[j] - mean) * rstd;
                        g[j] = dyr[j] * w[j];
                        sum_g += g[j] as f64;
                        sum_gx += (g[j] * xhat[j]) as f64;
                        dw[j] += dyr[j] * xhat[j];
                        db[j] += dyr[j];
                    }
                    let mean_g = if self.centred {
                        (sum_g / d as f64) as f32
                    } else {
                        0.0
                    };
                    let mean_gx = (sum_gx / d as f64) as f32;
                    for j in 0..d {
                        dxr[j] = rstd * (g[j] - mean_g - xhat[j] * mean_gx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (pw, pb) in partial {
            dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
        }
        (dx, dw, db)
    }
}

impl NormOp {
    /// Shared backward of both op forms: gradients for `x`, the gain and the bias.
    fn grads(
        self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dx, dw, db) = self.backward(&flat(x)?, &flat(w)?, &flat(grad)?);
        Ok((
            Tensor::from_vec(dx, x.shape(), x.device())?,
            Tensor::from_vec(dw, w.shape(), w.device())?,
            Tensor::from_vec(db, w.shape(), w.device())?,
        ))
    }
}

/// LayerNorm: `(x, weight, bias)`.
impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let y = self.forward(
            f32_values(s1, l1, "fused norm")?,
            f32_values(s2, l2, "fused norm")?,
            Some(f32_values(s3, l3, "fused norm")?),
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// RMSNorm: `(x, weight)`.
impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.forward(
            f32_values(s1, l1, "fused norm")?,
            f32_values(s2, l2, "fused norm")?,
            None,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Whether the fused norms take `x` (f32 on the CPU, with f32 parameters).
pub fn supports(x: &Tensor, weight: &Tensor) -> bool {
    super::fused_f32_cpu(&[x, weight])
}

/// LayerNorm over the last dimension, differentiable in `x`, `weight` and `bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = NormOp {
        centred: true,
        eps: eps as f32,
    };
    Ok(x.contiguous()?.apply_op3(weight, bias, op)?)
}

/// RMSNorm over the last dimension, differentiable in `x` and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = NormOp {
        centred: false,
        eps: eps as f32,
    };
    Ok(x.contiguous()?.apply_op2(weight, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_rel, randn};
    use candle_core::{DType, Device, Var, D};

    /// The composed reference in f64 (what `Norm::forward_composed` computes).
    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Tensor {
        let xc = match b {
            Some(_) => x
                .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
                .unwrap(),
            None => x.clone(),
        };
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y = xc
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap();
        match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    #[test]
    fn values_and_gradients_match_the_composed_reference() {
        let f32var = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
        let f64var = |v: &Var| Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap();
        for centred in [true, false] {
            for shape in [vec![3, 5, 24], vec![200, 7], vec![1, 64]] {
                let d = *shape.last().unwrap();
                let x = f32var((randn(&shape, 1) * 3.0).unwrap());
                let w = f32var((randn(&[d], 2) + 1.0).unwrap());
                let b = f32var(randn(&[d], 3));
                let r = randn(&shape, 4);
                let eps = 1e-5;
                let fast = if centred {
                    layer_norm(&x, &w, &b, eps).unwrap()
                } else {
                    rms_norm(&x, &w, eps).unwrap()
                };
                let (x64, w64, b64) = (f64var(&x), f64var(&w), f64var(&b));
                let slow = reference(&x64, &w64, centred.then_some(&*b64), eps);
                let what = format!("centred={centred} {shape:?}");
                assert!(max_rel(&fast, &slow) < 1e-5, "values {what}");
                let gf = (fast.to_dtype(DType::F64).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let mut pairs = vec![("x", &x, &x64), ("weight", &w, &w64)];
                if centred {
                    pairs.push(("bias", &b, &b64));
                }
                for (name, a, e) in pairs {
                    let (a, e) = (gf.get(a).unwrap(), gs.get(e).unwrap());
                    assert!(
                        max_rel(a, e) < 1e-4,
                        "grad {name} {what}: {}",
                        max_rel(a, e)
                    );
                }
            }
        }
    }

    #[test]
    fn gain_gradients_do_not_depend_on_the_thread_count() {
        let x = randn(&[1000, 16], 5).to_dtype(DType::F32).unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = vec![1.5f32; 16];
        let op = NormOp {
            centred: true,
            eps: 1e-5,
        };
        let grads = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| op.backward(&x, &w, &x))
        };
        assert_eq!(grads(1), grads(3));
        let _ = Device::Cpu;
    }
}
