//! Feeds an [`ArenaTask`] to the formers trainer: padded batches with a padding mask and
//! one class target per sequence, and accuracy over a whole split.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use formers::loss::accuracy;
use formers::model::Model;
use formers::rng::Rng;
use formers::train::{Batch, Task};

use crate::task::{ArenaTask, Split};

/// An arena task as a formers [`Task`]: training batches from the train split (fresh
/// examples every batch for a generated task), evaluation batches from the validation split,
/// examples drawn uniformly with the caller's generator.
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
    /// A generated task's batch `number` holds training examples `number · b ..` `(number +
    /// 1) · b`: fresh ones every step, none seen twice in a run, and none a validation or
    /// test example (its splits are disjoint by construction). Other tasks draw from their
    /// training split with `rng`.
    fn train_batch_numbered(
        &self,
        number: u64,
        rng: &mut Rng,
        batch_size: usize,
    ) -> formers::Result<Batch> {
        if !self.task.generated() {
            return self.train_batch(rng, batch_size);
        }
        let first = usize::try_from(number)
            .ok()
            .and_then(|n| n.checked_mul(batch_size))
            .ok_or_else(|| {
                formers::Error::Input(format!("training batch {number} is out of range"))
            })?;
        let indices: Vec<usize> = (first..first + batch_size).collect();
        batch(self.task.as_ref(), Split::Train, &indices)
    }
}

/// Examples `indices` of `split`, each padded with id 0 to the task's `max_len` (a longer
/// one is cut), with mask 1 on real tokens and the class label as target. For a task of
/// pairs ([`ArenaTask::pairs`]) each document is padded to `max_len / 2` on its own: the
/// first in positions `0..max_len/2`, the second after it.
pub fn batch(task: &dyn ArenaTask, split: Split, indices: &[usize]) -> formers::Result<Batch> {
    let n = task.max_len();
    let b = indices.len();
    let mut ids = vec![0u32; b * n];
    let mut mask = vec![0f32; b * n];
    let mut labels = Vec::with_capacity(b);
    let mut tokens = 0;
    for (row, &i) in indices.iter().enumerate() {
        let ex = task.example(split, i);
        let row = row * n;
        let parts = match (task.pairs(), ex.second) {
            (true, Some(at)) => {
                let at = at.min(ex.ids.len());
                let (first, second) = ex.ids.split_at(at);
                vec![(0, first, n / 2), (n / 2, second, n - n / 2)]
            }
            (true, None) => {
                return Err(formers::Error::Input(format!(
                    "{} example {i} is not a pair of documents",
                    task.name()
                )))
            }
            (false, _) => vec![(0, ex.ids.as_slice(), n)],
        };
        for (start, doc, room) in parts {
            let len = doc.len().min(room);
            let at = row + start;
            ids[at..at + len].copy_from_slice(&doc[..len]);
            mask[at..at + len].fill(1.0);
            tokens += len;
        }
        labels.push(ex.label);
    }
    Ok(Batch {
        inputs: Tensor::from_vec(ids, (b, n), &Device::Cpu)?,
        targets: Tensor::from_vec(labels, b, &Device::Cpu)?,
        weights: None,
        mask: Some(Tensor::from_vec(mask, (b, n), &Device::Cpu)?),
        tokens,
    })
}

/// How a model did on a whole split ([`split_accuracy`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitScore {
    pub accuracy: f64,
    pub examples: usize,
    /// Inference throughput in input positions (padding included: that is what the model
    /// computes) per second.
    pub positions_per_s: f64,
    /// The share of the split's examples in its most common class: what always answering
    /// that class scores.
    pub majority: f64,
}

