//! Layer 4, media: RTP streams from the client namespace through the VIP to
//! relays that count every packet per stream (SSRC) and check sequence
//! numbers (`mqlb_tests::media`). Where each stream lands is predicted from
//! the daemon's pinned maps and `lb_common::hash`, never guessed.

use lb_common::PROTO_UDP;
use mqlb_tests::lab::{wait_for, GiveUp, Lab, LabConfig};
use mqlb_tests::media::{open_streams, Receiver, Seen, Sender};
use mqlb_tests::privileged::require_root;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

const MEDIA: u16 = 5004;
/// RTP packets per second per stream (20 ms of audio each).
const RATE: u32 = 50;

fn start_lab() -> Lab {
    Lab::start(LabConfig::default()).unwrap_or_else(|e| panic!("the lab did not start: {e:#}"))
}

/// A receiver on VIP:5004 on every relay.
fn receivers(lab: &Lab) -> Vec<Receiver> {
    lab.backends
        .iter()
        .map(|b| {
            Receiver::start(
                &b.name,
                &b.netns_path(),
                &[SocketAddrV4::new(lab.vip, MEDIA)],
            )
            .unwrap_or_else(|e| panic!("receiver on {}: {e:#}", b.name))
        })
        .collect()
}

fn mqlb(lab: &Lab, args: &[&str]) -> String {
    lab.mqlb(args)
        .unwrap_or_else(|e| panic!("mqlb {args:?}: {e:#}\n{}", lab.diagnostics()))
}

/// Adds service `media` (VIP:5004/udp, `--hash HASH`, extra flags) with
/// every relay as a backend, and waits until the ring holds them all.
fn media_service(lab: &Lab, hash: &str, extra: &[&str]) {
    let vip = format!("{}:{MEDIA}", lab.vip);
    let mut args = vec![
        "service", "add", "media", "--vip", &vip, "--proto", "udp", "--hash", hash,
    ];
    args.extend(extra);
    mqlb(lab, &args);
    for b in &lab.backends {
        mqlb(lab, &["backend", "add", "media", &b.addr.to_string()]);
    }
    let all: Vec<Ipv4Addr> = lab.backends.iter().map(|b| b.addr).collect();
    wait_ring(lab, &all);
}

