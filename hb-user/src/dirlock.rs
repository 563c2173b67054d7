//! One process per directory: an exclusive, non-blocking `flock` on the
//! directory itself (the monitor's pin directory, a sender's state
//! directory). It needs no write permission and leaves no file behind; the
//! kernel drops it however its holder ends, SIGKILL included, so it never
//! needs cleaning up; and the descriptor is close-on-exec, so the hooks
//! and children a holder starts never hold it.

use std::{os::fd::AsRawFd as _, path::Path};

use anyhow::Context as _;

/// The error of [`lock`] when another process holds the directory (its
/// message is the caller's `busy`), told apart from I/O errors by
/// `anyhow::Error::is`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Busy(pub String);

/// How long a held lock is tried again before it is `Busy`.
const BUSY_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// Locks `dir` (`what` names it in errors, e.g. "pin directory") for as
/// long as the returned file is held. If another process holds it, the
/// error is `busy`.
pub fn lock(dir: &Path, what: &str, busy: &str) -> anyhow::Result<std::fs::File> {
    let f = std::fs::File::open(dir)
        .with_context(|| format!("cannot open {what} {}", dir.display()))?;
    // A holder's child between fork and exec (a hook, or any command, just
    // starting) has the descriptor too, for a moment: a lock its holder
    // has just dropped (a restart, a test reopening) can still be held by
    // it. So `Busy` only after it stayed held for `BUSY_AFTER`.
    let deadline = std::time::Instant::now() + BUSY_AFTER;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("cannot lock {what} {}", dir.display()));
        }
        if std::time::Instant::now() >= deadline {
            return Err(Busy(busy.to_owned()).into());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory another holder has is `Busy`, with the caller's words;
    /// one that cannot be opened is an I/O error, not `Busy`.
    #[test]
    fn a_held_directory_is_busy_and_a_missing_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path(), "test directory", "held elsewhere").unwrap();
        let e = lock(dir.path(), "test directory", "held elsewhere").unwrap_err();
        assert!(e.is::<Busy>(), "{e:#}");
        assert_eq!(e.to_string(), "held elsewhere");
        drop(held);
        lock(dir.path(), "test directory", "held elsewhere").unwrap();
        // Held a moment longer (a child between fork and exec): waited for.
        let held = lock(dir.path(), "test directory", "held elsewhere").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
        });
        lock(dir.path(), "test directory", "held elsewhere").unwrap();
        t.join().unwrap();
        let e = lock(&dir.path().join("nope"), "test directory", "held elsewhere").unwrap_err();
        assert!(!e.is::<Busy>(), "{e:#}");
        assert!(
            e.to_string().contains("cannot open test directory"),
            "{e:#}"
        );
    }
}
