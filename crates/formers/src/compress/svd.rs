//! Truncated SVD of a weight matrix as the two factors of a low-rank layer, through the
//! symmetric eigenproblem of its smaller Gram matrix (cyclic Jacobi, f64).
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
