//! Per-packet cost of the compiled programs through BPF_PROG_TEST_RUN, net of
//! an empty XDP program measured in the same run (ENV-NOTES: repeat = 1 per
//! call, because a rewriting program would otherwise see its own output;
//! interleave every program with the baselines; report medians and per-round
//! ratios, and split rounds by the VM's speed state).
//!
//! `cargo run --release -p mqlb-tests --example prog_cost` (root).
//! `PROG_COST_ROUNDS` (default 11) and `PROG_COST_CALLS` (calls per program
//! per round, default 3000) change the run length; `PROG_COST_DUMP=DIR` also
//! writes `bpftool prog dump xlated` of each program into DIR;
//! `PROG_COST_BEFORE=FILE` also measures the mqlb paths of another build of
//! the object (e.g. from before a change), interleaved in the same rounds;
//! `--json FILE` also writes the tables as JSON (for `cargo xtask bench`).
//!
//! Floors: `xdp_pass` (empty) for every path, `xdp_swap_tx` (swap MACs,
//! XDP_TX) as the least a forwarder does, and `xdp_calls_floor`: mqlb's
//! kernel calls and map accesses without its logic, run on the pass-through
//! and the established frames. A path minus its calls floor is what mqlb's
//! own code costs.
//!
//! A path's figure in a round is the mean of the middle half of its samples:
//! the distribution has a long tail, and its median moves in steps.

use std::time::{SystemTime, UNIX_EPOCH};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    backend_flags, backend_state, maglev, ring_base, v4_mapped, Backend, CtEntry, Flow4, Flow6,
    HashMode, ServiceKey, ServiceValue, PROTO_TCP, PROTO_UDP,
};
use mqlb_tests::frames::*;
use serde_json::{json, Value};

const VIP: [u8; 4] = [10, 99, 0, 1];
const CLIENT: [u8; 4] = [192, 0, 2, 10];
const LB_ADDR: [u8; 4] = [10, 99, 1, 1];
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn run(prog: &Xdp, input: &[u8], out: &mut [u8]) -> (u32, u64) {
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration.as_nanos() as u64)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Mean of the middle half of `v` (the interquartile mean).
fn iqm(v: &mut [u64]) -> f64 {
    v.sort_unstable();
    let q = v.len() / 4;
    let mid = &v[q..v.len() - q];
    mid.iter().sum::<u64>() as f64 / mid.len() as f64
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load(object: &[u8], program: &str) -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("CT4", 65536)
        .map_max_entries("CT6", 65536)
        .load(object)
        .unwrap_or_else(|e| panic!("load the object of {program} (root?): {e}"));
    load_program(&mut ebpf, program);
    ebpf
}

fn load_program(ebpf: &mut Ebpf, program: &str) {
    let p: &mut Xdp = ebpf.program_mut(program).unwrap().try_into().unwrap();
    p.load()
        .unwrap_or_else(|e| panic!("the verifier rejects {program}: {e}"));
}

fn xdp<'a>(ebpf: &'a Ebpf, program: &str) -> &'a Xdp {
    ebpf.program(program).unwrap().try_into().unwrap()
}

/// What the verifier and the JIT made of a program; printed, and returned
/// for the JSON report.
fn describe(name: &str, prog: &Xdp, dump: Option<&str>) -> Value {
    let info = prog.info().expect("bpf_prog_info");
    let xlated = info.size_translated().unwrap_or(0) / 8;
    let verified = info.verified_instruction_count();
    println!(
        "{name:<15} {:>6} {xlated:>12} {:>10} {:>15}",
        info.id(),
        info.size_jitted(),
        verified.map_or("-".to_string(), |n| n.to_string())
    );
    if let Some(dir) = dump {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "dump", "xlated", "id", &info.id().to_string()])
            .output()
            .expect("run bpftool");
        let file = format!("{dir}/{}.xlated", name.replace([' ', '[', ']'], ""));
        std::fs::write(file, out.stdout).expect("write the dump");
    }
    json!({
        "name": name,
        "id": info.id(),
        "xlated_insns": xlated,
        "jited_bytes": info.size_jitted(),
        "verified_insns": verified,
    })
}

