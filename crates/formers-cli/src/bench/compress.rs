//! `formers bench compress`: each compression method applied to one checkpoint, measured
//! against the fp32 original in quality (an encoder: embedding cosine; a causal LM:
//! perplexity and the largest logit difference), speed, bytes and memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use formers::compress::heal::{self, Heal};
use formers::compress::lowrank::{self, Layers};
use formers::compress::norm::{self, Target};
use formers::compress::quantize::{self, Scheme};
use formers::compress::svd::Rank;
use formers::limits::Limits;
use formers::model::Packed;
use formers::pretrained::{self, native, Pretrained};
use formers_arena::report::{scatter, Bubble};
use serde_json::{json, Value};

use super::{measure_each, sentences_of, temp_file, write_json, Job};

/// Flags of `formers bench compress`.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// The fp32 model: a BERT-family encoder or a GPT-2-family LM (config.json,
    /// model.safetensors, tokenizer.json)
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
    /// The methods to measure beside fp32, comma-separated: int8 (per row), q8_0 and q4_0
    /// (8 and 4 bits per value, a scale per 32), norm (the Pre-RMSNorm and Pre-CRMSNorm
    /// conversions; Pre-LN LMs only), lowrank (plain and calibrated SVD of the MLPs at half
    /// their parameters), heal (calibrated, then distilled)
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "int8,q8_0,q4_0,norm,lowrank,heal"
    )]
    pub methods: Vec<MethodArg>,
    /// Healing steps of the healed low-rank row (distillation on the shipped Shakespeare,
    /// as `formers compress lowrank --heal-steps`); 0 leaves the row out
    #[arg(long, default_value_t = 300)]
    pub heal_steps: usize,
    /// Also write the rows as a JSON array to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also draw quality against speed (at the largest batch size, relative to fp32;
    /// marker area ∝ peak RSS) as an SVG chart to this file
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
}

/// Lines of text the calibrated low-rank rows are weighted by (`compress lowrank`'s
/// default `--calibrate`).
const CALIBRATION: usize = 1024;

/// Methods of `formers bench compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    Int8,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    Norm,
    Lowrank,
    Heal,
}

/// One compressed form of the model: its name, setting and directory.
struct Method {
    /// A short name for the chart.
    label: String,
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
    let original = pretrained::load_with(&a.model, &Limits::default())
        .with_context(|| format!("loading {}", a.model.display()))?;
    let lm = formers::lm::is_causal_lm(&original.config);
    let (work, temporary) = match &a.work {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("formers-{}-compress", std::process::id())),
            true,
        ),
    };
    let result = compress_all(&a, &original, &work).and_then(|methods| {
        if lm {
            measure_lms(&a, &original, &methods, &sentences)
        } else {
            measure_encoders(&a, &original, &methods, &sentences)
        }
    });
    if temporary {
        let _ = std::fs::remove_dir_all(&work);
    }
    let rows = result?;
    print_table(&rows, &a.batch_sizes, lm);
    if let Some(path) = &a.chart {
        let svg = chart(&rows, &a.batch_sizes, lm, &a.model)
            .context("nothing finite to draw in the chart")?;
        formers::fsio::write_atomic(path, svg.as_bytes(), true)?;
        eprintln!("wrote {}", path.display());
    }
    write_json(a.json.as_deref(), &rows)
}

/// The speed key of a measurement: sentences/s embedded, or tokens/s of an LM.
fn unit(lm: bool) -> &'static str {
    match lm {
        true => "tokens_per_s",
        false => "sentences_per_s",
    }
}

/// The speed of row `r` at batch size `bs`.
fn rate(r: &Value, bs: usize, lm: bool) -> Option<f64> {
    r["speed"].as_array().and_then(|s| {
        s.iter()
            .find(|x| x["batch_size"] == bs)
            .and_then(|x| x[unit(lm)].as_f64())
    })
}

/// `n` bytes in MiB, one decimal.
fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
}

