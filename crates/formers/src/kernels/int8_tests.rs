//! [`Int8Matrix`] against a dequantised f64 reference and every instruction-set path on this
//! CPU against the portable one, bit for bit.

use super::*;
use crate::testutil::uniform;

/// Naive `out[i][r] = Σ_c x[i][c]·w[r][c] (+ b[r])` in f64.
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, b: Option<&[f32]>) -> Vec<f64> {
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
                        let what = format!("{} {m}×{k}·{k}×{n} bias {}", path.name(), b.is_some());
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
