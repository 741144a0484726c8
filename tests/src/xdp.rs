//! The harness of the BPF_PROG_TEST_RUN fixtures (`tests/fixtures.rs` for
//! IPv4, `tests/fixtures_v6.rs` for IPv6): load the object `lb-user` embeds,
//! write its maps the way the daemon would, run a frame, read the counters
//! and conntrack back. Mechanics only: each fixture keeps its addresses, its
//! frames and what it expects.

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    backend_flags,
    hash::{flow_hash_v4, flow_hash_v6, ring_slot},
    maglev::{self, MaglevBackend},
    ring_base, Backend, Counter, CtEntry, DropReason, Flow4, Flow6, HashMode, ServiceKey,
    ServiceValue, Traffic, RANGES_COUNT,
};

use crate::frames::{BACKEND_MACS, LB_MAC};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// BPF_PROG_TEST_RUN runs XDP on the loopback device of the caller's namespace.
pub const TEST_RUN_IFINDEX: u32 = 1;
/// Maglev ring size of the fixtures' services.
pub const RING: u32 = 65537;

/// A conntrack key of one family: its map and lb-common's hash of it.
pub trait FlowKey: Pod {
    /// `CT4` or `CT6`.
    const CT_MAP: &'static str;
    /// lb-common's flow hash of this flow under `seed` and `mode`.
    fn hash(&self, seed: u32, mode: HashMode) -> u32;
}

impl FlowKey for Flow4 {
    const CT_MAP: &'static str = "CT4";
    fn hash(&self, seed: u32, mode: HashMode) -> u32 {
        flow_hash_v4(
            seed,
            mode,
            self.src,
            self.dst,
            u16::from_be(self.sport_be),
            u16::from_be(self.dport_be),
            self.proto,
        )
    }
}

impl FlowKey for Flow6 {
    const CT_MAP: &'static str = "CT6";
    fn hash(&self, seed: u32, mode: HashMode) -> u32 {
        flow_hash_v6(
            seed,
            mode,
            &self.src,
            &self.dst,
            u16::from_be(self.sport_be),
            u16::from_be(self.dport_be),
            self.proto,
        )
    }
}

/// The `STATS` and `DROPS` counters summed over CPUs at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub counters: Vec<u64>,
    pub drops: Vec<u64>,
}

impl Snapshot {
    /// How much counter `c` grew from `self` to `later`.
    pub fn counter(&self, later: &Snapshot, c: Counter) -> u64 {
        later.counters[c as usize] - self.counters[c as usize]
    }
    /// How many drops for `r` were counted from `self` to `later`.
    pub fn drop(&self, later: &Snapshot, r: DropReason) -> u64 {
        later.drops[r as usize] - self.drops[r as usize]
    }
}

/// A service as written, with its Maglev table (for predictions).
pub struct Svc {
    pub value: ServiceValue,
    pub table: Vec<u32>,
}

impl Svc {
    /// The backend id lb-common says `f` goes to, from the table the test wrote.
    pub fn predict(&self, f: &impl FlowKey) -> u32 {
        let v = &self.value;
        let h = f.hash(v.seed, HashMode::from_u8(v.hash_mode));
        self.table[ring_slot(h, v.ring_size) as usize]
    }
}

/// The verified `mqlb` program and its maps.
pub struct Lb {
    pub ebpf: Ebpf,
}

