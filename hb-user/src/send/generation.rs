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
//! A problem with the state must not keep a node from sending heartbeats:
//! that would make a healthy node look dead. A state file that is corrupt
//! (e.g. truncated by a power loss) or cannot be read (an I/O error, a
//! file the sender may not read) is reported with a warning that names
//! it, and the generation is Unix seconds + 1: the start that wrote the
//! file may have been earlier in this very second (a restart loop), and
//! its generation was then Unix seconds, which + 1 still beats (a burst of
//! restarts within one second, or a clock that stepped back, can still
//! have gone higher: only a readable file covers those). A generation that
//! cannot be written is reported too, and used all the same (it is larger
//! than anything read); the next start then cannot know it, and within
//! the same second picks it again. A directory that cannot be created or
//! opened, or that another sender holds ([`lock`]), is a startup error: a
//! wrong `--state-dir` or a second instance, not a passing fault.

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
    /// Why the state file's value was not used (corrupt or unreadable),
    /// naming the file.
    pub ignored: Option<String>,
    /// Why the new generation could not be stored, naming the file.
    pub unsaved: Option<String>,
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

/// Takes `dir` for this process ([`crate::dirlock`], as the monitor does
/// its pin directory), creating it (mode 0700) if needed: one sender per
/// state directory. Two at once (the unit and a manual debugging run)
/// could take the same generation, or trip over each other's temporary
/// file. Hold the returned file as long as the sender runs.
pub fn lock(dir: &Path) -> anyhow::Result<std::fs::File> {
    create_dir(dir)?;
    crate::dirlock::lock(
        dir,
        "state directory",
        &format!(
            "another hb send is using the state directory {}: stop it first, or give this one its own --state-dir",
            dir.display()
        ),
    )
}

/// Picks the next generation for `dir` given the current Unix time, and
/// persists it. Creates `dir` (mode 0700) if needed.
pub fn next(dir: &Path, now_secs: u32) -> anyhow::Result<Next> {
    create_dir(dir)?;
    let path = dir.join(FILE);
    let (previous, ignored) = read(&path);
    let generation = match previous {
        Some(u32::MAX) => bail!(
            "state file {} holds generation {}, the largest possible; remove it to start over \
             (a monitor that saw this generation drops any smaller one as stale until it \
             forgets the node: take the node off its --nodes, reload, and put it back)",
            path.display(),
            u32::MAX
        ),
        Some(p) => (p + 1).max(now_secs),
        // A file that was there but told nothing: see the module docs.
        None if ignored.is_some() => now_secs.saturating_add(1),
        None => now_secs,
    };
    let unsaved = write_atomically(&path, generation)
        .err()
        .map(|e| format!("{e:#}"));
    Ok(Next {
        generation,
        previous,
        ignored,
        unsaved,
    })
}

/// The generation stored at `path`: `(Some(g), None)`, `(None, None)`
/// without a file, `(None, Some(why))` when it is corrupt or unreadable.
fn read(path: &Path) -> (Option<u32>, Option<String>) {
    match std::fs::read_to_string(path) {
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
        Err(e) => (
            None,
            Some(format!("cannot read state file {}: {e}", path.display())),
        ),
    }
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))
}

/// Writes `value` and a newline to `path`: temporary file, fsync,
/// rename, fsync of the directory.
pub(super) fn write_atomically(path: &Path, value: impl std::fmt::Display) -> anyhow::Result<()> {
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
    write().map_err(|e| {
        // Not left behind half-written (a full disk): the next write
        // makes it again.
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("cannot write state file {}", path.display()))
    })
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
                ignored: None,
                unsaved: None,
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
            // Its writer may have started within this second.
            assert_eq!(n.generation, NOW + 1);
            let why = n.ignored.expect("reported");
            assert!(why.contains("is corrupt"), "{why}");
            assert!(
                why.contains(&d.path().join(FILE).display().to_string()),
                "{why}"
            );
            // Repaired: the next start reads it.
            assert_eq!(next(d.path(), NOW).unwrap().previous, Some(NOW + 1));
        }
    }

    #[test]
    fn exhausted_generation_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), format!("{}\n", u32::MAX)).unwrap();
        let e = next(d.path(), NOW).unwrap_err().to_string();
        assert!(e.contains("largest possible"), "{e}");
    }

    /// The new generation cannot be stored (its temporary file's name is
    /// taken by a directory): reported, and the sender starts anyway with
    /// a generation above the stored one.
    #[test]
    fn an_unwritable_state_file_is_reported_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), format!("{}\n", NOW + 10)).unwrap();
        std::fs::create_dir(d.path().join("generation.tmp")).unwrap();
        let n = next(d.path(), NOW).unwrap();
        assert_eq!((n.generation, n.previous), (NOW + 11, Some(NOW + 10)));
        assert_eq!(n.ignored, None);
        let why = n.unsaved.expect("reported");
        assert!(
            why.contains(&format!(
                "cannot write state file {}",
                d.path().join(FILE).display()
            )),
            "{why}"
        );
        // Later: Unix seconds win as always.
        assert_eq!(next(d.path(), NOW + 100).unwrap().generation, NOW + 100);
    }

    /// The state file cannot be read (here: it is a directory, which is
    /// neither missing nor corrupt): reported, and the generation is above
    /// Unix seconds, which a start earlier in the same second took.
    #[test]
    fn an_unreadable_state_file_is_reported_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(FILE)).unwrap();
        let n = next(d.path(), NOW).unwrap();
        assert_eq!((n.generation, n.previous), (NOW + 1, None));
        let why = n.ignored.expect("reported");
        assert!(
            why.contains(&format!(
                "cannot read state file {}",
                d.path().join(FILE).display()
            )),
            "{why}"
        );
        assert!(
            n.unsaved.is_some(),
            "a directory is in the way of the rename"
        );
    }

    #[test]
    fn a_second_sender_on_the_same_state_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let held = lock(&dir).unwrap();
        let e = format!("{:#}", lock(&dir).unwrap_err());
        assert_eq!(
            e,
            format!(
                "another hb send is using the state directory {}: stop it first, or give this one its own --state-dir",
                dir.display()
            )
        );
        drop(held);
        lock(&dir).expect("free again once the first one ends");
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        // A non-empty directory where the file goes: the rename fails,
        // after the temporary file was written.
        let path = d.path().join(FILE);
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), "x").unwrap();
        let e = format!("{:#}", write_atomically(&path, 7).unwrap_err());
        assert!(e.contains("cannot write state file"), "{e}");
        assert!(!path.with_extension("tmp").exists());
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
