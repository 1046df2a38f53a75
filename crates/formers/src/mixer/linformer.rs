//! Linformer (Wang et al. 2020, "Self-Attention with Linear Complexity"): keys and values
//! are projected along the sequence to `k` rows by learned `E, F : [k, max_len]` (shared by
//! all heads), so attention costs O(n·k). Bidirectional only.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::heads::{HeadKernel, MultiHead, Projections};
use super::softmax::{attend, AttendOpts};
use super::kind::{Capabilities, MixCtx, MixerCache, MixerDims, MixerKind, TokenMixer, keep_mask, no_cache, positive};
use crate::params::INIT_STD;
use crate::params::{Init, Params};
use crate::Result;

/// Config of Linformer attention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinformerSpec {
    /// Rows keys and values are projected to.
    pub k: usize,
    /// One projection shared by all heads (else one per head).
    #[serde(default = "super::kind::yes")]
    pub shared: bool,
    /// Query and key chunk of the softmax over the projected keys.
    #[serde(default = "super::attention::default_chunk")]
    pub chunk: usize,
    /// Biases on the projections.
    #[serde(default = "super::kind::yes")]
    pub bias: bool,
}

impl LinformerSpec {
    /// A small per-head spec (what tests sweep over).
    pub fn example() -> Self {
        LinformerSpec {
            k: 3,
            shared: false,
            chunk: 2,
            bias: true,
        }
    }
}

impl MixerKind for LinformerSpec {
    fn name(&self) -> &'static str {
        "linformer"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            causal: false,
            alibi: false,
            rope: true,
        }
    }

    fn validate(&self, at: &str, _dims: &MixerDims) -> Result<()> {
        positive(at, &[("k", self.k), ("chunk", self.chunk)])
    }

    fn build(&self, dims: &MixerDims, p: &Params) -> Result<Box<dyn TokenMixer>> {
        let heads = (!self.shared).then_some(dims.n_heads);
        let kernel = LinformerKernel {
            proj: LinformerProj::new(p, self.k, dims.max_len, heads)?,
            chunk: self.chunk,
            inference: !p.is_trainable(),
        };
        MultiHead::boxed(dims, p, Projections::plain(self.bias), kernel)
    }

    fn flops_per_token(&self, dims: &MixerDims, _n: usize) -> f64 {
        let (k, d) = (self.k as f64, dims.d_model as f64);
        // E·K and F·V (k × n by n × d, amortised per token), then attention over k keys.
        Projections::plain(self.bias).flops_per_token(dims.d_model) + 2.0 * 2.0 * k * d + 4.0 * k * d
    }

    fn param_count(&self, dims: &MixerDims) -> u128 {
        let copies = if self.shared { 1 } else { dims.n_heads as u128 };
        let proj = 2 * copies
            .saturating_mul(self.k as u128)
            .saturating_mul(dims.max_len as u128);
        Projections::plain(self.bias)
            .param_count(dims)
            .saturating_add(proj)
    }

    fn saved_per_token(&self, dims: &MixerDims, _n: usize) -> u128 {
        // Scores and probabilities of the k projected keys, per head.
        8 * dims.d_model as u128 + 2 * (dims.n_heads as u128).saturating_mul(self.k as u128)
    }
}

/// Softmax attention over keys and values projected along the sequence.
#[derive(Debug, Clone)]
pub struct LinformerKernel {
    /// The sequence projections.
    pub proj: LinformerProj,
    /// Query and key chunk of the softmax.
    pub chunk: usize,
    /// Built for inference.
    pub inference: bool,
}

impl HeadKernel for LinformerKernel {
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
    ) -> Result<Tensor> {
        if cache.is_some() {
            return Err(no_cache("Linformer"));
        }
        let keep = keep_mask(ctx.key_bias, k.dtype())?;
        let (k, v) = self.proj.project(k, v, keep.as_ref())?;
        let opts = AttendOpts {
            q_chunk: self.chunk,
            k_chunk: self.chunk,
            inference: self.inference,
            ..Default::default()
        };
        attend(q, &k, &v, &opts)
    }
}

/// The sequence projections of keys (`e`) and values (`f`): `[k, max_len]` shared by all
/// heads, or `[heads, k, max_len]`.
#[derive(Debug, Clone)]
pub struct LinformerProj {
    pub e: Tensor,
    pub f: Tensor,
}

impl LinformerProj {
    /// Parameters `proj_k`, `proj_v` under `p`; one pair per head when `heads` is given.
    pub fn new(p: &Params, k: usize, max_len: usize, heads: Option<usize>) -> Result<Self> {
        let std = (1.0 / k as f64).sqrt().max(INIT_STD);
        let shape: Vec<usize> = match heads {
            Some(h) => vec![h, k, max_len],
            None => vec![k, max_len],
        };
        Ok(LinformerProj {
            e: p.get(&shape, "proj_k.weight", Init::Normal(std))?,
            f: p.get(&shape, "proj_v.weight", Init::Normal(std))?,
        })
    }

    /// `(E[:, :n] · keys, F[:, :n] · values)` for `[b, h, n, dh]` inputs; padded positions
    /// (`keep [b, 1, n, 1]` zero) are dropped before projecting.
    pub fn project(
        &self,
        k: &Tensor,
        v: &Tensor,
        keep: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let (k, v) = match keep {
            Some(m) => (k.broadcast_mul(m)?, v.broadcast_mul(m)?),
            None => (k.clone(), v.clone()),
        };
        let last = self.e.rank() - 1;
        let e = self.e.narrow(last, 0, n)?.contiguous()?;
        let f = self.f.narrow(last, 0, n)?.contiguous()?;
        Ok((e.broadcast_matmul(&k)?, f.broadcast_matmul(&v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::attention::AttentionSpec;
    use crate::testutil::{max_rel, randn};
    use candle_core::{DType, Device};

    #[test]
    fn identity_projections_with_k_equal_to_n_give_full_attention() {
        let n = 7;
        let dims = MixerDims {
            d_model: 8,
            n_heads: 2,
            max_len: n,
            causal: false,
        };
        let full_p = Params::new(3, DType::F64, &Device::Cpu);
        let full = AttentionSpec {
            q_chunk: 4,
            k_chunk: 4,
            ..AttentionSpec::default()
        }
        .build(&dims, &full_p)
        .unwrap();
        let lin_p = Params::new(3, DType::F64, &Device::Cpu);
        let spec = LinformerSpec {
            k: n,
            shared: true,
            chunk: 3,
            bias: true,
        };
        let lin = spec.build(&dims, &lin_p).unwrap();
        let eye = Tensor::eye(n, DType::F64, &Device::Cpu).unwrap();
        let same = full_p.tensors();
        for (name, var) in lin_p.vars() {
            match same.get(&name) {
                Some(t) => var.set(t).unwrap(),
                None => var.set(&eye).unwrap(),
            }
        }
        let x = randn(&[2, n, 8], 5);
        let a = full.forward(&x, &MixCtx::default(), None).unwrap();
        let b = lin.forward(&x, &MixCtx::default(), None).unwrap();
        // Exact in f64: the same sums in a different order.
        assert!(max_rel(&b, &a) < 1e-10, "{}", max_rel(&b, &a));
    }
}
