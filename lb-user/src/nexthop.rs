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
    net::IpAddr,
    sync::{Arc, Mutex},
};

use futures_util::{StreamExt, TryStreamExt};
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
            // Any message counts, also NLMSG_OVERRUN (events were lost): re-resolve.
            while events.next().await.is_some() {
                notify(&subs);
            }
            log::warn!("netlink event socket closed: next hops are no longer watched");
            // Dropping the senders ends every subscriber's stream.
            subs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(Resolver {
            handle,
            subscribers,
            tasks: [conn_task, events_conn_task, events_task],
        })
    }

    /// A channel that receives `()` after any route, neighbour, link, address or rule
    /// change in the namespace: re-resolve the backends then. Notifications coalesce
    /// (capacity 1): one pending `()` stands for any number of events. `None` from
    /// `recv` means the event socket failed; make a new resolver.
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
            Ok(None) => return Err(NextHopError::NoRoute { backend, source: None }),
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
                })
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
        while let Some(msg) = stream.try_next().await.map_err(|source| NextHopError::Netlink {
            request: "RTM_GETADDR",
            source,
        })? {
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
    async fn neigh_get(&self, ifindex: u32, via: IpAddr) -> Result<Option<NeighInfo>, NextHopError> {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(neigh_message(
            ifindex, via,
        )));
        req.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        let mut replies = handle.request(req).map_err(|source| NextHopError::Netlink {
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
                log::debug!("managed neighbour refused ({e}); sending NTF_USE only");
                request(false).await.map_err(|source| NextHopError::Netlink {
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

/// The errno values this module tells apart (Linux, all architectures it runs on).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ENETUNREACH: i32 = 101;
    pub const EHOSTUNREACH: i32 = 113;
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
                NeighbourAttribute::ExtFlags(f) => info.managed = f.contains(NeighbourExtFlags::Managed),
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

#[cfg(test)]
mod tests;
