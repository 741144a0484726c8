//! What the DSR path needs from the host on the load balancer's interface, set by the
//! daemon at start-up and reported so it can log each change.
//!
//! Everything here acts on the network namespace of the calling thread: /proc/sys/net
//! is per namespace (resolved for the task that opens the file, so it is right under
//! `nsenter --net=...`), and the interface index and address calls go through
//! sockets / netlink (glibc's getifaddrs), never /sys/class/net, which shows the
//! namespace sysfs was mounted from.
//!
//! The sysctls, each checked on this kernel (6.18) by sending the load balancer a frame
//! whose outer source is its own address, which is what the stack sees after the XDP
//! program passes an encapsulated packet whose next hop is not resolved yet:
//! - `net.ipv4.conf.IF.forwarding = 1`: the kernel checks forwarding on the *input*
//!   interface only (in the stack and in `bpf_fib_lookup`, which otherwise returns
//!   FWD_DISABLED); `conf.all.forwarding` stays 0 and the frame is still forwarded,
//!   so the host's other interfaces do not start routing.
//! - `net.ipv4.conf.IF.accept_local = 1`: else the frame is a martian and dropped
//!   silently (its source is a local address).
//! - `send_redirects = 0` on IF *and* `all` (the kernel uses their OR): else an ICMP
//!   redirect per forwarded packet, since it leaves by the interface it came in by.
//! - `rp_filter`: strict (1, the effective value is the max of IF and `all`) drops the
//!   frame when the backend is reached through another interface than the load
//!   balancer's (the outer source is then that interface's address); loose (2) and
//!   off (0) pass. So strict is relaxed to loose on IF only; 0 and 2 are left alone.
//!
//! And for IPv6, when the interface has an IPv6 configuration (not booted with IPv6 off):
//! - `net.ipv6.conf.IF.forwarding = 1`: `bpf_fib_lookup` checks it on the input
//!   interface and otherwise refuses every IPv6 lookup (the packet is dropped as
//!   `no_route`). Forwarding turns router advertisement handling off unless `accept_ra`
//!   is 2, so `accept_ra` 1 (the host took RAs) becomes 2 first; 0 and 2 are left alone.
//! - `net.ipv6.conf.IF.force_forwarding = 1` where the kernel has it (Linux >= 6.17):
//!   the stack's own IPv6 forwarding, which the unresolved-neighbour path passes the
//!   packet to, checks `all.forwarding` or this, never the interface's `forwarding`.
//!   IPv6 has no martian check on a local source, so no `accept_local` counterpart.

use std::{
    fmt, fs,
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use nix::errno::Errno;

/// One sysctl the daemon changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// In sysctl(8) notation, e.g. `net.ipv4.conf.veth0.accept_local`.
    pub key: String,
    pub from: String,
    pub to: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.key, self.from, self.to)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("interface {iface} not found")]
    InterfaceNotFound { iface: String },
    #[error("invalid interface name {iface:?}")]
    InvalidName { iface: String },
    #[error("failed to read sysctl {key}")]
    ReadSysctl {
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to set sysctl {key} to {value}")]
    WriteSysctl {
        key: String,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("sysctl {key} reads {now} after being set to {value}")]
    NotApplied {
        key: String,
        value: String,
        now: String,
    },
    #[error("failed to look up interface {iface}")]
    Ifindex {
        iface: String,
        #[source]
        source: Errno,
    },
    #[error("failed to list the addresses of interface {iface}")]
    Addrs {
        iface: String,
        #[source]
        source: Errno,
    },
}

/// Sets the sysctls the DSR path needs on `iface` (see the module docs), writing only
/// what differs, and returns what it changed, in order. Idempotent: a second call
/// returns no changes.
pub fn ensure_dsr_sysctls(iface: &str) -> Result<Vec<Change>, HostError> {
    ensure_dsr_sysctls_in(Path::new("/proc/sys"), iface)
}

