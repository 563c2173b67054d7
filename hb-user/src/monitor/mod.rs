//! `hb monitor`: gate heartbeats, decide which nodes are alive, tell
//! operators.
//!
//! The story of a monitor's life, as [`run`] tells it:
//!
//! 1. Options: flags over an optional TOML file ([`config`]), the keyring
//!    ([`crate::keys::Keyring`]). Anything wrong is one clear line and exit 1.
//! 2. The dataplane: the XDP program on the interfaces (native, or skb), or
//!    a UDP socket and the same gate in userspace ([`userspace`]).
//! 3. The fleet ([`fleet`]): adopt state that survived a previous monitor
//!    (pinned maps) without false `joined`, then provision the node list.
//! 4. The tick ([`tick`]), on its own thread: every `--tick-ms`, one scan of
//!    every node's state through phi and the state machine ([`state`]),
//!    events to the sink ([`events`], [`hooks`]), interval decisions from
//!    the policy ([`policy`]) to the dataplane.
//! 5. The HTTP API ([`api`], [`metrics`]), the gate's reports
//!    (unknown nodes, `--enroll`).
//! 6. Signals: SIGHUP reloads the keyring, the node list, the detector's
//!    and the controller's options (and reopens the events file);
//!    SIGTERM/SIGINT stop everything, flush the events, and detach the XDP
//!    program unless `--keep-attached`.

pub mod addrs;
pub mod api;
pub mod config;
pub mod events;
pub mod fleet;
pub mod hooks;
pub mod metrics;
pub mod policy;
pub mod state;
pub mod table;
pub mod tick;
pub mod userspace;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hb_common::maps::Config;

pub use config::Args;
use config::{ControllerKind, Mode, Settings};
use tokio::signal::unix::{SignalKind, signal};

use self::{
    api::Shared,
    events::{Destination, EventSink},
    fleet::Fleet,
    hooks::Hooks,
    metrics::Metrics,
    policy::{Critical, CriticalNodes, FixedPolicy, IntervalPolicy, QLearnPolicy},
    tick::{Core, Detector},
    userspace::monotonic_ns,
};
use crate::{
    controller::table::TableFile,
    dataplane::{Dataplane, mem::MemDataplane},
    keys::Keyring,
};

