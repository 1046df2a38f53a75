//! Hugging Face checkpoints (`config.json`, `model.safetensors`, `tokenizer.json`) as formers
//! models. One file per family implements [`Family`]: the `model_type`s it reads, its config
//! mapped to a [`ModelConfig`], the checkpoint's names for formers parameters ([`Naming`]) and
//! its tokenizer needs; [`FAMILIES`] lists them. The model is built straight from the mapped
//! file ([`weights`]: nothing is initialised), from the same blocks every other model uses.
//!
//! [`Family`] is a trait, not a table of function pointers: a family overrides only what
//! differs from the defaults (its tokenizer needs today), and a need the next family brings
//! becomes a defaulted method that touches no existing family file.
//!
//! What a loaded model *is* (an encoder with an embedding head, a causal LM) is asked of its
//! [`ModelConfig`] and head (`lm::is_causal_lm`, `embed::has_embedding_head`), never of its
//! family: nothing outside this module names a family.
//!
//! # Adding a family
//!
//! 1. One file `pretrained/<name>.rs`: a unit struct implementing [`Family`] (its `name`, as
//!    written in `formers.json`; its `model_types`; `config`, mapping `config.json` to a
//!    [`ModelConfig`] whose errors name the family's keys through [`Naming::keys`]; `naming`,
//!    formers parameter → stored tensor ([`Take`]) and the tensors safe to leave unused;
//!    `lm_special_tokens` if its LM prompts need them).
//! 2. One line `<name>::<Struct>,` in `families!` below, which declares the module and lists
//!    it in [`FAMILIES`]. The loader dispatches on `model_type` through the list; `formers
//!    compress` directories name the family and are read back through it; `lm`, `embed`,
//!    `serve` and `bench compress` ask the model's config; the fuzz targets and property tests
//!    (`fuzzing`) and the weights test iterate the list.
//! 3. Fixtures: `tests/fixtures/tiny-<name>/` (`config.json`, `model.safetensors`,
//!    `tokenizer.json`, and `transformers`' outputs in `reference.json` +
//!    `reference.safetensors`: texts, ids, `hidden_{i}`, then `logits_{i}` and `greedy` for
//!    a causal LM or `embedding_{i}` for an encoder), made by a committed script in
//!    `scripts/` (as `scripts/make_fixtures.py` makes `tiny-bert` and `tiny-gpt2`). Every
//!    family must have them: the fuzzing seeds, the weights test and
//!    `tests/pretrained.rs`'s `every_family_matches_transformers_on_its_fixture` read them
//!    by the family's name. Checks peculiar to the family may join them there.

mod families;
mod family;
pub mod native;
mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::limits::Limits;
use crate::model::{Model, DTYPE};
use crate::params::Params;
use crate::{Error, Result};

pub use families::{family, family_names, FAMILIES};
pub use family::Family;
pub use weights::{Naming, Take, Weights};

use family::{checkpoint_error, hf_error, read_json, str_key};

/// A loaded checkpoint: the model, its tokenizer and where it came from.
#[derive(Debug)]
pub struct Pretrained {
    pub family: &'static dyn Family,
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
    let family = FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_types().contains(&model_type))
        .ok_or_else(|| {
            let known: Vec<String> = FAMILIES
                .iter()
                .flat_map(|f| f.model_types())
                .map(|t| format!("`{t}`"))
                .collect();
            checkpoint_error(
                &config_path,
                format!(
                    "unsupported architecture (model_type `{model_type}`); formers loads {}",
                    known.join(", ")
                ),
            )
        })?;
    let config = family.config(&hf, dir)?;
    let naming = family.naming();
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
    family: &'static dyn Family,
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
    let weights = Arc::new(Weights::open(path, naming)?.with_limits(*limits));
    let params = Params::from_source(weights.clone(), DTYPE, &Device::Cpu);
    let model = Model::new(cfg, &params.frozen())?;
    Ok((model, params, weights.finish()?))
}

/// Reads `tokenizer.json` with padding and truncation off (batches are packed, and
/// over-long inputs are reported, not cut silently).
pub fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<Tokenizer> {
    let bytes = crate::fsio::read_limited(path, crate::fsio::MAX_TOKENIZER_BYTES, "a tokenizer")?;
    // Parsed as JSON first: `tokenizers` panics on a syntax error inside `decoder`
    // (fuzz/regressions/tokenizer/decoder-syntax-error.json); a parsed value cannot have one.
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| checkpoint_error(path, format!("unreadable tokenizer: {e}")))?;
    if let Some(fault) = template_fault(&json["post_processor"]) {
        return Err(checkpoint_error(
            path,
            format!("unusable tokenizer: {fault}"),
        ));
    }
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

/// What in a post-processor would panic when applied, if anything: `tokenizers` loads a
/// `TemplateProcessing` unchecked, then indexes its special tokens and sequences
/// (fuzz/regressions/tokenizer/template-missing-special-token.json).
fn template_fault(pp: &serde_json::Value) -> Option<String> {
    match pp["type"].as_str() {
        Some("Sequence") => pp["processors"].as_array()?.iter().find_map(template_fault),
        Some("TemplateProcessing") => {
            let known = pp["special_tokens"].as_object();
            for key in ["single", "pair"] {
                for piece in pp[key].as_array().into_iter().flatten() {
                    if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                        if !known.is_some_and(|k| k.contains_key(id)) {
                            return Some(format!(
                                "post_processor `{key}` uses special token `{id}`, which its `special_tokens` lacks"
                            ));
                        }
                    }
                    if key == "single" && piece["Sequence"]["id"].as_str() == Some("B") {
                        return Some("post_processor `single` uses a second sequence `B`".into());
                    }
                }
            }
            None
        }
        _ => None,
    }
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
