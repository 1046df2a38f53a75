//! Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio · lr`
//! (Loshchilov & Hutter 2017, SGDR, without restarts).

/// Learning rate at `step` (0-based) of `total`.
pub fn lr_at(step: usize, total: usize, peak: f64, warmup: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_the_floor() {
        assert!((lr_at(0, 100, 1.0, 10, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 1.0, 10, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 1.0, 10, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 1.0, 10, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 100, 1.0, 10, 0.1) - 0.1).abs() < 1e-12);
        let lrs: Vec<f64> = (10..100).map(|s| lr_at(s, 100, 1.0, 10, 0.1)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }
}
