//! `C = A·B` (or `C += A·B`) for f32 matrices on the CPU, the BLIS/GotoBLAS way: an
//! AVX2+FMA microkernel that keeps an `MR × NR` = 6 × 16 tile of C in 12 registers; B packed
//! one K block at a time into `KC × NR` micro-panels (one stays in L1 while it serves a
//! column of tiles, the packed block in L2 however long K is); rayon over blocks of rows
//! and columns of C (split so that the operands are read the fewest times). A block of A
//! is packed into `MR × KC` panels when it serves at least 8 column panels, and read in
//! place (row or column stride) otherwise; transposes of either operand are taken while
//! packing or by the strides, never by a copy of their own.
//!
//! Deterministic: each element of C is one chain of FMAs over K in increasing order, in
//! blocks of [`KC`] that depend on K alone; threads only decide who computes which tile,
//! so the result is bit-identical whatever the thread count. The portable fallback (no
//! AVX2) computes the same sums with separate multiply and add.

use rayon::prelude::*;

/// Rows of C per microkernel tile.
pub const MR: usize = 6;
/// Columns of C per microkernel tile (two 8-lane registers).
pub const NR: usize = 16;
/// Depth of one K block: a `KC × NR` B micro-panel is 16 KiB, a third of Zen 5's L1d.
pub const KC: usize = 256;
/// Most row tiles in one task (96 rows: its A block, 96 KiB at KC, stays in L2).
const MC_TILES: usize = 16;
/// Most column panels in one task (1024 columns: its C block stays in L2 with A's).
const NC_PANELS: usize = 64;
/// Least work (in tile-steps of K, 96 FMAs each) worth handing to another thread.
const MIN_TASK_WORK: usize = 4096;

/// One operand as stored: `data[batch · batch_stride + r · ld + c]` is element `(r, c)` of
/// the stored matrix, which is the operand itself or, when `trans`, its transpose.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    /// Distance between stored rows.
    pub ld: usize,
    /// The stored matrix is the operand's transpose (`A` stored `K × M`, `B` stored `N × K`).
    pub trans: bool,
    /// Distance between matrices of consecutive batches; 0 shares one matrix across them.
    pub batch_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix (or a batch of them, packed one after the other).
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            ld: cols,
            trans: false,
            batch_stride: rows * cols,
        }
    }

    /// The same storage read as its transpose.
    pub fn t(self) -> Self {
        MatRef {
            trans: !self.trans,
            ..self
        }
    }

    /// Strides (row, column) of the operand's element `(r, c)`.
    fn strides(&self) -> (usize, usize) {
        if self.trans {
            (1, self.ld)
        } else {
            (self.ld, 1)
        }
    }

    /// Panics unless every element of `batch` operands of `rows × cols` is in `data`.
    fn check(&self, batch: usize, rows: usize, cols: usize, what: &str) {
        if batch == 0 || rows == 0 || cols == 0 {
            return;
        }
        let (rs, cs) = self.strides();
        let stored_cols = if self.trans { rows } else { cols };
        assert!(
            self.ld >= stored_cols,
            "gemm: {what} row stride {} below its {stored_cols} stored columns",
            self.ld
        );
        let last = (batch - 1) * self.batch_stride + (rows - 1) * rs + (cols - 1) * cs;
        assert!(
            last < self.data.len(),
            "gemm: {what} needs {} values, has {}",
            last + 1,
            self.data.len()
        );
    }
}

/// The shape of a batched product: `batch` products of `m × k` by `k × n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// `C = A·B`, or `C += A·B` when `accumulate`, for each batch; C is row-major with row
/// stride `ldc` and `c_batch_stride` between batches (rows and batches may not overlap).
/// Runs on the current rayon pool.
pub fn gemm(
    d: Dims,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    c_batch_stride: usize,
    accumulate: bool,
) {
    let Dims { batch, m, n, k } = d;
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    a.check(batch, m, k, "A");
    b.check(batch, k, n, "B");
    assert!(ldc >= n, "gemm: C row stride {ldc} below its {n} columns");
    let c_span = (m - 1) * ldc + n;
    assert!(
        batch == 1 || c_batch_stride >= c_span,
        "gemm: C batches overlap (stride {c_batch_stride}, each spans {c_span})"
    );
    assert!(
        (batch - 1) * c_batch_stride + c_span <= c.len(),
        "gemm: C needs {} values, has {}",
        (batch - 1) * c_batch_stride + c_span,
        c.len()
    );
    if k == 0 {
        if !accumulate {
            for bi in 0..batch {
                for r in 0..m {
                    let o = bi * c_batch_stride + r * ldc;
                    c[o..o + n].fill(0.0);
                }
            }
        }
        return;
    }

    let kernel = Kernel::detect();
    let out = SyncPtr(c.as_mut_ptr());
    // SAFETY: `c` holds every element of C (checked above), rows apart.
    unsafe { blocked(d, &a, &b, out, ldc, c_batch_stride, accumulate, kernel) }
}

