//! Named tensors of a Hugging Face safetensors file, checked for shape and dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// The tensors of one file, looked up by Hugging Face name with an optional prefix
/// (`bert.`, `transformer.`) stripped.
pub struct Weights<'a> {
    views: HashMap<String, safetensors::tensor::TensorView<'a>>,
    /// Stored name of each tensor whose prefix was stripped (for error messages).
    stored: HashMap<String, String>,
    path: PathBuf,
}

impl<'a> Weights<'a> {
    /// Parses `bytes` read from `path`; names that start with `prefix` are found without
    /// it. The header is checked against the file size before anything is allocated from it.
    pub fn parse(bytes: &'a [u8], path: &Path, prefix: &str) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file ({e})"),
        })?;
        let mut views = HashMap::new();
        let mut stored = HashMap::new();
        for (name, view) in st.tensors() {
            match name.strip_prefix(prefix).filter(|_| !prefix.is_empty()) {
                Some(short) => {
                    stored.insert(short.to_string(), name.clone());
                    views.insert(short.to_string(), view);
                }
                None => {
                    views.insert(name, view);
                }
            }
        }
        Ok(Weights {
            views,
            stored,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, msg: String) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            msg,
        }
    }

    /// The tensor `name` (or its `gamma`/`beta` alias for norm weights) as f32, which
    /// must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let alias = name
            .strip_suffix(".weight")
            .map(|s| format!("{s}.gamma"))
            .or_else(|| name.strip_suffix(".bias").map(|s| format!("{s}.beta")));
        let (key, view) = [Some(name), alias.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|k| self.views.get(k).map(|v| (k, v)))
            .ok_or_else(|| self.err(format!("tensor `{name}` missing")))?;
        let name = self.stored.get(key).map_or(key, String::as_str);
        if view.shape() != shape {
            return Err(self.err(format!(
                "tensor `{name}`: expected shape {shape:?}, found {:?}",
                view.shape()
            )));
        }
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            return Err(self.err(format!(
                "tensor `{name}`: expected a floating-point dtype (F32, F16, BF16), found {:?}",
                view.dtype()
            )));
        }
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}
