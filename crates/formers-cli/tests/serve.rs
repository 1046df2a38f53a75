//! `formers serve` and `formers bench serve` as a user runs them: the binary on an
//! ephemeral loopback port, compared with `formers embed` and `formers generate`, stopped
//! with SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn formers() -> Command {
    Command::new(env!("CARGO_BIN_EXE_formers"))
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// A `formers serve` process and the address it printed (killed if a test fails first).
struct Serving {
    child: Child,
    addr: String,
    stderr: BufReader<std::process::ChildStderr>,
}

fn serve(model: &str) -> Serving {
    let mut child = formers()
        .args([
            "serve",
            "--model",
            &fixture(model),
            "--port",
            "0",
            "--threads",
            "1",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take();
    let mut s = Serving {
        child,
        addr: String::new(),
        stderr: BufReader::new(stderr.expect("stderr is piped")),
    };
    let mut line = String::new();
    loop {
        line.clear();
        if s.stderr.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("serve ended before listening");
        }
        if let Some(rest) = line.split("listening on http://").nth(1) {
            s.addr = rest.split_whitespace().next().unwrap().to_string();
            return s;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serving {
    /// SIGTERM; the exit status and the rest of stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        self.stderr.read_to_string(&mut rest).unwrap();
        (status, rest)
    }
}

/// POST `body` to `path`; the status and the body.
fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[test]
fn served_embeddings_equal_formers_embed_and_sigterm_exits_0() {
    let sentences = [
        "Hello world",
        "In the beginning God created the heaven and the earth.",
        "a",
    ];
    let mut embed = formers()
        .args(["embed", "--model", &fixture("tiny-bert")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    embed
        .stdin
        .take()
        .unwrap()
        .write_all(sentences.join("\n").as_bytes())
        .unwrap();
    let out = embed.wait_with_output().unwrap();
    assert!(out.status.success());
    let want: Vec<Vec<f64>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let s = serve("tiny-bert");
    let (status, body) = post(
        &s.addr,
        "/v1/embeddings",
        &serde_json::json!({ "input": sentences }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for (i, w) in want.iter().enumerate() {
        let got: Vec<f64> = serde_json::from_value(v["data"][i]["embedding"].clone()).unwrap();
        let dot: f64 = got.iter().zip(w).map(|(a, b)| a * b).sum();
        let norm = |x: &[f64]| x.iter().map(|a| a * a).sum::<f64>().sqrt();
        let cos = dot / (norm(&got) * norm(w));
        assert!(cos >= 0.99999, "sentence {i}: cosine {cos}");
        for (a, b) in got.iter().zip(w) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
    }
    let (status, rest) = s.terminate();
    assert!(status.success(), "{status:?}: {rest}");
    assert!(rest.contains("stopped"), "{rest}");
}

#[test]
fn served_greedy_completion_equals_formers_generate() {
    let prompt = "To be or not";
    let out = formers()
        .args([
            "generate",
            "--model",
            &fixture("tiny-gpt2"),
            "--prompt",
            prompt,
            "--greedy",
            "--max-new-tokens",
            "20",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let s = serve("tiny-gpt2");
    let body =
        serde_json::json!({ "prompt": prompt, "max_tokens": 20, "temperature": 0 }).to_string();
    let (status, answer) = post(&s.addr, "/v1/completions", &body);
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(format!("{prompt}{text}\n"), printed);

    // bench serve against it: every request answered 200 (short prompts: the tiny
    // model has 64 positions).
    let list = std::env::temp_dir().join(format!("formers-serve-test-{}.txt", std::process::id()));
    std::fs::write(&list, "To be or not\nHello there\n").unwrap();
    let out = formers()
        .args([
            "bench",
            "serve",
            "--addr",
            &s.addr,
            "--clients",
            "3",
            "--requests-per-client",
            "4",
            "--completions",
            "4",
            "--sentences",
            list.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("answers by status: 200: 12;") && text.contains("p99"),
        "{text}"
    );
    let out = formers()
        .args(["bench", "serve", "--addr", "10.1.2.3:8080"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("loopback"));
    let (status, rest) = s.terminate();
    assert!(status.success(), "{status:?}: {rest}");
}
