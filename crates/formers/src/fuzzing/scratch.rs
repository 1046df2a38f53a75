//! A fresh directory per fuzz case, removed when dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A process-unique directory under the system temp dir.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("formers-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` inside (replacing it); returns its path.
    pub fn write(&self, name: impl AsRef<Path>, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("writing a scratch file");
        path
    }
}

impl Scratch {
    /// Copies the files of `dir` (and of its subdirectories) in.
    pub fn copy_from(&self, dir: &Path) {
        copy_tree(dir, &self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from)
        .expect("a scratch template")
        .flatten()
    {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&target).expect("a scratch subdirectory");
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copying a scratch file");
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
