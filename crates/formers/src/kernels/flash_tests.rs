use super::*;
use crate::kernels::simd::dispatch;
use crate::testutil::uniform as rand;

/// Lane 0 of a vector of any instantiation.
fn first<V: Copy>(v: V) -> f32 {
    assert_eq!(std::mem::size_of::<V>(), 32);
    // SAFETY: both instantiations are eight f32 lanes.
    unsafe { std::mem::transmute_copy::<V, [f32; 8]>(&v)[0] }
}

/// Scores of one head in f64 with every mask (masked = None).
fn scores(dims: &Dims, o: &Opts, hb: usize, q: &[f64], k: &[f64]) -> Vec<Vec<Option<f64>>> {
    let Dims { n, m, d, heads, .. } = *dims;
    (0..n)
        .map(|i| {
            (0..m)
                .map(|j| {
                    let qpos = i + o.q_offset;
                    if o.causal && j > qpos {
                        return None;
                    }
                    if let Some(w) = o.window {
                        if qpos >= o.global && j >= o.global && qpos.abs_diff(j) > w {
                            return None;
                        }
                    }
                    let mut s: f64 = (0..d)
                        .map(|x| q[(hb * n + i) * d + x] * k[(hb * m + j) * d + x])
                        .sum::<f64>()
                        * o.scale as f64;
                    if let Some(b) = o.key_bias {
                        s += b[(hb / heads) * m + j] as f64;
                    }
                    if let Some(a) = o.alibi {
                        s -= a[hb % heads] as f64 * qpos.abs_diff(j) as f64;
                    }
                    Some(s)
                })
                .collect()
        })
        .collect()
}

fn probs(row: &[Option<f64>]) -> Vec<f64> {
    let mx = row
        .iter()
        .flatten()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row
        .iter()
        .map(|s| s.map_or(0.0, |s| (s - mx).exp()))
        .collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// The O(n²) reference in f64: output, and (dq, dk, dv) for output gradient `g`.
#[allow(clippy::type_complexity)]
fn reference(
    dims: &Dims,
    o: &Opts,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let Dims { n, m, d, .. } = *dims;
    let hs = dims.batch * dims.heads;
    let mut out = vec![0.0; hs * n * d];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; hs * n * d],
        vec![0.0; hs * m * d],
        vec![0.0; hs * m * d],
    );
    for hb in 0..hs {
        let s = scores(dims, o, hb, q, k);
        for i in 0..n {
            let p = probs(&s[i]);
            let gi = &g[(hb * n + i) * d..(hb * n + i + 1) * d];
            let mut dp = vec![0.0; m];
            for j in 0..m {
                for x in 0..d {
                    out[(hb * n + i) * d + x] += p[j] * v[(hb * m + j) * d + x];
                    dv[(hb * m + j) * d + x] += p[j] * gi[x];
                    dp[j] += gi[x] * v[(hb * m + j) * d + x];
                }
            }
            let pdp: f64 = (0..m).map(|j| p[j] * dp[j]).sum();
            for j in 0..m {
                let ds = p[j] * (dp[j] - pdp) * o.scale as f64;
                for x in 0..d {
                    dq[(hb * n + i) * d + x] += ds * k[(hb * m + j) * d + x];
                    dk[(hb * m + j) * d + x] += ds * q[(hb * n + i) * d + x];
                }
            }
        }
    }
    (out, dq, dk, dv)
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&x| x as f64).collect()
}

fn max_rel(a: &[f32], e: &[f64]) -> f64 {
    let scale = e.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(e)
        .fold(0.0, |m, (&a, &e)| m.max((a as f64 - e).abs() / scale))
}

fn check(dims: Dims, causal: bool, q_offset: usize, padded: bool, alibi: bool) {
    check_band(dims, causal, q_offset, padded, alibi, None, 0)
}

