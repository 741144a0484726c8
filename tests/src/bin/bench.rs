//! `bench`: the measuring half of `cargo xtask bench` (root).
//!
//! Part 1 (program cost) comes from the `prog_cost` example, which xtask
//! runs first; this binary merges its output (`--prog-cost-json`, else
//! `--prog-cost-text`). Then: part 2 (Maglev tables and map push), a
//! namespace lab with a second, XDP-free LB host, part 3 (UDP forwarding vs
//! nftables DNAT), part 4 (AMQP connections vs HAProxy and direct), part 5
//! (control-plane reaction), the maps' memory, and the report: a table on
//! stdout, `--json FILE`, `--chart FILE` (PNG).
//!
//! Usage: `bench [--json FILE] [--chart FILE] [--prog-cost-json FILE]
//! [--prog-cost-text FILE] [--mode skb|native] [--quick] [--parts 2,3,4,5]`

use anyhow::{bail, Context as _, Result};
use mqlb_tests::bench_util::{check_interrupted, install_signal_handlers, interrupted, PlainLb};
use mqlb_tests::lab::{Lab, LabConfig, LbMaps, XdpMode};
use mqlb_tests::{bench_conn, bench_fwd, bench_maglev, bench_react, bench_report};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    json: Option<PathBuf>,
    chart: Option<PathBuf>,
    prog_cost_json: Option<PathBuf>,
    prog_cost_text: Option<PathBuf>,
    mode: XdpMode,
    quick: bool,
    parts: Vec<u32>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        json: None,
        chart: None,
        prog_cost_json: None,
        prog_cost_text: None,
        mode: XdpMode::Skb,
        quick: false,
        parts: vec![1, 2, 3, 4, 5],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |what: &str| it.next().with_context(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--json" => a.json = Some(val("a file")?.into()),
            "--chart" => a.chart = Some(val("a file")?.into()),
            "--prog-cost-json" => a.prog_cost_json = Some(val("a file")?.into()),
            "--prog-cost-text" => a.prog_cost_text = Some(val("a file")?.into()),
            "--mode" => a.mode = val("skb or native")?.parse()?,
            "--quick" => a.quick = true,
            "--parts" => {
                a.parts = val("a list like 2,3")?
                    .split(',')
                    .map(|p| p.trim().parse().context("--parts takes numbers 1-5"))
                    .collect::<Result<_>>()?
            }
            "-h" | "--help" => {
                println!(
                    "usage: bench [--json FILE] [--chart FILE] [--prog-cost-json FILE] \
                     [--prog-cost-text FILE] [--mode skb|native] [--quick] [--parts 1,2,3,4,5]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(a)
}

fn main() {
    install_signal_handlers();
    if let Err(e) = run() {
        eprintln!("bench: {e:#}");
        std::process::exit(if interrupted() { 130 } else { 1 });
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel,
        "memory_gib": mem_kib.map(|k| (k as f64 / 1048576.0 * 10.0).round() / 10.0),
        "virtualised": std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| s.contains("hypervisor")),
    })
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The empty XDP program's cost per call in part 1 is the run's gauge of
/// the VM's speed state (ENV-NOTES: ~43 ns at repeat 1 in the fast state).
fn speed_state(pc: &Value) -> Value {
    const FAST_FLOOR_NS: f64 = 43.0;
    let floor = pc["paths"]
        .as_array()
        .and_then(|p| p.first())
        .and_then(|p| p["floor_ns_median"].as_f64());
    match floor {
        Some(f) => json!({
            "empty_program_ns_per_call": f,
            "fast_state_reference_ns": FAST_FLOOR_NS,
            "slowdown_vs_fast_state": (f / FAST_FLOOR_NS * 100.0).round() / 100.0,
            "state": if f <= 1.25 * FAST_FLOOR_NS { "fast" } else { "slow" },
        }),
        None => json!({ "state": "unknown (part 1 not run)" }),
    }
}

/// A part's figures, or `{"error": ...}` so the rest of the report stands
/// (an interruption ends the run instead).
fn part(name: &str, r: Result<Value>) -> Result<Value> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if interrupted() => Err(e),
        Err(e) => {
            eprintln!("bench: {name} failed: {e:#}");
            Ok(json!({ "error": format!("{e:#}") }))
        }
    }
}

