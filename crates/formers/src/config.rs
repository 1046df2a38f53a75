//! `ModelConfig`: the whole architecture as data. Every slot of the MetaFormer block is an
//! enum value here, chosen in `defaults` and overridden per layer, so heterogeneous stacks
//! need no code. Each slot's spec lives beside its implementation (`ffn::FfnSpec`,
//! `mixer::MixerSpec`, `norm::NormSpec`, `position::PositionSpec`, `params::InitSpec`);
//! this file composes them and validates the whole.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bounds::{self, bounded};
use crate::ffn::FfnSpec;
use crate::mixer::{MixerDims, MixerSpec};
use crate::norm::NormSpec;
use crate::params::InitSpec;
use crate::position::{PositionDims, PositionSpec};
use crate::{Error, Result};

/// The architecture of a model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// A decoder: position `i` sees only positions `<= i`, in every layer. Every mixer
    /// obeys it, and a config whose mixers cannot is refused.
    #[serde(default)]
    pub causal: bool,
    /// Longest sequence the model takes (size of learned / precomputed position tables).
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// What the model reads.
    pub input: InputSpec,
    /// How positions enter the model.
    #[serde(default)]
    pub position: PositionSpec,
    /// What the model outputs.
    pub head: HeadSpec,
    /// A norm after the last block (usual with pre-norm blocks).
    #[serde(default = "crate::mixer::yes")]
    pub final_norm: bool,
    /// Dropout on the embeddings.
    #[serde(default)]
    pub embed_dropout: f32,
    /// Token-type (segment) embeddings, as BERT; 0 = none. Type 0 is added to every token.
    #[serde(default)]
    pub type_vocab_size: usize,
    /// A norm (of the `defaults.norm` kind) right after the embeddings, as BERT.
    #[serde(default)]
    pub embed_norm: bool,
    /// How blocks feed each other.
    #[serde(default)]
    pub residual: ResidualSpec,
    /// The spec of every layer unless overridden.
    #[serde(default)]
    pub defaults: LayerSpec,
    /// Per-layer overrides, keyed by layer index ("0", "1", ...).
    #[serde(default)]
    pub layers: BTreeMap<String, LayerOverride>,
    /// How new weights are drawn (a loaded checkpoint brings its own).
    #[serde(default, skip_serializing_if = "InitSpec::is_default")]
    pub init: InitSpec,
}

fn default_max_len() -> usize {
    512
}

/// Residual scheme between blocks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResidualSpec {
    /// Each block's output is the next block's input.
    #[default]
    Plain,
    /// After each block, a learned weighted average of the embeddings and all block outputs
    /// so far, initialised to the identity (DenseFormer, Pagliardini et al. 2024).
    DenseFormer,
    /// Every attention layer's values mixed with the first layer's:
    /// `v ← λ·v + (1 − λ)·v₁` (ResFormer, Zhou et al. 2024, "Value Residual Learning").
    ValueResidual {
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
}

fn default_lambda() -> f64 {
    0.5
}

/// What the model reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InputSpec {
    /// Token ids in `0..vocab_size`.
    Tokens { vocab_size: usize },
    /// Raw bytes (vocabulary of 256).
    Bytes,
}

impl InputSpec {
    /// Size of the input vocabulary.
    pub fn vocab_size(&self) -> usize {
        match self {
            InputSpec::Tokens { vocab_size } => *vocab_size,
            InputSpec::Bytes => 256,
        }
    }
}

fn default_pooling() -> Pooling {
    Pooling::Mean
}

/// Output head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeadSpec {
    /// Per-token logits over the vocabulary (causal LM, or token tagging when bidirectional).
    Lm {
        #[serde(default = "crate::mixer::yes")]
        tied: bool,
        /// A bias per vocabulary entry (an untied head only; what folding a final
        /// LayerNorm's β into the head needs, `compress::norm`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        bias: bool,
    },
    /// One label per sequence.
    Classification { n_classes: usize, pooling: Pooling },
    /// One label per pair of documents, each encoded on its own by the shared stack (LRA's
    /// dual encoder for retrieval, Tay et al. 2021): the input `[b, 2m]` holds document 1 in
    /// positions `0..m` and document 2 in `m..2m`, each padded at its end; the pooled `u`, `v`
    /// are classified from `[u, v, u⊙v, |u−v|]` (Conneau et al. 2017, InferSent).
    Matching { n_classes: usize, pooling: Pooling },
    /// Pooled (mean by default), optionally L2-normalised sequence embedding.
    Embedding {
        #[serde(default = "default_pooling")]
        pooling: Pooling,
        #[serde(default = "crate::mixer::yes")]
        normalize: bool,
    },
}

