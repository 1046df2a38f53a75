//! `formers bench ...`: speed and memory figures users can quote.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use formers::mixer::softmax::{attend, reference_attend, AttendOpts};
use formers::rng::Rng;
use formers_arena::mem;
use serde::Serialize;

use crate::progress::bar;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time and peak memory of one attention forward at several sequence lengths.
    Attention(AttentionArgs),
    /// Sentence-embedding throughput of a BERT-family checkpoint (optionally against PyTorch).
    Embed(EmbedArgs),
    /// Forward+backward time and peak memory of each token mixer, relative to exact attention.
    Mixers(MixersArgs),
    /// One mixer at one length (run by `bench mixers` in a child process, for a clean peak RSS).
    #[command(hide = true)]
    MixerOne(MixerOneArgs),
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

/// Flags of the hidden `formers bench mixer-one`.
#[derive(Debug, Args)]
pub struct MixerOneArgs {
    #[arg(long)]
    pub spec: String,
    #[arg(long)]
    pub length: usize,
    #[arg(long)]
    pub dim: usize,
    #[arg(long)]
    pub heads: usize,
    #[arg(long)]
    pub repeats: usize,
    /// A causal model.
    #[arg(long)]
    pub causal: bool,
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

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Attention(a) => attention(a),
        BenchCommand::Embed(a) => embed(a),
        BenchCommand::Mixers(a) => mixers(a),
        BenchCommand::MixerOne(a) => mixer_one(a),
    }
}

