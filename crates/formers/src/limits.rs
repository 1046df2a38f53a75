//! What formers refuses before it spends memory: single config values above fixed bounds
//! (so that validation and the arithmetic below stay cheap and cannot overflow), models
//! whose parameters, training state and activations would not fit a memory budget, and
//! weights that are not finite. [`Limits`] holds the two settings a user may change: the
//! budget (`--max-memory`) and whether non-finite weights load (`--allow-non-finite`).
//!
//! The memory figures are estimates from the config alone (no tensor exists yet): the
//! parameter count is exact (a test builds models and compares), the rest is a documented
//! upper-end approximation of what the forward and backward passes keep.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor, WithDType};

use crate::config::{HeadSpec, InputSpec, LayerOverride, LayerSpec, ModelConfig};
use crate::ffn::FfnSpec;
use crate::mixer::pooling::PoolSpec;
use crate::mixer::MixerSpec;
use crate::model::DTYPE;
use crate::norm::Norm;
use crate::position::Positions;
use crate::train::config::RunConfig;
use crate::train::config::TrainConfig;
use crate::{ffn, Error, Result};

/// The memory budget when `/proc/meminfo` cannot be read.
pub const FALLBACK_MEMORY: u64 = 16 << 30;

/// The limits a caller may change. `Limits::default()` is the machine's memory and finite
/// weights only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes a model may need: its parameters and, when training, gradients, AdamW
    /// state and activations; for inference, the decoding cache and one sequence's
    /// activations.
    pub max_memory: u64,
    /// Load checkpoints whose weights hold NaN or ±inf (refused by default, naming the
    /// tensor).
    pub allow_non_finite: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: machine_memory(),
            allow_non_finite: false,
        }
    }
}

/// The machine's RAM (`MemTotal` of `/proc/meminfo`), or [`FALLBACK_MEMORY`] where that
/// cannot be read.
pub fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text))
        .unwrap_or(FALLBACK_MEMORY)
}

fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// A byte count as `32GiB`, `500MB`, `1.5 GiB`, `4096` or `4096B` (KB/MB/GB/TB are powers
/// of 1000, KiB/MiB/GiB/TiB of 1024; case-insensitive).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{text}`: expected a size such as 32GiB, 500MB or 1048576"))?;
    let bytes = n * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!(
            "`{text}`: must be at least 1 byte and below 16 EiB"
        ));
    }
    Ok(bytes as u64)
}

/// Bytes for people: `19.6 GiB`.
pub fn format_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Bytes of one stored value.
fn value_bytes() -> u128 {
    DTYPE.size_in_bytes() as u128
}

/// What a model of a config needs, before anything is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Parameters (exact).
    pub params: u128,
    /// Bytes of the parameters.
    pub param_bytes: u128,
    /// Bytes besides the parameters (estimated): gradients, AdamW moments and activations
    /// when training; position tables, the decoding cache and one sequence's activations
    /// for inference.
    pub other_bytes: u128,
}

impl Estimate {
    /// All bytes.
    pub fn total(&self) -> u128 {
        self.param_bytes.saturating_add(self.other_bytes)
    }

    fn new(params: u128, other_values: u128) -> Self {
        Estimate {
            params,
            param_bytes: params.saturating_mul(value_bytes()),
            other_bytes: other_values.saturating_mul(value_bytes()),
        }
    }
}

