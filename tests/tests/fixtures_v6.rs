//! Layer 3, IPv6 and quoted-flow ICMP: the real compiled XDP programs
//! through BPF_PROG_TEST_RUN, as `fixtures.rs` does for IPv4.
//!
//! Each test loads the object `lb-user` embeds, writes the maps the way the
//! daemon would (an IPv6 service: `ServiceKey.addr` the VIP's 16 bytes; an
//! IPv6 backend: `Backend.addr`/`outer_src` IPv6, `flags` with
//! `backend_flags::IPV6`), runs hand-built frames (tests/src/frames.rs, whose
//! checksums share no code with lb-common) and checks the verdict, the exact
//! output bytes and the counter deltas. Needs root (CI runs as root).

use lb_common::{
    backend_flags, backend_state,
    hash::{flow_label_v4, flow_label_v6},
    maglev::MaglevBackend,
    v4_mapped, Counter, DropReason, Flow4, Flow6, HashMode, ServiceKey, PROTO_TCP, PROTO_UDP,
};
use mqlb_tests::{frames::*, privileged::require_root, xdp::*};

/// `2001:db8:<a>::<b>`.
const fn v6(a: u8, b: u8) -> [u8; 16] {
    [0x20, 0x01, 0x0d, 0xb8, 0, a, 0, 0, 0, 0, 0, 0, 0, 0, 0, b]
}

const VIP6: [u8; 16] = v6(0xf, 1);
const CLIENT6: [u8; 16] = v6(0xc, 0x10);
const LB6: [u8; 16] = v6(1, 1);
const BACKENDS6: [[u8; 16]; 3] = [v6(1, 0x11), v6(1, 0x12), v6(1, 0x13)];
/// A router on the way back to the client.
const ROUTER6: [u8; 16] = v6(2, 0xfe);

const VIP4: [u8; 4] = [10, 99, 0, 1];
const CLIENT4: [u8; 4] = [192, 0, 2, 10];
const LB4: [u8; 4] = [10, 99, 1, 1];
const BACKENDS4: [[u8; 4]; 3] = [[10, 99, 1, 11], [10, 99, 1, 12], [10, 99, 1, 13]];
const ROUTER4: [u8; 4] = [10, 99, 2, 254];

/// Backend ids of the tests: 1..=3 IPv6 (`BACKENDS6`), 11..=13 IPv4 (`BACKENDS4`).
fn backend_addr(id: u32) -> [u8; 16] {
    match id {
        1..=3 => BACKENDS6[id as usize - 1],
        11..=13 => v4_mapped(BACKENDS4[id as usize - 11]),
        _ => panic!("no backend {id} in these tests"),
    }
}

fn backend_mac(id: u32) -> [u8; 6] {
    BACKEND_MACS[(id as usize - 1) % 4]
}

/// The IPv6 fixtures' map writes: backends by id, services on any VIP.
trait Lab6 {
    /// Backend `id` on the test-run interface, the LB's address of its
    /// family as outer source.
    fn backend(&mut self, id: u32, mtu: u16, state: u8);
    /// Service `id` on `vip` (16 bytes, IPv4-mapped for IPv4) with the ring
    /// of `members` (backend ids, equal weights).
    fn service(&mut self, id: u32, vip: [u8; 16], port: u16, proto: u8, members: &[u32]) -> Svc;
}

impl Lab6 for Lb {
    fn backend(&mut self, id: u32, mtu: u16, state: u8) {
        let addr = backend_addr(id);
        let v6 = backend_flags::family(&addr) == backend_flags::IPV6;
        let outer_src = if v6 { LB6 } else { v4_mapped(LB4) };
        self.write_backend(id, addr, outer_src, TEST_RUN_IFINDEX, mtu, state);
    }

