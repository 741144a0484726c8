//! The next hop of each backend, from the kernel's FIB and neighbour table.
//!
//! The XDP program encapsulates a client packet in IPIP and transmits it itself, so
//! per backend it needs what the kernel would have used: the egress interface (index,
//! MTU, MAC), the MAC of the next hop (the backend itself when on-link, else the
//! gateway) and the source address of the outer header. [`Resolver::resolve`] asks the
//! kernel the way `ip route get`, `ip link show` and `ip neigh get` do, over rtnetlink
//! sockets opened in the network namespace of the thread that called
//! [`Resolver::new`] (so it is right under `nsenter --net=...`, unlike /sys/class/net,
//! which shows the namespace sysfs was mounted from).
//!
//! Neighbours are kept resolved and fresh by the kernel itself: `resolve` marks the
//! next hop's neighbour entry *managed* (`ip neigh replace ADDR dev IF managed`,
//! NTF_EXT_MANAGED, Linux >= 5.16) and sends NTF_USE. The kernel then sends ARP / ND
//! at once if the entry is missing or failed, and from then on re-probes it before it
//! would go STALE, so a backend whose MAC changes is noticed by the kernel, and
//! reported through [`Resolver::subscribe`], without any traffic from the stack (XDP
//! traffic never refreshes an entry). Measured here: a managed entry cycles
//! REACHABLE -> DELAY -> REACHABLE every ~20 s, and an entry with a wrong MAC went
//! DELAY -> PROBE -> FAILED -> REACHABLE (right MAC) within 6 s. If the kernel
//! refuses the managed flag, plain NTF_USE (one resolution) is sent instead. Call
//! [`Resolver::release`] when no backend uses a next hop any more, or the kernel
//! keeps probing it.
//!
//! The crates: rtnetlink 0.24 (with its re-exported netlink-packet-route 0.34) does the
//! socket, the request/response matching and the message types. Two requests are
//! built by hand below because rtnetlink has no call for them: a single-entry
//! neighbour GET (rtnetlink only dumps the whole table) and the managed flag on
//! RTM_NEWNEIGH (an attribute pushed into its add request).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use futures_util::{StreamExt, TryStreamExt};
use nix::libc as libc_errno;
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST},
    packet_route::{
        address::{AddressAttribute, AddressScope},
        link::{LinkAttribute, LinkLayerType, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags,
            NeighbourMessage, NeighbourState,
        },
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType, RouteVia},
        AddressFamily, RouteNetlinkMessage,
    },
    Handle, MulticastGroup,
};
use tokio::{sync::mpsc, task::JoinHandle};