/// [`ensure_dsr_sysctls`] against a sysctl tree rooted at `root` (tests use a copy).
fn ensure_dsr_sysctls_in(root: &Path, iface: &str) -> Result<Vec<Change>, HostError> {
    check_name(iface)?;
    let sys = Sysctl { root };
    if !sys.path(&conf_key(iface, "")).is_dir() {
        return Err(HostError::InterfaceNotFound {
            iface: iface.to_owned(),
        });
    }
    let mut changes = Vec::new();
    for (leaf, value) in [
        ("forwarding", "1"),
        ("accept_local", "1"),
        ("send_redirects", "0"),
    ] {
        changes.extend(sys.ensure(&conf_key(iface, leaf), value)?);
    }
    changes.extend(sys.ensure(&conf_key("all", "send_redirects"), "0")?);
    let rp_all = sys.read(&conf_key("all", "rp_filter"))?;
    let rp_if = sys.read(&conf_key(iface, "rp_filter"))?;
    if effective_rp_filter(&rp_all, &rp_if) == Some(1) {
        changes.extend(sys.ensure(&conf_key(iface, "rp_filter"), "2")?);
    }
    if sys.path(&conf6_key(iface, "")).is_dir() {
        let accept_ra = conf6_key(iface, "accept_ra");
        if sys.read(&accept_ra)? == "1" {
            changes.extend(sys.ensure(&accept_ra, "2")?);
        }
        changes.extend(sys.ensure(&conf6_key(iface, "forwarding"), "1")?);
        let force = conf6_key(iface, "force_forwarding");
        if sys.path(&force).exists() {
            changes.extend(sys.ensure(&force, "1")?);
        }
    }
    Ok(changes)
}

/// The rp_filter mode the kernel applies: the max of `all` and the interface's.
fn effective_rp_filter(all: &str, iface: &str) -> Option<u8> {
    let all: u8 = all.parse().ok()?;
    let iface: u8 = iface.parse().ok()?;
    Some(all.max(iface))
}

/// The interface's index in the calling thread's network namespace.
pub fn ifindex(iface: &str) -> Result<u32, HostError> {
    check_name(iface)?;
    match nix::net::if_::if_nametoindex(iface) {
        Ok(i) => Ok(i),
        Err(Errno::ENODEV) => Err(HostError::InterfaceNotFound {
            iface: iface.to_owned(),
        }),
        Err(source) => Err(HostError::Ifindex {
            iface: iface.to_owned(),
            source,
        }),
    }
}

