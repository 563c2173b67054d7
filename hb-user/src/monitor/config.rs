//! `hb monitor`'s options: command-line flags, an optional TOML file with
//! the same keys (`--tick-ms` is `tick_ms = ...`), and the validated
//! [`Settings`] the monitor runs with. Flags override the file; the file
//! overrides the defaults. Unknown keys in the file are errors (a typo must
//! not silently leave a default in force).
//!
//! On SIGHUP the file is read again and merged with the same flags. The
//! keyring (always re-read), the node list, phi's parameters and the state
//! thresholds, the ACK settings and the controller's options
//! ([`Settings::adopt_reloadable`]) take effect without a restart; the
//! others are reported as needing one ([`Settings::restart_only_changes`]).
//! A flag keeps winning over the file on reload, so an option meant to
//! change at runtime belongs in the file (`nodes = "1-1000"`), not on the
//! command line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use hb_common::maps::MAX_NODES;
use serde::Deserialize;

use super::{hooks::HookOptions, state::Thresholds};
use crate::detector::PhiParams;

/// Most hooks that may run at once: each is a process.
pub const MAX_HOOK_CONCURRENCY: usize = 1024;
/// Most events that may wait for a hook: a million, a partition of the
/// largest fleet.
pub const MAX_HOOK_QUEUE: usize = 1 << 20;
/// The longest decision period, ms: an hour (one decision per node per
/// hour is already no control at all).
pub const MAX_DECISION_MS: u64 = 3_600_000;
/// The shortest `max_silence_ms` but 0 (off), ms. The backstop declares a
/// node dead whatever phi says: shorter than a sender's default interval
/// (1 s), it would declare such nodes dead between two heartbeats on time,
/// every one of them, at every beat.
pub const MIN_MAX_SILENCE_MS: u64 = 1000;

/// The longest tick, ms: a minute.
pub const MAX_TICK_MS: u64 = 60_000;

/// Refuses a `tick_ms` outside 1 to [`MAX_TICK_MS`]: the monitor's, and
/// `hb simulate`'s (`--tick-ms`).
pub fn check_tick_ms(ms: u64) -> anyhow::Result<()> {
    if !(1..=MAX_TICK_MS).contains(&ms) {
        bail!("tick_ms must be between 1 and {MAX_TICK_MS}, got {ms}");
    }
    Ok(())
}

/// Refuses a `decision_ms` outside 1 to [`MAX_DECISION_MS`]: the
/// monitor's, and `hb simulate`'s (`--decision-period`).
pub fn check_decision_ms(ms: u64) -> anyhow::Result<()> {
    if !(1..=MAX_DECISION_MS).contains(&ms) {
        bail!("decision_ms must be between 1 and {MAX_DECISION_MS}, got {ms}");
    }
    Ok(())
}

/// Refuses controller bounds (`controller_bounds_ms`, `MIN-MAX`) that are
/// empty or outside the protocol's (100 to 10000 ms): the monitor's, and
/// `hb simulate`'s (`--min-interval-ms`, `--max-interval-ms`).
pub fn check_controller_bounds(min_ms: u32, max_ms: u32) -> anyhow::Result<()> {
    use hb_common_bounds::{MAX, MIN};
    if min_ms > max_ms || min_ms < MIN || max_ms > MAX {
        bail!(
            "controller bounds {min_ms}-{max_ms} ms: expected MIN-MAX within {MIN}-{MAX} ms, MIN at most MAX"
        );
    }
    Ok(())
}

/// Refuses a `max_silence_ms` that is neither 0 (off) nor at least
/// [`MIN_MAX_SILENCE_MS`]: the monitor's, and `hb eval`'s for its hb
/// detector (`--max-silence-ms` both).
pub fn check_max_silence_ms(ms: u64) -> anyhow::Result<()> {
    if (1..MIN_MAX_SILENCE_MS).contains(&ms) {
        bail!("max_silence_ms must be 0 (off) or at least {MIN_MAX_SILENCE_MS}, got {ms}");
    }
    Ok(())
}

/// Where heartbeats are gated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// XDP in the driver (falls back to skb when the driver cannot).
    Native,
    /// Generic XDP (skb mode).
    Skb,
    /// A UDP socket and the same gate in userspace.
    Userspace,
}

/// Who picks each node's heartbeat interval (`--controller`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerKind {
    /// No opinion: every sender keeps its own `--interval-ms`.
    Off,
    /// Ask every node for `--fixed-interval-ms`.
    Fixed,
    /// The Q-learning controller (`hb::controller`), opt-in: see
    /// `--controller` for why it is not the default.
    Qlearn,
}

impl ControllerKind {
    pub fn name(self) -> &'static str {
        match self {
            ControllerKind::Off => "off",
            ControllerKind::Fixed => "fixed",
            ControllerKind::Qlearn => "qlearn",
        }
    }
}

/// `hb monitor` flags (boxed: they are many, and `main`'s command enum
/// should not grow by their size).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Args {
    #[command(flatten)]
    pub opts: Box<Opts>,
}

impl std::ops::Deref for Args {
    type Target = Opts;
    fn deref(&self) -> &Opts {
        &self.opts
    }
}

impl From<Opts> for Args {
    fn from(o: Opts) -> Args {
        Args { opts: Box::new(o) }
    }
}

