//! The learned table on disk: a JSON document, written atomically (temp
//! file in the same directory, fsync, rename, fsync of the directory) so a
//! crash mid-save leaves either the old table or the new one, never half of
//! one. The temporary file such a crash leaves beside the table is removed
//! by the next save (of any process) once its PID is no running process.
//!
//! Only visited rows are stored, each with its state spelled out for
//! people (`hb controller show` prints the file without a running monitor)
//! and its index for the program. Loading checks that the file was learned
//! with the same layout (version), interval levels, bucket edges and
//! detection target as the running controller: a table whose rows mean
//! something else is refused with a clear error, never silently misread.
//!
//! Version 2 (stop 8) added the headroom to the state, moved the levels
//! onto round intervals and changed the reward; a version 1 table is
//! refused with a message that says so (its rows cannot be mapped: the
//! headroom it never measured is part of every row).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    Action, Grid, QController, RewardStats, StateDescription, StateKey, VisitedRow, describe_rows,
};

/// `format` field of a table file.
pub const FORMAT: &str = "hb-controller-table";
/// `version` field of the table files this build writes and reads.
pub const VERSION: u32 = 2;

/// One visited row of the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Row index (see `StateKey::index`).
    pub index: u32,
    pub state: StateDescription,
    pub visits: u64,
    /// How often each of slower, hold, faster has been learned from.
    pub updates: [u64; 3],
    /// Q values of slower, hold, faster.
    pub q: [f64; 3],
    /// The greedy action in this state (informative; recomputed on load).
    pub greedy: Action,
}

/// The table file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableFile {
    pub format: String,
    pub version: u32,
    /// Interval levels the rows refer to, ms.
    pub levels_ms: Vec<u32>,
    pub target_detection_ms: f64,
    pub decisions: u64,
    pub explorations: u64,
    pub rewards: RewardStats,
    pub rows: Vec<Row>,
}

/// Why a table could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("controller table {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("controller table {path} is not valid JSON of a table")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("controller table {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TableError + '_ {
    move |source| TableError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and checks the file's own consistency (format, version, indices,
/// finite values), without a controller to match it against.
pub fn read(path: &Path) -> Result<TableFile, TableError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let parse = |source| TableError::Parse {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |what: String| TableError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    // The format and version first: an older layout must be named as
    // such, not reported as a JSON shape error.
    #[derive(Deserialize)]
    struct Header {
        format: String,
        version: u32,
    }
    let h: Header = serde_json::from_slice(&bytes).map_err(parse)?;
    if h.format == FORMAT && h.version == 1 {
        return Err(invalid(format!(
            "version 1 was learned with another state layout and reward (before the headroom \
             and the p99 goal); this build reads version {VERSION} only: remove the file, the \
             controller learns afresh"
        )));
    }
    // Before the whole parse: another version's layout is named as such,
    // not reported as a missing field.
    if h.format == FORMAT && h.version != VERSION {
        return Err(invalid(format!(
            "version {} is not supported (this build reads version {VERSION})",
            h.version
        )));
    }
    let mut t: TableFile = serde_json::from_slice(&bytes).map_err(parse)?;
    if t.format != FORMAT {
        return Err(invalid(format!(
            "format is {:?}, expected {FORMAT:?}",
            t.format
        )));
    }
    if t.version != VERSION {
        return Err(invalid(format!(
            "version {} is not supported (this build reads version {VERSION})",
            t.version
        )));
    }
    if !(t.target_detection_ms.is_finite() && t.target_detection_ms > 0.0) {
        return Err(invalid(format!(
            "target detection time {} ms is not a positive number",
            t.target_detection_ms
        )));
    }
    if t.levels_ms.is_empty() || t.levels_ms.windows(2).any(|w| w[0] >= w[1]) {
        return Err(invalid(
            "interval levels are empty or not increasing".into(),
        ));
    }
    let levels = t.levels_ms.len();
    let grid = super::Grid {
        levels_ms: t.levels_ms.clone(),
    };
    let rewards = &t.rewards;
    let stats = [
        rewards.mean,
        rewards.min,
        rewards.max,
        rewards.last,
        rewards.mean_detection_ms,
    ];
    if stats.iter().any(|v| !v.is_finite() || v.abs() > Q_MAX)
        || !(0.0..=1.0).contains(&rewards.mean_late_share)
    {
        return Err(invalid("the reward statistics are out of range".into()));
    }
    let mut seen = std::collections::HashSet::with_capacity(t.rows.len());
    for r in &mut t.rows {
        if r.index as usize >= StateKey::rows(levels) {
            return Err(invalid(format!("row index {} is out of range", r.index)));
        }
        if !seen.insert(r.index) {
            // Loading would keep one of them silently.
            return Err(invalid(format!("row {} appears twice", r.index)));
        }
        if r.q.iter().any(|v| !v.is_finite() || v.abs() > Q_MAX) {
            // Finite but huge (hand-edited), the next update overflowed to
            // infinity, and the next save wrote a file no start could read.
            return Err(invalid(format!(
                "row {} has a Q value that is not a finite number within +-{Q_MAX:e}",
                r.index
            )));
        }
        let key = StateKey::from_index(r.index as usize, levels);
        // Informative in the file: what the values say, not what it says.
        r.greedy = super::greedy_of(r.q, key.interval as usize, levels - 1).0;
        let expect = key.describe(&grid);
        if expect != r.state {
            return Err(invalid(format!(
                "row {} describes {:?} but this build's buckets give {:?}: the table \
                 was learned with other bucket edges",
                r.index, r.state, expect
            )));
        }
    }
    Ok(t)
}

