//! Tests of the stack, its entry points and its residual schemes.

use super::*;
use crate::testutil::{max_abs, randn};
use candle_core::Device;

fn cfg(extra: &str) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 32, "input": {{"kind": "tokens", "vocab_size": 11}},
           "head": {{"kind": "lm"}}, "causal": true, "defaults": {{"mixer": {{"kind": "attention", "q_chunk": 3, "k_chunk": 5}}}} {extra}}}"#
    ))
    .unwrap()
}

fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(11) as u32).collect()
}

/// Logits of `toks` computed at once, after checking that decoding them with the cache
/// (a prefill of `prefix` tokens, then one at a time) gives the same.
fn decodes_like_recomputation(model: &Model, toks: &[u32], prefix: usize, what: &str) -> Tensor {
    let full = model
        .forward(&ids_tensor(toks).unwrap(), None, None)
        .unwrap();
    let mut cache = Cache::default();
    let mut parts = vec![model
        .forward_cached(&ids_tensor(&toks[..prefix]).unwrap(), &mut cache)
        .unwrap()];
    for t in &toks[prefix..] {
        parts.push(
            model
                .forward_cached(&ids_tensor(&[*t]).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    assert!(
        max_abs(&full, &inc) < 1e-5,
        "{what}: {}",
        max_abs(&full, &inc)
    );
    assert_eq!(cache.len(), toks.len());
    full
}

#[test]
fn cached_decoding_equals_full_recomputation() {
    for pos in ["learned", "rope", "sinusoidal", "alibi"] {
        let cfg = cfg(&format!(r#", "position": {{"kind": "{pos}"}}"#));
        let p = Params::new(1, DType::F32, &Device::Cpu);
        let model = Model::new(&cfg, &p.frozen()).unwrap();
        let toks = ids(12, 2);
        decodes_like_recomputation(&model, &toks, 5, pos);
    }
}

#[test]
fn residual_schemes_reduce_to_plain_at_their_identity_and_decode_with_the_cache() {
    let toks = ids(12, 3);
    let run = |residual: &str| {
        let cfg = cfg(&format!(r#", "residual": {residual}"#));
        let model = Model::new(&cfg, &Params::new(1, DType::F32, &Device::Cpu).frozen()).unwrap();
        decodes_like_recomputation(&model, &toks, 4, residual)
    };
    let plain = run(r#"{"kind": "plain"}"#);
    assert!(max_abs(&plain, &run(r#"{"kind": "dense_former"}"#)) < 1e-6);
    assert!(max_abs(&plain, &run(r#"{"kind": "value_residual", "lambda": 1.0}"#)) < 1e-6);
    assert!(max_abs(&plain, &run(r#"{"kind": "value_residual", "lambda": 0.5}"#)) > 1e-4);
}

#[test]
fn residual_scheme_gradients_match_finite_differences() {
    for residual in [
        r#"{"kind": "dense_former"}"#,
        r#"{"kind": "value_residual", "lambda": 0.3}"#,
    ] {
        let cfg = ModelConfig::from_json(&format!(
            r#"{{"d_model": 8, "n_heads": 2, "n_layers": 3, "max_len": 8, "input": {{"kind": "bytes"}}, "residual": {residual},
               "head": {{"kind": "classification", "n_classes": 3, "pooling": "mean"}},
               "defaults": {{"ffn": {{"kind": "mlp", "hidden": 8}}}}}}"#
        ))
        .unwrap();
        let p = Params::new(6, DType::F64, &Device::Cpu);
        let model = Model::new(&cfg, &p).unwrap();
        // Move the DenseFormer weights off the identity so every term matters.
        for (name, var) in p.vars() {
            if name.starts_with("dwa.") {
                let n = var.elem_count();
                let v: Vec<f64> = (0..n).map(|j| 0.3 + 0.2 * j as f64).collect();
                var.set(&Tensor::from_vec(v, n, &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let h = randn(&[2, 5, 8], 8);
        crate::testutil::check_grad(&p, &h, |h| {
            let ctx = MixCtx {
                value_residual: model.value_residual(),
                ..MixCtx::default()
            };
            let out = model.stack(h.clone(), &ctx, &mut [], None, |_| Ok(()))?;
            model.head(&out, None)
        });
    }
}

/// Every mixer kind that has a causal form, with a few extra settings per kind.
fn causal_mixers() -> Vec<crate::mixer::MixerSpec> {
    let mut all: Vec<_> = crate::mixer::MixerSpec::examples()
        .into_iter()
        .filter(|m| m.kind().capabilities().causal)
        .collect();
    for extra in [
        r#"{"kind": "local", "window": 3, "global": 2, "chunk": 4}"#,
        r#"{"kind": "local", "window": 1, "chunk": 3}"#,
        r#"{"kind": "linear", "feature": "elu", "chunk": 4}"#,
        r#"{"kind": "pool", "window": 4}"#,
    ] {
        all.push(serde_json::from_str(extra).unwrap());
    }
    all
}

#[test]
fn every_causal_mixer_decodes_with_its_cache_like_recomputation() {
    let toks = ids(14, 5);
    for mixer in causal_mixers() {
        for pos in ["learned", "alibi"] {
            if pos == "alibi" && !mixer.kind().capabilities().alibi {
                continue;
            }
            let mut cfg = cfg(&format!(
                r#", "residual": {{"kind": "value_residual"}}, "position": {{"kind": "{pos}"}}"#
            ));
            cfg.defaults.mixer = mixer.clone();
            cfg.validate().unwrap();
            let model =
                Model::new(&cfg, &Params::new(2, DType::F32, &Device::Cpu).frozen()).unwrap();
            decodes_like_recomputation(&model, &toks, 5, &format!("{mixer:?} {pos}"));
        }
    }
}

#[test]
fn no_causal_mixer_sees_the_future() {
    for mixer in causal_mixers() {
        let mut cfg = cfg("");
        cfg.defaults.mixer = mixer.clone();
        let model = Model::new(&cfg, &Params::new(3, DType::F32, &Device::Cpu)).unwrap();
        let a = ids(12, 4);
        let mut b = a.clone();
        b[7] = (b[7] + 1) % 11;
        let la = model.forward(&ids_tensor(&a).unwrap(), None, None).unwrap();
        let lb = model.forward(&ids_tensor(&b).unwrap(), None, None).unwrap();
        let past = max_abs(&la.narrow(1, 0, 7).unwrap(), &lb.narrow(1, 0, 7).unwrap());
        assert!(past == 0.0, "{mixer:?}: earlier logits moved by {past}");
        let now = max_abs(&la.narrow(1, 7, 5).unwrap(), &lb.narrow(1, 7, 5).unwrap());
        assert!(now > 1e-4, "{mixer:?}: the changed token changed nothing");
    }
}

#[test]
fn a_sliding_window_cache_keeps_only_the_window_and_the_global_keys() {
    let mut cfg = cfg("");
    cfg.defaults.mixer =
        serde_json::from_str(r#"{"kind": "local", "window": 3, "global": 2, "chunk": 4}"#).unwrap();
    let model = Model::new(&cfg, &Params::new(2, DType::F32, &Device::Cpu).frozen()).unwrap();
    let toks = ids(20, 6);
    decodes_like_recomputation(&model, &toks, 6, "local");
    let mut cache = Cache::default();
    for t in &toks {
        model
            .forward_cached(&ids_tensor(&[*t]).unwrap(), &mut cache)
            .unwrap();
    }
    for layer in &cache.layers {
        let held: Vec<usize> = layer.tensors.iter().map(|t| t.dim(2).unwrap()).collect();
        assert_eq!(
            held,
            vec![2, 2, 3, 3],
            "global keys, global values, window keys, values"
        );
    }
}

#[test]
fn a_causal_model_refuses_mixers_without_a_causal_form() {
    for mixer in crate::mixer::MixerSpec::examples() {
        let mut cfg = cfg("");
        cfg.layers.insert(
            "1".into(),
            crate::config::LayerOverride {
                mixer: Some(mixer.clone()),
                ..Default::default()
            },
        );
        let name = mixer.kind().name();
        match (cfg.validate(), mixer.kind().capabilities().causal) {
            (Ok(()), true) => {}
            (Err(e), false) => {
                let e = e.to_string();
                assert!(e.contains("layers.1.mixer") && e.contains(name), "{e}");
            }
            (r, _) => panic!("{name}: {r:?}"),
        }
    }
}

#[test]
fn decoding_an_encoder_is_refused() {
    let mut cfg = cfg("");
    cfg.causal = false;
    let model = Model::new(&cfg, &Params::new(2, DType::F32, &Device::Cpu).frozen()).unwrap();
    let e = model
        .forward_cached(&ids_tensor(&[1, 2]).unwrap(), &mut Cache::default())
        .unwrap_err();
    assert!(e.to_string().contains("causal"), "{e}");
}

#[test]
fn masformer_with_windows_covering_the_input_equals_all_full_attention() {
    let full_cfg = cfg("");
    let mut mixed = full_cfg.clone();
    // MASFormer: full attention at layer 0, sliding windows at layer 1 (window >= n).
    mixed.layers.insert(
        "1".into(),
        serde_json::from_str(r#"{"mixer": {"kind": "local", "window": 32, "chunk": 5}}"#).unwrap(),
    );
    let a = Model::new(
        &full_cfg,
        &Params::new(8, DType::F32, &Device::Cpu).frozen(),
    )
    .unwrap();
    let b = Model::new(&mixed, &Params::new(8, DType::F32, &Device::Cpu).frozen()).unwrap();
    let x = ids_tensor(&ids(20, 9)).unwrap();
    let (ya, yb) = (
        a.forward(&x, None, None).unwrap(),
        b.forward(&x, None, None).unwrap(),
    );
    assert!(max_abs(&ya, &yb) < 1e-5);
}

#[test]
fn causal_outputs_do_not_see_the_future() {
    let cfg = cfg("");
    let model = Model::new(&cfg, &Params::new(3, DType::F32, &Device::Cpu).frozen()).unwrap();
    let a = ids(10, 4);
    let mut b = a.clone();
    b[7] = (b[7] + 1) % 11;
    let la = model.forward(&ids_tensor(&a).unwrap(), None, None).unwrap();
    let lb = model.forward(&ids_tensor(&b).unwrap(), None, None).unwrap();
    assert!(max_abs(&la.narrow(1, 0, 7).unwrap(), &lb.narrow(1, 0, 7).unwrap()) < 1e-6);
    assert!(max_abs(&la.narrow(1, 7, 3).unwrap(), &lb.narrow(1, 7, 3).unwrap()) > 1e-4);
}

#[test]
fn padding_does_not_change_pooled_outputs() {
    let cfg = ModelConfig::from_json(
        r#"{"d_model": 16, "n_heads": 4, "n_layers": 2, "input": {"kind": "tokens", "vocab_size": 11},
           "head": {"kind": "embedding"}, "defaults": {"mixer": {"kind": "attention", "q_chunk": 4, "k_chunk": 3}}}"#,
    )
    .unwrap();
    let model = Model::new(&cfg, &Params::new(5, DType::F32, &Device::Cpu).frozen()).unwrap();
    let short = ids(6, 7);
    let mut padded = short.clone();
    padded.extend([3, 3, 3]);
    let alone = model
        .forward(&ids_tensor(&short).unwrap(), None, None)
        .unwrap();
    let mask = Tensor::from_vec(
        vec![1f32, 1., 1., 1., 1., 1., 0., 0., 0.],
        (1, 9),
        &Device::Cpu,
    )
    .unwrap();
    let batched = model
        .forward(&ids_tensor(&padded).unwrap(), Some(&mask), None)
        .unwrap();
    assert!(max_abs(&alone, &batched) < 1e-5);
    let norm = alone
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((norm - 1.0).abs() < 1e-5);
}

/// The matching head is the two documents encoded on their own (an embedding model on
/// the same weights), each with its own padding, then `[u, v, u⊙v, |u−v|]` → linear.
#[test]
fn a_matching_head_encodes_each_document_alone() {
    let json = |head: &str| {
        ModelConfig::from_json(&format!(
            r#"{{"d_model": 8, "n_heads": 2, "n_layers": 2, "max_len": 5, "input": {{"kind": "tokens", "vocab_size": 11}},
               "head": {head}}}"#
        ))
        .unwrap()
    };
    let p = Params::new(4, DType::F32, &Device::Cpu);
    let matching = Model::new(
        &json(r#"{"kind": "matching", "n_classes": 3, "pooling": "mean"}"#),
        &p,
    )
    .unwrap();
    let encoder = Model::new(&json(r#"{"kind": "embedding", "normalize": false}"#), &p).unwrap();
    // Pair 0: documents of 3 and 5 tokens; pair 1: 5 and 2 (padding after each).
    let docs: [&[u32]; 4] = [&[1, 2, 3], &[4, 5, 6, 7, 8], &[9, 1, 2, 3, 4], &[5, 6]];
    let (mut flat, mut mask) = (Vec::new(), Vec::new());
    for doc in docs {
        for i in 0..5 {
            flat.push(doc.get(i).copied().unwrap_or(10));
            mask.push(if i < doc.len() { 1f32 } else { 0. });
        }
    }
    let ids = Tensor::from_vec(flat, (2, 10), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (2, 10), &Device::Cpu).unwrap();
    let logits = matching.forward(&ids, Some(&mask), None).unwrap();
    assert_eq!(logits.dims(), &[2, 3]);
    let w = p.tensors()["head.weight"].clone();
    let b = p.tensors()["head.bias"].clone();
    assert_eq!(w.dims(), &[3, 32]);
    for (pair, docs) in docs.chunks(2).enumerate() {
        let [u, v] = [docs[0], docs[1]].map(|d| {
            encoder
                .forward(&ids_tensor(d).unwrap(), None, None)
                .unwrap()
                .squeeze(0)
                .unwrap()
        });
        let features = Tensor::cat(
            &[
                &u,
                &v,
                &(&u * &v).unwrap(),
                &(&u - &v).unwrap().abs().unwrap(),
            ],
            0,
        )
        .unwrap();
        let expect = (w
            .matmul(&features.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            + &b)
            .unwrap();
        let got = logits.get(pair).unwrap();
        assert!(max_abs(&got, &expect) < 1e-5, "pair {pair}");
    }
    // An odd length cannot be two documents; nor is a packed batch a pair.
    let odd = Tensor::from_vec(vec![1u32; 9], (1, 9), &Device::Cpu).unwrap();
    let err = matching.forward(&odd, None, None).unwrap_err().to_string();
    assert!(err.contains("odd"), "{err}");
    let packed = Packed::new(&[vec![1u32, 2]]).unwrap();
    assert!(matching.forward_packed(&packed).is_err());
}

fn encoder(position: &str, causal: bool) -> Model {
    let cfg = ModelConfig::from_json(&format!(
        r#"{{"d_model": 12, "n_heads": 2, "n_layers": 2, "max_len": 16, "input": {{"kind": "tokens", "vocab_size": 11}},
           "type_vocab_size": 2, "embed_norm": true, "position": {{"kind": "{position}"}},
           "head": {{"kind": "embedding"}}, "causal": {causal}, "defaults": {{"placement": "post", "mixer": {{"kind": "attention", "q_chunk": 3, "k_chunk": 4}}}}}}"#
    ))
    .unwrap();
    Model::new(&cfg, &Params::new(11, DType::F32, &Device::Cpu).frozen()).unwrap()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    #[test]
    fn packed_and_padded_batches_equal_one_at_a_time(
        lens in proptest::collection::vec(1usize..=16, 1..6),
        seed in 0u64..1000,
        rope in proptest::bool::ANY,
        causal in proptest::bool::ANY,
    ) {
        let model = encoder(if rope { "rope" } else { "learned" }, causal);
        let seqs: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| ids(n, seed + i as u64)).collect();
        let packed = Packed::new(&seqs).unwrap();
        let h = model.hidden_packed(&packed).unwrap();
        let emb = model.forward_packed(&packed).unwrap();
        let longest = *lens.iter().max().unwrap();
        let mut padded_ids = Vec::new();
        let mut mask = Vec::new();
        for s in &seqs {
            padded_ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, longest - s.len())));
            mask.extend((0..longest).map(|j| if j < s.len() { 1f32 } else { 0. }));
        }
        let padded_ids = Tensor::from_vec(padded_ids, (seqs.len(), longest), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(mask, (seqs.len(), longest), &Device::Cpu).unwrap();
        let padded = model.hidden(&padded_ids, Some(&mask), None, None).unwrap();
        for (i, (s, &(start, len))) in seqs.iter().zip(&packed.segments).enumerate() {
            let alone = model.hidden(&ids_tensor(s).unwrap(), None, None, None).unwrap().squeeze(0).unwrap();
            proptest::prop_assert!(max_abs(&alone, &h.narrow(0, start, len).unwrap()) < 1e-5);
            let row = padded.get(i).unwrap().narrow(0, 0, len).unwrap();
            proptest::prop_assert!(max_abs(&alone, &row) < 1e-5);
            let e = model.forward(&ids_tensor(s).unwrap(), None, None).unwrap();
            proptest::prop_assert!(max_abs(&e, &emb.narrow(0, i, 1).unwrap()) < 1e-5);
        }
    }
}

#[test]
fn model_gradients_match_finite_differences() {
    let cfg = ModelConfig::from_json(
        r#"{"d_model": 8, "n_heads": 2, "n_layers": 2, "max_len": 8, "input": {"kind": "bytes"},
           "head": {"kind": "classification", "n_classes": 3, "pooling": "mean"},
           "defaults": {"mixer": {"kind": "attention", "q_chunk": 2, "k_chunk": 3}, "ffn": {"kind": "mlp", "hidden": 8}}}"#,
    )
    .unwrap();
    let p = Params::new(6, DType::F64, &Device::Cpu);
    let model = Model::new(&cfg, &p).unwrap();
    let h = randn(&[2, 5, 8], 8);
    // The head and the stack from hidden states on: all parameters but the embeddings.
    crate::testutil::check_grad(&p, &h, |h| {
        let mut x = h.clone();
        for b in &model.blocks {
            x = b.forward(&x, &MixCtx::default(), &mut [], None)?.out;
        }
        model.head(&model.final_norm.as_ref().unwrap().forward(&x)?, None)
    });
}

#[test]
fn too_long_input_is_an_error_not_a_panic() {
    let model = Model::new(&cfg(""), &Params::new(1, DType::F32, &Device::Cpu)).unwrap();
    let e = model
        .forward(&ids_tensor(&ids(33, 1)).unwrap(), None, None)
        .unwrap_err();
    assert!(e.to_string().contains("max_len 32"), "{e}");
}
