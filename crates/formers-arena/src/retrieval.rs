//! LRA "Retrieval": byte-level document matching (Tay et al., ICLR 2021; AAN: Radev et al., 2013).
//!
//! Each example is a pair of documents and a binary label (1 = related). As in LRA, the two
//! documents are encoded separately by one shared encoder (two towers, up to 4000 bytes each:
//! its `base_match_config.py` sets `max_length = 4000`, `tokenizer = "char"`, and the
//! pipeline cuts each raw text to 10,000 bytes before encoding) and the two pooled vectors
//! are combined: the arena gives the model a matching head
//! ([`formers::config::HeadSpec::Matching`]: `[u, v, u⊙v, |u−v|]` → linear; LRA's is
//! `[u, v, u⊙v, u−v]` → MLP). [`ArenaTask::pairs`] is true: an [`Example`]'s ids are
//! `doc1[..max_len/2] ++ doc2[..max_len/2]` as raw bytes (ids `0..256`) with
//! [`Example::second`] marking where doc2 starts, and the batch pads each document on its
//! own to `max_len/2` = 4000 (Full) or 128 (Lite).
//!
//! # Offline default ([`Retrieval::offline`]): near-duplicate passages
//! Pairs of `max_len/2`-byte passages of the embedded `data/shakespeare.txt` (see
//! [`crate::corpus`] for the plays and their disjoint 80/10/10 regions); label 1 when the two
//! passages share text, 0 when they are neighbours that do not. Example `i` has label `i % 2`
//! (exactly balanced). A pair is drawn as: a play (uniform), a start `s` (any line start of
//! the play's region of the split with `3 × max_len/2` bytes of room), an offset `o`, and
//! passages at `s` and `s + o` in random order, where `o` is uniform in
//! `1..=3·max_len/8` for label 1 (the passages share at least a quarter of their bytes) and
//! in `max_len/2..max_len` for label 0 (the next passage, within one passage length: same
//! scene, same speakers, no shared bytes). So both classes come from the same stretch of the
//! same play and differ only in whether the text repeats: a question of matching, which the
//! earlier offline question (same play or not, from 128 bytes) was not for a lite model
//! (chance after 1,500 steps, two towers or one sequence).
//! * train: drawn with [`example_rng`]`(seed, Train, i)` from the train regions; `10,000`
//!   pairs (Lite) or `3 × m` (Full, `m` = the smallest play's number of starts).
//! * val / test: drawn the same way from the val / test regions, duplicates redrawn; `300` /
//!   `600` pairs, fewer in Full when the small regions run out of distinct pairs.
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
        Split::Train => 10_000,
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

/// The room a pair needs after its start `s`: the farther passage ends before
/// `s + 3 × per_doc`.
fn span(per_doc: usize) -> usize {
    3 * per_doc
}

/// The pools of pair starts of `split`, one per play.
fn pools(corpus: &Corpus, split: Split, per_doc: usize) -> Vec<&[usize]> {
    (0..corpus.plays().len())
        .map(|p| corpus.starts(p, split, span(per_doc)))
        .collect()
}

/// Draws a pair with `label` from the per-play start pools (module docs); `None` when the
/// drawn play has no start, so the caller redraws.
fn draw_pair(rng: &mut Rng, label: u32, pools: &[&[usize]], per_doc: usize) -> Option<Pair> {
    let pool = pools[rng.below(pools.len())];
    if pool.is_empty() {
        return None;
    }
    let start = pool[rng.below(pool.len())];
    let offset = if label == 1 {
        1 + rng.below(3 * per_doc / 4)
    } else {
        per_doc + rng.below(per_doc)
    };
    let (first, second) = if rng.below(2) == 0 {
        (start, start + offset)
    } else {
        (start + offset, start)
    };
    Some(Pair {
        label,
        first,
        second,
    })
}

