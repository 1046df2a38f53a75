//! Exact softmax attention in the FlashAttention-2 form (Dao 2023) for the CPU: the forward
//! keeps only the output and each query row's log-sum-exp; the backward recomputes the score
//! tiles from them. Memory is O(n·d) whatever the length. Plain slices in, plain vectors out:
//! the candle op around it is `kernels::attention_op`.
//!
//! Inside, scores are in base 2: the scale, key bias and ALiBi slopes are multiplied by
//! `log2 e` once, so each probability is one [`Simd::exp2`] of `s − max` (no `ln 2` range
//! reduction per element), and the log-sum-exp the forward returns is `log2 Σ 2^s`.

use rayon::prelude::*;

use super::simd::{run, Kernel, Simd, LANES};

/// Scores times it are in base 2: `e^s = 2^(s·log2 e)`.
const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Queries per tile.
pub const BQ: usize = 32;
/// Keys per tile (a compile-time width, so the score rows live in registers).
pub const BK: usize = 64;

/// Sizes: `q [batch, heads, n, d]`, `k, v [batch, heads, m, d]`, all row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
}

/// Masks and biases, as in `softmax::AttendOpts`.
#[derive(Debug, Clone, Copy)]
pub struct Opts<'a> {
    /// Multiplies `q kᵀ` (usually `1 / sqrt(d)`).
    pub scale: f32,
    /// Query `i` sees key `j` only if `j <= i + q_offset`.
    pub causal: bool,
    /// Position of the first query among the keys.
    pub q_offset: usize,
    /// Additive bias per key, `[batch, m]` (0 or a large negative for padding).
    pub key_bias: Option<&'a [f32]>,
    /// ALiBi slopes `[heads]`: scores minus `slope · |i − j|`.
    pub alibi: Option<&'a [f32]>,
    /// A sliding window (Longformer, Beltagy et al. 2020): the query at position `p` sees
    /// keys within `w` of `p` and the first `global` keys; the first `global` queries see
    /// every key. `None`: every key.
    pub window: Option<usize>,
    /// Leading positions with global attention (with `window` only).
    pub global: usize,
}

impl Opts<'_> {
    /// The keys `[lo, hi)` of the band of the query at position `p` (global keys aside),
    /// or `None` when it sees every key.
    fn band(&self, p: usize) -> Option<(usize, usize)> {
        match self.window {
            Some(w) if p >= self.global => Some((p.saturating_sub(w), p.saturating_add(w + 1))),
            _ => None,
        }
    }

    /// Whether some query at positions `p0..=p1` may see a key of `k0..k1`.
    fn sees(&self, p0: usize, p1: usize, k0: usize, k1: usize) -> bool {
        if self.causal && k0 > p1 {
            return false;
        }
        match self.window {
            None => true,
            Some(w) => {
                p0 < self.global
                    || k0 < self.global
                    || (k0 <= p1.saturating_add(w) && k1 > p0.saturating_sub(w))
            }
        }
    }
}

/// One head's view of the inputs, with the key-block layouts the kernels read.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// `k` by key blocks, each transposed: `[blocks][d][BK]`, zero past `m`.
    kt: &'a [f32],
    /// `v` in the same layout (backward only; empty in the forward).
    vt: &'a [f32],
    /// Per key block `[blocks][BK]`: the key bias (or 0) in base 2, and -∞ past `m`.
    bias: &'a [f32],
    /// The ALiBi slope in base 2.
    slope: f32,
}

/// What every head shares: the block layouts of all heads.
struct Prepared {
    kt: Vec<f32>,
    vt: Vec<f32>,
    bias: Vec<f32>,
}

impl Dims {
    fn heads_total(&self) -> usize {
        self.batch * self.heads
    }

    fn blocks(&self) -> usize {
        self.m.div_ceil(BK)
    }

