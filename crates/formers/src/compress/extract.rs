//! MatFormer sub-model extraction (Devvrit et al. 2023, "MatFormer", Mix'n'Match): each
//! nested MLP cut to one of its granularities becomes a dense MLP of that width — the first
//! `w` rows of `up`, the first `w` columns of `down` — so the sub-model is physically
//! smaller and computes what the nested model computes at that granularity.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::ffn::FfnSpec;
use crate::fsio;
use crate::train::checkpoint;
use crate::train::run::RunRecord;
use crate::{Error, Result};

/// Which granularity each nested layer keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Each layer's configured `active` one (the model's own Mix'n'Match).
    Configured,
    /// Index `g` in every nested layer (clamped to a layer's list, as
    /// `Model::set_granularity` does); refused unless some layer has it.
    All(usize),
    /// One index per layer; a layer that is not nested has only index 0.
    PerLayer(Vec<usize>),
}

/// The hidden width each layer keeps under `choice`: `None` for a layer that is not
/// nested (left as it is). Refused when no layer is nested or an index does not exist.
pub fn widths(cfg: &ModelConfig, choice: &Choice) -> Result<Vec<Option<usize>>> {
    let nested: Vec<Option<(Vec<f64>, usize, usize)>> = (0..cfg.n_layers)
        .map(|i| match cfg.layer(i).ffn {
            ref f @ FfnSpec::MatFormer {
                ref granularities,
                active,
                ..
            } => Some((
                granularities.clone(),
                active.unwrap_or(granularities.len() - 1),
                f.hidden(cfg.d_model),
            )),
            FfnSpec::Mlp { .. } => None,
        })
        .collect();
    let most = nested.iter().flatten().map(|(g, ..)| g.len()).max();
    let Some(most) = most else {
        return Err(Error::Input(
            "no layer has a MatFormer MLP (`\"kind\": \"matformer\"`): nothing to extract".into(),
        ));
    };
    if let Choice::All(g) = choice {
        if *g >= most {
            return Err(Error::Input(format!(
                "--granularity {g}: the nested layers have {most} granularities (0..={})",
                most - 1
            )));
        }
    }
    if let Choice::PerLayer(gs) = choice {
        if gs.len() != cfg.n_layers {
            return Err(Error::Input(format!(
                "--per-layer has {} entries; the model has {} layers",
                gs.len(),
                cfg.n_layers
            )));
        }
    }
    nested
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let count = layer.as_ref().map_or(1, |(g, ..)| g.len());
            let index = match choice {
                Choice::Configured => layer.as_ref().map_or(0, |(_, a, _)| *a),
                Choice::All(g) => (*g).min(count - 1),
                Choice::PerLayer(gs) => gs[i],
            };
            if index >= count {
                let what = if layer.is_some() {
                    format!("has {count} granularities (0..={})", count - 1)
                } else {
                    "is not nested: its only index is 0".into()
                };
                return Err(Error::Input(format!(
                    "--per-layer: layer {i} {what}, found {index}"
                )));
            }
            Ok(layer
                .as_ref()
                .map(|(g, _, hidden)| crate::ffn::matformer::width(g[index], *hidden)))
        })
        .collect()
}

/// `cfg` with each nested layer that keeps a width replaced by a dense MLP of that width
/// (same activation and bias).
pub fn extract_config(cfg: &ModelConfig, widths: &[Option<usize>]) -> Result<ModelConfig> {
    let mut out = cfg.clone();
    for (i, w) in widths.iter().enumerate() {
        let Some(w) = *w else { continue };
        let FfnSpec::MatFormer {
            activation, bias, ..
        } = cfg.layer(i).ffn
        else {
            return Err(Error::config(
                format!("layers.{i}.ffn"),
                "not a MatFormer MLP",
            ));
        };
        let over = out.layers.entry(i.to_string()).or_default();
        over.ffn = Some(FfnSpec::Mlp {
            hidden: Some(w),
            activation,
            bias,
            rank: None,
        });
    }
    out.validate()?;
    Ok(out)
}