    fn service(&mut self, id: u32, vip: [u8; 16], port: u16, proto: u8, members: &[u32]) -> Svc {
        let key = ServiceKey {
            addr: vip,
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        let members: Vec<MaglevBackend> = members
            .iter()
            .map(|&id| MaglevBackend {
                addr: backend_addr(id),
                id,
                weight: 100,
            })
            .collect();
        self.write_service(id, key, HashMode::FiveTuple, 60, &members)
    }
}

fn flow6(sport: u16, dport: u16, proto: u8) -> Flow6 {
    Flow6 {
        src: CLIENT6,
        dst: VIP6,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

fn flow4(sport: u16, dport: u16, proto: u8) -> Flow4 {
    Flow4 {
        src: CLIENT4,
        dst: VIP4,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// IPv6 lab: backends 1..=3 (IPv6, MTU 1500); service 1 = [VIP6]:5672/tcp,
/// service 2 = [VIP6]:5004/udp.
fn lab6() -> (Lb, Svc, Svc) {
    let mut lb = Lb::load();
    for id in 1..=3 {
        lb.backend(id, 1500, backend_state::ACTIVE);
    }
    let amqp = lb.service(1, VIP6, 5672, PROTO_TCP, &[1, 2, 3]);
    let media = lb.service(2, VIP6, 5004, PROTO_UDP, &[1, 2, 3]);
    (lb, amqp, media)
}

fn tcp6_frame(ip: &Ip6, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    frame6(ip, &tcp6(ip, sport, dport, flags, payload))
}

fn client_ip6(next_header: u8) -> Ip6 {
    let mut ip = Ip6::new(CLIENT6, VIP6, next_header);
    ip.tc = 0xb8;
    ip.flow_label = 0x12345;
    ip
}

/// The 6-in-6 frame mqlb must send for `input` (a client frame) to backend `id`.
fn expect_6in6(input: &[u8], id: u32, f: &Flow6) -> Vec<u8> {
    ip6_tunnel_expected(
        LB_MAC,
        backend_mac(id),
        LB6,
        backend_addr(id),
        flow_label_v6(f),
        &input[14..],
    )
}

#[test]
fn v6_non_service_traffic_passes_untouched() {
    if !require_root("v6_non_service_traffic_passes_untouched") {
        return;
    }
    let (lb, _, _) = lab6();
    // Neighbour solicitation for the VIP, to its solicited-node group.
    let ns = {
        let mut ip = Ip6::new(
            CLIENT6,
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1],
            58,
        );
        ip.hop_limit = 255;
        let mut body = VIP6.to_vec();
        body.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 2]);
        frame6(&ip, &icmp6(&ip, 135, 0, [0; 4], &body))
    };
    let na = {
        let mut ip = Ip6::new(VIP6, CLIENT6, 58);
        ip.hop_limit = 255;
        frame6(&ip, &icmp6(&ip, 136, 0, [0x60, 0, 0, 0], &VIP6))
    };
    let ra = {
        let mut ip = Ip6::new(
            ROUTER6,
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            58,
        );
        ip.hop_limit = 255;
        frame6(&ip, &icmp6(&ip, 134, 0, [64, 0, 0x07, 0x08], &[0; 8]))
    };
    let echo = {
        let ip = Ip6::new(CLIENT6, VIP6, 58);
        frame6(&ip, &icmp6(&ip, 128, 0, [0, 1, 0, 1], b"ping"))
    };
    let other_port = tcp6_frame(&client_ip6(6), 40000, 22, SYN, b"");
    let host_own = tcp6_frame(&Ip6::new(CLIENT6, LB6, 6), 40000, 5672, SYN, b"");
    let udp_on_tcp_port = frame6(&client_ip6(17), &udp6(&client_ip6(17), 40000, 5672, b"x"));
    // An IPv4 service's key must not match an IPv6 packet to the same
    // address written IPv4-mapped.
    let mut lb = lb;
    lb.backend(11, 1500, backend_state::ACTIVE);
    lb.service(3, v4_mapped(VIP4), 5672, PROTO_TCP, &[11]);
    let mapped = tcp6_frame(
        &Ip6::new(CLIENT6, v4_mapped(VIP4), 6),
        40000,
        5672,
        SYN,
        b"",
    );
    // A chain of five extension headers: more than mqlb walks.
    let long_chain = {
        let mut ip = client_ip6(6);
        ip.ext = vec![
            Ext6::hop_by_hop(),
            Ext6::dest_opts(),
            Ext6::dest_opts(),
            Ext6::dest_opts(),
            Ext6::dest_opts(),
        ];
        tcp6_frame(&ip, 40000, 5672, SYN, b"")
    };
    let later_fragment = {
        let mut ip = client_ip6(6);
        ip.ext = vec![Ext6::fragment(185, false)];
        frame6(&ip, &[0x5a; 64])
    };
    let esp = {
        let ip = client_ip6(50);
        frame6(&ip, &[0, 0, 1, 0, 0, 0, 0, 1, 0x5a, 0x5a])
    };
    let cases: [(&str, &[u8]); 11] = [
        ("neighbour solicitation", &ns),
        ("neighbour advertisement", &na),
        ("router advertisement", &ra),
        ("echo request to the VIP", &echo),
        ("tcp to an unserved port", &other_port),
        ("tcp to the host's own address", &host_own),
        ("udp to a tcp service port", &udp_on_tcp_port),
        ("ipv4-mapped destination", &mapped),
        ("five extension headers", &long_chain),
        ("later fragment (no ports)", &later_fragment),
        ("esp", &esp),
    ];
    for (name, input) in cases {
        let before = lb.snapshot();
        let (action, out) = lb.run(input);
        let after = lb.snapshot();
        assert_eq!(action, XDP_PASS, "{name}: verdict");
        assert_eq!(out, input, "{name}: bytes must be untouched");
        assert_eq!(before.counter(&after, Counter::Pass), 1, "{name}: pass");
        assert_eq!(
            before.counter(&after, Counter::CtMiss),
            0,
            "{name}: no service hit"
        );
        assert_eq!(after.drops, before.drops, "{name}: no drop counted");
    }
}

#[test]
fn v6_tcp_syn_is_6in6_to_the_predicted_backend() {
    if !require_root("v6_tcp_syn_is_6in6_to_the_predicted_backend") {
        return;
    }
    let (lb, amqp, _) = lab6();
    let mut seen = [0u32; 4];
    for sport in 40000..40024u16 {
        let input = tcp6_frame(&client_ip6(6), sport, 5672, SYN, b"");
        let f = flow6(sport, 5672, PROTO_TCP);
        let want = amqp.predict(&f);
        let before = lb.snapshot();
        let (action, out) = lb.run(&input);
        let after = lb.snapshot();
        assert_eq!(action, XDP_TX, "port {sport}");
        assert_eq!(
            out,
            expect_6in6(&input, want, &f),
            "port {sport}: exact 6-in-6 bytes"
        );
        assert_eq!(
            lb.ct(&f).map(|e| e.backend),
            Some(want),
            "CT6 pins the flow"
        );
        assert_eq!(before.counter(&after, Counter::CtMiss), 1);
        assert_eq!(before.counter(&after, Counter::Tx), 1);
        seen[want as usize] += 1;
    }
    assert!(
        seen[1..].iter().all(|&n| n > 0),
        "24 flows use all 3 backends: {seen:?}"
    );
    // The outer header, spelled out once for the first flow.
    let input = tcp6_frame(&client_ip6(6), 40000, 5672, SYN, b"");
    let (_, out) = lb.run(&input);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(out[14] >> 4, 6);
    assert_eq!(
        (out[14] << 4) | (out[15] >> 4),
        0xb8,
        "traffic class copied"
    );
    assert_eq!(
        &out[18..22],
        &[0, 60, 41, 64],
        "payload 60, next header 41, hop limit 64"
    );
    assert_eq!(&out[22..38], &LB6);
    assert_eq!(&out[54..], &input[14..], "the client's packet, untouched");
}

#[test]
fn v6_udp_is_6in6_and_established_flows_follow_ct6() {
    if !require_root("v6_udp_is_6in6_and_established_flows_follow_ct6") {
        return;
    }
    let (mut lb, amqp, media) = lab6();
    let ip = client_ip6(17);
    let rtp = frame6(&ip, &udp6(&ip, 30000, 5004, &[0x80; 172]));
    let f = flow6(30000, 5004, PROTO_UDP);
    let want = media.predict(&f);
    let (action, out) = lb.run(&rtp);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_6in6(&rtp, want, &f),
        "exact 6-in-6 bytes of a UDP datagram"
    );
    assert_eq!(lb.ct(&f).map(|e| e.backend), Some(want));

    // A TCP flow pinned in CT6 to another backend than the ring's.
    let g = flow6(41000, 5672, PROTO_TCP);
    let hashed = amqp.predict(&g);
    let pinned = if hashed == 1 { 2 } else { 1 };
    lb.set_ct(&g, pinned, 0);
    let data = tcp6_frame(
        &client_ip6(6),
        41000,
        5672,
        ACK | PSH,
        b"AMQP\x00\x00\x09\x01",
    );
    let before = lb.snapshot();
    let (action, out) = lb.run(&data);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_6in6(&data, pinned, &g),
        "conntrack wins over the ring"
    );
    assert_eq!(before.counter(&lb.snapshot(), Counter::CtHit), 1);
    let syn = tcp6_frame(&client_ip6(6), 41000, 5672, SYN, b"");
    let (_, out) = lb.run(&syn);
    assert_eq!(
        out,
        expect_6in6(&syn, hashed, &g),
        "a SYN starts over from the ring"
    );
    assert_eq!(lb.ct(&g).map(|e| e.backend), Some(hashed));
}

