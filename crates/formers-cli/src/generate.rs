//! `formers generate`: continue a prompt with a trained causal LM.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

use crate::limits::LoadArgs;
use formers::generate::{check_prompt, generate_sliding, Sampling};
use formers::lm::{self, Codec};
use formers::train::RunRecord;

/// Flags of `formers generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A run directory written by `formers train` (a causal LM over bytes), or a GPT-2-family
    /// checkpoint directory (config.json, model.safetensors, tokenizer.json)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Text to continue
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate (at most 100000). Past the model's window (a `formers train` run's
    /// seq_len, else its max_len) the window slides: each token sees the last window's tokens
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
    #[command(flatten)]
    pub limits: LoadArgs,
}

/// Prints the decoding of a growing list of ids piece by piece: each call prints the part of
/// the decoded text not printed yet, holding it back while it ends in an incomplete character.
struct TextStream {
    ids: Vec<u32>,
    shown: String,
}

impl TextStream {
    fn new(ids: Vec<u32>) -> TextStream {
        TextStream {
            ids,
            shown: String::new(),
        }
    }

    /// Prints what is new; with `last`, also a trailing replacement character.
    fn emit(&mut self, codec: &Codec, out: &mut impl Write, last: bool) -> Result<()> {
        let text = codec.decode(&self.ids)?;
        if !last && text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        // Decoders are prefix-stable in practice; should one not be, print from where the
        // texts part (what was printed cannot be taken back).
        let common = text
            .char_indices()
            .zip(self.shown.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, c), _)| i + c.len_utf8());
        if text.len() > common {
            write!(out, "{}", &text[common..])?;
            out.flush()?;
            self.shown = text;
        }
        Ok(())
    }
}

/// A library error about a sampling field, told as the flag that set it.
fn as_flag(e: formers::Error) -> anyhow::Error {
    match e {
        formers::Error::Config { key, msg } => {
            anyhow::anyhow!("--{}: {msg}", key.replace('_', "-"))
        }
        e => e.into(),
    }
}

/// The most new tokens `--max-new-tokens` takes.
pub const MAX_NEW_TOKENS: usize = 100_000;

/// The window a model predicts from: a `formers train` run was trained on `seq_len`
/// tokens (its positions past that are untrained), other models on their `max_len`.
pub fn trained_window(max_len: usize, seq_len: Option<usize>) -> usize {
    seq_len.map_or(max_len, |n| n.min(max_len))
}

/// Refuses a prompt longer than `max_len` and more than [`MAX_NEW_TOKENS`] new tokens.
fn check_lengths(asked: usize, prompt: usize, max_len: usize) -> Result<()> {
    if prompt > max_len {
        bail!(
            "--prompt is {prompt} tokens and the model's max_len is {max_len}: shorten the prompt"
        );
    }
    if asked > MAX_NEW_TOKENS {
        bail!("--max-new-tokens {asked}: at most {MAX_NEW_TOKENS}");
    }
    Ok(())
}

/// Runs `formers generate`.
///
/// Everything is checked (flags, model, prompt, length) before anything is printed.
pub fn run(a: GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        greedy: a.greedy,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate().map_err(as_flag)?;
    if a.prompt.is_empty() {
        bail!("--prompt is empty");
    }
    let lm = lm::load(&a.model, &a.limits.limits())?;
    if let Some(w) = &lm.unused_warning {
        eprintln!("{w}");
    }
    let (model, codec) = (lm.model, lm.codec);
    let prompt = codec.encode(&a.prompt)?;
    if prompt.is_empty() {
        bail!(
            "--prompt {:?} is whitespace only, which the tokenizer drops: no tokens to continue",
            a.prompt
        );
    }
    let max_len = model.config().max_len;
    check_lengths(a.max_new_tokens, prompt.len(), max_len)?;
    check_prompt(&model, &prompt, &sampling)?;
    let seq_len = RunRecord::load(&a.model)
        .ok()
        .map(|r| r.config.train.seq_len);
    let window = trained_window(max_len, seq_len);
    if prompt.len() + a.max_new_tokens > window {
        eprintln!(
            "note: {} prompt + {} new tokens pass the model's window of {window}: from there each \
             token is predicted from the last {window} (the window slides, as nanoGPT samples)",
            prompt.len(),
            a.max_new_tokens
        );
    }
    let mut stdout = std::io::stdout().lock();
    // The printed text is the decoding of prompt + continuation as one sequence: decoders
    // may join or strip spaces at token boundaries (a continuation decoded on its own can
    // lose its leading space), and one character may span tokens.
    let mut stream = TextStream::new(prompt.clone());
    stream.emit(&codec, &mut stdout, false)?;
    let start = Instant::now();
    let on_token = |t| {
        stream.ids.push(t);
        let _ = stream.emit(&codec, &mut stdout, false);
        true
    };
    let new = generate_sliding(
        &model,
        &prompt,
        a.max_new_tokens,
        window,
        &sampling,
        !a.no_cache,
        on_token,
    )?;
    stream.emit(&codec, &mut stdout, true)?;
    writeln!(stdout)?;
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

#[cfg(test)]
mod tests {
    use super::{check_lengths, trained_window, MAX_NEW_TOKENS};

    #[test]
    fn the_prompt_must_fit_max_len_and_new_tokens_are_bounded() {
        check_lengths(100_000, 256, 256).unwrap();
        check_lengths(1, 1, 256).unwrap();
        let e = check_lengths(200, 257, 256).unwrap_err().to_string();
        assert!(
            e.contains("--prompt") && e.contains("max_len is 256"),
            "{e}"
        );
        let e = check_lengths(MAX_NEW_TOKENS + 1, 1, 256)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--max-new-tokens") && e.contains("at most"),
            "{e}"
        );
        assert_eq!(trained_window(256, Some(64)), 64);
        assert_eq!(trained_window(64, Some(256)), 64);
        assert_eq!(trained_window(1024, None), 1024);
    }
}