/// Accuracy of `model` over every example of `split`, the inference throughput, and the
/// split's majority-class rate.
pub fn split_accuracy(
    model: &Model,
    task: &dyn ArenaTask,
    split: Split,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> formers::Result<SplitScore> {
    let total = task.len(split);
    let (mut correct, mut counted) = (0, 0);
    let mut per_class = vec![0usize; task.n_classes()];
    let mut seconds = 0f64;
    for start in (0..total).step_by(batch_size.max(1)) {
        let indices: Vec<usize> = (start..(start + batch_size).min(total)).collect();
        let b = batch(task, split, &indices)?;
        for label in b.targets.to_vec1::<u32>()? {
            if let Some(c) = per_class.get_mut(label as usize) {
                *c += 1;
            }
        }
        let t = Instant::now();
        let logits = model.forward(&b.inputs, b.mask.as_ref(), None)?;
        let (c, n) = accuracy(&logits, &b.targets, None)?;
        seconds += t.elapsed().as_secs_f64();
        correct += c;
        counted += n;
        progress(counted, total);
    }
    let positions = (counted * task.max_len()) as f64;
    let largest = per_class.iter().copied().max().unwrap_or(0);
    Ok(SplitScore {
        accuracy: correct as f64 / counted.max(1) as f64,
        examples: counted,
        positions_per_s: positions / seconds.max(1e-9),
        majority: largest as f64 / counted.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use formers::train::Trainer;

    use super::*;
    use crate::exec::{configure, configure_task, speed_run};
    use crate::listops::ListOps;
    use crate::suite::SuiteSpec;
    use crate::task::{Example, Setting};
    use crate::variants;

    /// Generated ListOps that records which training examples were asked for.
    struct Recording {
        inner: ListOps,
        train: Mutex<Vec<usize>>,
    }

    impl ArenaTask for Recording {
        fn name(&self) -> &'static str {
            "listops"
        }
        fn source(&self) -> String {
            self.inner.source()
        }
        fn n_classes(&self) -> usize {
            self.inner.n_classes()
        }
        fn vocab_size(&self) -> usize {
            self.inner.vocab_size()
        }
        fn max_len(&self) -> usize {
            self.inner.max_len()
        }
        fn len(&self, split: Split) -> usize {
            self.inner.len(split)
        }
        fn generated(&self) -> bool {
            true
        }
        fn example(&self, split: Split, index: usize) -> Example {
            if split == Split::Train {
                self.train.lock().unwrap().push(index);
            }
            self.inner.example(split, index)
        }
        fn write_tsv(
            &self,
            split: Split,
            n: usize,
            out: &mut dyn std::io::Write,
        ) -> std::io::Result<()> {
            self.inner.write_tsv(split, n, out)
        }
    }

    #[test]
    fn a_generated_task_trains_on_fresh_examples_that_never_repeat() {
        let task = Arc::new(Recording {
            inner: ListOps::new(Setting::Lite, 1),
            train: Mutex::new(Vec::new()),
        });
        let vanilla = variants::resolve(&["vanilla".to_string()])
            .unwrap()
            .remove(0);
        let suite = SuiteSpec::new(Setting::Lite);
        let (steps, batch, accum) = (4, 3, 2);
        let mut run = speed_run(&vanilla, &suite, 64, steps);
        run.model = configure_task(&vanilla, &suite, task.as_ref());
        run.train.seq_len = task.max_len();
        run.train.batch_size = batch;
        run.train.grad_accum = accum;
        let adapter = Adapter::new(task.clone());
        let mut trainer = Trainer::new(&run, &adapter).unwrap();
        while !trainer.is_done() {
            trainer.step().unwrap();
        }
        let seen = task.train.lock().unwrap().clone();
        // Batch k of the run (one per micro-batch) holds examples k·b .. (k+1)·b.
        let expected: Vec<usize> = (0..steps * accum * batch).collect();
        assert_eq!(seen, expected);
    }

    /// Ten test examples, seven of class 0.
    struct Tiny;

    impl ArenaTask for Tiny {
        fn name(&self) -> &'static str {
            "tiny"
        }
        fn source(&self) -> String {
            "test".into()
        }
        fn n_classes(&self) -> usize {
            2
        }
        fn vocab_size(&self) -> usize {
            16
        }
        fn max_len(&self) -> usize {
            8
        }
        fn len(&self, _split: Split) -> usize {
            10
        }
        fn example(&self, _split: Split, index: usize) -> Example {
            Example::new(vec![1 + index as u32; 1 + index % 8], u32::from(index >= 7))
        }
        fn write_tsv(
            &self,
            _split: Split,
            _n: usize,
            _out: &mut dyn std::io::Write,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_split_score_counts_every_example_and_the_majority_class() {
        let vanilla = variants::resolve(&["vanilla".to_string()])
            .unwrap()
            .remove(0);
        let suite = SuiteSpec::new(Setting::Lite);
        let mut run = speed_run(&vanilla, &suite, 8, 1);
        run.model = configure(&vanilla, &suite, 16, 8, 2);
        run.train.seq_len = 8;
        let task: Arc<dyn ArenaTask> = Arc::new(Tiny);
        let adapter = Adapter::new(task.clone());
        let trainer = Trainer::new(&run, &adapter).unwrap();
        // Batches of 3: the last one holds a single example.
        let score = split_accuracy(
            trainer.inference_model(),
            task.as_ref(),
            Split::Test,
            3,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(score.examples, 10);
        assert!((score.majority - 0.7).abs() < 1e-12, "{score:?}");
        assert!((0.0..=1.0).contains(&score.accuracy));
        assert!(score.positions_per_s > 0.0);
    }
}