/// The parameters [`crate::model::Model::new`] creates for `cfg` (saturating at `u128::MAX`).
pub fn param_count(cfg: &ModelConfig) -> u128 {
    let d = cfg.d_model;
    let dims = cfg.mixer_dims();
    let norm = |on: bool| {
        if on {
            Norm::param_count(&cfg.defaults.norm, d)
        } else {
            0
        }
    };
    let vocab = cfg.input.vocab_size() as u128;
    let layers = cfg
        .layer_groups()
        .into_iter()
        .map(|(_, _, count, spec)| {
            let one = (2 * Norm::param_count(&spec.norm, d))
                .saturating_add(spec.mixer.kind().param_count(&dims))
                .saturating_add(ffn::param_count(&spec.ffn, d));
            one.saturating_mul(count as u128)
        })
        .fold(0u128, u128::saturating_add);
    // DenseFormer: block i averages i + 2 vectors.
    let dwa = match cfg.residual {
        crate::config::ResidualSpec::DenseFormer => {
            let l = cfg.n_layers as u128;
            l.saturating_mul(l.saturating_add(3)) / 2
        }
        _ => 0,
    };
    let head = match &cfg.head {
        HeadSpec::Lm { tied: false, bias } => {
            crate::linear::Linear::param_count(d, cfg.input.vocab_size(), None, *bias)
        }
        HeadSpec::Lm { tied: true, .. } | HeadSpec::Embedding { .. } => 0,
        HeadSpec::Classification { n_classes, .. } => {
            crate::linear::Linear::param_count(d, *n_classes, None, true)
        }
        HeadSpec::Matching { n_classes, .. } => {
            crate::linear::Linear::param_count(4 * d, *n_classes, None, true)
        }
    };
    [
        vocab.saturating_mul(d as u128),
        (cfg.type_vocab_size as u128).saturating_mul(d as u128),
        norm(cfg.embed_norm),
        Positions::sizes(&cfg.position, cfg.position_dims()).0,
        layers,
        dwa,
        norm(cfg.final_norm),
        head,
    ]
    .into_iter()
    .fold(0, u128::saturating_add)
}

/// Values kept per token by a forward pass on sequences of `n` tokens: each block's (summed
/// over blocks when `all_layers`, else the largest one), the embeddings and the logits.
fn values_per_token(cfg: &ModelConfig, n: usize, all_layers: bool) -> u128 {
    let d = cfg.d_model;
    let dims = cfg.mixer_dims();
    let blocks = cfg.layer_groups().into_iter().map(|(_, _, count, spec)| {
        // Two norms and two residual sums besides the mixers.
        let one = (4 * d as u128)
            .saturating_add(spec.mixer.kind().saved_per_token(&dims, n))
            .saturating_add(ffn::saved_per_token(&spec.ffn, d));
        if all_layers {
            one.saturating_mul(count as u128)
        } else {
            one
        }
    });
    let blocks = if all_layers {
        blocks.fold(0, u128::saturating_add)
    } else {
        blocks.max().unwrap_or(0)
    };
    // Logits, their softmax and its gradient.
    let logits = match cfg.head {
        HeadSpec::Lm { .. } => 3 * cfg.input.vocab_size() as u128,
        _ => 0,
    };
    blocks.saturating_add(2 * d as u128).saturating_add(logits)
}

/// Memory of one training step of `run`: parameters, their gradients and two AdamW
/// moments, and the activations of a micro-batch (`batch_size × seq_len` tokens) kept for
/// the backward pass.
pub fn training(run: &RunConfig) -> Estimate {
    let cfg = &run.model;
    let params = param_count(cfg);
    let tokens = (run.train.batch_size as u128).saturating_mul(run.train.seq_len as u128);
    let activations = tokens.saturating_mul(values_per_token(cfg, run.train.seq_len, true));
    let other = params
        .saturating_mul(3)
        .saturating_add(activations)
        .saturating_add(Positions::sizes(&cfg.position, cfg.position_dims()).1);
    Estimate::new(params, other)
}

/// Memory of inference with `cfg`: parameters, position tables, a decoding cache of
/// `max_len` tokens (causal models; each layer's mixer says what it keeps,
/// `MixerKind::cache_values`) and one `max_len` sequence's activations, one block at a time.
pub fn inference(cfg: &ModelConfig) -> Estimate {
    let params = param_count(cfg);
    let n = cfg.max_len as u128;
    let dims = cfg.mixer_dims();
    let cache = if cfg.causal {
        cfg.layer_groups()
            .into_iter()
            .map(|(_, _, count, spec)| {
                (count as u128).saturating_mul(spec.mixer.kind().cache_values(&dims, cfg.max_len))
            })
            .fold(0, u128::saturating_add)
    } else {
        0
    };
    let working = n.saturating_mul(values_per_token(cfg, cfg.max_len, false));
    let other = cache
        .saturating_add(working)
        .saturating_add(Positions::sizes(&cfg.position, cfg.position_dims()).1);
    Estimate::new(params, other)
}

/// A config value that could be made small to shrink the estimate: its key, its value
/// and how to make it small.
struct Knob {
    key: String,
    value: String,
    shrink: Box<dyn Fn(&mut RunConfig)>,
}