#[test]
fn v6_extension_headers_are_walked_or_counted() {
    if !require_root("v6_extension_headers_are_walked_or_counted") {
        return;
    }
    let (lb, amqp, _) = lab6();
    // Walked: the ports after them pick the backend, the packet goes whole.
    let walked: [(&str, Vec<Ext6>); 4] = [
        ("hop-by-hop", vec![Ext6::hop_by_hop()]),
        (
            "hop-by-hop, destination options, routing done with",
            vec![
                Ext6::hop_by_hop(),
                Ext6::dest_opts(),
                Ext6::routing(0, VIP6),
            ],
        ),
        ("atomic fragment", vec![Ext6::fragment(0, false)]),
        (
            "four headers",
            vec![
                Ext6::hop_by_hop(),
                Ext6::dest_opts(),
                Ext6::routing(0, VIP6),
                Ext6::fragment(0, false),
            ],
        ),
    ];
    for (i, (name, ext)) in walked.into_iter().enumerate() {
        let sport = 42000 + i as u16;
        let mut ip = client_ip6(6);
        ip.ext = ext;
        let input = tcp6_frame(&ip, sport, 5672, SYN, b"");
        let f = flow6(sport, 5672, PROTO_TCP);
        let want = amqp.predict(&f);
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_TX, "{name}");
        assert_eq!(out, expect_6in6(&input, want, &f), "{name}: exact bytes");
        assert_eq!(
            lb.ct(&f).map(|e| e.backend),
            Some(want),
            "{name}: CT6 key from the real ports"
        );
    }
    // Counted: for a service, but not forwarded.
    let counted: [(&str, Vec<Ext6>, DropReason); 3] = [
        (
            "first fragment",
            vec![Ext6::fragment(0, true)],
            DropReason::Ipv6Fragment,
        ),
        (
            "hop-by-hop then first fragment",
            vec![Ext6::hop_by_hop(), Ext6::fragment(0, true)],
            DropReason::Ipv6Fragment,
        ),
        (
            "routing header with segments left",
            vec![Ext6::routing(1, v6(9, 9))],
            DropReason::Ipv6ExtHeader,
        ),
    ];
    for (name, ext, reason) in counted {
        let mut ip = client_ip6(6);
        ip.ext = ext;
        let input = tcp6_frame(&ip, 43000, 5672, SYN, b"");
        let before = lb.snapshot();
        let (action, _) = lb.run(&input);
        let after = lb.snapshot();
        assert_eq!(action, XDP_DROP, "{name}");
        assert_eq!(before.drop(&after, reason), 1, "{name}: {}", reason.name());
        assert_eq!(before.counter(&after, Counter::Drop), 1, "{name}");
    }
    // Malformed: payload length beyond the frame; TCP header cut short.
    let mut long = tcp6_frame(&client_ip6(6), 43001, 5672, SYN, b"");
    long[18..20].copy_from_slice(&200u16.to_be_bytes());
    let mut short = tcp6_frame(&client_ip6(6), 43002, 5672, SYN, b"");
    short.truncate(14 + 40 + 10);
    short[18..20].copy_from_slice(&10u16.to_be_bytes());
    for (name, input, reason) in [
        (
            "payload length beyond the frame",
            long,
            DropReason::MalformedIp,
        ),
        ("tcp header cut short", short, DropReason::MalformedL4),
    ] {
        let before = lb.snapshot();
        assert_eq!(lb.run(&input).0, XDP_DROP, "{name}");
        assert_eq!(before.drop(&lb.snapshot(), reason), 1, "{name}");
    }
}

