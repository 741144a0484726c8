//! `lab`: the demo of `cargo xtask demo`. Builds the namespace lab with
//! three real RabbitMQ nodes behind mqlb (`mqlb_tests::rabbit`), adds the
//! service `amqp` (VIP:5672/tcp, AMQP health check), runs AMQP clients
//! (lapin, publisher confirms, manual acks) through the VIP from the client
//! namespace, shows where each landed and `mqlb stats` with rates, then
//! kills one broker with `kill -9` and shows the failover and the node's
//! return. Removes everything at the end or on Ctrl-C.
//!
//! Usage: `lab [--connections N] [--mode skb|native] [--hold] [--echo]`
//! (`--hold` keeps the lab and the load up until Ctrl-C, printing how to
//! reach it; `--echo` runs the older demo with plain TCP echo servers
//! instead of RabbitMQ).

use anyhow::{bail, ensure, Context as _, Result};
use mqlb_tests::lab::{wait_for, Lab, LabConfig, XdpMode};
use mqlb_tests::rabbit::{AmqpClient, RabbitConfig, RabbitLab, AMQP_PORT, SERVICE};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Each client publishes this many confirmed messages, consumes them back,
/// then pauses: ~25 messages/s per client, light enough that a broker
/// restarting beside the load on two cores is up in ~15 s.
const LOAD_BATCH: usize = 5;
const LOAD_PAUSE: Duration = Duration::from_millis(200);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

struct Args {
    connections: usize,
    mode: XdpMode,
    hold: bool,
    echo: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        connections: 60,
        mode: XdpMode::Skb,
        hold: false,
        echo: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--connections" | "-n" => {
                args.connections = it
                    .next()
                    .context("--connections needs a number")?
                    .parse()
                    .context("--connections needs a number")?
            }
            "--mode" => args.mode = it.next().context("--mode needs skb or native")?.parse()?,
            "--hold" => args.hold = true,
            "--echo" => args.echo = true,
            "-h" | "--help" => {
                println!(
                    "usage: lab [--connections N] [--mode skb|native] [--hold] [--echo]\n\
                     Three RabbitMQ nodes behind mqlb, AMQP clients through the VIP, a broker \
                     killed and back.\n\
                     --hold  keep the lab and the load up until Ctrl-C\n\
                     --echo  plain TCP echo servers instead of RabbitMQ (the older demo)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(
        (3..=3000).contains(&args.connections),
        "--connections takes 3 to 3000"
    );
    Ok(args)
}

fn main() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    // No SA_RESTART: a blocked socket call returns early, and every step
    // below has a timeout anyway.
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        unsafe { sigaction(sig, &action) }.expect("install signal handler");
    }
    let result = parse_args().and_then(|args| {
        if !mqlb_tests::privileged::is_root() {
            bail!("the lab creates network namespaces and attaches XDP: run it as root");
        }
        if args.echo {
            echo_demo(&args)
        } else {
            rabbit_demo(&args)
        }
    });
    if let Err(e) = result {
        eprintln!("lab: {e:#}");
        std::process::exit(if INTERRUPTED.load(Ordering::SeqCst) {
            130
        } else {
            1
        });
    }
}

fn say(msg: impl AsRef<str>) {
    println!("\n\x1b[1m== {}\x1b[0m", msg.as_ref());
}

fn look(msg: impl AsRef<str>) {
    println!("\x1b[36m   look: {}\x1b[0m", msg.as_ref());
}

/// Prints `$ mqlb ARGS` and its output.
fn show_mqlb(rl: &RabbitLab, args: &[&str]) -> Result<()> {
    println!("$ mqlb {}", args.join(" "));
    print!("{}", rl.mqlb(args)?);
    Ok(())
}

