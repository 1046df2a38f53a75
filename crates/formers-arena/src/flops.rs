//! Analytical forward FLOPs per input token of a model at sequence length `n`: two FLOPs per
//! multiply-add of the matrix products (projections, scores, mixing, MLP); norms,
//! activations and softmax exponentials are left out, as is usual (Kaplan et al. 2020).

use formers::config::{HeadSpec, ModelConfig};
use formers::ffn::{Activation, FfnSpec};

/// Forward FLOPs per token of `cfg` on sequences of `n` tokens.
pub fn per_token(cfg: &ModelConfig, n: usize) -> f64 {
    let d = cfg.d_model as f64;
    let mut total = 0.0;
    for i in 0..cfg.n_layers {
        let layer = cfg.layer(i);
        total += layer.mixer.kind().flops_per_token(&cfg.mixer_dims(), n);
        total += ffn(&layer.ffn, cfg.d_model);
    }
    total
        + match &cfg.head {
            HeadSpec::Lm { .. } => 2.0 * d * cfg.input.vocab_size() as f64,
            // One pooled vector per sequence: its classifier is shared by all n tokens.
            HeadSpec::Classification { n_classes, .. } => 2.0 * d * *n_classes as f64 / n as f64,
            // Two documents of n tokens share one classifier over 4d features.
            HeadSpec::Matching { n_classes, .. } => 4.0 * d * *n_classes as f64 / n as f64,
            HeadSpec::Embedding { .. } => 0.0,
        }
}

/// A `d_in × d_out` projection, optionally factorised through rank `r`.
fn matmul(d_in: f64, d_out: f64, rank: Option<usize>) -> f64 {
    match rank {
        Some(r) => 2.0 * r as f64 * (d_in + d_out),
        None => 2.0 * d_in * d_out,
    }
}

fn ffn(spec: &FfnSpec, d_model: usize) -> f64 {
    let d = d_model as f64;
    match spec {
        FfnSpec::Mlp {
            activation, rank, ..
        } => {
            let h = spec.hidden(d_model) as f64;
            let up = if *activation == Activation::Swiglu {
                2.0
            } else {
                1.0
            };
            up * matmul(d, h, *rank) + matmul(h, d, *rank)
        }
        FfnSpec::MatFormer {
            granularities,
            active,
            ..
        } => {
            let full = spec.hidden(d_model) as f64;
            let g = active
                .and_then(|i| granularities.get(i))
                .or(granularities.last())
                .copied()
                .unwrap_or(1.0);
            let h = (g * full).ceil();
            2.0 * matmul(d, h, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mixer: &str, ffn: &str) -> ModelConfig {
        serde_json::from_str(&format!(
            r#"{{"d_model": 64, "n_heads": 4, "n_layers": 2, "max_len": 1024,
                "input": {{"kind": "bytes"}},
                "head": {{"kind": "classification", "n_classes": 2, "pooling": "mean"}},
                "defaults": {{"mixer": {mixer}, "ffn": {ffn}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn dense_transformer_matches_the_textbook_count() {
        // Per layer: 4 projections 8d², scores + mixing 4nd, MLP 16d² (hidden 4d).
        let c = cfg(r#"{"kind": "attention"}"#, r#"{"kind": "mlp"}"#);
        let (d, n) = (64.0, 1024.0);
        let want = 2.0 * (8.0 * d * d + 4.0 * n * d + 16.0 * d * d) + 2.0 * d * 2.0 / n;
        assert!((per_token(&c, 1024) - want).abs() < 1e-6);
    }

    #[test]
    fn efficient_mixers_do_not_grow_with_length_and_attention_does() {
        let mlp = r#"{"kind": "mlp"}"#;
        let grows = |m: &str| {
            let c = cfg(m, mlp);
            per_token(&c, 4096) - per_token(&c, 256)
        };
        assert!(grows(r#"{"kind": "attention"}"#) > 1e6);
        for m in [
            r#"{"kind": "local", "window": 32}"#,
            r#"{"kind": "linear", "feature": "elu"}"#,
            r#"{"kind": "linear", "feature": "favor"}"#,
            r#"{"kind": "linformer", "k": 64}"#,
            r#"{"kind": "flow"}"#,
            r#"{"kind": "pool"}"#,
        ] {
            assert!(grows(m).abs() < 1.0, "{m}: {}", grows(m));
        }
        let lrt = cfg(r#"{"kind": "attention"}"#, r#"{"kind": "mlp", "rank": 8}"#);
        assert!(per_token(&lrt, 256) < per_token(&cfg(r#"{"kind": "attention"}"#, mlp), 256));
    }
}
