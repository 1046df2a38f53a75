//! The model side of the server: one dedicated thread owns the model and drains a bounded
//! queue. Embedding requests waiting together are packed into padding-free batches of up
//! to `max_batch_tokens` tokens (dynamic batching). Completions are batched continuously:
//! every sequence being generated advances by one token in one shared forward pass per
//! step, new requests join between steps (their prompts packed into that step) and
//! finished ones leave, so a short request never waits for a long one to end. Each token
//! is sent to its request as it comes. The async side never runs model code.
//!
//! A request whose client has left is skipped before its batch runs, and a generation
//! leaves the batch at the next step once nobody reads it.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use formers::embed;
use formers::generate::{self, Sampling, Sequence};
use formers::limits::Limits;
use formers::lm::{self, Codec};
use formers::model::Model;
use formers::pretrained;
use formers::train::RunRecord;
use tokio::sync::{mpsc, oneshot};

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::text::Completion;

/// What a served model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/embeddings` (a BERT-family encoder).
    Embeddings,
    /// `POST /v1/completions` (a GPT-2-family checkpoint or a `formers train` run of a
    /// causal byte-level LM).
    Completions,
}

impl Kind {
    /// The endpoint it answers.
    pub fn endpoint(self) -> &'static str {
        match self {
            Kind::Embeddings => "/v1/embeddings",
            Kind::Completions => "/v1/completions",
        }
    }
}

