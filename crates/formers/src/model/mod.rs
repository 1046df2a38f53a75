//! The model: embeddings → positions → blocks → final norm → head. Every entry point
//! turns its input into one [`batch::Batch`] and runs the one path, [`Model::run`].

mod batch;
mod cache;
mod head;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use candle_core::{DType, Tensor};

pub use batch::{ids_tensor, Packed};
pub use cache::Cache;
pub use head::mean_pool;

use crate::block::{dropout, Block, BlockOut};
use crate::config::{ModelConfig, ResidualSpec};
use crate::kernels::quant::QuantMatrix;
use crate::mixer::{MixCtx, MixerCache, ValueResidual, MASKED};
use crate::norm::Norm;
use crate::params::{Init, Params};
use crate::position::Positions;
use crate::rng::Rng;
use crate::{Error, Result};
use batch::{Batch, Input, Place};
use head::Head;

/// A MetaFormer stack built from a [`ModelConfig`].
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    /// `[vocab, d]`; `[vocab, 0]` (no values) when the table is `embed_quant`.
    embed: Tensor,
    /// The token table kept quantised (a quantised checkpoint's, on an inference view):
    /// rows are dequantised as looked up, and a tied LM head multiplies by it in integers.
    embed_quant: Option<Arc<QuantMatrix>>,
    type_embed: Option<Tensor>,
    embed_norm: Option<Norm>,
    positions: Positions,
    blocks: Vec<Block>,
    /// DenseFormer averaging weights, one vector per block (over the embeddings and the
    /// outputs of blocks 0..=i).
    dwa: Option<Vec<Tensor>>,
    final_norm: Option<Norm>,
    head: Head,
}

impl Model {
    /// Applies the head to hidden states `[b, n, d]` (for a matching head: the two documents
    /// of pair `i` in rows `2i`, `2i + 1`).
    pub fn head(&self, h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.head
            .apply(h, mask, &self.embed, self.embed_quant.as_deref())
    }

    /// Builds the model with parameters under `p`: `embed.weight`, `pos.weight`,
    /// `layers.{i}.*`, `final_norm.*`, `head.*`.
    pub fn new(cfg: &ModelConfig, p: &Params) -> Result<Self> {
        cfg.validate()?;
        let p = &p.with_init(cfg.init);
        let d = cfg.d_model;
        let vocab = cfg.input.vocab_size();
        let embed_quant = p.get_quantized([vocab, d], "embed.weight")?.map(Arc::new);
        let embed = match embed_quant {
            Some(_) => Tensor::zeros((vocab, 0), p.dtype(), p.device())?,
            None => p.get(&[vocab, d], "embed.weight", Init::Embedding)?,
        };
        let type_embed = match cfg.type_vocab_size {
            0 => None,
            t => Some(p.get(&[t, d], "type_embed.weight", Init::Embedding)?),
        };
        let embed_norm = if cfg.embed_norm {
            Some(Norm::new(&cfg.defaults.norm, &p.pp("embed_norm"), d)?)
        } else {
            None
        };
        let positions = Positions::new(&cfg.position, cfg.position_dims(), &p.pp("pos"))?;
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(&cfg.layer(i), cfg, &p.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let dwa = match cfg.residual {
            ResidualSpec::DenseFormer => Some(
                (0..cfg.n_layers)
                    .map(|i| {
                        // Identity: weight 1 on the newest block output, 0 elsewhere.
                        let init = (0..i + 2)
                            .map(|j| if j == i + 1 { 1.0 } else { 0.0 })
                            .collect();
                        p.get(&[i + 2], &format!("dwa.{i}"), Init::Values(init))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            _ => None,
        };
        let final_norm = if cfg.final_norm {
            Some(Norm::new(&cfg.defaults.norm, &p.pp("final_norm"), d)?)
        } else {
            None
        };
        let head = Head::new(cfg, p)?;
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            embed_quant,
            type_embed,
            embed_norm,
            positions,
            blocks,
            dwa,
            final_norm,
            head,
        })
    }

    /// Number of nested MatFormer granularities (1 when no layer is nested).
    pub fn granularities(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.ffn().granularities())
            .max()
            .unwrap_or(1)
    }

    /// Forces every nested layer to granularity `index` (clamped to each layer's list);
    /// `None` returns each to its configured one (Mix'n'Match).
    pub fn set_granularity(&self, index: Option<usize>) {
        for b in &self.blocks {
            b.ffn().set_granularity(index);
        }
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The head's output for token ids `[b, n]` (u32): LM logits `[b, n, vocab]`,
    /// class logits `[b, classes]` or embeddings `[b, d]`. `mask [b, n]` is 1 for tokens
    /// and 0 for padding; `rng` turns dropout on. A matching head reads each row as two
    /// documents of `n/2` tokens, each encoded on its own ([`crate::config::HeadSpec::Matching`]).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        if let Head::Matching { .. } = self.head {
            let (b, n) = ids.dims2()?;
            if !n.is_multiple_of(2) {
                return Err(Error::Input(format!(
                    "a matching head takes two documents of n/2 tokens each: n = {n} is odd"
                )));
            }
            let ids = ids.reshape((2 * b, n / 2))?;
            let mask = mask.map(|m| m.reshape((2 * b, n / 2))).transpose()?;
            let h = self.hidden(&ids, mask.as_ref(), None, rng)?;
            return self.head(&h, mask.as_ref());
        }
        let h = self.hidden(ids, mask, None, rng)?;
        self.head(&h, mask)
    }

