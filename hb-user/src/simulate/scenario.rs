//! The shipped scenarios: what the network and the fleet do to heartbeats.
//!
//! Each scenario is a set of distributions; `hb simulate --seed N` draws
//! the concrete run (paths, crash times, pauses, spikes) from them, the
//! same for every controller compared on that seed. Numbers are chosen to
//! resemble what operators report, not to flatter any controller: LAN
//! figures from a single rack, WAN delays of cross-region paths with
//! Pareto-tailed queueing, Gilbert-Elliott bursts of a fraction of a second
//! as seen on congested links and flaky NICs, GC and VM stalls of seconds.
//! Everything that happens to a path or a node is a function of time, not
//! of how many heartbeats it sends.

use serde::Serialize;

/// Two-state (Gilbert-Elliott) loss in continuous time: a path stays
/// Good for an exponential time of mean `mean_good_s`, then Bad for one of
/// mean `mean_bad_s`, and so on; each state loses packets with its own
/// probability. A burst lasts a time, not a number of packets, so every
/// sender on the path sees the same bad periods whatever its interval:
/// one sending every 100 ms loses a few heartbeats in a row, one sending
/// every 10 s seldom two. `mean_bad_s` 0 (the default) is a path that is
/// never Bad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct GilbertElliott {
    pub mean_good_s: f64,
    pub mean_bad_s: f64,
    pub loss_good: f64,
    pub loss_bad: f64,
}

impl GilbertElliott {
    /// The long-run share of time in the Bad state.
    pub fn bad_share(&self) -> f64 {
        if self.mean_bad_s <= 0.0 {
            0.0
        } else {
            self.mean_bad_s / (self.mean_good_s.max(0.0) + self.mean_bad_s)
        }
    }
}

/// Episodes of a per-node path's congestion: queueing delay, extra jitter
/// and extra random loss for a while.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Congestion {
    pub per_hour: f64,
    pub mean_duration_s: f64,
    pub extra_delay_ms: f64,
    /// Mean of the exponential extra jitter, ms.
    pub extra_jitter_ms: f64,
    pub extra_loss: f64,
}

/// One kind of path and sender; a scenario gives every node one profile.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    /// Which kind of node this is (`lan`, `wan`, ...), for per-profile
    /// figures of a mixed fleet.
    pub name: &'static str,
    /// One-way base delay, drawn per node uniformly in this range, ms.
    pub base_delay_ms: (f64, f64),
    /// Mean of the exponential per-packet queueing jitter, ms.
    pub jitter_ms: f64,
    /// Probability that a packet also gets a Pareto-distributed delay.
    pub tail_prob: f64,
    /// Pareto scale (minimum) of that delay, ms.
    pub tail_scale_ms: f64,
    /// Pareto shape (smaller = heavier tail; 1.5 has infinite variance).
    pub tail_alpha: f64,
    pub loss: GilbertElliott,
    pub congestion: Congestion,
    /// The node's usual load, drawn per node uniformly in this range,
    /// permille.
    pub load: (u16, u16),
    /// Load spikes (batch jobs, compactions) per hour, their mean length
    /// and the load during one.
    pub spikes_per_hour: f64,
    pub spike_mean_s: f64,
    pub spike_load: u16,
    /// Sender stalls (GC, VM migration, CPU starvation) per hour and their
    /// duration range: the node is alive but sends nothing.
    pub pauses_per_hour: f64,
    pub pause_s: (f64, f64),
}

impl Profile {
    /// A calm rack: 0.1-0.3 ms, 50 us of jitter, no loss, light load.
    pub fn lan() -> Profile {
        Profile {
            name: "lan",
            base_delay_ms: (0.1, 0.3),
            jitter_ms: 0.05,
            tail_prob: 0.0,
            tail_scale_ms: 0.0,
            tail_alpha: 2.0,
            loss: GilbertElliott::default(),
            congestion: Congestion::default(),
            load: (50, 200),
            spikes_per_hour: 0.0,
            spike_mean_s: 0.0,
            spike_load: 0,
            pauses_per_hour: 0.0,
            pause_s: (0.0, 0.0),
        }
    }

    /// Cross-region paths: 10-80 ms, 3 ms queueing jitter, 1 % of packets
    /// with a Pareto(20 ms, 1.5) tail, 0.2 % random loss.
    pub fn wan() -> Profile {
        Profile {
            name: "wan",
            base_delay_ms: (10.0, 80.0),
            jitter_ms: 3.0,
            tail_prob: 0.01,
            tail_scale_ms: 20.0,
            tail_alpha: 1.5,
            loss: GilbertElliott {
                loss_good: 0.002,
                ..GilbertElliott::default()
            },
            load: (100, 400),
            ..Profile::lan()
        }
    }

    /// A LAN whose link drops bursts: Bad for ~0.4 s every ~20 s,
    /// losing 90 % while Bad (about 2 % overall). At a 100 ms interval
    /// that is a burst of ~4 heartbeats every ~200, the packet-stepped
    /// chain these times were calibrated from; a 10 s sender loses single
    /// heartbeats.
    pub fn bursty() -> Profile {
        Profile {
            name: "bursty",
            loss: GilbertElliott {
                mean_good_s: 20.0,
                mean_bad_s: 0.4,
                loss_good: 0.0,
                loss_bad: 0.9,
            },
            ..Profile::lan()
        }
    }