fn check_band(
    dims: Dims,
    causal: bool,
    q_offset: usize,
    padded: bool,
    alibi: bool,
    window: Option<usize>,
    global: usize,
) {
    let Dims {
        batch,
        heads,
        n,
        m,
        d,
    } = dims;
    let hs = batch * heads;
    let q = rand(hs * n * d, 1);
    let k = rand(hs * m * d, 2);
    let v = rand(hs * m * d, 3);
    let g = rand(hs * n * d, 4);
    let bias: Vec<f32> = (0..batch)
        .flat_map(|b| {
            (0..m).map(move |j| {
                if padded && j + 3 * b >= m && j > 0 {
                    -1e30
                } else {
                    0.0
                }
            })
        })
        .collect();
    let slopes: Vec<f32> = (0..heads).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
    let o = Opts {
        scale: 1.0 / (d as f32).sqrt(),
        causal,
        q_offset,
        key_bias: padded.then_some(&bias[..]),
        alibi: alibi.then_some(&slopes[..]),
        window,
        global,
    };
    let (out, lse) = forward(&dims, &o, &q, &k, &v);
    let (re, rdq, rdk, rdv) = reference(&dims, &o, &wide(&q), &wide(&k), &wide(&v), &wide(&g));
    let what = format!(
        "{dims:?} causal={causal} off={q_offset} padded={padded} alibi={alibi} \
         window={window:?} global={global}"
    );
    assert!(
        max_rel(&out, &re) < 1e-5,
        "out {what}: {}",
        max_rel(&out, &re)
    );
    let (dq, dk, dv) = backward(&dims, &o, &q, &k, &v, &out, &lse, &g);
    assert!(
        max_rel(&dq, &rdq) < 1e-4,
        "dq {what}: {}",
        max_rel(&dq, &rdq)
    );
    assert!(
        max_rel(&dk, &rdk) < 1e-4,
        "dk {what}: {}",
        max_rel(&dk, &rdk)
    );
    assert!(
        max_rel(&dv, &rdv) < 1e-4,
        "dv {what}: {}",
        max_rel(&dv, &rdv)
    );
}

#[test]
fn matches_the_reference_in_values_and_gradients() {
    for dims in [
        Dims {
            batch: 1,
            heads: 1,
            n: 1,
            m: 1,
            d: 4,
        },
        Dims {
            batch: 2,
            heads: 3,
            n: 37,
            m: 37,
            d: 16,
        },
        Dims {
            batch: 1,
            heads: 2,
            n: 70,
            m: 130,
            d: 8,
        },
        Dims {
            batch: 2,
            heads: 1,
            n: 129,
            m: 129,
            d: 33,
        },
    ] {
        for causal in [false, true] {
            for padded in [false, true] {
                for alibi in [false, true] {
                    let off = if causal { dims.m - dims.n } else { 0 };
                    check(dims, causal, off, padded, alibi);
                }
            }
        }
    }
}

/// Sliding windows narrower and wider than a key block, with global tokens, against the
/// reference: blocks outside every band are skipped, and partial blocks masked.
#[test]
fn windows_match_the_reference_in_values_and_gradients() {
    let dims = Dims {
        batch: 2,
        heads: 2,
        n: 300,
        m: 300,
        d: 16,
    };
    for (window, global) in [(1, 0), (5, 0), (70, 0), (5, 3), (100, 70), (400, 0)] {
        for causal in [false, true] {
            // Padding hides up to 3 keys: a narrower band would leave the last rows no key
            // but padding, whose f32 log-sum-exp cannot hold the reference's.
            check_band(dims, causal, 0, window >= 3, true, Some(window), global);
        }
    }
    // Decoding-like: queries at the end of the keys.
    let dims = Dims { n: 40, ..dims };
    check_band(dims, true, 260, false, false, Some(17), 2);
}

#[test]
fn the_reference_gradient_is_the_finite_difference() {
    let dims = Dims {
        batch: 1,
        heads: 1,
        n: 3,
        m: 4,
        d: 2,
    };
    let q = wide(&rand(6, 5));
    let k = wide(&rand(8, 6));
    let v = wide(&rand(8, 7));
    let g = wide(&rand(6, 8));
    let slopes = [0.3f32];
    let o = Opts {
        scale: 0.7,
        causal: true,
        q_offset: 1,
        key_bias: None,
        alibi: Some(&slopes),
        window: None,
        global: 0,
    };
    let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
        let (out, ..) = reference(&dims, &o, q, k, v, &g);
        out.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let (_, dq, dk, dv) = reference(&dims, &o, &q, &k, &v, &g);
    let h = 1e-6;
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
        for i in 0..grad.len() {
            let mut x = [q.clone(), k.clone(), v.clone()];
            x[which][i] += h;
            let up = loss(&x[0], &x[1], &x[2]);
            x[which][i] -= 2.0 * h;
            let down = loss(&x[0], &x[1], &x[2]);
            let fd = (up - down) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-7,
                "input {which} index {i}: {fd} vs {}",
                grad[i]
            );
        }
    }
}

