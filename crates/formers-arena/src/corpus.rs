//! The offline text corpus shared by the byte-level arena tasks (`text`, `retrieval`) and the
//! TSV helpers they read and write; LRA: Tay et al., ICLR 2021.
//!
//! # The corpus
//! `data/shakespeare.txt` (embedded) holds *Hamlet*, *Macbeth* and *The Tempest*, in that
//! order. Each play opens with its title line followed by a blank line and the byline
//! `by William Shakespeare`; the three headers are found by searching for the exact byte
//! strings `"{TITLE}\n\nby William Shakespeare\n"` (`HAMLET, PRINCE OF DENMARK`, `MACBETH`,
//! `THE TEMPEST`), each of which must occur exactly once and in that order. (The file is a plain
//! concatenation, so the previous play's last line runs straight into the next title, e.g.
//! `...shot off.]MACBETH`: the title is not at a line start, hence the byte search.)
//! A play's *body* starts right after its byline (so no passage contains the title) and ends
//! where the next play's title starts (or at the end of the file).
//!
//! # Regions
//! Each body is cut, at line starts, into three contiguous regions: the first 80% of its bytes
//! is the train region, the next 10% validation and the last 10% test (each cut is moved
//! forward to the next line start). No byte belongs to two regions, so no text is shared
//! across splits.
//!
//! # Passages
//! A passage is a byte window `[start, start + len)` with `start` a line start, lying wholly
//! inside one region. Train passages may start at any such line start ([`Corpus::starts`]);
//! validation and test passages come from [`Corpus::tile`], which lays non-overlapping windows
//! greedily from the start of the region.
//!
//! # TSV escaping
//! Fields are written as raw bytes with four escapes: backslash → `\\`, tab → `\t`,
//! newline → `\n`, carriage return → `\r`. Reading undoes these; any other backslash sequence
//! is kept literally (so unescaped files with stray backslashes still load).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::OnceLock;

use crate::task::Split;

/// The embedded corpus: Hamlet, Macbeth, The Tempest (public domain; see `data/README.md`).
pub const SHAKESPEARE: &str = formers::tasks::SHAKESPEARE;

/// Short names (used in ids like `hamlet:1234`) and title lines of the three plays, in file order.
pub const PLAYS: [(&str, &str); 3] = [
    ("hamlet", "HAMLET, PRINCE OF DENMARK"),
    ("macbeth", "MACBETH"),
    ("tempest", "THE TEMPEST"),
];

const BYLINE: &str = "\n\nby William Shakespeare\n";

/// A contiguous byte range `[start, end)` of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub end: usize,
}

impl Region {
    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `[start, start + len)` lies inside the region.
    pub fn contains_window(&self, start: usize, len: usize) -> bool {
        start >= self.start && start + len <= self.end
    }
}

/// One play: its body and its train / val / test regions.
#[derive(Debug, Clone)]
pub struct Play {
    /// Short name, e.g. `hamlet`.
    pub name: &'static str,
    /// From just after the byline to the next title (or the end of the file).
    pub body: Region,
    /// Train, val, test regions, indexed like [`Split::ALL`].
    pub regions: [Region; 3],
}

/// The corpus split into plays and regions, with its line starts.
#[derive(Debug, Clone)]
pub struct Corpus {
    text: &'static [u8],
    plays: Vec<Play>,
    /// Sorted byte offsets of every line start inside a play body.
    line_starts: Vec<usize>,
}

/// The position of `split` in [`Split::ALL`].
pub(crate) fn split_index(split: Split) -> usize {
    match split {
        Split::Train => 0,
        Split::Val => 1,
        Split::Test => 2,
    }
}

/// The examples of a task's three splits: stored rows, except that the train split may
/// instead be generated on demand, so that only its size is kept.
#[derive(Debug, Clone)]
pub struct Splits<T> {
    /// Rows per split, indexed like [`Split::ALL`] (train empty when generated).
    rows: [Vec<T>; 3],
    /// The size of a generated train split.
    generated_train: Option<usize>,
}

impl<T> Splits<T> {
    /// Every split stored, indexed like [`Split::ALL`].
    pub fn stored(rows: [Vec<T>; 3]) -> Splits<T> {
        Splits {
            rows,
            generated_train: None,
        }
    }

    /// `n_train` generated train examples, stored val and test ones.
    pub fn generated_train(n_train: usize, val: Vec<T>, test: Vec<T>) -> Splits<T> {
        Splits {
            rows: [Vec::new(), val, test],
            generated_train: Some(n_train),
        }
    }

    /// Examples in `split`.
    pub fn len(&self, split: Split) -> usize {
        match (split, self.generated_train) {
            (Split::Train, Some(n)) => n,
            _ => self.rows[split_index(split)].len(),
        }
    }

    /// Stored example `index` of `split` (`None` for a generated split or out of range).
    pub fn get(&self, split: Split, index: usize) -> Option<&T> {
        self.rows[split_index(split)].get(index)
    }
}

