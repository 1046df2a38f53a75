//! Linear attention: `softmax(q kᵀ)` replaced by `φ(q) φ(k)ᵀ` with a positive feature map,
//! so `(φ(k)ᵀ v)` is computed once and cost is O(n). Feature maps: elu(x) + 1
//! (Katharopoulos et al. 2020, "Transformers are RNNs") and FAVOR+ positive orthogonal
//! random features (Performer, Choromanski et al. 2021). Causal attention runs as a
//! blockwise prefix sum whose state `(S = Σ φ(k)ᵀv, z = Σ φ(k))` is also the O(1)-per-token
//! decoding cache.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::heads::{HeadKernel, MultiHead, Projections};
use super::kind::{Capabilities, MixCtx, MixerCache, MixerDims, MixerKind, TokenMixer, positive};
use crate::params::Params;
use crate::rng::Rng;
use crate::Result;

/// Config of linear attention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinearSpec {
    /// The feature map.
    pub feature: FeatureMap,
    /// Random features per head (`favor` only).
    #[serde(default = "default_features")]
    pub features: usize,
    /// Seed of the random features (`favor` only).
    #[serde(default)]
    pub seed: u64,
    /// Tokens per block of the causal prefix sum.
    #[serde(default = "default_chunk")]
    pub chunk: usize,
    /// Biases on the projections.
    #[serde(default = "super::kind::yes")]
    pub bias: bool,
}

fn default_features() -> usize {
    64
}

fn default_chunk() -> usize {
    64
}

/// Feature maps of linear attention.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMap {
    /// elu(x) + 1.
    Elu,
    /// Positive orthogonal random features approximating the softmax kernel.
    Favor,
}

impl LinearSpec {
    /// A small FAVOR+ spec (what tests sweep over).
    pub fn example() -> Self {
        LinearSpec {
            feature: FeatureMap::Favor,
            features: 8,
            seed: 1,
            chunk: 2,
            bias: true,
        }
    }
}

impl MixerKind for LinearSpec {
    fn name(&self) -> &'static str {
        "linear"
    }

    /// The state `S = Σ φ(k)ᵀv` and `z = Σ φ(k)` of every head, whatever `n`.
    fn cache_values(&self, dims: &MixerDims, _n: usize) -> u128 {
        let dh = dims.head_dim() as u128;
        let features = match self.feature {
            FeatureMap::Elu => dh,
            FeatureMap::Favor => self.features as u128,
        };
        (dims.n_heads as u128).saturating_mul(features.saturating_mul(dh + 1))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            causal: true,
            alibi: false,
            rope: true,
        }
    }

    fn validate(&self, at: &str, _dims: &MixerDims) -> Result<()> {
        positive(at, &[("features", self.features), ("chunk", self.chunk)])
    }

    fn build(&self, dims: &MixerDims, p: &Params) -> Result<Box<dyn TokenMixer>> {
        let kernel = LinearKernel::new(
            self.feature,
            self.features,
            self.seed,
            dims.head_dim(),
            self.chunk,
            p.dtype(),
            p.device(),
        )?;
        MultiHead::boxed(dims, p, Projections::plain(self.bias), LinearHeads {
                kernel,
                causal: dims.causal,
            })
    }

    fn flops_per_token(&self, dims: &MixerDims, _n: usize) -> f64 {
        let (d, head_dim) = (dims.d_model as f64, dims.head_dim() as f64);
        let m = match self.feature {
            FeatureMap::Elu => head_dim,
            FeatureMap::Favor => self.features as f64,
        };
        // φ(k)ᵀv and φ(q)·(φ(k)ᵀv) per head (m × head_dim each), plus the normaliser;
        // FAVOR+ also projects q and k onto m random features.
        let feature_map = match self.feature {
            FeatureMap::Elu => 0.0,
            FeatureMap::Favor => 2.0 * 2.0 * m * d,
        };
        Projections::plain(self.bias).flops_per_token(dims.d_model)
            + 4.0 * m * d
            + 4.0 * m * d / head_dim
            + feature_map
    }

    fn param_count(&self, dims: &MixerDims) -> u128 {
        // The random features are drawn from `seed`, not learned.
        Projections::plain(self.bias).param_count(dims)
    }
}

