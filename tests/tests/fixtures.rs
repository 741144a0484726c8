//! Layer 3: the real compiled XDP programs through BPF_PROG_TEST_RUN.
//!
//! Each test loads the object `lb-user` embeds, writes the maps the way the
//! daemon would, runs hand-built frames and checks the verdict, the exact
//! output bytes and the counter deltas. Needs root (CI runs as root).

use std::{net::Ipv4Addr, ops::RangeInclusive};

use lb_common::{
    backend_state, maglev::MaglevBackend, v4_mapped, Counter, DropReason, Flow4, HashMode,
    ServiceKey, PROTO_TCP, PROTO_UDP, RANGE_PORT,
};
use mqlb_tests::{frames::*, privileged::require_root, xdp::*};

const VIP: [u8; 4] = [10, 99, 0, 1];
const LB_ADDR: [u8; 4] = [10, 99, 1, 1];
const CLIENT: [u8; 4] = [192, 0, 2, 10];
const BACKENDS: [[u8; 4]; 4] = [
    [10, 99, 1, 11],
    [10, 99, 1, 12],
    [10, 99, 1, 13],
    [10, 99, 1, 14],
];

/// The IPv4 lab's map writes: backends by address, services on the VIP.
trait Lab4 {
    /// Backend `id` at `addr`, with the LB's address as outer source.
    fn backend(&mut self, id: u32, addr: [u8; 4], ifindex: u32, mtu: u16, state: u8);
    /// Backends `ids` at their `BACKENDS` addresses, active on the test-run
    /// interface, MTU 1500.
    fn active_backends(&mut self, ids: RangeInclusive<u32>);
    /// Service `id` on VIP:`port` with the ring of `members` (backend id, weight).
    fn service(
        &mut self,
        id: u32,
        port: u16,
        proto: u8,
        mode: HashMode,
        members: &[(u32, u32)],
        udp_idle_s: u32,
    ) -> Svc;
    /// A port-range service `lo..=hi` on the VIP (key port `RANGE_PORT`),
    /// and `RANGES[RANGES_COUNT]` = `count` as the daemon keeps it.
    fn range_service(
        &mut self,
        id: u32,
        ports: (u16, u16),
        proto: u8,
        mode: HashMode,
        members: &[(u32, u32)],
        count: u32,
    ) -> Svc;
}

impl Lab4 for Lb {
    fn backend(&mut self, id: u32, addr: [u8; 4], ifindex: u32, mtu: u16, state: u8) {
        let (addr, outer_src) = (v4_mapped(addr), v4_mapped(LB_ADDR));
        self.write_backend(id, addr, outer_src, ifindex, mtu, state);
    }

    fn active_backends(&mut self, ids: RangeInclusive<u32>) {
        for id in ids {
            let addr = BACKENDS[id as usize - 1];
            self.backend(id, addr, TEST_RUN_IFINDEX, 1500, backend_state::ACTIVE);
        }
    }

    fn service(
        &mut self,
        id: u32,
        port: u16,
        proto: u8,
        mode: HashMode,
        members: &[(u32, u32)],
        udp_idle_s: u32,
    ) -> Svc {
        let members: Vec<MaglevBackend> = members
            .iter()
            .map(|&(bid, weight)| MaglevBackend {
                addr: v4_mapped(BACKENDS[bid as usize - 1]),
                id: bid,
                weight,
            })
            .collect();
        self.write_service(id, service_key(port, proto), mode, udp_idle_s, &members)
    }

    fn range_service(
        &mut self,
        id: u32,
        (lo, hi): (u16, u16),
        proto: u8,
        mode: HashMode,
        members: &[(u32, u32)],
        count: u32,
    ) -> Svc {
        let mut svc = self.service(id, RANGE_PORT, proto, mode, members, 60);
        svc.value.port_lo = lo;
        svc.value.port_hi = hi;
        self.insert_service(service_key(RANGE_PORT, proto), svc.value);
        self.set_ranges(count);
        svc
    }
}

