//! A/B comparison of XDP gate objects through BPF_PROG_TEST_RUN, for
//! optimising the gate: `bench_dataplane`'s rows and formulas, but for
//! several eBPF objects loaded side by side and measured interleaved (round
//! by round, object by object), so that the load of a shared machine hits
//! every object alike. Needs root.
//!
//! ```text
//! cargo run --release -p hb-tests --bin bench_gate_ab -- [LABEL=OBJECT.o ...]
//! ```
//!
//! Without arguments it compares the object embedded in `hb` with itself
//! (an A/A run shows the noise). `cur` always names the embedded object.
//! `HB_BENCH_ROUNDS` (default 7), `HB_BENCH_CPU` (default 0) as in
//! `bench_dataplane`; `HB_AB_ROWS=replay,bad_tag` measures only those
//! repeat rows (for profiling); `HB_AB_PIN=DIR` pins each object's `hb_xdp` as
//! `DIR/<label>` (for `bpftool prog dump jited pinned ...`).
//!
//! Every object must use the map layouts of this build's `hb-common`.

use std::{collections::HashMap as StdHashMap, io::Write as _};

use anyhow::Context as _;
use aya::{
    programs::Xdp,
    sys::{Stats, enable_stats},
};
use hb::dataplane::{
    Dataplane as _,
    xdp::{XdpDataplane, XdpOptions},
};
use hb_common::{
    NodeKey,
    maps::{Config, NodeKeys, names},
};
use hb_tests::{
    bench::{heartbeat_frame, pin, summary, test_run_frames},
    frames::Udp,
};

const PORT: u16 = 7420;
const REPEAT: u32 = 1_000_000;
const DISTINCT: u64 = 50_000;
const KEY: NodeKey = NodeKey { k0: 11, k1: 22 };
/// Nodes of the fleet row: accepted heartbeats round-robin over them (a
/// working set of their index and state lines, as in `bench_e2e`).
const FLEET: u32 = 10_000;
/// Node map capacity (smaller than `MAX_NODES` so several objects fit).
const NODES: u32 = 65_536;

fn dgram(node_id: u32, key_epoch: u8, seq: u64) -> Vec<u8> {
    heartbeat_frame(PORT, node_id, key_epoch, seq, &KEY)
}

fn hb(seq: u64) -> Vec<u8> {
    dgram(42, 0, seq)
}

struct Obj {
    label: String,
    dp: XdpDataplane,
}

impl Obj {
    fn load(label: &str, bytes: &'static [u8]) -> anyhow::Result<Obj> {
        let dp = XdpDataplane::open(&XdpOptions {
            max_nodes: Some(NODES),
            object: Some(bytes),
            local_addrs: Some(hb_tests::bench::typical_local_addrs()),
            ..XdpOptions::default()
        })
        .with_context(|| format!("load {label}"))?;
        dp.upsert_node(42, &NodeKeys::single(0, 0, KEY))?;
        for i in 1..=FLEET {
            dp.upsert_node(1000 + i, &NodeKeys::single(i, 0, KEY))?;
        }
        let mut o = Obj {
            label: label.to_string(),
            dp,
        };
        o.config(&Config {
            port: PORT,
            ..Config::default()
        })?;
        Ok(o)
    }

    fn config(&mut self, cfg: &Config) -> anyhow::Result<()> {
        self.dp.set_config(cfg)
    }

    fn with_prog<R>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Xdp) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut ebpf = self.dp.ebpf();
        f(ebpf.program_mut(name).context("program")?.try_into()?)
    }

    fn verified(&mut self) -> anyhow::Result<u32> {
        self.dp.verified_instructions()
    }

    /// Mean ns per run: by test_run's clock (stats off) or by bpf_stats.
    fn measure(
        &mut self,
        prog: &str,
        frames: &[Vec<u8>],
        repeat: u32,
        stats_on: bool,
    ) -> anyhow::Result<f64> {
        let t = self.with_prog(prog, |p| test_run_frames(p, frames, repeat))?;
        let runs = frames.len() as u64 * repeat as u64;
        if stats_on {
            let n = t.stats_runs;
            anyhow::ensure!(n == runs, "bpf_stats counted {n} runs, expected {runs}");
            Ok(t.stats_ns as f64 / runs as f64)
        } else {
            Ok(t.test_run_ns as f64 / frames.len() as f64)
        }
    }
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}: bad value {s:?}")),
        Err(_) => Ok(default),
    }
}

