//! Truncated SVD of a weight matrix as the two factors of a low-rank layer, through the
//! symmetric eigenproblem of its smaller Gram matrix (cyclic Jacobi, f64); or of `W S`, with
//! `S` the Cholesky factor of its inputs' second moment (data-aware, [`factorise_whitened`]).
//!
//! For `W [out, in]` with `in ≤ out`: `WᵀW = V Λ Vᵀ`, `σᵢ² = λᵢ`, and `W ≈ (W V_r) V_rᵀ`;
//! with `out < in`: `WWᵀ = U Λ Uᵀ` and `W ≈ U_r (U_rᵀ W)`. Either way the product at full
//! rank is `W` up to rounding, whatever the accuracy of the small eigenvalues, because the
//! eigenvectors are orthogonal.

/// The factors `weight [out, r]` and `factor [r, in]` (row-major) of `W ≈ weight · factor`.
#[derive(Debug, Clone)]
pub struct Factors {
    pub weight: Vec<f64>,
    pub factor: Vec<f64>,
    pub rank: usize,
}

/// The eigenvalues (descending) and eigenvectors (columns of a row-major `[n, n]`, in the
/// same order) of the symmetric `a [n, n]`.
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n, "a symmetric matrix of {n}×{n}");
    let mut a = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..60 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * norm.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                // The rotation that zeroes a[p][q] (Golub & Van Loan, Algorithm 8.4.1).
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let values = order.iter().map(|&i| a[i * n + i].max(0.0)).collect();
    let mut vectors = vec![0.0; n * n];
    for (col, &i) in order.iter().enumerate() {
        for k in 0..n {
            vectors[k * n + col] = v[k * n + i];
        }
    }
    (values, vectors)
}

/// The smallest rank whose singular values squared keep at least `fraction` of the total
/// (`energy` descending); at least 1.
pub fn rank_for_energy(energy: &[f64], fraction: f64) -> usize {
    let total: f64 = energy.iter().sum();
    let mut kept = 0.0;
    for (i, e) in energy.iter().enumerate() {
        kept += e;
        if kept >= fraction * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    energy.len().max(1)
}

/// The singular structure of one matrix `W [out, in]`: its singular values squared
/// (descending) and the eigenvectors of its smaller Gram matrix.
#[derive(Debug, Clone)]
pub struct Decomposition {
    out: usize,
    inp: usize,
    /// `σᵢ²`, largest first.
    pub energy: Vec<f64>,
    vectors: Vec<f64>,
}

impl Decomposition {
    /// Decomposes `w [out, in]` (row-major).
    pub fn new(w: &[f64], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp);
        let small = out.min(inp);
        let by_cols = inp <= out;
        let mut g = vec![0.0; small * small];
        for i in 0..small {
            for j in i..small {
                let s: f64 = if by_cols {
                    (0..out).map(|k| w[k * inp + i] * w[k * inp + j]).sum()
                } else {
                    (0..inp).map(|k| w[i * inp + k] * w[j * inp + k]).sum()
                };
                g[i * small + j] = s;
                g[j * small + i] = s;
            }
        }
        let (energy, vectors) = symmetric_eigen(&g, small);
        Decomposition {
            out,
            inp,
            energy,
            vectors,
        }
    }

    /// The rank `rank` chooses (at most `min(out, in)`, at least 1).
    pub fn rank(&self, rank: Rank) -> usize {
        match rank {
            Rank::Fixed(r) => r.clamp(1, self.energy.len()),
            Rank::Energy(f) => rank_for_energy(&self.energy, f),
        }
    }

    /// `w` (the matrix decomposed) factorised at rank `r`.
    pub fn factors(&self, w: &[f64], r: usize) -> Factors {
        let (out, inp) = (self.out, self.inp);
        let small = out.min(inp);
        let r = r.clamp(1, small);
        let col = |k: usize, c: usize| self.vectors[k * small + c];
        let (weight, factor) = if inp <= out {
            // weight = W V_r [out, r], factor = V_rᵀ [r, in].
            let mut weight = vec![0.0; out * r];
            for o in 0..out {
                for c in 0..r {
                    weight[o * r + c] = (0..inp).map(|k| w[o * inp + k] * col(k, c)).sum();
                }
            }
            let factor = (0..r)
                .flat_map(|c| (0..inp).map(move |k| col(k, c)))
                .collect();
            (weight, factor)
        } else {
            // weight = U_r [out, r], factor = U_rᵀ W [r, in].
            let weight = (0..out)
                .flat_map(|o| (0..r).map(move |c| col(o, c)))
                .collect();
            let mut factor = vec![0.0; r * inp];
            for c in 0..r {
                for k in 0..inp {
                    factor[c * inp + k] = (0..out).map(|o| col(o, c) * w[o * inp + k]).sum();
                }
            }
            (weight, factor)
        };
        Factors {
            weight,
            factor,
            rank: r,
        }
    }
}