/// `hb monitor` options. Every one can also come from `--config`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Opts {
    /// TOML file with any of the options below (keys with underscores).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Interface to attach to (repeatable). userspace mode binds its
    /// addresses (all addresses when none is given).
    #[arg(long = "iface", value_name = "IF")]
    pub iface: Vec<String>,
    /// Heartbeat UDP port, 1 to 65535 [default: 7420].
    #[arg(long)]
    pub port: Option<u16>,
    /// Keyring file (TOML `[[epoch]]` tables with `id` and `secret`).
    #[arg(long, value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// Node ids and inclusive ranges, e.g. `1-1000,4242`.
    #[arg(long, value_name = "SPEC")]
    pub nodes: Option<String>,
    /// HTTP address of the API (GET /metrics, /nodes, /nodes/{id},
    /// /healthz, /controller) [default: 127.0.0.1:9420].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Where to gate heartbeats [default: native].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Answer accepted heartbeats with ACKs (every `--ack-every`-th, and
    /// whenever the requested interval differs from the node's);
    /// `--ack=false` overrides the file's `ack` and `ack_every`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ack: Option<bool>,
    /// ACK every N-th accepted heartbeat of a node, N >= 1 (implies --ack)
    /// [default: 1; 10 under `--controller qlearn` without --ack].
    #[arg(long, value_name = "N")]
    pub ack_every: Option<u32>,
    /// Events as JSON lines: a file (appended; reopened on SIGHUP) or `-`
    /// for stdout [default: only the log].
    #[arg(long, value_name = "FILE|-")]
    pub events: Option<String>,
    /// Command run (by /bin/sh -c) for every event; the event is in its
    /// environment (HB_EVENT, HB_NODE_ID, ...) and on its stdin.
    #[arg(long, value_name = "CMD")]
    pub on_event: Option<String>,
    /// Hooks running at once, 1 to 1024 [default: 4].
    #[arg(long, value_name = "N")]
    pub hook_concurrency: Option<usize>,
    /// A hook still running after this is killed, at least 1 [default: 10000].
    #[arg(long, value_name = "MS")]
    pub hook_timeout_ms: Option<u64>,
    /// Events waiting for a hook, 1 to 1048576: with this many waiting, a
    /// node's newer event replaces its own still waiting (its hooks end
    /// with its latest), and state changes start before `joined`
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub hook_queue: Option<usize>,
    /// Decision tick period, 1 to 60000 [default: 100].
    #[arg(long, value_name = "MS")]
    pub tick_ms: Option<u64>,
    /// alive -> suspect at this phi; the thresholds must keep
    /// alive < suspect <= dead; at most 1000 with `--controller qlearn`
    /// [default: 8].
    #[arg(long)]
    pub suspect_phi: Option<f64>,
    /// -> dead at this phi (with --dead-min-intervals of silence) [default: 12].
    #[arg(long)]
    pub dead_phi: Option<f64>,
    /// suspect/dead -> alive after a fresh heartbeat below this phi [default: 1].
    #[arg(long)]
    pub alive_phi: Option<f64>,
    /// Minimum silence for dead, in expected intervals [default: 3].
    #[arg(long, value_name = "N")]
    pub dead_min_intervals: Option<f64>,
    /// Dead after this silence whatever phi says; 0 = off, else at least
    /// 1000 [default: 60000].
    #[arg(long, value_name = "MS")]
    pub max_silence_ms: Option<u64>,
    /// Floor of the inter-arrival standard deviation [default: 20].
    #[arg(long, value_name = "MS")]
    pub min_std_dev_ms: Option<f64>,
    /// Floor of the standard deviation as a fraction of the mean [default: 0.1].
    #[arg(long, value_name = "RATIO")]
    pub min_std_dev_ratio: Option<f64>,
    /// Pause tolerated on top of the expected interval [default: 0].
    #[arg(long, value_name = "MS")]
    pub acceptable_pause_ms: Option<f64>,
    /// A node is not late before its expected interval plus this many
    /// times its recurring stall (the smaller of its two most recent
    /// pauses); 0 = off [default: 1.5].
    #[arg(long, value_name = "FACTOR")]
    pub stall_factor: Option<f64>,
    /// A recurring stall longer than this earns no allowance (a node that
    /// froze that long is judged by its rhythm alone); 0 = no limit
    /// [default: 30000].
    #[arg(long, value_name = "MS")]
    pub max_stall_ms: Option<f64>,
    /// Who picks each node's heartbeat interval: `off` (senders keep
    /// their own), `fixed` (`--fixed-interval-ms` for every node) or
    /// `qlearn` (the Q-learning controller; decisions reach senders in
    /// ACKs, so it turns ACKs on). [default: `fixed` when
    /// `--fixed-interval-ms` is given, else `off`]. `qlearn` is opt-in:
    /// in `cargo xtask bench controller` it does not deliver a fixed
    /// interval's p99 detection time for fewer heartbeats on every
    /// scenario (see the README), so it is not trusted by default.
    #[arg(long, value_enum, value_name = "KIND")]
    pub controller: Option<ControllerKind>,
    /// Ask every node to use this interval (`--controller fixed`), 100 to
    /// 10000 [default: none].
    #[arg(long, value_name = "MS")]
    pub fixed_interval_ms: Option<u32>,
    /// How often the interval policy decides for each node (qlearn spreads
    /// the nodes over the period), 1 to 3600000 [default: 1000; qlearn 5000].
    #[arg(long, value_name = "MS")]
    pub decision_ms: Option<u64>,
    /// qlearn: the interval bounds, ms, within 100-10000 [default: 100-10000].
    #[arg(long, value_name = "MIN-MAX")]
    pub controller_bounds_ms: Option<String>,
    /// qlearn: the 99th-percentile crash-to-suspicion time the controller
    /// aims for, ms, 1 to 3600000 [default: 3000].
    #[arg(long, value_name = "MS")]
    pub controller_target_ms: Option<f64>,
    /// qlearn: seed of the exploration (runs are reproducible) [default: 1].
    #[arg(long, value_name = "N")]
    pub controller_seed: Option<u64>,
    /// qlearn: the learned table, loaded at start if it exists, saved
    /// (atomically) every minute and at exit [default: /var/lib/hb/controller.json].
    #[arg(long, value_name = "FILE")]
    pub controller_table: Option<PathBuf>,
    /// Nodes the operator marks critical (ids and ranges, like `--nodes`):
    /// whatever the controller (or a sender) would choose, their interval
    /// never exceeds `--controller-max-interval-ms`.
    #[arg(long, value_name = "SPEC")]
    pub critical: Option<String>,
    /// The interval cap of `--critical` nodes, ms: at least 100, and under
    /// qlearn at least the bounds' minimum.
    #[arg(long, value_name = "MS")]
    pub controller_max_interval_ms: Option<u32>,
    /// Leave the XDP program attached on exit (state keeps being
    /// gathered); `--keep-attached=false` overrides the file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub keep_attached: Option<bool>,
    /// Provision unknown nodes whose heartbeats verify under their derived
    /// key (README, "Enrolling nodes": the trade-off); `--enroll=false`
    /// overrides the file.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enroll: Option<bool>,
    /// bpffs directory of the pinned maps and link [default: /sys/fs/bpf/hb].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Node slots of the XDP maps, at most 1048576 [default: 1048576].
    /// Each slot holds 208 bytes of locked kernel memory, used or not (218
    /// MB at the default): size it to the fleet and its growth. Maps
    /// pinned by an earlier run keep the capacity they were created with.
    #[arg(long, value_name = "N")]
    pub capacity: Option<u32>,
}

/// The config file: the same options, all optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    iface: Option<Vec<String>>,
    port: Option<u16>,
    keyring: Option<PathBuf>,
    nodes: Option<String>,
    listen: Option<SocketAddr>,
    mode: Option<Mode>,
    ack: Option<bool>,
    ack_every: Option<u32>,
    events: Option<String>,
    on_event: Option<String>,
    hook_concurrency: Option<usize>,
    hook_timeout_ms: Option<u64>,
    hook_queue: Option<usize>,
    tick_ms: Option<u64>,
    suspect_phi: Option<f64>,
    dead_phi: Option<f64>,
    alive_phi: Option<f64>,
    dead_min_intervals: Option<f64>,
    max_silence_ms: Option<u64>,
    min_std_dev_ms: Option<f64>,
    min_std_dev_ratio: Option<f64>,
    acceptable_pause_ms: Option<f64>,
    stall_factor: Option<f64>,
    max_stall_ms: Option<f64>,
    controller: Option<ControllerKind>,
    fixed_interval_ms: Option<u32>,
    decision_ms: Option<u64>,
    controller_bounds_ms: Option<String>,
    controller_target_ms: Option<f64>,
    controller_seed: Option<u64>,
    controller_table: Option<PathBuf>,
    critical: Option<String>,
    controller_max_interval_ms: Option<u32>,
    keep_attached: Option<bool>,
    enroll: Option<bool>,
    pin_dir: Option<PathBuf>,
    capacity: Option<u32>,
}

