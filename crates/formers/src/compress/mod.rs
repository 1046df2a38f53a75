//! Post-training transformations of trained models that keep (or measurably change) what
//! they compute: Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (`norm`), int8 weights
//! (`quantize`), low-rank factorisation (`lowrank`, by `svd`), MatFormer sub-models (`extract`). Their results are formers model directories (`pretrained::native`).

pub mod extract;
pub mod heal;
pub mod lowrank;
pub mod norm;
pub mod quantize;
pub mod svd;

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::pretrained::native::{Manifest, Step, Stored};
use crate::pretrained::Pretrained;
use crate::{Error, Result};

/// The manifest of `p` after `step`, which made its config `cfg`.
pub(crate) fn manifest_after(p: &Pretrained, cfg: &ModelConfig, step: Step) -> Manifest {
    let mut steps = p.compression.clone();
    steps.push(step);
    Manifest::new(p.family, cfg, &p.dir, steps)
}

/// `tensors` to be written as f32.
pub(crate) fn stored_f32(tensors: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Stored>> {
    tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), Stored::of(t)?)))
        .collect()
}

/// Refuses `p` when a step already applied to it matches `done`, saying `why`.
pub(crate) fn refuse_after(p: &Pretrained, done: impl Fn(&Step) -> bool, why: &str) -> Result<()> {
    if p.compression.iter().any(done) {
        return Err(Error::Input(format!("{}: {why}", p.dir.display())));
    }
    Ok(())
}