impl Corpus {
    /// The embedded Shakespeare corpus, parsed once.
    ///
    /// Panics only if the embedded file (a compile-time constant, checked by the tests) lost
    /// one of its play headers.
    pub fn shakespeare() -> &'static Corpus {
        static CORPUS: OnceLock<Corpus> = OnceLock::new();
        CORPUS.get_or_init(|| {
            Corpus::parse(SHAKESPEARE).expect("embedded data/shakespeare.txt has its 3 plays")
        })
    }

    /// Finds the plays of [`PLAYS`] in `text` and cuts their regions (see the module docs).
    pub fn parse(text: &'static str) -> Result<Corpus, String> {
        let bytes = text.as_bytes();
        let mut heads = Vec::with_capacity(PLAYS.len());
        for (name, title) in PLAYS {
            let header = format!("{title}{BYLINE}");
            let found: Vec<usize> = text
                .match_indices(header.as_str())
                .map(|(i, _)| i)
                .collect();
            match found.as_slice() {
                [at] => heads.push((name, *at, *at + header.len())),
                [] => return Err(format!("corpus: header of {name} ({title:?}) not found")),
                _ => {
                    return Err(format!(
                        "corpus: header of {name} ({title:?}) found {} times",
                        found.len()
                    ))
                }
            }
        }
        let mut plays = Vec::with_capacity(heads.len());
        let mut line_starts = Vec::new();
        for (i, &(name, _, body_start)) in heads.iter().enumerate() {
            let body_end = heads.get(i + 1).map_or(bytes.len(), |h| h.1);
            if body_end <= body_start {
                return Err(format!("corpus: {name} is empty or out of order"));
            }
            let first = line_starts.len();
            line_starts.push(body_start);
            line_starts.extend((body_start + 1..body_end).filter(|&p| bytes[p - 1] == b'\n'));
            let starts = &line_starts[first..];
            let n = body_end - body_start;
            let cut = |frac_tenths: usize| {
                let target = body_start + n * frac_tenths / 10;
                let k = starts.partition_point(|&s| s < target);
                starts.get(k).copied().unwrap_or(body_end)
            };
            let (c1, c2) = (cut(8), cut(9));
            let regions = [
                Region {
                    start: body_start,
                    end: c1,
                },
                Region { start: c1, end: c2 },
                Region {
                    start: c2,
                    end: body_end,
                },
            ];
            if regions.iter().any(Region::is_empty) {
                return Err(format!("corpus: {name} is too short to split 80/10/10"));
            }
            plays.push(Play {
                name,
                body: Region {
                    start: body_start,
                    end: body_end,
                },
                regions,
            });
        }
        Ok(Corpus {
            text: bytes,
            plays,
            line_starts,
        })
    }

    /// The whole corpus text.
    pub fn text(&self) -> &'static [u8] {
        self.text
    }

    /// The plays, in file order (class `i` is `plays()[i]`).
    pub fn plays(&self) -> &[Play] {
        &self.plays
    }

    /// The region of `split` in play `play`.
    pub fn region(&self, play: usize, split: Split) -> Region {
        self.plays[play].regions[split_index(split)]
    }

    /// The play whose body contains byte `offset`, if any.
    pub fn play_of(&self, offset: usize) -> Option<usize> {
        self.plays
            .iter()
            .position(|p| offset >= p.body.start && offset < p.body.end)
    }

    /// The split whose region contains byte `offset`, if any.
    pub fn split_of(&self, offset: usize) -> Option<Split> {
        let play = self.play_of(offset)?;
        Split::ALL.into_iter().find(|&s| {
            let r = self.region(play, s);
            offset >= r.start && offset < r.end
        })
    }

    /// Every line start `s` of `play`'s `split` region with `[s, s + len)` inside the region:
    /// the possible starts of a passage of `len` bytes.
    pub fn starts(&self, play: usize, split: Split, len: usize) -> &[usize] {
        let r = self.region(play, split);
        let lo = self.line_starts.partition_point(|&s| s < r.start);
        let hi = self.line_starts.partition_point(|&s| s + len <= r.end);
        if hi <= lo {
            &[]
        } else {
            &self.line_starts[lo..hi]
        }
    }

    /// Non-overlapping passages of `len` bytes in `play`'s `split` region, laid greedily from
    /// its start: each begins at the first line start at or after the previous one's end.
    pub fn tile(&self, play: usize, split: Split, len: usize) -> Vec<usize> {
        let starts = self.starts(play, split, len);
        let mut out = Vec::new();
        let mut next = 0usize;
        for &s in starts {
            if s >= next {
                out.push(s);
                next = s + len.max(1);
            }
        }
        out
    }

    /// The bytes `[start, start + len)` (clipped to the corpus).
    pub fn passage(&self, start: usize, len: usize) -> &'static [u8] {
        let text = self.text;
        let a = start.min(text.len());
        let b = start.saturating_add(len).min(text.len());
        &text[a..b]
    }
}

