//! Checkpoints: `model.safetensors` (weights), `optimizer.safetensors` (Adam moments) and
//! `state.json` (step, RNG states, data position), written atomically as a directory:
//! files go to `checkpoint.tmp/`, are synced, and the directory is renamed into place.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fsio;
use crate::rng::Rng;
use crate::{Error, Result};

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Generator of training batches (the data position).
    pub data_rng: Rng,
    /// Generator of dropout masks.
    pub dropout_rng: Rng,
    /// AdamW step count.
    pub adam_t: usize,
    /// The task trained on.
    pub task: String,
}

/// Name of the checkpoint directory inside a run directory.
pub const DIR: &str = "checkpoint";
/// The weights inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The AdamW moments inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Step, generators and task inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";

/// The checkpoint directory of run `out`, falling back to the previous one if a crash
/// happened between the two renames of [`save`].
pub fn locate(out: &Path) -> Option<PathBuf> {
    [DIR, "checkpoint.old"]
        .iter()
        .map(|d| out.join(d))
        .find(|d| d.join(STATE_FILE).is_file())
}

/// Writes a checkpoint of run `out` atomically.
pub fn save(
    out: &Path,
    weights: &BTreeMap<String, Tensor>,
    moments: &BTreeMap<String, Tensor>,
    state: &TrainState,
) -> Result<PathBuf> {
    let dir = out.join(DIR);
    let tmp = out.join("checkpoint.tmp");
    let old = out.join("checkpoint.old");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::io(p, e)
    };
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_tensors(&tmp.join(MODEL_FILE), weights)?;
    write_tensors(&tmp.join(OPTIMIZER_FILE), moments)?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    let state_path = tmp.join(STATE_FILE);
    fs::write(&state_path, json).map_err(io(&state_path))?;
    sync(&state_path)?;
    sync(&tmp)?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if dir.exists() {
        fs::rename(&dir, &old).map_err(io(&dir))?;
    }
    fs::rename(&tmp, &dir).map_err(io(&tmp))?;
    sync(out)?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(dir)
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded {
    /// The directory it was read from (`checkpoint/`, or `checkpoint.old/` after a crash).
    pub dir: PathBuf,
    /// Model weights by parameter name.
    pub weights: BTreeMap<String, Tensor>,
    /// AdamW moments (`m.NAME`, `v.NAME`).
    pub moments: BTreeMap<String, Tensor>,
    /// Step, RNGs and the rest.
    pub state: TrainState,
}

/// Reads the checkpoint of run `out`: weights, optimizer moments and state.
pub fn load(out: &Path) -> Result<Loaded> {
    let dir = locate(out).ok_or_else(|| Error::Checkpoint {
        path: out.join(DIR),
        msg: "no checkpoint here (state.json not found)".into(),
    })?;
    let state_path = dir.join(STATE_FILE);
    let text = fsio::read_text_limited(&state_path, fsio::MAX_CONFIG_BYTES, "a training state")?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: state_path.clone(),
        msg: format!("unreadable training state: {e}"),
    })?;
    let weights = read_tensors(&dir.join(MODEL_FILE))?;
    let moments = read_tensors(&dir.join(OPTIMIZER_FILE))?;
    Ok(Loaded {
        dir,
        weights,
        moments,
        state,
    })
}

