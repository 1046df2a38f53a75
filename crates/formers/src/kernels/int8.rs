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

/// The `n` rows of W (`k` codes each, back to back in `data`) as the SIMD tiles read them:
/// `ld ≥ k` bytes from each row's start. Rows whose read would pass the end of `data` are
/// read from zero-padded copies, and rows past `n` (a tile's padding) from a zero row.
#[cfg(target_arch = "x86_64")]
struct PaddedRows<'a> {
    data: &'a [i8],
    tail: Vec<i8>,
    first_copied: usize,
    k: usize,
    ld: usize,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl<'a> PaddedRows<'a> {
    fn new(data: &'a [i8], n: usize, k: usize, ld: usize) -> Self {
        let first_copied = n.saturating_sub((ld - k).div_ceil(k.max(1)));
        let mut tail = vec![0i8; (n - first_copied + 1) * ld];
        for (r, dst) in (first_copied..n).zip(tail.chunks_mut(ld.max(1))) {
            dst[..k].copy_from_slice(&data[r * k..(r + 1) * k]);
        }
        PaddedRows {
            data,
            tail,
            first_copied,
            k,
            ld,
            n,
        }
    }

    /// Where row `r` starts: `ld` bytes may be read from there.
    fn row(&self, r: usize) -> *const i8 {
        if r < self.first_copied {
            // SAFETY: r < n, so r·k is inside `data`.
            unsafe { self.data.as_ptr().add(r * self.k) }
        } else {
            // SAFETY: inside `tail` (rows past `n` share its last, zero, row).
            unsafe {
                self.tail
                    .as_ptr()
                    .add((r.min(self.n) - self.first_copied) * self.ld)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    //! [`Int8Matrix::matmul`] on AVX-512 with VNNI: `vpdpbusd` sums four u8 × i8 products into
    //! each of 16 i32 lanes, 64 products per instruction. It multiplies unsigned bytes by signed
    //! ones, so x's codes are offset by +128 to u8 (its padding stays 0) and `128 · Σ_c w[r][c]`
    //! is taken off each dot product again: the same exact integer as on the other paths.
    //!
    //! Bounds: with `k <= KB = 2¹⁶` columns, `Σ |(x + 128) · w| <= 2¹⁶ · 255 · 127 < 2³¹`, so no
    //! partial sum wraps, and `128 · |Σ w| <= 2²³ · 127 < 2³¹`.

    use std::arch::x86_64::*;

    use super::avx2::{quantize_row_avx2, rescale_row};
    use super::*;
    use crate::kernels::gemm::SyncPtr;
    use crate::kernels::grid::{for_each_block, w_block_rows};

    /// Bytes per step (one 512-bit register); rows of x are zero-padded to a multiple of it.
    const STEP: usize = 64;

    /// The `R × C` sums `Σ_c x[i][c] · w[j][c]` (x unsigned, w signed) over `chunks` steps of
    /// [`STEP`] bytes, into `dots[i * ld + j]`; each x load shared by C rows of W, each W load
    /// by R rows of x.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI; each pointer has `chunks · STEP` readable bytes;
    /// `R · C <= 16`; `dots` has R rows of `ld >= C` writable values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize, const C: usize>(
        x: &[*const u8; R],
        w: &[*const i8; C],
        chunks: usize,
        dots: *mut i32,
        ld: usize,
    ) {
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        for c in 0..chunks {
            let o = c * STEP;
            let mut wv = [_mm512_setzero_si512(); C];
            for j in 0..C {
                // SAFETY: o + 64 <= chunks · STEP readable bytes.
                wv[j] = unsafe { _mm512_loadu_si512(w[j].add(o) as *const _) };
            }
            for i in 0..R {
                // SAFETY: as above.
                let xv = unsafe { _mm512_loadu_si512(x[i].add(o) as *const _) };
                for j in 0..C {
                    acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
                }
            }
        }
        // SAFETY: the caller's promise.
        unsafe { store_sums(&acc, dots, ld) }
    }

    /// 128-bit lanes summed in pairs: `[x0 + x1, x2 + x3, y0 + y1, y2 + y3]`.
    #[inline(always)]
    unsafe fn fold(x: __m512i, y: __m512i) -> __m512i {
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x88>(x, y),
            _mm512_shuffle_i32x4::<0xDD>(x, y),
        )
    }

    /// Stores the `R × C` sums of `acc`'s lanes at `dots[i * ld + j]`: sixteen registers
    /// summed pairwise, then as 128-bit lanes, into one register of sixteen sums.
    ///
    /// # Safety
    /// AVX-512 F; `R · C <= 16`; `dots` has R rows of `ld >= C` writable values.
    #[inline(always)]
    unsafe fn store_sums<const R: usize, const C: usize>(
        acc: &[[__m512i; C]; R],
        dots: *mut i32,
        ld: usize,
    ) {
        let mut a = [_mm512_setzero_si512(); 16];
        for t in 0..R * C {
            a[t] = acc[t / C][t % C];
        }
        // Per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of each pair (a, b).
        let mut s = [_mm512_setzero_si512(); 8];
        for (p, s) in s.iter_mut().enumerate() {
            let (x, y) = (a[2 * p], a[2 * p + 1]);
            *s = _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
        }
        // Per 128-bit lane: that lane's sums of four accumulators, in order.
        let mut u = [_mm512_setzero_si512(); 4];
        for (q, u) in u.iter_mut().enumerate() {
            let (x, y) = (s[2 * q], s[2 * q + 1]);
            *u = _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
        }
        // The four 128-bit lanes of each summed ([`fold`] twice): lane g of the result holds
        // accumulators 4g..4g+3.
        // SAFETY: AVX-512 F (the caller's promise).
        let all = unsafe { fold(fold(u[0], u[1]), fold(u[2], u[3])) };
        let mut flat = [0i32; 16];
        // SAFETY: 16 writable i32.
        unsafe { _mm512_storeu_si512(flat.as_mut_ptr() as *mut _, all) };
        for i in 0..R {
            for j in 0..C {
                // SAFETY: the caller's buffer holds R rows of `ld >= C` values.
                unsafe { *dots.add(i * ld + j) = flat[i * C + j] };
            }
        }
    }

    /// [`Int8Matrix::matmul`] on AVX-512 VNNI.
    ///
    /// # Safety
    /// The CPU has AVX2 and AVX-512 F/BW/VNNI; the lengths are as `check_args` checks them;
    /// `cols <= KB`.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn matmul(
        a: &Int8Matrix,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        // One row of x: a tile of 1 × 8 (a single row is bound by reading W); more: 4 × 4.
        if m == 1 {
            // SAFETY: forwarded.
            unsafe { matmul_tiled::<1, 8>(a, x, m, bias, out) }
        } else {
            // SAFETY: forwarded.
            unsafe { matmul_tiled::<4, 4>(a, x, m, bias, out) }
        }
    }

    /// [`matmul`] with tiles of R rows of x × C rows of W.
    ///
    /// # Safety
    /// As [`matmul`]; `R · C <= 16`.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    unsafe fn matmul_tiled<const R: usize, const C: usize>(
        a: &Int8Matrix,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (n, k) = (a.rows, a.cols);
        if m == 0 || n == 0 {
            return;
        }
        // Quantised x + 128 as u8, rows zero-padded to `ld` and to a multiple of R rows.
        let ld = k.next_multiple_of(STEP);
        let mp = m.next_multiple_of(R);
        let mut xu = vec![0u8; mp * ld];
        let mut sx = vec![0f32; mp];
        let quantize = |(i, (q, s)): (usize, (&mut [u8], &mut f32))| {
            if i < m {
                // SAFETY: i8 and u8 share their layout; AVX2 (this function's precondition);
                // `q` holds `ld >= k` values.
                *s = unsafe {
                    let codes = std::slice::from_raw_parts_mut(q.as_mut_ptr() as *mut i8, ld);
                    quantize_row_avx2(&x[i * k..(i + 1) * k], codes)
                };
                for d in &mut q[..k] {
                    *d ^= 0x80;
                }
            }
        };
        if ld > 0 {
            if m * k >= PAR_QUANTIZE_MIN {
                xu.par_chunks_mut(ld)
                    .zip(sx.par_iter_mut())
                    .enumerate()
                    .for_each(quantize);
            } else {
                xu.chunks_mut(ld)
                    .zip(sx.iter_mut())
                    .enumerate()
                    .for_each(quantize);
            }
        }
        let xbase = xu.as_ptr() as usize;
        // 1 where a row of x has a value, 0 in its padding: its dot with a row of W is Σ w.
        let mut ones = vec![0u8; ld];
        ones[..k].fill(1);

        // Rows of W as the tiles read them (x is 0 past column k, so bytes of the next row
        // do not count).
        let rows = super::PaddedRows::new(&a.data, n, k, ld);
        let w_row = |r: usize| rows.row(r);

        let nb = w_block_rows(ld, C, n);
        let xb_rows = X_BLOCK_ROWS.next_multiple_of(R);
        let dst = SyncPtr(out.as_mut_ptr());
        let chunks = ld / STEP;
        for_each_block(n, nb, mp, xb_rows, |w_rows, x_rows| {
            let (r0, r1, i0, i1) = (w_rows.start, w_rows.end, x_rows.start, x_rows.end);
            // 128 · Σ w of each row of the block: what the offset of x added.
            let mut offset = vec![0i32; nb];
            for r in (r0..r1).step_by(C) {
                let ws: [*const i8; C] = std::array::from_fn(|jj| w_row(r + jj));
                // SAFETY: AVX-512 VNNI; `ones` and the W rows have `ld` bytes; `offset` holds
                // nb >= r - r0 + C values.
                unsafe {
                    tile::<1, C>(
                        &[ones.as_ptr()],
                        &ws,
                        chunks,
                        offset.as_mut_ptr().add(r - r0),
                        nb,
                    )
                };
            }
            for v in &mut offset {
                *v *= 128;
            }
            let mut dots = vec![0i32; R * nb];
            for i in (i0..i1).step_by(R) {
                let xs: [*const u8; R] =
                    std::array::from_fn(|ii| (xbase as *const u8).wrapping_add((i + ii) * ld));
                for r in (r0..r1).step_by(C) {
                    let ws: [*const i8; C] = std::array::from_fn(|jj| w_row(r + jj));
                    // SAFETY: AVX-512 VNNI; each x row has `ld` bytes (zero past column k), W
                    // rows `ld` bytes as `w_row` says; `dots` holds R rows of nb >= r - r0 + C.
                    unsafe {
                        let d = dots.as_mut_ptr().add(r - r0);
                        tile::<R, C>(&xs, &ws, chunks, d, nb)
                    };
                }
                for ii in 0..R.min(m.saturating_sub(i)) {
                    let row = &mut dots[ii * nb..ii * nb + r1 - r0];
                    for (d, &o) in row.iter_mut().zip(&offset) {
                        *d -= o;
                    }
                    // SAFETY: row i + ii < m of the output, columns r0..r1 < n, which no other
                    // task writes; AVX2.
                    unsafe {
                        let o = dst.get().add((i + ii) * n + r0);
                        let o = std::slice::from_raw_parts_mut(o, r1 - r0);
                        rescale_row(
                            sx[i + ii],
                            &a.scales[r0..r1],
                            row,
                            bias.map(|b| &b[r0..r1]),
                            o,
                        )
                    }
                }
            }
        });
    }
}

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

        // Rows of W as the tiles read them.
        let rows = super::PaddedRows::new(&a.data, n, k, ld);
        let w_row = |r: usize| rows.row(r);

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
#[path = "int8_tests.rs"]
mod tests;
