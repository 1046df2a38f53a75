//! LRA "Retrieval": byte-level document matching (Tay et al., ICLR 2021; AAN: Radev et al., 2013).
//!
//! Each example is a pair of documents and a binary label (1 = related). LRA encodes the two
//! documents separately with a shared encoder (two towers, up to 4000 bytes each: its
//! `base_match_config.py` sets `max_length = 4000`, `tokenizer = "char"`, and the pipeline
//! cuts each raw text to 10,000 bytes before encoding) and then combines the two pooled
//! vectors. **Deviation:** our models take a single sequence, so the input is
//! `doc1[..max_len/2] ++ doc2[..max_len/2]` as raw bytes (ids `0..256`), one sequence of at
//! most `max_len` = 8000 (Full) or 256 (Lite). Nothing is padded in the middle (the runner
//! masks only trailing padding): offline passages are always exactly `max_len/2` bytes, so
//! doc2 starts at `max_len/2`; in files, a document shorter than `max_len/2` is followed
//! directly by the other, and the boundary is not marked.
//!
//! # Offline default ([`Retrieval::offline`])
//! Pairs of `max_len/2`-byte passages of the embedded `data/shakespeare.txt`; label 1 when
//! both come from the same play, 0 when from two different plays (see [`crate::corpus`] for
//! the plays and their disjoint 80/10/10 regions). Example `i` has label `i % 2` (exactly
//! balanced); its play(s) are drawn uniformly, and for label 0 the second play is uniform
//! among the other two. Both passages of a pair come from the same split's regions and never
//! overlap.
//! * train: passages start at any line start of the train regions (drawn with
//!   [`example_rng`]`(seed, Train, i)`); `3000` pairs (Lite) or `3 × m` (Full, `m` = the
//!   smallest play's number of possible 4000-byte passage starts: 3 × 3007 = 9021).
//! * val / test: passages come from the non-overlapping tiles of the val / test regions
//!   (a passage may appear in several pairs, as AAN papers do); `300` / `600` pairs (Lite),
//!   and in Full at most as many as there are distinct ordered same-play tile pairs (16 with
//!   4000-byte passages: the regions hold only 2–4 such tiles per play). Duplicate pairs are
//!   redrawn.
//!
//! # Files ([`Retrieval::from_dir`])
//! LRA's AAN files in `dir`: `new_aan_pairs.train.tsv`, `new_aan_pairs.eval.tsv` (validation)
//! and `new_aan_pairs.test.tsv`. As in LRA's `matching/input_pipeline.py`: no header, tab
//! separated, no quoting, columns `label id1 id2 text1 text2`; the label may be written as a
//! float (`1.0`). Each field is unescaped (`\\`, `\t`, `\n`, `\r`; other backslashes kept)
//! and documents are stored truncated to `max_len/2` bytes (deduplicated by content).
//! [`ArenaTask::write_tsv`] writes the same layout, with offline ids `play:byte_offset` (e.g.
//! `hamlet:1234`, the passage's offset in `shakespeare.txt`), so its output loads back
//! unchanged.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use formers::rng::Rng;

use crate::corpus::{self, Corpus, Splits};
use crate::task::{example_rng, ArenaTask, Example, Setting, Split};

const FILES: [&str; 3] = [
    "new_aan_pairs.train.tsv",
    "new_aan_pairs.eval.tsv",
    "new_aan_pairs.test.tsv",
];
const ATTEMPTS: u64 = 100;

/// The input length of a setting: 2 × 4000 bytes (Full, LRA's per-document length) or 2 × 128.
pub fn max_len_for(setting: Setting) -> usize {
    match setting {
        Setting::Full => 8000,
        Setting::Lite => 256,
    }
}

fn lite_size(split: Split) -> usize {
    match split {
        Split::Train => 3000,
        Split::Val => 300,
        Split::Test => 600,
    }
}

/// One offline pair: label and the two passages' corpus offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Pair {
    label: u32,
    first: usize,
    second: usize,
}

/// A pair as written to / read from a file: label, ids and the two documents.
struct Raw<'a> {
    label: u32,
    id1: String,
    id2: String,
    doc1: &'a [u8],
    doc2: &'a [u8],
}

/// One pair read from a file: label, the two ids, and indices into the document store.
#[derive(Debug, Clone)]
struct Row {
    label: u32,
    id1: String,
    id2: String,
    doc1: usize,
    doc2: usize,
}

