//! BERT-family encoders (Devlin et al. 2019): BERT, MiniLM and the sentence-transformers
//! models built on them. Absolute positions, token types, post-LN, GELU.

use std::collections::BTreeMap;
use std::path::Path;

use crate::pretrained::family::{checkpoint_error, count_key, f64_key, hf_error, layer_param, read_json, str_key, usize_key, Family};
use crate::pretrained::weights::{Naming, Take};
use crate::config::{HeadSpec, InputSpec, LayerSpec, ModelConfig, Placement, Pooling};
use crate::ffn::{Activation, FfnSpec};
use crate::mixer::MixerSpec;
use crate::norm::NormSpec;
use crate::params::InitSpec;
use crate::position::PositionSpec;
use crate::Result;

/// The BERT family.
#[derive(Debug)]
pub struct Bert;

impl Family for Bert {
    fn name(&self) -> &'static str {
        "bert"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["bert"]
    }

    fn config(&self, hf: &serde_json::Value, dir: &Path) -> Result<ModelConfig> {
        config(hf, dir)
    }

    fn naming(&self) -> Naming {
        NAMING
    }
}

/// The formers config of the BERT checkpoint in `dir` (its `config.json` is `hf`), with
/// sentence-transformers pooling from `modules.json` / `1_Pooling/config.json` if present.
fn config(hf: &serde_json::Value, dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let act = match str_key(hf, "hidden_act", "gelu", &path)? {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        other => {
            return Err(checkpoint_error(
                &path,
                format!("unsupported hidden_act `{other}`"),
            ))
        }
    };
    let p = str_key(hf, "position_embedding_type", "absolute", &path)?;
    if p != "absolute" {
        return Err(checkpoint_error(
            &path,
            format!("unsupported position_embedding_type `{p}` (only `absolute`)"),
        ));
    }
    let (pooling, normalize) = pooling(dir)?;
    let cfg = ModelConfig {
        d_model: usize_key(hf, "hidden_size", &path)?,
        n_heads: usize_key(hf, "num_attention_heads", &path)?,
        n_layers: usize_key(hf, "num_hidden_layers", &path)?,
        causal: false,
        max_len: usize_key(hf, "max_position_embeddings", &path)?,
        input: InputSpec::Tokens {
            vocab_size: usize_key(hf, "vocab_size", &path)?,
        },
        position: PositionSpec::Learned,
        head: HeadSpec::Embedding { pooling, normalize },
        final_norm: false,
        embed_dropout: 0.0,
        type_vocab_size: count_key(hf, "type_vocab_size", 2, &path)?,
        embed_norm: true,
        defaults: LayerSpec {
            mixer: MixerSpec::attention(),
            ffn: FfnSpec::mlp(Some(usize_key(hf, "intermediate_size", &path)?), act),
            norm: NormSpec::LayerNorm {
                eps: f64_key(hf, "layer_norm_eps", 1e-12, &path)?,
            },
            placement: Placement::Post,
            dropout: 0.0,
        },
        residual: crate::config::ResidualSpec::Plain,
        layers: BTreeMap::new(),
        init: InitSpec::default(),
    };
    cfg.validate().map_err(|e| hf_error(e, KEYS, &path))?;
    Ok(cfg)
}

/// Pooling as sentence-transformers would do it: `(mode, normalize)`; mean + normalise
/// when the directory has no sentence-transformers files.
fn pooling(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((Pooling::Mean, true));
    }
    let modules = read_json(&modules_path)?;
    let list = modules.as_array().cloned().unwrap_or_default();
    let kind = |m: &serde_json::Value| m["type"].as_str().unwrap_or("").to_string();
    let normalize = list.iter().any(|m| kind(m).ends_with("Normalize"));
    let pool_dir = list
        .iter()
        .find(|m| kind(m).ends_with("Pooling"))
        .and_then(|m| m["path"].as_str())
        .unwrap_or("1_Pooling");
    let pool_path = dir.join(inside(pool_dir, &modules_path)?).join("config.json");
    if !pool_path.is_file() {
        return Ok((Pooling::Mean, normalize));
    }
    let p = read_json(&pool_path)?;
    let on = |k: &str| p[k].as_bool().unwrap_or(false);
    let mode = if on("pooling_mode_mean_tokens") {
        Pooling::Mean
    } else if on("pooling_mode_cls_token") {
        Pooling::First
    } else {
        return Err(checkpoint_error(
            &pool_path,
            "unsupported pooling mode: formers pools by mean tokens or the CLS token",
        ));
    };
    Ok((mode, normalize))
}

