//! `mqlb flow`: which backend a client's flow goes to, asked of the loaded
//! program itself. The daemon builds the packet the client would send
//! ([`ProbeFlow::frame`]: IPv4 or IPv6, TCP or UDP), runs it through `mqlb`
//! with `BPF_PROG_TEST_RUN` on the live maps ([`probe`]), and names the
//! backend from the outer destination of the tunnel packet that comes out
//! ([`tunnel_outer_dst`]: 4-in-4, 6-in-4, 4-in-6 or 6-in-6).

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};

use lb_common::{
    packet::{
        csum_add, csum_fold, tunnel_inner_ethertype, Ipv4Repr, Ipv6Repr, ETH_LEN, ETH_P_IPV4,
        ETH_P_IPV6, IPV4_DF, IPV4_LEN, IPV6_LEN, OUTER_TTL,
    },
    Flow4, Flow6, PROTO_TCP,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    daemon::{error_chain, CoreError},
    dataplane::{CtKey, Dataplane},
    state::{Proto, State, StateError},
};

/// Source MAC of a probe frame (locally administered; never sent).
pub const PROBE_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of a probe frame.
pub const PROBE_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_ACK: u8 = 0x10;

/// Why the probe's flow got its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowReason {
    /// A live conntrack entry pins the flow.
    Conntrack,
    /// The Maglev table picked the backend (no usable conntrack entry).
    Table,
    /// The service has no backend in its table: the program drops the flow.
    NoBackend,
    /// The program let the packet pass without forwarding it (the service
    /// is not in its maps yet).
    NotMatched,
    /// Anything else (the verdict tells more).
    Unknown,
}

impl FlowReason {
    pub fn name(self) -> &'static str {
        match self {
            FlowReason::Conntrack => "conntrack",
            FlowReason::Table => "table",
            FlowReason::NoBackend => "no_backend",
            FlowReason::NotMatched => "not_matched",
            FlowReason::Unknown => "unknown",
        }
    }
}

/// `GET /v1/services/{name}/flow?client=IP:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    pub service: String,
    pub client: SocketAddr,
    /// The destination probed: the VIP's address and port (of a port-range
    /// service, the port asked for, else its lowest).
    pub vip: SocketAddr,
    pub proto: Proto,
    /// The outer destination of the tunnel packet the program sent: an
    /// IPv4 or IPv6 backend, whatever the VIP's family.
    pub backend: Option<IpAddr>,
    pub backend_id: Option<u32>,
    pub reason: FlowReason,
    /// The XDP verdict of the test run: `aborted`, `drop`, `pass`, `tx` or
    /// `redirect`. The test run's ingress is the loopback device, so a
    /// backend reached through the LB's own port shows `redirect`, not `tx`,
    /// and an IPv6 packet to a backend whose next hop is not cached yet
    /// shows `drop` (the FIB lookup on lo refuses it; `backend` is then the
    /// one conntrack names).
    pub verdict: String,
}

/// The name of an XDP return value.
pub fn verdict_name(action: u32) -> String {
    match action {
        0 => "aborted".into(),
        1 => "drop".into(),
        2 => "pass".into(),
        3 => "tx".into(),
        4 => "redirect".into(),
        n => format!("unknown ({n})"),
    }
}

/// A client address for a probe: `IPV4:PORT` or `[IPV6]:PORT`.
pub fn parse_client(input: &str) -> Result<SocketAddr, StateError> {
    let bad = |reason: &str| StateError::BadAddress {
        input: input.into(),
        reason: reason.into(),
    };
    match input.trim().parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        Ok(_) => Err(bad("the client port must not be 0")),
        Err(_) => Err(bad("expected IPV4:PORT or [IPV6]:PORT")),
    }
}

/// A destination port for a probe: 1-65535.
pub fn parse_port(input: &str) -> Result<u16, StateError> {
    match input.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(StateError::BadPort {
            input: input.into(),
        }),
    }
}

/// The `CT4` key of the flow from `client` to `vip`.
pub fn flow4(client: SocketAddrV4, vip: SocketAddrV4, proto: Proto) -> Flow4 {
    Flow4 {
        src: client.ip().octets(),
        dst: vip.ip().octets(),
        sport_be: client.port().to_be(),
        dport_be: vip.port().to_be(),
        proto: proto.number(),
        _pad: [0; 3],
    }
}

