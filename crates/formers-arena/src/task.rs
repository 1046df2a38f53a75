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
    /// For a task whose inputs are pairs ([`ArenaTask::pairs`]): where the second document
    /// starts in `ids` (each document is at most `max_len / 2` ids).
    pub second: Option<usize>,
}

impl Example {
    /// A one-sequence example.
    pub fn new(ids: Vec<u32>, label: u32) -> Example {
        Example {
            ids,
            label,
            second: None,
        }
    }
}

/// The random generator for example `index` of `split` of a task seeded with `seed`:
/// every example is a pure function of (seed, split, index), so splits never overlap,
/// shards agree, and nothing has to be stored.
pub fn example_rng(seed: u64, split: Split, index: usize) -> Rng {
    let mut r = Rng::new(seed ^ split.stream().wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.fork(index as u64)
}

/// Eighths of all example contents that belong to the test and to the validation split
/// ([`split_of_content`]); the other six eighths are training contents.
const HELD_OUT_EIGHTHS: u64 = 1;

/// The split an example with these input ids belongs to, by a hash of the ids: 1/8 of all
/// possible inputs are test inputs, 1/8 validation, the rest training. A generated task
/// keeps drawing until it gets an input of the split it was asked for
/// ([`draw_in_split`]), so its splits are disjoint by construction: the same input can never
/// be both a training and a test example, however many examples are drawn.
pub fn split_of_content(ids: &[u32]) -> Split {
    // FNV-1a over the ids, then a final mix so every bit of the hash depends on every id.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &id in ids {
        for b in id.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let bucket = Rng::new(h).next_u64() % 8;
    if bucket < HELD_OUT_EIGHTHS {
        Split::Test
    } else if bucket < 2 * HELD_OUT_EIGHTHS {
        Split::Val
    } else {
        Split::Train
    }
}

/// The generators of attempts 0, 1, ... at example `index` of `split` of a generated task,
/// each a pure function of (seed, split, index, attempt); attempt 0 is
/// [`example_rng`]'s. A generated task takes the first attempt whose input belongs to
/// `split` ([`split_of_content`]): about 1.3 attempts for a training example, 8 for a test
/// or validation one.
pub fn attempts(seed: u64, split: Split, index: usize) -> impl Iterator<Item = Rng> {
    let mut base = example_rng(seed, split, index);
    let first = base.clone();
    std::iter::once(first).chain((1u64..).map(move |attempt| base.fork(attempt)))
}

/// Example `index` of `split` of a generated task: `make` draws an example from the
/// generator of each of the [`attempts`] until one belongs to `split`.
pub fn draw_in_split(
    seed: u64,
    split: Split,
    index: usize,
    mut make: impl FnMut(&mut Rng) -> Example,
) -> Example {
    attempts(seed, split, index)
        .map(|mut rng| make(&mut rng))
        .find(|ex| split_of_content(&ex.ids) == split)
        .expect("the attempts never end")
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
    /// Whether the task generates its examples (every index of every split exists and
    /// the splits are disjoint by construction, [`draw_in_split`]): training then draws
    /// fresh examples every step instead of cycling the training split's `len`.
    fn generated(&self) -> bool {
        false
    }
    /// Whether each input is two documents to compare ([`Example::second`]): the model then
    /// encodes each on its own with a matching head (LRA's dual encoder for retrieval).
    fn pairs(&self) -> bool {
        false
    }
    /// The width of the images when each input is a picture read row by row (Pathfinder,
    /// CIFAR-10): a suite with [`crate::suite::SuiteSpec::image_rope_base`] then tells the
    /// model where each pixel sits in two dimensions.
    fn grid_width(&self) -> Option<usize> {
        None
    }
    /// Writes the first `n` examples of `split` in the layout of LRA's released files
    /// (documented per task), with a header line when that layout has one.
    fn write_tsv(&self, split: Split, n: usize, out: &mut dyn Write) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listops::ListOps;
    use crate::pathfinder::Pathfinder;

    /// Each generated example's input is one its split may hold, so no input can be both a
    /// training and a held-out example, however many are drawn.
    #[test]
    fn generated_splits_are_disjoint_by_construction() {
        let tasks: Vec<Box<dyn ArenaTask>> = vec![
            Box::new(ListOps::new(Setting::Lite, 5)),
            Box::new(Pathfinder::for_task("pathfinder", Setting::Lite, 5).unwrap()),
        ];
        for task in &tasks {
            assert!(task.generated());
            for split in Split::ALL {
                // Far past the split's nominal size: training indices are unbounded.
                for index in (0..60).chain([50_000, 1 << 40]) {
                    let ex = task.example(split, index);
                    assert_eq!(
                        split_of_content(&ex.ids),
                        split,
                        "{} {split:?} {index}",
                        task.name()
                    );
                }
            }
        }
    }

    #[test]
    fn content_buckets_have_their_shares() {
        let mut counts = [0usize; 3];
        let mut rng = Rng::new(9);
        for _ in 0..16_000 {
            let ids: Vec<u32> = (0..1 + rng.below(20))
                .map(|_| rng.below(16) as u32)
                .collect();
            counts[split_of_content(&ids) as usize] += 1;
        }
        // 12,000 / 2,000 / 2,000 expected; ±10% is > 8 standard deviations.
        assert!((10_800..13_200).contains(&counts[0]), "{counts:?}");
        assert!((1_800..2_200).contains(&counts[1]), "{counts:?}");
        assert!((1_800..2_200).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn attempts_start_with_the_example_generator_and_differ() {
        let mut a = attempts(3, Split::Test, 7);
        let first = a.next().unwrap();
        assert_eq!(first, example_rng(3, Split::Test, 7));
        let mut seen: Vec<u64> = vec![first.clone().next_u64()];
        for mut r in a.take(20) {
            let x = r.next_u64();
            assert!(!seen.contains(&x));
            seen.push(x);
        }
    }
}
