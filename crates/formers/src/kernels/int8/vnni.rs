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

    // Rows of W read `ld` bytes from their start; those whose read would pass the end of
    // `data` are read from zero-padded copies, and rows beyond `n` (a tile's padding) from
    // a zero row. (x is 0 past column k, so bytes of the next row do not count.)
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
