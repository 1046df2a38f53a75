//! The HTTP side: routes, request checks (400/413), the queue hand-off (429), responses
//! and server-sent events, and the lifecycle (ready when listening; on shutdown, stop
//! accepting, finish what is in flight within a grace period, stop the model thread).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use formers::embed;
use formers::generate::Sampling;
use formers::lm::Codec;
use tokio::sync::{mpsc, oneshot};

use crate::api::{
    self, ApiError, Choice, CompletionsRequest, CompletionsResponse, Embedding, EmbeddingsRequest,
    EmbeddingsResponse, Usage,
};
use crate::engine::{CompleteJob, EmbedJob, Engine, Event, Job, Kind};
use crate::Options;

/// Largest request body accepted (larger ones get 413).
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// Most inputs in one embeddings request (as OpenAI's API).
pub const MAX_INPUTS: usize = 2048;
/// Most stop sequences in one completions request (as OpenAI's API).
pub const MAX_STOPS: usize = 4;
/// Bodies up to this size are tokenized on the async side; larger ones on a blocking thread.
const INLINE_TOKENIZE_BYTES: usize = 16 << 10;

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    /// Longest input in tokens (the flag, capped by the model's positions).
    max_input_tokens: usize,
    draining: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
}

/// The routes over `state`.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Counts every answer by endpoint and status, with its latency.
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        p @ ("/v1/embeddings" | "/v1/completions" | "/health" | "/metrics") => p.to_string(),
        _ => "other".to_string(),
    };
    let start = Instant::now();
    let m = &s.engine.metrics;
    m.in_flight.fetch_add(1, Ordering::Relaxed);
    let r = next.run(req).await;
    m.in_flight.fetch_sub(1, Ordering::Relaxed);
    m.request(
        &endpoint,
        r.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    r
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; this server answers POST /v1/embeddings, POST /v1/completions, GET /health, GET /metrics",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "wrong method: /v1/* take POST, /health and /metrics take GET",
    )
}

/// `GET /health`: 200 while serving, 503 while draining.
async fn health(State(s): State<AppState>) -> Response {
    let info = &s.engine.info;
    let draining = s.draining.load(Ordering::Relaxed);
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    api::json_response(
        status,
        &serde_json::json!({
            "status": if draining { "draining" } else { "ok" },
            "model": info.name,
            "serves": info.kind.endpoint(),
            "queue_depth": s.engine.metrics.queued.load(Ordering::Relaxed),
        }),
    )
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.engine.metrics.render(),
    )
        .into_response()
}

fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body is larger than {MAX_BODY_BYTES} bytes"
            ))
        } else {
            ApiError::new(
                status,
                format!("cannot read the request body: {}", e.body_text()),
            )
        }
    })
}

/// Refuses a request for the endpoint the model does not serve.
fn require(s: &AppState, kind: Kind) -> Result<(), ApiError> {
    let info = &s.engine.info;
    if info.kind != kind {
        return Err(ApiError::bad_request(format!(
            "model `{}` serves {} only",
            info.name,
            info.kind.endpoint()
        )));
    }
    Ok(())
}

/// Runs `f` inline for small bodies, on a blocking thread for large ones (tokenizing a
/// large body must not hold up the async workers).
async fn tokenize_on<T: Send + 'static>(
    body_len: usize,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if body_len <= INLINE_TOKENIZE_BYTES {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
}

/// `POST /v1/embeddings`.
async fn embeddings(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let req: EmbeddingsRequest = api::parse(&body)?;
    require(&s, Kind::Embeddings)?;
    if let Some(f) = req.encoding_format.as_deref().filter(|f| *f != "float") {
        return Err(ApiError::bad_request(format!(
            "encoding_format `{f}` is not supported; use \"float\""
        )));
    }
    let inputs = req.input.into_vec();
    if inputs.is_empty() {
        return Err(ApiError::bad_request("`input` is an empty list"));
    }
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::too_large(format!(
            "`input` has {} items; at most {MAX_INPUTS} per request",
            inputs.len()
        )));
    }
    let info = s.engine.info.clone();
    let limit = s.max_input_tokens;
    let cut = req.truncate;
    let seqs = tokenize_on(body.len(), move || {
        inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let Codec::Tokenizer { tokenizer, .. } = &info.codec else {
                    return Err(ApiError::internal("an encoder without a tokenizer"));
                };
                let mut ids = embed::tokenize(tokenizer, text)
                    .map_err(|e| ApiError::bad_request(format!("input {i}: {e}")))?;
                if ids.is_empty() {
                    return Err(ApiError::bad_request(format!("input {i} has no tokens")));
                }
                if ids.len() > limit {
                    if !cut {
                        return Err(ApiError::too_large(format!(
                            "input {i} has {} tokens, over the limit of {limit}; shorten it or send \"truncate\": true",
                            ids.len()
                        )));
                    }
                    embed::truncate(&mut ids, limit);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await?;
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let (reply, rx) = oneshot::channel();
    s.engine.submit(Job::Embed(EmbedJob { seqs, reply }))?;
    let rows = rx
        .await
        .map_err(|_| ApiError::shutting_down())?
        .map_err(ApiError::internal)?;
    let data = rows
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| Embedding {
            object: "embedding",
            index,
            embedding,
        })
        .collect();
    Ok(api::json_response(
        StatusCode::OK,
        &EmbeddingsResponse {
            object: "list",
            data,
            model: s.engine.info.name.clone(),
            usage: Usage {
                prompt_tokens: tokens,
                completion_tokens: None,
                total_tokens: tokens,
            },
        },
    ))
}

/// `POST /v1/completions`.
async fn completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let req: CompletionsRequest = api::parse(&body)?;
    require(&s, Kind::Completions)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "`n`: only 1 completion per request is supported",
        ));
    }
    let mut prompts = req.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::bad_request(format!(
            "`prompt`: one prompt per request, found a list of {}",
            prompts.len()
        )));
    }
    let prompt = prompts.remove(0);
    let stops = req.stop.map(api::OneOrMany::into_vec).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_request(format!(
            "`stop`: at most {MAX_STOPS} sequences, found {}",
            stops.len()
        )));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    let sampling = Sampling {
        greedy: temperature == 0.0,
        temperature: if temperature == 0.0 { 1.0 } else { temperature },
        top_k: None,
        top_p: req.top_p,
        seed: req.seed.unwrap_or(0),
    };
    sampling.validate().map_err(|e| match e {
        formers::Error::Config { key, msg } => ApiError::bad_request(format!("`{key}`: {msg}")),
        e => ApiError::bad_request(e.to_string()),
    })?;
    let max_new = req.max_tokens.unwrap_or(16);
    let info = s.engine.info.clone();
    let limit = s.max_input_tokens;
    let ids = tokenize_on(body.len(), move || {
        let ids = info
            .codec
            .encode(&prompt)
            .map_err(|e| ApiError::bad_request(format!("`prompt`: {e}")))?;
        if ids.is_empty() {
            return Err(ApiError::bad_request(
                "`prompt` has no tokens (empty or whitespace only)",
            ));
        }
        if ids.len() > limit {
            return Err(ApiError::too_large(format!(
                "`prompt` has {} tokens, over the limit of {limit}",
                ids.len()
            )));
        }
        Ok(ids)
    })
    .await?;
    let max_len = s.engine.info.max_len;
    if ids.len().checked_add(max_new).is_none_or(|n| n > max_len) {
        return Err(ApiError::bad_request(format!(
            "`max_tokens` {max_new}: the prompt's {} tokens plus {max_new} new ones exceed the model's {max_len} positions",
            ids.len()
        )));
    }
    let prompt_tokens = ids.len();
    let (events, mut rx) = mpsc::unbounded_channel();
    s.engine.submit(Job::Complete(CompleteJob {
        prompt: ids,
        max_new,
        sampling,
        stops,
        events,
    }))?;
    let id = format!("cmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = s.engine.info.name.clone();
    let response = move |text: String, finish: Option<&'static str>, usage: Option<Usage>| {
        CompletionsResponse {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            choices: vec![Choice {
                text,
                index: 0,
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        }
    };
    let usage = move |n: usize| Usage {
        prompt_tokens,
        completion_tokens: Some(n),
        total_tokens: prompt_tokens + n,
    };
    if !req.stream {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done { finish, tokens } => {
                    return Ok(api::json_response(
                        StatusCode::OK,
                        &response(text, Some(finish), Some(usage(tokens))),
                    ))
                }
                Event::Failed(msg) => return Err(ApiError::internal(msg)),
            }
        }
        return Err(ApiError::shutting_down());
    }
    // Streaming: one event per piece of text, a last one with the finish reason and usage,
    // then `[DONE]`. Dropping the stream (the client left) closes `rx`, which stops the
    // generation at its next token.
    #[derive(Clone, Copy, PartialEq)]
    enum Stage {
        Running,
        Finished,
        Over,
    }
    let stream = futures_util::stream::unfold((rx, Stage::Running), move |(mut rx, stage)| {
        let response = response.clone();
        async move {
            let (data, next) = match stage {
                Stage::Over => return None,
                Stage::Finished => ("[DONE]".to_string(), Stage::Over),
                Stage::Running => {
                    let (data, next) = match rx.recv().await {
                        Some(Event::Text(t)) => (
                            serde_json::to_string(&response(t, None, None)),
                            Stage::Running,
                        ),
                        Some(Event::Done { finish, tokens }) => (
                            serde_json::to_string(&response(
                                String::new(),
                                Some(finish),
                                Some(usage(tokens)),
                            )),
                            Stage::Finished,
                        ),
                        Some(Event::Failed(msg)) => {
                            (Ok(ApiError::internal(msg).body().to_string()), Stage::Over)
                        }
                        None => return None,
                    };
                    (
                        data.unwrap_or_else(|e| {
                            ApiError::internal(e.to_string()).body().to_string()
                        }),
                        next,
                    )
                }
            };
            Some((
                Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)),
                (rx, next),
            ))
        }
    });
    Ok(Sse::new(stream).into_response())
}

/// Serves `opts` until `shutdown` completes, then drains: no new connections, in-flight
/// requests finish (for at most `opts.grace`), the model thread ends. `on_ready` gets the
/// bound address once the model is loaded and the socket listens.
pub fn serve(
    opts: &Options,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (engine, worker) = Engine::start(
        &opts.model,
        &opts.limits,
        opts.max_queue,
        opts.max_batch_tokens,
    )?;
    let max_input_tokens = opts
        .max_input_tokens
        .unwrap_or(usize::MAX)
        .min(engine.info.max_len);
    let draining = Arc::new(AtomicBool::new(false));
    let state = AppState {
        engine: Arc::new(engine),
        max_input_tokens,
        draining: draining.clone(),
        next_id: Arc::new(AtomicU64::new(0)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("formers-http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = opts.grace;
    let addr = (opts.host.clone(), opts.port);
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {}:{}", addr.0, addr.1))?;
        on_ready(listener.local_addr()?);
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
            shutdown.await;
            draining.store(true, Ordering::Relaxed);
            let _ = started_tx.send(());
        });
        let mut server = tokio::spawn(async move { server.await });
        tokio::select! {
            r = &mut server => r.context("the server task failed")?.context("serving")?,
            _ = async {
                if started_rx.await.is_ok() {
                    tokio::time::sleep(grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                eprintln!("warning: requests still running after the {:.0} s grace period are dropped", grace.as_secs_f64());
                server.abort();
            }
        }
        anyhow::Ok(())
    });
    // Dropping the runtime drops every task, hence every sender of the queue: the model
    // thread finishes its batch and ends.
    rt.shutdown_timeout(Duration::from_secs(1));
    let _ = worker.join();
    result
}
