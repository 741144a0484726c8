//! Layer 4: `mqlb apply -f FILE` and `mqlb export` against the daemon in the
//! namespace lab (`mqlb_tests::lab`). The file's service and backends reach
//! the live ring and connections through the VIP land where it predicts;
//! export → apply changes nothing; an edited file prints its diff, changes
//! the ring and keeps established flows (a deleted backend's flows finish,
//! as with `backend del`); a broken file exits non-zero naming FILE:LINE and
//! changes nothing. IPv6 too: an `[ADDR]:PORT` VIP over IPv6 backends
//! (6-in-6) and an IPv4 VIP over IPv6 backends (4-in-6).

use lb_common::{backend_state, ServiceValue, PROTO_TCP};
use mqlb_tests::conn::{self, Conn};
use mqlb_tests::lab::{wait_for, Lab, LabConfig, LbMaps, XdpMode};
use mqlb_tests::privileged::require_root;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const AMQP: u16 = 5672;
/// A small prime ring: quick to read back slot by slot.
const RING: usize = 1021;
const RING_DEADLINE: Duration = Duration::from_secs(10);

/// `n` connections to VIP:5672 from the client, each with its greeting read.
fn open_conns(lab: &Lab, n: usize) -> Vec<Conn> {
    conn::open_conns(lab, vip_amqp(lab), n)
}

/// The IPv4 VIP's AMQP port.
fn vip_amqp(lab: &Lab) -> SocketAddr {
    SocketAddr::from((lab.vip, AMQP))
}

/// Sends `msg` on `c`; asserts the backend that took the flow echoes it.
fn ask(c: &mut Conn, msg: &str) {
    let name = c.ask(msg);
    assert_eq!(name, c.backend, "flow {} moved to {name}", c.src);
}

fn addr(lab: &Lab, name: &str) -> IpAddr {
    IpAddr::V4(lab.backend_by_name(name).expect("backend exists").addr)
}

fn addr6(lab: &Lab, name: &str) -> IpAddr {
    IpAddr::V6(lab.backend_by_name(name).expect("backend exists").v6())
}

/// The TCP service entry on `vip` (either family) in the pinned maps.
fn service_entry(maps: &LbMaps, vip: SocketAddr) -> anyhow::Result<ServiceValue> {
    match vip.ip() {
        IpAddr::V4(a) => maps.service_v4(a, vip.port(), PROTO_TCP),
        IpAddr::V6(a) => maps.service_v6(a, vip.port(), PROTO_TCP),
    }
}

/// Waits until the live ring of the TCP service on `vip` holds exactly
/// `want`; returns slots per backend.
fn wait_ring(lab: &Lab, vip: SocketAddr, want: &[IpAddr]) -> BTreeMap<IpAddr, usize> {
    let want: BTreeSet<IpAddr> = want.iter().copied().collect();
    wait_for(
        &format!("the ring of {vip} to hold {want:?}"),
        RING_DEADLINE,
        || {
            let maps = lab.maps()?;
            let svc = service_entry(&maps, vip)?;
            let mut slots = BTreeMap::new();
            for id in maps.ring(&svc)? {
                if id != 0 {
                    *slots.entry(maps.backend_ip(id)?).or_insert(0) += 1;
                }
            }
            Ok((slots.keys().copied().collect::<BTreeSet<_>>() == want).then_some(slots))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()))
}

/// Asserts every connection to `dst` is on the backend the live ring predicts.
fn assert_predicted(lab: &Lab, dst: SocketAddr, conns: &[Conn]) {
    let maps = lab.maps().expect("pinned maps");
    let svc = service_entry(&maps, dst).expect("service");
    for c in conns {
        let a = maps
            .predict_any(&svc, c.src, dst, PROTO_TCP)
            .expect("predict");
        let want = &lab.backend_by_ip(a).expect("predicted backend").name;
        assert_eq!(
            &c.backend, want,
            "flow {} is not where the ring says",
            c.src
        );
    }
}

