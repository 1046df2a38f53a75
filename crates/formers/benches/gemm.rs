//! formers' f32 matmul (`kernels::matmul_op::matmul`, over `kernels::gemm`) against
//! candle's `Tensor::matmul` on 1024³, MiniLM's linear layers and the arena's lite model
//! (forward `x·Wᵀ` and backward `g·W`, `gᵀ·x`), both on the same tensors and views.
//!
//! Both sides use 2 threads: `RAYON_NUM_THREADS` (set to 2 unless given) sizes rayon's
//! global pool, where formers' gemm runs, and is what `candle_core::utils::get_num_threads`
//! hands candle's matmul (`gemm` crate, `Parallelism::Rayon`). `CANDLE_NUM_THREADS` plays
//! no part in matmul.
//!
//! `cargo bench -p formers --bench gemm` prints criterion's times and throughput (FLOP/s as
//! "elem/s"), then a table: GFLOP/s of each side, their ratio and the share of this
//! machine's FMA peak measured in the same run.
//!
//! On a machine shared with other work, wall time counts the waits: `GEMM_BENCH_CPU=1`
//! times each side by the process's CPU time instead, on one thread (it sets
//! `RAYON_NUM_THREADS=1`), against the one-core FMA peak measured the same way.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput};
use formers::kernels::gemm::{measured_fma_peak, process_cpu_seconds};
use formers::kernels::matmul_op::matmul;

/// Seconds per call, by (shape, side): one mean per criterion sample.
static SAMPLES: Mutex<BTreeMap<(String, &'static str), Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Whether sides are timed by CPU time (`GEMM_BENCH_CPU=1`) rather than wall time.
fn cpu_mode() -> bool {
    std::env::var_os("GEMM_BENCH_CPU").is_some_and(|v| v == "1")
}

/// `name`, M, K, N, A stored transposed, B stored transposed.
type Case = (&'static str, usize, usize, usize, bool, bool);

fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = vec![("square", 1024, 1024, 1024, false, false)];
    // MiniLM (d 384, MLP 1536): x·Wᵀ for 32 sentences × 35 tokens, and for one sentence.
    for m in [1120, 35] {
        v.push(("minilm", m, 384, 384, false, true));
        v.push(("minilm", m, 384, 1536, false, true));
        v.push(("minilm", m, 1536, 384, false, true));
    }
    // Arena lite (d 64, MLP 256, batch 4): forward x·Wᵀ, backward g·W and gᵀ·x.
    for m in [1024, 4096] {
        v.push(("arena-fwd", m, 64, 64, false, true));
        v.push(("arena-fwd", m, 64, 256, false, true));
        v.push(("arena-fwd", m, 256, 64, false, true));
        v.push(("arena-dx", m, 64, 256, false, false));
        v.push(("arena-dw", 64, m, 256, true, false));
        v.push(("arena-dw", 256, m, 64, true, false));
    }
    v
}

fn operand(rows: usize, cols: usize, trans: bool, seed: u64) -> Tensor {
    let (r, c) = if trans { (cols, rows) } else { (rows, cols) };
    let t = Tensor::rand(-1f32, 1f32, (r, c), &Device::Cpu).unwrap();
    let t = (t + seed as f64 * 1e-3).unwrap();
    if trans {
        t.t().unwrap()
    } else {
        t
    }
}

fn label(c: &Case) -> String {
    let (name, m, k, n, ta, tb) = *c;
    let t = |x: bool| if x { "ᵀ" } else { "" };
    format!("{name} {m}x{k}{}·{k}x{n}{}", t(ta), t(tb))
}

fn bench(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("matmul");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(800));
    for case in cases() {
        let (_, m, k, n, ta, tb) = case;
        let a = operand(m, k, ta, 1);
        let b = operand(k, n, tb, 2);
        let id = label(&case);
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        type MatFn = fn(&Tensor, &Tensor) -> Tensor;
        let sides: [(&'static str, MatFn); 2] = [
            ("formers", |a, b| matmul(a, b).unwrap()),
            ("candle", |a, b| a.matmul(b).unwrap()),
        ];
        for (side, f) in sides {
            g.bench_with_input(BenchmarkId::new(side, &id), &(), |bch, _| {
                bch.iter_custom(|iters| {
                    let (t, c) = (Instant::now(), process_cpu_seconds());
                    for _ in 0..iters {
                        std::hint::black_box(f(&a, &b));
                    }
                    let e = if cpu_mode() {
                        Duration::from_secs_f64(process_cpu_seconds() - c)
                    } else {
                        t.elapsed()
                    };
                    SAMPLES
                        .lock()
                        .unwrap()
                        .entry((id.clone(), side))
                        .or_default()
                        .push(e.as_secs_f64() / iters as f64);
                    e
                })
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
    let peak = measured_fma_peak(0.5, cpu_mode());
    let mut cr = Criterion::default().configure_from_args();
    bench(&mut cr);
    cr.final_summary();
    let peak_after = measured_fma_peak(0.5, cpu_mode());
    let mut samples = SAMPLES.lock().unwrap();
    println!(
        "\nthreads: {threads} (formers and candle), timed by {}; measured FMA peak: {peak:.0} \
         GFLOP/s before, {peak_after:.0} after",
        if cpu_mode() { "CPU time" } else { "wall time" }
    );
    let peak = peak.max(peak_after);
    println!(
        "{:<34} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "shape (M×K·K×N)", "formers", "candle", "ratio", "f%peak", "c%peak"
    );
    for case in cases() {
        let id = label(&case);
        let (_, m, k, n, ..) = case;
        let flops = 2.0 * (m * n * k) as f64;
        let (Some(f), Some(c)) = (
            samples.get_mut(&(id.clone(), "formers")).map(|v| median(v)),
            samples.get_mut(&(id.clone(), "candle")).map(|v| median(v)),
        ) else {
            continue; // filtered out on the command line
        };
        let (gf, gc) = (flops / f / 1e9, flops / c / 1e9);
        println!(
            "{id:<34} {gf:>9.1} {gc:>9.1} {:>7.2} {:>6.0}% {:>6.0}%",
            gf / gc,
            100.0 * gf / peak,
            100.0 * gc / peak
        );
    }
}
