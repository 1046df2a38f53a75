//! `formers bench ...`: speed and memory figures users can quote.
//!
//! Every subcommand uses one harness: it lists its measurements as [`Job`]s, and
//! [`measure_each`] runs each one in its own `formers bench measure` process (a fresh
//! allocator, so the peak resident memory is that job's own) and collects the JSON rows the
//! child prints. The PyTorch baselines of `bench embed` and `bench train` are other
//! processes read the same way ([`rows_of`]). This file holds the subcommands, that harness
//! and the shared output; each subcommand's flags, table and measurement are in its own file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use formers::mixer::MixerSpec;
use formers::train::RunConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::progress::bar;

mod attention;
mod compress;
mod embed;
mod mixers;
mod serve;
mod train;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time and peak memory of one attention forward at several sequence lengths.
    Attention(attention::AttentionArgs),
    /// Sentence-embedding throughput of a BERT-family checkpoint (optionally against PyTorch).
    Embed(embed::EmbedArgs),
    /// Forward+backward time and peak memory of each token mixer, relative to exact attention.
    Mixers(mixers::MixersArgs),
    /// Steps/s and peak memory of one training step of a model at several lengths (optionally
    /// against PyTorch).
    ///
    /// One step is what `formers train` does per step: forward, loss, backward, gradient
    /// clipping (if the config's `train.clip_norm` is set) and AdamW, here on random token
    /// batches of each length (drawn from a fixed seed; the cost does not depend on the data).
    /// Each length runs in its own process: `--warmup` untimed steps, then `--steps` timed
    /// ones; the median step time gives steps/s, and the peak resident memory is that
    /// process's (`peak - base` is what the steps added to the built model).
    ///
    /// The model is a run config (`--config configs/charlm.json`: lengths up to its
    /// `model.max_len`) or the arena's model of a variant exactly as its speed jobs train it
    /// (`--arena-variant vanilla`: the suite's size, byte ids, `max_len` = the length, a
    /// 2-class mean-pooled head, batch 4 in the lite suite). `--torch
    /// scripts/bench_train_torch.py` runs the same architecture in PyTorch on the same shapes
    /// (each length in its own python process, which refuses what it does not implement and
    /// checks the parameter count) and prints the ratios.
    Train(train::TrainArgs),
    /// Load a running `formers serve` on this machine: N concurrent clients × M requests;
    /// prints throughput, p50/p90/p99 latency, answers by status, the slowest /health answer
    /// during the load and the server's memory.
    ///
    /// Each client sends one sentence per request (the shipped data/sentences.txt, or
    /// --sentences) on its own keep-alive connection. Compare with `formers bench embed
    /// --batch-sizes 32` on the same sentences.
    Serve(serve::ServeArgs),
    /// What each compression method costs in quality and gains in speed, bytes and memory,
    /// on one BERT-family encoder or GPT-2-family LM.
    ///
    /// Every method (`formers compress ...`: int8, low-rank MLPs plain, calibrated and
    /// healed, and for an LM the exact norm conversions) is applied to the model into a
    /// working directory; each row then gives parameters, bytes on disk
    /// (model.safetensors), peak resident memory and speed at each batch size (each in its
    /// own process: sentences/s embedded as `bench embed`, or for an LM tokens/s of the
    /// prompt pass), relative to the fp32 model, and the quality: for an encoder the cosine
    /// between each sentence's embedding from the compressed model and from the original,
    /// min and mean over the sentences; for an LM the perplexity of the sentences' next
    /// tokens and the largest logit difference from the original. Writes the table as
    /// Markdown (stdout), and JSON with --json.
    Compress(compress::CompressArgs),
    /// One measurement (run by the other bench commands in a child process, for a clean peak RSS).
    #[command(hide = true)]
    Measure(MeasureArgs),
}

/// Flags of the hidden `formers bench measure`.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// The measurement, as JSON (a [`Job`])
    #[arg(long)]
    pub job: String,
}

/// The shipped benchmark sentences (data/sentences.txt, public domain; see data/README.md).
const SENTENCES: &str = include_str!("../../../data/sentences.txt");

