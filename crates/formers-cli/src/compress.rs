//! `formers compress ...`: post-training compression of a checkpoint into a formers model
//! directory that `formers embed`, `generate` and `serve` load like the original.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use formers::compress::extract::{extract_run, Choice};
use formers::compress::heal::{self, Heal};
use formers::compress::lowrank::{self, Layers};
use formers::compress::norm::{self, Target};
use formers::compress::quantize::{self, Scheme};
use formers::compress::svd::Rank;
use formers::fsio::human_bytes;
use formers::pretrained::{self, native, Pretrained};

use crate::limits::LoadArgs;

/// Compression methods. quantize, norm and lowrank write a formers model directory
/// (formers.json, model.safetensors, tokenizer.json) that `embed`, `generate` and `serve`
/// load; extract writes a `formers train` run directory.
#[derive(Debug, Subcommand)]
pub enum CompressCommand {
    /// Store every matrix (linear layers, embedding tables) as int8 with one scale per row;
    /// linear layers then multiply in integers, activations quantised per row on the fly.
    ///
    /// The result is a directory with formers.json, model.safetensors and tokenizer.json,
    /// loaded by `formers embed`, `generate` and `serve` like the original. Measure what it
    /// costs in quality and gains in speed with `formers bench compress --model DIR`.
    Quantize(QuantizeArgs),
    /// Convert a Pre-LN model (GPT-2 family) to Pre-RMSNorm or Pre-CRMSNorm, computing the
    /// same function (Jiang et al. 2023).
    ///
    /// Everything written into the residual stream is centred, each LayerNorm's β folds into
    /// the biases of the layers that read it (the LM head is untied and gets a bias), and
    /// what is left of LayerNorm is RMSNorm. Post-LN models (BERT) are refused. The command
    /// checks the result: it prints the largest logit difference from the original on a
    /// sample text.
    Norm(NormArgs),
    /// Factorise linear layers by truncated SVD into the low-rank form W ≈ U·V (Greenformers'
    /// LRT): the best approximation of each matrix at that rank.
    ///
    /// One rank per layer's MLP (up, down and gate share it) and one per layer's attention
    /// projections. With --energy, each group gets the smallest rank that keeps that fraction
    /// of every one of its matrices' squared singular values. By default each MLP matrix is
    /// weighted by the inputs it reads on 1,024 lines of text (--calibrate; SVD-LLM, Wang et
    /// al. 2024), which keeps far more of the model than the plain SVD of its weights. A rank saves parameters below
    /// out·in/(out+in) (192 for a 384×1536 MLP matrix). --heal-steps then distils the
    /// factorised model towards the original on plain text. Measure the cost with
    /// `formers bench compress`.
    Lowrank(LowrankArgs),
    /// Cut a MatFormer run (nested MLPs) to a physically smaller dense model at chosen
    /// granularities (Mix'n'Match, Devvrit et al. 2023), without retraining.
    ///
    /// Each nested MLP keeps the first ⌈g·hidden⌉ hidden units of granularity g and becomes
    /// a plain MLP of that width; the result computes what the nested model computes at
    /// those granularities (`formers eval --model RUN --granularity G`), with fewer
    /// parameters. It is a run directory (run.json and a checkpoint with the cut weights,
    /// AdamW moments and state) that `formers eval`, `generate` and `train --resume` take.
    /// Without --granularity or --per-layer, each layer keeps its configured `active` one.
    Extract(ExtractArgs),
}

/// Flags of `formers compress extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// A `formers train` run (or an arena run, ARENA/runs/LABEL) whose model has MatFormer MLPs
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Where to write the extracted run (a new or empty directory)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The granularity index (0: the smallest) every nested layer keeps; a layer with fewer
    /// granularities keeps its largest
    #[arg(long, value_name = "G", conflicts_with = "per_layer")]
    pub granularity: Option<usize>,
    /// One granularity index per layer, comma-separated (a layer that is not nested: 0)
    #[arg(long, value_name = "G0,G1,...", value_delimiter = ',')]
    pub per_layer: Option<Vec<usize>>,
}