/// [`LinearKernel`] as the kernel of the multi-head shell.
#[derive(Debug, Clone)]
struct LinearHeads {
    kernel: LinearKernel,
    causal: bool,
}

impl HeadKernel for LinearHeads {
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        self.kernel.mix(q, k, v, self.causal, ctx.key_bias, cache)
    }
}

/// A feature map and, for FAVOR+, its fixed random projection `[features, head_dim]`.
#[derive(Debug, Clone)]
pub struct LinearKernel {
    feature: FeatureMap,
    omega: Option<Tensor>,
    chunk: usize,
}

impl LinearKernel {
    /// A kernel for heads of width `head_dim`; FAVOR+ draws `features` rows from `seed`.
    pub fn new(
        feature: FeatureMap,
        features: usize,
        seed: u64,
        head_dim: usize,
        chunk: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let omega = match feature {
            FeatureMap::Elu => None,
            FeatureMap::Favor => {
                let w = orthogonal_gaussian(features, head_dim, &mut Rng::new(seed));
                Some(Tensor::from_vec(w, (features, head_dim), device)?.to_dtype(dtype)?)
            }
        };
        Ok(LinearKernel {
            feature,
            omega,
            chunk: chunk.max(1),
        })
    }

    /// `φ(x)` for `x [b, h, n, dh]` → `[b, h, n, f]`.
    ///
    /// FAVOR+: `exp(ω·x' − |x'|²/2) / sqrt(f)` with `x' = x / dh^¼`, so that
    /// `E[φ(q)·φ(k)] = exp(q·k / sqrt(dh))`. Queries subtract their row max (it cancels in
    /// the normalisation); keys subtract nothing, so states from different calls add up.
    pub fn phi(&self, x: &Tensor, query: bool) -> Result<Tensor> {
        match (&self.feature, &self.omega) {
            (FeatureMap::Elu, _) => Ok((x.elu(1.0)? + 1.0)?),
            (FeatureMap::Favor, Some(omega)) => {
                let dh = x.dim(D::Minus1)?;
                let f = omega.dim(0)?;
                let xs = (x * (dh as f64).powf(-0.25))?;
                let proj = xs.broadcast_matmul(&omega.t()?)?;
                let half_sq = (xs.sqr()?.sum_keepdim(D::Minus1)? * 0.5)?;
                let mut e = proj.broadcast_sub(&half_sq)?;
                if query {
                    e = e.broadcast_sub(&e.max_keepdim(D::Minus1)?.detach())?;
                }
                Ok((e.exp()? / (f as f64).sqrt())?)
            }
            (FeatureMap::Favor, None) => unreachable!("FAVOR+ kernels are built with features"),
        }
    }