#[test]
fn v6_too_big_answers_icmpv6_packet_too_big() {
    if !require_root("v6_too_big_answers_icmpv6_packet_too_big") {
        return;
    }
    let (mut lb, _, _) = lab6();
    // A 1500-byte IPv6 packet: 1540 once encapsulated, over the 1500 MTU.
    let ip = client_ip6(6);
    let input = tcp6_frame(&ip, 40000, 5672, ACK, &vec![0x5a; 1500 - 60]);
    assert_eq!(input.len(), 1514);
    let before = lb.snapshot();
    let (action, out) = lb.run(&input);
    let after = lb.snapshot();
    assert_eq!(action, XDP_TX, "answered out of the same port");
    // Expected: Ethernet back to the client; IPv6 VIP → client, hop limit
    // 64; ICMPv6 type 2 code 0 with MTU 1460, quoting the first 1232 bytes
    // of the client's packet: 1280 bytes in all (RFC 4443 2.4 (c)).
    let mut icmp = vec![2u8, 0, 0, 0];
    icmp.extend_from_slice(&1460u32.to_be_bytes());
    icmp.extend_from_slice(&input[14..14 + 1232]);
    let c = checksum6(&VIP6, &CLIENT6, 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let answer = Ip6::new(VIP6, CLIENT6, 58);
    let mut want = eth(CLIENT_MAC, LB_MAC, 0x86dd);
    want.extend_from_slice(&answer.header(icmp.len()));
    want.extend_from_slice(&icmp);
    assert_eq!(out.len(), 14 + 1280);
    assert_eq!(out, want, "exact ICMPv6 packet-too-big bytes");
    assert_eq!(
        checksum6(&VIP6, &CLIENT6, 58, &out[54..]),
        0,
        "checksum verifies"
    );
    assert_eq!(before.counter(&after, Counter::IcmpTooBig), 1);
    assert_eq!(before.counter(&after, Counter::Tx), 1);

    // 1460 bytes fit exactly.
    let fits = tcp6_frame(&ip, 40001, 5672, ACK, &vec![0x5a; 1460 - 60]);
    let (action, out) = lb.run(&fits);
    assert_eq!(action, XDP_TX);
    assert_eq!(out.len(), 14 + 40 + 1460);

    // A backend path that leaves less than 1280 bytes: no use telling the
    // client (RFC 8201); dropped and counted.
    for id in 1..=3 {
        lb.backend(id, 1300, backend_state::ACTIVE);
    }
    let before = lb.snapshot();
    assert_eq!(lb.run(&input).0, XDP_DROP);
    assert_eq!(before.drop(&lb.snapshot(), DropReason::MtuBelowIpv6Min), 1);
}

#[test]
fn v4_service_to_v6_backend_is_4in6_and_v6_service_to_v4_backend_is_6in4() {
    if !require_root("v4_service_to_v6_backend_is_4in6_and_v6_service_to_v4_backend_is_6in4") {
        return;
    }
    let (mut lb, _, _) = lab6();
    let svc4 = lb.service(3, v4_mapped(VIP4), 5672, PROTO_TCP, &[1, 2, 3]);
    let ip4 = Ip4::new(CLIENT4, VIP4, PROTO_TCP);
    let syn4 = frame(&ip4, &tcp(&ip4, 40000, 5672, SYN, b""));
    let f4 = flow4(40000, 5672, PROTO_TCP);
    let want = svc4.predict(&f4);
    let (action, out) = lb.run(&syn4);
    assert_eq!(action, XDP_TX);
    let expect = ip6_tunnel_expected(
        LB_MAC,
        backend_mac(want),
        LB6,
        backend_addr(want),
        flow_label_v4(&f4),
        &syn4[14..],
    );
    assert_eq!(out, expect, "exact 4-in-6 bytes (next header 4)");
    assert_eq!(out[20], 4);

    // Too big for 4-in-6: ICMP fragmentation-needed with MTU − 40.
    let big = frame(&ip4, &tcp(&ip4, 40001, 5672, ACK, &vec![0u8; 1500 - 40]));
    let (action, out) = lb.run(&big);
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[34..36], &[3, 4], "fragmentation-needed");
    assert_eq!(&out[40..42], &1460u16.to_be_bytes());
    assert_eq!(checksum(&out[34..]), 0, "ICMP checksum");

    // An IPv6 service on IPv4 backends: 6-in-4 (protocol 41).
    for id in 11..=13 {
        lb.backend(id, 1500, backend_state::ACTIVE);
    }
    let svc6 = lb.service(4, VIP6, 5673, PROTO_TCP, &[11, 12, 13]);
    let syn6 = tcp6_frame(&client_ip6(6), 40000, 5673, SYN, b"");
    let want = svc6.predict(&flow6(40000, 5673, PROTO_TCP));
    let (action, out) = lb.run(&syn6);
    assert_eq!(action, XDP_TX);
    let expect = ip6_in_ip4_expected(
        LB_MAC,
        backend_mac(want),
        LB4,
        BACKENDS4[want as usize - 11],
        &syn6[14..],
    );
    assert_eq!(out, expect, "exact 6-in-4 bytes (protocol 41)");
}

