//! The hook through which a heartbeat-interval controller steers nodes.
//!
//! Every decision period the tick asks the policy, node by node, which
//! interval it wants that node to use, and writes a changed answer to the
//! dataplane (`Dataplane::set_requested_interval`), where the gate puts it
//! into ACKs. The policy only sees authenticated state (the gate's
//! per-node statistics): forged datagrams never reach it.
//!
//! [`FixedPolicy`] is the whole policy when no controller runs: no opinion
//! (senders keep their own interval) or one interval for everyone. The
//! Q-learning controller (`crate::controller`) implements the same trait.

use hb_common::maps::NodeState;

use super::state::Status;

/// What the monitor knows of a node at decision time, beyond the
/// dataplane's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeView {
    pub node_id: u32,
    pub status: Status,
    /// Phi at decision time.
    pub phi: f64,
    /// The monitor's current request (0 = no opinion).
    pub requested_interval_ms: u32,
    /// CLOCK_MONOTONIC ns of this decision.
    pub now_ns: u64,
}

/// A per-node heartbeat interval policy.
pub trait IntervalPolicy: Send {
    /// The interval (ms) the node at `slot` should use from now on, or
    /// `None` to leave the current request unchanged. `Some(0)` withdraws
    /// the request (the sender keeps its own interval).
    fn decide(&mut self, slot: u32, node: &NodeView, state: &NodeState) -> Option<u32>;

    /// Whether the tick needs to ask at all (a policy with no opinion
    /// costs nothing per node).
    fn active(&self) -> bool {
        true
    }

    /// Why the last decision for `slot` was made, for `/nodes`.
    fn reason(&self, _slot: u32) -> Option<String> {
        None
    }

    /// A slot was freed (node removed): forget what was learned about it.
    fn forget(&mut self, _slot: u32) {}

    /// Short name for logs and `/nodes`.
    fn name(&self) -> &'static str;
}

/// No controller: no opinion, or one fixed interval for every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedPolicy {
    interval_ms: Option<u32>,
}

impl FixedPolicy {
    /// No opinion: senders keep their configured interval.
    pub const fn none() -> FixedPolicy {
        FixedPolicy { interval_ms: None }
    }

    /// Ask every node to use `interval_ms`.
    pub const fn fixed(interval_ms: u32) -> FixedPolicy {
        FixedPolicy {
            interval_ms: Some(interval_ms),
        }
    }
}

impl IntervalPolicy for FixedPolicy {
    fn decide(&mut self, _slot: u32, node: &NodeView, _state: &NodeState) -> Option<u32> {
        let want = self.interval_ms?;
        (node.requested_interval_ms != want).then_some(want)
    }

    fn active(&self) -> bool {
        self.interval_ms.is_some()
    }

    fn reason(&self, _slot: u32) -> Option<String> {
        self.interval_ms.map(|ms| format!("fixed interval {ms} ms"))
    }

    fn name(&self) -> &'static str {
        if self.interval_ms.is_some() {
            "fixed"
        } else {
            "off"
        }
    }
}
