//! [`matmul`]: candle's `Tensor::matmul` (same shapes, same batching) computed by formers'
//! [`gemm`](super::gemm) for f32 on the CPU, as a candle op with a backward pass that runs
//! the same kernel (`∂a = g·bᵀ`, `∂b = aᵀ·g`; the transposes are views, taken in packing).
//! Operands whose last two dims are row-major or transposed (e.g. `w.t()`) are read in
//! place; other layouts are copied first.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::gemm::{gemm, Dims, MatRef};
use crate::Result;

/// How `gemm` reads a tensor of layout `l`: `(start, ld, trans, batch_stride)`, or `None`
/// when its last two dims are neither row-major nor transposed or its batch dims do not
/// collapse into one stride.
fn mat_layout(l: &Layout) -> Option<(usize, usize, bool, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 {
        return None;
    }
    let (rows, cols) = (dims[r - 2], dims[r - 1]);
    let (rs, cs) = (strides[r - 2], strides[r - 1]);
    let (ld, trans) = if (cs == 1 || cols <= 1) && (rows <= 1 || rs >= cols) {
        (if rows <= 1 { cols.max(1) } else { rs }, false)
    } else if (rs == 1 || rows <= 1) && (cols <= 1 || cs >= rows) {
        (if cols <= 1 { rows.max(1) } else { cs }, true)
    } else {
        return None;
    };
    // Batch dims, innermost first: each a whole number of the one inside it.
    let mut batch_stride = None;
    let mut expect = None;
    for i in (0..r - 2).rev() {
        if dims[i] == 1 {
            continue;
        }
        if let Some(e) = expect {
            if strides[i] != e {
                return None;
            }
        } else {
            batch_stride = Some(strides[i]);
        }
        expect = Some(strides[i] * dims[i]);
    }
    Some((l.start_offset(), ld, trans, batch_stride.unwrap_or(0)))
}

/// `(batch, m, k, n)` of `a · b`, if candle's `matmul` would accept them.
fn bmkn(a: &Shape, b: &Shape) -> Option<(usize, usize, usize, usize)> {
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r {
        return None;
    }
    let (m, k, k2, n) = (ad[r - 2], ad[r - 1], bd[r - 2], bd[r - 1]);
    let batch: usize = ad[..r - 2].iter().product();
    if k != k2 || batch != bd[..r - 2].iter().product::<usize>() {
        return None;
    }
    Some((batch, m, k, n))
}

struct MatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "formers-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("formers-matmul takes f32")
        };
        let Some((batch, m, k, n)) = bmkn(l1.shape(), l2.shape()) else {
            candle_core::bail!(
                "formers-matmul: shapes {:?} and {:?} do not multiply",
                l1.shape(),
                l2.shape()
            )
        };
        let (Some(la), Some(lb)) = (mat_layout(l1), mat_layout(l2)) else {
            candle_core::bail!("formers-matmul: unsupported strides")
        };
        fn operand(
            data: &[f32],
            (start, ld, trans, batch_stride): (usize, usize, bool, usize),
        ) -> MatRef<'_> {
            MatRef {
                data: &data[start..],
                ld,
                trans,
                batch_stride,
            }
        }
        let mut out = vec![0f32; batch * m * n];
        gemm(
            Dims { batch, m, n, k },
            operand(a, la),
            operand(b, lb),
            &mut out,
            n,
            m * n,
            false,
        );
        let mut shape = l1.dims()[..l1.dims().len() - 2].to_vec();
        shape.extend([m, n]);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = matmul_or_candle(grad, &b.t()?)?;
        let gb = matmul_or_candle(&a.t()?, grad)?;
        Ok((Some(ga), Some(gb)))
    }
}

fn matmul_or_candle(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let fast = a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.device().is_cpu()
        && b.device().is_cpu()
        && a.elem_count() > 0
        && b.elem_count() > 0
        && bmkn(a.shape(), b.shape()).is_some();
    if !fast {
        return a.matmul(b);
    }
    let a = if mat_layout(a.layout()).is_some() {
        a.clone()
    } else {
        a.contiguous()?
    };
    let b = if mat_layout(b.layout()).is_some() {
        b.clone()
    } else {
        b.contiguous()?
    };
    a.apply_op2(&b, MatMul)
}

