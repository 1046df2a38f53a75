//! Every loader fed arbitrary bytes: one function per kind of input file, shared by the
//! cargo-fuzz targets in `fuzz/` and the bounded property tests in this module (compiled
//! with the `fuzzing` feature, and for this crate's tests).
//!
//! Each function puts the bytes where the loader reads them, next to valid fixture files
//! when the loader reads a directory (each family's tiny checkpoint in `tests/fixtures`, a
//! tiny run directory), runs the public loader and returns `Ok` or its error as text. What a caller
//! checks is that it returns at all: no panic, no abort, no hang. [`mutate`] turns a valid
//! input into a hostile one from a recipe of bytes.

mod guard;
pub mod mutate;
#[cfg(test)]
mod props;
mod scratch;

pub use guard::guarded;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::pretrained::{self, Family};
use crate::tasks;
use crate::train::checkpoint;
use crate::train::config::RunConfig;
use crate::train::run::{RunDir, Start};
use crate::train::trainer::Trainer;
use scratch::Scratch;

/// The files of a Hugging Face checkpoint directory: a family's fixture.
#[derive(Debug, Clone, Copy)]
pub struct Fixture {
    pub family: &'static dyn Family,
    pub config: &'static [u8],
    pub weights: &'static [u8],
    pub tokenizer: &'static [u8],
}

/// `tests/fixtures/tiny-<name>`: the fixture directory of `family`.
pub fn fixture_dir(family: &dyn Family) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(format!("tiny-{}", family.name()))
}

/// The fixture of every family of [`pretrained::FAMILIES`], in its order (read once).
pub fn fixtures() -> &'static [Fixture] {
    static FIXTURES: OnceLock<Vec<Fixture>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        pretrained::FAMILIES
            .iter()
            .map(|&family| {
                let dir = fixture_dir(family);
                let read = |file: &str| -> &'static [u8] {
                    let path = dir.join(file);
                    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
                        panic!("every family has fixtures: {}: {e}", path.display())
                    });
                    Box::leak(bytes.into_boxed_slice())
                };
                Fixture {
                    family,
                    config: read("config.json"),
                    weights: read("model.safetensors"),
                    tokenizer: read("tokenizer.json"),
                }
            })
            .collect()
    })
}

/// A fuzz target: its name in `fuzz/` and the function it calls.
pub type Target = (&'static str, fn(&[u8]) -> Outcome);

/// The fuzz targets of this crate.
pub const TARGETS: &[Target] = &[
    ("safetensors", safetensors),
    ("hf_config", hf_config),
    ("tokenizer", tokenizer),
    ("config_json", |b| run_config(Format::Json, b)),
    ("config_toml", |b| run_config(Format::Toml, b)),
    ("run_state", run_state),
];

/// Replays the reproducers in `fuzz/regressions/<target>/` of `targets` through [`guarded`]:
/// those whose name starts with `waits-` (a finding whose fix is still open) only when
/// `waiting`, the others only when not. Returns the failures, one line each.
pub fn replay_regressions(targets: &[Target], waiting: bool) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let mut failures = Vec::new();
    for (name, load) in targets {
        let Ok(files) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        for file in files.flatten() {
            let waits = file.file_name().to_string_lossy().starts_with("waits-");
            if waits != waiting {
                continue;
            }
            let bytes = std::fs::read(file.path()).expect("a reproducer");
            if let Err(e) = guarded(&bytes, *load) {
                failures.push(format!(
                    "{}: {}",
                    file.path().display(),
                    e.lines().next().unwrap_or("")
                ));
            }
        }
    }
    failures
}

/// What a loader said: `Ok`, or its error message.
pub type Outcome = Result<(), String>;

fn text<E: std::fmt::Display>(r: Result<impl Sized, E>) -> Outcome {
    r.map(|_| ()).map_err(|e| e.to_string())
}

/// `fixture`'s directory with `file` replaced by `bytes`, loaded with [`pretrained::load`].
fn load_with(fixture: &Fixture, file: &str, bytes: &[u8]) -> Outcome {
    let dir = Scratch::new();
    dir.write("config.json", fixture.config);
    dir.write("model.safetensors", fixture.weights);
    dir.write("tokenizer.json", fixture.tokenizer);
    dir.write(file, bytes);
    text(pretrained::load(dir.path()))
}

