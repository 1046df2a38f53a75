//! Training: AdamW, warm-up + cosine schedule, clipping, accumulation, atomic resumable
//! checkpoints; the [`Trainer`] (model and optimizer, stepped in memory) and the run
//! directory on top of it ([`RunDir`]: metrics, checkpoints, resume).

pub(crate) mod checkpoint;
pub(crate) mod config;
pub(crate) mod optimizer;
pub(crate) mod run;
pub(crate) mod schedule;
pub(crate) mod task;
pub(crate) mod trainer;

pub use config::{RunConfig, TrainConfig};
pub use optimizer::AdamW;
pub use run::{
    load_trained, load_trained_with, train, train_task, train_with, RunDir, RunRecord, Start,
    Summary,
};
pub use task::{Batch, Task};
pub use trainer::{evaluate, EvalReport, Observer, StepReport, Trainer};