/// Layers of `formers compress lowrank`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LayersArg {
    /// The MLPs' up, down and gate matrices
    Ffn,
    /// The attention projections q, k, v, o
    Attn,
    /// Both
    All,
}

/// Flags of `formers compress lowrank`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("how").required(true).args(["rank", "energy"])))]
pub struct LowrankArgs {
    /// The model: a Hugging Face checkpoint (BERT or GPT-2 family) or a formers model directory
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Where to write the factorised model (a new or empty directory)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The rank of every factorised layer
    #[arg(long)]
    pub rank: Option<usize>,
    /// Instead of --rank: the fraction of each matrix's energy (squared singular values) to
    /// keep, in (0, 1]
    #[arg(long)]
    pub energy: Option<f64>,
    /// Which layers to factorise
    #[arg(long, value_enum, default_value = "ffn")]
    pub layers: LayersArg,
    /// Weight each MLP matrix's factorisation by the inputs it reads on this many lines of
    /// the text (evenly spaced; SVD-LLM's whitening), so the error is smallest where the
    /// model works; 0: plain SVD of the weights
    #[arg(long, default_value_t = 1024, value_name = "LINES")]
    pub calibrate: usize,
    /// After factorising, train the layers this many steps to give the original's hidden
    /// states, every layer's, on the text (per-layer distillation); about a second a step
    /// for MiniLM on one thread
    #[arg(long, default_value_t = 0)]
    pub heal_steps: usize,
    /// Peak learning rate of the healing steps (warm-up over a tenth, cosine decay)
    #[arg(long, default_value_t = 5e-4)]
    pub heal_lr: f64,
    /// Texts per healing step
    #[arg(long, default_value_t = 16)]
    pub heal_batch: usize,
    /// Heal on texts of at least this many words: consecutive lines of a paragraph
    /// (blank-line separated) joined, so short verse lines become sentence-length texts;
    /// 1: one text per line. Calibration always reads single lines
    #[arg(long, default_value_t = heal::PASSAGE_WORDS, value_name = "WORDS")]
    pub heal_words: usize,
    /// Heal only on the last layer's hidden states instead of every layer's (the
    /// distillation before per-layer targets; usually worse)
    #[arg(long)]
    pub heal_last_only: bool,
    /// Heal only the factorised matrices instead of every layer's weights (attention and
    /// norms adapting too; embeddings stay, the parameter count is the same)
    #[arg(long)]
    pub heal_factorised_only: bool,
    /// Plain text to calibrate and heal on, one text per line [default: the shipped
    /// data/shakespeare.txt]
    #[arg(long, value_name = "FILE")]
    pub heal_text: Option<PathBuf>,
    #[command(flatten)]
    pub limits: LoadArgs,
}

/// Norms of `formers compress norm`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NormArg {
    /// RMSNorm: x / rms(x) · γ
    Rms,
    /// CRMSNorm: RMSNorm of a zero-mean vector read from d − 1 coordinates
    Crms,
}

/// Flags of `formers compress norm`.
#[derive(Debug, Args)]
pub struct NormArgs {
    /// The model: a GPT-2-family checkpoint or a formers model directory (Pre-LN)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Where to write the converted model (a new or empty directory)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The norm to convert to
    #[arg(long, value_enum)]
    pub to: NormArg,
    #[command(flatten)]
    pub limits: LoadArgs,
}

/// Weight formats of `formers compress quantize`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SchemeArg {
    /// Symmetric int8 per output channel (row), values in [-127, 127]: 25% of f32's bytes
    Int8,
    /// 8-bit codes with one scale per block of 32 values of a row (GGML's Q8_0): 28%
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit codes with one scale per block of 32 values (GGML's Q4_0): 16%, and a larger
    /// quality cost (measure it with `formers bench compress`)
    #[value(name = "q4_0")]
    Q4_0,
}

/// Flags of `formers compress quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model: a Hugging Face checkpoint (BERT or GPT-2 family: config.json,
    /// model.safetensors, tokenizer.json) or a formers model directory
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Where to write the quantised model (a new or empty directory)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Weight format
    #[arg(long, value_enum, default_value = "int8")]
    pub scheme: SchemeArg,
    #[command(flatten)]
    pub limits: LoadArgs,
}