impl Lb {
    pub fn load() -> Lb {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CT4", 4096)
            .map_max_entries("CT6", 4096)
            .load(lb_user::programs::LB_OBJECT)
            .expect("load the mqlb object");
        let prog: &mut Xdp = ebpf
            .program_mut(lb_user::programs::LB_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts mqlb");
        Lb { ebpf }
    }

    /// Backend `id` as the daemon writes it, with a cached next hop: the
    /// family flag from `addr` (16 bytes, IPv4-mapped for IPv4), the LB's
    /// MAC as source, `BACKEND_MACS` by id as destination.
    pub fn write_backend(
        &mut self,
        id: u32,
        addr: [u8; 16],
        outer_src: [u8; 16],
        ifindex: u32,
        mtu: u16,
        state: u8,
    ) {
        let b = Backend {
            addr,
            outer_src,
            ifindex,
            mtu,
            flags: backend_flags::family(&addr) | backend_flags::NEXTHOP,
            state,
            src_mac: LB_MAC,
            dst_mac: BACKEND_MACS[(id as usize - 1) % 4],
        };
        let mut m: Array<&mut MapData, Backend> =
            Array::try_from(self.ebpf.map_mut("BACKENDS").unwrap()).unwrap();
        m.set(id, b, 0).unwrap();
    }

    /// Changes backend `id` in place.
    pub fn edit_backend(&mut self, id: u32, edit: impl FnOnce(&mut Backend)) {
        let mut m: Array<&mut MapData, Backend> =
            Array::try_from(self.ebpf.map_mut("BACKENDS").unwrap()).unwrap();
        let mut b = m.get(&id, 0).unwrap();
        edit(&mut b);
        m.set(id, b, 0).unwrap();
    }

    /// Writes the ring of service `id` (half 0) from `members` and the
    /// service under `key` (no ring when no member has weight).
    pub fn write_service(
        &mut self,
        id: u32,
        key: ServiceKey,
        mode: HashMode,
        udp_idle_s: u32,
        members: &[MaglevBackend],
    ) -> Svc {
        let table = maglev::build(members, RING);
        let base = ring_base(id, 0);
        {
            let mut rings: Array<&mut MapData, u32> =
                Array::try_from(self.ebpf.map_mut("RINGS").unwrap()).unwrap();
            for (i, &bid) in table.iter().enumerate() {
                rings.set(base + i as u32, bid, 0).unwrap();
            }
        }
        let value = ServiceValue {
            id,
            ring_base: base,
            ring_size: if members.iter().any(|m| m.weight > 0) {
                RING
            } else {
                0
            },
            seed: 0x5eed,
            udp_idle_s,
            hash_mode: mode as u8,
            ..Default::default()
        };
        self.insert_service(key, value);
        Svc { value, table }
    }

    /// Writes `value` under `key` in `SERVICES`.
    pub fn insert_service(&mut self, key: ServiceKey, value: ServiceValue) {
        let mut svcs: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(self.ebpf.map_mut("SERVICES").unwrap()).unwrap();
        svcs.insert(key, value, 0).unwrap();
    }

    /// `RANGES[RANGES_COUNT]`: how many port-range services the daemon keeps.
    pub fn set_ranges(&mut self, count: u32) {
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut("RANGES").unwrap()).unwrap();
        m.set(RANGES_COUNT, count, 0).unwrap();
    }

    /// The verdict and the output frame of one BPF_PROG_TEST_RUN.
    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        test_run(&self.ebpf, lb_user::programs::LB_PROGRAM, input)
    }

    pub fn snapshot(&self) -> Snapshot {
        let sum = |name: &str, n: u32| -> Vec<u64> {
            let m: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(self.ebpf.map(name).unwrap()).unwrap();
            (0..n).map(|i| m.get(&i, 0).unwrap().iter().sum()).collect()
        };
        Snapshot {
            counters: sum("STATS", Counter::COUNT),
            drops: sum("DROPS", DropReason::COUNT),
        }
    }

    /// Entry `id` of a per-CPU `Traffic` map (`BE_STATS`, `SVC_STATS`), summed.
    pub fn traffic(&self, map: &str, id: u32) -> Traffic {
        let m: PerCpuArray<&MapData, Traffic> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).unwrap();
        m.get(&id, 0)
            .unwrap()
            .iter()
            .fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets + t.packets,
                bytes: a.bytes + t.bytes,
                new_flows: a.new_flows + t.new_flows,
            })
    }

    pub fn ct<F: FlowKey>(&self, flow: &F) -> Option<CtEntry> {
        let m: HashMap<&MapData, F, CtEntry> =
            HashMap::try_from(self.ebpf.map(F::CT_MAP).unwrap()).unwrap();
        m.get(flow, 0).ok()
    }

    /// Pins `flow` to `backend`, last seen at `seen_ns` (CLOCK_MONOTONIC).
    pub fn set_ct<F: FlowKey>(&mut self, flow: &F, backend: u32, seen_ns: u64) {
        let mut m: HashMap<&mut MapData, F, CtEntry> =
            HashMap::try_from(self.ebpf.map_mut(F::CT_MAP).unwrap()).unwrap();
        let e = CtEntry {
            backend,
            _pad: 0,
            seen_ns,
        };
        m.insert(flow, e, 0).unwrap();
    }

    /// How many entries the conntrack map of `F`'s family holds.
    pub fn ct_len<F: FlowKey>(&self) -> usize {
        let m: HashMap<&MapData, F, CtEntry> =
            HashMap::try_from(self.ebpf.map(F::CT_MAP).unwrap()).unwrap();
        m.keys().count()
    }
}

