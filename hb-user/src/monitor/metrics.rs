//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.
//!
//! Labels are bounded sets (gate results, states, events, failure
//! reasons): no per-node label, so a million nodes cost the scrape
//! nothing. Per-node detail lives in `GET /nodes`.
//!
//! The gate's counters live in the dataplane (per-CPU kernel maps, or the
//! in-memory gate) and are copied into the registry on every tick, so a
//! scrape never touches the dataplane.

use hb_common::{GateResult, maps::counter};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::state::{EventKind, Status};
use crate::dataplane::Counters;

type Labels = Vec<(&'static str, &'static str)>;

/// Every metric of the monitor.
pub struct Metrics {
    registry: Registry,
    events: Family<Labels, Counter>,
    hook_runs: Counter,
    hook_failures: Family<Labels, Counter>,
    hook_queue_waiting: Gauge,
    event_write_failures: Counter,
    events_dropped: Counter,
    tick_seconds: Histogram,
    ticks_overrun: Counter,
    stuck_reads: Counter,
    decisions: Counter,
    unknown_reports: Counter,
    enrolled: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    ack_send_errors: Counter,
    socket_drops: Counter,
    local_addresses: Gauge,
    /// Handles into `packets`, `dataplane` and `nodes` for what every
    /// tick sets: (counter index, series), so a tick neither hashes
    /// labels nor allocates them.
    packets_by_result: Vec<(usize, Counter)>,
    dataplane_by_counter: Vec<(usize, Counter)>,
    nodes_by_state: Vec<(usize, Gauge)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hb");
        let packets = Family::<Labels, Counter>::default();
        registry.register(
            "packets",
            "Datagrams to the heartbeat port by gate result: accepted, or the check that refused it (README, section Operating the monitor)",
            packets.clone(),
        );
        let dataplane = Family::<Labels, Counter>::default();
        registry.register(
            "dataplane",
            "Other dataplane counters: ACKs sent, reports dropped or rate-limited, contention",
            dataplane.clone(),
        );
        let nodes = Family::<Labels, Gauge>::default();
        registry.register("nodes", "Provisioned nodes by state", nodes.clone());
        let events = Family::<Labels, Counter>::default();
        registry.register("events", "Node events announced", events.clone());
        let hook_runs = Counter::default();
        registry.register(
            "hook_runs",
            "--on-event hooks that exited 0",
            hook_runs.clone(),
        );
        let hook_failures = Family::<Labels, Counter>::default();
        registry.register(
            "hook_failures",
            "--on-event hooks that failed (exit, timeout, spawn, wait), were given up on still running after their timeout's kill (unkillable), or were cut short by shutdown (killed, or never run), and events whose hook never ran: replaced while waiting by a newer event of their node (superseded: --hook-queue reached), or dropped (more nodes waiting than the largest maps hold)",
            hook_failures.clone(),
        );
        let hook_queue_waiting = Gauge::default();
        registry.register(
            "hook_queue_waiting",
            "--on-event events waiting to start (for a free slot, or for their node's previous hook); past --hook-queue a backlog (a start's joined of every node, a failure of many), state changes starting first",
            hook_queue_waiting.clone(),
        );
        let event_write_failures = Counter::default();
        registry.register(
            "event_write_failures",
            "Failed writes to the events file (retried: an event is lost only when the backlog is full)",
            event_write_failures.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Events never written to the events file: the backlog of unwritten ones was full",
            events_dropped.clone(),
        );
        let tick_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 14));
        registry.register(
            "tick_duration_seconds",
            "Time of one decision tick (scan of every node)",
            tick_seconds.clone(),
        );
        let stuck_reads = Counter::default();
        registry.register(
            "dataplane_stuck_reads",
            "Reads of a node's state skipped because the node stayed held for writing over 50 ms (a writer died holding it; the node keeps its status until the next start releases it)",
            stuck_reads.clone(),
        );
        let ticks_overrun = Counter::default();
        registry.register(
            "ticks_overrun",
            "Ticks that took longer than the tick period",
            ticks_overrun.clone(),
        );
        let decisions = Counter::default();
        registry.register(
            "interval_decisions",
            "Requested-interval changes written to the dataplane",
            decisions.clone(),
        );
        let unknown_reports = Counter::default();
        registry.register(
            "unknown_node_reports",
            "Reports of datagrams from unprovisioned node ids (rate-limited by the gate)",
            unknown_reports.clone(),
        );
        let enrolled = Family::<Labels, Counter>::default();
        registry.register(
            "enrollments",
            "--enroll outcomes: provisioned (on probation), accepted (verified heartbeat), expired, refused (no slot, too many on probation, node id 0), duplicate (already held)",
            enrolled.clone(),
        );
        let reloads = Family::<Labels, Counter>::default();
        registry.register("reloads", "SIGHUP reloads by result", reloads.clone());
        let ack_send_errors = Counter::default();
        registry.register(
            "ack_send_errors",
            "ACKs the userspace gate could not send",
            ack_send_errors.clone(),
        );
        let socket_drops = Counter::default();
        registry.register(
            "userspace_socket_drops",
            "Datagrams the kernel dropped at a userspace gate's socket: its receive buffer full (the gate fell behind), the host's UDP memory limit (net.ipv4.udp_mem) or bad checksums; counted when the socket's next datagram arrives",
            socket_drops.clone(),
        );
        let local_addresses = Gauge::default();
        registry.register(
            "gate_local_addresses",
            "Addresses the XDP gate checks heartbeats' destinations against (the host's own); a family with more than the gate holds is not checked and not counted; 0 in userspace mode, whose socket sees only local ones",
            local_addresses.clone(),
        );
        let packets_by_result = GateResult::ALL
            .into_iter()
            // Pass is not a heartbeat: the gate does not count it here.
            .filter(|r| *r != GateResult::Pass)
            .map(|r| {
                let c = packets.get_or_create(&vec![("result", r.name())]).clone();
                (r.index() as usize, c)
            })
            .collect();
        let dataplane_by_counter = counter::EXTRA
            .into_iter()
            .map(|(i, name)| {
                let c = dataplane.get_or_create(&vec![("counter", name)]).clone();
                (i as usize, c)
            })
            .collect();
        let nodes_by_state = Status::ALL
            .into_iter()
            .map(|s| {
                let g = nodes.get_or_create(&vec![("state", s.name())]).clone();
                (s as usize, g)
            })
            .collect();
        let m = Metrics {
            registry,
            events,
            hook_runs,
            hook_failures,
            hook_queue_waiting,
            event_write_failures,
            events_dropped,
            tick_seconds,
            ticks_overrun,
            stuck_reads,
            decisions,
            unknown_reports,
            enrolled,
            reloads,
            ack_send_errors,
            socket_drops,
            local_addresses,
            packets_by_result,
            dataplane_by_counter,
            nodes_by_state,
        };
        // Every label value present from the start, so dashboards and
        // alerts see zeros rather than absent series.
        for e in EventKind::ALL {
            let _ = m.events.get_or_create(&vec![("event", e.name())]);
        }
        for r in ["ok", "error"] {
            let _ = m.reloads.get_or_create(&vec![("result", r)]);
        }
        for o in ["provisioned", "accepted", "expired", "refused", "duplicate"] {
            let _ = m.enrolled.get_or_create(&vec![("outcome", o)]);
        }
        for r in [
            "exit",
            "timeout",
            "unkillable",
            "spawn",
            "wait",
            "dropped",
            "superseded",
            "shutdown",
        ] {
            let _ = m.hook_failures.get_or_create(&vec![("reason", r)]);
        }
        m
    }

    /// Copies the dataplane's counters.
    pub fn set_counters(&self, c: &Counters) {
        for (i, series) in self
            .packets_by_result
            .iter()
            .chain(&self.dataplane_by_counter)
        {
            series
                .inner()
                .store(c[*i], std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Copies the dataplane's count of skipped reads.
    pub fn set_stuck_reads(&self, n: u64) {
        self.stuck_reads
            .inner()
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_local_addresses(&self, n: usize) {
        self.local_addresses.set(n as i64);
    }

    pub fn set_nodes(&self, counts: &[u64; 5]) {
        for (i, g) in &self.nodes_by_state {
            g.set(counts[*i] as i64);
        }
    }

    pub fn tick(&self, seconds: f64, overrun: bool, decisions: u32) {
        self.tick_seconds.observe(seconds);
        if overrun {
            self.ticks_overrun.inc();
        }
        self.decisions.inc_by(decisions as u64);
    }

    pub fn event(&self, e: EventKind) {
        self.events.get_or_create(&vec![("event", e.name())]).inc();
    }

    pub fn event_write_failed(&self) {
        self.event_write_failures.inc();
    }

    pub fn event_dropped(&self) {
        self.events_dropped.inc();
    }

    pub fn hook_ok(&self) {
        self.hook_runs.inc();
    }

    pub fn hook_failed(&self, reason: &'static str) {
        self.hook_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// `hb_hook_queue_waiting`, for the hook queue to set.
    pub fn hook_queue_waiting(&self) -> Gauge {
        self.hook_queue_waiting.clone()
    }

    pub fn unknown_report(&self) {
        self.unknown_reports.inc();
    }

    pub fn enrollment(&self, outcome: &'static str) {
        self.enrolled
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        let r = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&vec![("result", r)]).inc();
    }

    pub fn ack_send_error(&self) {
        self.ack_send_errors.inc();
    }

    /// `n` more datagrams the kernel dropped from a userspace gate's full
    /// socket.
    pub fn socket_drops(&self, n: u64) {
        self.socket_drops.inc_by(n);
    }

    /// Datagrams dropped from userspace gates' full sockets (tests).
    pub fn socket_drops_total(&self) -> u64 {
        self.socket_drops.get()
    }

    /// Successful hook runs (tests).
    pub fn hooks_ok(&self) -> u64 {
        self.hook_runs.get()
    }

    /// Hook failures for `reason` (tests).
    pub fn hook_failures(&self, reason: &'static str) -> u64 {
        self.hook_failures
            .get_or_create(&vec![("reason", reason)])
            .get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_gate_result_and_state() {
        let m = Metrics::new();
        // Every series is there, at zero, before the first tick.
        let text = m.render();
        for series in [
            "hb_packets_total{result=\"replay\"} 0",
            "hb_dataplane_total{counter=\"contended\"} 0",
            "hb_nodes{state=\"alive\"} 0",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
        let mut c = [0u64; counter::LEN as usize];
        c[GateResult::Accepted.index() as usize] = 17;
        c[counter::ACK_SENT as usize] = 4;
        m.set_counters(&c);
        m.set_nodes(&[1, 2, 3, 4, 5]);
        m.tick(0.001, false, 0);
        let text = m.render();
        assert!(
            text.contains("hb_packets_total{result=\"accepted\"} 17"),
            "{text}"
        );
        for r in GateResult::ALL.iter().skip(1) {
            assert!(text.contains(&format!("result=\"{}\"", r.name())), "{r}");
        }
        assert!(text.contains("hb_dataplane_total{counter=\"ack_sent\"} 4"));
        assert!(text.contains("hb_nodes{state=\"dead\"} 4"));
        assert!(text.contains("hb_tick_duration_seconds_count 1"));
        assert!(text.contains("hb_hook_failures_total{reason=\"timeout\"} 0"));
        assert!(text.contains("hb_hook_failures_total{reason=\"shutdown\"} 0"));
        assert!(text.contains("hb_hook_failures_total{reason=\"unkillable\"} 0"));
        assert!(text.contains("hb_hook_failures_total{reason=\"superseded\"} 0"));
        assert!(text.contains("hb_dataplane_stuck_reads_total 0"), "{text}");
        assert!(text.contains("hb_userspace_socket_drops_total 0"), "{text}");
        m.set_stuck_reads(3);
        assert!(m.render().contains("hb_dataplane_stuck_reads_total 3"));
    }

    /// The response is served as OpenMetrics text, whose grammar allows no
    /// raw `"` or `\` in a HELP text (the encoder passes it through as
    /// given): a strict parser refuses the whole scrape.
    #[test]
    fn no_help_text_has_a_quote_or_a_backslash() {
        let m = Metrics::new();
        for e in EventKind::ALL {
            m.event(e);
        }
        m.hook_failed("exit");
        let text = m.render();
        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert!(helps.len() >= 15, "{text}");
        for line in helps {
            assert!(!line.contains(['"', '\\']), "{line}");
        }
    }
}
