//! What a model family is: the [`Family`] trait one file per family implements, and the
//! `config.json` readers those files share (each error names the file and the key).

use std::fmt;
use std::path::Path;

use crate::config::ModelConfig;
use crate::pretrained::weights::Naming;
use crate::{Error, Result};

/// A Hugging Face model family: what formers needs to load its checkpoints.
pub trait Family: Sync {
    /// Its name: in messages and in a formers model directory's `formers.json` (`bert`).
    fn name(&self) -> &'static str;
    /// The `config.json` `model_type`s it reads.
    fn model_types(&self) -> &'static [&'static str];
    /// The formers config of the checkpoint in `dir`, whose `config.json` is `hf`
    /// (validated; errors name the family's keys).
    fn config(&self, hf: &serde_json::Value, dir: &Path) -> Result<ModelConfig>;
    /// How its checkpoints name formers parameters.
    fn naming(&self) -> Naming;
    /// Whether a causal LM's text is encoded with the tokenizer's special tokens (a prompt
    /// that must open with a BOS token); GPT-2 adds none. An encoder's inputs always get
    /// them, and truncation keeps the closing one (`embed`).
    fn lm_special_tokens(&self) -> bool {
        false
    }
}

impl fmt::Debug for dyn Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) fn checkpoint_error(path: &Path, msg: impl Into<String>) -> Error {
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