    /// LM logits `[b, n, vocab]` of `ids`, which continue the sequence held in `cache`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.check_decoder()?;
        let h = self.hidden(ids, None, Some(cache), None)?;
        self.head(&h, None)
    }

    /// One decoding step over independent sequences (continuous batching, Orca: Yu et al.
    /// 2022): `ids[i]` continues the sequence `caches[i]` holds (its whole prompt when the
    /// cache is empty, then a token per step). LM logits `[sequences, vocab]` at each
    /// sequence's last token. One forward pass over the packed tokens of all of them:
    /// every layer but the token mixer sees one `[total, d]` matrix, each mixer mixes
    /// every sequence with its own cache. After an error the caches are unusable.
    pub fn forward_cached_batch(
        &self,
        ids: &[&[u32]],
        caches: &mut [&mut Cache],
    ) -> Result<Tensor> {
        self.check_decoder()?;
        let caches = caches.iter_mut().map(|c| &mut **c).collect();
        let batch = Batch::new(Input::Sequences(ids), caches, self.cfg.max_len)?;
        let last: Vec<u32> = (batch.segments.iter().flatten())
            .map(|s| (s.start + s.len - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, ids.len(), &candle_core::Device::Cpu)?;
        let h = self.run(batch, None, |_| Ok(()))?;
        let h = h.squeeze(0)?.index_select(&last, 0)?.unsqueeze(0)?;
        Ok(self.head(&h, None)?.squeeze(0)?)
    }

    fn check_decoder(&self) -> Result<()> {
        if !matches!(self.head, Head::Lm { .. }) || !self.cfg.causal {
            return Err(Error::Input(
                "decoding needs a causal model with an `lm` head".into(),
            ));
        }
        Ok(())
    }

    /// Final hidden states `[b, n, d]`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Cache>,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let batch = Batch::new(
            Input::Rows { ids, mask },
            cache.into_iter().collect(),
            self.cfg.max_len,
        )?;
        self.run(batch, rng, |_| Ok(()))
    }

    /// Final hidden states `[total, d]` of a padding-free batch (ByteTransformer, Zhai et
    /// al. 2023): every layer but attention sees one `[total, d]` matrix; attention sees
    /// the sequence boundaries. No work is spent on padding.
    pub fn hidden_packed(&self, batch: &Packed) -> Result<Tensor> {
        self.run_packed(batch, |_| Ok(()))
    }

    /// What every layer's channel mixer reads, `[total, d]` each, on a padding-free batch
    /// (the calibration of data-aware compression).
    pub(crate) fn ffn_inputs_packed(&self, batch: &Packed) -> Result<Vec<Tensor>> {
        let mut inputs = Vec::new();
        self.run_packed(batch, |o| {
            inputs.push(o.ffn_input.squeeze(0)?);
            Ok(())
        })?;
        Ok(inputs)
    }

    /// Every block's output, `[total, d]` each, on a padding-free batch (the per-layer
    /// targets of distillation; no final norm).
    pub(crate) fn layer_outputs_packed(&self, batch: &Packed) -> Result<Vec<Tensor>> {
        let mut outs = Vec::new();
        self.run_packed(batch, |o| {
            outs.push(o.out.squeeze(0)?);
            Ok(())
        })?;
        Ok(outs)
    }

    /// [`Self::run`] over a padding-free batch, `[total, d]`.
    fn run_packed(
        &self,
        batch: &Packed,
        tap: impl FnMut(&BlockOut) -> Result<()>,
    ) -> Result<Tensor> {
        let batch = Batch::new(Input::Packed(batch), Vec::new(), self.cfg.max_len)?;
        Ok(self.run(batch, None, tap)?.squeeze(0)?)
    }

    /// The head's output for a padding-free batch: one row per sequence for pooled heads
    /// (`[sequences, ..]`), one per token for LM heads (`[total, vocab]`).
    pub fn forward_packed(&self, batch: &Packed) -> Result<Tensor> {
        let h = self.hidden_packed(batch)?;
        match &self.head {
            Head::Lm { .. } => Ok(self.head(&h.unsqueeze(0)?, None)?.squeeze(0)?),
            Head::Matching { .. } => Err(Error::Input(
                "a matching head classifies pairs of documents: use `forward`, not a packed batch"
                    .into(),
            )),
            _ => {
                let pooled = batch
                    .segments
                    .iter()
                    .map(|&(start, len)| h.narrow(0, start, len)?.unsqueeze(0))
                    .map(|seq| self.head(&seq?, None))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&pooled, 0)?)
            }
        }
    }

    /// The one path through the stack: embeddings (with positions, type 0, norm and
    /// dropout) → blocks → final norm, `[rows, n, d]`; `tap` sees every block's output;
    /// each cache then holds its tokens too.
    fn run(
        &self,
        batch: Batch,
        mut rng: Option<&mut Rng>,
        tap: impl FnMut(&BlockOut) -> Result<()>,
    ) -> Result<Tensor> {
        let Batch {
            ids,
            place,
            mask,
            segments,
            mut caches,
        } = batch;
        let (rows, n) = ids.dims2()?;
        let d = self.cfg.d_model;
        let x = self.embed_tokens(&ids.flatten_all()?)?;
        let (x, offset) = match &place {
            Place::From(offset) => {
                let x = self.positions.add(&x.reshape((rows, n, d))?, *offset)?;
                (self.finish_embeddings(x, rng.as_deref_mut())?, *offset)
            }
            Place::At(pos) => {
                let x = self.positions.add_at(&x, pos)?;
                let x = self.finish_embeddings(x, rng.as_deref_mut())?;
                (x.reshape((rows, n, d))?, 0)
            }
        };
        let key_bias = match mask {
            Some(m) => Some(((1.0 - m.to_dtype(x.dtype())?)? * MASKED)?.reshape((rows, 1, 1, n))?),
            None => None,
        };
        let ctx = MixCtx {
            key_bias: key_bias.as_ref(),
            offset,
            rope: self.positions.rope(),
            alibi: self.positions.alibi(),
            value_residual: self.value_residual(),
            segments: segments.as_deref(),
        };
        for c in caches.iter_mut() {
            c.layers.resize_with(self.blocks.len(), MixerCache::default);
        }
        let h = self.stack(x, &ctx, &mut caches, rng, tap)?;
        match &segments {
            Some(segments) => {
                for (c, s) in caches.iter_mut().zip(segments) {
                    c.len += s.len;
                }
            }
            None => {
                for c in caches.iter_mut() {
                    c.len += n;
                }
            }
        }
        Ok(h)
    }

    /// The loop over the blocks: each block in turn (on its layer of the caches), the
    /// first values of the value residual handed from block to block, DenseFormer's
    /// averaging between blocks; then the final norm.
    fn stack(
        &self,
        mut x: Tensor,
        ctx: &MixCtx,
        caches: &mut [&mut Cache],
        mut rng: Option<&mut Rng>,
        mut tap: impl FnMut(&BlockOut) -> Result<()>,
    ) -> Result<Tensor> {
        let mut first: Option<Tensor> = None;
        let mut history = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let mut layer: Vec<&mut MixerCache> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            let ctx = MixCtx {
                value_residual: ctx.value_residual.map(|r| ValueResidual {
                    first: first.as_ref(),
                    ..r
                }),
                ..*ctx
            };
            let BlockOut { out, values, .. } = {
                let o = block.forward(&x, &ctx, &mut layer, rng.as_deref_mut())?;
                tap(&o)?;
                o
            };
            if first.is_none() {
                first = values;
            }
            x = match &self.dwa {
                Some(weights) => {
                    if history.is_empty() {
                        history.push(x);
                    }
                    history.push(out);
                    let w = &weights[i];
                    let mut avg = history[0].broadcast_mul(&w.narrow(0, 0, 1)?)?;
                    for (j, h) in history.iter().enumerate().skip(1) {
                        avg = (avg + h.broadcast_mul(&w.narrow(0, j, 1)?)?)?;
                    }
                    avg
                }
                None => out,
            };
        }
        match &self.final_norm {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }

    /// The value residual before its first values are known, when the model has one.
    fn value_residual(&self) -> Option<ValueResidual<'static>> {
        match self.cfg.residual {
            ResidualSpec::ValueResidual { lambda } => Some(ValueResidual {
                lambda,
                first: None,
            }),
            _ => None,
        }
    }

    /// Token (and token-type 0) embeddings of flat ids `[t]` → `[t, d]`.
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let vocab = self.embed.dim(0)?;
        let max = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max >= vocab {
            return Err(Error::Input(format!(
                "token id {max} is outside the vocabulary of {vocab}"
            )));
        }
        let x = match &self.embed_quant {
            Some(q) => {
                let ids = ids.to_vec1::<u32>()?;
                let rows: Vec<f32> = ids
                    .iter()
                    .flat_map(|&i| q.dequantize_row(i as usize))
                    .collect();
                Tensor::from_vec(rows, (ids.len(), q.cols()), self.embed.device())?
                    .to_dtype(self.embed.dtype())?
            }
            None => self.embed.index_select(ids, 0)?,
        };
        Ok(match &self.type_embed {
            Some(t) => x.broadcast_add(&t.narrow(0, 0, 1)?)?,
            None => x,
        })
    }

    fn finish_embeddings(&self, x: Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let x = match &self.embed_norm {
            Some(norm) => norm.forward(&x)?,
            None => x,
        };
        dropout(x, self.cfg.embed_dropout, rng)
    }
}

/// Model dtype used across formers for training and inference.
pub const DTYPE: DType = DType::F32;
