//! End-to-end training on the toy tasks, through the library API.

use std::path::{Path, PathBuf};

use formers::train::RunConfig;
use formers::train::{load_trained, EvalReport, StepReport};
use formers::train::{train, Observer, Start};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("formers-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Cross-entropy of guessing uniformly: what a model that learned nothing scores on
/// copy / reverse, whose tokens are uniform.
fn guessing(cfg: &RunConfig) -> f32 {
    (cfg.model.input.vocab_size() as f32).ln()
}

#[derive(Default)]
struct Record {
    losses: Vec<f32>,
    evals: Vec<EvalReport>,
}

impl Observer for Record {
    fn on_step(&mut self, s: &StepReport) {
        self.losses.push(s.loss);
    }
    fn on_eval(&mut self, _: usize, e: &EvalReport) {
        self.evals.push(*e);
    }
}

#[test]
fn two_layer_model_learns_to_reverse_sequences() {
    let mut cfg = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
    assert_eq!(cfg.model.n_layers, 2);
    cfg.train.steps = 120;
    cfg.train.eval_every = 120;
    cfg.train.eval_batches = 8;
    let out = tmp("reverse");
    let mut rec = Record::default();
    let s = train(&cfg, "reverse", &out, Start::New, &mut rec).unwrap();
    assert!(
        s.eval.accuracy >= 0.99,
        "token accuracy {} after 120 steps",
        s.eval.accuracy
    );
    assert!(
        rec.losses[0] > 2.0 && *rec.losses.last().unwrap() < 0.1,
        "{:?}",
        rec.losses
    );

    // The checkpoint reloads into a model that scores the same.
    let (record, model) = load_trained(&out).unwrap();
    let task =
        formers::tasks::by_name("reverse", &record.config.model, &record.config.train).unwrap();
    let t = &record.config.train;
    let again =
        formers::train::evaluate(&model, task.as_ref(), t.seed, t.eval_batches, t.batch_size)
            .unwrap();
    assert_eq!(again, s.eval);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn same_seed_gives_the_same_loss_curve_bit_for_bit() {
    let mut cfg = RunConfig::from_path(&repo().join("configs/copy-rope-swiglu.toml")).unwrap();
    cfg.train.steps = 15;
    cfg.train.grad_accum = 2;
    cfg.model.defaults.dropout = 0.1;
    let run = |cfg: &RunConfig, tag: &str| {
        let out = tmp(tag);
        let mut rec = Record::default();
        train(cfg, "copy", &out, Start::New, &mut rec).unwrap();
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let _ = std::fs::remove_dir_all(&out);
        (rec.losses, metrics)
    };
    let (a, ma) = run(&cfg, "det-a");
    let (b, mb) = run(&cfg, "det-b");
    assert_eq!(
        a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(ma, mb);
    cfg.train.seed += 1;
    let (c, _) = run(&cfg, "det-c");
    assert_ne!(a, c, "another seed should give another curve");
}

#[test]
fn every_shipped_config_parses_and_builds() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue;
        }
        let cfg = RunConfig::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let params =
            formers::params::Params::new(0, candle_core::DType::F32, &candle_core::Device::Cpu);
        formers::model::Model::new(&cfg.model, &params).unwrap();
        n += 1;
    }
    assert!(n >= 3);
}