/// `W [out, in]` (row-major) factorised at the rank `rank` chooses.
pub fn factorise(w: &[f64], out: usize, inp: usize, rank: Rank) -> (Factors, Vec<f64>) {
    let d = Decomposition::new(w, out, inp);
    let f = d.factors(w, d.rank(rank));
    (f, d.energy)
}

/// The lower-triangular `S [n, n]` (row-major) with `S Sᵀ = C + δ I`, `δ = damping ·
/// mean(diag C)` (Cholesky): the whitening of inputs whose second moment is `C`.
pub fn cholesky_damped(c: &[f64], n: usize, damping: f64) -> Vec<f64> {
    assert_eq!(c.len(), n * n, "a symmetric matrix of {n}×{n}");
    let mean = (0..n).map(|i| c[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let delta = damping * mean.max(f64::MIN_POSITIVE);
    let mut s = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| s[i * n + k] * s[j * n + k]).sum();
            if i == j {
                // Damping keeps the pivot positive; rounding may still eat a tiny one.
                s[i * n + i] = (c[i * n + i] + delta - dot).max(delta).sqrt();
            } else {
                s[i * n + j] = (c[i * n + j] - dot) / s[j * n + j];
            }
        }
    }
    s
}

/// `W [out, in]` factorised at the rank `rank` chooses, best in the norm of its inputs
/// (SVD-LLM, Wang et al. 2024): with `XᵀX ≈ S Sᵀ` (`s` from [`cholesky_damped`]), the
/// error `‖X (W − W')ᵀ‖` is `‖(W − W') S‖`, so `W' = trunc(W S) S⁻¹`. Returns the factors
/// and the energy of `W S`.
pub fn factorise_whitened(
    w: &[f64],
    out: usize,
    inp: usize,
    s: &[f64],
    rank: Rank,
) -> (Factors, Vec<f64>) {
    let (mut f, energy) = factorise(&whiten(w, out, inp, s), out, inp, rank);
    unwhiten(&mut f, s, inp);
    balance(&mut f, out, inp);
    (f, energy)
}

/// `W S` for `W [out, in]` and the lower-triangular `S [in, in]`.
pub fn whiten(w: &[f64], out: usize, inp: usize, s: &[f64]) -> Vec<f64> {
    assert_eq!(s.len(), inp * inp);
    let mut ws = vec![0.0; out * inp];
    for o in 0..out {
        let row = &w[o * inp..(o + 1) * inp];
        for j in 0..inp {
            // Only rows k ≥ j of column j are non-zero.
            ws[o * inp + j] = (j..inp).map(|k| row[k] * s[k * inp + j]).sum();
        }
    }
    ws
}

/// Factors of `W S` made factors of `W`: `factor ← factor · S⁻¹` (each row `x` solves
/// `x S = b` by back-substitution).
pub fn unwhiten(f: &mut Factors, s: &[f64], inp: usize) {
    for c in 0..f.rank {
        let b = &mut f.factor[c * inp..(c + 1) * inp];
        for j in (0..inp).rev() {
            let tail: f64 = (j + 1..inp).map(|i| b[i] * s[i * inp + j]).sum();
            b[j] = (b[j] - tail) / s[j * inp + j];
        }
    }
}

/// Rescales each rank-1 term of `f` (a column of `weight [out, r]`, a row of
/// `factor [r, in]`) so both have the same norm: the product is unchanged, and neither
/// factor holds values orders of magnitude smaller than the other (which a fixed-size
/// optimizer step, as Adam's, would swamp when the factors are trained further).
pub fn balance(f: &mut Factors, out: usize, inp: usize) {
    let r = f.rank;
    for c in 0..r {
        let a: f64 = (0..out)
            .map(|o| f.weight[o * r + c].powi(2))
            .sum::<f64>()
            .sqrt();
        let b: f64 = f.factor[c * inp..(c + 1) * inp]
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt();
        if a > 0.0 && b > 0.0 {
            let k = (b / a).sqrt();
            (0..out).for_each(|o| f.weight[o * r + c] *= k);
            f.factor[c * inp..(c + 1) * inp]
                .iter_mut()
                .for_each(|v| *v /= k);
        }
    }
}

