//! Test helpers: seeded tensors and a finite-difference gradient check in f64.

use candle_core::{DType, Device, Tensor, Var};

use crate::params::Params;
use crate::rng::Rng;
use crate::Result;

/// Deterministic f32 values in [-1, 1) from `seed` (for kernels on plain slices).
/// The path of a checkpoint under `tests/fixtures` (`tiny-bert`, `tiny-gpt2`).
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn uniform(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A standard-normal f64 tensor from `seed`.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest absolute difference between two tensors of one float dtype.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Largest absolute difference between `got` and `want`, over the largest magnitude of
/// `want` (any float dtype).
pub fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (f(got), f(want));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Checks autodiff gradients of `sum(f(x) * R)` (fixed random `R`) with respect to every
/// parameter in `p` and to `x` against central finite differences, on a few entries each.
pub fn check_grad(p: &Params, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
    assert_eq!(x.dtype(), DType::F64, "gradient checks run in f64");
    let xv = Var::from_tensor(x).unwrap();
    let out = f(xv.as_tensor()).unwrap();
    let r = randn(out.dims(), 99);
    let loss_of = || -> f64 {
        (f(xv.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut vars = p.vars();
    vars.push(("input".to_string(), xv.clone()));
    let h = 1e-6;
    for (name, var) in vars {
        let dims = var.dims().to_vec();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; base.len()],
        };
        let step = (base.len() / 5).max(1);
        for i in (0..base.len()).step_by(step).take(6) {
            let mut plus = base.clone();
            plus[i] += h;
            var.set(&Tensor::from_vec(plus, dims.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let lp = loss_of();
            let mut minus = base.clone();
            minus[i] -= h;
            var.set(&Tensor::from_vec(minus, dims.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let lm = loss_of();
            var.set(&Tensor::from_vec(base.clone(), dims.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let fd = (lp - lm) / (2.0 * h);
            let tol = 1e-6 + 1e-5 * fd.abs().max(g[i].abs());
            assert!(
                (fd - g[i]).abs() <= tol,
                "{name}[{i}]: autodiff {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}