impl HeadSpec {
    /// The classes of a head that gives one label per input (classification, matching).
    pub fn n_classes(&self) -> Option<usize> {
        match self {
            HeadSpec::Classification { n_classes, .. } | HeadSpec::Matching { n_classes, .. } => {
                Some(*n_classes)
            }
            HeadSpec::Lm { .. } | HeadSpec::Embedding { .. } => None,
        }
    }
}

/// How a sequence is reduced to one vector.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Average over non-padding tokens.
    Mean,
    /// The first token (BERT's [CLS]).
    First,
}

/// One block: norm → token mixer → residual → norm → channel mixer → residual.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Token mixer.
    #[serde(default)]
    pub mixer: MixerSpec,
    /// Channel mixer.
    #[serde(default)]
    pub ffn: FfnSpec,
    /// Norm kind.
    #[serde(default)]
    pub norm: NormSpec,
    /// Where the norms sit.
    #[serde(default)]
    pub placement: Placement,
    /// Dropout on each residual branch.
    #[serde(default)]
    pub dropout: f32,
}

impl Default for LayerSpec {
    fn default() -> Self {
        LayerSpec {
            mixer: MixerSpec::default(),
            ffn: FfnSpec::default(),
            norm: NormSpec::default(),
            placement: Placement::default(),
            dropout: 0.0,
        }
    }
}

/// Fields of [`LayerSpec`] that one layer changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    pub mixer: Option<MixerSpec>,
    pub ffn: Option<FfnSpec>,
    pub norm: Option<NormSpec>,
    pub placement: Option<Placement>,
    pub dropout: Option<f32>,
}

/// Norm placement.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// `x + f(norm(x))` (GPT-2 and most modern models).
    #[default]
    Pre,
    /// `norm(x + f(x))` (original Transformer, BERT).
    Post,
}

