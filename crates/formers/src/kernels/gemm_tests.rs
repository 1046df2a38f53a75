//! [`gemm`] against a naive triple loop in f64, over shapes with every kind of edge.
//!
//! Tolerance: the worst case of a length-k f32 dot product, `(k + 2)·u·Σ|a||b|` with
//! `u = 2⁻²⁴` (Higham's γ_k bound), per element.

use super::*;
use crate::testutil::uniform as values;

/// Element `(r, c)` of batch `bi` of an operand.
fn at(x: &MatRef, bi: usize, r: usize, c: usize) -> f32 {
    let (rs, cs) = x.strides();
    x.data[bi * x.batch_stride + r * rs + c * cs]
}

/// A stored operand of `rows × cols` (as the operand), with `pad` spare columns per stored
/// row and `gap` spare values between batches.
fn operand(
    batch: usize,
    rows: usize,
    cols: usize,
    trans: bool,
    pad: usize,
    gap: usize,
    seed: u64,
) -> (Vec<f32>, usize, usize) {
    let (sr, sc) = if trans { (cols, rows) } else { (rows, cols) };
    let ld = sc + pad;
    let bs = sr * ld + gap;
    (values(batch.max(1) * bs, seed), ld, bs)
}

/// Checks one product against the reference; returns C.
#[allow(clippy::too_many_arguments)]
fn check(d: Dims, ta: bool, tb: bool, pad: usize, shared_b: bool, accumulate: bool) -> Vec<f32> {
    let Dims { batch, m, n, k } = d;
    let (ad, lda, abs) = operand(batch, m, k, ta, pad, 3, 1);
    let (bd, ldb, bbs) = operand(if shared_b { 1 } else { batch }, k, n, tb, pad, 5, 2);
    let a = MatRef {
        data: &ad,
        ld: lda,
        trans: ta,
        batch_stride: abs,
    };
    let b = MatRef {
        data: &bd,
        ld: ldb,
        trans: tb,
        batch_stride: if shared_b { 0 } else { bbs },
    };
    let ldc = n + pad;
    let cbs = m * ldc + 7;
    let c0 = values(batch * cbs, 3);
    let mut c = c0.clone();
    gemm(d, a, b, &mut c, ldc, cbs, accumulate);
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut mag) = (0f64, 0f64);
                for kk in 0..k {
                    let p = at(&a, bi, i, kk) as f64 * at(&b, bi, kk, j) as f64;
                    s += p;
                    mag += p.abs();
                }
                let o = bi * cbs + i * ldc + j;
                if accumulate {
                    s += c0[o] as f64;
                    mag += (c0[o] as f64).abs();
                }
                let tol = (k as f64 + 2.0) * f64::powi(2.0, -24) * mag;
                let got = c[o] as f64;
                assert!(
                    (got - s).abs() <= tol,
                    "{d:?} ta={ta} tb={tb} pad={pad} acc={accumulate}: C[{bi}][{i}][{j}] = {got}, want {s} ± {tol}"
                );
            }
        }
    }
    // Padding of C untouched.
    for bi in 0..batch {
        for i in 0..m {
            for j in n..ldc {
                let o = bi * cbs + i * ldc + j;
                assert_eq!(c[o], c0[o], "{d:?}: pad C[{bi}][{i}][{j}] written");
            }
        }
    }
    c
}

fn dims(batch: usize, m: usize, n: usize, k: usize) -> Dims {
    Dims { batch, m, n, k }
}

#[test]
fn matches_the_naive_product_on_edge_shapes() {
    let shapes = [
        (1, 1, 1),
        (1, 16, 1),
        (6, 16, 1),
        (7, 13, 129),
        (5, 17, 3),
        (13, 31, 257),
        (12, 32, 256),
        (6, 48, 513),
        (37, 70, 11),
        (97, 33, 300),
        (2, 200, 5),
        // Wide products: A packed.
        (16, 200, 40),
        (32, 390, 77),
        (13, 500, 33),
    ];
    for &(m, n, k) in &shapes {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            check(dims(1, m, n, k), ta, tb, 0, false, false);
        }
    }
}

