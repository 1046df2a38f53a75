//! Job directories claimed by one process at a time.
//!
//! A job writes into `runs/<label>/` only while it holds `runs/<label>.lock`, a file holding
//! its process id. Claiming waits for a live owner to go (a worker of a killed arena stops
//! promptly by itself), takes over the lock of a dead one, and empties the directory, so a
//! rerun never mixes its files with those of an earlier attempt. The lock guards against
//! the leftovers of one arena invocation; two arena processes sharing an out directory are
//! not supported.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a claim waits for a live owner before giving up.
pub const WAIT: Duration = Duration::from_secs(15);

/// A job directory, emptied and locked by this process until dropped.
#[derive(Debug)]
pub struct JobDir {
    dir: PathBuf,
    lock: PathBuf,
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
        let deadline = Instant::now() + wait;
        while !try_lock(&lock)? {
            match owner(&lock) {
                Some(pid) if alive(pid) => {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "{} is in use by process {pid} (lock {})",
                            dir.display(),
                            lock.display()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                // A dead owner's lock (or one vanished meanwhile): take it over.
                _ => match fs::remove_file(&lock) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{}: {e}", lock.display())),
                },
            }
        }
        let claimed = JobDir {
            dir: dir.to_path_buf(),
            lock,
        };
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(claimed)
    }

    /// The directory (empty, not yet created).
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        if owner(&self.lock) == Some(std::process::id()) {
            let _ = fs::remove_file(&self.lock);
        }
    }
}

/// `runs/<label>.lock` for `runs/<label>`.
pub fn lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dir.with_file_name(name)
}

/// The process id a lock file names, if it is readable.
pub fn owner(lock: &Path) -> Option<u32> {
    fs::read_to_string(lock).ok()?.trim().parse().ok()
}

/// Creates `lock` holding this process's id, atomically (a hard link of a complete file);
/// false if it exists.
fn try_lock(lock: &Path) -> Result<bool, String> {
    let me = std::process::id();
    let mut tmp = lock.as_os_str().to_os_string();
    tmp.push(format!(".{me}.tmp"));
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, format!("{me}\n")).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let linked = fs::hard_link(&tmp, lock);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(format!("{}: {e}", lock.display())),
    }
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
