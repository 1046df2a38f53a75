//! Jobs at once: up to N jobs run concurrently, each driven by a thread of the arena
//! process (the job itself runs in a worker process of its own) and given its share of the
//! compute threads. Everything that happens comes back to the calling thread, one [`Happened`] at a
//! time, in the order it happened; so the caller alone writes results and draws progress.
//!
//! Rules: jobs start in plan order; a job that [runs alone](Job::runs_alone) (a speed
//! measurement) starts only when nothing else runs and nothing starts beside it, and it
//! keeps all the arena's threads. With one job at a time, each job runs on the calling
//! thread itself, as it always did.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;

use crate::exec::Event;
use crate::plan::Job;
use crate::results::Record;

/// Runs one job: `threads` is the job's share of compute threads (`None`: all the arena's,
/// from its environment, as when one job runs at a time); progress goes to the callback.
/// `Sync`, as concurrent jobs call it from threads of their own.
pub type Exec<'a> =
    dyn Fn(&Job, Option<usize>, &mut dyn FnMut(Event)) -> Result<Record, String> + Sync + 'a;

/// How many jobs run at once and how many compute threads they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    /// Jobs at once (at least 1).
    pub jobs: usize,
    /// Compute threads of the arena, split between the jobs that run at once.
    pub threads: usize,
}

impl Concurrency {
    /// One job at a time with all the arena's threads (`--jobs 1`, `--in-process`).
    pub fn one_at_a_time() -> Concurrency {
        Concurrency {
            jobs: 1,
            threads: arena_threads(),
        }
    }

    /// `jobs` at once (an error for 0), sharing the arena's threads.
    pub fn new(jobs: usize) -> Result<Concurrency, String> {
        if jobs == 0 {
            return Err("--jobs 0: at least one job must run at a time".into());
        }
        Ok(Concurrency {
            jobs,
            threads: arena_threads(),
        })
    }

    /// The threads a worker running `job` gets while up to `at_once` jobs run: `None` (the
    /// arena's own) when it runs alone or one job runs at a time, else an equal share of
    /// the arena's threads, at least one.
    pub fn threads_for(&self, job: &Job, at_once: usize) -> Option<usize> {
        (at_once > 1 && !job.runs_alone()).then(|| (self.threads / at_once).max(1))
    }
}

/// The cores this process may use (1 if unknown): the default of `--jobs`.
pub fn available_cores() -> usize {
    thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// The arena's compute threads: `RAYON_NUM_THREADS` when set to a positive number (the
/// variable candle's thread pools read), else the available cores.
pub fn arena_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(available_cores)
}

/// What the calling thread hears from the pool.
#[derive(Debug)]
pub enum Happened<'a> {
    /// `job` starts in `slot` (`0..at_once`, the lowest free one).
    Started(usize, &'a Job),
    /// Progress of the job in `slot`.
    Event(usize, Event),
    /// The job in `slot` is over: its record, or why it failed.
    Finished(usize, &'a Job, Box<Result<Record, String>>),
}

/// The jobs that may start, in plan order, given those running.
#[derive(Debug)]
pub struct Schedule<'a> {
    queue: VecDeque<&'a Job>,
    slots: Vec<Option<&'a Job>>,
}