/// What the served model is and what it can be asked.
#[derive(Debug)]
pub struct ModelInfo {
    /// The name responses give (the checkpoint directory's name).
    pub name: String,
    /// What it answers.
    pub kind: Kind,
    /// The model's position table: no sequence may be longer.
    pub max_len: usize,
    /// Its codec (used on the async side to count and check inputs); a tokenizer for
    /// embeddings.
    pub codec: Codec,
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
        let (model, codec) =
            load(dir, limits).with_context(|| format!("loading the model in {}", dir.display()))?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        let kind = if model.config().is_causal() {
            Kind::Completions
        } else {
            Kind::Embeddings
        };
        let info = Arc::new(ModelInfo {
            name,
            kind,
            max_len: model.config().max_len,
            codec: codec.clone(),
        });
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(max_queue);
        let worker = Worker {
            model,
            codec,
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

/// The model in `dir` and its codec: a `formers train` run directory of a causal
/// byte-level LM (through [`lm::load`], as `formers generate` loads it), else a Hugging
/// Face checkpoint of any family.
fn load(dir: &Path, limits: &Limits) -> Result<(Model, Codec)> {
    if dir.join(RunRecord::FILE).is_file() {
        let lm = lm::load(dir, limits)?;
        return Ok((lm.model, lm.codec));
    }
    let p = pretrained::load_with(dir, limits)?;
    if let Some(w) = p.unused_warning() {
        eprintln!("{w}");
    }
    Ok((p.model, Codec::of(p.family, p.tokenizer)))
}

/// The model thread's state.
struct Worker {
    model: Model,
    codec: Codec,
    metrics: Arc<Metrics>,
    max_batch_tokens: usize,
}

/// Most sequences generated together: each keeps its KV cache, so this bounds their memory.
pub const MAX_SEQUENCES: usize = 64;

/// Returns the allocator's free pages to the system: glibc keeps the heap pages a burst of
/// large batches freed, which are most of a busy server's resident memory. Called when
/// the model thread runs out of work, so it never delays a waiting request.
fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free pages of the allocator's heaps back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A completion in the running batch.
struct Generation {
    seq: Sequence,
    text: Completion,
    events: mpsc::UnboundedSender<Event>,
}

impl Worker {
    /// Drains the queue until it is closed, empty and nothing is being generated. Blocks
    /// for work only when no generation runs; otherwise takes what is waiting (completions
    /// up to [`MAX_SEQUENCES`] and, per step, `max_batch_tokens` of new prompts; embedding
    /// batches between steps) and runs one decoding step.
    fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut carried: Option<Job> = None;
        let mut active: Vec<Generation> = Vec::new();
        let mut fresh_tokens = 0;
        let mut worked = false;
        loop {
            let room = active.len() < MAX_SEQUENCES && fresh_tokens < self.max_batch_tokens;
            let job = if !room {
                None
            } else if let Some(j) = carried.take() {
                Some(j)
            } else if active.is_empty() {
                let j = match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(_) => {
                        if worked {
                            release_memory();
                            worked = false;
                        }
                        rx.blocking_recv()
                    }
                };
                match j {
                    Some(j) => Some(self.taken(j)),
                    None => return,
                }
            } else {
                rx.try_recv().ok().map(|j| self.taken(j))
            };
            match job {
                Some(Job::Embed(j)) => {
                    // Dynamic batching: take what else is waiting, up to the token budget.
                    let mut tokens: usize = j.seqs.iter().map(Vec::len).sum();
                    let mut batch = vec![j];
                    while tokens < self.max_batch_tokens {
                        let Ok(next) = rx.try_recv() else { break };
                        let next = self.taken(next);
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
                    worked = true;
                    continue;
                }
                Some(Job::Complete(j)) => {
                    let n = j.prompt.len();
                    if fresh_tokens == 0 || fresh_tokens + n <= self.max_batch_tokens {
                        fresh_tokens += n;
                        active.extend(self.start(j));
                        continue;
                    }
                    carried = Some(Job::Complete(j));
                }
                None => {}
            }
            fresh_tokens = 0;
            self.step(&mut active);
            worked = true;
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

    /// `job`, just taken off the queue (the queue-depth gauge counts it out).
    fn taken(&self, job: Job) -> Job {
        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        job
    }

    /// A completion joining the batch; `None` when its client is gone or it cannot start
    /// (the error is sent).
    fn start(&self, j: CompleteJob) -> Option<Generation> {
        if j.events.is_closed() {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let started = self
            .codec
            .decode(&j.prompt)
            .map_err(|e| e.to_string())
            .and_then(|prompt_text| {
                let seq = Sequence::new(&self.model, &j.prompt, j.max_new, &j.sampling)
                    .map_err(|e| format!("generation failed: {e}"))?;
                Ok((prompt_text, seq))
            });
        match started {
            Ok((prompt_text, seq)) => {
                self.metrics
                    .prompt_tokens
                    .fetch_add(j.prompt.len() as u64, Ordering::Relaxed);
                let g = Generation {
                    seq,
                    text: Completion::new(&prompt_text, j.stops),
                    events: j.events,
                };
                // Nothing to generate: done at once.
                if g.seq.finished() {
                    let _ = g.events.send(Event::Done {
                        finish: "length",
                        tokens: 0,
                    });
                    return None;
                }
                Some(g)
            }
            Err(msg) => {
                let _ = j.events.send(Event::Failed(msg));
                None
            }
        }
    }

    /// One decoding step of every running completion: those whose client left are dropped
    /// first, the others advance by a token, send the text that is safe to send, and leave
    /// when done (length or stop sequence).
    fn step(&self, active: &mut Vec<Generation>) {
        active.retain(|g| {
            let gone = g.events.is_closed();
            if gone {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        if active.is_empty() {
            return;
        }
        let fresh: usize = active.iter().map(|g| g.seq.pending()).sum();
        let t = Instant::now();
        let mut seqs: Vec<&mut Sequence> = active.iter_mut().map(|g| &mut g.seq).collect();
        if let Err(e) = generate::step(&self.model, &mut seqs) {
            for g in active.drain(..) {
                let _ = g
                    .events
                    .send(Event::Failed(format!("generation failed: {e}")));
            }
            return;
        }
        self.metrics
            .batch(active.len(), fresh, t.elapsed().as_secs_f64());
        self.metrics
            .generated_tokens
            .fetch_add(active.len() as u64, Ordering::Relaxed);
        active.retain_mut(|g| self.advance(g));
    }

    /// Sends what the newest token of `g` adds to its text; false when `g` is over
    /// (finished, failed or its client gone).
    fn advance(&self, g: &mut Generation) -> bool {
        let decoded = match self.codec.decode(g.seq.tokens()) {
            Ok(d) => d,
            Err(e) => {
                let msg = format!("cannot decode the generated tokens: {e}");
                let _ = g.events.send(Event::Failed(msg));
                return false;
            }
        };
        let stop = g.text.update(&decoded);
        let piece = g.text.take(false);
        if (!piece.is_empty() && g.events.send(Event::Text(piece)).is_err()) || g.events.is_closed()
        {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !stop && !g.seq.finished() {
            return true;
        }
        let rest = g.text.take(true);
        if !rest.is_empty() {
            let _ = g.events.send(Event::Text(rest));
        }
        let finish = if g.text.stopped() { "stop" } else { "length" };
        let _ = g.events.send(Event::Done {
            finish,
            tokens: g.seq.generated().len(),
        });
        false
    }
}
