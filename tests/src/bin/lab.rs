//! `lab`: the demo of `cargo xtask demo`. Builds the namespace lab
//! (`mqlb_tests::lab`), adds the service `amqp` (VIP:5672/tcp) with three
//! backends, opens connections through the VIP from the client namespace,
//! shows where each landed and `mqlb stats`, and removes everything at the
//! end or on Ctrl-C.
//!
//! Usage: `lab [--connections N] [--mode skb|native] [--hold]`
//! (`--hold` keeps the lab up until Ctrl-C, printing how to reach it).

use anyhow::{bail, Context as _, Result};
use mqlb_tests::lab::{Lab, LabConfig, XdpMode};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        connections: 60,
        mode: XdpMode::Skb,
        hold: false,
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
            "-h" | "--help" => {
                println!("usage: lab [--connections N] [--mode skb|native] [--hold]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
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
    if let Err(e) = run() {
        eprintln!("lab: {e:#}");
        std::process::exit(if INTERRUPTED.load(Ordering::SeqCst) {
            130
        } else {
            1
        });
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    if !mqlb_tests::privileged::is_root() {
        bail!("the lab creates network namespaces and attaches XDP: run it as root");
    }
    println!("lab: building namespaces (mode {})", args.mode.as_arg());
    let mut lab = Lab::start(LabConfig {
        backends: 3,
        mode: args.mode,
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
