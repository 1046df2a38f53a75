//! The model side of the server: one dedicated thread owns the model and drains a bounded
//! queue. Embedding requests waiting together are packed into padding-free batches of up
//! to `max_batch_tokens` tokens (dynamic batching); completions run one at a time, token by
//! token, each token sent to its request as it comes. The async side never runs model code.
//!
//! A request whose client has left is skipped before its batch runs, and a generation
//! stops at the next token once nobody reads it.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use formers::embed;
use formers::generate::{generate_until, Sampling};
use formers::limits::Limits;
use formers::pretrained::{self, Family};
use formers::Model;
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::text::Completion;

/// What the served model is and what it can be asked.
#[derive(Debug)]
pub struct ModelInfo {
    /// The name responses give (the checkpoint directory's name).
    pub name: String,
    /// Its family: BERT serves embeddings, GPT-2 serves completions.
    pub family: Family,
    /// The model's position table: no sequence may be longer.
    pub max_len: usize,
    /// Its tokenizer (used on the async side to count and check inputs).
    pub tokenizer: Tokenizer,
}

/// A batch of sentences to embed, as token ids, and where the rows go.
#[derive(Debug)]
pub struct EmbedJob {
    /// Token ids of each input, none empty, none over the limit.
    pub seqs: Vec<Vec<u32>>,
    /// The rows in input order, or what failed.
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// One completion to generate.
#[derive(Debug)]
pub struct CompleteJob {
    /// Token ids of the prompt (checked: non-empty, prompt + `max_new` within the model).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_new: usize,
    /// How tokens are chosen.
    pub sampling: Sampling,
    /// Stop sequences.
    pub stops: Vec<String>,
    /// Where the text goes, piece by piece.
    pub events: mpsc::UnboundedSender<Event>,
}

/// What a completion sends back as it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A piece of text.
    Text(String),
    /// The end: why, and how many tokens were generated.
    Done {
        /// `"stop"` or `"length"`.
        finish: &'static str,
        /// Tokens generated.
        tokens: usize,
    },
    /// The model failed.
    Failed(String),
}

/// Work for the model thread.
#[derive(Debug)]
pub enum Job {
    /// Embeddings.
    Embed(EmbedJob),
    /// A completion.
    Complete(CompleteJob),
}

impl Job {
    fn tokens(&self) -> usize {
        match self {
            Job::Embed(j) => j.seqs.iter().map(Vec::len).sum(),
            Job::Complete(j) => j.prompt.len(),
        }
    }
}

/// The handle the HTTP side holds: submit work, read what the model is.
#[derive(Debug)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    max_queue: usize,
    /// What is served.
    pub info: Arc<ModelInfo>,
    /// The counters.
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// Loads the checkpoint in `dir` within `limits` and starts the model thread with a
    /// queue of `max_queue` requests and batches of at most `max_batch_tokens` tokens.
    /// Returns when the model is loaded (or failed to), with the thread's handle; the
    /// thread ends when every [`Engine`] is dropped and the queue is empty.
    pub fn start(
        dir: &Path,
        limits: &Limits,
        max_queue: usize,
        max_batch_tokens: usize,
    ) -> Result<(Engine, std::thread::JoinHandle<()>)> {
        if max_queue == 0 || max_batch_tokens == 0 {
            bail!("--max-queue and --max-batch-tokens must be at least 1");
        }
        let p = pretrained::load_with(dir, limits)
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        if let Some(w) = p.unused_warning() {
            eprintln!("{w}");
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        let info = Arc::new(ModelInfo {
            name,
            family: p.family,
            max_len: p.config.max_len,
            tokenizer: p.tokenizer.clone(),
        });
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(max_queue);
        let worker = Worker {
            model: p.model,
            tokenizer: p.tokenizer,
            metrics: metrics.clone(),
            max_batch_tokens,
        };
        let handle = std::thread::Builder::new()
            .name("formers-model".into())
            .spawn(move || worker.run(rx))
            .context("starting the model thread")?;
        Ok((
            Engine {
                tx,
                max_queue,
                info,
                metrics,
            },
            handle,
        ))
    }

    /// Puts `job` in the queue: 429 when it is full, 503 when the model thread is gone.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        // Counted before the send so the model thread never sees a depth below zero.
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(job).map_err(|e| {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => ApiError::overloaded(self.max_queue),
                mpsc::error::TrySendError::Closed(_) => ApiError::shutting_down(),
            }
        })
    }
}

/// The model thread's state.
struct Worker {
    model: Model,
    tokenizer: Tokenizer,
    metrics: Arc<Metrics>,
    max_batch_tokens: usize,
}

