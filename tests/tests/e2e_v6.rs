//! Layer 4, IPv6: the namespace lab with its IPv6 plane (`LabConfig::ipv6`),
//! the daemon and `mqlb decap` as in `e2e.rs`. IPv6 clients through the IPv6
//! VIP to IPv6 backends (6-in-6), and the mixed families the data plane
//! takes: an IPv4 VIP with IPv6 backends (4-in-6) and an IPv6 VIP with IPv4
//! backends (6-in-4).
//!
//! Every flow's backend is predicted from the daemon's pinned maps with
//! `lb_common::hash::flow_hash_v4/v6` (what the program runs) and checked
//! against the backend that greeted. Every wait polls a condition.

use lb_common::{backend_flags, Counter, PROTO_TCP, PROTO_UDP};
use mqlb_tests::conn::{self, IO_TIMEOUT};
use mqlb_tests::lab::{find_counter, wait_for, Lab, LabConfig, XdpMode};
use mqlb_tests::privileged::require_root;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

const AMQP: u16 = 5672;
const MEDIA: u16 = 5004;
const RING_DEADLINE: Duration = Duration::from_secs(10);

fn start_lab(mode: XdpMode) -> Lab {
    Lab::start(LabConfig {
        mode,
        ipv6: true,
        ..LabConfig::default()
    })
    .unwrap_or_else(|e| panic!("the lab did not start: {e:#}"))
}

/// The backends' IPv4 addresses.
fn v4_backends(lab: &Lab) -> Vec<IpAddr> {
    lab.backends.iter().map(|b| IpAddr::V4(b.addr)).collect()
}

/// The backends' IPv6 addresses.
fn v6_backends(lab: &Lab) -> Vec<IpAddr> {
    lab.backends.iter().map(|b| IpAddr::V6(b.v6())).collect()
}

fn vip6(lab: &Lab) -> IpAddr {
    IpAddr::V6(lab.vip6.expect("the lab has an IPv6 VIP"))
}

