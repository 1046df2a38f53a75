//! A dense linear layer `y = x Wᵀ + b` as one candle op with its backward pass.
//!
//! Composed, the layer is five autograd nodes (reshape, transpose, matmul, bias add,
//! reshape), and candle's backward zero-fills and then adds a gradient buffer for every
//! input of every node: for a `[tokens, d]` activation that is three zero-fills and three
//! additions per layer beyond the products themselves (the memset and `binary_map` rows of
//! the training profile). As one node the layer costs one. The products are candle's own
//! CPU matmul (`BackendStorage::matmul`, the `gemm` crate) on the same strides, so values
//! are those of the composed path; the composed path stays as the reference
//! ([`super::with_reference`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::bias::{add_rows, row_sum};

/// `x Wᵀ` for `x [.., d_in]` (contiguous) and `w [d_out, d_in]`, with the shape of `x` and
/// `d_out` last.
fn product(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
) -> candle_core::Result<(CpuStorage, Shape, usize)> {
    let (CpuStorage::F32(_), CpuStorage::F32(_)) = (x, w) else {
        candle_core::bail!("fused linear takes f32")
    };
    let dims = lx.shape().dims();
    let Some(&d_in) = dims.last() else {
        candle_core::bail!("fused linear: a scalar input")
    };
    let (d_out, w_in) = lw.shape().dims2()?;
    if w_in != d_in {
        candle_core::bail!("fused linear: weight [{d_out}, {w_in}] for inputs of width {d_in}")
    }
    if !lx.is_contiguous() {
        candle_core::bail!("fused linear takes a contiguous input")
    }
    let rows = lx.shape().elem_count() / d_in.max(1);
    let mut out = dims.to_vec();
    *out.last_mut().expect("non-empty") = d_out;
    let y = if rows == 0 || d_out == 0 || d_in == 0 {
        CpuStorage::F32(vec![0f32; rows * d_out])
    } else {
        let lx = Layout::contiguous_with_offset((rows, d_in), lx.start_offset());
        x.matmul(w, (1, rows, d_out, d_in), &lx, &lw.transpose(0, 1)?)?
    };
    Ok((y, Shape::from(out), d_out))
}

/// `x Wᵀ + b`: inputs `(x, w, b)`.
struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (y, shape, d_out) = product(s1, l1, s2, l2)?;
        let b = super::f32_values(s3, l3, "fused linear")?;
        if b.len() != d_out {
            candle_core::bail!("fused linear: {} biases for {d_out} outputs", b.len())
        }
        let CpuStorage::F32(mut y) = y else {
            candle_core::bail!("fused linear: f32 product expected")
        };
        add_rows(&mut y, b);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, g) = gradients(x, w, grad)?;
        let db = row_sum(&g, b.elem_count())?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `gelu(x Wᵀ + b)` (exact, erf): inputs `(x, w, b)`. The pre-activation stays in the op
/// for the backward (as the separate GELU node kept it), which saves that node's gradient
/// buffer and a pass over the widest activation of a block.
struct LinearBiasGelu {
    pre: std::sync::Mutex<Vec<f32>>,
}

impl CustomOp3 for LinearBiasGelu {
    fn name(&self) -> &'static str {
        "fused-linear-gelu"
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
        let (pre, shape) = LinearBias.cpu_fwd(s1, l1, s2, l2, s3, l3)?;
        let CpuStorage::F32(pre) = pre else {
            candle_core::bail!("fused linear: f32 product expected")
        };
        let mut out = vec![0f32; pre.len()];
        super::gelu_map(&pre, None, &mut out);
        *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = pre;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let pre = self.pre.lock().unwrap_or_else(|e| e.into_inner());
        if pre.len() != grad.elem_count() {
            candle_core::bail!("fused linear-gelu: backward without its forward")
        }
        let mut dpre = vec![0f32; pre.len()];
        super::with_values(grad, |g| super::gelu_map(&pre, Some(g), &mut dpre))?;
        let dpre = Tensor::from_vec(dpre, res.shape(), res.device())?;
        LinearBias.bwd(x, w, b, res, &dpre)
    }
}

/// `x Wᵀ`: inputs `(x, w)`.
struct LinearNoBias;

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "fused-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, shape, _) = product(s1, l1, s2, l2)?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = gradients(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = g W`, `dW = gᵀ x` and `g` as `[rows, d_out]`, for the output gradient `g`.
fn gradients(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (d_out, d_in) = w.dims2()?;
    let rows = x.elem_count() / d_in.max(1);
    let g = grad.contiguous()?.reshape((rows, d_out))?;
    let dx = g.matmul(&w.detach())?.reshape(x.shape())?;
    let dw = g.t()?.matmul(&x.detach().reshape((rows, d_in))?)?;
    Ok((dx, dw, g))
}

/// Whether [`linear`] runs the fused op on these tensors: f32 on the CPU with the fused
/// kernels on.
fn fused(x: &Tensor, w: &Tensor) -> bool {
    w.rank() == 2 && x.rank() >= 1 && super::fused_f32_cpu(&[x, w])
}

