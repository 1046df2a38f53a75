//! CPU kernels with backward passes, used in training and inference alike for f32 on the
//! CPU: the GELU here, exact attention (`flash`, as the candle op `attention_op`) and the
//! norms of `norm_op`. Each is tested against the differentiable candle path it replaces.

pub mod attention_op;
pub mod flash;
pub mod gemm;
pub mod matmul_op;
pub mod norm_op;
pub(crate) mod simd;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use simd::{Simd, LANES};

use crate::Result;

/// `erf` as a rational function on [-4, 4] (beyond, `erf` is ±1 in f32), the form Eigen and
/// XLA use for f32: no branches, so the loop vectorises (plain `*`/`+`: `mul_add` would be a
/// libm call on baseline x86-64). Max error ≈ 1e-7 (tested).
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The f32 values of a contiguous CPU tensor, for op `op`.
pub(crate) fn f32_values<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op} takes f32")
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op} takes contiguous tensors")
    };
    Ok(&data[start..end])
}

/// All values of an f32 tensor, in row-major order.
pub(crate) fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

struct FastGeluErf;

impl CustomOp1 for FastGeluErf {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_values(storage, layout, "fast-gelu-erf")?;
        let mut out = vec![0f32; src.len()];
        let threads = if src.len() >= 1 << 16 {
            candle_core::utils::get_num_threads().max(1)
        } else {
            1
        };
        let chunk = src.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (o, i) in out.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || o.iter_mut().zip(i).for_each(|(o, &x)| *o = gelu_one(x)));
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `grad · gelu'(x)`, `gelu'(x) = Φ(x) + x·φ(x)`.
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = flat(arg)?;
        let mut dx = flat(grad)?;
        gelu_grad(&x, &mut dx);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `g ← g · gelu'(x)` elementwise, eight lanes at a time.
fn gelu_grad(x: &[f32], g: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    simd::dispatch!(|S| {
        for (xc, gc) in x.chunks(LANES).zip(g.chunks_mut(LANES)) {
            let mut xs = [0f32; LANES];
            xs[..xc.len()].copy_from_slice(xc);
            let xv = S::load(&xs);
            let density = S::exp(S::mul(S::mul(xv, xv), S::splat(-0.5)));
            let mut e = [0f32; LANES];
            S::store(&mut e, S::mul(S::mul(xv, density), S::splat(INV_SQRT_2PI)));
            for (i, g) in gc.iter_mut().enumerate() {
                let cdf = 0.5 * (1.0 + fast_erf(xs[i] * std::f32::consts::FRAC_1_SQRT_2));
                *g *= cdf + e[i];
            }
        }
    })
}

/// Exact (erf) GELU: the fast kernel (with its backward) for f32 on the CPU, candle's
/// `gelu_erf` otherwise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1(FastGeluErf)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_gelu_matches_candle_gelu_erf() {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| (i as f32 - 100_000.0) / 10_000.0)
            .collect();
        let x = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        let fast = gelu_erf(&x).unwrap().to_vec1::<f32>().unwrap();
        let slow = x
            .to_dtype(DType::F64)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let worst = fast
            .iter()
            .zip(&slow)
            .map(|(a, b)| (*a as f64 - b).abs() / b.abs().max(1.0))
            .fold(0f64, f64::max);
        // f32 rounding alone costs ~1e-6 relative here (candle's f32 gelu_erf too).
        assert!(worst < 2e-6, "max error {worst}");
        for v in [-1e30f32, 1e30, 0.0] {
            let t = Tensor::new(&[v], &Device::Cpu).unwrap();
            let g = gelu_erf(&t).unwrap().to_vec1::<f32>().unwrap()[0];
            assert!(g.is_finite(), "{v} -> {g}");
        }
    }

    #[test]
    fn fast_gelu_gradient_matches_candle_in_f64() {
        let xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) / 250.0).collect();
        let x = candle_core::Var::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        let fast = gelu_erf(&x).unwrap().sum_all().unwrap().backward().unwrap();
        let fast = fast.get(&x).unwrap().to_vec1::<f32>().unwrap();
        let x64 = candle_core::Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let slow = x64
            .gelu_erf()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let slow = slow.get(&x64).unwrap().to_vec1::<f64>().unwrap();
        let worst = fast
            .iter()
            .zip(&slow)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(worst < 1e-6, "max error {worst}");
    }
}
