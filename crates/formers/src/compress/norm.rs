//! Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (Jiang et al. 2023, "Pre-RMSNorm and
//! Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers").
//!
//! `LN(x) = γ ⊙ RMS-normalised(x − mean x) + β`. If every tensor written into the residual
//! stream has zero mean — centred embedding rows, and centred outputs of the matrices that
//! write into the stream (attention `o`, MLP `down`) — the stream stays zero-mean and the
//! centring is a no-op; `β` then folds into the biases of the linear layers that read the
//! norm (`b ← b + W β`). What is left is RMSNorm, and on zero-mean vectors CRMSNorm equals
//! RMSNorm. The converted model computes the same function.
//!
//! An LM head reads the final norm too: its β becomes a bias per vocabulary entry, so the
//! head gets one, and a tied head is untied first (the embedding table the input reads is
//! centred, the head keeps the original).
//!
//! formers keeps the residual stream d-wide after conversion to CRMSNorm (the norm reads
//! d−1 coordinates, but storage is not compressed).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};

use crate::config::{HeadSpec, ModelConfig, Placement};
use crate::mixer::MixerSpec;
use crate::norm::NormSpec;
use crate::position::PositionSpec;
use crate::pretrained::native::{Manifest, Step, Stored};
use crate::{Error, Result};

/// The norm a Pre-LN model is converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    RmsNorm,
    CrmsNorm,
}

impl Target {
    /// The name on the command line and in `formers.json`.
    pub fn name(self) -> &'static str {
        match self {
            Target::RmsNorm => "rms",
            Target::CrmsNorm => "crms",
        }
    }
}

/// The converted config and weights of the Pre-LN model `cfg` with weights `w`.
pub fn convert_pre_ln(
    cfg: &ModelConfig,
    w: &BTreeMap<String, Tensor>,
    target: Target,
) -> Result<(ModelConfig, BTreeMap<String, Tensor>)> {
    check(cfg)?;
    let mut out: BTreeMap<String, Tensor> = w
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F64)?)))
        .collect::<Result<_>>()?;
    let mut head = cfg.head.clone();
    if let HeadSpec::Lm { tied, bias } = &mut head {
        if *tied {
            let table = out.get("embed.weight").cloned().ok_or_else(|| {
                Error::config("embed.weight", "weight missing for the conversion")
            })?;
            out.insert("head.weight".into(), table);
            *tied = false;
        }
        if !*bias {
            let vocab = out
                .get("head.weight")
                .ok_or_else(|| Error::config("head.weight", "weight missing for the conversion"))?
                .dim(0)?;
            let zeros = Tensor::zeros(vocab, DType::F64, &candle_core::Device::Cpu)?;
            out.insert("head.bias".into(), zeros);
            *bias = true;
        }
    }
    let get = |out: &BTreeMap<String, Tensor>, name: &str| {
        out.get(name)
            .cloned()
            .ok_or_else(|| Error::config(name, "weight missing for the conversion"))
    };
    // Everything added to the residual stream gets zero mean over the model dimension.
    for name in ["embed.weight", "type_embed.weight", "pos.weight"] {
        if let Some(t) = out.get(name) {
            let centred = t.broadcast_sub(&t.mean_keepdim(D::Minus1)?)?;
            out.insert(name.to_string(), centred);
        }
    }
    for i in 0..cfg.n_layers {
        for writer in ["mixer.o", "ffn.down"] {
            let wname = format!("layers.{i}.{writer}.weight");
            let t = get(&out, &wname)?;
            out.insert(wname, t.broadcast_sub(&t.mean_keepdim(0)?)?);
            let bname = format!("layers.{i}.{writer}.bias");
            if let Some(b) = out.get(&bname) {
                let centred = b.broadcast_sub(&b.mean_keepdim(0)?)?;
                out.insert(bname, centred);
            }
        }
        // β of each norm folds into the biases of the layers reading it.
        fold_beta(
            &mut out,
            &format!("layers.{i}.norm1"),
            &["mixer.q", "mixer.k", "mixer.v", "mixer.gate"].map(|r| format!("layers.{i}.{r}")),
        )?;
        fold_beta(
            &mut out,
            &format!("layers.{i}.norm2"),
            &["ffn.up", "ffn.gate"].map(|r| format!("layers.{i}.{r}")),
        )?;
    }
    fold_beta(&mut out, "final_norm", &["head".to_string()])?;
    let mut new = cfg.clone();
    new.head = head;
    let eps = match cfg.defaults.norm {
        NormSpec::LayerNorm { eps } | NormSpec::RmsNorm { eps } | NormSpec::CrmsNorm { eps } => eps,
    };
    new.defaults.norm = match target {
        Target::RmsNorm => NormSpec::RmsNorm { eps },
        Target::CrmsNorm => NormSpec::CrmsNorm { eps },
    };
    for o in new.layers.values_mut() {
        o.norm = None;
    }
    let dtype = w.values().next().map_or(DType::F32, Tensor::dtype);
    let out = out
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    Ok((new, out))
}