impl<'a> Schedule<'a> {
    /// `jobs` to run, at most `at_once` (at least 1) at a time.
    pub fn new(jobs: &[&'a Job], at_once: usize) -> Schedule<'a> {
        Schedule {
            queue: jobs.iter().copied().collect(),
            slots: vec![None; at_once.max(1)],
        }
    }

    /// The next job, if it may start now, with the slot it takes.
    pub fn start(&mut self) -> Option<(usize, &'a Job)> {
        let next = *self.queue.front()?;
        let mut running = self.slots.iter().flatten();
        let blocked = if next.runs_alone() {
            running.next().is_some()
        } else {
            running.any(|j| j.runs_alone())
        };
        if blocked {
            return None;
        }
        let slot = self.slots.iter().position(Option::is_none)?;
        self.queue.pop_front();
        self.slots[slot] = Some(next);
        Some((slot, next))
    }

    /// Frees `slot`; returns the job that ran in it.
    pub fn finish(&mut self, slot: usize) -> Option<&'a Job> {
        self.slots.get_mut(slot)?.take()
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

/// How many of `pending` can run at once under `c`: `c.jobs`, but no more than the jobs
/// that do not run alone (at least 1), so that a short plan keeps its threads.
pub fn at_once(c: Concurrency, pending: &[&Job]) -> usize {
    let shared = pending.iter().filter(|j| !j.runs_alone()).count();
    c.jobs.min(shared).max(1)
}

/// Runs `pending` with `exec`, up to `at_once` at a time (see the module's rules), and
/// tells `on` (on this thread) everything that happens. When `on` fails for a start or a
/// finish (e.g. the results store cannot be written), no more jobs start; those running
/// finish and are told, and the first error is returned (its errors for events are
/// ignored). A job that panics stops the pool with its panic, once the other running jobs
/// are over.
pub fn run<'a>(
    pending: &[&'a Job],
    at_once: usize,
    c: Concurrency,
    exec: &Exec,
    on: &mut dyn FnMut(Happened<'a>) -> Result<(), String>,
) -> Result<(), String> {
    if at_once <= 1 {
        for &job in pending {
            on(Happened::Started(0, job))?;
            let result = exec(job, c.threads_for(job, 1), &mut |e| {
                let _ = on(Happened::Event(0, e));
            });
            on(Happened::Finished(0, job, Box::new(result)))?;
        }
        return Ok(());
    }
    concurrently(pending, at_once, c, exec, on)
}

/// A message from a job's thread.
enum Note {
    Event(usize, Event),
    Done(usize, Box<thread::Result<Result<Record, String>>>),
}

fn concurrently<'a>(
    pending: &[&'a Job],
    at_once: usize,
    c: Concurrency,
    exec: &Exec,
    on: &mut dyn FnMut(Happened<'a>) -> Result<(), String>,
) -> Result<(), String> {
    let mut schedule = Schedule::new(pending, at_once);
    let mut error: Option<String> = None;
    let (tx, rx) = mpsc::channel::<Note>();
    thread::scope(|scope| {
        loop {
            while error.is_none() {
                let Some((slot, job)) = schedule.start() else {
                    break;
                };
                if let Err(e) = on(Happened::Started(slot, job)) {
                    schedule.finish(slot);
                    error = Some(e);
                    break;
                }
                let tx = tx.clone();
                let threads = c.threads_for(job, at_once);
                scope.spawn(move || {
                    let result = panic::catch_unwind(AssertUnwindSafe(|| {
                        exec(job, threads, &mut |e| {
                            let _ = tx.send(Note::Event(slot, e));
                        })
                    }));
                    let _ = tx.send(Note::Done(slot, Box::new(result)));
                });
            }
            if schedule.running() == 0 {
                break;
            }
            // Every running job's thread holds a sender and sends `Done` last, even when
            // its job panicked; `tx` is held here too, so this cannot disconnect.
            let Ok(note) = rx.recv() else { break };
            match note {
                Note::Event(slot, e) => {
                    let _ = on(Happened::Event(slot, e));
                }
                Note::Done(slot, result) => {
                    let job = schedule.finish(slot).expect("a job ran in the slot");
                    let result = (*result).unwrap_or_else(|panic| panic::resume_unwind(panic));
                    if let Err(e) = on(Happened::Finished(slot, job, Box::new(result))) {
                        error.get_or_insert(e);
                    }
                }
            }
        }
    });
    error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_job(task: &str) -> Job {
        Job::Run {
            task: task.into(),
            variant: "vanilla".into(),
            seed: 0,
        }
    }

    fn speed_job(length: usize) -> Job {
        Job::Speed {
            variant: "vanilla".into(),
            length,
        }
    }

    #[test]
    fn runs_share_the_slots_and_a_speed_job_runs_alone() {
        let jobs = [run_job("a"), run_job("b"), run_job("c"), speed_job(64)];
        let refs: Vec<&Job> = jobs.iter().collect();
        let mut s = Schedule::new(&refs, 2);
        assert_eq!(s.start(), Some((0, &jobs[0])));
        assert_eq!(s.start(), Some((1, &jobs[1])));
        assert_eq!(s.start(), None, "both slots taken");
        assert_eq!(s.finish(0), Some(&jobs[0]));
        assert_eq!(s.start(), Some((0, &jobs[2])));
        assert_eq!(s.finish(1), Some(&jobs[1]));
        assert_eq!(s.start(), None, "the speed job waits for the run in slot 0");
        assert_eq!(s.running(), 1);
        assert_eq!(s.finish(0), Some(&jobs[2]));
        assert_eq!(s.start(), Some((0, &jobs[3])));
        assert_eq!(s.start(), None);
        assert_eq!(s.finish(0), Some(&jobs[3]));
        assert_eq!(s.running(), 0);
        assert_eq!(s.finish(5), None);
    }

    #[test]
    fn nothing_starts_beside_a_speed_job() {
        let jobs = [speed_job(64), run_job("a"), run_job("b")];
        let refs: Vec<&Job> = jobs.iter().collect();
        let mut s = Schedule::new(&refs, 3);
        assert_eq!(s.start(), Some((0, &jobs[0])));
        assert_eq!(s.start(), None);
        s.finish(0);
        assert_eq!(s.start(), Some((0, &jobs[1])));
        assert_eq!(s.start(), Some((1, &jobs[2])));
    }

    #[test]
    fn threads_are_shared_by_runs_and_kept_by_speed_jobs() {
        let c = Concurrency {
            jobs: 2,
            threads: 2,
        };
        assert_eq!(c.threads_for(&run_job("a"), 2), Some(1));
        assert_eq!(c.threads_for(&run_job("a"), 1), None);
        assert_eq!(c.threads_for(&speed_job(64), 2), None);
        let c = Concurrency {
            jobs: 4,
            threads: 2,
        };
        assert_eq!(c.threads_for(&run_job("a"), 4), Some(1), "at least one");
        let c = Concurrency {
            jobs: 2,
            threads: 8,
        };
        assert_eq!(c.threads_for(&run_job("a"), 2), Some(4));
        assert!(Concurrency::new(0).unwrap_err().contains("--jobs 0"));
    }

    #[test]
    fn a_short_plan_runs_no_more_at_once_than_it_has_runs() {
        let c = Concurrency {
            jobs: 4,
            threads: 4,
        };
        let jobs = [run_job("a"), speed_job(64), speed_job(128)];
        let refs: Vec<&Job> = jobs.iter().collect();
        assert_eq!(at_once(c, &refs), 1);
        assert_eq!(at_once(c, &refs[1..]), 1);
        assert_eq!(at_once(c, &[]), 1);
        let more = [run_job("a"), run_job("b"), run_job("c")];
        let refs: Vec<&Job> = more.iter().collect();
        assert_eq!(at_once(c, &refs), 3);
    }
}
