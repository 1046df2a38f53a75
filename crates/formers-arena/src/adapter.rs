//! Feeds an [`ArenaTask`] to the formers trainer: padded batches with a padding mask and
//! one class target per sequence, and accuracy over a whole split.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use formers::loss::accuracy;
use formers::model::Model;
use formers::rng::Rng;
use formers::tasks::{Batch, Task};

use crate::task::{ArenaTask, Split};

/// An arena task as a formers [`Task`]: training batches from the train split, evaluation
/// batches from the validation split, examples drawn uniformly with the caller's generator.
#[derive(Clone)]
pub struct Adapter {
    task: Arc<dyn ArenaTask>,
}

impl Adapter {
    pub fn new(task: Arc<dyn ArenaTask>) -> Self {
        Adapter { task }
    }

    fn draw(&self, split: Split, rng: &mut Rng, b: usize) -> formers::Result<Batch> {
        let n = self.task.len(split);
        let indices: Vec<usize> = (0..b).map(|_| rng.below(n)).collect();
        batch(self.task.as_ref(), split, &indices)
    }
}

impl Task for Adapter {
    fn name(&self) -> &str {
        self.task.name()
    }
    fn train_batch(&self, rng: &mut Rng, batch_size: usize) -> formers::Result<Batch> {
        self.draw(Split::Train, rng, batch_size)
    }
    fn eval_batch(&self, rng: &mut Rng, batch_size: usize) -> formers::Result<Batch> {
        self.draw(Split::Val, rng, batch_size)
    }
}

/// Examples `indices` of `split`, each padded with id 0 to the task's `max_len` (a longer
/// one is cut), with mask 1 on real tokens and the class label as target.
pub fn batch(task: &dyn ArenaTask, split: Split, indices: &[usize]) -> formers::Result<Batch> {
    let n = task.max_len();
    let b = indices.len();
    let mut ids = vec![0u32; b * n];
    let mut mask = vec![0f32; b * n];
    let mut labels = Vec::with_capacity(b);
    let mut tokens = 0;
    for (row, &i) in indices.iter().enumerate() {
        let ex = task.example(split, i);
        let len = ex.ids.len().min(n);
        ids[row * n..row * n + len].copy_from_slice(&ex.ids[..len]);
        mask[row * n..row * n + len].fill(1.0);
        labels.push(ex.label);
        tokens += len;
    }
    Ok(Batch {
        inputs: Tensor::from_vec(ids, (b, n), &Device::Cpu)?,
        targets: Tensor::from_vec(labels, b, &Device::Cpu)?,
        weights: None,
        mask: Some(Tensor::from_vec(mask, (b, n), &Device::Cpu)?),
        tokens,
    })
}

/// Accuracy of `model` over every example of `split`, and the inference throughput in
/// input positions (padding included: that is what the model computes) per second.
pub fn split_accuracy(
    model: &Model,
    task: &dyn ArenaTask,
    split: Split,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> formers::Result<(f64, usize, f64)> {
    let total = task.len(split);
    let (mut correct, mut counted) = (0, 0);
    let mut seconds = 0f64;
    for start in (0..total).step_by(batch_size.max(1)) {
        let indices: Vec<usize> = (start..(start + batch_size).min(total)).collect();
        let b = batch(task, split, &indices)?;
        let t = Instant::now();
        let logits = model.forward(&b.inputs, b.mask.as_ref(), None)?;
        let (c, n) = accuracy(&logits, &b.targets, None)?;
        seconds += t.elapsed().as_secs_f64();
        correct += c;
        counted += n;
        progress(counted, total);
    }
    let positions = (counted * task.max_len()) as f64;
    Ok((
        correct as f64 / counted.max(1) as f64,
        counted,
        positions / seconds.max(1e-9),
    ))
}
