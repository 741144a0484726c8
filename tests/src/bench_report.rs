//! The report of `cargo xtask bench`: part 1 merged from `prog_cost`, the
//! maps' memory, the targets against the figures, the table on
//! stdout, and the chart of the ratios (PNG, plotters).

use crate::bench_util::round_to;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

// ------------------------------------------------------------------ part 1

/// Part 1 from `prog_cost --json FILE` when that file holds JSON, else from
/// its stdout table.
pub fn load_prog_cost(json_path: Option<&Path>, text_path: Option<&Path>) -> Value {
    if let Some(p) = json_path {
        if let Ok(text) = std::fs::read_to_string(p) {
            if let Ok(mut v) = serde_json::from_str::<Value>(&text) {
                if v.is_object() {
                    v["source"] = json!("prog_cost --json");
                    return v;
                }
            }
        }
    }
    match text_path.map(std::fs::read_to_string) {
        Some(Ok(text)) => {
            let mut v = prog_cost_from_text(&text);
            v["source"] = json!("prog_cost stdout (parsed)");
            v
        }
        _ => json!({ "source": "not run" }),
    }
}

fn num(s: &str) -> Option<f64> {
    s.parse::<f64>().ok()
}

/// Parses the tables `prog_cost` prints: programs (id, xlated insns, JIT
/// bytes, verifier insns) and paths (ns/pkt, floor, net, net fast, net-swap,
/// ratio, then the per-round ratios).
pub fn prog_cost_from_text(text: &str) -> Value {
    let mut programs = Vec::new();
    let mut paths = Vec::new();
    let mut section = "";
    let mut rounds = Value::Null;
    let mut fast = Value::Null;
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.is_empty() {
            section = "";
            continue;
        }
        if t[0] == "program" && line.contains("JIT") {
            section = "programs";
            continue;
        }
        if t[0] == "path" && line.contains("ns/pkt") {
            section = "paths";
            continue;
        }
        if line.starts_with("fast rounds") {
            // "fast rounds (floor <= 1.25 x lowest): F of R"
            let n: Vec<u64> = t.iter().filter_map(|x| x.parse().ok()).collect();
            if n.len() >= 2 {
                fast = json!(n[n.len() - 2]);
                rounds = json!(n[n.len() - 1]);
            }
            continue;
        }
        match section {
            "programs" if t.len() >= 5 => {
                let k = t.len();
                let int = |x: &str| x.parse::<u64>().ok();
                programs.push(json!({
                    "name": t[..k - 4].join(" "),
                    "xlated_insns": int(t[k - 3]),
                    "jited_bytes": int(t[k - 2]),
                    "verified_insns": int(t[k - 1]),
                }));
            }
            "paths" => {
                let Some(i) = (0..t.len().saturating_sub(5))
                    .find(|&i| t[i..i + 6].iter().all(|x| num(x).is_some()))
                else {
                    continue;
                };
                let v: Vec<f64> = t[i..].iter().filter_map(|x| num(x)).collect();
                paths.push(json!({
                    "name": t[..i].join(" "),
                    "ns_per_packet_median": v[0],
                    "floor_ns_median": v[1],
                    "net_ns_median": v[2],
                    "net_ns_median_fast_rounds": v[3],
                    "net_over_swap_ns_median": v[4],
                    "ratio_to_empty_median": v[5],
                    "ratio_to_empty_per_round": &v[6..],
                }));
            }
            _ => {}
        }
    }
    json!({
        "rounds": rounds,
        "fast_rounds": fast,
        "repeat": 1,
        "programs": programs,
        "paths": paths,
    })
}

/// The first measured mqlb path (not a floor, not a `[before]` build)
/// whose lower-cased name satisfies `pred`.
fn find_path(pc: &Value, pred: impl Fn(&str) -> bool) -> Option<&Value> {
    pc["paths"].as_array()?.iter().find(|p| {
        p["name"].as_str().is_some_and(|name| {
            let n = name.to_lowercase();
            pred(&n) && !n.contains("floor") && !n.contains("baseline") && !n.contains("[before]")
        })
    })
}