/// Runs `formers compress ...`.
pub fn run(cmd: CompressCommand) -> Result<()> {
    match cmd {
        CompressCommand::Quantize(a) => run_quantize(a),
        CompressCommand::Norm(a) => run_norm(a),
        CompressCommand::Lowrank(a) => run_lowrank(a),
        CompressCommand::Extract(a) => run_extract(a),
    }
}

fn run_extract(a: ExtractArgs) -> Result<()> {
    let choice = match (a.granularity, a.per_layer) {
        (Some(g), _) => Choice::All(g),
        (None, Some(gs)) => Choice::PerLayer(gs),
        (None, None) => Choice::Configured,
    };
    let e = extract_run(&a.model, &a.out, &choice)
        .with_context(|| format!("extracting from {}", a.model.display()))?;
    let widths: Vec<String> = e
        .widths
        .iter()
        .map(|w| w.map_or("-".into(), |w| w.to_string()))
        .collect();
    let (before, after) = e.params;
    println!(
        "{}: hidden widths {} (-: not nested); {after} parameters, {:.1}% of {before}",
        a.out.display(),
        widths.join(","),
        100.0 * after as f64 / before as f64
    );
    Ok(())
}

fn run_quantize(a: QuantizeArgs) -> Result<()> {
    let scheme = match a.scheme {
        SchemeArg::Int8 => Scheme::Int8,
        SchemeArg::Q8_0 => Scheme::Q8_0,
        SchemeArg::Q4_0 => Scheme::Q4_0,
    };
    let p = pretrained::load_with(&a.model, &a.limits.limits())
        .with_context(|| format!("loading {}", a.model.display()))?;
    let (manifest, tensors) = quantize::quantize(&p, scheme)?;
    native::write(&a.out, &manifest, &tensors, &a.model.join("tokenizer.json"))
        .with_context(|| format!("writing {}", a.out.display()))?;
    let before = file_size(&a.model.join("model.safetensors"))?;
    let after = file_size(&a.out.join("model.safetensors"))?;
    let matrices = tensors
        .values()
        .filter(|t| matches!(t, native::Stored::Quant(_)))
        .count();
    println!(
        "{}: {matrices} matrices as {}; model.safetensors {} → {} ({:.1}% of the original)",
        a.out.display(),
        scheme.name(),
        human_bytes(before),
        human_bytes(after),
        100.0 * after as f64 / before.max(1) as f64
    );
    println!(
        "measure its quality and speed: formers bench compress --model {}",
        a.model.display()
    );
    Ok(())
}