/// How the rank of a factorisation is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rank {
    /// This rank.
    Fixed(usize),
    /// The smallest rank keeping this fraction of `‖W‖²` (in (0, 1]).
    Energy(f64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal()).collect()
    }

    fn product(f: &Factors, out: usize, inp: usize) -> Vec<f64> {
        let r = f.rank;
        let mut p = vec![0.0; out * inp];
        for o in 0..out {
            for k in 0..inp {
                p[o * inp + k] = (0..r)
                    .map(|c| f.weight[o * r + c] * f.factor[c * inp + k])
                    .sum();
            }
        }
        p
    }

    #[test]
    fn full_rank_reproduces_the_matrix_on_both_sides() {
        for (out, inp) in [(7, 4), (4, 7), (5, 5), (1, 3)] {
            let w = random(out * inp, (out * 10 + inp) as u64);
            let (f, energy) = factorise(&w, out, inp, Rank::Fixed(out.min(inp)));
            let p = product(&f, out, inp);
            let err = p
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-10, "{out}×{inp}: {err}");
            // ‖W‖² is the sum of the singular values squared.
            let norm: f64 = w.iter().map(|x| x * x).sum();
            let total: f64 = energy.iter().sum();
            assert!((norm - total).abs() < 1e-9 * norm);
            assert!(energy.windows(2).all(|e| e[0] >= e[1]));
        }
    }

    #[test]
    fn whitening_minimises_the_error_on_the_inputs_and_full_rank_is_exact() {
        let (out, inp, n) = (6, 5, 40);
        let w = random(out * inp, 11);
        // Inputs of very unequal scales per coordinate, as activations are.
        let x: Vec<f64> = random(n * inp, 12)
            .iter()
            .enumerate()
            .map(|(i, v)| v * [5.0, 0.1, 1.0, 0.01, 2.0][i % inp])
            .collect();
        let mut c = vec![0.0; inp * inp];
        for t in 0..n {
            for i in 0..inp {
                for j in 0..inp {
                    c[i * inp + j] += x[t * inp + i] * x[t * inp + j];
                }
            }
        }
        let s = cholesky_damped(&c, inp, 1e-12);
        let on_inputs = |p: &[f64]| -> f64 {
            (0..n)
                .flat_map(|t| (0..out).map(move |o| (t, o)))
                .map(|(t, o)| {
                    (0..inp)
                        .map(|k| (w[o * inp + k] - p[o * inp + k]) * x[t * inp + k])
                        .sum::<f64>()
                        .powi(2)
                })
                .sum()
        };
        let (full, _) = factorise_whitened(&w, out, inp, &s, Rank::Fixed(inp));
        assert!(on_inputs(&product(&full, out, inp)) < 1e-12);
        let (white, _) = factorise_whitened(&w, out, inp, &s, Rank::Fixed(2));
        let (plain, _) = factorise(&w, out, inp, Rank::Fixed(2));
        let (a, b) = (
            on_inputs(&product(&white, out, inp)),
            on_inputs(&product(&plain, out, inp)),
        );
        assert!(a < 0.5 * b, "whitened {a} vs plain {b}");
    }

    #[test]
    fn truncation_error_is_the_dropped_energy() {
        // Eckart–Young: the best rank-r error in Frobenius norm² is Σ_{i>r} σᵢ².
        let (out, inp) = (9, 6);
        let w = random(out * inp, 3);
        let (f, energy) = factorise(&w, out, inp, Rank::Fixed(2));
        let p = product(&f, out, inp);
        let err: f64 = p.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum();
        let dropped: f64 = energy[2..].iter().sum();
        assert!((err - dropped).abs() < 1e-9 * dropped, "{err} vs {dropped}");
        assert_eq!(rank_for_energy(&energy, 1.0), 6);
        let r = rank_for_energy(&energy, 0.5);
        let kept: f64 = energy[..r].iter().sum();
        let total: f64 = energy.iter().sum();
        let before: f64 = energy[..r - 1].iter().sum();
        assert!(kept >= 0.5 * total && (r == 1 || before < 0.5 * total));
    }
}
