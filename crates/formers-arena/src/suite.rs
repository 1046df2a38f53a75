//! The two arena suites: `lite` (short sequences, small splits and models; minutes on two CPU
//! cores) and `full` (LRA's lengths and splits, for a GPU or a lot of patience), and how a
//! task of either is opened.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::task::{ArenaTask, Setting};
use crate::{image, listops, pathfinder, retrieval, text};

/// The tasks in LRA order. `pathx` (Pathfinder at 128×128) runs only when asked for.
pub const TASKS: &[&str] = &[
    "listops",
    "text",
    "retrieval",
    "image",
    "pathfinder",
    "pathx",
];

/// The tasks a run takes when none are named.
pub const DEFAULT_TASKS: &[&str] = &["listops", "text", "retrieval", "image", "pathfinder"];

/// Seed of every task's data: all variants and run seeds see the same examples.
pub const DATA_SEED: u64 = 0;

/// Model size and training settings of a suite; every variant gets the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteSpec {
    pub setting: Setting,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Optimizer steps per run when no `--budget` is given, for a task not in `task_steps`.
    pub default_steps: usize,
    /// Optimizer steps per run of a task when no `--budget` is given: the steps go where
    /// they teach the lite model something (ListOps learns from 500 steps on, text by
    /// 200–300, retrieval's near-duplicates from about 300, the lite Pathfinder's plateau
    /// breaks between 500 and 1,000). `docs/experiments/arena-lite-tasks.md` gives the
    /// measurements.
    #[serde(default)]
    pub task_steps: BTreeMap<String, usize>,
    /// Lengths of the speed and memory table (LRA Table 2 uses 1K–4K).
    pub speed_lengths: Vec<usize>,
    pub speed_batch: usize,
    /// When set, image tasks (Pathfinder, CIFAR-10) use 2-D rotary positions with this
    /// base instead of the learned 1-D table, for every variant whose mixers rotate
    /// queries and keys (the others keep the table). LRA uses 1-D positions (`None`); the
    /// lite model learns no pixel adjacency from them within its budget (see
    /// `docs/experiments/arena-lite-tasks.md`).
    #[serde(default)]
    pub image_rope_base: Option<f64>,
}

impl SuiteSpec {
    pub fn new(setting: Setting) -> SuiteSpec {
        match setting {
            Setting::Lite => SuiteSpec {
                setting,
                d_model: 64,
                n_heads: 4,
                n_layers: 2,
                batch_size: 16,
                lr: 2e-3,
                default_steps: 100,
                task_steps: [
                    ("listops", 500),
                    ("text", 300),
                    ("retrieval", 300),
                    ("pathfinder", 1000),
                ]
                .into_iter()
                .map(|(t, n)| (t.to_string(), n))
                .collect(),
                speed_lengths: vec![256, 512, 1024],
                speed_batch: 4,
                image_rope_base: Some(10.0),
            },
            Setting::Full => SuiteSpec {
                setting,
                d_model: 256,
                n_heads: 4,
                n_layers: 4,
                batch_size: 32,
                lr: 5e-4,
                default_steps: 5000,
                task_steps: BTreeMap::new(),
                speed_lengths: vec![1024, 2048, 3072, 4096],
                speed_batch: 32,
                image_rope_base: None,
            },
        }
    }

    /// Optimizer steps of a run of `task` when no `--budget` is given.
    pub fn steps(&self, task: &str) -> usize {
        self.task_steps
            .get(task)
            .copied()
            .unwrap_or(self.default_steps)
    }
}

/// Where to find LRA's released files and CIFAR-10; `None` = the offline default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataDirs {
    /// A directory with `basic_{train,val,test}.tsv` (LRA's `listops-1000/`).
    pub listops: Option<PathBuf>,
    /// A directory with `train.tsv`, `test.tsv` (`label<TAB>text`, e.g. IMDb).
    pub text: Option<PathBuf>,
    /// A directory with LRA's `new_aan_pairs.{train,eval,test}.tsv`.
    pub retrieval: Option<PathBuf>,
    /// CIFAR-10 binary version (`cifar-10-batches-bin/`); the image task is skipped without.
    pub cifar: Option<PathBuf>,
}

/// Task `name` of `setting`, or why it cannot run here.
pub fn open_task(
    name: &str,
    setting: Setting,
    data: &DataDirs,
) -> Result<Arc<dyn ArenaTask>, String> {
    Ok(match name {
        "listops" => match &data.listops {
            Some(dir) => Arc::new(listops::ListOps::from_tsv_dir(dir, setting)?),
            None => Arc::new(listops::ListOps::new(setting, DATA_SEED)),
        },
        "text" => match &data.text {
            Some(dir) => Arc::new(text::TextClassification::from_dir(dir, setting)?),
            None => Arc::new(text::TextClassification::offline(setting, DATA_SEED)),
        },
        "retrieval" => match &data.retrieval {
            Some(dir) => Arc::new(retrieval::Retrieval::from_dir(dir, setting)?),
            None => Arc::new(retrieval::Retrieval::offline(setting, DATA_SEED)),
        },
        "image" => {
            let dir = data
                .cifar
                .clone()
                .or_else(|| std::env::var_os("FORMERS_CIFAR10_DIR").map(PathBuf::from));
            match dir {
                Some(dir) => Arc::new(image::Cifar10::open(&dir, setting)?),
                None => {
                    return Err(
                        "CIFAR-10 not given: pass --cifar-dir DIR (the binary version, \
                                https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz) or set \
                                FORMERS_CIFAR10_DIR"
                            .into(),
                    )
                }
            }
        }
        "pathfinder" | "pathx" => {
            Arc::new(pathfinder::Pathfinder::for_task(name, setting, DATA_SEED)?)
        }
        other => {
            return Err(format!(
                "unknown task `{other}`; expected one of {}",
                TASKS.join(", ")
            ))
        }
    })
}