/// Where the XDP program sends packets for one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    /// MTU of the egress path: the interface's, or the route's if that is lower.
    pub mtu: u16,
    /// MAC of the egress interface: the outer Ethernet source.
    pub src_mac: [u8; 6],
    /// MAC of `via`: the outer Ethernet destination. `None` while the kernel resolves
    /// it (the program then passes the packet to the stack, which resolves it too).
    pub dst_mac: Option<[u8; 6]>,
    /// Source address of the outer IP header: the route's preferred source.
    pub outer_src: IpAddr,
    /// The neighbour whose MAC is `dst_mac`: the gateway, or the backend itself.
    pub via: IpAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum NextHopError {
    #[error("failed to open a netlink route socket")]
    Socket {
        #[source]
        source: std::io::Error,
    },
    #[error("netlink {request} request failed")]
    Netlink {
        request: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no route to backend {backend}")]
    NoRoute {
        backend: IpAddr,
        #[source]
        source: Option<rtnetlink::Error>,
    },
    #[error("backend {backend} is an address of this host")]
    LocalAddress { backend: IpAddr },
    #[error("route to backend {backend} is of type {kind:?}, not unicast")]
    NotUnicast { backend: IpAddr, kind: RouteType },
    #[error("route to backend {backend} has no output interface")]
    NoOutputInterface { backend: IpAddr },
    #[error("egress interface index {ifindex} not found")]
    LinkNotFound { ifindex: u32 },
    #[error("egress interface {name} (index {ifindex}) of backend {backend} is not an ethernet interface")]
    NotEthernet {
        backend: IpAddr,
        ifindex: u32,
        name: String,
    },
    #[error("no source address for backend {backend} on interface index {ifindex}")]
    NoSourceAddress { backend: IpAddr, ifindex: u32 },
}

/// Netlink groups whose events can change a next hop: neighbours, links, addresses
/// (preferred source), routes, rules (policy routing) and nexthop objects.
const EVENT_GROUPS: &[MulticastGroup] = &[
    MulticastGroup::Link,
    MulticastGroup::Neigh,
    MulticastGroup::Ipv4Ifaddr,
    MulticastGroup::Ipv4Route,
    MulticastGroup::Ipv4Rule,
    MulticastGroup::Ipv6Ifaddr,
    MulticastGroup::Ipv6Route,
    MulticastGroup::Ipv6Rule,
    MulticastGroup::Nexthop,
];

type Subscribers = Arc<Mutex<Vec<mpsc::Sender<()>>>>;

/// Resolves backends' next hops and reports when they may have changed.
///
/// Owns two rtnetlink sockets (requests, events) in the network namespace current
/// when [`Resolver::new`] ran; their tasks stop when the resolver is dropped.
pub struct Resolver {
    handle: Handle,
    subscribers: Subscribers,
    tasks: [JoinHandle<()>; 3],
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Resolver {
    /// Opens the sockets. Must run inside a tokio runtime.
    pub async fn new() -> Result<Resolver, NextHopError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| NextHopError::Socket { source })?;
        let (events_conn, _events_handle, mut events) =
            rtnetlink::new_multicast_connection(EVENT_GROUPS)
                .map_err(|source| NextHopError::Socket { source })?;
        let conn_task = tokio::spawn(conn);
        let events_conn_task = tokio::spawn(events_conn);
        let subscribers: Subscribers = Arc::default();
        let subs = subscribers.clone();
        let events_task = tokio::spawn(async move {
            let mut filter = EventFilter::default();
            while let Some((msg, _)) = events.next().await {
                if filter.relevant(&msg.payload) {
                    notify(&subs);
                }
            }
            tracing::warn!("netlink event socket closed: next hops are no longer watched");
            // Dropping the senders ends every subscriber's stream.
            subs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(Resolver {
            handle,
            subscribers,
            tasks: [conn_task, events_conn_task, events_task],
        })
    }

    /// A channel that receives `()` after any route, link, address, rule or nexthop
    /// change in the namespace, and when a neighbour's usable MAC appears, changes or
    /// goes (not on the managed entries' refresh cycle): re-resolve the backends then.
    /// Notifications coalesce (capacity 1): one pending `()` stands for any number of
    /// events. `None` from `recv` means the event socket failed; make a new resolver.
    pub fn subscribe(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// The next hop the kernel would use for `backend`, and a request to the kernel to
    /// (re)resolve and keep fresh its neighbour entry (see the module docs). `dst_mac`
    /// is `Some` only when the entry is REACHABLE, DELAY, PROBE, PERMANENT or NOARP;
    /// a missing, INCOMPLETE, FAILED or STALE entry gives `None` and the kernel
    /// resolves it, which the subscription reports.
    pub async fn resolve(&self, backend: IpAddr) -> Result<NextHop, NextHopError> {
        let route = self.route_get(backend).await?;
        let ifindex = route.oif;
        let link = self.link_get(ifindex).await?;
        let Some(src_mac) = link.mac else {
            return Err(NextHopError::NotEthernet {
                backend,
                ifindex,
                name: link.name,
            });
        };
        let mtu = match route.mtu {
            Some(route_mtu) if route_mtu > 0 => route_mtu.min(link.mtu),
            _ => link.mtu,
        };
        let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        let outer_src = match route.prefsrc {
            Some(src) => src,
            None => self
                .first_address(ifindex, backend.is_ipv4())
                .await?
                .ok_or(NextHopError::NoSourceAddress { backend, ifindex })?,
        };
        let via = route.gateway.unwrap_or(backend);
        let neigh = self.neigh_get(ifindex, via).await?;
        let dst_mac = neigh.as_ref().and_then(usable_mac);
        if needs_kick(neigh.as_ref()) {
            self.neigh_kick(ifindex, via).await?;
        }
        Ok(NextHop {
            ifindex,
            mtu,
            src_mac,
            dst_mac,
            outer_src,
            via,
        })
    }

    /// Stops the kernel keeping `via` (on `ifindex`) resolved: call when no backend
    /// uses that next hop any more. Removes the entry only if it is managed (an entry
    /// someone made permanent is left alone); the stack re-creates it on demand.
    pub async fn release(&self, ifindex: u32, via: IpAddr) -> Result<(), NextHopError> {
        let Some(neigh) = self.neigh_get(ifindex, via).await? else {
            return Ok(());
        };
        if !neigh.managed || neigh.state == NeighbourState::Permanent {
            return Ok(());
        }
        let msg = neigh_message(ifindex, via);
        match self.handle.neighbours().del(msg).execute().await {
            Err(e) if errno(&e) == Some(libc_errno::ENOENT) => Ok(()),
            r => r.map_err(|source| NextHopError::Netlink {
                request: "RTM_DELNEIGH",
                source,
            }),
        }
    }

    async fn route_get(&self, backend: IpAddr) -> Result<RouteInfo, NextHopError> {
        let mut msg = RouteMessage::default();
        let (family, len, dst) = match backend {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(dst));
        let reply = self.handle.route().get(msg).execute().try_next().await;
        let reply = match reply {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(NextHopError::NoRoute {
                    backend,
                    source: None,
                })
            }
            Err(e) => {
                return Err(match errno(&e) {
                    // ip route get: no route, unreachable / prohibit / blackhole routes.
                    Some(
                        libc_errno::ENETUNREACH
                        | libc_errno::EHOSTUNREACH
                        | libc_errno::EACCES
                        | libc_errno::EINVAL,
                    ) => NextHopError::NoRoute {
                        backend,
                        source: Some(e),
                    },
                    _ => NextHopError::Netlink {
                        request: "RTM_GETROUTE",
                        source: e,
                    },
                });
            }
        };
        RouteInfo::from_message(backend, &reply)
    }

    async fn link_get(&self, ifindex: u32) -> Result<LinkInfo, NextHopError> {
        let reply = self
            .handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_next()
            .await;
        match reply {
            Ok(Some(m)) => Ok(LinkInfo::from_message(&m)),
            Ok(None) => Err(NextHopError::LinkNotFound { ifindex }),
            Err(e) if errno(&e) == Some(libc_errno::ENODEV) => {
                Err(NextHopError::LinkNotFound { ifindex })
            }
            Err(source) => Err(NextHopError::Netlink {
                request: "RTM_GETLINK",
                source,
            }),
        }
    }

    /// First address of the family on the interface, global scope preferred: the
    /// source when a route reply carries no RTA_PREFSRC.
    async fn first_address(&self, ifindex: u32, v4: bool) -> Result<Option<IpAddr>, NextHopError> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute();
        let mut best: Option<(bool, IpAddr)> = None;
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|source| NextHopError::Netlink {
                request: "RTM_GETADDR",
                source,
            })?
        {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = addr.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            let Some(addr) = addr.filter(|a| a.is_ipv4() == v4) else {
                continue;
            };
            let global = msg.header.scope == AddressScope::Universe;
            if best.is_none_or(|(g, _)| global && !g) {
                best = Some((global, addr));
            }
        }
        Ok(best.map(|(_, a)| a))
    }

    /// One neighbour entry (`ip neigh get ADDR dev IF`), `None` when there is none.
    // Hand-written: rtnetlink's NeighbourGetRequest always dumps the whole table.
    async fn neigh_get(
        &self,
        ifindex: u32,
        via: IpAddr,
    ) -> Result<Option<NeighInfo>, NextHopError> {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(neigh_message(
            ifindex, via,
        )));
        req.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        let mut replies = handle
            .request(req)
            .map_err(|source| NextHopError::Netlink {
                request: "RTM_GETNEIGH",
                source,
            })?;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                    return Ok(Some(NeighInfo::from_message(&m)))
                }
                NetlinkPayload::Error(e) => {
                    let e = rtnetlink::Error::NetlinkError(e);
                    return match errno(&e) {
                        Some(libc_errno::ENOENT) => Ok(None),
                        _ => Err(NextHopError::Netlink {
                            request: "RTM_GETNEIGH",
                            source: e,
                        }),
                    };
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// `ip neigh replace VIA dev IF managed` plus NTF_USE: the kernel starts resolving
    /// now (ARP / neighbour solicitation) and keeps the entry fresh from then on.
    async fn neigh_kick(&self, ifindex: u32, via: IpAddr) -> Result<(), NextHopError> {
        let request = |managed: bool| {
            let mut req = self
                .handle
                .neighbours()
                .add(ifindex, via)
                .state(NeighbourState::None)
                .flags(NeighbourFlags::Use)
                .replace();
            if managed {
                // Hand-written: rtnetlink's add request has no setter for NDA_FLAGS_EXT.
                req.message_mut()
                    .attributes
                    .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            }
            req.execute()
        };
        match request(true).await {
            Ok(()) => Ok(()),
            // Kernels before 5.16 refuse NDA_FLAGS_EXT / managed: one resolution only.
            Err(e) if matches!(errno(&e), Some(libc_errno::EINVAL | libc_errno::EOPNOTSUPP)) => {
                tracing::debug!(error = %e, "managed neighbour refused; sending NTF_USE only");
                request(false)
                    .await
                    .map_err(|source| NextHopError::Netlink {
                        request: "RTM_NEWNEIGH",
                        source,
                    })
            }
            Err(source) => Err(NextHopError::Netlink {
                request: "RTM_NEWNEIGH",
                source,
            }),
        }
    }
}