/// Entry point of `hb monitor`.
pub fn run(args: Args) -> anyhow::Result<()> {
    // A SIGHUP before its handler is installed would end the process (and
    // `Restart=on-failure` takes death by SIGHUP for a clean exit): blocked
    // until then (`main` blocks it first thing). The runtime's threads
    // inherit the mask; `serve` unblocks it on this thread once handled,
    // and one that came meanwhile is delivered then, as a reload.
    set_sighup_blocked(true);
    prepare_process();
    let settings = Settings::load(&args)?;
    let keyring = Keyring::load(&settings.keyring)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("hb-monitor")
        .build()
        .context("cannot start the async runtime")?;
    let served = rt.block_on(serve(args, settings, keyring));
    // `serve` has waited for everything it started (the tick, the tasks,
    // the events' flush, the table's save). A blocking read still going
    // (a reload's, of a config path that is a FIFO nothing writes) is left
    // to the process' exit: dropped, the runtime would wait for it.
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

/// The soft limit of open files the monitor inherited, when it raised it
/// (0: left as it was): hooks get it back.
static INHERITED_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The most open files the monitor raises its soft limit to (the kernel's
/// default `fs.nr_open`; a hard limit of "unlimited" cannot be the soft).
const NOFILE_MAX: libc::rlim_t = 1 << 20;

/// What the monitor needs of its process, whatever its parent left:
/// - SIGCHLD at its default. An ignored SIGCHLD survives exec, and the
///   kernel then reaps every hook's shell itself: no hook could be waited
///   for (every one counted as failed, `reason="wait"`), and what a hook
///   left running in the background was never killed.
/// - The soft limit of open files at the hard one. Each running hook holds
///   two descriptors (pidfds), and systemd's default soft limit of 1024
///   made about half of 1024 concurrent hooks fail to start, with the API
///   and the events file short of descriptors meanwhile. Hooks get the
///   inherited soft limit back (programs using select(2) need it).
fn prepare_process() {
    // SAFETY: plain libc calls, before any thread exists.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            let want = r.rlim_max.min(NOFILE_MAX);
            if r.rlim_cur < want {
                let soft = r.rlim_cur;
                r.rlim_cur = want;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
                    INHERITED_NOFILE.store(soft, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}

/// The soft limit of open files to give children back, if the monitor
/// raised its own.
pub(crate) fn inherited_nofile() -> Option<libc::rlim_t> {
    match INHERITED_NOFILE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        soft => Some(soft),
    }
}

/// Blocks or unblocks SIGHUP for the calling thread, and says whether it
/// was blocked before: `main` blocks it before anything else and, for
/// every command but `monitor` (which handles it), puts back what it
/// inherited. Children the monitor starts (hooks) get an empty mask.
pub fn set_sighup_blocked(blocked: bool) -> bool {
    // SAFETY: plain libc calls on sigset_t values on the stack.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigemptyset(&mut old);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, &mut old);
        libc::sigismember(&old, libc::SIGHUP) == 1
    }
}

/// The dataplane as the monitor drives it, its reports, plus what only
/// userspace mode has (the sockets to serve).
struct Opened {
    dp: Arc<dyn Dataplane>,
    reports: Option<tokio::sync::mpsc::Receiver<hb_common::maps::Report>>,
    mem: Option<(Arc<MemDataplane>, Vec<std::net::UdpSocket>)>,
}

/// The XDP dataplane: loads the program, pins the maps under `--pin-dir`
/// so a restart re-adopts node state, and delivers the gate's reports.
/// Not attached yet: `serve` attaches it (native with skb fallback, or
/// skb; with `--keep-attached` the link pinned too) once nothing else of
/// the start can fail. Its errors are one line each: unknown interface,
/// missing privileges, bpffs (and the attach's: another XDP program on the
/// interface).
fn open_xdp(s: &Settings, local: &BTreeSet<IpAddr>) -> anyhow::Result<Box<dyn Dataplane>> {
    use crate::dataplane::xdp::{AttachMode, XdpDataplane, XdpOptions};
    if s.ifaces.is_empty() {
        bail!("--mode native|skb needs at least one --iface");
    }
    let dp = XdpDataplane::load(&XdpOptions {
        interfaces: s.ifaces.clone(),
        mode: if s.mode == Mode::Skb {
            AttachMode::Skb
        } else {
            AttachMode::Native
        },
        pin_dir: Some(s.pin_dir.clone()),
        keep_attached: s.keep_attached,
        max_nodes: Some(s.capacity),
        object: None,
        local_addrs: Some(addrs::table(local)),
        // The start can still fail (`serve`): until it has not, what the
        // open pinned goes with it.
        undo_until_started: true,
    })?;
    Ok(Box::new(dp))
}

fn open_dataplane(s: &Settings, local: &BTreeSet<IpAddr>) -> anyhow::Result<Opened> {
    match s.mode {
        Mode::Native | Mode::Skb => {
            check_clock_shared_with_the_kernel()?;
            let mut dp = open_xdp(s, local)?;
            let reports = dp.take_reports();
            Ok(Opened {
                dp: Arc::from(dp),
                reports,
                mem: None,
            })
        }
        Mode::Userspace => {
            if s.keep_attached {
                tracing::info!(
                    "--keep-attached applies to XDP modes only; userspace mode keeps no state across restarts"
                );
            }
            let addrs = userspace::bind_addrs(&s.ifaces, s.port)?;
            let sockets = userspace::bind(&addrs)?;
            let mut mem = MemDataplane::new();
            let reports = mem.take_reports();
            let mem = Arc::new(mem);
            Ok(Opened {
                dp: mem.clone(),
                reports,
                mem: Some((mem, sockets)),
            })
        }
    }
}

/// The XDP gate stamps arrivals with the kernel's CLOCK_MONOTONIC
/// (`bpf_ktime_get_ns`), which time namespaces do not shift, and the tick
/// compares them with this process's, which they do: in a time namespace
/// with a monotonic offset (a container restored by CRIU, `unshare
/// --time`) every node would look silent by the offset, or never silent.
fn check_clock_shared_with_the_kernel() -> anyhow::Result<()> {
    match std::fs::read_to_string("/proc/self/timens_offsets") {
        Ok(text) => match monotonic_offset(&text) {
            Some((0, 0)) | None => Ok(()),
            Some((s, ns)) => bail!(
                "this process runs in a time namespace whose CLOCK_MONOTONIC is offset by {s} s {ns} ns \
                 from the kernel's, with which the XDP gate stamps heartbeats: run `hb monitor` in the \
                 host's time namespace, or use --mode userspace"
            ),
        },
        // No time namespaces in this kernel: one clock.
        Err(_) => Ok(()),
    }
}

/// The `monotonic` line of /proc/PID/timens_offsets: seconds and ns.
fn monotonic_offset(text: &str) -> Option<(i64, i64)> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        if f.next()? != "monotonic" {
            return None;
        }
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// The interval policy of `--controller`: off, one fixed interval, or the
/// Q-learning controller with its saved table loaded; critical nodes
/// capped under any of them.
pub fn make_policy(s: &Settings) -> anyhow::Result<Box<dyn IntervalPolicy>> {
    make_policy_carrying(s, None)
}

/// [`make_policy`]; a learning controller takes `running` (the table the
/// running controller learned, at a reload) instead of reading its file.
fn make_policy_carrying(
    s: &Settings,
    running: Option<&TableFile>,
) -> anyhow::Result<Box<dyn IntervalPolicy>> {
    let c = &s.controller;
    let critical = c.critical.as_ref().map(|(nodes, cap_ms)| CriticalNodes {
        nodes: nodes.clone(),
        cap_ms: *cap_ms,
    });
    let fixed = match (c.kind, s.fixed_interval_ms) {
        (ControllerKind::Qlearn, _) => {
            let cfg = c.qlearn_config(&s.thresholds, s.phi, s.tick, s.decision_ms);
            let ctrl = crate::controller::QController::new(cfg)
                .map_err(|e| anyhow::anyhow!("controller configuration: {e}"))?;
            let p = match running {
                Some(t) => carry(ctrl, t, &c.table, critical)?,
                None => QLearnPolicy::new(ctrl, Some(c.table.clone()), critical).with_context(
                    || "cannot use the saved controller table (move it away to start learning afresh)",
                )?,
            };
            return Ok(Box::new(p));
        }
        (ControllerKind::Fixed, Some(ms)) => FixedPolicy::fixed(ms),
        _ => FixedPolicy::none(),
    };
    Ok(match critical {
        Some(cn) => Box::new(Critical::new(fixed, cn)),
        None => Box::new(fixed),
    })
}

/// The gate's configuration from the monitor's settings.
pub(crate) fn gate_config(s: &Settings) -> Config {
    Config {
        port: s.port,
        pass_accepted: 0,
        ack_on_change: s.ack_on_change as u8,
        ack_every: s.ack_every,
        ..Config::default()
    }
}

/// How often a learning controller's table is saved while running.
const SAVE_EVERY: Duration = Duration::from_secs(60);

/// The longest a shutdown waits for hooks (at most their timeout).
const HOOK_GRACE: Duration = Duration::from_secs(5);

/// Saves the policy's learned table, if it has one: copied under the
/// core's lock, built and written (atomically) without it.
pub(crate) fn save_table(shared: &Shared, last: bool) {
    let Some((path, copy)) = shared.core().policy.table_to_save() else {
        return;
    };
    let table = copy.build();
    let saved = table.save(&path);
    if saved.is_ok() {
        shared.core().policy.table_saved();
    }
    match saved {
        Ok(()) if last => tracing::info!(
            path = %path.display(),
            states = table.rows.len(),
            decisions = table.decisions,
            "controller table saved"
        ),
        Ok(()) => tracing::debug!(
            path = %path.display(),
            states = table.rows.len(),
            decisions = table.decisions,
            "controller table saved"
        ),
        Err(e) => tracing::error!(
            "cannot save the controller table: {:#}",
            anyhow::Error::new(e)
        ),
    }
}

async fn serve(args: Args, settings: Settings, keyring: Keyring) -> anyhow::Result<()> {
    // Signals first, so none is lost while starting.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    // Handled now (`run` blocked it until here; this is its thread).
    set_sighup_blocked(false);

    // The host's addresses, written to the gate before it is attached.
    let mut local = addrs::Tracker::new(&settings.ifaces);
    let host = local.read()?;
    // Loaded, not attached: every step of the start that can fail comes
    // before the gate is attached, the last step. A start that fails
    // (the API address taken, the events file, a controller table or a
    // node list that does not fit) attached and detached it again, and on
    // some NICs that resets the rings, a break for all the host's traffic
    // at every restart of a supervisor; a link an earlier run kept had
    // its program swapped, or was detached.
    let Opened { dp, reports, mem } = open_dataplane(&settings, &host)?;
    let (mem, sockets) = match mem {
        Some((m, s)) => (Some(m), s),
        None => (None, Vec::new()),
    };
    if matches!(settings.mode, Mode::Native | Mode::Skb) {
        local.written(host);
    }

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
                "cannot listen on {}: address already in use (another monitor running? see --listen)",
                settings.listen
            ),
            _ => anyhow::anyhow!("cannot listen on {}: {e}", settings.listen),
        })?;

    let metrics = Arc::new(Metrics::new());
    let hooks = settings
        .hook
        .clone()
        .map(|h| Hooks::start(h, metrics.clone()));
    let sink = EventSink::start(
        Destination::parse(&settings.events),
        hooks.clone(),
        metrics.clone(),
    )
    .await?;

    let mut core = Core::new(
        Detector::new(settings.thresholds, settings.phi),
        make_policy(&settings)?,
        settings.decision_ms,
    );
    core.set_tick(settings.tick);
    // The slots there are: pinned XDP maps keep the capacity they were
    // created with.
    let capacity = match settings.mode {
        Mode::Userspace => settings.capacity,
        Mode::Native | Mode::Skb => dp.capacity(),
    };
    // Only if one was asked for: a start without `--capacity` takes the
    // pinned maps as they are (it warned of the default, "asked" of no one).
    if capacity != settings.capacity && settings.capacity_asked {
        tracing::warn!(
            capacity,
            asked = settings.capacity,
            pin_dir = %settings.pin_dir.display(),
            "the pinned maps keep their capacity; to change it, stop hb, remove the pin directory (node state starts afresh) and start again"
        );
    }
    if settings.nodes.len() > capacity as u64 {
        bail!(
            "nodes lists {} ids, more than the {capacity} slots of the pinned maps in {} (remove them to resize; node state starts afresh)",
            settings.nodes.len(),
            settings.pin_dir.display()
        );
    }
    core.table.set_capacity(capacity);
    let (fleet, summary) = Fleet::start(
        &mut core,
        &*dp,
        keyring,
        settings.nodes.clone(),
        settings.enroll,
    )?;
    // Requests left in pinned state by an earlier run: the policy takes
    // them over, or withdraws them if it makes none.
    core.reconcile_requests(&*dp, monotonic_ns());
    // Here, not before: a link an earlier run kept gates with the pinned
    // configuration until the start is through.
    dp.set_config(&gate_config(&settings))
        .context("cannot configure the dataplane")?;
    if settings.mode == Mode::Userspace {
        // A gate an earlier XDP run kept attached (in --pin-dir) would
        // take the heartbeats before the sockets see them. Released last,
        // once nothing of the start can fail: a start that fails leaves
        // it gating as it was.
        crate::dataplane::xdp::release_kept_links(&settings.pin_dir)?;
    }
    // The XDP gate, onto its interfaces (or into the links an earlier run
    // kept): last, for the same reason.
    dp.attach()?;
    // Nothing of the start can fail any more: the pins it made stay.
    dp.started();
    // What each interface got: `--mode native` falls back to skb where
    // the driver cannot, and a kept link stays as it was attached.
    let attached = dp
        .attached()
        .iter()
        .map(|(i, m)| format!("{i}={m}"))
        .collect::<Vec<_>>()
        .join(",");
    tracing::info!(
        mode = ?settings.mode,
        attached = %if attached.is_empty() { "none".to_owned() } else { attached },
        port = settings.port,
        nodes = core.table.nodes(),
        added = summary.added,
        adopted = summary.adopted,
        removed = summary.removed,
        epochs = ?fleet.keyring().held_epochs(),
        listen = %settings.listen,
        controller = core.policy.name(),
        "monitor started"
    );
    let fleet = Arc::new(Mutex::new(fleet));
    // The gate's counters before the API serves them: over pinned maps
    // they go on from the last run's, and a scrape that saw them at 0
    // until the first tick would read as a counter reset (and a rate spike
    // of the whole history) to Prometheus.
    let counters = dp.counters();
    if let Ok(c) = &counters {
        metrics.set_counters(c);
    }
    let shared = Arc::new(Shared {
        core: Mutex::new(core),
        dp: dp.clone(),
        metrics: metrics.clone(),
        last_tick_ns: AtomicU64::new(0),
        dataplane_ok: AtomicBool::new(counters.is_ok()),
        tick: settings.tick,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(mem) = &mem {
        for s in sockets {
            let addr = s.local_addr().ok();
            let s = tokio::net::UdpSocket::from_std(s).with_context(|| {
                format!("cannot register the socket on {addr:?} with the async runtime")
            })?;
            tasks.spawn(userspace::serve(
                s,
                mem.clone(),
                metrics.clone(),
                stop_rx.clone(),
            ));
        }
    }
    metrics.set_local_addresses(local.held());
    if mem.is_none() {
        tasks.spawn(addrs::watch(
            dp.clone(),
            metrics.clone(),
            local,
            stop_rx.clone(),
        ));
    }
    if let Some(rx) = reports {
        tasks.spawn(fleet::reports(
            rx,
            shared.clone(),
            fleet.clone(),
            settings.enroll,
            stop_rx.clone(),
        ));
    }
    {
        tasks.spawn(api::serve(
            listener,
            api::router(shared.clone()),
            stop_rx.clone(),
        ));
    }
    // Saves the learned table every minute, if the policy has one (a
    // reload may switch the controller to one that has).
    {
        let (shared, mut stop) = (shared.clone(), stop_rx.clone());
        tasks.spawn(async move {
            let mut every = tokio::time::interval(SAVE_EVERY);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.changed() => break,
                }
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || save_table(&s, false)).await;
            }
        });
    }
    let ticking = Arc::new(AtomicBool::new(true));
    // Why the gate is gone, once the tick finds it so.
    let (gate_lost, mut gate_lost_rx) = tokio::sync::watch::channel(None::<Fatal>);
    let tick_thread = {
        let (shared, sink, ticking) = (shared.clone(), sink.clone(), ticking.clone());
        std::thread::Builder::new()
            .name("hb-tick".into())
            .spawn(move || tick_thread(&shared, &sink, &ticking, &gate_lost))
            .context("cannot start the tick thread")?
    };

    // Signals. `running`: the settings in force, which reloads change.
    let mut running = settings.clone();
    let mut lost = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                sink.reopen();
                // The files are read first, while SIGTERM and SIGINT still
                // stop the monitor (nothing is applied yet): a path that
                // is a FIFO blocks its read.
                tokio::select! {
                    loaded = read_for_reload(&args) => {
                        reload(loaded, &shared, &fleet, &mut running).await;
                    }
                    _ = sigterm.recv() => {
                        tracing::info!("SIGTERM while a reload read its files: shutting down");
                        break;
                    }
                    _ = sigint.recv() => {
                        tracing::info!("SIGINT while a reload read its files: shutting down");
                        break;
                    }
                }
            }
            changed = gate_lost_rx.changed() => {
                lost = match changed {
                    Ok(()) => gate_lost_rx.borrow_and_update().clone(),
                    // The thread ended without saying why (it says why
                    // whenever it can: `tick_thread`).
                    Err(_) => Some(Fatal::TickPanicked("the tick thread ended".into())),
                };
                if lost.is_some() {
                    break;
                }
            }
        }
    }

    let _ = stop_tx.send(true);
    ticking.store(false, Ordering::Relaxed);
    tick_thread.thread().unpark();
    let _ = tokio::task::spawn_blocking(move || tick_thread.join()).await;
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 5 s");
    }
    // Nodes a reload removed after the last tick: their `removed` now, or
    // never (their state is cleared; the next monitor knows nothing of
    // them).
    {
        let (s, sink) = (shared.clone(), sink.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let mut core = s.core();
            let mut gone = Vec::new();
            let (n, _) = core.announce_removals(&mut events::now_rfc3339, &mut gone);
            if n > 0 {
                let base = sink.publish(gone);
                core.published(base);
            }
        })
        .await;
    }
    sink.flush().await;
    // Every event is with the hooks now: those running and queued get a
    // grace to finish; then those still running are killed with their
    // process groups and the rest dropped (counted, logged).
    if let (Some(hooks), Some(opts)) = (hooks, &settings.hook) {
        hooks.shutdown(opts.timeout.min(HOOK_GRACE)).await;
    }
    // Confirms the status recorded for each node whose event is written
    // now: a clean restart announces nothing again. What the flush gave
    // up on, or was dropped before, stays unconfirmed, and the next
    // monitor announces those changes again. (Without --events none is
    // ever confirmed, hooks being best-effort: nothing to warn about.)
    {
        let s = shared.clone();
        let settled = sink.settled();
        let to_events = !settings.events.is_empty();
        let _ = tokio::task::spawn_blocking(move || {
            let mut core = s.core();
            core.confirm(&*s.dp, settled);
            let left = if to_events {
                core.unconfirmed_records(&*s.dp)
            } else {
                0
            };
            if left > 0 {
                tracing::warn!(
                    nodes = left,
                    "status changes whose events were not written (dropped, or not flushed): \
                     the next monitor goes on from each node's last status written, and \
                     announces the change again if it still holds"
                );
            }
        })
        .await;
    }
    // The tick has stopped: the table is final.
    {
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || save_table(&s, true)).await;
    }
    // Last reference to the dataplane: dropping it detaches the XDP
    // program unless --keep-attached (the XDP dataplane's Drop).
    drop(shared);
    drop(dp);
    drop(mem);
    tracing::info!(keep_attached = settings.keep_attached, "monitor stopped");
    match lost {
        Some(Fatal::GateLost(why)) => Err(anyhow::anyhow!(
            "{why}; stopped without judging any node (started again, the monitor attaches afresh to the interface if it is there, and refuses to start while it is not)"
        )),
        Some(Fatal::TickPanicked(what)) => Err(anyhow::anyhow!(
            "the tick thread stopped on a bug ({what}): no node was judged from then on, so the \
             monitor stopped, for its supervisor to start it again; please report it with the log"
        )),
        None => Ok(()),
    }
}