/// Waits until the live ring of `vip:port/proto` holds exactly `want`.
fn wait_ring(lab: &Lab, vip: IpAddr, port: u16, proto: u8, want: &BTreeSet<IpAddr>) {
    wait_for(
        &format!("the ring of {vip} port {port} to hold {want:?}"),
        RING_DEADLINE,
        || {
            let maps = lab.maps()?;
            let svc = match vip {
                IpAddr::V4(a) => maps.service_v4(a, port, proto)?,
                IpAddr::V6(a) => maps.service_v6(a, port, proto)?,
            };
            let ids: BTreeSet<u32> = maps.ring(&svc)?.into_iter().filter(|&i| i != 0).collect();
            let members = ids
                .into_iter()
                .map(|id| maps.backend_ip(id))
                .collect::<anyhow::Result<BTreeSet<IpAddr>>>()?;
            Ok((&members == want).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

/// Adds service `name` on `vip:port` and one backend per address, waits for the ring.
fn service(lab: &Lab, name: &str, vip: IpAddr, port: u16, proto: &str, backends: &[IpAddr]) {
    let added = match vip {
        IpAddr::V4(_) => lab.add_service(name, port, proto, None),
        IpAddr::V6(_) => lab.add_service6(name, port, proto, None),
    };
    added.unwrap_or_else(|e| panic!("service add {name}: {e:#}"));
    for b in backends {
        lab.mqlb(&["backend", "add", name, &b.to_string()])
            .unwrap_or_else(|e| panic!("backend add {b}: {e:#}"));
    }
    let proto = if proto == "tcp" { PROTO_TCP } else { PROTO_UDP };
    wait_ring(lab, vip, port, proto, &backends.iter().copied().collect());
    wait_nexthops(lab, backends);
}

/// Waits until the daemon cached every backend's next hop (IPv6 routes and
/// neighbours included): these tests check the program's own forwarding;
/// `first_packets_to_unresolved_neighbours` checks the path through the stack.
fn wait_nexthops(lab: &Lab, backends: &[IpAddr]) {
    wait_for(
        "every backend's next hop in BACKENDS",
        RING_DEADLINE,
        || {
            let maps = lab.maps()?;
            for id in 1..lb_common::MAX_BACKENDS {
                let Ok(entry) = maps.backend(id) else {
                    continue;
                };
                let ip = maps.backend_ip(id)?;
                if backends.contains(&ip) && entry.flags & backend_flags::NEXTHOP == 0 {
                    anyhow::bail!("backend {ip} (id {id}) has no next hop yet");
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

/// Opens `n` TCP connections from the client to `vip:AMQP` (greetings
/// checked: accepted on the VIP, the client's own address seen: DSR, no
/// NAT); checks that each backend is the one the ring predicts, and one
/// exchange. Returns connections per backend name.
fn tcp_flows(lab: &Lab, vip: IpAddr, n: usize) -> BTreeMap<String, usize> {
    let dst = SocketAddr::new(vip, AMQP);
    let conns = conn::open_conns(lab, dst, n);
    let maps = lab.maps().expect("pinned maps");
    let svc = match vip {
        IpAddr::V4(a) => maps.service_v4(a, AMQP, PROTO_TCP),
        IpAddr::V6(a) => maps.service_v6(a, AMQP, PROTO_TCP),
    }
    .expect("service entry");
    let mut counts = BTreeMap::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let want = maps
            .predict_any(&svc, c.src, dst, PROTO_TCP)
            .expect("predict");
        let want = &lab.backend_by_ip(want).expect("predicted backend").name;
        assert_eq!(
            &c.backend, want,
            "flow {} landed on {} but the ring says {want}",
            c.src, c.backend
        );
        assert_eq!(
            &c.ask(&format!("msg {i}")),
            want,
            "flow {} kept its backend",
            c.src
        );
        *counts.entry(c.backend).or_insert(0) += 1;
    }
    counts
}

/// 60 IPv6 TCP connections to [VIP6]:5672 over IPv6 backends (6-in-6): each
/// on the predicted backend, exchanging data; the spread reaches every backend.
fn tcp6_flows_predicted(mode: XdpMode) {
    let mut lab = start_lab(mode);
    lab.serve_tcp6(AMQP).expect("backend TCP servers");
    let backends = v6_backends(&lab);
    service(&lab, "amqp6", vip6(&lab), AMQP, "tcp", &backends);
    let counts = tcp_flows(&lab, vip6(&lab), 60);
    eprintln!("IPv6 connections per backend: {counts:?}");
    // 60 flows over 3 equal backends: P(one gets none) = 3 * (2/3)^60 ≈ 8e-11.
    assert_eq!(counts.len(), 3, "every backend took flows: {counts:?}");
}

mqlb_tests::in_both_modes! {
    tcp6_flows_predicted: tcp6_flows_predicted_skb, tcp6_flows_predicted_native;
    one_mib_with_ipv6_pmtu: one_mib_with_ipv6_pmtu_skb, one_mib_with_ipv6_pmtu_native;
}

/// `icmp_too_big` as `mqlb stats --json` shows it.
fn too_big_sent(lab: &Lab) -> u64 {
    let stats = lab.stats_json().unwrap_or_else(|e| panic!("{e:#}"));
    let name = Counter::IcmpTooBig.name();
    find_counter(&stats, name)
        .unwrap_or_else(|| panic!("`mqlb stats --json` has no {name} counter: {stats}"))
}

/// A second TCP port on the IPv6 VIP, for the 6-in-4 service.
const AMQP_ALT: u16 = 5673;

/// 1 MiB through the VIP over 1500-byte links, through each tunnel that
/// involves IPv6: an IPv6 client through the IPv6 VIP to IPv4 backends
/// (6-in-4, 20 bytes more) and to IPv6 backends (6-in-6, 40 more), where the
/// LB answers ICMPv6 packet-too-big, and an IPv4 client through the IPv4 VIP
/// to IPv6 backends (4-in-6, 40 more: ICMP fragmentation-needed). The
/// client's path-MTU discovery shrinks its segments; the bytes arrive intact
/// at the predicted backend. 6-in-4 goes first: the client caches one path
/// MTU per destination, and 6-in-6's smaller one must still be learnt.
fn one_mib_with_ipv6_pmtu(mode: XdpMode) {
    let mut lab = start_lab(mode);
    lab.serve_tcp6(AMQP).expect("IPv6 VIP servers");
    lab.serve_tcp6(AMQP_ALT).expect("IPv6 VIP servers");
    lab.serve_tcp(AMQP).expect("IPv4 VIP servers");
    let v6 = v6_backends(&lab);
    let v4 = v4_backends(&lab);
    let (vip6, vip4) = (vip6(&lab), IpAddr::V4(lab.vip));
    service(&lab, "six-in-four", vip6, AMQP_ALT, "tcp", &v4);
    service(&lab, "six-in-six", vip6, AMQP, "tcp", &v6);
    service(&lab, "four-in-six", vip4, AMQP, "tcp", &v6);
    let data = conn::pattern(1 << 20);
    // The path MTU is the 1500-byte links' less the outer header.
    for (dst, tunnel, mtu) in [
        (SocketAddr::new(vip6, AMQP_ALT), "6-in-4", 1480),
        (SocketAddr::new(vip6, AMQP), "6-in-6", 1460),
        (SocketAddr::new(vip4, AMQP), "4-in-6", 1460),
    ] {
        let before = too_big_sent(&lab);
        let mut c = conn::open_conns(&lab, dst, 1)
            .pop()
            .expect("one connection");
        let maps = lab.maps().expect("pinned maps");
        let svc = match dst.ip() {
            IpAddr::V4(a) => maps.service_v4(a, dst.port(), PROTO_TCP),
            IpAddr::V6(a) => maps.service_v6(a, dst.port(), PROTO_TCP),
        }
        .expect("service entry");
        let want = maps
            .predict_any(&svc, c.src, dst, PROTO_TCP)
            .expect("predict");
        let want = &lab.backend_by_ip(want).expect("predicted backend").name;
        assert_eq!(
            &c.backend, want,
            "{tunnel}: flow {} not where the ring says",
            c.src
        );
        let (reply, intact) = c.bulk(&data).unwrap_or_else(|e| {
            panic!(
                "{tunnel}: sending 1 MiB to {dst} stalled: {e}\n{}",
                lab.diagnostics()
            )
        });
        assert_eq!(
            reply, intact,
            "{tunnel}: the bytes arrived intact at {want}"
        );
        let after = too_big_sent(&lab);
        let route = lab
            .client
            .ip(&["route", "get", &dst.ip().to_string()])
            .unwrap_or_default();
        eprintln!("{tunnel}: icmp_too_big {before} -> {after}; client route: {route}");
        assert!(
            after > before,
            "{tunnel}: icmp_too_big stayed at {after}: the LB sent no too-big \
             (client route: {route})"
        );
        assert!(
            route.contains(&format!("mtu {mtu} ")),
            "{tunnel}: the client learnt path MTU {mtu}: {route}"
        );
    }
}

/// 60 IPv6 UDP flows, three datagrams each, answered from the VIP by the
/// predicted backend.
#[test]
fn udp6_flows_predicted() {
    if !require_root("udp6_flows_predicted") {
        return;
    }
    let mut lab = start_lab(XdpMode::Skb);
    lab.serve_udp6(MEDIA).expect("backend UDP servers");
    let backends = v6_backends(&lab);
    let vip = vip6(&lab);
    service(&lab, "media6", vip, MEDIA, "udp", &backends);
    const FLOWS: usize = 60;
    let (client, dst) = (lab.client.v6(), SocketAddr::new(vip, MEDIA));
    let sockets = lab
        .client
        .run(move || {
            (0..FLOWS)
                .map(|_| {
                    let s = UdpSocket::bind((client, 0))?;
                    s.connect(dst)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("client namespace")
        .expect("client UDP sockets");
    let maps = lab.maps().expect("pinned maps");
    let svc = maps
        .service_v6(lab.vip6.unwrap(), MEDIA, PROTO_UDP)
        .expect("service");
    let mut counts = BTreeMap::<String, usize>::new();
    for (i, s) in sockets.iter().enumerate() {
        let src = s.local_addr().unwrap();
        let want = maps
            .predict_any(&svc, src, dst, PROTO_UDP)
            .expect("predict");
        let want = &lab.backend_by_ip(want).expect("predicted backend").name;
        for k in 0..3 {
            let msg = format!("flow {i} datagram {k}");
            s.send(msg.as_bytes()).expect("send");
            let mut buf = [0u8; 2048];
            let n = s
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no reply on {src}: {e}\n{}", lab.diagnostics()));
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert_eq!(reply, format!("{want} {src} {msg}"), "flow {src}");
        }
        *counts.entry(want.clone()).or_insert(0) += 1;
    }
    eprintln!("IPv6 UDP flows per backend: {counts:?}");
    assert_eq!(counts.len(), 3, "every backend took flows: {counts:?}");
}

/// Mixed families: the IPv4 VIP over IPv6 backends (4-in-6) and the IPv6 VIP
/// over IPv4 backends (6-in-4), 30 predicted TCP connections each.
#[test]
fn mixed_family_tunnels() {
    if !require_root("mixed_family_tunnels") {
        return;
    }
    let mut lab = start_lab(XdpMode::Skb);
    lab.serve_tcp(AMQP).expect("IPv4 VIP servers");
    lab.serve_tcp6(AMQP).expect("IPv6 VIP servers");
    let v6 = v6_backends(&lab);
    let v4 = v4_backends(&lab);
    service(&lab, "four-in-six", IpAddr::V4(lab.vip), AMQP, "tcp", &v6);
    service(&lab, "six-in-four", vip6(&lab), AMQP, "tcp", &v4);
    let c46 = tcp_flows(&lab, IpAddr::V4(lab.vip), 30);
    let c64 = tcp_flows(&lab, vip6(&lab), 30);
    eprintln!("4-in-6: {c46:?}; 6-in-4: {c64:?}");
    assert_eq!(c46.values().sum::<usize>(), 30);
    assert_eq!(c64.values().sum::<usize>(), 30);
}

/// The unresolved-neighbour path of both families: with the daemon stopped
/// (the program keeps forwarding from its pinned maps), the cached next hops
/// are cleared from `BACKENDS` and the LB's neighbour entries deleted, so a
/// new flow's first packet finds no MAC (`bpf_fib_lookup` NO_NEIGH), leaves
/// the program encapsulated (`nexthop_pass`) and the kernel forwards it once
/// it has resolved the backend (ARP, neighbour discovery). One UDP datagram
/// per new flow must be answered: nothing resends a lost first datagram.
#[test]
fn first_packets_to_unresolved_neighbours() {
    if !require_root("first_packets_to_unresolved_neighbours") {
        return;
    }
    let mut lab = start_lab(XdpMode::Skb);
    lab.serve_udp(MEDIA).expect("IPv4 UDP servers");
    lab.serve_udp6(MEDIA).expect("IPv6 UDP servers");
    let v4 = v4_backends(&lab);
    let v6 = v6_backends(&lab);
    service(&lab, "media4", IpAddr::V4(lab.vip), MEDIA, "udp", &v4);
    service(&lab, "media6", vip6(&lab), MEDIA, "udp", &v6);
    lab.stop_daemon().expect("stop the daemon");

    for (vip, family, backends) in [(IpAddr::V4(lab.vip), "-4", &v4), (vip6(&lab), "-6", &v6)] {
        let mut maps = lab.maps().expect("pinned maps");
        for id in 1..lb_common::MAX_BACKENDS {
            let Ok(mut entry) = maps.backend(id) else {
                continue;
            };
            if backends.contains(&maps.backend_ip(id).expect("address")) {
                entry.flags &= !backend_flags::NEXTHOP;
                maps.set_backend(id, &entry).expect("clear the next hop");
            }
        }
        for b in backends {
            // Absent already is fine: only the end state matters.
            let _ = lab
                .lb
                .ip(&[family, "neigh", "del", &b.to_string(), "dev", &lab.lb.iface]);
        }
        let neigh = lab
            .lb
            .ip(&[family, "neigh", "show", "dev", &lab.lb.iface])
            .unwrap();
        for b in backends {
            assert!(
                !neigh.lines().any(|l| l.starts_with(&format!("{b} "))),
                "{b} still has a neighbour entry: {neigh}"
            );
        }
        let passed = maps.counter(Counter::NexthopPass).expect("counter");
        let replies = udp_first_datagrams(&lab, vip, 30);
        assert_eq!(replies.values().sum::<usize>(), 30, "{vip}: {replies:?}");
        assert_eq!(
            replies.len(),
            backends.len(),
            "every backend answered: {replies:?}"
        );
        let passed = maps.counter(Counter::NexthopPass).expect("counter") - passed;
        assert!(
            passed >= backends.len() as u64,
            "{vip}: each backend's first packet took the stack's path ({passed} did)"
        );
        eprintln!("{vip}: {replies:?}, {passed} packets through the stack's neighbour resolution");
    }
}

/// `n` new UDP flows to `vip:MEDIA`, one datagram each, each answered by the
/// predicted backend. Returns answers per backend name.
fn udp_first_datagrams(lab: &Lab, vip: IpAddr, n: usize) -> BTreeMap<String, usize> {
    let dst = SocketAddr::new(vip, MEDIA);
    let client: IpAddr = match vip {
        IpAddr::V4(_) => IpAddr::V4(lab.client.addr),
        IpAddr::V6(_) => IpAddr::V6(lab.client.v6()),
    };
    let maps = lab.maps().expect("pinned maps");
    let svc = match vip {
        IpAddr::V4(a) => maps.service_v4(a, MEDIA, PROTO_UDP),
        IpAddr::V6(a) => maps.service_v6(a, MEDIA, PROTO_UDP),
    }
    .expect("service entry");
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let (src, reply) = lab
            .client
            .run(move || -> std::io::Result<(SocketAddr, String)> {
                let s = UdpSocket::bind((client, 0))?;
                s.connect(dst)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.send(format!("first {i}").as_bytes())?;
                let mut buf = [0u8; 2048];
                let n = s.recv(&mut buf)?;
                Ok((
                    s.local_addr()?,
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ))
            })
            .expect("client namespace")
            .unwrap_or_else(|e| panic!("flow {i} to {dst}: no answer: {e}\n{}", lab.diagnostics()));
        let want = maps
            .predict_any(&svc, src, dst, PROTO_UDP)
            .expect("predict");
        let want = &lab.backend_by_ip(want).expect("predicted backend").name;
        assert_eq!(reply, format!("{want} {src} first {i}"), "flow {src}");
        *counts.entry(want.clone()).or_insert(0) += 1;
    }
    counts
}
