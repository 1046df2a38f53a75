//! LRA "Text": byte-level text classification (Tay et al., ICLR 2021; IMDb: Maas et al., 2011).
//!
//! Inputs are raw bytes (ids `0..256`, no offset: padding is masked by the runner, so byte 0
//! needs no reserving), truncated to `max_len`: 4000 in [`Setting::Full`] (LRA's paper uses
//! 4K bytes; note its released `base_tc_config.py` defaults to `max_length = 1000`), 256 in
//! [`Setting::Lite`].
//!
//! # Offline default ([`TextClassification::offline`])
//! Three classes, "which play is this passage from", on the embedded `data/shakespeare.txt`
//! (Hamlet = 0, Macbeth = 1, The Tempest = 2; see [`crate::corpus`] for how plays and their
//! disjoint 80/10/10 regions are found). Every passage is exactly `max_len` bytes starting at
//! a line start, and its label is its true play of origin.
//! * train: `3000` examples (Lite) or `3 × m` (Full), where `m` is the smallest number of
//!   possible passage starts in a play's train region (3 × 3007 = 9021 at 4000 bytes); example `i`
//!   has class `i % 3` and a start drawn uniformly by [`example_rng`]`(seed, Train, i)`.
//! * val / test: non-overlapping passages tiling each play's val / test region; to keep
//!   classes balanced, each class contributes `m'` passages (`m'` = the smallest play's tile
//!   count), picked evenly spaced from its tiles, interleaved by class (`i % 3`). That is
//!   108 val / 105 test examples at 256 bytes (36 / 35 per class) and 6 / 6 at 4000 bytes:
//!   the 10% regions of a ~100 KB play hold no more non-overlapping passages.
//!
//! # Files ([`TextClassification::from_dir`])
//! LRA reads IMDb through `tfds` (`imdb_reviews`, with its test split doubling as
//! validation); we read TSV files instead: `train.tsv`, `val.tsv` (optional) and `test.tsv`
//! in `dir`, one example per line, `label<TAB>text`, with an optional first line
//! `Target<TAB>Text`. The label is a non-negative integer (< 1000); the text is everything
//! after the first tab, with `\\`, `\t`, `\n`, `\r` unescaped (other backslashes kept).
//! Empty lines are skipped. Without `val.tsv`, every 10th train row (rows 9, 19, ...) becomes
//! validation: a spread rather than a tail, as review dumps are often sorted by label.
//! `n_classes` is `1 + ` the largest label seen, at least 2 (IMDb: 2). Texts are stored
//! truncated to `max_len` bytes. [`ArenaTask::write_tsv`] writes this same layout, with the
//! header, so its output loads back unchanged.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::corpus::{self, Corpus, Splits};
use crate::task::{example_rng, ArenaTask, Example, Setting, Split};

const LITE_TRAIN: usize = 3000;
const MAX_LABEL: u32 = 1000;

/// The input length of a setting: 4000 bytes (Full, LRA) or 256 (Lite).
pub fn max_len_for(setting: Setting) -> usize {
    match setting {
        Setting::Full => 4000,
        Setting::Lite => 256,
    }
}

#[derive(Debug, Clone)]
enum Data {
    Offline {
        corpus: &'static Corpus,
        seed: u64,
        /// Train size and (class, start) of each val / test passage.
        passages: Splits<(u32, usize)>,
    },
    Files {
        dir: PathBuf,
        n_classes: usize,
        /// (label, text truncated to max_len) per split.
        rows: Splits<(u32, Vec<u8>)>,
    },
}

/// Byte-level text classification: offline Shakespeare plays or LRA-style IMDb TSV files.
#[derive(Debug, Clone)]
pub struct TextClassification {
    setting: Setting,
    max_len: usize,
    data: Data,
}

/// `n` picks from `tiles`, evenly spaced.
fn spread(tiles: &[usize], n: usize) -> Vec<usize> {
    (0..n).map(|k| tiles[k * tiles.len() / n]).collect()
}

/// Balanced, class-interleaved non-overlapping passages of `split` (val or test).
fn balanced_tiles(corpus: &Corpus, split: Split, len: usize) -> Vec<(u32, usize)> {
    let n_plays = corpus.plays().len();
    let tiles: Vec<Vec<usize>> = (0..n_plays).map(|p| corpus.tile(p, split, len)).collect();
    let m = tiles.iter().map(Vec::len).min().unwrap_or(0);
    let picks: Vec<Vec<usize>> = tiles.iter().map(|t| spread(t, m)).collect();
    let mut out = Vec::with_capacity(m * n_plays);
    for k in 0..m {
        for (class, p) in picks.iter().enumerate() {
            out.push((class as u32, p[k]));
        }
    }
    out
}