fn service_key(port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: v4_mapped(VIP),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

fn flow(src: [u8; 4], sport: u16, dport: u16, proto: u8) -> Flow4 {
    Flow4 {
        src,
        dst: VIP,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// Standard lab: three active backends on the test-run interface, MTU 1500, service 1 = VIP:5672/tcp.
fn amqp_lab() -> (Lb, Svc) {
    let mut lb = Lb::load();
    lb.active_backends(1..=3);
    let members = vec![(1, 100), (2, 100), (3, 100)];
    let svc = lb.service(1, 5672, PROTO_TCP, HashMode::FiveTuple, &members, 60);
    (lb, svc)
}

fn tcp_frame(src: [u8; 4], sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let ip = Ip4::new(src, VIP, PROTO_TCP);
    frame(&ip, &tcp(&ip, sport, dport, flags, payload))
}

fn udp_frame(src: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let ip = Ip4::new(src, VIP, PROTO_UDP);
    frame(&ip, &udp(&ip, sport, dport, payload))
}

fn expect_ipip(input: &[u8], backend_id: u32) -> Vec<u8> {
    ipip_expected(
        LB_MAC,
        BACKEND_MACS[backend_id as usize - 1],
        LB_ADDR,
        BACKENDS[backend_id as usize - 1],
        &input[14..],
    )
}

#[test]
fn non_service_traffic_passes_untouched() {
    if !require_root("non_service_traffic_passes_untouched") {
        return;
    }
    let (lb, _) = amqp_lab();
    let mut arp = eth([0xff; 6], CLIENT_MAC, 0x0806);
    arp.extend_from_slice(&[0u8; 28]);
    let mut ipv6 = eth(LB_MAC, CLIENT_MAC, 0x86dd);
    ipv6.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
    ipv6.extend_from_slice(&[0u8; 40]);
    let icmp_ip = Ip4::new(CLIENT, VIP, 1);
    let icmp = frame(&icmp_ip, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    let other_port = tcp_frame(CLIENT, 40000, 22, SYN, b"");
    let other_addr = {
        let ip = Ip4::new(CLIENT, LB_ADDR, PROTO_TCP);
        frame(&ip, &tcp(&ip, 40000, 5672, SYN, b""))
    };
    let udp_same_port = udp_frame(CLIENT, 40000, 5672, b"x");
    // BPF_PROG_TEST_RUN refuses frames under 14 bytes; an IPv4 ethertype
    // with nothing after it is the shortest runt the program can see.
    let runt = eth(LB_MAC, CLIENT_MAC, 0x0800);
    let cases: [(&str, &[u8]); 7] = [
        ("arp", &arp),
        ("ipv6", &ipv6),
        ("icmp to the VIP", &icmp),
        ("tcp to an unserved port", &other_port),
        ("tcp to another address", &other_addr),
        ("udp to a tcp service port", &udp_same_port),
        ("ipv4 ethertype, no ip header", &runt),
    ];
    for (name, input) in cases {
        let before = lb.snapshot();
        let (action, out) = lb.run(input);
        let after = lb.snapshot();
        assert_eq!(action, XDP_PASS, "{name}: verdict");
        assert_eq!(out, input, "{name}: bytes must be untouched");
        assert_eq!(before.counter(&after, Counter::Rx), 1, "{name}: rx");
        assert_eq!(before.counter(&after, Counter::Pass), 1, "{name}: pass");
        assert_eq!(
            before.counter(&after, Counter::CtMiss),
            0,
            "{name}: no service lookup hit"
        );
    }
}

#[test]
fn new_tcp_flow_is_encapsulated_to_the_predicted_backend() {
    if !require_root("new_tcp_flow_is_encapsulated_to_the_predicted_backend") {
        return;
    }
    let (lb, svc) = amqp_lab();
    let mut seen = [0u32; 4];
    for sport in 40000..40032u16 {
        let input = tcp_frame(CLIENT, sport, 5672, SYN, b"");
        let f = flow(CLIENT, sport, 5672, PROTO_TCP);
        let want = svc.predict(&f);
        let before = lb.snapshot();
        let be_before = lb.traffic("BE_STATS", want);
        let (action, out) = lb.run(&input);
        let after = lb.snapshot();
        assert_eq!(action, XDP_TX, "port {sport}");
        assert_eq!(
            out,
            expect_ipip(&input, want),
            "port {sport}: exact IPIP bytes to backend {want}"
        );
        assert_eq!(
            lb.ct(&f).map(|e| e.backend),
            Some(want),
            "conntrack pins the flow"
        );
        assert_eq!(before.counter(&after, Counter::CtMiss), 1);
        assert_eq!(before.counter(&after, Counter::Tx), 1);
        let be_after = lb.traffic("BE_STATS", want);
        assert_eq!(be_after.new_flows - be_before.new_flows, 1);
        assert_eq!(be_after.bytes - be_before.bytes, (input.len() - 14) as u64);
        seen[want as usize] += 1;
    }
    assert!(
        seen[1] > 0 && seen[2] > 0 && seen[3] > 0,
        "32 flows over 3 backends use all of them: {seen:?}"
    );
    assert_eq!(lb.traffic("SVC_STATS", 1).packets, 32);
}

#[test]
fn established_flow_follows_conntrack_and_syn_rehashes() {
    if !require_root("established_flow_follows_conntrack_and_syn_rehashes") {
        return;
    }
    let (mut lb, svc) = amqp_lab();
    let f = flow(CLIENT, 41000, 5672, PROTO_TCP);
    let hashed = svc.predict(&f);
    let pinned = if hashed == 1 { 2 } else { 1 };
    lb.set_ct(&f, pinned, 0);

    let data = tcp_frame(CLIENT, 41000, 5672, ACK | PSH, b"AMQP\x00\x00\x09\x01");
    let before = lb.snapshot();
    let (action, out) = lb.run(&data);
    let after = lb.snapshot();
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_ipip(&data, pinned),
        "the conntrack entry wins over the ring"
    );
    assert_eq!(before.counter(&after, Counter::CtHit), 1);
    assert_eq!(before.counter(&after, Counter::CtMiss), 0);

    let syn = tcp_frame(CLIENT, 41000, 5672, SYN, b"");
    let (action, out) = lb.run(&syn);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_ipip(&syn, hashed),
        "a SYN starts over from the ring"
    );
    assert_eq!(lb.ct(&f).map(|e| e.backend), Some(hashed));
}

#[test]
fn drained_backend_keeps_its_flows_but_gets_no_new_ones() {
    if !require_root("drained_backend_keeps_its_flows_but_gets_no_new_ones") {
        return;
    }
    let (mut lb, svc) = amqp_lab();
    // Establish 30 flows, remember which ones went to backend 2.
    let mut on_two = Vec::new();
    for sport in 42000..42030u16 {
        let (action, _) = lb.run(&tcp_frame(CLIENT, sport, 5672, SYN, b""));
        assert_eq!(action, XDP_TX);
        if svc.predict(&flow(CLIENT, sport, 5672, PROTO_TCP)) == 2 {
            on_two.push(sport);
        }
    }
    assert!(!on_two.is_empty(), "some of 30 flows hash to backend 2");
    // Drain backend 2 as the daemon does: state DRAINING, ring rebuilt without it.
    lb.backend(
        2,
        BACKENDS[1],
        TEST_RUN_IFINDEX,
        1500,
        backend_state::DRAINING,
    );
    let drained = vec![(1, 100), (3, 100)];
    let svc = lb.service(1, 5672, PROTO_TCP, HashMode::FiveTuple, &drained, 60);
    for &sport in &on_two {
        let input = tcp_frame(CLIENT, sport, 5672, ACK, b"");
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_TX);
        assert_eq!(
            out,
            expect_ipip(&input, 2),
            "established flow {sport} stays on the drained backend"
        );
    }
    for sport in 43000..43060u16 {
        let input = tcp_frame(CLIENT, sport, 5672, SYN, b"");
        let want = svc.predict(&flow(CLIENT, sport, 5672, PROTO_TCP));
        assert_ne!(want, 2);
        let (_, out) = lb.run(&input);
        assert_eq!(out, expect_ipip(&input, want), "new flow {sport}");
    }
}

#[test]
fn udp_rtp_and_rtcp_of_a_stream_share_a_backend() {
    if !require_root("udp_rtp_and_rtcp_of_a_stream_share_a_backend") {
        return;
    }
    let mut lb = Lb::load();
    lb.active_backends(1..=3);
    let members = vec![(1, 1), (2, 1), (3, 1)];
    let svc = lb.service(2, 5004, PROTO_UDP, HashMode::Rtp, &members, 60);
    let mut seen = [0u32; 4];
    for stream in 0..24u16 {
        let rtp_port = 30000 + stream * 2;
        let rtp = udp_frame(CLIENT, rtp_port, 5004, b"\x80\x60rtp");
        let rtcp = udp_frame(CLIENT, rtp_port + 1, 5004, b"\x80\xc8rtcp");
        let want = svc.predict(&flow(CLIENT, rtp_port, 5004, PROTO_UDP));
        let (a1, o1) = lb.run(&rtp);
        let (a2, o2) = lb.run(&rtcp);
        assert_eq!((a1, a2), (XDP_TX, XDP_TX));
        assert_eq!(o1, expect_ipip(&rtp, want), "RTP of stream {stream}");
        assert_eq!(
            o2,
            expect_ipip(&rtcp, want),
            "RTCP of stream {stream} on the same relay"
        );
        seen[want as usize] += 1;
    }
    assert!(
        seen[1..].iter().all(|&n| n > 0),
        "24 streams use every relay: {seen:?}"
    );
}

/// A port-range service takes every port of its range (RTP on an even port
/// and RTCP on the next one land on one relay), an exact-port service on the
/// same VIP wins over it, ports outside pass untouched, and while the
/// daemon's range count is 0 the range is not looked up at all.
#[test]
fn port_range_service_takes_its_ports_and_exact_port_wins() {
    if !require_root("port_range_service_takes_its_ports_and_exact_port_wins") {
        return;
    }
    let mut lb = Lb::load();
    lb.active_backends(1..=4);
    let members = vec![(1, 100), (2, 100), (3, 100)];
    let range = lb.range_service(3, (10000, 10999), PROTO_UDP, HashMode::Rtp, &members, 1);
    lb.service(4, 10500, PROTO_UDP, HashMode::FiveTuple, &[(4, 100)], 60);

    let mut seen = [0u32; 5];
    for stream in 0..24u16 {
        let (sport, dport) = (30000 + 2 * stream, 10000 + 2 * stream);
        let rtp = udp_frame(CLIENT, sport, dport, b"\x80\x00rtp");
        let rtcp = udp_frame(CLIENT, sport + 1, dport + 1, b"\x80\xc8rtcp");
        let want = range.predict(&flow(CLIENT, sport, dport, PROTO_UDP));
        assert_eq!(
            lb.run(&rtp),
            (XDP_TX, expect_ipip(&rtp, want)),
            "RTP {stream}"
        );
        assert_eq!(
            lb.run(&rtcp),
            (XDP_TX, expect_ipip(&rtcp, want)),
            "RTCP of stream {stream} on its RTP's relay"
        );
        seen[want as usize] += 1;
    }
    assert!(seen[1..4].iter().all(|&n| n > 0), "every relay: {seen:?}");
    assert_eq!(seen[4], 0, "backend 4 is not in the range's ring");
    assert_eq!(lb.traffic("SVC_STATS", 3).packets, 48);

    // The exact port inside the range belongs to its own service.
    let exact = udp_frame(CLIENT, 40000, 10500, b"exact");
    assert_eq!(lb.run(&exact), (XDP_TX, expect_ipip(&exact, 4)));
    // Just outside the range: not a service.
    for port in [9999, 11000] {
        let f = udp_frame(CLIENT, 40000, port, b"outside");
        assert_eq!(lb.run(&f), (XDP_PASS, f.clone()), "port {port}");
    }
    // TCP to a port of the UDP range: not a service either.
    let tcp = tcp_frame(CLIENT, 40000, 10002, SYN, b"");
    assert_eq!(lb.run(&tcp), (XDP_PASS, tcp.clone()));
    // With no range service counted, the range entry is never looked up.
    lb.set_ranges(0);
    let f = udp_frame(CLIENT, 40002, 10010, b"gated");
    assert_eq!(lb.run(&f), (XDP_PASS, f.clone()));
}

#[test]
fn udp_flow_idles_out_and_rehashes() {
    if !require_root("udp_flow_idles_out_and_rehashes") {
        return;
    }
    let mut lb = Lb::load();
    lb.active_backends(1..=3);
    let members = vec![(1, 1), (2, 1), (3, 1)];
    let svc = lb.service(2, 5004, PROTO_UDP, HashMode::FiveTuple, &members, 1);
    let f = flow(CLIENT, 30000, 5004, PROTO_UDP);
    let hashed = svc.predict(&f);
    let other = if hashed == 1 { 2 } else { 1 };
    let now = monotonic_ns();
    let input = udp_frame(CLIENT, 30000, 5004, b"x");

    lb.set_ct(&f, other, now);
    let (_, out) = lb.run(&input);
    assert_eq!(
        out,
        expect_ipip(&input, other),
        "a fresh UDP entry pins the flow"
    );

    assert!(
        now > 3_000_000_000,
        "monotonic clock too young for this test"
    );
    lb.set_ct(&f, other, now - 2_000_000_000);
    let (_, out) = lb.run(&input);
    assert_eq!(
        out,
        expect_ipip(&input, hashed),
        "an entry idle for longer than udp_idle_s is re-hashed"
    );
    let e = lb.ct(&f).unwrap();
    assert_eq!(e.backend, hashed);
    assert!(e.seen_ns >= now, "re-inserted with the current time");
}

#[test]
fn no_backend_drops_and_counts() {
    if !require_root("no_backend_drops_and_counts") {
        return;
    }
    let mut lb = Lb::load();
    lb.service(1, 5672, PROTO_TCP, HashMode::FiveTuple, &[], 60);
    let before = lb.snapshot();
    let (action, _) = lb.run(&tcp_frame(CLIENT, 40000, 5672, SYN, b""));
    let after = lb.snapshot();
    assert_eq!(action, XDP_DROP);
    assert_eq!(before.drop(&after, DropReason::NoBackend), 1);
    assert_eq!(before.counter(&after, Counter::Drop), 1);
    assert_eq!(
        lb.traffic("SVC_STATS", 1).packets,
        1,
        "service traffic is counted even when dropped"
    );
}

#[test]
fn malformed_fragmented_and_optioned_packets_to_a_vip() {
    if !require_root("malformed_fragmented_and_optioned_packets_to_a_vip") {
        return;
    }
    let (lb, _) = amqp_lab();
    let good = tcp_frame(CLIENT, 40000, 5672, SYN, b"");

    // TCP header cut after the ports: the service is known, the flags are not.
    let mut short_tcp = good[..14 + 20 + 4].to_vec();
    let total = (20 + 4) as u16;
    short_tcp[16..18].copy_from_slice(&total.to_be_bytes());
    short_tcp[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&short_tcp[14..34]);
    short_tcp[24..26].copy_from_slice(&c.to_be_bytes());

    // Total length claims more bytes than the frame has.
    let mut long_len = good.clone();
    long_len[16..18].copy_from_slice(&1000u16.to_be_bytes());

    let frag_first = {
        let mut ip = Ip4::new(CLIENT, VIP, PROTO_TCP);
        ip.frag = 0x2000;
        frame(&ip, &tcp(&ip, 40000, 5672, SYN, &[0u8; 64]))
    };
    let frag_later = {
        let mut ip = Ip4::new(CLIENT, VIP, PROTO_TCP);
        ip.frag = 0x0008; // offset 64 bytes, no ports inside
        frame(&ip, &[0xabu8; 40])
    };
    let optioned = {
        let mut ip = Ip4::new(CLIENT, VIP, PROTO_TCP);
        ip.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        frame(&ip, &tcp(&ip, 40000, 5672, SYN, b""))
    };
    let ip_only = good[..14 + 20].to_vec();

    let cases: [(&str, &[u8], u32, Option<DropReason>); 6] = [
        (
            "tcp header cut short",
            &short_tcp,
            XDP_DROP,
            Some(DropReason::MalformedL4),
        ),
        (
            "total length beyond the frame",
            &long_len,
            XDP_DROP,
            Some(DropReason::MalformedIp),
        ),
        (
            "first fragment",
            &frag_first,
            XDP_DROP,
            Some(DropReason::Fragment),
        ),
        (
            "later fragment (no ports: not matchable)",
            &frag_later,
            XDP_PASS,
            None,
        ),
        (
            "ip options",
            &optioned,
            XDP_DROP,
            Some(DropReason::IpOptions),
        ),
        (
            "ip header without l4 (ports unknown)",
            &ip_only,
            XDP_PASS,
            None,
        ),
    ];
    for (name, input, want, reason) in cases {
        let before = lb.snapshot();
        let (action, out) = lb.run(input);
        let after = lb.snapshot();
        assert_eq!(action, want, "{name}: verdict");
        match reason {
            Some(r) => {
                assert_eq!(
                    before.drop(&after, r),
                    1,
                    "{name}: drop reason {}",
                    r.name()
                );
                assert_eq!(before.counter(&after, Counter::Drop), 1, "{name}");
            }
            None => {
                assert_eq!(out, input, "{name}: passed untouched");
                assert_eq!(after.drops, before.drops, "{name}: no drop counted");
            }
        }
    }
}

#[test]
fn too_big_answers_icmp_fragmentation_needed() {
    if !require_root("too_big_answers_icmp_fragmentation_needed") {
        return;
    }
    let (lb, _) = amqp_lab();
    // 1500-byte IP packet: 1520 once encapsulated, over the 1500 MTU.
    let payload = vec![0x5au8; 1500 - 40];
    let input = tcp_frame(CLIENT, 40000, 5672, ACK, &payload);
    assert_eq!(input.len(), 1514);
    let before = lb.snapshot();
    let (action, out) = lb.run(&input);
    let after = lb.snapshot();
    assert_eq!(action, XDP_TX, "answered out of the same port");
    // Expected: Ethernet back to the client, IPv4 VIP → client, ICMP 3/4 with
    // MTU 1480, quoting the client's IPv4 header and 8 bytes of TCP.
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&1480u16.to_be_bytes());
    icmp.extend_from_slice(&input[14..14 + 28]);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ip = Ip4 {
        src: VIP,
        dst: CLIENT,
        proto: 1,
        tos: 0,
        ttl: 64,
        ident: 0,
        frag: 0,
        options: vec![],
    };
    let mut want = eth(CLIENT_MAC, LB_MAC, 0x0800);
    want.extend_from_slice(&ip.header(icmp.len()));
    want.extend_from_slice(&icmp);
    assert_eq!(out, want, "exact ICMP fragmentation-needed bytes");
    assert_eq!(before.counter(&after, Counter::IcmpTooBig), 1);

    // 1480 bytes fit exactly.
    let fits = tcp_frame(CLIENT, 40001, 5672, ACK, &vec![0x5au8; 1480 - 40]);
    assert_eq!(lb.run(&fits).0, XDP_TX);
    assert_eq!(lb.run(&fits).1.len(), 1514);

    // Without DF the client would ignore ICMP: dropped and counted.
    let no_df = {
        let mut ip = Ip4::new(CLIENT, VIP, PROTO_TCP);
        ip.frag = 0;
        frame(&ip, &tcp(&ip, 40002, 5672, ACK, &payload))
    };
    let before = lb.snapshot();
    assert_eq!(lb.run(&no_df).0, XDP_DROP);
    assert_eq!(before.drop(&lb.snapshot(), DropReason::TooBigNoDf), 1);
}