/// Reversing needs every position to read another one: a model whose mixer mixes nothing
/// can do no better than guess (cross-entropy ln(vocab)), so each mixer must end clearly
/// below the same model trained with such a mixer, not merely below its own first loss.
#[test]
fn every_token_mixer_trains_on_reverse_and_beats_a_model_that_cannot_mix() {
    let base = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
    let steps = 40;
    let run = |m: &str| {
        let mut cfg = base.clone();
        cfg.model.defaults.mixer = serde_json::from_str(m).unwrap();
        cfg.train.steps = steps;
        cfg.train.eval_every = steps;
        let out = tmp("zoo");
        let mut rec = Record::default();
        let s = train(&cfg, "reverse", &out, Start::New, &mut rec)
            .unwrap_or_else(|e| panic!("{m}: {e}"));
        let _ = std::fs::remove_dir_all(&out);
        assert!(
            rec.losses.iter().all(|l| l.is_finite()) && s.eval.loss.is_finite(),
            "{m}: {:?}",
            rec.losses
        );
        s.eval.loss
    };
    // Pooling over a window of one position minus the identity: the mixer outputs zero, so
    // no position reads another and the model can only guess.
    let none = run(r#"{"kind": "pool", "window": 1}"#);
    let guess = guessing(&base);
    assert!(
        none > guess - 0.05,
        "the baseline must not mix: loss {none}, guessing costs {guess}"
    );
    let mixers = [
        r#"{"kind": "attention"}"#,
        r#"{"kind": "local", "window": 3, "chunk": 4}"#,
        r#"{"kind": "linear", "feature": "elu"}"#,
        r#"{"kind": "linear", "feature": "favor", "features": 32}"#,
        r#"{"kind": "pool", "window": 3}"#,
        r#"{"kind": "linformer", "k": 6}"#,
        r#"{"kind": "linformer", "k": 6, "shared": false}"#,
        r#"{"kind": "flow"}"#,
        r#"{"kind": "attention", "rank": 8}"#,
        r#"{"kind": "attention", "shared_qk": true, "gate": true, "clip": {"gamma": -0.03, "zeta": 1.03}}"#,
    ];
    for m in mixers {
        // 0.1 nats is below any noise of the fixed evaluation batches (runs are deterministic);
        // the weakest mixers here (pool over 3, attention with rank 8) end ~0.15–0.2 below.
        let loss = run(m);
        assert!(
            loss < none - 0.1,
            "{m}: eval loss {loss} after {steps} steps, not clearly below {none} without mixing"
        );
    }
}

#[test]
fn alibi_model_trains_and_rejects_mixers_without_scores() {
    let mut cfg = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
    cfg.model.position = formers::position::PositionSpec::Alibi;
    cfg.model.defaults.mixer = serde_json::from_str(r#"{"kind": "local", "window": 4}"#).unwrap();
    cfg.train.steps = 30;
    let out = tmp("alibi");
    let mut rec = Record::default();
    let s = train(&cfg, "reverse", &out, Start::New, &mut rec).unwrap();
    assert!(rec.losses.iter().all(|l| l.is_finite()));
    // ALiBi gives only relative positions and reversing needs absolute ones (read here from
    // the edges of the windows), so 30 steps move it only a little below guessing.
    assert!(
        s.eval.loss < guessing(&cfg) - 0.02,
        "eval loss {} vs {} guessing",
        s.eval.loss,
        guessing(&cfg)
    );
    let _ = std::fs::remove_dir_all(&out);
    cfg.model.defaults.mixer = serde_json::from_str(r#"{"kind": "pool"}"#).unwrap();
    let e = cfg.model.validate().unwrap_err().to_string();
    assert!(e.contains("`position`") && e.contains("alibi"), "{e}");
}

#[test]
fn residual_schemes_train_without_nan() {
    for residual in [
        r#"{"kind": "dense_former"}"#,
        r#"{"kind": "value_residual"}"#,
    ] {
        let mut cfg = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
        cfg.model.residual = serde_json::from_str(residual).unwrap();
        cfg.train.steps = 30;
        let out = tmp("residual");
        let mut rec = Record::default();
        let s = train(&cfg, "reverse", &out, Start::New, &mut rec).unwrap();
        assert!(rec.losses.iter().all(|l| l.is_finite()), "{residual}");
        assert!(
            s.eval.loss < guessing(&cfg) - 0.3,
            "{residual}: eval loss {} vs {} guessing",
            s.eval.loss,
            guessing(&cfg)
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn matformer_weights_pick_which_granularity_the_joint_loss_favours() {
    let config = |weights: Vec<f64>| {
        let mut cfg = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
        cfg.model.defaults.ffn = serde_json::from_str(
            r#"{"kind": "matformer", "hidden": 128, "granularities": [0.125, 0.5, 1.0]}"#,
        )
        .unwrap();
        cfg.train.steps = 60;
        cfg.train.matformer_all = true;
        cfg.train.matformer_weights = weights;
        cfg
    };
    // Held-out loss of each granularity after training with `weights`.
    let losses = |weights: Vec<f64>| -> Vec<f32> {
        let out = tmp("matformer-weights");
        let cfg = config(weights);
        train(&cfg, "reverse", &out, Start::New, &mut Record::default()).unwrap();
        let (record, model) = load_trained(&out).unwrap();
        let task =
            formers::tasks::by_name("reverse", &record.config.model, &record.config.train).unwrap();
        let l = (0..3)
            .map(|g| {
                model.set_granularity(Some(g));
                formers::train::evaluate(&model, task.as_ref(), 0, 4, 16)
                    .unwrap()
                    .loss
            })
            .collect();
        let _ = std::fs::remove_dir_all(&out);
        l
    };
    let small = losses(vec![1.0, 0.0, 0.0]);
    let full = losses(vec![0.0, 0.0, 1.0]);
    // The granularity with all the weight is the one trained for: the smallest is better
    // where it alone counted, and where only the full width counted, the full width is
    // better than its smallest sub-model (which never saw a loss of its own).
    assert!(small[0] < full[0], "smallest: {small:?} vs {full:?}");
    assert!(full[2] < full[0], "full-width training: {full:?}");
    // Weights that do not fit the model or the config are refused before training.
    for (weights, all, want) in [
        (
            vec![1.0, 1.0],
            true,
            "2 weights for a model with 3 granularities",
        ),
        (vec![1.0, -1.0, 1.0], true, "every weight must be >= 0"),
        (
            vec![0.0, 0.0, 0.0],
            true,
            "at least one weight must be positive",
        ),
        (vec![1.0, 1.0, 1.0], false, "`matformer_all`, which is off"),
    ] {
        let mut cfg = config(weights);
        cfg.train.matformer_all = all;
        let out = tmp("matformer-bad-weights");
        let e = train(&cfg, "reverse", &out, Start::New, &mut Record::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn matformer_trains_every_granularity_sampled_or_summed() {
    for all in [false, true] {
        let mut cfg = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
        cfg.model.defaults.ffn = serde_json::from_str(
            r#"{"kind": "matformer", "hidden": 128, "granularities": [0.25, 0.5, 1.0]}"#,
        )
        .unwrap();
        cfg.train.steps = 60;
        cfg.train.matformer_all = all;
        let out = tmp("matformer");
        let mut rec = Record::default();
        let s = train(&cfg, "reverse", &out, Start::New, &mut rec).unwrap();
        assert!(rec.losses.iter().all(|l| l.is_finite()));
        assert!(
            s.eval.loss < guessing(&cfg) - 0.3,
            "matformer_all = {all}: eval loss {} vs {} guessing",
            s.eval.loss,
            guessing(&cfg)
        );
        // Mix'n'Match: every granularity of the trained model is usable.
        let (record, model) = load_trained(&out).unwrap();
        assert_eq!(model.granularities(), 3);
        let task =
            formers::tasks::by_name("reverse", &record.config.model, &record.config.train).unwrap();
        for g in 0..3 {
            model.set_granularity(Some(g));
            let e = formers::train::evaluate(&model, task.as_ref(), 0, 2, 16).unwrap();
            assert!(
                e.loss.is_finite() && e.accuracy > 0.2,
                "granularity {g} (sum {all}): {e:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn norm_and_low_rank_variants_train_without_nan() {
    for (norm, ffn) in [
        (
            r#"{"kind": "crms_norm"}"#,
            r#"{"kind": "mlp", "hidden": 128, "rank": 16}"#,
        ),
        (
            r#"{"kind": "rms_norm"}"#,
            r#"{"kind": "mlp", "hidden": 128, "activation": "swiglu", "rank": 8}"#,
        ),
    ] {
        let mut cfg = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
        cfg.model.defaults.norm = serde_json::from_str(norm).unwrap();
        cfg.model.defaults.ffn = serde_json::from_str(ffn).unwrap();
        cfg.train.steps = 30;
        let out = tmp("norms");
        let mut rec = Record::default();
        let s = train(&cfg, "reverse", &out, Start::New, &mut rec).unwrap();
        assert!(rec.losses.iter().all(|l| l.is_finite()), "{norm} {ffn}");
        assert!(
            s.eval.loss < guessing(&cfg) - 0.3,
            "{norm} {ffn}: eval loss {} vs {} guessing",
            s.eval.loss,
            guessing(&cfg)
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// A tiny trained run in a fresh directory `tag`.
fn tiny_run(tag: &str) -> PathBuf {
    let mut cfg = RunConfig::from_path(&repo().join("configs/reverse.json")).unwrap();
    cfg.train.steps = 2;
    cfg.train.eval_every = 2;
    cfg.train.eval_batches = 1;
    let out = tmp(tag);
    train(&cfg, "reverse", &out, Start::New, &mut Record::default()).unwrap();
    out
}

#[test]
fn trained_weights_must_be_finite_and_match_the_config() {
    use formers::limits::Limits;
    use formers::train::load_trained_with;
    let out = tiny_run("nan");
    let weights = out.join("checkpoint/model.safetensors");
    let mut t = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let w = &t["layers.1.ffn.down.weight"];
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[3] = f32::INFINITY;
    let bad = candle_core::Tensor::from_vec(v, w.shape(), &candle_core::Device::Cpu).unwrap();
    t.insert("layers.1.ffn.down.weight".into(), bad);
    candle_core::safetensors::save(&t, &weights).unwrap();
    let e = load_trained(&out).unwrap_err().to_string();
    assert!(
        e.contains("`layers.1.ffn.down.weight` holds inf at index 3"),
        "{e}"
    );
    let allow = Limits {
        allow_non_finite: true,
        ..Limits::default()
    };
    load_trained_with(&out, &allow).unwrap();

    // A config that claims more layers than the file has is refused before building.
    let record = out.join("run.json");
    let mut rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    rec["config"]["model"]["n_layers"] = 60_000.into();
    std::fs::write(&record, rec.to_string()).unwrap();
    let e = load_trained(&out).unwrap_err().to_string();
    assert!(e.contains("holds") && e.contains("parameters"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_huge_run_json_is_refused_on_resume_at_once() {
    let out = tiny_run("hugeresume");
    let record = out.join("run.json");
    let mut rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    rec["config"]["model"]["n_layers"] = 1_000_000.into();
    std::fs::write(&record, rec.to_string()).unwrap();
    let saved = formers::train::RunRecord::load(&out);
    let e = saved.unwrap_err().to_string();
    assert!(
        e.contains("`model.n_layers`") && e.contains("at most 65536"),
        "{e}"
    );
    // Within the bounds but beyond the budget: refused before a tensor exists.
    rec["config"]["model"]["n_layers"] = 60_000.into();
    rec["config"]["model"]["d_model"] = 4096.into();
    std::fs::write(&record, rec.to_string()).unwrap();
    let cfg = formers::train::RunRecord::load(&out).unwrap().config;
    let start = std::time::Instant::now();
    let e = train(&cfg, "reverse", &out, Start::Resume, &mut Record::default())
        .unwrap_err()
        .to_string();
    assert!(start.elapsed().as_millis() < 500);
    assert!(
        e.contains("`model.n_layers`: 60000 makes training need"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