    /// Linear attention of `q [b, h, n, dh]` over `k, v [b, h, n, dh]`. With `cache`
    /// (causal only) the sequence continues the state the cache holds.
    pub fn mix(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        key_bias: Option<&Tensor>,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        let fq = self.phi(q, true)?;
        let mut fk = self.phi(k, false)?;
        // Padded keys contribute no features at all.
        if let Some(keep) = super::kind::keep_mask(key_bias, fk.dtype())? {
            fk = fk.broadcast_mul(&keep)?;
        }
        if !causal {
            if cache.is_some() {
                return Err(super::kind::no_cache("bidirectional linear attention"));
            }
            let kv = fk.t()?.matmul(v)?;
            let z = fk.sum_keepdim(2)?;
            let num = fq.matmul(&kv)?;
            let den = fq.broadcast_mul(&z)?.sum_keepdim(D::Minus1)?;
            return Ok(num.broadcast_div(&den)?);
        }
        let (b, h, n, dh) = v.dims4()?;
        let f = fq.dim(D::Minus1)?;
        let (mut s, mut z) = match cache.as_deref().map(|c| c.tensors.as_slice()) {
            Some([s, z]) => (s.clone(), z.clone()),
            _ => (
                Tensor::zeros((b, h, f, dh), v.dtype(), v.device())?,
                Tensor::zeros((b, h, 1, f), v.dtype(), v.device())?,
            ),
        };
        let mut outs = Vec::with_capacity(n.div_ceil(self.chunk));
        for start in (0..n).step_by(self.chunk) {
            let c = self.chunk.min(n - start);
            let (qc, kc, vc) = (
                fq.narrow(2, start, c)?,
                fk.narrow(2, start, c)?,
                v.narrow(2, start, c)?,
            );
            let a = qc
                .matmul(&kc.t()?)?
                .broadcast_mul(&lower_triangle(c, &qc)?)?;
            let num = (a.matmul(&vc)? + qc.matmul(&s)?)?;
            let den =
                (a.sum_keepdim(D::Minus1)? + qc.broadcast_mul(&z)?.sum_keepdim(D::Minus1)?)?;
            outs.push(num.broadcast_div(&den)?);
            s = (s + kc.t()?.matmul(&vc)?)?;
            z = (z + kc.sum_keepdim(2)?)?;
        }
        if let Some(cache) = cache {
            cache.tensors = vec![s, z];
        }
        Ok(Tensor::cat(&outs, 2)?)
    }
}