/// The largest peak RSS of row `r`'s measurements.
fn peak(r: &Value) -> Option<u64> {
    r["speed"]
        .as_array()
        .and_then(|s| s.iter().filter_map(|x| x["peak_rss"].as_u64()).max())
}

/// Quality (mean cosine, or fp32's perplexity over the row's) against speed relative to
/// fp32 at the largest batch size, one labelled marker per row, as SVG.
fn chart(rows: &[Value], batch_sizes: &[usize], lm: bool, model: &Path) -> Option<String> {
    let bs = *batch_sizes.iter().max()?;
    let base = rate(&rows[0], bs, lm)?;
    let base_ppl = rows[0]["perplexity"].as_f64();
    let labels: Vec<String> = rows
        .iter()
        .map(|r| r["label"].as_str().unwrap_or("?").to_string())
        .collect();
    let pts: Vec<Bubble> = rows
        .iter()
        .zip(&labels)
        .filter_map(|(r, label)| {
            let y = match lm {
                true => base_ppl? / r["perplexity"].as_f64()?,
                false => r["cosine_mean"].as_f64()?,
            };
            Some(Bubble {
                variant: label.clone(),
                label: label.clone(),
                x: rate(r, bs, lm)? / base,
                y,
                mem: peak(r).unwrap_or(0) as f64,
            })
        })
        .collect();
    let name = model.file_name().map_or_else(
        || model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let title = format!("{name}: quality vs speed of each compression (marker area ∝ peak RSS)");
    let x = format!("speed at batch {bs}, relative to fp32 (×)");
    let y = match lm {
        true => "fp32 perplexity / perplexity",
        false => "mean cosine to the fp32 embeddings",
    };
    scatter(&title, (&x, y), &pts, &labels)
}

/// `original` (first) and its compressed forms, each written into `work`: int8, the exact
/// norm conversions (a Pre-LN LM), low-rank MLPs (plain, calibrated, healed).
fn compress_all(a: &CompressArgs, original: &Pretrained, work: &Path) -> Result<Vec<Method>> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let mut methods = vec![Method {
        label: "fp32".into(),
        method: "fp32",
        setting: "-".into(),
        dir: a.model.clone(),
    }];
    // Writes one compressed model into `work/label` and lists it.
    let mut keep = |label: &str, method, setting, (manifest, tensors): Compressed| {
        let dir = work.join(label);
        native::write(&dir, &manifest, &tensors, &a.model.join("tokenizer.json"))?;
        methods.push(Method {
            label: label.into(),
            method,
            setting,
            dir,
        });
        anyhow::Ok(())
    };
    let wants = |m: MethodArg| a.methods.contains(&m);
    if norm::converts(&original.config) && wants(MethodArg::Norm) {
        for target in [Target::RmsNorm, Target::CrmsNorm] {
            let setting = format!("Pre-LN → Pre-{}", target.name());
            keep(
                target.name(),
                "norm",
                setting,
                norm::convert_pretrained(original, target)?,
            )?;
        }
    }
    for (method, scheme) in [
        (MethodArg::Int8, Scheme::Int8),
        (MethodArg::Q8_0, Scheme::Q8_0),
        (MethodArg::Q4_0, Scheme::Q4_0),
    ] {
        if wants(method) {
            let name = scheme.name();
            keep(
                name,
                "quantize",
                name.into(),
                quantize::quantize(original, scheme)?,
            )?;
        }
    }
    let heal = Heal {
        steps: a.heal_steps,
        ..Heal::default()
    };
    let healed = heal.steps > 0 && wants(MethodArg::Heal);
    if !wants(MethodArg::Lowrank) && !healed {
        return Ok(methods);
    }
    // Low-rank MLPs at half their parameters: r(d + h) = d·h / 2.
    let (d, h) = (
        original.config.d_model,
        original.config.layer(0).ffn.hidden(original.config.d_model),
    );
    let half = (d * h / (2 * (d + h))).max(1);
    let lines = crate::compress::heal_texts(original, None, 1)?;
    let calibration = crate::compress::spread(&lines, CALIBRATION);
    let calibrated = format!("calibrated on {} lines of Shakespeare", calibration.len());
    let factorise = |cal, healing| {
        lowrank::lowrank_with(original, Rank::Fixed(half), Layers::Ffn, cal, healing)
            .map(|(manifest, tensors, _)| (manifest, tensors))
    };
    if wants(MethodArg::Lowrank) {
        for (label, cal, how) in [
            ("lowrank", None, "plain SVD"),
            (
                "lowrank-calibrated",
                Some(calibration.as_slice()),
                &calibrated,
            ),
        ] {
            let pb = crate::progress::spinner(&format!("factorising ({how})"));
            let result = factorise(cal, None);
            pb.finish_and_clear();
            let setting = format!("ffn rank {half} (half the MLP parameters), {how}");
            keep(label, "lowrank", setting, result?)?;
        }
    }
    if healed {
        let pb = crate::progress::bar(heal.steps as u64, "healing");
        let mut each = |step: usize, loss: f32| {
            pb.set_position(step as u64);
            pb.set_message(format!("loss {loss:.5}"));
        };
        let texts = crate::compress::heal_texts(original, None, heal::PASSAGE_WORDS)?;
        let healing = (
            &heal,
            texts.as_slice(),
            &mut each as &mut dyn FnMut(usize, f32),
        );
        let result = factorise(Some(calibration.as_slice()), Some(healing));
        pb.finish_and_clear();
        let setting = format!(
            "ffn rank {half}, {calibrated}, then {} per-layer distillation steps on Shakespeare (lr {:.0e}, {} passages of {}+ words a step)",
            heal.steps, heal.lr, heal.batch, heal::PASSAGE_WORDS
        );
        keep("lowrank-healed", "lowrank + heal", setting, result?)?;
    }
    Ok(methods)
}

