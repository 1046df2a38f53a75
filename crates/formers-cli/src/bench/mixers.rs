//! `formers bench mixers`: forward+backward of each token mixer at several lengths.
//!
//! The mixers are the library's named presets ([`MixerSpec::presets`]); the flags here only
//! size them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use formers::config::ModelConfig;
use formers::mixer::linear_attention::FeatureMap;
use formers::mixer::{MixCtx, MixerSpec};
use formers::rng::Rng;
use formers_arena::mem;
use serde_json::Value;

use super::{elements, measure_each, median, write_json, Job};

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
    // The help lists the library's presets, so it is made at run time.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = preset_names(),
        hide_default_value = true,
        help = mixers_help()
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

/// The names of the library's mixer presets, in its order.
fn preset_names() -> Vec<String> {
    MixerSpec::presets()
        .into_iter()
        .map(|(name, _)| name.to_string())
        .collect()
}

/// The help of `--mixers`: the presets, which of them are bidirectional, and the default.
fn mixers_help() -> String {
    let bidirectional: Vec<&str> = MixerSpec::presets()
        .into_iter()
        .filter(|(_, spec)| !spec.kind().capabilities().causal)
        .map(|(name, _)| name)
        .collect();
    format!(
        "Mixers, comma-separated: {} (bidirectional, so not with --causal: {}) [default: {}]",
        preset_names().join(", "),
        bidirectional.join(", "),
        preset_names().join(",")
    )
}

/// The mixers `--mixers` names, sized by the flags; an unknown name, or a bidirectional
/// mixer with `--causal`, is refused.
fn specs(a: &MixersArgs) -> Result<Vec<(String, MixerSpec)>> {
    let presets = MixerSpec::presets();
    a.mixers
        .iter()
        .map(|name| {
            let Some((_, spec)) = presets.iter().find(|(n, _)| n == name) else {
                anyhow::bail!(
                    "unknown mixer `{name}`; expected {}",
                    preset_names().join(", ")
                );
            };
            if a.causal && !spec.kind().capabilities().causal {
                anyhow::bail!("{name} is bidirectional; drop it from --mixers with --causal");
            }
            Ok((name.clone(), sized(spec.clone(), a)))
        })
        .collect()
}

/// `spec` with the sizes `--window`, `--features` and `--linformer-k` set.
fn sized(mut spec: MixerSpec, a: &MixersArgs) -> MixerSpec {
    match &mut spec {
        MixerSpec::Local(s) => {
            s.window = a.window;
            s.chunk = a.window;
        }
        MixerSpec::Linear(s) if s.feature == FeatureMap::Favor => s.features = a.features,
        MixerSpec::Linformer(s) => s.k = a.linformer_k,
        _ => {}
    }
    spec
}

/// Runs `bench mixers`: each (length, mixer) in its own process, then the table.
pub(super) fn run(a: MixersArgs) -> Result<()> {
    if a.lengths.is_empty() || a.lengths.contains(&0) || a.repeats == 0 {
        anyhow::bail!("--lengths must be positive and --repeats at least 1");
    }
    let specs = specs(&a)?;
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

/// Times `repeats` forward+backward passes of the mixer `spec` at `length` in this process.
pub(super) fn one(
    name: String,
    spec: MixerSpec,
    length: usize,
    dim: usize,
    heads: usize,
    repeats: usize,
    causal: bool,
) -> Result<Value> {
    let cfg = ModelConfig::from_json(&format!(
        r#"{{"d_model": {dim}, "n_heads": {heads}, "n_layers": 1, "max_len": {length}, "causal": {causal}, "input": {{"kind": "bytes"}}, "head": {{"kind": "lm"}}}}"#,
    ))?;
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
