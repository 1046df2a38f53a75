//! Eight f32 lanes, as AVX2 + FMA registers where the CPU has them and as plain arrays
//! elsewhere: the kernels are written once over [`Simd`] and instantiated for each, then
//! [`dispatch!`] picks the instantiation at run time.
//!
//! The methods are `unsafe` only because the AVX2 ones must be compiled with
//! `#[target_feature]`: callers guarantee the CPU has the features (the dispatch does).

/// Lanes per vector.
pub const LANES: usize = 8;

/// Vector operations on [`LANES`] f32 lanes.
///
/// # Safety
/// An implementation may use instructions the CPU lacks: call its methods only from code
/// that [`dispatch!`] selected for this CPU.
pub unsafe trait Simd: Copy {
    type V: Copy;
    /// Multiply-add fused in one rounding where the instruction set has it.
    unsafe fn fma_scalar(a: f32, b: f32, c: f32) -> f32;
    unsafe fn splat(x: f32) -> Self::V;
    /// Loads `x[..LANES]`.
    unsafe fn load(x: &[f32]) -> Self::V;
    /// Stores into `x[..LANES]`.
    unsafe fn store(x: &mut [f32], v: Self::V);
    /// Loads `LANES` floats from `p` (unchecked: the caller guarantees they are readable).
    unsafe fn loadp(p: *const f32) -> Self::V;
    /// Stores `LANES` floats at `p` (unchecked: the caller guarantees they are writable).
    unsafe fn storep(p: *mut f32, v: Self::V);
    /// `a · b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sum(v: Self::V) -> f32;
    unsafe fn hmax(v: Self::V) -> f32;
    /// `e^x` per lane: relative error below 3e-7, exactly 0 below -87.
    unsafe fn exp(x: Self::V) -> Self::V;
    /// `2^x` per lane for `x <= 127` (larger `x` wraps: the caller keeps below it), in 12
    /// operations where [`Simd::exp`] takes 20 (no `ln 2` reduction, one clamp): relative
    /// error below 1e-7 from -126 up, exactly 0 below -126.5 and for -∞ and NaN.
    unsafe fn exp2(x: Self::V) -> Self::V;
}

/// Constants of [`Simd::exp`]: `x = n·ln 2 + r`, `e^r` by a degree-6 polynomial.
mod expc {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_66,
        0.5,
    ];
    pub const LO: f32 = -87.0;
    pub const HI: f32 = 88.0;
}

/// Constants of [`Simd::exp2`]: `x = n + f` with `n` an integer and `|f| <= 1/2`, `2^f` by a
/// degree-6 polynomial (minimax relative error 3.9e-9 on `[-1/2, 1/2]`, by Remez; the f32
/// evaluation brings it to 7.9e-8, measured on every f32 of `[-126, 1/2]`), `2^n` put in the
/// exponent bits (as Cephes `exp2f`, with the rounding by a "magic" addition).
mod exp2c {
    /// `1.5·2^23 + 127`: `x + MAGIC` rounds `x` to an integer `n` whose low mantissa bits
    /// hold `n + 127`, the biased exponent of `2^n`.
    pub const MAGIC: f32 = 12_583_039.0;
    /// Below it the result is 0 (`n = -127` makes the exponent bits, and the float, zero).
    pub const LO: f32 = -127.0;
    /// `2^f ≈ 1 + f·(C[5] + f·(C[4] + ...))`.
    pub const C: [f32; 6] = [
        1.546_973_2e-4,
        1.341_000_1e-3,
        9.618_031e-3,
        5.550_297_3e-2,
        0.240_226_5,
        0.693_147_24,
    ];
}

/// Plain arrays: the portable instantiation.
#[derive(Clone, Copy)]
pub struct Scalar;