#[test]
fn backend_on_another_interface_is_redirected() {
    if !require_root("backend_on_another_interface_is_redirected") {
        return;
    }
    let (mut lb, svc) = amqp_lab();
    for id in 1..=3 {
        lb.backend(
            id,
            BACKENDS[id as usize - 1],
            4242,
            1500,
            backend_state::ACTIVE,
        );
    }
    let input = tcp_frame(CLIENT, 40000, 5672, SYN, b"");
    let want = svc.predict(&flow(CLIENT, 40000, 5672, PROTO_TCP));
    let before = lb.snapshot();
    let (action, out) = lb.run(&input);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(out, expect_ipip(&input, want));
    assert_eq!(before.counter(&lb.snapshot(), Counter::Redirect), 1);
}

#[test]
fn removed_backend_in_conntrack_still_forwards_missing_one_drops() {
    if !require_root("removed_backend_in_conntrack_still_forwards_missing_one_drops") {
        return;
    }
    let (mut lb, _) = amqp_lab();
    let f = flow(CLIENT, 44000, 5672, PROTO_TCP);
    lb.backend(
        4,
        BACKENDS[3],
        TEST_RUN_IFINDEX,
        1500,
        backend_state::REMOVED,
    );
    lb.set_ct(&f, 4, 0);
    let input = tcp_frame(CLIENT, 44000, 5672, ACK, b"");
    let (action, out) = lb.run(&input);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_ipip(&input, 4),
        "a deleted backend finishes its established flows"
    );

    let g = flow(CLIENT, 44001, 5672, PROTO_TCP);
    lb.set_ct(&g, 9, 0);
    let before = lb.snapshot();
    let (action, _) = lb.run(&tcp_frame(CLIENT, 44001, 5672, ACK, b""));
    assert_eq!(action, XDP_DROP);
    assert_eq!(before.drop(&lb.snapshot(), DropReason::BackendMissing), 1);
}

