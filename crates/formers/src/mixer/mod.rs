//! Token mixers: the part of a block that moves information between positions.
//!
//! Each mixer is one file that owns its config (a serde struct), its validation, its
//! [`Capabilities`], its construction, its FLOPs and its forward pass, behind the
//! [`MixerKind`] trait. [`MixerSpec`] is the thin tagged list of them: adding a mixer is one
//! new file plus one line in the `mixers!` list below. The attention family shares the
//! multi-head shell of [`heads`] and the exact softmax kernel of [`softmax`].

pub mod heads;
mod kind;
pub mod route;
pub mod softmax;

pub(crate) use kind::yes;
pub use kind::{
    Capabilities, MixCtx, Mixed, MixerCache, MixerDims, MixerKind, Segment, TokenMixer,
    ValueResidual, MASKED,
};

use serde::{Deserialize, Serialize};

use crate::params::Params;
use crate::Result;

/// Declares the mixer modules and the tagged [`MixerSpec`] enum over their config structs.
macro_rules! mixers {
    ($($(#[$doc:meta])* $variant:ident($module:ident::$spec:ident)),* $(,)?) => {
        $(pub mod $module;)*

        /// Token mixers, tagged by `kind`.
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        pub enum MixerSpec {
            $($(#[$doc])* $variant($module::$spec),)*
        }

        impl MixerSpec {
            /// The mixer's own description.
            pub fn kind(&self) -> &dyn MixerKind {
                match self {
                    $(MixerSpec::$variant(s) => s,)*
                }
            }

            /// One small valid spec of every kind (what tests sweep over).
            pub fn examples() -> Vec<MixerSpec> {
                vec![$(MixerSpec::$variant($module::$spec::example()),)*]
            }
        }
    };
}

mixers! {
    /// Exact softmax attention, memory-linear (chunked online softmax).
    Attention(attention::AttentionSpec),
    /// Sliding-window attention with global tokens (Longformer).
    Local(local::LocalSpec),
    /// Linear attention: elu + 1 or FAVOR+ features (Performer).
    Linear(linear_attention::LinearSpec),
    /// Keys and values projected along the sequence (Linformer).
    Linformer(linformer::LinformerSpec),
    /// Flow-Attention (Flowformer).
    Flow(flow::FlowSpec),
    /// Average pooling (PoolFormer).
    Pool(pooling::PoolSpec),
}

impl Default for MixerSpec {
    fn default() -> Self {
        MixerSpec::Attention(attention::AttentionSpec::default())
    }
}

impl MixerSpec {
    /// Plain exact attention with biases and default chunks.
    pub fn attention() -> Self {
        MixerSpec::default()
    }

    /// Named configs worth timing side by side (what `formers bench mixers` takes): each
    /// kind at a practical size, linear attention once per feature map.
    pub fn presets() -> Vec<(&'static str, MixerSpec)> {
        let linear = |feature| {
            MixerSpec::Linear(linear_attention::LinearSpec {
                feature,
                features: 64,
                seed: 0,
                chunk: 64,
                bias: true,
            })
        };
        vec![
            ("attention", MixerSpec::attention()),
            (
                "local",
                MixerSpec::Local(local::LocalSpec {
                    window: 128,
                    global: 0,
                    chunk: 128,
                    bias: true,
                }),
            ),
            ("linear-elu", linear(linear_attention::FeatureMap::Elu)),
            ("favor", linear(linear_attention::FeatureMap::Favor)),
            (
                "linformer",
                MixerSpec::Linformer(linformer::LinformerSpec {
                    k: 256,
                    shared: true,
                    chunk: attention::default_chunk(),
                    bias: true,
                }),
            ),
            ("flow", MixerSpec::Flow(flow::FlowSpec { bias: true })),
            ("pool", MixerSpec::Pool(pooling::PoolSpec { window: 3 })),
        ]
    }

    /// Builds the mixer with its parameters under `p`.
    pub fn build(&self, dims: &MixerDims, p: &Params) -> Result<Box<dyn TokenMixer>> {
        self.kind().build(dims, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{check_grad, randn};
    use candle_core::{DType, Device};

    fn dims(causal: bool) -> MixerDims {
        MixerDims {
            d_model: 8,
            n_heads: 2,
            max_len: 8,
            causal,
        }
    }

    #[test]
    fn every_mixer_gradient_matches_finite_differences() {
        for spec in MixerSpec::examples() {
            for causal in [false, true] {
                if causal && !spec.kind().capabilities().causal {
                    continue;
                }
                let p = Params::new(1, DType::F64, &Device::Cpu);
                let mixer = spec.build(&dims(causal), &p).unwrap();
                let x = randn(&[2, 5, 8], 2);
                check_grad(&p, &x, |x| mixer.forward(x, &MixCtx::default(), None));
            }
        }
    }

    #[test]
    fn every_mixer_inference_form_equals_its_training_form_without_a_graph() {
        for spec in MixerSpec::examples() {
            for causal in [false, true] {
                if causal && !spec.kind().capabilities().causal {
                    continue;
                }
                let p = Params::new(1, DType::F32, &Device::Cpu);
                let train = spec.build(&dims(causal), &p).unwrap();
                let infer = spec.build(&dims(causal), &p.frozen()).unwrap();
                let x = randn(&[2, 5, 8], 3).to_dtype(DType::F32).unwrap();
                let a = train.forward(&x, &MixCtx::default(), None).unwrap();
                let b = infer.forward(&x, &MixCtx::default(), None).unwrap();
                // Parameters of the training form carry the graph (pool has none).
                assert_eq!(a.track_op(), !p.vars().is_empty(), "{spec:?}");
                assert!(!b.track_op(), "{spec:?}");
                let diff = crate::testutil::max_abs(&a, &b);
                assert!(diff < 1e-5, "{spec:?}: {diff}");
            }
        }
    }

    #[test]
    fn presets_are_their_kinds_defaults_with_the_sizes_named() {
        let json = [
            r#"{"kind": "attention"}"#,
            r#"{"kind": "local", "window": 128, "chunk": 128}"#,
            r#"{"kind": "linear", "feature": "elu"}"#,
            r#"{"kind": "linear", "feature": "favor", "features": 64}"#,
            r#"{"kind": "linformer", "k": 256}"#,
            r#"{"kind": "flow"}"#,
            r#"{"kind": "pool", "window": 3}"#,
        ];
        let presets = MixerSpec::presets();
        assert_eq!(presets.len(), json.len());
        for ((name, spec), json) in presets.iter().zip(json) {
            let want: MixerSpec = serde_json::from_str(json).unwrap();
            assert_eq!(spec, &want, "{name}");
            spec.kind().validate(name, &dims(false)).unwrap();
        }
    }

    #[test]
    fn every_spec_survives_json_and_validates() {
        for spec in MixerSpec::examples() {
            let json = serde_json::to_string(&spec).unwrap();
            assert!(
                json.contains(&format!(r#""kind":"{}""#, spec.kind().name())),
                "{json}"
            );
            let back: MixerSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back, spec);
            spec.kind().validate("m", &dims(false)).unwrap();
        }
    }
}
