//! Post-training transformations of trained models that keep (or measurably change) what
//! they compute: Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (`norm`), int8 weights
//! (`quantize`), low-rank factorisation (`lowrank`, by `svd`). Their results are formers model directories (`pretrained::native`).

pub mod lowrank;
pub mod norm;
pub mod quantize;
pub mod svd;
