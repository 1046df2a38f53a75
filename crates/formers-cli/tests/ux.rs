//! What a new user meets first: the top-level help, `generate` with its default length on
//! a short model (the window slides past its positions), and `eval` on a run the arena
//! trained.

mod common;
use common::{formers, repo, run, text, tmp};

#[test]
fn the_one_line_description_names_every_subcommand() {
    let o = run(formers().arg("--help"));
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout).to_string();
    let first = help.lines().next().unwrap();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 7, "{help}");
    for c in commands {
        assert!(first.contains(c), "`{c}` is missing from {first:?}");
    }
}

#[test]
fn generate_slides_the_window_past_max_len_and_refuses_a_prompt_that_fills_it() {
    let gpt2 = repo().join("tests/fixtures/tiny-gpt2");
    let tok = tokenizers::Tokenizer::from_file(gpt2.join("tokenizer.json")).unwrap();
    let prompt = "To be or not to be, that is the question";
    let n = tok.encode(prompt, false).unwrap().get_ids().len();
    let max_len = 64; // the fixture's n_positions
    assert!(n < max_len && max_len - n < 200, "{n} tokens");
    // The default --max-new-tokens (200) passes max_len: every token comes, the window
    // sliding past the 64 positions (nanoGPT's crop, issue 34), with a note that says so.
    let o = run(formers()
        .args(["generate", "--model", gpt2.to_str().unwrap()])
        .args(["--prompt", prompt, "--greedy"]));
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{n} prompt + 200 new tokens pass the model's window of {max_len}"
        )),
        "{err}"
    );
    assert!(err.contains("200 tokens in"), "{err}");
    // A prompt longer than the model's positions is refused, naming the fix.
    let long = "to be or not to be ".repeat(20);
    assert!(tok.encode(long.as_str(), false).unwrap().get_ids().len() >= max_len);
    let o = run(formers()
        .args(["generate", "--model", gpt2.to_str().unwrap()])
        .args(["--prompt", long.as_str(), "--greedy"]));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("max_len is 64") && text(&o).contains("shorten the prompt"),
        "{}",
        text(&o)
    );
    assert!(o.stdout.is_empty(), "nothing printed before the refusal");
}

#[test]
fn eval_scores_an_arena_run_on_its_test_split_as_the_arena_did() {
    let dir = tmp("eval-arena");
    let arena = dir.join("arena");
    let o = run(formers()
        .args(["arena", "--tasks", "listops", "--variants", "vanilla"])
        .args([
            "--budget",
            "2",
            "--no-speed",
            "--jobs",
            "1",
            "--out",
            arena.to_str().unwrap(),
        ]));
    assert!(o.status.success(), "{}", text(&o));
    let record: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(arena.join("results.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let run_dir = arena.join("runs/listops-vanilla-s0");
    let o = run(formers().args(["eval", "--model", run_dir.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let got: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(got["task"], "listops");
    assert_eq!(got["split"], "test");
    assert_eq!(got["examples"], record["test_examples"]);
    assert_eq!(got["accuracy"], record["test_accuracy"]);
    // The arena directory itself is not a run: the message says which directory is.
    let o = run(formers().args(["eval", "--model", arena.to_str().unwrap()]));
    assert!(
        !o.status.success() && text(&o).contains("runs/LABEL"),
        "{}",
        text(&o)
    );
    // `--batches` does not apply: the whole split is scored.
    let o = run(formers().args([
        "eval",
        "--model",
        run_dir.to_str().unwrap(),
        "--batches",
        "2",
    ]));
    assert!(!o.status.success() && text(&o).contains("whole test split"));
    // Out of its arena directory, the message says where the score is.
    std::fs::rename(arena.join("arena.json"), dir.join("arena.json")).unwrap();
    let o = run(formers().args(["eval", "--model", run_dir.to_str().unwrap()]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("formers arena") && t.contains("results.jsonl") && !t.contains("lm` head"),
        "{t}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