/// Distinct matrices an operand holds over `batch` batches.
fn batches(x: &MatRef, batch: usize) -> usize {
    if x.batch_stride == 0 {
        1
    } else {
        batch
    }
}

/// The blocked product into C at `c`, row stride `ldc`.
///
/// # Safety
/// Every element of C is inside the allocation `c` points into, and no two coincide.
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    d: Dims,
    a: &MatRef,
    b: &MatRef,
    c: SyncPtr,
    ldc: usize,
    c_batch_stride: usize,
    accumulate: bool,
    kernel: Kernel,
) {
    let Dims { batch, m, n, k } = d;
    let panels = n.div_ceil(NR);
    let tiles = m.div_ceil(MR);
    let threads = rayon::current_num_threads();
    let (tm, tn) = split(batch, tiles, panels, k, threads);
    let tasks = batch * tm * tn;
    // B is packed one K block at a time (`KC × NR` micro-panels of every column panel), so
    // what is packed stays in cache while every row block uses it, however long K is.
    // When all batches share B, it is packed once per block.
    let b_batches = batches(b, batch);
    let block_len = KC * NR;
    let mut packed = vec![0f32; b_batches * panels * block_len];
    let mut p0 = 0;
    while p0 < k {
        let kc = (k - p0).min(KC);
        let pack_one = |(i, dst): (usize, &mut [f32])| {
            let (bi, p) = (i / panels, i % panels);
            let nr = (n - p * NR).min(NR);
            pack_b(b, bi, p * NR, nr, p0, kc, &mut dst[..kc * NR], kernel);
        };
        if threads > 1 && b_batches * panels * kc * NR >= 1 << 16 {
            packed
                .par_chunks_mut(block_len)
                .enumerate()
                .for_each(pack_one);
        } else {
            packed.chunks_mut(block_len).enumerate().for_each(pack_one);
        }
        let run = |t: usize| {
            let bi = t / (tm * tn);
            let (im, in_) = ((t / tn) % tm, t % tn);
            let job = Job {
                d,
                a,
                packed: &packed[(bi % b_batches) * panels * block_len..],
                bi,
                tiles: im * tiles / tm..(im + 1) * tiles / tm,
                panels: in_ * panels / tn..(in_ + 1) * panels / tn,
                p0,
                kc,
                load_c: accumulate || p0 > 0,
                ldc,
            };
            // SAFETY: tasks write disjoint tiles of C, all inside `c` (the caller's promise).
            unsafe { job.run(kernel, c.get().add(bi * c_batch_stride)) }
        };
        if tasks == 1 {
            run(0);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
        p0 += kc;
    }
}

/// How many row blocks and column blocks each batch splits into: blocks that fit the
/// caches, then, on several threads, enough tasks to share out (four per thread, unless
/// they would be too small to pay for the hand-over), cut so that the operands are read
/// the fewest times: a row block reads all its B panels, a column block all its A rows.
fn split(batch: usize, tiles: usize, panels: usize, k: usize, threads: usize) -> (usize, usize) {
    let (tm0, tn0) = (tiles.div_ceil(MC_TILES), panels.div_ceil(NC_PANELS));
    let want = (4 * threads).min(batch * tiles * panels * k / MIN_TASK_WORK);
    if threads <= 1 || batch * tm0 * tn0 >= want {
        return (tm0, tn0);
    }
    let traffic = |tm: usize, tn: usize| tn * tiles * MR + tm * panels * NR;
    let mut best = (tiles, panels);
    for tm in tm0..=tiles {
        let tn = want.div_ceil(batch * tm).clamp(tn0, panels);
        if batch * tm * tn >= want && traffic(tm, tn) < traffic(best.0, best.1) {
            best = (tm, tn);
        }
        if tn == tn0 && batch * tm * tn >= want {
            break; // more row blocks only read B more often
        }
    }
    best
}

/// `kc × NR` panel of B's rows `p0..p0 + kc` and columns `j0..j0 + nr` (zero beyond
/// `nr`), batch `bi`.
#[allow(clippy::too_many_arguments)]
fn pack_b(
    b: &MatRef,
    bi: usize,
    j0: usize,
    nr: usize,
    p0: usize,
    kc: usize,
    dst: &mut [f32],
    kernel: Kernel,
) {
    let base = &b.data[bi * b.batch_stride..];
    #[cfg(target_arch = "x86_64")]
    if b.trans && nr == NR && matches!(kernel, Kernel::Avx2) {
        let src = &base[j0 * b.ld + p0..];
        assert!((NR - 1) * b.ld + kc <= src.len() && dst.len() >= kc * NR);
        // SAFETY: 16 stored rows of kc values and a kc × 16 panel (checked above); AVX2.
        unsafe { avx2::pack_transposed(src.as_ptr(), b.ld, kc, dst.as_mut_ptr()) };
        return;
    }
    let _ = kernel;
    if b.trans {
        // Stored N × K: row j of storage is column j of B.
        if nr < NR {
            dst.fill(0.0);
        }
        for j in 0..nr {
            let src = &base[(j0 + j) * b.ld + p0..][..kc];
            for (kk, &v) in src.iter().enumerate() {
                dst[kk * NR + j] = v;
            }
        }
    } else if nr == NR {
        // Fixed-size rows: two vector moves each, not a `memcpy` call per 16 values.
        for (kk, d) in dst.chunks_exact_mut(NR).enumerate() {
            let d: &mut [f32; NR] = d.try_into().expect("NR values");
            let o = (p0 + kk) * b.ld + j0;
            *d = base[o..o + NR].try_into().expect("NR values");
        }
    } else {
        for (kk, d) in dst.chunks_exact_mut(NR).enumerate() {
            let src = &base[(p0 + kk) * b.ld + j0..][..nr];
            d[..nr].copy_from_slice(src);
            d[nr..].fill(0.0);
        }
    }
}

/// `*mut f32` shared by tasks that write disjoint parts (also `int8`'s).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint tiles (see `gemm`).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `SyncPtr`).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One task: row tiles × column panels of one batch, over one K block.
struct Job<'a> {
    d: Dims,
    a: &'a MatRef<'a>,
    /// This batch's B, packed for this K block: `KC × NR` per column panel.
    packed: &'a [f32],
    bi: usize,
    tiles: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    /// The K block: `p0..p0 + kc`.
    p0: usize,
    kc: usize,
    /// C already holds a partial sum (earlier K blocks, or the caller's C to add to).
    load_c: bool,
    ldc: usize,
}