#[derive(Debug, Clone)]
enum Data {
    Offline {
        corpus: &'static Corpus,
        seed: u64,
        /// Train size and the stored val / test pairs.
        pairs: Splits<Pair>,
    },
    Files {
        dir: PathBuf,
        docs: Vec<Vec<u8>>,
        rows: Splits<Row>,
    },
}

/// Byte-level document matching: offline same-play pairs or LRA's AAN TSV files.
#[derive(Debug, Clone)]
pub struct Retrieval {
    setting: Setting,
    max_len: usize,
    data: Data,
}

/// Draws a pair with `label` from the per-play start pools; `None` when the draw failed
/// (too few non-overlapping starts), so the caller redraws.
fn draw_pair(rng: &mut Rng, label: u32, pools: &[&[usize]], per_doc: usize) -> Option<Pair> {
    let n_plays = pools.len();
    let p1 = rng.below(n_plays);
    let p2 = if label == 1 {
        p1
    } else {
        (p1 + 1 + rng.below(n_plays - 1)) % n_plays
    };
    let (a, b) = (pools[p1], pools[p2]);
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let first = a[rng.below(a.len())];
    let second = b[rng.below(b.len())];
    let overlap = first < second + per_doc && second < first + per_doc;
    (!overlap).then_some(Pair {
        label,
        first,
        second,
    })
}

/// Distinct val / test pairs from the non-overlapping tiles of `split`.
fn tiled_pairs(corpus: &Corpus, seed: u64, split: Split, setting: Setting) -> Vec<Pair> {
    let per_doc = max_len_for(setting) / 2;
    let tiles: Vec<Vec<usize>> = (0..corpus.plays().len())
        .map(|p| corpus.tile(p, split, per_doc))
        .collect();
    let pools: Vec<&[usize]> = tiles.iter().map(Vec::as_slice).collect();
    let ordered_same: usize = tiles
        .iter()
        .map(|t| t.len() * t.len().saturating_sub(1))
        .sum();
    let n = lite_size(split).min(ordered_same);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        let mut rng = example_rng(seed, split, i);
        let mut fallback = None;
        for attempt in 0..ATTEMPTS {
            let mut r = rng.fork(attempt);
            if let Some(pair) = draw_pair(&mut r, label, &pools, per_doc) {
                fallback.get_or_insert(pair);
                if seen.insert(pair) {
                    out.push(pair);
                    fallback = None;
                    break;
                }
            }
        }
        // Only when every attempt repeated an earlier pair (not seen in practice).
        out.extend(fallback);
    }
    out
}

impl Retrieval {
    /// The offline default: do two Shakespeare passages come from the same play?
    pub fn offline(setting: Setting, seed: u64) -> Retrieval {
        let corpus = Corpus::shakespeare();
        let max_len = max_len_for(setting);
        let n_plays = corpus.plays().len();
        let n_train = match setting {
            Setting::Lite => lite_size(Split::Train),
            Setting::Full => {
                let m = (0..n_plays)
                    .map(|p| corpus.starts(p, Split::Train, max_len / 2).len())
                    .min()
                    .unwrap_or(0);
                m * n_plays
            }
        };
        Retrieval {
            setting,
            max_len,
            data: Data::Offline {
                corpus,
                seed,
                pairs: Splits::generated_train(
                    n_train,
                    tiled_pairs(corpus, seed, Split::Val, setting),
                    tiled_pairs(corpus, seed, Split::Test, setting),
                ),
            },
        }
    }

