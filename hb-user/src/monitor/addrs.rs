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

/// The addresses of every interface in this network namespace.
pub fn host() -> anyhow::Result<BTreeSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()
        .context("cannot list the host's addresses")?
        .filter_map(|ifa| {
            let a = ifa.address?;
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}

/// The gate's table for `addrs`; [`LocalAddrs::ANY`] when they do not fit.
pub fn table(addrs: &BTreeSet<IpAddr>) -> LocalAddrs {
    let v4: Vec<[u8; 4]> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<[u8; 16]> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        })
        .collect();
    LocalAddrs::of(&v4, &v6)
}

/// Keeps the gate's table in step with the host's addresses.
pub struct Tracker {
    last: Option<BTreeSet<IpAddr>>,
    warned_full: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            last: None,
            warned_full: false,
        }
    }

    /// Writes `addrs` to the gate if they changed since the last write;
    /// whether it wrote.
    pub fn update(&mut self, dp: &dyn Dataplane, addrs: BTreeSet<IpAddr>) -> anyhow::Result<bool> {
        if self.last.as_ref() == Some(&addrs) {
            return Ok(false);
        }
        let t = table(&addrs);
        if t == LocalAddrs::ANY && !self.warned_full {
            self.warned_full = true;
            tracing::warn!(
                addresses = addrs.len(),
                max_per_family = LOCAL_ADDRS_MAX,
                "more local addresses than the gate holds: it takes heartbeats to any address \
                 (including ones this host forwards to a monitor behind it)"
            );
        }
        dp.set_local_addrs(&t)?;
        tracing::debug!(addresses = ?addrs, "the gate takes heartbeats at these addresses");
        self.last = Some(addrs);
        Ok(true)
    }

    /// How many addresses the gate takes heartbeats at (0: any).
    pub fn held(&self) -> usize {
        match &self.last {
            Some(a) if table(a) != LocalAddrs::ANY => a.len(),
            _ => 0,
        }
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
        match host().and_then(|a| tracker.update(&*dp, a)) {
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
        let many: BTreeSet<IpAddr> = (0..=LOCAL_ADDRS_MAX as u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
            .collect();
        assert_eq!(table(&many), LocalAddrs::ANY);
    }

    #[test]
    fn this_hosts_addresses_include_loopback() {
        let a = host().unwrap();
        assert!(a.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{a:?}");
    }

    #[test]
    fn the_tracker_writes_only_changes() {
        let dp = MemDataplane::new();
        let mut t = Tracker::new();
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
        assert_eq!(t.held(), 0, "too many: any address");
    }
}
