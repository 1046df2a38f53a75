//! GPT-2-family decoders (Radford et al. 2019): learned positions, pre-LN, GELU (tanh),
//! tied LM head. Hugging Face stores GPT-2's projections as `Conv1D` (`[in, out]`) with
//! q, k, v fused in `c_attn`; the name map here says to transpose and split them.

use std::collections::BTreeMap;
use std::path::Path;

use crate::pretrained::family::{checkpoint_error, f64_key, hf_error, layer_param, str_key, usize_key, Family};
use crate::pretrained::weights::{Naming, Take};
use crate::config::{HeadSpec, InputSpec, LayerSpec, ModelConfig, Placement};
use crate::ffn::{Activation, FfnSpec};
use crate::mixer::MixerSpec;
use crate::norm::NormSpec;
use crate::params::InitSpec;
use crate::position::PositionSpec;
use crate::Result;

/// The GPT-2 family.
#[derive(Debug)]
pub struct Gpt2;

impl Family for Gpt2 {
    fn name(&self) -> &'static str {
        "gpt2"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["gpt2"]
    }

    fn config(&self, hf: &serde_json::Value, dir: &Path) -> Result<ModelConfig> {
        config(hf, &dir.join("config.json"))
    }

    fn naming(&self) -> Naming {
        NAMING
    }
}

/// The formers config of a GPT-2 `config.json` (`hf`, read from `path`).
fn config(hf: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
    let d = usize_key(hf, "n_embd", path)?;
    let act = match str_key(hf, "activation_function", "gelu_new", path)? {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::Gelu,
        "relu" => Activation::Relu,
        other => {
            return Err(checkpoint_error(
                path,
                format!("unsupported activation_function `{other}`"),
            ))
        }
    };
    let hidden = match &hf["n_inner"] {
        serde_json::Value::Null => d.saturating_mul(4),
        _ => usize_key(hf, "n_inner", path)?,
    };
    let cfg = ModelConfig {
        d_model: d,
        n_heads: usize_key(hf, "n_head", path)?,
        n_layers: usize_key(hf, "n_layer", path)?,
        causal: true,
        max_len: usize_key(hf, "n_positions", path)?,
        input: InputSpec::Tokens {
            vocab_size: usize_key(hf, "vocab_size", path)?,
        },
        position: PositionSpec::Learned,
        head: HeadSpec::Lm {
            tied: true,
            bias: false,
        },
        final_norm: true,
        embed_dropout: 0.0,
        type_vocab_size: 0,
        embed_norm: false,
        defaults: LayerSpec {
            mixer: MixerSpec::attention(),
            ffn: FfnSpec::mlp(Some(hidden), act),
            norm: NormSpec::LayerNorm {
                eps: f64_key(hf, "layer_norm_epsilon", 1e-5, path)?,
            },
            placement: Placement::Pre,
            dropout: 0.0,
        },
        residual: crate::config::ResidualSpec::Plain,
        layers: BTreeMap::new(),
        init: InitSpec::default(),
    };
    cfg.validate().map_err(|e| hf_error(e, KEYS, path))?;
    Ok(cfg)
}

/// How GPT-2 checkpoints name formers parameters (`transformer.` is dropped where present).
const NAMING: Naming = Naming {
    family: "GPT-2",
    prefix: "transformer.",
    take,
    harmless,
    keys: KEYS,
};

/// Formers config keys → GPT-2 `config.json` keys.
const KEYS: &[(&str, &str)] = &[
    ("d_model", "n_embd"),
    ("n_heads", "n_head"),
    ("n_layers", "n_layer"),
    ("max_len", "n_positions"),
    ("input.vocab_size", "vocab_size"),
    ("defaults.ffn.hidden", "n_inner"),
    ("defaults.norm.eps", "layer_norm_epsilon"),
];

/// The checkpoint tensor of formers parameter `ours`: `Conv1D` weights are transposed,
/// and q, k, v are the three thirds of `c_attn`.
fn take(ours: &str) -> Option<Take> {
    match ours {
        "embed.weight" => return Some(Take::same("wte.weight")),
        "pos.weight" => return Some(Take::same("wpe.weight")),
        _ => {}
    }
    if let Some(param) = ours.strip_prefix("final_norm.") {
        return Some(Take::same(format!("ln_f.{param}")));
    }
    let (i, module, param) = layer_param(ours)?;
    // (name, is a Conv1D, slice of a fused tensor)
    let (hf, conv, part) = match module {
        "norm1" => ("ln_1", false, None),
        "norm2" => ("ln_2", false, None),
        "mixer.q" => ("attn.c_attn", true, Some((0, 3))),
        "mixer.k" => ("attn.c_attn", true, Some((1, 3))),
        "mixer.v" => ("attn.c_attn", true, Some((2, 3))),
        "mixer.o" => ("attn.c_proj", true, None),
        "ffn.up" => ("mlp.c_fc", true, None),
        "ffn.down" => ("mlp.c_proj", true, None),
        _ => return None,
    };
    Some(Take {
        name: format!("h.{i}.{hf}.{param}"),
        transpose: conv && param == "weight",
        part,
    })
}

/// Stored tensors formers leaves unused on purpose: the causal-mask buffers `attn.bias` /
/// `attn.masked_bias` and `lm_head.weight` (tied to `wte`, which formers uses).
fn harmless(name: &str) -> bool {
    name == "lm_head.weight"
        || name.strip_prefix("h.").is_some_and(|rest| {
            rest.split_once('.')
                .is_some_and(|(_, p)| p == "attn.bias" || p == "attn.masked_bias")
        })
}