fn knob(
    key: impl Into<String>,
    value: impl ToString,
    shrink: impl Fn(&mut RunConfig) + 'static,
) -> Knob {
    Knob {
        key: key.into(),
        value: value.to_string(),
        shrink: Box::new(shrink),
    }
}

/// The knobs of `run` that set sizes (model ones only unless `training`).
fn knobs(run: &RunConfig, training: bool) -> Vec<Knob> {
    let m = &run.model;
    let mut out = vec![
        knob("d_model", m.d_model, |r| r.model.d_model = 1),
        knob("n_heads", m.n_heads, |r| r.model.n_heads = 1),
        knob("n_layers", m.n_layers, |r| {
            r.model.n_layers = 1;
            r.model.layers.clear();
        }),
        knob("max_len", m.max_len, |r| r.model.max_len = 1),
        knob("type_vocab_size", m.type_vocab_size, |r| {
            r.model.type_vocab_size = 0
        }),
    ];
    if let InputSpec::Tokens { vocab_size } = m.input {
        out.push(knob("input.vocab_size", vocab_size, |r| {
            r.model.input = InputSpec::Tokens { vocab_size: 1 }
        }));
    }
    if let Some(n_classes) = m.head.n_classes() {
        out.push(knob("head.n_classes", n_classes, |r| {
            if let HeadSpec::Classification { n_classes, .. }
            | HeadSpec::Matching { n_classes, .. } = &mut r.model.head
            {
                *n_classes = 2;
            }
        }));
    }
    for (at, _, _, spec) in m.layer_groups() {
        let at_h = at.clone();
        out.push(knob(
            format!("{at}.ffn.hidden"),
            spec.ffn.hidden(m.d_model),
            move |r| {
                edit_layer(r, &at_h, |l| match &mut l.ffn {
                    FfnSpec::Mlp { hidden, .. } | FfnSpec::MatFormer { hidden, .. } => {
                        *hidden = Some(1)
                    }
                })
            },
        ));
        let at_m = at.clone();
        out.push(knob(
            format!("{at}.mixer"),
            spec.mixer.kind().name(),
            move |r| {
                edit_layer(r, &at_m, |l| {
                    l.mixer = MixerSpec::Pool(PoolSpec { window: 1 })
                })
            },
        ));
    }
    if training {
        for k in &mut out {
            k.key.insert_str(0, "model.");
        }
        out.push(knob("train.batch_size", run.train.batch_size, |r| {
            r.train.batch_size = 1
        }));
        out.push(knob("train.seq_len", run.train.seq_len, |r| {
            r.train.seq_len = 1
        }));
    }
    out
}

/// Applies `edit` to the layer spec at `at`: `defaults`, or `layers.{i}` (whose override
/// then spells out the whole spec).
fn edit_layer(r: &mut RunConfig, at: &str, edit: impl Fn(&mut LayerSpec)) {
    match at.strip_prefix("layers.") {
        None => edit(&mut r.model.defaults),
        Some(i) => {
            let mut spec = r.model.layer(i.parse().unwrap_or(0));
            edit(&mut spec);
            r.model.layers.insert(
                i.to_string(),
                LayerOverride {
                    mixer: Some(spec.mixer),
                    ffn: Some(spec.ffn),
                    norm: Some(spec.norm),
                    placement: Some(spec.placement),
                    dropout: Some(spec.dropout),
                },
            );
        }
    }
}

impl Limits {
    /// Refuses a training run of `run` whose [`training`] estimate exceeds the budget,
    /// naming the size key that matters most.
    pub fn check_training(&self, run: &RunConfig) -> Result<()> {
        self.check(run, true)
    }

    /// Refuses a model of `cfg` whose [`inference`] estimate exceeds the budget, naming the
    /// size key that matters most.
    pub fn check_inference(&self, cfg: &ModelConfig) -> Result<()> {
        let run = RunConfig {
            model: cfg.clone(),
            train: TrainConfig::default(),
        };
        self.check(&run, false)
    }

