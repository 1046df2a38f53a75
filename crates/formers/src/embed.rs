//! Sentence embeddings from an encoder with a pooled head: the token ids of one input
//! (checked or cut against a length), and one padding-free batch of inputs → one row each.
//! `formers embed` and `formers serve` both go through here, so they give the same vectors.

use tokenizers::Tokenizer;

use crate::config::{HeadSpec, ModelConfig};
use crate::model::{Model, Packed};
use crate::pretrained;
use crate::Result;

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
/// one row of the model's pooled head per sequence, in order.
pub fn embed_batch<S: AsRef<[u32]>>(model: &Model, seqs: &[S]) -> Result<Vec<Vec<f32>>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let packed = Packed::new(seqs)?;
    let emb = model.forward_packed(&packed)?;
    Ok(emb.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::truncate;

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
