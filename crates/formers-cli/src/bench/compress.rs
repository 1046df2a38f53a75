//! `formers bench compress`: each compression method applied to one encoder, measured
//! against the fp32 original in quality (embedding cosine), speed, bytes and memory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use formers::compress::heal::Heal;
use formers::compress::lowrank::{self, Layers};
use formers::compress::quantize::{self, Scheme};
use formers::compress::svd::Rank;
use formers::fsio::human_bytes;
use formers::limits::Limits;
use formers::pretrained::{native, Pretrained};
use serde_json::{json, Value};

use super::{measure_each, sentences_of, temp_file, write_json, Job};

/// Flags of `formers bench compress`.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// The fp32 model: a BERT-family checkpoint (config.json, model.safetensors, tokenizer.json)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// One sentence per line [default: the shipped data/sentences.txt, KJV verses]
    #[arg(long, value_name = "FILE")]
    pub sentences: Option<PathBuf>,
    /// Sentences used, from the start of the file
    #[arg(long, default_value_t = 512)]
    pub limit: usize,
    /// Batch sizes to measure speed at, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch_sizes: Vec<usize>,
    /// Compute threads (RAYON_NUM_THREADS of every measurement)
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Keep the compressed models here (a new or empty directory) [default: a temporary
    /// directory, removed afterwards]
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Healing steps of the healed low-rank row (distillation on the shipped Shakespeare,
    /// as `formers compress lowrank --heal-steps`); 0 leaves the row out
    #[arg(long, default_value_t = 300)]
    pub heal_steps: usize,
    /// Also write the rows as a JSON array to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Lines of text the calibrated low-rank rows are weighted by (`compress lowrank`'s
/// default `--calibrate`).
const CALIBRATION: usize = 1024;

/// One compressed form of the model: its name, setting and directory.
struct Method {
    method: &'static str,
    setting: String,
    dir: PathBuf,
}

/// Runs `formers bench compress`.
pub fn run(a: CompressArgs) -> Result<()> {
    if a.batch_sizes.is_empty() || a.batch_sizes.contains(&0) || a.threads == 0 || a.limit == 0 {
        anyhow::bail!("--batch-sizes, --threads and --limit must be at least 1");
    }
    let mut sentences = sentences_of(a.sentences.as_deref())?;
    sentences.truncate(a.limit);
    if sentences.is_empty() {
        anyhow::bail!("no sentences to embed");
    }
    let original = crate::embed::load_encoder(&a.model, &Limits::default())?;
    let (work, temporary) = match &a.work {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("formers-{}-compress", std::process::id())),
            true,
        ),
    };
    let result = measure_all(&a, &original, &sentences, &work);
    if temporary {
        let _ = std::fs::remove_dir_all(&work);
    }
    let rows = result?;
    print_table(&rows, &a.batch_sizes);
    write_json(a.json.as_deref(), &rows)
}

