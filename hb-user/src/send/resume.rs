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

use std::path::Path;

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

/// The interval to start with: the stored one, clamped into the sender's
/// bounds, or the configured one without a stored value.
pub fn start_interval(configured: u32, stored: Option<u32>, min: u32, max: u32) -> u32 {
    stored.map_or(configured, |ms| ms.clamp(min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

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
