//! What rtnetlink says about an interface's XDP: the mode a program is
//! attached in, and which programs. A bpf_link's own info names only the
//! interface, and a link kept attached by an earlier run
//! (`--keep-attached`) keeps the mode it was attached in, whatever
//! `--mode` the next start asks for. And its kind (`veth`, ...): native
//! XDP on a veth sends its `XDP_TX` frames on only to a peer that runs an
//! XDP program too.

use anyhow::{Context as _, anyhow, bail};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How XDP is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    None,
    /// Native (driver) mode.
    Driver,
    /// skb (generic) mode.
    Skb,
    /// Offloaded, or several at once: not a mode `hb` attaches in.
    Other,
}

/// How XDP is attached to the interface at `ifindex`, in this network
/// namespace (`RTM_GETLINK`).
pub fn xdp_attach(ifindex: u32) -> anyhow::Result<XdpAttach> {
    let attached = xdp_attrs(ifindex)?.into_iter().find_map(|x| match x {
        LinkXdp::Attached(how) => Some(how),
        _ => None,
    });
    Ok(match attached {
        None | Some(XdpAttached::None) => XdpAttach::None,
        Some(XdpAttached::Driver) => XdpAttach::Driver,
        Some(XdpAttached::SocketBuffer) => XdpAttach::Skb,
        Some(_) => XdpAttach::Other,
    })
}

/// What an interface is now: its name, and the ids of the XDP programs
/// attached to it (whether through netlink or a bpf_link: one in the mode
/// it is attached in, or one a mode when several are; empty when none is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkNow {
    pub name: String,
    pub xdp_prog_ids: Vec<u32>,
}

/// The interface at `ifindex` in this network namespace, `None` when no
/// interface has that index (one `RTM_GETLINK`: the monitor's tick asks it
/// of every interface it gates).
pub fn link_now(ifindex: u32) -> anyhow::Result<Option<LinkNow>> {
    let link = match get_link(ifindex) {
        Ok(link) => link,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
                == Some(libc::ENODEV) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut name = None;
    let mut xdp = Vec::new();
    for a in link.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n),
            LinkAttribute::Xdp(x) => xdp = x,
            _ => {}
        }
    }
    let name = name.with_context(|| format!("rtnetlink named no interface of index {ifindex}"))?;
    Ok(Some(LinkNow {
        name,
        xdp_prog_ids: prog_ids(xdp),
    }))
}

/// The kind of the interface at `ifindex` in this network namespace
/// (`IFLA_INFO_KIND`: `veth`, `bridge`, `dummy`...; what `ip -d link`
/// shows after its flags), `None` for a device without one (`lo`, most
/// physical NICs, whose driver sets no link kind).
pub fn link_kind(ifindex: u32) -> anyhow::Result<Option<String>> {
    Ok(get_link(ifindex)?
        .attributes
        .into_iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.into_iter().find_map(|i| match i {
                LinkInfo::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        }))
}

/// The program ids in `IFLA_XDP` attributes, sorted, once each.
fn prog_ids(xdp: Vec<LinkXdp>) -> Vec<u32> {
    let mut ids: Vec<u32> = xdp
        .into_iter()
        .filter_map(|x| match x {
            LinkXdp::ProgId(id)
            | LinkXdp::DrvProgId(id)
            | LinkXdp::SkbProgId(id)
            | LinkXdp::HwProgId(id) => Some(id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The `IFLA_XDP` attributes of the interface at `ifindex`, in this
/// network namespace.
fn xdp_attrs(ifindex: u32) -> anyhow::Result<Vec<LinkXdp>> {
    Ok(get_link(ifindex)?
        .attributes
        .into_iter()
        .find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })
        .unwrap_or_default())
}

/// The interface at `ifindex`, in this network namespace (`RTM_GETLINK`);
/// an interface that is not there is an error whose source is the
/// kernel's `io::Error` (ENODEV).
fn get_link(ifindex: u32) -> anyhow::Result<LinkMessage> {
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(link)),
    );
    req.header.flags = NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);

    let mut sock = Socket::new(NETLINK_ROUTE).context("cannot open an rtnetlink socket")?;
    sock.bind_auto()
        .context("cannot bind the rtnetlink socket")?;
    sock.connect(&SocketAddr::new(0, 0))
        .context("cannot connect the rtnetlink socket")?;
    sock.send(&buf, 0)
        .context("cannot ask rtnetlink about the interface")?;
    // One reply to a request that is not a dump: the link, or an error.
    // Without IFLA_EXT_MASK it leaves the VF list out, and fits in a few
    // KiB; a reply cut short fails to parse.
    let mut reply = Vec::with_capacity(64 * 1024);
    let n = sock
        .recv(&mut reply, 0)
        .context("cannot read rtnetlink's answer")?;
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n])
        .map_err(|e| anyhow!("cannot parse rtnetlink's answer: {e}"))?;
    let link = match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link,
        NetlinkPayload::Error(e) => {
            return Err(anyhow::Error::new(e.to_io())
                .context(format!("rtnetlink has no interface of index {ifindex}")));
        }
        other => bail!("rtnetlink answered {other:?} about interface {ifindex}"),
    };
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_xdp_and_a_missing_index_is_an_error_or_none() {
        // Index 1 is `lo` in every network namespace.
        assert_eq!(xdp_attach(1).unwrap(), XdpAttach::None);
        assert_eq!(
            link_now(1).unwrap(),
            Some(LinkNow {
                name: "lo".into(),
                xdp_prog_ids: Vec::new()
            })
        );
        let err = format!("{:#}", xdp_attach(u32::MAX - 7).unwrap_err());
        assert!(err.contains("no interface of index"), "{err}");
        // An index no interface has (a deleted one's): none.
        assert_eq!(link_now(999_999).unwrap(), None);
    }

    /// In a network namespace of its own (this test's thread only, gone
    /// with it, and the interfaces with it): a veth pair says `veth`, a
    /// bridge `bridge`, `lo` nothing.
    #[test]
    fn a_veth_is_told_from_other_interfaces() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) changes only this thread's namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "a network namespace for this thread (run as root)");
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .expect("run ip");
                assert!(st.success(), "ip {args:?}: {st}");
            };
            ip(&[
                "link", "add", "hbk0", "type", "veth", "peer", "name", "hbk1",
            ]);
            ip(&["link", "add", "hbk2", "type", "bridge"]);
            let kind = |name: &str| {
                let i = nix::net::if_::if_nametoindex(name).expect("interface");
                link_kind(i).unwrap()
            };
            assert_eq!(kind("hbk0").as_deref(), Some("veth"));
            assert_eq!(kind("hbk1").as_deref(), Some("veth"));
            assert_eq!(kind("hbk2").as_deref(), Some("bridge"));
            assert_eq!(kind("lo"), None);
            assert!(link_kind(999_999).is_err(), "no such interface");
        })
        .join()
        .expect("the namespace thread");
    }
}
