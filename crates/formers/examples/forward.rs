//! Build a model from a config file and run one forward pass.
//!
//!     cargo run --release -p formers --example forward [-- CONFIG]
//!
//! CONFIG (JSON or TOML) defaults to the shipped `configs/charlm.json`. The files in
//! `configs/` are run configs (a `model` and a `train` section): `RunConfig` reads them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use formers::model::Model;
use formers::params::Params;
use formers::train::RunConfig;

fn main() -> formers::Result<()> {
    let path = std::env::args_os().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/charlm.json"),
        PathBuf::from,
    );
    let run = RunConfig::from_path(&path)?;
    let cfg = &run.model;
    // Weights drawn from seed 0; `frozen()` builds the inference form (no autodiff graph).
    let params = Params::new(0, DType::F32, &Device::Cpu);
    let model = Model::new(cfg, &params.frozen())?;
    // A few token ids inside the model's vocabulary and length.
    let vocab = cfg.input.vocab_size() as u32;
    let ids: Vec<u32> = b"To be, or not to be"
        .iter()
        .map(|&b| u32::from(b) % vocab)
        .take(cfg.max_len)
        .collect();
    let n = ids.len();
    let x = Tensor::from_vec(ids, (1, n), &Device::Cpu)?;
    let out = model.forward(&x, None, None)?;
    println!(
        "{}: {} layers, {} parameters; {n} tokens in -> output {:?}",
        path.display(),
        cfg.n_layers,
        params.count(),
        out.dims()
    );
    Ok(())
}
