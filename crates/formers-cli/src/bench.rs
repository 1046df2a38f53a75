//! `formers bench ...`: speed and memory figures users can quote.
//!
//! Every subcommand uses one harness: it lists its measurements as [`Job`]s, and
//! [`measure_each`] runs each one in its own `formers bench measure` process (a fresh
//! allocator, so the peak resident memory is that job's own) and collects the JSON rows the
//! child prints. The PyTorch baselines of `bench embed` and `bench train` are other
//! processes read the same way ([`rows_of`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{ArgGroup, Args, Subcommand};
use formers::limits::Limits;
use formers::mixer::softmax::{attend, reference_attend, AttendOpts};
use formers::rng::Rng;
use formers::tasks::RandomTokens;
use formers::train::RunConfig;
use formers::train::Trainer;
use formers_arena::suite::SuiteSpec;
use formers_arena::{exec, mem, variants, Setting};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::progress::bar;

mod compress;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time and peak memory of one attention forward at several sequence lengths.
    Attention(AttentionArgs),
    /// Sentence-embedding throughput of a BERT-family checkpoint (optionally against PyTorch).
    Embed(EmbedArgs),
    /// Forward+backward time and peak memory of each token mixer, relative to exact attention.
    Mixers(MixersArgs),
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
    Train(TrainArgs),
    /// Load a running `formers serve` on this machine: N concurrent clients × M requests;
    /// prints throughput, p50/p90/p99 latency, answers by status, the slowest /health answer
    /// during the load and the server's memory.
    ///
    /// Each client sends one sentence per request (the shipped data/sentences.txt, or
    /// --sentences) on its own keep-alive connection. Compare with `formers bench embed
    /// --batch-sizes 32` on the same sentences.
    Serve(ServeArgs),
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

