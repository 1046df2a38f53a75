//! The model: embeddings → positions → blocks → final norm → head.

use candle_core::{DType, Tensor, D};

use crate::block::{dropout, Block};
use crate::config::{HeadSpec, ModelConfig, Pooling};
use crate::linear::{Linear, INIT_STD};
use crate::mixer::{MixCtx, MixerCache, MASKED};
use crate::norm::Norm;
use crate::params::{Init, Params};
use crate::position::Positions;
use crate::rng::Rng;
use crate::{Error, Result};

/// Decoding state: one mixer cache per layer and the number of tokens seen.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    layers: Vec<MixerCache>,
    len: usize,
}

impl Cache {
    /// Tokens held so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug)]
enum Head {
    Lm { untied: Option<Linear> },
    Classification { pooling: Pooling, proj: Linear },
    Embedding,
}

/// A MetaFormer stack built from a [`ModelConfig`].
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed: Tensor,
    positions: Positions,
    blocks: Vec<Block>,
    final_norm: Option<Norm>,
    head: Head,
}

impl Model {
    /// Builds the model with parameters under `p`: `embed.weight`, `pos.weight`,
    /// `layers.{i}.*`, `final_norm.*`, `head.*`.
    pub fn new(cfg: &ModelConfig, p: &Params) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.d_model;
        let vocab = cfg.input.vocab_size();
        let embed = p.get(&[vocab, d], "embed.weight", Init::Normal(INIT_STD))?;
        let positions = Positions::new(cfg, &p.pp("pos"))?;
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(&cfg.layer(i), cfg, &p.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = if cfg.final_norm {
            Some(Norm::new(&cfg.defaults.norm, &p.pp("final_norm"), d)?)
        } else {
            None
        };
        let head = match &cfg.head {
            HeadSpec::Lm { tied: true } => Head::Lm { untied: None },
            HeadSpec::Lm { tied: false } => Head::Lm {
                untied: Some(Linear::new(&p.pp("head"), d, vocab, false)?),
            },
            HeadSpec::Classification { n_classes, pooling } => Head::Classification {
                pooling: *pooling,
                proj: Linear::new(&p.pp("head"), d, *n_classes, true)?,
            },
            HeadSpec::Embedding => Head::Embedding,
        };
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            positions,
            blocks,
            final_norm,
            head,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The head's output for token ids `[b, n]` (u32): LM logits `[b, n, vocab]`,
    /// class logits `[b, classes]` or embeddings `[b, d]`. `mask [b, n]` is 1 for tokens
    /// and 0 for padding; `rng` turns dropout on.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let h = self.hidden(ids, mask, None, rng)?;
        self.head(&h, mask)
    }

    /// LM logits `[b, n, vocab]` of `ids`, which continue the sequence held in `cache`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        if !matches!(self.head, Head::Lm { .. }) {
            return Err(Error::Input(
                "decoding needs a model with an `lm` head".into(),
            ));
        }
        let h = self.hidden(ids, None, Some(cache), None)?;
        self.head(&h, None)
    }

    /// Final hidden states `[b, n, d]`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if offset + n > self.cfg.max_len {
            return Err(Error::Input(format!(
                "sequence of {} tokens is longer than the model's max_len {}",
                offset + n,
                self.cfg.max_len
            )));
        }
        let x =
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, n, self.cfg.d_model))?;
        let x = self.positions.add(&x, offset)?;
        let mut x = dropout(x, self.cfg.embed_dropout, rng.as_deref_mut())?;
        let key_bias = match mask {
            Some(m) => Some(((1.0 - m.to_dtype(x.dtype())?)? * MASKED)?.reshape((b, 1, 1, n))?),
            None => None,
        };
        let ctx = MixCtx {
            key_bias: key_bias.as_ref(),
            offset,
            rope: self.positions.rope(),
        };
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.blocks.len(), MixerCache::default);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, &ctx, layer_cache, rng.as_deref_mut())?;
        }
        if let Some(c) = cache {
            c.len += n;
        }
        match &self.final_norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }

    /// Applies the head to hidden states `[b, n, d]`.
    pub fn head(&self, h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match &self.head {
            Head::Lm { untied: None } => {
                let (b, n, d) = h.dims3()?;
                let logits = h.reshape((b * n, d))?.matmul(&self.embed.t()?)?;
                Ok(logits.reshape((b, n, ()))?)
            }
            Head::Lm { untied: Some(l) } => l.forward(h),
            Head::Classification { pooling, proj } => {
                let pooled = match pooling {
                    Pooling::Mean => mean_pool(h, mask)?,
                    Pooling::First => h.narrow(1, 0, 1)?.squeeze(1)?,
                };
                proj.forward(&pooled)
            }
            Head::Embedding => {
                let pooled = mean_pool(h, mask)?;
                let norm = pooled
                    .sqr()?
                    .sum_keepdim(D::Minus1)?
                    .sqrt()?
                    .clamp(1e-12, f64::MAX)?;
                Ok(pooled.broadcast_div(&norm)?)
            }
        }
    }
}

/// Mean of `h [b, n, d]` over the positions where `mask [b, n]` is 1.
pub fn mean_pool(h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => Ok(h.mean(1)?),
        Some(m) => {
            let m = m.to_dtype(h.dtype())?.unsqueeze(D::Minus1)?;
            let sum = h.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            Ok(sum.broadcast_div(&count)?)
        }
    }
}

