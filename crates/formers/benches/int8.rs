//! formers' int8 weight matmul (`kernels::int8::Int8Matrix::matmul`: x quantised per row on
//! the fly, exact integer dot products) against candle's f32 `x.matmul(&w.t())`, on
//! MiniLM's linear layers (d 384, MLP 1536) for one sentence (m = 16) and 32 (m = 512);
//! beside them formers' block formats (`kernels::blockq`, Q8_0 and Q4_0) and candle's own
//! quantised matmul (`QMatMul` of GGML Q8_0 / Q4_0), the library path a user would try
//! first.
//!
//! Both sides use 2 threads: `RAYON_NUM_THREADS` (set to 2 unless given) sizes rayon's
//! global pool, where the int8 kernel runs, and is what candle's matmul is handed. Each int8
//! call pays what a model would: the quantisation of x and a fresh output buffer.
//!
//! `cargo bench -p formers --bench int8` prints criterion's times, then a table: µs per call
//! of each side (median of criterion's samples) and their ratio.
//!
//! On a machine shared with other work, wall time counts the waits: `INT8_BENCH_CPU=1`
//! times each side by the process's CPU time instead, on one thread (it sets
//! `RAYON_NUM_THREADS=1`), as `GEMM_BENCH_CPU=1` does for `benches/gemm.rs`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput};
use formers::kernels::blockq::{BlockKind, BlockMatrix};
use formers::kernels::gemm::process_cpu_seconds;
use formers::kernels::int8::Int8Matrix;

/// Seconds per call, by (shape, side): one mean per criterion sample.
static SAMPLES: Mutex<BTreeMap<(String, &'static str), Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Whether sides are timed by CPU time (`INT8_BENCH_CPU=1`) rather than wall time.
fn cpu_mode() -> bool {
    std::env::var_os("INT8_BENCH_CPU").is_some_and(|v| v == "1")
}

/// M, K (in), N (out).
type Case = (usize, usize, usize);

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for m in [16, 512] {
        for (k, n) in [(384, 1536), (1536, 384), (384, 384)] {
            v.push((m, k, n));
        }
    }
    v
}

fn label(&(m, k, n): &Case) -> String {
    format!("{m}x{k}·({n}x{k})ᵀ")
}

/// Times `f` into [`SAMPLES`] under (`id`, `side`).
fn timed(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    id: &str,
    side: &'static str,
    mut f: impl FnMut(),
) {
    g.bench_with_input(BenchmarkId::new(side, id), &(), |bch, _| {
        bch.iter_custom(|iters| {
            let (t, c) = (Instant::now(), process_cpu_seconds());
            for _ in 0..iters {
                f();
            }
            let e = if cpu_mode() {
                Duration::from_secs_f64(process_cpu_seconds() - c)
            } else {
                t.elapsed()
            };
            SAMPLES
                .lock()
                .unwrap()
                .entry((id.to_string(), side))
                .or_default()
                .push(e.as_secs_f64() / iters as f64);
            e
        })
    });
}

fn bench(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("int8");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for case in cases() {
        let (m, k, n) = case;
        let x = Tensor::rand(-1f32, 1f32, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::rand(-0.1f32, 0.1f32, (n, k), &Device::Cpu).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = Int8Matrix::quantize(&ws, n, k);
        let id = label(&case);
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        timed(&mut g, &id, "candle-f32", || {
            std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
        });
        timed(&mut g, &id, "int8", || {
            let mut out = vec![0f32; m * n];
            q.matmul(&xs, m, None, &mut out);
            std::hint::black_box(out);
        });
        for (side, kind) in [("q8_0", BlockKind::Q8_0), ("q4_0", BlockKind::Q4_0)] {
            let bq = BlockMatrix::quantize(kind, &ws, n, k);
            timed(&mut g, &id, side, || {
                let mut out = vec![0f32; m * n];
                bq.matmul(&xs, m, None, &mut out);
                std::hint::black_box(out);
            });
        }
        for (side, dtype) in [
            ("candle-q8_0", GgmlDType::Q8_0),
            ("candle-q4_0", GgmlDType::Q4_0),
        ] {
            let qm = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            timed(&mut g, &id, side, || {
                std::hint::black_box(qm.forward(&x).unwrap());
            });
        }
    }
    g.finish();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if cpu_mode() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let threads = rayon::current_num_threads();
    assert_eq!(threads, candle_core::utils::get_num_threads());
    let mut cr = Criterion::default().configure_from_args();
    bench(&mut cr);
    cr.final_summary();
    let mut samples = SAMPLES.lock().unwrap();
    println!(
        "\nthreads: {threads} (int8 and candle), timed by {}",
        if cpu_mode() { "CPU time" } else { "wall time" }
    );
    println!(
        "{:<24} {:>10} {:>10} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "shape (M×K·(N×K)ᵀ)",
        "candle µs",
        "int8 µs",
        "speed-up",
        "q8_0 µs",
        "q4_0 µs",
        "candle q8_0",
        "candle q4_0"
    );
    for case in cases() {
        let id = label(&case);
        let mut side = |s| samples.get_mut(&(id.clone(), s)).map(|v| median(v));
        let (c, q) = (side("candle-f32"), side("int8"));
        let us = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{:.1}", t * 1e6));
        let ratio = match (c, q) {
            (Some(c), Some(q)) => format!("{:.2}", c / q),
            _ => "-".to_string(), // a side filtered out on the command line
        };
        let (q8, q4) = (side("q8_0"), side("q4_0"));
        let (c8, c4) = (side("candle-q8_0"), side("candle-q4_0"));
        println!(
            "{id:<24} {:>10} {:>10} {ratio:>8} {:>10} {:>10} {:>12} {:>12}",
            us(c),
            us(q),
            us(q8),
            us(q4),
            us(c8),
            us(c4)
        );
    }
}
