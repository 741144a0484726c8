//! Per-packet cost of the compiled programs through BPF_PROG_TEST_RUN, net of
//! an empty XDP program measured in the same run (ENV-NOTES: repeat = 1 per
//! call, because a rewriting program would otherwise see its own output;
//! interleave program and baseline; report medians and per-round ratios).
//! `cargo run --release -p mqlb-tests --example prog_cost` (root).

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    backend_flags, backend_state, maglev, ring_base, v4_mapped, Backend, CtEntry, Flow4, HashMode,
    ServiceKey, ServiceValue, PROTO_TCP,
};
use mqlb_tests::frames::*;

const VIP: [u8; 4] = [10, 99, 0, 1];
const CLIENT: [u8; 4] = [192, 0, 2, 10];

fn run(prog: &Xdp, input: &[u8], out: &mut [u8]) -> u64 {
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(out),
            ..Default::default()
        })
        .expect("test run");
    r.duration.as_nanos() as u64
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let mut lb: Ebpf = EbpfLoader::new()
        .map_max_entries("CT4", 65536)
        .load(lb_user::programs::LB_OBJECT)
        .expect("load mqlb (root?)");
    let p: &mut Xdp = lb.program_mut("mqlb").unwrap().try_into().unwrap();
    p.load().unwrap();
    let mut base = EbpfLoader::new()
        .load(lb_user::programs::BASELINE_OBJECT)
        .unwrap();
    let p: &mut Xdp = base.program_mut("xdp_pass").unwrap().try_into().unwrap();
    p.load().unwrap();

    let backends: Vec<[u8; 4]> = (1..=3).map(|i| [10, 99, 1, 10 + i]).collect();
    {
        let mut m: Array<&mut MapData, Backend> =
            Array::try_from(lb.map_mut("BACKENDS").unwrap()).unwrap();
        for (i, a) in backends.iter().enumerate() {
            let b = Backend {
                addr: v4_mapped(*a),
                outer_src: v4_mapped([10, 99, 1, 1]),
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
    {
        let mut rings: Array<&mut MapData, u32> =
            Array::try_from(lb.map_mut("RINGS").unwrap()).unwrap();
        for (i, id) in table.iter().enumerate() {
            rings.set(ring_base(1, 0) + i as u32, *id, 0).unwrap();
        }
        let mut svcs: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(lb.map_mut("SERVICES").unwrap()).unwrap();
        svcs.insert(
            ServiceKey {
                addr: v4_mapped(VIP),
                port_be: 5672u16.to_be(),
                proto: PROTO_TCP,
                _pad: 0,
            },
            ServiceValue {
                id: 1,
                ring_base: ring_base(1, 0),
                ring_size: 65537,
                seed: 1,
                udp_idle_s: 60,
                hash_mode: HashMode::FiveTuple as u8,
                _pad: [0; 3],
            },
            0,
        )
        .unwrap();
        let mut ct: HashMap<&mut MapData, Flow4, CtEntry> =
            HashMap::try_from(lb.map_mut("CT4").unwrap()).unwrap();
        let f = Flow4 {
            src: CLIENT,
            dst: VIP,
            sport_be: 40000u16.to_be(),
            dport_be: 5672u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        ct.insert(
            f,
            CtEntry {
                backend: 2,
                _pad: 0,
                seen_ns: 0,
            },
            0,
        )
        .unwrap();
    }
    let ip = Ip4::new(CLIENT, VIP, PROTO_TCP);
    let established = frame(&ip, &tcp(&ip, 40000, 5672, ACK, &[0u8; 64]));
    let syn = frame(&ip, &tcp(&ip, 40001, 5672, SYN, b""));
    let other = {
        let ip = Ip4::new(CLIENT, [10, 99, 0, 2], PROTO_TCP);
        frame(&ip, &tcp(&ip, 40000, 22, ACK, &[0u8; 64]))
    };
    let lbp: &Xdp = lb.program("mqlb").unwrap().try_into().unwrap();
    let empty: &Xdp = base.program("xdp_pass").unwrap().try_into().unwrap();
    let mut out = vec![0u8; 2048];
    let paths: [(&str, &[u8]); 3] = [
        ("pass-through (not a service)", &other),
        ("established TCP (conntrack hit)", &established),
        ("new TCP (SYN, Maglev)", &syn),
    ];
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "path", "ns/pkt", "floor", "net"
    );
    for (name, input) in paths {
        let mut nets = Vec::new();
        let (mut all_p, mut all_f) = (Vec::new(), Vec::new());
        for _round in 0..9 {
            let (mut pv, mut fv) = (Vec::new(), Vec::new());
            for _ in 0..2000 {
                fv.push(run(empty, input, &mut out));
                pv.push(run(lbp, input, &mut out));
            }
            let (p, f) = (median(&mut pv), median(&mut fv));
            nets.push(p as i64 - f as i64);
            all_p.push(p);
            all_f.push(f);
        }
        nets.sort_unstable();
        let (p, f) = (median(&mut all_p), median(&mut all_f));
        println!("{name:<34} {p:>10} {f:>10} {:>10}", nets[nets.len() / 2]);
    }
}