fn attention(a: AttentionArgs) -> Result<()> {
    if a.lengths.is_empty() || a.lengths.contains(&0) {
        anyhow::bail!("--lengths: give positive lengths, e.g. 1024,2048");
    }
    if a.repeats == 0 || a.dim == 0 || a.heads == 0 || a.batch == 0 || a.chunk == 0 {
        anyhow::bail!("--repeats, --dim, --heads, --batch and --chunk must be at least 1");
    }
    let kernel = if a.naive { "naive" } else { "chunked" };
    let pb = bar(a.lengths.len() as u64, "bench attention");
    let mut rows = Vec::new();
    let mut rng = Rng::new(0);
    for &n in &a.lengths {
        pb.set_message(format!("n = {n}"));
        let base = mem::current_rss().unwrap_or(0);
        mem::reset_peak();
        let shape = (a.batch, a.heads, n, a.dim);
        let mut randn = || -> Result<Tensor> {
            let v: Vec<f32> = (0..a.batch * a.heads * n * a.dim)
                .map(|_| rng.normal() as f32)
                .collect();
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        };
        let (q, k, v) = (randn()?, randn()?, randn()?);
        let opts = AttendOpts {
            causal: a.causal,
            q_offset: 0,
            key_bias: None,
            q_chunk: a.chunk,
            k_chunk: a.chunk,
            // A forward-only benchmark: the inference form.
            inference: true,
            ..Default::default()
        };
        let mut times = Vec::with_capacity(a.repeats);
        for _ in 0..a.repeats {
            let t = Instant::now();
            let y = if a.naive {
                reference_attend(&q, &k, &v, a.causal, 0, None)?
            } else {
                attend(&q, &k, &v, &opts)?
            };
            assert_eq!(y.dtype(), DType::F32);
            times.push(t.elapsed().as_secs_f64());
            drop(y);
        }
        times.sort_by(f64::total_cmp);
        let row = AttentionRow {
            kernel,
            length: n,
            batch: a.batch,
            heads: a.heads,
            dim: a.dim,
            causal: a.causal,
            seconds: times[times.len() / 2],
            peak_rss_bytes: mem::peak_rss().unwrap_or(0),
            base_rss_bytes: base,
        };
        pb.println(format!(
            "{kernel:>8} n = {n:>6}: {:>9.2} ms per forward, peak RSS {}",
            row.seconds * 1e3,
            mem::human(row.peak_rss_bytes)
        ));
        rows.push(row);
        pb.inc(1);
    }
    pb.finish_and_clear();
    println!("| kernel | length | ms / forward | peak RSS |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {} |",
            r.kernel,
            r.length,
            r.seconds * 1e3,
            mem::human(r.peak_rss_bytes)
        );
    }
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&rows)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn embed(a: EmbedArgs) -> Result<()> {
    if a.batch_sizes.is_empty() || a.batch_sizes.contains(&0) || a.threads == 0 {
        anyhow::bail!("--batch-sizes and --threads must be at least 1");
    }
    // candle sizes its thread pool from this variable on first use.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let text = match &a.sentences {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => SENTENCES.to_string(),
    };
    let sentences: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if sentences.is_empty() {
        anyhow::bail!("no sentences to embed");
    }
    let p = crate::embed::load_encoder(&a.model)?;
    let tokens: usize = crate::embed::tokenize_lines(&p, &sentences, true)?
        .iter()
        .map(Vec::len)
        .sum();
    let mut rows = Vec::new();
    for &bs in &a.batch_sizes {
        crate::embed::embed_lines(&p, &sentences[..bs.min(sentences.len())], bs, true, |_| {})?; // warm-up
        let pb = bar(sentences.len() as u64, &format!("formers batch {bs}"));
        let t = Instant::now();
        crate::embed::embed_lines(&p, &sentences, bs, true, |n| pb.inc(n as u64))?;
        let secs = t.elapsed().as_secs_f64();
        pb.finish_and_clear();
        rows.push(serde_json::json!({
            "impl": "formers", "batch_size": bs, "sentences": sentences.len(), "tokens": tokens,
            "threads": a.threads, "seconds": secs, "sentences_per_s": sentences.len() as f64 / secs,
        }));
    }
    if let Some(script) = &a.torch {
        let list = tempfile_with(&sentences)?;
        let sizes: Vec<String> = a.batch_sizes.iter().map(usize::to_string).collect();
        eprintln!(
            "running {} (PyTorch) on the same sentences...",
            script.display()
        );
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg("--model")
            .arg(&a.model)
            .arg("--sentences")
            .arg(&list)
            .arg("--batch-sizes")
            .arg(sizes.join(","))
            .arg("--threads")
            .arg(a.threads.to_string())
            .output()
            .with_context(|| format!("running python3 {}", script.display()))?;
        let _ = std::fs::remove_file(&list);
        if !out.status.success() {
            anyhow::bail!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                rows.push(v);
            }
        }
    }
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
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes the sentences to a temporary file, so both implementations read the same list.
fn tempfile_with(sentences: &[String]) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("formers-sentences-{}.txt", std::process::id()));
    std::fs::write(&path, sentences.join("\n") + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
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
        .map(|m| Ok((m.clone(), mixer_spec(m, &a)?)))
        .collect::<Result<Vec<_>>>()?;
    let exe = std::env::current_exe().context("locating the formers binary")?;
    let pb = bar((specs.len() * a.lengths.len()) as u64, "bench mixers");
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for &n in &a.lengths {
        for (name, spec) in &specs {
            pb.set_message(format!("{name} n = {n}"));
            let out = std::process::Command::new(&exe)
                .args([
                    "bench",
                    "mixer-one",
                    "--spec",
                    spec,
                    "--length",
                    &n.to_string(),
                ])
                .args([
                    "--dim",
                    &a.dim.to_string(),
                    "--heads",
                    &a.heads.to_string(),
                    "--repeats",
                    &a.repeats.to_string(),
                ])
                .args(a.causal.then_some("--causal"))
                .output()
                .context("running a benchmark child process")?;
            if !out.status.success() {
                anyhow::bail!(
                    "{name} at {n}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let mut v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("reading a child's result")?;
            v["mixer"] = name.clone().into();
            pb.println(format!(
                "{name:>10} n = {n:>6}: {:>9.2} ms fwd+bwd, peak RSS {}",
                v["seconds"].as_f64().unwrap_or(0.0) * 1e3,
                mem::human(v["peak_bytes"].as_u64().unwrap_or(0))
            ));
            rows.push(v);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
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
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn mixer_one(a: MixerOneArgs) -> Result<()> {
    use formers::config::{MixerSpec, ModelConfig};
    use formers::mixer::MixCtx;
    let cfg = ModelConfig::from_json(&format!(
        r#"{{"d_model": {}, "n_heads": {}, "n_layers": 1, "max_len": {}, "causal": {}, "input": {{"kind": "bytes"}}, "head": {{"kind": "lm"}}}}"#,
        a.dim, a.heads, a.length, a.causal
    ))?;
    let spec: MixerSpec = serde_json::from_str(&a.spec).context("--spec")?;
    let params = formers::params::Params::new(0, DType::F32, &Device::Cpu);
    let m = spec.build(&cfg.mixer_dims(), &params)?;
    let mut rng = Rng::new(1);
    let v: Vec<f32> = (0..a.length * a.dim).map(|_| rng.normal() as f32).collect();
    let x = candle_core::Var::from_vec(v, (1, a.length, a.dim), &Device::Cpu)?;
    mem::reset_peak();
    let mut times = Vec::new();
    for i in 0..=a.repeats {
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
    times.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "length": a.length, "seconds": times[times.len() / 2], "peak_bytes": mem::peak_rss().unwrap_or(0),
    });
    println!("{out}");
    Ok(())
}
