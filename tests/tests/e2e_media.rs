//! Layer 4, media: RTP streams from the client namespace through the VIP to
//! relays that count every packet per stream (SSRC) and check sequence
//! numbers (`mqlb_tests::media`). Where each stream lands is predicted from
//! the daemon's pinned maps and `lb_common::hash`, never guessed.

use lb_common::{range_takes, ServiceValue, PROTO_UDP, RANGE_PORT};
use mqlb_tests::lab::{wait_for, GiveUp, Lab, LabConfig, LbMaps};
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

/// Each relay's health endpoint: a TCP listener on port 7000 of its own
/// address (dropping one fails that relay's check).
fn health_listeners(lab: &Lab) -> Vec<Option<TcpListener>> {
    lab.backends
        .iter()
        .map(|b| {
            let addr = SocketAddrV4::new(b.addr, 7000);
            Some(
                b.run(move || TcpListener::bind(addr))
                    .expect("netns")
                    .expect("health listener"),
            )
        })
        .collect()
}

/// `media_service` (`--hash rtp`) with the failover tests' fast tcp check
/// of [`health_listeners`] (200 ms interval, 100 ms timeout, fall 2, rise 2)
/// and `extra` flags.
fn checked_media_service(lab: &Lab, extra: &[&str]) {
    let mut args = vec![
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
    ];
    args.extend(extra);
    media_service(lab, "rtp", &args);
}

/// The relay the live ring picks for each stream of `sender`, by SSRC.
fn predicted_streams(lab: &Lab, sender: &Sender) -> BTreeMap<u32, String> {
    sender
        .streams
        .iter()
        .map(|&(ssrc, src)| (ssrc, predicted(lab, src)))
        .collect()
}