/// The verified `mqlb_decap` program, its `DECAP_ADDRS` holding `local`
/// (16 bytes each, IPv4-mapped for IPv4).
pub struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    pub fn load(local: &[[u8; 16]]) -> Decap {
        let mut ebpf = EbpfLoader::new()
            .load(lb_user::programs::DECAP_OBJECT)
            .expect("load decap");
        let prog: &mut Xdp = ebpf
            .program_mut(lb_user::programs::DECAP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts mqlb_decap");
        {
            let mut addrs: HashMap<&mut MapData, [u8; 16], u32> =
                HashMap::try_from(ebpf.map_mut("DECAP_ADDRS").unwrap()).unwrap();
            for addr in local {
                addrs.insert(addr, 1, 0).unwrap();
            }
        }
        Decap { ebpf }
    }

    /// The verdict and the output frame of one BPF_PROG_TEST_RUN.
    pub fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        test_run(&self.ebpf, lb_user::programs::DECAP_PROGRAM, input)
    }
}

fn test_run(ebpf: &Ebpf, program: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let prog: &Xdp = ebpf.program(program).unwrap().try_into().unwrap();
    let mut out = vec![0u8; 4096];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// A throwaway network namespace for the FIB-fallback fixtures: veth `mqa`
/// (the LB side) with its peer `mqb`, both inside and up, then the fixture's
/// own `ip` commands (addresses, neighbours). Removed on drop (also when a
/// test fails).
pub struct FibNetns {
    name: String,
}

impl FibNetns {
    /// `tag` keeps the names of the fixtures apart; `setup` are `ip -n <ns>`
    /// commands, words split on spaces.
    pub fn new(tag: &str, setup: &[&str]) -> FibNetns {
        let ns = FibNetns {
            name: format!("mqfx{tag}{}", std::process::id()),
        };
        ns.ip(&["netns", "add", &ns.name]);
        let links = [
            "link add mqa type veth peer name mqb",
            "link set lo up",
            "link set mqa up",
            "link set mqb up",
        ];
        for cmd in links.iter().chain(setup) {
            let args: Vec<&str> = ["-n", &ns.name].into_iter().chain(cmd.split(' ')).collect();
            ns.ip(&args);
        }
        ns
    }

    fn ip(&self, args: &[&str]) {
        let st = std::process::Command::new("ip")
            .args(args)
            .status()
            .expect("run ip");
        assert!(st.success(), "ip {args:?} failed");
    }

    /// Runs `f` on a thread that has entered the namespace, with IPv4 and
    /// IPv6 forwarding on (the FIB lookup of XDP asks for it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open netns");
                use std::os::fd::AsRawFd;
                // SAFETY: setns on this thread only; the fd is valid for the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}");
                for family in ["ipv4", "ipv6"] {
                    std::fs::write(format!("/proc/sys/net/{family}/conf/all/forwarding"), "1")
                        .expect("forwarding on");
                }
                f()
            })
            .join()
            .expect("netns thread")
        })
    }

    /// The MAC address of `dev` inside the namespace.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", dev])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split("link/ether ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let v: Vec<u8> = mac
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }
}

impl Drop for FibNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
