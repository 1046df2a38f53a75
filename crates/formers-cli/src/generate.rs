//! `formers generate`: continue a prompt with a trained causal LM.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

use crate::limits::LoadArgs;
use formers::generate::{check, generate, Sampling};
use formers::lm::{self, Codec};

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
    /// Tokens to generate (capped, with a note, at what the model's max_len leaves after
    /// the prompt)
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

/// The new tokens to generate: `asked`, or what fits beside a prompt of `prompt` tokens in
/// `max_len` positions, with a note saying so. A prompt that leaves no room is an error.
fn fit_new_tokens(asked: usize, prompt: usize, max_len: usize) -> Result<(usize, Option<String>)> {
    let room = max_len.saturating_sub(prompt);
    if room == 0 {
        bail!(
            "--prompt is {prompt} tokens and the model's max_len is {max_len}: no room for a new \
             token; shorten the prompt"
        );
    }
    if asked <= room {
        return Ok((asked, None));
    }
    let note = format!(
        "note: --max-new-tokens {asked} capped at {room}: the prompt's {prompt} tokens and the \
         new ones must fit the model's max_len {max_len}"
    );
    Ok((room, Some(note)))
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
    let (max_new, note) = fit_new_tokens(a.max_new_tokens, prompt.len(), model.config().max_len)?;
    check(&model, &prompt, max_new, &sampling)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let mut stdout = std::io::stdout().lock();
    // The printed text is the decoding of prompt + continuation as one sequence: decoders
    // may join or strip spaces at token boundaries (a continuation decoded on its own can
    // lose its leading space), and one character may span tokens.
    let mut stream = TextStream::new(prompt.clone());
    stream.emit(&codec, &mut stdout, false)?;
    let start = Instant::now();
    let new = generate(&model, &prompt, max_new, &sampling, !a.no_cache, |t| {
        stream.ids.push(t);
        let _ = stream.emit(&codec, &mut stdout, false);
    })?;
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
    use super::fit_new_tokens;

    #[test]
    fn new_tokens_are_capped_at_the_room_the_prompt_leaves() {
        assert_eq!(fit_new_tokens(200, 56, 256).unwrap(), (200, None));
        let (n, note) = fit_new_tokens(200, 57, 256).unwrap();
        assert_eq!(n, 199);
        assert!(note.unwrap().contains("capped at 199"));
        assert_eq!(fit_new_tokens(200, 255, 256).unwrap().0, 1);
        for prompt in [256, 300] {
            let e = fit_new_tokens(200, prompt, 256).unwrap_err().to_string();
            assert!(e.contains("no room") && e.contains("max_len is 256"), "{e}");
        }
    }
}