/// Why the monitor stops on its own: the tick cannot go on.
#[derive(Clone, Debug)]
enum Fatal {
    /// The XDP gate is gone (its interface deleted): why.
    GateLost(String),
    /// The tick thread panicked (a bug): the panic's message.
    TickPanicked(String),
}

/// The tick thread: [`tick_loop`], and a panic in it (a bug, anywhere in
/// the detector, the policy or the controller) said in `fatal`. Unsaid,
/// the monitor went on serving its API with no tick, no node ever judged
/// again, and no exit for its supervisor to restart it.
fn tick_thread(
    shared: &Shared,
    sink: &EventSink,
    running: &AtomicBool,
    fatal: &tokio::sync::watch::Sender<Option<Fatal>>,
) {
    let ticked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tick_loop(shared, sink, running, fatal)
    }));
    if let Err(panic) = ticked {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!(
            panic = %what,
            "the tick thread stopped on a bug: no node is judged without it; the monitor stops, \
             for its supervisor to start it again"
        );
        fatal.send_replace(Some(Fatal::TickPanicked(what)));
    }
}

/// A learning controller rebuilt at a reload from the table the running
/// one learned, handed over in memory: through the file, a save that
/// failed lost everything learned since the last one, and a new target
/// could never be taken (the save rewrote the file the operator had
/// removed to learn afresh). A table that does not fit the new options
/// (another target, other bounds) is refused while its file exists, so
/// that nothing learned is dropped by a typo; with the file removed, the
/// controller learns afresh.
fn carry(
    ctrl: crate::controller::QController,
    running: &TableFile,
    path: &std::path::Path,
    critical: Option<CriticalNodes>,
) -> anyhow::Result<QLearnPolicy> {
    let mut ctrl = ctrl;
    let wrap = |ctrl| QLearnPolicy::wrap(ctrl, Some(path.to_path_buf()), critical);
    // A table that does not fit is refused before anything is loaded: on
    // an error `ctrl` still has its fresh table.
    match ctrl.load_table(running) {
        Ok(()) => Ok(wrap(ctrl).carried()),
        Err(why) if path.exists() => anyhow::bail!(
            "the learned controller table {why}: remove {} (after saving it elsewhere if it \
             is worth keeping) to learn afresh, or set the options back",
            path.display()
        ),
        Err(why) => {
            tracing::warn!(
                path = %path.display(),
                "the learned controller table {why}, and its file is gone: learning afresh"
            );
            // A fresh table, saved there from now on.
            Ok(wrap(ctrl))
        }
    }
}

