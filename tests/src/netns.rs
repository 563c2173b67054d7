//! Network namespaces and veth pairs for tests, as RAII guards.
//!
//! Every namespace a test creates is named `hbt-<tag>-<pid>-<n>` and is
//! deleted when its guard drops, even when the test panics. `cargo xtask
//! test` also deletes any `hbt-*` namespace left behind by a killed run
//! (Ctrl-C, SIGKILL), before and after the tests.
//!
//! Code runs inside a namespace in one of two ways:
//! - [`NetNs::run`]: a closure on a scoped thread that `setns`es first, so
//!   the test process itself never changes namespace;
//! - [`NetNs::command`]: a child process started through `nsenter
//!   --net=...`, which (unlike `ip netns exec`) keeps the host's mounts, so
//!   bpffs pins under /sys/fs/bpf stay visible;
//! - [`NetNs::exec`]: a child process started through `ip netns exec`,
//!   which sees the namespace's own `/etc/hosts` ([`NetNs::hosts`]) and
//!   not the host's bpffs: for programs that resolve names.
//!
//! veth pairs are created directly inside their namespaces, never in the
//! host namespace, so concurrent tests cannot collide on interface names.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// Prefix of every namespace the tests create.
pub const PREFIX: &str = "hbt-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `cmd`, failing with its stderr when it exits non-zero.
pub fn sh(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> anyhow::Result<Output> {
    sh(Command::new("ip").args(args))
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with loopback up. `tag` names the test.
    pub fn new(tag: &str) -> anyhow::Result<NetNs> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that will run `program` inside this namespace (via
    /// `nsenter`, keeping the host's mounts).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        c
    }

    /// A command that will run `program` inside this namespace through
    /// `ip netns exec`: in a mount namespace of its own, where the files
    /// of `/etc/netns/<name>/` ([`NetNs::hosts`]) stand in for those of
    /// `/etc` and `/sys` is this namespace's (bpffs pins are not seen).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Gives the programs [`NetNs::exec`] starts `text` for their
    /// `/etc/hosts`, until the guard drops.
    pub fn hosts(&self, text: &str) -> anyhow::Result<Hosts> {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // The guard first: a failed write still removes the directory.
        let hosts = Hosts { dir };
        let file = hosts.dir.join("hosts");
        std::fs::write(&file, text).with_context(|| format!("write {}", file.display()))?;
        Ok(hosts)
    }

    /// Runs `f` on a thread that has entered this namespace and returns its
    /// result. The calling thread's namespace is untouched.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = File::open(self.path()).with_context(|| format!("open {}", self.path()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a valid fd.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(anyhow::Error::from(std::io::Error::last_os_error())
                        .context(format!("setns into {}", self.name)));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }

    /// Index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> anyhow::Result<u32> {
        let name = ifname.to_owned();
        let idx = self.run(move || {
            let c = std::ffi::CString::new(name).expect("no NUL in interface name");
            // SAFETY: valid NUL-terminated string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        })?;
        if idx == 0 {
            bail!("no interface {ifname} in {}", self.name);
        }
        Ok(idx)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also destroys the veth ends inside it.
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

/// A namespace's `/etc/netns/<name>/` (see [`NetNs::hosts`]), removed on
/// drop.
#[derive(Debug)]
pub struct Hosts {
    dir: std::path::PathBuf,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Addresses of the two ends of a test link: IPv4 in 198.18.0.0/15 and IPv6
/// in fd00::/8, never anything routable.
#[derive(Clone, Copy, Debug)]
pub struct LinkAddrs {
    pub v4: [std::net::Ipv4Addr; 2],
    pub v6: [std::net::Ipv6Addr; 2],
}

impl Default for LinkAddrs {
    fn default() -> Self {
        LinkAddrs {
            v4: [
                std::net::Ipv4Addr::new(198, 18, 0, 1),
                std::net::Ipv4Addr::new(198, 18, 0, 2),
            ],
            v6: [
                "fd00:4842::1".parse().expect("literal"),
                "fd00:4842::2".parse().expect("literal"),
            ],
        }
    }
}

/// Two namespaces joined by a veth pair: `a` (the monitor side, interface
/// `veth-a`) and `b` (the node side, `veth-b`), with IPv4 and IPv6
/// addresses and static neighbour entries so that ARP and ND never disturb
/// what a test counts. Drop order: the pair goes with the namespaces.
#[derive(Debug)]
pub struct VethPair {
    pub addrs: LinkAddrs,
    pub mac: [[u8; 6]; 2],
    // `b` first: dropped before `a` (fields drop in declaration order).
    pub b: NetNs,
    pub a: NetNs,
}

pub const IF_A: &str = "veth-a";
pub const IF_B: &str = "veth-b";

impl VethPair {
    pub fn new(tag: &str) -> anyhow::Result<VethPair> {
        let a = NetNs::new(&format!("{tag}a"))?;
        let b = NetNs::new(&format!("{tag}b"))?;
        let addrs = LinkAddrs::default();
        let mac = [[0x02, 0x48, 0x42, 0, 0, 1], [0x02, 0x48, 0x42, 0, 0, 2]];
        let fmt_mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        a.ip(&[
            "link",
            "add",
            IF_A,
            "address",
            &fmt_mac(mac[0]),
            "type",
            "veth",
            "peer",
            "name",
            IF_B,
            "address",
            &fmt_mac(mac[1]),
            "netns",
            b.name(),
        ])?;
        for (ns, ifname, i) in [(&a, IF_A, 0usize), (&b, IF_B, 1usize)] {
            let peer = 1 - i;
            // No DAD: the address is usable at once.
            ns.ip(&["addr", "add", &format!("{}/24", addrs.v4[i]), "dev", ifname])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", addrs.v6[i]),
                "dev",
                ifname,
                "nodad",
            ])?;
            ns.ip(&["link", "set", ifname, "up"])?;
            for addr in [IpAddr::from(addrs.v4[peer]), IpAddr::from(addrs.v6[peer])] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    &addr.to_string(),
                    "lladdr",
                    &fmt_mac(mac[peer]),
                    "dev",
                    ifname,
                    "nud",
                    "permanent",
                ])?;
            }
        }
        Ok(VethPair { addrs, mac, b, a })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_created_used_and_removed() {
        let name;
        {
            let pair = VethPair::new("nstest").unwrap();
            name = pair.a.name().to_owned();
            assert!(pair.a.ifindex(IF_A).unwrap() > 0);
            let out = sh(pair.b.command("ping").args([
                "-c",
                "1",
                "-W",
                "2",
                &pair.addrs.v4[0].to_string(),
            ]))
            .unwrap();
            assert!(out.status.success());
        }
        let list = ip(&["netns", "list"]).unwrap();
        assert!(
            !String::from_utf8_lossy(&list.stdout).contains(&name),
            "namespace {name} left behind"
        );
    }
}