/// Removes `{norm}.bias` (β) and adds `W β` to the bias of every reader present.
fn fold_beta(out: &mut BTreeMap<String, Tensor>, norm: &str, readers: &[String]) -> Result<()> {
    let beta = out
        .remove(&format!("{norm}.bias"))
        .ok_or_else(|| Error::config(format!("{norm}.bias"), "a LayerNorm bias is expected"))?;
    for r in readers {
        let Some(weight) = out.get(&format!("{r}.weight")).cloned() else {
            continue;
        };
        // W β, with W = weight · factor for low-rank layers.
        let mut wb = beta.unsqueeze(1)?;
        if let Some(f) = out.get(&format!("{r}.factor")) {
            wb = f.matmul(&wb)?;
        }
        let wb = weight.matmul(&wb)?.squeeze(1)?;
        let bname = format!("{r}.bias");
        let b = out.get(&bname).ok_or_else(|| {
            Error::config(
                bname.clone(),
                "the layer reading a LayerNorm needs a bias to absorb β",
            )
        })?;
        let folded = (b + wb)?;
        out.insert(bname, folded);
    }
    Ok(())
}

/// The manifest and tensors of the loaded model `p` converted to `target` (refused for a
/// quantised model: its int8 layers are no longer the weights the conversion folds).
pub fn convert_pretrained(
    p: &crate::pretrained::Pretrained,
    target: Target,
) -> Result<(Manifest, BTreeMap<String, Stored>)> {
    super::refuse_after(
        p,
        |s| matches!(s, Step::Quantize { .. }),
        "the model is quantised; convert its norms before quantising",
    )?;
    super::refuse_after(
        p,
        |s| matches!(s, Step::Norm { .. }),
        "the model's norms are already converted",
    )?;
    let (cfg, w) = convert_pre_ln(&p.config, &p.params.tensors(), target)?;
    let step = Step::Norm {
        to: target.name().into(),
    };
    Ok((super::manifest_after(p, &cfg, step), super::stored_f32(&w)?))
}

/// Whether `cfg` converts exactly (a Pre-LN stack of LayerNorms with a final norm, ...).
pub fn converts(cfg: &ModelConfig) -> bool {
    check(cfg).is_ok()
}