/// A compressed model's manifest and tensors, as each `formers::compress` method gives them.
type Compressed = (native::Manifest, BTreeMap<String, native::Stored>);

/// Each method's row for an encoder: embedding cosine to fp32 over the sentences.
fn measure_encoders(
    a: &CompressArgs,
    original: &Pretrained,
    methods: &[Method],
    sentences: &[String],
) -> Result<Vec<Value>> {
    let want = crate::embed::embed_lines(original, sentences, 32, true, false, |_| {})?;
    rows_of_methods(a, methods, sentences, false, |p| {
        let got = crate::embed::embed_lines(p, sentences, 32, true, false, |_| {})?;
        let cos: Vec<f64> = got.iter().zip(&want).map(|(g, w)| cosine(g, w)).collect();
        Ok(json!({
            "cosine_min": cos.iter().copied().fold(f64::INFINITY, f64::min),
            "cosine_mean": cos.iter().sum::<f64>() / cos.len() as f64,
        }))
    })
}

/// Each method's row for a causal LM: perplexity of each sentence's next tokens, and the
/// largest logit difference from fp32 over them.
fn measure_lms(
    a: &CompressArgs,
    original: &Pretrained,
    methods: &[Method],
    sentences: &[String],
) -> Result<Vec<Value>> {
    let texts = lm_texts(original, sentences)?;
    rows_of_methods(a, methods, sentences, true, |p| {
        let (mut nll, mut count, mut diff) = (0f64, 0usize, 0f64);
        for chunk in texts.chunks(16) {
            let batch = Packed::new(chunk)?;
            let want = original.model.forward_packed(&batch)?;
            let got = p.model.forward_packed(&batch)?;
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            diff = diff.max(d as f64);
            let rows = got.to_vec2::<f32>()?;
            for &(start, len) in &batch.segments {
                for t in start..start + len - 1 {
                    let row = &rows[t];
                    let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let sum: f64 = row.iter().map(|&x| (x as f64 - top).exp()).sum();
                    nll += top + sum.ln() - row[batch.ids[t + 1] as usize] as f64;
                    count += 1;
                }
            }
        }
        Ok(json!({
            "perplexity": (nll / count.max(1) as f64).exp(),
            "max_logit_diff": diff,
            "tokens_scored": count,
        }))
    })
}

