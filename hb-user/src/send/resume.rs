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
//! The resumed interval is where the sender starts, not its configured
//! interval: it stands in for the request that set it until the monitor
//! that made it moves (its name resolves elsewhere), and the sender then
//! goes back to `--interval-ms` (see `sender`). Which monitor that is,
//! its address, is stored with it (`asked_by=`); without it (an earlier
//! hb's file, or the configured interval stored) any monitor's move
//! ends it.
//!
//! A request must not outlive what it was made under: the file also
//! holds the `--monitor` list (as given, sorted) and the `--interval-ms`
//! of the sender that stored it, and a start with a monitor taken off
//! that list (the one that asked, perhaps) or another `--interval-ms`
//! starts at its `--interval-ms` (a monitor that still wants another
//! interval asks again with its next ACK). Without that, an interval one monitor asked
//! for held the node there for good, across restarts, after the monitor
//! was taken off the list and the interval reconfigured.
//!
//! The file holds a decimal number of milliseconds, then `monitors=` and
//! `interval_ms=` lines and, when known, an `asked_by=` line (the
//! address of the monitor whose request it was), each ending in a
//! newline. (An hb that knows no `asked_by=` takes it for a later hb's
//! file: outdated, forgotten; it starts at its `--interval-ms`.) A missing file means
//! "no monitor asked yet"; a corrupt one is reported and ignored (the
//! configured interval is used), never a reason not to send heartbeats.
//! A file of the number alone (written by an earlier hb) resumes as it
//! did. A file whose last line has no newline was cut short (every hb
//! wrote one): it is corrupt, or a `1500` cut to `1` would resume at the
//! sender's fastest interval as an earlier hb's file. A stored interval outside
//! the sender's bounds (changed since) is clamped into them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use anyhow::Context as _;

use super::generation;

/// Name of the state file inside `--state-dir`.
pub const FILE: &str = "interval";

/// What the sender's configuration a stored interval was asked for
/// under: the `--monitor` list as given (sorted, without repeats) and the
/// configured `--interval-ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Under {
    pub monitors: Vec<String>,
    pub interval_ms: u32,
}

impl Under {
    pub fn new(monitors: &[String], interval_ms: u32) -> Under {
        let mut monitors = monitors.to_vec();
        monitors.sort();
        monitors.dedup();
        Under {
            monitors,
            interval_ms,
        }
    }
}

/// A stored interval, and what it was asked for under (`None`: a file of
/// an earlier hb, which did not say).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub ms: u32,
    pub under: Option<Under>,
    /// The address of the monitor that asked for it, if known.
    pub asked_by: Option<SocketAddr>,
    /// The file says more than this hb knows of (a later one wrote it):
    /// what the request depends on is not all known, so it is outdated.
    pub unknown: bool,
}

/// The interval stored in `dir`: `Ok(None)` without one, `Err` (the
/// reason, naming the file) when it is unreadable or malformed.
pub fn load(dir: &Path) -> Result<Option<Stored>, String> {
    let path = dir.join(FILE);
    let corrupt = || {
        format!(
            "state file {} is corrupt (expected a decimal interval in ms, then monitors= and \
             interval_ms= lines)",
            path.display()
        )
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(corrupt()),
        Err(e) => return Err(format!("cannot read state file {}: {e}", path.display())),
    };
    // Cut short (see the module docs).
    if !text.ends_with('\n') {
        return Err(corrupt());
    }
    let mut lines = text.lines();
    let ms = match lines.next().map(|l| l.trim().parse::<u32>()) {
        Some(Ok(ms)) if ms > 0 => ms,
        _ => return Err(corrupt()),
    };
    let (mut monitors, mut interval_ms, mut asked_by, mut unknown) = (None, None, None, false);
    for line in lines.filter(|l| !l.trim().is_empty()) {
        match line.split_once('=') {
            Some(("monitors", list)) if monitors.is_none() => {
                monitors = Some(
                    list.split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                );
            }
            Some(("interval_ms", v)) if interval_ms.is_none() => {
                interval_ms = Some(v.trim().parse::<u32>().map_err(|_| corrupt())?);
            }
            Some(("asked_by", a)) if asked_by.is_none() => {
                asked_by = Some(a.trim().parse::<SocketAddr>().map_err(|_| corrupt())?);
            }
            Some(("monitors" | "interval_ms" | "asked_by", _)) => return Err(corrupt()),
            Some((key, _))
                if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
            {
                unknown = true;
            }
            _ => return Err(corrupt()),
        }
    }
    let under = match (monitors, interval_ms) {
        (None, None) => None,
        (Some(m), Some(i)) => Some(Under::new(&m, i)),
        _ => return Err(corrupt()),
    };
    Ok(Some(Stored {
        ms,
        under,
        asked_by,
        unknown,
    }))
}

