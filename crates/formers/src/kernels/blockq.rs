//! `x·Wᵀ` with W in blocks of [`BLOCK`] values along a row that share one f32 scale: 8-bit
//! codes (GGML's Q8_0 layout) or 4-bit codes (GGML's Q4_0: 16 levels, the scale set so that
//! the block's largest magnitude is code −8). Each block of each row of x is quantised to
//! 8 bits on the fly (absmax/127), the dot product of two blocks is an exact sum of integer
//! products, and the f32 result accumulates `dot · (scale_x · scale_w)` block by block.
//!
//! Finer scales than [`super::int8`]'s one per row make the error smaller (Q8_0) or let 4
//! bits work at all (Q4_0), at the price of a float multiply-add per block and pair of rows.
//! The AVX2 path accumulates eight lanes per output and sums them at the end; the portable
//! path is the reference, equal up to f32 rounding of that sum's order (tests bound it).

use rayon::prelude::*;

use crate::{Error, Result};

/// Values per block.
pub const BLOCK: usize = 32;
/// Rows of x per AVX2 tile.
const MR: usize = 2;
/// Rows of W per AVX2 tile.
const NR: usize = 2;
/// Rows of x per task.
const X_BLOCK_ROWS: usize = 32;

/// A code width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// 8-bit codes in [-127, 127], scale `max|w|/127` per block.
    Q8_0,
    /// 4-bit codes in [-8, 7] stored as `q + 8`, two per byte (value `t` of a block in the
    /// low nibble of byte `t`, value `t + 16` in its high nibble); scale `m / -8` for the
    /// block's value `m` of largest magnitude (so it may be negative).
    Q4_0,
}

impl BlockKind {
    /// The scheme's name (`q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Q8_0 => "q8_0",
            BlockKind::Q4_0 => "q4_0",
        }
    }

    /// Bytes of codes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockKind::Q8_0 => BLOCK,
            BlockKind::Q4_0 => BLOCK / 2,
        }
    }
}

/// A matrix `[rows (= out), cols (= in)]` in blocks of [`BLOCK`] columns: `codes` holds
/// each row's blocks (`blocks() · block_bytes` bytes per row; columns past `cols` are code
/// 0) and `scales[r * blocks() + b]` the scale of block `b` of row `r`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMatrix {
    pub kind: BlockKind,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
}

