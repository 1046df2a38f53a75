//! CPU kernels with backward passes, used in training and inference alike for f32 on the
//! CPU: the GELU here, exact attention (`flash`, as the candle op `attention_op`), the
//! norms of `norm_op`, softmax cross-entropy (`cross_entropy`), the broadcast bias add
//! (`bias`) and the AdamW update (`adamw`). Each is tested against the composed candle path it replaces, and
//! [`fused_enabled`] is the one switch back to those paths.

pub mod adamw;
pub mod attention_op;
pub mod bias;
pub mod blockq;
pub mod cross_entropy;
pub mod flash;
pub mod gemm;
pub mod grid;
pub mod int8;
pub mod linear_op;
pub mod matmul_op;
pub mod norm_op;
pub mod quant;
pub(crate) mod simd;

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use simd::{Simd, LANES};

use crate::Result;

thread_local! {
    static REFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the fused kernels may run on this thread (the default). Every place that picks
/// a fused kernel over its composed candle reference asks this first.
pub fn fused_enabled() -> bool {
    !REFERENCE.with(Cell::get)
}

/// Whether a fused CPU kernel takes these tensors: every one f32 on the CPU, and the fused
/// kernels on ([`fused_enabled`]). The one test every fused path starts from.
pub fn fused_f32_cpu(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
        && fused_enabled()
}

/// Runs `f` on this thread with the composed reference paths instead of the fused kernels
/// (for tests that compare the two: a thread's setting, so parallel tests do not see it).
pub fn with_reference<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REFERENCE.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(REFERENCE.with(|r| r.replace(true)));
    f()
}

/// `erf` as a rational function on [-4, 4] (beyond, `erf` is ±1 in f32), the form Eigen and
/// XLA use for f32, eight lanes at a time. Max error ≈ 1e-7 (tested).
#[inline(always)]
unsafe fn erf<S: Simd>(x: S::V) -> S::V {
    const P: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const Q: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_474e-2,
    ];
    let x = S::min(S::max(x, S::splat(-4.0)), S::splat(4.0));
    let x2 = S::mul(x, x);
    let mut p = S::splat(P[0]);
    for &c in &P[1..] {
        p = S::fma(p, x2, S::splat(c));
    }
    let mut q = S::splat(Q[0]);
    for &c in &Q[1..] {
        q = S::fma(q, x2, S::splat(c));
    }
    S::div(S::mul(x, p), q)
}

/// `gelu(x)`, or with `g`, `g · gelu'(x)` where `gelu'(x) = Φ(x) + x·φ(x)`.
#[inline(always)]
unsafe fn gelu_v<S: Simd>(x: S::V, g: Option<S::V>) -> S::V {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let u = S::mul(x, S::splat(std::f32::consts::FRAC_1_SQRT_2));
    let cdf = S::mul(S::splat(0.5), S::add(S::splat(1.0), erf::<S>(u)));
    match g {
        None => S::mul(x, cdf),
        Some(g) => {
            let density = S::exp(S::mul(S::mul(x, x), S::splat(-0.5)));
            let pdf = S::mul(density, S::splat(INV_SQRT_2PI));
            S::mul(g, S::fma(x, pdf, cdf))
        }
    }
}

/// `out = gelu(x)`, or with `g`, `out = g · gelu'(x)` ([`gelu_v`] over slices).
#[inline(always)]
unsafe fn gelu_lanes<S: Simd>(x: &[f32], g: Option<&[f32]>, out: &mut [f32]) {
    let whole = x.len() / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        // (Not `Option::map`: a closure would not inherit the target features.)
        #[allow(clippy::manual_map)]
        let gv = match g {
            Some(g) => Some(S::loadp(g.as_ptr().add(i))),
            None => None,
        };
        S::storep(
            out.as_mut_ptr().add(i),
            gelu_v::<S>(S::loadp(x.as_ptr().add(i)), gv),
        );
    }
    if whole < x.len() {
        let rest = x.len() - whole;
        let (mut xs, mut gs, mut os) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        xs[..rest].copy_from_slice(&x[whole..]);
        if let Some(g) = g {
            gs[..rest].copy_from_slice(&g[whole..]);
        }
        let gv = if g.is_some() {
            Some(S::load(&gs))
        } else {
            None
        };
        S::store(&mut os, gelu_v::<S>(S::load(&xs), gv));
        out[whole..].copy_from_slice(&os[..rest]);
    }
}

/// [`gelu_lanes`] over chunks in parallel.
fn gelu_map(x: &[f32], g: Option<&[f32]>, out: &mut [f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let r = c * CHUNK..c * CHUNK + o.len();
        let g = g.map(|g| &g[r.clone()]);
        simd::dispatch!(|S| gelu_lanes::<S>(&x[r], g, o))
    });
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

/// `f` of the values of an f32 tensor in row-major order: read in place when the tensor is
/// contiguous on the CPU (no copy; the storage stays read-locked while `f` runs, so `f` must
/// not write to that tensor), else of a copy ([`flat`]).
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&data[a..b]));
        }
    }
    Ok(f(&flat(t)?))
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
        gelu_map(src, None, &mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// `(x, grad) → grad · gelu'(x)`: the backward of [`FastGeluErf`] reading both in place.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fast-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_values(s1, l1, "fast-gelu-erf-grad")?;
        let g = f32_values(s2, l2, "fast-gelu-erf-grad")?;
        if x.len() != g.len() {
            candle_core::bail!("fast-gelu-erf-grad: {} values against {}", x.len(), g.len())
        }
        let mut out = vec![0f32; x.len()];
        gelu_map(x, Some(g), &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Exact (erf) GELU: the fast kernel (with its backward) for f32 on the CPU, candle's
/// `gelu_erf` otherwise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused_f32_cpu(&[x]) {
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

    #[test]
    fn values_are_read_in_place_or_copied_in_row_major_order() {
        let t = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        for view in [
            t.clone(),
            t.narrow(0, 1, 2).unwrap(), // contiguous, with an offset
            t.t().unwrap(),             // strided: copied
            t.narrow(1, 2, 3).unwrap(), // strided rows: copied
        ] {
            let got = with_values(&view, |v| v.to_vec()).unwrap();
            assert_eq!(got, flat(&view).unwrap(), "{:?}", view.layout());
        }
    }
}
