//! `formers bench attention`: one attention forward at several sequence lengths.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use formers::mixer::softmax::{attend, reference_attend, AttendOpts};
use formers::rng::Rng;
use formers_arena::mem;
use serde::Serialize;
use serde_json::Value;

use super::{elements, measure_each, median, write_json, Job};

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

/// One row of `bench attention` (its JSON fields).
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

/// Runs `bench attention`: each length in its own process, then the table.
pub(super) fn run(a: AttentionArgs) -> Result<()> {
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

/// Times `repeats` attention forwards at length `n` in this process.
#[allow(clippy::too_many_arguments)]
pub(super) fn one(
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