/// Flags of `formers bench mixers`.
#[derive(Debug, Args)]
pub struct MixersArgs {
    /// Sequence lengths, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384"
    )]
    pub lengths: Vec<usize>,
    /// Mixers: attention, local, linear-elu, favor, linformer, flow, pool
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "attention,local,linear-elu,favor,linformer,flow,pool"
    )]
    pub mixers: Vec<String>,
    /// Model width (heads × head width)
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    /// Attention heads
    #[arg(long, default_value_t = 1)]
    pub heads: usize,
    /// Window of `local` (each side) and its block size
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Random features of `favor`
    #[arg(long, default_value_t = 64)]
    pub features: usize,
    /// Projected length of `linformer`
    #[arg(long, default_value_t = 256)]
    pub linformer_k: usize,
    /// Causal variants
    #[arg(long)]
    pub causal: bool,
    /// Timed repetitions (median reported)
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Also write `[{mixer, length, seconds, peak_bytes}]` to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Flags of `formers bench train`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("model").required(true).args(["config", "arena_variant"])))]
pub struct TrainArgs {
    /// A run config (JSON or TOML, e.g. configs/charlm.json): its model, optimizer and
    /// clipping; each length becomes `train.seq_len` and must be at most `model.max_len`
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Instead of --config: the arena's model of this variant (`vanilla`, another shipped
    /// name or a variant .json), as the arena's speed jobs build and train it
    #[arg(long, value_name = "VARIANT")]
    pub arena_variant: Option<String>,
    /// Suite of --arena-variant (its model size and batch): lite or full
    #[arg(long, default_value = "lite", requires = "arena_variant")]
    pub suite: String,
    /// Sequence lengths, comma-separated (each in its own process)
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024")]
    pub lengths: Vec<usize>,
    /// Sequences per step [default: the config's train.batch_size, or the suite's speed
    /// batch with --arena-variant]
    #[arg(long)]
    pub batch: Option<usize>,
    /// Untimed steps before the timed ones
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps per length (the median is reported)
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Compute threads (sets RAYON_NUM_THREADS for formers, torch.set_num_threads for PyTorch)
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Also run this PyTorch script on the same model and shapes and print the ratios (needs
    /// python3 with torch; e.g. scripts/bench_train_torch.py)
    #[arg(long, value_name = "SCRIPT")]
    pub torch: Option<PathBuf>,
    /// Also write the rows (`impl, length, batch, steps_per_s, peak_rss_bytes, ...`) as a JSON
    /// array to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
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

/// Flags of `formers bench embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// One sentence per line [default: the shipped data/sentences.txt, 999 KJV verses]
    #[arg(long, value_name = "FILE")]
    pub sentences: Option<PathBuf>,
    /// Batch sizes to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch_sizes: Vec<usize>,
    /// Compute threads (sets RAYON_NUM_THREADS for formers, torch.set_num_threads for PyTorch)
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Also run this PyTorch + transformers script on the same sentences and print the ratios
    /// (needs python3 with torch and transformers; e.g. scripts/bench_torch.py)
    #[arg(long, value_name = "SCRIPT")]
    pub torch: Option<PathBuf>,
    /// Also write the results as a JSON array to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Flags of `formers bench serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The server's address (loopback only)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Concurrent clients
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Requests each client sends, one after another
    #[arg(long, default_value_t = 20)]
    pub requests_per_client: usize,
    /// Send completions (greedy, this many tokens each) instead of embeddings
    #[arg(long, value_name = "TOKENS")]
    pub completions: Option<usize>,
    /// One sentence per line [default: the shipped data/sentences.txt, 999 KJV verses]
    #[arg(long, value_name = "FILE")]
    pub sentences: Option<PathBuf>,
    /// Stop after this many seconds (requests not sent by then are not counted)
    #[arg(long, default_value_t = 600)]
    pub time_limit: u64,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Flags of `formers bench attention`.
#[derive(Debug, Args)]
pub struct AttentionArgs {
    /// Sequence lengths, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384"
    )]
    pub lengths: Vec<usize>,
    /// Batch size
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Width of each head
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    /// Number of heads
    #[arg(long, default_value_t = 1)]
    pub heads: usize,
    /// Queries and keys per chunk of the online softmax
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Causal masking
    #[arg(long)]
    pub causal: bool,
    /// Time the O(n²) reference (full score matrix) instead of the chunked kernel
    #[arg(long)]
    pub naive: bool,
    /// Timed repetitions per length (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also write the results as a JSON array to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct AttentionRow {
    kernel: &'static str,
    length: usize,
    batch: usize,
    heads: usize,
    dim: usize,
    causal: bool,
    /// Median seconds per forward.
    seconds: f64,
    /// Peak resident memory of the whole process while this length ran.
    peak_rss_bytes: u64,
    /// Resident memory before the inputs were made.
    base_rss_bytes: u64,
}

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
        /// The mixer's config (a `MixerSpec` as JSON).
        spec: Value,
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

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Attention(a) => attention(a),
        BenchCommand::Embed(a) => embed(a),
        BenchCommand::Mixers(a) => mixers(a),
        BenchCommand::Train(a) => train(a),
        BenchCommand::Serve(a) => serve(a),
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
        } => attention_one(length, batch, heads, dim, chunk, causal, naive, repeats),
        Job::Mixer {
            name,
            spec,
            length,
            dim,
            heads,
            repeats,
            causal,
        } => mixer_one(name, spec, length, dim, heads, repeats, causal),
        Job::Embed {
            model,
            sentences,
            batch_size,
            threads,
        } => embed_one(&model, &sentences, batch_size, threads),
        Job::Lm {
            model,
            sentences,
            batch_size,
            threads,
        } => lm_one(&model, &sentences, batch_size, threads),
        Job::Train {
            model,
            run,
            warmup,
            steps,
            threads,
        } => train_one(model, *run, warmup, steps, threads),
    }
}

