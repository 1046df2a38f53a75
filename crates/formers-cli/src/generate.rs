//! `formers generate`: continue a prompt with a trained causal LM.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use formers::config::InputSpec;
use formers::generate::{generate, Sampling};
use formers::train::trainer::load_trained;

/// Flags of `formers generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Run directory written by `formers train` (a causal LM over bytes)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Text to continue
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Always take the most likely token
    #[arg(long)]
    pub greedy: bool,
    /// Softmax temperature
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Sampler seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute the whole sequence at every step instead of using the KV cache
    #[arg(long)]
    pub no_cache: bool,
}

/// Runs `formers generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let (rec, model) = load_trained(&a.model)?;
    if !rec.config.model.is_causal() {
        anyhow::bail!(
            "{}: not a causal LM (its attention is bidirectional)",
            a.model.display()
        );
    }
    if rec.config.model.input != InputSpec::Bytes {
        anyhow::bail!(
            "{}: generate reads text, so the model must take bytes",
            a.model.display()
        );
    }
    let prompt: Vec<u32> = a.prompt.bytes().map(u32::from).collect();
    let sampling = Sampling {
        greedy: a.greedy,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", a.prompt)?;
    let start = Instant::now();
    let mut pending: Vec<u8> = Vec::new();
    let new = generate(
        &model,
        &prompt,
        a.max_new_tokens,
        &sampling,
        !a.no_cache,
        |t| {
            pending.push(t as u8);
            if let Ok(s) = std::str::from_utf8(&pending) {
                let _ = write!(stdout, "{s}");
                let _ = stdout.flush();
                pending.clear();
            }
        },
    )?;
    writeln!(stdout, "{}", String::from_utf8_lossy(&pending))?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} tokens in {:.2} s: {:.1} tokens/s ({})",
        new.len(),
        secs,
        new.len() as f64 / secs.max(1e-9),
        if a.no_cache { "no cache" } else { "KV cache" }
    );
    Ok(())
}
