//! `mqlb flow`: which backend a client's flow goes to, asked of the loaded
//! program itself. The daemon builds the packet the client would send
//! ([`build_frame`]), runs it through `mqlb` with `BPF_PROG_TEST_RUN` on the
//! live maps, and names the backend from the outer destination of the IPIP
//! packet that comes out ([`ipip_outer_dst`]).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use lb_common::{
    packet::{csum_add, csum_fold, ETH_LEN, ETH_P_IPV4, IPV4_DF, IPV4_LEN},
    Flow4, PROTO_IPIP, PROTO_TCP,
};
use serde::{Deserialize, Serialize};

use crate::state::{Proto, StateError};

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
    /// The outer destination of the IPIP packet the program sent.
    pub backend: Option<Ipv4Addr>,
    pub backend_id: Option<u32>,
    pub reason: FlowReason,
    /// The XDP verdict of the test run: `aborted`, `drop`, `pass`, `tx` or
    /// `redirect`. The test run's ingress is the loopback device, so a
    /// backend reached through the LB's own port shows `redirect`, not `tx`.
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

/// A client address for a probe: `IPV4:PORT`.
pub fn parse_client(input: &str) -> Result<SocketAddrV4, StateError> {
    let bad = |reason: &str| StateError::BadAddress {
        input: input.into(),
        reason: reason.into(),
    };
    match input.trim().parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.port() != 0 => Ok(a),
        Ok(SocketAddr::V4(_)) => Err(bad("the client port must not be 0")),
        Ok(SocketAddr::V6(_)) => Err(bad("the data plane forwards ipv4 only")),
        Err(_) => Err(bad("expected IPV4:PORT")),
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

/// The conntrack key of the flow from `client` to `vip`.
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

/// Ethernet + IPv4 (DF, no options, valid checksum) + a TCP ACK (not a SYN,
/// so a conntrack entry is honoured) or an empty UDP datagram, from
/// `client` to `vip`.
pub fn build_frame(client: SocketAddrV4, vip: SocketAddrV4, proto: Proto) -> Vec<u8> {
    let l4_len = match proto {
        Proto::Tcp => TCP_HDR_LEN,
        Proto::Udp => UDP_HDR_LEN,
    };
    let total_len = (IPV4_LEN + l4_len) as u16;
    let mut f = Vec::with_capacity(ETH_LEN + total_len as usize);
    f.extend_from_slice(&PROBE_DST_MAC);
    f.extend_from_slice(&PROBE_SRC_MAC);
    f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    let mut ip = [0u8; IPV4_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto.number();
    ip[12..16].copy_from_slice(&client.ip().octets());
    ip[16..20].copy_from_slice(&vip.ip().octets());
    let sum = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&client.port().to_be_bytes());
    l4[2..4].copy_from_slice(&vip.port().to_be_bytes());
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
    // The L4 checksum over the pseudo-header.
    let mut sum = csum_add(0, &ip[12..20]);
    sum += u32::from(proto.number()) + l4_len as u32;
    let c = csum_fold(csum_add(sum, &l4));
    let at = if proto.number() == PROTO_TCP { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&l4);
    f
}

/// The outer destination of an Ethernet + IPv4-in-IPv4 frame, or `None`
/// when `frame` is not one.
pub fn ipip_outer_dst(frame: &[u8]) -> Option<Ipv4Addr> {
    let ip = frame.get(ETH_LEN..ETH_LEN + IPV4_LEN)?;
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETH_P_IPV4 || ip[0] >> 4 != 4 || ip[9] != PROTO_IPIP {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    // The inner header must follow.
    frame.get(ETH_LEN + ihl..ETH_LEN + ihl + IPV4_LEN)?;
    Some(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]))
}

