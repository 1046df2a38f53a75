//! The arena loop: keeps a shard of the plan, skips jobs already in the results store, runs
//! the rest (in this process or in workers, up to N at once) and appends each record the
//! moment it finishes. Planning is [`crate::plan`], running one job [`crate::exec`], jobs
//! at once [`crate::pool`], workers [`crate::worker`].
//!
//! One arena process at a time runs in a directory: [`run_arena`] holds the directory's
//! [`LOCK_FILE`] (a [`PidLock`]) from before it reads anything until it returns, and a
//! second process is refused at once with the first one's pid. Reading a directory (the
//! report, `merge`) needs no lock.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::pidlock::{holder, LockError, PidLock};
use crate::pool::{self, Happened};
use crate::results::{self, Record, Skipped};

pub use crate::exec::{configure, run_job, Event, Tasks};
pub use crate::plan::{
    load_options, plan, save_options, shard, shard_jobs, Budget, Job, Options, OPTIONS_FILE,
};
pub use crate::pool::{Concurrency, Exec};

/// What the arena loop reports. Jobs running at once each have a slot, `0..at_once`; all
/// calls come from the thread that runs the arena.
pub trait Progress {
    /// The jobs about to run, each with its share of the work ([`crate::exec::work`]), so
    /// the time left can be estimated from the first steps on. Called before `start`.
    fn planned(&mut self, _work: &[(Job, crate::exec::Work)]) {}
    /// The shard has `total` jobs, `done` of them already finished earlier; up to
    /// `at_once` of the rest run at a time.
    fn start(&mut self, _total: usize, _done: usize, _at_once: usize) {}
    /// A task is left out (its jobs are not run).
    fn skipped(&mut self, _task: &str, _reason: &str) {}
    /// A job starts in `slot`.
    fn job(&mut self, _slot: usize, _job: &Job) {}
    /// Progress of the job in `slot`.
    fn event(&mut self, _slot: usize, _event: &Event) {}
    /// The job in `slot` finished; its record is stored.
    fn finished(&mut self, _slot: usize, _job: &Job, _record: &Record) {}
    /// The job in `slot` failed (the others go on).
    fn failed(&mut self, _slot: usize, _job: &Job, _error: &str) {}
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
/// directories), with `exec` running each job (in this process or a worker process), up
/// to `concurrency.jobs` at once (a speed job alone; see [`crate::pool`]); `tasks` are
/// opened here to find which can run. Holds `out`'s [`LOCK_FILE`] throughout, refuses a
/// directory of another suite and saves `opts` into it. Only this thread writes the store.
pub fn run_arena(
    opts: &Options,
    out: &Path,
    tasks: &Tasks,
    concurrency: Concurrency,
    exec: &Exec,
    progress: &mut dyn Progress,
) -> Result<Outcome, String> {
    let (i, n) = opts.shard;
    if n == 0 || i == 0 || i > n {
        return Err(format!("shard {i}/{n}: expected i/N with 1 ≤ i ≤ N"));
    }
    let jobs = shard_jobs(opts)?;
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
    let mut outcome = Outcome {
        already_done,
        ..Outcome::default()
    };
    let pending: Vec<&Job> = jobs
        .iter()
        .filter(|j| !done.contains(&j.key(opts)))
        .collect();
    let at_once = pool::at_once(concurrency, &pending);
    let planned: Vec<(Job, crate::exec::Work)> = pending
        .iter()
        .map(|&j| (j.clone(), crate::exec::work(j, opts, tasks)))
        .collect();
    progress.planned(&planned);
    progress.start(jobs.len(), already_done, at_once);
    pool::run(&pending, at_once, concurrency, exec, &mut |happened| {
        match happened {
            Happened::Started(slot, job) => progress.job(slot, job),
            Happened::Event(slot, e) => progress.event(slot, &e),
            Happened::Finished(slot, job, result) => match *result {
                Ok(rec) => {
                    results::append(&store, &rec)?;
                    progress.finished(slot, job, &rec);
                    done.insert(rec.key());
                    records.push(rec);
                    outcome.ran += 1;
                }
                Err(e) => {
                    progress.failed(slot, job, &e);
                    outcome.failed.push((job.clone(), e));
                }
            },
        }
        Ok(())
    })?;
    outcome.records = records;
    Ok(outcome)
}

/// Runs every job of `opts` in this process, one at a time (tests, and `--in-process`).
pub fn run_in_process(
    opts: &Options,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Outcome, String> {
    let work: PathBuf = out.join("runs");
    let tasks = Tasks::default();
    run_arena(
        opts,
        out,
        &tasks,
        Concurrency::one_at_a_time(),
        &|job, _threads, events| run_job(job, opts, &tasks, &work, events),
        progress,
    )
}