/// Everything the monitor runs with, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    pub ifaces: Vec<String>,
    pub port: u16,
    pub keyring: PathBuf,
    pub nodes: NodeSpec,
    pub listen: SocketAddr,
    pub mode: Mode,
    /// 0 = no periodic ACKs.
    pub ack_every: u32,
    pub ack_on_change: bool,
    pub events: String,
    pub hook: Option<HookOptions>,
    pub tick: Duration,
    pub thresholds: Thresholds,
    pub phi: PhiParams,
    pub fixed_interval_ms: Option<u32>,
    pub decision_ms: u64,
    pub controller: ControllerSettings,
    pub keep_attached: bool,
    pub enroll: bool,
    pub pin_dir: PathBuf,
    /// Node slots of fresh XDP maps.
    pub capacity: u32,
    /// Whether `capacity` was asked for (`--capacity`, the file), not the
    /// default.
    pub capacity_asked: bool,
}

/// How the monitor picks intervals (`--controller` and its options).
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerSettings {
    pub kind: ControllerKind,
    /// qlearn: interval bounds, ms.
    pub min_interval_ms: u32,
    pub max_interval_ms: u32,
    pub target_ms: f64,
    pub seed: u64,
    pub table: PathBuf,
    /// Critical nodes and their interval cap, ms.
    pub critical: Option<(NodeSpec, u32)>,
}