impl Job<'_> {
    /// # Safety
    /// `c` is this batch's C, valid for its tiles, and no other thread touches them.
    unsafe fn run(&self, kernel: Kernel, c: *mut f32) {
        let Dims { m, n, .. } = self.d;
        let (p0, kc, load_c) = (self.p0, self.kc, self.load_c);
        let (rsa, csa) = self.a.strides();
        let a = self.a.data[self.bi * self.a.batch_stride..].as_ptr();
        // A is packed when the copy pays: its rows serve many column panels.
        let pack_a = self.panels.len() >= 8;
        let mut apack = vec![
            0f32;
            if pack_a {
                self.tiles.len() * MR * kc
            } else {
                0
            }
        ];
        // This task's rows of A for this K block, as MR × kc panels (k-major).
        for (t, dst) in self.tiles.clone().zip(apack.chunks_exact_mut(MR * kc)) {
            let i0 = t * MR;
            let mr = (m - i0).min(MR);
            // SAFETY: rows i0..i0 + mr < m and columns p0..p0 + kc ≤ k are in A.
            let at = |r: usize, kk: usize| unsafe { *a.add((i0 + r) * rsa + (p0 + kk) * csa) };
            if rsa == 1 && mr == MR {
                // A stored transposed: the tile's MR values of each k are adjacent.
                for (kk, d) in dst.chunks_exact_mut(MR).enumerate() {
                    let d: &mut [f32; MR] = d.try_into().expect("MR values");
                    // SAFETY: as `at`: the MR rows of column p0 + kk are in A.
                    *d = unsafe { *(a.add(i0 + (p0 + kk) * csa) as *const [f32; MR]) };
                }
            } else if csa == 1 {
                for r in 0..mr {
                    for kk in 0..kc {
                        dst[kk * MR + r] = at(r, kk);
                    }
                }
            } else {
                for kk in 0..kc {
                    for r in 0..mr {
                        dst[kk * MR + r] = at(r, kk);
                    }
                }
            }
            if mr < MR {
                for kk in 0..kc {
                    dst[kk * MR + mr..(kk + 1) * MR].fill(0.0);
                }
            }
        }
        for p in self.panels.clone() {
            let j0 = p * NR;
            let nr = (n - j0).min(NR);
            let bp = self.packed[p * KC * NR..].as_ptr();
            for (ti, t) in self.tiles.clone().enumerate() {
                let i0 = t * MR;
                let mr = (m - i0).min(MR);
                let rows: [*const f32; MR] = if pack_a {
                    let ap = apack[ti * MR * kc..].as_ptr();
                    std::array::from_fn(|r| ap.add(r))
                } else {
                    // Rows past the edge repeat the last row: read, computed, dropped.
                    std::array::from_fn(|r| a.add((i0 + r.min(mr - 1)) * rsa + p0 * csa))
                };
                let csa = if pack_a { MR } else { csa };
                let ldc = self.ldc;
                let ct = c.add(i0 * ldc + j0);
                if mr == MR && nr == NR {
                    kernel.call(kc, &rows, csa, bp, ct, ldc, load_c);
                } else {
                    // Edge tiles go through a tile of our own.
                    let mut tmp = [0f32; MR * NR];
                    if load_c {
                        for r in 0..mr {
                            for j in 0..nr {
                                tmp[r * NR + j] = *ct.add(r * ldc + j);
                            }
                        }
                    }
                    kernel.call(kc, &rows, csa, bp, tmp.as_mut_ptr(), NR, load_c);
                    for r in 0..mr {
                        for j in 0..nr {
                            *ct.add(r * ldc + j) = tmp[r * NR + j];
                        }
                    }
                }
            }
        }
    }
}

