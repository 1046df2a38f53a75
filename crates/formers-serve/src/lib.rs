//! formers-serve: a model of the `formers` library as an HTTP service, one model per
//! process. `POST /v1/embeddings` (BERT family) and `POST /v1/completions` (GPT-2 family,
//! with `stream: true` as server-sent events) in the OpenAI shape, `GET /health`,
//! `GET /metrics` (Prometheus text).
//!
//! The model runs on one dedicated thread that drains a bounded queue ([`engine`]);
//! concurrent embedding requests are packed into one padding-free batch (dynamic
//! batching). A full queue answers 429, an input over the limit 413, a malformed request
//! 400, always with a JSON error body. On shutdown the server stops accepting, finishes
//! what is in flight, and ends.
//!
//! It holds no model logic (tokenizing, batching and sampling are the library's, the same
//! calls `formers embed` and `formers generate` make) and no command-line flags (the
//! `formers serve` command in `formers-cli` fills [`Options`]). [`loadgen`] is the client
//! side of `formers bench serve`.

pub mod api;
pub mod client;
pub mod engine;
pub mod loadgen;
pub mod metrics;
pub mod server;
pub mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use formers::limits::Limits;

/// How to serve.
#[derive(Debug, Clone)]
pub struct Options {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json).
    pub model: PathBuf,
    /// Limits the model is loaded within.
    pub limits: Limits,
    /// Address to listen on.
    pub host: String,
    /// Port to listen on (0: any free port).
    pub port: u16,
    /// Most tokens in one embedding batch (bounds its activations), and most prompt tokens
    /// joining one decoding step.
    pub max_batch_tokens: usize,
    /// Most requests waiting for the model; more are answered 429.
    pub max_queue: usize,
    /// Longest input in tokens (capped by the model's positions); longer ones get 413.
    pub max_input_tokens: Option<usize>,
    /// How long in-flight requests may run after shutdown begins.
    pub grace: Duration,
}

impl Options {
    /// Defaults for `model`: 127.0.0.1:8080, batches of 1024 tokens, a queue of 256,
    /// 30 s of grace.
    pub fn new(model: PathBuf) -> Self {
        Options {
            model,
            limits: Limits::default(),
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch_tokens: 1024,
            max_queue: 256,
            max_input_tokens: None,
            grace: Duration::from_secs(30),
        }
    }
}

/// A server running on a thread of its own (for tests and embedding in other programs):
/// dropping it shuts it down gracefully.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Loads the model, listens, and returns once it serves.
    pub fn start(opts: Options) -> Result<Server> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("formers-serve".into())
            .spawn(move || {
                server::serve(
                    &opts,
                    |addr| {
                        let _ = ready_tx.send(addr);
                    },
                    async move {
                        let _ = stop_rx.await;
                    },
                )
            })
            .context("starting the server thread")?;
        match ready_rx.recv() {
            Ok(addr) => Ok(Server {
                addr,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => anyhow::bail!("the server thread ended before it listened"),
            },
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shuts down gracefully and waits for the end.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the server thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Serves until SIGTERM or SIGINT (Ctrl-C), then drains and returns. `on_ready` gets the
/// bound address.
pub fn run(opts: &Options, on_ready: impl FnOnce(SocketAddr)) -> Result<()> {
    server::serve(opts, on_ready, async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    })
}