/// The policy `new` asks for. A learning controller goes on from the
/// running one's table (see [`carry`]), unless `new` names another table
/// file that exists: that one is loaded, as at a start (carrying the
/// running table there instead ignored it, and the next save overwrote
/// it). Whenever the running table is not carried over (a policy without
/// a table, or another table file loaded), it is saved to its own file
/// first, for a later switch back: what it learned since the last
/// minute's save was lost when the new file was loaded.
fn rebuild_policy(shared: &Shared, new: &Settings) -> anyhow::Result<Box<dyn IntervalPolicy>> {
    // Copied under the core's lock, built without it.
    let running = shared.core().policy.table_copy();
    let carried = match running {
        Some((path, _))
            if new.controller.kind != ControllerKind::Qlearn
                || (path != new.controller.table && new.controller.table.exists()) =>
        {
            save_table(shared, false);
            None
        }
        r => r.map(|(_, t)| t.build()),
    };
    make_policy_carrying(new, carried.as_ref())
}

/// Applies what a reload changes besides the fleet and the gate's ACK
/// settings (applied before the fleet, see `reload`): the policy (built by
/// the caller) and the detector; `running` then holds them and `acks`.
/// Returns the names of what changed.
fn apply_options(
    shared: &Shared,
    running: &mut Settings,
    new: &Settings,
    policy: Option<Box<dyn IntervalPolicy>>,
    acks_changed: bool,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    {
        let mut core = shared.core();
        if running.detector_differs(new) {
            core.detector = Detector::new(new.thresholds, new.phi);
            changed.push("detector");
        }
        if let Some(mut p) = policy {
            p.catch_up(&*core.policy);
            tracing::info!(
                from = core.policy.name(),
                to = p.name(),
                "interval policy replaced: it takes over the requests in force (withdrawn if it makes none)"
            );
            core.set_policy(p, new.decision_ms, &*shared.dp, monotonic_ns());
            changed.push("controller");
        }
    }
    if acks_changed {
        changed.push("acks");
    }
    running.adopt_reloadable(new);
    changed
}

