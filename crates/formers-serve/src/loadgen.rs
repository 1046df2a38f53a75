//! The load generator of `formers bench serve`: N concurrent clients, each on its own
//! keep-alive connection, send a fixed number of requests to a running server on this
//! machine, and the report gives throughput, latency percentiles, answers by status and
//! the server's resident memory (read from its `/metrics`). Meanwhile a thread of its own
//! asks `GET /health` every [`HEALTH_EVERY`] on a fresh connection, as a load balancer
//! would, and the report gives the slowest answer. Bounded in clients, requests and time;
//! loopback addresses only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::client::{self, Conn};

/// Most concurrent clients.
pub const MAX_CLIENTS: usize = 10_000;
/// Most requests in one run.
pub const MAX_REQUESTS: usize = 1_000_000;
/// Pause between two `/health` checks during a run.
pub const HEALTH_EVERY: Duration = Duration::from_millis(50);
/// A `/health` check not answered within this counts as failed.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/embeddings` with one sentence.
    Embeddings,
    /// `POST /v1/completions`, greedy, with one sentence as the prompt.
    Completions {
        /// `max_tokens` of each request.
        max_tokens: usize,
    },
}

/// A load run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The server (a loopback address).
    pub addr: SocketAddr,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests each client sends, one after another.
    pub requests_per_client: usize,
    /// What they send.
    pub endpoint: Endpoint,
    /// Sentences, used in turn.
    pub sentences: Vec<String>,
    /// The run stops (unsent requests are not counted) after this long.
    pub time_limit: Duration,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests answered (any status).
    pub answered: usize,
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, usize>,
    /// Requests that got no answer (connection errors).
    pub failed: usize,
    /// Wall time of the run.
    pub seconds: f64,
    /// 200 answers per second.
    pub ok_per_s: f64,
    /// Latency percentiles of 200 answers, in milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest 200 answer.
    pub max_ms: f64,
    /// Server resident memory before the run (bytes).
    pub server_rss_before: Option<u64>,
    /// Server resident memory after the run (bytes).
    pub server_rss_after: Option<u64>,
    /// Server peak resident memory since it started (bytes).
    pub server_peak_rss: Option<u64>,
    /// The run hit its time limit.
    pub timed_out: bool,
    /// `/health` checks made during the run.
    pub health_checks: usize,
    /// Checks not answered 200 within [`HEALTH_TIMEOUT`].
    pub health_failed: usize,
    /// Slowest `/health` answer during the run, in milliseconds (connect included).
    pub health_max_ms: f64,
    /// 99th percentile of the `/health` answers.
    pub health_p99_ms: f64,
}

/// `/health` checks every [`HEALTH_EVERY`] on a thread (and runtime) of its own, so the
/// load's tasks do not delay them, until `stop` is set: the time of each, `None` when it
/// failed.
fn watch_health(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Option<f64>>> {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return vec![None];
        };
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            // The timer must be made inside the runtime.
            let r = rt.block_on(async {
                tokio::time::timeout(HEALTH_TIMEOUT, client::request(addr, "GET", "/health", b""))
                    .await
            });
            out.push(match r {
                Ok(Ok(r)) if r.status == 200 => Some(t.elapsed().as_secs_f64() * 1e3),
                _ => None,
            });
            std::thread::sleep(HEALTH_EVERY);
        }
        out
    })
}