/// One line for `mqlb flow`:
/// `10.0.0.2:40000 -> amqp 10.0.100.1:5672/tcp: backend 10.0.0.12 (table)`.
pub fn format_flow(v: &FlowView) -> String {
    let head = format!("{} -> {} {}/{}", v.client, v.service, v.vip, v.proto);
    match (v.backend, v.reason) {
        (Some(b), reason) => format!("{head}: backend {b} ({})", reason.name()),
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
pub(crate) mod tests {
    use super::*;

    /// What the program sends for `inner`: a new outer IPv4 header to `dst`
    /// between the Ethernet header and the inner packet.
    pub(crate) fn ipip_wrap(inner: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let inner_ip = &inner[ETH_LEN..];
        let outer = lb_common::packet::ipip_outer_v4(
            src.octets(),
            dst.octets(),
            inner_ip.len() as u16,
            inner_ip[1],
        );
        let mut out = inner[..ETH_LEN].to_vec();
        out.extend_from_slice(&outer);
        out.extend_from_slice(inner_ip);
        out
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn tcp_frame_is_an_ack_with_valid_checksums() {
        let f = build_frame(addr("10.0.0.2:40000"), addr("10.0.100.1:5672"), Proto::Tcp);
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
        let pseudo = csum_add(0, &ip[12..20]) + 6 + tcp.len() as u32;
        assert_eq!(csum_fold(csum_add(pseudo, tcp)), 0, "tcp checksum");
    }

    #[test]
    fn udp_frame_has_its_length_and_checksum() {
        let f = build_frame(addr("10.0.0.2:5000"), addr("10.0.100.1:10000"), Proto::Udp);
        assert_eq!(f.len(), ETH_LEN + IPV4_LEN + UDP_HDR_LEN);
        let ip = &f[ETH_LEN..ETH_LEN + IPV4_LEN];
        assert_eq!(ip[9], 17);
        let udp = &f[ETH_LEN + IPV4_LEN..];
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 8);
        let pseudo = csum_add(0, &ip[12..20]) + 17 + 8;
        assert_eq!(csum_fold(csum_add(pseudo, udp)), 0);
    }

    #[test]
    fn flow_key_is_in_network_order() {
        let f = flow4(addr("10.0.0.2:40000"), addr("10.0.100.1:5672"), Proto::Tcp);
        assert_eq!(f.src, [10, 0, 0, 2]);
        assert_eq!(f.sport_be.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(f.dport_be.to_ne_bytes(), 5672u16.to_be_bytes());
        assert_eq!(f.proto, 6);
    }

    #[test]
    fn outer_destination_of_ipip_output() {
        let inner = build_frame(addr("10.0.0.2:40000"), addr("10.0.100.1:5672"), Proto::Tcp);
        let out = ipip_wrap(
            &inner,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 12),
        );
        assert_eq!(ipip_outer_dst(&out), Some(Ipv4Addr::new(10, 0, 0, 12)));
        // The unchanged probe (XDP_PASS) is not IPIP.
        assert_eq!(ipip_outer_dst(&inner), None);
        assert_eq!(ipip_outer_dst(&out[..ETH_LEN + IPV4_LEN + 4]), None);
        assert_eq!(ipip_outer_dst(&[]), None);
    }

    #[test]
    fn client_addresses() {
        assert_eq!(
            parse_client("10.0.0.2:40000").unwrap(),
            addr("10.0.0.2:40000")
        );
        for bad in [
            "10.0.0.2",
            "nope",
            "[::1]:80",
            "10.0.0.2:0",
            "10.0.0.2:70000",
        ] {
            let e = parse_client(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad address"), "{bad}: {e}");
        }
    }

    #[test]
    fn one_line_answers() {
        let mut v = FlowView {
            service: "amqp".into(),
            client: "10.0.0.2:40000".parse().unwrap(),
            vip: "10.0.100.1:5672".parse().unwrap(),
            proto: Proto::Tcp,
            backend: Some(Ipv4Addr::new(10, 0, 0, 12)),
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
        v.backend = None;
        v.reason = FlowReason::NoBackend;
        assert!(format_flow(&v).ends_with(": no backend (dropped)"));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["reason"], "no_backend");
        assert_eq!(verdict_name(4), "redirect");
    }
}
