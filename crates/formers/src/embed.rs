//! Sentence embeddings from an encoder with a pooled head: the token ids of one input
//! (checked or cut against a length), and one padding-free batch of inputs → one row each.
//! `formers embed` and `formers serve` both go through here, so they give the same vectors.

use tokenizers::Tokenizer;

use crate::config::{HeadSpec, ModelConfig};
use crate::model::{Model, Packed};
use crate::pretrained;
use crate::{Error, Result};

/// Whether `cfg` gives embeddings: an encoder with a pooled embedding head.
pub fn has_embedding_head(cfg: &ModelConfig) -> bool {
    !cfg.is_causal() && matches!(cfg.head, HeadSpec::Embedding { .. })
}

/// Token ids of `text` with the tokenizer's special tokens, unchecked in length.
pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    pretrained::encode(tok, text, true)
}

/// Cuts `ids` to `max_len` tokens, keeping the last (closing special) token in the last
/// place. Does nothing to shorter inputs or when `max_len` is 0.
pub fn truncate(ids: &mut Vec<u32>, max_len: usize) {
    if ids.len() > max_len && max_len > 0 {
        let last = *ids.last().expect("longer than max_len > 0, so not empty");
        ids.truncate(max_len);
        ids[max_len - 1] = last;
    }
}

/// The embeddings of `seqs` (token ids, none empty), computed as one padding-free batch:
/// one row of the model's pooled head per sequence, in order. A row with a NaN or an
/// infinity is an [`Error::NonFiniteOutput`] naming the input, never a result.
pub fn embed_batch<S: AsRef<[u32]>>(model: &Model, seqs: &[S]) -> Result<Vec<Vec<f32>>> {
    embed_batch_with(model, seqs, false)
}

/// [`embed_batch`], returning non-finite rows as they are when `allow_non_finite` (a
/// model the user loaded with non-finite weights on purpose, `--allow-non-finite`).
pub fn embed_batch_with<S: AsRef<[u32]>>(
    model: &Model,
    seqs: &[S],
    allow_non_finite: bool,
) -> Result<Vec<Vec<f32>>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let packed = Packed::new(seqs)?;
    let rows = model.forward_packed(&packed)?.to_vec2::<f32>()?;
    if allow_non_finite {
        return Ok(rows);
    }
    for (i, row) in rows.iter().enumerate() {
        if let Some((j, v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFiniteOutput(format!(
                "non-finite embedding for input {i} of the batch ({v} at dimension {j}): the \
                 model's output overflowed; its weights may be finite but are too large"
            )));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::{embed_batch, truncate};
    use crate::config::ModelConfig;
    use crate::model::Model;
    use crate::params::Params;
    use crate::Error;
    use candle_core::{DType, Device, Tensor};

    /// A model whose weights are all finite, and all 3e38, so its activations overflow
    /// (the first layer's sums pass f32's range): the embedding is an error naming the
    /// input, never a row of NaN; the same model with its usual weights embeds.
    #[test]
    fn finite_weights_that_overflow_are_an_error_not_nan() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 8, "n_heads": 2, "n_layers": 1, "max_len": 16, "input": {"kind": "bytes"},
               "head": {"kind": "embedding"}, "defaults": {"placement": "post"}}"#,
        )
        .unwrap();
        let p = Params::new(1, DType::F32, &Device::Cpu).frozen();
        let seqs = [vec![1u32, 2, 3], vec![4, 5]];
        let rows = embed_batch(&Model::new(&cfg, &p).unwrap(), &seqs).unwrap();
        assert!(rows.iter().flatten().all(|v| v.is_finite()));
        for (_, var) in p.vars() {
            var.set(&Tensor::full(3e38f32, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let model = Model::new(&cfg, &p).unwrap();
        let e = embed_batch(&model, &seqs).unwrap_err();
        assert!(matches!(e, Error::NonFiniteOutput(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("non-finite embedding for input 0"), "{msg}");
        assert!(msg.contains("overflowed"), "{msg}");
    }

    #[test]
    fn truncate_keeps_the_closing_token() {
        let mut ids = vec![101, 5, 6, 7, 102];
        truncate(&mut ids, 3);
        assert_eq!(ids, vec![101, 5, 102]);
        let mut short = vec![101, 102];
        truncate(&mut short, 3);
        assert_eq!(short, vec![101, 102]);
    }
}