/// The median of `xs` (the upper one of an even count); NaN when empty.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn attention(a: AttentionArgs) -> Result<()> {
    if a.lengths.is_empty() || a.lengths.contains(&0) {
        anyhow::bail!("--lengths: give positive lengths, e.g. 1024,2048");
    }
    if a.repeats == 0 || a.dim == 0 || a.heads == 0 || a.batch == 0 || a.chunk == 0 {
        anyhow::bail!("--repeats, --dim, --heads, --batch and --chunk must be at least 1");
    }
    for &n in &a.lengths {
        elements(
            &[a.batch, a.heads, n, a.dim],
            "--batch × --heads × --lengths × --dim",
        )?;
    }
    let jobs: Vec<(String, Job)> = a
        .lengths
        .iter()
        .map(|&length| {
            (
                format!("n = {length}"),
                Job::Attention {
                    length,
                    batch: a.batch,
                    heads: a.heads,
                    dim: a.dim,
                    chunk: a.chunk,
                    causal: a.causal,
                    naive: a.naive,
                    repeats: a.repeats,
                },
            )
        })
        .collect();
    let rows = measure_each("bench attention", &jobs, |r| {
        format!(
            "{:>8} n = {:>6}: {:>9.2} ms per forward, peak RSS {}",
            r["kernel"].as_str().unwrap_or("?"),
            r["length"],
            r["seconds"].as_f64().unwrap_or(0.0) * 1e3,
            mem::human(r["peak_rss_bytes"].as_u64().unwrap_or(0))
        )
    })?;
    println!("| kernel | length | ms / forward | peak RSS |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {} |",
            r["kernel"].as_str().unwrap_or("?"),
            r["length"],
            r["seconds"].as_f64().unwrap_or(0.0) * 1e3,
            mem::human(r["peak_rss_bytes"].as_u64().unwrap_or(0))
        );
    }
    write_json(a.json.as_deref(), &rows)
}

#[allow(clippy::too_many_arguments)]
fn attention_one(
    n: usize,
    batch: usize,
    heads: usize,
    dim: usize,
    chunk: usize,
    causal: bool,
    naive: bool,
    repeats: usize,
) -> Result<Value> {
    let base = mem::current_rss().unwrap_or(0);
    mem::reset_peak();
    let mut rng = Rng::new(0);
    let shape = (batch, heads, n, dim);
    let mut randn = || -> Result<Tensor> {
        let v: Vec<f32> = (0..elements(&[batch, heads, n, dim], "batch × heads × length × dim")?)
            .map(|_| rng.normal() as f32)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    };
    let (q, k, v) = (randn()?, randn()?, randn()?);
    let opts = AttendOpts {
        causal,
        q_offset: 0,
        key_bias: None,
        q_chunk: chunk,
        k_chunk: chunk,
        // A forward-only benchmark: the inference form.
        inference: true,
        ..Default::default()
    };
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        let y = if naive {
            reference_attend(&q, &k, &v, causal, 0, None)?
        } else {
            attend(&q, &k, &v, &opts)?
        };
        assert_eq!(y.dtype(), DType::F32);
        times.push(t.elapsed().as_secs_f64());
        drop(y);
    }
    Ok(serde_json::to_value(AttentionRow {
        kernel: if naive { "naive" } else { "chunked" },
        length: n,
        batch,
        heads,
        dim,
        causal,
        seconds: median(times),
        peak_rss_bytes: mem::peak_rss().unwrap_or(0),
        base_rss_bytes: base,
    })?)
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