/// A reload's first step: the gate's ACK settings of `new`, if they
/// differ (one map write, made before the fleet's part so a refusal fails
/// the whole reload before anything changed). Returns whether they did.
fn apply_acks(shared: &Shared, running: &Settings, new: &Settings) -> anyhow::Result<bool> {
    if !running.acks_differ(new) {
        return Ok(false);
    }
    let mut cfg = new.clone();
    // The port is bound at start (sockets, the gate's filter alike).
    cfg.port = running.port;
    shared
        .dp
        .set_config(&gate_config(&cfg))
        .context("cannot apply the new ACK settings")?;
    Ok(true)
}

/// The tick thread: a fixed-rate loop that skips ticks it cannot keep up
/// with rather than bunching them. A tick that ends after the next one
/// was due starts the next at once, on a schedule afresh from there. Only
/// a scan longer than the period is counted (`hb_ticks_overrun_total`);
/// ticks missed while waiting for the core's lock (a reload, a `/nodes`
/// chunk) are counted nowhere, by design: that wait is not the tick's
/// doing (see `a_tick_that_waited_for_the_lock_is_not_a_slow_tick`).
///
/// Each tick first checks that the XDP gate still sits on every interface
/// it was attached to (`Dataplane::check_attached`). The kernel detaches
/// it from an interface that goes away (deleted, or deleted and created
/// again: a driver reload, a bond rebuilt), and from then on every node
/// behind it falls silent: judged, the whole fleet would be declared dead
/// at once, a page per node, for the monitor's own loss. The tick stops
/// instead, before judging anyone, says why in `gate_lost`, and the
/// monitor shuts down with an error: a supervisor (the README's unit
/// restarts it) starts it again, attaching the gate afresh, and the
/// silence meanwhile is not held against any node (`Core::adopt`).
fn tick_loop(
    shared: &Shared,
    sink: &EventSink,
    running: &AtomicBool,
    gate_lost: &tokio::sync::watch::Sender<Option<Fatal>>,
) {
    let period = shared.tick;
    let mut next = Instant::now();
    let mut events = Vec::new();
    while running.load(Ordering::Relaxed) {
        let (stats, counts, now, t0) = {
            let mut core = shared.core();
            // Under the lock, right before the scan: an interface deleted
            // while the tick waited for it is not judged.
            if let Err(why) = shared.dp.check_attached() {
                tracing::error!(
                    reason = %why,
                    "the XDP gate is gone: no node is judged without it; the monitor stops, for \
                     its supervisor to start it again"
                );
                gate_lost.send_replace(Some(Fatal::GateLost(why)));
                return;
            }
            // After the lock: a tick that waited for it (a reload, a
            // `/nodes` chunk) is not a tick that ran late, nor a slow scan
            // (`hb_tick_duration_seconds` is the scan's time).
            let t0 = Instant::now();
            let now = monotonic_ns();
            let stats = core.tick(&*shared.dp, now, &mut events::now_rfc3339, &mut events);
            // Under the lock, so that the records the tick wrote are
            // confirmed ([`Core::confirm`]) only while the table says
            // which node holds each slot, and in what status.
            let base = sink.publish(std::mem::take(&mut events));
            core.published(base);
            core.confirm(&*shared.dp, sink.settled());
            (stats, core.table.counts, now, t0)
        };
        match shared.dp.counters() {
            Ok(c) => {
                shared.metrics.set_counters(&c);
                shared.dataplane_ok.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                if shared.dataplane_ok.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %format!("{e:#}"), "cannot read the dataplane's counters");
                }
            }
        }
        shared.metrics.set_nodes(&counts);
        shared.metrics.set_stuck_reads(shared.dp.stuck_reads());
        let took = t0.elapsed();
        shared
            .metrics
            .tick(took.as_secs_f64(), took > period, stats.decisions);
        shared.last_tick_ns.store(now, Ordering::Relaxed);

        next += period;
        let now = Instant::now();
        if next <= now {
            // Overran: start the next tick now, on a fresh schedule.
            next = now;
        } else {
            // One wake-up per tick; shutdown unparks the thread. Parking
            // may also return early (spuriously): sleep again for the rest.
            while running.load(Ordering::Relaxed) {
                let left = next.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
    }
}

