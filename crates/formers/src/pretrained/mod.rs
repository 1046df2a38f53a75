//! Hugging Face checkpoints (`config.json`, `model.safetensors`, `tokenizer.json`) as formers
//! models. One file per family maps the config to a [`ModelConfig`] and formers parameter
//! names to checkpoint names; the model is built straight from the mapped file (nothing is
//! initialised), from the same blocks every other model uses.

pub mod bert;
mod checkpoint;
pub mod gpt2;
pub mod native;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::limits::Limits;
use crate::model::{Model, DTYPE};
use crate::params::Params;
use crate::{Error, Result};

pub use checkpoint::{Checkpoint, Naming, Take};

/// The model families formers loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// BERT-style encoders (BERT, MiniLM, sentence-transformers models built on them).
    Bert,
    /// GPT-2-style decoders.
    Gpt2,
}

/// A loaded checkpoint: the model, its tokenizer and where it came from.
#[derive(Debug)]
pub struct Pretrained {
    pub family: Family,
    pub config: ModelConfig,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
    /// Checkpoint tensors the model does not use (known-harmless ones left out).
    pub unused: Vec<String>,
    /// The model's parameter store (shared with `model`): its weights by formers name.
    pub params: Params,
    /// The compression steps applied to the weights (empty for a Hugging Face checkpoint).
    pub compression: Vec<native::Step>,
}

impl Pretrained {
    /// A warning naming the unused tensors, if any.
    pub fn unused_warning(&self) -> Option<String> {
        (!self.unused.is_empty()).then(|| {
            let n = self.unused.len();
            format!(
                "warning: {}: {n} tensor{} unused: {}",
                self.dir.join("model.safetensors").display(),
                if n == 1 { "" } else { "s" },
                self.unused.join(", ")
            )
        })
    }
}

fn checkpoint_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads a JSON file, naming it in every error.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::fsio::read_text_limited(path, crate::fsio::MAX_CONFIG_BYTES, "a JSON file")?;
    serde_json::from_str(&text).map_err(|e| checkpoint_error(path, format!("not valid JSON: {e}")))
}

/// Loads the checkpoint in `dir` within the default [`Limits`] (the machine's memory,
/// finite weights only).
pub fn load(dir: &Path) -> Result<Pretrained> {
    load_with(dir, &Limits::default())
}

/// Loads the checkpoint in `dir`. Before any tensor exists, the config is refused if its
/// model would not fit `limits.max_memory`; while the model is built, every weight is
/// checked to be finite unless `limits.allow_non_finite`, and a config that asks for
/// more (missing) tensors than the file holds values stops the build.
pub fn load_with(dir: &Path, limits: &Limits) -> Result<Pretrained> {
    if dir.join(native::MANIFEST).is_file() {
        return load_native(dir, limits);
    }
    let config_path = dir.join("config.json");
    let hf = read_json(&config_path)?;
    let model_type = str_key(&hf, "model_type", "", &config_path)?;
    let (family, config) = match model_type {
        "bert" => (Family::Bert, bert::config(&hf, dir)?),
        "gpt2" => (Family::Gpt2, gpt2::config(&hf, &config_path)?),
        other => {
            return Err(checkpoint_error(
                &config_path,
                format!("unsupported architecture (model_type `{other}`); formers loads `bert` and `gpt2` families"),
            ))
        }
    };
    let naming = match family {
        Family::Bert => bert::NAMING,
        Family::Gpt2 => gpt2::NAMING,
    };
    limits
        .check_inference(&config)
        .map_err(|e| hf_error(e, naming.keys, &config_path))?;
    assemble(dir, family, config, naming, limits, Vec::new())
}

/// Loads a formers model directory (`formers.json`), as [`load_with`].
fn load_native(dir: &Path, limits: &Limits) -> Result<Pretrained> {
    let (manifest, config) = native::Manifest::read(dir)?;
    limits.check_inference(&config)?;
    let family = manifest.family;
    assemble(
        dir,
        family,
        config,
        native::NAMING,
        limits,
        manifest.compression,
    )
}

/// The model of `config` built from `dir/model.safetensors` under `naming`, with the
/// tokenizer of `dir`.
fn assemble(
    dir: &Path,
    family: Family,
    config: ModelConfig,
    naming: Naming,
    limits: &Limits,
    compression: Vec<native::Step>,
) -> Result<Pretrained> {
    let (model, params, unused) = build(&config, &dir.join("model.safetensors"), naming, limits)?;
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), config.input.vocab_size())?;
    Ok(Pretrained {
        family,
        config,
        model,
        tokenizer,
        dir: dir.to_path_buf(),
        unused,
        params,
        compression,
    })
}