impl Loaded {
    /// Checks that this checkpoint can continue a run of `total` steps on `task` whose
    /// parameters are `params`: the step inside the run, the AdamW count equal to it, the
    /// same task, and for every parameter both moments (`m.NAME`, `v.NAME`) with its shape
    /// and dtype, finite (`v` not negative), and no other tensor. Each error names the file.
    /// (The weights themselves are checked when they are assigned.)
    pub fn check(&self, total: usize, task: &str, params: &BTreeMap<String, Tensor>) -> Result<()> {
        let state = &self.state;
        let state_err = |msg: String| Error::Checkpoint {
            path: self.dir.join(STATE_FILE),
            msg,
        };
        if !(1..=total).contains(&state.step) {
            return Err(state_err(format!(
                "step {} is outside this run's steps 1..={total}",
                state.step
            )));
        }
        if state.adam_t != state.step {
            return Err(state_err(format!(
                "adam_t {} differs from step {} (the optimizer steps once per step)",
                state.adam_t, state.step
            )));
        }
        if state.task != task {
            return Err(state_err(format!(
                "task `{}` differs from the run's task `{task}`",
                state.task
            )));
        }
        let opt_err = |msg: String| Error::Checkpoint {
            path: self.dir.join(OPTIMIZER_FILE),
            msg,
        };
        for key in self.moments.keys() {
            let name = key.strip_prefix("m.").or_else(|| key.strip_prefix("v."));
            if !name.is_some_and(|n| params.contains_key(n)) {
                return Err(opt_err(format!(
                    "tensor `{key}` is not a moment of any parameter of this model"
                )));
            }
        }
        for (name, p) in params {
            for which in ["m", "v"] {
                let key = format!("{which}.{name}");
                let Some(t) = self.moments.get(&key) else {
                    return Err(opt_err(format!("moment `{key}` is missing")));
                };
                if t.dims() != p.dims() || t.dtype() != p.dtype() {
                    return Err(opt_err(format!(
                        "moment `{key}` is {:?} {:?}, the parameter is {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        p.dtype(),
                        p.dims()
                    )));
                }
                let (lo, hi) = range(t)?;
                if !(lo.is_finite() && hi.is_finite()) || (which == "v" && lo < 0.0) {
                    return Err(opt_err(format!(
                        "moment `{key}` holds values from {lo} to {hi}, not a valid {}",
                        if which == "m" {
                            "first moment (finite)"
                        } else {
                            "second moment (finite, >= 0)"
                        }
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The smallest and largest value of `t` (NaN when it holds a NaN).
fn range(t: &Tensor) -> Result<(f64, f64)> {
    let t = t.to_dtype(candle_core::DType::F64)?;
    // 0·x is 0 for every finite x and NaN for an infinity or a NaN.
    let nan = t.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f64>()?;
    if nan.is_nan() {
        return Ok((f64::NAN, f64::NAN));
    }
    if t.elem_count() == 0 {
        return Ok((0.0, 0.0));
    }
    Ok((t.min_all()?.to_scalar()?, t.max_all()?.to_scalar()?))
}

/// Reads a safetensors file, with the path in every error.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file ({e})"),
        }
    })?;
    Ok(map.into_iter().collect())
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("cannot write: {e}"),
    })?;
    sync(path)
}

fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("formers-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_truncation_is_a_clear_error() {
        let out = tmpdir("rt");
        let w = BTreeMap::from([(
            "a".to_string(),
            Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap(),
        )]);
        let state = TrainState {
            step: 7,
            data_rng: Rng::new(1),
            dropout_rng: Rng::new(2),
            adam_t: 7,
            task: "copy".into(),
        };
        save(&out, &w, &BTreeMap::new(), &state).unwrap();
        save(&out, &w, &BTreeMap::new(), &state).unwrap();
        let Loaded {
            weights: w2,
            moments: m2,
            state: s2,
            ..
        } = load(&out).unwrap();
        assert_eq!(w2["a"].to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
        assert!(m2.is_empty());
        assert_eq!(s2, state);
        assert!(!out.join("checkpoint.tmp").exists() && !out.join("checkpoint.old").exists());

        let model = out.join(DIR).join("model.safetensors");
        let bytes = fs::read(&model).unwrap();
        fs::write(&model, &bytes[..bytes.len() - 3]).unwrap();
        let e = load(&out).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&out);
    }

    #[test]
    fn a_checkpoint_inconsistent_with_the_run_is_refused_naming_the_file() {
        let dev = &Device::Cpu;
        let params = BTreeMap::from([(
            "w".to_string(),
            Tensor::zeros((2, 3), candle_core::DType::F32, dev).unwrap(),
        )]);
        let good_moments = || {
            BTreeMap::from([
                (
                    "m.w".to_string(),
                    Tensor::ones((2, 3), candle_core::DType::F32, dev).unwrap(),
                ),
                (
                    "v.w".to_string(),
                    Tensor::ones((2, 3), candle_core::DType::F32, dev).unwrap(),
                ),
            ])
        };
        let loaded = |step: usize, adam_t: usize, task: &str, moments| Loaded {
            dir: PathBuf::from("run/checkpoint"),
            weights: BTreeMap::new(),
            moments,
            state: TrainState {
                step,
                data_rng: Rng::new(1),
                dropout_rng: Rng::new(2),
                adam_t,
                task: task.into(),
            },
        };
        loaded(5, 5, "copy", good_moments())
            .check(10, "copy", &params)
            .unwrap();
        let mut wrong_shape = good_moments();
        wrong_shape.insert(
            "v.w".into(),
            Tensor::ones(3, candle_core::DType::F32, dev).unwrap(),
        );
        let mut extra = good_moments();
        extra.insert(
            "m.ghost".into(),
            Tensor::ones(1, candle_core::DType::F32, dev).unwrap(),
        );
        let mut nan = good_moments();
        nan.insert(
            "m.w".into(),
            (Tensor::zeros((2, 3), candle_core::DType::F32, dev).unwrap() / 0.0).unwrap(),
        );
        let mut negative = good_moments();
        negative.insert("v.w".into(), Tensor::full(-1f32, (2, 3), dev).unwrap());
        let cases = [
            (
                loaded(usize::MAX, usize::MAX, "copy", good_moments()),
                "state.json",
                "step 18446744073709551615",
            ),
            (loaded(0, 0, "copy", good_moments()), "state.json", "step 0"),
            (
                loaded(5, 0, "copy", good_moments()),
                "state.json",
                "adam_t 0",
            ),
            (
                loaded(5, 5, "reverse", good_moments()),
                "state.json",
                "task `reverse`",
            ),
            (
                loaded(5, 5, "copy", BTreeMap::new()),
                "optimizer.safetensors",
                "`m.w` is missing",
            ),
            (
                loaded(5, 5, "copy", wrong_shape),
                "optimizer.safetensors",
                "[3]",
            ),
            (
                loaded(5, 5, "copy", extra),
                "optimizer.safetensors",
                "m.ghost",
            ),
            (loaded(5, 5, "copy", nan), "optimizer.safetensors", "NaN"),
            (
                loaded(5, 5, "copy", negative),
                "optimizer.safetensors",
                "second moment",
            ),
        ];
        for (l, file, what) in cases {
            let e = l.check(10, "copy", &params).unwrap_err().to_string();
            assert!(
                e.contains(&format!("run/checkpoint/{file}")) && e.contains(what),
                "{e}"
            );
        }
    }
}
