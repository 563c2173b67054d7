//! The sender's generation (incarnation number): strictly larger on every
//! start, so the monitor tells a restart from a replay (`PROTOCOL.md`,
//! gate step 9).
//!
//! The next generation is `max(previous + 1, Unix seconds)`: Unix seconds
//! alone already grow across restarts more than a second apart and survive
//! a lost state directory; the persisted previous value covers restarts
//! within the same second and a clock that stepped back. It is written
//! (temporary file, fsync, rename, fsync of the directory) *before* the
//! first heartbeat leaves, so a crash right after start cannot reuse it.
//!
//! A corrupt state file (e.g. truncated by a power loss) must not keep a
//! node from sending heartbeats: that would make a healthy node look dead.
//! It is reported with a warning that names the file, and the generation
//! falls back to Unix seconds (`max(previous + 1, ...)` without a
//! previous), then the file is rewritten.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Name of the state file inside `--state-dir`.
pub const FILE: &str = "generation";

/// What [`next`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    pub generation: u32,
    /// The generation read from the state file, if it was readable.
    pub previous: Option<u32>,
    /// Why the state file was ignored, if it was corrupt.
    pub corrupt: Option<String>,
}

/// Unix time in seconds, as a generation.
pub fn unix_seconds() -> anyhow::Result<u32> {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs();
    u32::try_from(s).context("the system clock is past 2106: generations are 32 bits")
}

/// The generation to use without a state directory.
pub fn ephemeral() -> anyhow::Result<u32> {
    unix_seconds()
}

/// Picks the next generation for `dir` given the current Unix time, and
/// persists it. Creates `dir` (mode 0700) if needed.
pub fn next(dir: &Path, now_secs: u32) -> anyhow::Result<Next> {
    create_dir(dir)?;
    let path = dir.join(FILE);
    let (previous, corrupt) = match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(g) => (Some(g), None),
            Err(_) => (
                None,
                Some(format!(
                    "state file {} is corrupt (expected a decimal generation, found {} bytes of something else)",
                    path.display(),
                    text.len()
                )),
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => (
            None,
            Some(format!(
                "state file {} is corrupt (not text)",
                path.display()
            )),
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read state file {}", path.display()));
        }
    };
    let generation = match previous {
        Some(u32::MAX) => bail!(
            "state file {} holds generation {}, the largest possible; remove it to start over",
            path.display(),
            u32::MAX
        ),
        Some(p) => (p + 1).max(now_secs),
        None => now_secs,
    };
    write_atomically(&path, generation)?;
    Ok(Next {
        generation,
        previous,
        corrupt,
    })
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))
}

/// Writes `value` as one decimal line to `path`: temporary file, fsync,
/// rename, fsync of the directory.
pub(super) fn write_atomically(path: &Path, value: u32) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{value}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| format!("cannot write state file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u32 = 1_700_000_000;

    #[test]
    fn first_start_uses_unix_seconds_and_persists() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state/sub");
        let n = next(&dir, NOW).unwrap();
        assert_eq!(
            n,
            Next {
                generation: NOW,
                previous: None,
                corrupt: None
            }
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(FILE)).unwrap(),
            format!("{NOW}\n")
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn every_start_is_strictly_larger_even_within_one_second() {
        let d = tempfile::tempdir().unwrap();
        let mut last = 0;
        for _ in 0..5 {
            let g = next(d.path(), NOW).unwrap().generation;
            assert!(g > last, "{g} after {last}");
            last = g;
        }
        assert_eq!(last, NOW + 4);
    }

    #[test]
    fn never_below_unix_seconds_nor_the_previous_generation() {
        let d = tempfile::tempdir().unwrap();
        next(d.path(), NOW).unwrap();
        // Much later: Unix seconds win.
        assert_eq!(next(d.path(), NOW + 1000).unwrap().generation, NOW + 1000);
        // The clock stepped back: the previous generation wins.
        assert_eq!(next(d.path(), NOW).unwrap().generation, NOW + 1001);
    }

    #[test]
    fn corrupt_state_is_reported_and_replaced() {
        for junk in [&b""[..], b"12x\n", b"\xff\xfe\x00", b"99999999999999\n"] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(FILE), junk).unwrap();
            let n = next(d.path(), NOW).unwrap();
            assert_eq!(n.generation, NOW);
            let why = n.corrupt.expect("reported");
            assert!(why.contains("is corrupt"), "{why}");
            assert!(
                why.contains(&d.path().join(FILE).display().to_string()),
                "{why}"
            );
            // Repaired: the next start reads it.
            assert_eq!(next(d.path(), NOW).unwrap().previous, Some(NOW));
        }
    }

    #[test]
    fn exhausted_generation_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), format!("{}\n", u32::MAX)).unwrap();
        let e = next(d.path(), NOW).unwrap_err().to_string();
        assert!(e.contains("largest possible"), "{e}");
    }

    #[test]
    fn unwritable_state_dir_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let e = format!("{:#}", next(&file.join("sub"), NOW).unwrap_err());
        assert!(e.contains("cannot create state directory"), "{e}");
    }
}