/// `a · b` as candle's `Tensor::matmul` (`[.., m, k] · [.., k, n]`, equal batch counts),
/// by formers' gemm for non-empty f32 CPU tensors (with its backward pass), by candle
/// otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(matmul_or_candle(a, b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::flat;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(x: &Tensor, y: &Tensor) -> f32 {
        assert_eq!(x.dims(), y.dims());
        flat(x)
            .unwrap()
            .iter()
            .zip(flat(y).unwrap())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Values and both gradients against candle's matmul, for a loss that weights every
    /// output differently.
    fn compare(a: Tensor, b: Tensor, tol: f32) {
        let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
        let ours = matmul(&va, &vb).unwrap();
        let theirs = va.matmul(&vb).unwrap();
        assert!(max_diff(&ours, &theirs) < tol, "values");
        let w = randn(ours.dims(), 99);
        let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&va, &vb] {
            let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < tol, "gradient differs by {d}");
        }
    }

    #[test]
    fn values_and_gradients_match_candles_matmul() {
        compare(randn(&[7, 13], 1), randn(&[13, 129], 2), 1e-5);
        compare(randn(&[35, 384], 3), randn(&[384, 100], 4), 1e-4);
        compare(randn(&[2, 3, 9, 17], 5), randn(&[2, 3, 17, 6], 6), 1e-5);
    }

    #[test]
    fn transposed_views_are_read_in_place_and_differentiated() {
        // x · wᵀ with w [out, in], as the linear layer does.
        let x = Var::from_tensor(&randn(&[40, 24], 7)).unwrap();
        let w = Var::from_tensor(&randn(&[30, 24], 8)).unwrap();
        let wt = w.t().unwrap();
        assert!(mat_layout(wt.layout()).unwrap().2, "wᵀ is read transposed");
        let ours = matmul(&x, &wt).unwrap();
        let theirs = x.matmul(&wt).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let wgt = randn(&[40, 30], 9);
        let g1 = (&ours * &wgt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&theirs * &wgt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-5);
        }
        // Batched with transposed lhs, and a narrowed (strided) rhs.
        let a = randn(&[3, 11, 5], 10).transpose(1, 2).unwrap();
        let big = randn(&[3, 11, 20], 11);
        let b = big.narrow(2, 4, 7).unwrap();
        let ours = matmul(&a, &b).unwrap();
        assert!(max_diff(&ours, &a.matmul(&b.contiguous().unwrap()).unwrap()) < 1e-5);
    }

    #[test]
    fn broadcast_batches_sum_their_gradient_as_candle_does() {
        let x = Var::from_tensor(&randn(&[4, 6, 10], 12)).unwrap();
        let w = Var::from_tensor(&randn(&[10, 8], 13)).unwrap();
        let wb = w.broadcast_as((4, 10, 8)).unwrap();
        let ours = matmul(&x, &wb).unwrap();
        let theirs = x.matmul(&wb).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = ours.sum_all().unwrap().backward().unwrap();
        let g2 = theirs.sum_all().unwrap().backward().unwrap();
        assert_eq!(g1.get(&w).unwrap().dims(), &[10, 8]);
        assert!(max_diff(g1.get(&w).unwrap(), g2.get(&w).unwrap()) < 1e-5);
    }

    #[test]
    fn gradient_matches_finite_differences_in_f64() {
        // The op's gradient (f32) against central differences of the f64 product.
        let a = randn(&[3, 4], 14);
        let b = randn(&[4, 5], 15);
        let w = randn(&[3, 5], 16);
        let va = Var::from_tensor(&a).unwrap();
        let g = (matmul(&va, &b).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ga = flat(g.get(&va).unwrap()).unwrap();
        let loss = |a: &[f64]| -> f64 {
            let (bv, wv) = (flat(&b).unwrap(), flat(&w).unwrap());
            let mut s = 0.0;
            for i in 0..3 {
                for j in 0..5 {
                    let c: f64 = (0..4).map(|k| a[i * 4 + k] * bv[k * 5 + j] as f64).sum();
                    s += c * wv[i * 5 + j] as f64;
                }
            }
            s
        };
        let a64: Vec<f64> = flat(&a).unwrap().iter().map(|&v| v as f64).collect();
        for (i, &gi) in ga.iter().enumerate() {
            let (mut p, mut q) = (a64.clone(), a64.clone());
            p[i] += 1e-6;
            q[i] -= 1e-6;
            let fd = (loss(&p) - loss(&q)) / 2e-6;
            assert!((gi as f64 - fd).abs() < 1e-5, "{i}: {gi} vs {fd}");
        }
    }

    #[test]
    fn other_dtypes_and_empty_shapes_take_candles_path() {
        let a = randn(&[3, 4], 17).to_dtype(DType::F64).unwrap();
        let b = randn(&[4, 2], 18).to_dtype(DType::F64).unwrap();
        assert_eq!(matmul(&a, &b).unwrap().dtype(), DType::F64);
        let e = matmul(&randn(&[3, 0], 1), &randn(&[0, 2], 2)).unwrap();
        assert_eq!(e.dims(), &[3, 2]);
        assert!(matmul(&randn(&[3, 4], 1), &randn(&[5, 2], 2)).is_err());
    }
}