fn step(what: &str) {
    eprintln!("bench: {what}");
}

fn run() -> Result<()> {
    let args = parse_args()?;
    if !mqlb_tests::privileged::is_root() {
        bail!("the bench loads BPF programs and builds network namespaces: run it as root");
    }
    let started = Instant::now();
    let want = |p: u32| args.parts.contains(&p);
    let q = args.quick;
    let mut report = json!({
        "date": today(),
        "machine": machine(),
        "quick": q,
        "program_cost": {},
        "maglev": {},
        "forwarding": {},
        "amqp": {},
        "control_plane": {},
        "maps_memory": {},
    });

    if want(1) {
        report["program_cost"] = bench_report::load_prog_cost(
            args.prog_cost_json.as_deref(),
            args.prog_cost_text.as_deref(),
        );
    }
    report["program_cost"]["own_code_ns_median"] = bench_report::own_code(&report["program_cost"]);
    report["speed_state"] = speed_state(&report["program_cost"]);
    if want(2) {
        step("part 2: Maglev tables");
        let mut mg = part("maglev", bench_maglev::tables(if q { 3 } else { 7 }))?;
        check_interrupted()?;
        step("part 2: pushing tables into RINGS");
        mg["map_push"] = part("map push", bench_maglev::map_push(if q { 3 } else { 9 }))?;
        report["maglev"] = mg;
    }

    if want(3) || want(4) || want(5) {
        step(&format!(
            "building the lab (XDP mode {})",
            args.mode.as_arg()
        ));
        let lab = Lab::start(LabConfig {
            backends: 3,
            mode: args.mode,
            ..LabConfig::default()
        })?;
        let mut plain = PlainLb::create(&lab, "plain-lb", 'n', 3)
            .context("adding the plain LB host to the lab")?;
        let workdir = tempfile::Builder::new()
            // The lab's prefix: a killed run's dir goes with the next lab's cleanup.
            .prefix(&format!(
                "{}{}-bench-",
                mqlb_tests::lab::TMP_PREFIX,
                std::process::id()
            ))
            .tempdir()?;
        if want(3) {
            check_interrupted()?;
            step("part 3: UDP forwarding, mqlb vs nftables DNAT vs direct");
            let (rounds, ms) = if q { (3, 300) } else { (11, 500) };
            let fwd = PlainLb::create(&lab, "bounce", 'm', 4)
                .and_then(|bounce| bench_fwd::run(&lab, &plain, &bounce, rounds, ms));
            report["forwarding"] = part("forwarding", fwd)?;
        }
        if want(4) {
            check_interrupted()?;
            step("part 4: AMQP connections, mqlb vs HAProxy vs direct");
            let (rounds, ms, lat) = if q { (2, 1000, 200) } else { (5, 2000, 1000) };
            report["amqp"] = part(
                "amqp",
                bench_conn::run(&lab, &mut plain, rounds, ms, 16, lat, workdir.path()),
            )?;
        }
        if want(5) {
            check_interrupted()?;
            step("part 5: control-plane reaction");
            let cycles = if q { 4 } else { 10 };
            report["control_plane"]["backend_changes"] = part(
                "backend changes",
                bench_react::backend_changes(&lab, cycles),
            )?;
            check_interrupted()?;
            report["control_plane"]["health_check"] =
                part("health check", bench_react::health_check(&lab))?;
        }
        report["maps_memory"] = part(
            "maps memory",
            bench_report::maps_memory(&LbMaps::pin_dir(&lab.lb.iface)),
        )?;
        report["lab_daemon_stats"] = lab.stats_json().unwrap_or(Value::Null);
        step("removing the lab");
        drop(plain);
        drop(lab);
    }

    report["targets"] = json!(bench_report::targets(&report));
    report["bench_seconds"] = json!(started.elapsed().as_secs());
    print!("{}", bench_report::table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nJSON: {}", path.display());
    }
    if let Some(path) = &args.chart {
        match bench_report::chart(&report, path) {
            Ok(()) => println!("chart: {}", path.display()),
            Err(e) => eprintln!("bench: no chart: {e:#}"),
        }
    }
    Ok(())
}