/// An ICMPv4 error from a router to the VIP about `quoted` (an IPv4 packet
/// the backend sent from the VIP), quoting its header and 8 bytes.
fn icmp4_error(kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(&quoted[..28]);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ip = Ip4::new(ROUTER4, VIP4, 1);
    frame(&ip, &icmp)
}

#[test]
fn icmp4_error_quoting_a_flow_goes_to_the_flows_backend() {
    if !require_root("icmp4_error_quoting_a_flow_goes_to_the_flows_backend") {
        return;
    }
    let mut lb = Lb::load();
    for id in 11..=13 {
        lb.backend(id, 1500, backend_state::ACTIVE);
    }
    let svc = lb.service(1, v4_mapped(VIP4), 5672, PROTO_TCP, &[11, 12, 13]);
    // The backend's reply VIP:5672 → client:40000, too big for a router.
    let reply_ip = Ip4::new(VIP4, CLIENT4, PROTO_TCP);
    let reply = tcp(&reply_ip, 5672, 40000, ACK | PSH, &[0u8; 1400]);
    let mut quoted = reply_ip.header(reply.len());
    quoted.extend_from_slice(&reply);
    let err = icmp4_error(3, 4, [0, 0, 0x05, 0x78], &quoted);
    let f = flow4(40000, 5672, PROTO_TCP);
    let hashed = svc.predict(&f);
    let pinned = if hashed == 11 { 12 } else { 11 };
    lb.set_ct(&f, pinned, 0);
    let ct_before = lb.ct_len::<Flow4>();
    let before = lb.snapshot();
    let (action, out) = lb.run(&err);
    let after = lb.snapshot();
    assert_eq!(action, XDP_TX);
    let mac = backend_mac(pinned);
    let to = BACKENDS4[pinned as usize - 11];
    assert_eq!(
        out,
        ipip_expected(LB_MAC, mac, LB4, to, &err[14..]),
        "the error, untouched, in IPIP to the backend conntrack names"
    );
    assert_eq!(before.counter(&after, Counter::IcmpForward), 1);

    // No conntrack entry: the ring's backend; none is created.
    let g = flow4(40002, 5672, PROTO_TCP);
    let reply = tcp(&reply_ip, 5672, 40002, ACK, &[0u8; 100]);
    let mut quoted = reply_ip.header(reply.len());
    quoted.extend_from_slice(&reply);
    let ttl = icmp4_error(11, 0, [0; 4], &quoted);
    let want = svc.predict(&g);
    let (action, out) = lb.run(&ttl);
    assert_eq!(action, XDP_TX);
    let to = BACKENDS4[want as usize - 11];
    assert_eq!(
        out,
        ipip_expected(LB_MAC, backend_mac(want), LB4, to, &ttl[14..])
    );
    assert_eq!(
        lb.ct_len::<Flow4>(),
        ct_before,
        "an ICMP error creates no conntrack entry"
    );

    // About other traffic, or not an error: the kernel's.
    let other_ip = Ip4::new(VIP4, CLIENT4, PROTO_TCP);
    let other = tcp(&other_ip, 22, 40000, ACK, &[]);
    let mut q = other_ip.header(other.len());
    q.extend_from_slice(&other);
    let not_service = icmp4_error(3, 4, [0, 0, 5, 0x78], &q);
    let redirect = icmp4_error(5, 1, [10, 99, 2, 1], &quoted);
    let from_elsewhere = {
        let mut e = icmp4_error(3, 4, [0, 0, 5, 0x78], &quoted);
        // The quoted source is not the VIP the error is addressed to.
        e[14 + 28 + 12..14 + 28 + 16].copy_from_slice(&[10, 99, 0, 2]);
        e
    };
    for (name, input) in [
        ("quotes a non-service port", not_service),
        ("a redirect, not an error", redirect),
        ("quotes a packet from another address", from_elsewhere),
    ] {
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(out, input, "{name}: untouched");
    }
}

