//! BERT-family encoders (Devlin et al. 2019): BERT, MiniLM and the sentence-transformers
//! models built on them. Absolute positions, token types, post-LN, GELU.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::{checkpoint_error, f64_key, read_json, usize_key, Weights};
use crate::config::{
    Activation, FfnSpec, HeadSpec, InputSpec, LayerSpec, MixerSpec, ModelConfig, NormSpec,
    Placement, Pooling, PositionSpec,
};
use crate::Result;

/// The formers config of the BERT checkpoint in `dir` (its `config.json` is `hf`), with
/// sentence-transformers pooling from `modules.json` / `1_Pooling/config.json` if present.
pub fn config(hf: &serde_json::Value, dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let act = match hf["hidden_act"].as_str().unwrap_or("gelu") {
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
    if let Some(p) = hf["position_embedding_type"].as_str() {
        if p != "absolute" {
            return Err(checkpoint_error(
                &path,
                format!("unsupported position_embedding_type `{p}` (only `absolute`)"),
            ));
        }
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
        type_vocab_size: hf["type_vocab_size"].as_u64().unwrap_or(2) as usize,
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
    };
    cfg.validate()
        .map_err(|e| checkpoint_error(&path, format!("maps to an invalid model: {e}")))?;
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
    let pool_path = dir.join(pool_dir).join("config.json");
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

/// Prefix some checkpoints put before every tensor name (dropped when looking names up).
pub const PREFIX: &str = "bert.";

/// The checkpoint's tensors under formers names.
pub fn rename(cfg: &ModelConfig, w: &Weights) -> Result<BTreeMap<String, Tensor>> {
    let d = cfg.d_model;
    let hidden = cfg.defaults.ffn.hidden(d);
    let mut out = BTreeMap::new();
    out.insert(
        "embed.weight".into(),
        w.get(
            "embeddings.word_embeddings.weight",
            &[cfg.input.vocab_size(), d],
        )?,
    );
    out.insert(
        "pos.weight".into(),
        w.get("embeddings.position_embeddings.weight", &[cfg.max_len, d])?,
    );
    out.insert(
        "type_embed.weight".into(),
        w.get(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, d],
        )?,
    );
    linear_or_norm(
        w,
        &mut out,
        "embeddings.LayerNorm",
        "embed_norm",
        &[d],
        None,
    )?;
    for i in 0..cfg.n_layers {
        let hf = format!("encoder.layer.{i}");
        let us = format!("layers.{i}");
        for (h, o) in [
            ("attention.self.query", "mixer.q"),
            ("attention.self.key", "mixer.k"),
            ("attention.self.value", "mixer.v"),
            ("attention.output.dense", "mixer.o"),
        ] {
            linear_or_norm(
                w,
                &mut out,
                &format!("{hf}.{h}"),
                &format!("{us}.{o}"),
                &[d, d],
                Some(d),
            )?;
        }
        linear_or_norm(
            w,
            &mut out,
            &format!("{hf}.attention.output.LayerNorm"),
            &format!("{us}.norm1"),
            &[d],
            None,
        )?;
        linear_or_norm(
            w,
            &mut out,
            &format!("{hf}.intermediate.dense"),
            &format!("{us}.ffn.up"),
            &[hidden, d],
            Some(hidden),
        )?;
        linear_or_norm(
            w,
            &mut out,
            &format!("{hf}.output.dense"),
            &format!("{us}.ffn.down"),
            &[d, hidden],
            Some(d),
        )?;
        linear_or_norm(
            w,
            &mut out,
            &format!("{hf}.output.LayerNorm"),
            &format!("{us}.norm2"),
            &[d],
            None,
        )?;
    }
    Ok(out)
}

/// Copies `hf.weight` (shape `weight`) and `hf.bias` (length `bias`, or `weight[0]` for norms).
fn linear_or_norm(
    w: &Weights,
    out: &mut BTreeMap<String, Tensor>,
    hf: &str,
    ours: &str,
    weight: &[usize],
    bias: Option<usize>,
) -> Result<()> {
    out.insert(
        format!("{ours}.weight"),
        w.get(&format!("{hf}.weight"), weight)?,
    );
    let b = bias.unwrap_or(weight[0]);
    out.insert(format!("{ours}.bias"), w.get(&format!("{hf}.bias"), &[b])?);
    Ok(())
}