/// The sentences as an LM reads them: token ids (with special tokens only where the
/// family's LM needs them), cut to the positions, those of at least two tokens (one to
/// predict).
pub(crate) fn lm_texts(p: &Pretrained, sentences: &[String]) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for s in sentences {
        let mut ids = pretrained::encode(&p.tokenizer, s, p.family.lm_special_tokens())?;
        ids.truncate(p.config.max_len);
        if ids.len() >= 2 {
            out.push(ids);
        }
    }
    if out.is_empty() {
        anyhow::bail!("no sentence has two tokens or more");
    }
    Ok(out)
}

/// One row per method: its quality (`quality` of the loaded model), parameters, bytes and
/// speed at every batch size (each in its own `bench measure` process).
fn rows_of_methods(
    a: &CompressArgs,
    methods: &[Method],
    sentences: &[String],
    lm: bool,
    quality: impl Fn(&Pretrained) -> Result<Value>,
) -> Result<Vec<Value>> {
    let list = temp_file("compress-sentences.txt", &(sentences.join("\n") + "\n"))?;
    let mut rows = Vec::new();
    for m in methods {
        let p = pretrained::load_with(&m.dir, &Limits::default())?;
        let mut row = quality(&p)?;
        let jobs: Vec<(String, Job)> = a
            .batch_sizes
            .iter()
            .map(|&batch_size| {
                let (model, sentences, threads) = (m.dir.clone(), list.clone(), a.threads);
                let job = match lm {
                    true => Job::Lm {
                        model,
                        sentences,
                        batch_size,
                        threads,
                    },
                    false => Job::Embed {
                        model,
                        sentences,
                        batch_size,
                        threads,
                    },
                };
                (
                    format!("{} {} batch {batch_size}", m.method, m.setting),
                    job,
                )
            })
            .collect();
        let unit = unit(lm);
        let speed = measure_each("bench compress", &jobs, |r| {
            format!(
                "{} {}: batch {:>3}: {:>8.1} {}",
                m.method,
                m.setting,
                r["batch_size"],
                r[unit].as_f64().unwrap_or(0.0),
                unit.replace("_per_s", "/s")
            )
        })?;
        let bytes = std::fs::metadata(m.dir.join("model.safetensors"))?.len();
        let fields = json!({
            "label": m.label,
            "method": m.method,
            "setting": m.setting,
            "parameters": formers::limits::param_count(&p.config) as u64,
            "bytes": bytes,
            "sentences": sentences.len(),
            "speed": speed,
        });
        if let (Some(row), Value::Object(fields)) = (row.as_object_mut(), fields) {
            row.extend(fields);
        }
        rows.push(row);
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
fn print_table(rows: &[Value], batch_sizes: &[usize], lm: bool) {
    let mut head = "| method | setting | parameters | bytes | peak RSS |".to_string();
    let mut rule = "|---|---|---:|---:|---:|".to_string();
    for bs in batch_sizes {
        head += &format!(" batch {bs} {} |", if lm { "tok/s" } else { "sent/s" });
        rule += "---:|";
    }
    let (q1, q2) = match lm {
        true => ("perplexity", "max logit diff"),
        false => ("cosine min", "cosine mean"),
    };
    println!("{head} {q1} | {q2} |");
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
            mib(bytes),
            100.0 * bytes as f64 / base_bytes as f64,
            peak(r).map_or("-".into(), mib),
        );
        for &bs in batch_sizes {
            line += &match (rate(r, bs, lm), rate(base, bs, lm)) {
                (Some(v), Some(b)) => format!(" {v:.1} ({:.2}x) |", v / b),
                _ => " - |".into(),
            };
        }
        let q = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        match lm {
            true => println!(
                "{line} {:.3} | {:.2e} |",
                q("perplexity"),
                q("max_logit_diff")
            ),
            false => println!("{line} {:.4} | {:.4} |", q("cosine_min"), q("cosine_mean")),
        }
    }
}