/// The microkernel this CPU runs.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// `C[6×16] (+)= Σ_k A[r][k]·B[k][..]` over `kc` steps.
    ///
    /// # Safety
    /// `rows[r] + kk·csa` readable for `kk < kc`; `b` holds `kc × NR` values; `c` is a
    /// writable 6 × 16 tile with row stride `ldc`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn call(
        self,
        kc: usize,
        rows: &[*const f32; MR],
        csa: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::kernel(kc, rows, csa, b, c, ldc, load_c),
            Kernel::Portable => portable_kernel(kc, rows, csa, b, c, ldc, load_c),
        }
    }
}

/// The microkernel in plain Rust (separate multiply and add).
///
/// # Safety
/// As [`Kernel::call`].
unsafe fn portable_kernel(
    kc: usize,
    rows: &[*const f32; MR],
    csa: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    load_c: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    if load_c {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (j, v) in acc.iter_mut().enumerate() {
                *v = *c.add(r * ldc + j);
            }
        }
    }
    for kk in 0..kc {
        let bk = std::slice::from_raw_parts(b.add(kk * NR), NR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = *rows[r].add(kk * csa);
            for (v, &bv) in acc.iter_mut().zip(bk) {
                *v += av * bv;
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (j, v) in acc.iter().enumerate() {
            *c.add(r * ldc + j) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The 6 × 16 microkernel: 12 accumulators, two B loads and six broadcasts per step.
    ///
    /// # Safety
    /// As [`super::Kernel::call`], and the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(
        kc: usize,
        rows: &[*const f32; MR],
        csa: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if load_c {
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm256_loadu_ps(c.add(r * ldc));
                acc[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
        }
        let [a0, a1, a2, a3, a4, a5] = *rows;
        let mut off = 0;
        let mut bp = b;
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            macro_rules! row {
                ($r:expr, $a:ident) => {
                    let av = _mm256_broadcast_ss(&*$a.add(off));
                    acc[$r][0] = _mm256_fmadd_ps(av, b0, acc[$r][0]);
                    acc[$r][1] = _mm256_fmadd_ps(av, b1, acc[$r][1]);
                };
            }
            row!(0, a0);
            row!(1, a1);
            row!(2, a2);
            row!(3, a3);
            row!(4, a4);
            row!(5, a5);
            off += csa;
            bp = bp.add(NR);
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), acc[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
        }
    }

    /// Packs 16 stored rows of `k` values (row stride `ld`) as a `k × 16` panel, eight
    /// by eight through register transposes.
    ///
    /// # Safety
    /// `src` holds the 16 rows, `dst` k × 16 values; the CPU has AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pack_transposed(src: *const f32, ld: usize, k: usize, dst: *mut f32) {
        let mut kk = 0;
        while kk + 8 <= k {
            for half in 0..2 {
                let r: [__m256; 8] =
                    std::array::from_fn(|j| _mm256_loadu_ps(src.add((half * 8 + j) * ld + kk)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let cols = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (q, col) in cols.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((kk + q) * NR + half * 8), *col);
                }
            }
            kk += 8;
        }
        for kk in kk..k {
            for j in 0..NR {
                *dst.add(kk * NR + j) = *src.add(j * ld + kk);
            }
        }
    }

    /// FLOPs per second of `iters` steps of 12 independent FMA chains on one core.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_loop(iters: u64, x: f32) -> f32 {
        let m = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let p = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_set1_ps(x); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, p);
            }
        }
        let mut s = [0f32; 8];
        let mut t = acc[0];
        for a in &acc[1..] {
            t = _mm256_add_ps(t, *a);
        }
        _mm256_storeu_ps(s.as_mut_ptr(), t);
        s.iter().sum()
    }
}