/// The `CT6` key of the flow from `client` to `vip`.
pub fn flow6(client: SocketAddrV6, vip: SocketAddrV6, proto: Proto) -> Flow6 {
    Flow6 {
        src: client.ip().octets(),
        dst: vip.ip().octets(),
        sport_be: client.port().to_be(),
        dport_be: vip.port().to_be(),
        proto: proto.number(),
        _pad: [0; 3],
    }
}

/// The flow a probe asks about: a client and a VIP of one address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeFlow {
    V4 {
        client: SocketAddrV4,
        vip: SocketAddrV4,
    },
    V6 {
        client: SocketAddrV6,
        vip: SocketAddrV6,
    },
}

impl ProbeFlow {
    /// `None` when `client` and `vip` are of different families: the
    /// program only sees a client's packets to a VIP of its own family.
    pub fn new(client: SocketAddr, vip: SocketAddr) -> Option<ProbeFlow> {
        match (client, vip) {
            (SocketAddr::V4(client), SocketAddr::V4(vip)) => Some(ProbeFlow::V4 { client, vip }),
            (SocketAddr::V6(client), SocketAddr::V6(vip)) => Some(ProbeFlow::V6 { client, vip }),
            _ => None,
        }
    }

    /// The flow's conntrack key (in `CT4` or `CT6`).
    pub fn ct_key(&self, proto: Proto) -> CtKey {
        match *self {
            ProbeFlow::V4 { client, vip } => CtKey::V4(flow4(client, vip, proto)),
            ProbeFlow::V6 { client, vip } => CtKey::V6(flow6(client, vip, proto)),
        }
    }

    /// The frame the client sends: Ethernet, an IPv4 header (DF, no
    /// options, valid checksum) or an IPv6 one (no extension headers), then
    /// a TCP ACK (not a SYN, so a conntrack entry is honoured) or an empty
    /// UDP datagram, with a valid transport checksum.
    pub fn frame(&self, proto: Proto) -> Vec<u8> {
        let l4_len = match proto {
            Proto::Tcp => TCP_HDR_LEN,
            Proto::Udp => UDP_HDR_LEN,
        };
        let (ethertype, ip, (sport, dport)) = match *self {
            ProbeFlow::V4 { client, vip } => {
                let ip = Ipv4Repr {
                    tos: 0,
                    total_len: (IPV4_LEN + l4_len) as u16,
                    ident: 0,
                    frag: IPV4_DF,
                    ttl: OUTER_TTL,
                    proto: proto.number(),
                    src: client.ip().octets(),
                    dst: vip.ip().octets(),
                }
                .emit();
                (ETH_P_IPV4, ip.to_vec(), (client.port(), vip.port()))
            }
            ProbeFlow::V6 { client, vip } => {
                let ip = Ipv6Repr {
                    tc: 0,
                    flow_label: 0,
                    payload_len: l4_len as u16,
                    next_header: proto.number(),
                    hop_limit: OUTER_TTL,
                    src: client.ip().octets(),
                    dst: vip.ip().octets(),
                }
                .emit();
                (ETH_P_IPV6, ip.to_vec(), (client.port(), vip.port()))
            }
        };
        // Source and destination addresses: the same bytes of either header.
        let addrs = match ethertype {
            ETH_P_IPV4 => &ip[12..20],
            _ => &ip[8..40],
        };
        let mut f = Vec::with_capacity(ETH_LEN + ip.len() + l4_len);
        f.extend_from_slice(&PROBE_DST_MAC);
        f.extend_from_slice(&PROBE_SRC_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4_segment(proto, sport, dport, addrs));
        f
    }
}

