//! The model: embeddings → positions → blocks → final norm → head.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::block::{dropout, Block};
use crate::config::{HeadSpec, ModelConfig, Pooling, ResidualSpec};
use crate::kernels::quant::QuantMatrix;
use crate::linear::Linear;
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

    /// Values the cache holds, over all layers (what `limits::inference` estimates).
    pub fn values(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.tensors)
            .map(|t| t.elem_count())
            .sum()
    }
}

#[derive(Debug)]
enum Head {
    Lm { untied: Option<Linear> },
    Classification { pooling: Pooling, proj: Linear },
    Matching { pooling: Pooling, proj: Linear },
    Embedding { pooling: Pooling, normalize: bool },
}

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
        let head = match &cfg.head {
            HeadSpec::Lm { tied: true, .. } => Head::Lm { untied: None },
            HeadSpec::Lm { tied: false, bias } => Head::Lm {
                untied: Some(Linear::new(&p.pp("head"), d, vocab, *bias)?),
            },
            HeadSpec::Classification { n_classes, pooling } => Head::Classification {
                pooling: *pooling,
                proj: Linear::new(&p.pp("head"), d, *n_classes, true)?,
            },
            HeadSpec::Matching { n_classes, pooling } => Head::Matching {
                pooling: *pooling,
                proj: Linear::new(&p.pp("head"), 4 * d, *n_classes, true)?,
            },
            HeadSpec::Embedding { pooling, normalize } => Head::Embedding {
                pooling: *pooling,
                normalize: *normalize,
            },
        };
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
    /// documents of `n/2` tokens, each encoded on its own ([`HeadSpec::Matching`]).
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
        if ids.len() != caches.len() || ids.is_empty() {
            return Err(Error::Input(format!(
                "a decoding step needs one cache per sequence and at least one sequence, found {} sequences and {} caches",
                ids.len(),
                caches.len()
            )));
        }
        let total = ids.iter().map(|s| s.len()).sum();
        let mut flat = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut segments = Vec::with_capacity(ids.len());
        for (i, (s, c)) in ids.iter().zip(caches.iter()).enumerate() {
            if s.is_empty() {
                return Err(Error::Input(format!("sequence {i} of the step is empty")));
            }
            self.check_len(c.len + s.len())?;
            segments.push((flat.len(), s.len()));
            flat.extend_from_slice(s);
            positions.extend((c.len..c.len + s.len()).map(|p| p as u32));
        }
        let x = self.embed_tokens(&Tensor::from_vec(flat, total, &Device::Cpu)?)?;
        let x = self
            .positions
            .add_at(&x, &Tensor::from_vec(positions, total, &Device::Cpu)?)?;
        let x = self.finish_embeddings(x, None)?.unsqueeze(0)?;
        let cells: Vec<_> = ids.iter().map(|_| std::cell::RefCell::new(None)).collect();
        let ctxs: Vec<MixCtx> = caches
            .iter()
            .zip(&cells)
            .map(|(c, cell)| MixCtx {
                key_bias: None,
                offset: c.len,
                rope: self.positions.rope(),
                alibi: self.positions.alibi(),
                first_values: self.value_residual().then_some(cell),
                value_lambda: self.value_lambda(),
                segments: None,
            })
            .collect();
        for c in caches.iter_mut() {
            c.layers.resize_with(self.blocks.len(), MixerCache::default);
        }
        let h = self.run_blocks(x, |i, block, x| {
            let mut layer: Vec<&mut MixerCache> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            block.forward_cached_packed(x, &segments, &ctxs, &mut layer)
        })?;
        for (c, s) in caches.iter_mut().zip(ids) {
            c.len += s.len();
        }
        let last: Vec<u32> = segments.iter().map(|&(s, n)| (s + n - 1) as u32).collect();
        let last = Tensor::from_vec(last, segments.len(), &Device::Cpu)?;
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
        mut cache: Option<&mut Cache>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        self.check_len(offset + n)?;
        let x = self
            .embed_tokens(&ids.flatten_all()?)?
            .reshape((b, n, self.cfg.d_model))?;
        let x = self.positions.add(&x, offset)?;
        let x = self.finish_embeddings(x, rng.as_deref_mut())?;
        let first_values = std::cell::RefCell::new(None);
        let key_bias = match mask {
            Some(m) => Some(((1.0 - m.to_dtype(x.dtype())?)? * MASKED)?.reshape((b, 1, 1, n))?),
            None => None,
        };
        let ctx = MixCtx {
            key_bias: key_bias.as_ref(),
            offset,
            rope: self.positions.rope(),
            alibi: self.positions.alibi(),
            first_values: self.value_residual().then_some(&first_values),
            value_lambda: self.value_lambda(),
            segments: None,
        };
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.blocks.len(), MixerCache::default);
            c.len += n;
        }
        let mut layer_caches = cache.map(|c| &mut c.layers);
        self.run_blocks(x, |i, block, x| {
            let layer_cache = layer_caches.as_deref_mut().map(|c| &mut c[i]);
            block.forward(x, &ctx, layer_cache, rng.as_deref_mut())
        })
    }

    /// Final hidden states `[total, d]` of a padding-free batch (ByteTransformer, Zhai et
    /// al. 2023): every layer but attention sees one `[total, d]` matrix; attention sees
    /// the sequence boundaries. No work is spent on padding.
    pub fn hidden_packed(&self, batch: &Packed) -> Result<Tensor> {
        self.run_packed(batch, |_, block, x, ctx| block.forward(x, ctx, None, None))
    }

    /// What every layer's channel mixer reads, `[total, d]` each, on a padding-free batch
    /// (the calibration of data-aware compression).
    pub(crate) fn ffn_inputs_packed(&self, batch: &Packed) -> Result<Vec<Tensor>> {
        let mut inputs = Vec::new();
        self.run_packed(batch, |_, block, x, ctx| {
            let (h, out) = block.forward_traced(x, ctx)?;
            inputs.push(h.squeeze(0)?);
            Ok(out)
        })?;
        Ok(inputs)
    }

    /// Every block's output, `[total, d]` each, on a padding-free batch (the per-layer
    /// targets of distillation; no final norm).
    pub(crate) fn layer_outputs_packed(&self, batch: &Packed) -> Result<Vec<Tensor>> {
        let mut outs = Vec::new();
        self.run_packed(batch, |_, block, x, ctx| {
            let out = block.forward(x, ctx, None, None)?;
            outs.push(out.squeeze(0)?);
            Ok(out)
        })?;
        Ok(outs)
    }

    /// The stack over a padding-free batch, `layer` applying each block.
    fn run_packed(
        &self,
        batch: &Packed,
        mut layer: impl FnMut(usize, &Block, &Tensor, &MixCtx) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let longest = batch.segments.iter().map(|s| s.1).max().unwrap_or(0);
        self.check_len(longest)?;
        let ids = Tensor::from_slice(&batch.ids, batch.ids.len(), &Device::Cpu)?;
        let x = self.embed_tokens(&ids)?;
        let pos = Tensor::from_slice(&batch.positions, batch.positions.len(), &Device::Cpu)?;
        let x = self.positions.add_at(&x, &pos)?;
        let x = self.finish_embeddings(x, None)?.unsqueeze(0)?;
        let first_values = std::cell::RefCell::new(None);
        let ctx = MixCtx {
            key_bias: None,
            offset: 0,
            rope: self.positions.rope(),
            alibi: self.positions.alibi(),
            first_values: self.value_residual().then_some(&first_values),
            value_lambda: self.value_lambda(),
            segments: Some(&batch.segments),
        };
        let h = self.run_blocks(x, |i, block, x| layer(i, block, x, &ctx))?;
        Ok(h.squeeze(0)?)
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

    fn value_residual(&self) -> bool {
        matches!(self.cfg.residual, ResidualSpec::ValueResidual { .. })
    }

    fn value_lambda(&self) -> f64 {
        match self.cfg.residual {
            ResidualSpec::ValueResidual { lambda } => lambda,
            _ => 1.0,
        }
    }

    fn check_len(&self, n: usize) -> Result<()> {
        if n > self.cfg.max_len {
            return Err(Error::Input(format!(
                "sequence of {n} tokens is longer than the model's max_len {}",
                self.cfg.max_len
            )));
        }
        Ok(())
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

    /// Runs `layer(i, block, x)` for each block in turn, with the DenseFormer averaging
    /// between blocks, then the final norm.
    fn run_blocks(
        &self,
        mut x: Tensor,
        mut layer: impl FnMut(usize, &Block, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut history = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let out = layer(i, block, &x)?;
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

    /// Applies the head to hidden states `[b, n, d]` (for a matching head: the two documents
    /// of pair `i` in rows `2i`, `2i + 1`).
    pub fn head(&self, h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match &self.head {
            Head::Lm { untied: None } => {
                let (b, n, d) = h.dims3()?;
                let h = h.reshape((b * n, d))?;
                let logits = match &self.embed_quant {
                    Some(q) => crate::linear::quant_forward(q, None, &h)?,
                    None => h.matmul(&self.embed.t()?)?,
                };
                Ok(logits.reshape((b, n, ()))?)
            }
            Head::Lm { untied: Some(l) } => l.forward(h),
            Head::Classification { pooling, proj } => proj.forward(&pool(h, mask, *pooling)?),
            Head::Matching { pooling, proj } => {
                let pooled = pool(h, mask, *pooling)?;
                let (rows, d) = pooled.dims2()?;
                if !rows.is_multiple_of(2) {
                    return Err(Error::Input(format!(
                        "a matching head pools documents in pairs: {rows} rows is odd"
                    )));
                }
                // Rows 2i and 2i + 1 are the two documents of pair i.
                let pairs = pooled.reshape((rows / 2, 2, d))?;
                let u = pairs.narrow(1, 0, 1)?.squeeze(1)?;
                let v = pairs.narrow(1, 1, 1)?.squeeze(1)?;
                let features = Tensor::cat(&[&u, &v, &(&u * &v)?, &(&u - &v)?.abs()?], 1)?;
                proj.forward(&features)
            }
            Head::Embedding { pooling, normalize } => {
                let pooled = pool(h, mask, *pooling)?;
                if !normalize {
                    return Ok(pooled);
                }
                // As torch.nn.functional.normalize: x / max(||x||, 1e-12).
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

/// One vector per sequence of `h [b, n, d]`.
fn pool(h: &Tensor, mask: Option<&Tensor>, pooling: Pooling) -> Result<Tensor> {
    match pooling {
        Pooling::Mean => mean_pool(h, mask),
        Pooling::First => Ok(h.narrow(1, 0, 1)?.squeeze(1)?),
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

/// A padding-free batch: the token ids of all sequences back to back, each token's
/// position inside its sequence, and `(start, len)` of every sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `[total]` token ids.
    pub ids: Vec<u32>,
    /// `[total]` position of each token within its sequence.
    pub positions: Vec<u32>,
    /// `(start, len)` of each sequence in `ids`.
    pub segments: Vec<(usize, usize)>,
}

impl Packed {
    /// Packs sequences; empty sequences are an error (they have nothing to pool).
    pub fn new<S: AsRef<[u32]>>(seqs: &[S]) -> Result<Self> {
        let total = seqs.iter().map(|s| s.as_ref().len()).sum();
        let mut p = Packed {
            ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            segments: Vec::with_capacity(seqs.len()),
        };
        for (i, s) in seqs.iter().enumerate() {
            let s = s.as_ref();
            if s.is_empty() {
                return Err(Error::Input(format!("sequence {i} of the batch is empty")));
            }
            p.segments.push((p.ids.len(), s.len()));
            p.ids.extend_from_slice(s);
            p.positions.extend(0..s.len() as u32);
        }
        Ok(p)
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
    use crate::testutil::{max_abs, randn};
    use candle_core::Device;

    fn cfg(extra: &str) -> ModelConfig {
        ModelConfig::from_json(&format!(
            r#"{{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 32, "input": {{"kind": "tokens", "vocab_size": 11}},
               "head": {{"kind": "lm"}}, "causal": true, "defaults": {{"mixer": {{"kind": "attention", "q_chunk": 3, "k_chunk": 5}}}} {extra}}}"#
        ))
        .unwrap()
    }

    fn ids(n: usize, seed: u64) -> Vec<u32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.below(11) as u32).collect()
    }

    /// Logits of `toks` computed at once, after checking that decoding them with the cache
    /// (a prefill of `prefix` tokens, then one at a time) gives the same.
    fn decodes_like_recomputation(
        model: &Model,
        toks: &[u32],
        prefix: usize,
        what: &str,
    ) -> Tensor {
        let full = model
            .forward(&ids_tensor(toks).unwrap(), None, None)
            .unwrap();
        let mut cache = Cache::default();
        let mut parts = vec![model
            .forward_cached(&ids_tensor(&toks[..prefix]).unwrap(), &mut cache)
            .unwrap()];
        for t in &toks[prefix..] {
            parts.push(
                model
                    .forward_cached(&ids_tensor(&[*t]).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        assert!(
            max_abs(&full, &inc) < 1e-5,
            "{what}: {}",
            max_abs(&full, &inc)
        );
        assert_eq!(cache.len(), toks.len());
        full
    }

    #[test]
    fn cached_decoding_equals_full_recomputation() {
        for pos in ["learned", "rope", "sinusoidal", "alibi"] {
            let cfg = cfg(&format!(r#", "position": {{"kind": "{pos}"}}"#));
            let p = Params::new(1, DType::F32, &Device::Cpu);
            let model = Model::new(&cfg, &p.frozen()).unwrap();
            let toks = ids(12, 2);
            decodes_like_recomputation(&model, &toks, 5, pos);
        }
    }

    #[test]
    fn residual_schemes_reduce_to_plain_at_their_identity_and_decode_with_the_cache() {
        let toks = ids(12, 3);
        let run = |residual: &str| {
            let cfg = cfg(&format!(r#", "residual": {residual}"#));
            let model =
                Model::new(&cfg, &Params::new(1, DType::F32, &Device::Cpu).frozen()).unwrap();
            decodes_like_recomputation(&model, &toks, 4, residual)
        };
        let plain = run(r#"{"kind": "plain"}"#);
        assert!(max_abs(&plain, &run(r#"{"kind": "dense_former"}"#)) < 1e-6);
        assert!(max_abs(&plain, &run(r#"{"kind": "value_residual", "lambda": 1.0}"#)) < 1e-6);
        assert!(max_abs(&plain, &run(r#"{"kind": "value_residual", "lambda": 0.5}"#)) > 1e-4);
    }

    #[test]
    fn residual_scheme_gradients_match_finite_differences() {
        for residual in [
            r#"{"kind": "dense_former"}"#,
            r#"{"kind": "value_residual", "lambda": 0.3}"#,
        ] {
            let cfg = ModelConfig::from_json(&format!(
                r#"{{"d_model": 8, "n_heads": 2, "n_layers": 3, "max_len": 8, "input": {{"kind": "bytes"}}, "residual": {residual},
                   "head": {{"kind": "classification", "n_classes": 3, "pooling": "mean"}},
                   "defaults": {{"ffn": {{"kind": "mlp", "hidden": 8}}}}}}"#
            ))
            .unwrap();
            let p = Params::new(6, DType::F64, &Device::Cpu);
            let model = Model::new(&cfg, &p).unwrap();
            // Move the DenseFormer weights off the identity so every term matters.
            for (name, var) in p.vars() {
                if name.starts_with("dwa.") {
                    let n = var.elem_count();
                    let v: Vec<f64> = (0..n).map(|j| 0.3 + 0.2 * j as f64).collect();
                    var.set(&Tensor::from_vec(v, n, &Device::Cpu).unwrap())
                        .unwrap();
                }
            }
            let h = randn(&[2, 5, 8], 8);
            crate::testutil::check_grad(&p, &h, |h| {
                let first = std::cell::RefCell::new(None);
                let ctx = MixCtx {
                    first_values: model.value_residual().then_some(&first),
                    value_lambda: model.value_lambda(),
                    ..MixCtx::default()
                };
                let out = model
                    .run_blocks(h.clone(), |_, block, x| block.forward(x, &ctx, None, None))?;
                model.head(&out, None)
            });
        }
    }

    /// Every mixer kind that has a causal form, with a few extra settings per kind.
    fn causal_mixers() -> Vec<crate::mixer::MixerSpec> {
        let mut all: Vec<_> = crate::mixer::MixerSpec::examples()
            .into_iter()
            .filter(|m| m.kind().capabilities().causal)
            .collect();
        for extra in [
            r#"{"kind": "local", "window": 3, "global": 2, "chunk": 4}"#,
            r#"{"kind": "local", "window": 1, "chunk": 3}"#,
            r#"{"kind": "linear", "feature": "elu", "chunk": 4}"#,
            r#"{"kind": "pool", "window": 4}"#,
        ] {
            all.push(serde_json::from_str(extra).unwrap());
        }
        all
    }

    #[test]
    fn every_causal_mixer_decodes_with_its_cache_like_recomputation() {
        let toks = ids(14, 5);
        for mixer in causal_mixers() {
            for pos in ["learned", "alibi"] {
                if pos == "alibi" && !mixer.kind().capabilities().alibi {
                    continue;
                }
                let mut cfg = cfg(&format!(
                    r#", "residual": {{"kind": "value_residual"}}, "position": {{"kind": "{pos}"}}"#
                ));
                cfg.defaults.mixer = mixer.clone();
                cfg.validate().unwrap();
                let model =
                    Model::new(&cfg, &Params::new(2, DType::F32, &Device::Cpu).frozen()).unwrap();
                decodes_like_recomputation(&model, &toks, 5, &format!("{mixer:?} {pos}"));
            }
        }
    }

    #[test]
    fn no_causal_mixer_sees_the_future() {
        for mixer in causal_mixers() {
            let mut cfg = cfg("");
            cfg.defaults.mixer = mixer.clone();
            let model = Model::new(&cfg, &Params::new(3, DType::F32, &Device::Cpu)).unwrap();
            let a = ids(12, 4);
            let mut b = a.clone();
            b[7] = (b[7] + 1) % 11;
            let la = model.forward(&ids_tensor(&a).unwrap(), None, None).unwrap();
            let lb = model.forward(&ids_tensor(&b).unwrap(), None, None).unwrap();
            let past = max_abs(&la.narrow(1, 0, 7).unwrap(), &lb.narrow(1, 0, 7).unwrap());
            assert!(past == 0.0, "{mixer:?}: earlier logits moved by {past}");
            let now = max_abs(&la.narrow(1, 7, 5).unwrap(), &lb.narrow(1, 7, 5).unwrap());
            assert!(now > 1e-4, "{mixer:?}: the changed token changed nothing");
        }
    }

    #[test]
    fn a_sliding_window_cache_keeps_only_the_window_and_the_global_keys() {
        let mut cfg = cfg("");
        cfg.defaults.mixer =
            serde_json::from_str(r#"{"kind": "local", "window": 3, "global": 2, "chunk": 4}"#)
                .unwrap();
        let model = Model::new(&cfg, &Params::new(2, DType::F32, &Device::Cpu).frozen()).unwrap();
        let toks = ids(20, 6);
        decodes_like_recomputation(&model, &toks, 6, "local");
        let mut cache = Cache::default();
        for t in &toks {
            model
                .forward_cached(&ids_tensor(&[*t]).unwrap(), &mut cache)
                .unwrap();
        }
        for layer in &cache.layers {
            let held: Vec<usize> = layer.tensors.iter().map(|t| t.dim(2).unwrap()).collect();
            assert_eq!(
                held,
                vec![2, 2, 3, 3],
                "global keys, global values, window keys, values"
            );
        }
    }

    #[test]
    fn a_causal_model_refuses_mixers_without_a_causal_form() {
        for mixer in crate::mixer::MixerSpec::examples() {
            let mut cfg = cfg("");
            cfg.layers.insert(
                "1".into(),
                crate::config::LayerOverride {
                    mixer: Some(mixer.clone()),
                    ..Default::default()
                },
            );
            let name = mixer.kind().name();
            match (cfg.validate(), mixer.kind().capabilities().causal) {
                (Ok(()), true) => {}
                (Err(e), false) => {
                    let e = e.to_string();
                    assert!(e.contains("layers.1.mixer") && e.contains(name), "{e}");
                }
                (r, _) => panic!("{name}: {r:?}"),
            }
        }
    }

    #[test]
    fn decoding_an_encoder_is_refused() {
        let mut cfg = cfg("");
        cfg.causal = false;
        let model = Model::new(&cfg, &Params::new(2, DType::F32, &Device::Cpu).frozen()).unwrap();
        let e = model
            .forward_cached(&ids_tensor(&[1, 2]).unwrap(), &mut Cache::default())
            .unwrap_err();
        assert!(e.to_string().contains("causal"), "{e}");
    }

    #[test]
    fn masformer_with_windows_covering_the_input_equals_all_full_attention() {
        let full_cfg = cfg("");
        let mut mixed = full_cfg.clone();
        // MASFormer: full attention at layer 0, sliding windows at layer 1 (window >= n).
        mixed.layers.insert(
            "1".into(),
            serde_json::from_str(r#"{"mixer": {"kind": "local", "window": 32, "chunk": 5}}"#)
                .unwrap(),
        );
        let a = Model::new(
            &full_cfg,
            &Params::new(8, DType::F32, &Device::Cpu).frozen(),
        )
        .unwrap();
        let b = Model::new(&mixed, &Params::new(8, DType::F32, &Device::Cpu).frozen()).unwrap();
        let x = ids_tensor(&ids(20, 9)).unwrap();
        let (ya, yb) = (
            a.forward(&x, None, None).unwrap(),
            b.forward(&x, None, None).unwrap(),
        );
        assert!(max_abs(&ya, &yb) < 1e-5);
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

    /// The matching head is the two documents encoded on their own (an embedding model on
    /// the same weights), each with its own padding, then `[u, v, u⊙v, |u−v|]` → linear.
    #[test]
    fn a_matching_head_encodes_each_document_alone() {
        let json = |head: &str| {
            ModelConfig::from_json(&format!(
                r#"{{"d_model": 8, "n_heads": 2, "n_layers": 2, "max_len": 5, "input": {{"kind": "tokens", "vocab_size": 11}},
                   "head": {head}}}"#
            ))
            .unwrap()
        };
        let p = Params::new(4, DType::F32, &Device::Cpu);
        let matching = Model::new(
            &json(r#"{"kind": "matching", "n_classes": 3, "pooling": "mean"}"#),
            &p,
        )
        .unwrap();
        let encoder =
            Model::new(&json(r#"{"kind": "embedding", "normalize": false}"#), &p).unwrap();
        // Pair 0: documents of 3 and 5 tokens; pair 1: 5 and 2 (padding after each).
        let docs: [&[u32]; 4] = [&[1, 2, 3], &[4, 5, 6, 7, 8], &[9, 1, 2, 3, 4], &[5, 6]];
        let (mut flat, mut mask) = (Vec::new(), Vec::new());
        for doc in docs {
            for i in 0..5 {
                flat.push(doc.get(i).copied().unwrap_or(10));
                mask.push(if i < doc.len() { 1f32 } else { 0. });
            }
        }
        let ids = Tensor::from_vec(flat, (2, 10), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(mask, (2, 10), &Device::Cpu).unwrap();
        let logits = matching.forward(&ids, Some(&mask), None).unwrap();
        assert_eq!(logits.dims(), &[2, 3]);
        let w = p.tensors()["head.weight"].clone();
        let b = p.tensors()["head.bias"].clone();
        assert_eq!(w.dims(), &[3, 32]);
        for (pair, docs) in docs.chunks(2).enumerate() {
            let [u, v] = [docs[0], docs[1]].map(|d| {
                encoder
                    .forward(&ids_tensor(d).unwrap(), None, None)
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
            });
            let features = Tensor::cat(
                &[
                    &u,
                    &v,
                    &(&u * &v).unwrap(),
                    &(&u - &v).unwrap().abs().unwrap(),
                ],
                0,
            )
            .unwrap();
            let expect = (w
                .matmul(&features.unsqueeze(1).unwrap())
                .unwrap()
                .squeeze(1)
                .unwrap()
                + &b)
                .unwrap();
            let got = logits.get(pair).unwrap();
            assert!(max_abs(&got, &expect) < 1e-5, "pair {pair}");
        }
        // An odd length cannot be two documents; nor is a packed batch a pair.
        let odd = Tensor::from_vec(vec![1u32; 9], (1, 9), &Device::Cpu).unwrap();
        let err = matching.forward(&odd, None, None).unwrap_err().to_string();
        assert!(err.contains("odd"), "{err}");
        let packed = Packed::new(&[vec![1u32, 2]]).unwrap();
        assert!(matching.forward_packed(&packed).is_err());
    }

    fn encoder(position: &str, causal: bool) -> Model {
        let cfg = ModelConfig::from_json(&format!(
            r#"{{"d_model": 12, "n_heads": 2, "n_layers": 2, "max_len": 16, "input": {{"kind": "tokens", "vocab_size": 11}},
               "type_vocab_size": 2, "embed_norm": true, "position": {{"kind": "{position}"}},
               "head": {{"kind": "embedding"}}, "causal": {causal}, "defaults": {{"placement": "post", "mixer": {{"kind": "attention", "q_chunk": 3, "k_chunk": 4}}}}}}"#
        ))
        .unwrap();
        Model::new(&cfg, &Params::new(11, DType::F32, &Device::Cpu).frozen()).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn packed_and_padded_batches_equal_one_at_a_time(
            lens in proptest::collection::vec(1usize..=16, 1..6),
            seed in 0u64..1000,
            rope in proptest::bool::ANY,
            causal in proptest::bool::ANY,
        ) {
            let model = encoder(if rope { "rope" } else { "learned" }, causal);
            let seqs: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| ids(n, seed + i as u64)).collect();
            let packed = Packed::new(&seqs).unwrap();
            let h = model.hidden_packed(&packed).unwrap();
            let emb = model.forward_packed(&packed).unwrap();
            let longest = *lens.iter().max().unwrap();
            let mut padded_ids = Vec::new();
            let mut mask = Vec::new();
            for s in &seqs {
                padded_ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, longest - s.len())));
                mask.extend((0..longest).map(|j| if j < s.len() { 1f32 } else { 0. }));
            }
            let padded_ids = Tensor::from_vec(padded_ids, (seqs.len(), longest), &Device::Cpu).unwrap();
            let mask = Tensor::from_vec(mask, (seqs.len(), longest), &Device::Cpu).unwrap();
            let padded = model.hidden(&padded_ids, Some(&mask), None, None).unwrap();
            for (i, (s, &(start, len))) in seqs.iter().zip(&packed.segments).enumerate() {
                let alone = model.hidden(&ids_tensor(s).unwrap(), None, None, None).unwrap().squeeze(0).unwrap();
                proptest::prop_assert!(max_abs(&alone, &h.narrow(0, start, len).unwrap()) < 1e-5);
                let row = padded.get(i).unwrap().narrow(0, 0, len).unwrap();
                proptest::prop_assert!(max_abs(&alone, &row) < 1e-5);
                let e = model.forward(&ids_tensor(s).unwrap(), None, None).unwrap();
                proptest::prop_assert!(max_abs(&e, &emb.narrow(0, i, 1).unwrap()) < 1e-5);
            }
        }
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
