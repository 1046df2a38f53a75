//! Job directories claimed by one process at a time.
//!
//! A job writes into `runs/<label>/` only while it holds `runs/<label>.lock`, a
//! [`PidLock`] naming its process. Claiming waits for a live owner to go (a worker of a
//! killed arena stops promptly by itself), takes over the lock of a dead one, and empties
//! the directory, so a rerun never mixes its files with those of an earlier attempt. The
//! lock guards against the leftovers of earlier attempts; a second arena process on the
//! same directory is refused before it reaches a job by the directory's own lock
//! ([`crate::runner::LOCK_FILE`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pidlock::{holder, LockError, PidLock};

pub use crate::pidlock::{alive, owner};

/// How long a claim waits for a live owner before giving up.
pub const WAIT: Duration = Duration::from_secs(15);

/// A job directory, emptied and locked by this process until dropped.
#[derive(Debug)]
pub struct JobDir {
    dir: PathBuf,
    _lock: PidLock,
}

impl JobDir {
    /// Claims `dir`, waiting up to [`WAIT`] for a live owner to finish.
    pub fn claim(dir: &Path) -> Result<JobDir, String> {
        Self::claim_within(dir, WAIT)
    }

    /// Claims `dir`, waiting up to `wait` for a live owner; then empties it.
    pub fn claim_within(dir: &Path, wait: Duration) -> Result<JobDir, String> {
        let lock = lock_path(dir);
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let lock = PidLock::acquire_within(&lock, wait).map_err(|e| match e {
            LockError::Held(pid) => format!(
                "{} is in use by {} (lock {})",
                dir.display(),
                holder(pid),
                lock.display()
            ),
            LockError::Io(e) => e,
        })?;
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(JobDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory (empty, not yet created).
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// `runs/<label>.lock` for `runs/<label>`.
pub fn lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dir.with_file_name(name)
}
