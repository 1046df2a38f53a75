//! The AdamW update of one f32 parameter in one pass (read the gradient, both moments and
//! the weight once; write the moments and the weight once), applied to the parameter in
//! place as a candle `InplaceOp2`; and the sum of squares of a gradient for the global norm.
//!
//! The arithmetic is the composed candle update's, term by term, in f32: candle's affine
//! ops (`t * x`, `t / x`, `t + x` for an f64 `x`) round each factor to f32 first, and so
//! does [`Scalars`]. With the same clip factor the two agree bit for bit.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, Tensor};

use super::{f32_values, simd};
use crate::Result;

/// The factors of one AdamW step, as the f32 values the composed update multiplies by.
#[derive(Debug, Clone, Copy)]
pub struct Scalars {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 / (1 − β1^t)`.
    pub inv_bc1: f32,
    /// `1 / (1 − β2^t)`.
    pub inv_bc2: f32,
    pub eps: f32,
    pub lr: f32,
    /// `1 − lr · weight_decay` for a decayed parameter, else 1 (a no-op in f32).
    pub decay: f32,
    /// The gradient-clipping factor (1 when not clipping: a no-op in f32).
    pub clip: f32,
}

impl Scalars {
    /// The factors of step `t` (1-based); `decay` is `lr · weight_decay` for a decayed
    /// parameter (0 otherwise), `clip` the gradient scale if clipping.
    pub fn new(
        (beta1, beta2, eps): (f64, f64, f64),
        t: usize,
        lr: f64,
        decay: f64,
        clip: Option<f64>,
    ) -> Self {
        let bc1 = 1.0 - beta1.powi(t as i32);
        let bc2 = 1.0 - beta2.powi(t as i32);
        Scalars {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: eps as f32,
            lr: lr as f32,
            decay: if decay != 0.0 {
                (1.0 - decay) as f32
            } else {
                1.0
            },
            clip: clip.map_or(1.0, |c| c as f32),
        }
    }
}

/// One AdamW step over slices of equal length:
/// `g ← g·clip`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `w ← w·decay − lr · (m/bc1) / (sqrt(v/bc2) + eps)`.
pub fn update(s: &Scalars, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    assert!(w.len() == g.len() && m.len() == g.len() && v.len() == g.len());
    let s = *s;
    // Plain arithmetic (no `mul_add`), compiled for the CPU's widest vectors.
    simd::dispatch!(|_S| {
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * s.clip;
            *m = *m * s.beta1 + g * s.one_minus_beta1;
            *v = *v * s.beta2 + (g * g) * s.one_minus_beta2;
            let u = (*m * s.inv_bc1) / ((*v * s.inv_bc2).sqrt() + s.eps);
            *w = *w * s.decay - u * s.lr;
        }
    })
}

/// `Σ g²` accumulated in f64, in eight fixed lanes (so it vectorises and has one order).
pub fn sum_squares(g: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = g.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64 * x as f64;
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a += x as f64 * x as f64;
    }
    acc.iter().sum()
}

/// Whether `t` can be read and written by this module: f32, on the CPU, contiguous.
pub fn supports(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && t.device().is_cpu() && t.is_contiguous()
}

/// [`sum_squares`] of an f32 CPU tensor, read in place.
pub fn tensor_sum_squares(g: &Tensor) -> Result<f64> {
    let (storage, layout) = g.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("fused-adamw: a CPU tensor".into()).into());
    };
    Ok(sum_squares(f32_values(cpu, layout, "fused-adamw")?))
}

/// The in-place op: the weight is the destination, the gradient the source.
struct AdamWOp<'a> {
    s: Scalars,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
}

impl InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = f32_values(s2, l2, "fused-adamw")?;
        let CpuStorage::F32(w) = s1 else {
            candle_core::bail!("fused-adamw takes f32")
        };
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("fused-adamw takes contiguous tensors")
        };
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if end - start != g.len() || m.len() != g.len() || v.len() != g.len() {
            candle_core::bail!(
                "fused-adamw: weight {}, gradient {}, moments {}/{} values",
                end - start,
                g.len(),
                m.len(),
                v.len()
            )
        }
        update(&self.s, &mut w[start..end], g, &mut m, &mut v);
        Ok(())
    }
}

/// Updates `weight` (an f32 CPU tensor, e.g. a `Var`'s) and its moments from `grad` in place.
pub fn step(
    weight: &Tensor,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    s: &Scalars,
) -> Result<()> {
    let op = AdamWOp {
        s: *s,
        m: RefCell::new(m),
        v: RefCell::new(v),
    };
    Ok(weight.inplace_op2(grad, &op)?)
}
