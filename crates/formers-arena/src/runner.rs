//! The arena loop: keeps a shard of the plan, skips jobs already in the results store, runs
//! the rest (in this process or in workers) and appends each record the moment it finishes.
//! Planning is [`crate::plan`], running one job [`crate::exec`], workers [`crate::worker`].
//!
//! One arena process at a time runs in a directory: [`run_arena`] holds the directory's
//! [`LOCK_FILE`] (a [`PidLock`]) from before it reads anything until it returns, and a
//! second process is refused at once with the first one's pid. Reading a directory (the
//! report, `merge`) needs no lock.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::pidlock::{holder, LockError, PidLock};
use crate::results::{self, Record, Skipped};

pub use crate::exec::{configure, run_job, Event, Tasks};
pub use crate::plan::{
    load_options, plan, save_options, shard, Budget, Job, Options, OPTIONS_FILE,
};

/// What the arena loop reports.
pub trait Progress {
    /// The shard has `total` jobs, `done` of them already finished earlier.
    fn start(&mut self, _total: usize, _done: usize) {}
    /// A task is left out (its jobs are not run).
    fn skipped(&mut self, _task: &str, _reason: &str) {}
    /// A job is about to run.
    fn job(&mut self, _job: &Job) {}
    fn finished(&mut self, _job: &Job, _record: &Record) {}
    fn failed(&mut self, _job: &Job, _error: &str) {}
}

/// How an arena invocation went.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Jobs run now.
    pub ran: usize,
    /// Jobs of this shard found finished in the store and not rerun.
    pub already_done: usize,
    /// Jobs that failed, with their errors (the arena goes on without them).
    pub failed: Vec<(Job, String)>,
    /// Every record now in the store.
    pub records: Vec<Record>,
}

/// The lock file of an arena directory, held by the arena process running in it.
pub const LOCK_FILE: &str = "arena.lock";

/// Locks arena directory `out` for this process (created if needed), or says which process
/// runs in it: `out is in use by process 1234, another arena (lock out/arena.lock)`.
pub fn lock_dir(out: &Path) -> Result<PidLock, String> {
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let path = out.join(LOCK_FILE);
    PidLock::acquire_within(&path, std::time::Duration::ZERO).map_err(|e| match e {
        LockError::Held(pid) => format!(
            "{} is in use by {}, another arena (lock {}); wait for it to finish or use \
             another directory",
            out.display(),
            holder(pid),
            path.display()
        ),
        LockError::Io(e) => e,
    })
}

/// Runs the shard of `opts` into arena directory `out` (`results.jsonl` plus run
/// directories), with `exec` running each job (in this process or a worker process);
/// `tasks` are opened here to find which can run. Holds `out`'s [`LOCK_FILE`] throughout,
/// refuses a directory of another suite and saves `opts` into it.
pub fn run_arena(
    opts: &Options,
    out: &Path,
    tasks: &Tasks,
    exec: &mut dyn FnMut(&Job) -> Result<Record, String>,
    progress: &mut dyn Progress,
) -> Result<Outcome, String> {
    let (i, n) = opts.shard;
    if n == 0 || i == 0 || i > n {
        return Err(format!("shard {i}/{n}: expected i/N with 1 ≤ i ≤ N"));
    }
    let _lock = lock_dir(out)?;
    if let Some(prev) = load_options(out) {
        if prev.suite != opts.suite {
            return Err(format!(
                "{} holds a {} arena; use another --out for the {} suite",
                out.display(),
                prev.suite.setting.name(),
                opts.suite.setting.name()
            ));
        }
    }
    save_options(opts, out)?;
    let store = out.join(results::FILE);
    let mut records = results::load(&store)?;
    let mut done: BTreeSet<String> = records.iter().map(Record::key).collect();
    let jobs = shard(plan(opts), i, n);
    // Tasks that cannot run here are noted once and their jobs left out.
    let mut unavailable = BTreeSet::new();
    for t in &opts.tasks {
        if let Err(reason) = tasks.get(t, opts) {
            progress.skipped(t, &reason);
            unavailable.insert(t.clone());
            let rec = Record::Skipped(Skipped {
                suite: opts.suite.setting.name().into(),
                task: t.clone(),
                reason,
            });
            if done.insert(rec.key()) {
                results::append(&store, &rec)?;
                records.push(rec);
            }
        }
    }
    let jobs: Vec<Job> = jobs
        .into_iter()
        .filter(|j| !matches!(j, Job::Run { task, .. } if unavailable.contains(task)))
        .collect();
    let already_done = jobs.iter().filter(|j| done.contains(&j.key(opts))).count();
    progress.start(jobs.len(), already_done);
    let mut outcome = Outcome {
        already_done,
        ..Outcome::default()
    };
    let pending: Vec<&Job> = jobs
        .iter()
        .filter(|j| !done.contains(&j.key(opts)))
        .collect();
    for job in pending {
        progress.job(job);
        match exec(job) {
            Ok(rec) => {
                results::append(&store, &rec)?;
                progress.finished(job, &rec);
                done.insert(rec.key());
                records.push(rec);
                outcome.ran += 1;
            }
            Err(e) => {
                progress.failed(job, &e);
                outcome.failed.push((job.clone(), e));
            }
        }
    }
    outcome.records = records;
    Ok(outcome)
}

/// Runs every job of `opts` in this process (tests, and `--in-process`).
pub fn run_in_process(
    opts: &Options,
    out: &Path,
    progress: &mut dyn Progress,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome, String> {
    let work: PathBuf = out.join("runs");
    let tasks = Tasks::default();
    run_arena(
        opts,
        out,
        &tasks,
        &mut |job| run_job(job, opts, &tasks, &work, events),
        progress,
    )
}