/// Prints `secs` seconds of `mqlb stats --watch --interval 1s` (its plain,
/// non-terminal output: per-second rates per service and backend).
fn show_rates(rl: &RabbitLab, secs: u64) -> Result<()> {
    println!("$ mqlb stats --watch --interval 1s   ({secs} s of it)");
    let mut child = Command::new(rl.mqlb_path())
        .arg("--socket")
        .arg(rl.socket())
        .args(["stats", "--watch", "--interval", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start `mqlb stats --watch`")?;
    let stdout = child.stdout.take().context("stats stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(secs) + Duration::from_millis(300);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => println!("  {line}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Our own child, by its PID.
    let _ = child.kill();
    let _ = child.wait();
    interrupted()
}

/// Clients per backend, by the cluster name each got in Connection.Start.
fn per_node(rl: &RabbitLab, clients: &[AmqpClient]) -> BTreeMap<String, usize> {
    let mut m: BTreeMap<String, usize> = rl.broker_names().into_iter().map(|n| (n, 0)).collect();
    for c in clients {
        let node = rl.backend_of_cluster(&c.cluster_name).unwrap_or("?");
        *m.entry(node.to_string()).or_default() += 1;
    }
    m
}

fn counts_line(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(n, c)| format!("{n} (mqlb-{n}): {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Connects a client per port and checks each landed where the pinned
/// maps and lb-common's hash predict.
fn connect_checked(rl: &RabbitLab, ports: &[u16]) -> Result<Vec<AmqpClient>> {
    let predicted = rl.predict(ports)?;
    let clients = rl.connect_all(ports)?;
    let wrong: Vec<String> = clients
        .iter()
        .zip(&predicted)
        .filter(|(c, p)| rl.backend_of_cluster(&c.cluster_name) != Some(p.as_str()))
        .map(|(c, p)| format!("{} reached {} not {p}", c.src, c.cluster_name))
        .collect();
    ensure!(wrong.is_empty(), "unpredicted landings: {wrong:?}");
    Ok(clients)
}

fn rabbit_demo(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    say(format!(
        "building the lab: client, LB, 3 backends, each running RabbitMQ (mode {}); ~30 s",
        args.mode.as_arg()
    ));
    let mut rl = RabbitLab::start(RabbitConfig {
        lab: LabConfig {
            backends: 3,
            mode: args.mode,
            ..LabConfig::default()
        },
        brokers: 3,
        cancel: Some(&INTERRUPTED),
        ..RabbitConfig::default()
    })?;
    // From here on, leaving this function (error, Ctrl-C) drops the lab,
    // which stops the brokers and removes everything it made.
    println!(
        "lab {}: client {} ({}), LB {} ({}, `mqlb up` on {}), VIP {}",
        rl.id, rl.client.addr, rl.client.ns, rl.lb.addr, rl.lb.ns, rl.lb.iface, rl.vip
    );
    for b in &rl.backends {
        println!(
            "  backend {} {} ({}): RabbitMQ node mqlb-{}@localhost (PID {}), cluster name mqlb-{}, \
             VIP on lo, `mqlb decap` on {}",
            b.name,
            b.addr,
            b.ns,
            b.name,
            rl.broker_pid(&b.name).unwrap_or(0),
            b.name,
            b.iface
        );
    }
    println!("(up after {:.0?})", t0.elapsed());
    interrupted()?;

    say("the service: AMQP on the VIP, three nodes, AMQP health check");
    let c = rl.check();
    println!(
        "$ mqlb service add {SERVICE} --vip {}:{AMQP_PORT} --proto tcp --check amqp \
         --check-interval {:?} --check-timeout {:?} --rise {} --fall {}",
        rl.vip, c.interval, c.timeout, c.rise, c.fall
    );
    for b in &rl.backends {
        println!("$ mqlb backend add {SERVICE} {}", b.addr);
    }
    rl.add_service(&["b1", "b2", "b3"])?;
    show_mqlb(&rl, &["backend", "list", SERVICE])?;
    look("HEALTH: each node passed the AMQP check (protocol header → Connection.Start)");
    interrupted()?;

    say(format!(
        "{} AMQP clients (lapin) from {} through the VIP; each publishes confirmed messages and \
         consumes them back",
        args.connections, rl.client.addr
    ));
    let ports = rl.ports(args.connections)?;
    let clients = connect_checked(&rl, &ports)?;
    let on_b2: BTreeSet<SocketAddrV4> = clients
        .iter()
        .filter(|c| c.cluster_name == "mqlb-b2")
        .map(|c| c.src)
        .collect();
    println!(
        "clients per node, as each broker named itself in Connection.Start: {}",
        counts_line(&per_node(&rl, &clients))
    );
    println!(
        "every one of the {} landed on the node lb-common's flow hash + Maglev ring predicts",
        clients.len()
    );
    look("the spread is about even (Maglev, five-tuple hash)");
    let load = rl.start_load(clients, LOAD_BATCH, LOAD_PAUSE);
    load.wait_progress(100, Duration::from_secs(20))?;
    show_rates(&rl, 3)?;
    look("pkts/s per backend: all three carry traffic; flows/s is new connections");
    show_mqlb(&rl, &["stats"])?;
    interrupted()?;

    let pid = rl.broker_pid("b2").unwrap_or(0);
    say(format!("kill -9 {pid}: RabbitMQ on b2 dies"));
    rl.kill9("b2")?;
    let took = rl.wait_health("b2", "down", Duration::from_secs(15))?;
    println!(
        "mqlb marked b2 down {took:.1?} after the kill (bound: interval {:?} × fall {} + timeout \
         {:?} = {:?}); it left the Maglev table",
        c.interval,
        c.fall,
        c.timeout,
        c.down_bound()
    );
    wait_for("b2's clients to notice", Duration::from_secs(15), || {
        interrupted()?;
        let failed: BTreeSet<SocketAddrV4> = load.errors().iter().map(|(s, _)| *s).collect();
        Ok((failed == on_b2).then_some(()))
    })?;
    let lost = load.errors();
    println!(
        "{} clients were on b2: their connection closed ({}); the others did not notice",
        lost.len(),
        lost.first().map(|(_, e)| e.as_str()).unwrap_or("")
    );
    let ports = rl.ports(lost.len())?;
    let back = connect_checked(&rl, &ports)?;
    println!(
        "they reconnect through the VIP: {}",
        counts_line(&per_node(&rl, &back))
    );
    look("none on b2: new connections only go to healthy nodes");
    let load_back = rl.start_load(back, LOAD_BATCH, LOAD_PAUSE);
    show_rates(&rl, 3)?;
    look("b2 at 0 pkts/s and DOWN; b1 and b3 took its share");
    show_mqlb(&rl, &["backend", "list", SERVICE])?;
    interrupted()?;

    say("RabbitMQ on b2 restarts (same data, same cluster name); 15-30 s");
    let t_restart = Instant::now();
    rl.restart("b2")?;
    println!("b2 answers AMQP again after {:.0?}", t_restart.elapsed());
    let took = rl.wait_health("b2", "up", Duration::from_secs(30))?;
    println!(
        "mqlb saw b2 pass {} checks in a row and put it back {took:.1?} later",
        c.rise
    );
    let ports = rl.ports(12)?;
    let fresh = connect_checked(&rl, &ports)?;
    println!("12 new clients: {}", counts_line(&per_node(&rl, &fresh)));
    look("b2 takes new connections again; established ones stayed where they were");
    let load_fresh = rl.start_load(fresh, LOAD_BATCH, LOAD_PAUSE);
    load_fresh.wait_progress(30, Duration::from_secs(20))?;
    show_mqlb(&rl, &["stats"])?;

    if args.hold {
        say("the lab is up with the load running; Ctrl-C removes it");
        println!(
            "  {mqlb} --socket {sock} stats --watch\n  \
             {mqlb} --socket {sock} backend list {SERVICE}\n  \
             {ctl}",
            mqlb = rl.mqlb_path().display(),
            sock = rl.socket().display(),
            ctl = rl.rabbitmqctl_line("b2", "list_connections peer_host peer_port")?,
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    say("stopping the clients");
    let mut done = Vec::new();
    let mut failed_on_b2 = 0;
    let mut results = rl.stop_load(load);
    results.extend(rl.stop_load(load_back));
    results.extend(rl.stop_load(load_fresh));
    for (client, res) in results {
        match res {
            Ok(()) => done.push(client),
            Err(_) => failed_on_b2 += 1,
        }
    }
    let tally = rl.finish(done)?;
    println!(
        "{} clients closed cleanly: {} messages confirmed by the brokers, {} consumed back, \
         {} left in queues; {failed_on_b2} clients lost their connection with b2",
        tally.clients, tally.confirmed, tally.consumed, tally.left
    );
    look("confirmed == consumed and 0 left: nothing confirmed was lost or duplicated");
    say(format!(
        "removing the lab (RabbitMQ, namespaces); total {:.0?}",
        t0.elapsed()
    ));
    Ok(())
}

/// The older demo: plain TCP echo servers on the backends.
fn echo_demo(args: &Args) -> Result<()> {
    println!("lab: building namespaces (mode {})", args.mode.as_arg());
    let mut lab = Lab::start(LabConfig {
        backends: 3,
        mode: args.mode,
        ..LabConfig::default()
    })?;
    // From here on, leaving this function (error, Ctrl-C) drops the lab,
    // which removes everything it made.
    println!(
        "lab {}: client {} ({}), LB {} ({}, `mqlb up` on {}), VIP {}",
        lab.id, lab.client.addr, lab.client.ns, lab.lb.addr, lab.lb.ns, lab.lb.iface, lab.vip
    );
    for b in &lab.backends {
        println!(
            "  backend {} {} ({}, `mqlb decap` on {})",
            b.name, b.addr, b.ns, b.iface
        );
    }
    interrupted()?;
    lab.serve_tcp(5672)?;
    lab.add_service("amqp", 5672, "tcp", None)?;
    for b in &lab.backends {
        lab.add_backend("amqp", b)?;
    }
    println!("$ mqlb service list");
    print!("{}", lab.mqlb(&["service", "list"])?);
    interrupted()?;

    let vip = SocketAddr::from((lab.vip, 5672));
    println!(
        "opening {} TCP connections {} -> {vip}",
        args.connections, lab.client.addr
    );
    let mut counts = BTreeMap::<String, usize>::new();
    let mut open = Vec::new();
    for i in 0..args.connections {
        interrupted()?;
        let stream = lab
            .client
            .run(move || TcpStream::connect_timeout(&vip, Duration::from_secs(5)))?
            .with_context(|| format!("connection {i} to {vip}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let src = stream.local_addr()?;
        let mut hello = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut hello)?;
        let backend = hello.split(' ').nth(1).unwrap_or("?").to_string();
        println!("  {src:<21} -> {backend}");
        *counts.entry(backend).or_default() += 1;
        open.push(stream);
    }
    println!("connections per backend:");
    for (b, n) in &counts {
        println!("  {b}: {n}");
    }
    println!("$ mqlb stats");
    print!("{}", lab.mqlb(&["stats"])?);
    drop(open);

    if args.hold {
        println!(
            "lab is up; try: nsenter --net=/run/netns/{} nc {} 5672\n\
             {} --socket {} stats    (Ctrl-C removes the lab)",
            lab.client.ns,
            lab.vip,
            lab.mqlb_path().display(),
            lab.socket().display()
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("lab: removing namespaces");
    Ok(())
}
