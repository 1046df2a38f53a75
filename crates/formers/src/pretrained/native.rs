//! A formers model directory: what `formers compress` writes. `formers.json` (the family,
//! formers' own model config, and the compression steps applied, in order), one
//! `model.safetensors` under formers' parameter names — int8 matrices as `I8` tensors with
//! their per-row scales beside them (`{name}_scale`, F32) — and the source's
//! `tokenizer.json`. [`super::load_with`] reads it like a Hugging Face checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::fsio;
use crate::kernels::blockq::BlockKind;
use crate::kernels::quant::QuantMatrix;
use crate::pretrained::family::{checkpoint_error, Family};
use crate::pretrained::weights::{Naming, Take};
use crate::{Error, Result};

/// The manifest's file name; its presence marks a formers model directory.
pub const MANIFEST: &str = "formers.json";
/// The value of the manifest's `format` key.
const FORMAT: &str = "formers-model";
/// The layout version this code writes and reads.
const VERSION: u32 = 1;

/// One compression step applied to a model, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Matrices stored as int8 with one scale per row (per output channel of a linear
    /// layer, per entry of an embedding table).
    Quantize {
        scheme: String,
        /// How many matrices were quantised.
        matrices: usize,
    },
    /// Pre-LN converted to Pre-RMSNorm (`rms`) or Pre-CRMSNorm (`crms`), exactly.
    Norm { to: String },
    /// Linear layers (`ffn`, `attn` or `all`) factorised by truncated SVD, at a fixed rank
    /// or at the rank keeping a fraction of the energy.
    Lowrank {
        layers: String,
        rank: Option<usize>,
        energy: Option<f64>,
        /// Texts whose activations weighted the factorisation (0: plain SVD).
        #[serde(default)]
        calibration: usize,
        /// Distillation steps towards the original after factorising (0: none).
        #[serde(default)]
        heal_steps: usize,
    },
}

/// `formers.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The family's name (`bert`, `gpt2`), looked up in [`super::FAMILIES`].
    #[serde(with = "by_name")]
    pub family: &'static dyn Family,
    /// The model, as formers configures it (validated on load).
    pub config: serde_json::Value,
    /// The steps applied to the source's weights, in order.
    pub compression: Vec<Step>,
    /// The directory the first step read (for the record; never read back).
    pub source: String,
}

impl Manifest {
    /// The manifest of a model of `family` and `config` compressed from `source` by `steps`.
    pub fn new(
        family: &'static dyn Family,
        config: &ModelConfig,
        source: &Path,
        steps: Vec<Step>,
    ) -> Self {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            family,
            config: serde_json::to_value(config).expect("a model config serialises"),
            compression: steps,
            source: source.display().to_string(),
        }
    }

    /// Reads and checks `dir/formers.json`; returns it and its validated model config.
    pub fn read(dir: &Path) -> Result<(Manifest, ModelConfig)> {
        let path = dir.join(MANIFEST);
        let value = crate::pretrained::family::read_json(&path)?;
        let m: Manifest = serde_path_to_error::deserialize(value)
            .map_err(|e| checkpoint_error(&path, format!("at `{}`: {}", e.path(), e.inner())))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(checkpoint_error(
                &path,
                format!(
                    "format `{}` version {} is not this formers' `{FORMAT}` version {VERSION}",
                    m.format, m.version
                ),
            ));
        }
        let config = ModelConfig::from_json(&m.config.to_string())
            .map_err(|e| checkpoint_error(&path, format!("`config`: {e}")))?;
        Ok((m, config))
    }
}

/// A family in `formers.json`: its name.
mod by_name {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::pretrained::families::{family, family_names};
    use crate::pretrained::family::Family;

    pub fn serialize<S: Serializer>(f: &&'static dyn Family, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'static dyn Family, D::Error> {
        let name = String::deserialize(d)?;
        family(&name).ok_or_else(|| {
            D::Error::custom(format!(
                "unknown family `{name}`, expected one of {}",
                family_names()
            ))
        })
    }
}

/// Formers' own parameter names, read as they are.
pub const NAMING: Naming = Naming {
    family: "formers",
    prefix: "",
    take: |name| Some(Take::same(name)),
    harmless: |_| false,
    keys: &[],
};

/// A tensor to write: floating-point values, or a quantised matrix (written with its scales).
#[derive(Debug, Clone)]
pub enum Stored {
    F32 { shape: Vec<usize>, values: Vec<f32> },
    Quant(QuantMatrix),
}

impl Stored {
    /// The f32 values of `t`, as stored.
    pub fn of(t: &candle_core::Tensor) -> Result<Stored> {
        Ok(Stored::F32 {
            shape: t.dims().to_vec(),
            values: t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        })
    }