/// A backend's share of the ring is its share of the weights, within 3%.
fn assert_shares(slots: &BTreeMap<IpAddr, usize>, weights: &[(IpAddr, u32)]) {
    let total: u32 = weights.iter().map(|w| w.1).sum();
    for &(a, w) in weights {
        let share = slots.get(&a).copied().unwrap_or(0) as f64 / RING as f64;
        let want = f64::from(w) / f64::from(total);
        assert!(
            (share - want).abs() < 0.03,
            "{a} has {share:.3} of the ring, its weight says {want:.3}: {slots:?}"
        );
    }
}

/// `mqlb apply ARGS`, expected to fail: its stderr.
fn apply_fails(lab: &Lab, args: &[&str]) -> String {
    let out = Command::new(lab.mqlb_path())
        .arg("--socket")
        .arg(lab.socket())
        .arg("apply")
        .args(args)
        .output()
        .expect("run mqlb");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "apply {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("write the file");
    path.to_str().expect("utf-8 path").to_string()
}

fn apply_file_export_and_edit(mode: XdpMode) {
    let mut lab = Lab::start(LabConfig {
        mode,
        ..LabConfig::default()
    })
    .unwrap_or_else(|e| panic!("the lab did not start: {e:#}"));
    lab.serve_tcp(AMQP).expect("backend TCP servers");
    let (b1, b2, b3) = (addr(&lab, "b1"), addr(&lab, "b2"), addr(&lab, "b3"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mqlb.toml");
    let vip = lab.vip;
    let text = format!(
        "seed = 11\n\
         \n\
         [[service]]\n\
         name = \"amqp\"\n\
         vip = \"{vip}:{AMQP}\"\n\
         proto = \"tcp\"\n\
         ring_size = {RING}\n\
         backends = [\n\
         \x20   {{ ip = \"{b1}\" }},\n\
         \x20   {{ ip = \"{b2}\" }},\n\
         \x20   {{ ip = \"{b3}\", weight = 300 }},\n\
         ]\n"
    );
    let path = write(&file, &text);

    // The file's service and backends, in one step.
    let out = lab
        .mqlb(&["apply", "-f", &path])
        .unwrap_or_else(|e| panic!("apply: {e:#}\n{}", lab.diagnostics()));
    assert_eq!(
        out,
        format!(
            "~ seed 0 -> 11\n\
             + service amqp {vip}:{AMQP}/tcp\n\
             + backend amqp {b1} weight 100\n\
             + backend amqp {b2} weight 100\n\
             + backend amqp {b3} weight 300\n\
             applied 5 changes\n"
        )
    );
    let slots = wait_ring(&lab, vip_amqp(&lab), &[b1, b2, b3]);
    assert_shares(&slots, &[(b1, 100), (b2, 100), (b3, 300)]);
    let maps = lab.maps().expect("pinned maps");
    let svc = maps.service_v4(vip, AMQP, PROTO_TCP).expect("service");
    assert_eq!((svc.seed, svc.ring_size), (11, RING as u32));
    let mut conns = open_conns(&lab, 60);
    assert_predicted(&lab, vip_amqp(&lab), &conns);
    for (i, c) in conns.iter_mut().enumerate() {
        ask(c, &format!("one {i}"));
    }

    // export → apply: nothing to do.
    let exported = lab.mqlb(&["export"]).expect("export");
    assert!(exported.contains("seed = 11\n"), "{exported}");
    assert!(
        exported.contains(&format!("{{ ip = \"{b3}\", weight = 300 }}")),
        "{exported}"
    );
    let export_path = write(&dir.path().join("export.toml"), &exported);
    let out = lab
        .mqlb(&["apply", "-f", &export_path])
        .expect("apply export");
    assert_eq!(out, "no changes\n");

    // A dry run shows the diff and changes nothing.
    let edited = text
        .replace(&format!("    {{ ip = \"{b1}\" }},\n"), "")
        .replace(
            &format!("{{ ip = \"{b2}\" }}"),
            &format!("{{ ip = \"{b2}\", weight = 200 }}"),
        );
    let path = write(&file, &edited);
    let diff = format!(
        "- backend amqp {b1}\n\
         ~ backend amqp {b2} weight 100 -> 200\n"
    );
    let out = lab
        .mqlb(&["apply", "-f", &path, "--dry-run"])
        .expect("dry run");
    assert_eq!(out, format!("{diff}dry run: 2 changes, nothing applied\n"));
    assert_eq!(lab.mqlb(&["export"]).expect("export"), exported);

    // The edit itself: b1 leaves the ring, b2 gets more of it.
    let out = lab.mqlb(&["apply", "-f", &path]).expect("apply the edit");
    assert_eq!(out, format!("{diff}applied 2 changes\n"));
    let slots = wait_ring(&lab, vip_amqp(&lab), &[b2, b3]);
    assert_shares(&slots, &[(b2, 200), (b3, 300)]);
    let maps = lab.maps().expect("pinned maps");
    let id = maps
        .backend_id(lab.backend_by_name("b1").expect("b1").addr)
        .expect("BACKENDS")
        .expect("b1's entry is held");
    assert_eq!(
        maps.backend(id).expect("BACKENDS").state,
        backend_state::REMOVED,
        "deleted like `backend del`: held for its established flows"
    );
    // Every established flow stays where it was, b1's included.
    for (i, c) in conns.iter_mut().enumerate() {
        ask(c, &format!("two {i}"));
    }
    let fresh = open_conns(&lab, 20);
    assert_predicted(&lab, vip_amqp(&lab), &fresh);
    assert!(fresh.iter().all(|c| c.backend != "b1"), "no new flow on b1");

    // A broken file: exit 1, FILE:LINE and the field, nothing changed.
    let before = lab.mqlb(&["export"]).expect("export");
    let broken = edited.replace("weight = 200", "weight = 0");
    let line = broken
        .lines()
        .position(|l| l.contains("weight = 0"))
        .expect("the bad line")
        + 1;
    let bad_path = write(&dir.path().join("bad.toml"), &broken);
    let stderr = apply_fails(&lab, &["-f", &bad_path]);
    assert!(
        stderr.starts_with(&format!(
            "error: {bad_path}:{line}: field weight (service amqp, backend {b2}): \
             weight 0 is out of range (1-65535)"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let typo = edited.replace("proto = ", "protocol = ");
    let bad_path = write(&dir.path().join("typo.toml"), &typo);
    let stderr = apply_fails(&lab, &["-f", &bad_path]);
    assert!(
        stderr.starts_with(&format!(
            "error: {bad_path}:6: field protocol (service amqp): unknown field `protocol`"
        )),
        "{stderr}"
    );
    let stderr = apply_fails(
        &lab,
        &["-f", &write(&dir.path().join("empty.toml"), "seed = 1\n")],
    );
    assert!(stderr.contains("has no services"), "{stderr}");
    assert_eq!(lab.mqlb(&["export"]).expect("export"), before);
    assert_eq!(wait_ring(&lab, vip_amqp(&lab), &[b2, b3]), slots);
}

#[test]
fn apply_file_export_and_edit_skb() {
    if require_root("apply_file_export_and_edit_skb") {
        apply_file_export_and_edit(XdpMode::Skb);
    }
}

/// An IPv6 `a` written the long way (`FD00:1:0:0:0:0:0:11`): a file may
/// spell an address any way; the daemon compares and shows addresses.
fn long_form(a: IpAddr) -> String {
    match a {
        IpAddr::V6(a) => a.segments().map(|s| format!("{s:X}")).join(":"),
        IpAddr::V4(a) => a.to_string(),
    }
}

/// IPv6 in the file: `amqp6` on the IPv6 VIP (`[ADDR]:PORT`) over the
/// backends' IPv6 addresses (6-in-6), `four-in-six` on the IPv4 VIP over
/// IPv6 backends. Applied in one step; export → apply changes nothing (and
/// so does the file again, its long-form addresses included); connections
/// through both VIPs land where the live rings predict.
fn apply_ipv6_file(mode: XdpMode) {
    let mut lab = Lab::start(LabConfig {
        mode,
        ipv6: true,
        ..LabConfig::default()
    })
    .unwrap_or_else(|e| panic!("the lab did not start: {e:#}"));
    lab.serve_tcp(AMQP).expect("IPv4 VIP servers");
    lab.serve_tcp6(AMQP).expect("IPv6 VIP servers");
    let (b1, b2, b3) = (addr6(&lab, "b1"), addr6(&lab, "b2"), addr6(&lab, "b3"));
    let vip6 = lab.vip6.expect("the lab has an IPv6 VIP");
    let (vip4, vip6) = (vip_amqp(&lab), SocketAddr::from((vip6, AMQP)));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[[service]]\n\
         name = \"amqp6\"\n\
         vip = \"[{}]:{AMQP}\"\n\
         proto = \"tcp\"\n\
         ring_size = {RING}\n\
         backends = [\n\
         \x20   {{ ip = \"{}\" }},\n\
         \x20   {{ ip = \"{b2}\" }},\n\
         \x20   {{ ip = \"{b3}\", weight = 300 }},\n\
         ]\n\
         \n\
         [[service]]\n\
         name = \"four-in-six\"\n\
         vip = \"{vip4}\"\n\
         proto = \"tcp\"\n\
         ring_size = {RING}\n\
         backends = [{{ ip = \"{}\" }}, {{ ip = \"{b2}\" }}]\n",
        long_form(vip6.ip()),
        long_form(b1),
        long_form(b1),
    );
    let path = write(&dir.path().join("mqlb.toml"), &text);
    let out = lab
        .mqlb(&["apply", "-f", &path])
        .unwrap_or_else(|e| panic!("apply: {e:#}\n{text}\n{}", lab.diagnostics()));
    assert_eq!(
        out,
        format!(
            "+ service amqp6 {vip6}/tcp\n\
             + backend amqp6 {b1} weight 100\n\
             + backend amqp6 {b2} weight 100\n\
             + backend amqp6 {b3} weight 300\n\
             + service four-in-six {vip4}/tcp\n\
             + backend four-in-six {b1} weight 100\n\
             + backend four-in-six {b2} weight 100\n\
             applied 7 changes\n"
        ),
        "{text}"
    );
    let slots = wait_ring(&lab, vip6, &[b1, b2, b3]);
    assert_shares(&slots, &[(b1, 100), (b2, 100), (b3, 300)]);
    wait_ring(&lab, vip4, &[b1, b2]);

    // export → apply, and the file itself again: nothing to do.
    let exported = lab.mqlb(&["export"]).expect("export");
    assert!(
        exported.contains(&format!("vip = \"{vip6}\"\n")),
        "{exported}"
    );
    assert!(
        exported.contains(&format!("{{ ip = \"{b3}\", weight = 300 }}")),
        "{exported}"
    );
    let export_path = write(&dir.path().join("export.toml"), &exported);
    for file in [&export_path, &path] {
        let out = lab.mqlb(&["apply", "-f", file]).expect("apply again");
        assert_eq!(out, "no changes\n", "{file}");
    }
    assert_eq!(lab.mqlb(&["export"]).expect("export"), exported);

    // Real flows through both VIPs, each on its predicted IPv6 backend.
    for (vip, n) in [(vip6, 60), (vip4, 30)] {
        let mut conns = conn::open_conns(&lab, vip, n);
        assert_predicted(&lab, vip, &conns);
        for (i, c) in conns.iter_mut().enumerate() {
            ask(c, &format!("{vip} {i}"));
        }
        let used: BTreeSet<&str> = conns.iter().map(|c| c.backend.as_str()).collect();
        eprintln!("{vip}: flows on {used:?}");
    }
}

#[test]
fn apply_ipv6_file_skb() {
    if require_root("apply_ipv6_file_skb") {
        apply_ipv6_file(XdpMode::Skb);
    }
}