/// Distinct val / test pairs of `split`.
fn held_out_pairs(corpus: &Corpus, seed: u64, split: Split, setting: Setting) -> Vec<Pair> {
    let per_doc = max_len_for(setting) / 2;
    let pools = pools(corpus, split, per_doc);
    let n = lite_size(split);
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
    /// The offline default: do two neighbouring Shakespeare passages share text?
    pub fn offline(setting: Setting, seed: u64) -> Retrieval {
        let corpus = Corpus::shakespeare();
        let max_len = max_len_for(setting);
        let n_plays = corpus.plays().len();
        let n_train = match setting {
            Setting::Lite => lite_size(Split::Train),
            Setting::Full => {
                let m = (0..n_plays)
                    .map(|p| corpus.starts(p, Split::Train, span(max_len / 2)).len())
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
                    held_out_pairs(corpus, seed, Split::Val, setting),
                    held_out_pairs(corpus, seed, Split::Test, setting),
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
                let pools = pools(corpus, Split::Train, per_doc);
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
                "offline default: pairs of neighbouring {}-byte passages of Hamlet / Macbeth / \
                 The Tempest (data/shakespeare.txt, public domain), label 1 = the two share text \
                 (near-duplicates), 0 = they do not; two towers; seed {seed}",
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
        let first = doc1.len().min(per_doc);
        let ids = doc1[..first]
            .iter()
            .chain(doc2.iter().take(per_doc))
            .map(|&b| u32::from(b))
            .collect();
        Example {
            ids,
            label,
            second: Some(first),
        }
    }

    fn pairs(&self) -> bool {
        true
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
            [10_000, 300, 600]
        );
        assert!(t.pairs());
        assert!(t.source().contains("share text"));
        let per_doc = 128;
        for split in Split::ALL {
            let mut ones = 0;
            let mut by_play = [0usize; 3];
            let mut first_is_earlier = 0;
            let mut seen = HashSet::new();
            for i in 0..t.len(split) {
                let e = t.example(split, i);
                assert_eq!((e.ids.len(), e.second), (256, Some(128)));
                assert!(e.ids.iter().all(|&b| b < 256));
                let (a, b) = t.pair_offsets(split, i).unwrap();
                // Both passages inside this split's region of one play.
                let play = c.play_of(a).unwrap();
                assert_eq!(c.play_of(b), Some(play));
                for s in [a, b] {
                    assert!(c.region(play, split).contains_window(s, per_doc));
                }
                // Label 1: they share at least a quarter of their bytes; label 0: they are
                // neighbours within one passage length that share none.
                let gap = a.abs_diff(b);
                if e.label == 1 {
                    assert!((1..=96).contains(&gap), "{split:?} {i}: offset {gap}");
                } else {
                    assert!((128..256).contains(&gap), "{split:?} {i}: offset {gap}");
                }
                first_is_earlier += usize::from(a < b);
                by_play[play] += 1;
                // The input is exactly the two passages.
                let want: Vec<u32> = c
                    .passage(a, per_doc)
                    .iter()
                    .chain(c.passage(b, per_doc))
                    .map(|&x| u32::from(x))
                    .collect();
                assert_eq!(e.ids, want);
                ones += e.label as usize;
                if split != Split::Train {
                    assert!(seen.insert((a, b)), "{split:?} duplicate pair");
                }
            }
            let n = t.len(split);
            assert_eq!(ones * 2, n);
            for k in by_play {
                assert!(k * 5 > n, "{split:?} plays unbalanced: {by_play:?}");
            }
            // Which passage comes first in the text is a coin, not a cue.
            assert!(
                first_is_earlier * 10 > n * 4 && first_is_earlier * 10 < n * 6,
                "{split:?}: {first_is_earlier} of {n}"
            );
        }
    }

    #[test]
    fn offline_full_sizes() {
        let t = Retrieval::offline(Setting::Full, 0);
        assert_eq!(t.max_len(), 8000);
        assert!(t.len(Split::Train) > 6000, "{}", t.len(Split::Train));
        let n = t.len(Split::Test);
        assert!((100..=600).contains(&n), "{n}");
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
                assert_eq!(p1, p2);
                assert_eq!(f[0], if a.abs_diff(b) < 128 { "1" } else { "0" });
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
        assert_eq!((e.ids.len(), e.second), (4 + 128, Some(4)));
        assert_eq!(&e.ids[..4], &b"ab\tc".map(u32::from)[..]);
        assert_eq!(t.example(Split::Train, 1).ids.len(), 4 + 5);
        // In a batch each document is padded on its own: the second starts at 128.
        let b = crate::adapter::batch(&t, Split::Train, &[1]).unwrap();
        let ids = b.inputs.to_vec2::<u32>().unwrap().remove(0);
        let mask = b.mask.unwrap().to_vec2::<f32>().unwrap().remove(0);
        assert_eq!(&ids[128..133], &b"short".map(u32::from)[..]);
        assert_eq!(mask.iter().sum::<f32>(), 9.0);
        assert_eq!(
            (mask[3], mask[4], mask[128], mask[132], mask[133]),
            (1., 0., 1., 1., 0.)
        );
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
