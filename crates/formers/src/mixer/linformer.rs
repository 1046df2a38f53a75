//! Linformer (Wang et al. 2020, "Self-Attention with Linear Complexity"): keys and values
//! are projected along the sequence to `k` rows by learned `E, F : [k, max_len]` (shared by
//! all heads), so attention costs O(n·k). Bidirectional only.

use candle_core::Tensor;

use crate::linear::INIT_STD;
use crate::params::{Init, Params};
use crate::Result;

/// The sequence projections of keys (`e`) and values (`f`): `[k, max_len]` shared by all
/// heads, or `[heads, k, max_len]`.
#[derive(Debug, Clone)]
pub struct LinformerProj {
    pub e: Tensor,
    pub f: Tensor,
}

impl LinformerProj {
    /// Parameters `proj_k`, `proj_v` under `p`; one pair per head when `heads` is given.
    pub fn new(p: &Params, k: usize, max_len: usize, heads: Option<usize>) -> Result<Self> {
        let std = (1.0 / k as f64).sqrt().max(INIT_STD);
        let shape: Vec<usize> = match heads {
            Some(h) => vec![h, k, max_len],
            None => vec![k, max_len],
        };
        Ok(LinformerProj {
            e: p.get(&shape, "proj_k.weight", Init::Normal(std))?,
            f: p.get(&shape, "proj_v.weight", Init::Normal(std))?,
        })
    }

    /// `(E[:, :n] · keys, F[:, :n] · values)` for `[b, h, n, dh]` inputs; padded positions
    /// (`keep [b, 1, n, 1]` zero) are dropped before projecting.
    pub fn project(
        &self,
        k: &Tensor,
        v: &Tensor,
        keep: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let (k, v) = match keep {
            Some(m) => (k.broadcast_mul(m)?, v.broadcast_mul(m)?),
            None => (k.clone(), v.clone()),
        };
        let last = self.e.rank() - 1;
        let e = self.e.narrow(last, 0, n)?.contiguous()?;
        let f = self.f.narrow(last, 0, n)?.contiguous()?;
        Ok((e.broadcast_matmul(&k)?, f.broadcast_matmul(&v)?))
    }
}