impl ControllerSettings {
    /// The Q-learning controller's configuration.
    pub fn qlearn_config(
        &self,
        thresholds: &Thresholds,
        phi: PhiParams,
        tick: Duration,
        decision_ms: u64,
    ) -> crate::controller::Config {
        crate::controller::Config {
            min_interval_ms: self.min_interval_ms,
            max_interval_ms: self.max_interval_ms,
            target_detection_ms: self.target_ms,
            threshold: thresholds.suspect_phi,
            phi,
            tick_ms: tick.as_secs_f64() * 1000.0,
            decision_period_ms: decision_ms as f64,
            seed: self.seed,
            ..crate::controller::Config::default()
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9420";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/hb";

impl Settings {
    /// Reads `--config` (if any) and merges it under the flags.
    pub fn load(args: &Args) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        Settings::merge(args, file)
    }

    fn merge(a: &Args, f: FileConfig) -> anyhow::Result<Settings> {
        let (controller, fixed_interval_ms) = controller_settings(a, &f)?;
        let mut ifaces = if a.iface.is_empty() {
            f.iface.unwrap_or_default()
        } else {
            a.iface.clone()
        };
        // An interface given twice is one interface: attached (or bound)
        // once, in the order first given.
        let mut seen = std::collections::HashSet::new();
        ifaces.retain(|i| seen.insert(i.clone()));
        let keyring = a
            .keyring
            .clone()
            .or(f.keyring)
            .context("no keyring: give --keyring FILE (or `keyring` in the config file)")?;
        let spec = a
            .nodes
            .clone()
            .or(f.nodes)
            .context("no nodes: give --nodes SPEC, e.g. --nodes 1-1000,4242")?;
        let nodes = NodeSpec::parse(&spec)?;
        if nodes.len() > MAX_NODES as u64 {
            // `--critical` is a set of ids, of any size: this is a limit
            // of the node table alone.
            bail!(
                "--nodes {spec}: {} nodes, more than the monitor's largest capacity ({MAX_NODES})",
                nodes.len()
            );
        }
        // `--ack=false` sets the file's ACK settings aside, `ack_every`
        // too (which turns ACKs on).
        if a.ack == Some(false) && a.ack_every.is_some() {
            bail!("--ack=false and --ack-every contradict each other (--ack-every turns ACKs on)");
        }
        let file_ack_every = f.ack_every.filter(|_| a.ack != Some(false));
        let ack_every_opt = a.ack_every.or(file_ack_every);
        if ack_every_opt == Some(0) {
            // It turns ACKs on, and would have the gate ACK no heartbeat.
            bail!("ack_every must be at least 1 (ACK every N-th heartbeat), got 0");
        }
        let ack = a.ack.or(f.ack).unwrap_or(false) || ack_every_opt.is_some();
        let ack_every = if ack { ack_every_opt.unwrap_or(1) } else { 0 };
        let tick_ms = a.tick_ms.or(f.tick_ms).unwrap_or(100);
        check_tick_ms(tick_ms)?;
        let d = Thresholds::default();
        let thresholds = Thresholds {
            suspect_phi: a.suspect_phi.or(f.suspect_phi).unwrap_or(d.suspect_phi),
            dead_phi: a.dead_phi.or(f.dead_phi).unwrap_or(d.dead_phi),
            alive_phi: a.alive_phi.or(f.alive_phi).unwrap_or(d.alive_phi),
            dead_min_intervals: a
                .dead_min_intervals
                .or(f.dead_min_intervals)
                .unwrap_or(d.dead_min_intervals),
            max_silence_ms: a
                .max_silence_ms
                .or(f.max_silence_ms)
                .unwrap_or(d.max_silence_ms),
        };
        thresholds.validate().map_err(anyhow::Error::msg)?;
        check_max_silence_ms(thresholds.max_silence_ms)?;
        // The controller models detection at the suspect threshold.
        if controller.kind == ControllerKind::Qlearn
            && thresholds.suspect_phi > crate::controller::MAX_THRESHOLD
        {
            bail!(
                "suspect_phi {} must be at most {} with the qlearn controller",
                thresholds.suspect_phi,
                crate::controller::MAX_THRESHOLD
            );
        }
        let p = PhiParams::default();
        let phi = PhiParams {
            min_std_dev_ms: a
                .min_std_dev_ms
                .or(f.min_std_dev_ms)
                .unwrap_or(p.min_std_dev_ms),
            min_std_dev_ratio: a
                .min_std_dev_ratio
                .or(f.min_std_dev_ratio)
                .unwrap_or(p.min_std_dev_ratio),
            acceptable_pause_ms: a
                .acceptable_pause_ms
                .or(f.acceptable_pause_ms)
                .unwrap_or(p.acceptable_pause_ms),
            stall_factor: a.stall_factor.or(f.stall_factor).unwrap_or(p.stall_factor),
            max_stall_ms: a.max_stall_ms.or(f.max_stall_ms).unwrap_or(p.max_stall_ms),
        };
        if !phi.is_valid() {
            bail!(
                "min_std_dev_ms, min_std_dev_ratio, acceptable_pause_ms, stall_factor and max_stall_ms must be non-negative numbers, and one floor positive"
            );
        }
        let on_event = a.on_event.clone().or(f.on_event).filter(|s| !s.is_empty());
        if a.hook_concurrency.or(f.hook_concurrency) == Some(0) {
            bail!("hook_concurrency must be at least 1 (hooks running at once), got 0");
        }
        if a.hook_queue.or(f.hook_queue) == Some(0) {
            bail!("hook_queue must be at least 1 (hook runs waiting), got 0");
        }
        if a.hook_timeout_ms.or(f.hook_timeout_ms) == Some(0) {
            bail!("hook_timeout_ms must be at least 1, got 0");
        }
        let hook = on_event.map(|command| HookOptions {
            command,
            concurrency: a.hook_concurrency.or(f.hook_concurrency).unwrap_or(4),
            timeout: Duration::from_millis(
                a.hook_timeout_ms.or(f.hook_timeout_ms).unwrap_or(10_000),
            ),
            queue: a.hook_queue.or(f.hook_queue).unwrap_or(1024),
        });
        // Checked with or without a hook, as the zeros above: a setting
        // that a later reload adding `on_event` would refuse is refused now.
        let (concurrency, queue) = (
            a.hook_concurrency.or(f.hook_concurrency).unwrap_or(4),
            a.hook_queue.or(f.hook_queue).unwrap_or(1024),
        );
        if concurrency > MAX_HOOK_CONCURRENCY || queue > MAX_HOOK_QUEUE {
            // Past tokio's own limits these panicked at start.
            bail!(
                "hook_concurrency must be at most {MAX_HOOK_CONCURRENCY} and hook_queue at most {MAX_HOOK_QUEUE}, got {concurrency} and {queue}"
            );
        }
        if let Some(ms) = fixed_interval_ms
            && !(hb_common_bounds::MIN..=hb_common_bounds::MAX).contains(&ms)
        {
            bail!(
                "fixed_interval_ms must be between {} and {} ms, got {ms}",
                hb_common_bounds::MIN,
                hb_common_bounds::MAX
            );
        }
        let (ack_every, ack_on_change) = match controller.kind {
            // The controller's decisions reach senders only in ACKs; qlearn
            // also wants RTT samples (its state has an RTT dimension), as
            // in `hb simulate` (every 10th heartbeat).
            ControllerKind::Qlearn if !ack => (10, true),
            ControllerKind::Fixed => (ack_every, true),
            // A cap on critical nodes, too.
            ControllerKind::Off if controller.critical.is_some() => (ack_every, true),
            _ => (ack_every, ack),
        };
        let decision_default = match controller.kind {
            ControllerKind::Qlearn => 5000,
            _ => 1000,
        };
        let capacity = a.capacity.or(f.capacity).unwrap_or(MAX_NODES);
        if !(1..=MAX_NODES).contains(&capacity) {
            bail!("capacity must be between 1 and {MAX_NODES} nodes, got {capacity}");
        }
        if nodes.len() > capacity as u64 {
            bail!(
                "nodes lists {} ids, more than the capacity of {capacity} (raise --capacity, \
                 which a start takes; over pinned maps, only once their pin directory is \
                 removed: see README, --capacity)",
                nodes.len()
            );
        }
        let port = a.port.or(f.port).unwrap_or(hb_common::proto::DEFAULT_PORT);
        if port == 0 {
            // The gate would filter nothing (XDP), or a random port be bound.
            bail!("port must be between 1 and 65535, got 0");
        }
        let decision_ms = a.decision_ms.or(f.decision_ms).unwrap_or(decision_default);
        check_decision_ms(decision_ms)?;
        Ok(Settings {
            ifaces,
            port,
            keyring,
            nodes,
            listen: a
                .listen
                .or(f.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("literal")),
            mode: a.mode.or(f.mode).unwrap_or(Mode::Native),
            ack_every,
            ack_on_change,
            events: a.events.clone().or(f.events).unwrap_or_default(),
            hook,
            tick: Duration::from_millis(tick_ms),
            thresholds,
            phi,
            fixed_interval_ms,
            decision_ms,
            controller,
            keep_attached: a.keep_attached.or(f.keep_attached).unwrap_or(false),
            enroll: a.enroll.or(f.enroll).unwrap_or(false),
            // Absolute, as logged and compared by a reload.
            pin_dir: std::path::absolute(
                a.pin_dir
                    .clone()
                    .or(f.pin_dir)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
            )
            .context("cannot resolve pin_dir")?,
            capacity,
            capacity_asked: a.capacity.or(f.capacity).is_some(),
        })
    }
}

/// How a reload (SIGHUP) compares the settings it read with the running
/// ones.
impl Settings {
    /// Whether the interval policy must be rebuilt: its own options, or
    /// (qlearn, which models the detector) the detector's.
    pub fn policy_differs(&self, new: &Settings) -> bool {
        self.controller != new.controller
            || self.fixed_interval_ms != new.fixed_interval_ms
            || self.decision_ms != new.decision_ms
            || (new.controller.kind == ControllerKind::Qlearn && self.detector_differs(new))
    }

    /// Whether phi's parameters or the state thresholds changed.
    pub fn detector_differs(&self, new: &Settings) -> bool {
        self.thresholds != new.thresholds || self.phi != new.phi
    }

    /// Whether the gate's ACK settings changed.
    pub fn acks_differ(&self, new: &Settings) -> bool {
        (self.ack_every, self.ack_on_change) != (new.ack_every, new.ack_on_change)
    }

    /// The options that differ in `new` but take effect only at a restart
    /// (sockets, the XDP attachment, maps, threads and tasks made at start).
    pub fn restart_only_changes(&self, new: &Settings) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut check = |differs: bool, name| {
            if differs {
                v.push(name)
            }
        };
        check(self.ifaces != new.ifaces, "iface");
        check(self.port != new.port, "port");
        check(self.listen != new.listen, "listen");
        check(self.mode != new.mode, "mode");
        check(self.events != new.events, "events");
        check(self.hook != new.hook, "hook");
        check(self.tick != new.tick, "tick_ms");
        check(self.keep_attached != new.keep_attached, "keep_attached");
        check(self.enroll != new.enroll, "enroll");
        check(self.pin_dir != new.pin_dir, "pin_dir");
        check(self.capacity != new.capacity, "capacity");
        v
    }

    /// Takes from `new` what a reload applies: the keyring, the node list,
    /// the detector, the ACK settings and the controller.
    pub fn adopt_reloadable(&mut self, new: &Settings) {
        self.keyring = new.keyring.clone();
        self.nodes = new.nodes.clone();
        self.ack_every = new.ack_every;
        self.ack_on_change = new.ack_on_change;
        self.thresholds = new.thresholds;
        self.phi = new.phi;
        self.fixed_interval_ms = new.fixed_interval_ms;
        self.decision_ms = new.decision_ms;
        self.controller = new.controller.clone();
    }
}

/// `--controller` and the options that go with it, checked together.
///
/// The kind and its interval are taken together, from the flags if they
/// say either, else from the file: `--controller off` (or `qlearn`) on the
/// command line sets aside the file's `fixed_interval_ms` with its
/// `controller`, and `--fixed-interval-ms` (which implies `fixed`) the
/// file's `controller`. Merged one by one, a flag lost to the file's other
/// half (`--controller off` and the file's interval were refused
/// together), and once a file gained such a pair every reload failed.
/// Returns the settings and the fixed interval in force.
fn controller_settings(
    a: &Args,
    f: &FileConfig,
) -> anyhow::Result<(ControllerSettings, Option<u32>)> {
    let (kind, fixed_interval_ms) = match (a.controller, a.fixed_interval_ms) {
        (None, None) => (f.controller, f.fixed_interval_ms),
        (Some(ControllerKind::Fixed), None) => (Some(ControllerKind::Fixed), f.fixed_interval_ms),
        (kind, ms) => (kind, ms),
    };
    let kind = kind.unwrap_or(match fixed_interval_ms {
        Some(_) => ControllerKind::Fixed,
        None => ControllerKind::Off,
    });
    match (kind, fixed_interval_ms) {
        (ControllerKind::Fixed, None) => {
            bail!("--controller fixed needs --fixed-interval-ms MS (the interval to ask for)")
        }
        (ControllerKind::Off | ControllerKind::Qlearn, Some(_)) => bail!(
            "--fixed-interval-ms applies to --controller fixed only, not {}",
            kind.name()
        ),
        _ => {}
    }
    let (min_interval_ms, max_interval_ms) = match a
        .controller_bounds_ms
        .clone()
        .or(f.controller_bounds_ms.clone())
    {
        None => (hb_common_bounds::MIN, hb_common_bounds::MAX),
        Some(s) => parse_bounds(&s)?,
    };
    let target_ms = a
        .controller_target_ms
        .or(f.controller_target_ms)
        .unwrap_or(crate::controller::Config::default().target_detection_ms);
    if !crate::controller::TARGET_MS.contains(&target_ms) {
        bail!(
            "controller_target_ms must be in [{}, {}] ms, got {target_ms}",
            crate::controller::TARGET_MS.start(),
            crate::controller::TARGET_MS.end()
        );
    }
    let critical_spec = a.critical.clone().or(f.critical.clone());
    let cap = a
        .controller_max_interval_ms
        .or(f.controller_max_interval_ms);
    let critical = match (critical_spec, cap) {
        (None, None) => None,
        (Some(_), None) => bail!(
            "--critical needs --controller-max-interval-ms MS (the interval cap of critical nodes)"
        ),
        (None, Some(_)) => bail!(
            "--controller-max-interval-ms caps the nodes marked with --critical SPEC; give both"
        ),
        (Some(spec), Some(cap)) => {
            let spec = NodeSpec::parse(&spec).context("--critical")?;
            if cap < hb_common_bounds::MIN {
                bail!(
                    "controller_max_interval_ms must be at least {} ms, got {cap}",
                    hb_common_bounds::MIN
                );
            }
            if kind == ControllerKind::Qlearn && cap < min_interval_ms {
                // The controller's levels start at the bound: it would
                // think a capped node sits at a level it never runs at.
                bail!(
                    "controller_max_interval_ms {cap} is below the controller's fastest interval \
                     ({min_interval_ms} ms, controller_bounds_ms): lower that bound or raise the cap"
                );
            }
            Some((spec, cap))
        }
    };
    let settings = ControllerSettings {
        kind,
        min_interval_ms,
        max_interval_ms,
        target_ms,
        seed: a.controller_seed.or(f.controller_seed).unwrap_or(1),
        table: a
            .controller_table
            .clone()
            .or(f.controller_table.clone())
            .unwrap_or_else(|| PathBuf::from(crate::controller::cli::DEFAULT_TABLE)),
        critical,
    };
    Ok((settings, fixed_interval_ms))
}

/// `MIN-MAX` interval bounds, ms, within the protocol's.
fn parse_bounds(s: &str) -> anyhow::Result<(u32, u32)> {
    let bad = || {
        anyhow::anyhow!(
            "controller_bounds_ms {s:?}: expected MIN-MAX in ms within {}-{}, e.g. 100-10000",
            hb_common_bounds::MIN,
            hb_common_bounds::MAX
        )
    };
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
    check_controller_bounds(lo, hi).map_err(|_| bad())?;
    Ok((lo, hi))
}

/// Heartbeat interval bounds of the protocol's design (0.1 to 10 Hz).
pub(crate) mod hb_common_bounds {
    pub const MIN: u32 = 100;
    pub const MAX: u32 = 10_000;
}

/// The most a config file may hold (every option takes a line or two).
pub const CONFIG_MAX: u64 = 1 << 20;

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    use std::io::Read as _;
    let cannot = || format!("cannot read config {}", path.display());
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(CONFIG_MAX + 1).read_to_end(&mut bytes))
        .with_context(cannot)?;
    if bytes.len() as u64 > CONFIG_MAX {
        bail!(
            "config {}: more than {CONFIG_MAX} bytes, not a config file",
            path.display()
        );
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("config {}: not UTF-8 text", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config {}: {}", path.display(), toml_error(&text, &e)))
}

/// A TOML error as one line: `line L: message`.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

/// A set of node ids: ids and inclusive ranges, e.g. `1-1000,4242`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSpec {
    /// Sorted, disjoint, non-adjacent inclusive ranges.
    ranges: Vec<(u32, u32)>,
}

