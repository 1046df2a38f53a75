//! Named parameters: the loader and the module tree are the same thing (as candle's
//! `VarBuilder`), but initialisation is seeded by our own [`Rng`] and names are kept in a
//! sorted map, so every walk over parameters has one fixed order. A store built on a
//! [`Source`] (a checkpoint) takes each parameter from it instead and draws nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::kernels::quant::QuantMatrix;
use crate::rng::Rng;
use crate::{Error, Result};

/// Standard deviation of new weight matrices (GPT-2's 0.02).
pub const INIT_STD: f64 = 0.02;

/// How a new model's weights are drawn.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InitSpec {
    /// Embedding tables (tokens, types, learned positions) and linear weights N(0, 0.02),
    /// biases 0 (GPT-2, Radford et al. 2019).
    #[default]
    Gpt2,
    /// PyTorch's module defaults: embedding tables (`nn.Embedding`, learned positions too)
    /// N(0, 1); linear weights and biases U(±1/√fan_in) (Kaiming-uniform with a = √5;
    /// He et al. 2015).
    Torch,
}

impl InitSpec {
    pub(crate) fn is_default(&self) -> bool {
        *self == InitSpec::default()
    }
}

/// How a new parameter is filled.
#[derive(Debug, Clone)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Uniform on `[-bound, bound)`.
    Uniform(f64),
    /// Every entry this value.
    Const(f64),
    /// These values, in row-major order.
    Values(Vec<f64>),
    /// A linear layer's weight with `fan_in` inputs, drawn as the store's [`InitSpec`] says.
    Weight { fan_in: usize },
    /// A linear layer's bias with `fan_in` inputs, drawn as the store's [`InitSpec`] says.
    Bias { fan_in: usize },
    /// An embedding table (tokens, token types, learned positions), drawn as the store's
    /// [`InitSpec`] says.
    Embedding,
}

/// What a new parameter's entries are drawn from, once the scheme has been applied.
enum Draw {
    Normal(f64),
    Uniform(f64),
    Const(f64),
    Values(Vec<f64>),
}

impl Init {
    /// The distribution `scheme` gives this kind of parameter.
    fn resolve(self, scheme: InitSpec) -> Draw {
        let bound = |fan_in: usize| 1.0 / (fan_in.max(1) as f64).sqrt();
        match (self, scheme) {
            (Init::Normal(std), _) => Draw::Normal(std),
            (Init::Uniform(b), _) => Draw::Uniform(b),
            (Init::Const(c), _) => Draw::Const(c),
            (Init::Values(v), _) => Draw::Values(v),
            (Init::Weight { .. } | Init::Embedding, InitSpec::Gpt2) => Draw::Normal(INIT_STD),
            (Init::Bias { .. }, InitSpec::Gpt2) => Draw::Const(0.0),
            (Init::Weight { fan_in } | Init::Bias { fan_in }, InitSpec::Torch) => {
                Draw::Uniform(bound(fan_in))
            }
            (Init::Embedding, InitSpec::Torch) => Draw::Normal(1.0),
        }
    }
}

/// Where a store's parameters come from instead of being initialised (a checkpoint).
pub trait Source: std::fmt::Debug + Send + Sync {
    /// The parameter `name` (full dotted name) of `shape`, as a variable of `dtype` on
    /// `device`. A source may record a parameter it lacks and hand out a stand-in, to
    /// report every missing one at once.
    fn take(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Var>;

    /// The matrix `name` of `[rows, cols]` if the source stores it quantised (a `formers
    /// compress quantize` checkpoint), for a layer that multiplies by it in integers;
    /// `None` when it is stored in floating point (then [`Source::take`] reads it).
    fn take_quantized(&self, _name: &str, _shape: [usize; 2]) -> Result<Option<QuantMatrix>> {
        Ok(None)
    }
}

#[derive(Debug)]
enum Fill {
    Init(Rng),
    Source(Arc<dyn Source>),
}

#[derive(Debug)]
struct Store {
    vars: BTreeMap<String, Var>,
    fill: Fill,
}

/// A handle on a shared parameter store at a name prefix.
#[derive(Debug, Clone)]
pub struct Params {
    store: Arc<Mutex<Store>>,
    prefix: String,
    dtype: DType,
    device: Device,
    trainable: bool,
    init: InitSpec,
}

impl Params {
    /// An empty store whose parameters are initialised from `seed`.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::with_fill(Fill::Init(Rng::new(seed)), dtype, device)
    }

    /// An empty store whose parameters are taken from `source` as they are asked for;
    /// the `Init` a module passes is ignored.
    pub fn from_source(source: Arc<dyn Source>, dtype: DType, device: &Device) -> Self {
        Self::with_fill(Fill::Source(source), dtype, device)
    }