    /// The block layouts of `k` (and of `v` times `ln 2` when given: the backward's `dp`
    /// then comes out in base 2, as its `p`) and the per-block key bias in base 2.
    fn prepare(&self, o: &Opts, k: &[f32], v: Option<&[f32]>) -> Prepared {
        let (m, d, blocks) = (self.m, self.d, self.blocks());
        let per_head = blocks * d * BK;
        let transposed = |x: &[f32], factor: f32| {
            let mut t = vec![0f32; self.heads_total() * per_head];
            t.par_chunks_mut(per_head.max(1))
                .zip(x.par_chunks(m * d))
                .for_each(|(th, xh)| {
                    for blk in 0..blocks {
                        let ks = blk * BK;
                        let tb = &mut th[blk * d * BK..(blk + 1) * d * BK];
                        for j in 0..BK.min(m - ks) {
                            for (dd, &x) in xh[(ks + j) * d..(ks + j + 1) * d].iter().enumerate() {
                                tb[dd * BK + j] = x * factor;
                            }
                        }
                    }
                });
            t
        };
        let mut bias = vec![f32::NEG_INFINITY; self.batch * blocks * BK];
        for (b, row) in bias.chunks_mut(blocks * BK).enumerate() {
            match o.key_bias {
                // A finite bias stays finite (`max`), so a row of only masked keys keeps
                // its softmax; -∞ (`min`) stays -∞.
                Some(kb) => {
                    for (y, &x) in row.iter_mut().zip(&kb[b * m..(b + 1) * m]) {
                        *y = (x * LOG2E).max(x.min(f32::MIN));
                    }
                }
                None => row[..m].fill(0.0),
            }
        }
        Prepared {
            kt: transposed(k, 1.0),
            vt: v.map_or_else(Vec::new, |v| transposed(v, std::f32::consts::LN_2)),
            bias,
        }
    }

    fn head<'a>(
        &self,
        o: &Opts<'a>,
        hb: usize,
        prep: &'a Prepared,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
    ) -> Head<'a> {
        let (n, m, d) = (self.n, self.m, self.d);
        let (blocks, b) = (self.blocks(), hb / self.heads);
        let per_head = blocks * d * BK;
        Head {
            q: &q[hb * n * d..(hb + 1) * n * d],
            k: &k[hb * m * d..(hb + 1) * m * d],
            v: &v[hb * m * d..(hb + 1) * m * d],
            kt: &prep.kt[hb * per_head..(hb + 1) * per_head],
            vt: if prep.vt.is_empty() {
                &[]
            } else {
                &prep.vt[hb * per_head..(hb + 1) * per_head]
            },
            bias: &prep.bias[b * blocks * BK..(b + 1) * blocks * BK],
            slope: o.alibi.map_or(0.0, |s| s[hb % self.heads] * LOG2E),
        }
    }
}

/// Rows handled together: each key vector loaded serves this many queries.
const R: usize = 4;
/// Vectors per score row.
const KV: usize = BK / LANES;
/// Query rows per backward tile: `dk` and `dv` are updated once per tile.
const BT: usize = 32;
/// A block of zero bias.
const ZERO_BIAS: [f32; BK] = [0.0; BK];
/// Lane indices, for the ALiBi distances.
const IOTA: [f32; LANES] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];