#[test]
fn decap_strips_ipip_to_a_local_address_only() {
    if !require_root("decap_strips_ipip_to_a_local_address_only") {
        return;
    }
    let decap = Decap::load(&[v4_mapped(BACKENDS[0])]);
    let inner = tcp_frame(CLIENT, 40000, 5672, SYN, b"hello");
    let to_me = ipip_expected(LB_MAC, BACKEND_MACS[0], LB_ADDR, BACKENDS[0], &inner[14..]);
    let (action, out) = decap.run(&to_me);
    assert_eq!(action, XDP_PASS);
    let mut want = eth(BACKEND_MACS[0], LB_MAC, 0x0800);
    want.extend_from_slice(&inner[14..]);
    assert_eq!(out, want, "outer header removed, inner packet intact");

    let to_other = ipip_expected(LB_MAC, BACKEND_MACS[1], LB_ADDR, BACKENDS[1], &inner[14..]);
    let (action, out) = decap.run(&to_other);
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, to_other, "IPIP to another address is left alone");
    let (_, out) = decap.run(&inner);
    assert_eq!(out, inner, "plain traffic is left alone");
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[allow(dead_code)]
fn addr(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

#[test]
fn uncached_next_hop_falls_back_to_the_fib() {
    if !require_root("uncached_next_hop_falls_back_to_the_fib") {
        return;
    }
    // The LB side of a veth pair, 10.99.1.1/24, a neighbour for backend 1 only.
    let ns = FibNetns::new(
        "4",
        &[
            "addr add 10.99.1.1/24 dev mqa",
            "neigh replace 10.99.1.11 lladdr 02:00:00:00:00:11 nud permanent dev mqa",
        ],
    );
    let a_mac = ns.mac("mqa");
    let (mut lb, svc) = amqp_lab();
    // Backends 1..3 without a cached next hop: 1 has a neighbour entry,
    // 2 and 3 are on-link but unresolved.
    for id in 1..=3 {
        lb.edit_backend(id, |b| {
            b.flags = 0;
            b.ifindex = 0;
            b.dst_mac = [0; 6];
        });
    }
    let sport_for = |want: u32| {
        (45000..46000u16)
            .find(|&p| svc.predict(&flow(CLIENT, p, 5672, PROTO_TCP)) == want)
            .expect("a port hashing to the backend")
    };
    let (p1, p2) = (sport_for(1), sport_for(2));
    ns.run(|| {
        let input = tcp_frame(CLIENT, p1, 5672, SYN, b"");
        let before = lb.snapshot();
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_REDIRECT, "resolved by the FIB, out of veth a");
        let want = ipip_expected(
            a_mac,
            [2, 0, 0, 0, 0, 0x11],
            LB_ADDR,
            BACKENDS[0],
            &input[14..],
        );
        assert_eq!(out, want, "MACs from the FIB and the neighbour table");
        assert_eq!(before.counter(&lb.snapshot(), Counter::FibLookup), 1);

        let input = tcp_frame(CLIENT, p2, 5672, SYN, b"");
        let before = lb.snapshot();
        let (action, out) = lb.run(&input);
        assert_eq!(action, XDP_PASS, "no neighbour yet: the kernel resolves it");
        assert_eq!(
            &out[14..],
            &expect_ipip(&input, 2)[14..],
            "passed already encapsulated"
        );
        assert_eq!(
            &out[..14],
            &[&input[..12], &out[12..14]].concat()[..],
            "the frame keeps its own MACs: addressed to this host, the stack forwards it"
        );
        assert_eq!(before.counter(&lb.snapshot(), Counter::NexthopPass), 1);

        let big = tcp_frame(CLIENT, p1, 5672, ACK, &vec![0u8; 1460]);
        let (action, out) = lb.run(&big);
        assert_eq!(
            action, XDP_TX,
            "the FIB reports the MTU: ICMP back to the client"
        );
        assert_eq!(&out[14 + 20..14 + 20 + 2], &[3, 4]);
        assert_eq!(&out[14 + 26..14 + 28], &1480u16.to_be_bytes());
    });
}

