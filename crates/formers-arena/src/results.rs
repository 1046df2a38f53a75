//! The results store: one JSON line per finished run, appended as each run ends, so a killed
//! arena loses no finished run; `merge` joins the files of sharded runs.

use serde::{Deserialize, Serialize};

/// One line of `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A (task, variant, seed) trained and tested.
    Run(RunResult),
    /// Training speed and memory of a variant at one sequence length (LRA Table 2).
    Speed(SpeedResult),
    /// A task that could not run here (e.g. CIFAR-10 files absent).
    Skipped(Skipped),
}

/// A finished training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// `lite` or `full`.
    pub suite: String,
    pub task: String,
    pub variant: String,
    pub seed: u64,
    /// The budget as given (`300` steps or `2m` minutes).
    pub budget: String,
    /// Where the task's data came from (one line).
    pub source: String,
    /// Padded input length.
    pub seq_len: usize,
    pub batch_size: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Accuracy on the whole test split.
    pub test_accuracy: f64,
    pub test_examples: usize,
    /// Accuracy on the held-out validation batches at the end of training.
    pub val_accuracy: f64,
    /// Optimizer steps per second (forward, backward, update).
    pub train_steps_per_s: f64,
    /// Input tokens (padding included) per second of inference on the test split.
    pub infer_tokens_per_s: f64,
    /// Peak resident memory of the process during this run, bytes.
    pub peak_rss_bytes: u64,
    /// Trainable parameters.
    pub params: usize,
    /// Analytical forward FLOPs per input token at `seq_len`.
    pub flops_per_token: f64,
    /// Seconds from start of training to end of testing.
    pub wall_s: f64,
    /// (step, training loss), every step.
    pub loss_curve: Vec<(usize, f32)>,
}

/// Training speed and memory of one variant at one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedResult {
    pub suite: String,
    pub variant: String,
    /// Sequence length.
    pub length: usize,
    pub batch_size: usize,
    /// Optimizer steps per second (median over the timed steps).
    pub steps_per_s: f64,
    /// Peak resident memory while training at this length, bytes.
    pub peak_rss_bytes: u64,
    pub params: usize,
}

/// A task left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub suite: String,
    pub task: String,
    pub reason: String,
}
