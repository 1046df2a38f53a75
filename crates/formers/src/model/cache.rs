//! The decoding state of one sequence (or of a batch of rows decoded together).

use crate::mixer::MixerCache;

/// Decoding state: one mixer cache per layer and the number of tokens seen.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub(super) layers: Vec<MixerCache>,
    pub(super) len: usize,
}

impl Cache {
    /// Tokens held so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values the cache holds, over all layers (what `limits::inference` estimates).
    pub fn values(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.tensors)
            .map(|t| t.elem_count())
            .sum()
    }
}