/// Seconds of CPU time this thread has run (`CLOCK_THREAD_CPUTIME_ID`): what a kernel costs
/// on a machine shared with other work, where wall time also counts the waits.
pub fn thread_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Seconds of CPU time the whole process has run, all its threads (`CLOCK_PROCESS_CPUTIME_ID`).
pub fn process_cpu_seconds() -> f64 {
    clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// The reading of `clock` in seconds (0 if it cannot be read).
fn clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The f32 FMA peak of this machine, measured: every thread of the current rayon pool runs
/// 12 independent chains of 8-lane FMAs for about `seconds`; returns GFLOP/s (2 FLOPs per
/// lane per FMA) summed over the threads. Without AVX2+FMA, a scalar loop's rate.
///
/// With `cpu_time`, each thread's rate is over its own CPU time (the core's rate while it
/// runs, whatever else shares the machine); otherwise over the wall time of the whole run.
pub fn measured_fma_peak(seconds: f64, cpu_time: bool) -> f64 {
    let threads = rayon::current_num_threads().max(1);
    let kernel = Kernel::detect();
    let one = |iters: u64| -> f64 {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA.
            Kernel::Avx2 => unsafe { avx2::fma_loop(iters, 1.0) as f64 },
            Kernel::Portable => {
                let mut acc = [1f32; 12];
                for _ in 0..iters * 8 {
                    for a in acc.iter_mut() {
                        *a = *a * 0.999_999 + 1e-7;
                    }
                }
                acc.iter().sum::<f32>() as f64
            }
        }
    };
    // Calibrate on one thread, then run all at once.
    let mut iters = 1u64 << 16;
    loop {
        let t = std::time::Instant::now();
        std::hint::black_box(one(iters));
        let e = t.elapsed().as_secs_f64();
        if e > 0.02 {
            iters = ((iters as f64) * seconds / e).max(1.0) as u64;
            break;
        }
        iters *= 4;
    }
    let flops = (iters as f64) * 12.0 * 8.0 * 2.0;
    let t = std::time::Instant::now();
    let rates = rayon::broadcast(|_| {
        let c = thread_cpu_seconds();
        std::hint::black_box(one(iters));
        flops / (thread_cpu_seconds() - c).max(1e-9)
    });
    let e = t.elapsed().as_secs_f64();
    if cpu_time {
        rates.iter().sum::<f64>() / 1e9
    } else {
        (threads as f64) * flops / e / 1e9
    }
}

#[cfg(test)]
#[path = "gemm_tests.rs"]
mod tests;
