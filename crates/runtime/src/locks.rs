//! Run locks: a process running a run holds an exclusive lock on `runs/<id>.lock`. The OS
//! releases it when the process dies, even by SIGKILL, which is how a `running` run in the log
//! is told apart from an `interrupted` one.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A held run lock; released on drop.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

fn lock_path(dir: &Path, run_id: &str) -> PathBuf {
    dir.join(format!("{run_id}.lock"))
}

impl RunLock {
    /// Takes the lock of a run, or says who holds it.
    pub fn acquire(dir: &Path, run_id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = lock_path(dir, run_id);
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // The holder writes its pid just after taking the lock: it may not be there yet.
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let pid = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!("run {run_id} is running in another process{pid}"),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { file, path })
    }

    /// Whether some live process holds the run's lock.
    pub fn is_held(dir: &Path, run_id: &str) -> bool {
        let Ok(file) = File::open(lock_path(dir, run_id)) else { return false };
        matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
    }

    /// Releases the lock and removes the lock file.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_visible() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!RunLock::is_held(dir.path(), "r1"));
        let lock = RunLock::acquire(dir.path(), "r1").unwrap();
        assert!(RunLock::is_held(dir.path(), "r1"));
        let err = RunLock::acquire(dir.path(), "r1").unwrap_err();
        assert!(err.to_string().contains(&format!("(pid {})", std::process::id())), "{err}");
        // A holder that has not written its pid yet: no empty `(pid )`.
        std::fs::write(dir.path().join("r1.lock"), "").unwrap();
        let err = RunLock::acquire(dir.path(), "r1").unwrap_err().to_string();
        assert_eq!(err, "run r1 is running in another process");
        // Through the runtime's error, the message is said once: it has no source that an
        // error chain (`{:#}`) would print again.
        let err = crate::RuntimeError::from(RunLock::acquire(dir.path(), "r1").unwrap_err());
        assert_eq!(err.to_string(), "run r1 is running in another process");
        assert!(std::error::Error::source(&err).is_none());
        lock.release();
        assert!(!RunLock::is_held(dir.path(), "r1"));
    }
}