/// `--json FILE`, the only argument.
fn json_arg() -> Option<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => None,
        [flag, file] if flag == "--json" => Some(file.clone()),
        _ => {
            eprintln!("usage: prog_cost [--json FILE]");
            std::process::exit(2);
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Backends 1..=3, a TCP service (AMQP, five-tuple) and a UDP one (RTP), one
/// established flow of each in conntrack. Also used for the baseline object's
/// `xdp_calls_floor`, which has the same maps (but no rings).
fn set_up_lb(lb: &mut Ebpf) {
    let backends: Vec<[u8; 4]> = (1..=3).map(|i| [10, 99, 1, 10 + i]).collect();
    {
        let mut m: Array<&mut MapData, Backend> =
            Array::try_from(lb.map_mut("BACKENDS").unwrap()).unwrap();
        for (i, a) in backends.iter().enumerate() {
            let b = Backend {
                addr: v4_mapped(*a),
                outer_src: v4_mapped(LB_ADDR),
                ifindex: 1,
                mtu: 1500,
                flags: backend_flags::NEXTHOP,
                state: backend_state::ACTIVE,
                src_mac: LB_MAC,
                dst_mac: BACKEND_MACS[i],
            };
            m.set(i as u32 + 1, b, 0).unwrap();
        }
    }
    let members: Vec<maglev::MaglevBackend> = backends
        .iter()
        .enumerate()
        .map(|(i, a)| maglev::MaglevBackend {
            addr: v4_mapped(*a),
            id: i as u32 + 1,
            weight: 1,
        })
        .collect();
    let table = maglev::build(&members, 65537);
    // The calls-floor baseline has mqlb's maps but no rings.
    if let Some(rings) = lb.map_mut("RINGS") {
        let mut rings: Array<&mut MapData, u32> = Array::try_from(rings).unwrap();
        for id in [1, 2] {
            for (i, b) in table.iter().enumerate() {
                rings.set(ring_base(id, 0) + i as u32, *b, 0).unwrap();
            }
        }
    }
    let mut svcs: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(lb.map_mut("SERVICES").unwrap()).unwrap();
    for (id, port, proto, mode) in [
        (1, 5672u16, PROTO_TCP, HashMode::FiveTuple),
        (2, 5004u16, PROTO_UDP, HashMode::Rtp),
    ] {
        let key = ServiceKey {
            addr: v4_mapped(VIP),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        let value = ServiceValue {
            id,
            ring_base: ring_base(id, 0),
            ring_size: 65537,
            seed: 1,
            udp_idle_s: 3600,
            hash_mode: mode as u8,
            ..Default::default()
        };
        svcs.insert(key, value, 0).unwrap();
    }
    let flow = |sport: u16, dport: u16, proto| Flow4 {
        src: CLIENT,
        dst: VIP,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    };
    let (tcp_flow, udp_flow) = (flow(40000, 5672, PROTO_TCP), flow(30000, 5004, PROTO_UDP));
    let mut ct: HashMap<&mut MapData, Flow4, CtEntry> =
        HashMap::try_from(lb.map_mut("CT4").unwrap()).unwrap();
    for (f, seen_ns) in [(tcp_flow, 0), (udp_flow, monotonic_ns())] {
        let e = CtEntry {
            backend: 2,
            _pad: 0,
            seen_ns,
        };
        ct.insert(f, e, 0).unwrap();
    }
}

const VIP6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0xf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

/// mqlb only (not the baseline or a before-object): an IPv6 backend (id 4),
/// an IPv6 TCP service (id 3) on it, one established flow in CT6.
fn set_up_v6(lb: &mut Ebpf) {
    let addr = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x14];
    {
        let mut m: Array<&mut MapData, Backend> =
            Array::try_from(lb.map_mut("BACKENDS").unwrap()).unwrap();
        let b = Backend {
            addr,
            outer_src: [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            ifindex: 1,
            mtu: 1500,
            flags: backend_flags::NEXTHOP | backend_flags::IPV6,
            state: backend_state::ACTIVE,
            src_mac: LB_MAC,
            dst_mac: BACKEND_MACS[3],
        };
        m.set(4, b, 0).unwrap();
    }
    let table = maglev::build(
        &[maglev::MaglevBackend {
            addr,
            id: 4,
            weight: 1,
        }],
        65537,
    );
    {
        let mut rings: Array<&mut MapData, u32> =
            Array::try_from(lb.map_mut("RINGS").unwrap()).unwrap();
        for (i, b) in table.iter().enumerate() {
            rings.set(ring_base(3, 0) + i as u32, *b, 0).unwrap();
        }
    }
    let mut svcs: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(lb.map_mut("SERVICES").unwrap()).unwrap();
    let key = ServiceKey {
        addr: VIP6,
        port_be: 5672u16.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    let value = ServiceValue {
        id: 3,
        ring_base: ring_base(3, 0),
        ring_size: 65537,
        seed: 1,
        udp_idle_s: 3600,
        hash_mode: HashMode::FiveTuple as u8,
        ..Default::default()
    };
    svcs.insert(key, value, 0).unwrap();
    let mut ct: HashMap<&mut MapData, Flow6, CtEntry> =
        HashMap::try_from(lb.map_mut("CT6").unwrap()).unwrap();
    let f = Flow6 {
        src: CLIENT6,
        dst: VIP6,
        sport_be: 40000u16.to_be(),
        dport_be: 5672u16.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let e = CtEntry {
        backend: 4,
        _pad: 0,
        seen_ns: 0,
    };
    ct.insert(f, e, 0).unwrap();
}

/// One measured path: a program, its frames (used in turn, one per call),
/// and the verdict it must give.
struct Path<'a> {
    name: String,
    prog: &'a Xdp,
    inputs: Vec<Vec<u8>>,
    action: u32,
}

impl Path<'_> {
    fn input(&self, call: usize) -> &[u8] {
        &self.inputs[call % self.inputs.len()]
    }
}

/// SYNs of `n` distinct flows (sources 10.128.0.0/10), so that every call
/// inserts a conntrack entry for a 5-tuple it has not seen.
fn new_flow_syns(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let src = [10, 128 | (i >> 16) as u8 & 0x3f, (i >> 8) as u8, i as u8];
            let ip = Ip4::new(src, VIP, PROTO_TCP);
            frame(&ip, &tcp(&ip, 40000, 5672, SYN, b""))
        })
        .collect()
}

