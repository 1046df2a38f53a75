//! The one form a batch takes inside the model, whatever entry point it came through, and
//! [`Packed`], the padding-free batch callers build.

use candle_core::{Device, Tensor};

use super::cache::Cache;
use crate::mixer::Segment;
use crate::{Error, Result};

/// A padding-free batch: the token ids of all sequences back to back, each token's
/// position inside its sequence, and `(start, len)` of every sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `[total]` token ids.
    pub ids: Vec<u32>,
    /// `[total]` position of each token within its sequence.
    pub positions: Vec<u32>,
    /// `(start, len)` of each sequence in `ids`.
    pub segments: Vec<(usize, usize)>,
}

impl Packed {
    /// Packs sequences; empty sequences are an error (they have nothing to pool).
    pub fn new<S: AsRef<[u32]>>(seqs: &[S]) -> Result<Self> {
        let total = seqs.iter().map(|s| s.as_ref().len()).sum();
        let mut p = Packed {
            ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            segments: Vec::with_capacity(seqs.len()),
        };
        for (i, s) in seqs.iter().enumerate() {
            let s = s.as_ref();
            if s.is_empty() {
                return Err(Error::Input(format!("sequence {i} of the batch is empty")));
            }
            p.segments.push((p.ids.len(), s.len()));
            p.ids.extend_from_slice(s);
            p.positions.extend(0..s.len() as u32);
        }
        Ok(p)
    }
}

/// Token ids as a `[1, n]` u32 tensor on the CPU.
pub fn ids_tensor(ids: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        ids.to_vec(),
        (1, ids.len()),
        &Device::Cpu,
    )?)
}

/// A batch as an entry point receives it.
pub(super) enum Input<'a> {
    /// Rows `ids [b, n]` of one length; `mask [b, n]` is 1 for tokens, 0 for padding. With
    /// a cache, every row continues it.
    Rows {
        ids: &'a Tensor,
        mask: Option<&'a Tensor>,
    },
    /// Sequences packed back to back (each from position 0 for rotary positions).
    Packed(&'a Packed),
    /// Sequences, the `i`-th continuing the `i`-th cache (a decoding step).
    Sequences(&'a [&'a [u32]]),
}

/// Where a batch's tokens sit.
pub(super) enum Place {
    /// Every row starts at this position (what its cache holds, or 0).
    From(usize),
    /// Each token's position, `[total]` u32 (packed sequences).
    At(Tensor),
}

/// The one form of a batch inside the model: token ids in rows, where they sit, the
/// padding, the sequences packed into the one row and the caches they continue.
pub(super) struct Batch<'a> {
    /// `[rows, n]` u32.
    pub ids: Tensor,
    pub place: Place,
    /// `[rows, n]`: 1 for tokens, 0 for padding.
    pub mask: Option<&'a Tensor>,
    /// The sequences of a packed batch (one row).
    pub segments: Option<Vec<Segment>>,
    /// None, one continued by every row, or one per segment.
    pub caches: Vec<&'a mut Cache>,
}

impl<'a> Batch<'a> {
    /// The batch of `input` continuing `caches`, every sequence at most `max_len` tokens
    /// counting what its cache holds.
    pub(super) fn new(
        input: Input<'a>,
        caches: Vec<&'a mut Cache>,
        max_len: usize,
    ) -> Result<Self> {
        match input {
            Input::Rows { ids, mask } => {
                let n = ids.dims2()?.1;
                let offset = match caches.as_slice() {
                    [] => 0,
                    [cache] => cache.len,
                    _ => return Err(Error::Input("rows continue one cache".into())),
                };
                check_len(offset + n, max_len)?;
                Ok(Batch {
                    ids: ids.clone(),
                    place: Place::From(offset),
                    mask,
                    segments: None,
                    caches,
                })
            }
            Input::Packed(batch) => {
                let longest = batch.segments.iter().map(|s| s.1).max().unwrap_or(0);
                check_len(longest, max_len)?;
                let segments = batch.segments.iter().map(|&(start, len)| Segment {
                    start,
                    len,
                    offset: 0,
                });
                Ok(Batch {
                    ids: Tensor::from_slice(&batch.ids, (1, batch.ids.len()), &Device::Cpu)?,
                    place: Place::At(Tensor::from_slice(
                        &batch.positions,
                        batch.positions.len(),
                        &Device::Cpu,
                    )?),
                    mask: None,
                    segments: Some(segments.collect()),
                    caches,
                })
            }
            Input::Sequences(ids) => {
                if ids.len() != caches.len() || ids.is_empty() {
                    return Err(Error::Input(format!(
                        "a decoding step needs one cache per sequence and at least one sequence, found {} sequences and {} caches",
                        ids.len(),
                        caches.len()
                    )));
                }
                let total = ids.iter().map(|s| s.len()).sum();
                let mut flat = Vec::with_capacity(total);
                let mut positions = Vec::with_capacity(total);
                let mut segments = Vec::with_capacity(ids.len());
                for (i, (s, c)) in ids.iter().zip(&caches).enumerate() {
                    if s.is_empty() {
                        return Err(Error::Input(format!("sequence {i} of the step is empty")));
                    }
                    check_len(c.len + s.len(), max_len)?;
                    segments.push(Segment {
                        start: flat.len(),
                        len: s.len(),
                        offset: c.len,
                    });
                    flat.extend_from_slice(s);
                    positions.extend((c.len..c.len + s.len()).map(|p| p as u32));
                }
                Ok(Batch {
                    ids: Tensor::from_vec(flat, (1, total), &Device::Cpu)?,
                    place: Place::At(Tensor::from_vec(positions, total, &Device::Cpu)?),
                    mask: None,
                    segments: Some(segments),
                    caches,
                })
            }
        }
    }
}

/// Refuses a sequence of `n` tokens in a model of `max_len`.
fn check_len(n: usize, max_len: usize) -> Result<()> {
    if n > max_len {
        return Err(Error::Input(format!(
            "sequence of {n} tokens is longer than the model's max_len {max_len}"
        )));
    }
    Ok(())
}