    /// A metro path (2-5 ms) congested 6 times an hour for ~90 s: +40 ms
    /// queueing, +25 ms mean jitter, 3 % loss while it lasts.
    pub fn congested() -> Profile {
        Profile {
            name: "congested",
            base_delay_ms: (2.0, 5.0),
            jitter_ms: 0.5,
            congestion: Congestion {
                per_hour: 6.0,
                mean_duration_s: 90.0,
                extra_delay_ms: 40.0,
                extra_jitter_ms: 25.0,
                extra_loss: 0.03,
            },
            ..Profile::lan()
        }
    }

    /// A LAN node whose load spikes to 95 % four times an hour for ~2 min.
    pub fn spiky() -> Profile {
        Profile {
            name: "spiky",
            load: (50, 300),
            spikes_per_hour: 4.0,
            spike_mean_s: 120.0,
            spike_load: 950,
            ..Profile::lan()
        }
    }

    /// A LAN node that stalls 6 times an hour for 0.5 to 4 s.
    pub fn pausing() -> Profile {
        Profile {
            name: "pausing",
            pauses_per_hour: 6.0,
            pause_s: (0.5, 4.0),
            ..Profile::lan()
        }
    }
}

/// A fleet and its network.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// Node `i` uses `profiles[i % profiles.len()]`.
    pub profiles: Vec<Profile>,
    /// Crashes per node per hour (Poisson), none in the first two minutes.
    pub crashes_per_node_hour: f64,
    /// How long a crashed node stays down before it restarts with a new
    /// generation, s.
    pub downtime_s: f64,
}

/// Names of the shipped scenarios, for `--scenario`.
pub const NAMES: [&str; 7] = [
    "lan",
    "wan",
    "bursty-loss",
    "congestion",
    "load-spikes",
    "pauses",
    "mixed",
];

impl Scenario {
    fn one(name: &'static str, about: &'static str, p: Profile) -> Scenario {
        Scenario {
            name,
            about,
            profiles: vec![p],
            crashes_per_node_hour: 3.0,
            downtime_s: 60.0,
        }
    }

    /// The scenario called `name`.
    pub fn named(name: &str) -> Option<Scenario> {
        Some(match name {
            // The easy case: nothing disturbs heartbeats, so any interval
            // meets its detection time exactly; the controller should
            // settle at the slowest interval within its target.
            "lan" => Scenario::one(
                "lan",
                "one rack: sub-millisecond delay, no loss, light load",
                Profile::lan(),
            ),
            // Heavy-tailed delay: rare late heartbeats inflate the
            // detector's deviation and cause false suspicions at short
            // intervals, where a 50 ms straggler is a large fraction of the
            // interval.
            "wan" => Scenario::one(
                "wan",
                "cross-region paths: 10-80 ms, Pareto-tailed jitter, 0.2% loss",
                Profile::wan(),
            ),
            // Correlated loss: a burst of lost heartbeats looks exactly
            // like a crash to a detector at a short interval; the cost of a
            // false suspicion has to be weighed against detection time.
            "bursty-loss" => Scenario::one(
                "bursty-loss",
                "LAN with Gilbert-Elliott loss bursts (~0.4 s every ~20 s, ~2% overall)",
                Profile::bursty(),
            ),
            // Conditions that change over time: a fixed interval must be
            // sized for the worst minutes; an adaptive one only during them.
            "congestion" => Scenario::one(
                "congestion",
                "metro paths congested ~6 times an hour for ~90 s (+40 ms, jitter, 3% loss)",
                Profile::congested(),
            ),
            // The load term of the reward: heartbeats cost more on a busy
            // node, so the controller may slow a loaded node down, within
            // the detection target.
            "load-spikes" => Scenario::one(
                "load-spikes",
                "LAN nodes whose load spikes to 95% four times an hour",
                Profile::spiky(),
            ),
            // Alive but silent: GC or VM stalls are the classic source of
            // false suspicions; short intervals see every stall.
            "pauses" => Scenario::one(
                "pauses",
                "LAN nodes stalling 6 times an hour for 0.5-4 s (GC, VM migration)",
                Profile::pausing(),
            ),
            // A realistic fleet is all of the above at once: one table must
            // serve every kind of node.
            "mixed" => Scenario {
                name: "mixed",
                about: "a fleet mixing the lan, wan, bursty-loss, congestion, load-spikes and pauses profiles",
                profiles: vec![
                    Profile::lan(),
                    Profile::wan(),
                    Profile::bursty(),
                    Profile::congested(),
                    Profile::spiky(),
                    Profile::pausing(),
                ],
                crashes_per_node_hour: 3.0,
                downtime_s: 60.0,
            },
            _ => return None,
        })
    }

    /// Every shipped scenario.
    pub fn all() -> Vec<Scenario> {
        NAMES.iter().filter_map(|n| Scenario::named(n)).collect()
    }
}
