//! Part 4 of `cargo xtask bench`: AMQP connection rate and handshake latency
//! through mqlb, through HAProxy (`mode tcp`, on the plain LB host) and
//! directly to the backends, from the same client to the same backends.
//!
//! The backends run a small server (not RabbitMQ): it answers the AMQP 0-9-1
//! protocol header `AMQP\0\0\x09\x01` with a Connection.Start method frame,
//! the first step of every AMQP connection, then waits for the client to
//! close. One "connection" is: TCP connect, send the header, read and check
//! the Connection.Start frame, close.

use crate::bench_util::{
    check_interrupted, in_node, ksoftirqd_pids, median, percentile, process_cpu_ns,
    process_sched_ns, round_to, sched_ns, BgProc, PlainLb,
};
use crate::lab::{Lab, Node};
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PORT: u16 = 5672;
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\0\0\x09\x01";
const WORKERS_PER_BACKEND: usize = 8;
const IO_TIMEOUT: Duration = Duration::from_secs(3);

pub const VARIANTS: [&str; 3] = ["direct", "mqlb", "haproxy"];

/// A Connection.Start method frame (channel 0, class 10, method 10,
/// version 0-9, a one-entry server-properties table, PLAIN, en_US).
pub fn connection_start_frame() -> Vec<u8> {
    fn longstr(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }
    let mut table = Vec::new();
    table.push(7u8);
    table.extend_from_slice(b"product");
    table.push(b'S');
    longstr(&mut table, b"mqlb-bench");
    let mut payload = vec![0, 10, 0, 10, 0, 9];
    longstr(&mut payload, &table);
    longstr(&mut payload, b"PLAIN AMQPLAIN");
    longstr(&mut payload, b"en_US");
    let mut frame = vec![1, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xce);
    frame
}

/// The AMQP-greeting servers of the backends (one listener each on
/// `0.0.0.0:5672`, several accepting threads); stopped on drop.
pub struct AmqpServers {
    stop: Arc<AtomicBool>,
    listeners: Vec<Arc<TcpListener>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl AmqpServers {
    pub fn start(backends: &[Node]) -> Result<AmqpServers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = AmqpServers {
            stop: stop.clone(),
            listeners: Vec::new(),
            threads: Vec::new(),
        };
        let frame = Arc::new(connection_start_frame());
        for b in backends {
            let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT);
            let listener = Arc::new(
                b.run(move || TcpListener::bind(addr))?
                    .with_context(|| format!("cannot listen on {addr} in {}", b.ns))?,
            );
            servers.listeners.push(listener.clone());
            for _ in 0..WORKERS_PER_BACKEND {
                let (l, st, f) = (listener.clone(), stop.clone(), frame.clone());
                servers.threads.push(
                    std::thread::Builder::new()
                        .name(format!("amqp-{}", b.name))
                        .spawn(move || {
                            while !st.load(Ordering::Relaxed) {
                                if let Ok((s, _)) = l.accept() {
                                    let _ = greet(s, &f);
                                }
                            }
                        })?,
                );
            }
        }
        Ok(servers)
    }
}

fn greet(mut s: TcpStream, frame: &[u8]) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut header = [0u8; 8];
    s.read_exact(&mut header)?;
    if &header != PROTOCOL_HEADER {
        // The spec's answer to an unsupported header: ours, then close.
        return s.write_all(PROTOCOL_HEADER);
    }
    s.write_all(frame)?;
    // Wait for the client to close (it does after reading the frame).
    let mut buf = [0u8; 64];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

impl Drop for AmqpServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in &self.listeners {
            // Wakes every thread blocked in accept() (Linux).
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One connect + AMQP greeting; its duration.
pub fn handshake(addr: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(PROTOCOL_HEADER)?;
    let mut head = [0u8; 7];
    s.read_exact(&mut head)?;
    if head[..3] != [1, 0, 0] {
        bail!("{addr}: not a method frame on channel 0: {head:02x?}");
    }
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    if size > 1 << 16 {
        bail!("{addr}: frame of {size} bytes");
    }
    let mut body = vec![0u8; size + 1];
    s.read_exact(&mut body)?;
    if body[..6] != [0, 10, 0, 10, 0, 9] || body[size] != 0xce {
        bail!(
            "{addr}: not Connection.Start 0-9: {:02x?}",
            &body[..6.min(size)]
        );
    }
    Ok(start.elapsed())
}

/// `threads` clients opening connections to `targets` (round robin) for
/// `dur`: (completed, errors, first error).
fn load(
    client: &Node,
    targets: &[SocketAddr],
    threads: usize,
    dur: Duration,
) -> Result<(u64, u64, Option<String>)> {
    in_node(client, || {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let (mut ok, mut err, mut first) = (0u64, 0u64, None);
                        let start = Instant::now();
                        let mut i = t;
                        while start.elapsed() < dur {
                            match handshake(targets[i % targets.len()]) {
                                Ok(_) => ok += 1,
                                Err(e) => {
                                    err += 1;
                                    first.get_or_insert_with(|| format!("{e:#}"));
                                }
                            }
                            i += threads;
                        }
                        (ok, err, first)
                    })
                })
                .collect();
            let mut total = (0, 0, None);
            for h in handles {
                let (ok, err, first) = h.join().expect("client thread");
                total.0 += ok;
                total.1 += err;
                if total.2.is_none() {
                    total.2 = first;
                }
            }
            total
        })
    })
}

