//! Parity with Hugging Face `transformers` on the tiny random-weight checkpoints that
//! `scripts/make_fixtures.py` made (tests/fixtures/tiny-{bert,gpt2}), and clear errors
//! on broken checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use formers::generate::{generate, Sampling};
use formers::model::{ids_tensor, Packed};
use formers::pretrained;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

struct Reference {
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn reference(name: &str) -> Reference {
    let dir = fixture(name);
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    Reference { json, tensors }
}

impl Reference {
    fn ids(&self) -> Vec<Vec<u32>> {
        serde_json::from_value(self.json["ids"].clone()).unwrap()
    }
    fn texts(&self) -> Vec<String> {
        serde_json::from_value(self.json["texts"].clone()).unwrap()
    }
    fn t(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn bert_matches_transformers_alone_packed_and_padded() {
    let p = pretrained::load(&fixture("tiny-bert")).unwrap();
    assert_eq!(p.family.name(), "bert");
    assert_eq!(
        p.config.head_dim(),
        12,
        "the fixture's head dimension is not a power of two"
    );
    let r = reference("tiny-bert");
    let ids = r.ids();
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    assert!(
        lengths.contains(&5) && lengths.iter().any(|&n| n > 50),
        "{lengths:?}"
    );
    for (i, (text, expect)) in r.texts().iter().zip(&ids).enumerate() {
        assert_eq!(
            &pretrained::encode(&p.tokenizer, text, true).unwrap(),
            expect,
            "tokens of {text:?}"
        );
        // Batch of one.
        let h = p
            .model
            .hidden(&ids_tensor(expect).unwrap(), None, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let err = max_abs(&h, r.t(&format!("hidden_{i}")));
        assert!(err < 1e-4, "hidden {i}: {err}");
        let e = p
            .model
            .forward(&ids_tensor(expect).unwrap(), None, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let err = max_abs(&e, r.t(&format!("embedding_{i}")));
        assert!(err < 1e-4, "embedding {i}: {err}");
    }
    // All lengths in one padding-free batch.
    let packed = Packed::new(&ids).unwrap();
    let h = p.model.hidden_packed(&packed).unwrap();
    for (i, &(start, len)) in packed.segments.iter().enumerate() {
        let err = max_abs(
            &h.narrow(0, start, len).unwrap(),
            r.t(&format!("hidden_{i}")),
        );
        assert!(err < 1e-4, "packed hidden {i}: {err}");
    }
    let err = max_abs(
        &p.model.forward_packed(&packed).unwrap(),
        r.t("batch_embedding"),
    );
    assert!(err < 1e-4, "packed embeddings: {err}");
    // The same batch padded, as transformers ran it.
    let batch_ids: Vec<Vec<u32>> = serde_json::from_value(r.json["batch_ids"].clone()).unwrap();
    let (b, n) = (batch_ids.len(), batch_ids[0].len());
    let flat: Vec<u32> = batch_ids.concat();
    let ids_t = Tensor::from_vec(flat, (b, n), &Device::Cpu).unwrap();
    let mask = r.t("batch_mask").to_dtype(candle_core::DType::F32).unwrap();
    let h = p.model.hidden(&ids_t, Some(&mask), None, None).unwrap();
    for (i, &len) in lengths.iter().enumerate() {
        let got = h.get(i).unwrap().narrow(0, 0, len).unwrap();
        let want = r
            .t("batch_hidden")
            .get(i)
            .unwrap()
            .narrow(0, 0, len)
            .unwrap();
        assert!(max_abs(&got, &want) < 1e-4, "padded hidden {i}");
    }
}

#[test]
fn gpt2_matches_transformers_logits_and_greedy_tokens() {
    let p = pretrained::load(&fixture("tiny-gpt2")).unwrap();
    assert_eq!(p.family.name(), "gpt2");
    let r = reference("tiny-gpt2");
    let greedy: Vec<Vec<u32>> = serde_json::from_value(r.json["greedy"].clone()).unwrap();
    let ids = r.ids();
    assert_eq!(ids[0].len(), 1, "a one-token prompt is covered");
    for (i, (text, expect)) in r.texts().iter().zip(&ids).enumerate() {
        assert_eq!(
            &pretrained::encode(&p.tokenizer, text, false).unwrap(),
            expect,
            "tokens of {text:?}"
        );
        let x = ids_tensor(expect).unwrap();
        let h = p
            .model
            .hidden(&x, None, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let err = max_abs(&h, r.t(&format!("hidden_{i}")));
        assert!(err < 1e-4, "hidden {i}: {err}");
        let logits = p.model.forward(&x, None, None).unwrap().squeeze(0).unwrap();
        let err = max_abs(&logits, r.t(&format!("logits_{i}")));
        assert!(err < 1e-3, "logits {i}: {err}");
        if let Some(want) = greedy.get(i) {
            let s = Sampling {
                greedy: true,
                ..Default::default()
            };
            let got = generate(&p.model, expect, want.len(), &s, true, |_| {}).unwrap();
            assert_eq!(&got, want, "greedy continuation of prompt {i}");
        }
    }
}

/// Every family of `pretrained::FAMILIES` matches `transformers` on its fixture
/// `tests/fixtures/tiny-<name>` (`reference.json`'s texts and ids, and hidden states; logits
/// and greedy tokens for a causal LM, embeddings for an encoder): a new family is checked by
/// its fixtures alone.
#[test]
fn every_family_matches_transformers_on_its_fixture() {
    assert!(pretrained::FAMILIES.len() >= 2);
    for family in pretrained::FAMILIES {
        let name = family.name();
        let dir = format!("tiny-{name}");
        let p = pretrained::load(&fixture(&dir)).unwrap();
        assert_eq!(p.family.name(), name);
        let r = reference(&dir);
        let lm = formers::lm::is_causal_lm(&p.config);
        assert!(
            lm || formers::embed::has_embedding_head(&p.config),
            "{name}"
        );
        let special = if lm { family.lm_special_tokens() } else { true };
        let greedy: Vec<Vec<u32>> =
            serde_json::from_value(r.json["greedy"].clone()).unwrap_or_default();
        for (i, (text, expect)) in r.texts().iter().zip(&r.ids()).enumerate() {
            let got = pretrained::encode(&p.tokenizer, text, special).unwrap();
            assert_eq!(&got, expect, "{name}: tokens of {text:?}");
            let x = ids_tensor(expect).unwrap();
            let h = p.model.hidden(&x, None, None, None).unwrap();
            let err = max_abs(&h.squeeze(0).unwrap(), r.t(&format!("hidden_{i}")));
            assert!(err < 1e-4, "{name}: hidden {i}: {err}");
            let out = p.model.forward(&x, None, None).unwrap().squeeze(0).unwrap();
            if !lm {
                let err = max_abs(&out, r.t(&format!("embedding_{i}")));
                assert!(err < 1e-4, "{name}: embedding {i}: {err}");
                continue;
            }
            let err = max_abs(&out, r.t(&format!("logits_{i}")));
            assert!(err < 1e-3, "{name}: logits {i}: {err}");
            if let Some(want) = greedy.get(i) {
                let s = Sampling {
                    greedy: true,
                    ..Default::default()
                };
                let got = generate(&p.model, expect, want.len(), &s, true, |_| {}).unwrap();
                assert_eq!(&got, want, "{name}: greedy continuation of prompt {i}");
            }
        }
    }
}

/// A copy of a fixture in a temporary directory, to break.
fn broken_copy(name: &str, tag: &str) -> PathBuf {
    let src = fixture(name);
    let dst = std::env::temp_dir().join(format!("formers-broken-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&src, &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    let e = pretrained::load(dir).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(dir);
    e
}

/// Rewrites `model.safetensors` in `dir` with `edit` applied to its tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn broken_checkpoints_fail_with_one_clear_line() {
    let d = broken_copy("tiny-bert", "missing");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("No such file"),
        "{e}"
    );

    let d = broken_copy("tiny-gpt2", "arch");
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"gpt2\"", "\"mamba\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("unsupported architecture") && e.contains("mamba"),
        "{e}"
    );

    let d = broken_copy("tiny-gpt2", "shape");
    edit_weights(&d, |t| {
        t.insert(
            "transformer.h.1.mlp.c_fc.weight".into(),
            Tensor::zeros((36, 100), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&d);
    assert!(
        e.contains("`transformer.h.1.mlp.c_fc.weight`")
            && e.contains("expected shape [36, 144], found [36, 100]"),
        "{e}"
    );

    let d = broken_copy("tiny-bert", "dtype");
    edit_weights(&d, |t| {
        let ids = Tensor::zeros((36,), candle_core::DType::I64, &Device::Cpu).unwrap();
        t.insert("encoder.layer.0.output.LayerNorm.bias".into(), ids);
    });
    let e = load_err(&d);
    assert!(
        e.contains("encoder.layer.0.output.LayerNorm.bias") && e.contains("found I64"),
        "{e}"
    );

    let d = broken_copy("tiny-bert", "truncated");
    let path = d.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    // A header that claims 2^62 bytes must not be believed (no huge allocation).
    let d = broken_copy("tiny-bert", "header");
    let mut evil = (1u64 << 62).to_le_bytes().to_vec();
    evil.extend_from_slice(b"{}");
    std::fs::write(d.join("model.safetensors"), evil).unwrap();
    let e = load_err(&d);
    assert!(e.contains("not a valid safetensors"), "{e}");

    let d = broken_copy("tiny-bert", "tokenizer");
    std::fs::copy(
        fixture("tiny-gpt2").join("tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("tokenizer.json") && e.contains("400 tokens") && e.contains("vocabulary"),
        "{e}"
    );

    let d = broken_copy("tiny-bert", "badjson");
    std::fs::write(
        d.join("config.json"),
        "{\"model_type\": \"bert\", \"hidden_size\": -3}",
    )
    .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
}

/// The real all-MiniLM-L6-v2 against sentence-transformers; `FORMERS_MINILM_DIR` must point
/// at it (its weights are not in the repo; see scripts/make_minilm_reference.py). Run with
/// `cargo test -p formers --test pretrained -- --ignored real_minilm`.
#[test]
#[ignore = "needs the real all-MiniLM-L6-v2 weights: set FORMERS_MINILM_DIR and pass --ignored"]
fn real_minilm_matches_sentence_transformers() {
    let dir = std::env::var("FORMERS_MINILM_DIR").unwrap_or_else(|_| {
        panic!(
            "set FORMERS_MINILM_DIR to the all-MiniLM-L6-v2 model directory (config.json, \
             model.safetensors, tokenizer.json; see scripts/make_minilm_reference.py)"
        )
    });
    let p = pretrained::load(Path::new(&dir)).unwrap();
    let path = fixture("minilm-reference.json");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let sentences: Vec<String> = serde_json::from_value(r["sentences"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(r["ids"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(r["embeddings"].clone()).unwrap();
    for (s, expect) in sentences.iter().zip(&ids) {
        assert_eq!(
            &pretrained::encode(&p.tokenizer, s, true).unwrap(),
            expect,
            "tokens of {s:?}"
        );
    }
    let got = p
        .model
        .forward_packed(&Packed::new(&ids).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-4, "sentence {i}: max abs difference {err}");
    }
}

#[test]
fn missing_tensors_are_all_named_with_the_parameter_that_needs_them() {
    let d = broken_copy("tiny-bert", "lacks");
    edit_weights(&d, |t| {
        t.remove("encoder.layer.1.attention.self.key.weight");
        t.remove("embeddings.LayerNorm.bias");
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("2 tensors missing")
            && e.contains("`encoder.layer.1.attention.self.key.weight` (for formers `layers.1.mixer.k.weight`)")
            && e.contains("`embeddings.LayerNorm.bias` (for formers `embed_norm.bias`)"),
        "{e}"
    );

    // GPT-2's fused c_attn feeds three formers parameters: named once, with all three.
    let d = broken_copy("tiny-gpt2", "lacks");
    edit_weights(&d, |t| {
        t.remove("transformer.h.0.attn.c_attn.weight");
    });
    let e = load_err(&d);
    assert!(
        e.contains("1 tensor missing: `h.0.attn.c_attn.weight` (for formers `layers.0.mixer.q.weight`, `layers.0.mixer.k.weight`, `layers.0.mixer.v.weight`)"),
        "{e}"
    );
}

#[test]
fn unused_tensors_are_reported_but_known_harmless_ones_are_not() {
    let d = broken_copy("tiny-bert", "extra");
    edit_weights(&d, |t| {
        let z = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert("cls.predictions.bias".into(), z(400));
        t.insert("encoder.layer.0.attention.self.rotary.weight".into(), z(3));
        t.insert("pooler.dense.bias".into(), z(36));
        let ids = Tensor::arange(0i64, 64, &Device::Cpu).unwrap();
        t.insert("embeddings.position_ids".into(), ids.unsqueeze(0).unwrap());
    });
    let p = pretrained::load(&d).unwrap();
    let _ = std::fs::remove_dir_all(&d);
    assert_eq!(
        p.unused,
        [
            "cls.predictions.bias",
            "encoder.layer.0.attention.self.rotary.weight"
        ]
    );

    let d = broken_copy("tiny-gpt2", "extra");
    edit_weights(&d, |t| {
        let mask = Tensor::ones((1, 1, 64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert("transformer.h.1.attn.bias".into(), mask);
        t.insert("lm_head.weight".into(), t["transformer.wte.weight"].clone());
        t.insert(
            "score.weight".into(),
            Tensor::zeros((2, 36), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let p = pretrained::load(&d).unwrap();
    let _ = std::fs::remove_dir_all(&d);
    assert_eq!(p.unused, ["score.weight"]);
}

#[test]
fn fixtures_load_with_no_unused_tensors() {
    for name in ["tiny-bert", "tiny-gpt2"] {
        let p = pretrained::load(&fixture(name)).unwrap();
        assert!(p.unused.is_empty(), "{name}: {:?}", p.unused);
    }
}

/// A copy of fixture `name` whose `config.json` has `edit` applied.
fn edited_config(name: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = broken_copy(name, tag);
    let path = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    d
}

#[test]
fn huge_layer_counts_are_refused_at_once_under_the_family_key() {
    for (name, key) in [("tiny-gpt2", "n_layer"), ("tiny-bert", "num_hidden_layers")] {
        let d = edited_config(name, &format!("layers-{key}"), |c| {
            c[key] = 1_000_000_000_000u64.into()
        });
        let start = std::time::Instant::now();
        let e = load_err(&d);
        assert!(
            start.elapsed().as_millis() < 500,
            "{key}: {:?}",
            start.elapsed()
        );
        assert!(
            e.contains("config.json") && e.contains(&format!("`{key}`")) && e.contains("at most"),
            "{e}"
        );
    }
    // Within the bounds, a config asking for far more than the file holds stops before
    // its (zero) stand-ins are allocated.
    let d = edited_config("tiny-gpt2", "layers-file", |c| c["n_layer"] = 60_000.into());
    let e = load_err(&d);
    assert!(
        e.contains("describes a larger model than this file") && e.contains("tensors missing"),
        "{e}"
    );
}

#[test]
fn a_model_larger_than_the_memory_budget_is_refused_before_loading() {
    let limits = formers::limits::Limits {
        max_memory: 100_000,
        allow_non_finite: false,
    };
    let e = pretrained::load_with(&fixture("tiny-bert"), &limits)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("the limit is 97.7 KiB (--max-memory"),
        "{e}"
    );
    let d = edited_config("tiny-gpt2", "wide", |c| {
        c["n_embd"] = 3_000_000.into();
        c["n_head"] = 3.into();
    });
    let e = load_err(&d);
    assert!(e.contains("`n_embd`: 3000000 makes the model need"), "{e}");
}

#[test]
fn non_finite_weights_are_refused_unless_allowed() {
    for (name, tensor) in [
        ("tiny-bert", "encoder.layer.1.output.dense.weight"),
        ("tiny-gpt2", "transformer.h.0.attn.c_attn.weight"),
    ] {
        let d = broken_copy(name, "nan");
        edit_weights(&d, |t| {
            let w = &t[tensor];
            let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[5] = f32::NAN;
            let bad = Tensor::from_vec(v, w.shape(), &Device::Cpu).unwrap();
            t.insert(tensor.to_string(), bad);
        });
        let allow = formers::limits::Limits {
            allow_non_finite: true,
            ..Default::default()
        };
        pretrained::load_with(&d, &allow).unwrap();
        let e = load_err(&d);
        assert!(
            e.contains(&format!("`{tensor}` holds NaN at index 5"))
                && e.contains("--allow-non-finite"),
            "{e}"
        );
    }
}

#[test]
fn config_keys_of_the_wrong_type_or_range_are_refused_by_name() {
    let cases: [(&str, &str, serde_json::Value, &str); 6] = [
        (
            "tiny-bert",
            "type_vocab_size",
            "12".into(),
            "non-negative integer",
        ),
        ("tiny-bert", "hidden_act", 3.into(), "must be a string"),
        ("tiny-bert", "layer_norm_eps", 1e12.into(), "(0, 1]"),
        (
            "tiny-bert",
            "layer_norm_eps",
            "small".into(),
            "must be a number",
        ),
        (
            "tiny-gpt2",
            "activation_function",
            true.into(),
            "must be a string",
        ),
        ("tiny-gpt2", "layer_norm_epsilon", 0.into(), "(0, 1]"),
    ];
    for (i, (name, key, value, why)) in cases.into_iter().enumerate() {
        let d = edited_config(name, &format!("type-{i}"), |c| c[key] = value);
        let e = load_err(&d);
        assert!(
            e.contains("config.json") && e.contains(&format!("`{key}`")) && e.contains(why),
            "{key}: {e}"
        );
    }
}
