//! Flow-Attention (Flowformer, Wu et al. 2022, "Linearizing Transformers with
//! Conservation Flows"): linear attention with sigmoid features whose incoming and
//! outgoing flows are normalised (conservation), with competition among sources (a softmax
//! over keys) and allocation to sinks (a sigmoid gate). Bidirectional, O(n).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::heads::{HeadKernel, MultiHead, Projections};
use super::kind::{Capabilities, MixCtx, MixerCache, MixerDims, MixerKind, TokenMixer, keep_mask, no_cache};
use crate::params::Params;
use crate::Result;

/// Config of Flow-Attention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    /// Biases on the projections.
    #[serde(default = "super::kind::yes")]
    pub bias: bool,
}

impl FlowSpec {
    /// The spec tests sweep over.
    pub fn example() -> Self {
        FlowSpec { bias: true }
    }
}

impl MixerKind for FlowSpec {
    fn name(&self) -> &'static str {
        "flow"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            causal: false,
            alibi: false,
            rope: true,
        }
    }

    fn validate(&self, _at: &str, _dims: &MixerDims) -> Result<()> {
        Ok(())
    }

    fn build(&self, dims: &MixerDims, p: &Params) -> Result<Box<dyn TokenMixer>> {
        MultiHead::boxed(dims, p, Projections::plain(self.bias), FlowKernel)
    }

    fn flops_per_token(&self, dims: &MixerDims, _n: usize) -> f64 {
        let d = dims.d_model as f64;
        // Linear attention with sigmoid features plus incoming/outgoing flow sums.
        Projections::plain(self.bias).flops_per_token(dims.d_model)
            + 4.0 * dims.head_dim() as f64 * d
            + 8.0 * d
    }

    fn param_count(&self, dims: &MixerDims) -> u128 {
        Projections::plain(self.bias).param_count(dims)
    }
}

/// [`attend_flow`] as the kernel of the multi-head shell.
#[derive(Debug, Clone)]
struct FlowKernel;

impl HeadKernel for FlowKernel {
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        if cache.is_some() {
            return Err(no_cache("Flow-Attention"));
        }
        let keep = keep_mask(ctx.key_bias, k.dtype())?;
        attend_flow(q, k, v, keep.as_ref())
    }
}

const EPS: f64 = 1e-6;

/// `Σ_d a[.., l, d] · b[.., d]` → `[.., l]` for `a [b, h, l, d]`, `b [b, h, d]`.
fn dot_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.broadcast_mul(&b.unsqueeze(2)?)?.sum(D::Minus1)?)
}

