//! `y + b` with `b` broadcast over the leading dimensions of `y` (a linear layer's bias, a
//! position table over the batch) as one op whose backward passes the gradient through to
//! `y` and sums its rows for `b` in one contiguous pass. candle's `broadcast_add` backward
//! sums through its generic strided reduction instead, the largest non-GEMM cost of a
//! training step in the profile. Row sums run per block of rows, joined in block order.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::f32_values;

/// Rows per parallel block (fixed, so the sums have one order for any thread count).
const BLOCK: usize = 64;

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_values(s1, l1, "fused bias add")?;
        let b = f32_values(s2, l2, "fused bias add")?;
        let mut out = y.to_vec();
        add_rows(&mut out, b);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = row_sum(grad, b.elem_count())?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// `y_r += b` for every row `y_r` of `y` (`[.., b.len()]`), in parallel blocks of rows.
pub(crate) fn add_rows(y: &mut [f32], b: &[f32]) {
    if b.is_empty() {
        return;
    }
    y.par_chunks_mut(BLOCK * b.len()).for_each(|block| {
        for row in block.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
        }
    });
}

/// Sum of the rows of `[.., d]` as `[d]`.
struct RowSum(usize);

impl CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "fused-row-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_values(s, l, "fused row sum")?;
        let d = self.0;
        let partial: Vec<Vec<f32>> = g
            .par_chunks(BLOCK * d)
            .map(|gb| {
                let mut acc = vec![0f32; d];
                for row in gb.chunks_exact(d) {
                    acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
                }
                acc
            })
            .collect();
        let mut sum = vec![0f32; d];
        for p in partial {
            sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(sum), Shape::from(d)))
    }
}

/// The sum of the rows of `grad [.., d]` as `[d]`, in one contiguous pass per block of rows
/// (blocks joined in order, so the sum does not depend on the thread count).
pub(crate) fn row_sum(grad: &Tensor, d: usize) -> candle_core::Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&RowSum(d))
}

/// `y + b` for `b` of the trailing shape of `y`: the fused op for f32 on the CPU (when the
/// kernels are enabled), candle's `broadcast_add` otherwise.
pub fn add(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let trailing = y.rank() >= b.rank() && y.dims()[y.rank() - b.rank()..] == *b.dims();
    let fused = trailing && b.elem_count() > 0 && super::fused_f32_cpu(&[y, b]);
    if !fused {
        return y.broadcast_add(b);
    }
    y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_rel, randn};
    use candle_core::{DType, Var};

    #[test]
    fn fused_bias_add_matches_broadcast_add_in_values_and_gradients() {
        // 150 rows: more than two blocks and a partial one; a 2-d "bias" (a position table).
        for (ys, bs) in [(vec![3, 50, 24], vec![24]), (vec![4, 6, 5], vec![6, 5])] {
            let f = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let y = Var::from_tensor(&f(randn(&ys, 1))).unwrap();
            let b = Var::from_tensor(&f(randn(&bs, 2))).unwrap();
            let r = f(randn(&ys, 3));
            let run = |reference: bool| {
                let go = || add(y.as_tensor(), b.as_tensor()).unwrap();
                let out = if reference {
                    crate::kernels::with_reference(go)
                } else {
                    go()
                };
                let g = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let dy = g.get(y.as_tensor()).unwrap().clone();
                (out, dy, g.get(b.as_tensor()).unwrap().clone())
            };
            let (out, dy, db) = run(false);
            let (want, dy_want, db_want) = run(true);
            assert_eq!(max_rel(&out, &want), 0.0);
            assert_eq!(max_rel(&dy, &dy_want), 0.0);
            let e = max_rel(&db, &db_want);
            assert!(e < 1e-6, "{ys:?} + {bs:?}: bias gradient off by {e}");
        }
    }
}
