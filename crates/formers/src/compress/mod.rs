//! Post-training transformations of trained models that keep (or measurably change) what
//! they compute. So far: Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion.

pub mod norm;