#[test]
fn icmpv6_error_quoting_a_flow_goes_to_the_flows_backend() {
    if !require_root("icmpv6_error_quoting_a_flow_goes_to_the_flows_backend") {
        return;
    }
    let (mut lb, amqp, _) = lab6();
    // The backend's reply [VIP]:5672 → [client]:40000, too big for a router.
    let reply_ip = Ip6::new(VIP6, CLIENT6, 6);
    let reply = tcp6(&reply_ip, 5672, 40000, ACK | PSH, &[0u8; 1400]);
    let mut quoted = reply_ip.header(reply.len());
    quoted.extend_from_slice(&reply);
    let err_ip = Ip6::new(ROUTER6, VIP6, 58);
    let err = frame6(
        &err_ip,
        &icmp6(&err_ip, 2, 0, 1400u32.to_be_bytes(), &quoted[..1232]),
    );
    let f = flow6(40000, 5672, PROTO_TCP);
    let hashed = amqp.predict(&f);
    let pinned = if hashed == 1 { 2 } else { 1 };
    lb.set_ct(&f, pinned, 0);
    let ct_before = lb.ct_len::<Flow6>();
    let before = lb.snapshot();
    let (action, out) = lb.run(&err);
    let after = lb.snapshot();
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_6in6(&err, pinned, &f),
        "the packet-too-big, untouched, in 6-in-6 to the backend conntrack names"
    );
    assert_eq!(before.counter(&after, Counter::IcmpForward), 1);

    // Without conntrack: the ring's backend, and no entry is made.
    let g = flow6(40002, 5672, PROTO_TCP);
    let reply = tcp6(&reply_ip, 5672, 40002, ACK, &[0u8; 64]);
    let mut quoted = reply_ip.header(reply.len());
    quoted.extend_from_slice(&reply);
    let unreach = frame6(&err_ip, &icmp6(&err_ip, 1, 3, [0; 4], &quoted));
    let want = amqp.predict(&g);
    let (action, out) = lb.run(&unreach);
    assert_eq!(action, XDP_TX);
    assert_eq!(out, expect_6in6(&unreach, want, &g));
    assert_eq!(
        lb.ct_len::<Flow6>(),
        ct_before,
        "an ICMPv6 error creates no conntrack entry"
    );

    // About a non-service port: the kernel's.
    let other = tcp6(&reply_ip, 22, 40000, ACK, &[]);
    let mut q = reply_ip.header(other.len());
    q.extend_from_slice(&other);
    let input = frame6(&err_ip, &icmp6(&err_ip, 2, 0, 1400u32.to_be_bytes(), &q));
    assert_eq!(lb.run(&input), (XDP_PASS, input.clone()));
}

