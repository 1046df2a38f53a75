//! `formers bench serve`: load a running `formers serve` and report its throughput, latency
//! and memory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{sentences_of, write_json};

/// Flags of `formers bench serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The server's address (loopback only)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Concurrent clients
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Requests each client sends, one after another
    #[arg(long, default_value_t = 20)]
    pub requests_per_client: usize,
    /// Send completions (greedy, this many tokens each) instead of embeddings
    #[arg(long, value_name = "TOKENS")]
    pub completions: Option<usize>,
    /// One sentence per line [default: the shipped data/sentences.txt, 999 KJV verses]
    #[arg(long, value_name = "FILE")]
    pub sentences: Option<PathBuf>,
    /// Stop after this many seconds (requests not sent by then are not counted)
    #[arg(long, default_value_t = 600)]
    pub time_limit: u64,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Runs `bench serve` against the server at `--addr` and prints its report.
pub(super) fn run(a: ServeArgs) -> Result<()> {
    use formers_serve::loadgen::{self, Endpoint, LoadOptions};
    let opts = LoadOptions {
        addr: a.addr,
        clients: a.clients,
        requests_per_client: a.requests_per_client,
        endpoint: match a.completions {
            Some(max_tokens) => Endpoint::Completions { max_tokens },
            None => Endpoint::Embeddings,
        },
        sentences: sentences_of(a.sentences.as_deref())?,
        time_limit: std::time::Duration::from_secs(a.time_limit),
    };
    let r = loadgen::run(&opts)?;
    let mib = |b: Option<u64>| {
        b.map_or("-".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    println!(
        "{} clients x {} requests: {} answered in {:.2} s{}",
        a.clients,
        a.requests_per_client,
        r.answered,
        r.seconds,
        if r.timed_out {
            " (time limit reached)"
        } else {
            ""
        }
    );
    println!("| 200/s | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        r.ok_per_s, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
    );
    let statuses: Vec<String> = r
        .by_status
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!(
        "answers by status: {}; no answer (connection errors, timeouts): {}",
        statuses.join(", "),
        r.failed
    );
    println!(
        "/health during the load: {} checks, {} failed, p99 {:.1} ms, max {:.1} ms",
        r.health_checks, r.health_failed, r.health_p99_ms, r.health_max_ms
    );
    println!(
        "server RSS: {} before, {} after, {} peak since start",
        mib(r.server_rss_before),
        mib(r.server_rss_after),
        mib(r.server_peak_rss)
    );
    write_json(a.json.as_deref(), &[serde_json::to_value(&r)?])
}
