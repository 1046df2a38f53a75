//! End-to-end tests of the `formers` binary: training, kill and resume, bad input,
//! generation, the benchmarks and the arena.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{formers, repo, run, text, tmp};

fn reverse_args(out: &Path, steps: usize) -> Vec<String> {
    [
        "train",
        "--config",
        repo().join("configs/reverse.json").to_str().unwrap(),
        "--task",
        "reverse",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        &steps.to_string(),
        "--checkpoint-every",
        "10",
        "--eval-every",
        "50",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn checkpoint_step(out: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(out.join("checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s).ok()?["step"].as_u64()
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn killed_run_resumes_to_the_same_weights_bit_for_bit() {
    let steps = 240;
    let full = tmp("full");
    let o = run(formers().args(reverse_args(&full.join("run"), steps)));
    assert!(o.status.success(), "{}", text(&o));

    let dir = tmp("killed");
    let out = dir.join("run");
    let mut child = formers()
        .args(reverse_args(&out, steps))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while checkpoint_step(&out).unwrap_or(0) < 30 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before it could be killed"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = checkpoint_step(&out).unwrap();
    assert!(at_kill < steps as u64, "killed at step {at_kill}");

    let o = run(formers().args([
        "train",
        "--resume",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(checkpoint_step(&out), Some(steps as u64));
    let a = tensors(&full.join("run/checkpoint/model.safetensors"));
    let b = tensors(&out.join("checkpoint/model.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            ta == tb,
            "tensor {na} differs after resume (killed at step {at_kill})"
        );
    }
    let ma = std::fs::read_to_string(full.join("run/metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(ma, mb, "loss curves differ");
    let _ = std::fs::remove_dir_all(&full);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_config_fails_naming_the_key_and_writes_nothing() {
    let dir = tmp("badcfg");
    let cfg = dir.join("bad.json");
    std::fs::write(
        &cfg,
        r#"{"model": {"d_model": 30, "n_heads": 4, "n_layers": 1, "input": {"kind": "bytes"}, "head": {"kind": "lm"}}}"#,
    )
    .unwrap();
    let out = dir.join("run");
    let o = run(formers().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("model.n_heads") && t.contains("d_model = 30"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
    assert!(
        !out.exists(),
        "a failed start must not create the run directory"
    );

    std::fs::write(&cfg, "{\"model\": {\"d_model\": 32,,}}").unwrap();
    let o = run(formers().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(!o.status.success());
    assert!(text(&o).contains("bad.json"), "{}", text(&o));

    let missing = dir.join("nope.toml");
    let o = run(formers().args([
        "train",
        "--config",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(!o.status.success());
    assert!(text(&o).contains("nope.toml"), "{}", text(&o));
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_checkpoint_and_existing_runs_are_refused_without_overwriting() {
    let dir = tmp("trunc");
    let out = dir.join("run");
    let o = run(formers().args(reverse_args(&out, 20)));
    assert!(o.status.success(), "{}", text(&o));
    let model = out.join("checkpoint/model.safetensors");

    // Training into a finished run without --resume is refused.
    let before = std::fs::read(&model).unwrap();
    let o = run(formers().args(reverse_args(&out, 20)));
    assert!(!o.status.success());
    assert!(text(&o).contains("--resume"), "{}", text(&o));
    assert_eq!(std::fs::read(&model).unwrap(), before);

    // A truncated weights file is named, and left as it was.
    std::fs::write(&model, &before[..before.len() / 2]).unwrap();
    let truncated = std::fs::read(&model).unwrap();
    for args in [
        vec![
            "train",
            "--resume",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
        vec!["eval", "--model", out.to_str().unwrap()],
    ] {
        let o = run(formers().args(&args));
        assert!(!o.status.success());
        let t = text(&o);
        assert!(
            t.contains("model.safetensors") && !t.contains("panicked"),
            "{t}"
        );
        assert_eq!(
            std::fs::read(&model).unwrap(),
            truncated,
            "nothing may be overwritten"
        );
    }
    let o = run(formers().args(["eval", "--model", dir.join("missing").to_str().unwrap()]));
    assert!(
        !o.status.success() && text(&o).contains("run.json"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_refuses_overrides_that_would_change_the_run_by_name() {
    let dir = tmp("resume-flags");
    let out = dir.join("run");
    let o = run(formers().args(reverse_args(&out, 20)));
    assert!(o.status.success(), "{}", text(&o));
    let model = out.join("checkpoint/model.safetensors");
    let before = std::fs::read(&model).unwrap();
    let resume = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--resume",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend(extra);
        run(formers().args(&args))
    };
    for (flag, value) in [("--steps", "40"), ("--lr", "0.5"), ("--batch-size", "3")] {
        let o = resume(&[flag, value]);
        let t = text(&o);
        assert!(!o.status.success(), "{flag} {value} was accepted: {t}");
        assert!(t.contains(flag) && t.contains("resume"), "{t}");
        assert_eq!(checkpoint_step(&out), Some(20));
        assert_eq!(std::fs::read(&model).unwrap(), before);
    }
    // An override equal to the run's own value changes nothing and is accepted.
    let o = resume(&["--steps", "20"]);
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint() {
    let dir = tmp("nan");
    let out = dir.join("run");
    let mut args = reverse_args(&out, 50);
    let every = args.iter().position(|a| a == "--checkpoint-every").unwrap();
    args[every + 1] = "1".to_string();
    args.extend(["--lr".to_string(), "1e30".to_string()]);
    let o = run(formers().args(&args));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("loss became") && t.contains("last good checkpoint"),
        "{t}"
    );
    let step = checkpoint_step(&out).expect("the last good checkpoint is kept");
    assert!((1..50).contains(&step));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_with_cache_equals_without_and_reports_throughput() {
    let dir = tmp("gen");
    let out = dir.join("run");
    let o = run(formers().args([
        "train",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-every",
        "3",
        "--sample-tokens",
        "20",
        "--quiet",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sample:\nHAMLET."));
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "To be",
            "--max-new-tokens",
            "30",
            "--greedy",
        ];
        args.extend(extra);
        let o = run(formers().args(&args));
        assert!(o.status.success(), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("tokens/s"));
        o.stdout
    };
    let cached = gen(&[]);
    assert!(cached.starts_with(b"To be"));
    assert_eq!(cached, gen(&["--no-cache"]));
    // Past the char-LM's trained window of 64 bytes the window slides, cached or not.
    let slide = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "x",
        ];
        args.extend(["--max-new-tokens", "300", "--seed", "1"]);
        args.extend(extra);
        let o = run(formers().args(&args));
        assert!(o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("300 tokens in") && !err.contains("capped"),
            "{err}"
        );
        o.stdout
    };
    assert_eq!(slide(&[]), slide(&["--no-cache"]));
    let o = run(formers().args([
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "x",
        "--max-new-tokens",
        "100001",
    ]));
    assert_refused(&o, &["--max-new-tokens 100001", "at most 100000"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_attention_writes_json() {
    let dir = tmp("bench");
    let json = dir.join("b.json");
    let o = run(formers().args([
        "bench",
        "attention",
        "--lengths",
        "64,256",
        "--repeats",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["length"], 256);
    assert!(rows[1]["seconds"].as_f64().unwrap() > 0.0);
    assert!(rows[1]["peak_rss_bytes"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_explains_every_command() {
    for cmd in [
        &["--help"][..],
        &["train", "--help"],
        &["eval", "--help"],
        &["generate", "--help"],
        &["bench", "attention", "--help"],
        &["bench", "train", "--help"],
        &["bench", "compress", "--help"],
        &["compress", "quantize", "--help"],
        &["compress", "norm", "--help"],
        &["compress", "lowrank", "--help"],
        &["compress", "extract", "--help"],
        &["arena", "--help"],
        &["arena", "data", "--help"],
        &["arena", "show", "--help"],
        &["arena", "merge", "--help"],
        &["arena", "report", "--help"],
    ] {
        let o = run(formers().args(cmd));
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage"));
    }
    let o = run(formers().args(["train", "--task", "poetry"]));
    assert!(!o.status.success() && text(&o).contains("unknown task"));
}

#[test]
fn arena_help_states_the_default_grid_and_budget_the_code_uses() {
    let o = run(formers().args(["arena", "--help"]));
    // Help text is wrapped: compare with whitespace collapsed.
    let help = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let lite = formers_arena::suite::SuiteSpec::new(formers_arena::task::Setting::Lite);
    for (task, steps) in &lite.task_steps {
        assert!(
            help.contains(&format!("{task} {steps}")),
            "{task} {steps}: {help}"
        );
    }
    let variants = formers_arena::variants::DEFAULT.join(", ");
    assert!(help.contains(&format!("Default: {variants}")), "{help}");
}

fn fixture(name: &str) -> String {
    repo()
        .join("tests/fixtures")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let written = child.stdin.take().unwrap().write_all(input.as_bytes());
    // A command that refuses its arguments may exit before it reads its input.
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

#[test]
fn embed_writes_one_normalised_vector_per_line_as_json_or_npy() {
    let lines =
        "Hamlet\nTo be, or not to be.\nA third line, somewhat longer than the others were.\n";
    let o = run_with_stdin(
        formers().args([
            "embed",
            "--model",
            &fixture("tiny-bert"),
            "--batch-size",
            "2",
        ]),
        lines,
    );
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<Vec<f32>> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(r.len(), 36);
        let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert!(String::from_utf8_lossy(&o.stderr).contains("sentences/s"));
    // The batch size changes nothing.
    let o1 = run_with_stdin(
        formers().args([
            "embed",
            "--model",
            &fixture("tiny-bert"),
            "--batch-size",
            "1",
        ]),
        lines,
    );
    let rows1: Vec<Vec<f32>> = String::from_utf8_lossy(&o1.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (a, b) in rows.iter().zip(&rows1) {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5));
    }

    let dir = tmp("npy");
    let npy = dir.join("e.npy");
    let o = run_with_stdin(
        formers().args([
            "embed",
            "--model",
            &fixture("tiny-bert"),
            "--out",
            npy.to_str().unwrap(),
        ]),
        lines,
    );
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + header_len]);
    assert!(
        header.contains("'shape': (3, 36)") && (10 + header_len).is_multiple_of(64),
        "{header}"
    );
    let first = f32::from_le_bytes(bytes[10 + header_len..14 + header_len].try_into().unwrap());
    assert!((first - rows[0][0]).abs() < 1e-6);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn embed_rejects_inputs_longer_than_the_position_table() {
    let long = "to be or not to be ".repeat(40);
    let o = run_with_stdin(
        formers().args(["embed", "--model", &fixture("tiny-bert")]),
        &format!("short\n{long}\n"),
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("input line 2") && t.contains("64 positions") && !t.contains("panicked"),
        "{t}"
    );
    assert!(
        o.stdout.is_empty(),
        "nothing is written before the input is checked"
    );
    let o = run_with_stdin(
        formers().args(["embed", "--model", &fixture("tiny-bert"), "--truncate"]),
        &format!("{long}\n"),
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run_with_stdin(
        formers().args(["embed", "--model", &fixture("tiny-gpt2")]),
        "x\n",
    );
    assert!(
        !o.status.success() && text(&o).contains("BERT-family"),
        "{}",
        text(&o)
    );
}

#[test]
fn generate_from_a_gpt2_checkpoint_reproduces_transformers_greedy_tokens() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/tiny-gpt2/reference.json")).unwrap(),
    )
    .unwrap();
    let prompt = reference["texts"][1].as_str().unwrap();
    let greedy: Vec<u32> = serde_json::from_value(reference["greedy"][1].clone()).unwrap();
    let tok =
        tokenizers::Tokenizer::from_file(repo().join("tests/fixtures/tiny-gpt2/tokenizer.json"))
            .unwrap();
    let mut ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    ids.extend(&greedy);
    let want = tok.decode(&ids, true).unwrap();
    let o = run(formers().args([
        "generate",
        "--model",
        &fixture("tiny-gpt2"),
        "--prompt",
        prompt,
        "--max-new-tokens",
        &greedy.len().to_string(),
        "--greedy",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim_end_matches('\n'), want);
    let o = run(formers().args([
        "generate",
        "--model",
        &fixture("tiny-bert"),
        "--prompt",
        "x",
    ]));
    assert!(
        !o.status.success() && text(&o).contains("causal LM"),
        "{}",
        text(&o)
    );
}

#[test]
fn generate_prints_the_decoding_of_prompt_and_continuation_as_one_text() {
    // The tiny GPT-2 with a decoder that strips the text's leading space (as Llama-style
    // tokenizers do): a continuation decoded on its own loses the space after the prompt.
    let dir = tmp("gen-decode");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo().join("tests/fixtures/tiny-gpt2").join(f), dir.join(f)).unwrap();
    }
    let mut tj: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/tiny-gpt2/tokenizer.json")).unwrap(),
    )
    .unwrap();
    tj["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
        tj["decoder"].clone(),
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    ]});
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let model = formers::pretrained::load(&dir).unwrap().model;
    let greedy = formers::generate::Sampling {
        greedy: true,
        ..Default::default()
    };
    let mut spaced = 0;
    for prompt in [
        "efficient transformers",
        "love",
        "To be or not",
        "hello world",
    ] {
        let mut ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
        let new = formers::generate::generate(&model, &ids, 12, &greedy, true, |_| {}).unwrap();
        spaced += usize::from(tok.id_to_token(new[0]).unwrap().starts_with('\u{120}'));
        ids.extend(&new);
        let want = tok.decode(&ids, true).unwrap();
        let o = run(formers().args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "12",
            "--greedy",
        ]));
        assert!(o.status.success(), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out.trim_end_matches('\n'), want, "prompt {prompt:?}");
    }
    assert!(
        spaced > 0,
        "no continuation starts with a space: the test tests nothing"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_mixers_writes_one_row_per_mixer_and_length() {
    let dir = tmp("mixers");
    let json = dir.join("m.json");
    let o = run(formers().args([
        "bench",
        "mixers",
        "--lengths",
        "64,128",
        "--repeats",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 14);
    for r in &rows {
        assert!(r["mixer"].is_string() && r["length"].is_u64());
        assert!(r["seconds"].as_f64().unwrap() > 0.0 && r["peak_bytes"].as_u64().unwrap() > 0);
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("time vs attention"));
    let o = run(formers().args(["bench", "mixers", "--mixers", "telepathy"]));
    assert!(!o.status.success() && text(&o).contains("unknown mixer"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `python3 -c "import torch"` works here (the PyTorch baselines need it).
fn python_has_torch() -> bool {
    Command::new("python3")
        .args(["-c", "import torch"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tiny_train_config(dir: &Path) -> PathBuf {
    let cfg = dir.join("tiny.json");
    std::fs::write(
        &cfg,
        r#"{"model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "causal": true, "max_len": 64,
            "input": {"kind": "bytes"}, "head": {"kind": "lm", "tied": true},
            "defaults": {"ffn": {"kind": "mlp", "hidden": 32}}},
            "train": {"batch_size": 2, "lr": 0.001, "clip_norm": 0.5}}"#,
    )
    .unwrap();
    cfg
}

fn bench_train_rows(json: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn bench_train_writes_one_row_per_length_and_refuses_lengths_the_model_cannot_take() {
    let dir = tmp("bench-train");
    let cfg = tiny_train_config(&dir);
    let json = dir.join("t.json");
    let args = |lengths: &str| {
        let mut cmd = formers();
        cmd.args(["bench", "train", "--config", cfg.to_str().unwrap()])
            .args(["--lengths", lengths, "--warmup", "1", "--steps", "2"])
            .args(["--threads", "1", "--json", json.to_str().unwrap()]);
        cmd
    };
    let o = run(&mut args("16,32"));
    assert!(o.status.success(), "{}", text(&o));
    let rows = bench_train_rows(&json);
    assert_eq!(rows.len(), 2);
    for (r, n) in rows.iter().zip([16, 32]) {
        assert_eq!(r["impl"], "formers");
        assert_eq!(r["length"], n);
        assert_eq!(r["batch"], 2, "the config's batch size");
        assert!(r["steps_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["peak_rss_bytes"].as_u64().unwrap() >= r["base_rss_bytes"].as_u64().unwrap());
        assert!(r["params"].as_u64().unwrap() > 0);
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("| formers | 32 | 2 |"));
    let o = run(&mut args("32,128"));
    assert!(
        !o.status.success() && text(&o).contains("128 is longer than model.max_len = 64"),
        "{}",
        text(&o)
    );
    // The arena's model of a variant, at the batch asked for.
    let o = run(formers()
        .args([
            "bench",
            "train",
            "--arena-variant",
            "vanilla",
            "--lengths",
            "32",
        ])
        .args(["--batch", "1", "--warmup", "0", "--steps", "1", "--json"])
        .arg(&json));
    assert!(o.status.success(), "{}", text(&o));
    let rows = bench_train_rows(&json);
    assert_eq!(
        (rows[0]["length"].as_u64(), rows[0]["batch"].as_u64()),
        (Some(32), Some(1))
    );
    assert_eq!(rows[0]["model"], "arena vanilla (lite)");
    let o = run(formers().args(["bench", "train", "--arena-variant", "telepathy"]));
    assert!(!o.status.success() && text(&o).contains("unknown variant"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_train_against_pytorch_builds_the_same_model() {
    if !python_has_torch() {
        eprintln!("skipped: python3 cannot import torch (the PyTorch side of bench train)");
        return;
    }
    let dir = tmp("bench-train-torch");
    let cfg = tiny_train_config(&dir);
    let json = dir.join("t.json");
    let script = repo().join("scripts/bench_train_torch.py");
    let o = run(formers()
        .args(["bench", "train", "--config", cfg.to_str().unwrap()])
        .args([
            "--lengths",
            "16,32",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--threads",
            "1",
        ])
        .arg("--torch")
        .arg(&script)
        .arg("--json")
        .arg(&json));
    assert!(o.status.success(), "{}", text(&o));
    let rows = bench_train_rows(&json);
    assert_eq!(rows.len(), 4);
    for n in [16, 32] {
        let of = |i: &str| {
            rows.iter()
                .find(|r| r["impl"] == i && r["length"] == n)
                .unwrap_or_else(|| panic!("no {i} row at {n}"))
        };
        let (f, t) = (of("formers"), of("pytorch"));
        assert_eq!(f["params"], t["params"], "the script checks this too");
        assert_eq!(t["batch"], 2);
        assert!(t["steps_per_s"].as_f64().unwrap() > 0.0);
        assert!(t["peak_rss_bytes"].as_u64().unwrap() > 0);
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("vs pytorch"));
    // A mixer the script does not build is refused, not timed as something else.
    let masformer = repo().join("configs/masformer.json");
    let o = run(formers()
        .args(["bench", "train", "--config", masformer.to_str().unwrap()])
        .args([
            "--lengths",
            "16",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--torch",
        ])
        .arg(&script));
    assert!(
        !o.status.success() && text(&o).contains("refusing to time a different model"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn arena_args(out: &Path) -> Vec<String> {
    [
        "arena",
        "--tasks",
        "listops,text",
        "--variants",
        "vanilla,poolformer",
        "--budget",
        "3",
        "--no-speed",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn result_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .map(String::from)
        .collect()
}

#[test]
fn killed_arena_reruns_only_the_unfinished_runs_and_reports() {
    let out = tmp("arena-kill");
    // SIGKILL the arena as soon as its first run is stored.
    let mut child = formers()
        .args(arena_args(&out))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while result_lines(&out).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no run finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = result_lines(&out);
    assert!(!before.is_empty() && before.len() < 4, "{before:?}");
    let o = run(formers().args(arena_args(&out)));
    assert!(o.status.success(), "{}", text(&o));
    let log = text(&o);
    assert!(
        log.contains(&format!("{} of 4 jobs already done", before.len())),
        "{log}"
    );
    let after = result_lines(&out);
    assert_eq!(after.len(), 4, "{after:?}");
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "finished runs were rewritten"
    );
    let keys: std::collections::BTreeSet<String> = after
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}/{}/{}", v["task"], v["variant"], v["seed"])
        })
        .collect();
    assert_eq!(keys.len(), 4);
    // The report: Markdown tables, SVG charts, one self-contained page.
    let report = out.join("report");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(
        md.contains("| vanilla |") && md.contains("LRA paper"),
        "{md}"
    );
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(html.contains("<svg") && !html.contains("<script"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("index.html"));
    // Running again does nothing.
    let o = run(formers().args(arena_args(&out)));
    assert!(
        text(&o).contains("4 of 4 jobs already done"),
        "{}",
        text(&o)
    );
    assert_eq!(result_lines(&out), after);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn arena_data_writes_lra_tsv_and_show_writes_a_png() {
    let dir = tmp("arena-data");
    let tsv = dir.join("listops.tsv");
    let o = run(formers().args([
        "arena",
        "data",
        "listops",
        "--split",
        "test",
        "--n",
        "5",
        "--out",
        tsv.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let body = std::fs::read_to_string(&tsv).unwrap();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[0], "Source\tTarget");
    assert_eq!(lines.len(), 6);
    assert!(
        lines[1].contains("[MAX")
            || lines[1].contains("[MIN")
            || lines[1].contains("[MED")
            || lines[1].contains("[SM")
    );
    let png = dir.join("grid.png");
    let o = run(formers().args([
        "arena",
        "show",
        "pathfinder",
        "--n",
        "8",
        "--out",
        png.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    let o = run(formers().args(["arena", "data", "sudoku", "--out", tsv.to_str().unwrap()]));
    assert!(
        !o.status.success() && text(&o).contains("unknown task"),
        "{}",
        text(&o)
    );
    let o = run(formers().args(["arena", "--shard", "3/2"]));
    assert!(
        !o.status.success() && text(&o).contains("shard"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn arena_show_reads_its_task_and_refuses_one_it_cannot_draw() {
    let dir = tmp("arena-show");
    // TASK is read even when --size is given: a task show cannot draw is refused by name.
    let other = dir.join("listops.png");
    for extra in [&["--size", "16"][..], &[]] {
        let mut args = vec!["arena", "show", "listops", "--out", other.to_str().unwrap()];
        args.extend(extra);
        let o = run(formers().args(&args));
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(
            t.contains("listops") && t.contains("pathfinder, pathx"),
            "{t}"
        );
        assert!(!other.exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of fixture `name` in `dir` (a fresh temporary directory), to break.
fn fixture_copy(name: &str, tag: &str) -> PathBuf {
    let dir = tmp(tag);
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    dir
}

#[test]
fn huge_or_oversized_models_are_refused_at_once_and_max_memory_moves_the_limit() {
    // GPT-2 config.json claiming 10^12 layers: refused at once, naming the key.
    let dir = fixture_copy("tiny-gpt2", "huge-layers");
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["n_layer"] = 1_000_000_000_000u64.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let start = Instant::now();
    let o = run(formers().args([
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
    ]));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("`n_layer`: must be at most"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);

    // The budget: a tiny one refuses the fixture; --max-memory accepts units.
    let tiny = fixture("tiny-gpt2");
    let generate = |extra: &[&str]| {
        let args = ["generate", "--model", &tiny, "--prompt", "hi"];
        run(formers().args(args).args(extra))
    };
    let o = generate(&["--max-memory", "10KiB"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("the limit is 10.0 KiB (--max-memory"),
        "{}",
        text(&o)
    );
    let o = generate(&["--max-memory", "1GiB", "--max-new-tokens", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = generate(&["--max-memory", "lots"]);
    assert!(
        !o.status.success() && text(&o).contains("--max-memory"),
        "{}",
        text(&o)
    );

    // Train configs: a width past memory, a batch past the bound, the budget flag.
    let out = tmp("huge-train");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("configs/reverse.json")).unwrap(),
    )
    .unwrap();
    cfg["model"]["d_model"] = 1_000_000.into();
    cfg["model"]["n_heads"] = 1.into();
    let config = out.join("wide.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let run_dir = out.join("run");
    let train = |extra: &[&str], config: &Path| {
        let mut args = reverse_args(&run_dir, 5);
        args[2] = config.to_str().unwrap().to_string();
        run(formers().args(&args).args(extra))
    };
    let o = train(&[], &config);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("`model.d_model`: 1000000 makes training need"),
        "{}",
        text(&o)
    );
    let reverse = repo().join("configs/reverse.json");
    let o = train(&["--batch-size", "4611686018427387904"], &reverse);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("`train.batch_size`: must be at most"),
        "{}",
        text(&o)
    );
    let o = train(&["--max-memory", "1MB"], &reverse);
    assert!(!o.status.success());
    assert!(text(&o).contains("the limit is 976.6 KiB"), "{}", text(&o));
    assert!(!run_dir.join("run.json").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn non_finite_weights_are_refused_unless_allow_non_finite() {
    let dir = fixture_copy("tiny-bert", "nan-weights");
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let name = "encoder.layer.0.attention.self.query.weight";
    let mut v = t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[0] = f32::NAN;
    let shape = t[name].shape().clone();
    t.insert(
        name.to_string(),
        candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &path).unwrap();
    let model = dir.to_str().unwrap();
    let o = run_with_stdin(formers().args(["embed", "--model", model]), "hello\n");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("`{name}` holds NaN at index 0")) && err.lines().count() == 1,
        "{err}"
    );
    let o = run_with_stdin(
        formers().args(["embed", "--model", model, "--allow-non-finite"]),
        "hello\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A failure as users see it: non-zero exit, one line on stderr that holds every `needle`,
/// no panic, nothing on stdout.
fn assert_refused(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "accepted: {}", text(o));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(o.stdout.is_empty(), "printed before failing: {}", text(o));
}

#[test]
fn generate_refuses_bad_numbers_by_flag_before_printing_anything() {
    let model = fixture("tiny-gpt2");
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model.as_str()];
        args.extend(["--prompt", "hello"]);
        args.extend(extra);
        run(formers().args(&args))
    };
    // `prompt.len() + max_new` used to wrap and panic; the window now slides past max_len,
    // and more new tokens than the flag takes are refused.
    let o = gen(&["--max-new-tokens", "18446744073709551615", "--greedy"]);
    assert_refused(&o, &["--max-new-tokens 18446744073709551615", "at most"]);
    let o = gen(&["--max-new-tokens", "100", "--greedy"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("100 tokens in"),
        "{}",
        text(&o)
    );
    // A prompt that cannot fit used to be printed before the error.
    let long = "hello ".repeat(100);
    assert_refused(
        &run(formers().args(["generate", "--model", model.as_str(), "--prompt", &long])),
        &["--prompt", "max_len"],
    );
    for (flag, value, range) in [
        ("--top-p", "2", "(0, 1]"),
        ("--top-p", "0", "(0, 1]"),
        ("--top-p", "NaN", "(0, 1]"),
        ("--temperature", "inf", "positive finite"),
        ("--temperature", "NaN", "positive finite"),
        ("--temperature=-1", "", "positive finite"),
        ("--top-k", "0", "at least 1"),
    ] {
        let o = if value.is_empty() {
            gen(&["--max-new-tokens", "3", flag])
        } else {
            gen(&["--max-new-tokens", "3", flag, value])
        };
        let name = flag.split('=').next().unwrap();
        assert_refused(&o, &[&format!("{name}:"), range]);
    }
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        fixture("tiny-gpt2"),
    ];
    args.extend(["--prompt".into(), String::new()]);
    assert_refused(&run(formers().args(&args)), &["--prompt is empty"]);
}

#[test]
fn io_errors_say_what_is_wrong_once() {
    let dir = tmp("io-errors");
    let o = run(formers()
        .args(["train", "--config", "/nonexistent/c.json", "--out"])
        .arg(dir.join("r")));
    assert_refused(&o, &["/nonexistent/c.json"]);
    assert_eq!(text(&o).matches("os error 2").count(), 1, "{}", text(&o));
    // A tokenizer.json that is a directory says so (it said `entity not found`).
    let model = dir.join("gpt2");
    std::fs::create_dir_all(model.join("tokenizer.json")).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            repo().join("tests/fixtures/tiny-gpt2").join(f),
            model.join(f),
        )
        .unwrap();
    }
    let o = run(formers()
        .args(["generate", "--prompt", "hi", "--model"])
        .arg(&model));
    assert_refused(&o, &["tokenizer.json: is a directory"]);
    // A config that is a device is refused, not read.
    let o = run(formers()
        .args(["train", "--config", "/dev/zero", "--out"])
        .arg(dir.join("r")));
    assert_refused(&o, &["/dev/zero: is a device"]);
    assert!(!dir.join("r").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn train_never_overwrites_a_started_run_nor_writes_through_links() {
    let dir = tmp("no-clobber");
    // A directory with run files but no checkpoint yet.
    let out = dir.join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("run.json"), "mine").unwrap();
    std::fs::write(out.join("metrics.jsonl"), "mine\n").unwrap();
    let o = run(formers().args(reverse_args(&out, 2)));
    assert_refused(&o, &["run.json", "--force"]);
    assert_eq!(
        std::fs::read_to_string(out.join("run.json")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        "mine\n"
    );
    // A file formers creates is never written through a link.
    let victim = dir.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let linked = dir.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink(&victim, linked.join("metrics.jsonl")).unwrap();
    let o = run(formers().args(reverse_args(&linked, 2)));
    assert_refused(&o, &["metrics.jsonl"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    // --force replaces the run (the link itself, never its target).
    for d in [&out, &linked] {
        let mut args = reverse_args(d, 2);
        args.push("--force".into());
        let o = run(formers().args(&args));
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(checkpoint_step(d), Some(2));
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(std::fs::read_to_string(out.join("run.json"))
        .unwrap()
        .contains("reverse"));
    // --force with an existing checkpoint starts over too.
    let mut args = reverse_args(&out, 3);
    args.push("--force".into());
    assert!(run(formers().args(&args)).status.success());
    assert_eq!(checkpoint_step(&out), Some(3));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_refuses_a_checkpoint_inconsistent_with_its_run_naming_the_file() {
    let dir = tmp("bad-state");
    let out = dir.join("run");
    let o = run(formers().args(reverse_args(&out, 10)));
    assert!(o.status.success(), "{}", text(&o));
    let ckpt = out.join("checkpoint");
    let state_path = ckpt.join("state.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let resume = || {
        run(formers()
            .args(["train", "--resume", "--quiet", "--out"])
            .arg(&out))
    };
    for (key, value, says) in [
        (
            "step",
            serde_json::json!(u64::MAX),
            "step 18446744073709551615",
        ),
        ("step", serde_json::json!(0), "step 0"),
        ("adam_t", serde_json::json!(0), "adam_t 0"),
        ("task", serde_json::json!("copy"), "task `copy`"),
    ] {
        let mut bad = state.clone();
        bad[key] = value;
        std::fs::write(&state_path, bad.to_string()).unwrap();
        assert_refused(&resume(), &["state.json", says]);
    }
    std::fs::write(&state_path, state.to_string()).unwrap();
    // An optimizer file with no tensors in it.
    let opt = ckpt.join("optimizer.safetensors");
    let good = std::fs::read(&opt).unwrap();
    let empty = safetensors::serialize(Vec::<(&str, safetensors::tensor::TensorView)>::new(), None)
        .unwrap();
    std::fs::write(&opt, empty).unwrap();
    assert_refused(&resume(), &["optimizer.safetensors", "missing"]);
    std::fs::write(&opt, good).unwrap();
    let o = resume();
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn embed_out_is_never_overwritten_without_force_nor_written_through_a_link() {
    let dir = tmp("embed-out");
    let victim = dir.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let out = dir.join("e.npy");
    std::os::unix::fs::symlink(&victim, &out).unwrap();
    let embed = |force: bool| {
        let mut cmd = formers();
        cmd.args(["embed", "--model", &fixture("tiny-bert"), "--out"])
            .arg(&out);
        if force {
            cmd.arg("--force");
            run_with_stdin(&mut cmd, "a sentence\n")
        } else {
            // Refused before standard input is read.
            run(&mut cmd)
        }
    };
    assert_refused(&embed(false), &["e.npy", "already exists", "--force"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    let o = embed(true);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(std::fs::read(&out).unwrap().starts_with(b"\x93NUMPY"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn arena_jobs_are_explained_and_checked() {
    let o = run(formers().args(["arena", "--help"]));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--jobs <N>"), "{help}");
    assert!(
        help.contains("1.4-1.6x") && help.contains("alone") && help.contains("available cores"),
        "{help}"
    );
    let dir = tmp("arena-jobs-flags");
    let out = dir.join("arena");
    let o = run(formers().args(["arena", "--jobs", "0", "--out"]).arg(&out));
    assert!(
        !o.status.success() && text(&o).contains("at least one job"),
        "{}",
        text(&o)
    );
    let o = run(formers()
        .args(["arena", "--jobs", "2", "--in-process", "--out"])
        .arg(&out));
    assert!(
        !o.status.success() && text(&o).contains("--in-process runs one job at a time"),
        "{}",
        text(&o)
    );
    assert!(!out.exists(), "a refused arena made its directory");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compress_quantize_writes_a_model_that_embed_and_generate_load() {
    let dir = tmp("quantize");
    let out = dir.join("bert-int8");
    let args = |model: &str, out: &Path| {
        vec![
            "compress".to_string(),
            "quantize".into(),
            "--model".into(),
            model.into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let o = run(formers().args(args(&fixture("tiny-bert"), &out)));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("matrices as int8"), "{}", text(&o));
    // The int8 model embeds, close to the original (see compress::quantize's tests).
    let line = "To be, or not to be.\n";
    let embed = |model: &str| {
        let o = run_with_stdin(formers().args(["embed", "--model", model]), line);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_str::<Vec<f32>>(String::from_utf8_lossy(&o.stdout).trim()).unwrap()
    };
    let (a, b) = (embed(&fixture("tiny-bert")), embed(out.to_str().unwrap()));
    let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!(cos > 0.99 && cos < 1.0, "{cos}");
    // Quantising again, or into a directory that holds something, is refused; nothing is written.
    let o = run(formers().args(args(out.to_str().unwrap(), &dir.join("twice"))));
    assert!(!o.status.success() && text(&o).contains("already quantised"));
    assert!(!dir.join("twice").exists());
    let o = run(formers().args(args(&fixture("tiny-bert"), &out)));
    assert!(!o.status.success() && text(&o).contains("not empty"));
    // Q4_0: a smaller file, still close enough to point the same way.
    let q4 = dir.join("bert-q4");
    let o = run(formers()
        .args(args(&fixture("tiny-bert"), &q4))
        .args(["--scheme", "q4_0"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("matrices as q4_0"), "{}", text(&o));
    let c = embed(q4.to_str().unwrap());
    let cos: f32 = a.iter().zip(&c).map(|(x, y)| x * y).sum();
    assert!(cos > 0.8 && cos < 1.0, "{cos}");
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(size(&q4) < size(&out), "{} vs {}", size(&q4), size(&out));
    // A GPT-2 model quantised still generates, in either scheme.
    let gpt = dir.join("gpt2-int8");
    let o = run(formers()
        .args(args(&fixture("tiny-gpt2"), &gpt))
        .args(["--scheme", "q8_0"]));
    assert!(o.status.success(), "{}", text(&o));
    let o = run(formers().args([
        "generate",
        "--model",
        gpt.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
        "--greedy",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_compress_reports_every_method_against_fp32() {
    let dir = tmp("bench-compress");
    let json = dir.join("rows.json");
    let o = run(formers().args([
        "bench",
        "compress",
        "--model",
        &fixture("tiny-bert"),
        "--limit",
        "8",
        "--batch-sizes",
        "1,4",
        "--threads",
        "1",
        "--heal-steps",
        "40",
        "--json",
        json.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        [
            "fp32",
            "quantize",
            "quantize",
            "quantize",
            "lowrank",
            "lowrank",
            "lowrank + heal"
        ]
    );
    // Calibration, then healing, bring the factorised model closer to the original.
    let mean = |i: usize| rows[i]["cosine_mean"].as_f64().unwrap();
    assert!(rows[5]["setting"].as_str().unwrap().contains("calibrated"));
    assert!(
        mean(5) > mean(4),
        "calibrated {} vs plain {}",
        mean(5),
        mean(4)
    );
    assert!(mean(6) > mean(4), "healed {} vs plain {}", mean(6), mean(4));
    // Block formats: Q8_0 as close as int8 or closer, Q4_0 smaller and further off.
    let bytes = |i: usize| rows[i]["bytes"].as_u64().unwrap();
    let settings: Vec<&str> = rows[1..4]
        .iter()
        .map(|r| r["setting"].as_str().unwrap())
        .collect();
    assert_eq!(settings, ["int8", "q8_0", "q4_0"]);
    assert!(
        mean(2) >= mean(1) - 1e-4,
        "q8_0 {} vs int8 {}",
        mean(2),
        mean(1)
    );
    assert!(mean(3) < mean(2), "q4_0 {} vs q8_0 {}", mean(3), mean(2));
    assert!(bytes(3) < bytes(2) && bytes(2) < bytes(0));
    assert_eq!(rows[0]["cosine_min"], 1.0);
    let q = &rows[1];
    let cos = q["cosine_min"].as_f64().unwrap();
    assert!(cos > 0.99 && cos < 1.0, "{cos}");
    assert!(q["bytes"].as_u64().unwrap() * 2 < rows[0]["bytes"].as_u64().unwrap());
    assert_eq!(q["speed"].as_array().unwrap().len(), 2);
    assert!(text(&o).contains("| quantize | int8 |"), "{}", text(&o));
    // tiny-bert: d 36, MLP 64 → rank 36·64 / (2·100) = 11, which costs quality.
    let lr = &rows[4];
    assert!(lr["setting"].as_str().unwrap().contains("rank 11"), "{lr}");
    assert!(lr["parameters"].as_u64() < rows[0]["parameters"].as_u64());
    assert!(lr["cosine_min"].as_f64().unwrap() < 0.9999);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compress_norm_converts_gpt2_exactly_and_refuses_post_ln_bert() {
    let dir = tmp("norm");
    for to in ["rms", "crms"] {
        let out = dir.join(to);
        let o = run(formers().args([
            "compress",
            "norm",
            "--model",
            &fixture("tiny-gpt2"),
            "--out",
            out.to_str().unwrap(),
            "--to",
            to,
        ]));
        assert!(o.status.success(), "{}", text(&o));
        let t = text(&o);
        let diff: f64 = t
            .split("over ")
            .nth(1)
            .and_then(|s| s.split(": ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{t}"));
        assert!(diff < 1e-4, "{t}");
        let o = run(formers().args([
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--greedy",
        ]));
        assert!(o.status.success(), "{}", text(&o));
    }
    let out = dir.join("bert");
    let o = run(formers().args([
        "compress",
        "norm",
        "--model",
        &fixture("tiny-bert"),
        "--out",
        out.to_str().unwrap(),
        "--to",
        "rms",
    ]));
    assert!(
        !o.status.success() && text(&o).contains("Post-LN"),
        "{}",
        text(&o)
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compress_extract_cuts_a_matformer_run_to_what_eval_gives_at_that_granularity() {
    let dir = tmp("extract");
    let cfg = dir.join("nested.json");
    std::fs::write(
        &cfg,
        r#"{"model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "causal": true,
            "max_len": 32, "input": {"kind": "bytes"}, "head": {"kind": "lm", "tied": true},
            "defaults": {"mixer": {"kind": "attention"},
              "ffn": {"kind": "matformer", "hidden": 32, "granularities": [0.25, 0.5, 1.0]}}},
          "train": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_batches": 2,
                    "matformer_all": true}}"#,
    )
    .unwrap();
    let nested = dir.join("nested");
    let o = run(formers().args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        nested.to_str().unwrap(),
        "--sample-tokens",
        "0",
        "--quiet",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let loss = |args: &[&str]| -> f64 {
        let o = run(formers().arg("eval").args(args));
        assert!(o.status.success(), "{}", text(&o));
        let line = String::from_utf8_lossy(&o.stdout).to_string();
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let small = dir.join("small");
    let o = run(formers().args([
        "compress",
        "extract",
        "--model",
        nested.to_str().unwrap(),
        "--granularity",
        "0",
        "--out",
        small.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("hidden widths 8,8"), "{}", text(&o));
    let want = loss(&["--model", nested.to_str().unwrap(), "--granularity", "0"]);
    let got = loss(&["--model", small.to_str().unwrap()]);
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    let o = run(formers().args([
        "generate",
        "--model",
        small.to_str().unwrap(),
        "--prompt",
        "To",
        "--max-new-tokens",
        "3",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    // A granularity that does not exist: a clear error, nothing written.
    let bad = dir.join("bad");
    let o = run(formers().args([
        "compress",
        "extract",
        "--model",
        nested.to_str().unwrap(),
        "--per-layer",
        "0,3",
        "--out",
        bad.to_str().unwrap(),
    ]));
    assert!(
        !o.status.success() && text(&o).contains("layer 1 has 3 granularities"),
        "{}",
        text(&o)
    );
    assert!(!bad.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_compress_of_an_lm_reports_perplexity_and_exact_norm_conversions() {
    let dir = tmp("bench-compress-lm");
    let json = dir.join("rows.json");
    let o = run(formers().args([
        "bench",
        "compress",
        "--model",
        &fixture("tiny-gpt2"),
        "--limit",
        "8",
        "--batch-sizes",
        "4",
        "--threads",
        "1",
        "--heal-steps",
        "0",
        "--json",
        json.to_str().unwrap(),
        "--chart",
        dir.join("chart.svg").to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        ["fp32", "norm", "norm", "quantize", "quantize", "quantize", "lowrank", "lowrank"]
    );
    let ppl = |i: usize| rows[i]["perplexity"].as_f64().unwrap();
    let diff = |i: usize| rows[i]["max_logit_diff"].as_f64().unwrap();
    assert_eq!(diff(0), 0.0);
    assert!(ppl(0) > 1.0 && ppl(0).is_finite(), "{}", ppl(0));
    // The norm conversions compute the same function; int8 and low rank do not quite.
    for i in [1, 2] {
        assert!(diff(i) < 1e-4, "{}", rows[i]);
        assert!((ppl(i) / ppl(0) - 1.0).abs() < 1e-4, "{}", rows[i]);
    }
    // int8, q8_0, q4_0 and low rank: further off, q4_0 the furthest of the quantisations.
    assert!((3..8).all(|i| diff(i) > diff(1)), "{rows:?}");
    assert!(diff(5) > diff(4) && diff(5) > diff(3), "{rows:?}");
    let speed = rows[3]["speed"].as_array().unwrap();
    assert!(speed[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    // The int8 kernel's instruction set, as the measuring process picked it.
    let isa = speed[0]["isa"].as_str().unwrap();
    assert!(["avx512vnni", "avx2", "portable"].contains(&isa), "{isa}");
    assert!(text(&o).contains("tok/s") && text(&o).contains("perplexity"));
    let svg = std::fs::read_to_string(dir.join("chart.svg")).unwrap();
    for label in ["fp32", "crms", "int8", "q4_0", "lowrank-calibrated"] {
        assert!(
            svg.contains(&format!("\n{label}\n")),
            "{label} missing from the chart"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