    /// LRA's AAN files in `dir` (layout in the module docs).
    pub fn from_dir(dir: &Path, setting: Setting) -> Result<Retrieval, String> {
        let max_len = max_len_for(setting);
        let per_doc = max_len / 2;
        let mut docs: Vec<Vec<u8>> = Vec::new();
        // Content hash → indices into `docs` (documents repeat across AAN pairs).
        let mut index: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut rows: [Vec<Row>; 3] = Default::default();
        for (slot, file) in rows.iter_mut().zip(FILES) {
            let path = dir.join(file);
            corpus::for_each_line(&path, |_, line| {
                let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
                let [label, id1, id2, text1, text2] = fields.as_slice() else {
                    return Err(format!(
                        "expected 5 tab-separated fields (label, id1, id2, text1, text2), found {}",
                        fields.len()
                    ));
                };
                let label = corpus::parse_label(label, 2)?;
                let mut intern = |text: &[u8]| {
                    let mut doc = corpus::unescape(text);
                    doc.truncate(per_doc);
                    let mut hasher = DefaultHasher::new();
                    doc.hash(&mut hasher);
                    let same = index.entry(hasher.finish()).or_default();
                    if let Some(&at) = same.iter().find(|&&k| docs[k] == doc) {
                        return at;
                    }
                    same.push(docs.len());
                    docs.push(doc);
                    docs.len() - 1
                };
                let (doc1, doc2) = (intern(text1), intern(text2));
                let id = |f: &[u8]| String::from_utf8_lossy(&corpus::unescape(f)).into_owned();
                slot.push(Row {
                    label,
                    id1: id(id1),
                    id2: id(id2),
                    doc1,
                    doc2,
                });
                Ok(())
            })?;
            if slot.is_empty() {
                return Err(format!("{}: no examples", path.display()));
            }
        }
        Ok(Retrieval {
            setting,
            max_len,
            data: Data::Files {
                dir: dir.to_path_buf(),
                docs,
                rows: Splits::stored(rows),
            },
        })
    }

    /// The setting this task was built for.
    pub fn setting(&self) -> Setting {
        self.setting
    }

    /// Offline only: the corpus byte offsets where the two passages of example `index` of
    /// `split` start (each `max_len/2` bytes long), or `None` for file data / out of range.
    pub fn pair_offsets(&self, split: Split, index: usize) -> Option<(usize, usize)> {
        self.offline_pair(split, index).map(|p| (p.first, p.second))
    }

    fn offline_pair(&self, split: Split, index: usize) -> Option<Pair> {
        let Data::Offline {
            corpus,
            seed,
            pairs,
        } = &self.data
        else {
            return None;
        };
        match split {
            Split::Train => {
                if index >= pairs.len(split) {
                    return None;
                }
                let per_doc = self.max_len / 2;
                let pools: Vec<&[usize]> = (0..corpus.plays().len())
                    .map(|p| corpus.starts(p, Split::Train, per_doc))
                    .collect();
                let mut rng = example_rng(*seed, split, index);
                let label = (index % 2) as u32;
                (0..ATTEMPTS).find_map(|a| draw_pair(&mut rng.fork(a), label, &pools, per_doc))
            }
            Split::Val | Split::Test => pairs.get(split, index).copied(),
        }
    }

    /// Label, ids and the two documents of example `index` of `split`.
    fn raw(&self, split: Split, index: usize) -> Option<Raw<'_>> {
        let per_doc = self.max_len / 2;
        match &self.data {
            Data::Offline { corpus, .. } => {
                let p = self.offline_pair(split, index)?;
                let id = |at: usize| {
                    let play = corpus.play_of(at).map_or("?", |k| corpus.plays()[k].name);
                    format!("{play}:{at}")
                };
                Some(Raw {
                    label: p.label,
                    id1: id(p.first),
                    id2: id(p.second),
                    doc1: corpus.passage(p.first, per_doc),
                    doc2: corpus.passage(p.second, per_doc),
                })
            }
            Data::Files { docs, rows, .. } => {
                let r = rows.get(split, index)?;
                Some(Raw {
                    label: r.label,
                    id1: r.id1.clone(),
                    id2: r.id2.clone(),
                    doc1: docs[r.doc1].as_slice(),
                    doc2: docs[r.doc2].as_slice(),
                })
            }
        }
    }
}