/// One measurement, run in its own process; it prints one JSON row on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// One attention forward at one length.
    Attention {
        length: usize,
        batch: usize,
        heads: usize,
        dim: usize,
        chunk: usize,
        causal: bool,
        naive: bool,
        repeats: usize,
    },
    /// Forward+backward of one token mixer at one length.
    Mixer {
        /// The name shown in the table.
        name: String,
        /// The mixer's config.
        spec: MixerSpec,
        length: usize,
        dim: usize,
        heads: usize,
        repeats: usize,
        /// A causal model.
        causal: bool,
    },
    /// Embedding every sentence of a file at one batch size.
    Embed {
        model: PathBuf,
        sentences: PathBuf,
        batch_size: usize,
        threads: usize,
    },
    /// Every position's logits of a causal LM (the prompt pass) over every sentence of a
    /// file, `batch_size` sentences packed at a time.
    Lm {
        model: PathBuf,
        sentences: PathBuf,
        batch_size: usize,
        threads: usize,
    },
    /// Training steps of a model at one length and batch size.
    Train {
        /// What is trained (a config path or an arena variant), for the rows.
        model: String,
        /// The resolved run: `train.seq_len` is the length, `train.batch_size` the batch.
        run: Box<RunConfig>,
        warmup: usize,
        steps: usize,
        threads: usize,
    },
}

/// The JSON rows `cmd` prints on stdout, one object per line (other lines are ignored); a
/// failed process is an error that quotes its stderr.
fn rows_of(cmd: &mut Command, what: &str) -> Result<Vec<Value>> {
    let out = cmd
        .output()
        .with_context(|| format!("running {what} in a child process"))?;
    if !out.status.success() {
        anyhow::bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect())
}

/// Runs each `(label, job)` in its own `formers bench measure` process, in order, under a
/// progress bar titled `title`; prints `line(row)` above the bar for each row.
pub(crate) fn measure_each(
    title: &str,
    jobs: &[(String, Job)],
    line: impl Fn(&Value) -> String,
) -> Result<Vec<Value>> {
    let exe = std::env::current_exe().context("locating the formers binary")?;
    let pb = bar(jobs.len() as u64, title);
    let mut rows = Vec::new();
    for (label, job) in jobs {
        pb.set_message(label.clone());
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "measure", "--job", &serde_json::to_string(job)?]);
        if let Job::Embed { threads, .. } | Job::Lm { threads, .. } | Job::Train { threads, .. } =
            job
        {
            // candle sizes its thread pool from this variable on first use.
            cmd.env("RAYON_NUM_THREADS", threads.to_string());
        }
        let got = rows_of(&mut cmd, label)?;
        if got.is_empty() {
            anyhow::bail!("{label}: the child printed no result");
        }
        for r in &got {
            pb.println(line(r));
        }
        rows.extend(got);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(rows)
}

/// The number of elements of a tensor of shape `dims`, refused (naming `what`) when it
/// overflows.
fn elements(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .with_context(|| format!("{what} = {dims:?} overflows the address space"))
}

/// Writes `rows` as a pretty JSON array to `path`, if given.
pub(crate) fn write_json(path: Option<&Path>, rows: &[Value]) -> Result<()> {
    if let Some(path) = path {
        let json = serde_json::to_string_pretty(rows)?;
        formers::fsio::write_atomic(path, json.as_bytes(), true)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes `contents` to `formers-<pid>-<name>` in the temporary directory: what both
/// implementations of a comparison read.
pub(crate) fn temp_file(name: &str, contents: &str) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("formers-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The benchmark sentences: `path`'s non-empty lines, or the shipped ones.
pub(crate) fn sentences_of(path: Option<&Path>) -> Result<Vec<String>> {
    let text = match path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => SENTENCES.to_string(),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The median of `xs` (the upper one of an even count); NaN when empty.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Attention(a) => attention::run(a),
        BenchCommand::Embed(a) => embed::run(a),
        BenchCommand::Mixers(a) => mixers::run(a),
        BenchCommand::Train(a) => train::run(a),
        BenchCommand::Serve(a) => serve::run(a),
        BenchCommand::Compress(a) => compress::run(a),
        BenchCommand::Measure(a) => {
            let job: Job = serde_json::from_str(&a.job).context("--job")?;
            println!("{}", measure(job)?);
            Ok(())
        }
    }
}

/// Runs one measurement in this process and returns its row.
fn measure(job: Job) -> Result<Value> {
    match job {
        Job::Attention {
            length,
            batch,
            heads,
            dim,
            chunk,
            causal,
            naive,
            repeats,
        } => attention::one(length, batch, heads, dim, chunk, causal, naive, repeats),
        Job::Mixer {
            name,
            spec,
            length,
            dim,
            heads,
            repeats,
            causal,
        } => mixers::one(name, spec, length, dim, heads, repeats, causal),
        Job::Embed {
            model,
            sentences,
            batch_size,
            threads,
        } => embed::embed_one(&model, &sentences, batch_size, threads),
        Job::Lm {
            model,
            sentences,
            batch_size,
            threads,
        } => embed::lm_one(&model, &sentences, batch_size, threads),
        Job::Train {
            model,
            run,
            warmup,
            steps,
            threads,
        } => train::one(model, *run, warmup, steps, threads),
    }
}