    fn with_fill(fill: Fill, dtype: DType, device: &Device) -> Self {
        Params {
            store: Arc::new(Mutex::new(Store {
                vars: BTreeMap::new(),
                fill,
            })),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            trainable: true,
            init: InitSpec::default(),
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

    /// The same store, drawing new weights as `init` says.
    pub fn with_init(&self, init: InitSpec) -> Self {
        Params {
            init,
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

    /// The parameter `name` of this shape, created with `init` (or taken from the store's
    /// source) the first time it is asked for.
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
        let var = match &mut store.fill {
            Fill::Source(source) => {
                let var = source.take(&full, shape, self.dtype, &self.device)?;
                if var.dims() != shape {
                    return Err(Error::config(
                        full,
                        format!("shape {shape:?} expected, the source gave {:?}", var.dims()),
                    ));
                }
                var
            }
            Fill::Init(rng) => {
                let n: usize = shape.iter().product();
                let values: Vec<f64> = match init.resolve(self.init) {
                    Draw::Normal(std) => (0..n).map(|_| rng.normal() * std).collect(),
                    Draw::Uniform(b) => (0..n).map(|_| (2.0 * rng.uniform() - 1.0) * b).collect(),
                    Draw::Const(c) => vec![c; n],
                    Draw::Values(v) if v.len() == n => v,
                    Draw::Values(v) => {
                        return Err(Error::config(
                            full,
                            format!("{} initial values for {n} entries", v.len()),
                        ));
                    }
                };
                let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
                Var::from_tensor(&t)?
            }
        };
        let out = self.hand_out(&var);
        store.vars.insert(full, var);
        Ok(out)
    }

    /// The matrix `name` of `[rows, cols]` quantised, if this is an inference view (frozen)
    /// of a source that stores it so; `None` otherwise, and then [`Params::get`] gives it.
    pub fn get_quantized(&self, shape: [usize; 2], name: &str) -> Result<Option<QuantMatrix>> {
        if self.trainable {
            return Ok(None);
        }
        let store = self.store.lock().expect("parameter store poisoned");
        match &store.fill {
            Fill::Source(source) => source.take_quantized(&self.full_name(name), shape),
            Fill::Init(_) => Ok(None),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out `0, 1, 2, ...` in every shape, and counts what it was asked for.
    #[derive(Debug, Default)]
    struct Counting(Mutex<Vec<String>>);

    impl Source for Counting {
        fn take(&self, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Var> {
            self.0.lock().unwrap().push(name.to_string());
            let n: usize = shape.iter().product();
            let t = Tensor::arange(0f32, n as f32, dev)?.reshape(shape)?;
            Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    fn mean_std(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn init_schemes_draw_what_they_name() {
        let draw = |scheme: InitSpec, init: Init| {
            let p = Params::new(5, DType::F64, &Device::Cpu).with_init(scheme);
            values(&p.get(&[64, 100], "w", init).unwrap())
        };
        // GPT-2: the same draws as an explicit N(0, 0.02) (old checkpoints and seeds keep
        // their numbers), zero biases.
        let gpt2 = draw(InitSpec::Gpt2, Init::Weight { fan_in: 100 });
        assert_eq!(gpt2, draw(InitSpec::Gpt2, Init::Normal(INIT_STD)));
        assert_eq!(gpt2, draw(InitSpec::Gpt2, Init::Embedding));
        assert!(draw(InitSpec::Gpt2, Init::Bias { fan_in: 100 })
            .iter()
            .all(|&b| b == 0.0));
        // PyTorch: U(±1/√fan_in) for weights and biases (std bound/√3), N(0, 1) embeddings.
        for init in [Init::Weight { fan_in: 100 }, Init::Bias { fan_in: 100 }] {
            let w = draw(InitSpec::Torch, init);
            assert!(w.iter().all(|x| x.abs() <= 0.1), "outside ±1/√100");
            let (mean, std) = mean_std(&w);
            assert!(mean.abs() < 0.005 && (std - 0.1 / 3f64.sqrt()).abs() < 0.003);
        }
        let (mean, std) = mean_std(&draw(InitSpec::Torch, Init::Embedding));
        assert!(
            mean.abs() < 0.05 && (std - 1.0).abs() < 0.03,
            "{mean} {std}"
        );
        // Explicit distributions are the scheme's business no more.
        assert_eq!(
            draw(InitSpec::Torch, Init::Normal(0.5)),
            draw(InitSpec::Gpt2, Init::Normal(0.5))
        );
    }

    #[test]
    fn a_source_fills_parameters_once_and_init_is_ignored() {
        let source = Arc::new(Counting::default());
        let p = Params::from_source(source.clone(), DType::F64, &Device::Cpu).pp("layer");
        let w = p.get(&[2, 3], "weight", Init::Normal(1.0)).unwrap();
        assert_eq!(
            w.to_vec2::<f64>().unwrap(),
            [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        );
        p.get(&[2, 3], "weight", Init::Const(7.0)).unwrap();
        assert_eq!(*source.0.lock().unwrap(), ["layer.weight"]);
        assert!(p.get(&[3, 2], "weight", Init::Const(0.0)).is_err());
    }
}