#[test]
fn flows_of_a_down_backend_move_to_a_healthy_one() {
    if !require_root("flows_of_a_down_backend_move_to_a_healthy_one") {
        return;
    }
    let (mut lb, _) = amqp_lab();
    let media_members = vec![(1, 100), (2, 100), (3, 100)];
    lb.service(2, 5004, PROTO_UDP, HashMode::Rtp, &media_members, 60);
    // Flows pinned to backend 2, then backend 2 fails its health check: the
    // daemon marks it DOWN and rebuilds both rings without it.
    let tcp_flow = flow(CLIENT, 46000, 5672, PROTO_TCP);
    let udp_flow = flow(CLIENT, 46002, 5004, PROTO_UDP);
    let now = monotonic_ns();
    lb.set_ct(&tcp_flow, 2, 0);
    lb.set_ct(&udp_flow, 2, now);
    lb.backend(2, BACKENDS[1], TEST_RUN_IFINDEX, 1500, backend_state::DOWN);
    let healthy = vec![(1, 100), (3, 100)];
    let amqp = lb.service(1, 5672, PROTO_TCP, HashMode::FiveTuple, &healthy, 60);
    let media = lb.service(2, 5004, PROTO_UDP, HashMode::Rtp, &healthy, 60);

    let svc_before = lb.traffic("SVC_STATS", 2);
    let rtp = udp_frame(CLIENT, 46002, 5004, b"\x80\x60rtp");
    let want = media.predict(&udp_flow);
    assert_ne!(want, 2);
    let (action, out) = lb.run(&rtp);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_ipip(&rtp, want),
        "the media flow continues on a healthy relay"
    );
    assert_eq!(
        lb.ct(&udp_flow).map(|e| e.backend),
        Some(want),
        "conntrack follows it"
    );
    assert_eq!(
        lb.traffic("SVC_STATS", 2).new_flows - svc_before.new_flows,
        1,
        "counted as a new flow of the service"
    );
    let (_, again) = lb.run(&rtp);
    assert_eq!(again, out, "and stays there");

    let ack = tcp_frame(CLIENT, 46000, 5672, ACK | PSH, b"x");
    let want = amqp.predict(&tcp_flow);
    let (action, out) = lb.run(&ack);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        out,
        expect_ipip(&ack, want),
        "TCP is re-hashed: the new backend resets it, the client fails fast"
    );
}
