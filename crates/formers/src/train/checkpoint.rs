//! Checkpoints: `model.safetensors` (weights), `optimizer.safetensors` (Adam moments) and
//! `state.json` (step, RNG states, data position), written atomically as a directory:
//! files go to `checkpoint.tmp/`, are synced, and the directory is renamed into place.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

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

/// The checkpoint directory of run `out`, falling back to the previous one if a crash
/// happened between the two renames of [`save`].
pub fn locate(out: &Path) -> Option<PathBuf> {
    [DIR, "checkpoint.old"]
        .iter()
        .map(|d| out.join(d))
        .find(|d| d.join("state.json").is_file())
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
    write_tensors(&tmp.join("model.safetensors"), weights)?;
    write_tensors(&tmp.join("optimizer.safetensors"), moments)?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    let state_path = tmp.join("state.json");
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
    let state_path = dir.join("state.json");
    let text = fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: state_path.clone(),
        msg: format!("unreadable training state: {e}"),
    })?;
    let weights = read_tensors(&dir.join("model.safetensors"))?;
    let moments = read_tensors(&dir.join("optimizer.safetensors"))?;
    Ok(Loaded {
        weights,
        moments,
        state,
    })
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
}