/// The largest Q value a table may hold. The worst reward of a decision
/// is about -8e6 (every term at its bound, over eight periods), so values
/// stay within about 2e9 of zero at gamma 0.995.
pub const Q_MAX: f64 = 1e12;

impl TableFile {
    /// Writes the document to `path` atomically (creating its directory
    /// if needed): a crash leaves the old table or the new one. A value
    /// that is not finite (JSON would say `null`, which no start reads)
    /// is refused.
    pub fn save(&self, path: &Path) -> Result<(), TableError> {
        if self.rows.iter().any(|r| r.q.iter().any(|v| !v.is_finite())) {
            return Err(TableError::Invalid {
                path: path.to_path_buf(),
                what: "a Q value is not a finite number: not saved over the last good table".into(),
            });
        }
        let json = serde_json::to_vec_pretty(self).map_err(|source| TableError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        write_atomic(path, &json)
    }
}

/// Writes `bytes` to `path` atomically.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TableError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "table".into());
    // One temporary file per save, not per process: the monitor's minute
    // save and a reload's may run at once, and with one name each
    // truncated the other's file (a corrupt table 12 times in 5000 racing
    // pairs). Whichever rename comes last wins, whole.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    remove_stale_temps(&dir, &name);
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))?;
        // Make the rename itself durable.
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files that saves of the table `name` in `dir`
/// left behind when their process died mid-save (a crash, a kill, a
/// power cut before the rename): `.NAME.tmp-PID-N`, regular files whose
/// PID is no running process. Nothing else is touched: other names,
/// other tables' files, anything but a regular file, our own process's
/// (a save of ours may be running now), or a live process's (another
/// monitor's save in progress, or a PID reused since, which waits for a
/// later save). Best effort: a failure only leaves the file.
fn remove_stale_temps(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(temp_pid)
        else {
            continue;
        };
        // `file_type` does not follow a symlink.
        if pid == std::process::id()
            || process_alive(pid)
            || !e.file_type().is_ok_and(|t| t.is_file())
        {
            continue;
        }
        let path = e.path();
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                pid,
                "removed the temporary file of a controller table save its process did not finish"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                "cannot remove the temporary file of an unfinished controller table save: {e}"
            ),
        }
    }
}

/// The PID of a temporary file's `PID-N` suffix, if it is one: both
/// decimal, the PID a positive `pid_t` (0 or a negative one would name a
/// process group to `kill`).
fn temp_pid(suffix: &str) -> Option<u32> {
    let (pid, n) = suffix.split_once('-')?;
    let decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !decimal(pid) || !decimal(n) {
        return None;
    }
    let pid: i32 = pid.parse().ok()?;
    (pid > 0).then_some(pid as u32)
}

/// Whether a process `pid` exists (signal 0: nothing is sent). One that
/// exists but is not ours to signal (`EPERM`) exists.
fn process_alive(pid: u32) -> bool {
    use nix::{errno::Errno, sys::signal::kill, unistd::Pid};
    !matches!(kill(Pid::from_raw(pid as i32), None), Err(Errno::ESRCH))
}

