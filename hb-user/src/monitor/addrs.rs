//! The host's addresses, for the XDP gate (`hb_common::maps::LocalAddrs`):
//! heartbeats to any other address are not this monitor's (a host that
//! forwards carries heartbeats for monitors behind it).
//!
//! Read from the kernel (`getifaddrs`: every interface of the monitor's
//! network namespace, as the stack takes a datagram to any local address
//! on any interface) before the gate is configured, then again every
//! [`EVERY`], and written to the gate when they change: an address added
//! by DHCP, or a virtual address that moves to this host on a failover,
//! is taken within a second. Until the first write the gate takes any
//! address, as it does for a host with more addresses than the gate
//! holds (logged once).

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use hb_common::maps::{LOCAL_ADDRS_MAX, LocalAddrs};

use super::metrics::Metrics;
use crate::dataplane::Dataplane;

/// How often the addresses are read again.
pub const EVERY: Duration = Duration::from_secs(1);

/// The addresses of every interface in this network namespace, but IPv6
/// link-local ones only from `attached` (the interfaces the gate is on): a
/// link-local address is reachable on its own link alone, so another
/// interface's never comes through the gate, and a host with dozens of
/// veths or taps (each with its own) would overflow the table.
pub fn host(attached: &[String]) -> anyhow::Result<BTreeSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()
        .context("cannot list the host's addresses")?
        .filter_map(|ifa| {
            let a = ifa.address?;
            match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (_, Some(v6))
                    if !v6.ip().is_unicast_link_local()
                        || attached.contains(&ifa.interface_name) =>
                {
                    Some(IpAddr::V6(v6.ip()))
                }
                _ => None,
            }
        })
        .collect())
}

/// The gate's table for `addrs` (a family with more than fit is not
/// checked).
pub fn table(addrs: &BTreeSet<IpAddr>) -> LocalAddrs {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for a in addrs {
        match a {
            IpAddr::V4(a) => v4.push(a.octets()),
            IpAddr::V6(a) => v6.push(a.octets()),
        }
    }
    LocalAddrs::of(&v4, &v6)
}

/// Keeps the gate's table in step with the host's addresses.
pub struct Tracker {
    attached: Vec<String>,
    /// The addresses last written, and how many of them the gate checks
    /// (those of the families that fit).
    last: Option<(BTreeSet<IpAddr>, usize)>,
    warned_full: bool,
}

impl Tracker {
    /// For a gate on the interfaces `attached`.
    pub fn new(attached: &[String]) -> Tracker {
        Tracker {
            attached: attached.to_vec(),
            last: None,
            warned_full: false,
        }
    }

    /// The host's addresses now, for this gate ([`host`]).
    pub fn read(&self) -> anyhow::Result<BTreeSet<IpAddr>> {
        host(&self.attached)
    }

    /// Takes `addrs` as written to the gate already (at its start).
    pub fn written(&mut self, addrs: BTreeSet<IpAddr>) {
        let (v4, v6) = table(&addrs).checks();
        if (!v4 || !v6) && !self.warned_full {
            self.warned_full = true;
            tracing::warn!(
                addresses = addrs.len(),
                max_per_family = LOCAL_ADDRS_MAX,
                unchecked = if !v4 && !v6 {
                    "IPv4 and IPv6"
                } else if !v4 {
                    "IPv4"
                } else {
                    "IPv6"
                },
                "more local addresses than the gate holds: it takes heartbeats to any address of \
                 that family (including ones this host forwards to a monitor behind it)"
            );
        }
        let held = addrs
            .iter()
            .filter(|ip| if ip.is_ipv4() { v4 } else { v6 })
            .count();
        self.last = Some((addrs, held));
    }

    /// Writes `addrs` to the gate if they changed since the last write;
    /// whether it wrote.
    pub fn update(&mut self, dp: &dyn Dataplane, addrs: BTreeSet<IpAddr>) -> anyhow::Result<bool> {
        if self.last.as_ref().is_some_and(|(last, _)| *last == addrs) {
            return Ok(false);
        }
        dp.set_local_addrs(&table(&addrs))?;
        tracing::debug!(addresses = ?addrs, "the gate takes heartbeats at these addresses");
        self.written(addrs);
        Ok(true)
    }

    /// How many addresses the gate checks heartbeats against (0: none
    /// written, or neither family checked).
    pub fn held(&self) -> usize {
        self.last.as_ref().map_or(0, |(_, held)| *held)
    }
}

/// Reads the host's addresses every [`EVERY`] and writes them to the gate
/// when they change, until `stop`. An error is logged (once per run of
/// errors) and the gate keeps the last addresses written.
pub async fn watch(
    dp: Arc<dyn Dataplane>,
    metrics: Arc<Metrics>,
    mut tracker: Tracker,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => break,
        }
        match tracker.read().and_then(|a| tracker.update(&*dp, a)) {
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("cannot update the gate's local addresses: {e:#}");
            }
            Err(_) => {}
            Ok(_) => failing = false,
        }
        metrics.set_local_addresses(tracker.held());
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::dataplane::mem::MemDataplane;

    #[test]
    fn the_table_holds_both_families_or_nothing() {
        let a: BTreeSet<IpAddr> = [
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ]
        .into();
        let t = table(&a);
        assert!(t.takes_v4([198, 18, 0, 1]) && t.takes_v4([127, 0, 0, 1]));
        assert!(!t.takes_v4([198, 18, 0, 2]));
        assert!(t.takes_v6(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets()));
        assert!(!t.takes_v6(&Ipv6Addr::LOCALHOST.octets()));
        // Twenty link-locals (a host's veths) would switch the IPv6 check
        // off, and only that one.
        let mut many = a.clone();
        many.extend((0..20).map(|i| IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, i))));
        let t = table(&many);
        assert_eq!(t.checks(), (true, false));
        assert!(!t.takes_v4([198, 18, 0, 2]) && t.takes_v6(&Ipv6Addr::LOCALHOST.octets()));
    }

    #[test]
    fn this_hosts_addresses_include_loopback() {
        let a = host(&[]).unwrap();
        assert!(a.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{a:?}");
        assert!(
            !a.iter()
                .any(|ip| matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())),
            "no link-local address of an interface the gate is not on: {a:?}"
        );
    }

    #[test]
    fn the_tracker_writes_only_changes() {
        let dp = MemDataplane::new();
        let mut t = Tracker::new(&[]);
        assert_eq!(t.held(), 0, "nothing written: any address");
        let a: BTreeSet<IpAddr> = [IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))].into();
        assert!(t.update(&dp, a.clone()).unwrap());
        assert!(!t.update(&dp, a).unwrap(), "unchanged: not written again");
        let b: BTreeSet<IpAddr> = [Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::LOCALHOST]
            .map(IpAddr::V4)
            .into();
        assert!(t.update(&dp, b).unwrap());
        assert_eq!(t.held(), 2);
        let many: BTreeSet<IpAddr> = (0..=LOCAL_ADDRS_MAX as u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
            .collect();
        assert!(t.update(&dp, many).unwrap());
        assert_eq!(t.held(), 0, "too many IPv4, and no IPv6: nothing checked");
    }
}