impl ModelConfig {
    /// Parses JSON and validates. A run config (the files in `configs/`: a `model` and a
    /// `train` section) is refused with a pointer to [`crate::train::RunConfig::from_path`].
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: ModelConfig = parse_json(text, "<model config>").map_err(|e| {
            let value = serde_json::from_str::<serde_json::Value>(text).ok();
            if value.as_ref().is_some_and(|v| v.get("model").is_some()) {
                Error::config(
                    "(top level)",
                    "this is a run config (a `model` section and an optional `train` \
                     section, as the files in configs/ are), not a model config: read it with \
                     `RunConfig::from_path` (or `RunConfig::from_json`) and use its `.model`",
                )
            } else {
                e
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Size of the head dimension.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// The spec of layer `i`: defaults with its override applied.
    pub fn layer(&self, i: usize) -> LayerSpec {
        let mut spec = self.defaults.clone();
        if let Some(o) = self.layers.get(&i.to_string()) {
            if let Some(m) = &o.mixer {
                spec.mixer = m.clone();
            }
            if let Some(f) = &o.ffn {
                spec.ffn = f.clone();
            }
            if let Some(n) = &o.norm {
                spec.norm = n.clone();
            }
            if let Some(p) = o.placement {
                spec.placement = p;
            }
            if let Some(d) = o.dropout {
                spec.dropout = d;
            }
        }
        spec
    }

    /// Whether the model is a decoder.
    pub fn is_causal(&self) -> bool {
        self.causal
    }

    /// What the position scheme is built for.
    pub fn position_dims(&self) -> PositionDims {
        PositionDims {
            max_len: self.max_len,
            d_model: self.d_model,
            n_heads: self.n_heads,
        }
    }

    /// What every mixer of this model is configured against.
    pub fn mixer_dims(&self) -> MixerDims {
        MixerDims {
            d_model: self.d_model,
            n_heads: self.n_heads,
            max_len: self.max_len,
            causal: self.causal,
        }
    }

    /// Each distinct layer spec once, as `(key, first layer, layers, spec)`: `defaults`
    /// (when some layer uses it) and every override. Work per layer (validation, memory
    /// bounds) is done per entry, so it does not grow with `n_layers`. Override keys that
    /// are not layer indices are left out (validation refuses them).
    pub fn layer_groups(&self) -> Vec<(String, usize, usize, LayerSpec)> {
        let overridden: Vec<usize> = self
            .layers
            .keys()
            .filter_map(|k| k.parse::<usize>().ok().filter(|i| i.to_string() == *k))
            .filter(|&i| i < self.n_layers)
            .collect();
        let mut out = Vec::with_capacity(overridden.len() + 1);
        let shared = self.n_layers - overridden.len();
        if shared > 0 {
            let first = (0..self.n_layers)
                .find(|i| !self.layers.contains_key(&i.to_string()))
                .unwrap_or(0);
            out.push(("defaults".to_string(), first, shared, self.defaults.clone()));
        }
        for i in overridden {
            out.push((format!("layers.{i}"), i, 1, self.layer(i)));
        }
        out
    }

    /// Rejects impossible shapes and values, naming the key. Sizes are bounded first (see
    /// [`crate::limits`]), and the work does not grow with them.
    pub fn validate(&self) -> Result<()> {
        bounded("d_model", self.d_model, bounds::MAX_WIDTH)?;
        bounded("n_heads", self.n_heads, bounds::MAX_WIDTH)?;
        bounded("n_layers", self.n_layers, bounds::MAX_LAYERS)?;
        bounded("max_len", self.max_len, bounds::MAX_LEN)?;
        if self.type_vocab_size > bounds::MAX_VOCAB {
            bounded("type_vocab_size", self.type_vocab_size, bounds::MAX_VOCAB)?;
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "n_heads",
                format!(
                    "{} does not divide d_model = {}",
                    self.n_heads, self.d_model
                ),
            ));
        }
        if let InputSpec::Tokens { vocab_size } = self.input {
            bounded("input.vocab_size", vocab_size, bounds::MAX_VOCAB)?;
        }
        if let PositionSpec::Rope { base } | PositionSpec::Rope2d { base, .. } = self.position {
            let (kind, multiple) = match self.position {
                PositionSpec::Rope2d { .. } => ("rope2d", 4),
                _ => ("rope", 2),
            };
            if !self.head_dim().is_multiple_of(multiple) {
                return Err(Error::config(
                    "position",
                    format!(
                        "{kind} needs a head dimension divisible by {multiple}, found {}",
                        self.head_dim()
                    ),
                ));
            }
            if let PositionSpec::Rope2d { width, .. } = self.position {
                bounded("position.width", width, self.max_len)?;
            }
            if !(base > 1.0 && base.is_finite()) {
                return Err(Error::config(
                    "position.base",
                    format!("must be a finite number > 1, found {base}"),
                ));
            }
        }
        if let Some(n_classes) = self.head.n_classes() {
            if n_classes < 2 {
                return Err(Error::config(
                    "head.n_classes",
                    format!("must be at least 2, found {n_classes}"),
                ));
            }
            bounded("head.n_classes", n_classes, bounds::MAX_VOCAB)?;
        }
        if let HeadSpec::Lm {
            tied: true,
            bias: true,
        } = self.head
        {
            return Err(Error::config(
                "head.bias",
                "a tied LM head has no bias of its own; set `tied` to false",
            ));
        }
        check_dropout("embed_dropout", self.embed_dropout)?;
        if let ResidualSpec::ValueResidual { lambda } = self.residual {
            if !(0.0..=1.0).contains(&lambda) {
                return Err(Error::config(
                    "residual.lambda",
                    format!("must be in [0, 1], found {lambda}"),
                ));
            }
        }
        for key in self.layers.keys() {
            match key.parse::<usize>() {
                Ok(i) if i < self.n_layers && i.to_string() == *key => {}
                _ => {
                    return Err(Error::config(
                        format!("layers.{key}"),
                        format!("not a layer index in 0..{}", self.n_layers),
                    ))
                }
            }
        }
        validate_layer("defaults", &self.defaults, &self.mixer_dims())?;
        for (at, first, _, layer) in self.layer_groups() {
            if at != "defaults" {
                validate_layer(&at, &layer, &self.mixer_dims())?;
            }
            self.check_capabilities(first, &at, &layer.mixer)?;
        }
        Ok(())
    }

    /// Refuses a layer whose mixer cannot honour the model's causality or position scheme.
    fn check_capabilities(&self, i: usize, at: &str, mixer: &MixerSpec) -> Result<()> {
        let kind = mixer.kind();
        let can = kind.capabilities();
        let name = kind.name();
        if self.causal && !can.causal {
            return Err(Error::config(
                format!("{at}.mixer"),
                format!(
                    "layer {i}'s `{name}` mixer is bidirectional and has no causal form, \
                     but the model is causal (`causal: true`): every layer must be"
                ),
            ));
        }
        let refused = match self.position {
            PositionSpec::Alibi if !can.alibi => Some("alibi biases softmax scores"),
            PositionSpec::Rope { .. } | PositionSpec::Rope2d { .. } if !can.rope => {
                Some("rope rotates queries and keys")
            }
            _ => None,
        };
        if let Some(why) = refused {
            return Err(Error::config(
                "position",
                format!("{why}; layer {i}'s `{name}` mixer has none to apply it to"),
            ));
        }
        Ok(())
    }
}

fn check_dropout(key: &str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::config(key, format!("must be in [0, 1), found {p}")));
    }
    Ok(())
}