#[test]
fn decap_strips_ipv6_tunnels_to_a_local_address_only() {
    if !require_root("decap_strips_ipv6_tunnels_to_a_local_address_only") {
        return;
    }
    let decap = Decap::load(&[BACKENDS6[0], v4_mapped(BACKENDS4[0])]);
    let inner6 = tcp6_frame(&client_ip6(6), 40000, 5672, SYN, b"hello");
    let ip4 = Ip4::new(CLIENT4, VIP4, PROTO_TCP);
    let inner4 = frame(&ip4, &tcp(&ip4, 40000, 5672, SYN, b"hello"));
    let mac = BACKEND_MACS[0];
    let cases = [
        (
            "6-in-6",
            ip6_tunnel_expected(LB_MAC, mac, LB6, BACKENDS6[0], 7, &inner6[14..]),
            &inner6,
        ),
        (
            "4-in-6",
            ip6_tunnel_expected(LB_MAC, mac, LB6, BACKENDS6[0], 7, &inner4[14..]),
            &inner4,
        ),
        (
            "6-in-4",
            ip6_in_ip4_expected(LB_MAC, mac, LB4, BACKENDS4[0], &inner6[14..]),
            &inner6,
        ),
    ];
    for (name, tunnelled, inner) in cases {
        let (action, out) = decap.run(&tunnelled);
        assert_eq!(action, XDP_PASS, "{name}");
        let mut want = eth(mac, LB_MAC, u16::from_be_bytes([inner[12], inner[13]]));
        want.extend_from_slice(&inner[14..]);
        assert_eq!(
            out, want,
            "{name}: outer header removed, inner packet intact"
        );
    }
    let to_other = ip6_tunnel_expected(LB_MAC, mac, LB6, BACKENDS6[1], 7, &inner6[14..]);
    assert_eq!(
        decap.run(&to_other),
        (XDP_PASS, to_other.clone()),
        "to another address: left alone"
    );
    assert_eq!(
        decap.run(&inner6),
        (XDP_PASS, inner6.clone()),
        "plain IPv6: left alone"
    );
}

