//! Advisory lock files that name their owner's process id.
//!
//! A lock is a file holding the owner's pid (`1234\n`); the arena directory's `arena.lock`
//! and each job's `runs/<label>.lock` are such files. While it lives, the owner also holds an
//! exclusive [`File::try_lock`] on the file: that serialises every claim, since a claimant
//! reads the pid and rewrites the file only while it holds this lock, so two processes
//! can never both take over one stale lock. The pid says who owns it: a lock whose pid is
//! missing or names a process that is gone (killed, crashed) is stale and taken over in
//! place. Dropping a [`PidLock`] removes the file.
//!
//! The lock is advisory (only formers' own processes look at it), and a pid reused by an
//! unrelated process keeps a stale lock held until that process ends.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a claim keeps asking when the file is locked but names no pid yet (its owner is
/// between taking the lock and writing its pid, which takes microseconds).
const UNNAMED_GRACE: Duration = Duration::from_secs(1);

/// A lock file owned by this process until dropped.
#[derive(Debug)]
pub struct PidLock {
    path: PathBuf,
    /// Open for the lock's lifetime: it carries the exclusive file lock.
    file: File,
}

/// Why a lock was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockError {
    /// A live process holds it (`None`: the holder has not written its pid yet).
    Held(Option<u32>),
    /// The lock file could not be read or written (the message names it).
    Io(String),
}

impl PidLock {
    /// Takes the lock at `path` if it is free or stale, without waiting.
    pub fn try_acquire(path: &Path) -> Result<PidLock, LockError> {
        let io = |e: std::io::Error| LockError::Io(format!("{}: {e}", path.display()));
        loop {
            let mut file = open_no_follow(path).map_err(io)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(LockError::Held(owner(path))),
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
            // An owner that was dropping the lock may have removed this file meanwhile;
            // then claim the file now at `path`.
            if !same_file(&file, path) {
                continue;
            }
            let mut text = String::new();
            file.read_to_string(&mut text).map_err(io)?;
            let me = std::process::id();
            match text.trim().parse::<u32>() {
                Ok(pid) if pid != me && alive(pid) => return Err(LockError::Held(Some(pid))),
                // Free, or stale: the owner is gone (or it is a leftover naming this process,
                // which does not hold it).
                _ => {}
            }
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            file.write_all(format!("{me}\n").as_bytes()).map_err(io)?;
            return Ok(PidLock {
                path: path.to_path_buf(),
                file,
            });
        }
    }

    /// Takes the lock at `path`, waiting up to `wait` for a live owner to release it.
    pub fn acquire_within(path: &Path, wait: Duration) -> Result<PidLock, LockError> {
        let start = Instant::now();
        loop {
            match Self::try_acquire(path) {
                Err(LockError::Held(pid)) => {
                    let limit = if pid.is_some() {
                        wait
                    } else {
                        wait.max(UNNAMED_GRACE)
                    };
                    if start.elapsed() >= limit {
                        return Err(LockError::Held(pid));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                done => return done,
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        // Still holding the file lock, so no claimant can have rewritten the file; it is
        // removed only if it is still the one at `path`.
        if same_file(&self.file, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Opens (creating) `path` for reading and writing, refusing a symlink.
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW);
    }
    opts.open(path)
}

/// Whether `file` is the file now at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::symlink_metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.exists()
    }
}

/// "process 1234", or "another process" while a holder has not written its pid yet: the
/// holder of a [`LockError::Held`] in a message.
pub fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "another process".into(), |p| format!("process {p}"))
}

/// The process id a lock file names, if it is readable.
pub fn owner(lock: &Path) -> Option<u32> {
    fs::read_to_string(lock).ok()?.trim().parse().ok()
}

/// Whether process `pid` still runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name, which is in parentheses.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("formers-pidlock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = fs::remove_file(&p);
        p
    }

    #[test]
    fn a_second_claim_in_another_open_is_refused_and_the_drop_removes_the_file() {
        let path = tmp("a.lock");
        let lock = PidLock::try_acquire(&path).unwrap();
        assert_eq!(owner(&path), Some(std::process::id()));
        let err = PidLock::try_acquire(&path).unwrap_err();
        assert_eq!(err, LockError::Held(Some(std::process::id())));
        drop(lock);
        assert!(!path.exists());
        drop(PidLock::try_acquire(&path).unwrap());
    }

    #[test]
    fn garbage_and_empty_locks_are_stale() {
        for text in ["", "not a pid", "99999999999\n"] {
            let path = tmp("g.lock");
            fs::write(&path, text).unwrap();
            let lock = PidLock::try_acquire(&path).unwrap();
            assert_eq!(owner(&path), Some(std::process::id()), "{text:?}");
            drop(lock);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_lock_is_refused() {
        let path = tmp("s.lock");
        let target = tmp("s.target");
        fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(PidLock::try_acquire(&path), Err(LockError::Io(_))));
        fs::remove_file(&path).unwrap();
    }
}