impl ArenaTask for Retrieval {
    fn name(&self) -> &'static str {
        "retrieval"
    }

    fn source(&self) -> String {
        match &self.data {
            Data::Offline { seed, .. } => format!(
                "offline default: pairs of {}-byte passages of Hamlet / Macbeth / The Tempest \
                 (data/shakespeare.txt, public domain), label 1 = same play of origin, seed {seed}",
                self.max_len / 2
            ),
            Data::Files { dir, .. } => {
                format!(
                    "LRA AAN files new_aan_pairs.{{train,eval,test}}.tsv in {}",
                    dir.display()
                )
            }
        }
    }

    fn n_classes(&self) -> usize {
        2
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn max_len(&self) -> usize {
        self.max_len
    }

    fn len(&self, split: Split) -> usize {
        match &self.data {
            Data::Offline { pairs, .. } => pairs.len(split),
            Data::Files { rows, .. } => rows.len(split),
        }
    }

    fn example(&self, split: Split, index: usize) -> Example {
        let per_doc = self.max_len / 2;
        let Raw {
            label, doc1, doc2, ..
        } = self.raw(split, index).unwrap_or_else(|| {
            panic!(
                "retrieval: example {index} out of range for {} ({})",
                split.name(),
                self.len(split)
            )
        });
        let ids = doc1
            .iter()
            .take(per_doc)
            .chain(doc2.iter().take(per_doc))
            .map(|&b| u32::from(b))
            .collect();
        Example { ids, label }
    }

    fn write_tsv(&self, split: Split, n: usize, out: &mut dyn Write) -> io::Result<()> {
        let mut line = Vec::new();
        for index in 0..n.min(self.len(split)) {
            let Some(Raw {
                label,
                id1,
                id2,
                doc1,
                doc2,
            }) = self.raw(split, index)
            else {
                break;
            };
            line.clear();
            line.extend_from_slice(label.to_string().as_bytes());
            for field in [id1.as_bytes(), id2.as_bytes(), doc1, doc2] {
                line.push(b'\t');
                corpus::escape_into(field, &mut line);
            }
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
        let dir = std::env::temp_dir().join(format!(
            "formers-arena-retrieval-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn parse_id(id: &str) -> (String, usize) {
        let (play, at) = id.split_once(':').unwrap();
        (play.to_string(), at.parse().unwrap())
    }

    #[test]
    fn offline_lite_shape_balance_and_provenance() {
        let c = Corpus::shakespeare();
        let t = Retrieval::offline(Setting::Lite, 0);
        assert_eq!(t.name(), "retrieval");
        assert_eq!((t.n_classes(), t.vocab_size(), t.max_len()), (2, 256, 256));
        assert_eq!(
            [t.len(Split::Train), t.len(Split::Val), t.len(Split::Test)],
            [3000, 300, 600]
        );
        assert!(t.source().contains("same play"));
        let per_doc = 128;
        for split in Split::ALL {
            let mut ones = 0;
            let mut same_by_play = [0usize; 3];
            let mut seen = HashSet::new();
            for i in 0..t.len(split) {
                let e = t.example(split, i);
                assert_eq!(e.ids.len(), 256);
                assert!(e.ids.iter().all(|&b| b < 256));
                let (a, b) = t.pair_offsets(split, i).unwrap();
                // Both passages inside this split's regions, never overlapping.
                for s in [a, b] {
                    let play = c.play_of(s).unwrap();
                    assert!(c.region(play, split).contains_window(s, per_doc));
                }
                assert!(
                    a + per_doc <= b || b + per_doc <= a,
                    "{split:?} {i}: overlap"
                );
                let same = c.play_of(a) == c.play_of(b);
                assert_eq!(e.label, u32::from(same));
                // The input is exactly the two passages.
                let want: Vec<u32> = c
                    .passage(a, per_doc)
                    .iter()
                    .chain(c.passage(b, per_doc))
                    .map(|&x| u32::from(x))
                    .collect();
                assert_eq!(e.ids, want);
                ones += e.label as usize;
                if same {
                    same_by_play[c.play_of(a).unwrap()] += 1;
                }
                if split != Split::Train {
                    assert!(seen.insert((a, b)), "{split:?} duplicate pair");
                }
            }
            assert_eq!(ones * 2, t.len(split));
            for k in same_by_play {
                assert!(k * 5 > ones, "{split:?} plays unbalanced: {same_by_play:?}");
            }
        }
    }

    #[test]
    fn offline_full_sizes() {
        let t = Retrieval::offline(Setting::Full, 0);
        assert_eq!(t.max_len(), 8000);
        assert!(t.len(Split::Train) > 6000, "{}", t.len(Split::Train));
        let n = t.len(Split::Test);
        assert!((8..=600).contains(&n), "{n}");
        let e = t.example(Split::Test, 1);
        assert_eq!((e.ids.len(), e.label), (8000, 1));
        assert_eq!(t.example(Split::Train, 17).ids.len(), 8000);
    }

    #[test]
    fn deterministic_and_seeded() {
        let a = Retrieval::offline(Setting::Lite, 5);
        let b = Retrieval::offline(Setting::Lite, 5);
        let c = Retrieval::offline(Setting::Lite, 6);
        for split in Split::ALL {
            for i in 0..40 {
                assert_eq!(a.example(split, i), b.example(split, i));
            }
        }
        assert!((0..40).any(|i| a.example(Split::Train, i) != c.example(Split::Train, i)));
    }

    #[test]
    fn tsv_round_trip_and_ids() {
        let c = Corpus::shakespeare();
        let t = Retrieval::offline(Setting::Lite, 2);
        let dir = temp_dir("roundtrip");
        let n = [50usize, 20, 30];
        for (split, file) in Split::ALL.into_iter().zip(FILES) {
            let mut buf = Vec::new();
            t.write_tsv(split, n[split_index(split)], &mut buf).unwrap();
            let text = String::from_utf8(buf.clone()).unwrap();
            for (i, line) in text.lines().enumerate() {
                let f: Vec<&str> = line.split('\t').collect();
                assert_eq!(f.len(), 5);
                let ((p1, a), (p2, b)) = (parse_id(f[1]), parse_id(f[2]));
                assert_eq!(t.pair_offsets(split, i), Some((a, b)));
                assert_eq!(p1, c.plays()[c.play_of(a).unwrap()].name);
                assert_eq!(f[0], if p1 == p2 { "1" } else { "0" });
            }
            std::fs::write(dir.join(file), buf).unwrap();
        }
        let back = Retrieval::from_dir(&dir, Setting::Lite).unwrap();
        assert!(back.source().contains("AAN"));
        for split in Split::ALL {
            assert_eq!(back.len(split), n[split_index(split)]);
            for i in 0..back.len(split) {
                assert_eq!(back.example(split, i), t.example(split, i));
            }
            // Written again from the files: byte-identical.
            let (mut x, mut y) = (Vec::new(), Vec::new());
            t.write_tsv(split, back.len(split), &mut x).unwrap();
            back.write_tsv(split, usize::MAX, &mut y).unwrap();
            assert!(x == y, "{split:?}: rewritten TSV differs");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn aan_style_files_and_errors() {
        let dir = temp_dir("errors");
        let long = "x".repeat(300);
        std::fs::write(
            dir.join(FILES[0]),
            format!("1.0\tp1\tp2\tab\\tc\t{long}\n0\tp1\tp3\tab\\tc\tshort\n"),
        )
        .unwrap();
        std::fs::write(dir.join(FILES[1]), "0\ta\tb\tdoc one\tdoc two\n").unwrap();
        std::fs::write(dir.join(FILES[2]), "1\ta\tb\tdoc one\tdoc two\n").unwrap();
        let t = Retrieval::from_dir(&dir, Setting::Lite).unwrap();
        let e = t.example(Split::Train, 0);
        assert_eq!(e.label, 1);
        assert_eq!(e.ids.len(), 4 + 128);
        assert_eq!(&e.ids[..4], &b"ab\tc".map(u32::from)[..]);
        assert_eq!(t.example(Split::Train, 1).ids.len(), 4 + 5);
        assert_eq!(t.example(Split::Test, 0).label, 1);
        // Repeated documents are stored once.
        let Data::Files { docs, .. } = &t.data else {
            panic!("file data expected");
        };
        assert_eq!(docs.len(), 5);

        std::fs::write(
            dir.join(FILES[2]),
            "1\ta\tb\tdoc one\tdoc two\n0\ta\tb\tonly four\n",
        )
        .unwrap();
        let err = Retrieval::from_dir(&dir, Setting::Lite).unwrap_err();
        assert!(
            err.contains("new_aan_pairs.test.tsv:2") && err.contains("5"),
            "{err}"
        );
        std::fs::write(dir.join(FILES[2]), "2\ta\tb\tx\ty\n").unwrap();
        let err = Retrieval::from_dir(&dir, Setting::Lite).unwrap_err();
        assert!(
            err.contains("new_aan_pairs.test.tsv:1") && err.contains("label"),
            "{err}"
        );
        std::fs::remove_file(dir.join(FILES[1])).unwrap();
        let err = Retrieval::from_dir(&dir, Setting::Lite).unwrap_err();
        assert!(err.contains("new_aan_pairs.eval.tsv"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
