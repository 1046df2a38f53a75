//! The results store: one JSON line per finished run, appended as each run ends, so a killed
//! arena loses no finished run; `merge` joins the files of sharded runs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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
    /// The test split's majority-class rate (the accuracy of always answering the most
    /// frequent label); `None` in records stored before this field was.
    #[serde(default)]
    pub majority_accuracy: Option<f64>,
    /// Accuracy on the held-out validation batches at the end of training.
    pub val_accuracy: f64,
    /// Optimizer steps per second (forward, backward, update).
    pub train_steps_per_s: f64,
    /// Compute threads the run had: fewer than the arena's when other jobs ran beside it
    /// (`formers arena --jobs`), which its speed figures reflect. 0 in records stored before
    /// this field was.
    #[serde(default)]
    pub threads: usize,
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

impl Record {
    /// What identifies the job that made this record; a rerun skips jobs whose key is
    /// already stored.
    pub fn key(&self) -> String {
        match self {
            Record::Run(r) => run_key(&r.suite, &r.task, &r.variant, r.seed, &r.budget),
            Record::Speed(s) => speed_key(&s.suite, &s.variant, s.length),
            Record::Skipped(s) => format!("skipped/{}/{}", s.suite, s.task),
        }
    }
}

/// `Err` naming the first field of a record whose value is out of range: accuracies in
/// [0, 1], rates, times and losses finite and ≥ 0, and counts ≥ 1 where 0 makes no sense.
pub fn check(record: &Record) -> Result<(), String> {
    fn unit(field: &str, x: f64) -> Result<(), String> {
        if (0.0..=1.0).contains(&x) {
            Ok(())
        } else {
            Err(format!("{field} {x} is not in [0, 1]"))
        }
    }
    fn rate(field: &str, x: f64) -> Result<(), String> {
        if x.is_finite() && x >= 0.0 {
            Ok(())
        } else {
            Err(format!("{field} {x} is not a finite number ≥ 0"))
        }
    }
    fn count(field: &str, n: usize) -> Result<(), String> {
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("{field} {n} is not ≥ 1"))
        }
    }
    match record {
        Record::Run(r) => {
            count("seq_len", r.seq_len)?;
            count("batch_size", r.batch_size)?;
            unit("test_accuracy", r.test_accuracy)?;
            count("test_examples", r.test_examples)?;
            if let Some(m) = r.majority_accuracy {
                unit("majority_accuracy", m)?;
            }
            unit("val_accuracy", r.val_accuracy)?;
            rate("train_steps_per_s", r.train_steps_per_s)?;
            rate("infer_tokens_per_s", r.infer_tokens_per_s)?;
            count("params", r.params)?;
            rate("flops_per_token", r.flops_per_token)?;
            rate("wall_s", r.wall_s)?;
            for &(step, loss) in &r.loss_curve {
                rate(&format!("loss_curve (step {step})"), loss as f64)?;
            }
            Ok(())
        }
        Record::Speed(s) => {
            count("length", s.length)?;
            count("batch_size", s.batch_size)?;
            rate("steps_per_s", s.steps_per_s)?;
            count("params", s.params)
        }
        Record::Skipped(_) => Ok(()),
    }
}

/// The key of a training run.
pub fn run_key(suite: &str, task: &str, variant: &str, seed: u64, budget: &str) -> String {
    format!("run/{suite}/{task}/{variant}/{seed}/{budget}")
}

/// The key of a speed measurement.
pub fn speed_key(suite: &str, variant: &str, length: usize) -> String {
    format!("speed/{suite}/{variant}/{length}")
}

/// File name of the store inside an arena directory.
pub const FILE: &str = "results.jsonl";

/// Reads the records of `path` (none when the file does not exist). A last line cut short
/// by a kill is ignored; any other bad line is an error naming the file and line.
pub fn load(path: &Path) -> Result<Vec<Record>, String> {
    Ok(load_numbered(path)?.into_iter().map(|(_, r)| r).collect())
}

/// Like [`load`], each record with its line number (1-based).
pub fn load_numbered(path: &Path) -> Result<Vec<(usize, Record)>, String> {
    if !formers::fsio::exists(path) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let lines =
        formers::fsio::lines(path, formers::fsio::MAX_LINE_BYTES).map_err(|e| e.to_string())?;
    for line in lines {
        let line = line.map_err(|e| e.to_string())?;
        let record = record_of(&line.text, line.complete)
            .map_err(|e| format!("{}:{}: bad record: {e}", path.display(), line.number))?;
        out.extend(record.map(|r| (line.number, r)));
    }
    Ok(out)
}

/// The record of one line: `None` for a blank line or a last line cut short by a kill
/// (`complete == false`), an error for any other line that is not a record.
fn record_of(text: &str, complete: bool) -> Result<Option<Record>, serde_json::Error> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str(text) {
        Ok(r) => Ok(Some(r)),
        Err(_) if !complete => Ok(None),
        Err(e) => Err(e),
    }
}