/// `n` sequential connections: latencies in µs (failures skipped).
fn latencies(client: &Node, targets: &[SocketAddr], n: usize) -> Result<Vec<f64>> {
    in_node(client, || {
        (0..n)
            .filter_map(|i| handshake(targets[i % targets.len()]).ok())
            .map(|d| d.as_secs_f64() * 1e6)
            .collect()
    })
}

fn haproxy_config(plain: &PlainLb, backends: &[Node]) -> String {
    let mut cfg = format!(
        "global\n    maxconn 8000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 30s\n    timeout server 30s\n\nfrontend amqp\n    bind {}:{PORT}\n    \
         default_backend rabbitmq\n\nbackend rabbitmq\n    balance roundrobin\n",
        plain.node.addr
    );
    for b in backends {
        cfg.push_str(&format!("    server {} {}:{PORT}\n", b.name, b.addr));
    }
    cfg
}

/// HAProxy's version line (`haproxy -v`).
pub fn haproxy_version() -> String {
    std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs part 4.
pub fn run(
    lab: &Lab,
    plain: &mut PlainLb,
    rounds: usize,
    run_ms: u64,
    threads: usize,
    latency_samples: usize,
    workdir: &std::path::Path,
) -> Result<Value> {
    // Many short connections: the client (and HAProxy, which closes towards
    // the backends) reuse TIME_WAIT ports, from a wide range. Namespace
    // sysctls of the lab's own namespaces only.
    for ns in [lab.netns_of(&lab.client), plain.netns()] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    let _servers = AmqpServers::start(&lab.backends)?;
    lab.add_service("bench-amqp", PORT, "tcp", None)?;
    for b in &lab.backends {
        lab.add_backend("bench-amqp", b)?;
    }
    let cfg_path = workdir.join("haproxy.cfg");
    std::fs::write(&cfg_path, haproxy_config(plain, &lab.backends))?;
    let cfg_str = cfg_path.to_string_lossy().into_owned();
    plain.procs.push(BgProc::spawn(
        &plain.node.ns,
        "haproxy",
        &["-f", &cfg_str, "-db"],
        &workdir.join("haproxy.log"),
    )?);

    let targets: Vec<Vec<SocketAddr>> = vec![
        lab.backends
            .iter()
            .map(|b| SocketAddr::from((b.addr, PORT)))
            .collect(),
        vec![SocketAddr::from((lab.vip, PORT))],
        vec![SocketAddr::from((plain.node.addr, PORT))],
    ];
    // Each path answers before anything is timed (HAProxy needs a moment).
    for (v, name) in VARIANTS.iter().enumerate() {
        let start = Instant::now();
        loop {
            check_interrupted()?;
            let t = targets[v].clone();
            match in_node(&lab.client, move || handshake(t[0]))? {
                Ok(_) => break,
                Err(e) if start.elapsed() > Duration::from_secs(15) => {
                    if let Some(p) = plain.procs.last_mut() {
                        p.check_running()?;
                    }
                    bail!(
                        "{name}: no AMQP greeting through {}: {e:#}\n{}",
                        targets[v][0],
                        lab.diagnostics()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        // Warm-up: neighbour entries, HAProxy's threads.
        load(
            &lab.client,
            &targets[v],
            threads,
            Duration::from_millis(300),
        )?;
    }

    // Each round: `SLICES` turns of every variant (rotated), so that the
    // VM's speed state and the other load on the machine fall alike on
    // all three. CPU: this process (clients, servers, and the softirq work
    // they run inline, mqlb's XDP included), HAProxy's threads, ksoftirqd.
    const SLICES: usize = 5;
    let slice = Duration::from_millis(run_ms / SLICES as u64);
    let haproxy_pid = plain.procs.last().map(BgProc::pid);
    let softirqd = ksoftirqd_pids();
    let cpu_now =
        || process_cpu_ns() + haproxy_pid.map_or(0, process_sched_ns) + sched_ns(&softirqd);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut cpu_per_conn: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut errors = vec![0u64; VARIANTS.len()];
    let mut first_error: Vec<Option<String>> = vec![None; VARIANTS.len()];
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let per_round_lat = latency_samples.div_ceil(rounds);
    for _ in 0..rounds {
        let mut ok = vec![0u64; VARIANTS.len()];
        let mut secs = vec![0f64; VARIANTS.len()];
        let mut cpu = vec![0u64; VARIANTS.len()];
        for s in 0..SLICES {
            for k in 0..VARIANTS.len() {
                check_interrupted()?;
                let v = (k + s) % VARIANTS.len();
                let (start, cpu0) = (Instant::now(), cpu_now());
                let (n, err, first) = load(&lab.client, &targets[v], threads, slice)?;
                cpu[v] += cpu_now() - cpu0;
                secs[v] += start.elapsed().as_secs_f64();
                ok[v] += n;
                errors[v] += err;
                if first_error[v].is_none() {
                    first_error[v] = first;
                }
            }
        }
        for v in 0..VARIANTS.len() {
            rates[v].push(ok[v] as f64 / secs[v]);
            cpu_per_conn[v].push(cpu[v] as f64 / 1e3 / ok[v].max(1) as f64);
        }
        for k in 0..VARIANTS.len() {
            check_interrupted()?;
            lat[k].extend(latencies(&lab.client, &targets[k], per_round_lat)?);
        }
    }
    if let Some(p) = plain.procs.last_mut() {
        p.check_running().context("HAProxy died during the run")?;
    }
    let ratio = |a: usize, b: usize| -> Vec<f64> {
        (0..rounds).map(|r| rates[a][r] / rates[b][r]).collect()
    };
    let cpu_ratio = |a: usize, b: usize| -> Vec<f64> {
        (0..rounds)
            .map(|r| cpu_per_conn[a][r] / cpu_per_conn[b][r])
            .collect()
    };
    let mut variants = serde_json::Map::new();
    for (v, name) in VARIANTS.iter().enumerate() {
        variants.insert(
            name.to_string(),
            json!({
                "connections_per_s_median": round_to(median(&rates[v]), 0),
                "connections_per_s_per_round": rates[v].iter().map(|x| round_to(*x, 0)).collect::<Vec<_>>(),
                "cpu_us_per_connection_median": round_to(median(&cpu_per_conn[v]), 2),
                "cpu_us_per_connection_per_round": cpu_per_conn[v].iter().map(|x| round_to(*x, 2)).collect::<Vec<_>>(),
                "errors": errors[v],
                "first_error": first_error[v],
                "handshake_latency_us_p50": round_to(percentile(&lat[v], 50.0), 1),
                "handshake_latency_us_p99": round_to(percentile(&lat[v], 99.0), 1),
                "latency_samples": lat[v].len(),
            }),
        );
    }
    let mqlb_haproxy = ratio(1, 2);
    let mqlb_direct = ratio(1, 0);
    Ok(json!({
        "server": "a Rust server per backend namespace that answers the AMQP 0-9-1 protocol header \
            with a Connection.Start frame (the first step of AMQP), not RabbitMQ",
        "haproxy": haproxy_version(),
        "haproxy_where": "on a second LB host of the same bridge without XDP (`mode tcp`, roundrobin, \
            the three backends)",
        "connection": "TCP connect + AMQP protocol header + Connection.Start frame read + close",
        "client_threads": threads,
        "rounds": rounds,
        "run_ms": run_ms,
        "variants": variants,
        "mqlb_over_haproxy_rate_ratio_median": round_to(median(&mqlb_haproxy), 3),
        "mqlb_over_haproxy_rate_ratio_per_round": mqlb_haproxy.iter().map(|x| round_to(*x, 3)).collect::<Vec<_>>(),
        "mqlb_over_direct_rate_ratio_median": round_to(median(&mqlb_direct), 3),
        "mqlb_over_direct_rate_ratio_per_round": mqlb_direct.iter().map(|x| round_to(*x, 3)).collect::<Vec<_>>(),
        "haproxy_over_mqlb_cpu_per_connection_ratio_median": round_to(median(&cpu_ratio(2, 1)), 3),
        "direct_over_mqlb_cpu_per_connection_ratio_median": round_to(median(&cpu_ratio(0, 1)), 3),
        "cpu_method": "CPU time of the bench process (client and server threads and the softirq \
            work they run inline, mqlb's XDP program included) + HAProxy's threads + ksoftirqd, \
            over completed connections; other processes on the machine are not counted",
    }))
}