unsafe impl Simd for Scalar {
    type V = [f32; LANES];
    #[inline(always)]
    unsafe fn fma_scalar(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; LANES]
    }
    #[inline(always)]
    unsafe fn load(x: &[f32]) -> Self::V {
        x[..LANES].try_into().unwrap()
    }
    #[inline(always)]
    unsafe fn store(x: &mut [f32], v: Self::V) {
        x[..LANES].copy_from_slice(&v)
    }
    #[inline(always)]
    unsafe fn loadp(p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees `LANES` readable floats.
        unsafe { std::ptr::read_unaligned(p as *const [f32; LANES]) }
    }
    #[inline(always)]
    unsafe fn storep(p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees `LANES` writable floats.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; LANES], v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l] + c[l])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] - b[l])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| if a[l] > b[l] { a[l] } else { b[l] })
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| if a[l] < b[l] { a[l] } else { b[l] })
    }
    #[inline(always)]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] / b[l])
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        v.iter().sum()
    }
    #[inline(always)]
    unsafe fn hmax(v: Self::V) -> f32 {
        v.iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        std::array::from_fn(|l| {
            use expc::*;
            let xl = x[l];
            let xc = xl.clamp(LO, HI);
            let n = (xc * LOG2E).round();
            let r = xc - n * LN2_HI - n * LN2_LO;
            let p = P.iter().fold(0.0, |p, &c| p * r + c);
            let e = (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) as u32) << 23);
            if xl < LO {
                0.0
            } else {
                e
            }
        })
    }
    #[inline(always)]
    unsafe fn exp2(x: Self::V) -> Self::V {
        std::array::from_fn(|l| {
            use exp2c::*;
            // `max` maps NaN to LO, as `_mm256_max_ps(x, LO)` does.
            let xc = x[l].max(LO);
            let t = xc + MAGIC;
            let f = xc - (t - MAGIC);
            let p = C.iter().fold(0.0, |p, &c| p * f + c) * f + 1.0;
            p * f32::from_bits(t.to_bits() << 23)
        })
    }
}

/// AVX2 + FMA registers.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Avx2;

#[cfg(target_arch = "x86_64")]
unsafe impl Simd for Avx2 {
    type V = std::arch::x86_64::__m256;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_scalar(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(x: f32) -> Self::V {
        std::arch::x86_64::_mm256_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(x: &[f32]) -> Self::V {
        assert!(x.len() >= LANES);
        // SAFETY: eight readable floats, checked above.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(x.as_ptr()) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(x: &mut [f32], v: Self::V) {
        assert!(x.len() >= LANES);
        // SAFETY: eight writable floats, checked above.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(x.as_mut_ptr(), v) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn loadp(p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees eight readable floats.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn storep(p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees eight writable floats.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_min_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_div_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: Self::V) -> f32 {
        use std::arch::x86_64::*;
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hmax(v: Self::V) -> f32 {
        use std::arch::x86_64::*;
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: Self::V) -> Self::V {
        use expc::*;
        use std::arch::x86_64::*;
        let lo = _mm256_set1_ps(LO);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(HI));
        let n = _mm256_round_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        let e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        // Zero where x < LO (and for -∞).
        _mm256_and_ps(e, _mm256_cmp_ps(x, lo, _CMP_GE_OQ))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp2(x: Self::V) -> Self::V {
        use exp2c::*;
        use std::arch::x86_64::*;
        // `max_ps` returns its second operand when the first is NaN.
        let xc = _mm256_max_ps(x, _mm256_set1_ps(LO));
        let magic = _mm256_set1_ps(MAGIC);
        let t = _mm256_add_ps(xc, magic);
        let f = _mm256_sub_ps(xc, _mm256_sub_ps(t, magic));
        let mut p = _mm256_set1_ps(C[0]);
        for &c in &C[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
        let scale = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }
}

/// Evaluates `$body` with `$s` the best [`Simd`] this CPU has, compiled with that
/// instruction set's features; `$body` may call `$s`'s (and generic kernels') unsafe
/// methods without an `unsafe` block of its own: choosing `$s` here is what makes them sound.
macro_rules! dispatch {
    (|$s:ident| $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                type $s = $crate::kernels::simd::Avx2;
                // SAFETY: the CPU has AVX2 and FMA (checked above), so `$s`'s methods
                // may run.
                unsafe { with_avx2(|| $body) }
            } else {
                type $s = $crate::kernels::simd::Scalar;
                // SAFETY: the portable instantiation runs anywhere.
                #[allow(unused_unsafe)]
                unsafe {
                    $body
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            type $s = $crate::kernels::simd::Scalar;
            // SAFETY: the portable instantiation runs anywhere.
            #[allow(unused_unsafe)]
            unsafe {
                $body
            }
        }
    }};
}

pub(crate) use dispatch;

/// A computation written over [`Simd`] whose body is too large for [`dispatch!`]'s closure
/// to be inlined under the features: [`run`] calls [`Kernel::run`] from a function compiled
/// with them, and implementations mark `run` `#[inline(always)]`, which forces it in.
pub(crate) trait Kernel {
    type Output;
    /// # Safety
    /// As for [`Simd`]: only [`run`] calls it, with the instantiation this CPU supports.
    unsafe fn run<S: Simd>(self) -> Self::Output;
}

/// Runs `k` with the best [`Simd`] this CPU has.
pub(crate) fn run<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<K: Kernel>(k: K) -> K::Output {
                // SAFETY: reached only when the CPU has AVX2 and FMA.
                unsafe { k.run::<Avx2>() }
            }
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2(k) };
        }
    }
    // SAFETY: the portable instantiation runs anywhere.
    unsafe { k.run::<Scalar>() }
}
