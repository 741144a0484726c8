//! Part 5 of `cargo xtask bench`: how fast a control-plane change reaches
//! new flows.
//!
//! The client streams UDP datagrams to a service, each one a new flow (a
//! fresh source address and port, so conntrack never pins it), from a raw
//! sender. Every backend's receiver stamps arrivals with the bench's own
//! monotonic clock, the same clock that stamps the CLI calls, so "the first
//! new flow on the new backend" is compared directly with the moment
//! `mqlb backend add` returned.

use crate::bench_util::{
    check_interrupted, in_node, link_info, median, nft, nft_counter, round_to, set_udp_source,
    udp_frame, RawSender,
};
use crate::frames::{eth, tcp, Ip4, SYN};
use crate::lab::{Lab, Node};
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PORT: u16 = 9300;
const RATE_PPS: f64 = 20_000.0;

/// Arrivals at one backend, in ns since the bench's epoch (0 = none yet).
#[derive(Default)]
struct Arrivals {
    first: AtomicU64,
    last: AtomicU64,
    count: AtomicU64,
}

/// Source of the `n`-th fresh flow: 10.X.128.0/17 × ports 1024..61024.
fn fresh_source(x: u8, n: u64) -> (Ipv4Addr, u16) {
    let host = n / 60_000;
    (
        Ipv4Addr::new(10, x, 128 + ((host >> 8) & 127) as u8, host as u8),
        1024 + (n % 60_000) as u16,
    )
}

fn since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn ms(delta_ns: i128) -> f64 {
    delta_ns as f64 / 1e6
}