/// `[c, c]` with ones on and below the diagonal.
fn lower_triangle(c: usize, like: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = (0..c)
        .flat_map(|i| (0..c).map(move |j| if j <= i { 1.0 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (c, c), like.device())?.to_dtype(like.dtype())?)
}

/// `rows × dim` Gaussian rows, orthogonal within each block of `dim` rows, each scaled to
/// the norm of an independent Gaussian vector (Performer's orthogonal random features).
fn orthogonal_gaussian(rows: usize, dim: usize, rng: &mut Rng) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows * dim);
    while out.len() < rows * dim {
        let mut block: Vec<Vec<f64>> = Vec::with_capacity(dim);
        for _ in 0..dim {
            let mut r: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
            for b in &block {
                let dot: f64 = r.iter().zip(b).map(|(x, y)| x * y).sum();
                r.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
            }
            let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            r.iter_mut().for_each(|x| *x /= norm);
            block.push(r);
        }
        for r in block {
            let chi = (0..dim).map(|_| rng.normal().powi(2)).sum::<f64>().sqrt();
            out.extend(r.iter().map(|x| x * chi));
        }
    }
    out.truncate(rows * dim);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::softmax::reference_attend;
    use crate::testutil::{max_rel, randn};
    use candle_core::Var;

    fn elu() -> LinearKernel {
        LinearKernel::new(FeatureMap::Elu, 0, 0, 4, 3, DType::F64, &Device::Cpu).unwrap()
    }

    /// The quadratic reference: weights `φ(q_i)·φ(k_j)` (masked when causal), normalised.
    fn reference(
        kernel: &LinearKernel,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
    ) -> Tensor {
        let w = kernel
            .phi(q, true)
            .unwrap()
            .matmul(&kernel.phi(k, false).unwrap().t().unwrap())
            .unwrap();
        let n = q.dim(2).unwrap();
        let w = if causal {
            w.broadcast_mul(&lower_triangle(n, &w).unwrap()).unwrap()
        } else {
            w
        };
        w.matmul(v)
            .unwrap()
            .broadcast_div(&w.sum_keepdim(3).unwrap())
            .unwrap()
    }

    #[test]
    fn blockwise_forms_equal_the_quadratic_reference_values_and_gradients() {
        for causal in [false, true] {
            for chunk in [1, 3, 10] {
                let kernel = LinearKernel { chunk, ..elu() };
                let q = Var::from_tensor(&randn(&[2, 2, 10, 4], 1)).unwrap();
                let k = Var::from_tensor(&randn(&[2, 2, 10, 4], 2)).unwrap();
                let v = Var::from_tensor(&randn(&[2, 2, 10, 4], 3)).unwrap();
                let fast = kernel.mix(&q, &k, &v, causal, None, None).unwrap();
                let slow = reference(&kernel, &q, &k, &v, causal);
                assert!(
                    max_rel(&fast, &slow) < 1e-10,
                    "causal={causal} chunk={chunk}"
                );
                let r = randn(&[2, 2, 10, 4], 4);
                let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for var in [&q, &k, &v] {
                    assert!(max_rel(gf.get(var).unwrap(), gs.get(var).unwrap()) < 1e-10);
                }
            }
        }
    }

    #[test]
    fn recurrent_decoding_equals_the_prefix_sum_form_token_by_token() {
        for feature in [FeatureMap::Elu, FeatureMap::Favor] {
            let kernel = LinearKernel::new(feature, 16, 3, 4, 4, DType::F64, &Device::Cpu).unwrap();
            let (q, k, v) = (
                randn(&[1, 2, 9, 4], 5),
                randn(&[1, 2, 9, 4], 6),
                randn(&[1, 2, 9, 4], 7),
            );
            let whole = kernel.mix(&q, &k, &v, true, None, None).unwrap();
            let mut cache = MixerCache::default();
            for t in 0..9 {
                let one = |x: &Tensor| x.narrow(2, t, 1).unwrap();
                let y = kernel
                    .mix(&one(&q), &one(&k), &one(&v), true, None, Some(&mut cache))
                    .unwrap();
                assert!(max_rel(&y, &one(&whole)) < 1e-10, "{feature:?} token {t}");
            }
        }
    }

    #[test]
    fn favor_error_falls_as_features_grow() {
        // Small-norm queries and keys keep the softmax kernel in FAVOR+'s accurate regime;
        // the estimate is unbiased, so its error shrinks roughly as 1/sqrt(features).
        let (q, k, v) = (
            (randn(&[1, 4, 64, 16], 8) * 0.5).unwrap(),
            (randn(&[1, 4, 64, 16], 9) * 0.5).unwrap(),
            randn(&[1, 4, 64, 16], 10),
        );
        let exact = reference_attend(&q, &k, &v, false, 0, None).unwrap();
        let err = |features: usize| {
            let mean: f64 = (0..3)
                .map(|seed| {
                    let kernel = LinearKernel::new(
                        FeatureMap::Favor,
                        features,
                        seed,
                        16,
                        64,
                        DType::F64,
                        &Device::Cpu,
                    )
                    .unwrap();
                    let y = kernel.mix(&q, &k, &v, false, None, None).unwrap();
                    (y - &exact)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .mean_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                })
                .sum();
            mean / 3.0
        };
        let (e16, e256, e2048) = (err(16), err(256), err(2048));
        eprintln!("FAVOR+ mean abs error vs softmax: 16 features {e16:.4}, 256 {e256:.4}, 2048 {e2048:.4}");
        assert!(e16 > e256 && e256 > e2048, "{e16} {e256} {e2048}");
        assert!(e2048 < 0.02, "mean abs error with 2048 features: {e2048}");
    }

    #[test]
    fn padded_keys_are_ignored() {
        let kernel = elu();
        let (q, k, v) = (
            randn(&[1, 1, 6, 4], 11),
            randn(&[1, 1, 6, 4], 12),
            randn(&[1, 1, 6, 4], 13),
        );
        let bias: Vec<f64> = (0..6)
            .map(|j| if j < 4 { 0.0 } else { super::super::MASKED })
            .collect();
        let kb = Tensor::from_vec(bias, (1, 1, 1, 6), &Device::Cpu).unwrap();
        let masked = kernel.mix(&q, &k, &v, false, Some(&kb), None).unwrap();
        let cut = |x: &Tensor| x.narrow(2, 0, 4).unwrap();
        let short = kernel
            .mix(&q, &cut(&k), &cut(&v), false, None, None)
            .unwrap();
        assert!(max_rel(&masked, &short) < 1e-10);
    }
}
