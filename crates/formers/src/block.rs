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

    /// Applies the block to `x [b, n, d]`: `caches` are what the token mixer continues
    /// ([`TokenMixer::mix`]), `rng` turns dropout on (training).
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &MixCtx,
        caches: &mut [&mut MixerCache],
        mut rng: Option<&mut Rng>,
    ) -> Result<BlockOut> {
        let mut drop = |t: Tensor| dropout(t, self.dropout, rng.as_deref_mut());
        let mut values = None;
        let mut mix = |h: &Tensor| -> Result<Tensor> {
            let mixed = self.mixer.mix(h, ctx, caches)?;
            values = mixed.values;
            Ok(mixed.y)
        };
        let (ffn_input, out) = match self.placement {
            Placement::Pre => {
                let x = (x + drop(mix(&self.norm1.forward(x)?)?)?)?;
                let h = self.norm2.forward(&x)?;
                let out = (&x + drop(self.ffn.forward(&h)?)?)?;
                (h, out)
            }
            Placement::Post => {
                let x = self.norm1.forward(&(x + drop(mix(x)?)?)?)?;
                let out = self.norm2.forward(&(&x + drop(self.ffn.forward(&x)?)?)?)?;
                (x, out)
            }
        };
        Ok(BlockOut {
            out,
            ffn_input,
            values,
        })
    }
}

/// What a block returns.
#[derive(Debug, Clone)]
pub struct BlockOut {
    /// The block's output `[b, n, d]`.
    pub out: Tensor,
    /// What the channel mixer read (the calibration of data-aware compression).
    pub ffn_input: Tensor,
    /// The token mixer's values for the value residual ([`crate::mixer::Mixed::values`]).
    pub values: Option<Tensor>,
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
            check_grad(&p, &x, |x| {
                Ok(block.forward(x, &MixCtx::default(), &mut [], None)?.out)
            });
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