/// A TCP ACK or an empty UDP datagram from `sport` to `dport`, its checksum
/// over the pseudo-header of `addrs` (source then destination address; the
/// IPv4 and IPv6 pseudo-headers sum alike for a segment this short).
fn l4_segment(proto: Proto, sport: u16, dport: u16, addrs: &[u8]) -> Vec<u8> {
    let mut l4 = vec![
        0u8;
        match proto {
            Proto::Tcp => TCP_HDR_LEN,
            Proto::Udp => UDP_HDR_LEN,
        }
    ];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    match proto {
        Proto::Tcp => {
            l4[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
            l4[8..12].copy_from_slice(&1u32.to_be_bytes()); // ack
            l4[12] = 5 << 4;
            l4[13] = TCP_ACK;
            l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        }
        Proto::Udp => l4[4..6].copy_from_slice(&(UDP_HDR_LEN as u16).to_be_bytes()),
    }
    let pseudo = csum_add(0, addrs) + u32::from(proto.number()) + l4.len() as u32;
    let c = csum_fold(csum_add(pseudo, &l4));
    if proto.number() == PROTO_TCP {
        l4[16..18].copy_from_slice(&c.to_be_bytes());
    } else {
        // A UDP checksum that sums to 0 is sent as all ones (RFC 768; over
        // IPv6, 0 would mean "no checksum", which is not allowed).
        let c = if c == 0 { 0xffff } else { c };
        l4[6..8].copy_from_slice(&c.to_be_bytes());
    }
    l4
}

/// The outer destination of a tunnel frame the program sends: Ethernet, an
/// outer IPv4 or IPv6 header naming IPv4 (4) or IPv6 (41) inside, then an
/// inner header of that version. `None` when `frame` is not one (the
/// probe passed or dropped unchanged).
pub fn tunnel_outer_dst(frame: &[u8]) -> Option<IpAddr> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(ETH_LEN..)?;
    let (dst, proto, hdr_len) = match ethertype {
        ETH_P_IPV4 => {
            let (r, options) = Ipv4Repr::parse(ip).ok()?;
            (IpAddr::from(r.dst), r.proto, IPV4_LEN + options)
        }
        ETH_P_IPV6 => {
            let r = Ipv6Repr::parse(ip).ok()?;
            (IpAddr::from(r.dst), r.next_header, IPV6_LEN)
        }
        _ => return None,
    };
    let inner = ip.get(hdr_len..)?;
    let inner_ok = match tunnel_inner_ethertype(proto)? {
        ETH_P_IPV4 => Ipv4Repr::parse(inner).is_ok(),
        _ => Ipv6Repr::parse(inner).is_ok(),
    };
    inner_ok.then_some(dst)
}

/// The error for a client of the other address family than the service's VIP.
fn family_mismatch(client: &str, service: &str, vip: SocketAddr) -> StateError {
    let (family, form) = match vip {
        SocketAddr::V4(_) => ("ipv4", "IPV4:PORT"),
        SocketAddr::V6(_) => ("ipv6", "[IPV6]:PORT"),
    };
    StateError::BadAddress {
        input: client.into(),
        reason: format!(
            "service {service} has an {family} vip ({}); give an {family} client as {form}",
            vip.ip()
        ),
    }
}