/// `s[r][j] = bias[j] + Σ_dd a[r·d + dd] · kt[dd][j]` for the `R` rows of `a` (`[R, d]`)
/// and one transposed key block `kt` (`[d][BK]`).
#[inline(always)]
unsafe fn products<S: Simd>(a: &[f32], kt: &[f32], bias: &[f32], d: usize, s: &mut [[f32; BK]]) {
    debug_assert!(a.len() >= R * d && kt.len() >= d * BK && bias.len() >= BK && s.len() >= R);
    let (a, kt) = (a.as_ptr(), kt.as_ptr());
    for half in 0..KV / 2 {
        let c = half * 2 * LANES;
        let b0 = S::loadp(bias.as_ptr().add(c));
        let b1 = S::loadp(bias.as_ptr().add(c + LANES));
        let mut acc = [[b0, b1]; R];
        for dd in 0..d {
            let k0 = S::loadp(kt.add(dd * BK + c));
            let k1 = S::loadp(kt.add(dd * BK + c + LANES));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = S::splat(*a.add(r * d + dd));
                acc[0] = S::fma(x, k0, acc[0]);
                acc[1] = S::fma(x, k1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            S::storep(s[r].as_mut_ptr().add(c), acc[0]);
            S::storep(s[r].as_mut_ptr().add(c + LANES), acc[1]);
        }
    }
}

/// Applies the ALiBi distance and the causal and window masks to score row `s` of the
/// query at `qpos` against the key block at `ks` (the key bias is already in: [`products`]).
/// Returns how many leading vectors of the row may hold a visible key: the rest are -∞
/// (the keys past the causal or band end), so [`row_max`] and [`exp_row`] skip them.
#[inline(always)]
unsafe fn mask_row<S: Simd>(
    s: &mut [f32; BK],
    ks: usize,
    qpos: usize,
    o: &Opts,
    slope: f32,
) -> usize {
    if slope != 0.0 {
        let base = S::splat(qpos as f32 - ks as f32);
        let iota = S::load(&IOTA);
        let sl = S::splat(slope);
        let zero = S::splat(0.0);
        for c in 0..KV {
            let dist = S::sub(base, S::add(iota, S::splat((c * LANES) as f32)));
            let abs = S::max(dist, S::sub(zero, dist));
            let p = s.as_mut_ptr().add(c * LANES);
            S::storep(p, S::sub(S::loadp(p), S::mul(sl, abs)));
        }
    }
    // Keys at or past `end` are hidden, and (with a band) those in `[global, lo)`.
    let mut end = if o.causal { qpos + 1 } else { usize::MAX };
    if let Some((lo, hi)) = o.band(qpos) {
        hide(s, ks, o.global, lo);
        end = end.min(hi.max(o.global));
    }
    hide(s, ks, end, usize::MAX);
    end.saturating_sub(ks).min(BK).div_ceil(LANES)
}

/// Sets the scores of keys `from..to` (positions) inside the block at `ks` to -∞.
#[inline(always)]
fn hide(s: &mut [f32; BK], ks: usize, from: usize, to: usize) {
    let a = from.saturating_sub(ks).min(BK);
    let b = to.saturating_sub(ks).min(BK);
    if a < b {
        s[a..b].fill(f32::NEG_INFINITY);
    }
}

/// Largest element of the first `live` vectors of a score row (-∞ for none).
#[inline(always)]
unsafe fn row_max<S: Simd>(s: &[f32; BK], live: usize) -> f32 {
    let mut m = S::splat(f32::NEG_INFINITY);
    for c in 0..live {
        m = S::max(m, S::loadp(s.as_ptr().add(c * LANES)));
    }
    S::hmax(m)
}

/// `s ← 2^(s − shift)` (`s <= shift`) on the first `live` vectors, 0 (what -∞ gives) on
/// the rest; returns the sum.
#[inline(always)]
unsafe fn exp_row<S: Simd>(s: &mut [f32; BK], shift: f32, live: usize) -> f32 {
    let sh = S::splat(shift);
    let mut sum = S::splat(0.0);
    for c in 0..live {
        let p = s.as_mut_ptr().add(c * LANES);
        let e = S::exp2(S::sub(S::loadp(p), sh));
        S::storep(p, e);
        sum = S::add(sum, e);
    }
    s[live * LANES..].fill(0.0);
    S::sum(sum)
}

/// For the `R` rows `y_r` of `y` (`[R, d]`, `d` a multiple of [`LANES`]):
/// `y_r ← alpha_r · y_r + Σ_j p[r][j] · x_j` over the `kl` rows `x_j` of `x` (`[kl, d]`).
/// Two vectors of each row at a time: each `x_j` load serves all `R` rows.
#[inline(always)]
unsafe fn gemm_rows<S: Simd>(
    y: &mut [f32],
    alpha: &[f32; R],
    p: &[[f32; BK]],
    x: &[f32],
    kl: usize,
    d: usize,
) {
    debug_assert!(y.len() >= R * d && x.len() >= kl * d && p.len() >= R && kl <= BK);
    let (y, x) = (y.as_mut_ptr(), x.as_ptr());
    let mut c = 0;
    while c + 2 * LANES <= d {
        let mut acc = [[S::splat(0.0); 2]; R];
        for r in 0..R {
            let a = S::splat(alpha[r]);
            acc[r][0] = S::mul(S::loadp(y.add(r * d + c)), a);
            acc[r][1] = S::mul(S::loadp(y.add(r * d + c + LANES)), a);
        }
        for j in 0..kl {
            let x0 = S::loadp(x.add(j * d + c));
            let x1 = S::loadp(x.add(j * d + c + LANES));
            for r in 0..R {
                let w = S::splat(*p[r].get_unchecked(j));
                acc[r][0] = S::fma(w, x0, acc[r][0]);
                acc[r][1] = S::fma(w, x1, acc[r][1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            S::storep(y.add(r * d + c), acc[0]);
            S::storep(y.add(r * d + c + LANES), acc[1]);
        }
        c += 2 * LANES;
    }
    if c < d {
        let mut acc = [S::splat(0.0); R];
        for r in 0..R {
            acc[r] = S::mul(S::loadp(y.add(r * d + c)), S::splat(alpha[r]));
        }
        for j in 0..kl {
            let x0 = S::loadp(x.add(j * d + c));
            for r in 0..R {
                acc[r] = S::fma(S::splat(*p[r].get_unchecked(j)), x0, acc[r]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            S::storep(y.add(r * d + c), *acc);
        }
    }
}

/// Keys handled together by [`gemm_cols`].
const J: usize = 4;

/// For the `kl` rows `y_j` of `y` (`[kl, d]`, `d` a multiple of [`LANES`]):
/// `y_j += Σ_i w[i][j] · x_i` over the `t` rows `x_i` of `x` (`[t, d]`). `J` keys and two
/// vectors at a time: each `x_i` load serves `J` keys.
#[inline(always)]
unsafe fn gemm_cols<S: Simd>(
    y: &mut [f32],
    w: &[[f32; BK]],
    x: &[f32],
    t: usize,
    kl: usize,
    d: usize,
) {
    debug_assert!(y.len() >= kl * d && x.len() >= t * d && w.len() >= t && kl <= BK);
    let (y, x) = (y.as_mut_ptr(), x.as_ptr());
    let mut j0 = 0;
    while j0 + J <= kl {
        let mut c = 0;
        while c + 2 * LANES <= d {
            let mut acc = [[S::splat(0.0); 2]; J];
            for (jj, acc) in acc.iter_mut().enumerate() {
                acc[0] = S::loadp(y.add((j0 + jj) * d + c));
                acc[1] = S::loadp(y.add((j0 + jj) * d + c + LANES));
            }
            for i in 0..t {
                let x0 = S::loadp(x.add(i * d + c));
                let x1 = S::loadp(x.add(i * d + c + LANES));
                let wi = w.get_unchecked(i).as_ptr().add(j0);
                for (jj, acc) in acc.iter_mut().enumerate() {
                    let s = S::splat(*wi.add(jj));
                    acc[0] = S::fma(s, x0, acc[0]);
                    acc[1] = S::fma(s, x1, acc[1]);
                }
            }
            for (jj, acc) in acc.iter().enumerate() {
                S::storep(y.add((j0 + jj) * d + c), acc[0]);
                S::storep(y.add((j0 + jj) * d + c + LANES), acc[1]);
            }
            c += 2 * LANES;
        }
        if c < d {
            let mut acc = [S::splat(0.0); J];
            for (jj, acc) in acc.iter_mut().enumerate() {
                *acc = S::loadp(y.add((j0 + jj) * d + c));
            }
            for i in 0..t {
                let x0 = S::loadp(x.add(i * d + c));
                let wi = w.get_unchecked(i).as_ptr().add(j0);
                for (jj, acc) in acc.iter_mut().enumerate() {
                    *acc = S::fma(S::splat(*wi.add(jj)), x0, *acc);
                }
            }
            for (jj, acc) in acc.iter().enumerate() {
                S::storep(y.add((j0 + jj) * d + c), *acc);
            }
        }
        j0 += J;
    }
    for j in j0..kl {
        for c in (0..d).step_by(LANES) {
            let mut acc = S::loadp(y.add(j * d + c));
            for i in 0..t {
                acc = S::fma(
                    S::splat(*w.get_unchecked(i).get_unchecked(j)),
                    S::loadp(x.add(i * d + c)),
                    acc,
                );
            }
            S::storep(y.add(j * d + c), acc);
        }
    }
}

/// Forward over query rows `rows` of one head: writes their outputs and log-sum-exps.
/// `d` is a multiple of [`LANES`].
#[inline(always)]
unsafe fn forward_rows<S: Simd>(
    dims: &Dims,
    o: &Opts,
    h: &Head,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (m, d) = (dims.m, dims.d);
    let nq = rows.len();
    let groups = nq.div_ceil(R);
    // Scaled queries (in base 2), padded with zero rows to whole groups.
    let mut qs = vec![0f32; groups * R * d];
    let scale = o.scale * LOG2E;
    for (dst, src) in qs.iter_mut().zip(&h.q[rows.start * d..rows.end * d]) {
        *dst = src * scale;
    }
    let mut run_max = vec![f32::NEG_INFINITY; groups * R];
    let mut run_sum = vec![0f32; groups * R];
    let mut acc = vec![0f32; groups * R * d];
    let mut s = [[0f32; BK]; R];
    let (first_q, last_q) = (rows.start + o.q_offset, rows.end - 1 + o.q_offset);
    for blk in 0..dims.blocks() {
        let ks = blk * BK;
        if o.causal && ks > last_q {
            break;
        }
        let kl = BK.min(m - ks);
        if !o.sees(first_q, last_q, ks, ks + kl) {
            continue;
        }
        let kt = &h.kt[blk * d * BK..(blk + 1) * d * BK];
        let bias = &h.bias[blk * BK..(blk + 1) * BK];
        let vb = &h.v[ks * d..(ks + kl) * d];
        for g in 0..groups {
            let rs = g * R;
            products::<S>(&qs[rs * d..(rs + R) * d], kt, bias, d, &mut s);
            let mut alpha = [1f32; R];
            let mut any = false;
            for (r, s) in s.iter_mut().enumerate() {
                let i = rs + r;
                let mut live = 0;
                let mx = if i < nq {
                    live = mask_row::<S>(s, ks, rows.start + i + o.q_offset, o, h.slope);
                    row_max::<S>(s, live)
                } else {
                    f32::NEG_INFINITY
                };
                if mx == f32::NEG_INFINITY || mx < run_max[i] - 127.0 {
                    // A padding row, a row that sees none of these keys, or one whose
                    // probabilities here are all 0 in f32 (2^(s − max) below 2^-127).
                    *s = [0.0; BK];
                    continue;
                }
                any = true;
                let new_max = run_max[i].max(mx);
                if new_max != run_max[i] {
                    alpha[r] = (run_max[i] - new_max).exp2();
                }
                let sum = exp_row::<S>(s, new_max, live);
                run_sum[i] = S::fma_scalar(run_sum[i], alpha[r], sum);
                run_max[i] = new_max;
            }
            if any {
                gemm_rows::<S>(&mut acc[rs * d..(rs + R) * d], &alpha, &s, vb, kl, d);
            }
        }
    }
    for i in 0..nq {
        let inv = 1.0 / run_sum[i];
        for (y, &a) in out[i * d..(i + 1) * d]
            .iter_mut()
            .zip(&acc[i * d..(i + 1) * d])
        {
            *y = a * inv;
        }
        lse[i] = run_max[i] + run_sum[i].log2();
    }
}

/// Backward over key blocks `blocks` of one head: adds into `dq` (all rows), writes
/// `dk`, `dv`, which hold the rows of those blocks only. `delta[i] = ln 2 · Σ dout_i · out_i`
/// (in base 2, as `dp` from `h.vt`); `d` is a multiple of [`LANES`].
///
/// With `p = 2^(s₂ − lse)` and `s₂ = log2 e · s`, `ds₂ = p·(dp₂ − delta)` is `ln 2 · ds`:
/// `dk = Σ ds₂ · qs` with `qs` the base-2 scaled queries, `dq = scale · log2 e · Σ ds₂ · k`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn backward_blocks<S: Simd>(
    dims: &Dims,
    o: &Opts,
    h: &Head,
    dout: &[f32],
    lse: &[f32],
    delta: &[f32],
    blocks: std::ops::Range<usize>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (n, m, d) = (dims.n, dims.m, dims.d);
    let groups = n.div_ceil(R);
    let scale = o.scale * LOG2E;
    let mut qs = vec![0f32; groups * R * d];
    for (dst, src) in qs.iter_mut().zip(h.q) {
        *dst = src * scale;
    }
    let mut dos = vec![0f32; groups * R * d];
    dos[..n * d].copy_from_slice(dout);
    // Probabilities and score gradients of one tile of `BT` query rows against a key block.
    let mut p = [[0f32; BK]; BT];
    let mut ds = [[0f32; BK]; BT];
    let mut dqs = vec![0f32; groups * R * d];
    let base = blocks.start * BK;
    for blk in blocks {
        let ks = blk * BK;
        let kl = BK.min(m - ks);
        let kt = &h.kt[blk * d * BK..(blk + 1) * d * BK];
        let vt = &h.vt[blk * d * BK..(blk + 1) * d * BK];
        let bias = &h.bias[blk * BK..(blk + 1) * BK];
        let r0 = ks - base;
        let dk_b = &mut dk[r0 * d..(r0 + kl) * d];
        let dv_b = &mut dv[r0 * d..(r0 + kl) * d];
        let kb = &h.k[ks * d..(ks + kl) * d];
        // Under the causal mask, queries before `ks - q_offset` see none of these keys.
        let first = if o.causal {
            ks.saturating_sub(o.q_offset) / R * R
        } else {
            0
        };
        for t0 in (first..groups * R).step_by(BT) {
            let tl = BT.min(groups * R - t0);
            let last = (t0 + tl).min(n) - 1;
            if !o.sees(t0 + o.q_offset, last + o.q_offset, ks, ks + kl) {
                continue;
            }
            for g in (0..tl).step_by(R) {
                let rs = t0 + g;
                let live = n.saturating_sub(rs).min(R);
                let (pg, dsg) = (&mut p[g..g + R], &mut ds[g..g + R]);
                products::<S>(&qs[rs * d..(rs + R) * d], kt, bias, d, pg);
                products::<S>(&dos[rs * d..(rs + R) * d], vt, &ZERO_BIAS, d, dsg);
                for r in 0..R {
                    if r >= live {
                        pg[r] = [0.0; BK];
                        dsg[r] = [0.0; BK];
                        continue;
                    }
                    let i = rs + r;
                    let live = mask_row::<S>(&mut pg[r], ks, i + o.q_offset, o, h.slope);
                    exp_row::<S>(&mut pg[r], lse[i], live);
                    // ds = p · (dp − delta)
                    let di = S::splat(delta[i]);
                    for c in 0..KV {
                        let pc = S::loadp(pg[r].as_ptr().add(c * LANES));
                        let dp = dsg[r].as_mut_ptr().add(c * LANES);
                        S::storep(dp, S::mul(pc, S::sub(S::loadp(dp), di)));
                    }
                }
                // dq_i += Σ_j ds_ij k_j (times the scale, at the end)
                gemm_rows::<S>(&mut dqs[rs * d..(rs + R) * d], &[1.0; R], dsg, kb, kl, d);
            }
            // dv_j += Σ_i p_ij · dout_i, dk_j += Σ_i ds_ij · qs_i over the tile's rows.
            gemm_cols::<S>(dv_b, &p, &dos[t0 * d..(t0 + tl) * d], tl, kl, d);
            gemm_cols::<S>(dk_b, &ds, &qs[t0 * d..(t0 + tl) * d], tl, kl, d);
        }
    }
    for (y, &x) in dq.iter_mut().zip(&dqs) {
        *y = S::fma_scalar(x, scale, *y);
    }
}

/// One call of [`forward_rows`], as a [`Kernel`].
struct ForwardRows<'a, 'b> {
    dims: &'a Dims,
    o: &'a Opts<'b>,
    h: &'a Head<'b>,
    rows: std::ops::Range<usize>,
    out: &'a mut [f32],
    lse: &'a mut [f32],
}

impl Kernel for ForwardRows<'_, '_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        forward_rows::<S>(self.dims, self.o, self.h, self.rows, self.out, self.lse)
    }
}

/// One call of [`backward_blocks`], as a [`Kernel`].
struct BackwardBlocks<'a, 'b> {
    dims: &'a Dims,
    o: &'a Opts<'b>,
    h: &'a Head<'b>,
    dout: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
    blocks: std::ops::Range<usize>,
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

impl Kernel for BackwardBlocks<'_, '_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let BackwardBlocks {
            dims,
            o,
            h,
            dout,
            lse,
            delta,
            blocks,
            dq,
            dk,
            dv,
        } = self;
        backward_blocks::<S>(dims, o, h, dout, lse, delta, blocks, dq, dk, dv)
    }
}

/// Output `[batch, heads, n, d]` and log-sum-exp `[batch, heads, n]` in base 2
/// (`log2 Σ_j 2^(s_ij · log2 e)`, what [`backward`] takes).
pub fn forward(dims: &Dims, o: &Opts, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let Dims { n, d, .. } = *dims;
    if d % LANES != 0 {
        let (wide, w) = widened(dims);
        let (out, lse) = forward(&wide, o, &pad(q, d, w), &pad(k, d, w), &pad(v, d, w));
        return (unpad(&out, w, d), lse);
    }
    let mut out = vec![0f32; dims.heads_total() * n * d];
    let mut lse = vec![0f32; dims.heads_total() * n];
    if n == 0 || dims.m == 0 {
        return (out, lse);
    }
    let prep = dims.prepare(o, k, None);
    // Work units: (head, query tile); a tile never straddles heads.
    let tiles = n.div_ceil(BQ);
    let mut units: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
    for (hb, (oh, lh)) in out.chunks_mut(n * d).zip(lse.chunks_mut(n)).enumerate() {
        for (t, (oc, lc)) in oh.chunks_mut(BQ * d).zip(lh.chunks_mut(BQ)).enumerate() {
            units.push((hb, t, oc, lc));
        }
    }
    debug_assert_eq!(units.len(), tiles * dims.heads_total());
    units.into_par_iter().for_each(|(hb, t, oc, lc)| {
        let h = dims.head(o, hb, &prep, q, k, v);
        let rows = t * BQ..(t * BQ + BQ).min(n);
        run(ForwardRows {
            dims,
            o,
            h: &h,
            rows,
            out: oc,
            lse: lc,
        });
    });
    (out, lse)
}

/// Work units the backward aims for when batch × heads is small (each a range of one head's
/// key blocks): enough for 8 threads.
const UNITS: usize = 8;

/// Gradients `(dq, dk, dv)` from the forward's `out` and `lse` and the output gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dims: &Dims,
    o: &Opts,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { n, m, d, .. } = *dims;
    if d % LANES != 0 {
        let (wide, w) = widened(dims);
        let [q, k, v, out, dout] = [q, k, v, out, dout].map(|x| pad(x, d, w));
        let (dq, dk, dv) = backward(&wide, o, &q, &k, &v, &out, lse, &dout);
        return (unpad(&dq, w, d), unpad(&dk, w, d), unpad(&dv, w, d));
    }
    let hs = dims.heads_total();
    let mut dq = vec![0f32; hs * n * d];
    let mut dk = vec![0f32; hs * m * d];
    let mut dv = vec![0f32; hs * m * d];
    if n == 0 || m == 0 {
        return (dq, dk, dv);
    }
    let prep = dims.prepare(o, k, Some(v));
    let delta: Vec<f32> = out
        .chunks_exact(d)
        .zip(dout.chunks_exact(d))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() * std::f32::consts::LN_2)
        .collect();
    // Split each head's key blocks into `parts` ranges so that there are enough units for
    // several threads; each range owns its dk/dv rows and sums into a dq of its own. The
    // split depends on the shapes only (never on the thread count), so the sums, and the
    // gradients, are the same bits on any machine.
    let blocks = dims.blocks();
    let parts = UNITS.div_ceil(hs).clamp(1, blocks);
    let per = blocks.div_ceil(parts);
    let mut units = Vec::new();
    for (hb, (dkh, dvh)) in dk.chunks_mut(m * d).zip(dv.chunks_mut(m * d)).enumerate() {
        let mut dk_rest = dkh;
        let mut dv_rest = dvh;
        for p in 0..parts {
            let b0 = (p * per).min(blocks);
            let b1 = ((p + 1) * per).min(blocks);
            let rows = (b1 * BK).min(m) - (b0 * BK).min(m);
            let (dk_p, dk_r) = dk_rest.split_at_mut(rows * d);
            let (dv_p, dv_r) = dv_rest.split_at_mut(rows * d);
            dk_rest = dk_r;
            dv_rest = dv_r;
            units.push((hb, b0..b1, dk_p, dv_p));
        }
    }
    let partial: Vec<(usize, Vec<f32>)> = units
        .into_par_iter()
        .map(|(hb, range, dk_p, dv_p)| {
            let h = dims.head(o, hb, &prep, q, k, v);
            let mut dqp = vec![0f32; n * d];
            let (dout, lse, delta) = (
                &dout[hb * n * d..(hb + 1) * n * d],
                &lse[hb * n..(hb + 1) * n],
                &delta[hb * n..(hb + 1) * n],
            );
            run(BackwardBlocks {
                dims,
                o,
                h: &h,
                dout,
                lse,
                delta,
                blocks: range,
                dq: &mut dqp,
                dk: dk_p,
                dv: dv_p,
            });
            (hb, dqp)
        })
        .collect();
    for (hb, dqp) in partial {
        for (a, b) in dq[hb * n * d..(hb + 1) * n * d].iter_mut().zip(&dqp) {
            *a += b;
        }
    }
    (dq, dk, dv)
}

/// The dims with the head width rounded up to whole vectors, and that width.
fn widened(dims: &Dims) -> (Dims, usize) {
    let w = dims.d.next_multiple_of(LANES);
    (Dims { d: w, ..*dims }, w)
}

/// Rows of width `d` widened to `w` with zeros (which change no dot product).
fn pad(x: &[f32], d: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len() / d * w];
    for (dst, src) in y.chunks_exact_mut(w).zip(x.chunks_exact(d)) {
        dst[..d].copy_from_slice(src);
    }
    y
}

/// The first `d` columns of rows of width `w`.
fn unpad(x: &[f32], w: usize, d: usize) -> Vec<f32> {
    x.chunks_exact(w).flat_map(|r| &r[..d]).copied().collect()
}

#[cfg(test)]
#[path = "flash_tests.rs"]
mod tests;
