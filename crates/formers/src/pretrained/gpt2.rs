//! GPT-2-family decoders (Radford et al. 2019): learned positions, pre-LN, GELU (tanh),
//! tied LM head. Hugging Face stores GPT-2's projections as `Conv1D` (`[in, out]`) with
//! q, k, v fused in `c_attn`; this file transposes and splits them.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::{checkpoint_error, f64_key, usize_key, Weights};
use crate::config::{
    Activation, FfnSpec, HeadSpec, InputSpec, LayerSpec, MixerSpec, ModelConfig, NormSpec,
    Placement, PositionSpec,
};
use crate::Result;

/// The formers config of a GPT-2 `config.json` (`hf`, read from `path`).
pub fn config(hf: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
    let d = usize_key(hf, "n_embd", path)?;
    let act = match hf["activation_function"].as_str().unwrap_or("gelu_new") {
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
        serde_json::Value::Null => 4 * d,
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
        head: HeadSpec::Lm { tied: true },
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
    };
    cfg.validate()
        .map_err(|e| checkpoint_error(path, format!("maps to an invalid model: {e}")))?;
    Ok(cfg)
}

/// Prefix some checkpoints put before every tensor name (dropped when looking names up).
pub const PREFIX: &str = "transformer.";

/// The checkpoint's tensors under formers names.
pub fn rename(cfg: &ModelConfig, w: &Weights) -> Result<BTreeMap<String, Tensor>> {
    let d = cfg.d_model;
    let hidden = cfg.defaults.ffn.hidden(d);
    let mut out = BTreeMap::new();
    out.insert(
        "embed.weight".into(),
        w.get("wte.weight", &[cfg.input.vocab_size(), d])?,
    );
    out.insert("pos.weight".into(), w.get("wpe.weight", &[cfg.max_len, d])?);
    let norm = |out: &mut BTreeMap<String, Tensor>, hf: &str, ours: &str| -> Result<()> {
        out.insert(
            format!("{ours}.weight"),
            w.get(&format!("{hf}.weight"), &[d])?,
        );
        out.insert(format!("{ours}.bias"), w.get(&format!("{hf}.bias"), &[d])?);
        Ok(())
    };
    // Conv1D `[in, out]` → Linear `[out, in]`.
    let conv = |out: &mut BTreeMap<String, Tensor>,
                hf: &str,
                ours: &str,
                d_in: usize,
                d_out: usize|
     -> Result<()> {
        out.insert(
            format!("{ours}.weight"),
            w.get(&format!("{hf}.weight"), &[d_in, d_out])?
                .t()?
                .contiguous()?,
        );
        out.insert(
            format!("{ours}.bias"),
            w.get(&format!("{hf}.bias"), &[d_out])?,
        );
        Ok(())
    };
    for i in 0..cfg.n_layers {
        let hf = format!("h.{i}");
        let us = format!("layers.{i}");
        norm(&mut out, &format!("{hf}.ln_1"), &format!("{us}.norm1"))?;
        let qkv_w = w
            .get(&format!("{hf}.attn.c_attn.weight"), &[d, 3 * d])?
            .t()?;
        let qkv_b = w.get(&format!("{hf}.attn.c_attn.bias"), &[3 * d])?;
        for (j, part) in ["q", "k", "v"].iter().enumerate() {
            out.insert(
                format!("{us}.mixer.{part}.weight"),
                qkv_w.narrow(0, j * d, d)?.contiguous()?,
            );
            out.insert(
                format!("{us}.mixer.{part}.bias"),
                qkv_b.narrow(0, j * d, d)?.contiguous()?,
            );
        }
        conv(
            &mut out,
            &format!("{hf}.attn.c_proj"),
            &format!("{us}.mixer.o"),
            d,
            d,
        )?;
        norm(&mut out, &format!("{hf}.ln_2"), &format!("{us}.norm2"))?;
        conv(
            &mut out,
            &format!("{hf}.mlp.c_fc"),
            &format!("{us}.ffn.up"),
            d,
            hidden,
        )?;
        conv(
            &mut out,
            &format!("{hf}.mlp.c_proj"),
            &format!("{us}.ffn.down"),
            hidden,
            d,
        )?;
    }
    norm(&mut out, "ln_f", "final_norm")?;
    Ok(out)
}
