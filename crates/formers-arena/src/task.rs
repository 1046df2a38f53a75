//! What every arena task shares: splits, settings, examples and the task interface.

use std::io::{self, Write};

use formers::rng::Rng;

/// A part of a task's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    /// All splits in order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// `train`, `val` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// Parses `train`, `val` (or `dev`) and `test`.
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "val" | "dev" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }

    /// A per-split stream id, so splits draw from disjoint random streams.
    pub fn stream(self) -> u64 {
        match self {
            Split::Train => 0x7a11,
            Split::Val => 0x7a12,
            Split::Test => 0x7a13,
        }
    }
}

/// The two sizes of every task: `Lite` fits 2 CPU cores in minutes, `Full` is LRA's.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Setting {
    Lite,
    Full,
}

impl Setting {
    /// `lite` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Lite => "lite",
            Setting::Full => "full",
        }
    }

    /// Parses `lite` and `full`.
    pub fn parse(s: &str) -> Option<Setting> {
        match s {
            "lite" => Some(Setting::Lite),
            "full" => Some(Setting::Full),
            _ => None,
        }
    }
}

/// One example: the model's input ids (unpadded, at most `max_len`) and its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub label: u32,
}

/// The random generator for example `index` of `split` of a task seeded with `seed`:
/// every example is a pure function of (seed, split, index), so splits never overlap,
/// shards agree, and nothing has to be stored.
pub fn example_rng(seed: u64, split: Split, index: usize) -> Rng {
    let mut r = Rng::new(seed ^ split.stream().wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.fork(index as u64)
}

/// An arena task: a labelled, deterministic, finite data set per split.
pub trait ArenaTask: Send + Sync {
    /// Short name used on the command line and in results (`listops`, `text`, ...).
    fn name(&self) -> &'static str;
    /// Where the examples come from, one line for the report (e.g. "generated, seed 0" or
    /// "LRA files in DIR" or "offline default: ...").
    fn source(&self) -> String;
    /// Number of classes; labels are `0..n_classes`.
    fn n_classes(&self) -> usize;
    /// Input ids are `0..vocab_size` (256 for bytes and pixels).
    fn vocab_size(&self) -> usize;
    /// The length every input is padded to (the model's `max_len`).
    fn max_len(&self) -> usize;
    /// Number of examples in `split`.
    fn len(&self, split: Split) -> usize;
    /// Example `index` (< `len(split)`) of `split`; the same every call.
    fn example(&self, split: Split, index: usize) -> Example;
    /// Writes the first `n` examples of `split` in the layout of LRA's released files
    /// (documented per task), with a header line when that layout has one.
    fn write_tsv(&self, split: Split, n: usize, out: &mut dyn Write) -> io::Result<()>;
}
