//! `formers serve`: flags → [`formers_serve::Options`]; the server itself is in
//! `formers-serve`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::limits::LoadArgs;

/// Flags of `formers serve`.
#[derive(Debug, Args)]
#[command(after_help = "Endpoints:
  POST /v1/embeddings   {\"input\": \"text\" | [\"text\", ...], \"truncate\"?: bool}   (BERT family)
  POST /v1/completions  {\"prompt\": \"text\", \"max_tokens\"?, \"temperature\"? (0 = greedy), \"top_p\"?,
                         \"seed\"?, \"stop\"?, \"stream\"?: bool}      (GPT-2 family, formers runs)
  GET  /health          200 while serving, 503 while draining
  GET  /metrics         Prometheus text

Answers: 400 malformed request (JSON error body), 413 input over --max-input-tokens,
429 queue full (with Retry-After), 503 shutting down. SIGTERM or Ctrl-C: stop accepting,
finish in-flight requests (at most --grace seconds), exit 0.

Example:
  formers serve --model DIR --port 8080 &
  curl -s localhost:8080/v1/embeddings -d '{\"input\": \"Hello world\"}'")]
pub struct ServeArgs {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json): a BERT-family
    /// encoder serves embeddings, a GPT-2-family decoder serves completions; or a run
    /// directory written by `formers train` (a causal LM over bytes) serves completions
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at startup)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most tokens in one padding-free embedding batch (concurrent requests are packed
    /// together up to this; it bounds the batch's activations, hence the server's memory),
    /// and most prompt tokens joining one decoding step of completions
    #[arg(long, default_value_t = 1024)]
    pub max_batch_tokens: usize,
    /// Most requests waiting for the model; more are answered 429 with Retry-After
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Longest input (or prompt) in tokens; longer ones are answered 413 [default: the
    /// model's positions]
    #[arg(long)]
    pub max_input_tokens: Option<usize>,
    /// Compute threads of the model (sets RAYON_NUM_THREADS) [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds in-flight requests may still run after SIGTERM
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    #[command(flatten)]
    pub limits: LoadArgs,
}

/// Runs `formers serve`.
pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_input_tokens == Some(0) {
        bail!("--max-input-tokens must be at least 1");
    }
    if let Some(t) = a.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        // No other thread exists yet: nothing reads the environment concurrently.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let opts = formers_serve::Options {
        limits: a.limits.limits(),
        host: a.host,
        port: a.port,
        max_batch_tokens: a.max_batch_tokens,
        max_queue: a.max_queue,
        max_input_tokens: a.max_input_tokens,
        grace: Duration::from_secs(a.grace),
        ..formers_serve::Options::new(a.model)
    };
    formers_serve::run(&opts, |addr| {
        eprintln!("formers serve: listening on http://{addr} (ready)");
    })?;
    eprintln!("formers serve: stopped");
    Ok(())
}
