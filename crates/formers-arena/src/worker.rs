//! The worker protocol: the arena runs each job in a worker process of its own.
//!
//! The parent writes one [`WorkOrder`] as a JSON line to the worker's stdin and keeps the
//! pipe open; the worker answers with [`Message`]s, one JSON line each, on stdout. The
//! worker stops as soon as its parent is gone: when its stdin reaches end of file (the
//! parent closed it or died) or a write to its stdout fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::exec::{run_job, Event, Tasks};
use crate::plan::{Job, Options};
use crate::results::Record;

/// What the parent hands a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkOrder {
    pub opts: Options,
    pub job: Job,
    /// Directory of the jobs' run directories.
    pub work: PathBuf,
}

/// What a worker tells its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Progress of the job.
    Progress(Event),
    /// The job's record: the job is done.
    Done(Box<Record>),
    /// Why the job failed.
    Failed(String),
}

/// Exit status of a worker that stopped because its parent was gone.
pub const PARENT_GONE: i32 = 3;

/// Runs `order` in the worker process that `cmd` starts and follows its progress.
pub fn run(
    mut cmd: Command,
    order: &WorkOrder,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Record, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting a worker: {e}"))?;
    // Held open until the worker has exited: its end of file tells the worker we are gone.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let line = serde_json::to_string(order).expect("work orders serialise");
    let sent = writeln!(stdin, "{line}").and_then(|_| stdin.flush());
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The worker's own verdict: its record, or the error it reported.
    let mut result: Option<Result<Record, String>> = None;
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Message>(&line) {
            Ok(Message::Progress(e)) => on_event(&e),
            Ok(Message::Done(record)) => result = Some(Ok(*record)),
            Ok(Message::Failed(message)) => result = Some(Err(message)),
            Err(_) => {}
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    drop(stdin);
    let stderr = errors.join().unwrap_or_default();
    match (result, status.success()) {
        (Some(Ok(record)), true) => Ok(record),
        (Some(Err(message)), _) => Err(message),
        // Killed, crashed, or exited without saying why: stderr's last line is the clue.
        _ => Err(format!(
            "worker exited with {status} without a result{}: {}",
            match sent {
                Ok(()) => String::new(),
                Err(e) => format!(" (sending its order failed: {e})"),
            },
            stderr.trim().lines().last().unwrap_or("(no message)")
        )),
    }
}

/// The worker's side: reads one order from stdin, runs it and reports on stdout; exits
/// the process (status [`PARENT_GONE`]) when the parent is gone.
pub fn serve() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("reading the work order: {e}"))?;
    let order: WorkOrder =
        serde_json::from_str(&line).map_err(|e| format!("reading the work order: {e}"))?;
    std::thread::spawn(watch_parent);
    let send = |m: &Message| {
        let mut out = std::io::stdout().lock();
        let written = serde_json::to_writer(&mut out, m)
            .map_err(std::io::Error::from)
            .and_then(|_| out.write_all(b"\n"))
            .and_then(|_| out.flush());
        if let Err(e) = written {
            parent_gone(&format!("writing to the arena failed ({e})"));
        }
    };
    let result = run_job(
        &order.job,
        &order.opts,
        &Tasks::default(),
        &order.work,
        &mut |e| send(&Message::Progress(e)),
    );
    match result {
        Ok(record) => {
            send(&Message::Done(Box::new(record)));
            Ok(())
        }
        Err(message) => {
            send(&Message::Failed(message.clone()));
            Err(message)
        }
    }
}

/// Reads stdin to its end (the parent sends nothing after the order), then stops the
/// process: the parent closed the pipe or died.
fn watch_parent() {
    let mut buf = [0u8; 256];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    parent_gone("its stdin closed");
}

/// Stops the worker at once: nothing it would still write has a reader.
fn parent_gone(why: &str) -> ! {
    // stderr may be gone too: its error is ignored (eprintln! would panic).
    let _ = writeln!(
        std::io::stderr(),
        "arena worker: the arena process is gone ({why}); stopping"
    );
    std::process::exit(PARENT_GONE)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::plan::Budget;
    use crate::suite::{DataDirs, SuiteSpec};
    use crate::task::Setting;

    fn order() -> WorkOrder {
        WorkOrder {
            opts: Options {
                suite: SuiteSpec::new(Setting::Lite),
                tasks: vec!["listops".into()],
                variants: Vec::new(),
                budget: Budget::Steps(1),
                seeds: 1,
                shard: (1, 1),
                speed: false,
                data: DataDirs::default(),
            },
            job: Job::Run {
                task: "listops".into(),
                variant: "vanilla".into(),
                seed: 0,
            },
            work: PathBuf::from("runs"),
        }
    }

    #[test]
    fn a_worker_that_dies_midway_is_an_error_naming_its_last_words() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"read order; echo '{"progress":{"event":"start","steps":3}}'; echo dying >&2; kill -9 $$"#,
        ]);
        let mut events = Vec::new();
        let err = run(cmd, &order(), &mut |e| events.push(e.clone())).unwrap_err();
        assert_eq!(events, [Event::Start { steps: 3 }]);
        assert!(
            err.contains("without a result") && err.contains("dying"),
            "{err}"
        );
    }

    #[test]
    fn a_worker_that_reports_its_failure_is_that_error() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"read order; echo '{"failed":"no such task"}'; exit 1"#,
        ]);
        let err = run(cmd, &order(), &mut |_| {}).unwrap_err();
        assert_eq!(err, "no such task");
    }
}