impl TextClassification {
    /// The offline default: which of three Shakespeare plays a passage is from.
    pub fn offline(setting: Setting, seed: u64) -> TextClassification {
        let corpus = Corpus::shakespeare();
        let max_len = max_len_for(setting);
        let n_plays = corpus.plays().len();
        let n_train = match setting {
            Setting::Lite => LITE_TRAIN,
            Setting::Full => {
                let m = (0..n_plays)
                    .map(|p| corpus.starts(p, Split::Train, max_len).len())
                    .min()
                    .unwrap_or(0);
                m * n_plays
            }
        };
        TextClassification {
            setting,
            max_len,
            data: Data::Offline {
                corpus,
                seed,
                passages: Splits::generated_train(
                    n_train,
                    balanced_tiles(corpus, Split::Val, max_len),
                    balanced_tiles(corpus, Split::Test, max_len),
                ),
            },
        }
    }

    /// LRA-style IMDb files in `dir` (layout in the module docs).
    pub fn from_dir(dir: &Path, setting: Setting) -> Result<TextClassification, String> {
        let max_len = max_len_for(setting);
        let read = |name: &str| read_rows(&dir.join(name), max_len);
        let mut train = read("train.tsv")?;
        let val_path = dir.join("val.tsv");
        let val = if val_path.exists() {
            read_rows(&val_path, max_len)?
        } else {
            let all = std::mem::take(&mut train);
            let mut val = Vec::new();
            for (i, row) in all.into_iter().enumerate() {
                if i % 10 == 9 {
                    val.push(row);
                } else {
                    train.push(row);
                }
            }
            val
        };
        let test = read("test.tsv")?;
        if train.is_empty() {
            return Err(format!("{}: no examples", dir.join("train.tsv").display()));
        }
        if test.is_empty() {
            return Err(format!("{}: no examples", dir.join("test.tsv").display()));
        }
        let rows = [train, val, test];
        let max_label = rows.iter().flatten().map(|r| r.0).max().unwrap_or(0);
        Ok(TextClassification {
            setting,
            max_len,
            data: Data::Files {
                dir: dir.to_path_buf(),
                n_classes: (max_label as usize + 1).max(2),
                rows: Splits::stored(rows),
            },
        })
    }

    /// The setting this task was built for.
    pub fn setting(&self) -> Setting {
        self.setting
    }

    /// Offline only: the corpus byte offset where example `index` of `split` starts (its
    /// passage is `max_len` bytes from there), or `None` for file data / out of range.
    pub fn passage_offset(&self, split: Split, index: usize) -> Option<usize> {
        self.offline_passage(split, index).map(|(_, start)| start)
    }

    /// (class, start) of an offline passage.
    fn offline_passage(&self, split: Split, index: usize) -> Option<(u32, usize)> {
        let Data::Offline {
            corpus,
            seed,
            passages,
        } = &self.data
        else {
            return None;
        };
        match split {
            Split::Train => {
                if index >= passages.len(split) {
                    return None;
                }
                let n_plays = corpus.plays().len();
                let class = index % n_plays;
                let starts = corpus.starts(class, Split::Train, self.max_len);
                if starts.is_empty() {
                    return None;
                }
                let mut rng = example_rng(*seed, split, index);
                Some((class as u32, starts[rng.below(starts.len())]))
            }
            Split::Val | Split::Test => passages.get(split, index).copied(),
        }
    }

    /// The label and text bytes of example `index` of `split`.
    fn raw(&self, split: Split, index: usize) -> Option<(u32, &[u8])> {
        match &self.data {
            Data::Offline { corpus, .. } => {
                let (class, start) = self.offline_passage(split, index)?;
                Some((class, corpus.passage(start, self.max_len)))
            }
            Data::Files { rows, .. } => rows.get(split, index).map(|(l, t)| (*l, t.as_slice())),
        }
    }
}