/// Drops the neighbour events that change nothing `resolve` returns. A managed entry
/// goes REACHABLE -> DELAY -> PROBE -> REACHABLE every 20-50 s, with a notification
/// at PROBE and at REACHABLE, the MAC usable all along; without this filter every such
/// cycle of every neighbour would make the daemon re-resolve all its backends.
#[derive(Default)]
struct EventFilter {
    /// Last usable MAC (or `None`) seen per (ifindex, address).
    neighbours: HashMap<(u32, IpAddr), Option<[u8; 6]>>,
}

impl EventFilter {
    fn relevant(&mut self, payload: &NetlinkPayload<RouteNetlinkMessage>) -> bool {
        let (msg, new) = match payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => (m, true),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => (m, false),
            // Routes, links, addresses, rules, and NLMSG_OVERRUN (events were lost).
            _ => return true,
        };
        let Some(dst) = msg.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        }) else {
            return false; // bridge FDB entries and the like: not a next hop
        };
        let key = (msg.header.ifindex, dst);
        if !new {
            return self
                .neighbours
                .remove(&key)
                .is_some_and(|mac| mac.is_some());
        }
        let mac = usable_mac(&NeighInfo::from_message(msg));
        self.neighbours.insert(key, mac) != Some(mac)
    }
}