fn run_lowrank(a: LowrankArgs) -> Result<()> {
    let rank = match (a.rank, a.energy) {
        (Some(r), _) => Rank::Fixed(r),
        (None, Some(e)) => Rank::Energy(e),
        (None, None) => unreachable!("clap requires --rank or --energy"),
    };
    lowrank::check_rank(rank)?;
    let layers = match a.layers {
        LayersArg::Ffn => Layers::Ffn,
        LayersArg::Attn => Layers::Attn,
        LayersArg::All => Layers::All,
    };
    let p = pretrained::load_with(&a.model, &a.limits.limits())
        .with_context(|| format!("loading {}", a.model.display()))?;
    let heal = Heal {
        steps: a.heal_steps,
        lr: a.heal_lr,
        batch: a.heal_batch,
        target: match a.heal_last_only {
            true => heal::Target::Last,
            false => heal::Target::EveryLayer,
        },
        scope: match a.heal_factorised_only {
            true => heal::Scope::Compressed,
            false => heal::Scope::Blocks,
        },
    };
    if !(heal.lr > 0.0 && heal.lr.is_finite()) || heal.batch == 0 {
        anyhow::bail!("--heal-lr must be a positive number and --heal-batch at least 1");
    }
    let calibration = match a.calibrate {
        0 => Vec::new(),
        n => spread(&heal_texts(&p, a.heal_text.as_deref(), 1)?, n),
    };
    let texts = match heal.steps {
        0 => Vec::new(),
        _ => heal_texts(&p, a.heal_text.as_deref(), a.heal_words)?,
    };
    let pb = crate::progress::spinner(if a.calibrate > 0 {
        "calibrating and factorising (truncated SVD of each matrix, weighted by its inputs)"
    } else {
        "factorising (truncated SVD of each matrix)"
    });
    let bar = crate::progress::bar(heal.steps as u64, "healing");
    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    let mut each = |step: usize, loss: f32| {
        if step == 1 {
            pb.finish_and_clear();
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.5}"));
    };
    let healing = (heal.steps > 0).then_some((
        &heal,
        texts.as_slice(),
        &mut each as &mut dyn FnMut(usize, f32),
    ));
    let calibration = (a.calibrate > 0).then_some(calibration.as_slice());
    let result = lowrank::lowrank_with(&p, rank, layers, calibration, healing);
    pb.finish_and_clear();
    bar.finish_and_clear();
    let (manifest, tensors, summary) = result?;
    native::write(&a.out, &manifest, &tensors, &a.model.join("tokenizer.json"))
        .with_context(|| format!("writing {}", a.out.display()))?;
    let (before, after) = summary
        .iter()
        .fold((0, 0), |(b, f), (_, _, x, y)| (b + x, f + y));
    for (group, r, b, f) in &summary {
        println!("{group}: rank {r}, {b} → {f} parameters");
    }
    if let Some((group, r, ..)) = summary.iter().find(|(_, _, b, f)| f >= b) {
        eprintln!(
            "note: at rank {r}, `{group}` has at least as many parameters factorised as dense; a smaller rank saves them"
        );
    }
    println!(
        "{}: factorised {} groups, {before} → {after} parameters ({:.1}%)",
        a.out.display(),
        summary.len(),
        100.0 * after as f64 / before.max(1) as f64
    );
    Ok(())
}

/// `n` of `texts`, evenly spaced (all of them when there are no more).
pub(crate) fn spread(texts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    if n == 0 {
        return Vec::new();
    }
    let step = (texts.len() / n).max(1);
    texts.iter().step_by(step).take(n).cloned().collect()
}

/// Token ids of the texts of `path` (or the shipped Shakespeare), lines joined into
/// passages of at least `words` words ([`heal::passages`]), with at least 4 tokens, cut to
/// the model's positions.
pub(crate) fn heal_texts(
    p: &Pretrained,
    path: Option<&Path>,
    words: usize,
) -> Result<Vec<Vec<u32>>> {
    let text = match path {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => formers::tasks::SHAKESPEARE.to_string(),
    };
    let mut out = Vec::new();
    for line in heal::passages(&text, words) {
        let mut ids = pretrained::encode(&p.tokenizer, &line, true)?;
        if ids.len() >= 4 {
            formers::embed::truncate(&mut ids, p.config.max_len);
            out.push(ids);
        }
    }
    if out.is_empty() {
        anyhow::bail!("no line of the healing text has 4 tokens or more");
    }
    Ok(out)
}

/// The text whose logits `compress norm` compares.
const CHECK_TEXT: &str =
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer";

fn run_norm(a: NormArgs) -> Result<()> {
    let target = match a.to {
        NormArg::Rms => Target::RmsNorm,
        NormArg::Crms => Target::CrmsNorm,
    };
    let limits = a.limits.limits();
    let p = pretrained::load_with(&a.model, &limits)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let (manifest, tensors) = norm::convert_pretrained(&p, target)?;
    native::write(&a.out, &manifest, &tensors, &a.model.join("tokenizer.json"))
        .with_context(|| format!("writing {}", a.out.display()))?;
    let q = pretrained::load_with(&a.out, &limits)?;
    let mut ids = pretrained::encode(&p.tokenizer, CHECK_TEXT, true)?;
    ids.truncate(p.config.max_len);
    let x = formers::model::ids_tensor(&ids)?;
    let want = p.model.forward(&x, None, None)?;
    let got = q.model.forward(&x, None, None)?;
    let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "{}: {} norms; largest logit difference from the original over {} tokens: {diff:.2e} (largest logit {scale:.2})",
        a.out.display(),
        target.name(),
        ids.len()
    );
    Ok(())
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}
