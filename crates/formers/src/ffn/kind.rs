//! What a channel mixer is: its config ([`FfnSpec`], [`Activation`]), the [`ChannelMixer`]
//! trait every implementation has, and the pointwise activations they share.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::bounds::{bounded, MAX_WIDTH};
use crate::{Error, Result};

fn yes() -> bool {
    true
}

/// Channel mixers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FfnSpec {
    /// Two-layer MLP (SwiGLU uses a gated first layer).
    Mlp {
        /// Hidden width; 4 × d_model when absent.
        #[serde(default)]
        hidden: Option<usize>,
        #[serde(default)]
        activation: Activation,
        #[serde(default = "yes")]
        bias: bool,
        /// Factorise both layers as `U·V` of this rank (Greenformers LRT).
        #[serde(default)]
        rank: Option<usize>,
    },
    /// MatFormer nested MLP: granularity g uses the first ⌈g·hidden⌉ hidden units.
    #[serde(rename = "matformer")]
    MatFormer {
        /// Full hidden width; 4 × d_model when absent.
        #[serde(default)]
        hidden: Option<usize>,
        /// Fractions of `hidden`, ascending, the last 1.0.
        #[serde(default = "default_granularities")]
        granularities: Vec<f64>,
        /// Index of the granularity used at inference (Mix'n'Match, per layer); the largest
        /// when absent.
        #[serde(default)]
        active: Option<usize>,
        #[serde(default)]
        activation: Activation,
        #[serde(default = "yes")]
        bias: bool,
    },
}

fn default_granularities() -> Vec<f64> {
    vec![0.125, 0.25, 0.5, 1.0]
}

impl Default for FfnSpec {
    fn default() -> Self {
        FfnSpec::mlp(None, Activation::default())
    }
}

impl FfnSpec {
    /// Refuses impossible sizes and options, naming the key under `at` (`defaults.ffn`).
    pub fn validate(&self, at: &str) -> Result<()> {
        let (hidden, rank) = match *self {
            FfnSpec::Mlp { hidden, rank, .. } => (hidden, rank),
            FfnSpec::MatFormer { hidden, .. } => (hidden, None),
        };
        if let Some(h) = hidden {
            bounded(&format!("{at}.hidden"), h, MAX_WIDTH)?;
        }
        if let Some(r) = rank {
            bounded(&format!("{at}.rank"), r, MAX_WIDTH)?;
        }
        match *self {
            FfnSpec::MatFormer {
                ref granularities,
                active,
                activation,
                ..
            } => {
                let ascending = granularities.windows(2).all(|w| w[0] < w[1]);
                if granularities.is_empty()
                    || !ascending
                    || granularities.iter().any(|g| !(*g > 0.0 && *g <= 1.0))
                {
                    return Err(Error::config(
                        format!("{at}.granularities"),
                        format!("need ascending fractions in (0, 1], found {granularities:?}"),
                    ));
                }
                if active.is_some_and(|a| a >= granularities.len()) {
                    return Err(Error::config(
                        format!("{at}.active"),
                        "not an index into granularities",
                    ));
                }
                if activation == Activation::Swiglu {
                    return Err(Error::config(
                        format!("{at}.activation"),
                        "the nested MLP takes gelu, gelu_tanh or relu",
                    ));
                }
            }
            FfnSpec::Mlp { .. } => {}
        }
        Ok(())
    }

    /// A dense MLP with biases.
    pub fn mlp(hidden: Option<usize>, activation: Activation) -> Self {
        FfnSpec::Mlp {
            hidden,
            activation,
            bias: true,
            rank: None,
        }
    }

    /// Hidden width in a model of width `d_model`.
    pub fn hidden(&self, d_model: usize) -> usize {
        match self {
            FfnSpec::Mlp { hidden, .. } | FfnSpec::MatFormer { hidden, .. } => {
                hidden.unwrap_or(d_model.saturating_mul(4))
            }
        }
    }
}

/// MLP activations.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (erf), as BERT.
    #[default]
    Gelu,
    /// GELU with the tanh approximation, as GPT-2.
    GeluTanh,
    Relu,
    /// Gated SiLU unit (Shazeer 2020).
    Swiglu,
}

/// A pointwise activation: the [`Activation`]s without a gate. SwiGLU is not one (it needs
/// a second projection, which only the dense MLP has), so a mixer holding a `Pointwise`
/// cannot be asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointwise {
    /// Exact GELU (erf).
    Gelu,
    /// GELU with the tanh approximation.
    GeluTanh,
    Relu,
}

impl Pointwise {
    /// The pointwise activation `a` is, or `None` for the gated SwiGLU.
    pub fn of(a: Activation) -> Option<Self> {
        match a {
            Activation::Gelu => Some(Pointwise::Gelu),
            Activation::GeluTanh => Some(Pointwise::GeluTanh),
            Activation::Relu => Some(Pointwise::Relu),
            Activation::Swiglu => None,
        }
    }

    /// Applies the activation elementwise: the one dispatch every channel mixer uses.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Pointwise::Gelu => crate::kernels::gelu_erf(x)?,
            Pointwise::GeluTanh => x.gelu()?,
            Pointwise::Relu => x.relu()?,
        })
    }
}

/// A channel mixer maps `[.., d]` to `[.., d]` position by position.
pub trait ChannelMixer: std::fmt::Debug + Send + Sync {
    /// Transforms `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// How many nested granularities this mixer offers (1: not nested).
    fn granularities(&self) -> usize {
        1
    }

    /// Forces granularity `index` (MatFormer); `None` returns to the configured one.
    fn set_granularity(&self, _index: Option<usize>) {}
}