fn notify(subscribers: &Subscribers) {
    let mut subs = subscribers.lock().unwrap_or_else(|e| e.into_inner());
    // Full: a notification is already pending, which covers this event too.
    subs.retain(|tx| !matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(_))));
}

/// Positive errno of a netlink error reply.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn neigh_message(ifindex: u32, via: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.ifindex = ifindex;
    let (family, dst) = match via {
        IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(a)),
    };
    msg.header.family = family;
    msg.attributes.push(NeighbourAttribute::Destination(dst));
    msg
}

/// What `resolve` needs from an RTM_NEWROUTE reply to RTM_GETROUTE.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteInfo {
    oif: u32,
    gateway: Option<IpAddr>,
    prefsrc: Option<IpAddr>,
    mtu: Option<u32>,
}

impl RouteInfo {
    fn from_message(backend: IpAddr, msg: &RouteMessage) -> Result<RouteInfo, NextHopError> {
        match msg.header.kind {
            RouteType::Unicast => {}
            RouteType::Local => return Err(NextHopError::LocalAddress { backend }),
            kind => return Err(NextHopError::NotUnicast { backend, kind }),
        }
        let mut oif = None;
        let mut gateway = None;
        let mut prefsrc = None;
        let mut mtu = None;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(a) => gateway = route_addr(a),
                // RFC 5549: an IPv4 route with an IPv6 gateway.
                RouteAttribute::Via(RouteVia::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
                RouteAttribute::Via(RouteVia::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
                RouteAttribute::PrefSource(a) => prefsrc = route_addr(a),
                RouteAttribute::Metrics(metrics) => {
                    for m in metrics {
                        if let RouteMetric::Mtu(v) = m {
                            mtu = Some(*v);
                        }
                    }
                }
                _ => {}
            }
        }
        let oif = oif.ok_or(NextHopError::NoOutputInterface { backend })?;
        Ok(RouteInfo {
            oif,
            gateway,
            prefsrc,
            mtu,
        })
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkInfo {
    name: String,
    mtu: u32,
    /// The interface's MAC, `None` unless it is an Ethernet interface.
    mac: Option<[u8; 6]>,
}

impl LinkInfo {
    fn from_message(msg: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            name: format!("index {}", msg.header.index),
            mtu: 0,
            mac: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => info.name = n.clone(),
                LinkAttribute::Mtu(m) => info.mtu = *m,
                LinkAttribute::Address(a) if msg.header.link_layer_type == LinkLayerType::Ether => {
                    info.mac = <[u8; 6]>::try_from(a.as_slice()).ok()
                }
                _ => {}
            }
        }
        info
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NeighInfo {
    state: NeighbourState,
    mac: Option<[u8; 6]>,
    managed: bool,
}

impl NeighInfo {
    fn from_message(msg: &NeighbourMessage) -> NeighInfo {
        let mut info = NeighInfo {
            state: msg.header.state,
            mac: None,
            managed: false,
        };
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::LinkLayerAddress(a) => {
                    info.mac = <[u8; 6]>::try_from(a.as_slice()).ok()
                }
                NeighbourAttribute::ExtFlags(f) => {
                    info.managed = f.contains(NeighbourExtFlags::Managed)
                }
                _ => {}
            }
        }
        info
    }
}

