//! Layer 4: end to end through a network-namespace lab (`mqlb_tests::lab`):
//! real sockets in a client namespace, the daemon (`mqlb up`) attached on
//! the LB's veth, `mqlb decap` and servers on three backends, DSR back.
//!
//! Each test predicts where the program sends every flow from the daemon's
//! pinned maps and `lb_common::hash`, and checks the backend that answered.
//! Every wait polls a condition against a deadline.

use lb_common::{
    maglev::{self, MaglevBackend},
    v4_mapped, Counter, PROTO_TCP, PROTO_UDP,
};
use mqlb_tests::conn::{self, Conn};
use mqlb_tests::lab::{find_counter, fnv1a64, wait_for, Lab, LabConfig, XdpMode, FNV_OFFSET};
use mqlb_tests::privileged::require_root;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AMQP: u16 = 5672;
const MEDIA: u16 = 5004;
/// How long a config change gets to reach the live Maglev ring.
const RING_DEADLINE: Duration = Duration::from_secs(10);

fn start_lab(mode: XdpMode) -> Lab {
    Lab::start(LabConfig {
        mode,
        ..LabConfig::default()
    })
    .unwrap_or_else(|e| panic!("the lab did not start: {e:#}"))
}

/// Adds the TCP service `amqp` on VIP:5672 with the given backends and waits
/// until the live ring holds exactly them.
fn amqp_service(lab: &mut Lab, backends: &[&str]) {
    lab.serve_tcp(AMQP).expect("backend TCP servers");
    lab.add_service("amqp", AMQP, "tcp", None)
        .unwrap_or_else(|e| panic!("service add: {e:#}"));
    for name in backends {
        let b = lab.backend_by_name(name).expect("backend exists");
        lab.add_backend("amqp", b)
            .unwrap_or_else(|e| panic!("backend add {name}: {e:#}"));
    }
    wait_ring(lab, AMQP, PROTO_TCP, backends);
}

