//! A causal language model ready to continue text, whichever directory it comes from: a
//! `formers train` run directory (a byte-level LM: bytes in, bytes out) or a
//! pretrained causal LM (its `tokenizer.json`). `formers generate` and `formers serve`
//! load through [`load`], so both take the same directories.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::{HeadSpec, InputSpec, ModelConfig};
use crate::limits::Limits;
use crate::model::Model;
use crate::pretrained::{self, Family};
use crate::train::run::{load_trained_with, RunRecord};
use crate::{Error, Result};

/// How text becomes token ids and back.
#[derive(Debug, Clone)]
pub enum Codec {
    /// One token per byte (formers' byte-level models).
    Bytes,
    /// A Hugging Face tokenizer, and whether text gets its special tokens (as the
    /// family's [`Family`] says: `lm_special_tokens`).
    Tokenizer {
        tokenizer: Box<Tokenizer>,
        special: bool,
    },
}

impl Codec {
    /// The codec of a pretrained model of `family` with `tokenizer`.
    pub fn of(family: &dyn Family, tokenizer: Tokenizer) -> Codec {
        Codec::Tokenizer {
            tokenizer: Box::new(tokenizer),
            special: family.lm_special_tokens(),
        }
    }

    /// The token ids of `text` (special tokens added only where the family needs them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match self {
            Codec::Bytes => text.bytes().map(u32::from).collect(),
            Codec::Tokenizer { tokenizer, special } => {
                pretrained::encode(tokenizer, text, *special)?
            }
        })
    }

    /// The text of `ids`; bytes that are not UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(match self {
            Codec::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&t| t as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Codec::Tokenizer { tokenizer, .. } => pretrained::decode(tokenizer, ids)?,
        })
    }
}

/// A loaded causal LM.
#[derive(Debug)]
pub struct Lm {
    /// The model (causal, with an LM head).
    pub model: Model,
    /// Its codec.
    pub codec: Codec,
    /// A warning about tensors the checkpoint holds and the model left unused.
    pub unused_warning: Option<String>,
}

/// Whether `cfg` is a causal LM: causal attention and an LM head.
pub fn is_causal_lm(cfg: &ModelConfig) -> bool {
    cfg.is_causal() && matches!(cfg.head, HeadSpec::Lm { .. })
}

/// Loads the causal LM in `dir` within `limits`: a run directory (it holds `run.json`)
/// whose model is causal and reads bytes, or a pretrained model that [`is_causal_lm`].
/// Anything else is an error naming the directory and what it holds instead.
pub fn load(dir: &Path, limits: &Limits) -> Result<Lm> {
    let refuse = |msg: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    if dir.join(RunRecord::FILE).is_file() {
        let (rec, model) = load_trained_with(dir, limits)?;
        if !rec.config.model.is_causal() {
            return Err(refuse(
                "not a causal LM (its attention is bidirectional)".into(),
            ));
        }
        if rec.config.model.input != InputSpec::Bytes {
            return Err(refuse(
                "the model must take bytes to read and write text".into(),
            ));
        }
        return Ok(Lm {
            model,
            codec: Codec::Bytes,
            unused_warning: None,
        });
    }
    let p = pretrained::load_with(dir, limits)?;
    if !is_causal_lm(&p.config) {
        let what = match p.config.is_causal() {
            false => "encoder (bidirectional attention)",
            true => "model without an LM head",
        };
        return Err(refuse(format!(
            "a {} {what}, not a causal LM",
            p.family.name()
        )));
    }
    Ok(Lm {
        unused_warning: p.unused_warning(),
        model: p.model,
        codec: Codec::of(p.family, p.tokenizer),
    })
}