/// The MAC the XDP program may use: only from an entry the kernel trusts now.
fn usable_mac(n: &NeighInfo) -> Option<[u8; 6]> {
    match n.state {
        NeighbourState::Reachable
        | NeighbourState::Delay
        | NeighbourState::Probe
        | NeighbourState::Permanent
        | NeighbourState::Noarp => n.mac,
        _ => None,
    }
}

/// Whether to send the managed + NTF_USE request: always, except for entries set by
/// hand (PERMANENT / NOARP) and managed entries that are already usable (the kernel
/// keeps those fresh; re-sending would be a no-op).
fn needs_kick(n: Option<&NeighInfo>) -> bool {
    match n {
        None => true,
        Some(n) if matches!(n.state, NeighbourState::Permanent | NeighbourState::Noarp) => false,
        Some(n) => !(n.managed && usable_mac(n).is_some()),
    }
}

/// `aa:bb:cc:dd:ee:ff`, for logs.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Network-namespace lab for the root-only tests of this module and of `host`.
#[cfg(test)]
pub(crate) mod testlab {
    use std::{
        process::Command,
        sync::atomic::{AtomicU32, Ordering},
    };

    /// True when the test may go on. Not root: a loud skip, or a failure under CI=true.
    pub(crate) fn require_root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test} needs root (network namespaces) and CI=true: not skipping");
        }
        eprintln!("!!!!! SKIPPED {test}: needs root (network namespaces) !!!!!");
        false
    }

    /// Runs `ip ARGS`, panicking with its stderr on failure; returns stdout.
    pub(crate) fn ip(args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Two namespaces `a` and `b` joined by a veth pair `va` - `vb`, with
    /// 10.231.0.1/24 and 2001:db8:231::1/64 on `va`, .2 and ::2 on `vb`.
    /// Deleted on drop, also when the test panics half-way through the setup.
    pub(crate) struct Lab {
        pub a: String,
        pub b: String,
        pub va: String,
        pub vb: String,
    }

    pub(crate) const A4: &str = "10.231.0.1";
    pub(crate) const B4: &str = "10.231.0.2";
    pub(crate) const A6: &str = "2001:db8:231::1";
    pub(crate) const B6: &str = "2001:db8:231::2";

    impl Lab {
        pub(crate) fn new() -> Lab {
            static N: AtomicU32 = AtomicU32::new(0);
            // "mqnh" + pid (<= 7 digits) + counter + a/b fits IFNAMSIZ (15).
            let base = format!(
                "mqnh{}x{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let lab = Lab {
                a: format!("{base}a"),
                b: format!("{base}b"),
                va: format!("{base}a"),
                vb: format!("{base}b"),
            };
            assert!(lab.va.len() <= 15, "interface name {} too long", lab.va);
            ip(&["netns", "add", &lab.a]);
            ip(&["netns", "add", &lab.b]);
            ip(&[
                "link", "add", &lab.va, "netns", &lab.a, "type", "veth", "peer", "name", &lab.vb,
                "netns", &lab.b,
            ]);
            for (ns, dev, v4, v6) in [(&lab.a, &lab.va, A4, A6), (&lab.b, &lab.vb, B4, B6)] {
                ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ]);
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            lab
        }

        /// The MAC of an interface in a namespace.
        pub(crate) fn mac(ns: &str, dev: &str) -> [u8; 6] {
            let out = ip(&["-n", ns, "-br", "link", "show", "dev", dev]);
            let text = out.split_whitespace().nth(2).expect("ip -br link output");
            let bytes: Vec<u8> = text
                .split(':')
                .map(|h| u8::from_str_radix(h, 16).expect("hex MAC"))
                .collect();
            bytes.try_into().expect("6-byte MAC")
        }

        /// A "ping" from namespace `a` that needs no ping binary: one UDP datagram to
        /// the discard port of `dst`, which makes the stack resolve `dst`; then waits
        /// (deadline 5 s) until the neighbour entry is REACHABLE.
        pub(crate) fn ping_from_a(&self, dst: &str) {
            let target: std::net::SocketAddr = format!("{dst}:9").parse().expect("address");
            in_ns(&self.a, move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.send_to(b"mqlb", target).expect("send");
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let shown = ip(&["-n", &self.a, "neigh", "show", dst, "dev", &self.va]);
                if shown.contains("REACHABLE") {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{dst} not reachable: {shown}"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    /// Runs `f` on a new thread that has joined the network namespace `ns`; a panic in
    /// `f` fails the calling test.
    pub(crate) fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // libc's setns: nix's needs its "sched" feature, which lb-user does not enable.
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on a file descriptor that `fd` keeps open.
            let rc = unsafe { nix::libc::setns(fd.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// [`in_ns`] with a current-thread tokio runtime on that thread.
    pub(crate) fn block_on_in_ns<T, F>(ns: &str, f: impl FnOnce() -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T>,
    {
        in_ns(ns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::Duration,
    };

    use rtnetlink::packet_route::{
        link::LinkHeader,
        neighbour::NeighbourHeader,
        route::{RouteHeader, RouteMessage},
    };
    use tokio::time::{timeout_at, Instant};

    use super::{testlab::*, *};

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn route(kind: RouteType, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header = RouteHeader {
            kind,
            ..RouteHeader::default()
        };
        m.attributes = attrs;
        m
    }

    #[test]
    fn route_reply_parsing() {
        let b = v4("10.9.0.5");
        let msg = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Oif(7),
                RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 9, 0, 1))),
                RouteAttribute::PrefSource(RouteAddress::Inet(Ipv4Addr::new(10, 9, 0, 2))),
                RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]),
            ],
        );
        assert_eq!(
            RouteInfo::from_message(b, &msg).unwrap(),
            RouteInfo {
                oif: 7,
                gateway: Some(v4("10.9.0.1")),
                prefsrc: Some(v4("10.9.0.2")),
                mtu: Some(1400)
            }
        );
        // On-link, IPv6 gateway of an IPv4 route (RTA_VIA).
        let msg = route(RouteType::Unicast, vec![RouteAttribute::Oif(3)]);
        let info = RouteInfo::from_message(b, &msg).unwrap();
        assert_eq!((info.gateway, info.prefsrc, info.mtu), (None, None, None));
        let gw6: std::net::Ipv6Addr = "fe80::1".parse().unwrap();
        let msg = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Oif(3),
                RouteAttribute::Via(RouteVia::Inet6(gw6)),
            ],
        );
        assert_eq!(
            RouteInfo::from_message(b, &msg).unwrap().gateway,
            Some(IpAddr::V6(gw6))
        );

        let err = RouteInfo::from_message(b, &route(RouteType::Local, vec![])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend 10.9.0.5 is an address of this host"
        );
        let err = RouteInfo::from_message(
            b,
            &route(RouteType::BlackHole, vec![RouteAttribute::Oif(1)]),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                NextHopError::NotUnicast {
                    kind: RouteType::BlackHole,
                    ..
                }
            ),
            "{err}"
        );
        let err = RouteInfo::from_message(b, &route(RouteType::Unicast, vec![])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "route to backend 10.9.0.5 has no output interface"
        );
    }

    #[test]
    fn link_reply_parsing() {
        let mut m = LinkMessage::default();
        m.header = LinkHeader {
            index: 4,
            link_layer_type: LinkLayerType::Ether,
            ..LinkHeader::default()
        };
        m.attributes = vec![
            LinkAttribute::IfName("veth0".into()),
            LinkAttribute::Mtu(9000),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
        ];
        let info = LinkInfo::from_message(&m);
        assert_eq!(
            (info.name.as_str(), info.mtu, info.mac),
            ("veth0", 9000, Some([2, 0, 0, 0, 0, 1]))
        );
        // Not Ethernet (e.g. a tun device or an IPIP tunnel): no MAC to use.
        m.header.link_layer_type = LinkLayerType::None;
        assert_eq!(LinkInfo::from_message(&m).mac, None);
    }

    fn neigh(state: NeighbourState, mac: Option<[u8; 6]>, managed: bool) -> NeighInfo {
        let mut m = NeighbourMessage::default();
        m.header = NeighbourHeader {
            state,
            ..NeighbourHeader::default()
        };
        if let Some(mac) = mac {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        if managed {
            m.attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        }
        let info = NeighInfo::from_message(&m);
        assert_eq!(
            info,
            NeighInfo {
                state,
                mac,
                managed
            }
        );
        info
    }

    #[test]
    fn neighbour_states() {
        use NeighbourState::*;
        let mac = Some([2, 0, 0, 0, 0, 9]);
        for s in [Reachable, Delay, Probe, Permanent, Noarp] {
            assert_eq!(usable_mac(&neigh(s, mac, false)), mac, "{s}");
        }
        for s in [Stale, Incomplete, Failed, None] {
            assert_eq!(usable_mac(&neigh(s, mac, false)), Option::None, "{s}");
        }
        assert_eq!(
            usable_mac(&neigh(Reachable, Option::None, true)),
            Option::None
        );

        // Kick: missing, unmanaged, or managed but not usable; never hand-set entries.
        assert!(needs_kick(Option::None));
        assert!(needs_kick(Some(&neigh(Reachable, mac, false))));
        assert!(needs_kick(Some(&neigh(Stale, mac, true))));
        assert!(needs_kick(Some(&neigh(Failed, Option::None, true))));
        assert!(!needs_kick(Some(&neigh(Reachable, mac, true))));
        assert!(!needs_kick(Some(&neigh(Delay, mac, true))));
        assert!(!needs_kick(Some(&neigh(Permanent, mac, false))));
        assert!(!needs_kick(Some(&neigh(Noarp, mac, false))));
    }

    #[test]
    fn notifications_coalesce_and_drop_closed_subscribers() {
        let subs: Subscribers = Arc::default();
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, rx2) = mpsc::channel(1);
        subs.lock().unwrap().extend([tx1, tx2]);
        drop(rx2);
        notify(&subs);
        notify(&subs);
        assert_eq!(subs.lock().unwrap().len(), 1);
        assert_eq!(rx1.try_recv(), Ok(()));
        assert!(rx1.try_recv().is_err(), "two events, one notification");
    }

    #[test]
    fn event_filter_passes_only_changes() {
        let msg = |state, mac: Option<[u8; 6]>, dst: &str| {
            let mut m = NeighbourMessage::default();
            m.header = NeighbourHeader {
                ifindex: 2,
                state,
                ..NeighbourHeader::default()
            };
            m.attributes
                .push(NeighbourAttribute::Destination(match v4(dst) {
                    IpAddr::V4(a) => NeighbourAddress::Inet(a),
                    IpAddr::V6(a) => NeighbourAddress::Inet6(a),
                }));
            if let Some(mac) = mac {
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
            }
            m
        };
        let new = |m| NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m));
        let del = |m| NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m));
        let (m1, m2) = (Some([2, 0, 0, 0, 0, 1]), Some([2, 0, 0, 0, 0, 2]));
        use NeighbourState::*;
        let mut f = EventFilter::default();
        let steps = [
            (new(msg(Incomplete, Option::None, "10.0.0.2")), true), // first sight
            (new(msg(Reachable, m1, "10.0.0.2")), true),            // resolved
            (new(msg(Probe, m1, "10.0.0.2")), false),               // the managed refresh cycle
            (new(msg(Reachable, m1, "10.0.0.2")), false),
            (new(msg(Reachable, m2, "10.0.0.2")), true), // the MAC changed
            (new(msg(Stale, m2, "10.0.0.2")), true),     // no longer usable
            (new(msg(Reachable, m1, "10.0.0.3")), true), // another neighbour
            (del(msg(Failed, Option::None, "10.0.0.2")), false), // removed while unusable
            (del(msg(Reachable, m1, "10.0.0.3")), true), // removed while in use
            (NetlinkPayload::Overrun(vec![]), true),
            (
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(RouteMessage::default()),
                ),
                true,
            ),
        ];
        for (i, (payload, want)) in steps.into_iter().enumerate() {
            assert_eq!(f.relevant(&payload), want, "step {i}");
        }
    }

    /// The daemon runs `resolve` and `release` in spawned tasks: their futures must be Send.
    #[allow(dead_code)]
    fn futures_are_send(r: &Resolver) {
        fn send<T: Send>(_: T) {}
        send(r.resolve(v4(B4)));
        send(r.release(1, v4(B4)));
        send(Resolver::new());
    }

    #[test]
    fn mac_format() {
        assert_eq!(
            format_mac(&[0x02, 0xab, 0, 1, 0x10, 0xff]),
            "02:ab:00:01:10:ff"
        );
    }

    /// Waits for notifications and re-resolves until the MAC is known.
    async fn resolve_until_mac(
        r: &Resolver,
        events: &mut mpsc::Receiver<()>,
        backend: IpAddr,
    ) -> NextHop {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let nh = r.resolve(backend).await.expect("resolve");
            if nh.dst_mac.is_some() {
                return nh;
            }
            match timeout_at(deadline, events.recv()).await {
                Ok(Some(())) => {}
                Ok(Option::None) => panic!("event stream closed"),
                Err(_) => panic!("{backend}: no MAC before the deadline, last {nh:?}"),
            }
        }
    }

    #[test]
    fn resolves_on_link_peer_in_namespace() {
        if !require_root("resolves_on_link_peer_in_namespace") {
            return;
        }
        let lab = Lab::new();
        lab.ping_from_a(B4);
        let (mac_a, mac_b) = (Lab::mac(&lab.a, &lab.va), Lab::mac(&lab.b, &lab.vb));
        let va = lab.va.clone();
        let (nh, ifindex) = block_on_in_ns(&lab.a, move || async move {
            let r = Resolver::new().await.expect("resolver");
            (
                r.resolve(v4(B4)).await.expect("resolve"),
                crate::host::ifindex(&va).unwrap(),
            )
        });
        assert_eq!(
            nh,
            NextHop {
                ifindex,
                mtu: 1500,
                src_mac: mac_a,
                dst_mac: Some(mac_b),
                outer_src: v4(A4),
                via: v4(B4),
            }
        );
        // The entry is now kept fresh by the kernel.
        let shown = ip(&["-n", &lab.a, "neigh", "show", B4, "dev", &lab.va]);
        assert!(shown.contains("managed"), "{shown}");
    }

    #[test]
    fn flushed_neighbour_is_resolved_again() {
        if !require_root("flushed_neighbour_is_resolved_again") {
            return;
        }
        let lab = Lab::new();
        lab.ping_from_a(B4);
        ip(&["-n", &lab.a, "neigh", "flush", "dev", &lab.va]);
        let shown = ip(&["-n", &lab.a, "neigh", "show", B4, "dev", &lab.va]);
        assert!(!shown.contains("REACHABLE"), "not flushed: {shown}");
        let mac_b = Lab::mac(&lab.b, &lab.vb);
        let (first, later) = block_on_in_ns(&lab.a, move || async move {
            let r = Resolver::new().await.expect("resolver");
            let mut events = r.subscribe();
            let first = r.resolve(v4(B4)).await.expect("resolve");
            (first, resolve_until_mac(&r, &mut events, v4(B4)).await)
        });
        assert_eq!(first.dst_mac, None, "{first:?}");
        assert_eq!(later.dst_mac, Some(mac_b));
        let shown = ip(&["-n", &lab.a, "neigh", "show", B4, "dev", &lab.va]);
        assert!(shown.contains("REACHABLE"), "{shown}");
    }

    #[test]
    fn gateway_route_mtu_ipv6_and_errors() {
        if !require_root("gateway_route_mtu_ipv6_and_errors") {
            return;
        }
        let lab = Lab::new();
        ip(&["-n", &lab.a, "route", "add", "10.232.0.0/24", "via", B4]);
        ip(&[
            "-n",
            &lab.a,
            "route",
            "add",
            "10.233.0.0/24",
            "via",
            B4,
            "mtu",
            "1400",
        ]);
        ip(&["-n", &lab.a, "route", "add", "unreachable", "10.234.0.0/24"]);
        let mac_b = Lab::mac(&lab.b, &lab.vb);
        let results = block_on_in_ns(&lab.a, move || async move {
            let r = Resolver::new().await.expect("resolver");
            let mut events = r.subscribe();
            let gw = resolve_until_mac(&r, &mut events, v4("10.232.0.5")).await;
            let mtu = r.resolve(v4("10.233.0.5")).await.expect("resolve").mtu;
            let v6 = resolve_until_mac(&r, &mut events, B6.parse().unwrap()).await;
            let errors = [
                r.resolve(v4(A4)).await.map(|_| ()).unwrap_err(),
                r.resolve(v4("192.0.2.1")).await.map(|_| ()).unwrap_err(),
                r.resolve(v4("10.234.0.1")).await.map(|_| ()).unwrap_err(),
            ];
            r.release(gw.ifindex, gw.via).await.expect("release");
            (gw, mtu, v6, errors)
        });
        let (gw, mtu, v6, errors) = results;
        assert_eq!(
            (gw.via, gw.dst_mac, gw.outer_src),
            (v4(B4), Some(mac_b), v4(A4))
        );
        assert_eq!(mtu, 1400);
        assert_eq!((v6.via, v6.dst_mac), (B6.parse().unwrap(), Some(mac_b)));
        assert_eq!(v6.outer_src, A6.parse::<IpAddr>().unwrap());
        let [local, none, unreachable] = errors;
        assert!(
            matches!(local, NextHopError::LocalAddress { .. }),
            "{local}"
        );
        assert_eq!(none.to_string(), "no route to backend 192.0.2.1");
        assert!(
            matches!(unreachable, NextHopError::NoRoute { .. }),
            "{unreachable}"
        );
        let shown = ip(&["-n", &lab.a, "neigh", "show", B4, "dev", &lab.va]);
        assert!(!shown.contains("managed"), "released: {shown}");
    }
}