/// What [`QController::table_file`] holds, copied
/// ([`QController::table_copy`]): plain numbers, cheap to take (0.1 ms for
/// a table of 8,424 visited rows); [`TableCopy::build`] describes and sorts
/// the rows (7 ms for those, more on a loaded machine). The monitor takes
/// the copy under the core's lock and builds the file without it: built
/// under it, the minute save and a reload held the tick off that long.
#[derive(Clone, Debug)]
pub struct TableCopy {
    grid: Grid,
    target_detection_ms: f64,
    decisions: u64,
    explorations: u64,
    rewards: RewardStats,
    rows: Vec<VisitedRow>,
}

impl TableCopy {
    /// The file document.
    pub fn build(self) -> TableFile {
        TableFile {
            format: FORMAT.into(),
            version: VERSION,
            rows: describe_rows(self.rows, &self.grid),
            levels_ms: self.grid.levels_ms,
            target_detection_ms: self.target_detection_ms,
            decisions: self.decisions,
            explorations: self.explorations,
            rewards: self.rewards,
        }
    }
}

impl QController {
    /// The table as a file document.
    pub fn table_file(&self) -> TableFile {
        self.table_copy().build()
    }

    /// The table's numbers, to build its file from later.
    pub fn table_copy(&self) -> TableCopy {
        TableCopy {
            grid: self.grid.clone(),
            target_detection_ms: self.cfg.target_detection_ms,
            decisions: self.decisions,
            explorations: self.explorations,
            rewards: self.rewards,
            rows: self.visited(),
        }
    }

    /// Saves the table to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), TableError> {
        self.table_file().save(path)
    }

    /// Replaces the table with the one saved at `path`. Refuses a table
    /// learned over other interval levels. The decision count (and so
    /// epsilon's decay) continues from the file's.
    pub fn load(&mut self, path: &Path) -> Result<(), TableError> {
        let t = read(path)?;
        self.load_table(&t).map_err(|what| TableError::Invalid {
            path: path.to_path_buf(),
            what: format!("{what}: remove the file or set them back"),
        })
    }

    /// Replaces the table with `t` (read and checked by [`read`], or taken
    /// from a running controller); refuses one learned over other levels
    /// or for another target, saying which.
    pub fn load_table(&mut self, t: &TableFile) -> Result<(), String> {
        let rows = t.rows.iter().map(|r| VisitedRow {
            index: r.index,
            visits: r.visits,
            updates: r.updates,
            q: r.q,
        });
        self.load_rows(
            &t.levels_ms,
            t.target_detection_ms,
            rows,
            (t.decisions, t.explorations, t.rewards),
        )
    }

    /// [`Self::load_table`] from a copy (a running controller's, under the
    /// core's lock: nothing is described or sorted).
    pub fn load_copy(&mut self, t: &TableCopy) -> Result<(), String> {
        self.load_rows(
            &t.grid.levels_ms,
            t.target_detection_ms,
            t.rows.iter().copied(),
            (t.decisions, t.explorations, t.rewards),
        )
    }

    fn load_rows(
        &mut self,
        levels_ms: &[u32],
        target_detection_ms: f64,
        rows: impl Iterator<Item = VisitedRow>,
        (decisions, explorations, rewards): (u64, u64, RewardStats),
    ) -> Result<(), String> {
        if levels_ms != self.grid.levels_ms {
            return Err(format!(
                "learned for interval levels {:?} ms, this controller uses {:?} ms \
                 (other min/max interval or step)",
                levels_ms, self.grid.levels_ms
            ));
        }
        if target_detection_ms != self.cfg.target_detection_ms {
            // The headroom buckets and every reward are relative to it.
            return Err(format!(
                "learned for a {} ms detection target, this controller aims at {} ms",
                target_detection_ms, self.cfg.target_detection_ms
            ));
        }
        self.q.iter_mut().for_each(|v| *v = 0.0);
        self.visits.iter_mut().for_each(|v| *v = 0);
        self.updates.iter_mut().for_each(|v| *v = 0);
        for r in rows {
            let s = r.index as usize;
            self.q[s * 3..s * 3 + 3].copy_from_slice(&r.q);
            self.visits[s] = r.visits;
            self.updates[s * 3..s * 3 + 3].copy_from_slice(&r.updates);
        }
        self.decisions = decisions;
        self.explorations = explorations;
        self.rewards = rewards;
        Ok(())
    }
}
