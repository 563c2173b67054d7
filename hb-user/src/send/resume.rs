//! The interval a monitor last asked for, kept in `--state-dir` next to
//! the generation, so a restarted sender resumes at it instead of at its
//! configured `--interval-ms`.
//!
//! Why: the monitor keeps asking for the interval it chose (its request
//! stays in the kernel map), so a sender that restarts at its own default
//! is told to change within one heartbeat anyway. Each announced change
//! re-seeds the monitor's inter-arrival statistics (their deviation starts
//! at 1/8 of the interval, above the detector's 10% floor), so a restart
//! at the default cost two re-seeds and, for the following ~8 heartbeats,
//! a detection time about 20% longer: exactly while a node that just
//! crashed and came back is likeliest to crash again. Resuming at the last
//! requested interval announces an unchanged interval and keeps the
//! statistics. A node started with `--controller fixed` senders configured
//! at that interval never had the problem; this gives every controller's
//! nodes the same start.
//!
//! The file holds one decimal number of milliseconds. A missing file means
//! "no monitor asked yet"; a corrupt one is reported and ignored (the
//! configured interval is used), never a reason not to send heartbeats. A
//! stored interval outside the sender's bounds (changed since) is clamped
//! into them.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
};

use anyhow::Context as _;

use super::generation;

/// Name of the state file inside `--state-dir`.
pub const FILE: &str = "interval";

/// The interval stored in `dir`: `Ok(None)` without one, `Err` (the
/// reason, naming the file) when it is unreadable or not a number.
pub fn load(dir: &Path) -> Result<Option<u32>, String> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(ms) if ms > 0 => Ok(Some(ms)),
            _ => Err(format!(
                "state file {} is corrupt (expected a decimal interval in ms)",
                path.display()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read state file {}: {e}", path.display())),
    }
}

/// Stores `ms` in `dir` (atomically, like the generation).
pub fn save(dir: &Path, ms: u32) -> anyhow::Result<()> {
    generation::write_atomically(&dir.join(FILE), ms)
}

/// Stores the intervals monitors ask for from a thread of its own: a save
/// fsyncs the file and its directory, and on a slow disk that held up the
/// sender's event loop, and with it the next heartbeat. One thread, so
/// saves never overtake each other; of values queued meanwhile only the
/// newest is written. Dropping it lets the thread finish what is queued;
/// the process does not wait for it (a write is atomic: a restart finds
/// the old value or the new one).
pub struct Saver {
    tx: mpsc::Sender<u32>,
}

impl Saver {
    pub fn start(dir: PathBuf) -> anyhow::Result<Saver> {
        let (tx, rx) = mpsc::channel::<u32>();
        std::thread::Builder::new()
            .name("hb-resume".into())
            .spawn(move || {
                while let Ok(mut ms) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        ms = newer;
                    }
                    if let Err(e) = save(&dir, ms) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot store the interval");
                    }
                }
            })
            .context("cannot start the thread that stores the interval")?;
        Ok(Saver { tx })
    }

    /// Queues `ms` to be stored; never blocks.
    pub fn save(&self, ms: u32) {
        let _ = self.tx.send(ms);
    }
}

/// The interval to start with: the stored one, clamped into the sender's
/// bounds, or the configured one without a stored value.
pub fn start_interval(configured: u32, stored: Option<u32>, min: u32, max: u32) -> u32 {
    stored.map_or(configured, |ms| ms.clamp(min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saver_stores_the_newest_interval() {
        let d = tempfile::tempdir().unwrap();
        let s = Saver::start(d.path().to_path_buf()).unwrap();
        for ms in 1..=100 {
            s.save(ms);
        }
        drop(s);
        let t = std::time::Instant::now();
        while load(d.path()) != Ok(Some(100)) {
            assert!(t.elapsed().as_secs() < 10, "{:?}", load(d.path()));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn round_trip_and_start() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()), Ok(None));
        assert_eq!(start_interval(1000, None, 100, 10_000), 1000);
        save(d.path(), 4642).unwrap();
        assert_eq!(load(d.path()), Ok(Some(4642)));
        assert_eq!(start_interval(1000, Some(4642), 100, 10_000), 4642);
        // Bounds changed since: clamped into the new ones.
        assert_eq!(start_interval(1000, Some(4642), 100, 2000), 2000);
        assert_eq!(start_interval(1000, Some(50), 100, 2000), 100);
        // Overwritten by the next request.
        save(d.path(), 500).unwrap();
        assert_eq!(load(d.path()), Ok(Some(500)));
    }

    #[test]
    fn corrupt_state_is_reported_by_name() {
        for junk in [&b""[..], b"abc\n", b"0\n", b"\xff\xfe"] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(FILE), junk).unwrap();
            let why = load(d.path()).unwrap_err();
            assert!(why.contains("interval"), "{why}");
            assert!(why.contains(&d.path().display().to_string()), "{why}");
        }
    }
}
