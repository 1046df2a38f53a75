//! The fixed bounds on single config values and user-given counts: checked first, so that
//! validation and the size arithmetic after it stay cheap and cannot overflow. A leaf:
//! every layer may read it.

use crate::{Error, Result};

/// Most blocks in a model.
pub const MAX_LAYERS: usize = 1 << 16;
/// Widest `d_model`, FFN hidden layer, low rank or head count.
pub const MAX_WIDTH: usize = 1 << 24;
/// Largest vocabulary (also bounds token types and classes).
pub const MAX_VOCAB: usize = 1 << 26;
/// Longest sequence: `max_len`, `seq_len` and every mixer size (window, chunk, `k`, ...).
pub const MAX_LEN: usize = 1 << 24;
/// Largest training batch (sequences per micro-batch).
pub const MAX_BATCH: usize = 1 << 24;

/// `v` must be in `1..=max`; the error names `key`.
pub fn bounded(key: &str, v: usize, max: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::config(key, "must be at least 1, found 0"));
    }
    if v > max {
        return Err(Error::config(
            key,
            format!("must be at most {max}, found {v}"),
        ));
    }
    Ok(())
}