fn main() {
    let rounds = env_usize("PROG_COST_ROUNDS", 11).max(3);
    let calls = env_usize("PROG_COST_CALLS", 3000).max(100);
    let dump = std::env::var("PROG_COST_DUMP").ok();
    let json_file = json_arg();

    let mut lb = load(lb_user::programs::LB_OBJECT, lb_user::programs::LB_PROGRAM);
    set_up_lb(&mut lb);
    set_up_v6(&mut lb);
    let before = std::env::var("PROG_COST_BEFORE").ok().map(|file| {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CT4", 65536)
            .map_max_entries("CT6", 65536)
            .map_max_entries("CT6", 65536)
            .load_file(&file)
            .unwrap_or_else(|e| panic!("load {file}: {e}"));
        load_program(&mut ebpf, lb_user::programs::LB_PROGRAM);
        set_up_lb(&mut ebpf);
        ebpf
    });
    let mut decap = load(
        lb_user::programs::DECAP_OBJECT,
        lb_user::programs::DECAP_PROGRAM,
    );
    {
        let mut addrs: HashMap<&mut MapData, [u8; 16], u32> =
            HashMap::try_from(decap.map_mut("DECAP_ADDRS").unwrap()).unwrap();
        addrs.insert(v4_mapped([10, 99, 1, 12]), 1, 0).unwrap();
    }
    let mut base = load(lb_user::programs::BASELINE_OBJECT, "xdp_pass");
    load_program(&mut base, "xdp_swap_tx");
    load_program(&mut base, "xdp_calls_floor");
    set_up_lb(&mut base);

    let lbp = xdp(&lb, lb_user::programs::LB_PROGRAM);
    let beforep = before
        .as_ref()
        .map(|b| xdp(b, lb_user::programs::LB_PROGRAM));
    let decapp = xdp(&decap, lb_user::programs::DECAP_PROGRAM);
    let empty = xdp(&base, "xdp_pass");
    let swap = xdp(&base, "xdp_swap_tx");
    let calls_floor = xdp(&base, "xdp_calls_floor");

    println!(
        "{:<15} {:>6} {:>12} {:>10} {:>15}",
        "program", "id", "xlated insn", "JIT bytes", "verifier insns"
    );
    if let Some(dir) = dump.as_deref() {
        std::fs::create_dir_all(dir).expect("create PROG_COST_DUMP");
    }
    let mut programs = Vec::new();
    for (name, prog) in [
        ("mqlb", Some(lbp)),
        ("mqlb [before]", beforep),
        ("mqlb_decap", Some(decapp)),
        ("xdp_pass", Some(empty)),
        ("xdp_swap_tx", Some(swap)),
        ("xdp_calls_floor", Some(calls_floor)),
    ] {
        if let Some(prog) = prog {
            programs.push(describe(name, prog, dump.as_deref()));
        }
    }

    let tcp_ip = Ip4::new(CLIENT, VIP, PROTO_TCP);
    let udp_ip = Ip4::new(CLIENT, VIP, PROTO_UDP);
    let other_ip = Ip4::new(CLIENT, [10, 99, 0, 2], PROTO_TCP);
    let established = frame(&tcp_ip, &tcp(&tcp_ip, 40000, 5672, ACK, &[0u8; 64]));
    let lb_paths = [
        (
            "pass-through (not a service)",
            vec![frame(
                &other_ip,
                &tcp(&other_ip, 40000, 22, ACK, &[0u8; 64]),
            )],
            XDP_PASS,
        ),
        (
            "established TCP (ct hit)",
            vec![established.clone()],
            XDP_TX,
        ),
        (
            "UDP rtp flow (ct hit)",
            vec![frame(&udp_ip, &udp(&udp_ip, 30000, 5004, &[0x80; 172]))],
            XDP_TX,
        ),
        (
            "SYN, same 5-tuple (Maglev)",
            vec![frame(&tcp_ip, &tcp(&tcp_ip, 40001, 5672, SYN, b""))],
            XDP_TX,
        ),
        (
            "SYN, new 5-tuple (Maglev, ct insert)",
            new_flow_syns(rounds * calls + 1),
            XDP_TX,
        ),
    ];
    let mut paths = vec![
        Path {
            name: "swap MACs + XDP_TX (baseline)".into(),
            prog: swap,
            inputs: vec![established.clone()],
            action: XDP_TX,
        },
        Path {
            name: "calls floor: not a service".into(),
            prog: calls_floor,
            inputs: lb_paths[0].1.clone(),
            action: XDP_PASS,
        },
        Path {
            name: "calls floor: established".into(),
            prog: calls_floor,
            inputs: vec![established],
            action: XDP_TX,
        },
    ];
    for (label, prog) in [("", Some(lbp)), (" [before]", beforep)] {
        let Some(prog) = prog else { continue };
        for (name, inputs, action) in &lb_paths {
            paths.push(Path {
                name: format!("{name}{label}"),
                prog,
                inputs: inputs.clone(),
                action: *action,
            });
        }
    }
    // IPv6, this build only (a before-object may not know IPv6).
    let ip6 = Ip6::new(CLIENT6, VIP6, PROTO_TCP);
    let other6 = Ip6::new(
        CLIENT6,
        [0x20, 1, 0xd, 0xb8, 0, 0xf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        6,
    );
    paths.push(Path {
        name: "IPv6 pass-through (not a service)".into(),
        prog: lbp,
        inputs: vec![frame6(&other6, &tcp6(&other6, 40000, 22, ACK, &[0u8; 64]))],
        action: XDP_PASS,
    });
    paths.push(Path {
        name: "IPv6 established TCP (ct hit, 6-in-6)".into(),
        prog: lbp,
        inputs: vec![frame6(&ip6, &tcp6(&ip6, 40000, 5672, ACK, &[0u8; 64]))],
        action: XDP_TX,
    });
    paths.push(Path {
        name: "decap (IPIP to a local addr)".into(),
        prog: decapp,
        inputs: vec![{
            let inner = frame(&tcp_ip, &tcp(&tcp_ip, 40000, 5672, ACK, &[0u8; 64]));
            ipip_expected(LB_MAC, LB_MAC, LB_ADDR, [10, 99, 1, 12], &inner[14..])
        }],
        action: XDP_PASS,
    });

    // A benchmark that measured a drop path would look fast: check verdicts first.
    let mut out = vec![0u8; 2048];
    for p in &paths {
        let (action, _) = run(p.prog, p.input(rounds * calls), &mut out);
        assert_eq!(action, p.action, "{}: unexpected verdict", p.name);
    }

    // rows[r][i]: ns/packet of path i in round r; floors[r]: the empty program's.
    let mut floors = Vec::new();
    let mut rows: Vec<Vec<f64>> = Vec::new();
    let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(calls); paths.len()];
    let mut floor_samples = Vec::with_capacity(calls);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as usize;
    for round in 0..rounds {
        floor_samples.clear();
        samples.iter_mut().for_each(Vec::clear);
        for call in 0..calls {
            floor_samples.push(run(empty, paths[0].input(0), &mut out).1);
            // Rotate the order so no path always runs right after the floor.
            let n = paths.len();
            for k in 0..n {
                let i = (k + call + round + seed) % n;
                let input = paths[i].input(round * calls + call);
                samples[i].push(run(paths[i].prog, input, &mut out).1);
            }
        }
        floors.push(iqm(&mut floor_samples));
        rows.push(samples.iter_mut().map(|s| iqm(s)).collect());
    }

    let fastest = floors.iter().cloned().fold(f64::INFINITY, f64::min);
    let fast: Vec<usize> = (0..rounds)
        .filter(|&r| floors[r] <= 1.25 * fastest)
        .collect();
    let shown: Vec<String> = floors.iter().map(|f| format!("{f:.0}")).collect();
    println!(
        "\n{rounds} rounds x {calls} calls per program, interleaved; empty-program floor per round (ns): {}",
        shown.join(" ")
    );
    println!(
        "fast rounds (floor <= 1.25 x lowest): {} of {rounds}\n",
        fast.len()
    );
    println!(
        "{:<46} {:>6} {:>6} {:>6} {:>8} {:>8} {:>6}  per-round ratio to the empty program",
        "path", "ns/pkt", "floor", "net", "net fast", "net-swap", "ratio"
    );
    let mut report = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let per_round = |f: &dyn Fn(usize) -> f64| (0..rounds).map(f).collect::<Vec<f64>>();
        let nets = per_round(&|r| rows[r][i] - floors[r]);
        let fast_nets: Vec<f64> = fast.iter().map(|&r| nets[r]).collect();
        let over_swap = per_round(&|r| rows[r][i] - rows[r][0]);
        let ratios = per_round(&|r| rows[r][i] / floors[r]);
        let ns = median(&per_round(&|r| rows[r][i]));
        let shown: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "{:<46} {:>6.0} {:>6.0} {:>6.0} {:>8.0} {:>8.0} {:>6.2}  {}",
            p.name,
            ns,
            median(&floors),
            median(&nets),
            median(&fast_nets),
            median(&over_swap),
            median(&ratios),
            shown.join(" ")
        );
        let round2 = |v: &[f64]| {
            v.iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        };
        report.push(json!({
            "name": p.name,
            "ns_per_packet_median": ns,
            "floor_ns_median": median(&floors),
            "net_ns_median": median(&nets),
            "net_ns_median_fast_rounds": median(&fast_nets),
            "net_over_swap_ns_median": median(&over_swap),
            "ratio_to_empty_median": median(&ratios),
            "ratio_to_empty_per_round": round2(&ratios),
            "net_ns_per_round": round2(&nets),
        }));
    }
    println!(
        "\nnet: the path minus the empty program in the same round, median over rounds; \
         net fast: the same over fast rounds only; net-swap: minus the swap-MACs baseline."
    );
    if let Some(file) = json_file {
        let doc = json!({
            "rounds": rounds,
            "fast_rounds": fast.len(),
            "calls_per_round": calls,
            "repeat": 1,
            "statistic": "per round: mean of the middle half of the samples; then median over rounds",
            "floor_ns_per_round": floors,
            "programs": programs,
            "paths": report,
        });
        let text = serde_json::to_string_pretty(&doc).expect("serialise the report");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {file}: {e}"));
    }
}