/// Reads one `label<TAB>text` file, texts truncated to `max_len` bytes.
fn read_rows(path: &Path, max_len: usize) -> Result<Vec<(u32, Vec<u8>)>, String> {
    let mut rows = Vec::new();
    let mut first = true;
    corpus::for_each_line(path, |_, line| {
        let is_first = std::mem::replace(&mut first, false);
        let Some(tab) = line.iter().position(|&b| b == b'\t') else {
            return Err("expected `label<TAB>text`, found no tab".to_string());
        };
        let (label, text) = (&line[..tab], &line[tab + 1..]);
        if is_first && label == b"Target" && text == b"Text" {
            return Ok(());
        }
        let label = corpus::parse_label(label, MAX_LABEL)?;
        let mut text = corpus::unescape(text);
        text.truncate(max_len);
        rows.push((label, text));
        Ok(())
    })?;
    Ok(rows)
}

impl ArenaTask for TextClassification {
    fn name(&self) -> &'static str {
        "text"
    }

    fn source(&self) -> String {
        match &self.data {
            Data::Offline { seed, .. } => format!(
                "offline default: {}-byte passages of Hamlet / Macbeth / The Tempest \
                 (data/shakespeare.txt, public domain), label = play of origin, seed {seed}",
                self.max_len
            ),
            Data::Files { dir, .. } => format!(
                "LRA-style IMDb TSV files (label<TAB>text) in {}",
                dir.display()
            ),
        }
    }

    fn n_classes(&self) -> usize {
        match &self.data {
            Data::Offline { corpus, .. } => corpus.plays().len(),
            Data::Files { n_classes, .. } => *n_classes,
        }
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn max_len(&self) -> usize {
        self.max_len
    }

    fn len(&self, split: Split) -> usize {
        match &self.data {
            Data::Offline { passages, .. } => passages.len(split),
            Data::Files { rows, .. } => rows.len(split),
        }
    }

    fn example(&self, split: Split, index: usize) -> Example {
        let (label, text) = self.raw(split, index).unwrap_or_else(|| {
            panic!(
                "text: example {index} out of range for {} ({})",
                split.name(),
                self.len(split)
            )
        });
        Example::new(
            text.iter()
                .take(self.max_len)
                .map(|&b| u32::from(b))
                .collect(),
            label,
        )
    }

    fn write_tsv(&self, split: Split, n: usize, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(b"Target\tText\n")?;
        let mut line = Vec::new();
        for index in 0..n.min(self.len(split)) {
            let Some((label, text)) = self.raw(split, index) else {
                break;
            };
            line.clear();
            line.extend_from_slice(label.to_string().as_bytes());
            line.push(b'\t');
            corpus::escape_into(text, &mut line);
            line.push(b'\n');
            out.write_all(&line)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::split_index;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("formers-arena-text-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn offline_lite_shape_and_sizes() {
        let t = TextClassification::offline(Setting::Lite, 0);
        assert_eq!(t.name(), "text");
        assert_eq!(t.n_classes(), 3);
        assert_eq!(t.vocab_size(), 256);
        assert_eq!(t.max_len(), 256);
        assert_eq!(t.len(Split::Train), 3000);
        // 36 / 35 non-overlapping 256-byte passages per class fit the smallest 10% regions.
        assert_eq!(t.len(Split::Val), 108);
        assert_eq!(t.len(Split::Test), 105);
        assert!(t.source().contains("play of origin"));
        for split in Split::ALL {
            for i in 0..t.len(split).min(400) {
                let e = t.example(split, i);
                assert_eq!(e.ids.len(), 256);
                assert!(e.ids.iter().all(|&b| b < 256));
                assert!(e.label < 3);
            }
        }
    }

    #[test]
    fn offline_full_sizes() {
        let t = TextClassification::offline(Setting::Full, 0);
        assert_eq!(t.max_len(), 4000);
        assert!(t.len(Split::Train) > 6000, "{}", t.len(Split::Train));
        assert_eq!(t.len(Split::Val), 6);
        assert_eq!(t.len(Split::Test), 6);
        assert_eq!(t.example(Split::Test, 5).ids.len(), 4000);
    }

    #[test]
    fn labels_are_provenance_and_splits_do_not_leak() {
        let c = Corpus::shakespeare();
        let t = TextClassification::offline(Setting::Lite, 3);
        let len = t.max_len();
        for split in Split::ALL {
            let mut counts = [0usize; 3];
            let mut starts = Vec::new();
            for i in 0..t.len(split) {
                let e = t.example(split, i);
                let s = t.passage_offset(split, i).unwrap();
                let play = c.play_of(s).unwrap();
                assert_eq!(e.label as usize, play);
                // The whole window is inside this play's region of this split.
                assert!(c.region(play, split).contains_window(s, len));
                assert_eq!(c.split_of(s), Some(split));
                assert_eq!(c.split_of(s + len - 1), Some(split));
                counts[play] += 1;
                starts.push(s);
            }
            let n = t.len(split) as f64;
            for k in counts {
                assert!(
                    (k as f64 / n - 1.0 / 3.0).abs() < 0.01,
                    "{split:?} {counts:?}"
                );
            }
            if split != Split::Train {
                starts.sort_unstable();
                for w in starts.windows(2) {
                    assert!(w[0] + len <= w[1], "{split:?} passages overlap");
                }
            }
        }
    }

    #[test]
    fn deterministic_and_seeded() {
        let a = TextClassification::offline(Setting::Lite, 7);
        let b = TextClassification::offline(Setting::Lite, 7);
        let c = TextClassification::offline(Setting::Lite, 8);
        for i in 0..50 {
            assert_eq!(a.example(Split::Train, i), b.example(Split::Train, i));
            assert_eq!(a.example(Split::Test, i), b.example(Split::Test, i));
        }
        assert!((0..50).any(|i| a.example(Split::Train, i) != c.example(Split::Train, i)));
    }

    #[test]
    fn tsv_round_trip() {
        let t = TextClassification::offline(Setting::Lite, 1);
        let dir = temp_dir("roundtrip");
        let n = [60usize, 30, 45];
        for (split, file) in Split::ALL
            .into_iter()
            .zip(["train.tsv", "val.tsv", "test.tsv"])
        {
            let mut buf = Vec::new();
            t.write_tsv(split, n[split_index(split)], &mut buf).unwrap();
            assert!(buf.starts_with(b"Target\tText\n"));
            std::fs::write(dir.join(file), buf).unwrap();
        }
        let back = TextClassification::from_dir(&dir, Setting::Lite).unwrap();
        assert_eq!(back.n_classes(), 3);
        assert!(back.source().contains("TSV"));
        for split in Split::ALL {
            assert_eq!(back.len(split), n[split_index(split)]);
            for i in 0..back.len(split) {
                assert_eq!(back.example(split, i), t.example(split, i));
            }
        }
        // Without val.tsv, every 10th train row becomes validation.
        std::fs::remove_file(dir.join("val.tsv")).unwrap();
        let carved = TextClassification::from_dir(&dir, Setting::Lite).unwrap();
        assert_eq!(carved.len(Split::Val), 6);
        assert_eq!(carved.len(Split::Train), 54);
        assert_eq!(carved.example(Split::Val, 0), t.example(Split::Train, 9));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn imdb_style_file_without_header_and_errors() {
        let dir = temp_dir("errors");
        std::fs::write(dir.join("train.tsv"), "1\tGreat\\tfilm\\n!\n0\tbad\r\n\n").unwrap();
        std::fs::write(dir.join("test.tsv"), "0\tmeh\n").unwrap();
        let t = TextClassification::from_dir(&dir, Setting::Full).unwrap();
        assert_eq!(t.n_classes(), 2);
        assert_eq!(t.len(Split::Train) + t.len(Split::Val), 2);
        assert_eq!(
            t.example(Split::Train, 0).ids,
            b"Great\tfilm\n!".map(u32::from).to_vec()
        );
        assert_eq!(
            t.example(Split::Train, 1).ids,
            b"bad".map(u32::from).to_vec()
        );

        std::fs::write(dir.join("test.tsv"), "Target\tText\n0\tok\nno tab here\n").unwrap();
        let err = TextClassification::from_dir(&dir, Setting::Full).unwrap_err();
        assert!(err.contains("test.tsv:3"), "{err}");
        std::fs::write(dir.join("test.tsv"), "x\tok\n").unwrap();
        let err = TextClassification::from_dir(&dir, Setting::Full).unwrap_err();
        assert!(err.contains("test.tsv:1") && err.contains("label"), "{err}");
        std::fs::remove_file(dir.join("test.tsv")).unwrap();
        let err = TextClassification::from_dir(&dir, Setting::Full).unwrap_err();
        assert!(err.contains("test.tsv"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