fn wait_ring(lab: &Lab, want: &[Ipv4Addr]) {
    let want: BTreeSet<Ipv4Addr> = want.iter().copied().collect();
    wait_for(
        "the media ring to hold the relays",
        Duration::from_secs(10),
        || {
            let maps = lab.maps()?;
            let svc = maps.service_v4(lab.vip, MEDIA, PROTO_UDP)?;
            Ok((maps.ring_members(&svc)? == want).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

/// The relay (name) the live ring sends a new stream from `src` to.
fn predicted(lab: &Lab, src: SocketAddrV4) -> String {
    let maps = lab.maps().expect("pinned maps");
    let svc = maps.service_v4(lab.vip, MEDIA, PROTO_UDP).expect("service");
    let addr = maps
        .predict(&svc, src, SocketAddrV4::new(lab.vip, MEDIA), PROTO_UDP)
        .expect("predict");
    lab.backend_by_addr(addr).expect("a relay").name.clone()
}

/// Every relay's counts, by relay name.
fn seen_all(rx: &[Receiver]) -> BTreeMap<String, Seen> {
    rx.iter().map(|r| (r.relay.clone(), r.seen())).collect()
}

/// The relays that got RTP from stream `ssrc`.
fn relays_of(seen: &BTreeMap<String, Seen>, ssrc: u32) -> Vec<&str> {
    seen.iter()
        .filter(|(_, s)| s.get(&ssrc).is_some_and(|st| st.packets > 0))
        .map(|(r, _)| r.as_str())
        .collect()
}

/// The data plane's non-zero drop counters (`mqlb stats --json`), by reason.
fn drops(lab: &Lab) -> BTreeMap<String, u64> {
    let stats = lab.stats_json().expect("stats");
    let drops = stats["drops"]
        .as_object()
        .unwrap_or_else(|| panic!("no drops in `mqlb stats --json`: {stats}"));
    drops
        .iter()
        .filter_map(|(reason, v)| v.as_u64().filter(|n| *n > 0).map(|n| (reason.clone(), n)))
        .collect()
}

/// 1,000 concurrent streams at 50 packets/s, 250 packets each:
/// every stream reaches exactly the relay the ring predicts, with every
/// packet in order and none lost; the LB counts no drop; the spread over
/// three relays stays inside bounds a fair hash meets.
///
/// Bounds: a relay's share of 1,000 streams is Binomial(1000, 1/3): mean
/// 333.3, σ = √(1000·⅓·⅔) = 14.9. [258, 408] is ±5σ, which a fair hash
/// leaves with probability < 3 × 5.7e-7 over the three relays.
#[test]
fn thousand_streams_no_loss_predicted_spread() {
    if !require_root("thousand_streams_no_loss_predicted_spread") {
        return;
    }
    const STREAMS: usize = 1000;
    let lab = start_lab();
    let rx = receivers(&lab);
    media_service(&lab, "rtp", &[]);
    let drops_before = drops(&lab);
    let streams = open_streams(
        &lab.client.netns_path(),
        lab.client.addr,
        20000,
        STREAMS,
        0x1000,
    )
    .expect("streams");
    let mut sender = Sender::start(streams, SocketAddrV4::new(lab.vip, MEDIA), RATE);
    // 250 packets per stream: 5 s at 50 packets/s when the sender keeps
    // pace (a loaded machine only makes it take longer; the rate is reported).
    let t0 = Instant::now();
    wait_for(
        "250 packets on every stream",
        Duration::from_secs(60),
        || Ok((sender.sent().iter().min() >= Some(&250)).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let sent = sender.stop().expect("every send succeeded");
    let took = t0.elapsed();
    let total: u64 = sent.iter().sum();
    eprintln!(
        "sent {total} packets in {took:?}: {:.0} packets/s, {:.1} per stream",
        total as f64 / took.as_secs_f64(),
        total as f64 / took.as_secs_f64() / STREAMS as f64
    );
    // Wait until the relays hold everything that was sent (or stop growing).
    let received = |rx: &[Receiver]| -> u64 {
        rx.iter()
            .flat_map(|r| r.seen().into_values())
            .map(|s| s.packets)
            .sum()
    };
    let _ = wait_for("every packet at a relay", Duration::from_secs(10), || {
        Ok((received(&rx) >= total).then_some(()))
    });
    let seen = seen_all(&rx);

    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for (i, &(ssrc, src)) in sender.streams.iter().enumerate() {
        let want = predicted(&lab, src);
        let got = relays_of(&seen, ssrc);
        assert_eq!(got, [want.as_str()], "stream {ssrc:#x} from {src}");
        let s = &seen[&want][&ssrc];
        assert_eq!(
            (s.packets, s.gaps(), s.out_of_order),
            (sent[i], 0, 0),
            "stream {ssrc:#x} from {src} on {want}: packets, gaps, reordered"
        );
        *spread.entry(want).or_default() += 1;
    }
    eprintln!("streams per relay: {spread:?}; {total} packets, all delivered");
    for (relay, n) in &spread {
        assert!(
            (258..=408).contains(n),
            "{relay} got {n} of {STREAMS} streams"
        );
    }
    assert_eq!(spread.len(), 3, "every relay got streams: {spread:?}");
    assert_eq!(drops(&lab), drops_before, "the LB dropped packets");
}

/// A relay that dies (its media socket and its health listener gone) is
/// marked down by the tcp check within interval × fall + timeout (plus one
/// interval of phase); its streams move to the relays the new ring predicts
/// within one check interval of that and go on there: sequence numbers jump
/// over the packets sent to the dead relay, then continue without a gap.
/// Streams on the healthy relays never move and lose nothing.
#[test]
fn media_streams_migrate_when_a_relay_fails() {
    if !require_root("media_streams_migrate_when_a_relay_fails") {
        return;
    }
    const INTERVAL: Duration = Duration::from_millis(200);
    const TIMEOUT: Duration = Duration::from_millis(100);
    const FALL: u32 = 2;
    let lab = start_lab();
    let mut rx = receivers(&lab);
    // Each relay's health endpoint: a TCP listener on its own address.
    let mut health: Vec<Option<TcpListener>> = lab
        .backends
        .iter()
        .map(|b| {
            let addr = SocketAddrV4::new(b.addr, 7000);
            Some(
                b.run(move || TcpListener::bind(addr))
                    .expect("netns")
                    .expect("health listener"),
            )
        })
        .collect();
    media_service(
        &lab,
        "rtp",
        &[
            "--check",
            "tcp",
            "--check-port",
            "7000",
            "--check-interval",
            "200ms",
            "--check-timeout",
            "100ms",
            "--fall",
            "2",
            "--rise",
            "2",
        ],
    );
    let streams = open_streams(&lab.client.netns_path(), lab.client.addr, 30000, 60, 0x2000)
        .expect("streams");
    let mut sender = Sender::start(streams, SocketAddrV4::new(lab.vip, MEDIA), RATE);
    let before: BTreeMap<u32, String> = sender
        .streams
        .iter()
        .map(|&(ssrc, src)| (ssrc, predicted(&lab, src)))
        .collect();
    wait_for(
        "10 packets of every stream at its relay",
        Duration::from_secs(10),
        || {
            let seen = seen_all(&rx);
            Ok(before
                .iter()
                .all(|(ssrc, r)| seen[r].get(ssrc).is_some_and(|s| s.packets >= 10))
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));

    // b2 dies: its media socket and health listener close at once.
    let dead = 1;
    let dead_name = lab.backends[dead].name.clone();
    let dead_addr = lab.backends[dead].addr;
    let moved: Vec<u32> = before
        .iter()
        .filter(|(_, r)| **r == dead_name)
        .map(|(s, _)| *s)
        .collect();
    assert!(
        !moved.is_empty(),
        "some stream was on {dead_name}: {before:?}"
    );
    let last_on_dead = {
        let r = rx.remove(dead);
        health[dead] = None;
        let seen = r.seen();
        drop(r);
        seen
    };
    let t_fail = Instant::now();
    let bound = INTERVAL * (FALL + 1) + TIMEOUT;
    wait_for(
        &format!("{dead_name} out of the table"),
        bound + Duration::from_secs(2),
        || {
            let list = lab.mqlb(&["backend", "list", "media", "--json"])?;
            let v: serde_json::Value = serde_json::from_str(&list)?;
            let b = v
                .as_array()
                .and_then(|a| a.iter().find(|b| b["addr"] == dead_addr.to_string()))
                .ok_or_else(|| GiveUp(format!("{dead_addr} not listed: {list}")))?;
            Ok((b["in_table"] == false).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    let detected = t_fail.elapsed();
    assert!(
        detected <= bound + Duration::from_millis(500),
        "{dead_name} marked down after {detected:?}; interval × (fall + 1) + timeout = {bound:?}"
    );
    let healthy: Vec<Ipv4Addr> = lab
        .backends
        .iter()
        .map(|b| b.addr)
        .filter(|a| *a != dead_addr)
        .collect();
    wait_ring(&lab, &healthy);
    let after: BTreeMap<u32, String> = sender
        .streams
        .iter()
        .map(|&(ssrc, src)| (ssrc, predicted(&lab, src)))
        .collect();
    wait_for(
        "20 packets of every moved stream at its new relay",
        Duration::from_secs(10),
        || {
            let seen = seen_all(&rx);
            Ok(moved
                .iter()
                .all(|ssrc| {
                    seen[&after[ssrc]]
                        .get(ssrc)
                        .is_some_and(|s| s.packets >= 20)
                })
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    sender.stop().expect("every send succeeded");
    let seen = seen_all(&rx);
    let rate_period = Duration::from_secs(1) / RATE;
    for (ssrc, was) in &before {
        let now = &after[ssrc];
        let got = relays_of(&seen, *ssrc);
        if *was == dead_name {
            assert_eq!(
                got,
                [now.as_str()],
                "moved stream {ssrc:#x} went to the ring's pick"
            );
            let old = &last_on_dead[ssrc];
            let new = &seen[now][ssrc];
            let first = new.first_seq.expect("packets");
            assert!(
                first > old.last_seq,
                "stream {ssrc:#x} continued after seq {} (got {first} first on {now})",
                old.last_seq
            );
            // The packets sent while nobody listened: at most the detection
            // time (+ one check interval to act) at 50 packets/s.
            let lost = u64::from(first - old.last_seq - 1);
            let most = ((bound + INTERVAL + Duration::from_millis(500)).as_millis()
                / rate_period.as_millis()) as u64;
            assert!(
                lost <= most,
                "stream {ssrc:#x}: {lost} packets between relays (at most {most})"
            );
            assert_eq!(
                (new.gaps(), new.out_of_order),
                (0, 0),
                "stream {ssrc:#x} on {now} after the move"
            );
        } else {
            assert_eq!(
                now, was,
                "the ring kept stream {ssrc:#x} on a healthy relay"
            );
            assert_eq!(got, [was.as_str()], "stream {ssrc:#x} stayed on {was}");
            let s = &seen[was][ssrc];
            assert_eq!(
                (s.gaps(), s.out_of_order),
                (0, 0),
                "stream {ssrc:#x} on {was}"
            );
        }
    }
    eprintln!(
        "{} streams moved off {dead_name}, marked down after {detected:?}",
        moved.len()
    );
}

/// `--hash src-ip`: every stream of one client address lands on one relay,
/// the one the ring predicts for that address, whatever its ports.
#[test]
fn src_ip_hash_keeps_a_clients_streams_together() {
    if !require_root("src_ip_hash_keeps_a_clients_streams_together") {
        return;
    }
    let lab = start_lab();
    let rx = receivers(&lab);
    media_service(&lab, "src-ip", &[]);
    let base = lab.client.addr.octets();
    let mut streams = Vec::new();
    for k in 0..6u8 {
        let addr = Ipv4Addr::new(base[0], base[1], base[2], 60 + k);
        lab.client
            .ip(&[
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &lab.client.iface,
            ])
            .expect("client address");
        streams.extend(
            open_streams(
                &lab.client.netns_path(),
                addr,
                40000,
                8,
                0x3000 + u32::from(k) * 0x100,
            )
            .expect("streams"),
        );
    }
    let mut sender = Sender::start(streams, SocketAddrV4::new(lab.vip, MEDIA), RATE);
    let want: BTreeMap<u32, (Ipv4Addr, String)> = sender
        .streams
        .iter()
        .map(|&(ssrc, src)| (ssrc, (*src.ip(), predicted(&lab, src))))
        .collect();
    wait_for("5 packets of every stream", Duration::from_secs(10), || {
        let seen = seen_all(&rx);
        Ok(want
            .iter()
            .all(|(ssrc, (_, r))| seen[r].get(ssrc).is_some_and(|s| s.packets >= 5))
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    sender.stop().expect("sends");
    let seen = seen_all(&rx);
    let mut per_client: BTreeMap<Ipv4Addr, BTreeSet<&str>> = BTreeMap::new();
    for (ssrc, (client, relay)) in &want {
        assert_eq!(
            relays_of(&seen, *ssrc),
            [relay.as_str()],
            "stream {ssrc:#x}"
        );
        per_client
            .entry(*client)
            .or_default()
            .extend(relays_of(&seen, *ssrc));
    }
    for (client, relays) in &per_client {
        assert_eq!(
            relays.len(),
            1,
            "client {client}'s streams split over {relays:?}"
        );
    }
    eprintln!("client → relay: {per_client:?}");
}