/// Token ids as a `[1, n]` u32 tensor on the CPU.
pub fn ids_tensor(ids: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        ids.to_vec(),
        (1, ids.len()),
        &candle_core::Device::Cpu,
    )?)
}

/// Model dtype used across formers for training and inference.
pub const DTYPE: DType = DType::F32;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use candle_core::Device;

    fn cfg(extra: &str) -> ModelConfig {
        ModelConfig::from_json(&format!(
            r#"{{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 32, "input": {{"kind": "tokens", "vocab_size": 11}},
               "head": {{"kind": "lm"}}, "defaults": {{"mixer": {{"kind": "attention", "causal": true, "q_chunk": 3, "k_chunk": 5}}}} {extra}}}"#
        ))
        .unwrap()
    }

    fn ids(n: usize, seed: u64) -> Vec<u32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.below(11) as u32).collect()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn cached_decoding_equals_full_recomputation() {
        for pos in ["learned", "rope", "sinusoidal"] {
            let cfg = cfg(&format!(r#", "position": {{"kind": "{pos}"}}"#));
            let p = Params::new(1, DType::F32, &Device::Cpu);
            let model = Model::new(&cfg, &p.frozen()).unwrap();
            let toks = ids(12, 2);
            let full = model
                .forward(&ids_tensor(&toks).unwrap(), None, None)
                .unwrap();
            let mut cache = Cache::default();
            let mut parts = vec![model
                .forward_cached(&ids_tensor(&toks[..5]).unwrap(), &mut cache)
                .unwrap()];
            for t in &toks[5..] {
                parts.push(
                    model
                        .forward_cached(&ids_tensor(&[*t]).unwrap(), &mut cache)
                        .unwrap(),
                );
            }
            let inc = Tensor::cat(&parts, 1).unwrap();
            assert!(
                max_abs(&full, &inc) < 1e-5,
                "{pos}: {}",
                max_abs(&full, &inc)
            );
            assert_eq!(cache.len(), 12);
        }
    }

    #[test]
    fn causal_outputs_do_not_see_the_future() {
        let cfg = cfg("");
        let model = Model::new(&cfg, &Params::new(3, DType::F32, &Device::Cpu).frozen()).unwrap();
        let a = ids(10, 4);
        let mut b = a.clone();
        b[7] = (b[7] + 1) % 11;
        let la = model.forward(&ids_tensor(&a).unwrap(), None, None).unwrap();
        let lb = model.forward(&ids_tensor(&b).unwrap(), None, None).unwrap();
        assert!(max_abs(&la.narrow(1, 0, 7).unwrap(), &lb.narrow(1, 0, 7).unwrap()) < 1e-6);
        assert!(max_abs(&la.narrow(1, 7, 3).unwrap(), &lb.narrow(1, 7, 3).unwrap()) > 1e-4);
    }

    #[test]
    fn padding_does_not_change_pooled_outputs() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 16, "n_heads": 4, "n_layers": 2, "input": {"kind": "tokens", "vocab_size": 11},
               "head": {"kind": "embedding"}, "defaults": {"mixer": {"kind": "attention", "q_chunk": 4, "k_chunk": 3}}}"#,
        )
        .unwrap();
        let model = Model::new(&cfg, &Params::new(5, DType::F32, &Device::Cpu).frozen()).unwrap();
        let short = ids(6, 7);
        let mut padded = short.clone();
        padded.extend([3, 3, 3]);
        let alone = model
            .forward(&ids_tensor(&short).unwrap(), None, None)
            .unwrap();
        let mask = Tensor::from_vec(
            vec![1f32, 1., 1., 1., 1., 1., 0., 0., 0.],
            (1, 9),
            &Device::Cpu,
        )
        .unwrap();
        let batched = model
            .forward(&ids_tensor(&padded).unwrap(), Some(&mask), None)
            .unwrap();
        assert!(max_abs(&alone, &batched) < 1e-5);
        let norm = alone
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn model_gradients_match_finite_differences() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 8, "n_heads": 2, "n_layers": 2, "max_len": 8, "input": {"kind": "bytes"},
               "head": {"kind": "classification", "n_classes": 3, "pooling": "mean"},
               "defaults": {"mixer": {"kind": "attention", "q_chunk": 2, "k_chunk": 3}, "ffn": {"kind": "mlp", "hidden": 8}}}"#,
        )
        .unwrap();
        let p = Params::new(6, DType::F64, &Device::Cpu);
        let model = Model::new(&cfg, &p).unwrap();
        let h = randn(&[2, 5, 8], 8);
        // The head and the stack from hidden states on: all parameters but the embeddings.
        crate::testutil::check_grad(&p, &h, |h| {
            let mut x = h.clone();
            for b in &model.blocks {
                x = b.forward(&x, &MixCtx::default(), None, None)?;
            }
            model.head(&model.final_norm.as_ref().unwrap().forward(&x)?, None)
        });
    }

    #[test]
    fn too_long_input_is_an_error_not_a_panic() {
        let model = Model::new(&cfg(""), &Params::new(1, DType::F32, &Device::Cpu)).unwrap();
        let e = model
            .forward(&ids_tensor(&ids(33, 1)).unwrap(), None, None)
            .unwrap_err();
        assert!(e.to_string().contains("max_len 32"), "{e}");
    }
}
