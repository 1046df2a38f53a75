//! Named parameters: the loader and the module tree are the same thing (as candle's
//! `VarBuilder`), but initialisation is seeded by our own [`Rng`] and names are kept in a
//! sorted map, so every walk over parameters has one fixed order.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};

use crate::rng::Rng;
use crate::{Error, Result};

/// How a new parameter is filled.
#[derive(Debug, Clone)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Every entry this value.
    Const(f64),
    /// These values, in row-major order.
    Values(Vec<f64>),
}

#[derive(Debug)]
struct Store {
    vars: BTreeMap<String, Var>,
    rng: Rng,
}

/// A handle on a shared parameter store at a name prefix.
#[derive(Debug, Clone)]
pub struct Params {
    store: Arc<Mutex<Store>>,
    prefix: String,
    dtype: DType,
    device: Device,
    trainable: bool,
}

impl Params {
    /// An empty store whose parameters are initialised from `seed`.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Params {
            store: Arc::new(Mutex::new(Store {
                vars: BTreeMap::new(),
                rng: Rng::new(seed),
            })),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            trainable: true,
        }
    }

    /// The same store, handing out plain tensors: no autodiff graph is built on them,
    /// which inference needs to free intermediates as it goes.
    pub fn frozen(&self) -> Self {
        Params {
            trainable: false,
            ..self.clone()
        }
    }

    /// Whether modules built from this handle train (else they are built for inference:
    /// plain tensors, forward-only fast kernels).
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// A handle whose names start with `prefix.`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.as_ref().to_string()
        } else {
            format!("{}.{}", self.prefix, name.as_ref())
        };
        Params {
            prefix,
            ..self.clone()
        }
    }

    /// The element type of new parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of new parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The parameter `name` of this shape, created with `init` the first time it is asked for.
    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        let full = self.full_name(name);
        let mut store = self.store.lock().expect("parameter store poisoned");
        if let Some(var) = store.vars.get(&full) {
            if var.dims() != shape {
                return Err(Error::config(
                    full,
                    format!("shape {:?} expected, {:?} found", shape, var.dims()),
                ));
            }
            return Ok(self.hand_out(var));
        }
        let n: usize = shape.iter().product();
        let values: Vec<f64> = match init {
            Init::Normal(std) => (0..n).map(|_| store.rng.normal() * std).collect(),
            Init::Const(c) => vec![c; n],
            Init::Values(v) if v.len() == n => v,
            Init::Values(v) => {
                return Err(Error::config(
                    full,
                    format!("{} initial values for {n} entries", v.len()),
                ));
            }
        };
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = self.hand_out(&var);
        store.vars.insert(full, var);
        Ok(out)
    }

    fn hand_out(&self, var: &Var) -> Tensor {
        if self.trainable {
            var.as_tensor().clone()
        } else {
            var.as_tensor().detach()
        }
    }

    /// All parameters, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let store = self.store.lock().expect("parameter store poisoned");
        store
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Overwrites every parameter from `tensors`, which must name each one with its shape.
    pub fn assign(&self, tensors: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        for (name, var) in self.vars() {
            let t = tensors.get(&name).ok_or_else(|| Error::Checkpoint {
                path: source.to_path_buf(),
                msg: format!("tensor `{name}` missing"),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::Checkpoint {
                    path: source.to_path_buf(),
                    msg: format!(
                        "tensor `{name}`: shape {:?} expected, {:?} found",
                        var.dims(),
                        t.dims()
                    ),
                });
            }
            var.set(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// The parameters as a name → tensor map (for saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect()
    }
}