/// Flow-Attention of `q [b, h, n, dh]` over `k, v [b, h, n, dh]` (self-attention);
/// `keep [b, 1, n, 1]` (1 = token, 0 = padding) removes padded positions as sources and
/// sinks, so a padded sequence gives the same outputs as the unpadded one.
pub fn attend_flow(q: &Tensor, k: &Tensor, v: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
    let mut q = candle_nn::ops::sigmoid(q)?;
    let mut k = candle_nn::ops::sigmoid(k)?;
    // Real sinks n and sources m per sequence, `[b, 1, 1]`.
    let (n, m) = match keep {
        Some(keep) => {
            q = q.broadcast_mul(keep)?;
            k = k.broadcast_mul(keep)?;
            let count = keep.sum(2)?;
            (count.clone(), count)
        }
        None => {
            let b = q.dim(0)?;
            let ones = Tensor::ones((b, 1, 1), q.dtype(), q.device())?;
            ((&ones * q.dim(2)? as f64)?, (ones * k.dim(2)? as f64)?)
        }
    };
    // Incoming flow of each sink (query) and outgoing flow of each source (key).
    let incoming = dot_rows(&(&q + EPS)?, &(k.sum(2)? + EPS)?)?.recip()?;
    let outgoing = dot_rows(&(&k + EPS)?, &(q.sum(2)? + EPS)?)?.recip()?;
    // Conservation: the flows after normalising the other side.
    let conserved_sink = dot_rows(
        &(&q + EPS)?,
        &(k.broadcast_mul(&outgoing.unsqueeze(3)?)?.sum(2)? + EPS)?,
    )?;
    let conserved_source = dot_rows(
        &(&k + EPS)?,
        &(q.broadcast_mul(&incoming.unsqueeze(3)?)?.sum(2)? + EPS)?,
    )?;
    let mut conserved_source = conserved_source.clamp(-1.0, 1.0)?;
    if let Some(keep) = keep {
        // Padded sources take no share of the competition.
        let pad = ((keep.squeeze(3)? - 1.0)? * 1e4)?;
        conserved_source = conserved_source.broadcast_add(&pad)?;
    }
    // Allocation (sinks) and competition (sources).
    let allocation = candle_nn::ops::sigmoid(&conserved_sink.broadcast_mul(&(n / &m)?)?)?;
    let e = conserved_source
        .broadcast_sub(&conserved_source.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    let competition = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .broadcast_mul(&m)?;
    let kv = k
        .t()?
        .matmul(&v.broadcast_mul(&competition.unsqueeze(3)?)?)?;
    let y = q.matmul(&kv)?;
    Ok(y.broadcast_mul(&(incoming * allocation)?.unsqueeze(3)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use candle_core::Var;

    /// The same formulas with explicit loops over queries and keys (O(n·m)), in f64.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Vec<f64> {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let (b, h, n, dh) = q.dims4().unwrap();
        let m = k.dim(2).unwrap();
        let qv: Vec<f64> = q.flatten_all().unwrap().to_vec1().unwrap();
        let kv: Vec<f64> = k.flatten_all().unwrap().to_vec1().unwrap();
        let vv: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![0.0; b * h * n * dh];
        for bh in 0..b * h {
            let qs: Vec<Vec<f64>> = (0..n)
                .map(|i| (0..dh).map(|d| sig(qv[(bh * n + i) * dh + d])).collect())
                .collect();
            let ks: Vec<Vec<f64>> = (0..m)
                .map(|j| (0..dh).map(|d| sig(kv[(bh * m + j) * dh + d])).collect())
                .collect();
            let dot =
                |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| (x + EPS) * y).sum::<f64>();
            let ksum: Vec<f64> = (0..dh)
                .map(|d| ks.iter().map(|r| r[d]).sum::<f64>() + EPS)
                .collect();
            let qsum: Vec<f64> = (0..dh)
                .map(|d| qs.iter().map(|r| r[d]).sum::<f64>() + EPS)
                .collect();
            let inc: Vec<f64> = qs.iter().map(|r| 1.0 / dot(r, &ksum)).collect();
            let outg: Vec<f64> = ks.iter().map(|r| 1.0 / dot(r, &qsum)).collect();
            let kw: Vec<f64> = (0..dh)
                .map(|d| (0..m).map(|j| ks[j][d] * outg[j]).sum::<f64>() + EPS)
                .collect();
            let qw: Vec<f64> = (0..dh)
                .map(|d| (0..n).map(|i| qs[i][d] * inc[i]).sum::<f64>() + EPS)
                .collect();
            let sink: Vec<f64> = qs.iter().map(|r| dot(r, &kw)).collect();
            let source: Vec<f64> = ks.iter().map(|r| dot(r, &qw).clamp(-1.0, 1.0)).collect();
            let z: f64 = source.iter().map(|s| s.exp()).sum();
            let comp: Vec<f64> = source.iter().map(|s| s.exp() / z * m as f64).collect();
            for i in 0..n {
                let alloc = sig(sink[i] * n as f64 / m as f64);
                for d in 0..dh {
                    let mut acc = 0.0;
                    for j in 0..m {
                        let w: f64 = qs[i].iter().zip(&ks[j]).map(|(a, c)| a * c).sum();
                        acc += w * vv[(bh * m + j) * dh + d] * comp[j];
                    }
                    out[(bh * n + i) * dh + d] = acc * inc[i] * alloc;
                }
            }
        }
        out
    }

    #[test]
    fn linear_form_equals_the_explicit_reference() {
        let (q, k, v) = (
            randn(&[2, 2, 7, 3], 1),
            randn(&[2, 2, 9, 3], 2),
            randn(&[2, 2, 9, 3], 3),
        );
        let got: Vec<f64> = attend_flow(&q, &k, &v, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = reference(&q, &k, &v);
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
        assert!(err / scale < 1e-10, "{err}");
        // Gradients flow to all inputs (finite differences are checked at module level).
        let qv = Var::from_tensor(&q).unwrap();
        let g = attend_flow(&qv, &k, &v, None)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&qv).is_some());
    }

    #[test]
    fn padding_gives_the_outputs_of_the_unpadded_sequence() {
        use crate::testutil::max_abs;
        use candle_core::{DType, Device};
        // Two sequences of 6 and 4 real tokens, both padded to 6.
        let (q, k, v) = (
            randn(&[2, 2, 6, 3], 4),
            randn(&[2, 2, 6, 3], 5),
            randn(&[2, 2, 6, 3], 6),
        );
        let keep = Tensor::from_vec(
            vec![1f64, 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.],
            (2, 1, 6, 1),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
        let padded = attend_flow(&q, &k, &v, Some(&keep)).unwrap();
        for (row, len) in [(0, 6), (1, 4)] {
            let cut = |t: &Tensor| t.narrow(0, row, 1).unwrap().narrow(2, 0, len).unwrap();
            let alone = attend_flow(&cut(&q), &cut(&k), &cut(&v), None).unwrap();
            let err = max_abs(&cut(&padded), &alone);
            assert!(err < 1e-10, "row {row}: {err}");
        }
    }
}
