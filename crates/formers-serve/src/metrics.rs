//! What `GET /metrics` reports, in the Prometheus text exposition format (version 0.0.4):
//! requests and their statuses, queue depth, batch sizes, tokens, latencies, cancelled
//! work and the process's memory.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A histogram with fixed upper bounds.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SEQUENCES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const TOKENS: &[f64] = &[
    16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0,
];

#[derive(Debug)]
struct Inner {
    /// (endpoint, status) → count.
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch_sequences: Histogram,
    batch_tokens: Histogram,
    batch_seconds: Histogram,
}

/// The server's counters; shared by the HTTP side and the model thread.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Requests waiting in the queue.
    pub queued: AtomicUsize,
    /// Requests being answered (accepted and not yet finished).
    pub in_flight: AtomicUsize,
    /// Input tokens embedded.
    pub embedded_tokens: AtomicU64,
    /// Tokens of prompts read for completions.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Requests whose client left before the work was done (work skipped or stopped).
    pub cancelled: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                batch_sequences: Histogram::new(SEQUENCES),
                batch_tokens: Histogram::new(TOKENS),
                batch_seconds: Histogram::new(LATENCY),
            }),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            embedded_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind: keep counting.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One answered request: its endpoint, status and time from arrival to the response.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        let mut m = self.lock();
        *m.requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        m.latency
            .entry(endpoint.to_string())
            .or_insert_with(|| Histogram::new(LATENCY))
            .observe(seconds);
    }

    /// One model batch of `sequences` holding `tokens`, computed in `seconds`.
    pub fn batch(&self, sequences: usize, tokens: usize, seconds: f64) {
        let mut m = self.lock();
        m.batch_sequences.observe(sequences as f64);
        m.batch_tokens.observe(tokens as f64);
        m.batch_seconds.observe(seconds);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "formers_requests_total",
            "counter",
            "Requests answered, by endpoint and HTTP status.",
        );
        for ((endpoint, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "formers_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        head(
            &mut out,
            "formers_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response head, by endpoint.",
        );
        for (endpoint, h) in &m.latency {
            h.write(
                &mut out,
                "formers_request_duration_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        head(
            &mut out,
            "formers_batch_sequences",
            "histogram",
            "Sequences per model batch: an embedding batch or a decoding step of completions.",
        );
        m.batch_sequences
            .write(&mut out, "formers_batch_sequences", "");
        head(
            &mut out,
            "formers_batch_tokens",
            "histogram",
            "Tokens per model batch (a decoding step counts the tokens it feeds).",
        );
        m.batch_tokens.write(&mut out, "formers_batch_tokens", "");
        head(
            &mut out,
            "formers_batch_duration_seconds",
            "histogram",
            "Model time per model batch.",
        );
        m.batch_seconds
            .write(&mut out, "formers_batch_duration_seconds", "");
        drop(m);
        let gauges: [(&str, &str, &str, u64); 7] = [
            (
                "formers_queue_depth",
                "gauge",
                "Requests waiting for the model.",
                self.queued.load(Ordering::Relaxed) as u64,
            ),
            (
                "formers_requests_in_flight",
                "gauge",
                "Requests accepted and not yet answered.",
                self.in_flight.load(Ordering::Relaxed) as u64,
            ),
            (
                "formers_embedded_tokens_total",
                "counter",
                "Input tokens embedded.",
                self.embedded_tokens.load(Ordering::Relaxed),
            ),
            (
                "formers_prompt_tokens_total",
                "counter",
                "Prompt tokens read for completions.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "formers_generated_tokens_total",
                "counter",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "formers_cancelled_total",
                "counter",
                "Requests whose client left before their work was done.",
                self.cancelled.load(Ordering::Relaxed),
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the server process.",
                rss_bytes("VmRSS:").unwrap_or(0),
            ),
        ];
        for (name, kind, help, v) in gauges {
            head(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
        head(
            &mut out,
            "formers_peak_resident_memory_bytes",
            "gauge",
            "Peak resident memory of the server process.",
        );
        let _ = writeln!(
            out,
            "formers_peak_resident_memory_bytes {}",
            rss_bytes("VmHWM:").unwrap_or(0)
        );
        out
    }
}

/// A memory field of `/proc/self/status` (`VmRSS:`, `VmHWM:`) in bytes (Linux only).
pub fn rss_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(5.0);
        let mut s = String::new();
        h.write(&mut s, "x", "");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }
}