fn validate_layer(at: &str, spec: &LayerSpec, dims: &MixerDims) -> Result<()> {
    check_dropout(&format!("{at}.dropout"), spec.dropout)?;
    spec.mixer.kind().validate(&format!("{at}.mixer"), dims)?;
    spec.ffn.validate(&format!("{at}.ffn"))?;
    spec.norm.validate(&format!("{at}.norm"))?;
    Ok(())
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| path_error(origin, e))
}

pub(crate) fn path_error<E: std::fmt::Display>(
    origin: &str,
    e: serde_path_to_error::Error<E>,
) -> Error {
    let key = e.path().to_string();
    let key = if key == "." {
        "(top level)".to_string()
    } else {
        key
    };
    let msg = e.inner().to_string();
    let hint = if msg.starts_with("unknown field `causal`") {
        "; causality belongs to the whole model: set `\"causal\": true` next to `d_model`"
    } else {
        ""
    };
    Error::config(key, format!("{msg}{hint} (in {origin})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::RunConfig;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "d_model": 32, "n_heads": 4, "n_layers": 2,
            "input": {"kind": "tokens", "vocab_size": 10},
            "head": {"kind": "lm"}
        })
    }

    #[test]
    fn a_run_config_given_as_a_model_config_points_to_run_config() {
        let text = include_str!("../../../configs/charlm.json");
        let e = ModelConfig::from_json(text).unwrap_err().to_string();
        assert!(
            e.contains("run config") && e.contains("RunConfig::from_path"),
            "{e}"
        );
        let run = RunConfig::from_json(text).unwrap();
        let model = serde_json::to_string(&run.model).unwrap();
        assert_eq!(ModelConfig::from_json(&model).unwrap(), run.model);
        // Other mistakes keep their own message.
        let e = err_of(serde_json::json!({"d_model": 32}));
        assert!(!e.contains("run config"), "{e}");
    }

    fn err_of(v: serde_json::Value) -> String {
        ModelConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_and_overrides() {
        let mut v = base();
        v["layers"] = serde_json::json!({"1": {"mixer": {"kind": "local", "window": 4}}});
        let cfg = ModelConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(cfg.layer(0).mixer, MixerSpec::attention());
        assert!(matches!(cfg.layer(1).mixer, MixerSpec::Local(_)));
        assert!(!cfg.is_causal());
        assert_eq!(cfg.position, PositionSpec::Learned);
    }

    #[test]
    fn rope2d_and_init_parse_and_are_checked() {
        let mut v = base();
        v["max_len"] = 64.into();
        v["position"] = serde_json::json!({"kind": "rope2d", "width": 8});
        v["init"] = "torch".into();
        let cfg = ModelConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(
            cfg.position,
            PositionSpec::Rope2d {
                width: 8,
                base: 10_000.0
            }
        );
        assert_eq!(cfg.init, InitSpec::Torch);
        // The default scheme is not written out, so older readers take the JSON.
        let mut plain = cfg.clone();
        plain.init = InitSpec::Gpt2;
        assert!(!serde_json::to_string(&plain).unwrap().contains("init"));
        assert_eq!(
            ModelConfig::from_json(&serde_json::to_string(&cfg).unwrap()).unwrap(),
            cfg
        );
        // Head dimension 8 splits into rows and columns; 6 (3 heads of 18 → 6) does not.
        let mut odd = v.clone();
        odd["d_model"] = 18.into();
        odd["n_heads"] = 3.into();
        let e = err_of(odd);
        assert!(e.contains("rope2d") && e.contains("divisible by 4"), "{e}");
        for width in [0, 65] {
            let mut w = v.clone();
            w["position"]["width"] = width.into();
            assert!(err_of(w).contains("position.width"));
        }
        // A mixer with nothing to rotate refuses it, as it refuses 1-D rope.
        let mut pool = v.clone();
        pool["defaults"] = serde_json::json!({"mixer": {"kind": "pool"}});
        let e = err_of(pool);
        assert!(e.contains("rope rotates queries and keys"), "{e}");
    }

    #[test]
    fn causality_is_one_model_setting() {
        // docs/configs.md's example: a causal model whose layer 3 is a sliding window.
        let mut v = base();
        v["n_layers"] = 4.into();
        v["causal"] = true.into();
        v["layers"] = serde_json::json!({"3": {"mixer": {"kind": "local", "window": 32}}});
        let cfg = ModelConfig::from_json(&v.to_string()).unwrap();
        assert!(cfg.is_causal() && cfg.mixer_dims().causal);
        // A per-mixer `causal` is refused with a pointer to the model-level key.
        let mut v = base();
        v["defaults"] = serde_json::json!({"mixer": {"kind": "attention", "causal": true}});
        let e = err_of(v);
        assert!(
            e.contains("defaults.mixer") && e.contains("whole model"),
            "{e}"
        );
        // Mixers without a causal form are refused in a causal model.
        for mixer in [
            serde_json::json!({"kind": "linformer", "k": 8}),
            serde_json::json!({"kind": "flow"}),
        ] {
            let mut v = base();
            v["causal"] = true.into();
            v["layers"] = serde_json::json!({"1": {"mixer": mixer}});
            let e = err_of(v);
            assert!(
                e.contains("layers.1.mixer") && e.contains("no causal form"),
                "{e}"
            );
        }
    }

    #[test]
    fn position_schemes_a_mixer_cannot_apply_are_refused() {
        for (position, mixer) in [
            ("alibi", serde_json::json!({"kind": "linformer", "k": 8})),
            ("alibi", serde_json::json!({"kind": "flow"})),
            (
                "alibi",
                serde_json::json!({"kind": "linear", "feature": "elu"}),
            ),
            ("alibi", serde_json::json!({"kind": "pool"})),
            ("rope", serde_json::json!({"kind": "pool"})),
        ] {
            let mut v = base();
            v["position"] = serde_json::json!({"kind": position});
            v["defaults"] = serde_json::json!({"mixer": mixer});
            let e = err_of(v);
            assert!(e.contains("`position`") && e.contains("layer 0"), "{e}");
        }
        let mut v = base();
        v["position"] = serde_json::json!({"kind": "alibi"});
        v["defaults"] = serde_json::json!({"mixer": {"kind": "local", "window": 2}});
        ModelConfig::from_json(&v.to_string()).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let mut v = base();
        v["n_heads"] = 5.into();
        assert!(err_of(v).contains("`n_heads`"));
        let mut v = base();
        v["n_layers"] = 0.into();
        assert!(err_of(v).contains("`n_layers`"));
        let mut v = base();
        v["defaults"] = serde_json::json!({"mixer": {"kind": "attention", "causul": true}});
        let e = err_of(v);
        assert!(e.contains("defaults.mixer") && e.contains("causul"), "{e}");
        let mut v = base();
        v["colour"] = "red".into();
        assert!(err_of(v).contains("colour"));
        let mut v = base();
        v["layers"] = serde_json::json!({"9": {}});
        assert!(err_of(v).contains("`layers.9`"));
        let mut v = base();
        v["defaults"] = serde_json::json!({"dropout": 1.5});
        assert!(err_of(v).contains("defaults.dropout"));
        let mut v = base();
        v["defaults"] = serde_json::json!({"mixer": {"kind": "telepathy"}});
        assert!(err_of(v).contains("telepathy"));
    }

    #[test]
    fn toml_and_json_agree() {
        let dir = std::env::temp_dir().join(format!("formers-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("c.toml");
        std::fs::write(
            &toml_path,
            "[model]\nd_model = 32\nn_heads = 4\nn_layers = 2\n[model.input]\nkind = \"bytes\"\n[model.head]\nkind = \"lm\"\n",
        )
        .unwrap();
        let json_path = dir.join("c.json");
        std::fs::write(
            &json_path,
            r#"{"model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "input": {"kind": "bytes"}, "head": {"kind": "lm"}}}"#,
        )
        .unwrap();
        let a = RunConfig::from_path(&toml_path).unwrap();
        let b = RunConfig::from_path(&json_path).unwrap();
        assert_eq!(a, b);
        std::fs::write(&toml_path, "[model]\nd_model = \"wide\"\n").unwrap();
        let e = RunConfig::from_path(&toml_path).unwrap_err().to_string();
        assert!(e.contains("model.d_model"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