impl Worker {
    /// Drains the queue until it is closed and empty.
    fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut carried: Option<Job> = None;
        loop {
            let first = match carried.take() {
                Some(j) => j,
                None => match rx.blocking_recv() {
                    Some(j) => {
                        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                        j
                    }
                    None => return,
                },
            };
            match first {
                Job::Complete(j) => self.complete(j),
                Job::Embed(j) => {
                    // Dynamic batching: take what else is waiting, up to the token budget.
                    let mut tokens: usize = j.seqs.iter().map(Vec::len).sum();
                    let mut batch = vec![j];
                    while tokens < self.max_batch_tokens {
                        let Ok(next) = rx.try_recv() else { break };
                        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                        let n = next.tokens();
                        match next {
                            Job::Embed(e) if tokens + n <= self.max_batch_tokens => {
                                tokens += n;
                                batch.push(e);
                            }
                            other => {
                                carried = Some(other);
                                break;
                            }
                        }
                    }
                    self.embed(batch);
                }
            }
        }
    }

    /// Embeds the requests of `jobs` in padding-free batches of at most the token budget
    /// (a request larger than the budget is split), then answers each.
    fn embed(&self, jobs: Vec<EmbedJob>) {
        let jobs: Vec<EmbedJob> = jobs
            .into_iter()
            .filter(|j| {
                let gone = j.reply.is_closed();
                if gone {
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                !gone
            })
            .collect();
        let all: Vec<&Vec<u32>> = jobs.iter().flat_map(|j| &j.seqs).collect();
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(all.len());
        let mut start = 0;
        while start < all.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < all.len()
                && (end == start || tokens + all[end].len() <= self.max_batch_tokens)
            {
                tokens += all[end].len();
                end += 1;
            }
            let t = Instant::now();
            match embed::embed_batch(&self.model, &all[start..end]) {
                Ok(r) => rows.extend(r),
                Err(e) => {
                    let msg = format!("the model failed on a batch: {e}");
                    for j in jobs {
                        let _ = j.reply.send(Err(msg.clone()));
                    }
                    return;
                }
            }
            self.metrics
                .batch(end - start, tokens, t.elapsed().as_secs_f64());
            self.metrics
                .embedded_tokens
                .fetch_add(tokens as u64, Ordering::Relaxed);
            start = end;
        }
        let mut rows = rows.into_iter();
        for j in jobs {
            let mine: Vec<Vec<f32>> = rows.by_ref().take(j.seqs.len()).collect();
            let _ = j.reply.send(Ok(mine));
        }
    }

    /// Generates one completion, sending text as it is safe to send.
    fn complete(&self, j: CompleteJob) {
        if j.events.is_closed() {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let fail = |msg: String| {
            let _ = j.events.send(Event::Failed(msg));
        };
        let prompt_text = match pretrained::decode(&self.tokenizer, &j.prompt) {
            Ok(t) => t,
            Err(e) => return fail(e.to_string()),
        };
        self.metrics
            .prompt_tokens
            .fetch_add(j.prompt.len() as u64, Ordering::Relaxed);
        let mut text = Completion::new(&prompt_text, j.stops.clone());
        let mut ids = j.prompt.clone();
        let mut gone = false;
        let mut failed = None;
        let result = generate_until(&self.model, &j.prompt, j.max_new, &j.sampling, true, |t| {
            ids.push(t);
            self.metrics
                .generated_tokens
                .fetch_add(1, Ordering::Relaxed);
            let decoded = match pretrained::decode(&self.tokenizer, &ids) {
                Ok(d) => d,
                Err(e) => {
                    failed = Some(e.to_string());
                    return false;
                }
            };
            let stop = text.update(&decoded);
            let piece = text.take(false);
            if (!piece.is_empty() && j.events.send(Event::Text(piece)).is_err())
                || j.events.is_closed()
            {
                gone = true;
                return false;
            }
            !stop
        });
        match (result, failed) {
            (Err(e), _) => fail(format!("generation failed: {e}")),
            (_, Some(e)) => fail(format!("cannot decode the generated tokens: {e}")),
            (Ok(_), None) if gone => {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(new), None) => {
                let rest = text.take(true);
                if !rest.is_empty() {
                    let _ = j.events.send(Event::Text(rest));
                }
                let finish = if text.stopped() { "stop" } else { "length" };
                let _ = j.events.send(Event::Done {
                    finish,
                    tokens: new.len(),
                });
            }
        }
    }
}