/// Runs the backend add/delete part; `cycles` add + delete of one backend.
pub fn backend_changes(lab: &Lab, cycles: usize) -> Result<Value> {
    if lab.backends.len() < 2 {
        bail!("part 5 needs at least two backends");
    }
    let epoch = Instant::now();
    let service = "bench-react";
    lab.add_service(service, PORT, "udp", None)?;
    let (new, stay) = lab.backends.split_last().expect("backends");
    for b in stay {
        lab.add_backend(service, b)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let arrivals: Vec<Arc<Arrivals>> = lab.backends.iter().map(|_| Arc::default()).collect();
    let mut sockets = Vec::new();
    for b in &lab.backends {
        let addr = SocketAddrV4::new(lab.vip, PORT);
        let s = b
            .run(move || UdpSocket::bind(addr))?
            .with_context(|| format!("cannot bind {addr} in {}", b.ns))?;
        s.set_read_timeout(Some(Duration::from_millis(20)))?;
        sockets.push(s);
    }
    let (client_mac, client_ifindex) = link_info(&lab.client.ns, &lab.client.iface)?;
    let (lb_mac, _) = link_info(&lab.lb.ns, &lab.lb.iface)?;
    let x = lab.vip.octets()[1];
    let template = udp_frame(lb_mac, client_mac, lab.client.addr, lab.vip, 1024, PORT, 18);
    let new_idx = lab.backends.len() - 1;

    std::thread::scope(|s| -> Result<Value> {
        for (sock, arr) in sockets.iter().zip(&arrivals) {
            let st = stop.clone();
            s.spawn(move || {
                let mut buf = [0u8; 256];
                while !st.load(Ordering::Relaxed) {
                    if sock.recv(&mut buf).is_ok() {
                        let now = since(epoch);
                        let _ =
                            arr.first
                                .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
                        arr.last.store(now, Ordering::SeqCst);
                        arr.count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let st = stop.clone();
        let client = &lab.client;
        let tpl = &template;
        let sender = s.spawn(move || {
            in_node(client, || -> Result<u64> {
                let sender = RawSender::open(client_ifindex)?;
                let stats = sender.send(
                    Some(RATE_PPS),
                    Duration::from_secs(600),
                    Some(&st),
                    |n, buf| {
                        buf[..tpl.len()].copy_from_slice(tpl);
                        let (src, sport) = fresh_source(x, n);
                        set_udp_source(&mut buf[..tpl.len()], src, sport);
                        tpl.len()
                    },
                );
                Ok(stats.sent)
            })
        });
        let result = (|| -> Result<Value> {
            // Traffic flows to the staying backends before anything is timed.
            std::thread::sleep(Duration::from_millis(300));
            if stay
                .iter()
                .enumerate()
                .any(|(i, _)| arrivals[i].count.load(Ordering::Relaxed) == 0)
            {
                bail!(
                    "new flows do not reach every backend\n{}",
                    lab.diagnostics()
                );
            }
            let (mut add_ret, mut add_start, mut del_ret, mut cli_add) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            // What any CLI call costs (process start, socket, a read-only
            // request), to tell it from the daemon's work for a change.
            let mut cli_noop = Vec::new();
            for _ in 0..5 {
                let t0 = Instant::now();
                lab.mqlb(&["service", "list"])?;
                cli_noop.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let addr = new.addr.to_string();
            for _ in 0..cycles {
                check_interrupted()?;
                let a = &arrivals[new_idx];
                a.first.store(0, Ordering::SeqCst);
                let t0 = since(epoch);
                lab.mqlb(&["backend", "add", service, &addr])?;
                let t1 = since(epoch);
                let deadline = Instant::now() + Duration::from_secs(3);
                while a.first.load(Ordering::SeqCst) == 0 {
                    if Instant::now() > deadline {
                        bail!("no new flow reached {addr} within 3 s of `backend add`");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                let first = a.first.load(Ordering::SeqCst) as i128;
                add_ret.push(ms(first - t1 as i128));
                add_start.push(ms(first - t0 as i128));
                cli_add.push(ms(t1 as i128 - t0 as i128));
                std::thread::sleep(Duration::from_millis(100));
                lab.mqlb(&["backend", "del", service, &addr])?;
                let t3 = since(epoch);
                std::thread::sleep(Duration::from_millis(300));
                del_ret.push(ms(a.last.load(Ordering::SeqCst) as i128 - t3 as i128));
            }
            let fmt = |v: &[f64]| v.iter().map(|x| round_to(*x, 3)).collect::<Vec<_>>();
            Ok(json!({
                "cycles": cycles,
                "new_flows_per_s": RATE_PPS,
                "resolution_ms": round_to(1e3 * lab.backends.len() as f64 / RATE_PPS, 3),
                "add_to_first_new_flow_ms_median": round_to(median(&add_ret), 3),
                "add_to_first_new_flow_ms_max": round_to(crate::bench_util::max(&add_ret), 3),
                "add_to_first_new_flow_ms_per_cycle": fmt(&add_ret),
                "add_cli_start_to_first_new_flow_ms_median": round_to(median(&add_start), 3),
                "add_cli_round_trip_ms_median": round_to(median(&cli_add), 3),
                "noop_cli_round_trip_ms_median": round_to(median(&cli_noop), 3),
                "del_to_last_new_flow_ms_median": round_to(median(&del_ret), 3),
                "del_to_last_new_flow_ms_max": round_to(crate::bench_util::max(&del_ret), 3),
                "del_to_last_new_flow_ms_per_cycle": fmt(&del_ret),
                "note": "measured from the moment the `mqlb backend add|del` CLI process returned; \
                    negative = the change was live before the CLI returned",
            }))
        })();
        stop.store(true, Ordering::SeqCst);
        let sent = sender.join().expect("sender thread")??;
        let mut v = result?;
        v["datagrams_sent"] = json!(sent);
        Ok(v)
    })
}

/// The health-check reaction, if `mqlb service add` has `--check`: with
/// the daemon's default check settings, and with fast ones (when the
/// timing options exist).
pub fn health_check(lab: &Lab) -> Result<Value> {
    let help = lab.mqlb(&["service", "add", "--help"]).unwrap_or_default();
    if !help.contains("--check") {
        return Ok(json!({
            "measured": false,
            "reason": "`mqlb service add --help` has no --check option in this build",
        }));
    }
    let mut configs: Vec<(&str, u16, Vec<&str>)> = vec![("defaults", 9301, vec![])];
    if help.contains("--check-interval") && help.contains("--fall") {
        configs.push((
            "fast",
            9302,
            vec![
                "--check-interval",
                "200ms",
                "--check-timeout",
                "100ms",
                "--fall",
                "2",
            ],
        ));
    }
    let mut out = serde_json::Map::new();
    for (label, port, extra) in configs {
        check_interrupted()?;
        let v = match health_check_inner(lab, label, port, &extra) {
            Ok(v) => v,
            Err(e) => json!({ "measured": false, "reason": format!("{e:#}") }),
        };
        out.insert(label.to_string(), v);
    }
    // The headline figure: the defaults'.
    let mut v = out.get("defaults").cloned().unwrap_or(Value::Null);
    v["configs"] = Value::Object(out);
    Ok(v)
}

fn health_check_inner(lab: &Lab, label: &str, hc_port: u16, extra: &[&str]) -> Result<Value> {
    let service = format!("bench-hc-{label}");
    let service = service.as_str();
    let vip = format!("{}:{hc_port}", lab.vip);
    let mut args = vec![
        "service", "add", service, "--vip", &vip, "--proto", "tcp", "--check", "tcp",
    ];
    args.extend_from_slice(extra);
    lab.mqlb(&args)?;
    let table = format!("mqlbhc{hc_port}");
    // TCP listeners on every backend for the check; the new flows (SYNs) to
    // the VIP are counted and dropped before they reach them.
    let mut listeners = Vec::new();
    for b in &lab.backends {
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, hc_port);
        let l = Arc::new(
            b.run(move || TcpListener::bind(addr))?
                .with_context(|| format!("cannot listen on {addr} in {}", b.ns))?,
        );
        listeners.push(l);
        nft(
            &b.ns,
            &format!(
                "table inet {table} {{\n counter synseen {{ }}\n chain pre {{\n  \
                 type filter hook prerouting priority raw; policy accept;\n  \
                 ip daddr {} tcp dport {hc_port} counter name \"synseen\" drop\n }}\n}}\n",
                lab.vip
            ),
        )?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (client_mac, client_ifindex) = link_info(&lab.client.ns, &lab.client.iface)?;
    let (lb_mac, _) = link_info(&lab.lb.ns, &lab.lb.iface)?;
    let x = lab.vip.octets()[1];
    let vip_o = lab.vip.octets();
    let victim: &Node = lab.backends.last().expect("backends");
    let victim_listener = listeners.last().expect("listeners").clone();
    std::thread::scope(|s| -> Result<Value> {
        for l in &listeners {
            let (l, st) = (l.clone(), stop.clone());
            s.spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if l.accept().is_err() {
                        break;
                    }
                }
            });
        }
        let st = stop.clone();
        let client = &lab.client;
        s.spawn(move || {
            in_node(client, || -> Result<()> {
                let sender = RawSender::open(client_ifindex)?;
                sender.send(
                    Some(5_000.0),
                    Duration::from_secs(600),
                    Some(&st),
                    |n, buf| {
                        let (src, sport) = fresh_source(x, n + 1_000_000);
                        let ip = Ip4::new(src.octets(), vip_o, lb_common::PROTO_TCP);
                        let seg = tcp(&ip, sport, hc_port, SYN, b"");
                        let mut f = eth(lb_mac, client_mac, 0x0800);
                        f.extend_from_slice(&ip.header(seg.len()));
                        f.extend_from_slice(&seg);
                        buf[..f.len()].copy_from_slice(&f);
                        f.len()
                    },
                );
                Ok(())
            })
        });
        let result = (|| -> Result<Value> {
            for b in &lab.backends {
                lab.add_backend(service, b)?;
            }
            let count = || nft_counter(&victim.ns, &table, "synseen");
            // Healthy and in the table: its count grows.
            let deadline = Instant::now() + Duration::from_secs(30);
            let c0 = count()?;
            loop {
                check_interrupted()?;
                std::thread::sleep(Duration::from_millis(50));
                if count()? > c0 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no new flow reached {} within 30 s", victim.addr);
                }
            }
            // Fail it: the listener goes, the TCP check gets RST.
            let t_fail = Instant::now();
            let _ = nix::sys::socket::shutdown(
                victim_listener.as_raw_fd(),
                nix::sys::socket::Shutdown::Both,
            );
            let mut last = count()?;
            let mut last_change = Instant::now();
            while last_change.elapsed() < Duration::from_secs(2) {
                check_interrupted()?;
                if t_fail.elapsed() > Duration::from_secs(60) {
                    bail!("new flows still reach the failed backend after 60 s");
                }
                std::thread::sleep(Duration::from_millis(5));
                let c = count()?;
                if c != last {
                    last = c;
                    last_change = Instant::now();
                }
            }
            Ok(json!({
                "measured": true,
                "check": format!("tcp {}", if extra.is_empty() { "(the daemon's defaults)".to_string() } else { extra.join(" ") }),
                "failure_to_last_new_flow_ms": round_to(
                    last_change.duration_since(t_fail).as_secs_f64() * 1e3, 1),
                "resolution_ms": "≈ 10 (nft counter polled through nsenter)",
            }))
        })();
        stop.store(true, Ordering::SeqCst);
        for l in &listeners {
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        result
    })
}