#[test]
fn exp_is_accurate() {
    for i in -8700..8800 {
        let x = i as f32 / 100.0;
        let e = (x as f64).exp();
        let a = dispatch!(|S| first(S::exp(S::splat(x)))) as f64;
        let b = unsafe { super::super::simd::Scalar::exp([x; 8]) }[0] as f64;
        assert!(((b - e) / e).abs() < 3e-7, "portable {x}: {b} vs {e}");
        assert!(((a - e) / e).abs() < 3e-7, "{x}: {a} vs {e}");
    }
    for x in [f32::NEG_INFINITY, -1e30, -87.5] {
        assert_eq!(dispatch!(|S| first(S::exp(S::splat(x)))), 0.0);
        assert_eq!(unsafe { super::super::simd::Scalar::exp([x; 8]) }[0], 0.0);
    }
}

/// The kernels' probabilities are `2^x` for `x = s − max <= 0` (and a rounding above):
/// `exp2` is within 1e-7 relative of f64 there (7.9e-8 on every f32 of [-126, 1/2]), no
/// worse than the `exp` it replaced (3e-7): the outputs stay within 1e-5 and the gradients
/// within 1e-4 of the f64 reference (the tests above), and training as close to the
/// composed candle path as before (`trainer::tests`).
#[test]
fn exp2_is_accurate_where_the_softmax_uses_it() {
    let worst = |f: &dyn Fn(f32) -> f32| {
        // Every 2^-12 on [-126, 1]: many points of each reduced argument `f`.
        (-126 * 4096..4096)
            .map(|i| i as f32 / 4096.0)
            .fold(0f64, |w, x| {
                let e = (x as f64).exp2();
                w.max(((f(x) as f64 - e) / e).abs())
            })
    };
    let fast = worst(&|x| dispatch!(|S| first(S::exp2(S::splat(x)))));
    let portable = worst(&|x| unsafe { super::super::simd::Scalar::exp2([x; 8]) }[0]);
    assert!(fast < 1e-7, "exp2: max relative error {fast}");
    assert!(
        portable < 1.5e-7,
        "portable exp2: max relative error {portable}"
    );
    for x in [f32::NEG_INFINITY, f32::NAN, -1e30, -127.0, -126.6] {
        assert_eq!(dispatch!(|S| first(S::exp2(S::splat(x)))), 0.0, "{x}");
        assert_eq!(unsafe { super::super::simd::Scalar::exp2([x; 8]) }[0], 0.0);
    }
    assert_eq!(dispatch!(|S| first(S::exp2(S::splat(0.0)))), 1.0);
}

#[test]
fn gradients_are_the_same_bits_for_any_thread_count() {
    // One head of 600 keys: the backward splits its key blocks into several units.
    let dims = Dims {
        batch: 1,
        heads: 1,
        n: 300,
        m: 600,
        d: 16,
    };
    let o = Opts {
        scale: 0.25,
        causal: true,
        q_offset: 300,
        key_bias: None,
        alibi: None,
        window: None,
        global: 0,
    };
    let (q, k, v) = (rand(300 * 16, 1), rand(600 * 16, 2), rand(600 * 16, 3));
    let dout = rand(300 * 16, 4);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (out, lse) = forward(&dims, &o, &q, &k, &v);
            backward(&dims, &o, &q, &k, &v, &out, &lse, &dout)
        })
    };
    let one = run(1);
    for threads in [2, 3] {
        assert!(
            run(threads) == one,
            "{threads} threads changed the gradients"
        );
    }
}
