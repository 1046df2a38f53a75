//! `formers bench train`: steps/s and peak memory of one training step at several lengths,
//! optionally against PyTorch.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use formers::tasks::RandomTokens;
use formers::train::RunConfig;
use formers::train::Trainer;
use formers_arena::suite::SuiteSpec;
use formers_arena::{exec, mem, variants, Setting};
use serde_json::Value;

use super::{measure_each, median, rows_of, temp_file, write_json, Job};

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

/// Runs `bench train`: each length in its own process (and PyTorch if asked), then the
/// table.
pub(super) fn run(a: TrainArgs) -> Result<()> {
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
pub(super) fn one(
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