/// `file` replaced by `bytes` in the directory of each of `fixtures`, each loaded: `Ok`, or
/// the errors, each naming its family.
fn load_in(fixtures: &[Fixture], file: &str, bytes: &[u8]) -> Outcome {
    let errors: Vec<String> = fixtures
        .iter()
        .filter_map(|f| {
            let e = load_with(f, file, bytes).err()?;
            Some(format!("{}: {e}", f.family.name()))
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// A safetensors file as a pretrained checkpoint's `model.safetensors` beside each family's
/// config (memory-mapped, read through the family's naming) and as a formers checkpoint's
/// tensors (read whole).
pub fn safetensors(bytes: &[u8]) -> Outcome {
    safetensors_in(fixtures(), bytes)
}

/// [`safetensors`], as the weights of `fixtures` only.
fn safetensors_in(fixtures: &[Fixture], bytes: &[u8]) -> Outcome {
    let pretrained = load_in(fixtures, "model.safetensors", bytes);
    let dir = Scratch::new();
    let path = dir.write("model.safetensors", bytes);
    let own = text(checkpoint::read_tensors(&path));
    match (pretrained, own) {
        (Ok(()), Ok(())) => Ok(()),
        (a, b) => Err(format!("pretrained: {a:?}; checkpoint: {b:?}")),
    }
}

/// A Hugging Face `config.json` beside each family's weights and tokenizer (the loader
/// picks the family by the config's `model_type`, whichever files lie beside it).
pub fn hf_config(bytes: &[u8]) -> Outcome {
    load_in(fixtures(), "config.json", bytes)
}

/// A Hugging Face `config.json` in `fixture`'s directory.
#[cfg(test)]
fn hf_config_in(fixture: &Fixture, bytes: &[u8]) -> Outcome {
    load_in(std::slice::from_ref(fixture), "config.json", bytes)
}

/// The largest vocabulary [`tokenizer`] lets a tokenizer have.
pub const TOKENIZER_VOCAB: usize = 1 << 16;

/// A `tokenizer.json`, loaded and then used to encode and decode a sample text.
pub fn tokenizer(bytes: &[u8]) -> Outcome {
    const SAMPLE: &str = "Hello, world! Ünïcode, 12 345 tabs\tand\nnewlines, [CLS] <|endoftext|>";
    let dir = Scratch::new();
    let path = dir.write("tokenizer.json", bytes);
    let tok = pretrained::load_tokenizer(&path, TOKENIZER_VOCAB).map_err(|e| e.to_string())?;
    let ids = pretrained::encode(&tok, SAMPLE, true).map_err(|e| e.to_string())?;
    text(pretrained::decode(&tok, &ids))
}

/// The two formats of a formers config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
}

/// A formers run config (model and training), parsed and validated.
pub fn run_config(format: Format, bytes: &[u8]) -> Outcome {
    match format {
        Format::Json => {
            let s = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
            text(RunConfig::from_json(s))
        }
        Format::Toml => {
            let dir = Scratch::new();
            text(RunConfig::from_path(&dir.write("run.toml", bytes)))
        }
    }
}

/// The tiny run that [`run_state`] resumes (a causal copy task).
pub const TINY_RUN: &str = r#"{
  "model": {
    "d_model": 8, "n_heads": 2, "n_layers": 1, "max_len": 8, "causal": true,
    "input": {"kind": "tokens", "vocab_size": 8},
    "head": {"kind": "lm", "tied": true}
  },
  "train": {"steps": 4, "batch_size": 2, "seq_len": 8, "eval_every": 2, "checkpoint_every": 2}
}"#;

/// The task of [`TINY_RUN`].
pub const TINY_TASK: &str = "copy";

/// The run directory of [`TINY_RUN`] with its first checkpoint (saved after one step: a checkpoint of step 0 is refused on resume),
/// made once per process (and left in the temp dir: one small directory) and copied per case.
fn tiny_run() -> Result<Scratch, String> {
    static TEMPLATE: OnceLock<Result<Scratch, String>> = OnceLock::new();
    let template = TEMPLATE
        .get_or_init(|| {
            let (run, task) = tiny_config();
            let out = Scratch::new();
            let mut trainer = Trainer::new(&run, task.as_ref()).map_err(|e| e.to_string())?;
            RunDir::open(out.path(), &mut trainer, Start::New).map_err(|e| e.to_string())?;
            trainer.step().map_err(|e| e.to_string())?;
            trainer.save(out.path()).map_err(|e| e.to_string())?;
            Ok(out)
        })
        .as_ref()?;
    let out = Scratch::new();
    out.copy_from(template.path());
    Ok(out)
}

fn tiny_config() -> (RunConfig, Box<dyn crate::train::task::Task>) {
    let run = RunConfig::from_json(TINY_RUN).expect("the tiny run is valid");
    let task = tasks::by_name(TINY_TASK, &run.model, &run.train).expect("the tiny task exists");
    (run, task)
}

/// The `state.json` of [`TINY_RUN`]'s checkpoint: the valid input [`run_state`] starts from.
pub fn run_state_seed() -> Vec<u8> {
    let out = tiny_run().expect("the tiny run saves");
    std::fs::read(out.path().join(checkpoint::DIR).join("state.json")).expect("its state")
}

/// A checkpoint's `state.json`, resumed from: the run directory of [`TINY_RUN`] with its
/// checkpoint (weights and optimizer state as saved), and `bytes` as the state.
pub fn run_state(bytes: &[u8]) -> Outcome {
    let (run, task) = tiny_config();
    let out = tiny_run()?;
    out.write(Path::new(checkpoint::DIR).join("state.json"), bytes);
    let mut trainer = Trainer::new(&run, task.as_ref()).map_err(|e| e.to_string())?;
    text(RunDir::open(out.path(), &mut trainer, Start::Resume))
}