/// Appends `field` to `out` with the escapes of the module docs.
pub fn escape_into(field: &[u8], out: &mut Vec<u8>) {
    for &b in field {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// Undoes [`escape_into`]; unknown backslash sequences are kept as they are.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b == b'\\' && i + 1 < field.len() {
            let e = match field[i + 1] {
                b'\\' => Some(b'\\'),
                b't' => Some(b'\t'),
                b'n' => Some(b'\n'),
                b'r' => Some(b'\r'),
                _ => None,
            };
            if let Some(e) = e {
                out.push(e);
                i += 2;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

/// Reads `path` line by line (bytes, `\n`-terminated, a trailing `\r` dropped, empty lines
/// skipped) and calls `row(line_number, line)`; errors are prefixed with `path:line: `.
pub fn for_each_line(
    path: &Path,
    mut row: impl FnMut(usize, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("{}:{}: read error: {e}", path.display(), number + 1))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            continue;
        }
        row(number, &line).map_err(|e| format!("{}:{number}: {e}", path.display()))?;
    }
}

/// Parses a class label: a non-negative integer below `limit`, also written as a float with
/// no fractional part (`1.0`), as LRA's AAN files read labels as floats.
pub fn parse_label(field: &[u8], limit: u32) -> Result<u32, String> {
    let s = String::from_utf8_lossy(field);
    let s = s.trim();
    let value = match s.parse::<u32>() {
        Ok(v) => Some(v),
        Err(_) => s
            .parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < f64::from(limit))
            .map(|f| f as u32),
    };
    match value {
        Some(v) if v < limit => Ok(v),
        _ => Err(format!(
            "bad label {s:?}: expected an integer in 0..{limit}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_plays_with_non_empty_disjoint_regions() {
        let c = Corpus::shakespeare();
        assert_eq!(c.plays().len(), 3);
        let names: Vec<&str> = c.plays().iter().map(|p| p.name).collect();
        assert_eq!(names, ["hamlet", "macbeth", "tempest"]);
        let mut prev_end = 0;
        for (i, p) in c.plays().iter().enumerate() {
            assert!(p.body.start >= prev_end);
            prev_end = p.body.end;
            // The body excludes the header, and starts at a line start.
            let header = format!("{}{BYLINE}", PLAYS[i].1);
            let body = c.passage(p.body.start, p.body.len());
            assert!(!body.windows(header.len()).any(|w| w == header.as_bytes()));
            assert_eq!(c.text()[p.body.start - 1], b'\n');
            assert_eq!(p.regions[0].start, p.body.start);
            assert_eq!(p.regions[2].end, p.body.end);
            for w in p.regions.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for r in &p.regions {
                assert!(!r.is_empty());
            }
            // Roughly 80/10/10.
            let n = p.body.len() as f64;
            let train = p.regions[0].len() as f64 / n;
            assert!((0.79..0.82).contains(&train), "{train}");
            // Region cuts are at line starts.
            assert_eq!(c.text()[p.regions[1].start - 1], b'\n');
            assert_eq!(c.text()[p.regions[2].start - 1], b'\n');
        }
        assert_eq!(prev_end, SHAKESPEARE.len());
        // The plays' own speaker tags land in the right bodies.
        let at = SHAKESPEARE.find("\nLADY MACBETH.\n").unwrap_or(0);
        assert_eq!(c.play_of(at + 1), Some(1));
        let at = SHAKESPEARE.find("\nPROSPERO.\n").unwrap_or(0);
        assert_eq!(c.play_of(at + 1), Some(2));
        let at = SHAKESPEARE.find("\nHam.\n").unwrap_or(0);
        assert_eq!(c.play_of(at + 1), Some(0));
    }

    #[test]
    fn starts_and_tiles_stay_inside_their_region() {
        let c = Corpus::shakespeare();
        for play in 0..3 {
            for split in Split::ALL {
                let r = c.region(play, split);
                for len in [128, 256, 4000] {
                    let starts = c.starts(play, split, len);
                    assert!(!starts.is_empty());
                    for &s in starts {
                        assert!(r.contains_window(s, len));
                        assert!(s == c.plays()[play].body.start || c.text()[s - 1] == b'\n');
                        assert_eq!(c.split_of(s), Some(split));
                    }
                    let tiles = c.tile(play, split, len);
                    assert!(!tiles.is_empty());
                    for w in tiles.windows(2) {
                        assert!(w[0] + len <= w[1]);
                    }
                }
            }
        }
    }

    #[test]
    fn escape_round_trips_and_labels_parse() {
        let raw = b"a\tb\nc\\d\re \\x";
        let mut esc = Vec::new();
        escape_into(raw, &mut esc);
        assert!(!esc.contains(&b'\t') && !esc.contains(&b'\n'));
        assert_eq!(unescape(&esc), raw.to_vec());
        assert_eq!(unescape(b"x\\qy\\"), b"x\\qy\\".to_vec());
        assert_eq!(parse_label(b"1", 2), Ok(1));
        assert_eq!(parse_label(b"0.0", 2), Ok(0));
        assert!(parse_label(b"2", 2).is_err());
        assert!(parse_label(b"0.5", 2).is_err());
        assert!(parse_label(b"-1", 2).is_err());
        assert!(parse_label(b"pos", 2).is_err());
    }

    #[test]
    fn parse_rejects_a_corpus_without_headers() {
        assert!(Corpus::parse("no plays here\n").is_err());
    }
}