impl BlockMatrix {
    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols.div_ceil(BLOCK)
    }

    /// Bytes of codes per row.
    pub fn row_bytes(&self) -> usize {
        self.blocks() * self.kind.block_bytes()
    }

    /// Quantises row-major `w` (rows*cols values).
    ///
    /// Panics when `w.len() != rows * cols` or a value is not finite (the caller refuses
    /// those with a message naming the tensor).
    pub fn quantize(kind: BlockKind, w: &[f32], rows: usize, cols: usize) -> BlockMatrix {
        assert_eq!(w.len(), rows * cols, "BlockMatrix::quantize: wrong length");
        assert!(
            w.iter().all(|v| v.is_finite()),
            "BlockMatrix::quantize: a value is not finite"
        );
        let nb = cols.div_ceil(BLOCK);
        let bb = kind.block_bytes();
        let mut codes = vec![0u8; rows * nb * bb];
        let mut scales = vec![0f32; rows * nb];
        let mut q = [0i8; BLOCK];
        for r in 0..rows {
            for b in 0..nb {
                let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(cols));
                let src = &w[r * cols + c0..r * cols + c1];
                let s = match kind {
                    BlockKind::Q8_0 => {
                        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                        amax / 127.0
                    }
                    BlockKind::Q4_0 => {
                        let m = src
                            .iter()
                            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                        m / -8.0
                    }
                };
                let (lo, hi) = match kind {
                    BlockKind::Q8_0 => (-127.0, 127.0),
                    BlockKind::Q4_0 => (-8.0, 7.0),
                };
                q.fill(0);
                if s != 0.0 {
                    for (d, &v) in q.iter_mut().zip(src) {
                        *d = (v / s).round().clamp(lo, hi) as i8;
                    }
                }
                scales[r * nb + b] = s;
                let dst = &mut codes[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                pack(kind, &q, dst);
            }
        }
        BlockMatrix {
            kind,
            rows,
            cols,
            codes,
            scales,
        }
    }

    /// Checks lengths, the code range (Q8_0: no -128) and finite scales; the error names
    /// the first problem found. Padding codes past `cols` are not checked (they multiply
    /// zero-padded x).
    pub fn from_parts(
        kind: BlockKind,
        rows: usize,
        cols: usize,
        codes: Vec<u8>,
        scales: Vec<f32>,
    ) -> Result<BlockMatrix> {
        let key = format!("{} matrix", kind.name());
        let nb = cols.div_ceil(BLOCK);
        let want = rows
            .checked_mul(nb)
            .and_then(|v| v.checked_mul(kind.block_bytes()));
        let Some(want) = want else {
            return Err(Error::config(key, format!("{rows}×{cols} overflows")));
        };
        if codes.len() != want {
            return Err(Error::config(
                key,
                format!("{} bytes of codes, {rows}×{cols} needs {want}", codes.len()),
            ));
        }
        if scales.len() != rows * nb {
            return Err(Error::config(
                key,
                format!("{} scales for {rows} rows of {nb} blocks", scales.len()),
            ));
        }
        if kind == BlockKind::Q8_0 {
            if let Some(i) = codes.iter().position(|&v| v as i8 == i8::MIN) {
                return Err(Error::config(
                    key,
                    format!(
                        "code -128 at row {}, column {} (codes are -127..=127)",
                        i / (nb * BLOCK),
                        i % (nb * BLOCK)
                    ),
                ));
            }
        }
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::config(
                key,
                format!(
                    "scale of row {}, block {} is {}",
                    i / nb.max(1),
                    i % nb.max(1),
                    scales[i]
                ),
            ));
        }
        Ok(BlockMatrix {
            kind,
            rows,
            cols,
            codes,
            scales,
        })
    }

    /// The codes of block `b` of row `r`.
    fn block_codes(&self, r: usize, b: usize) -> [i8; BLOCK] {
        let bb = self.kind.block_bytes();
        let i = (r * self.blocks() + b) * bb;
        unpack(self.kind, &self.codes[i..i + bb])
    }

    /// Row `r`'s f32 values `scale · code`.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let nb = self.blocks();
        let mut out = Vec::with_capacity(self.cols);
        for b in 0..nb {
            let q = self.block_codes(r, b);
            let s = self.scales[r * nb + b];
            let n = (self.cols - b * BLOCK).min(BLOCK);
            out.extend(q[..n].iter().map(|&c| s * c as f32));
        }
        out
    }

    /// Row-major f32 values `scale · code`.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows)
            .flat_map(|r| self.dequantize_row(r))
            .collect()
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ (+ bias[rows])`, each block of each row of x
    /// quantised to 8 bits (a row with a NaN or ∞ gives NaN outputs).
    ///
    /// Panics unless `x.len() == m*cols`, `out.len() == m*rows` and `bias` is None or has
    /// `rows` values. Parallel on the current rayon pool; the same bits for any thread count.
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "BlockMatrix::matmul: x");
        assert_eq!(out.len(), m * self.rows, "BlockMatrix::matmul: out");
        if let Some(b) = bias {
            assert_eq!(b.len(), self.rows, "BlockMatrix::matmul: bias");
        }
        if self.cols == 0 {
            // No inputs: every output is its bias.
            for o in out.chunks_mut(self.rows.max(1)) {
                for (r, v) in o.iter_mut().enumerate() {
                    *v = bias.map_or(0.0, |b| b[r]);
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA checked; lengths asserted above.
            unsafe { avx2::matmul(self, x, m, bias, out) };
            return;
        }
        self.matmul_portable(x, m, bias, out)
    }

    /// [`BlockMatrix::matmul`] without SIMD: the reference.
    pub fn matmul_portable(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let (n, k, nb) = (self.rows, self.cols, self.blocks());
        assert_eq!(x.len(), m * k, "BlockMatrix::matmul_portable: x");
        if n == 0 {
            return;
        }
        out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
            let (xq, sx) = quantize_x(&x[i * k..(i + 1) * k]);
            for (r, o) in o.iter_mut().enumerate() {
                let mut acc = 0f32;
                for b in 0..nb {
                    let w = self.block_codes(r, b);
                    let dot: i32 = (0..BLOCK)
                        .map(|t| xq[b * BLOCK + t] as i32 * w[t] as i32)
                        .sum();
                    acc += dot as f32 * (sx[b] * self.scales[r * nb + b]);
                }
                *o = acc + bias.map_or(0.0, |b| b[r]);
            }
        });
    }
}

/// Packs one block of codes into its bytes.
fn pack(kind: BlockKind, q: &[i8; BLOCK], dst: &mut [u8]) {
    match kind {
        BlockKind::Q8_0 => {
            for (d, &c) in dst.iter_mut().zip(q) {
                *d = c as u8;
            }
        }
        BlockKind::Q4_0 => {
            for (t, d) in dst.iter_mut().enumerate() {
                let (lo, hi) = ((q[t] + 8) as u8, (q[t + BLOCK / 2] + 8) as u8);
                *d = lo | (hi << 4);
            }
        }
    }
}

/// The codes of one block's bytes.
fn unpack(kind: BlockKind, src: &[u8]) -> [i8; BLOCK] {
    let mut q = [0i8; BLOCK];
    match kind {
        BlockKind::Q8_0 => {
            for (d, &c) in q.iter_mut().zip(src) {
                *d = c as i8;
            }
        }
        BlockKind::Q4_0 => {
            for (t, &c) in src.iter().enumerate() {
                q[t] = (c & 0x0F) as i8 - 8;
                q[t + BLOCK / 2] = (c >> 4) as i8 - 8;
            }
        }
    }
    q
}

/// One row of x as 8-bit codes per block (zero-padded to whole blocks) and the blocks'
/// scales (`max|x_b|/127`; NaN for every block of a row that holds a NaN or ∞).
fn quantize_x(x: &[f32]) -> (Vec<i16>, Vec<f32>) {
    let nb = x.len().div_ceil(BLOCK);
    let (mut q, mut s) = (vec![0i16; nb * BLOCK], vec![0f32; nb]);
    quantize_x_into(x, &mut q, &mut s);
    (q, s)
}

/// [`quantize_x`] into `q` (`blocks · BLOCK` codes) and `s` (one scale per block), so a
/// batch's rows go straight into its buffers.
fn quantize_x_into(x: &[f32], q: &mut [i16], s: &mut [f32]) {
    q.fill(0);
    if !x.iter().all(|v| v.is_finite()) {
        s.fill(f32::NAN);
        return;
    }
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let sb = amax / 127.0;
        s[b] = sb;
        if sb > 0.0 {
            for (d, &v) in q[b * BLOCK..].iter_mut().zip(xb) {
                *d = (v / sb).round_ties_even().clamp(-127.0, 127.0) as i16;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::*;
    use crate::kernels::gemm::SyncPtr;
    use crate::kernels::grid::{for_each_block, w_block_rows};

    /// Block `b`'s codes at `p` widened to two i16 vectors (values 0..16, 16..32).
    #[inline(always)]
    unsafe fn load_block<const Q4: bool>(p: *const u8) -> (__m256i, __m256i) {
        if Q4 {
            // SAFETY (all loads here): the caller's pointer has a block's bytes.
            let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
            let eight = _mm256_set1_epi16(8);
            (
                _mm256_sub_epi16(_mm256_cvtepu8_epi16(lo), eight),
                _mm256_sub_epi16(_mm256_cvtepu8_epi16(hi), eight),
            )
        } else {
            let lo = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let hi = unsafe { _mm_loadu_si128(p.add(16) as *const __m128i) };
            (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi))
        }
    }

    /// The sum of `v`'s eight lanes, in a fixed order.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The `R × C` outputs of x rows `x[i]` (i16 codes, `nb` blocks, scales `sx[i]`) and W
    /// rows `w[j]` (codes, scales `sw[j]`) into `dots[i * ld + j]`.
    ///
    /// # Safety
    /// AVX2 and FMA; each pointer covers `nb` blocks.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const C: usize, const Q4: bool>(
        x: &[*const i16; R],
        sx: &[*const f32; R],
        w: &[*const u8; C],
        sw: &[*const f32; C],
        nb: usize,
        dots: *mut f32,
        ld: usize,
    ) {
        let bb = if Q4 { BLOCK / 2 } else { BLOCK };
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let mut wv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); C];
            for j in 0..C {
                // SAFETY: block b of row j is inside its buffer.
                wv[j] = unsafe { load_block::<Q4>(w[j].add(b * bb)) };
            }
            for i in 0..R {
                // SAFETY: block b of x row i (32 i16) and its scale are readable.
                let (x0, x1, s) = unsafe {
                    (
                        _mm256_loadu_si256(x[i].add(b * BLOCK) as *const __m256i),
                        _mm256_loadu_si256(x[i].add(b * BLOCK + 16) as *const __m256i),
                        *sx[i].add(b),
                    )
                };
                for j in 0..C {
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(x0, wv[j].0),
                        _mm256_madd_epi16(x1, wv[j].1),
                    );
                    // SAFETY: scale b of W row j is readable.
                    let scale = _mm256_set1_ps(s * unsafe { *sw[j].add(b) });
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i][j]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                // SAFETY: the caller's buffer holds R rows of `ld >= C` values.
                unsafe { *dots.add(i * ld + j) = hsum(v) };
            }
        }
    }

    /// [`BlockMatrix::matmul`] on AVX2.
    ///
    /// # Safety
    /// AVX2 and FMA; lengths as `matmul` asserts them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn matmul(
        a: &BlockMatrix,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        const R: usize = MR;
        const C: usize = NR;
        let (n, k, nb) = (a.rows, a.cols, a.blocks());
        if m == 0 || n == 0 {
            return;
        }
        let ld = nb * BLOCK;
        let mp = m.next_multiple_of(R);
        // Quantised x: rows of `ld` codes, padded to a multiple of R rows (zeros).
        let mut xq = vec![0i16; mp * ld];
        let mut sx = vec![0f32; mp * nb];
        xq.par_chunks_mut(ld)
            .zip(sx.par_chunks_mut(nb.max(1)))
            .take(m)
            .enumerate()
            .for_each(|(i, (q, s))| quantize_x_into(&x[i * k..(i + 1) * k], q, s));
        // W rows past `n` (a tile's padding): codes of zero, scale zero.
        let rb = a.row_bytes();
        let zero_code = if a.kind == BlockKind::Q4_0 { 0x88 } else { 0 };
        let pad_codes = vec![zero_code; rb];
        let pad_scales = vec![0f32; nb];
        let w_row = |r: usize| -> (*const u8, *const f32) {
            if r < n {
                // SAFETY: row r < n is inside both buffers.
                unsafe { (a.codes.as_ptr().add(r * rb), a.scales.as_ptr().add(r * nb)) }
            } else {
                (pad_codes.as_ptr(), pad_scales.as_ptr())
            }
        };
        let nbw = w_block_rows(rb, C, n);
        let dst = SyncPtr(out.as_mut_ptr());
        let (xbase, sbase) = (xq.as_ptr() as usize, sx.as_ptr() as usize);
        let q4 = a.kind == BlockKind::Q4_0;
        for_each_block(n, nbw, mp, X_BLOCK_ROWS, |w_rows, x_rows| {
            let (r0, r1, i0, i1) = (w_rows.start, w_rows.end, x_rows.start, x_rows.end);
            let mut dots = vec![0f32; R * nbw];
            for i in (i0..i1).step_by(R) {
                let xs: [*const i16; R] =
                    std::array::from_fn(|ii| (xbase as *const i16).wrapping_add((i + ii) * ld));
                let ss: [*const f32; R] =
                    std::array::from_fn(|ii| (sbase as *const f32).wrapping_add((i + ii) * nb));
                for r in (r0..r1).step_by(C) {
                    let rows: [(*const u8, *const f32); C] =
                        std::array::from_fn(|jj| w_row(r + jj));
                    let ws = rows.map(|p| p.0);
                    let sws = rows.map(|p| p.1);
                    // SAFETY: AVX2 and FMA (this function's precondition); every pointer
                    // covers nb blocks; `dots` holds R rows of nbw >= r - r0 + C values.
                    unsafe {
                        let d = dots.as_mut_ptr().add(r - r0);
                        if q4 {
                            tile::<R, C, true>(&xs, &ss, &ws, &sws, nb, d, nbw)
                        } else {
                            tile::<R, C, false>(&xs, &ss, &ws, &sws, nb, d, nbw)
                        }
                    }
                }
                for ii in 0..R.min(m.saturating_sub(i)) {
                    for r in r0..r1 {
                        let v = dots[ii * nbw + r - r0] + bias.map_or(0.0, |b| b[r]);
                        // SAFETY: row i + ii < m, column r < n: only this task writes it.
                        unsafe { *dst.get().add((i + ii) * n + r) = v };
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::uniform;

    /// `Σ_c x[c]·w[c]` and `Σ_c |x[c]·w[c]|` of every output, in f64.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for i in 0..m {
            for r in 0..n {
                for c in 0..k {
                    let p = x[i * k + c] as f64 * w[r * k + c] as f64;
                    out[i * n + r] += p;
                    mag[i * n + r] += p.abs();
                }
            }
        }
        (out, mag)
    }

    /// x as the kernel sees it: each block of each row quantised and dequantised.
    fn dequantized_x(x: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(m * k);
        for i in 0..m {
            let (q, s) = quantize_x(&x[i * k..(i + 1) * k]);
            v.extend((0..k).map(|c| s[c / BLOCK] * q[c] as f32));
        }
        v
    }

    fn shapes() -> Vec<(usize, usize, usize)> {
        let mut v = Vec::new();
        for m in [1, 3, 34] {
            for k in [0, 1, 31, 32, 33, 100, 384] {
                for n in [1, 3, 64, 131] {
                    v.push((m, k, n));
                }
            }
        }
        v
    }

    #[test]
    fn round_trip_error_is_within_a_step_of_each_block() {
        for kind in [BlockKind::Q8_0, BlockKind::Q4_0] {
            let (rows, cols) = (5, 70);
            let mut w = uniform(rows * cols, 3);
            w[cols..2 * cols].fill(0.0); // a zero row
            w[2 * cols + 5] = -4.0; // one large value in a block
            let q = BlockMatrix::quantize(kind, &w, rows, cols);
            let again =
                BlockMatrix::from_parts(kind, rows, cols, q.codes.clone(), q.scales.clone());
            assert_eq!(again.unwrap(), q);
            let d = q.dequantize();
            assert_eq!(d.len(), w.len());
            let nb = q.blocks();
            for r in 0..rows {
                for c in 0..cols {
                    // Half a step, except Q4_0's values of the sign opposite to the block's
                    // largest, whose code +8 does not exist: clamped to +7, a step at most.
                    let s = q.scales[r * nb + c / BLOCK].abs();
                    let bound = match kind {
                        BlockKind::Q8_0 => s / 2.0,
                        BlockKind::Q4_0 => s,
                    };
                    let err = (w[r * cols + c] - d[r * cols + c]).abs();
                    assert!(err <= bound + 1e-6, "{kind:?} ({r}, {c}): {err} > {bound}");
                }
            }
            assert!(d[cols..2 * cols].iter().all(|&v| v == 0.0));
            // The largest magnitude is represented exactly (code ±127, or −8 for Q4_0).
            assert!(
                (d[2 * cols + 5] + 4.0).abs() < 1e-6,
                "{kind:?}: {}",
                d[2 * cols + 5]
            );
        }
        // Q4_0 packs values t and t + 16 of a block into byte t.
        let w: Vec<f32> = (0..32).map(|i| if i == 16 { -8.0 } else { 0.0 }).collect();
        let q = BlockMatrix::quantize(BlockKind::Q4_0, &w, 1, 32);
        assert_eq!(q.scales, vec![1.0]);
        assert_eq!(q.codes[0], 0x08);
        assert!(q.codes[1..].iter().all(|&c| c == 0x88));
    }

    #[test]
    fn matmul_matches_the_dequantized_reference_on_odd_shapes() {
        for kind in [BlockKind::Q8_0, BlockKind::Q4_0] {
            for (s, &(m, k, n)) in shapes().iter().enumerate() {
                let w = uniform(n * k, 100 + s as u64);
                let x: Vec<f32> = uniform(m * k, 200 + s as u64)
                    .iter()
                    .map(|v| 3.0 * v)
                    .collect();
                let bias = uniform(n, 300 + s as u64);
                let q = BlockMatrix::quantize(kind, &w, n, k);
                let (want, mag) = reference(&dequantized_x(&x, m, k), &q.dequantize(), m, n, k);
                for b in [None, Some(&bias[..])] {
                    let (mut fast, mut slow) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    q.matmul(&x, m, b, &mut fast);
                    q.matmul_portable(&x, m, b, &mut slow);
                    for e in 0..m * n {
                        // Block dots are exact; the f32 scale products and the sum over
                        // blocks round: a few ulps of the magnitude per block.
                        let want = want[e] + b.map_or(0.0, |b| b[e % n] as f64);
                        let tol =
                            1e-5 * (mag[e] + b.map_or(0.0, |b| b[e % n].abs() as f64)) + 1e-30;
                        for (path, got) in [("avx2", fast[e]), ("portable", slow[e])] {
                            assert!(
                                (got as f64 - want).abs() <= tol,
                                "{kind:?} {path} {m}×{k}·{k}×{n} at {e}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn error_against_f32_shrinks_with_more_bits() {
        let (m, k, n) = (8, 384, 64);
        let w = uniform(n * k, 7);
        let x = uniform(m * k, 8);
        let (want, _) = reference(&x, &w, m, n, k);
        let rms = |kind| {
            let q = BlockMatrix::quantize(kind, &w, n, k);
            let mut out = vec![0f32; m * n];
            q.matmul(&x, m, None, &mut out);
            let e: f64 = out
                .iter()
                .zip(&want)
                .map(|(&a, b)| (a as f64 - b).powi(2))
                .sum();
            (e / want.iter().map(|b| b * b).sum::<f64>()).sqrt()
        };
        let (e8, e4) = (rms(BlockKind::Q8_0), rms(BlockKind::Q4_0));
        // Relative errors: 8-bit codes of x and W well under 1%, 4-bit W near 10%.
        assert!(e8 < 0.01, "q8_0 relative error {e8}");
        assert!(e4 < 0.15 && e4 > 4.0 * e8, "q4_0 {e4} against q8_0 {e8}");
    }

    #[test]
    fn matmul_is_the_same_for_any_thread_count_and_nan_rows_stay_apart() {
        let (m, k, n) = (70, 200, 90);
        let q = BlockMatrix::quantize(BlockKind::Q4_0, &uniform(n * k, 11), n, k);
        let mut x = uniform(m * k, 12);
        x[5 * k + 3] = f32::NAN;
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; m * n];
            pool.install(|| q.matmul(&x, m, None, &mut out));
            out
        };
        let one = run(1);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one), bits(&run(3)));
        for (e, v) in one.iter().enumerate() {
            assert_eq!(v.is_nan(), e / n == 5, "output {e}");
        }
    }

    #[test]
    fn from_parts_names_what_is_wrong() {
        let q = BlockMatrix::quantize(BlockKind::Q8_0, &uniform(2 * 40, 1), 2, 40);
        let err = |kind, codes: Vec<u8>, scales: Vec<f32>| {
            BlockMatrix::from_parts(kind, 2, 40, codes, scales)
                .unwrap_err()
                .to_string()
        };
        let e = err(BlockKind::Q4_0, q.codes.clone(), q.scales.clone());
        assert!(
            e.contains("128 bytes of codes") && e.contains("needs 64"),
            "{e}"
        );
        let e = err(BlockKind::Q8_0, q.codes.clone(), vec![1.0; 3]);
        assert!(e.contains("3 scales for 2 rows of 2 blocks"), "{e}");
        let mut c = q.codes.clone();
        c[70] = 0x80;
        let e = err(BlockKind::Q8_0, c, q.scales.clone());
        assert!(e.contains("code -128 at row 1, column 6"), "{e}");
        let mut s = q.scales.clone();
        s[3] = f32::INFINITY;
        let e = err(BlockKind::Q8_0, q.codes.clone(), s);
        assert!(e.contains("scale of row 1, block 1 is inf"), "{e}");
    }
}
