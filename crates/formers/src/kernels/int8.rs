//! `x·Wᵀ` with int8 weights and integer dot products: the weight matrix quantised per output
//! row (symmetric, scale `max|w_r|/127`), each row of `x` quantised the same way on the fly,
//! every dot product an exact sum of i8×i8 products, then one f32 rescale per output.
//!
//! The AVX2 inner loop widens both operands to i16 and multiplies them with `madd`
//! (i16 pairs summed straight into i32 lanes), x widened once per call and W as it is
//! loaded; a tile of [`MR`] rows of x by [`NR`] rows of W shares each load. It measured 10-30 %
//! faster here (Zen 3) than llama.cpp's q8_0·q8_0 loop (`mul_sum_i8_pairs` in `ggml-cpu`:
//! `sign`, `maddubs`, `madd` by ones, which puts three instructions on the two multiply
//! pipes per 32 products where this puts two). Tasks are blocks of W rows that stay in L1
//! while a block of x rows streams past them.
//!
//! On AVX-512 with VNNI ([`vnni`]) `vpdpbusd` takes 64 u8 × i8 products per instruction
//! (x offset by +128, the offset taken off again). [`isa`] names the path taken, the fastest
//! the CPU has (`FORMERS_ISA=avx2` or `portable` caps it, for comparisons).
//!
//! Deterministic: every dot product is exact (i32 partial sums, i64 across blocks of
//! [`KB`] columns), and the f32 rescale of one output is one expression
//! ([`rescale`]) whatever path, tile or thread computed it, so the VNNI, AVX2 and portable
//! paths agree bit for bit, for any thread count.

use rayon::prelude::*;

use crate::{Error, Result};

/// Quantised values per AVX2 step (one 256-bit register of i8); rows of quantised x are
/// zero-padded to a multiple of it.
const CHUNK: usize = 32;
/// Rows of x per tile (2 × 4 measured best on Zen 3 of 4×2, 2×4, 4×3, 3×3 and 5×2: eight
/// i32 accumulators, four widened W rows, one x register).
const MR: usize = 2;
/// Rows of W per tile.
const NR: usize = 4;
/// Columns per exact i32 block: `KB · 127² < 2³¹`, so no partial sum overflows; blocks are
/// summed in i64.
const KB: usize = 1 << 16;
/// Rows of x per task.
const X_BLOCK_ROWS: usize = 64;
/// Values of x below which it is quantised on one thread.
const PAR_QUANTIZE_MIN: usize = 1 << 16;