/// How long a reload waits for its config file and keyring to be read.
const RELOAD_READ_WAIT: Duration = Duration::from_secs(10);

/// A reload's first step: the config file merged under `args`, and the
/// keyring it names, read on a blocking thread and for at most
/// [`RELOAD_READ_WAIT`] (a path that is a FIFO, or a file on a hung
/// filesystem, blocks its read; the thread is left to it).
async fn read_for_reload(args: &Args) -> anyhow::Result<(Settings, Keyring)> {
    let read = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || {
            Settings::load(&args).and_then(|s| {
                let k = Keyring::load(&s.keyring)?;
                Ok((s, k))
            })
        })
    };
    match tokio::time::timeout(RELOAD_READ_WAIT, read).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => Err(anyhow::anyhow!("the reload's reading task failed: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "reading the config file and the keyring took more than {} s (a FIFO, a hung \
             filesystem?)",
            RELOAD_READ_WAIT.as_secs()
        )),
    }
}

/// SIGHUP: reload the keyring, the node list, the detector's and the
/// controller's options, from what [`read_for_reload`] read; on any error
/// keep running with the old ones and say why in one line. Options that
/// need a restart are named in a warning.
async fn reload(
    loaded: anyhow::Result<(Settings, Keyring)>,
    shared: &Arc<Shared>,
    fleet: &Arc<Mutex<Fleet>>,
    running: &mut Settings,
) {
    let (settings, keyring) = match loaded {
        Ok(v) => v,
        Err(e) => {
            shared.metrics.reload(false);
            tracing::error!("reload failed, keeping the running settings: {e:#}");
            return;
        }
    };
    // The new policy is built before anything is applied, so a controller
    // option it cannot use (a saved table that does not fit) fails the
    // whole reload. The running policy's table is saved first: a qlearn
    // whose options changed goes on from what was learned.
    let policy = if running.policy_differs(&settings) {
        let (shared2, mut s2) = (shared.clone(), settings.clone());
        // The tick runs at the period it started with (a new one waits for
        // a restart): the controller models that one.
        s2.tick = running.tick;
        let built = tokio::task::spawn_blocking(move || rebuild_policy(&shared2, &s2)).await;
        match built {
            Ok(Ok(p)) => Some(p),
            Ok(Err(e)) => {
                shared.metrics.reload(false);
                tracing::error!("reload failed, keeping the running settings: {e:#}");
                return;
            }
            Err(e) => {
                shared.metrics.reload(false);
                tracing::error!(error = %e, "reload task failed");
                return;
            }
        }
    } else {
        None
    };
    let acks_changed = match apply_acks(shared, running, &settings) {
        Ok(changed) => changed,
        Err(e) => {
            shared.metrics.reload(false);
            tracing::error!("reload failed, keeping the running settings: {e:#}");
            return;
        }
    };
    let (shared2, fleet2) = (shared.clone(), fleet.clone());
    let nodes = settings.nodes.clone();
    let epochs = keyring.held_epochs();
    let r = tokio::task::spawn_blocking(move || {
        let mut f = fleet2.lock().unwrap_or_else(|e| e.into_inner());
        let dp = &*shared2.dp;
        // Refused here, before anything changes, if it cannot be applied
        // whole.
        let mut r = f.begin_reload(&mut shared2.core(), dp, keyring, nodes)?;
        // Keys are derived and installed without the core's lock (see
        // `Fleet::begin_reload`): ticks go on meanwhile.
        let keyed = r.install_keys(dp);
        // Undone if the dataplane refused a key.
        f.end_reload(&mut shared2.core(), dp, r, keyed)
    })
    .await;
    if acks_changed && !matches!(r, Ok(Ok(_))) {
        // The fleet undid its part: so are the ACK settings.
        if let Err(e) = shared.dp.set_config(&gate_config(running)) {
            tracing::error!(
                "cannot put the running ACK settings back after the failed reload; the gate keeps the new ones until the next reload: {e:#}"
            );
        }
    }
    match r {
        Ok(Ok(s)) => {
            let changed = apply_options(shared, running, &settings, policy, acks_changed);
            shared.metrics.reload(true);
            tracing::info!(
                added = s.added,
                removed = s.removed,
                kept = s.kept,
                epochs = ?epochs,
                // The options the reload changed besides those: `none`,
                // not an empty field.
                changed = if changed.is_empty() { "none".to_owned() } else { changed.join(",") },
                controller = running.controller.kind.name(),
                "reloaded keyring and node list"
            );
            let restart = running.restart_only_changes(&settings);
            if !restart.is_empty() {
                tracing::warn!(
                    options = %restart.join(","),
                    "these options changed but take effect only at a restart"
                );
            }
        }
        Ok(Err(e)) => {
            // The fleet undid what it had applied; the error says what, if
            // anything, it could not put back as it was.
            shared.metrics.reload(false);
            tracing::error!("reload failed, keeping the running settings: {e:#}");
        }
        Err(e) => {
            shared.metrics.reload(false);
            tracing::error!(error = %e, "reload task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the tick thread runs with: no nodes, no policy, a 20 ms tick
    /// over `dp`, events nowhere.
    async fn ticking_on(dp: Arc<dyn Dataplane>) -> (Arc<Shared>, EventSink) {
        let metrics = Arc::new(Metrics::new());
        let core = Core::new(
            Detector::new(
                crate::monitor::state::Thresholds::default(),
                crate::detector::PhiParams::default(),
            ),
            Box::new(FixedPolicy::none()),
            1000,
        );
        let sink = EventSink::start(Destination::None, None, metrics.clone())
            .await
            .unwrap();
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            dp,
            metrics,
            last_tick_ns: AtomicU64::new(0),
            dataplane_ok: AtomicBool::new(false),
            tick: Duration::from_millis(20),
        });
        (shared, sink)
    }

    /// `hb_tick_duration_seconds` is the scan's time: a tick that waited
    /// for the core's lock (a reload, a `/nodes` chunk) is neither a slow
    /// tick nor an overrun. The tick is seen waiting before the lock is
    /// held 300 ms more and released: its thread asleep in `futex` with no
    /// tick done yet (before its first tick, only the lock puts it there;
    /// after, its park between ticks does too).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_that_waited_for_the_lock_is_not_a_slow_tick() {
        let (shared, sink) = ticking_on(Arc::new(MemDataplane::new())).await;
        let metrics = shared.metrics.clone();
        let running = Arc::new(AtomicBool::new(true));
        let held = shared.core();
        let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let ticker = std::thread::spawn({
            let (shared, sink, running, tid) =
                (shared.clone(), sink.clone(), running.clone(), tid.clone());
            move || {
                let gate_lost = tokio::sync::watch::channel(None).0;
                // SAFETY: gettid(2) has no preconditions.
                tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                tick_loop(&shared, &sink, &running, &gate_lost)
            }
        });
        // Asleep in futex (and, checked below, no tick done): waiting for
        // the lock.
        let t = Instant::now();
        loop {
            let tid = tid.load(Ordering::Relaxed);
            if tid != 0 {
                let syscall = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
                    .expect("the tick thread's system call");
                if syscall.split(' ').next() == Some(&libc::SYS_futex.to_string()) {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the tick thread did not wait for the lock"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The wait the scan's time must not count.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            shared.last_tick_ns.load(Ordering::Relaxed),
            0,
            "a tick done while the lock was held: what slept in futex was not the wait for it"
        );
        drop(held);
        let t = Instant::now();
        while shared.last_tick_ns.load(Ordering::Relaxed) == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "no tick");
            std::thread::sleep(Duration::from_millis(5));
        }
        running.store(false, Ordering::Relaxed);
        ticker.thread().unpark();
        ticker.join().unwrap();
        let text = metrics.render();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        assert!(value("hb_tick_duration_seconds_count") >= 1.0);
        assert!(
            value("hb_tick_duration_seconds_sum") < 0.2,
            "the 300 ms wait for the lock is not the scan's: {text}"
        );
        assert_eq!(value("hb_ticks_overrun_total"), 0.0, "{text}");
    }

    /// A dataplane whose counters cannot be read without a panic: any bug
    /// in the tick thread.
    struct PanicsInTick(MemDataplane);

    impl crate::dataplane::Dataplane for PanicsInTick {
        fn upsert_node(&self, id: u32, k: &hb_common::maps::NodeKeys) -> anyhow::Result<()> {
            self.0.upsert_node(id, k)
        }
        fn remove_node(&self, id: u32) -> anyhow::Result<()> {
            self.0.remove_node(id)
        }
        fn provisioned(&self) -> anyhow::Result<Vec<(u32, hb_common::maps::NodeKeys)>> {
            self.0.provisioned()
        }
        fn read_states(
            &self,
            s: std::ops::Range<u32>,
            f: &mut dyn FnMut(u32, &hb_common::maps::NodeState),
        ) {
            self.0.read_states(s, f)
        }
        fn read_live(&self, s: std::ops::Range<u32>, f: &mut crate::dataplane::LiveFn) {
            self.0.read_live(s, f)
        }
        fn set_requested_interval(&self, s: u32, ms: u32) {
            self.0.set_requested_interval(s, ms)
        }
        fn set_monitor_status(&self, s: u32, st: u32, ns: u64) {
            self.0.set_monitor_status(s, st, ns)
        }
        fn counters(&self) -> anyhow::Result<crate::dataplane::Counters> {
            panic!("a bug in the tick")
        }
        fn set_config(&self, c: &Config) -> anyhow::Result<()> {
            self.0.set_config(c)
        }
        fn take_reports(&mut self) -> Option<tokio::sync::mpsc::Receiver<hb_common::maps::Report>> {
            None
        }
    }

    /// A panic in the tick thread is said to the signal loop, which stops
    /// the monitor with an error: a monitor that went on serving its API
    /// with no tick judged no node again and never exited for its
    /// supervisor to restart it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_thread_that_panics_stops_the_monitor() {
        let (shared, sink) = ticking_on(Arc::new(PanicsInTick(MemDataplane::new()))).await;
        let running = Arc::new(AtomicBool::new(true));
        let (fatal, mut fatal_rx) = tokio::sync::watch::channel(None);
        let ticker = std::thread::spawn({
            let (shared, sink, running) = (shared.clone(), sink.clone(), running.clone());
            move || tick_thread(&shared, &sink, &running, &fatal)
        });
        tokio::time::timeout(Duration::from_secs(10), fatal_rx.changed())
            .await
            .expect("said within 10 s")
            .expect("said before the thread ended");
        let said = fatal_rx.borrow_and_update().clone();
        assert!(
            matches!(&said, Some(Fatal::TickPanicked(what)) if what == "a bug in the tick"),
            "{said:?}"
        );
        ticker.join().expect("the panic does not escape the thread");
    }

    /// A reload that names another table file, which exists, loads that
    /// one, and saves the running table to its own file first: what it
    /// learned since the last minute's save was lost.
    #[test]
    fn a_reload_to_another_table_saves_the_running_one_first() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        let settings = |table: &std::path::Path| {
            Settings::load(
                &config::Opts {
                    keyring: Some("k.toml".into()),
                    nodes: Some("1-3".into()),
                    controller: Some(ControllerKind::Qlearn),
                    controller_table: Some(table.to_path_buf()),
                    ..config::Opts::default()
                }
                .into(),
            )
            .unwrap()
        };
        let shared = |table: &std::path::Path| {
            let s = settings(table);
            Shared {
                core: Mutex::new(Core::new(
                    Detector::new(s.thresholds, s.phi),
                    make_policy_carrying(&s, None).unwrap(),
                    s.decision_ms,
                )),
                dp: Arc::new(MemDataplane::new()),
                metrics: Arc::new(Metrics::new()),
                last_tick_ns: AtomicU64::new(0),
                dataplane_ok: AtomicBool::new(false),
                tick: Duration::from_millis(100),
            }
        };
        save_table(&shared(&b), true);
        assert!(b.exists());
        let running = shared(&a);
        let p = rebuild_policy(&running, &settings(&b)).unwrap();
        assert_eq!(p.table().map(|(path, _)| path), Some(b.clone()));
        assert!(
            a.exists(),
            "the running table saved before another was loaded"
        );
    }

    #[test]
    fn a_monotonic_offset_is_read_from_timens_offsets() {
        let host = "monotonic           0         0\nboottime            0         0\n";
        assert_eq!(monotonic_offset(host), Some((0, 0)));
        let restored = "monotonic      -3600   5000\nboottime  7 0\n";
        assert_eq!(monotonic_offset(restored), Some((-3600, 5000)));
        assert_eq!(monotonic_offset("boottime 1 0\n"), None);
        assert_eq!(monotonic_offset(""), None);
        // The test runs in the host's time namespace, as CI does.
        check_clock_shared_with_the_kernel().unwrap();
    }
}