/// Waits until the live ring of the service on `port` holds exactly the
/// backends named (the CLI may acknowledge before the program sees it).
fn wait_ring(lab: &Lab, port: u16, proto: u8, names: &[&str]) {
    let want: BTreeSet<Ipv4Addr> = names
        .iter()
        .map(|n| lab.backend_by_name(n).expect("backend exists").addr)
        .collect();
    wait_for(
        &format!("the ring of {}:{port} to hold {names:?}", lab.vip),
        RING_DEADLINE,
        || {
            let maps = lab.maps()?;
            let svc = maps.service_v4(lab.vip, port, proto)?;
            let members = maps.ring_members(&svc)?;
            Ok((members == want).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected IPv4, got {a}"),
    }
}

/// Opens `n` connections to VIP:5672 from the client namespace (greetings
/// checked: accepted on the VIP, the client's own address seen).
fn open_conns(lab: &Lab, n: usize) -> Vec<Conn> {
    conn::open_conns(lab, SocketAddr::from((lab.vip, AMQP)), n)
}

/// Asserts that every connection landed where the live ring says.
fn assert_predicted(lab: &Lab, conns: &[Conn]) {
    let maps = lab.maps().expect("pinned maps");
    let svc = maps.service_v4(lab.vip, AMQP, PROTO_TCP).expect("service");
    let dst = SocketAddrV4::new(lab.vip, AMQP);
    for c in conns {
        let addr = maps
            .predict(&svc, v4(c.src), dst, PROTO_TCP)
            .expect("predict");
        let want = &lab.backend_by_addr(addr).expect("predicted backend").name;
        assert_eq!(
            &c.backend, want,
            "flow {} landed on {} but the ring says {want}",
            c.src, c.backend
        );
    }
}

/// One message on every connection, each answered by the backend it started on.
fn exchange_all(conns: &mut [Conn], round: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let name = c.ask(&format!("{round} {i}"));
        assert_eq!(
            name, c.backend,
            "{round}: flow {} moved from {} to {name}",
            c.src, c.backend
        );
    }
}

fn per_backend(conns: &[Conn]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in conns {
        *counts.entry(c.backend.clone()).or_insert(0) += 1;
    }
    counts
}

mqlb_tests::in_both_modes! {
    tcp_flows_predicted_dsr: tcp_flows_predicted_dsr_skb, tcp_flows_predicted_dsr_native;
    udp_flows_predicted: udp_flows_predicted_skb, udp_flows_predicted_native;
    established_flows_survive_add_drain_delete: established_flows_survive_add_drain_delete_skb, established_flows_survive_add_drain_delete_native;
    one_mib_through_vip_with_pmtu: one_mib_through_vip_with_pmtu_skb, one_mib_through_vip_with_pmtu_native;
    flows_survive_upgrade_and_kill9: flows_survive_upgrade_and_kill9_skb, flows_survive_upgrade_and_kill9_native;
}

/// 300 TCP connections through the VIP, all open at once: each lands on the
/// backend the live ring predicts, keeps it for three rounds of messages, the
/// spread is fair, and replies bypass the LB (direct server return).
fn tcp_flows_predicted_dsr(mode: XdpMode) {
    let mut lab = start_lab(mode);
    amqp_service(&mut lab, &["b1", "b2", "b3"]);

    // The daemon's table is the one lb-common's Maglev builds from the
    // backend addresses alone (equal weights), whatever their ids.
    let maps = lab.maps().expect("pinned maps");
    let svc = maps.service_v4(lab.vip, AMQP, PROTO_TCP).expect("service");
    let model: Vec<MaglevBackend> = lab
        .backends
        .iter()
        .map(|b| MaglevBackend {
            addr: v4_mapped(b.addr.octets()),
            id: maps
                .backend_id(b.addr)
                .expect("BACKENDS")
                .unwrap_or_else(|| panic!("{} not in BACKENDS", b.addr)),
            weight: 1,
        })
        .collect();
    assert!(
        maps.ring(&svc).expect("ring") == maglev::build(&model, svc.ring_size),
        "the live ring differs from lb_common::maglev::build of the same backends"
    );

    let lb_rx0 = maps.counter(Counter::Rx).expect("STATS");
    let (client_rx0, client_tx0) = lab.client.link_packets().expect("client stats");

    const N: usize = 300;
    let mut conns = open_conns(&lab, N);
    assert_predicted(&lab, &conns);
    for round in ["one", "two", "three"] {
        exchange_all(&mut conns, round);
    }

    // Equal weights, a fair hash: each backend's count is binomial(300, 1/3),
    // mean 100, sd sqrt(300 * 1/3 * 2/3) ≈ 8.2. ±30% is ±30 ≈ 3.7 sd, a
    // two-sided tail of ≈ 2.4e-4 per backend, < 7.3e-4 for all three: a fair
    // hash passes more than 99.9% of runs.
    let counts = per_backend(&conns);
    eprintln!("connections per backend: {counts:?}");
    let mean = N as f64 / lab.backends.len() as f64;
    for b in &lab.backends {
        let n = counts.get(&b.name).copied().unwrap_or(0) as f64;
        assert!(
            (n - mean).abs() <= 0.3 * mean,
            "{} took {n} of {N} connections, outside ±30% of {mean}: {counts:?}",
            b.name
        );
    }

    // DSR: the backends answer the client directly. The LB's program sees
    // the client's packets (and a little ARP), never the replies: were they
    // routed through it, it would see about client tx + client rx.
    let lb_rx = maps.counter(Counter::Rx).expect("STATS") - lb_rx0;
    let (client_rx, client_tx) = lab.client.link_packets().expect("client stats");
    let (client_rx, client_tx) = (client_rx - client_rx0, client_tx - client_tx0);
    eprintln!("LB program saw {lb_rx} packets; client sent {client_tx}, received {client_rx}");
    assert!(
        client_rx >= 4 * N as u64,
        "the client received only {client_rx} packets"
    );
    assert!(
        lb_rx <= client_tx + client_rx / 2,
        "the LB saw {lb_rx} packets for the client's {client_tx} sent and {client_rx} received: \
         replies went through the LB"
    );
}

/// 100 UDP flows through the VIP, three datagrams each: every one answered
/// (from the VIP) by the backend the live ring predicts.
fn udp_flows_predicted(mode: XdpMode) {
    let mut lab = start_lab(mode);
    lab.serve_udp(MEDIA).expect("backend UDP servers");
    lab.add_service("media", MEDIA, "udp", None)
        .unwrap_or_else(|e| panic!("service add: {e:#}"));
    for b in &lab.backends {
        lab.add_backend("media", b)
            .unwrap_or_else(|e| panic!("backend add: {e:#}"));
    }
    wait_ring(&lab, MEDIA, PROTO_UDP, &["b1", "b2", "b3"]);

    const FLOWS: usize = 100;
    let (client, vip) = (lab.client.addr, SocketAddrV4::new(lab.vip, MEDIA));
    let sockets = lab
        .client
        .run(move || {
            (0..FLOWS)
                .map(|_| {
                    let s = UdpSocket::bind((client, 0))?;
                    s.connect(vip)?;
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("client namespace")
        .expect("client UDP sockets");

    let maps = lab.maps().expect("pinned maps");
    let svc = maps.service_v4(lab.vip, MEDIA, PROTO_UDP).expect("service");
    let mut counts = BTreeMap::<String, usize>::new();
    for (i, s) in sockets.iter().enumerate() {
        let src = v4(s.local_addr().unwrap());
        let addr = maps.predict(&svc, src, vip, PROTO_UDP).expect("predict");
        let want = lab
            .backend_by_addr(addr)
            .expect("predicted backend")
            .name
            .clone();
        for k in 0..3 {
            let msg = format!("flow {i} packet {k}");
            let (name, peer) = udp_ask(s, &msg)
                .unwrap_or_else(|e| panic!("UDP flow {src}: {e}\n{}", lab.diagnostics()));
            assert_eq!(name, want, "UDP flow {src} packet {k}");
            assert_eq!(
                peer,
                src.to_string(),
                "the backend sees the client's address"
            );
        }
        *counts.entry(want).or_insert(0) += 1;
    }
    // P(a backend gets none of 100 flows) ≈ 3 * (2/3)^100 ≈ 7e-18.
    assert_eq!(
        counts.len(),
        3,
        "every backend takes some flows: {counts:?}"
    );
}

/// Sends `msg` on a connected UDP socket until the answer to it arrives
/// (datagrams may be lost: resend each second, give up after 15 s).
/// Returns (backend name, client address the backend saw).
fn udp_ask(s: &UdpSocket, msg: &str) -> Result<(String, String), String> {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    while start.elapsed() < Duration::from_secs(15) {
        s.send(msg.as_bytes()).map_err(|e| e.to_string())?;
        let resend_at = Instant::now() + Duration::from_secs(1);
        while Instant::now() < resend_at {
            let Ok(n) = s.recv(&mut buf) else { break };
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let mut parts = reply.splitn(3, ' ');
            let (Some(name), Some(peer), Some(payload)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("bad reply {reply:?}"));
            };
            if payload == msg {
                return Ok((name.to_string(), peer.to_string()));
            }
        }
    }
    Err(format!("no answer to {msg:?} within 15 s"))
}

/// With 120+ connections established: add b3, drain b2, delete b1. After
/// each change every connection is still answered by its first backend, and
/// new connections follow the new ring: never to a drained or deleted backend.
fn established_flows_survive_add_drain_delete(mode: XdpMode) {
    let mut lab = start_lab(mode);
    amqp_service(&mut lab, &["b1", "b2"]);

    let mut conns = open_conns(&lab, 120);
    assert_predicted(&lab, &conns);
    exchange_all(&mut conns, "start");

    // Add b3: established flows stay, new ones follow the new ring.
    lab.add_backend("amqp", lab.backend_by_name("b3").unwrap())
        .unwrap_or_else(|e| panic!("backend add b3: {e:#}"));
    wait_ring(&lab, AMQP, PROTO_TCP, &["b1", "b2", "b3"]);
    exchange_all(&mut conns, "after-add");
    let fresh = open_conns(&lab, 60);
    assert_predicted(&lab, &fresh);
    conns.extend(fresh);

    // Drain b2: its flows stay on it, no new flow reaches it.
    let b2 = lab.backend_by_name("b2").unwrap().addr.to_string();
    lab.mqlb(&["backend", "set", "amqp", &b2, "--drain"])
        .unwrap_or_else(|e| panic!("backend set --drain: {e:#}"));
    wait_ring(&lab, AMQP, PROTO_TCP, &["b1", "b3"]);
    exchange_all(&mut conns, "after-drain");
    assert!(
        per_backend(&conns).contains_key("b2"),
        "b2 had flows to keep"
    );
    let fresh = open_conns(&lab, 60);
    assert_predicted(&lab, &fresh);
    assert!(
        fresh.iter().all(|c| c.backend != "b2"),
        "a new flow reached drained b2: {:?}",
        per_backend(&fresh)
    );
    conns.extend(fresh);

    // Delete b1: its established flows finish there, no new flow reaches it.
    let b1 = lab.backend_by_name("b1").unwrap().addr.to_string();
    lab.mqlb(&["backend", "del", "amqp", &b1])
        .unwrap_or_else(|e| panic!("backend del: {e:#}"));
    wait_ring(&lab, AMQP, PROTO_TCP, &["b3"]);
    exchange_all(&mut conns, "after-delete");
    assert!(
        per_backend(&conns).contains_key("b1"),
        "b1 had flows to keep"
    );
    let fresh = open_conns(&lab, 60);
    assert_predicted(&lab, &fresh);
    assert!(
        fresh.iter().all(|c| c.backend == "b3"),
        "a new flow reached a deleted or drained backend: {:?}",
        per_backend(&fresh)
    );
    conns.extend(fresh);
    exchange_all(&mut conns, "end");
}

/// 1 MiB through the VIP over 1500-byte links: the LB answers too-big
/// segments with ICMP fragmentation-needed, the client's path-MTU discovery
/// shrinks them, and the bytes arrive intact.
fn one_mib_through_vip_with_pmtu(mode: XdpMode) {
    let mut lab = start_lab(mode);
    amqp_service(&mut lab, &["b1", "b2", "b3"]);
    let stats = lab.stats_json().unwrap_or_else(|e| panic!("{e:#}"));
    let name = Counter::IcmpTooBig.name();
    let too_big0 = find_counter(&stats, name)
        .unwrap_or_else(|| panic!("`mqlb stats --json` has no {name} counter: {stats}"));

    // 1 MiB of a fixed pseudo-random pattern; full-size segments (1500-byte
    // IP packets on the 1500-byte links) cannot take 20 more bytes of IPIP.
    const LEN: usize = 1 << 20;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut conn = open_conns(&lab, 1).pop().unwrap();
    conn.stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.stream
        .write_all(format!("BULK {LEN}\n").as_bytes())
        .unwrap();
    conn.stream.write_all(&data).unwrap_or_else(|e| {
        panic!(
            "sending 1 MiB through the VIP stalled: {e}\n{}",
            lab.diagnostics()
        )
    });
    let reply = conn.line();
    let want = format!(
        "{} BULK {LEN} {:016x}",
        conn.backend,
        fnv1a64(FNV_OFFSET, &data)
    );
    assert_eq!(reply, want, "the bytes arrived intact at {}", conn.backend);

    let stats = lab.stats_json().unwrap_or_else(|e| panic!("{e:#}"));
    let too_big = find_counter(&stats, name).expect("counter");
    let route = lab
        .client
        .ip(&["route", "get", &lab.vip.to_string()])
        .unwrap_or_default();
    eprintln!("{name}: {too_big0} -> {too_big}; client route to the VIP: {route}");
    assert!(
        too_big > too_big0,
        "{name} stayed at {too_big}: the LB sent no fragmentation-needed \
         (client route: {route})"
    );
}

/// Exchanges messages on every connection in a loop on its own thread, so
/// the connections keep talking while the test stops, kills and upgrades the
/// daemon. Each message must come back from the backend the connection
/// started on; the first failure ends the loop and fails the test at
/// [`Pump::finish`].
struct Pump {
    /// The phase the test is in; the pump counts its rounds per phase.
    phase: Arc<AtomicUsize>,
    /// Full rounds (one message on every connection) completed per phase.
    rounds: Arc<[AtomicU64; PHASES]>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<Conn>, String>>,
}

const PHASES: usize = 5;

impl Pump {
    fn start(mut conns: Vec<Conn>) -> Pump {
        let phase = Arc::new(AtomicUsize::new(0));
        let rounds: Arc<[AtomicU64; PHASES]> = Arc::new(Default::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (phase, rounds, stop) = (phase.clone(), rounds.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // A round counts for the phase it started in, and only if
                    // the phase did not change while it ran.
                    let p = phase.load(Ordering::SeqCst);
                    for (i, c) in conns.iter_mut().enumerate() {
                        let msg = format!("pump {round} {i}");
                        let name =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.ask(&msg)))
                                .map_err(|e| {
                                    let why = e
                                        .downcast_ref::<String>()
                                        .cloned()
                                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                        .unwrap_or_default();
                                    format!("phase {p}, round {round}: {why}")
                                })?;
                        if name != c.backend {
                            return Err(format!(
                                "phase {p}, round {round}: flow {} moved from {} to {name}",
                                c.src, c.backend
                            ));
                        }
                    }
                    if phase.load(Ordering::SeqCst) == p {
                        rounds[p].fetch_add(1, Ordering::SeqCst);
                    }
                    round += 1;
                }
                Ok(conns)
            })
        };
        Pump {
            phase,
            rounds,
            stop,
            thread,
        }
    }

    /// Moves to phase `p` and waits until the pump has completed `n` full
    /// rounds inside it (fails at once if the pump has failed).
    fn enter(&self, p: usize, n: u64, what: &str) {
        self.phase.store(p, Ordering::SeqCst);
        self.wait_rounds(p, n, what);
    }

    fn wait_rounds(&self, p: usize, n: u64, what: &str) {
        wait_for(
            &format!("{n} full rounds of messages {what}"),
            Duration::from_secs(30),
            || {
                if self.thread.is_finished() {
                    return Err(mqlb_tests::lab::GiveUp("the pump stopped early".into()).into());
                }
                Ok((self.rounds[p].load(Ordering::SeqCst) >= n).then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    fn finish(self) -> (Vec<Conn>, [u64; PHASES]) {
        self.stop.store(true, Ordering::SeqCst);
        let conns = match self.thread.join() {
            Ok(Ok(conns)) => conns,
            Ok(Err(e)) => panic!("a connection broke while the daemon changed: {e}"),
            Err(_) => panic!("the pump thread panicked"),
        };
        let rounds = std::array::from_fn(|i| self.rounds[i].load(Ordering::SeqCst));
        (conns, rounds)
    }
}

/// A hitless upgrade and a `kill -9` of the daemon, with 100 connections
/// exchanging messages the whole time. The upgrade is what `systemctl
/// restart` does with a new binary: SIGTERM, then `mqlb up` again on the same
/// interface, socket and state; the new daemon loads its program into the
/// pinned link (a new program id) and reopens the pinned maps (the same map
/// ids, conntrack included). While no daemon runs, the attached program
/// keeps forwarding. No connection breaks, stalls past the socket timeout or
/// changes backend, and new connections still land where the ring says.
fn flows_survive_upgrade_and_kill9(mode: XdpMode) {
    let mut lab = start_lab(mode);
    amqp_service(&mut lab, &["b1", "b2", "b3"]);
    let conns = open_conns(&lab, 100);
    assert_predicted(&lab, &conns);
    let prog_before = lab.lb_prog_id().expect("program id");
    let ct_map = lab
        .pinned_map_id(lb_common::names::CT4)
        .expect("conntrack map id");
    let ct_before = lab
        .maps()
        .expect("maps")
        .counter(Counter::CtHit)
        .expect("STATS");

    let fail = |lab: &Lab, what: &str, e: anyhow::Error| -> ! {
        panic!("{what}: {e:#}\n{}", lab.diagnostics())
    };
    let pump = Pump::start(conns);
    pump.enter(0, 2, "before any change");

    // Upgrade, first half: the old daemon exits; nothing runs but the program.
    pump.phase.store(1, Ordering::SeqCst);
    lab.stop_daemon()
        .unwrap_or_else(|e| fail(&lab, "stop the daemon", e));
    pump.wait_rounds(1, 2, "with no daemon running (upgrade)");
    // Second half: the new daemon replaces the program in the pinned link
    // while the messages flow.
    lab.start_daemon()
        .unwrap_or_else(|e| fail(&lab, "start the new daemon", e));
    pump.enter(2, 2, "after the upgrade");
    let prog_after = lab.lb_prog_id().expect("program id");
    assert_ne!(
        prog_after, prog_before,
        "the new daemon loaded its own program into the link"
    );
    assert_eq!(
        lab.pinned_map_id(lb_common::names::CT4).expect("map id"),
        ct_map,
        "the upgrade kept the pinned conntrack map"
    );

    // kill -9: no chance to clean up; the program keeps forwarding.
    pump.phase.store(3, Ordering::SeqCst);
    lab.kill9_daemon()
        .unwrap_or_else(|e| fail(&lab, "kill -9 the daemon", e));
    pump.wait_rounds(3, 2, "with the daemon killed");
    lab.start_daemon()
        .unwrap_or_else(|e| fail(&lab, "restart after kill -9", e));
    pump.enter(4, 2, "after the restart");
    let (mut conns, rounds) = pump.finish();
    eprintln!("full rounds per phase (before, stopped, upgraded, killed, restarted): {rounds:?}");

    // The saved state came back: same service, same three backends, same ring.
    let listed = lab
        .mqlb(&["backend", "list", "amqp", "--json"])
        .unwrap_or_else(|e| panic!("backend list: {e:#}"));
    for b in &lab.backends {
        assert!(
            listed.contains(&b.addr.to_string()),
            "{} restored: {listed}",
            b.name
        );
    }
    wait_ring(&lab, AMQP, PROTO_TCP, &["b1", "b2", "b3"]);
    let ct_after = lab
        .maps()
        .expect("maps")
        .counter(Counter::CtHit)
        .expect("STATS");
    let asked: u64 = rounds.iter().sum::<u64>() * conns.len() as u64;
    assert!(
        ct_after >= ct_before + asked,
        "established flows kept hitting the pinned conntrack ({ct_before} -> {ct_after}, \
         {asked} messages)"
    );
    let fresh = open_conns(&lab, 30);
    assert_predicted(&lab, &fresh);
    conns.extend(fresh);
    exchange_all(&mut conns, "end");
}

/// Port of the daemon's metrics listener in the IPv6 flow lab (inside its
/// LB namespace).
const METRICS_PORT: u16 = 9433;
/// The port of the IPv6 media range the UDP flows use.
const RANGE_USED: u16 = 5006;

/// Waits until the live ring of `[VIP6]:port` (`port` 0: its port range)
/// holds exactly `want`.
fn wait_ring6(lab: &Lab, port: u16, proto: u8, want: &[IpAddr]) {
    let vip6 = lab.vip6.expect("the lab has an IPv6 VIP");
    let want: BTreeSet<IpAddr> = want.iter().copied().collect();
    wait_for(
        &format!("the ring of [{vip6}]:{port} to hold {want:?}"),
        RING_DEADLINE,
        || {
            let maps = lab.maps()?;
            let svc = maps.service_v6(vip6, port, proto)?;
            let ids: BTreeSet<u32> = maps.ring(&svc)?.into_iter().filter(|&i| i != 0).collect();
            let members = ids
                .into_iter()
                .map(|id| maps.backend_ip(id))
                .collect::<anyhow::Result<BTreeSet<IpAddr>>>()?;
            Ok((members == want).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

/// `mqlb flow SERVICE --client CLIENT [--port PORT]`: its one line.
fn flow_line(lab: &Lab, service: &str, client: SocketAddr, port: Option<u16>) -> String {
    let client = client.to_string();
    let port = port.map(|p| p.to_string());
    let mut args = vec!["flow", service, "--client", &client];
    if let Some(p) = &port {
        args.extend(["--port", p.as_str()]);
    }
    lab.mqlb(&args)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()))
        .trim()
        .to_string()
}

/// `GET /metrics` from the daemon, inside the LB namespace.
fn scrape(lab: &Lab) -> anyhow::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    let mut s = lab
        .lb
        .run(move || std::net::TcpStream::connect_timeout(&addr, conn::IO_TIMEOUT))??;
    s.set_read_timeout(Some(conn::IO_TIMEOUT))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: mqlb\r\n\r\n")?;
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut s, &mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {resp:?}"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.0 200"), "{head}\n{body}");
    Ok(body.to_string())
}

/// The value of the sample `series` (name and labels as written) in a scrape.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `mqlb flow` on IPv6 services, against real flows: TCP to [VIP6]:5672
/// over IPv6 backends (6-in-6) and UDP to one port of the IPv6 port range
/// [VIP6]:5004-5010 over IPv4 backends (6-in-4). For every established flow
/// it names the backend that answered it, by conntrack; for a new flow the
/// one the ring predicts, by the table. An IPv4 client is refused in one
/// line, and `mqlb_conntrack_entries{family="ipv6"}` counts the flows.
#[test]
fn flow_names_the_backends_of_ipv6_flows() {
    if !require_root("flow_names_the_backends_of_ipv6_flows") {
        return;
    }
    let mut lab = Lab::start(LabConfig {
        ipv6: true,
        metrics: Some(METRICS_PORT),
        ..LabConfig::default()
    })
    .unwrap_or_else(|e| panic!("the lab did not start: {e:#}"));
    let vip6 = lab.vip6.expect("the lab has an IPv6 VIP");
    lab.serve_tcp6(AMQP).expect("backend TCP servers");
    lab.serve_udp6(RANGE_USED).expect("backend UDP servers");
    let v6: Vec<IpAddr> = lab.backends.iter().map(|b| IpAddr::V6(b.v6())).collect();
    let v4: Vec<IpAddr> = lab.backends.iter().map(|b| IpAddr::V4(b.addr)).collect();
    let range = format!("[{vip6}]:{MEDIA}-5010");
    let cli = |args: &[&str]| {
        lab.mqlb(args)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    };
    lab.add_service6("amqp6", AMQP, "tcp", None)
        .unwrap_or_else(|e| panic!("service add: {e:#}"));
    cli(&[
        "service", "add", "media6", "--vip", &range, "--proto", "udp",
    ]);
    for (service, backends) in [("amqp6", &v6), ("media6", &v4)] {
        for b in backends {
            cli(&["backend", "add", service, &b.to_string()]);
        }
    }
    wait_ring6(&lab, AMQP, PROTO_TCP, &v6);
    wait_ring6(&lab, lb_common::RANGE_PORT, PROTO_UDP, &v4);
    // The probe's ingress is lo, where IPv6 is not forwarded: the program's
    // own forwarding (cached next hops) makes it name the backend from the
    // tunnel packet, as real packets leave.
    wait_for(
        "every backend's next hop in BACKENDS",
        RING_DEADLINE,
        || {
            let maps = lab.maps()?;
            for id in 1..=6 {
                let b = maps.backend(id)?;
                anyhow::ensure!(
                    b.flags & lb_common::backend_flags::NEXTHOP != 0,
                    "backend {} (id {id}) has no next hop yet",
                    maps.backend_ip(id)?
                );
            }
            Ok(Some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    let maps = lab.maps().expect("pinned maps");
    let client6 = IpAddr::V6(lab.client.v6());

    // TCP, 6-in-6: established connections are conntrack hits.
    let dst = SocketAddr::new(IpAddr::V6(vip6), AMQP);
    let conns = conn::open_conns(&lab, dst, 6);
    for c in &conns {
        let reached = lab.backend_by_name(&c.backend).expect("backend").v6();
        assert_eq!(
            flow_line(&lab, "amqp6", c.src, None),
            format!(
                "{} -> amqp6 {dst}/tcp: backend {reached} (conntrack)",
                c.src
            ),
            "the connection greeted by {}\n{}",
            c.backend,
            lab.diagnostics()
        );
    }
    // A new flow (a port below the ephemeral range: no connection has it).
    let svc = maps.service_v6(vip6, AMQP, PROTO_TCP).expect("service");
    let fresh = SocketAddr::new(client6, 20000);
    let want = maps
        .predict_any(&svc, fresh, dst, PROTO_TCP)
        .expect("predict");
    assert_eq!(
        flow_line(&lab, "amqp6", fresh, None),
        format!("{fresh} -> amqp6 {dst}/tcp: backend {want} (table)")
    );

    // UDP to a port of the range, 6-in-4: live flows are conntrack hits.
    let udp_dst = SocketAddr::new(IpAddr::V6(vip6), RANGE_USED);
    let sockets = lab
        .client
        .run(move || {
            (0..6)
                .map(|_| {
                    let s = UdpSocket::bind((client6, 0))?;
                    s.connect(udp_dst)?;
                    s.set_read_timeout(Some(conn::IO_TIMEOUT))?;
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("client namespace")
        .expect("client UDP sockets");
    for (i, s) in sockets.iter().enumerate() {
        let (name, src) = udp_ask(s, &format!("media {i}"))
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
        let reached = lab.backend_by_name(&name).expect("backend").addr;
        let src: SocketAddr = src.parse().expect("the client address the backend saw");
        assert_eq!(
            flow_line(&lab, "media6", src, Some(RANGE_USED)),
            format!("{src} -> media6 {udp_dst}/udp: backend {reached} (conntrack)"),
            "the flow answered by {name}"
        );
    }
    let svc = maps
        .service_v6(vip6, lb_common::RANGE_PORT, PROTO_UDP)
        .expect("range service");
    let want = maps
        .predict_any(&svc, fresh, udp_dst, PROTO_UDP)
        .expect("predict");
    assert_eq!(
        flow_line(&lab, "media6", fresh, Some(RANGE_USED)),
        format!("{fresh} -> media6 {udp_dst}/udp: backend {want} (table)")
    );

    // A client of the other family: one line, exit 1.
    let err = lab
        .mqlb(&["flow", "amqp6", "--client", "10.0.0.2:40000"])
        .expect_err("an IPv4 client of an IPv6 service");
    let err = format!("{err:#}");
    assert!(
        err.contains(
            "(exit status: 1): error: bad address \"10.0.0.2:40000\": service amqp6 has \
             an ipv6 vip"
        ) && err.ends_with("give an ipv6 client as [IPV6]:PORT")
            && !err.contains('\n'),
        "{err}"
    );

    // The background count (every 15 s) sees the IPv6 flows in CT6.
    let flows = (conns.len() + sockets.len()) as f64;
    let mut last = String::new();
    wait_for(
        "mqlb_conntrack_entries{family=\"ipv6\"} to count the IPv6 flows",
        Duration::from_secs(40),
        || {
            last = scrape(&lab)?;
            let v6 = sample(&last, "mqlb_conntrack_entries{family=\"ipv6\"}");
            Ok(v6.is_some_and(|n| n >= flows).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nlast scrape:\n{last}"));
    for family in ["ipv4", "ipv6"] {
        let capacity = sample(
            &last,
            &format!("mqlb_conntrack_capacity{{family=\"{family}\"}}"),
        );
        assert!(capacity.is_some_and(|c| c > 0.0), "{family}: {last}");
    }
    assert!(
        sample(&last, "mqlb_conntrack_entries{family=\"ipv4\"}").is_some(),
        "{last}"
    );
    drop(conns);
    drop(sockets);
}