/// A weight matrix `[rows (= out), cols (= in)]` quantised per row (output channel), symmetric:
/// `w[r][c] ≈ scales[r] * data[r*cols + c]`, data in [-127, 127] (never -128).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Int8Matrix {
    /// Per-row symmetric quantisation of row-major `w` (rows*cols values): scale =
    /// max|w_r| / 127 (0 for a zero row, whose data are zeros), data = round(w / scale)
    /// (half away from zero) clamped to ±127.
    ///
    /// Panics when `w.len() != rows * cols` or a value is not finite (a NaN or ∞ has no
    /// int8 code; the model loader refuses non-finite weights unless told otherwise).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Int8Matrix {
        assert_eq!(
            w.len(),
            rows * cols,
            "Int8Matrix::quantize: {} values for {rows}×{cols}",
            w.len()
        );
        let mut data = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        for (r, scale) in scales.iter_mut().enumerate() {
            let src = &w[r * cols..(r + 1) * cols];
            assert!(
                src.iter().all(|v| v.is_finite()),
                "Int8Matrix::quantize: row {r} has a non-finite value"
            );
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            *scale = amax / 127.0;
            if *scale > 0.0 {
                for (d, &v) in data[r * cols..(r + 1) * cols].iter_mut().zip(src) {
                    *d = (v / *scale).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Int8Matrix {
            rows,
            cols,
            data,
            scales,
        }
    }

    /// Checks lengths (data = rows*cols, scales = rows), no -128 in data, finite scales
    /// >= 0; the error names the first problem found.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        data: Vec<i8>,
        scales: Vec<f32>,
    ) -> Result<Int8Matrix> {
        const KEY: &str = "int8 matrix";
        let Some(len) = rows.checked_mul(cols) else {
            return Err(Error::config(KEY, format!("{rows}×{cols} overflows")));
        };
        if data.len() != len {
            return Err(Error::config(
                KEY,
                format!("data has {} values, {rows}×{cols} needs {len}", data.len()),
            ));
        }
        if scales.len() != rows {
            return Err(Error::config(
                KEY,
                format!("{} scales for {rows} rows", scales.len()),
            ));
        }
        if let Some(i) = data.iter().position(|&v| v == i8::MIN) {
            return Err(Error::config(
                KEY,
                format!(
                    "value -128 at row {}, column {} (codes are -127..=127)",
                    i / cols,
                    i % cols
                ),
            ));
        }
        if let Some(r) = scales.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(Error::config(
                KEY,
                format!(
                    "scale of row {r} is {} (scales are finite and >= 0)",
                    scales[r]
                ),
            ));
        }
        Ok(Int8Matrix {
            rows,
            cols,
            data,
            scales,
        })
    }

    /// Row-major f32 values `scales[r] * data[..]`.
    pub fn dequantize(&self) -> Vec<f32> {
        if self.cols == 0 {
            return Vec::new();
        }
        self.data
            .chunks_exact(self.cols)
            .zip(&self.scales)
            .flat_map(|(row, &s)| row.iter().map(move |&q| s * q as f32))
            .collect()
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ (+ bias[rows])`. Each row of x is quantised to i8 on
    /// the fly (symmetric, per row, scale = max|x_i|/127, codes `round(x / scale)` half to
    /// even; a row with a NaN or ∞ gives NaN outputs), the dot products are exact integer
    /// sums of i8×i8 products, and `out = sx[i] * scales[r] * dot + bias[r]`.
    ///
    /// Panics unless `x.len() == m*cols`, `out.len() == m*rows` and `bias` is None or has
    /// `rows` values. Parallel over blocks of output on the current rayon pool; the result
    /// is bit-identical for any thread count and on any path (AVX-512 VNNI, AVX2 or portable).
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        self.matmul_on(Path::chosen(), x, m, bias, out)
    }

    /// [`Int8Matrix::matmul`] on `path` where the CPU has it (and rows are at most [`KB`]
    /// long), else on the portable path.
    fn matmul_on(&self, path: Path, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        self.check_args(x, m, bias, out);
        #[cfg(target_arch = "x86_64")]
        if self.cols <= KB && path.supported() {
            match path {
                // SAFETY: the CPU has AVX-512 F/BW/VNNI and AVX2 (`supported`); lengths
                // checked by `check_args`, and rows short enough for i32 sums.
                Path::Avx512Vnni => return unsafe { vnni::matmul(self, x, m, bias, out) },
                // SAFETY: the CPU has AVX2; as above.
                Path::Avx2 => return unsafe { avx2::matmul(self, x, m, bias, out) },
                Path::Portable => {}
            }
        }
        self.matmul_portable(x, m, bias, out)
    }

    fn check_args(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        assert_eq!(
            x.len(),
            m * self.cols,
            "Int8Matrix::matmul: x has {} values, {m}×{} needs {}",
            x.len(),
            self.cols,
            m * self.cols
        );
        assert_eq!(
            out.len(),
            m * self.rows,
            "Int8Matrix::matmul: out has {} values, {m}×{} needs {}",
            out.len(),
            self.rows,
            m * self.rows
        );
        if let Some(b) = bias {
            assert_eq!(
                b.len(),
                self.rows,
                "Int8Matrix::matmul: bias has {} values for {} rows",
                b.len(),
                self.rows
            );
        }
        debug_assert_eq!(self.data.len(), self.rows * self.cols);
        debug_assert_eq!(self.scales.len(), self.rows);
    }

    /// [`Int8Matrix::matmul`] without SIMD: the reference the AVX2 path matches bit for bit.
    fn matmul_portable(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        self.check_args(x, m, bias, out);
        let (n, k) = (self.rows, self.cols);
        if n == 0 {
            return;
        }
        out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
            let mut q = vec![0i8; k];
            let sx = quantize_row(&x[i * k..(i + 1) * k], &mut q);
            for (r, o) in o.iter_mut().enumerate() {
                let w = &self.data[r * k..(r + 1) * k];
                let dot: i64 = q.iter().zip(w).map(|(&a, &b)| a as i64 * b as i64).sum();
                *o = rescale(sx, self.scales[r], dot, bias.map(|b| b[r]));
            }
        });
    }
}

/// The instruction sets [`Int8Matrix::matmul`] has a path for, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// AVX-512 F/BW with VNNI (`vpdpbusd`), in [`vnni`].
    Avx512Vnni,
    /// AVX2 (`vpmaddwd` on i16), in [`avx2`].
    Avx2,
    /// Plain Rust: the reference.
    Portable,
}

impl Path {
    const ALL: [Path; 3] = [Path::Avx512Vnni, Path::Avx2, Path::Portable];

    fn name(self) -> &'static str {
        match self {
            Path::Avx512Vnni => "avx512vnni",
            Path::Avx2 => "avx2",
            Path::Portable => "portable",
        }
    }

    /// Whether this CPU runs it.
    fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Path::Avx512Vnni => {
                    has!("avx2") && has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
                }
                Path::Avx2 => has!("avx2"),
                Path::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Portable
        }
    }

    /// The fastest path the CPU has, at most the one `FORMERS_ISA` names (`avx512vnni`,
    /// `avx2` or `portable`; other values are ignored), read once.
    fn chosen() -> Path {
        static CHOSEN: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cap = std::env::var("FORMERS_ISA").ok();
            let from = Path::ALL
                .iter()
                .position(|p| cap.as_deref() == Some(p.name()))
                .unwrap_or(0);
            Path::ALL[from..]
                .iter()
                .copied()
                .find(|p| p.supported())
                .unwrap_or(Path::Portable)
        })
    }
}

/// The instruction set [`Int8Matrix::matmul`] runs on here: `"avx512vnni"`, `"avx2"` or
/// `"portable"` (rows longer than 2¹⁶ values always take the portable path).
pub fn isa() -> &'static str {
    Path::chosen().name()
}

/// One output from its exact dot product: the single f32 expression every path uses.
#[inline(always)]
fn rescale(sx: f32, sw: f32, dot: i64, bias: Option<f32>) -> f32 {
    let v = sx * sw * dot as f32;
    match bias {
        Some(b) => v + b,
        None => v,
    }
}

/// Scale of a row of x from its largest magnitude and whether all of it is finite: NaN
/// for a non-finite row (its outputs are NaN), 0 for a zero row.
#[inline(always)]
fn row_scale(amax: f32, finite: bool) -> f32 {
    if finite {
        amax / 127.0
    } else {
        f32::NAN
    }
}

/// The code of one value of x at row scale `s > 0`.
#[inline(always)]
fn code(v: f32, s: f32) -> i8 {
    (v / s).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// Quantises one row of x into `q[..x.len()]` (zeros when the scale is 0 or NaN); returns
/// the scale.
fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = row_scale(amax, x.iter().all(|v| v.is_finite()));
    if s > 0.0 {
        for (d, &v) in q.iter_mut().zip(x) {
            *d = code(v, s);
        }
    } else {
        q[..x.len()].fill(0);
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::*;

    // Tasks write disjoint elements of the output (see `matmul`).
    use crate::kernels::gemm::SyncPtr;
    use crate::kernels::grid::{for_each_block, w_block_rows};

    /// [`quantize_row`] eight values at a time, bit-identical to it (the same division,
    /// rounding half to even, clamp).
    ///
    /// # Safety
    /// The CPU has AVX2; `q.len() >= x.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8]) -> f32 {
        let n = x.len();
        assert!(q.len() >= n);
        let whole = n / 8 * 8;
        let p = x.as_ptr();
        let sign = _mm256_set1_ps(-0.0);
        let mut amax = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_ps();
        let big = _mm256_set1_ps(f32::MAX);
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= n.
            let a = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(p.add(i)) });
            amax = _mm256_max_ps(amax, a);
            // Not (|v| <= MAX): NaN or ∞.
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLE_UQ>(a, big));
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 writable floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), amax) };
        let mut m = lanes.iter().fold(0f32, |m, &v| m.max(v));
        let mut finite = _mm256_movemask_ps(bad) == 0;
        for &v in &x[whole..] {
            m = m.max(v.abs());
            finite &= v.is_finite();
        }
        let s = row_scale(m, finite);
        if s.is_nan() || s <= 0.0 {
            q[..n].fill(0);
            return s;
        }
        let sv = _mm256_set1_ps(s);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let whole32 = n / 32 * 32;
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for i in (0..whole32).step_by(32) {
            let mut c = [_mm256_setzero_si256(); 4];
            for (j, c) in c.iter_mut().enumerate() {
                // SAFETY: i + 32 <= n.
                let v = _mm256_div_ps(unsafe { _mm256_loadu_ps(p.add(i + 8 * j)) }, sv);
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                *c = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
            }
            // Packing works within 128-bit halves: the permutation puts the 32 codes back
            // in order.
            let ab = _mm256_packs_epi32(c[0], c[1]);
            let cd = _mm256_packs_epi32(c[2], c[3]);
            let v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), perm);
            // SAFETY: i + 32 <= n <= q.len().
            unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, v) };
        }
        for (d, &v) in q[whole32..n].iter_mut().zip(&x[whole32..]) {
            *d = code(v, s);
        }
        s
    }

    /// The four i32 sums of the lanes of `a`, `b`, `c`, `d`.
    #[inline(always)]
    unsafe fn hsum4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
        let abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        _mm_add_epi32(
            _mm256_castsi256_si128(abcd),
            _mm256_extracti128_si256::<1>(abcd),
        )
    }

    /// Stores the `R × C` sums of `acc`'s lanes at `dots[i * ld + j]`.
    #[inline(always)]
    unsafe fn store_sums<const R: usize, const C: usize>(
        acc: &[[__m256i; C]; R],
        dots: *mut i32,
        ld: usize,
    ) {
        let mut flat = [[0i32; 4]; 8];
        let all: [__m256i; 16] = std::array::from_fn(|t| {
            if t < R * C {
                acc[t / C][t % C]
            } else {
                _mm256_setzero_si256()
            }
        });
        for (g, f) in flat.iter_mut().enumerate().take((R * C).div_ceil(4)) {
            let s = hsum4(all[4 * g], all[4 * g + 1], all[4 * g + 2], all[4 * g + 3]);
            // SAFETY: four writable i32.
            unsafe { _mm_storeu_si128(f.as_mut_ptr() as *mut __m128i, s) };
        }
        for i in 0..R {
            for j in 0..C {
                let t = i * C + j;
                // SAFETY: the caller's buffer holds R rows of `ld >= C` values.
                unsafe { *dots.add(i * ld + j) = flat[t / 4][t % 4] };
            }
        }
    }

    /// The `R × C` dot products of rows `x[i]` (codes widened to i16) and `w[j]` (i8,
    /// widened as loaded) over `chunks` steps of [`CHUNK`] values, into `dots[i * ld + j]`:
    /// `madd` of i16 pairs straight into i32 lanes, each x load shared by C rows of W and
    /// each widened W load by R rows of x.
    ///
    /// # Safety
    /// The CPU has AVX2; every x pointer has `chunks · CHUNK` readable i16 and every w
    /// pointer `chunks · CHUNK` readable bytes; x is zero wherever w's bytes are not part of
    /// its row (so they do not count); `chunks · CHUNK <= KB`; `dots` has R rows of
    /// `ld >= C` writable values.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        x: &[*const i16; R],
        w: &[*const i8; C],
        chunks: usize,
        dots: *mut i32,
        ld: usize,
    ) {
        let mut acc = [[_mm256_setzero_si256(); C]; R];
        for c in 0..2 * chunks {
            let o = c * 16;
            let mut wv = [_mm256_setzero_si256(); C];
            for j in 0..C {
                // SAFETY: o + 16 <= chunks · CHUNK readable bytes.
                wv[j] =
                    _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(w[j].add(o) as *const __m128i) });
            }
            for i in 0..R {
                // SAFETY: o + 16 <= chunks · CHUNK readable i16.
                let xv = unsafe { _mm256_loadu_si256(x[i].add(o) as *const __m256i) };
                for j in 0..C {
                    acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
                }
            }
        }
        // SAFETY: the caller's promise.
        unsafe { store_sums(&acc, dots, ld) }
    }

    /// [`Int8Matrix::matmul`] on AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2; the lengths are as `check_args` checks them; `cols <= KB`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn matmul(
        a: &Int8Matrix,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        const R: usize = MR;
        const C: usize = NR;
        let (n, k) = (a.rows, a.cols);
        if m == 0 || n == 0 {
            return;
        }
        // Quantised x, rows zero-padded to `ld` and to a multiple of R rows.
        let ld = k.next_multiple_of(CHUNK);
        let mp = m.next_multiple_of(R);
        let mut xq = vec![0i8; mp * ld];
        let mut sx = vec![0f32; mp];
        let quantize = |(i, (q, s)): (usize, (&mut [i8], &mut f32))| {
            if i < m {
                // SAFETY: AVX2 (this function's precondition); `q` holds `ld >= k` values.
                *s = unsafe { quantize_row_avx2(&x[i * k..(i + 1) * k], q) };
            }
        };
        if ld > 0 {
            if m * k >= PAR_QUANTIZE_MIN {
                xq.par_chunks_mut(ld)
                    .zip(sx.par_iter_mut())
                    .enumerate()
                    .for_each(quantize);
            } else {
                xq.chunks_mut(ld)
                    .zip(sx.iter_mut())
                    .enumerate()
                    .for_each(quantize);
            }
        }
        // Widened to i16 for `madd` (a raw address, so that tasks can share it).
        let xw: Vec<i16> = xq.iter().map(|&v| v as i16).collect();
        drop(xq);
        let xbase = xw.as_ptr() as usize;

        // Rows of W read `ld` bytes from their start; those whose read would pass the end of
        // `data` are read from zero-padded copies, and rows beyond `n` (a tile's padding)
        // from a zero row.
        let first_copied = n.saturating_sub((ld - k).div_ceil(k.max(1)));
        let mut tail = vec![0i8; (n - first_copied + 1) * ld];
        for (r, dst) in (first_copied..n).zip(tail.chunks_mut(ld.max(1))) {
            dst[..k].copy_from_slice(&a.data[r * k..(r + 1) * k]);
        }
        let w_row = |r: usize| -> *const i8 {
            if r < first_copied {
                // SAFETY: r < n, so r·k is inside `data`.
                unsafe { a.data.as_ptr().add(r * k) }
            } else {
                // SAFETY: inside `tail` (rows past `n` share its last, zero, row).
                unsafe { tail.as_ptr().add((r.min(n) - first_copied) * ld) }
            }
        };

        let nb = w_block_rows(ld, C, n);
        let xb_rows = X_BLOCK_ROWS.next_multiple_of(R);
        let dst = SyncPtr(out.as_mut_ptr());
        let chunks = ld / CHUNK;
        for_each_block(n, nb, mp, xb_rows, |w_rows, x_rows| {
            let (r0, r1, i0, i1) = (w_rows.start, w_rows.end, x_rows.start, x_rows.end);
            let mut dots = vec![0i32; R * nb];
            for i in (i0..i1).step_by(R) {
                let xs: [*const i16; R] =
                    std::array::from_fn(|ii| (xbase as *const i16).wrapping_add((i + ii) * ld));
                for r in (r0..r1).step_by(C) {
                    let ws: [*const i8; C] = std::array::from_fn(|jj| w_row(r + jj));
                    // SAFETY: AVX2; each x row has `ld` values (zero past column k), W rows
                    // `ld` bytes as `w_row` says; `dots` holds R rows of nb >= r - r0 + C.
                    unsafe {
                        let d = dots.as_mut_ptr().add(r - r0);
                        avx2_tile::<R, C>(&xs, &ws, chunks, d, nb)
                    };
                }
                for ii in 0..R.min(m.saturating_sub(i)) {
                    // SAFETY: row i + ii < m of the output, columns r0..r1 < n, which no other
                    // task writes; AVX2.
                    unsafe {
                        let o = dst.get().add((i + ii) * n + r0);
                        let o = std::slice::from_raw_parts_mut(o, r1 - r0);
                        rescale_row(
                            sx[i + ii],
                            &a.scales[r0..r1],
                            &dots[ii * nb..ii * nb + r1 - r0],
                            bias.map(|b| &b[r0..r1]),
                            o,
                        )
                    }
                }
            }
        });
    }

    /// [`tile`] compiled with AVX2 (the task closure is not).
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_tile<const R: usize, const C: usize>(
        x: &[*const i16; R],
        w: &[*const i8; C],
        chunks: usize,
        dots: *mut i32,
        ld: usize,
    ) {
        // SAFETY: forwarded.
        unsafe { tile(x, w, chunks, dots, ld) }
    }

    /// `out[j] = rescale(sx, sw[j], dots[j], bias[j])`, eight at a time: the same f32
    /// operations in the same order, so the same bits.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rescale_row(
        sx: f32,
        sw: &[f32],
        dots: &[i32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let n = out.len();
        assert!(sw.len() == n && dots.len() == n && bias.is_none_or(|b| b.len() == n));
        let whole = n / 8 * 8;
        let s = _mm256_set1_ps(sx);
        for j in (0..whole).step_by(8) {
            // SAFETY: j + 8 <= n values in each slice (asserted).
            unsafe {
                let d = _mm256_cvtepi32_ps(_mm256_loadu_si256(dots.as_ptr().add(j) as _));
                let mut v = _mm256_mul_ps(_mm256_mul_ps(s, _mm256_loadu_ps(sw.as_ptr().add(j))), d);
                if let Some(b) = bias {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(b.as_ptr().add(j)));
                }
                _mm256_storeu_ps(out.as_mut_ptr().add(j), v);
            }
        }
        for j in whole..n {
            out[j] = rescale(sx, sw[j], dots[j] as i64, bias.map(|b| b[j]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::uniform;

    /// Naive `out[i][r] = Σ_c x[i][c]·w[r][c] (+ b[r])` in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        m: usize,
        n: usize,
        k: usize,
        b: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for r in 0..n {
                let dot: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[r * k + c] as f64)
                    .sum();
                out[i * n + r] = dot + b.map_or(0.0, |b| b[r] as f64);
            }
        }
        out
    }

    /// `Σ_c |x[i][c]·w[r][c]|` per output: the scale rounding errors are relative to.
    fn magnitude(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let aw: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        reference(&ax, &aw, m, n, k, None)
    }

    /// x as the kernel sees it: each row quantised and dequantised.
    fn dequantized_x(x: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut q = vec![0i8; k];
        let mut v = Vec::with_capacity(m * k);
        for i in 0..m {
            let s = quantize_row(&x[i * k..(i + 1) * k], &mut q);
            v.extend(q.iter().map(|&c| s * c as f32));
        }
        v
    }

    /// Random shapes with every kind of edge: m, cols and rows off the tile and chunk sizes.
    fn shapes() -> Vec<(usize, usize, usize)> {
        let mut v = Vec::new();
        for m in [1, 3, 17] {
            for k in [1, 31, 33, 100, 384] {
                for n in [1, 5, 64, 130] {
                    v.push((m, k, n));
                }
            }
        }
        v
    }

    #[test]
    fn quantize_dequantize_round_trip_is_within_half_a_step() {
        let (rows, cols) = (7, 45);
        let mut w = uniform(rows * cols, 1);
        w[2 * cols..3 * cols].fill(0.0); // a zero row
        for (i, v) in w[4 * cols..5 * cols].iter_mut().enumerate() {
            *v *= 1e-3 * (i as f32 + 1.0); // a row of small, spread values
        }
        let q = Int8Matrix::quantize(&w, rows, cols);
        assert_eq!(
            q,
            Int8Matrix::from_parts(rows, cols, q.data.clone(), q.scales.clone()).unwrap()
        );
        assert_eq!(q.scales[2], 0.0);
        let d = q.dequantize();
        assert_eq!(d.len(), w.len());
        for r in 0..rows {
            let amax = w[r * cols..(r + 1) * cols]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.scales[r], amax / 127.0, "row {r}");
            let row_max = q.data[r * cols..(r + 1) * cols]
                .iter()
                .map(|c| c.unsigned_abs())
                .max();
            if amax > 0.0 {
                assert_eq!(row_max, Some(127), "row {r} does not use the full range");
            }
            for c in 0..cols {
                let (a, b) = (w[r * cols + c], d[r * cols + c]);
                let tol = q.scales[r] / 2.0 + 1e-6 * amax;
                assert!(
                    (a - b).abs() <= tol,
                    "({r}, {c}): {a} vs {b}, tolerance {tol}"
                );
            }
        }
        assert!(d[2 * cols..3 * cols].iter().all(|&v| v == 0.0));
        assert!(q.data.iter().all(|&c| c != i8::MIN));
    }

    #[test]
    fn matmul_matches_dequantized_reference_on_odd_shapes() {
        for (s, &(m, k, n)) in shapes().iter().enumerate() {
            let w = uniform(n * k, 10 + s as u64);
            let x: Vec<f32> = uniform(m * k, 20 + s as u64)
                .iter()
                .map(|v| 3.0 * v)
                .collect();
            let bias = uniform(n, 30 + s as u64);
            let q = Int8Matrix::quantize(&w, n, k);
            let (wd, xd) = (q.dequantize(), dequantized_x(&x, m, k));
            for b in [None, Some(&bias[..])] {
                let mut out = vec![f32::NAN; m * n];
                q.matmul(&x, m, b, &mut out);
                let want = reference(&xd, &wd, m, n, k, b);
                let mag = magnitude(&xd, &wd, m, n, k);
                for e in 0..m * n {
                    // The dot product is exact; only the f32 rescale (and the f32 products
                    // inside it) round: a few ulps of the result's magnitude.
                    let bmag = b.map_or(0.0, |b| b[e % n].abs() as f64);
                    let tol = 1e-5 * (mag[e] + bmag) + 1e-30;
                    let got = out[e] as f64;
                    assert!(
                        (got - want[e]).abs() <= tol,
                        "{m}×{k}·{k}×{n} bias {} at {e}: {got} vs {}",
                        b.is_some(),
                        want[e]
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_error_against_f32_is_bounded_by_quantisation() {
        let (m, k, n) = (9, 300, 70);
        let w = uniform(n * k, 41);
        let x = uniform(m * k, 42);
        let q = Int8Matrix::quantize(&w, n, k);
        let mut out = vec![0f32; m * n];
        q.matmul(&x, m, None, &mut out);
        let want = reference(&x, &w, m, n, k, None);
        let mut worst = 0f64;
        for i in 0..m {
            let sx = x[i * k..(i + 1) * k]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs())) as f64
                / 127.0;
            for r in 0..n {
                // Each x and w is off by at most half its step: x·w - x̂·ŵ =
                // Σ (x - x̂)·w + x̂·(w - ŵ), so the error is at most
                // (sx/2)·Σ|w| + (sw/2)·Σ|x̂|, with |x̂| <= |x| + sx/2 (plus f32 rounding).
                let sw = q.scales[r] as f64;
                let (wr, xr) = (&w[r * k..(r + 1) * k], &x[i * k..(i + 1) * k]);
                let sum_w: f64 = wr.iter().map(|v| v.abs() as f64).sum();
                let sum_x: f64 = xr.iter().map(|v| v.abs() as f64 + sx / 2.0).sum();
                let bound = sx / 2.0 * sum_w + sw / 2.0 * sum_x + 1e-5 * sum_w * sx * 127.0;
                let err = (out[i * n + r] as f64 - want[i * n + r]).abs();
                assert!(err <= bound, "({i}, {r}): error {err} over bound {bound}");
                worst = worst.max(err / bound);
            }
        }
        // Rounding errors are spread, not all of one sign: the worst case is far off.
        assert!(worst < 0.5, "worst error / bound = {worst}");
    }

    #[test]
    fn avx2_and_portable_paths_agree_bit_for_bit() {
        // The portable path runs anywhere; without AVX2, `matmul` *is* it and this only
        // checks it against itself.
        for (s, &(m, k, n)) in shapes().iter().enumerate() {
            let w = uniform(n * k, 50 + s as u64);
            let mut x = uniform(m * k, 60 + s as u64);
            if m > 1 {
                x[k..2 * k].fill(0.0); // a zero row of x
            }
            let bias = uniform(n, 70 + s as u64);
            let q = Int8Matrix::quantize(&w, n, k);
            for b in [None, Some(&bias[..])] {
                let (mut fast, mut slow) = (vec![0f32; m * n], vec![0f32; m * n]);
                q.matmul(&x, m, b, &mut fast);
                q.matmul_portable(&x, m, b, &mut slow);
                let (fb, sb): (Vec<u32>, Vec<u32>) = (
                    fast.iter().map(|v| v.to_bits()).collect(),
                    slow.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(fb, sb, "{m}×{k}·{k}×{n} bias {}", b.is_some());
            }
        }
        // Rows of x quantised the same way (the AVX2 quantiser against `quantize_row`),
        // including values exactly half a step from two codes.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut x = uniform(200, 80);
            x[0] = 127.0;
            for (i, v) in x[1..40].iter_mut().enumerate() {
                *v = i as f32 + 0.5 - 20.0;
            }
            let (mut a, mut b) = (vec![0i8; 200], vec![0i8; 200]);
            let sa = quantize_row(&x, &mut a);
            // SAFETY: AVX2 checked above; equal lengths.
            let sb = unsafe { avx2::quantize_row_avx2(&x, &mut b) };
            assert_eq!((sa.to_bits(), &a), (sb.to_bits(), &b));
            assert_eq!(a[1..5], [-20, -18, -18, -16]); // half to even
        }
    }

    /// `out` of `path` and of the portable path, as bits, on 1 and 3 threads; None (with a
    /// note) when the CPU lacks `path`.
    fn on_path(
        path: Path,
        q: &Int8Matrix,
        x: &[f32],
        m: usize,
        b: Option<&[f32]>,
    ) -> Option<[Vec<u32>; 3]> {
        if !path.supported() {
            eprintln!("note: this CPU has no {} path: not tested", path.name());
            return None;
        }
        let run = |p: Path, threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![f32::NAN; m * q.rows];
            pool.install(|| q.matmul_on(p, x, m, b, &mut out));
            out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        Some([run(path, 1), run(path, 3), run(Path::Portable, 1)])
    }

    #[test]
    fn every_path_on_this_cpu_matches_portable_bit_for_bit() {
        let mut s = 0u64;
        for m in [1, 2, 3, 5, 17] {
            for k in [1, 31, 33, 64, 65, 1000] {
                for n in [1, 5, 13, 64, 130] {
                    s += 1;
                    let w = uniform(n * k, 200 + s);
                    let mut x = uniform(m * k, 300 + s);
                    if m > 1 {
                        x[k..2 * k].fill(0.0); // a zero row
                    }
                    if m > 2 {
                        x[2 * k + k / 2] = f32::INFINITY; // a row of NaN outputs
                    }
                    if m > 3 {
                        x[4 * k - 1] = f32::NAN;
                    }
                    let bias = uniform(n, 400 + s);
                    let q = Int8Matrix::quantize(&w, n, k);
                    for path in Path::ALL {
                        for b in [None, Some(&bias[..])] {
                            let Some([one, three, slow]) = on_path(path, &q, &x, m, b) else {
                                continue;
                            };
                            let what =
                                format!("{} {m}×{k}·{k}×{n} bias {}", path.name(), b.is_some());
                            assert_eq!(one, slow, "{what}");
                            assert_eq!(one, three, "{what}: 1 and 3 threads");
                            if m > 2 {
                                let nan = |o: &[u32]| f32::from_bits(o[0]).is_nan();
                                assert!(!nan(&one[n..]), "{what}: the zero row is not NaN");
                                assert!(nan(&one[2 * n..]), "{what}: the ∞ row is NaN");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn paths_agree_at_the_largest_codes_and_longest_rows() {
        // Every product at ±127·±127 over KB columns: the i32 bounds with nothing to spare
        // (x + 128 up to 255 on the VNNI path), signs mixed so the sums go both ways.
        let (m, n) = (3, 5);
        let k = KB;
        let x: Vec<f32> = (0..m * k)
            .map(|i| match i / k {
                0 => 1.0,
                1 => -1.0,
                _ => {
                    if i % 3 == 0 {
                        -1.0
                    } else {
                        1.0
                    }
                }
            })
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| match i / k {
                0 => 1.0,
                1 => -1.0,
                2 => {
                    if i % 2 == 0 {
                        1.0
                    } else {
                        -1.0
                    }
                }
                _ => {
                    if i % 7 < 3 {
                        -1.0
                    } else {
                        1.0
                    }
                }
            })
            .collect();
        let q = Int8Matrix::quantize(&w, n, k);
        for path in Path::ALL {
            if let Some([one, three, slow]) = on_path(path, &q, &x, m, None) {
                assert_eq!(one, slow, "{}", path.name());
                assert_eq!(one, three, "{}", path.name());
            }
        }
        let mut out = vec![0f32; m * n];
        q.matmul_portable(&x, m, None, &mut out);
        assert_eq!(out[0], k as f32); // 127 · 127 · k, rescaled by (1/127)²
        assert_eq!(out[1], -(k as f32));
    }

    #[test]
    fn isa_names_the_path_taken() {
        let name = isa();
        assert!(["avx512vnni", "avx2", "portable"].contains(&name), "{name}");
        let p = Path::ALL.into_iter().find(|p| p.name() == name).unwrap();
        assert!(p.supported());
        if std::env::var_os("FORMERS_ISA").is_none() {
            assert_eq!(Some(p), Path::ALL.into_iter().find(|p| p.supported()));
        }
    }

    #[test]
    fn matmul_is_deterministic_for_any_thread_count() {
        let (m, k, n) = (70, 384, 200);
        let w = uniform(n * k, 90);
        let x = uniform(m * k, 91);
        let bias = uniform(n, 92);
        let q = Int8Matrix::quantize(&w, n, k);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; m * n];
            pool.install(|| q.matmul(&x, m, Some(&bias), &mut out));
            out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(8));
    }

    #[test]
    fn from_parts_names_what_is_wrong() {
        let ok = || (vec![1i8, -127, 0, 127, 5, 6], vec![0.5f32, 0.0]);
        assert!(Int8Matrix::from_parts(2, 3, ok().0, ok().1).is_ok());
        let err = |rows, cols, data, scales| {
            Int8Matrix::from_parts(rows, cols, data, scales)
                .unwrap_err()
                .to_string()
        };
        let e = err(2, 4, ok().0, ok().1);
        assert!(
            e.contains("data has 6 values") && e.contains("needs 8"),
            "{e}"
        );
        let e = err(3, 2, ok().0, ok().1);
        assert!(e.contains("2 scales for 3 rows"), "{e}");
        let mut d = ok().0;
        d[4] = i8::MIN;
        let e = err(2, 3, d, ok().1);
        assert!(e.contains("-128 at row 1, column 1"), "{e}");
        for (s, what) in [(-0.5f32, "-0.5"), (f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
            let e = err(2, 3, ok().0, vec![0.5, s]);
            assert!(e.contains(&format!("scale of row 1 is {what}")), "{e}");
        }
        let e = err(usize::MAX, 2, vec![], vec![]);
        assert!(e.contains("overflows"), "{e}");
    }

    #[test]
    fn non_finite_rows_of_x_give_nan_rows_only() {
        let (m, k, n) = (3, 40, 6);
        let q = Int8Matrix::quantize(&uniform(n * k, 95), n, k);
        let mut x = uniform(m * k, 96);
        x[k + 7] = f32::INFINITY;
        x[2 * k + 39] = f32::NAN;
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        q.matmul(&x, m, None, &mut a);
        q.matmul_portable(&x, m, None, &mut b);
        assert!(a[..n].iter().all(|v| v.is_finite()));
        assert!(a[n..].iter().all(|v| v.is_nan()));
        assert!(b[..n].iter().zip(&a[..n]).all(|(x, y)| x == y));
        assert!(b[n..].iter().all(|v| v.is_nan()));
    }
}
