//! Post-training transformations of trained models that keep (or measurably change) what
//! they compute: Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (`norm`), int8 weights
//! (`quantize`), low-rank factorisation (`lowrank`, by `svd`). Their results are formers model directories (`pretrained::native`).

pub mod heal;
pub mod lowrank;
pub mod norm;
pub mod quantize;
pub mod svd;

use crate::pretrained::native::Step;
use crate::pretrained::Pretrained;
use crate::{Error, Result};

/// Refuses `p` when a step already applied to it matches `done`, saying `why`.
pub(crate) fn refuse_after(p: &Pretrained, done: impl Fn(&Step) -> bool, why: &str) -> Result<()> {
    if p.compression.iter().any(done) {
        return Err(Error::Input(format!("{}: {why}", p.dir.display())));
    }
    Ok(())
}
