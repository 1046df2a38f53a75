//! Exact softmax attention in the FlashAttention-2 form (Dao 2023) for the CPU: the forward
//! keeps only the output and each query row's log-sum-exp; the backward recomputes the score
//! tiles from them. Memory is O(n·d) whatever the length. Plain slices in, plain vectors out:
//! the candle op around it is `kernels::attention_op`.

use rayon::prelude::*;

use super::simd::{dispatch, Simd, LANES};

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
}

/// One head's view of the inputs.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    slope: f32,
}

impl Dims {
    fn heads_total(&self) -> usize {
        self.batch * self.heads
    }

    fn head<'a>(
        &self,
        o: &Opts<'a>,
        hb: usize,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
    ) -> Head<'a> {
        let (n, m, d) = (self.n, self.m, self.d);
        Head {
            q: &q[hb * n * d..(hb + 1) * n * d],
            k: &k[hb * m * d..(hb + 1) * m * d],
            v: &v[hb * m * d..(hb + 1) * m * d],
            bias: o
                .key_bias
                .map(|b| &b[(hb / self.heads) * m..(hb / self.heads + 1) * m]),
            slope: o.alibi.map_or(0.0, |s| s[hb % self.heads]),
        }
    }
}

/// Rows handled together: each key vector loaded serves this many queries.
const R: usize = 4;
/// Vectors per score row.
const KV: usize = BK / LANES;

/// `kt [d][BK]`: rows `ks..ks + BK` of `k [m, d]` transposed, zero past `m`.
fn transpose_block(k: &[f32], m: usize, d: usize, ks: usize, kt: &mut [f32]) {
    kt.fill(0.0);
    for j in 0..BK.min(m - ks) {
        let row = &k[(ks + j) * d..(ks + j + 1) * d];
        for (dd, &x) in row.iter().enumerate() {
            kt[dd * BK + j] = x;
        }
    }
}

/// `s[r][j] = Σ_dd a[r·d + dd] · kt[dd][j]` for the `R` rows of `a` (`[R, d]`).
#[inline(always)]
unsafe fn products<S: Simd>(a: &[f32], kt: &[f32], d: usize, s: &mut [[f32; BK]; R]) {
    for half in 0..KV / 2 {
        let c = half * 2 * LANES;
        let mut acc = [[S::splat(0.0); 2]; R];
        for dd in 0..d {
            let k0 = S::load(&kt[dd * BK + c..]);
            let k1 = S::load(&kt[dd * BK + c + LANES..]);
            for r in 0..R {
                let x = S::splat(a[r * d + dd]);
                acc[r][0] = S::fma(x, k0, acc[r][0]);
                acc[r][1] = S::fma(x, k1, acc[r][1]);
            }
        }
        for r in 0..R {
            S::store(&mut s[r][c..], acc[r][0]);
            S::store(&mut s[r][c + LANES..], acc[r][1]);
        }
    }
}

/// Masks and biases score row `s` of the query at `qpos` against the key block at `ks`:
/// keys it may not see become -∞.
#[inline(always)]
fn mask_row(s: &mut [f32; BK], ks: usize, qpos: usize, m: usize, causal: bool, h: &Head) {
    let visible = if causal { (qpos + 1).min(m) } else { m };
    let end = visible.saturating_sub(ks).min(BK);
    if let Some(b) = h.bias {
        for j in 0..end {
            s[j] += b[ks + j];
        }
    }
    if h.slope != 0.0 {
        for (j, x) in s.iter_mut().enumerate().take(end) {
            *x -= h.slope * (qpos.abs_diff(ks + j) as f32);
        }
    }
    for x in s.iter_mut().skip(end) {
        *x = f32::NEG_INFINITY;
    }
}

/// Largest element of a score row.
#[inline(always)]
unsafe fn row_max<S: Simd>(s: &[f32; BK]) -> f32 {
    let mut m = S::load(s);
    for c in 1..KV {
        m = S::max(m, S::load(&s[c * LANES..]));
    }
    S::hmax(m)
}

/// `s ← exp(s − shift)`; returns the sum.
#[inline(always)]
unsafe fn exp_row<S: Simd>(s: &mut [f32; BK], shift: f32) -> f32 {
    let sh = S::splat(shift);
    let mut sum = S::splat(0.0);
    for c in 0..KV {
        let e = S::exp(S::sub(S::load(&s[c * LANES..]), sh));
        S::store(&mut s[c * LANES..], e);
        sum = S::add(sum, e);
    }
    S::sum(sum)
}