/// Which models convert exactly.
fn check(cfg: &ModelConfig) -> Result<()> {
    if let Some(i) = (0..cfg.n_layers).find(|&i| cfg.layer(i).placement != Placement::Pre) {
        return Err(Error::config(
            format!("layers.{i}.placement"),
            "the layer normalises after its residual add (Post-LN, as BERT): the exact conversion starts from Pre-LN models (GPT-2 family, formers' pre-norm models)",
        ));
    }
    if !cfg.final_norm || cfg.embed_norm {
        return Err(Error::config(
            "final_norm",
            "conversion needs a Pre-LN stack: a final norm and no embedding norm",
        ));
    }
    if !matches!(
        cfg.head,
        HeadSpec::Classification { .. } | HeadSpec::Lm { .. }
    ) {
        return Err(Error::config(
            "head",
            "conversion folds the final norm's bias into the head: it needs a classification or LM head",
        ));
    }
    if cfg.position == PositionSpec::Sinusoidal {
        return Err(Error::config(
            "position",
            "fixed sinusoids cannot be centred; use learned, rope, alibi or none",
        ));
    }
    for i in 0..cfg.n_layers {
        let l = cfg.layer(i);
        if !matches!(l.norm, NormSpec::LayerNorm { .. }) {
            return Err(Error::config(
                format!("layers.{i}.norm"),
                "conversion starts from LayerNorm layers",
            ));
        }
        if matches!(l.mixer, MixerSpec::Pool(_)) {
            return Err(Error::config(
                format!("layers.{i}.mixer"),
                "the pooling mixer writes its normalised input into the stream, which is not zero-mean",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ids_tensor, Model};
    use crate::params::Params;
    use crate::rng::Rng;
    use crate::testutil::fixture;
    use candle_core::Device;

    #[test]
    fn converted_models_compute_the_same_function() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 16, "n_heads": 2, "n_layers": 3, "max_len": 20, "input": {"kind": "tokens", "vocab_size": 13},
               "type_vocab_size": 2, "head": {"kind": "classification", "n_classes": 4, "pooling": "mean"},
               "defaults": {"mixer": {"kind": "attention", "gate": true}, "ffn": {"kind": "mlp", "hidden": 24, "activation": "swiglu"}},
               "layers": {"1": {"mixer": {"kind": "local", "window": 2}, "ffn": {"kind": "mlp", "hidden": 24, "rank": 5}}}}"#,
        )
        .unwrap();
        // In f64 the conversion is exact up to rounding, so the bar is 1e-10, not f32's 1e-5.
        let p = Params::new(4, DType::F64, &Device::Cpu);
        let model = Model::new(&cfg, &p.frozen()).unwrap();
        // Non-trivial norm gains and biases, so that folding them matters.
        let mut r = Rng::new(9);
        for (name, var) in p.vars() {
            if name.contains("norm") || name.ends_with("bias") {
                let v: Vec<f64> = (0..var.elem_count())
                    .map(|_| r.normal() * 0.5 + if name.ends_with("weight") { 1.0 } else { 0.0 })
                    .collect();
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let ids: Vec<u32> = (0..17).map(|_| r.below(13) as u32).collect();
        let x = ids_tensor(&ids).unwrap();
        let want = model.forward(&x, None, None).unwrap();
        for target in [Target::RmsNorm, Target::CrmsNorm] {
            let (cfg2, w2) = convert_pre_ln(&cfg, &p.tensors(), target).unwrap();
            let p2 = Params::new(0, DType::F64, &Device::Cpu);
            let m2 = Model::new(&cfg2, &p2.frozen()).unwrap();
            p2.assign(&w2, std::path::Path::new("converted")).unwrap();
            let got = m2.forward(&x, None, None).unwrap();
            let err = crate::testutil::max_abs(&got, &want);
            assert!(err < 1e-10, "{target:?}: {err}");
            assert!(!w2.keys().any(|k| k.contains("norm") && k.ends_with("bias")));
        }
    }

    #[test]
    fn unconvertible_models_are_refused_with_the_reason() {
        let cfg = ModelConfig::from_json(
            r#"{"d_model": 8, "n_heads": 2, "n_layers": 1, "input": {"kind": "bytes"}, "head": {"kind": "embedding"}}"#,
        )
        .unwrap();
        let e = convert_pre_ln(&cfg, &BTreeMap::new(), Target::RmsNorm)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`head`"), "{e}");
        // BERT normalises after each residual add.
        let bert = crate::pretrained::load(&fixture("tiny-bert")).unwrap();
        let e = convert_pre_ln(&bert.config, &bert.params.tensors(), Target::RmsNorm)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Post-LN"), "{e}");
    }

    #[test]
    fn a_gpt2_checkpoint_converts_with_an_untied_biased_head() {
        let p = crate::pretrained::load(&fixture("tiny-gpt2")).unwrap();
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 97).collect();
        let x = ids_tensor(&ids).unwrap();
        let want = p.model.forward(&x, None, None).unwrap();
        for target in [Target::RmsNorm, Target::CrmsNorm] {
            let (cfg2, w2) = convert_pre_ln(&p.config, &p.params.tensors(), target).unwrap();
            assert_eq!(
                cfg2.head,
                HeadSpec::Lm {
                    tied: false,
                    bias: true
                }
            );
            let p2 = Params::new(0, DType::F32, &Device::Cpu);
            let m2 = Model::new(&cfg2, &p2.frozen()).unwrap();
            p2.assign(&w2, std::path::Path::new("converted")).unwrap();
            let got = m2.forward(&x, None, None).unwrap();
            // The same function in f32: only rounding differs (the fixture's logits are O(1)).
            let err = crate::testutil::max_abs(&got, &want);
            assert!(err < 1e-4, "{target:?}: {err}");
        }
    }
}