/// The model of `cfg` with its parameters taken from the safetensors file `path` under
/// `naming`, its parameter store, and the file's unused tensors.
fn build(
    cfg: &ModelConfig,
    path: &Path,
    naming: Naming,
    limits: &Limits,
) -> Result<(Model, Params, Vec<String>)> {
    let ckpt = Arc::new(Checkpoint::open(path, naming)?.with_limits(*limits));
    let params = Params::from_source(ckpt.clone(), DTYPE, &Device::Cpu);
    let model = Model::new(cfg, &params.frozen())?;
    Ok((model, params, ckpt.finish()?))
}

/// Reads `tokenizer.json` with padding and truncation off (batches are packed, and
/// over-long inputs are reported, not cut silently).
pub fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<Tokenizer> {
    let bytes = crate::fsio::read_limited(path, crate::fsio::MAX_TOKENIZER_BYTES, "a tokenizer")?;
    // Parsed as JSON first: `tokenizers` panics on a syntax error inside `decoder`
    // (fuzz/regressions/tokenizer/decoder-syntax-error.json); a parsed value cannot have one.
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| checkpoint_error(path, format!("unreadable tokenizer: {e}")))?;
    let mut tok: Tokenizer = serde_json::from_value(json)
        .map_err(|e| checkpoint_error(path, format!("unreadable tokenizer: {e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| checkpoint_error(path, format!("cannot turn truncation off: {e}")))?;
    let n = tok.get_vocab_size(true);
    if n > vocab_size {
        return Err(checkpoint_error(
            path,
            format!("tokenizer has {n} tokens but the model's vocabulary (config.json vocab_size) has {vocab_size}"),
        ));
    }
    Ok(tok)
}

/// Token ids of `text` (with the tokenizer's special tokens when `special`).
pub fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, special)
        .map_err(|e| Error::Input(format!("cannot tokenize {text:?}: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Text of token ids.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true)
        .map_err(|e| Error::Input(format!("cannot decode tokens: {e}")))
}

/// `layers.{i}.{module}.{weight|bias}` split into its parts.
pub(crate) fn layer_param(name: &str) -> Option<(usize, &str, &str)> {
    let (i, rest) = name.strip_prefix("layers.")?.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    matches!(param, "weight" | "bias").then_some((i.parse().ok()?, module, param))
}

/// `hf[key]` as a positive integer, or an error naming the file and key.
pub(crate) fn usize_key(hf: &serde_json::Value, key: &str, path: &Path) -> Result<usize> {
    hf[key]
        .as_u64()
        .filter(|&v| v > 0)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| {
            checkpoint_error(
                path,
                format!("`{key}` must be a positive integer, found {}", hf[key]),
            )
        })
}

/// `hf[key]` as an integer ≥ 0, or `default` when absent (or null); any other value is an
/// error naming the key, never a silent default.
pub(crate) fn count_key(
    hf: &serde_json::Value,
    key: &str,
    default: usize,
    path: &Path,
) -> Result<usize> {
    match &hf[key] {
        serde_json::Value::Null => Ok(default),
        v => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                checkpoint_error(
                    path,
                    format!("`{key}` must be a non-negative integer, found {v}"),
                )
            }),
    }
}

/// `hf[key]` as a string, or `default` when absent (or null); any other value is an error
/// naming the key.
pub(crate) fn str_key<'a>(
    hf: &'a serde_json::Value,
    key: &str,
    default: &'a str,
    path: &Path,
) -> Result<&'a str> {
    match &hf[key] {
        serde_json::Value::Null => Ok(default),
        v => v
            .as_str()
            .ok_or_else(|| checkpoint_error(path, format!("`{key}` must be a string, found {v}"))),
    }
}

/// `hf[key]` as a number, or `default` when absent (or null); range checks are the mapped
/// formers config's.
pub(crate) fn f64_key(hf: &serde_json::Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match &hf[key] {
        serde_json::Value::Null => Ok(default),
        v => v
            .as_f64()
            .ok_or_else(|| checkpoint_error(path, format!("`{key}` must be a number, found {v}"))),
    }
}

/// A formers config error about a mapped Hugging Face config (`path`), under the
/// Hugging Face name of the key where the family's `keys` (formers key → theirs) has one.
pub(crate) fn hf_error(e: Error, keys: &[(&str, &str)], path: &Path) -> Error {
    match e {
        Error::Config { key, msg } => {
            let name = keys
                .iter()
                .find(|(ours, _)| key == *ours)
                .map_or(format!("formers `{key}`"), |(_, theirs)| {
                    format!("`{theirs}`")
                });
            checkpoint_error(path, format!("{name}: {msg}"))
        }
        other => other,
    }
}