/// For the `R` rows `y_r` of `y` (`[R, d]`, `d` a multiple of [`LANES`]):
/// `y_r ← alpha_r · y_r + Σ_j p[r][j] · x_j` over the `kl` rows `x_j` of `x` (`[kl, d]`).
/// The rows are independent chains, and each `x_j` load serves all of them.
#[inline(always)]
unsafe fn gemm_rows<S: Simd>(
    y: &mut [f32],
    alpha: &[f32; R],
    p: &[[f32; BK]; R],
    x: &[f32],
    kl: usize,
    d: usize,
) {
    for c in (0..d).step_by(LANES) {
        // (A loop, not `array::from_fn`: a closure would not inherit the target features.)
        let mut acc = [S::splat(0.0); R];
        for r in 0..R {
            acc[r] = S::mul(S::load(&y[r * d + c..]), S::splat(alpha[r]));
        }
        for j in 0..kl {
            let xj = S::load(&x[j * d + c..]);
            for r in 0..R {
                acc[r] = S::fma(S::splat(p[r][j]), xj, acc[r]);
            }
        }
        for r in 0..R {
            S::store(&mut y[r * d + c..], acc[r]);
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
    // Scaled queries, padded with zero rows to whole groups.
    let mut qs = vec![0f32; groups * R * d];
    for (dst, src) in qs.iter_mut().zip(&h.q[rows.start * d..rows.end * d]) {
        *dst = src * o.scale;
    }
    let mut run_max = vec![f32::NEG_INFINITY; groups * R];
    let mut run_sum = vec![0f32; groups * R];
    let mut acc = vec![0f32; groups * R * d];
    let mut kt = vec![0f32; d * BK];
    let mut s = [[0f32; BK]; R];
    let last_q = rows.end - 1 + o.q_offset;
    for ks in (0..m).step_by(BK) {
        if o.causal && ks > last_q {
            break;
        }
        transpose_block(h.k, m, d, ks, &mut kt);
        let kl = BK.min(m - ks);
        let vb = &h.v[ks * d..(ks + kl) * d];
        for g in 0..groups {
            let rs = g * R;
            products::<S>(&qs[rs * d..(rs + R) * d], &kt, d, &mut s);
            let mut alpha = [1f32; R];
            for (r, s) in s.iter_mut().enumerate() {
                let i = rs + r;
                if i < nq {
                    mask_row(s, ks, rows.start + i + o.q_offset, m, o.causal, h);
                }
                let mx = if i < nq {
                    row_max::<S>(s)
                } else {
                    f32::NEG_INFINITY
                };
                if mx == f32::NEG_INFINITY {
                    // A padding row, or a row that sees none of these keys.
                    *s = [0.0; BK];
                    continue;
                }
                let new_max = run_max[i].max(mx);
                alpha[r] = (run_max[i] - new_max).exp();
                let sum = exp_row::<S>(s, new_max);
                run_sum[i] = S::fma_scalar(run_sum[i], alpha[r], sum);
                run_max[i] = new_max;
            }
            gemm_rows::<S>(&mut acc[rs * d..(rs + R) * d], &alpha, &s, vb, kl, d);
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
        lse[i] = run_max[i] + run_sum[i].ln();
    }
}

/// Backward over key blocks `blocks` of one head: adds into `dq` (all rows), writes
/// `dk`, `dv`, which hold the rows of those blocks only. `delta[i] = Σ dout_i · out_i`;
/// `d` is a multiple of [`LANES`].
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
    let mut qs = vec![0f32; groups * R * d];
    for (dst, src) in qs.iter_mut().zip(h.q) {
        *dst = src * o.scale;
    }
    let mut dos = vec![0f32; groups * R * d];
    dos[..n * d].copy_from_slice(dout);
    let mut kt = vec![0f32; d * BK];
    let mut vt = vec![0f32; d * BK];
    let mut p = [[0f32; BK]; R];
    let mut ds = [[0f32; BK]; R];
    let mut dqs = vec![0f32; groups * R * d];
    let base = blocks.start * BK;
    for blk in blocks {
        let ks = blk * BK;
        let kl = BK.min(m - ks);
        transpose_block(h.k, m, d, ks, &mut kt);
        transpose_block(h.v, m, d, ks, &mut vt);
        let r0 = ks - base;
        let dk_b = &mut dk[r0 * d..(r0 + kl) * d];
        let dv_b = &mut dv[r0 * d..(r0 + kl) * d];
        let kb = &h.k[ks * d..(ks + kl) * d];
        // Under the causal mask, queries before `ks - q_offset` see none of these keys.
        let first = if o.causal {
            ks.saturating_sub(o.q_offset)
        } else {
            0
        };
        for g in first / R..groups {
            let rs = g * R;
            let live = n.saturating_sub(rs).min(R);
            products::<S>(&qs[rs * d..(rs + R) * d], &kt, d, &mut p);
            products::<S>(&dos[rs * d..(rs + R) * d], &vt, d, &mut ds);
            for r in 0..R {
                if r >= live {
                    p[r] = [0.0; BK];
                    ds[r] = [0.0; BK];
                    continue;
                }
                let i = rs + r;
                mask_row(&mut p[r], ks, i + o.q_offset, m, o.causal, h);
                exp_row::<S>(&mut p[r], lse[i]);
                // ds = p · (dp − delta)
                let di = S::splat(delta[i]);
                for c in 0..KV {
                    let pc = S::load(&p[r][c * LANES..]);
                    let dpc = S::load(&ds[r][c * LANES..]);
                    S::store(&mut ds[r][c * LANES..], S::mul(pc, S::sub(dpc, di)));
                }
            }
            // dq_i += Σ_j ds_j k_j (times the scale, at the end)
            gemm_rows::<S>(&mut dqs[rs * d..(rs + R) * d], &[1.0; R], &ds, kb, kl, d);
            // dv_j += Σ_r p_rj · dout_r, dk_j += Σ_r ds_rj · qs_r: each row of the block
            // loaded once for the R queries.
            for j in 0..kl {
                for c in (0..d).step_by(LANES) {
                    let mut av = S::load(&dv_b[j * d + c..]);
                    let mut ak = S::load(&dk_b[j * d + c..]);
                    for r in 0..R {
                        let row = (rs + r) * d + c;
                        av = S::fma(S::splat(p[r][j]), S::load(&dos[row..]), av);
                        ak = S::fma(S::splat(ds[r][j]), S::load(&qs[row..]), ak);
                    }
                    S::store(&mut dv_b[j * d + c..], av);
                    S::store(&mut dk_b[j * d + c..], ak);
                }
            }
        }
    }
    for (y, &x) in dq.iter_mut().zip(&dqs) {
        *y = S::fma_scalar(x, o.scale, *y);
    }
}

/// [`forward_rows`] for the best instruction set of this CPU.
fn forward_rows_best(
    dims: &Dims,
    o: &Opts,
    h: &Head,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    dispatch!(|S| forward_rows::<S>(dims, o, h, rows, out, lse))
}

/// [`backward_blocks`] for the best instruction set of this CPU.
#[allow(clippy::too_many_arguments)]
fn backward_blocks_best(
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
    dispatch!(|S| backward_blocks::<S>(dims, o, h, dout, lse, delta, blocks, dq, dk, dv))
}

/// Output `[batch, heads, n, d]` and log-sum-exp `[batch, heads, n]`.
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
        let h = dims.head(o, hb, q, k, v);
        let rows = t * BQ..(t * BQ + BQ).min(n);
        forward_rows_best(dims, o, &h, rows, oc, lc);
    });
    (out, lse)
}

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
    let delta: Vec<f32> = out
        .chunks_exact(d)
        .zip(dout.chunks_exact(d))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
        .collect();
    // Split each head's key blocks into `parts` ranges so that there are enough units for
    // the threads; each range owns its dk/dv rows and sums into a dq of its own.
    let blocks = m.div_ceil(BK);
    let threads = rayon::current_num_threads().max(1);
    let parts = (2 * threads).div_ceil(hs).clamp(1, blocks);
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
            let h = dims.head(o, hb, q, k, v);
            let mut dqp = vec![0f32; n * d];
            backward_blocks_best(
                dims,
                o,
                &h,
                &dout[hb * n * d..(hb + 1) * n * d],
                &lse[hb * n..(hb + 1) * n],
                &delta[hb * n..(hb + 1) * n],
                range,
                &mut dqp,
                dk_p,
                dv_p,
            );
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
