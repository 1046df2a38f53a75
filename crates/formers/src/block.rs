//! The MetaFormer block (Yu et al. 2022): norm → token mixer → residual → norm →
//! channel mixer → residual, with pre- or post-norm placement.

use candle_core::Tensor;

use crate::config::{LayerSpec, ModelConfig, Placement};
use crate::ffn::{self, ChannelMixer};
use crate::mixer::{MixCtx, MixerCache, TokenMixer};
use crate::norm::Norm;
use crate::params::Params;
use crate::rng::Rng;
use crate::Result;

/// One layer of the stack.
#[derive(Debug)]
pub struct Block {
    norm1: Norm,
    mixer: Box<dyn TokenMixer>,
    norm2: Norm,
    ffn: Box<dyn ChannelMixer>,
    placement: Placement,
    dropout: f32,
}

impl Block {
    /// A block of `spec` with parameters `norm1`, `mixer`, `norm2`, `ffn` under `p`.
    pub fn new(spec: &LayerSpec, cfg: &ModelConfig, p: &Params) -> Result<Self> {
        Ok(Block {
            norm1: Norm::new(&spec.norm, &p.pp("norm1"), cfg.d_model)?,
            mixer: spec.mixer.build(&cfg.mixer_dims(), &p.pp("mixer"))?,
            norm2: Norm::new(&spec.norm, &p.pp("norm2"), cfg.d_model)?,
            ffn: ffn::build(&spec.ffn, cfg.d_model, &p.pp("ffn"))?,
            placement: spec.placement,
            dropout: spec.dropout,
        })
    }

    /// The channel mixer.
    pub fn ffn(&self) -> &dyn ChannelMixer {
        self.ffn.as_ref()
    }

    /// Applies the block to `x [b, n, d]`; `rng` turns dropout on (training).
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &MixCtx,
        cache: Option<&mut MixerCache>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        self.apply(x, |h| self.mixer.forward(h, ctx, cache), rng)
    }

    /// One decoding step over packed independent sequences, each with its own cache and
    /// context ([`TokenMixer::forward_cached_packed`]); no dropout.
    pub fn forward_cached_packed(
        &self,
        x: &Tensor,
        segments: &[(usize, usize)],
        ctxs: &[MixCtx],
        caches: &mut [&mut MixerCache],
    ) -> Result<Tensor> {
        self.apply(
            x,
            |h| self.mixer.forward_cached_packed(h, segments, ctxs, caches),
            None,
        )
    }

    /// [`Block::forward`] without a cache or dropout, also returning what the channel mixer
    /// read: `(ffn input, output)`, for calibrating compression.
    pub(crate) fn forward_traced(&self, x: &Tensor, ctx: &MixCtx) -> Result<(Tensor, Tensor)> {
        self.apply_traced(x, |h| self.mixer.forward(h, ctx, None), None)
    }

    /// The block around the token mixer `mix`.
    fn apply(
        &self,
        x: &Tensor,
        mix: impl FnOnce(&Tensor) -> Result<Tensor>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        Ok(self.apply_traced(x, mix, rng)?.1)
    }

    /// [`Block::apply`], returning the channel mixer's input beside the output.
    fn apply_traced(
        &self,
        x: &Tensor,
        mix: impl FnOnce(&Tensor) -> Result<Tensor>,
        mut rng: Option<&mut Rng>,
    ) -> Result<(Tensor, Tensor)> {
        let mut drop = |t: Tensor| dropout(t, self.dropout, rng.as_deref_mut());
        match self.placement {
            Placement::Pre => {
                let x = (x + drop(mix(&self.norm1.forward(x)?)?)?)?;
                let h = self.norm2.forward(&x)?;
                let out = (&x + drop(self.ffn.forward(&h)?)?)?;
                Ok((h, out))
            }
            Placement::Post => {
                let x = self.norm1.forward(&(x + drop(mix(x)?)?)?)?;
                let out = self.norm2.forward(&(&x + drop(self.ffn.forward(&x)?)?)?)?;
                Ok((x, out))
            }
        }
    }
}

/// Inverted dropout with a seeded mask; identity without `rng` or with `p == 0`.
pub fn dropout(x: Tensor, p: f32, rng: Option<&mut Rng>) -> Result<Tensor> {
    let Some(rng) = rng else { return Ok(x) };
    if p <= 0.0 {
        return Ok(x);
    }
    let keep = 1.0 / (1.0 - p as f64);
    let mask: Vec<f64> = (0..x.elem_count())
        .map(|_| if rng.uniform() < p as f64 { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, randn};
    use candle_core::{DType, Device};

    fn cfg(placement: &str, causal: bool) -> ModelConfig {
        ModelConfig::from_json(&format!(
            r#"{{"d_model": 8, "n_heads": 2, "n_layers": 1, "input": {{"kind": "bytes"}}, "head": {{"kind": "lm"}}, "causal": {causal},
               "defaults": {{"placement": "{placement}", "mixer": {{"kind": "attention", "q_chunk": 2, "k_chunk": 3}},
                             "ffn": {{"kind": "mlp", "hidden": 12, "activation": "swiglu"}}, "norm": {{"kind": "rms_norm"}}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn block_gradients_match_finite_differences() {
        for (placement, causal) in [("pre", true), ("post", false)] {
            let cfg = cfg(placement, causal);
            let p = Params::new(4, DType::F64, &Device::Cpu);
            let block = Block::new(&cfg.layer(0), &cfg, &p).unwrap();
            let x = randn(&[2, 4, 8], 1);
            check_grad(&p, &x, |x| block.forward(x, &MixCtx::default(), None, None));
        }
    }

    #[test]
    fn dropout_keeps_expectation_and_is_seeded() {
        let x = Tensor::ones(10_000, DType::F64, &Device::Cpu).unwrap();
        let a = dropout(x.clone(), 0.25, Some(&mut Rng::new(1))).unwrap();
        let b = dropout(x.clone(), 0.25, Some(&mut Rng::new(1))).unwrap();
        assert_eq!(a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
        let mean = a.mean_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        let zeros = a
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .filter(|v| **v == 0.0)
            .count();
        assert!((2200..2800).contains(&zeros), "{zeros}");
    }
}
