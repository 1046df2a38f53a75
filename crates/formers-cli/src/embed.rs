//! `formers embed`: sentence embeddings from a BERT-family checkpoint, one line in, one
//! vector out, in padding-free batches.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use formers::embed;
use formers::fsio;
use formers::limits::Limits;
use formers::pretrained::{self, Pretrained};

use crate::limits::LoadArgs;
use crate::progress::bar;

/// Flags of `formers embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Directory with config.json, model.safetensors and tokenizer.json (BERT family;
    /// sentence-transformers pooling files are read when present)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Sentences per padding-free batch
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Write all embeddings to this .npy file (f32, [lines, dim]) instead of JSON lines on stdout
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace the --out file if it exists
    #[arg(long, requires = "out")]
    pub force: bool,
    /// Cut inputs longer than the model's position table instead of failing
    #[arg(long)]
    pub truncate: bool,
    #[command(flatten)]
    pub limits: LoadArgs,
}

/// Token ids of every line, checked (or cut, with `truncate`) against `max_len`.
pub fn tokenize_lines(p: &Pretrained, lines: &[String], truncate: bool) -> Result<Vec<Vec<u32>>> {
    let max_len = p.config.max_len;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut ids = embed::tokenize(&p.tokenizer, line)?;
            if ids.len() > max_len {
                if !truncate {
                    bail!(
                        "input line {}: {} tokens, longer than the model's {max_len} positions (pass --truncate to cut)",
                        i + 1,
                        ids.len()
                    );
                }
                embed::truncate(&mut ids, max_len);
            }
            Ok(ids)
        })
        .collect()
}

/// Embeddings of `lines` in padding-free batches of `batch_size`, row by row; a non-finite
/// row is an error unless `allow_non_finite` (the model was loaded so on purpose).
pub fn embed_lines(
    p: &Pretrained,
    lines: &[String],
    batch_size: usize,
    truncate: bool,
    allow_non_finite: bool,
    mut each: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let mut rows = Vec::with_capacity(lines.len());
    for chunk in lines.chunks(batch_size.max(1)) {
        let ids = tokenize_lines(p, chunk, truncate)?;
        rows.extend(embed::embed_batch_with(&p.model, &ids, allow_non_finite)?);
        each(chunk.len());
    }
    Ok(rows)
}

/// Loads a checkpoint that must be an encoder with an embedding head (BERT family).
pub fn load_encoder(dir: &Path, limits: &Limits) -> Result<Pretrained> {
    let p = pretrained::load_with(dir, limits)?;
    if let Some(w) = p.unused_warning() {
        eprintln!("{w}");
    }
    if !embed::has_embedding_head(&p.config) {
        bail!(
            "{}: a {} model without an embedding head; embeddings need an encoder with one (a BERT-family encoder)",
            dir.display(),
            p.family.name()
        );
    }
    Ok(p)
}

/// Runs `formers embed`.
pub fn run(a: EmbedArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if let Some(path) = &a.out {
        fsio::refuse_existing(path, a.force)?;
    }
    let p = load_encoder(&a.model, &a.limits.limits())?;
    let lines: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .collect::<std::io::Result<_>>()
        .context("reading standard input")?;
    // Check every line before any work, so a bad line fails fast.
    tokenize_lines(&p, &lines, a.truncate)?;
    let pb = bar(lines.len() as u64, "embed");
    let start = Instant::now();
    let rows = embed_lines(
        &p,
        &lines,
        a.batch_size,
        a.truncate,
        a.limits.allow_non_finite,
        |n| pb.inc(n as u64),
    )?;
    let secs = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    match &a.out {
        Some(path) => write_npy(path, &rows, p.config.d_model, a.force)?,
        None => {
            let mut out = std::io::stdout().lock();
            for r in &rows {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        }
    }
    eprintln!(
        "{} sentences in {:.2} s: {:.1} sentences/s (batch {}, padding-free)",
        rows.len(),
        secs,
        rows.len() as f64 / secs.max(1e-9),
        a.batch_size
    );
    Ok(())
}

/// Writes `[rows, dim]` f32 as a NumPy `.npy` (format 1.0), atomically, never through a
/// symbolic link; an existing file is replaced only with `force`.
fn write_npy(path: &Path, rows: &[Vec<f32>], dim: usize, force: bool) -> Result<()> {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}",
        rows.len()
    );
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for r in rows {
        for v in r {
            bytes.extend(v.to_le_bytes());
        }
    }
    Ok(fsio::write_atomic(path, &bytes, force)?)
}