/// The net ns/packet (minus the empty program) of the path [`find_path`] finds.
fn path_net(pc: &Value, pred: impl Fn(&str) -> bool) -> Option<(String, f64)> {
    let p = find_path(pc, pred)?;
    Some((
        p["name"].as_str()?.to_string(),
        p["net_ns_median"].as_f64()?,
    ))
}

/// mqlb's own code per path: the path minus the `calls floor` program run
/// on the same frame (its kernel calls and map accesses without the logic),
/// per round, median. Only where `prog_cost` measured such a floor.
pub fn own_code(pc: &Value) -> Value {
    let Some(paths) = pc["paths"].as_array() else {
        return Value::Null;
    };
    let per_round = |p: &Value| -> Option<Vec<f64>> {
        p["net_ns_per_round"]
            .as_array()?
            .iter()
            .map(Value::as_f64)
            .collect()
    };
    let mut out = serde_json::Map::new();
    for (floor_name, pred) in [
        ("calls floor: not a service", "pass-through"),
        ("calls floor: established", "established"),
    ] {
        let floor = paths.iter().find(|p| p["name"] == floor_name);
        let path = find_path(pc, |n| n.contains(pred));
        if let (Some(floor), Some(path)) = (floor, path) {
            if let (Some(a), Some(b)) = (per_round(path), per_round(floor)) {
                let d: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
                out.insert(
                    path["name"].as_str().unwrap_or("?").to_string(),
                    json!(round_to(crate::bench_util::median(&d), 1)),
                );
            }
        }
    }
    if out.is_empty() {
        Value::Null
    } else {
        Value::Object(out)
    }
}

// ------------------------------------------------------------ maps memory

/// Memory of every map the daemon pinned for `iface` (`bpftool map show`:
/// `bytes_memlock`), and conntrack's size scaled to 1M flows.
pub fn maps_memory(pin_dir: &Path) -> Result<Value> {
    let mut maps = Vec::new();
    let mut total = 0u64;
    let mut ct_per_entry = None;
    let dir = std::fs::read_dir(pin_dir)
        .with_context(|| format!("cannot list the pins in {}", pin_dir.display()))?;
    let mut entries: Vec<_> = dir.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .context("cannot run bpftool")?;
        if !out.status.success() {
            continue; // a program or link pin
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let bytes = v["bytes_memlock"].as_u64().unwrap_or(0);
        let max_entries = v["max_entries"].as_u64().unwrap_or(0);
        let name = v["name"].as_str().unwrap_or("?").to_string();
        total += bytes;
        if name == lb_common::names::CT4 && max_entries > 0 {
            ct_per_entry = Some(bytes as f64 / max_entries as f64);
        }
        maps.push(json!({
            "name": name,
            "type": v["type"],
            "max_entries": max_entries,
            "key_bytes": v["bytes_key"],
            "value_bytes": v["bytes_value"],
            "memlock_bytes": bytes,
        }));
    }
    if maps.is_empty() {
        bail!("no pinned maps in {}", pin_dir.display());
    }
    let ct_1m = ct_per_entry.map(|b| b * (1u64 << 20) as f64);
    Ok(json!({
        "source": "bpftool map show (bytes_memlock) of the daemon's pinned maps",
        "maps": maps,
        "total_bytes": total,
        "total_mib": round_to(total as f64 / (1 << 20) as f64, 2),
        "ct4_bytes_per_entry": ct_per_entry.map(|b| round_to(b, 1)),
        "ct4_mib_for_1m_flows": ct_1m.map(|b| round_to(b / (1 << 20) as f64, 2)),
    }))
}

// ----------------------------------------------------------------- targets

fn target(name: &str, measured: Option<f64>, limit: f64, unit: &str, at_most: bool) -> Value {
    let met = measured.map(|m| if at_most { m <= limit } else { m >= limit });
    json!({
        "target": name,
        "measured": measured.map(|m| round_to(m, 3)),
        "limit": limit,
        "unit": unit,
        "comparison": if at_most { "<=" } else { ">=" },
        "met": met,
    })
}

fn find_table(report: &Value, n: u64, m: u64) -> Option<&Value> {
    report["maglev"]["tables"]
        .as_array()?
        .iter()
        .find(|r| r["backends"].as_u64() == Some(n) && r["table_size"].as_u64() == Some(m))
}

