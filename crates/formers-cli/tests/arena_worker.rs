//! An arena worker whose parent is killed stops at once and writes nothing more, the
//! rerun's run directory holds that rerun's files only, and jobs run at once store the
//! records one at a time would (Linux: reads `/proc`).
#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("formers-cli-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn arena(out: &Path, budget: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_formers"));
    cmd.args(["arena", "--tasks", "listops", "--variants", "vanilla"])
        .args(["--budget", budget, "--no-speed", "--out"])
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// `(state, parent pid)` of process `pid`, from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(String, u32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = s.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.to_string();
    Some((state, rest.next()?.parse().ok()?))
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// The running children of `parent`.
fn children(parent: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat(pid).is_some_and(|(_, ppid)| ppid == parent) && alive(pid))
        .collect()
}

/// Every file under `dir` with its size.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let meta = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                files.insert(e.path(), meta.len());
            }
        }
    }
    files
}

fn metric_steps(run: &Path) -> Vec<u64> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

#[test]
fn a_worker_stops_when_its_arena_is_killed_and_the_rerun_starts_clean() {
    let out = tmp("arena-orphan");
    let runs = out.join("runs");
    let job = runs.join("listops-vanilla-s0");
    let mut parent = arena(&out, "100000").spawn().unwrap();
    let start = Instant::now();
    while metric_steps(&job).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(300), "no step logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers = children(parent.id());
    assert_eq!(workers.len(), 1, "one worker expected: {workers:?}");
    let worker = workers[0];

    parent.kill().unwrap(); // SIGKILL
    parent.wait().unwrap();
    let killed = Instant::now();
    while alive(worker) && killed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let orphan_lived = alive(worker);
    if orphan_lived {
        // SAFETY: sends SIGKILL to the orphan this test made, so it does not outlive it.
        unsafe { libc::kill(worker as libc::pid_t, libc::SIGKILL) };
    }
    assert!(
        !orphan_lived,
        "worker {worker} still running 10 s after its arena was killed"
    );
    let stopped = snapshot(&runs);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        snapshot(&runs),
        stopped,
        "files changed after the worker stopped"
    );

    // The rerun (another budget, the same run directory) starts from an empty directory.
    let status = arena(&out, "3").status().unwrap();
    assert!(status.success());
    assert_eq!(metric_steps(&job), [1, 2, 3], "metrics of two runs mixed");
    let run: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(job.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["config"]["train"]["steps"], 3);
    let left: Vec<String> = fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        ["listops-vanilla-s0"],
        "only the run directory is left"
    );
    let _ = fs::remove_dir_all(&out);
}

#[test]
fn a_second_arena_on_the_same_directory_is_refused_naming_the_first() {
    let out = tmp("arena-twice");
    let lock = out.join("arena.lock");
    let mut first = arena(&out, "100000").spawn().unwrap();
    let start = Instant::now();
    while fs::read_to_string(&lock).ok().map(|s| s.trim().to_string())
        != Some(first.id().to_string())
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the first arena took no lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = arena(&out, "3").stderr(Stdio::piped()).output().unwrap();
    let refused_in = start.elapsed();
    first.kill().unwrap();
    first.wait().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second arena ran: {stderr}");
    assert!(
        stderr.contains(&format!("process {}", first.id()))
            && stderr.contains(&lock.display().to_string()),
        "{stderr}"
    );
    assert!(refused_in < Duration::from_secs(60), "not refused at once");
    let results = fs::read_to_string(out.join("results.jsonl")).unwrap_or_default();
    assert!(
        results.is_empty(),
        "the second arena wrote results: {results}"
    );
    // Workers of the killed first arena stop on their own; give them a moment, then clean.
    std::thread::sleep(Duration::from_millis(500));
    let _ = fs::remove_dir_all(&out);
}

/// `RAYON_NUM_THREADS` of process `pid` (`None` if unset or unreadable).
fn threads_var(pid: u32) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("RAYON_NUM_THREADS=").map(String::from))
}

/// Runs a 2-job arena with `--jobs jobs` and 2 threads into `out`, watching its workers:
/// its records by key without the measured fields (speed, memory, time), the most workers
/// seen at once and the `RAYON_NUM_THREADS` each worker had.
fn arena_with_jobs(
    out: &Path,
    jobs: &str,
) -> (
    BTreeMap<String, serde_json::Value>,
    usize,
    Vec<String>,
    Vec<u64>,
) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_formers"));
    cmd.args([
        "arena",
        "--tasks",
        "listops",
        "--variants",
        "vanilla,poolformer",
    ])
    .args(["--budget", "3", "--no-speed", "--jobs", jobs, "--out"])
    .arg(out)
    .env("RAYON_NUM_THREADS", "2")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut parent = cmd.spawn().unwrap();
    let (mut most, mut threads) = (0, Vec::new());
    let start = Instant::now();
    while parent.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(600), "arena hangs");
        let workers = children(parent.id());
        most = most.max(workers.len());
        for w in workers {
            if let Some(t) = threads_var(w) {
                threads.push(t);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(parent.wait().unwrap().success());
    let (mut records, mut stored_threads) = (BTreeMap::new(), Vec::new());
    for line in fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
    {
        let mut r: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = format!("{}/{}/{}", r["task"], r["variant"], r["seed"]);
        let fields = r.as_object_mut().unwrap();
        stored_threads.push(fields.remove("threads").and_then(|t| t.as_u64()).unwrap());
        for measured in [
            "train_steps_per_s",
            "infer_tokens_per_s",
            "peak_rss_bytes",
            "wall_s",
        ] {
            assert!(fields.remove(measured).is_some(), "no {measured}");
        }
        assert!(records.insert(key, r).is_none(), "a record stored twice");
    }
    threads.sort();
    threads.dedup();
    stored_threads.sort();
    stored_threads.dedup();
    (records, most, threads, stored_threads)
}

#[test]
fn two_jobs_at_once_store_the_same_records_as_one_at_a_time() {
    let one = tmp("arena-jobs1");
    let two = tmp("arena-jobs2");
    let (sequential, most1, threads1, stored1) = arena_with_jobs(&one, "1");
    let (concurrent, most2, threads2, stored2) = arena_with_jobs(&two, "2");
    // Each record says how many threads its speed figures had.
    assert_eq!(stored1, [2], "--jobs 1 records");
    assert_eq!(stored2, [1], "--jobs 2 records");
    assert_eq!(most1, 1, "--jobs 1 ran workers at once");
    assert_eq!(threads1, ["2"], "--jobs 1 workers keep the arena's threads");
    assert_eq!(most2, 2, "--jobs 2 never ran two workers at once");
    assert_eq!(
        threads2,
        ["1"],
        "--jobs 2 workers get half the threads each"
    );
    assert_eq!(sequential.len(), 2);
    // Same seeds, same weights: the accuracies, loss curves and step counts are equal.
    assert_eq!(sequential, concurrent);
    let _ = fs::remove_dir_all(&one);
    let _ = fs::remove_dir_all(&two);
}