/// `mqlb flow`: runs the packet `client` would send to service `name`
/// through the loaded program on the live maps (`dp`) and reports where it
/// went. Conntrack (`CT4` or `CT6`, by the VIP's family) is read before the
/// run: an entry there that names the chosen backend means a conntrack hit.
/// The program inserts an entry on a miss; it is removed again (and an
/// entry the run replaced is put back) so a probe never pins a later real
/// flow. The probe packet is counted like any other (per-CPU counters
/// cannot be undone).
///
/// `port` is the destination port (default: the service's port, the
/// lowest of a range); one outside the service's ports, or one an
/// exact-port service on the same address takes, is refused, and so is a
/// client of the other address family than the VIP.
pub fn probe(
    state: &State,
    dp: &mut dyn Dataplane,
    name: &str,
    client: &str,
    port: Option<u16>,
) -> Result<FlowView, CoreError> {
    let svc = state.service(name)?;
    let client_addr = parse_client(client)?;
    let port = port.unwrap_or(svc.vip.lo());
    let vip = svc.vip.with_port(port);
    let flow =
        ProbeFlow::new(client_addr, vip).ok_or_else(|| family_mismatch(client, &svc.name, vip))?;
    if !svc.vip.takes(port) {
        return Err(StateError::PortNotInVip {
            service: svc.name.clone(),
            vip: svc.vip,
            port,
        }
        .into());
    }
    if let Some(other) = state.services.iter().find(|o| {
        o.id != svc.id && o.proto == svc.proto && o.vip.claim() == (svc.vip.ip(), Some(port))
    }) {
        return Err(StateError::PortOwnedByExact {
            service: svc.name.clone(),
            port,
            other: other.name.clone(),
            other_vip: other.vip,
        }
        .into());
    }
    let key = flow.ct_key(svc.proto);
    let frame = flow.frame(svc.proto);
    let before = dp.ct_get(&key).map_err(CoreError::Probe)?;
    let run = dp.probe(&frame);
    let after = dp.ct_get(&key);
    // Undo the conntrack side effect even when the run failed.
    let undo = match (before, after.as_ref().ok().copied().flatten()) {
        (None, Some(_)) => dp.ct_del(&key),
        (Some(b), a) if a != Some(b) => dp.ct_put(&key, &b),
        _ => Ok(()),
    };
    let (action, out) = run.map_err(CoreError::Probe)?;
    let after = after.map_err(CoreError::Probe)?;
    if let Err(e) = undo {
        warn!(error = %error_chain(&e), "could not undo the conntrack entry of a flow probe");
    }
    // Backend ids are global: a service's own, or one kept as removed.
    let known = || {
        let own = state.services.iter().flat_map(|s| &s.backends);
        own.map(|b| (b.id, b.addr))
            .chain(state.removed.iter().map(|r| (r.id, r.addr)))
    };
    let tunnel_dst = tunnel_outer_dst(&out);
    let backend_id = after.map(|e| e.backend).filter(|&id| id != 0).or_else(|| {
        let addr = tunnel_dst?;
        known().find(|&(_, a)| a == addr).map(|(id, _)| id)
    });
    // The run's ingress is the loopback device: a packet whose backend has
    // no cached next hop yet takes the FIB lookup there, which refuses IPv6
    // (forwarding is off on lo) and drops it. The backend it was to go to
    // is still the one conntrack names.
    let backend = tunnel_dst.or_else(|| {
        let id = backend_id?;
        known().find(|&(i, _)| i == id).map(|(_, a)| a)
    });
    let reason = match (backend.is_some() || after.is_some(), action) {
        (true, _) if before.is_some_and(|b| Some(b.backend) == backend_id) => FlowReason::Conntrack,
        (true, _) => FlowReason::Table,
        (false, 1) => FlowReason::NoBackend,
        (false, 2) => FlowReason::NotMatched,
        (false, _) => FlowReason::Unknown,
    };
    Ok(FlowView {
        service: svc.name.clone(),
        client: client_addr,
        vip,
        proto: svc.proto,
        backend,
        backend_id,
        reason,
        verdict: verdict_name(action),
    })
}

