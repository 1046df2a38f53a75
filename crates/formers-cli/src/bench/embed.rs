//! `formers bench embed`, and the sentence-throughput measurements it shares with
//! `bench compress`: an encoder embedding a sentence file, an LM's prompt pass over it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use formers::limits::Limits;
use serde_json::Value;

use super::{measure_each, rows_of, sentences_of, temp_file, write_json, Job};

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

/// Runs `bench embed`: each batch size in its own process (and PyTorch if asked), then the
/// table.
pub(super) fn run(a: EmbedArgs) -> Result<()> {
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

/// Embeds every sentence of `list`, `bs` at a time, in this process: its row.
pub(super) fn embed_one(model: &Path, list: &Path, bs: usize, threads: usize) -> Result<Value> {
    let sentences = lines_of(list)?;
    let p = crate::embed::load_encoder(model, &Limits::default())?;
    let tokens: usize = crate::embed::tokenize_lines(&p, &sentences, true)?
        .iter()
        .map(Vec::len)
        .sum();
    let secs = timed_after_warmup(&sentences, bs, |some| {
        crate::embed::embed_lines(&p, some, bs, true, false, |_| {}).map(drop)
    })?;
    Ok(serde_json::json!({
        "impl": "formers", "batch_size": bs, "sentences": sentences.len(), "tokens": tokens,
        "threads": threads, "seconds": secs, "sentences_per_s": sentences.len() as f64 / secs,
        "peak_rss": formers_arena::mem::peak_rss(), "isa": formers::kernels::int8::isa(),
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

/// The prompt pass of the LM `model` over every sentence of `list`, `bs` packed at a time,
/// in this process: its row.
pub(super) fn lm_one(model: &Path, list: &Path, bs: usize, threads: usize) -> Result<Value> {
    let p = formers::pretrained::load_with(model, &Limits::default())?;
    let texts = super::compress::lm_texts(&p, &lines_of(list)?)?;
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
        "peak_rss": formers_arena::mem::peak_rss(), "isa": formers::kernels::int8::isa(),
    }))
}