/// Compresses `original` by every method into `work`, then measures each.
fn measure_all(
    a: &CompressArgs,
    original: &Pretrained,
    sentences: &[String],
    work: &Path,
) -> Result<Vec<Value>> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let mut methods = vec![Method {
        method: "fp32",
        setting: "-".into(),
        dir: a.model.clone(),
    }];
    let dir = work.join("int8");
    let (manifest, tensors) = quantize::quantize(original, Scheme::Int8)?;
    native::write(&dir, &manifest, &tensors, &a.model.join("tokenizer.json"))?;
    methods.push(Method {
        method: "quantize",
        setting: Scheme::Int8.name().into(),
        dir,
    });
    // Low-rank MLPs at half their parameters: r(d + h) = d·h / 2.
    let (d, h) = (
        original.config.d_model,
        original.config.layer(0).ffn.hidden(original.config.d_model),
    );
    let half = (d * h / (2 * (d + h))).max(1);
    let texts = crate::compress::heal_texts(original, None)?;
    let calibration = crate::compress::spread(&texts, CALIBRATION);
    let plain = (None, "plain SVD".to_string());
    let calibrated = (
        Some(calibration.as_slice()),
        format!("calibrated on {} lines of Shakespeare", calibration.len()),
    );
    for (name, (cal, how)) in [
        ("lowrank", plain),
        ("lowrank-calibrated", calibrated.clone()),
    ] {
        let pb = crate::progress::spinner(&format!("factorising ({how})"));
        let result = lowrank::lowrank_with(original, Rank::Fixed(half), Layers::Ffn, cal, None);
        pb.finish_and_clear();
        let (manifest, tensors, _) = result?;
        let dir = work.join(name);
        native::write(&dir, &manifest, &tensors, &a.model.join("tokenizer.json"))?;
        methods.push(Method {
            method: "lowrank",
            setting: format!("ffn rank {half} (half the MLP parameters), {how}"),
            dir,
        });
    }
    if a.heal_steps > 0 {
        let heal = Heal {
            steps: a.heal_steps,
            ..Heal::default()
        };
        let pb = crate::progress::bar(heal.steps as u64, "healing");
        let mut each = |step: usize, loss: f32| {
            pb.set_position(step as u64);
            pb.set_message(format!("loss {loss:.5}"));
        };
        let healing = (
            &heal,
            texts.as_slice(),
            &mut each as &mut dyn FnMut(usize, f32),
        );
        let (cal, how) = calibrated;
        let result =
            lowrank::lowrank_with(original, Rank::Fixed(half), Layers::Ffn, cal, Some(healing));
        pb.finish_and_clear();
        let (manifest, tensors, _) = result?;
        let dir = work.join("lowrank-healed");
        native::write(&dir, &manifest, &tensors, &a.model.join("tokenizer.json"))?;
        methods.push(Method {
            method: "lowrank + heal",
            setting: format!(
                "ffn rank {half}, {how}, then {} distillation steps on Shakespeare (lr {:.0e}, {} lines a step)",
                heal.steps, heal.lr, heal.batch
            ),
            dir,
        });
    }
    let want = crate::embed::embed_lines(original, sentences, 32, true, |_| {})?;
    let list = temp_file("compress-sentences.txt", &(sentences.join("\n") + "\n"))?;
    let mut rows = Vec::new();
    for m in &methods {
        let p = crate::embed::load_encoder(&m.dir, &Limits::default())?;
        let got = crate::embed::embed_lines(&p, sentences, 32, true, |_| {})?;
        let cos: Vec<f64> = got.iter().zip(&want).map(|(g, w)| cosine(g, w)).collect();
        let jobs: Vec<(String, Job)> = a
            .batch_sizes
            .iter()
            .map(|&batch_size| {
                (
                    format!("{} {} batch {batch_size}", m.method, m.setting),
                    Job::Embed {
                        model: m.dir.clone(),
                        sentences: list.clone(),
                        batch_size,
                        threads: a.threads,
                    },
                )
            })
            .collect();
        let speed = measure_each("bench compress", &jobs, |r| {
            format!(
                "{} {}: batch {:>3}: {:>8.1} sentences/s",
                m.method,
                m.setting,
                r["batch_size"],
                r["sentences_per_s"].as_f64().unwrap_or(0.0)
            )
        });
        let speed = speed?;
        let bytes = std::fs::metadata(m.dir.join("model.safetensors"))?.len();
        rows.push(json!({
            "method": m.method,
            "setting": m.setting,
            "parameters": formers::limits::param_count(&p.config) as u64,
            "bytes": bytes,
            "cosine_min": cos.iter().copied().fold(f64::INFINITY, f64::min),
            "cosine_mean": cos.iter().sum::<f64>() / cos.len() as f64,
            "sentences": sentences.len(),
            "speed": speed,
        }));
    }
    let _ = std::fs::remove_file(&list);
    Ok(rows)
}

/// The cosine of two vectors (1 when both are zero).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        dot / (na * nb).max(f64::MIN_POSITIVE)
    }
}

/// The rows as a Markdown table, speeds and sizes relative to the first (fp32) row.
fn print_table(rows: &[Value], batch_sizes: &[usize]) {
    let rate = |r: &Value, bs: usize| {
        r["speed"].as_array().and_then(|s| {
            s.iter()
                .find(|x| x["batch_size"] == bs)
                .and_then(|x| x["sentences_per_s"].as_f64())
        })
    };
    let peak = |r: &Value| {
        r["speed"]
            .as_array()
            .and_then(|s| s.iter().filter_map(|x| x["peak_rss"].as_u64()).max())
    };
    let mut head = "| method | setting | parameters | bytes | peak RSS |".to_string();
    let mut rule = "|---|---|---:|---:|---:|".to_string();
    for bs in batch_sizes {
        head += &format!(" batch {bs} sent/s |");
        rule += "---:|";
    }
    println!("{head} cosine min | cosine mean |");
    println!("{rule}---:|---:|");
    let base = &rows[0];
    for r in rows {
        let bytes = r["bytes"].as_u64().unwrap_or(0);
        let base_bytes = base["bytes"].as_u64().unwrap_or(1).max(1);
        let mut line = format!(
            "| {} | {} | {} | {} ({:.0}%) | {} |",
            r["method"].as_str().unwrap_or("?"),
            r["setting"].as_str().unwrap_or("?"),
            r["parameters"],
            human_bytes(bytes),
            100.0 * bytes as f64 / base_bytes as f64,
            peak(r).map_or("-".into(), human_bytes),
        );
        for &bs in batch_sizes {
            line += &match (rate(r, bs), rate(base, bs)) {
                (Some(v), Some(b)) => format!(" {v:.1} ({:.2}x) |", v / b),
                _ => " - |".into(),
            };
        }
        println!(
            "{line} {:.4} | {:.4} |",
            r["cosine_min"].as_f64().unwrap_or(f64::NAN),
            r["cosine_mean"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