/// A bad part of a node spec, named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad node spec part `{part}`: {why}")]
pub struct NodeSpecError {
    pub part: String,
    pub why: &'static str,
}

impl NodeSpec {
    pub fn parse(spec: &str) -> Result<NodeSpec, NodeSpecError> {
        let bad = |part: &str, why| NodeSpecError {
            part: part.to_owned(),
            why,
        };
        let mut ranges = Vec::new();
        for part in spec.split(',') {
            let p = part.trim();
            if p.is_empty() {
                if spec.trim().is_empty() {
                    return Err(bad(spec, "no node ids"));
                }
                return Err(bad(part, "empty part (stray comma?)"));
            }
            let num = |s: &str| -> Result<u32, NodeSpecError> {
                let v: u32 = s
                    .trim()
                    .parse()
                    .map_err(|_| bad(p, "not a node id (a number 1..=4294967295)"))?;
                if v == 0 {
                    return Err(bad(p, "node id 0 is reserved"));
                }
                Ok(v)
            };
            let (lo, hi) = match p.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let v = num(p)?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(bad(p, "range start is above its end"));
            }
            ranges.push((lo, hi));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(NodeSpec { ranges: merged })
    }

    /// Number of ids.
    pub fn len(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(lo, hi)| (*hi - *lo) as u64 + 1)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, id: u32) -> bool {
        let i = self.ranges.partition_point(|(_, hi)| *hi < id);
        self.ranges.get(i).is_some_and(|(lo, _)| *lo <= id)
    }

    /// Every id, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|(lo, hi)| *lo..=*hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs() {
        let s = NodeSpec::parse("1-1000,4242").unwrap();
        assert_eq!(s.len(), 1001);
        assert!(s.contains(1) && s.contains(1000) && s.contains(4242));
        assert!(!s.contains(1001) && !s.contains(0) && !s.contains(5000));
        let s = NodeSpec::parse(" 5, 3-4 ,4,10-12,13").unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 4, 5, 10, 11, 12, 13]);
        assert_eq!(s.ranges, vec![(3, 5), (10, 13)]);
        let s = NodeSpec::parse("4294967295").unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn bad_node_specs_name_the_part() {
        let cases = [
            ("1-10,x", "`x`", "not a node id"),
            ("5-3", "`5-3`", "start is above"),
            ("0-4", "`0-4`", "0 is reserved"),
            ("1,,2", "``", "stray comma"),
            ("", "``", "no node ids"),
            ("1-2-3", "`1-2-3`", "not a node id"),
            ("99999999999", "`99999999999`", "not a node id"),
        ];
        for (spec, part, why) in cases {
            let e = NodeSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(part) && e.contains(why), "{spec:?}: {e}");
        }
    }

    fn args() -> Opts {
        Opts {
            keyring: Some("k.toml".into()),
            nodes: Some("1-3".into()),
            ..Opts::default()
        }
    }

    #[test]
    fn flags_override_the_file_and_the_file_the_defaults() {
        let file: FileConfig = toml::from_str(
            "tick_ms = 50\nport = 9000\nnodes = \"7\"\nmode = \"userspace\"\nack_every = 5\niface = [\"eth9\"]\n",
        )
        .unwrap();
        let a = Opts {
            port: Some(9001),
            ..args()
        };
        let s = Settings::merge(&a.into(), file).unwrap();
        assert_eq!(s.port, 9001, "flag wins");
        assert_eq!(s.tick, Duration::from_millis(50), "file wins over default");
        assert_eq!(s.nodes.len(), 3, "flag wins");
        assert_eq!(s.mode, Mode::Userspace);
        assert_eq!((s.ack_every, s.ack_on_change), (5, true));
        assert_eq!(s.ifaces, vec!["eth9".to_string()]);
        let s = Settings::merge(&args().into(), FileConfig::default()).unwrap();
        assert_eq!(s.mode, Mode::Native);
        assert_eq!((s.ack_every, s.ack_on_change), (0, false));
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.thresholds, Thresholds::default());
    }

    /// A qlearn monitor's thresholds and target are checked at load, by
    /// their names: out of the controller's range, they made tables the
    /// next start refused.
    #[test]
    fn qlearn_refuses_a_threshold_or_target_past_its_range() {
        let qlearn = |suspect: f64, dead: f64, target: f64| Opts {
            controller: Some(ControllerKind::Qlearn),
            suspect_phi: Some(suspect),
            dead_phi: Some(dead),
            controller_target_ms: Some(target),
            ..args()
        };
        let e = Settings::merge(
            &qlearn(1500.0, 2000.0, 3000.0).into(),
            FileConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("suspect_phi 1500 must be at most 1000"), "{e}");
        for target in [0.5, 1e300] {
            let e = Settings::merge(&qlearn(8.0, 12.0, target).into(), FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("controller_target_ms must be in [1, 3600000]"),
                "{e}"
            );
        }
        for ok in [
            qlearn(1000.0, 2000.0, 3_600_000.0),
            qlearn(8.0, 12.0, 1.0),
            Opts {
                controller: Some(ControllerKind::Off),
                ..qlearn(1500.0, 2000.0, 3000.0)
            },
        ] {
            Settings::merge(&ok.into(), FileConfig::default()).unwrap();
        }
    }

    /// The controller and its fixed interval come together, from the
    /// flags if they say either: a flag is not refused for the file's
    /// other half (which made every reload fail once the file gained it).
    #[test]
    fn controller_flags_win_over_the_files_controller_as_a_whole() {
        let fixed: FileConfig =
            toml::from_str("controller = \"fixed\"\nfixed_interval_ms = 500\n").unwrap();
        for kind in [ControllerKind::Off, ControllerKind::Qlearn] {
            let a = Opts {
                controller: Some(kind),
                ..args()
            };
            let s = Settings::merge(&a.into(), fixed.clone()).unwrap();
            assert_eq!((s.controller.kind, s.fixed_interval_ms), (kind, None));
        }
        // `--controller fixed` takes the file's interval.
        let a = Opts {
            controller: Some(ControllerKind::Fixed),
            ..args()
        };
        let s = Settings::merge(&a.into(), fixed.clone()).unwrap();
        assert_eq!(s.fixed_interval_ms, Some(500));
        // `--fixed-interval-ms` (which implies fixed) over `controller =
        // "off"` or another interval.
        for text in ["controller = \"off\"\n", "fixed_interval_ms = 500\n"] {
            let f: FileConfig = toml::from_str(text).unwrap();
            let a = Opts {
                fixed_interval_ms: Some(2000),
                ..args()
            };
            let s = Settings::merge(&a.into(), f).unwrap();
            assert_eq!(
                (s.controller.kind, s.fixed_interval_ms),
                (ControllerKind::Fixed, Some(2000)),
                "{text}"
            );
        }
        // The file alone, and contradictions within one source, as before.
        let s = Settings::merge(&args().into(), fixed).unwrap();
        assert_eq!(
            (s.controller.kind, s.fixed_interval_ms),
            (ControllerKind::Fixed, Some(500))
        );
        let f: FileConfig =
            toml::from_str("controller = \"qlearn\"\nfixed_interval_ms = 500\n").unwrap();
        let e = Settings::merge(&args().into(), f).unwrap_err();
        assert!(e.to_string().contains("not qlearn"), "{e}");
        let a = Opts {
            controller: Some(ControllerKind::Off),
            fixed_interval_ms: Some(500),
            ..args()
        };
        let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("not off"), "{e}");
    }

    /// `--ack`, `--keep-attached` and `--enroll` can be turned off on the
    /// command line when the file turns them on (`--ack=false` sets the
    /// file's `ack_every` aside too); given bare, they turn them on.
    #[test]
    fn switches_set_in_the_file_can_be_turned_off_by_a_flag() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            opts: Opts,
        }
        let parse = |extra: &[&str]| {
            let mut argv = vec!["hb", "--keyring", "k.toml", "--nodes", "1-3"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.opts)
        };
        let file: FileConfig =
            toml::from_str("ack = true\nack_every = 5\nkeep_attached = true\nenroll = true\n")
                .unwrap();
        let s = Settings::merge(&parse(&[]).unwrap().into(), file.clone()).unwrap();
        assert_eq!((s.ack_every, s.keep_attached, s.enroll), (5, true, true));
        let off = parse(&["--ack=false", "--keep-attached=false", "--enroll=false"]).unwrap();
        let s = Settings::merge(&off.into(), file).unwrap();
        assert_eq!(
            (s.ack_every, s.ack_on_change, s.keep_attached, s.enroll),
            (0, false, false, false)
        );
        let on = parse(&["--ack", "--keep-attached", "--enroll", "--ack-every", "3"]).unwrap();
        let s = Settings::merge(&on.into(), FileConfig::default()).unwrap();
        assert_eq!((s.ack_every, s.keep_attached, s.enroll), (3, true, true));
        let both = parse(&["--ack=false", "--ack-every", "3"]).unwrap();
        let e = Settings::merge(&both.into(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("contradict"), "{e}");
        assert!(parse(&["--enroll=maybe"]).is_err());
    }

    /// `--critical` is a set of ids to cap, of any size; `--nodes` is
    /// bounded by the node table.
    #[test]
    fn only_the_node_list_is_bounded_by_the_capacity() {
        let a = Opts {
            critical: Some("1-2000000".into()),
            controller_max_interval_ms: Some(500),
            ..args()
        };
        let s = Settings::merge(&a.into(), FileConfig::default()).unwrap();
        let (spec, cap) = s.controller.critical.unwrap();
        assert_eq!((spec.len(), cap), (2_000_000, 500));
        let a = Opts {
            nodes: Some("1-4294967295".into()),
            ..args()
        };
        let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("4294967295 nodes, more than the monitor's largest capacity (1048576)"),
            "{e}"
        );
    }

    /// A config file is read bounded: `/dev/zero` is an error, not a
    /// monitor that eats the host's memory.
    #[test]
    fn a_config_file_is_read_bounded() {
        let e = read_file(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("more than 1048576 bytes"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, b"tick_ms = 50\n\xff\n").unwrap();
        let e = read_file(&p).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        std::fs::write(&p, b"tick_ms = 50\n").unwrap();
        assert_eq!(read_file(&p).unwrap().tick_ms, Some(50));
    }

    #[test]
    fn an_interface_given_twice_is_one_interface() {
        let a = Opts {
            iface: ["eth1", "eth0", "eth1", "eth2", "eth0"]
                .map(String::from)
                .to_vec(),
            ..args()
        };
        let s = Settings::merge(&a.into(), FileConfig::default()).unwrap();
        assert_eq!(s.ifaces, ["eth1", "eth0", "eth2"], "deduplicated, in order");
        let file: FileConfig = toml::from_str("iface = [\"eth9\", \"eth9\"]\n").unwrap();
        let s = Settings::merge(&args().into(), file).unwrap();
        assert_eq!(s.ifaces, ["eth9"]);
    }

    #[test]
    fn a_relative_pin_dir_is_the_current_directorys() {
        let file: FileConfig = toml::from_str("pin_dir = \"pins/hb\"\n").unwrap();
        let s = Settings::merge(&args().into(), file).unwrap();
        assert_eq!(s.pin_dir, std::env::current_dir().unwrap().join("pins/hb"));
        let s = Settings::merge(&args().into(), FileConfig::default()).unwrap();
        assert_eq!(s.pin_dir, Path::new(DEFAULT_PIN_DIR));
    }

    #[test]
    fn bad_settings_are_one_clear_line() {
        let e = toml::from_str::<FileConfig>("tick_ms = 50\ntickms = 3\n").unwrap_err();
        let text = "tick_ms = 50\ntickms = 3\n";
        let msg = toml_error(text, &e);
        assert!(msg.starts_with("line 2: unknown field `tickms`"), "{msg}");
        assert!(!msg.contains('\n'));
        let a = Opts {
            nodes: None,
            ..args()
        };
        let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--nodes"), "{e}");
        let a = Opts {
            suspect_phi: Some(20.0),
            ..args()
        };
        let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("suspect_phi <= dead_phi"), "{e}");
        let a = Opts {
            tick_ms: Some(0),
            ..args()
        };
        assert!(Settings::merge(&a.into(), FileConfig::default()).is_err());
        // A cap under qlearn's fastest level.
        let a = Opts {
            controller: Some(ControllerKind::Qlearn),
            controller_bounds_ms: Some("500-10000".into()),
            critical: Some("1".into()),
            controller_max_interval_ms: Some(200),
            ..args()
        };
        let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("below the controller's fastest interval (500 ms"),
            "{e}"
        );
        // Past tokio's limits (they panicked at start).
        let text = "on_event = \"true\"\nhook_queue = 4611686018427387904\n";
        let f: FileConfig = toml::from_str(text).unwrap();
        let e = Settings::merge(&args().into(), f).unwrap_err();
        assert!(e.to_string().contains("hook_queue at most 1048576"), "{e}");
        let a = Opts {
            on_event: Some("true".into()),
            hook_concurrency: Some(usize::MAX),
            ..args()
        };
        let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("hook_concurrency must be at most 1024"),
            "{e}"
        );
        // Without a hook too (a reload adding one would refuse it).
        let f: FileConfig = toml::from_str("hook_concurrency = 5000\n").unwrap();
        let e = Settings::merge(&args().into(), f).unwrap_err();
        assert!(
            e.to_string()
                .contains("hook_concurrency must be at most 1024"),
            "{e}"
        );
        // Accepted before: port 0 gates nothing (XDP) or binds a random
        // port; a huge decision period overflowed into ns at start.
        let f: FileConfig = toml::from_str("port = 0\n").unwrap();
        let e = Settings::merge(&args().into(), f).unwrap_err();
        assert!(e.to_string().contains("port must be between 1"), "{e}");
        for ms in [0, 1 << 58] {
            let a = Opts {
                decision_ms: Some(ms),
                ..args()
            };
            let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
            assert!(
                e.to_string()
                    .contains("decision_ms must be between 1 and 3600000"),
                "{e}"
            );
        }
    }

    /// Values once taken silently: `ack_every = 0` turned ACKs on for none
    /// to be sent, `hook_concurrency = 0` ran one hook at a time, and a
    /// backstop of a few ms declared every node dead between heartbeats.
    /// Refused in one line, from the file and from flags alike.
    #[test]
    fn values_that_cannot_work_are_refused() {
        let cases = [
            (
                "ack_every = 0\n",
                "ack_every must be at least 1 (ACK every N-th heartbeat), got 0",
            ),
            (
                "on_event = \"true\"\nhook_concurrency = 0\n",
                "hook_concurrency must be at least 1 (hooks running at once), got 0",
            ),
            (
                "max_silence_ms = 10\n",
                "max_silence_ms must be 0 (off) or at least 1000, got 10",
            ),
            (
                "hook_queue = 0\n",
                "hook_queue must be at least 1 (hook runs waiting), got 0",
            ),
            (
                "hook_timeout_ms = 0\n",
                "hook_timeout_ms must be at least 1, got 0",
            ),
            (
                "max_silence_ms = 999\n",
                "max_silence_ms must be 0 (off) or at least 1000, got 999",
            ),
        ];
        for (text, want) in cases {
            let f: FileConfig = toml::from_str(text).unwrap();
            let e = Settings::merge(&args().into(), f).unwrap_err().to_string();
            assert_eq!(e, want, "{text:?}");
        }
        let flags = [
            Opts {
                ack_every: Some(0),
                ..args()
            },
            Opts {
                on_event: Some("true".into()),
                hook_concurrency: Some(0),
                ..args()
            },
            Opts {
                max_silence_ms: Some(10),
                ..args()
            },
        ];
        for (a, (_, want)) in flags.into_iter().zip(cases) {
            let e = Settings::merge(&a.into(), FileConfig::default()).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        // The bounds themselves, and 0 for no backstop, are taken.
        let text =
            "ack_every = 1\non_event = \"true\"\nhook_concurrency = 1\nmax_silence_ms = 1000\n";
        let s = Settings::merge(&args().into(), toml::from_str(text).unwrap()).unwrap();
        assert_eq!(s.ack_every, 1);
        assert_eq!(s.hook.unwrap().concurrency, 1);
        assert_eq!(s.thresholds.max_silence_ms, 1000);
        let f: FileConfig = toml::from_str("max_silence_ms = 0\n").unwrap();
        let s = Settings::merge(&args().into(), f).unwrap();
        assert_eq!(s.thresholds.max_silence_ms, 0);
    }

    /// Property tests of the config file: any text is a config or a
    /// one-line error naming its line, never a panic; and any values of
    /// the right TOML types (0, negatives, the types' extremes, nan, inf)
    /// merge into settings or are refused with a message, and what is
    /// accepted is within the documented ranges.
    mod props {
        use proptest::prelude::*;

        use super::*;

        const KEYS: &[&str] = &[
            "port",
            "ack",
            "ack_every",
            "hook_concurrency",
            "hook_timeout_ms",
            "hook_queue",
            "tick_ms",
            "suspect_phi",
            "dead_phi",
            "alive_phi",
            "dead_min_intervals",
            "max_silence_ms",
            "min_std_dev_ms",
            "min_std_dev_ratio",
            "acceptable_pause_ms",
            "stall_factor",
            "max_stall_ms",
            "controller",
            "fixed_interval_ms",
            "decision_ms",
            "controller_bounds_ms",
            "controller_target_ms",
            "controller_seed",
            "critical",
            "controller_max_interval_ms",
            "capacity",
            "nodes",
            "mode",
            "listen",
            "on_event",
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                prop_oneof![
                    Just(0i128),
                    Just(1),
                    Just(-1),
                    Just(u16::MAX as i128 + 1),
                    Just(u32::MAX as i128),
                    Just(u32::MAX as i128 + 1),
                    Just(i64::MAX as i128),
                ]
                .prop_map(|v| v.to_string()),
                prop_oneof![
                    Just("nan"),
                    Just("inf"),
                    Just("-inf"),
                    Just("-0.0"),
                    Just("1e308"),
                    Just("5e-324"),
                    Just("0.5"),
                    Just("true"),
                    Just("false"),
                    Just("\"qlearn\""),
                    Just("\"fixed\""),
                    Just("\"off\""),
                    Just("\"userspace\""),
                    Just("\"100-10000\""),
                    Just("\"10000-100\""),
                    Just("\"0-4294967295\""),
                    Just("\"1-4294967295\""),
                    Just("\"4294967295\""),
                    Just("\"1-1048577\""),
                    Just("\"[::1]:0\""),
                    Just("\"\""),
                ]
                .prop_map(str::to_owned),
                any::<f64>().prop_map(|v| format!("{v:?}")),
            ]
        }

        fn config_text() -> impl Strategy<Value = String> {
            prop::collection::vec((prop::sample::select(KEYS), value()), 0..8).prop_map(|kv| {
                let mut seen = std::collections::HashSet::new();
                kv.into_iter()
                    .filter(|(k, _)| seen.insert(*k))
                    .map(|(k, v)| format!("{k} = {v}\n"))
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_text_is_a_config_or_a_one_line_error(text in prop_oneof![
                any::<String>(),
                config_text(),
                config_text().prop_map(|t| t.replace(" = ", " = [")),
            ]) {
                if let Err(e) = toml::from_str::<FileConfig>(&text) {
                    let m = toml_error(&text, &e);
                    prop_assert!(!m.contains('\n') && !m.is_empty(), "{}", m);
                }
            }

            #[test]
            fn any_values_merge_into_checked_settings_or_are_refused(text in config_text()) {
                let Ok(file) = toml::from_str::<FileConfig>(&text) else {
                    return Ok(());
                };
                let Ok(s) = Settings::merge(&args().into(), file) else {
                    return Ok(());
                };
                let ms = s.tick.as_millis() as u64;
                prop_assert!((1..=MAX_TICK_MS).contains(&ms));
                prop_assert!(s.port != 0);
                prop_assert!((1..=MAX_NODES).contains(&s.capacity));
                prop_assert!(s.nodes.len() <= s.capacity as u64);
                prop_assert!(s.thresholds.validate().is_ok() && s.phi.is_valid());
                prop_assert!((1..=MAX_DECISION_MS).contains(&s.decision_ms));
                let c = &s.controller;
                prop_assert!(c.min_interval_ms <= c.max_interval_ms);
                prop_assert!(c.target_ms.is_finite() && c.target_ms > 0.0);
                if let Some(h) = &s.hook {
                    prop_assert!(h.concurrency >= 1 && h.queue >= 1 && !h.timeout.is_zero());
                }
                if c.kind == ControllerKind::Qlearn {
                    // What the monitor builds from them.
                    let cfg = c.qlearn_config(&s.thresholds, s.phi, s.tick, s.decision_ms);
                    let _ = crate::controller::QController::new(cfg);
                }
                let _ = crate::monitor::tick::Detector::new(s.thresholds, s.phi);
            }
        }
    }
}