/// `path`, named by the checkpoint file `from`, as a path inside the checkpoint's
/// directory: plain names only (no `..`, no root, no drive), else an error naming both.
fn inside<'a>(path: &'a str, from: &Path) -> Result<&'a Path> {
    use std::path::Component;
    let p = Path::new(path);
    if p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Ok(p);
    }
    Err(checkpoint_error(
        from,
        format!("path `{path}` leaves the model directory; a checkpoint may name only paths inside it"),
    ))
}

/// How BERT checkpoints name formers parameters (`bert.` is dropped where present).
const NAMING: Naming = Naming {
    family: "BERT",
    prefix: "bert.",
    take,
    harmless,
    keys: KEYS,
};

/// Formers config keys → BERT `config.json` keys.
const KEYS: &[(&str, &str)] = &[
    ("d_model", "hidden_size"),
    ("n_heads", "num_attention_heads"),
    ("n_layers", "num_hidden_layers"),
    ("max_len", "max_position_embeddings"),
    ("input.vocab_size", "vocab_size"),
    ("type_vocab_size", "type_vocab_size"),
    ("defaults.ffn.hidden", "intermediate_size"),
    ("defaults.norm.eps", "layer_norm_eps"),
];

/// The checkpoint tensor of formers parameter `ours`.
fn take(ours: &str) -> Option<Take> {
    let name = match ours {
        "embed.weight" => "embeddings.word_embeddings.weight".to_string(),
        "pos.weight" => "embeddings.position_embeddings.weight".to_string(),
        "type_embed.weight" => "embeddings.token_type_embeddings.weight".to_string(),
        _ => {
            if let Some(param) = ours.strip_prefix("embed_norm.") {
                format!("embeddings.LayerNorm.{param}")
            } else {
                let (i, module, param) = layer_param(ours)?;
                let hf = match module {
                    "mixer.q" => "attention.self.query",
                    "mixer.k" => "attention.self.key",
                    "mixer.v" => "attention.self.value",
                    "mixer.o" => "attention.output.dense",
                    "norm1" => "attention.output.LayerNorm",
                    "ffn.up" => "intermediate.dense",
                    "ffn.down" => "output.dense",
                    "norm2" => "output.LayerNorm",
                    _ => return None,
                };
                format!("encoder.layer.{i}.{hf}.{param}")
            }
        }
    };
    Some(Take::same(name))
}

/// Stored tensors formers leaves unused on purpose: the `position_ids` buffer and the
/// pooler (sentence-transformers pools the hidden states itself; formers has no pooler).
fn harmless(name: &str) -> bool {
    matches!(
        name,
        "embeddings.position_ids" | "pooler.dense.weight" | "pooler.dense.bias"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooling `path` outside the model directory is refused, naming modules.json and
    /// the path; one inside is read.
    #[test]
    fn modules_json_paths_stay_inside_the_model_directory() {
        let dir = std::env::temp_dir().join(format!("formers-bert-modules-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pool")).unwrap();
        std::fs::write(
            dir.join("pool/config.json"),
            r#"{"pooling_mode_cls_token": true}"#,
        )
        .unwrap();
        let modules = |path: &str| {
            let m = format!(
                r#"[{{"type": "sentence_transformers.models.Pooling", "path": "{path}"}}]"#
            );
            std::fs::write(dir.join("modules.json"), m).unwrap();
            pooling(&dir)
        };
        for bad in ["../../../../etc", "/etc", "pool/../../x", ".."] {
            let e = modules(bad).unwrap_err().to_string();
            assert!(e.contains("modules.json") && e.contains(bad), "{bad}: {e}");
            assert!(e.contains("leaves the model directory"), "{e}");
        }
        assert_eq!(modules("pool").unwrap(), (Pooling::First, false));
        assert_eq!(modules("./pool").unwrap(), (Pooling::First, false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
