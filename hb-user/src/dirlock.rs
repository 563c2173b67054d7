//! One process per directory: an exclusive, non-blocking `flock` on the
//! directory itself (the monitor's pin directory, a sender's state
//! directory). It needs no write permission and leaves no file behind; the
//! kernel drops it however its holder ends, SIGKILL included, so it never
//! needs cleaning up; and the descriptor is close-on-exec, so the hooks
//! and children a holder starts never hold it.

use std::{os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, bail};

/// Locks `dir` (`what` names it in errors, e.g. "pin directory") for as
/// long as the returned file is held. If another process holds it, the
/// error is `busy`.
pub fn lock(dir: &Path, what: &str, busy: &str) -> anyhow::Result<std::fs::File> {
    let f = std::fs::File::open(dir)
        .with_context(|| format!("cannot open {what} {}", dir.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!("{busy}");
        }
        return Err(e).with_context(|| format!("cannot lock {what} {}", dir.display()));
    }
    Ok(f)
}
