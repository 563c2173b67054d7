//! `hb controller show`: prints a saved table for people (or as JSON),
//! without a running monitor.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context;

use super::table::{self, TableFile};

/// Default location of the monitor's saved table.
pub const DEFAULT_TABLE: &str = "/var/lib/hb/controller.json";

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Print a saved controller table: each visited state with its visits,
    /// Q values and greedy action.
    Show(ShowArgs),
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The table file the monitor saves.
    #[arg(long, default_value = DEFAULT_TABLE)]
    pub file: PathBuf,
    /// Print the file's JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print at most this many rows (most visited first); 0 = all.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
}

pub fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Show(a) => {
            let t = table::read(&a.file)?;
            let text = if a.json {
                serde_json::to_string_pretty(&t).context("encoding the table")? + "\n"
            } else {
                render(&t, a.limit)
            };
            crate::output::stdout(&text)
        }
    }
}

/// The table as aligned text.
pub fn render(t: &TableFile, limit: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "controller table: {} visited states, {} decisions ({} exploratory), target detection {} ms",
        t.rows.len(),
        t.decisions,
        t.explorations,
        t.target_detection_ms
    );
    let _ = writeln!(out, "interval levels (ms): {:?}", t.levels_ms);
    let r = &t.rewards;
    let _ = writeln!(
        out,
        "rewards: n={} mean={:.4} min={:.4} max={:.4}; modelled detection mean {:.0} ms, {} periods over target, \
         modelled late share {:.4} (the p99 goal: <= 0.01)",
        r.count, r.mean, r.min, r.max, r.mean_detection_ms, r.over_target, r.mean_late_share
    );
    let _ = writeln!(
        out,
        "\n{:>9} {:>9} {:>10} {:>9} {:>10} {:>11} {:>8} {:>9} {:>9} {:>9}  greedy",
        "rtt",
        "loss",
        "jitter",
        "load",
        "headroom",
        "interval_ms",
        "visits",
        "q_slower",
        "q_hold",
        "q_faster"
    );
    let n = if limit == 0 { t.rows.len() } else { limit };
    let mut rows: Vec<_> = t.rows.iter().collect();
    rows.sort_by(|a, b| b.visits.cmp(&a.visits).then(a.index.cmp(&b.index)));
    for row in rows.into_iter().take(n) {
        let s = &row.state;
        let _ = writeln!(
            out,
            "{:>9} {:>9} {:>10} {:>9} {:>10} {:>11} {:>8} {:>9.4} {:>9.4} {:>9.4}  {}",
            s.rtt,
            s.loss,
            s.jitter,
            s.load,
            s.headroom,
            s.interval_ms,
            row.visits,
            row.q[0],
            row.q[1],
            row.q[2],
            row.greedy
        );
    }
    if n < t.rows.len() {
        let _ = writeln!(
            out,
            "... {} more rows (--limit 0 shows all)",
            t.rows.len() - n
        );
    }
    out
}