/// Rows measured with `repeat` over one frame (stats off): test_run ns.
const REPEAT_ROWS: [&str; 6] = [
    "floor",
    "pass-through",
    "bad_tag",
    "replay",
    "unknown_node",
    "bad_epoch",
];

fn main() -> anyhow::Result<()> {
    let cpu: usize = env("HB_BENCH_CPU", 0)?;
    let rounds: usize = env("HB_BENCH_ROUNDS", 7)?;
    pin(0, cpu);
    let mut objs = Vec::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let specs: Vec<(String, Option<String>)> = if args.is_empty() {
        vec![("cur".into(), None), ("cur2".into(), None)]
    } else {
        args.iter()
            .map(|a| match a.split_once('=') {
                Some((l, p)) if p != "cur" => (l.to_string(), Some(p.to_string())),
                Some((l, _)) => (l.to_string(), None),
                None => (a.clone(), Some(a.clone())),
            })
            .collect()
    };
    for (label, path) in &specs {
        let bytes = match path {
            Some(p) => std::fs::read(p).with_context(|| format!("read {p}"))?,
            None => hb::EBPF_OBJECT.to_vec(),
        };
        // Leaked: each object lives as long as the benchmark.
        objs.push(Obj::load(label, Vec::leak(bytes))?);
    }
    if let Ok(dir) = std::env::var("HB_AB_PIN") {
        for o in &mut objs {
            let path = format!("{dir}/{}", o.label);
            let _ = std::fs::remove_file(&path);
            o.with_prog(names::PROGRAM, |p| Ok(p.pin(&path)?))?;
        }
    }

    let other = vec![Udp::v4(53, &[0u8; 48]).build()];
    let bad_tag = {
        let mut f = hb(1);
        let n = f.len();
        f[n - 1] ^= 1;
        vec![f]
    };
    let frames: StdHashMap<&str, Vec<Vec<u8>>> = [
        ("floor", vec![hb(1)]),
        ("pass-through", other),
        ("bad_tag", bad_tag),
        ("replay", vec![hb(5)]),
        ("unknown_node", vec![dgram(7, 0, 1)]),
        ("bad_epoch", vec![dgram(42, 9, 1)]),
    ]
    .into_iter()
    .collect();

    // Per object: row name -> samples.
    let mut res: Vec<StdHashMap<&str, Vec<f64>>> = objs.iter().map(|_| StdHashMap::new()).collect();
    // `HB_AB_ROWS=replay,bad_tag`: only these repeat rows (for profiling).
    let only = std::env::var("HB_AB_ROWS").ok();
    let mut next_seq = 1u64;
    // Make "replay" (seq 5) a replay for every object.
    for o in &mut objs {
        o.measure(names::PROGRAM, &[hb(5)], 1, false)?;
    }
    next_seq += 5;
    for _ in 0..rounds {
        for (i, o) in objs.iter_mut().enumerate() {
            let r = &mut res[i];
            for row in REPEAT_ROWS {
                if let Some(only) = &only
                    && !only.split(',').any(|o| o == row)
                {
                    r.entry(row).or_default().push(f64::NAN);
                    continue;
                }
                let prog = if row == "floor" {
                    names::FLOOR
                } else {
                    names::PROGRAM
                };
                let t = o.measure(prog, &frames[row], REPEAT, false)?;
                r.entry(row).or_default().push(t);
            }
            // Distinct frames, program time by bpf_stats.
            let _stats = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
            let first: Vec<Vec<u8>> = (next_seq..next_seq + DISTINCT).map(hb).collect();
            let second: Vec<Vec<u8>> = (next_seq + DISTINCT..next_seq + 2 * DISTINCT)
                .map(hb)
                .collect();
            let acc = o.measure(names::PROGRAM, &first, 1, true)?;
            let rd = o.measure(names::PROGRAM, &first, 1, true)?;
            o.config(&Config {
                port: PORT,
                ack_every: 1,
                ..Config::default()
            })?;
            let ack = o.measure(names::PROGRAM, &second, 1, true)?;
            o.config(&Config {
                port: PORT,
                ..Config::default()
            })?;
            // The fleet: every node once per pass, in a fixed shuffled
            // order, fresh seqs.
            let fleet: Vec<Vec<u8>> = (0..FLEET)
                .map(|i| {
                    let node = 1000 + 1 + (i.wrapping_mul(7919) % FLEET);
                    dgram(node, 0, next_seq + 2 * DISTINCT)
                })
                .collect();
            let fl = o.measure(names::PROGRAM, &fleet, 1, true)?;
            r.entry("p(fleet)").or_default().push(fl);
            r.entry("p(accepted)").or_default().push(acc);
            r.entry("p(replay)").or_default().push(rd);
            r.entry("p(ack)").or_default().push(ack);
        }
        next_seq += 2 * DISTINCT;
    }

    let mut out = std::io::stdout().lock();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    writeln!(
        out,
        "## gate A/B, CPU {cpu}, {rounds} rounds; load {}\n",
        load.trim()
    )?;
    write!(out, "| row |")?;
    for o in &objs {
        write!(out, " {} ns (min-max) | x floor |", o.label)?;
    }
    writeln!(out)?;
    write!(out, "|---|")?;
    for _ in &objs {
        write!(out, "---:|---:|")?;
    }
    writeln!(out)?;
    let med = |r: &StdHashMap<&str, Vec<f64>>, k: &str| summary(&r[k]).0;
    // (row, per object: median, min, max)
    type Line = (String, Vec<(f64, f64, f64)>);
    let mut lines: Vec<Line> = Vec::new();
    for row in REPEAT_ROWS {
        lines.push((row.into(), res.iter().map(|r| summary(&r[row])).collect()));
    }
    // Steady-state accepted, per round: replay (repeat) + p(acc) - p(replay).
    for (name, key) in [("accepted", "p(accepted)"), ("accepted+ACK", "p(ack)")] {
        let v = res
            .iter()
            .map(|r| {
                let per: Vec<f64> = (0..r["replay"].len())
                    .map(|k| r["replay"][k] + r[key][k] - r["p(replay)"][k])
                    .collect();
                summary(&per)
            })
            .collect();
        lines.push((name.into(), v));
    }
    for key in ["p(accepted)", "p(replay)", "p(ack)", "p(fleet)"] {
        lines.push((
            format!("{key} bpf_stats"),
            res.iter().map(|r| summary(&r[key])).collect(),
        ));
    }
    for (name, v) in &lines {
        write!(out, "| {name} |")?;
        for (i, (m, lo, hi)) in v.iter().enumerate() {
            let fl = med(&res[i], "floor");
            write!(out, " {m:.1} ({lo:.1}-{hi:.1}) | {:.2} |", m / fl)?;
        }
        writeln!(out)?;
    }
    // Per round ratio B/A of accepted, to see the spread of the difference.
    if objs.len() >= 2 {
        let acc = |r: &StdHashMap<&str, Vec<f64>>, k: usize| {
            r["replay"][k] + r["p(accepted)"][k] - r["p(replay)"][k]
        };
        for i in 1..objs.len() {
            let diffs: Vec<f64> = (0..rounds)
                .map(|k| acc(&res[i], k) - acc(&res[0], k))
                .collect();
            let (m, lo, hi) = summary(&diffs);
            writeln!(
                out,
                "\naccepted {} - {}: median {m:.1} ns per round ({lo:.1} to {hi:.1})",
                objs[i].label, objs[0].label
            )?;
        }
    }
    for o in &mut objs {
        let n = o.verified()?;
        writeln!(out, "verifier {}: {n} instructions", o.label)?;
    }
    Ok(())
}