/// One line for `mqlb flow`:
/// `10.0.0.2:40000 -> amqp 10.0.100.1:5672/tcp: backend 10.0.0.12 (table)`.
pub fn format_flow(v: &FlowView) -> String {
    let head = format!("{} -> {} {}/{}", v.client, v.service, v.vip, v.proto);
    match (v.backend, v.reason) {
        (Some(b), reason) if matches!(v.verdict.as_str(), "tx" | "redirect" | "pass") => {
            format!("{head}: backend {b} ({})", reason.name())
        }
        (Some(b), reason) => format!(
            "{head}: backend {b} ({}, verdict {})",
            reason.name(),
            v.verdict
        ),
        (None, FlowReason::NoBackend) => format!("{head}: no backend (dropped)"),
        (None, FlowReason::NotMatched) => format!(
            "{head}: not matched by the program (verdict {}); the maps may not be written yet",
            v.verdict
        ),
        (None, reason) => format!(
            "{head}: no backend ({}, verdict {})",
            reason.name(),
            v.verdict
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{
        packet::{ip4_outer_words, ip6_outer},
        PROTO_IPIP, PROTO_IPV6,
    };

    fn flow(client: &str, vip: &str) -> ProbeFlow {
        ProbeFlow::new(client.parse().unwrap(), vip.parse().unwrap()).expect("one family")
    }

    /// What the program sends for the probe `inner`: a new outer header
    /// from `src` to `backend` (their family) between the Ethernet header
    /// and the inner packet.
    fn tunnel(inner: &[u8], src: &str, backend: &str) -> Vec<u8> {
        let inner_ip = &inner[ETH_LEN..];
        let next = match inner_ip[0] >> 4 {
            4 => PROTO_IPIP,
            _ => PROTO_IPV6,
        };
        let len = inner_ip.len() as u16;
        let mut out = inner[..12].to_vec();
        match (src.parse().unwrap(), backend.parse().unwrap()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let words = ip4_outer_words(s.octets(), d.octets(), len, 0, next);
                out.extend(words.iter().flat_map(|w| w.to_ne_bytes()));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                out.extend_from_slice(&ip6_outer(s.octets(), d.octets(), len, next, 0, 0x12345));
            }
            _ => panic!("the outer source and the backend are of one family"),
        }
        out.extend_from_slice(inner_ip);
        out
    }

    /// The transport checksum of `l4` over the pseudo-header of `addrs`
    /// sums to zero (RFC 768/793, RFC 8200 section 8.1).
    fn l4_sums_to_zero(addrs: &[u8], proto: u8, l4: &[u8]) -> bool {
        let pseudo = csum_add(0, addrs) + u32::from(proto) + l4.len() as u32;
        csum_fold(csum_add(pseudo, l4)) == 0
    }

    #[test]
    fn tcp_frame_is_an_ack_with_valid_checksums() {
        let f = flow("10.0.0.2:40000", "10.0.100.1:5672").frame(Proto::Tcp);
        assert_eq!(f.len(), ETH_LEN + IPV4_LEN + TCP_HDR_LEN);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[ETH_LEN..ETH_LEN + IPV4_LEN];
        assert_eq!(csum_fold(csum_add(0, ip)), 0, "ip checksum");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40);
        assert_eq!(
            (ip[9], &ip[12..16], &ip[16..20]),
            (6, &[10, 0, 0, 2][..], &[10, 0, 100, 1][..])
        );
        let tcp = &f[ETH_LEN + IPV4_LEN..];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 40000);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 5672);
        assert_eq!(tcp[13], TCP_ACK, "ack, not syn");
        assert!(l4_sums_to_zero(&ip[12..20], 6, tcp), "tcp checksum");
    }

    #[test]
    fn udp_frame_has_its_length_and_checksum() {
        let f = flow("10.0.0.2:5000", "10.0.100.1:10000").frame(Proto::Udp);
        assert_eq!(f.len(), ETH_LEN + IPV4_LEN + UDP_HDR_LEN);
        let ip = &f[ETH_LEN..ETH_LEN + IPV4_LEN];
        assert_eq!(ip[9], 17);
        let udp = &f[ETH_LEN + IPV4_LEN..];
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 8);
        assert!(l4_sums_to_zero(&ip[12..20], 17, udp));
    }

    #[test]
    fn ipv6_frames_are_an_ack_or_a_datagram_with_valid_checksums() {
        let client = "[fd00:1::2]:40000";
        let vip = "[fd00:100::1]:5672";
        for (proto, l4_len) in [(Proto::Tcp, TCP_HDR_LEN), (Proto::Udp, UDP_HDR_LEN)] {
            let f = flow(client, vip).frame(proto);
            assert_eq!(f.len(), ETH_LEN + IPV6_LEN + l4_len, "{proto}");
            assert_eq!(&f[12..14], &[0x86, 0xdd]);
            let ip = Ipv6Repr::parse(&f[ETH_LEN..]).unwrap();
            assert_eq!(
                (ip.payload_len as usize, ip.next_header, ip.hop_limit),
                (l4_len, proto.number(), 64)
            );
            assert_eq!(
                ip.src,
                "fd00:1::2".parse::<std::net::Ipv6Addr>().unwrap().octets()
            );
            assert_eq!(
                ip.dst,
                "fd00:100::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
            );
            let l4 = &f[ETH_LEN + IPV6_LEN..];
            assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), 40000);
            assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 5672);
            let addrs = &f[ETH_LEN + 8..ETH_LEN + 40];
            assert!(
                l4_sums_to_zero(addrs, proto.number(), l4),
                "{proto} checksum"
            );
            match proto {
                Proto::Tcp => assert_eq!(l4[13], TCP_ACK, "ack, not syn"),
                Proto::Udp => {
                    assert_eq!(u16::from_be_bytes([l4[4], l4[5]]), 8);
                    assert_ne!(&l4[6..8], &[0, 0], "a udp checksum is mandatory over ipv6");
                }
            }
        }
    }

    #[test]
    fn flow_keys_are_in_network_order_per_family() {
        let CtKey::V4(f) = flow("10.0.0.2:40000", "10.0.100.1:5672").ct_key(Proto::Tcp) else {
            panic!("an ipv4 flow has a CT4 key");
        };
        assert_eq!(f.src, [10, 0, 0, 2]);
        assert_eq!(f.sport_be.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(f.dport_be.to_ne_bytes(), 5672u16.to_be_bytes());
        assert_eq!(f.proto, 6);
        let CtKey::V6(f) = flow("[fd00:1::2]:40000", "[fd00:100::1]:5004").ct_key(Proto::Udp)
        else {
            panic!("an ipv6 flow has a CT6 key");
        };
        assert_eq!(f.src[..2], [0xfd, 0x00]);
        assert_eq!(f.src[15], 2);
        assert_eq!(f.dst[15], 1);
        assert_eq!(f.sport_be.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(f.dport_be.to_ne_bytes(), 5004u16.to_be_bytes());
        assert_eq!(f.proto, 17);
        let v4: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let v6: SocketAddr = "[fd00:100::1]:5672".parse().unwrap();
        assert_eq!(ProbeFlow::new(v4, v6), None, "no flow across families");
        assert_eq!(ProbeFlow::new(v6, v4), None);
    }

    #[test]
    fn outer_destination_of_every_tunnel() {
        let p4 = flow("10.0.0.2:40000", "10.0.100.1:5672").frame(Proto::Tcp);
        let p6 = flow("[fd00:1::2]:40000", "[fd00:100::1]:5672").frame(Proto::Udp);
        for (inner, src, backend) in [
            (&p4, "10.0.0.1", "10.0.0.12"),   // 4-in-4
            (&p6, "10.0.0.1", "10.0.0.13"),   // 6-in-4
            (&p4, "fd00:1::1", "fd00:1::12"), // 4-in-6
            (&p6, "fd00:1::1", "fd00:1::13"), // 6-in-6
        ] {
            let out = tunnel(inner, src, backend);
            assert_eq!(
                tunnel_outer_dst(&out),
                Some(backend.parse().unwrap()),
                "{src} -> {backend}"
            );
            // Cut inside the inner header: not a whole tunnel packet.
            let outer = out.len() - (inner.len() - ETH_LEN);
            assert_eq!(tunnel_outer_dst(&out[..outer + 4]), None, "{backend}");
        }
        // The unchanged probe (XDP_PASS, XDP_DROP) is no tunnel.
        assert_eq!(tunnel_outer_dst(&p4), None);
        assert_eq!(tunnel_outer_dst(&p6), None);
        assert_eq!(tunnel_outer_dst(&[]), None);
        assert_eq!(tunnel_outer_dst(&p6[..13]), None);
        // An outer header naming IPv4 inside must have IPv4 inside.
        let mut wrong = tunnel(&p6, "fd00:1::1", "fd00:1::13");
        wrong[ETH_LEN + 6] = PROTO_IPIP;
        assert_eq!(tunnel_outer_dst(&wrong), None);
    }

    #[test]
    fn client_addresses() {
        for good in ["10.0.0.2:40000", " [fd00:1::2]:40000 "] {
            let a = parse_client(good).unwrap();
            assert_eq!(a, good.trim().parse().unwrap());
        }
        for bad in [
            "10.0.0.2",
            "nope",
            "fd00::1:80",
            "[fd00::1]",
            "[fd00::1]:0",
            "10.0.0.2:0",
            "10.0.0.2:70000",
        ] {
            let e = parse_client(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad address"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn one_line_answers() {
        let mut v = FlowView {
            service: "amqp".into(),
            client: "10.0.0.2:40000".parse().unwrap(),
            vip: "10.0.100.1:5672".parse().unwrap(),
            proto: Proto::Tcp,
            backend: Some("10.0.0.12".parse().unwrap()),
            backend_id: Some(2),
            reason: FlowReason::Table,
            verdict: "redirect".into(),
        };
        assert_eq!(
            format_flow(&v),
            "10.0.0.2:40000 -> amqp 10.0.100.1:5672/tcp: backend 10.0.0.12 (table)"
        );
        v.reason = FlowReason::Conntrack;
        assert!(format_flow(&v).ends_with("(conntrack)"));
        v.client = "[fd00:1::2]:40000".parse().unwrap();
        v.vip = "[fd00:100::1]:5672".parse().unwrap();
        v.backend = Some("fd00:1::12".parse().unwrap());
        assert_eq!(
            format_flow(&v),
            "[fd00:1::2]:40000 -> amqp [fd00:100::1]:5672/tcp: backend fd00:1::12 (conntrack)"
        );
        v.verdict = "drop".into();
        assert!(
            format_flow(&v).ends_with(": backend fd00:1::12 (conntrack, verdict drop)"),
            "{}",
            format_flow(&v)
        );
        v.backend = None;
        v.reason = FlowReason::NoBackend;
        assert!(format_flow(&v).ends_with(": no backend (dropped)"));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["reason"], "no_backend");
        assert_eq!(json["client"], "[fd00:1::2]:40000");
        assert_eq!(verdict_name(4), "redirect");
    }

    /// [`probe`] on an IPv6 port-range service over the fake program: the
    /// table's pick (an IPv6 backend through 6-in-6, an IPv4 one through
    /// 6-in-4), a `CT6` entry that wins, no entry left behind, and a client
    /// of the other family refused in one line.
    #[test]
    fn ipv6_services_are_probed_through_ct6() {
        use crate::{
            api::StatusView,
            daemon::Core,
            dataplane::MemDataplane,
            state::{BackendSpec, ServiceSpec, StateStore},
        };
        use std::sync::{Arc, Mutex};

        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(Mutex::new(MemDataplane {
            outer_src: [10, 0, 0, 1],
            outer_src6: "fd00:1::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            ..Default::default()
        }));
        let mut core = Core::new(
            State::default(),
            StateStore::new(dir.path()),
            Box::new(mem.clone()),
            StatusView::default(),
        )
        .unwrap();
        core.add_service(&ServiceSpec {
            name: "media6".into(),
            vip: "[fd00:100::1]:5004-5099".into(),
            proto: Proto::Udp,
            hash: Default::default(),
            udp_idle_s: None,
            ring_size: Some(13),
            health: Default::default(),
        })
        .unwrap();
        let client = "[fd00:1::2]:40000";
        let v = core.flow("media6", client, Some(5010)).unwrap();
        assert_eq!((v.backend, v.reason), (None, FlowReason::NoBackend));

        let mut ids = std::collections::BTreeMap::new();
        for (i, addr) in ["fd00:1::12", "10.0.0.13"].into_iter().enumerate() {
            let spec = BackendSpec {
                addr: addr.into(),
                weight: None,
            };
            let id = core.add_backend("media6", &spec).unwrap().id;
            ids.insert(addr, id);
            if i == 0 {
                // The only backend: every flow is its.
                let v = core.flow("media6", client, Some(5010)).unwrap();
                assert_eq!(
                    format_flow(&v),
                    "[fd00:1::2]:40000 -> media6 [fd00:100::1]:5010/udp: backend fd00:1::12 (table)"
                );
                assert_eq!(v.backend_id, Some(id));
            }
        }
        let v = core.flow("media6", client, None).unwrap();
        assert_eq!(v.vip.to_string(), "[fd00:100::1]:5004", "the lowest port");
        assert_eq!(v.reason, FlowReason::Table);
        let picked = v.backend.expect("a backend");
        assert!(mem.lock().unwrap().ct6.is_empty(), "probes leave no entry");

        // A CT6 entry pinning the flow to the other backend wins.
        let other = if picked.is_ipv6() {
            "10.0.0.13"
        } else {
            "fd00:1::12"
        };
        let other_id = ids[other];
        let CtKey::V6(key) = flow(client, "[fd00:100::1]:5004").ct_key(Proto::Udp) else {
            unreachable!()
        };
        let entry = lb_common::CtEntry {
            backend: other_id,
            ..Default::default()
        };
        mem.lock().unwrap().ct6.insert(key, entry);
        let v = core.flow("media6", client, None).unwrap();
        assert_eq!(
            (v.backend, v.backend_id, v.reason),
            (
                Some(other.parse().unwrap()),
                Some(other_id),
                FlowReason::Conntrack
            )
        );
        assert_eq!(
            mem.lock().unwrap().ct6.get(&key),
            Some(&entry),
            "kept as it was"
        );
        assert!(mem.lock().unwrap().ct.is_empty());

        let e = core.flow("media6", "10.0.0.2:40000", None).unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(
            e.to_string(),
            "bad address \"10.0.0.2:40000\": service media6 has an ipv6 vip (fd00:100::1); \
             give an ipv6 client as [IPV6]:PORT"
        );
    }
}