/// Removes the interval stored in `dir`, if any.
pub fn forget(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove state file {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Stores `ms`, asked for by the monitor at `by` (if known) under
/// `under`, in `dir` (atomically, like the generation).
pub fn save(dir: &Path, ms: u32, by: Option<SocketAddr>, under: &Under) -> anyhow::Result<()> {
    generation::write_atomically(&dir.join(FILE), contents(ms, by, under))
}

/// The file's text without its last newline (`write_atomically` ends it).
fn contents(ms: u32, by: Option<SocketAddr>, under: &Under) -> String {
    let mut text = format!(
        "{ms}\nmonitors={}\ninterval_ms={}",
        under.monitors.join(" "),
        under.interval_ms
    );
    if let Some(a) = by {
        text += &format!("\nasked_by={a}");
    }
    text
}

/// How long an exiting sender waits for the interval still being stored:
/// enough for an fsync on a busy disk, short enough that a hung one does
/// not hold up the exit (its LEAVING heartbeat is already sent).
pub const FINISH_WITHIN: Duration = Duration::from_secs(1);

/// Stores the intervals monitors ask for from a thread of its own: a save
/// fsyncs the file and its directory, and on a slow disk that held up the
/// sender's event loop, and with it the next heartbeat. One thread, so
/// saves never overtake each other; of values queued meanwhile only the
/// newest is written. An exiting sender waits for what is queued
/// ([`Saver::finish`], bounded): without that, a stop just after a monitor
/// asked for a new interval ended the process before the thread stored
/// it, and the restart resumed at the one before. (A write is atomic: a
/// restart finds the old value or the new one, also after a wait cut
/// short.)
pub struct Saver {
    tx: mpsc::Sender<(u32, Option<SocketAddr>)>,
    /// Disconnected when the thread ends (it holds the sender).
    done: mpsc::Receiver<()>,
}

impl Saver {
    pub fn start(dir: PathBuf, under: Under) -> anyhow::Result<Saver> {
        Saver::start_with(move |(ms, by)| save(&dir, ms, by, &under))
    }

    /// The thread, storing with `store` (tests stand in a slow disk).
    fn start_with(
        mut store: impl FnMut((u32, Option<SocketAddr>)) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<Saver> {
        let (tx, rx) = mpsc::channel::<(u32, Option<SocketAddr>)>();
        let (done_tx, done) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("hb-resume".into())
            .spawn(move || {
                let _done = done_tx;
                while let Ok(mut ms) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        ms = newer;
                    }
                    if let Err(e) = store(ms) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot store the interval");
                    }
                }
            })
            .context("cannot start the thread that stores the interval")?;
        Ok(Saver { tx, done })
    }

    /// Queues `ms`, asked for by the monitor at `by` (if known), to be
    /// stored; never blocks.
    pub fn save(&self, ms: u32, by: Option<SocketAddr>) {
        let _ = self.tx.send((ms, by));
    }

    /// Lets the thread store what is queued and waits for it, at most
    /// `within`. Whether it is stored (`false`: still being written).
    pub fn finish(self, within: Duration) -> bool {
        let Saver { tx, done } = self;
        drop(tx);
        matches!(
            done.recv_timeout(within),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    }
}

/// Where a start resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the configured interval: nothing stored.
    Configured,
    /// At the stored interval, clamped into the sender's bounds.
    Resumed(u32),
    /// At the configured interval: the stored one was asked for under
    /// another `--monitor` list or `--interval-ms`.
    Outdated,
}