/// The records of the text of a results file with their line numbers, or the first bad
/// line and why: [`load_numbered`] on text in memory.
pub fn parse(text: &str) -> Result<Vec<(usize, Record)>, (usize, serde_json::Error)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let complete = i + 1 < lines.len() || text.ends_with('\n');
        if let Some(r) = record_of(line, complete).map_err(|e| (i + 1, e))? {
            out.push((i + 1, r));
        }
    }
    Ok(out)
}

/// A key stored on more than one line (two arena processes in one directory before it was
/// locked, or lines appended by hand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub key: String,
    /// The lines holding it, ascending; the first is the record kept.
    pub lines: Vec<usize>,
}

/// The records of a results file, one per key, the keys it holds more than once and the
/// records left out because a field is out of range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unique {
    /// The first record of each key, in file order.
    pub records: Vec<Record>,
    pub duplicates: Vec<Duplicate>,
    /// (line, why) of each record [`check`] refuses, in file order.
    pub invalid: Vec<(usize, String)>,
}

impl Unique {
    /// Keeps the first record of each key of `numbered` (records with line numbers) that
    /// passes [`check`]; the others are listed in [`Unique::invalid`].
    pub fn new(numbered: Vec<(usize, Record)>) -> Unique {
        let mut lines: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut records = Vec::with_capacity(numbered.len());
        let mut invalid = Vec::new();
        for (line, r) in numbered {
            if let Err(why) = check(&r) {
                invalid.push((line, why));
                continue;
            }
            let seen = lines.entry(r.key()).or_default();
            if seen.is_empty() {
                records.push(r);
            }
            seen.push(line);
        }
        let duplicates = lines
            .into_iter()
            .filter(|(_, l)| l.len() > 1)
            .map(|(key, lines)| Duplicate { key, lines })
            .collect();
        Unique {
            records,
            duplicates,
            invalid,
        }
    }

    /// One line per record left out as out of range, naming `file`, its line and the field.
    pub fn invalid_notes(&self, file: &Path) -> Vec<String> {
        self.invalid
            .iter()
            .map(|(line, why)| {
                format!(
                    "{}:{line}: bad record: {why}; it is left out of the report.",
                    file.display()
                )
            })
            .collect()
    }

    /// One line saying which keys `file` holds twice and that the first record of each
    /// counts; `None` when every key is stored once.
    pub fn duplicates_note(&self, file: &Path) -> Option<String> {
        const SHOWN: usize = 5;
        if self.duplicates.is_empty() {
            return None;
        }
        let mut listed: Vec<String> = self
            .duplicates
            .iter()
            .take(SHOWN)
            .map(|d| {
                let lines: Vec<String> = d.lines.iter().map(|l| l.to_string()).collect();
                format!("`{}` (lines {})", d.key, lines.join(", "))
            })
            .collect();
        if self.duplicates.len() > SHOWN {
            listed.push(format!("and {} more", self.duplicates.len() - SHOWN));
        }
        Some(format!(
            "{} holds {} job key(s) more than once: {}; only the first record of each is \
             reported.",
            file.display(),
            self.duplicates.len(),
            listed.join(", ")
        ))
    }
}

/// Reads `path` like [`load`], keeping the first record of each key and listing the keys
/// stored more than once.
pub fn load_unique(path: &Path) -> Result<Unique, String> {
    Ok(Unique::new(load_numbered(path)?))
}