fn serve(a: ServeArgs) -> Result<()> {
    use formers_serve::loadgen::{self, Endpoint, LoadOptions};
    let opts = LoadOptions {
        addr: a.addr,
        clients: a.clients,
        requests_per_client: a.requests_per_client,
        endpoint: match a.completions {
            Some(max_tokens) => Endpoint::Completions { max_tokens },
            None => Endpoint::Embeddings,
        },
        sentences: sentences_of(a.sentences.as_deref())?,
        time_limit: std::time::Duration::from_secs(a.time_limit),
    };
    let r = loadgen::run(&opts)?;
    let mib = |b: Option<u64>| {
        b.map_or("-".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    println!(
        "{} clients x {} requests: {} answered in {:.2} s{}",
        a.clients,
        a.requests_per_client,
        r.answered,
        r.seconds,
        if r.timed_out {
            " (time limit reached)"
        } else {
            ""
        }
    );
    println!("| 200/s | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        r.ok_per_s, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
    );
    let statuses: Vec<String> = r
        .by_status
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!(
        "answers by status: {}; no answer (connection errors, timeouts): {}",
        statuses.join(", "),
        r.failed
    );
    println!(
        "/health during the load: {} checks, {} failed, p99 {:.1} ms, max {:.1} ms",
        r.health_checks, r.health_failed, r.health_p99_ms, r.health_max_ms
    );
    println!(
        "server RSS: {} before, {} after, {} peak since start",
        mib(r.server_rss_before),
        mib(r.server_rss_after),
        mib(r.server_peak_rss)
    );
    write_json(a.json.as_deref(), &[serde_json::to_value(&r)?])
}

fn embed(a: EmbedArgs) -> Result<()> {
    if a.batch_sizes.is_empty() || a.batch_sizes.contains(&0) || a.threads == 0 {
        anyhow::bail!("--batch-sizes and --threads must be at least 1");
    }
    let sentences = sentences_of(a.sentences.as_deref())?;
    if sentences.is_empty() {
        anyhow::bail!("no sentences to embed");
    }
    // Loaded once here so a bad checkpoint fails before any child runs.
    crate::embed::load_encoder(&a.model, &Limits::default())?;
    // Both implementations, in every child, read the same list.
    let list = temp_file("sentences.txt", &(sentences.join("\n") + "\n"))?;
    let result = embed_rows(&a, &list);
    let _ = std::fs::remove_file(&list);
    let rows = result?;
    println!("| impl | batch | sentences/s | vs torch |");
    println!("|---|---:|---:|---:|");
    let rate = |impl_: &str, bs: usize| {
        rows.iter()
            .find(|r| r["impl"] == impl_ && r["batch_size"] == bs)
            .and_then(|r| r["sentences_per_s"].as_f64())
    };
    for &bs in &a.batch_sizes {
        let torch = rate("torch", bs);
        for impl_ in ["formers", "torch"] {
            if let Some(v) = rate(impl_, bs) {
                let ratio = torch.map_or("-".to_string(), |t| format!("{:.2}x", v / t));
                println!("| {impl_} | {bs} | {v:.1} | {ratio} |");
            }
        }
    }
    write_json(a.json.as_deref(), &rows)
}

/// The rows of `bench embed`: formers at each batch size, then PyTorch if asked.
fn embed_rows(a: &EmbedArgs, list: &Path) -> Result<Vec<Value>> {
    let jobs: Vec<(String, Job)> = a
        .batch_sizes
        .iter()
        .map(|&batch_size| {
            (
                format!("formers batch {batch_size}"),
                Job::Embed {
                    model: a.model.clone(),
                    sentences: list.to_path_buf(),
                    batch_size,
                    threads: a.threads,
                },
            )
        })
        .collect();
    let mut rows = measure_each("bench embed", &jobs, |r| {
        format!(
            "formers batch {:>4}: {:>8.1} sentences/s",
            r["batch_size"],
            r["sentences_per_s"].as_f64().unwrap_or(0.0)
        )
    })?;
    if let Some(script) = &a.torch {
        let sizes: Vec<String> = a.batch_sizes.iter().map(usize::to_string).collect();
        eprintln!(
            "running {} (PyTorch) on the same sentences...",
            script.display()
        );
        rows.extend(rows_of(
            Command::new("python3")
                .arg(script)
                .arg("--model")
                .arg(&a.model)
                .arg("--sentences")
                .arg(list)
                .arg("--batch-sizes")
                .arg(sizes.join(","))
                .arg("--threads")
                .arg(a.threads.to_string()),
            &format!("python3 {}", script.display()),
        )?);
    }
    Ok(rows)
}

fn embed_one(model: &Path, list: &Path, bs: usize, threads: usize) -> Result<Value> {
    let sentences = lines_of(list)?;
    let p = crate::embed::load_encoder(model, &Limits::default())?;
    let tokens: usize = crate::embed::tokenize_lines(&p, &sentences, true)?
        .iter()
        .map(Vec::len)
        .sum();
    let secs = timed_after_warmup(&sentences, bs, |some| {
        crate::embed::embed_lines(&p, some, bs, true, |_| {}).map(drop)
    })?;
    Ok(serde_json::json!({
        "impl": "formers", "batch_size": bs, "sentences": sentences.len(), "tokens": tokens,
        "threads": threads, "seconds": secs, "sentences_per_s": sentences.len() as f64 / secs,
        "peak_rss": formers_arena::mem::peak_rss(),
    }))
}

/// The lines of the file `list`.
fn lines_of(list: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    Ok(text.lines().map(String::from).collect())
}

/// Seconds `pass` takes over all of `items`, after one warm-up pass over the first batch.
fn timed_after_warmup<T>(items: &[T], bs: usize, pass: impl Fn(&[T]) -> Result<()>) -> Result<f64> {
    pass(&items[..bs.min(items.len())])?;
    let t = Instant::now();
    pass(items)?;
    Ok(t.elapsed().as_secs_f64())
}

fn lm_one(model: &Path, list: &Path, bs: usize, threads: usize) -> Result<Value> {
    let p = formers::pretrained::load_with(model, &Limits::default())?;
    let texts = compress::lm_texts(&p, &lines_of(list)?)?;
    let tokens: usize = texts.iter().map(Vec::len).sum();
    let secs = timed_after_warmup(&texts, bs, |some| {
        for chunk in some.chunks(bs.max(1)) {
            p.model
                .forward_packed(&formers::model::Packed::new(chunk)?)?;
        }
        Ok(())
    })?;
    Ok(serde_json::json!({
        "impl": "formers", "batch_size": bs, "sentences": texts.len(), "tokens": tokens,
        "threads": threads, "seconds": secs, "tokens_per_s": tokens as f64 / secs,
        "peak_rss": formers_arena::mem::peak_rss(),
    }))
}

/// Writes `contents` to `formers-<pid>-<name>` in the temporary directory: what both
/// implementations of a comparison read.
pub(crate) fn temp_file(name: &str, contents: &str) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("formers-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The config of a named mixer in `bench mixers`.
fn mixer_spec(name: &str, a: &MixersArgs) -> Result<String> {
    let c = a.causal;
    Ok(match name {
        "attention" => r#"{"kind": "attention"}"#.to_string(),
        "local" => format!(
            r#"{{"kind": "local", "window": {w}, "chunk": {w}}}"#,
            w = a.window
        ),
        "linear-elu" => r#"{"kind": "linear", "feature": "elu"}"#.to_string(),
        "favor" => format!(
            r#"{{"kind": "linear", "feature": "favor", "features": {}}}"#,
            a.features
        ),
        "linformer" if c => {
            anyhow::bail!("linformer is bidirectional; drop it from --mixers with --causal")
        }
        "linformer" => format!(r#"{{"kind": "linformer", "k": {}}}"#, a.linformer_k),
        "flow" if c => anyhow::bail!("flow is bidirectional; drop it from --mixers with --causal"),
        "flow" => r#"{"kind": "flow"}"#.to_string(),
        "pool" => r#"{"kind": "pool", "window": 3}"#.to_string(),
        other => anyhow::bail!(
            "unknown mixer `{other}`; expected attention, local, linear-elu, favor, linformer, flow, pool"
        ),
    })
}

fn mixers(a: MixersArgs) -> Result<()> {
    if a.lengths.is_empty() || a.lengths.contains(&0) || a.repeats == 0 {
        anyhow::bail!("--lengths must be positive and --repeats at least 1");
    }
    let specs = a
        .mixers
        .iter()
        .map(|m| {
            let spec: Value = serde_json::from_str(&mixer_spec(m, &a)?)?;
            Ok((m.clone(), spec))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut jobs = Vec::new();
    for &length in &a.lengths {
        for (name, spec) in &specs {
            let job = Job::Mixer {
                name: name.clone(),
                spec: spec.clone(),
                length,
                dim: a.dim,
                heads: a.heads,
                repeats: a.repeats,
                causal: a.causal,
            };
            jobs.push((format!("{name} n = {length}"), job));
        }
    }
    let rows = measure_each("bench mixers", &jobs, |r| {
        format!(
            "{:>10} n = {:>6}: {:>9.2} ms fwd+bwd, peak RSS {}",
            r["mixer"].as_str().unwrap_or("?"),
            r["length"],
            r["seconds"].as_f64().unwrap_or(0.0) * 1e3,
            mem::human(r["peak_bytes"].as_u64().unwrap_or(0))
        )
    })?;
    println!(
        "| mixer | length | ms fwd+bwd | time vs attention | peak RSS | memory vs attention |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b["mixer"] == "attention" && b["length"] == r["length"]);
        let ratio = |key: &str| {
            base.and_then(|b| Some(r[key].as_f64()? / b[key].as_f64()?))
                .map_or("-".to_string(), |x| format!("{x:.3}x"))
        };
        println!(
            "| {} | {} | {:.2} | {} | {} | {} |",
            r["mixer"].as_str().unwrap_or("?"),
            r["length"],
            r["seconds"].as_f64().unwrap_or(0.0) * 1e3,
            ratio("seconds"),
            mem::human(r["peak_bytes"].as_u64().unwrap_or(0)),
            ratio("peak_bytes")
        );
    }
    write_json(a.json.as_deref(), &rows)
}

fn mixer_one(
    name: String,
    spec: Value,
    length: usize,
    dim: usize,
    heads: usize,
    repeats: usize,
    causal: bool,
) -> Result<Value> {
    use formers::config::ModelConfig;
    use formers::mixer::MixCtx;
    use formers::mixer::MixerSpec;
    let cfg = ModelConfig::from_json(&format!(
        r#"{{"d_model": {dim}, "n_heads": {heads}, "n_layers": 1, "max_len": {length}, "causal": {causal}, "input": {{"kind": "bytes"}}, "head": {{"kind": "lm"}}}}"#,
    ))?;
    let spec: MixerSpec = serde_json::from_value(spec).context("mixer spec")?;
    let params = formers::params::Params::new(0, DType::F32, &Device::Cpu);
    let m = spec.build(&cfg.mixer_dims(), &params)?;
    let mut rng = Rng::new(1);
    let v: Vec<f32> = (0..elements(&[length, dim], "length × dim")?)
        .map(|_| rng.normal() as f32)
        .collect();
    let x = candle_core::Var::from_vec(v, (1, length, dim), &Device::Cpu)?;
    mem::reset_peak();
    let mut times = Vec::new();
    for i in 0..=repeats {
        let t = Instant::now();
        let y = m.forward(x.as_tensor(), &MixCtx::default(), None)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert!(
            grads.get(x.as_tensor()).is_some(),
            "the input gets a gradient"
        );
        if i > 0 {
            times.push(t.elapsed().as_secs_f64()); // the first run warms up, untimed
        }
    }
    Ok(serde_json::json!({
        "mixer": name, "length": length, "seconds": median(times),
        "peak_bytes": mem::peak_rss().unwrap_or(0),
    }))
}

/// The run measured at each length, and a name for what is trained: `--config` with
/// `train.seq_len` = the length, or the arena's speed run of `--arena-variant`; the batch
/// `--batch` when given.
fn train_runs(a: &TrainArgs) -> Result<(String, Vec<RunConfig>)> {
    let total = a.warmup + a.steps;
    let (name, mut runs) = match (&a.config, &a.arena_variant) {
        (Some(path), _) => {
            let base = RunConfig::from_path(path)?;
            let max = base.model.max_len;
            if let Some(&n) = a.lengths.iter().find(|&&n| n > max) {
                anyhow::bail!(
                    "--lengths: {n} is longer than model.max_len = {max} of {}; give lengths up to \
                     {max} or raise max_len in the config",
                    path.display()
                );
            }
            let runs = a.lengths.iter().map(|&n| {
                let mut run = base.clone();
                run.train.seq_len = n;
                run.train.steps = total;
                run
            });
            (path.display().to_string(), runs.collect::<Vec<_>>())
        }
        (None, Some(name)) => {
            let setting = Setting::parse(&a.suite)
                .with_context(|| format!("--suite: expected lite or full, found `{}`", a.suite))?;
            let suite = SuiteSpec::new(setting);
            let variant = variants::resolve(std::slice::from_ref(name))
                .map_err(anyhow::Error::msg)?
                .remove(0);
            let runs = a
                .lengths
                .iter()
                .map(|&n| exec::speed_run(&variant, &suite, n, total));
            let name = format!("arena {} ({})", variant.name, setting.name());
            (name, runs.collect())
        }
        (None, None) => anyhow::bail!("give --config FILE or --arena-variant NAME"),
    };
    for run in &mut runs {
        if let Some(b) = a.batch {
            run.train.batch_size = b;
        }
        run.validate()?;
        // A head this bench cannot train fails here, before any child runs.
        RandomTokens::for_model(&run.model, run.train.seq_len)?;
    }
    Ok((name, runs))
}

fn train(a: TrainArgs) -> Result<()> {
    if a.lengths.is_empty() || a.lengths.contains(&0) {
        anyhow::bail!("--lengths: give positive lengths, e.g. 256,512,1024");
    }
    if a.steps == 0 || a.threads == 0 || a.batch == Some(0) {
        anyhow::bail!("--steps, --threads and --batch must be at least 1");
    }
    let (name, runs) = train_runs(&a)?;
    let jobs: Vec<(String, Job)> = runs
        .iter()
        .map(|run| {
            (
                format!("formers n = {}", run.train.seq_len),
                Job::Train {
                    model: name.clone(),
                    run: Box::new(run.clone()),
                    warmup: a.warmup,
                    steps: a.steps,
                    threads: a.threads,
                },
            )
        })
        .collect();
    let line = |r: &Value| {
        format!(
            "{:>8} n = {:>6}: {:>8.2} steps/s, peak RSS {}",
            r["impl"].as_str().unwrap_or("?"),
            r["length"],
            r["steps_per_s"].as_f64().unwrap_or(0.0),
            mem::human(r["peak_rss_bytes"].as_u64().unwrap_or(0))
        )
    };
    let mut rows = measure_each("bench train", &jobs, line)?;
    if let Some(script) = &a.torch {
        let mut torch_rows = Vec::new();
        for run in &runs {
            let n = run.train.seq_len;
            let params = rows
                .iter()
                .find(|r| r["length"] == n)
                .and_then(|r| r["params"].as_u64())
                .context("the formers row has no parameter count")?;
            eprintln!("running {} (PyTorch) at n = {n}...", script.display());
            // The resolved run, every key explicit: the script refuses what it does not build.
            let cfg = temp_file(
                &format!("train-{n}.json"),
                &serde_json::to_string_pretty(run)?,
            )?;
            let got = rows_of(
                Command::new("python3")
                    .arg(script)
                    .arg("--config")
                    .arg(&cfg)
                    .args(["--lengths", &n.to_string()])
                    .args(["--batch", &run.train.batch_size.to_string()])
                    .args(["--threads", &a.threads.to_string()])
                    .args(["--warmup", &a.warmup.to_string()])
                    .args(["--steps", &a.steps.to_string()])
                    .args(["--params", &params.to_string()]),
                &format!("python3 {}", script.display()),
            );
            let _ = std::fs::remove_file(&cfg);
            let got = got?;
            if got.is_empty() {
                anyhow::bail!("{}: printed no result", script.display());
            }
            for r in &got {
                eprintln!("{}", line(r));
            }
            torch_rows.extend(got);
        }
        rows.extend(torch_rows);
    }
    println!("{name}, {} threads", a.threads);
    println!("| impl | length | batch | steps/s | vs pytorch | peak RSS | peak - base |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let bytes = |r: &Value, key: &str| r[key].as_u64().unwrap_or(0);
    for run in &runs {
        let n = run.train.seq_len;
        let of = |impl_: &str| rows.iter().find(|r| r["impl"] == impl_ && r["length"] == n);
        let torch = of("pytorch").and_then(|r| r["steps_per_s"].as_f64());
        for r in ["formers", "pytorch"].into_iter().filter_map(of) {
            let rate = r["steps_per_s"].as_f64().unwrap_or(0.0);
            let ratio = torch.map_or("-".to_string(), |t| format!("{:.2}x", rate / t));
            println!(
                "| {} | {n} | {} | {rate:.2} | {ratio} | {} | {} |",
                r["impl"].as_str().unwrap_or("?"),
                r["batch"],
                mem::human(bytes(r, "peak_rss_bytes")),
                mem::human(bytes(r, "peak_rss_bytes").saturating_sub(bytes(r, "base_rss_bytes")))
            );
        }
    }
    write_json(a.json.as_deref(), &rows)
}

/// Times `warmup + steps` optimizer steps of `run` on random tokens in this process.
fn train_one(
    model: String,
    run: RunConfig,
    warmup: usize,
    steps: usize,
    threads: usize,
) -> Result<Value> {
    let (length, batch) = (run.train.seq_len, run.train.batch_size);
    let data = RandomTokens::for_model(&run.model, length)?;
    let mut trainer = Trainer::new(&run, &data)?;
    let base = mem::current_rss().unwrap_or(0);
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t = Instant::now();
        trainer.step()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let seconds = median(times);
    Ok(serde_json::json!({
        "impl": "formers", "model": model, "length": length, "batch": batch,
        "steps_per_s": 1.0 / seconds, "seconds_per_step": seconds,
        "peak_rss_bytes": mem::peak_rss().unwrap_or(0), "base_rss_bytes": base,
        "params": trainer.param_count(), "threads": threads, "warmup": warmup, "steps": steps,
    }))
}