/// `tensors` (weights, or AdamW moments named `m.NAME` / `v.NAME`) cut to `widths`:
/// `layers.{i}.ffn.up.{weight,bias}` to their first `w` rows, `layers.{i}.ffn.down.weight`
/// to its first `w` columns; everything else as it is.
pub fn slice(
    tensors: &BTreeMap<String, Tensor>,
    widths: &[Option<usize>],
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let bare = name
            .strip_prefix("m.")
            .or_else(|| name.strip_prefix("v."))
            .unwrap_or(name);
        let cut = widths.iter().enumerate().find_map(|(i, w)| {
            let w = (*w)?;
            let up = format!("layers.{i}.ffn.up.");
            if bare == format!("{up}weight") || bare == format!("{up}bias") {
                Some((0, w))
            } else if bare == format!("layers.{i}.ffn.down.weight") {
                Some((1, w))
            } else {
                None
            }
        });
        let t = match cut {
            Some((dim, w)) => t.narrow(dim, 0, w)?.contiguous()?,
            None => t.clone(),
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// What [`extract_run`] made.
#[derive(Debug, Clone)]
pub struct Extracted {
    /// The hidden width each layer kept (`None`: not nested).
    pub widths: Vec<Option<usize>>,
    /// Parameters before and after.
    pub params: (u128, u128),
}

/// Writes run directory `out` (new, or empty) holding the sub-model of `formers train` run
/// `run` chosen by `choice`: `run.json` with the extracted config (same task and training
/// settings), and a checkpoint of the cut weights, AdamW moments and training state, so
/// `formers eval`, `formers generate` and `formers train --resume` take it like any run.
pub fn extract_run(run: &Path, out: &Path, choice: &Choice) -> Result<Extracted> {
    let record = RunRecord::load(run)?;
    let widths = widths(&record.config.model, choice)?;
    let mut config = record.config.clone();
    config.model = extract_config(&record.config.model, &widths)?;
    let loaded = checkpoint::load(run)?;
    let weights = slice(&loaded.weights, &widths)?;
    let moments = slice(&loaded.moments, &widths)?;
    let before = crate::limits::param_count(&record.config.model);
    let after = crate::limits::param_count(&config.model);
    let stored: u128 = weights.values().map(|t| t.elem_count() as u128).sum();
    if stored != after {
        return Err(Error::Checkpoint {
            path: loaded.dir.join(checkpoint::MODEL_FILE),
            msg: format!("cut to {stored} values, but the extracted model has {after} parameters"),
        });
    }
    let record = RunRecord {
        task: record.task,
        config,
    };
    fsio::write_dir_atomic(out, |tmp| {
        let path = tmp.join(RunRecord::FILE);
        let json = serde_json::to_string_pretty(&record).expect("a run record serialises");
        fsio::create_new(&path)?
            .write_all(json.as_bytes())
            .map_err(|e| Error::io(&path, e))?;
        checkpoint::save(tmp, &weights, &moments, &loaded.state).map(|_| ())
    })?;
    Ok(Extracted {
        widths,
        params: (before, after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs;
    use crate::train::config::RunConfig;
    use crate::train::trainer::Trainer;

    fn nested_run(dir: &Path) -> RunConfig {
        let cfg = RunConfig::from_json(
            r#"{"model": {"d_model": 16, "n_heads": 2, "n_layers": 3, "causal": true,
                "max_len": 32, "input": {"kind": "bytes"}, "head": {"kind": "lm", "tied": true},
                "defaults": {"mixer": {"kind": "attention"},
                  "ffn": {"kind": "matformer", "hidden": 40, "granularities": [0.25, 0.5, 1.0]}},
                "layers": {"1": {"ffn": {"kind": "mlp", "hidden": 24}},
                           "2": {"ffn": {"kind": "matformer", "hidden": 40,
                                 "granularities": [0.3, 1.0], "active": 0}}}},
              "train": {"steps": 3, "batch_size": 2, "seq_len": 16, "eval_batches": 1}}"#,
        )
        .unwrap();
        struct Quiet;
        impl crate::train::trainer::Observer for Quiet {}
        let start = crate::train::run::Start::New;
        crate::train::run::train(&cfg, "charlm", dir, start, &mut Quiet).unwrap();
        cfg
    }

    #[test]
    fn an_extracted_sub_model_gives_the_logits_of_the_nested_model_at_its_granularity() {
        let d = std::env::temp_dir().join(format!("formers-extract-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let run = d.join("run");
        nested_run(&run);
        let (_, nested) = crate::train::run::load_trained(&run).unwrap();
        let x = Tensor::new(
            &[[72u32, 65, 77, 76, 69, 84, 46, 10]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (choice, force, want) in [
            (Choice::All(0), Some(0), [Some(10), None, Some(12)]),
            (Choice::All(2), Some(2), [Some(40), None, Some(40)]),
            (Choice::Configured, None, [Some(40), None, Some(12)]),
        ] {
            let out = d.join(format!("{choice:?}"));
            let e = extract_run(&run, &out, &choice).unwrap();
            assert_eq!(e.widths, want);
            assert!(e.params.1 <= e.params.0);
            nested.set_granularity(force);
            let want = nested.forward(&x, None, None).unwrap();
            let (rec, small) = crate::train::run::load_trained(&out).unwrap();
            assert!(rec
                .config
                .model
                .layers
                .values()
                .all(|o| !matches!(o.ffn, Some(FfnSpec::MatFormer { .. }))));
            let got = small.forward(&x, None, None).unwrap();
            assert!(
                max_abs(&got, &want) < 1e-5,
                "{choice:?}: {}",
                max_abs(&got, &want)
            );
            // It resumes like a run: its moments and state fit the cut weights.
            let task =
                crate::tasks::by_name("charlm", &rec.config.model, &rec.config.train).unwrap();
            let mut t = Trainer::new(&rec.config, task.as_ref()).unwrap();
            let loaded = checkpoint::load(&out).unwrap();
            t.restore(loaded).unwrap();
        }
        // Per layer: the dense layer's only index is 0.
        let e = extract_run(&run, &d.join("mix"), &Choice::PerLayer(vec![1, 0, 1])).unwrap();
        assert_eq!(e.widths, [Some(20), None, Some(40)]);
        let err = |c: Choice| {
            extract_run(&run, &d.join("bad"), &c)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(Choice::All(3)).contains("3 granularities"),
            "{}",
            err(Choice::All(3))
        );
        assert!(err(Choice::PerLayer(vec![0, 1, 0])).contains("layer 1 is not nested"));
        assert!(err(Choice::PerLayer(vec![0, 0, 2])).contains("layer 2 has 2 granularities"));
        assert!(err(Choice::PerLayer(vec![0])).contains("3 layers"));
        assert!(!d.join("bad").exists() && !d.join(".bad.partial").exists());
        // An existing result is not overwritten; a model with no nested layer is refused.
        assert!(extract_run(&run, &d.join("mix"), &Choice::All(0))
            .unwrap_err()
            .to_string()
            .contains("not empty"));
        let e = extract_run(&d.join("mix"), &d.join("bad"), &Choice::All(0)).unwrap_err();
        assert!(e.to_string().contains("nothing to extract"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