/// Waits until every stream of `at` (SSRC → relay) has `n` packets at its relay.
fn wait_packets(lab: &Lab, rx: &[Receiver], at: &BTreeMap<u32, String>, n: u64, what: &str) {
    wait_for(what, Duration::from_secs(10), || {
        let seen = seen_all(rx);
        Ok(at
            .iter()
            .all(|(ssrc, r)| seen[r].get(ssrc).is_some_and(|s| s.packets >= n))
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

fn wait_ring(lab: &Lab, want: &[Ipv4Addr]) {
    wait_ring_of(lab, MEDIA, want)
}

/// Waits until the ring of the service UDP `port` of the VIP goes to
/// (exact port, else the VIP's port range) holds exactly `want`.
fn wait_ring_of(lab: &Lab, port: u16, want: &[Ipv4Addr]) {
    let want: BTreeSet<Ipv4Addr> = want.iter().copied().collect();
    wait_for(
        &format!("the ring of UDP port {port} to hold {want:?}"),
        Duration::from_secs(10),
        || {
            let maps = lab.maps()?;
            let svc = service_of(&maps, lab.vip, port)?;
            Ok((maps.ring_members(&svc)? == want).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

/// The live `SERVICES` entry UDP traffic to `vip:port` meets, found as the
/// program finds it: the exact port, else the VIP's port range (key port
/// `RANGE_PORT`) if the range takes `port`.
fn service_of(maps: &LbMaps, vip: Ipv4Addr, port: u16) -> anyhow::Result<ServiceValue> {
    if let Ok(svc) = maps.service_v4(vip, port, PROTO_UDP) {
        return Ok(svc);
    }
    let range = maps.service_v4(vip, RANGE_PORT, PROTO_UDP)?;
    anyhow::ensure!(
        range_takes(&range, port),
        "no service takes {vip}:{port}/udp (the range is {}-{})",
        range.port_lo,
        range.port_hi
    );
    Ok(range)
}

/// The relay (name) the live ring sends a new stream from `src` to.
fn predicted(lab: &Lab, src: SocketAddrV4) -> String {
    predicted_to(lab, src, MEDIA)
}

/// The relay (name) a new flow from `src` to VIP:`port` goes to.
fn predicted_to(lab: &Lab, src: SocketAddrV4, port: u16) -> String {
    let maps = lab.maps().expect("pinned maps");
    let svc = service_of(&maps, lab.vip, port).expect("service");
    let addr = maps
        .predict(&svc, src, SocketAddrV4::new(lab.vip, port), PROTO_UDP)
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
    let mut health = health_listeners(&lab);
    checked_media_service(&lab, &[]);
    let streams = open_streams(&lab.client.netns_path(), lab.client.addr, 30000, 60, 0x2000)
        .expect("streams");
    let mut sender = Sender::start(streams, SocketAddrV4::new(lab.vip, MEDIA), RATE);
    let before = predicted_streams(&lab, &sender);
    wait_packets(
        &lab,
        &rx,
        &before,
        10,
        "10 packets of every stream at its relay",
    );

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

/// `--on-down keep` (HAProxy's default): a relay whose health check fails
/// but whose media socket still runs (slow, not dead) leaves the table, so
/// new streams avoid it, yet every stream it had stays on it with no gap.
#[test]
fn on_down_keep_leaves_a_failed_relays_streams_in_place() {
    if !require_root("on_down_keep_leaves_a_failed_relays_streams_in_place") {
        return;
    }
    let lab = start_lab();
    let rx = receivers(&lab);
    let mut health = health_listeners(&lab);
    checked_media_service(&lab, &["--on-down", "keep"]);
    let streams = open_streams(&lab.client.netns_path(), lab.client.addr, 30000, 60, 0x4000)
        .expect("streams");
    let mut sender = Sender::start(streams, SocketAddrV4::new(lab.vip, MEDIA), RATE);
    let before = predicted_streams(&lab, &sender);
    wait_packets(
        &lab,
        &rx,
        &before,
        10,
        "10 packets of every stream at its relay",
    );

    // b2's health endpoint goes away; its media socket stays.
    let failed = 1;
    let (failed_name, failed_addr) = (lab.backends[failed].name.clone(), lab.backends[failed].addr);
    assert!(
        before.values().any(|r| *r == failed_name),
        "some stream was on {failed_name}: {before:?}"
    );
    health[failed] = None;
    let healthy: Vec<Ipv4Addr> = lab
        .backends
        .iter()
        .map(|b| b.addr)
        .filter(|a| *a != failed_addr)
        .collect();
    wait_ring(&lab, &healthy);
    let sent_at_down = seen_all(&rx);
    let most = sent_at_down
        .values()
        .flat_map(|s| s.values().map(|x| x.packets))
        .max()
        .unwrap_or(0);
    wait_packets(
        &lab,
        &rx,
        &before,
        most + 25,
        "25 more packets of every stream, still at its relay",
    );

    // New streams: the ring without b2 places them.
    let fresh = open_streams(&lab.client.netns_path(), lab.client.addr, 31000, 30, 0x5000)
        .expect("new streams");
    let mut sender2 = Sender::start(fresh, SocketAddrV4::new(lab.vip, MEDIA), RATE);
    let fresh_at = predicted_streams(&lab, &sender2);
    wait_packets(
        &lab,
        &rx,
        &fresh_at,
        10,
        "10 packets of every new stream at its relay",
    );
    sender.stop().expect("every send succeeded");
    sender2.stop().expect("every send succeeded");

    let seen = seen_all(&rx);
    for (ssrc, was) in &before {
        assert_eq!(
            relays_of(&seen, *ssrc),
            [was.as_str()],
            "stream {ssrc:#x} stayed on {was}"
        );
        let s = &seen[was][ssrc];
        assert_eq!(
            (s.gaps(), s.out_of_order),
            (0, 0),
            "stream {ssrc:#x} on {was}"
        );
    }
    for (ssrc, at) in &fresh_at {
        assert_ne!(
            at, &failed_name,
            "the ring without {failed_name} placed stream {ssrc:#x}"
        );
        assert_eq!(
            relays_of(&seen, *ssrc),
            [at.as_str()],
            "new stream {ssrc:#x}"
        );
    }
    let kept = before.values().filter(|r| **r == failed_name).count();
    eprintln!("{kept} streams kept on {failed_name} after its check failed");
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

/// A GStreamer `rtpbin` sender in the client namespace: PCMU over RTP from
/// `client:port` to VIP:5004, its RTCP from `client:port+1` to VIP:5005, as
/// a real media endpoint does. Killed (by PID) on drop.
struct Gst {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Gst {
    fn start(lab: &Lab, dir: &std::path::Path, port: u16, ssrc: u32) -> Gst {
        let client = lab.client.addr;
        let vip = lab.vip;
        let pipeline = format!(
            "rtpbin name=rb \
             audiotestsrc is-live=true samplesperbuffer=160 ! audio/x-raw,rate=8000,channels=1 \
             ! mulawenc ! rtppcmupay ssrc={ssrc} ! rb.send_rtp_sink_0 \
             rb.send_rtp_src_0 ! udpsink host={vip} port={MEDIA} bind-address={client} bind-port={port} \
             rb.send_rtcp_src_0 ! udpsink host={vip} port={rtcp} bind-address={client} \
             bind-port={rtcp_src} sync=false async=false",
            rtcp = MEDIA + 1,
            rtcp_src = port + 1,
        );
        let mut cmd = lab.client.command("gst-launch-1.0");
        cmd.arg("-q").args(pipeline.split_whitespace());
        let log = dir.join(format!("gst-{ssrc:x}.log"));
        let (child, _) = mqlb_tests::lab::spawn_logged(cmd, &log)
            .unwrap_or_else(|e| panic!("gst-launch-1.0 (GStreamer): {e:#}"));
        Gst { child, log }
    }
}

impl Drop for Gst {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RTP and RTCP of one stream from a real sender (GStreamer's rtpbin: RTP
/// from an even port to VIP:5004, RTCP from the next port to VIP:5005)
/// reach the same relay through a port-range service with `--hash rtp`: the
/// one lb-common predicts; each relay sees the stream's RTP in sequence and
/// its RTCP sender reports.
#[test]
fn gstreamer_rtp_and_rtcp_of_a_stream_reach_one_relay() {
    if !require_root("gstreamer_rtp_and_rtcp_of_a_stream_reach_one_relay") {
        return;
    }
    const STREAMS: u16 = 6;
    let lab = start_lab();
    let rx: Vec<Receiver> = lab
        .backends
        .iter()
        .map(|b| {
            Receiver::start(
                &b.name,
                &b.netns_path(),
                &[
                    SocketAddrV4::new(lab.vip, MEDIA),
                    SocketAddrV4::new(lab.vip, MEDIA + 1),
                ],
            )
            .unwrap_or_else(|e| panic!("receiver on {}: {e:#}", b.name))
        })
        .collect();
    let vip = format!("{}:{MEDIA}-{}", lab.vip, MEDIA + 95);
    mqlb(
        &lab,
        &[
            "service", "add", "media", "--vip", &vip, "--proto", "udp", "--hash", "rtp",
        ],
    );
    for b in &lab.backends {
        mqlb(&lab, &["backend", "add", "media", &b.addr.to_string()]);
    }
    let all: Vec<Ipv4Addr> = lab.backends.iter().map(|b| b.addr).collect();
    wait_ring_of(&lab, MEDIA, &all);
    let dir = tempfile::tempdir().expect("temp dir");
    let streams: Vec<(u32, SocketAddrV4)> = (0..STREAMS)
        .map(|i| {
            (
                0x5000 + u32::from(i),
                SocketAddrV4::new(lab.client.addr, 26000 + 2 * i),
            )
        })
        .collect();
    let want: BTreeMap<u32, String> = streams
        .iter()
        .map(|&(ssrc, src)| (ssrc, predicted(&lab, src)))
        .collect();
    let gst: Vec<Gst> = streams
        .iter()
        .map(|&(ssrc, src)| Gst::start(&lab, dir.path(), src.port(), ssrc))
        .collect();
    wait_for(
        "RTP and an RTCP report of every stream",
        Duration::from_secs(30),
        || {
            let seen = seen_all(&rx);
            let done = want.iter().all(|(ssrc, r)| {
                seen[r]
                    .get(ssrc)
                    .is_some_and(|s| s.packets >= 50 && s.rtcp >= 1)
            });
            Ok(done.then_some(()))
        },
    )
    .unwrap_or_else(|e| {
        let logs: String = gst
            .iter()
            .map(|g| mqlb_tests::lab::log_tail(&g.log, 5))
            .collect();
        panic!(
            "{e:#}\nseen: {:?}\ngst logs:\n{logs}\n{}",
            seen_all(&rx),
            lab.diagnostics()
        )
    });
    drop(gst);
    let seen = seen_all(&rx);
    for (ssrc, relay) in &want {
        let on: Vec<&str> = seen
            .iter()
            .filter(|(_, s)| s.get(ssrc).is_some_and(|st| st.packets + st.rtcp > 0))
            .map(|(r, _)| r.as_str())
            .collect();
        assert_eq!(on, [relay.as_str()], "RTP and RTCP of SSRC {ssrc:#x}");
        let s = &seen[relay][ssrc];
        assert_eq!(
            (s.gaps(), s.out_of_order),
            (0, 0),
            "SSRC {ssrc:#x} on {relay}"
        );
    }
    let spread: BTreeSet<&String> = want.values().collect();
    eprintln!("stream → relay: {want:x?}; relays used: {spread:?}");
}

/// An exact-port service inside a port range on the same VIP takes its
/// port: RTP streams to VIP:5010 (service `exact`, relay b3 only) all land
/// on b3, while streams to VIP:5004 and VIP:5012 (service `media`,
/// VIP:5004-5099 over b1 and b2) land where the range's ring predicts and
/// never on b3. `mqlb flow media --port` follows the range and refuses the
/// exact port. Deleted, the exact service hands the port back: new streams
/// to VIP:5010 go to the range's relays.
#[test]
fn exact_port_service_inside_a_range_takes_its_port() {
    if !require_root("exact_port_service_inside_a_range_takes_its_port") {
        return;
    }
    const EXACT: u16 = 5010;
    const OTHER: u16 = 5012;
    let lab = start_lab();
    let ports = [MEDIA, EXACT, OTHER];
    let rx: Vec<Receiver> = lab
        .backends
        .iter()
        .map(|b| {
            let addrs: Vec<SocketAddrV4> = ports
                .iter()
                .map(|&p| SocketAddrV4::new(lab.vip, p))
                .collect();
            Receiver::start(&b.name, &b.netns_path(), &addrs)
                .unwrap_or_else(|e| panic!("receiver on {}: {e:#}", b.name))
        })
        .collect();
    let (b1, b2, b3) = (&lab.backends[0], &lab.backends[1], &lab.backends[2]);
    let range = format!("{}:{MEDIA}-5099", lab.vip);
    let exact = format!("{}:{EXACT}", lab.vip);
    mqlb(
        &lab,
        &[
            "service", "add", "media", "--vip", &range, "--proto", "udp", "--hash", "rtp",
        ],
    );
    mqlb(
        &lab,
        &["service", "add", "exact", "--vip", &exact, "--proto", "udp"],
    );
    for (service, b) in [("media", b1), ("media", b2), ("exact", b3)] {
        mqlb(&lab, &["backend", "add", service, &b.addr.to_string()]);
    }
    wait_ring_of(&lab, MEDIA, &[b1.addr, b2.addr]);
    wait_ring_of(&lab, OTHER, &[b1.addr, b2.addr]);
    wait_ring_of(&lab, EXACT, &[b3.addr]);
    let list = mqlb(&lab, &["service", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("media ") && l.contains(&range)),
        "{list}"
    );

    // Six streams to each port, from their own source ports.
    let senders: Vec<(u16, Sender)> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            let streams = open_streams(
                &lab.client.netns_path(),
                lab.client.addr,
                36000 + 1000 * i as u16,
                6,
                0x6000 + 0x100 * i as u32,
            )
            .expect("streams");
            (
                port,
                Sender::start(streams, SocketAddrV4::new(lab.vip, port), RATE),
            )
        })
        .collect();
    let want: BTreeMap<u32, (u16, String)> = senders
        .iter()
        .flat_map(|(port, s)| {
            s.streams
                .iter()
                .map(|&(ssrc, src)| (ssrc, (*port, predicted_to(&lab, src, *port))))
                .collect::<Vec<_>>()
        })
        .collect();
    wait_for(
        "10 packets of every stream at its relay",
        Duration::from_secs(15),
        || {
            let seen = seen_all(&rx);
            Ok(want
                .iter()
                .all(|(ssrc, (_, r))| seen[r].get(ssrc).is_some_and(|s| s.packets >= 10))
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nseen: {:?}\n{}", seen_all(&rx), lab.diagnostics()));
    let seen = seen_all(&rx);
    for (ssrc, (port, relay)) in &want {
        assert_eq!(
            relays_of(&seen, *ssrc),
            [relay.as_str()],
            "stream {ssrc:#x} to port {port}"
        );
        if *port == EXACT {
            assert_eq!(*relay, b3.name, "port {EXACT} is the exact service's");
        } else {
            assert_ne!(*relay, b3.name, "port {port} is the range's");
        }
    }
    let spread: BTreeSet<&String> = want
        .values()
        .filter(|(p, _)| *p != EXACT)
        .map(|(_, r)| r)
        .collect();
    let placed: Vec<String> = want
        .iter()
        .map(|(ssrc, (port, relay))| format!("{ssrc:#x}:{port}→{relay}"))
        .collect();
    eprintln!(
        "streams: {}; range relays used: {spread:?}",
        placed.join(" ")
    );

    // `mqlb flow` of the range: any of its ports but the exact one.
    let (_, first) = senders[2].1.streams[0];
    let client = first.to_string();
    let flow = mqlb(
        &lab,
        &[
            "flow",
            "media",
            "--client",
            &client,
            "--port",
            &OTHER.to_string(),
        ],
    );
    let relay_addr = lab
        .backend_by_name(&want[&senders[2].1.streams[0].0].1)
        .expect("relay")
        .addr;
    assert!(
        flow.starts_with(&format!(
            "{client} -> media {}:{OTHER}/udp: backend {relay_addr} (",
            lab.vip
        )),
        "{flow}"
    );
    let err = lab
        .mqlb(&[
            "flow",
            "media",
            "--client",
            &client,
            "--port",
            &EXACT.to_string(),
        ])
        .expect_err("the exact port is not the range's");
    assert!(
        format!("{err:#}").contains(&format!(
            "port {EXACT} of service media belongs to service exact ({exact}): an exact port \
             wins over a range; ask `mqlb flow exact`"
        )),
        "{err:#}"
    );
    drop(senders);

    // Without the exact service, new flows to its port are the range's.
    mqlb(&lab, &["service", "del", "exact"]);
    wait_ring_of(&lab, EXACT, &[b1.addr, b2.addr]);
    let streams =
        open_streams(&lab.client.netns_path(), lab.client.addr, 39000, 6, 0x6400).expect("streams");
    let mut sender = Sender::start(streams, SocketAddrV4::new(lab.vip, EXACT), RATE);
    let after: BTreeMap<u32, String> = sender
        .streams
        .iter()
        .map(|&(ssrc, src)| (ssrc, predicted_to(&lab, src, EXACT)))
        .collect();
    wait_for(
        "10 packets of every new stream to the freed port",
        Duration::from_secs(15),
        || {
            let seen = seen_all(&rx);
            Ok(after
                .iter()
                .all(|(ssrc, r)| seen[r].get(ssrc).is_some_and(|s| s.packets >= 10))
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nseen: {:?}\n{}", seen_all(&rx), lab.diagnostics()));
    sender.stop().expect("sends");
    let seen = seen_all(&rx);
    for (ssrc, relay) in &after {
        assert_ne!(*relay, b3.name);
        assert_eq!(
            relays_of(&seen, *ssrc),
            [relay.as_str()],
            "stream {ssrc:#x}"
        );
    }
}