/// Where a sender configured `now` starts, given what is `stored`.
pub fn start_interval(now: &Under, stored: Option<&Stored>, min: u32, max: u32) -> Start {
    match stored {
        None => Start::Configured,
        // Monitors added since leave the one that asked on the list.
        Some(s)
            if s.unknown
                || s.under.as_ref().is_some_and(|u| {
                    u.interval_ms != now.interval_ms
                        || !u.monitors.iter().all(|m| now.monitors.contains(m))
                }) =>
        {
            Start::Outdated
        }
        Some(s) => Start::Resumed(s.ms.clamp(min, max)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn under(monitors: &[&str], interval_ms: u32) -> Under {
        Under::new(
            &monitors.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            interval_ms,
        )
    }

    #[test]
    fn the_saver_stores_the_newest_interval() {
        let d = tempfile::tempdir().unwrap();
        let u = under(&["198.18.0.1:7420"], 1000);
        let s = Saver::start(d.path().to_path_buf(), u.clone()).unwrap();
        let by: SocketAddr = "198.18.0.1:7420".parse().unwrap();
        for ms in 1..=100 {
            s.save(ms, (ms % 2 == 0).then_some(by));
        }
        drop(s);
        let want = Ok(Some(Stored {
            ms: 100,
            under: Some(u),
            asked_by: Some(by),
            unknown: false,
        }));
        let t = std::time::Instant::now();
        while load(d.path()) != want {
            assert!(t.elapsed().as_secs() < 10, "{:?}", load(d.path()));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A sender stopped just after a monitor asked for a new interval
    /// exits with it stored: the restart resumes at it, not at the one
    /// before.
    #[test]
    fn finish_waits_for_the_queued_interval() {
        let d = tempfile::tempdir().unwrap();
        let u = under(&["198.18.0.1:7420"], 1000);
        save(d.path(), 300, None, &u).unwrap();
        let dir = d.path().to_path_buf();
        let s = Saver::start_with({
            let u = u.clone();
            move |(ms, by)| {
                // A busy disk's fsync.
                std::thread::sleep(Duration::from_millis(200));
                save(&dir, ms, by, &u)
            }
        })
        .unwrap();
        s.save(150, None);
        assert!(s.finish(Duration::from_secs(10)));
        assert_eq!(load(d.path()).unwrap().unwrap().ms, 150);
    }

    /// A hung disk does not hold up the exit: the wait ends at its bound.
    #[test]
    fn finish_gives_up_on_a_hung_disk() {
        let (hang, hung) = mpsc::channel::<()>();
        let s = Saver::start_with(move |_| {
            let _ = hung.recv();
            Ok(())
        })
        .unwrap();
        s.save(150, None);
        let t = std::time::Instant::now();
        assert!(!s.finish(Duration::from_millis(100)));
        let waited = t.elapsed();
        assert!(
            (Duration::from_millis(100)..Duration::from_secs(5)).contains(&waited),
            "{waited:?}"
        );
        drop(hang);
    }

    #[test]
    fn round_trip_and_start() {
        let d = tempfile::tempdir().unwrap();
        let u = under(&["b:1", "a:2", "b:1"], 1000);
        assert_eq!(u.monitors, ["a:2", "b:1"], "sorted, once each");
        assert_eq!(load(d.path()), Ok(None));
        assert_eq!(start_interval(&u, None, 100, 10_000), Start::Configured);
        save(d.path(), 4642, None, &u).unwrap();
        let text = std::fs::read_to_string(d.path().join(FILE)).unwrap();
        assert_eq!(text, contents(4642, None, &u) + "\n");
        let stored = load(d.path()).unwrap().unwrap();
        assert_eq!(
            stored,
            Stored {
                ms: 4642,
                under: Some(u.clone()),
                asked_by: None,
                unknown: false,
            }
        );
        // With the monitor that asked, IPv4 or IPv6 (link-local with its
        // scope).
        for by in ["198.18.0.1:7420", "[fd00::1]:7420", "[fe80::1%3]:7420"] {
            let by: SocketAddr = by.parse().unwrap();
            save(d.path(), 4642, Some(by), &u).unwrap();
            let text = std::fs::read_to_string(d.path().join(FILE)).unwrap();
            assert!(text.ends_with(&format!("\nasked_by={by}\n")), "{text}");
            assert_eq!(load(d.path()).unwrap().unwrap().asked_by, Some(by));
        }
        let start = |now: &Under, min, max| start_interval(now, Some(&stored), min, max);
        assert_eq!(start(&u, 100, 10_000), Start::Resumed(4642));
        // The same list, given in another order.
        assert_eq!(
            start(&under(&["b:1", "a:2"], 1000), 100, 10_000),
            Start::Resumed(4642)
        );
        // Bounds changed since: clamped into the new ones.
        assert_eq!(start(&u, 100, 2000), Start::Resumed(2000));
        // A monitor added since: the one that asked is still listed.
        assert_eq!(
            start(&under(&["a:2", "b:1", "c:3"], 1000), 100, 10_000),
            Start::Resumed(4642)
        );
        // Asked for under another configuration: a monitor taken off the
        // list, another --interval-ms.
        for other in [
            under(&["a:2"], 1000),
            under(&["a:2", "c:3"], 1000),
            under(&["a:2", "b:1"], 5000),
        ] {
            assert_eq!(start(&other, 100, 10_000), Start::Outdated, "{other:?}");
        }
        // Overwritten by the next request.
        save(d.path(), 500, None, &u).unwrap();
        assert_eq!(load(d.path()).unwrap().unwrap().ms, 500);
        // Forgotten (an outdated start): nothing stored, for any start.
        forget(d.path()).unwrap();
        forget(d.path()).unwrap();
        assert_eq!(load(d.path()), Ok(None));
    }

    /// A file a later hb wrote, with more than this one knows of: what
    /// the request depends on is not all known, so it is outdated.
    #[test]
    fn a_later_file_is_outdated() {
        let d = tempfile::tempdir().unwrap();
        let u = under(&["a:1"], 1000);
        std::fs::write(
            d.path().join(FILE),
            "4642\nmonitors=a:1\ninterval_ms=1000\nbounds_ms=100-5000\n",
        )
        .unwrap();
        let stored = load(d.path()).unwrap().unwrap();
        assert!(stored.unknown);
        assert_eq!(
            start_interval(&u, Some(&stored), 100, 10_000),
            Start::Outdated
        );
    }

    /// A file an earlier hb wrote (the number alone) resumes as it did.
    #[test]
    fn an_earlier_file_resumes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), "4642\n").unwrap();
        let stored = load(d.path()).unwrap().unwrap();
        assert_eq!(
            stored,
            Stored {
                ms: 4642,
                under: None,
                asked_by: None,
                unknown: false,
            }
        );
        assert_eq!(
            start_interval(&under(&["x:1"], 1000), Some(&stored), 100, 10_000),
            Start::Resumed(4642)
        );
    }

    #[test]
    fn corrupt_state_is_reported_by_name() {
        for junk in [
            &b""[..],
            b"abc\n",
            b"0\n",
            b"\xff\xfe",
            b"500\nmonitors=a:1\n",
            b"500\ninterval_ms=1000\n",
            b"500\nmonitors=a:1\ninterval_ms=x\n",
            b"500\nmonitors=a:1\nmonitors=a:1\ninterval_ms=1000\n",
            b"500\nmonitors=a:1\ninterval_ms=1000\nasked_by=a:1\n",
            b"500\nmonitors=a:1\ninterval_ms=1000\nasked_by=198.18.0.1:7420\nasked_by=198.18.0.1:7420\n",
            b"500\nmonitors=a:1\ninterval_ms=1000\nNot A Key\n",
            // Cut short: the first line of 1500, or before the last newline.
            b"1",
            b"150",
            b"1500",
            b"1500\nmonitors=a:1\ninterval_ms=1000",
        ] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(FILE), junk).unwrap();
            let why = load(d.path()).unwrap_err();
            assert!(why.contains("interval"), "{why}");
            assert!(why.contains(&d.path().display().to_string()), "{why}");
        }
    }

    /// Property tests of the state file, which a crash or an operator can
    /// corrupt: any bytes are an interval or a named error, never a panic;
    /// and a file cut short anywhere never resumes another interval than
    /// the one stored.
    mod props {
        use proptest::prelude::*;

        use super::*;

        fn check_cut(whole: &[u8], stored_ms: u32, now: &Under) -> Result<(), TestCaseError> {
            let d = tempfile::tempdir().unwrap();
            for len in 0..=whole.len() {
                // A new file each time: ext4 may flush a file truncated
                // and written again as it is closed (`auto_da_alloc`),
                // which made this take seconds.
                let _ = std::fs::remove_file(d.path().join(FILE));
                std::fs::write(d.path().join(FILE), &whole[..len]).unwrap();
                match load(d.path()) {
                    Ok(s) => {
                        prop_assert!(s.is_some());
                        if let Start::Resumed(ms) = start_interval(now, s.as_ref(), 1, u32::MAX) {
                            prop_assert_eq!(ms, stored_ms, "cut at {} of {:?}", len, whole);
                        }
                    }
                    Err(why) => prop_assert!(why.contains(&d.path().display().to_string())),
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_are_an_interval_or_a_named_error(
                bytes in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..64),
                    "[0-9]{0,12}(\n(monitors|interval_ms|asked_by|[a-z_]{1,4})=[ -~]{0,12}){0,4}\n?"
                        .prop_map(String::into_bytes),
                ],
            ) {
                let d = tempfile::tempdir().unwrap();
                std::fs::write(d.path().join(FILE), &bytes).unwrap();
                if let Ok(Some(s)) = load(d.path()) {
                    prop_assert!(s.ms > 0);
                }
            }

        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

            #[test]
            fn a_file_cut_short_never_resumes_another_interval(
                ms in prop_oneof![1..=20_000u32, any::<u32>().prop_filter("not 0", |v| *v != 0)],
                monitors in prop::collection::vec("[a-z0-9.:\\[\\]]{1,20}", 0..4),
                interval_ms in any::<u32>(),
                earlier in any::<bool>(),
                by in prop::option::of(any::<SocketAddr>()),
            ) {
                let u = Under::new(&monitors, interval_ms);
                // What `save` writes (as an earlier hb did: the number
                // alone), without a save's syncs.
                let whole = match earlier {
                    true => format!("{ms}\n"),
                    false => contents(ms, by, &u) + "\n",
                };
                check_cut(whole.as_bytes(), ms, &u)?;
            }
        }
    }
}