    /// Bytes it takes in the file (scales included).
    pub fn bytes(&self) -> usize {
        match self {
            Stored::F32 { values, .. } => 4 * values.len(),
            Stored::Quant(q) => q.bytes(),
        }
    }
}

/// Writes a formers model directory `out` (which must not exist yet, or be empty): the
/// manifest, `tensors` as `model.safetensors`, and `tokenizer` copied. Everything is
/// written into a sibling temporary directory first and renamed into place, so a failure
/// leaves no half-written model.
pub fn write(
    out: &Path,
    manifest: &Manifest,
    tensors: &BTreeMap<String, Stored>,
    tokenizer: &Path,
) -> Result<()> {
    fsio::write_dir_atomic(out, |tmp| {
        let json = serde_json::to_string_pretty(manifest).expect("a manifest serialises");
        fsio::write_atomic(&tmp.join(MANIFEST), json.as_bytes(), false)?;
        fsio::write_atomic(&tmp.join("model.safetensors"), &serialize(tensors)?, false)?;
        let tok = fsio::read_limited(tokenizer, fsio::MAX_TOKENIZER_BYTES, "a tokenizer")?;
        fsio::write_atomic(&tmp.join("tokenizer.json"), &tok, false)
    })
}

/// `tensors` as the bytes of a safetensors file (quantised matrices with `{name}_scale`
/// beside: I8 `[rows, cols]` and F32 `[rows]` for int8; I8 (Q8_0) or U8 (Q4_0) codes
/// `[rows, blocks · bytes per block]` and F32 `[rows, blocks]` for block formats).
fn serialize(tensors: &BTreeMap<String, Stored>) -> Result<Vec<u8>> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (name, t) in tensors {
        match t {
            Stored::F32 { shape, values } => {
                bufs.push((name.clone(), Dtype::F32, shape.clone(), le(values)))
            }
            Stored::Quant(QuantMatrix::Int8(q)) => {
                let data = q.data.iter().map(|&v| v as u8).collect();
                bufs.push((name.clone(), Dtype::I8, vec![q.rows, q.cols], data));
                let scale = format!("{name}{}", super::weights::INT8_SCALE);
                bufs.push((scale, Dtype::F32, vec![q.rows], le(&q.scales)));
            }
            Stored::Quant(QuantMatrix::Block(q)) => {
                let dtype = match q.kind {
                    BlockKind::Q8_0 => Dtype::I8,
                    BlockKind::Q4_0 => Dtype::U8,
                };
                bufs.push((
                    name.clone(),
                    dtype,
                    vec![q.rows, q.row_bytes()],
                    q.codes.clone(),
                ));
                let scale = format!("{name}{}", super::weights::INT8_SCALE);
                bufs.push((scale, Dtype::F32, vec![q.rows, q.blocks()], le(&q.scales)));
            }
        }
    }
    let views = bufs
        .iter()
        .map(|(n, dt, shape, data)| {
            let v = TensorView::new(*dt, shape.clone(), data)
                .map_err(|e| Error::Input(format!("tensor `{n}`: {e}")))?;
            Ok((n.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(|e| Error::Input(format!("safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `formers.json` names the family by the strings older directories hold ("bert",
    /// "gpt2"); an unknown name is refused with the known ones.
    #[test]
    fn the_manifest_names_the_family_as_before() {
        let manifest = |family: &str| {
            serde_json::json!({
                "format": FORMAT, "version": VERSION, "family": family, "config": {},
                "compression": [], "source": "x"
            })
        };
        for name in ["bert", "gpt2"] {
            let m: Manifest = serde_json::from_value(manifest(name)).unwrap();
            assert_eq!(m.family.name(), name);
            assert_eq!(serde_json::to_value(&m).unwrap()["family"], name);
        }
        let e = serde_json::from_value::<Manifest>(manifest("mamba"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mamba") && e.contains("`bert`, `gpt2`"), "{e}");
    }
}
