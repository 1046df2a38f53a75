//! What the trainer draws its data from: the [`Task`] trait and its [`Batch`]. The toy
//! tasks are in `crate::tasks`, the arena's in `formers-arena`.

use candle_core::Tensor;

use crate::rng::Rng;
use crate::Result;

/// One batch: inputs `[b, n]` u32, targets `[b, n]` u32 and optional weights / mask.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids `[b, n]`.
    pub inputs: Tensor,
    /// Target ids, `[b, n]` for per-token tasks, `[b]` for classification.
    pub targets: Tensor,
    /// Which targets count (f32, same shape as `targets`); all when absent.
    pub weights: Option<Tensor>,
    /// 1 for tokens, 0 for padding, `[b, n]`; no padding when absent.
    pub mask: Option<Tensor>,
    /// Real (non-padding) input tokens in the batch.
    pub tokens: usize,
}

/// A source of training and evaluation batches.
pub trait Task: Send + Sync {
    /// The task's name.
    fn name(&self) -> &str;
    /// A training batch drawn with `rng`.
    fn train_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch>;
    /// A held-out batch drawn with `rng`.
    fn eval_batch(&self, rng: &mut Rng, batch_size: usize) -> Result<Batch>;
    /// Training batch `number` of a run (0, 1, ...: one number per micro-batch, the same
    /// after a resume), drawn with `rng`. By default [`Task::train_batch`]; a task with an
    /// unbounded supply of examples uses `number` to give every batch examples no earlier
    /// batch of the run has seen.
    fn train_batch_numbered(&self, number: u64, rng: &mut Rng, batch_size: usize) -> Result<Batch> {
        let _ = number;
        self.train_batch(rng, batch_size)
    }
}