    fn check(&self, run: &RunConfig, train: bool) -> Result<()> {
        let estimate = |r: &RunConfig| {
            if train {
                training(r)
            } else {
                inference(&r.model)
            }
        };
        let e = estimate(run);
        let limit = self.max_memory as u128;
        if e.total() <= limit {
            return Ok(());
        }
        // The value whose shrinking to 1 shrinks the estimate most is the one to name.
        let culprit = knobs(run, train).into_iter().min_by_key(|k| {
            let mut small = run.clone();
            (k.shrink)(&mut small);
            estimate(&small).total()
        });
        let (key, value) = culprit.map_or(("model".to_string(), String::new()), |k| {
            (k.key, format!("{} ", k.value))
        });
        let (what, rest) = if train {
            ("training", "gradients, AdamW state and activations")
        } else {
            ("the model", "caches and activations")
        };
        Err(Error::config(
            key,
            format!(
                "{value}makes {what} need {} ({} parameters: {}; {rest}: {}); the limit is {} \
                 (--max-memory to raise it)",
                format_bytes(e.total()),
                e.params,
                format_bytes(e.param_bytes),
                format_bytes(e.other_bytes),
                format_bytes(limit),
            ),
        ))
    }

    /// Refuses NaN or ±inf among `values`, which start at flat index `offset` of tensor
    /// `name` in the file `path`, unless non-finite weights are allowed.
    pub fn check_finite<T: WithDType>(
        &self,
        values: &[T],
        offset: usize,
        name: &str,
        path: &Path,
    ) -> Result<()> {
        if self.allow_non_finite {
            return Ok(());
        }
        match values.iter().position(|v| !v.to_f64().is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor `{name}` holds {} at index {}; non-finite weights are refused \
                     (--allow-non-finite to load them anyway)",
                    values[i].to_f64(),
                    offset + i
                ),
            }),
        }
    }

    /// [`Limits::check_finite`] over every tensor of a file `path` read into memory.
    pub fn check_tensors(&self, tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
        if self.allow_non_finite {
            return Ok(());
        }
        for (name, t) in tensors {
            let flat = t.flatten_all()?;
            match t.dtype() {
                DType::F64 => self.check_finite(&flat.to_vec1::<f64>()?, 0, name, path)?,
                d if d.is_float() => {
                    let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    self.check_finite(&values, 0, name, path)?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use candle_core::Device;

    use super::*;
    use crate::bounds::MAX_LAYERS;
    use crate::model::Model;
    use crate::params::Params;

    fn model(extra: serde_json::Value) -> ModelConfig {
        let mut v = serde_json::json!({
            "d_model": 8, "n_heads": 2, "n_layers": 3, "max_len": 16,
            "input": {"kind": "tokens", "vocab_size": 11},
            "head": {"kind": "lm"}
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn each_mixer_says_what_its_decoding_cache_holds() {
        use crate::mixer::MixerSpec;
        let n = 12;
        for spec in MixerSpec::examples() {
            if !spec.kind().capabilities().causal {
                continue;
            }
            let mut cfg = model(serde_json::json!({"causal": true, "n_layers": 1}));
            cfg.defaults.mixer = spec.clone();
            cfg.validate().unwrap();
            let m = Model::new(&cfg, &Params::new(0, DTYPE, &Device::Cpu).frozen()).unwrap();
            let ids: Vec<u32> = (0..n as u32).map(|i| i % 11).collect();
            let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
            let mut cache = crate::model::Cache::default();
            m.forward_cached(&ids, &mut cache).unwrap();
            let want = spec.kind().cache_values(&cfg.mixer_dims(), n);
            assert_eq!(
                cache.values() as u128,
                want,
                "{}: the cache holds {} values, its MixerKind says {want}",
                spec.kind().name(),
                cache.values()
            );
        }
    }

    fn run(model_extra: serde_json::Value, train: serde_json::Value) -> RunConfig {
        RunConfig {
            model: model(model_extra),
            train: serde_json::from_value(train).unwrap(),
        }
    }

    #[test]
    fn param_count_is_exactly_what_the_model_builds() {
        let ffns = [
            serde_json::json!({"kind": "mlp"}),
            serde_json::json!({"kind": "mlp", "activation": "swiglu", "hidden": 12, "rank": 3}),
            serde_json::json!({"kind": "mlp", "bias": false, "rank": 2}),
            serde_json::json!({"kind": "matformer", "hidden": 16}),
        ];
        let heads = [
            serde_json::json!({"kind": "lm", "tied": false}),
            serde_json::json!({"kind": "classification", "n_classes": 3, "pooling": "first"}),
            serde_json::json!({"kind": "embedding"}),
        ];
        let extras = [
            serde_json::json!({"residual": {"kind": "dense_former"}, "type_vocab_size": 2}),
            serde_json::json!({"position": {"kind": "sinusoidal"}, "embed_norm": true}),
            serde_json::json!({"position": {"kind": "rope"}, "final_norm": false}),
        ];
        let norms = [
            serde_json::json!({"kind": "rms_norm"}),
            serde_json::json!({"kind": "layer_norm"}),
            serde_json::json!({"kind": "crms_norm"}),
        ];
        let mut built = 0;
        for (i, mixer) in MixerSpec::examples().into_iter().enumerate() {
            for (j, ffn) in ffns.iter().enumerate() {
                let mut extra = extras[(i + j) % extras.len()].clone();
                extra["head"] = heads[(i + j) % heads.len()].clone();
                extra["defaults"] = serde_json::json!({
                    "mixer": mixer, "ffn": ffn, "norm": norms[j % norms.len()]
                });
                // One override layer of another kind.
                extra["layers"] = serde_json::json!({"1": {"ffn": ffns[(j + 1) % ffns.len()]}});
                let cfg = model(extra);
                if cfg.validate().is_err() {
                    continue; // e.g. rope with a mixer that has no queries
                }
                let p = Params::new(1, DTYPE, &Device::Cpu);
                Model::new(&cfg, &p.frozen()).unwrap();
                assert_eq!(param_count(&cfg), p.count() as u128, "{cfg:?}");
                built += 1;
            }
        }
        assert!(built >= 20, "{built}");
    }

    #[test]
    fn every_shipped_config_fits_a_small_machine() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let small = Limits {
            max_memory: 2 << 30,
            allow_non_finite: false,
        };
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let run = RunConfig::from_path(&path).unwrap();
                small.check_training(&run).unwrap();
                small.check_inference(&run.model).unwrap();
            }
        }
    }

    fn refused(run: &RunConfig) -> String {
        let limits = Limits {
            max_memory: 8 << 30,
            allow_non_finite: false,
        };
        run.validate().unwrap();
        let e = limits.check_training(run).unwrap_err().to_string();
        assert!(e.contains("the limit is 8.0 GiB (--max-memory"), "{e}");
        e
    }

    #[test]
    fn oversized_training_runs_name_the_key_that_matters() {
        let train = serde_json::json!({});
        let e = refused(&run(
            serde_json::json!({"d_model": 1_000_000}),
            train.clone(),
        ));
        assert!(
            e.starts_with("config: `model.d_model`: 1000000 makes training need"),
            "{e}"
        );
        let e = refused(&run(
            serde_json::json!({"input": {"kind": "tokens", "vocab_size": 50_000_000}, "d_model": 64}),
            train.clone(),
        ));
        assert!(e.contains("`model.input.vocab_size`: 50000000"), "{e}");
        let e = refused(&run(
            serde_json::json!({"n_layers": 60_000, "d_model": 512}),
            train.clone(),
        ));
        assert!(e.contains("`model.n_layers`: 60000"), "{e}");
        let e = refused(&run(
            serde_json::json!({"defaults": {"ffn": {"kind": "mlp", "hidden": 10_000_000}}, "d_model": 256}),
            train.clone(),
        ));
        assert!(e.contains("`model.defaults.ffn.hidden`: 10000000"), "{e}");
        let e = refused(&run(
            serde_json::json!({"max_len": 1_000_000, "defaults": {"mixer": {"kind": "linformer", "k": 1_000_000}}}),
            train.clone(),
        ));
        assert!(e.contains("`model.defaults.mixer`: linformer"), "{e}");
        let e = refused(&run(
            serde_json::json!({}),
            serde_json::json!({"batch_size": 10_000_000}),
        ));
        assert!(e.contains("`train.batch_size`: 10000000"), "{e}");
        // The clipped softmax keeps n² scores per head for the backward pass.
        let e = refused(&run(
            serde_json::json!({"max_len": 1_000_000, "defaults": {"mixer": {"kind": "attention", "clip": {"gamma": -0.03, "zeta": 1.0}}}}),
            serde_json::json!({"seq_len": 1_000_000, "batch_size": 1}),
        ));
        assert!(e.contains("`train.seq_len`: 1000000"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_refused_by_validation_in_constant_time() {
        for (key, value) in [
            ("n_layers", serde_json::json!(1_000_000_000_000u64)),
            ("d_model", serde_json::json!(i64::MAX)),
            ("max_len", serde_json::json!(u64::MAX)),
            (
                "input",
                serde_json::json!({"kind": "tokens", "vocab_size": u64::MAX}),
            ),
        ] {
            let mut v = serde_json::to_value(model(serde_json::json!({}))).unwrap();
            v[key] = value;
            if key == "d_model" {
                v["n_heads"] = 1.into();
            }
            let start = Instant::now();
            let e = ModelConfig::from_json(&v.to_string())
                .unwrap_err()
                .to_string();
            assert!(start.elapsed() < Duration::from_millis(100), "{key}");
            assert!(e.contains(key) && e.contains("must be at most"), "{e}");
        }
        // The largest layer count validates and is estimated without a loop over layers.
        let mut v = serde_json::to_value(model(serde_json::json!({}))).unwrap();
        v["n_layers"] = MAX_LAYERS.into();
        v["layers"] = serde_json::json!({"7": {"dropout": 0.1}});
        let start = Instant::now();
        let cfg = ModelConfig::from_json(&v.to_string()).unwrap();
        assert!(inference(&cfg).params > 0);
        assert!(start.elapsed() < Duration::from_millis(100));
        let mut v = serde_json::to_value(model(serde_json::json!({}))).unwrap();
        v["layers"] = serde_json::json!({"01": {"dropout": 0.1}});
        let e = ModelConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`layers.01`"), "{e}");
        let e = RunConfig::from_json(
            &serde_json::json!({"model": model(serde_json::json!({})), "train": {"batch_size": 4_611_686_018_427_387_904u64}})
                .to_string(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`train.batch_size`") && e.contains("at most"),
            "{e}"
        );
    }

    #[test]
    fn norm_eps_and_float_keys_must_be_finite_and_in_range() {
        for eps in [1e12, 0.0, -1.0] {
            let mut v = serde_json::to_value(model(serde_json::json!({}))).unwrap();
            v["defaults"] = serde_json::json!({"norm": {"kind": "layer_norm", "eps": eps}});
            let e = ModelConfig::from_json(&v.to_string())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("`defaults.norm.eps`") && e.contains("(0, 1]"),
                "{e}"
            );
        }
        let mut cfg = model(serde_json::json!({}));
        cfg.position = crate::position::PositionSpec::Rope {
            base: f64::INFINITY,
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("`position.base`") && e.contains("finite"), "{e}");
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("32GiB"), Ok(32 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("0").is_err() && parse_size("GiB").is_err());
        assert!(parse_size("1e30").is_err() && parse_size("99999999999TiB").is_err());
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(21 << 30), "21.0 GiB");
        assert_eq!(
            mem_total("MemTotal:       24683656 kB\n"),
            Some(24683656 * 1024)
        );
        assert_eq!(mem_total("nothing"), None);
    }

    #[test]
    fn non_finite_values_are_refused_naming_the_tensor_and_index() {
        let limits = Limits::default();
        let path = Path::new("w.safetensors");
        limits.check_finite(&[1f32, 2.0], 0, "a", path).unwrap();
        let e = limits
            .check_finite(&[1f32, f32::NAN], 10, "layers.0.ffn.up.weight", path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`layers.0.ffn.up.weight` holds NaN at index 11")
                && e.contains("--allow-non-finite"),
            "{e}"
        );
        let inf = BTreeMap::from([(
            "b".to_string(),
            Tensor::new(&[[0f32, f32::INFINITY]], &Device::Cpu).unwrap(),
        )]);
        let e = limits.check_tensors(&inf, path).unwrap_err().to_string();
        assert!(e.contains("`b` holds inf at index 1"), "{e}");
        let allow = Limits {
            allow_non_finite: true,
            ..limits
        };
        allow.check_tensors(&inf, path).unwrap();
    }
}