/// Appends `record` as one line and syncs it to disk before returning; a symbolic link or
/// anything but a regular file at `path` is refused. A partial last line
/// left by a kill mid-write is dropped first, so it never ends up inside the file.
pub fn append(path: &Path, record: &Record) -> Result<(), String> {
    let err = |e: io::Error| format!("{}: {e}", path.display());
    let mut f = formers::fsio::append_nofollow(path).map_err(|e| e.to_string())?;
    if !ends_with_newline(path).map_err(err)? {
        let bytes = fs::read(path).map_err(err)?;
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        f.set_len(keep as u64).map_err(err)?;
    }
    let mut line = serde_json::to_string(record).expect("records serialise");
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Whether the file is empty or ends a line: only its last byte is read, so an append
/// costs the same however long the store grows.
fn ends_with_newline(path: &Path) -> io::Result<bool> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// The records of several arena directories (or result files), one per key: the first
/// directory given wins when two hold the same job. Sorted by key.
pub fn merge(paths: &[PathBuf]) -> Result<Vec<Record>, String> {
    let mut by_key = BTreeMap::new();
    for p in paths {
        let file = if p.is_dir() { p.join(FILE) } else { p.clone() };
        if !file.exists() {
            return Err(format!("{}: no arena results here", file.display()));
        }
        for r in load(&file)? {
            by_key.entry(r.key()).or_insert(r);
        }
    }
    Ok(by_key.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skipped(task: &str) -> Record {
        Record::Skipped(Skipped {
            suite: "lite".into(),
            task: task.into(),
            reason: "test".into(),
        })
    }

    #[cfg(unix)]
    #[test]
    fn the_store_is_never_written_through_a_link_nor_read_from_a_device() {
        let dir = std::env::temp_dir().join(format!("formers-results-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, "keep\n").unwrap();
        let store = dir.join(FILE);
        std::os::unix::fs::symlink(&victim, &store).unwrap();
        let e = append(&store, &skipped("a")).unwrap_err();
        assert!(e.contains(FILE), "{e}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep\n");
        fs::remove_file(&store).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &store).unwrap();
        let e = load(&store).unwrap_err();
        assert!(e.contains("is a device"), "{e}");
        fs::remove_file(&store).unwrap();
        // Round trip, and a line cut short by a kill is dropped.
        append(&store, &skipped("a")).unwrap();
        append(&store, &skipped("b")).unwrap();
        let mut f = fs::OpenOptions::new().append(true).open(&store).unwrap();
        f.write_all(b"{\"kind\":\"ski").unwrap();
        assert_eq!(load(&store).unwrap(), vec![skipped("a"), skipped("b")]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn out_of_range_records_are_named_and_left_out() {
        let good = r#"{"kind":"run","suite":"lite","task":"text","variant":"vanilla","seed":0,"budget":"3","source":"s","seq_len":8,"batch_size":2,"steps":3,"test_accuracy":0.5,"test_examples":4,"val_accuracy":0.5,"train_steps_per_s":1.0,"infer_tokens_per_s":1.0,"peak_rss_bytes":1,"params":1,"flops_per_token":1.0,"wall_s":1.0,"loss_curve":[[1,0.5]]}"#;
        let bad = |field: &str, from: &str, to: &str| {
            let edited = good.replace(from, to);
            assert_ne!(edited, good, "{field}");
            edited.replace("\"seed\":0", "\"seed\":1")
        };
        let cases = [
            (
                "test_accuracy",
                "\"test_accuracy\":0.5",
                "\"test_accuracy\":-3.5",
            ),
            (
                "test_accuracy",
                "\"test_accuracy\":0.5",
                "\"test_accuracy\":1e308",
            ),
            (
                "val_accuracy",
                "\"val_accuracy\":0.5",
                "\"val_accuracy\":1.5",
            ),
            ("wall_s", "\"wall_s\":1.0", "\"wall_s\":-2"),
            (
                "test_examples",
                "\"test_examples\":4",
                "\"test_examples\":0",
            ),
            ("params", "\"params\":1,", "\"params\":0,"),
            ("loss_curve", "[[1,0.5]]", "[[1,-0.5]]"),
        ];
        for (field, from, to) in cases {
            let text = format!("{good}\n{}\n", bad(field, from, to));
            let unique = Unique::new(parse(&text).unwrap());
            assert_eq!(unique.records.len(), 1, "{field}");
            assert_eq!(unique.invalid.len(), 1, "{field}");
            assert_eq!(unique.invalid[0].0, 2, "{field}");
            let notes = unique.invalid_notes(Path::new(FILE));
            assert!(
                notes[0].starts_with("results.jsonl:2: bad record: "),
                "{notes:?}"
            );
            assert!(notes[0].contains(field), "{notes:?}");
        }
        let speed = r#"{"kind":"speed","suite":"lite","variant":"v","length":64,"batch_size":2,"steps_per_s":-1.0,"peak_rss_bytes":1,"params":1}"#;
        let unique = Unique::new(parse(speed).unwrap());
        assert!(unique.records.is_empty());
        assert!(
            unique.invalid[0].1.contains("steps_per_s"),
            "{:?}",
            unique.invalid
        );
        // A bad record does not hide a good one stored later under the same key.
        let text = format!(
            "{}\n{good}\n",
            good.replace("\"wall_s\":1.0", "\"wall_s\":-1")
        );
        let unique = Unique::new(parse(&text).unwrap());
        assert_eq!((unique.records.len(), unique.duplicates.len()), (1, 0));
    }

    #[test]
    fn a_run_record_stored_before_the_thread_count_still_loads() {
        let old = r#"{"kind":"run","suite":"lite","task":"text","variant":"vanilla","seed":0,
            "budget":"3","source":"s","seq_len":8,"batch_size":2,"steps":3,
            "test_accuracy":0.5,"test_examples":4,"val_accuracy":0.5,"train_steps_per_s":1.0,
            "infer_tokens_per_s":1.0,"peak_rss_bytes":1,"params":1,"flops_per_token":1.0,
            "wall_s":1.0,"loss_curve":[[1,0.5]]}"#
            .replace('\n', "");
        let Ok(Some(Record::Run(r))) = record_of(&old, true) else {
            panic!("not loaded: {:?}", record_of(&old, true))
        };
        assert_eq!((r.threads, r.steps, r.majority_accuracy), (0, 3, None));
    }
}