/// Value of an unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn server_memory(addr: SocketAddr) -> (Option<u64>, Option<u64>) {
    match client::request(addr, "GET", "/metrics", b"").await {
        Ok(r) if r.status == 200 => {
            let text = String::from_utf8_lossy(&r.body);
            (
                metric(&text, "process_resident_memory_bytes").map(|v| v as u64),
                metric(&text, "formers_peak_resident_memory_bytes").map(|v| v as u64),
            )
        }
        _ => (None, None),
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the load and reports.
pub fn run(opts: &LoadOptions) -> Result<LoadReport> {
    if !opts.addr.ip().is_loopback() {
        bail!("{}: the load generator only targets this machine (a loopback address such as 127.0.0.1)", opts.addr);
    }
    if opts.clients == 0 || opts.clients > MAX_CLIENTS {
        bail!(
            "--clients must be between 1 and {MAX_CLIENTS}, found {}",
            opts.clients
        );
    }
    let total = opts.clients.saturating_mul(opts.requests_per_client);
    if opts.requests_per_client == 0 || total > MAX_REQUESTS {
        bail!("--requests-per-client must be at least 1, and clients × requests at most {MAX_REQUESTS} (found {total})");
    }
    if opts.sentences.is_empty() {
        bail!("no sentences to send");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let health = client::request(opts.addr, "GET", "/health", b"")
            .await
            .with_context(|| format!("no server answers at http://{}", opts.addr))?;
        if health.status != 200 {
            bail!("http://{}/health answered {}", opts.addr, health.status);
        }
        let (rss_before, _) = server_memory(opts.addr).await;
        let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
            opts.sentences
                .iter()
                .map(|s| {
                    let v = match opts.endpoint {
                        Endpoint::Embeddings => serde_json::json!({ "input": s }),
                        Endpoint::Completions { max_tokens } => serde_json::json!({
                            "prompt": s, "max_tokens": max_tokens, "temperature": 0
                        }),
                    };
                    v.to_string().into_bytes()
                })
                .collect(),
        );
        let path = match opts.endpoint {
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Completions { .. } => "/v1/completions",
        };
        let stop_health = Arc::new(AtomicBool::new(false));
        let health = watch_health(opts.addr, stop_health.clone());
        let start = Instant::now();
        let deadline = start + opts.time_limit;
        let mut tasks = Vec::with_capacity(opts.clients);
        for c in 0..opts.clients {
            let bodies = bodies.clone();
            let (addr, n) = (opts.addr, opts.requests_per_client);
            tasks.push(tokio::spawn(async move {
                let mut out: Vec<(Option<u16>, f64)> = Vec::with_capacity(n);
                let mut conn: Option<Conn> = None;
                for i in 0..n {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let body = &bodies[(c * n + i) % bodies.len()];
                    let t = Instant::now();
                    if conn.as_ref().is_none_or(|c| !c.is_open()) {
                        conn = Conn::connect(addr).await.ok();
                    }
                    let status = match conn.as_mut() {
                        Some(k) => {
                            let left = deadline.saturating_duration_since(Instant::now());
                            match tokio::time::timeout(left, k.request("POST", path, body)).await {
                                Ok(Ok(r)) => Some(r.status),
                                _ => {
                                    conn = None;
                                    None
                                }
                            }
                        }
                        None => None,
                    };
                    out.push((status, t.elapsed().as_secs_f64()));
                }
                out
            }));
        }
        let mut by_status = BTreeMap::new();
        let mut failed = 0;
        let mut ok_latencies = Vec::new();
        for t in tasks {
            for (status, secs) in t.await.context("a client task failed")? {
                match status {
                    Some(s) => {
                        *by_status.entry(s).or_insert(0) += 1;
                        if s == 200 {
                            ok_latencies.push(secs * 1e3);
                        }
                    }
                    None => failed += 1,
                }
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        stop_health.store(true, Ordering::Relaxed);
        let health = health.join().unwrap_or_else(|_| vec![None]);
        let mut health_ms: Vec<f64> = health.iter().flatten().copied().collect();
        health_ms.sort_by(f64::total_cmp);
        let (rss_after, peak) = server_memory(opts.addr).await;
        ok_latencies.sort_by(f64::total_cmp);
        Ok(LoadReport {
            answered: by_status.values().sum(),
            by_status,
            failed,
            seconds,
            ok_per_s: ok_latencies.len() as f64 / seconds.max(1e-9),
            p50_ms: percentile(&ok_latencies, 0.50),
            p90_ms: percentile(&ok_latencies, 0.90),
            p99_ms: percentile(&ok_latencies, 0.99),
            max_ms: ok_latencies.last().copied().unwrap_or(0.0),
            server_rss_before: rss_before,
            server_rss_after: rss_after,
            server_peak_rss: peak,
            timed_out: Instant::now() >= deadline,
            health_checks: health.len(),
            health_failed: health.len() - health_ms.len(),
            health_max_ms: health_ms.last().copied().unwrap_or(0.0),
            health_p99_ms: percentile(&health_ms, 0.99),
        })
    })
}