#[test]
fn strides_batches_shared_b_and_accumulation() {
    for &(batch, m, n, k) in &[(3, 7, 13, 29), (2, 20, 40, 300), (4, 1, 17, 8)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for shared in [false, true] {
                for acc in [false, true] {
                    check(dims(batch, m, n, k), ta, tb, 3, shared, acc);
                }
            }
        }
    }
}

#[test]
fn empty_depth_writes_zeros_or_keeps_c() {
    let c = check(dims(2, 5, 9, 0), false, false, 1, false, false);
    assert!(c.chunks(5 * 10 + 7).all(|b| b[..5 * 10]
        .chunks(10)
        .all(|r| r[..9].iter().all(|&v| v == 0.0))));
    check(dims(2, 5, 9, 0), true, true, 1, false, true);
    // Empty M or N: nothing to do, nothing read.
    gemm(
        dims(1, 0, 4, 3),
        MatRef::new(&[], 0, 3),
        MatRef::new(&[0.0; 12], 3, 4),
        &mut [],
        4,
        0,
        false,
    );
}

#[test]
fn larger_shapes_that_split_across_tasks() {
    check(dims(1, 200, 300, 520), false, true, 0, false, false);
    check(dims(1, 150, 1100, 40), true, false, 0, false, false);
    check(dims(5, 40, 70, 90), false, false, 0, true, false);
    check(dims(3, 30, 700, 300), true, true, 2, false, true);
    check(dims(3, 30, 700, 300), false, true, 2, true, true);
}

#[test]
#[should_panic(expected = "gemm: B needs")]
fn short_operands_are_refused() {
    let mut c = vec![0.0; 4];
    gemm(
        dims(1, 2, 2, 3),
        MatRef::new(&[0.0; 6], 2, 3),
        MatRef::new(&[0.0; 5], 3, 2),
        &mut c,
        2,
        4,
        false,
    );
}

/// The same product on `threads` threads.
fn product_on(threads: usize, d: Dims, ta: bool, tb: bool) -> Vec<f32> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let a = values(d.batch * d.m * d.k, 11);
    let b = values(d.batch * d.k * d.n, 12);
    let (am, bm) = (MatRef::new(&a, d.m, d.k), MatRef::new(&b, d.k, d.n));
    let am = if ta { MatRef { ld: d.m, ..am.t() } } else { am };
    let bm = if tb { MatRef { ld: d.k, ..bm.t() } } else { bm };
    let mut c = vec![0f32; d.batch * d.m * d.n];
    pool.install(|| gemm(d, am, bm, &mut c, d.n, d.m * d.n, false));
    c
}

#[test]
fn results_are_bit_identical_whatever_the_thread_count() {
    for (d, ta, tb) in [
        (dims(1, 300, 257, 700), false, false),
        (dims(1, 35, 384, 1536), false, true),
        (dims(1, 64, 256, 1024), true, false),
        (dims(3, 50, 90, 300), true, true),
        (dims(2, 32, 900, 300), false, true),
    ] {
        let one = product_on(1, d, ta, tb);
        for threads in [2, 3] {
            let many = product_on(threads, d, ta, tb);
            let same = one
                .iter()
                .zip(&many)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{d:?} ta={ta} tb={tb}: 1 vs {threads} threads differ");
        }
    }
}

#[test]
fn the_portable_kernel_matches_the_naive_product() {
    let k = 300;
    let a = values(MR * k, 21);
    let b = values(k * NR, 22);
    let mut c = vec![0f32; MR * NR];
    let rows: [*const f32; MR] = std::array::from_fn(|r| a[r * k..].as_ptr());
    // SAFETY: rows of k values, a k × NR panel, a 6 × 16 C.
    unsafe { portable_kernel(k, &rows, 1, b.as_ptr(), c.as_mut_ptr(), NR, false) };
    for i in 0..MR {
        for j in 0..NR {
            let s: f64 = (0..k)
                .map(|kk| a[i * k + kk] as f64 * b[kk * NR + j] as f64)
                .sum();
            assert!((c[i * NR + j] as f64 - s).abs() < 1e-4, "{i} {j}");
        }
    }
}

#[test]
fn the_fma_peak_is_measured() {
    for cpu_time in [false, true] {
        let peak = measured_fma_peak(0.01, cpu_time);
        assert!(peak.is_finite() && peak > 0.1, "{cpu_time}: {peak}");
    }
}