/// The IPv4 and IPv6 addresses on the interface (with those on its `IF:label`
/// aliases), in the kernel's order, without duplicates.
pub fn interface_addrs(iface: &str) -> Result<Vec<IpAddr>, HostError> {
    ifindex(iface)?;
    let addrs = nix::ifaddrs::getifaddrs().map_err(|source| HostError::Addrs {
        iface: iface.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for ifa in addrs {
        if !is_same_interface(&ifa.interface_name, iface) {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// getifaddrs names an IPv4 address by its label, `eth0:1` for an alias of `eth0`.
fn is_same_interface(name: &str, iface: &str) -> bool {
    name == iface
        || name
            .strip_prefix(iface)
            .is_some_and(|rest| rest.starts_with(':'))
}

/// Interface names the kernel accepts (dev_valid_name): 1..=15 bytes, no '/', ':' or
/// whitespace, not "." or "..". Also keeps the sysctl paths inside conf/.
fn check_name(iface: &str) -> Result<(), HostError> {
    let ok = !iface.is_empty()
        && iface.len() < 16
        && iface != "."
        && iface != ".."
        && !iface
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(HostError::InvalidName {
            iface: iface.to_owned(),
        })
    }
}

/// `net.ipv4.conf.IF.LEAF` in sysctl(8) notation, where a '.' in an interface name
/// (VLANs: `eth0.100`) is written '/'. An empty leaf names the directory.
fn conf_key(iface: &str, leaf: &str) -> String {
    let iface = iface.replace('.', "/");
    if leaf.is_empty() {
        format!("net.ipv4.conf.{iface}")
    } else {
        format!("net.ipv4.conf.{iface}.{leaf}")
    }
}

/// `net.ipv6.conf.IF.LEAF`, written like [`conf_key`].
fn conf6_key(iface: &str, leaf: &str) -> String {
    conf_key(iface, leaf).replacen("net.ipv4.", "net.ipv6.", 1)
}

struct Sysctl<'a> {
    root: &'a Path,
}

impl Sysctl<'_> {
    /// The file of a sysctl(8) key: '.' separates, '/' stands for a '.' in a name.
    fn path(&self, key: &str) -> PathBuf {
        let mut p = self.root.to_path_buf();
        for part in key.split('.') {
            p.push(part.replace('/', "."));
        }
        p
    }

    fn read(&self, key: &str) -> Result<String, HostError> {
        fs::read_to_string(self.path(key))
            .map(|s| s.trim().to_owned())
            .map_err(|source| HostError::ReadSysctl {
                key: key.to_owned(),
                source,
            })
    }

    fn write(&self, key: &str, value: &str) -> Result<(), HostError> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.path(key))
            .and_then(|mut f| f.write_all(format!("{value}\n").as_bytes()))
            .map_err(|source| HostError::WriteSysctl {
                key: key.to_owned(),
                value: value.to_owned(),
                source,
            })
    }

    /// Sets `key` to `value` unless it has it; checks the kernel took it.
    fn ensure(&self, key: &str, value: &str) -> Result<Option<Change>, HostError> {
        let from = self.read(key)?;
        if from == value {
            return Ok(None);
        }
        self.write(key, value)?;
        let now = self.read(key)?;
        if now != value {
            return Err(HostError::NotApplied {
                key: key.to_owned(),
                value: value.to_owned(),
                now,
            });
        }
        Ok(Some(Change {
            key: key.to_owned(),
            from,
            to: value.to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::nexthop::testlab::*;

    /// A fake /proc/sys tree in a temporary directory, removed on drop.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(ifaces: &[(&str, [&str; 4])]) -> FakeProc {
            static N: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "mqlb-host-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let fake = FakeProc(root);
            for (name, values) in ifaces {
                let dir = fake.0.join("net/ipv4/conf").join(name);
                fs::create_dir_all(&dir).unwrap();
                for (leaf, v) in ["forwarding", "accept_local", "send_redirects", "rp_filter"]
                    .iter()
                    .zip(values)
                {
                    fs::write(dir.join(leaf), format!("{v}\n")).unwrap();
                }
            }
            fake
        }

        /// Adds an IPv6 tree: (name, [forwarding, accept_ra, force_forwarding]);
        /// an empty value leaves the file out (an older kernel).
        fn with_v6(self, ifaces: &[(&str, [&str; 3])]) -> FakeProc {
            for (name, values) in ifaces {
                let dir = self.0.join("net/ipv6/conf").join(name);
                fs::create_dir_all(&dir).unwrap();
                for (leaf, v) in ["forwarding", "accept_ra", "force_forwarding"]
                    .iter()
                    .zip(values)
                {
                    if !v.is_empty() {
                        fs::write(dir.join(leaf), format!("{v}\n")).unwrap();
                    }
                }
            }
            self
        }

        fn get6(&self, iface: &str, leaf: &str) -> String {
            fs::read_to_string(self.0.join("net/ipv6/conf").join(iface).join(leaf))
                .unwrap()
                .trim()
                .to_owned()
        }

        fn get(&self, iface: &str, leaf: &str) -> String {
            fs::read_to_string(self.0.join("net/ipv4/conf").join(iface).join(leaf))
                .unwrap()
                .trim()
                .to_owned()
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn keys(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn sysctls_from_kernel_defaults_then_idempotent() {
        // forwarding, accept_local, send_redirects, rp_filter
        let fake = FakeProc::new(&[
            ("all", ["0", "0", "1", "0"]),
            ("veth0", ["0", "0", "1", "0"]),
        ]);
        let changes = ensure_dsr_sysctls_in(&fake.0, "veth0").unwrap();
        assert_eq!(
            keys(&changes),
            [
                "net.ipv4.conf.veth0.forwarding 0 -> 1",
                "net.ipv4.conf.veth0.accept_local 0 -> 1",
                "net.ipv4.conf.veth0.send_redirects 1 -> 0",
                "net.ipv4.conf.all.send_redirects 1 -> 0",
            ]
        );
        assert_eq!(
            fake.get("all", "forwarding"),
            "0",
            "only the interface forwards"
        );
        assert_eq!(fake.get("veth0", "accept_local"), "1");
        assert!(ensure_dsr_sysctls_in(&fake.0, "veth0").unwrap().is_empty());
    }

    #[test]
    fn ipv6_forwarding_keeps_router_advertisements() {
        let v4_done = [
            ("all", ["0", "0", "0", "0"]),
            ("veth0", ["1", "1", "0", "0"]),
        ];
        // forwarding, accept_ra, force_forwarding ("" = the kernel has none)
        for (ra, force, want) in [
            (
                "1",
                "0",
                &[
                    "net.ipv6.conf.veth0.accept_ra 1 -> 2",
                    "net.ipv6.conf.veth0.forwarding 0 -> 1",
                    "net.ipv6.conf.veth0.force_forwarding 0 -> 1",
                ][..],
            ),
            ("0", "", &["net.ipv6.conf.veth0.forwarding 0 -> 1"][..]),
            ("2", "1", &["net.ipv6.conf.veth0.forwarding 0 -> 1"][..]),
        ] {
            let fake = FakeProc::new(&v4_done)
                .with_v6(&[("all", ["0", "1", ""]), ("veth0", ["0", ra, force])]);
            let changes = ensure_dsr_sysctls_in(&fake.0, "veth0").unwrap();
            assert_eq!(keys(&changes), want, "accept_ra {ra}");
            assert_eq!(
                fake.get6("all", "forwarding"),
                "0",
                "only the interface forwards"
            );
            assert!(ensure_dsr_sysctls_in(&fake.0, "veth0").unwrap().is_empty());
        }
        // IPv6 off at boot: no tree, nothing to do, no error.
        let fake = FakeProc::new(&v4_done);
        assert!(ensure_dsr_sysctls_in(&fake.0, "veth0").unwrap().is_empty());
    }

    #[test]
    fn strict_rp_filter_becomes_loose_on_the_interface_only() {
        for (all, ifc, want) in [
            ("1", "0", Some("2")),
            ("0", "1", Some("2")),
            ("2", "0", None),
            ("0", "2", None),
            ("1", "2", None),
        ] {
            let fake = FakeProc::new(&[
                ("all", ["0", "0", "0", all]),
                ("eth1", ["1", "1", "0", ifc]),
            ]);
            let changes = ensure_dsr_sysctls_in(&fake.0, "eth1").unwrap();
            match want {
                Some(v) => assert_eq!(
                    keys(&changes),
                    [format!("net.ipv4.conf.eth1.rp_filter {ifc} -> {v}")]
                ),
                None => assert!(changes.is_empty(), "{all}/{ifc}: {changes:?}"),
            }
            assert_eq!(fake.get("all", "rp_filter"), all);
        }
    }

    #[test]
    fn vlan_names_and_bad_names() {
        let fake = FakeProc::new(&[
            ("all", ["0", "0", "0", "0"]),
            ("eth0.100", ["1", "0", "0", "0"]),
        ]);
        let changes = ensure_dsr_sysctls_in(&fake.0, "eth0.100").unwrap();
        assert_eq!(
            keys(&changes),
            ["net.ipv4.conf.eth0/100.accept_local 0 -> 1"]
        );
        assert_eq!(fake.get("eth0.100", "accept_local"), "1");

        let err = ensure_dsr_sysctls_in(&fake.0, "nope0").unwrap_err();
        assert_eq!(err.to_string(), "interface nope0 not found");
        for bad in [
            "",
            ".",
            "..",
            "../all",
            "a/b",
            "eth0:1",
            "0123456789abcdef",
            "a b",
        ] {
            let err = ensure_dsr_sysctls_in(&fake.0, bad).unwrap_err();
            assert!(
                matches!(err, HostError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(matches!(
            ifindex("../x"),
            Err(HostError::InvalidName { .. })
        ));
    }

    #[test]
    fn alias_labels() {
        assert!(is_same_interface("eth0", "eth0"));
        assert!(is_same_interface("eth0:1", "eth0"));
        assert!(!is_same_interface("eth01", "eth0"));
        assert!(!is_same_interface("eth", "eth0"));
    }

    #[test]
    fn missing_interface() {
        let err = ifindex("mqnhnope0").unwrap_err();
        assert_eq!(err.to_string(), "interface mqnhnope0 not found");
        assert!(matches!(
            interface_addrs("mqnhnope0"),
            Err(HostError::InterfaceNotFound { .. })
        ));
    }

    #[test]
    fn sysctls_ifindex_and_addrs_in_namespace() {
        if !require_root("sysctls_ifindex_and_addrs_in_namespace") {
            return;
        }
        let lab = Lab::new();
        let expected_index: u32 = ip(&["-n", &lab.a, "-o", "link", "show", "dev", &lab.va])
            .split(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let va = lab.va.clone();
        let (first, second, all_rp, index, addrs) = in_ns(&lab.a, move || {
            // A known start (a new namespace copies some of these from the root one),
            // with strict rp_filter on `all`, to see it relaxed on va only.
            for (ifc, leaf, v) in [
                (va.as_str(), "forwarding", "0"),
                (va.as_str(), "accept_local", "0"),
                (va.as_str(), "send_redirects", "1"),
                ("all", "send_redirects", "1"),
                (va.as_str(), "rp_filter", "0"),
                ("all", "rp_filter", "1"),
            ] {
                fs::write(format!("/proc/sys/net/ipv4/conf/{ifc}/{leaf}"), v).unwrap();
            }
            for (leaf, v) in [
                ("forwarding", "0"),
                ("accept_ra", "1"),
                ("force_forwarding", "0"),
            ] {
                fs::write(format!("/proc/sys/net/ipv6/conf/{va}/{leaf}"), v).unwrap();
            }
            let first = ensure_dsr_sysctls(&va).expect("first");
            let second = ensure_dsr_sysctls(&va).expect("second");
            let all_rp = fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap();
            (
                first,
                second,
                all_rp,
                ifindex(&va).unwrap(),
                interface_addrs(&va).unwrap(),
            )
        });
        let va = &lab.va;
        assert_eq!(
            keys(&first),
            [
                format!("net.ipv4.conf.{va}.forwarding 0 -> 1"),
                format!("net.ipv4.conf.{va}.accept_local 0 -> 1"),
                format!("net.ipv4.conf.{va}.send_redirects 1 -> 0"),
                "net.ipv4.conf.all.send_redirects 1 -> 0".to_owned(),
                format!("net.ipv4.conf.{va}.rp_filter 0 -> 2"),
                format!("net.ipv6.conf.{va}.accept_ra 1 -> 2"),
                format!("net.ipv6.conf.{va}.forwarding 0 -> 1"),
                format!("net.ipv6.conf.{va}.force_forwarding 0 -> 1"),
            ]
        );
        assert!(second.is_empty(), "{second:?}");
        assert_eq!(all_rp.trim(), "1");
        // The root namespace was not touched (it has no such interface at all).
        assert!(!Path::new("/proc/sys/net/ipv4/conf").join(va).exists());
        assert_eq!(index, expected_index);
        assert!(addrs.contains(&A4.parse().unwrap()), "{addrs:?}");
        assert!(addrs.contains(&A6.parse().unwrap()), "{addrs:?}");
    }
}