#[test]
fn v6_uncached_next_hop_falls_back_to_the_fib() {
    if !require_root("v6_uncached_next_hop_falls_back_to_the_fib") {
        return;
    }
    // The LB side of a veth pair, 2001:db8:1::1/64, a neighbour for backend 1 only.
    let ns = FibNetns::new(
        "6",
        &[
            "-6 addr add 2001:db8:1::1/64 dev mqa nodad",
            "-6 neigh replace 2001:db8:1::11 lladdr 02:00:00:00:00:11 nud permanent dev mqa",
        ],
    );
    let a_mac = ns.mac("mqa");
    let (mut lb, amqp, _) = lab6();
    // Backends without a cached next hop: the IPv6 family flag only.
    for id in 1..=3 {
        lb.edit_backend(id, |b| {
            b.flags = backend_flags::IPV6;
            b.ifindex = 0;
            b.dst_mac = [0; 6];
        });
    }
    let sport_for = |want: u32| {
        (45000..46000u16)
            .find(|&p| amqp.predict(&flow6(p, 5672, PROTO_TCP)) == want)
            .expect("a port hashing to the backend")
    };
    let (p1, p2) = (sport_for(1), sport_for(2));
    ns.run(|| {
        let input = tcp6_frame(&client_ip6(6), p1, 5672, SYN, b"");
        let f = flow6(p1, 5672, PROTO_TCP);
        let before = lb.snapshot();
        let (action, out) = lb.run(&input);
        assert_eq!(
            action, 4,
            "XDP_REDIRECT: resolved by the FIB, out of veth a"
        );
        let want = ip6_tunnel_expected(
            a_mac,
            [2, 0, 0, 0, 0, 0x11],
            LB6,
            BACKENDS6[0],
            flow_label_v6(&f),
            &input[14..],
        );
        assert_eq!(out, want, "MACs from the FIB and the neighbour table");
        assert_eq!(before.counter(&lb.snapshot(), Counter::FibLookup), 1);

        let input = tcp6_frame(&client_ip6(6), p2, 5672, SYN, b"");
        let f = flow6(p2, 5672, PROTO_TCP);
        let before = lb.snapshot();
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_PASS, "no neighbour yet: the kernel resolves it");
        assert_eq!(
            &out[14..],
            &expect_6in6(&input, 2, &f)[14..],
            "passed already encapsulated"
        );
        assert_eq!(
            &out[..14],
            &[&input[..12], &out[12..14]].concat()[..],
            "the frame keeps its own MACs: addressed to this host, the stack forwards it"
        );
        assert_eq!(before.counter(&lb.snapshot(), Counter::NexthopPass), 1);

        let big = tcp6_frame(&client_ip6(6), p1, 5672, ACK, &vec![0u8; 1440]);
        let (action, out) = lb.run(&big);
        assert_eq!(
            action, XDP_TX,
            "the FIB reports the MTU: packet-too-big to the client"
        );
        assert_eq!(&out[54..56], &[2, 0]);
        assert_eq!(&out[58..62], &1460u32.to_be_bytes());
        assert_eq!(checksum6(&VIP6, &CLIENT6, 58, &out[54..]), 0);
    });
}