/// The targets with the measured figure next to each.
pub fn targets(report: &Value) -> Vec<Value> {
    let pc = &report["program_cost"];
    let est = path_net(pc, |n| n.contains("established"));
    let new =
        path_net(pc, |n| n.contains("new 5-tuple")).or_else(|| path_net(pc, |n| n.contains("new")));
    let pass = path_net(pc, |n| n.contains("pass-through"));
    let t100 = find_table(report, 100, 65537);
    let t10 = find_table(report, 10, 65537);
    let fwd = &report["forwarding"];
    let amqp = &report["amqp"];
    let react = &report["control_plane"]["backend_changes"];
    let mem = &report["maps_memory"];
    vec![
        target(
            "established-flow path, net of the empty program",
            est.map(|x| x.1),
            60.0,
            "ns/packet",
            true,
        ),
        target(
            "new flow (SYN, Maglev + conntrack insert), net",
            new.map(|x| x.1),
            120.0,
            "ns/packet",
            true,
        ),
        target(
            "non-service pass-through, net",
            pass.map(|x| x.1),
            10.0,
            "ns/packet",
            true,
        ),
        target(
            "Maglev build N=100 M=65537",
            t100.and_then(|t| t["build_ms_median"].as_f64()),
            1.0,
            "ms",
            true,
        ),
        target(
            "extra disruption N=10 (Katran 0.26)",
            t10.and_then(|t| t["extra_moved_pct_mean"].as_f64()),
            0.26,
            "% of slots",
            true,
        ),
        target(
            "extra disruption N=100 (Katran 0.57)",
            t100.and_then(|t| t["extra_moved_pct_mean"].as_f64()),
            0.57,
            "% of slots",
            true,
        ),
        target(
            "forwarding CPU/pkt mqlb / nft DNAT (LB processing)",
            fwd["mqlb_over_nft_processing_ratio_median"].as_f64(),
            1.0 / 3.0,
            "ratio",
            true,
        ),
        target(
            "forwarding CPU/pkt mqlb / nft DNAT (with the hop)",
            fwd["mqlb_over_nft_hop_ratio_median"].as_f64(),
            1.0 / 3.0,
            "ratio",
            true,
        ),
        target(
            "AMQP connection rate, mqlb / HAProxy",
            amqp["mqlb_over_haproxy_rate_ratio_median"].as_f64(),
            2.0,
            "ratio",
            false,
        ),
        target(
            "AMQP connection rate, mqlb / direct",
            amqp["mqlb_over_direct_rate_ratio_median"].as_f64(),
            0.9,
            "ratio",
            false,
        ),
        target(
            "AMQP CPU per connection, HAProxy / mqlb",
            amqp["haproxy_over_mqlb_cpu_per_connection_ratio_median"].as_f64(),
            2.0,
            "ratio",
            false,
        ),
        target(
            "AMQP CPU per connection, direct / mqlb",
            amqp["direct_over_mqlb_cpu_per_connection_ratio_median"].as_f64(),
            0.9,
            "ratio",
            false,
        ),
        target(
            "backend add visible to new flows (max over cycles)",
            react["add_to_first_new_flow_ms_max"].as_f64(),
            10.0,
            "ms",
            true,
        ),
        target(
            "backend add: CLI start to first new flow (median)",
            react["add_cli_start_to_first_new_flow_ms_median"].as_f64(),
            10.0,
            "ms",
            true,
        ),
        target(
            "conntrack for 1M flows",
            mem["ct4_mib_for_1m_flows"].as_f64(),
            128.0,
            "MiB",
            true,
        ),
    ]
}

// ------------------------------------------------------------------- table

/// Whether a part left figures (it may also have left only an error).
fn ran(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|m| !m.is_empty() && m.get("source") != Some(&json!("not run")))
}

/// A JSON value as table text ("-" when absent).
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(t) => t.clone(),
        other => other.to_string(),
    }
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