/// `x Wᵀ + b` over the last dimension of `x` (any rank) for `w [d_out, d_in]`: one fused
/// node for f32 on the CPU, `None` where the caller's composed path applies.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Option<candle_core::Result<Tensor>> {
    if !fused(x, w) || b.is_some_and(|b| b.dtype() != DType::F32) {
        return None;
    }
    let run = || {
        let x = x.contiguous()?;
        match b {
            Some(b) => x.apply_op3(w, &b.contiguous()?, LinearBias),
            None => x.apply_op2(w, LinearNoBias),
        }
    };
    Some(run())
}

/// `gelu(x Wᵀ + b)` (exact GELU) as one fused node for f32 on the CPU; `None` where the
/// caller's composed path (the linear layer, then `kernels::gelu_erf`) applies.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Option<candle_core::Result<Tensor>> {
    if !fused(x, w) || b.dtype() != DType::F32 {
        return None;
    }
    let op = LinearBiasGelu {
        pre: std::sync::Mutex::new(Vec::new()),
    };
    Some(
        x.contiguous()
            .and_then(|x| x.apply_op3(w, &b.contiguous()?, op)),
    )
}

#[cfg(test)]
mod tests {
    use crate::linear::Linear;
    use crate::params::Params;
    use crate::testutil::{max_rel, randn};
    use candle_core::{DType, Device, Tensor};

    /// Largest relative differences between the fused and the composed forward `f` over
    /// `p`'s parameters (with random, non-zero biases) for input `x`: of the values and of
    /// each gradient (named), under the loss `Σ f(x) · r` for a fixed random `r`.
    fn fused_against_composed(
        p: &Params,
        x: &[usize],
        f: impl Fn(&Tensor) -> Tensor,
    ) -> (f64, Vec<(String, f64)>) {
        for (name, var) in p.vars() {
            if name.ends_with("bias") {
                let n = var.elem_count();
                var.set(&randn(&[n], 9).to_dtype(DType::F32).unwrap())
                    .unwrap();
            }
        }
        let x = candle_core::Var::from_tensor(&randn(x, 1).to_dtype(DType::F32).unwrap()).unwrap();
        let run = |reference: bool| {
            let go = || f(x.as_tensor());
            let y = if reference {
                crate::kernels::with_reference(go)
            } else {
                go()
            };
            let r = randn(y.dims(), 2).to_dtype(DType::F32).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut all: Vec<(String, Tensor)> = p
                .vars()
                .into_iter()
                .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
                .collect();
            all.push(("x".into(), grads.get(x.as_tensor()).unwrap().clone()));
            (y, all)
        };
        let (fast, fast_grads) = run(false);
        let (slow, slow_grads) = run(true);
        assert_eq!(fast.dims(), slow.dims());
        let grads = fast_grads
            .iter()
            .zip(&slow_grads)
            .map(|((name, a), (_, e))| (name.clone(), max_rel(a, e)))
            .collect();
        (max_rel(&fast, &slow), grads)
    }

    /// The fused layer against the composed one (itself checked against f64 finite
    /// differences in `linear.rs`), in values and in every gradient: dense with and without
    /// bias, low-rank, rank 2 and 3 inputs, one row and many.
    #[test]
    fn fused_linear_matches_the_composed_layer_in_values_and_gradients() {
        for (shape, d_out, rank, bias) in [
            (vec![3, 50, 24], 40, None, true),
            (vec![130, 24], 7, None, false),
            (vec![1, 24], 24, None, true),
            (vec![2, 9, 24], 16, Some(5), true),
        ] {
            let p = Params::new(7, DType::F32, &Device::Cpu);
            let d_in = *shape.last().unwrap();
            let layer = Linear::with_rank(&p, d_in, d_out, rank, bias).unwrap();
            let (values, grads) = fused_against_composed(&p, &shape, |x| layer.forward(x).unwrap());
            let what = format!("{shape:?} -> {d_out}, rank {rank:?}, bias {bias}");
            assert!(values < 1e-6, "values {what}: {values}");
            for (name, err) in grads {
                assert!(err < 1e-5, "gradient of {name}, {what}: {err}");
            }
        }
    }

    /// The fused linear + GELU of the MLP against the composed MLP (linear, then the GELU
    /// kernel, both checked against f64 references elsewhere), values and all gradients.
    #[test]
    fn fused_linear_gelu_matches_the_composed_mlp_in_values_and_gradients() {
        use crate::ffn::Activation;
        use crate::ffn::{mlp::Mlp, ChannelMixer};
        let p = Params::new(3, DType::F32, &Device::Cpu);
        let mlp = Mlp::new(&p, 24, 96, Activation::Gelu, true, None).unwrap();
        let (values, grads) = fused_against_composed(&p, &[3, 70, 24], |x| mlp.forward(x).unwrap());
        assert!(values < 1e-5, "values: {values}");
        for (name, err) in grads {
            assert!(err < 1e-5, "gradient of {name}: {err}");
        }
    }

    #[test]
    fn a_weight_of_the_wrong_width_is_an_error_not_a_panic() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap();
        let err = super::linear(&x, &w, None).unwrap().unwrap_err();
        assert!(err.to_string().contains("width 3"), "{err}");
    }
}