/// The readable report.
pub fn table(report: &Value) -> String {
    let mut o = String::new();
    let m = &report["machine"];
    let _ = writeln!(
        o,
        "mqlb bench — {} — {} — kernel {} — {} CPUs — lab XDP mode {}",
        report["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        s(&m["cpus"]),
        report["forwarding"]["xdp_mode"].as_str().unwrap_or("-"),
    );
    let st = &report["speed_state"];
    let _ = writeln!(
        o,
        "VM speed state: {} (empty XDP program {} ns/call, {}x the fast state's ~43 ns)",
        st["state"].as_str().unwrap_or("?"),
        f(&st["empty_program_ns_per_call"], 0),
        f(&st["slowdown_vs_fast_state"], 2)
    );

    let pc = &report["program_cost"];
    if ran(pc) {
        let _ = writeln!(
        o,
        "\n1. Program cost (BPF_PROG_TEST_RUN, repeat 1, {} rounds, {} fast; net = minus the empty XDP program in the same round)",
        s(&pc["rounds"]), s(&pc["fast_rounds"])
    );
        if let Some(paths) = pc["paths"].as_array() {
            let _ = writeln!(
                o,
                "   {:<40} {:>7} {:>7} {:>9} {:>7} {:>8}",
                "path", "ns/pkt", "net", "net fast", "- swap", "x empty"
            );
            for p in paths {
                let _ = writeln!(
                    o,
                    "   {:<40} {:>7} {:>7} {:>9} {:>7} {:>8}",
                    p["name"].as_str().unwrap_or("?"),
                    f(&p["ns_per_packet_median"], 0),
                    f(&p["net_ns_median"], 0),
                    f(&p["net_ns_median_fast_rounds"], 0),
                    f(&p["net_over_swap_ns_median"], 0),
                    f(&p["ratio_to_empty_median"], 2)
                );
            }
        } else {
            let _ = writeln!(o, "   (not run: {})", pc["source"]);
        }
        if let Some(own) = pc["own_code_ns_median"].as_object() {
            let parts: Vec<String> = own
                .iter()
                .map(|(k, v)| format!("{k} {} ns", f(v, 0)))
                .collect();
            let _ = writeln!(
                o,
                "   mqlb's own code (path minus its calls floor, per round): {}",
                parts.join(", ")
            );
        }
        if let Some(progs) = pc["programs"].as_array() {
            let _ = writeln!(
                o,
                "   {:<18} {:>12} {:>10} {:>15}",
                "program", "xlated insns", "JIT bytes", "verifier insns"
            );
            for p in progs {
                let _ = writeln!(
                    o,
                    "   {:<18} {:>12} {:>10} {:>15}",
                    p["name"].as_str().unwrap_or("?"),
                    f(&p["xlated_insns"], 0),
                    f(&p["jited_bytes"], 0),
                    f(&p["verified_insns"], 0)
                );
            }
        }
    } else {
        let _ = writeln!(o, "\n1. Program cost: not run");
    }
    let mg = &report["maglev"];
    if ran(mg) {
        let _ = writeln!(
        o,
        "\n2. Maglev ({} rounds; extra = slots moved beyond the removed backend's own, mean of up to 10 removals)",
        s(&mg["rounds"])
    );
        let _ = writeln!(
            o,
            "   {:>5} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7}",
            "N", "M", "build ms", "max/min", "moved %", "ideal %", "extra %", "max ext", "Katran"
        );
        for t in mg["tables"].as_array().into_iter().flatten() {
            let _ = writeln!(
                o,
                "   {:>5} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7}",
                s(&t["backends"]),
                s(&t["table_size"]),
                f(&t["build_ms_median"], 3),
                f(&t["balance_max_over_min"], 4),
                f(&t["moved_pct_mean"], 3),
                f(&t["ideal_moved_pct"], 3),
                f(&t["extra_moved_pct_mean"], 3),
                f(&t["extra_moved_pct_max"], 3),
                f(&t["katran_extra_moved_pct"], 2)
            );
        }
        let mp = &report["maglev"]["map_push"];
        let _ = writeln!(
            o,
            "   push into RINGS (M = 65537):  {:<38} {:>7} {:>11} {:>9} {:>7}",
            "case", "slots", "per-slot ms", "batch ms", "ratio"
        );
        for c in mp["cases"].as_array().into_iter().flatten() {
            let _ = writeln!(
                o,
                "                                 {:<38} {:>7} {:>11} {:>9} {:>7}",
                c["case"].as_str().unwrap_or("?"),
                s(&c["slots_written"]),
                f(&c["per_slot_update_ms_median"], 3),
                f(&c["batch_update_ms_median"], 3),
                f(&c["per_slot_over_batch_ratio_median"], 2)
            );
        }
        if let Some(d) = mp["daemon_today"].as_str() {
            let _ = writeln!(o, "   the daemon today: {d}");
        }
        if let Some(e) = mp["error"].as_str() {
            let _ = writeln!(o, "   map push not measured: {e}");
        }
    } else {
        let _ = writeln!(o, "\n2. Maglev: not run");
    }
    let fw = &report["forwarding"];
    if ran(fw) {
        let _ = writeln!(
        o,
        "\n3. UDP forwarding on the lab ({} B frames, {} flows, {} rounds x {} ms unpaced, {} fast)",
        s(&fw["frame_bytes"]), s(&fw["flows"]), s(&fw["rounds"]), s(&fw["run_ms"]), s(&fw["fast_rounds"])
    );
        let _ = writeln!(
            o,
            "   {:<14} {:>11} {:>13} {:>13} {:>21}",
            "variant", "CPU ns/pkt", "- l2_bounce", "- direct", "max pps (<0.1% loss)"
        );
        for name in crate::bench_fwd::VARIANTS {
            let v = &fw["variants"][name];
            let _ = writeln!(
                o,
                "   {:<14} {:>11} {:>13} {:>13} {:>21}",
                name,
                f(&v["cpu_ns_per_packet_median"], 0),
                f(&v["minus_l2_bounce_ns_per_packet_median"], 0),
                f(&v["minus_direct_ns_per_packet_median"], 0),
                f(&v["max_rate_pps_below_0_1pct_loss"], 0)
            );
        }
        let _ = writeln!(
            o,
            "   mqlb / nftables DNAT: LB processing {} (per round {}), LB hop {}, max rate {}",
            f(&fw["mqlb_over_nft_processing_ratio_median"], 3),
            s(&fw["mqlb_over_nft_processing_ratio_per_round"]),
            f(&fw["mqlb_over_nft_hop_ratio_median"], 3),
            f(&fw["mqlb_over_nft_max_rate_ratio"], 2)
        );
        if let Some(e) = fw["error"].as_str() {
            let _ = writeln!(o, "   not measured: {e}");
        }
    } else {
        let _ = writeln!(o, "\n3. UDP forwarding: not run");
    }
    let am = &report["amqp"];
    if ran(am) {
        let _ = writeln!(
        o,
        "\n4. AMQP connections ({} client threads, {} rounds x {} ms; connect + protocol header + Connection.Start + close)",
        s(&am["client_threads"]), s(&am["rounds"]), s(&am["run_ms"])
    );
        let _ = writeln!(
            o,
            "   {:<10} {:>10} {:>12} {:>10} {:>10} {:>8}",
            "variant", "conn/s", "CPU us/conn", "p50 us", "p99 us", "errors"
        );
        for name in crate::bench_conn::VARIANTS {
            let v = &am["variants"][name];
            let _ = writeln!(
                o,
                "   {:<10} {:>10} {:>12} {:>10} {:>10} {:>8}",
                name,
                f(&v["connections_per_s_median"], 0),
                f(&v["cpu_us_per_connection_median"], 1),
                f(&v["handshake_latency_us_p50"], 0),
                f(&v["handshake_latency_us_p99"], 0),
                s(&v["errors"])
            );
        }
        let _ = writeln!(
            o,
            "   rate mqlb / HAProxy {}, mqlb / direct {}; CPU per connection HAProxy / mqlb {}, direct / mqlb {}   ({})",
            f(&am["mqlb_over_haproxy_rate_ratio_median"], 2),
            f(&am["mqlb_over_direct_rate_ratio_median"], 2),
            f(&am["haproxy_over_mqlb_cpu_per_connection_ratio_median"], 2),
            f(&am["direct_over_mqlb_cpu_per_connection_ratio_median"], 2),
            am["haproxy"].as_str().unwrap_or("HAProxy ?")
        );
        if let Some(e) = am["error"].as_str() {
            let _ = writeln!(o, "   not measured: {e}");
        }
    } else {
        let _ = writeln!(o, "\n4. AMQP connections: not run");
    }
    let cp = &report["control_plane"];
    if ran(cp) {
        let bc = &cp["backend_changes"];
        let _ = writeln!(
            o,
            "\n5. Control plane ({} add/del cycles, {} new flows/s, resolution {} ms)",
            s(&bc["cycles"]),
            s(&bc["new_flows_per_s"]),
            s(&bc["resolution_ms"])
        );
        let _ = writeln!(
        o,
        "   `backend add` returned -> first new flow on it: median {} ms, max {} ms (CLI round trip {} ms, a no-op CLI call {} ms)",
        f(&bc["add_to_first_new_flow_ms_median"], 2),
        f(&bc["add_to_first_new_flow_ms_max"], 2),
        f(&bc["add_cli_round_trip_ms_median"], 2),
        f(&bc["noop_cli_round_trip_ms_median"], 2)
    );
        let _ = writeln!(
            o,
            "   `backend del` returned -> last new flow on it:  median {} ms, max {} ms",
            f(&bc["del_to_last_new_flow_ms_median"], 2),
            f(&bc["del_to_last_new_flow_ms_max"], 2)
        );
        if let Some(e) = bc["error"].as_str() {
            let _ = writeln!(o, "   not measured: {e}");
        }
        let hc = &cp["health_check"];
        match hc["configs"].as_object() {
            Some(configs) => {
                for (label, c) in configs {
                    if c["measured"].as_bool() == Some(true) {
                        let _ = writeln!(
                            o,
                            "   health-check failure -> last new flow on it: {} ms ({}: {})",
                            f(&c["failure_to_last_new_flow_ms"], 1),
                            label,
                            c["check"].as_str().unwrap_or("?")
                        );
                    } else {
                        let _ = writeln!(
                            o,
                            "   health-check failure ({label}): not measured ({})",
                            c["reason"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
            None => {
                let _ = writeln!(
                    o,
                    "   health-check failure: not measured ({})",
                    hc["reason"].as_str().unwrap_or("?")
                );
            }
        }
    } else {
        let _ = writeln!(o, "\n5. Control plane: not run");
    }
    let mem = &report["maps_memory"];
    if ran(mem) {
        let _ = writeln!(
            o,
            "\n6. Maps: {} MiB in all (bpftool memlock); conntrack {} B/flow, {} MiB for 1M flows",
            f(&mem["total_mib"], 1),
            f(&mem["ct4_bytes_per_entry"], 1),
            f(&mem["ct4_mib_for_1m_flows"], 1)
        );
        for m in mem["maps"].as_array().into_iter().flatten() {
            let _ = writeln!(
                o,
                "   {:<12} {:<16} {:>9} entries {:>12} B",
                m["name"].as_str().unwrap_or("?"),
                m["type"].as_str().unwrap_or("?"),
                s(&m["max_entries"]),
                s(&m["memlock_bytes"])
            );
        }
    } else {
        let _ = writeln!(o, "\n6. Maps memory: not run");
    }
    let _ = writeln!(o, "\nTargets (reported, not asserted)");
    for t in report["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let _ = writeln!(
            o,
            "   {:<52} {:>10} {} {:<8} {:<10} {}",
            t["target"].as_str().unwrap_or("?"),
            f(&t["measured"], 3),
            t["comparison"].as_str().unwrap_or(""),
            f(&t["limit"], 3),
            t["unit"].as_str().unwrap_or(""),
            met
        );
    }
    o
}

// ------------------------------------------------------------------- chart

/// A TTF font for the chart's text (DejaVu, Debian `fonts-dejavu-core`).
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

struct Bar {
    label: String,
    value: f64,
    /// A reference line (target or parity).
    mark: Option<f64>,
    /// Whether larger values are better (colours the bar against `mark`).
    higher_is_better: bool,
}

/// Draws the chart: comparative ratios (top) and each figure over its
/// target (bottom, ≤ 1 meets it).
pub fn chart(report: &Value, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let font = FONT_PATHS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .context("no TTF font for the chart (install fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("the chart font does not load"))?;

    let mut ratios = Vec::new();
    let fw = &report["forwarding"];
    let am = &report["amqp"];
    let mut push = |label: &str, v: &Value, mark: Option<f64>, higher_is_better: bool| {
        if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
            ratios.push(Bar {
                label: label.into(),
                value: x,
                mark,
                higher_is_better,
            });
        }
    };
    push(
        "fwd LB processing CPU/pkt mqlb ÷ nftables (≤ 0.33)",
        &fw["mqlb_over_nft_processing_ratio_median"],
        Some(1.0 / 3.0),
        false,
    );
    push(
        "fwd LB hop CPU/pkt mqlb ÷ nftables (≤ 0.33)",
        &fw["mqlb_over_nft_hop_ratio_median"],
        Some(1.0 / 3.0),
        false,
    );
    push(
        "fwd max rate mqlb ÷ nftables",
        &fw["mqlb_over_nft_max_rate_ratio"],
        Some(1.0),
        true,
    );
    push(
        "AMQP conn/s mqlb ÷ HAProxy (target ≥ 2)",
        &am["mqlb_over_haproxy_rate_ratio_median"],
        Some(2.0),
        true,
    );
    push(
        "AMQP conn/s mqlb ÷ direct (target ≥ 0.9)",
        &am["mqlb_over_direct_rate_ratio_median"],
        Some(0.9),
        true,
    );
    for p in report["program_cost"]["paths"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = p["name"].as_str().unwrap_or("?");
        push(
            &format!("{name} ÷ empty prog"),
            &p["ratio_to_empty_median"],
            None,
            false,
        );
    }
    let mut of_target = Vec::new();
    for t in report["targets"].as_array().into_iter().flatten() {
        let (Some(m), Some(l)) = (t["measured"].as_f64(), t["limit"].as_f64()) else {
            continue;
        };
        // Normalised so that ≤ 1 meets the target either way.
        let x = if t["comparison"] == "<=" {
            m / l
        } else {
            l / m
        };
        if x.is_finite() {
            of_target.push(Bar {
                label: t["target"].as_str().unwrap_or("?").to_string(),
                value: x,
                mark: Some(1.0),
                higher_is_better: false,
            });
        }
    }

    let rows = ratios.len() + of_target.len();
    let height = 140 + 34 * rows as u32;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let split = 70 + 34 * ratios.len() as u32;
    let (top, bottom) = root.split_vertically(split);
    draw_bars(
        &top,
        &format!(
            "mqlb bench {}: ratios (red line: target or parity)",
            report["date"].as_str().unwrap_or("")
        ),
        &ratios,
    )?;
    draw_bars(
        &bottom,
        "each figure over its target (≤ 1 meets it; \"≥\" targets inverted)",
        &of_target,
    )?;
    root.present()?;
    Ok(())
}

fn draw_bars<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    bars: &[Bar],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    if bars.is_empty() {
        return Ok(());
    }
    let xmax = bars
        .iter()
        .flat_map(|b| [b.value, b.mark.unwrap_or(0.0)])
        .fold(0.0f64, f64::max)
        * 1.15;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let n = bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(430)
        .build_cartesian_2d(0f64..xmax.max(0.1), (0..n).into_segmented())
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_style(("sans-serif", 14))
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let good = b.mark.is_none_or(|m| {
                if b.higher_is_better {
                    b.value >= m
                } else {
                    b.value <= m
                }
            });
            let color = if good {
                RGBColor(70, 130, 180)
            } else {
                RGBColor(230, 150, 60)
            };
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (b.value, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            r.set_margin(4, 4, 0, 0);
            r
        }))
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    chart
        .draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            b.mark.map(|m| {
                PathElement::new(
                    vec![(m, SegmentValue::Exact(i)), (m, SegmentValue::Exact(i + 1))],
                    RED.stroke_width(2),
                )
            })
        }))
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!(" {:.3}", b.value),
                (b.value, SegmentValue::CenterOf(i)),
                ("sans-serif", 13),
            )
        }))
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    Ok(())
}
