//! The maps of the loaded program, behind [`Dataplane`] so the daemon logic
//! runs against [`MemDataplane`] in tests. [`apply`] writes a [`Plan`] in its
//! order; [`read_applied`] reads the maps back into an [`Applied`] at start.
//! Loading, pinning and attaching live in [`crate::loader`].

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use lb_common::{
    names, Backend as MapBackend, Counter, CtEntry, DropReason, Flow4, Flow6, ServiceKey,
    ServiceValue, Traffic, MAX_BACKENDS, RANGES_COUNT, RANGE_PORT,
};

use crate::{
    plan::{Applied, Plan},
    state::State,
};

/// A map operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{op} on map {map} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map} is missing from the program object")]
    MissingMap { map: &'static str },
    #[error("cannot count cpus")]
    Cpus(#[source] std::io::Error),
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot use the loaded program")]
    Program(#[source] aya::programs::ProgramError),
    #[error("BPF_PROG_TEST_RUN failed")]
    TestRun(#[source] std::io::Error),
    /// Only [`MemDataplane`] produces this (failure injection in tests).
    #[error("injected failure")]
    Injected,
}

/// Global, drop and per-id counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by `Counter`.
    pub global: Vec<u64>,
    /// Indexed by `DropReason`.
    pub drops: Vec<u64>,
    pub services: BTreeMap<u32, Traffic>,
    pub backends: BTreeMap<u32, Traffic>,
}

/// A conntrack key: the map (`CT4` or `CT6`, by address family) and the
/// flow in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtKey {
    V4(Flow4),
    V6(Flow6),
}

/// The maps the daemon writes, and the counters it reads.
pub trait Dataplane: Send {
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DataplaneError>;
    /// Every backend id whose entry is not all zeros.
    fn read_backends(&self) -> Result<Vec<(u32, MapBackend)>, DataplaneError>;
    /// The first `len` slots of one ring half.
    fn read_ring(&self, service: u32, half: u32, len: u32) -> Result<Vec<u32>, DataplaneError>;
    fn put_backend(&mut self, id: u32, entry: &MapBackend) -> Result<(), DataplaneError>;
    fn put_ring(&mut self, index: u32, backend: u32) -> Result<(), DataplaneError>;
    /// Writes `RINGS[indexes[i]] = backends[i]` for every `i`; by default one
    /// [`Dataplane::put_ring`] per slot.
    fn put_rings(&mut self, indexes: &[u32], backends: &[u32]) -> Result<(), DataplaneError> {
        for (&i, &b) in indexes.iter().zip(backends) {
            self.put_ring(i, b)?;
        }
        Ok(())
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue)
        -> Result<(), DataplaneError>;
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError>;
    /// `RANGES[RANGES_COUNT]`: how many port-range services exist.
    fn read_ranges(&self) -> Result<u32, DataplaneError>;
    fn put_ranges(&mut self, count: u32) -> Result<(), DataplaneError>;
    fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError>;
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Counters of the given service and backend ids.
    fn counters(&self, services: &[u32], backends: &[u32]) -> Result<Counters, DataplaneError>;
    /// The conntrack entry of `key` (in `CT4` or `CT6`), if any.
    fn ct_get(&self, key: &CtKey) -> Result<Option<CtEntry>, DataplaneError>;
    fn ct_put(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), DataplaneError>;
    /// Removes the conntrack entry of `key` (none is fine).
    fn ct_del(&mut self, key: &CtKey) -> Result<(), DataplaneError>;
    /// Runs `frame` through the loaded `mqlb` program on the live maps
    /// (`BPF_PROG_TEST_RUN`): its verdict and the frame it leaves. Has the
    /// program's side effects (counters, a conntrack entry on a miss).
    fn probe(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError>;
}

/// Writes `plan` in order. On error the maps hold a prefix of the plan; the
/// caller re-reads them (or replans from scratch) before the next attempt.
pub fn apply(dp: &mut dyn Dataplane, plan: &Plan) -> Result<(), DataplaneError> {
    for &id in &plan.reset_service_stats {
        dp.reset_service_stats(id)?;
    }
    for &id in &plan.reset_backend_stats {
        dp.reset_backend_stats(id)?;
    }
    for (id, entry) in &plan.backends {
        dp.put_backend(*id, entry)?;
    }
    if !plan.ring_writes.is_empty() {
        let indexes: Vec<u32> = plan.ring_writes.iter().map(|w| w.index()).collect();
        let backends: Vec<u32> = plan.ring_writes.iter().map(|w| w.backend).collect();
        dp.put_rings(&indexes, &backends)?;
    }
    if let Some(n) = plan.ranges_raise {
        dp.put_ranges(n)?;
    }
    for (key, value) in &plan.services {
        dp.put_service(key, value)?;
    }
    for key in &plan.service_deletes {
        dp.del_service(key)?;
    }
    if let Some(n) = plan.ranges_lower {
        dp.put_ranges(n)?;
    }
    Ok(())
}

/// What the maps hold, including both ring halves of every service in
/// `state` (as many slots as its ring size).
pub fn read_applied(dp: &dyn Dataplane, state: &State) -> Result<Applied, DataplaneError> {
    let mut applied = Applied {
        services: dp.read_services()?.into_iter().collect(),
        backends: dp.read_backends()?.into_iter().collect(),
        rings: BTreeMap::new(),
        ranges: dp.read_ranges()?,
    };
    for svc in &state.services {
        for half in 0..2 {
            let ring = dp.read_ring(svc.id, half, svc.ring_size)?;
            applied.rings.insert((svc.id, half), ring);
        }
    }
    Ok(applied)
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, op, source }
}

fn sum_u64(values: &PerCpuValues<u64>) -> u64 {
    values.iter().copied().fold(0u64, u64::wrapping_add)
}

fn sum_traffic(values: &PerCpuValues<Traffic>) -> Traffic {
    values.iter().fold(Traffic::default(), |acc, t| Traffic {
        packets: acc.packets.wrapping_add(t.packets),
        bytes: acc.bytes.wrapping_add(t.bytes),
        new_flows: acc.new_flows.wrapping_add(t.new_flows),
    })
}

/// The real maps of the loaded `mqlb` program.
pub struct KernelDataplane {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    rings: Array<MapData, u32>,
    /// A duplicate of `rings`' fd for `BPF_MAP_UPDATE_BATCH` (aya 0.14 has no
    /// batch API and does not expose a typed map's fd).
    rings_fd: OwnedFd,
    /// The kernel refused a batch once: write slot by slot from then on.
    no_batch: bool,
    backends: Array<MapData, MapBackend>,
    ranges: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    drops: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, Traffic>,
    be_stats: PerCpuArray<MapData, Traffic>,
    ct4: HashMap<MapData, Flow4, CtEntry>,
    ct6: HashMap<MapData, Flow6, CtEntry>,
    /// A duplicate of the `mqlb` program's fd, for `BPF_PROG_TEST_RUN`.
    prog_fd: OwnedFd,
    nr_cpus: usize,
}

impl KernelDataplane {
    /// Takes the maps out of a loaded object.
    pub fn new(ebpf: &mut aya::Ebpf) -> Result<Self, DataplaneError> {
        fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, DataplaneError>
        where
            T: TryFrom<aya::maps::Map, Error = MapError>,
        {
            let map = ebpf
                .take_map(name)
                .ok_or(DataplaneError::MissingMap { map: name })?;
            T::try_from(map).map_err(map_err(name, "open"))
        }
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let rings_fd = match ebpf.map(names::RINGS) {
            Some(aya::maps::Map::Array(data)) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| map_err(names::RINGS, "open")(MapError::from(e)))?,
            _ => return Err(DataplaneError::MissingMap { map: names::RINGS }),
        };
        let prog_fd = ebpf
            .program(crate::programs::LB_PROGRAM)
            .ok_or(DataplaneError::MissingProgram(crate::programs::LB_PROGRAM))?
            .fd()
            .map_err(DataplaneError::Program)?
            .as_fd()
            .try_clone_to_owned()
            .map_err(DataplaneError::TestRun)?;
        Ok(KernelDataplane {
            services: take(ebpf, names::SERVICES)?,
            rings: take(ebpf, names::RINGS)?,
            rings_fd,
            no_batch: false,
            backends: take(ebpf, names::BACKENDS)?,
            ranges: take(ebpf, names::RANGES)?,
            stats: take(ebpf, names::STATS)?,
            drops: take(ebpf, names::DROPS)?,
            svc_stats: take(ebpf, names::SVC_STATS)?,
            be_stats: take(ebpf, names::BE_STATS)?,
            ct4: take(ebpf, names::CT4)?,
            ct6: take(ebpf, names::CT6)?,
            prog_fd,
            nr_cpus,
        })
    }

    fn zeros<T: aya::Pod + Default>(&self) -> Result<PerCpuValues<T>, DataplaneError> {
        PerCpuValues::try_from(vec![T::default(); self.nr_cpus]).map_err(DataplaneError::Cpus)
    }
}

impl Dataplane for KernelDataplane {
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DataplaneError> {
        self.services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(names::SERVICES, "read"))
    }

    fn read_backends(&self) -> Result<Vec<(u32, MapBackend)>, DataplaneError> {
        let mut out = Vec::new();
        for id in 1..MAX_BACKENDS {
            let b = self
                .backends
                .get(&id, 0)
                .map_err(map_err(names::BACKENDS, "read"))?;
            if b != MapBackend::default() {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    fn read_ring(&self, service: u32, half: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        let base = lb_common::ring_base(service, half);
        (base..base + len)
            .map(|i| self.rings.get(&i, 0).map_err(map_err(names::RINGS, "read")))
            .collect()
    }

    fn put_backend(&mut self, id: u32, entry: &MapBackend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, entry, 0)
            .map_err(map_err(names::BACKENDS, "write"))
    }

    fn put_ring(&mut self, index: u32, backend: u32) -> Result<(), DataplaneError> {
        self.rings
            .set(index, backend, 0)
            .map_err(map_err(names::RINGS, "write"))
    }

    fn put_rings(&mut self, indexes: &[u32], backends: &[u32]) -> Result<(), DataplaneError> {
        assert_eq!(indexes.len(), backends.len());
        if !self.no_batch && indexes.len() > 1 {
            match update_batch(self.rings_fd.as_raw_fd(), indexes, backends) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error().is_some_and(batch_unsupported) => {
                    tracing::debug!(error = %e, "BPF_MAP_UPDATE_BATCH refused; writing RINGS slot by slot");
                    self.no_batch = true;
                }
                Err(e) => {
                    return Err(map_err(names::RINGS, "batch write")(MapError::from(e)));
                }
            }
        }
        for (&i, &b) in indexes.iter().zip(backends) {
            self.put_ring(i, b)?;
        }
        Ok(())
    }

    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(names::SERVICES, "write"))
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        match self.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::SERVICES, "delete")(e)),
        }
    }

    fn read_ranges(&self) -> Result<u32, DataplaneError> {
        self.ranges
            .get(&RANGES_COUNT, 0)
            .map_err(map_err(names::RANGES, "read"))
    }

    fn put_ranges(&mut self, count: u32) -> Result<(), DataplaneError> {
        self.ranges
            .set(RANGES_COUNT, count, 0)
            .map_err(map_err(names::RANGES, "write"))
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zeros = self.zeros::<Traffic>()?;
        self.svc_stats
            .set(id, zeros, 0)
            .map_err(map_err(names::SVC_STATS, "reset"))
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zeros = self.zeros::<Traffic>()?;
        self.be_stats
            .set(id, zeros, 0)
            .map_err(map_err(names::BE_STATS, "reset"))
    }

    fn counters(&self, services: &[u32], backends: &[u32]) -> Result<Counters, DataplaneError> {
        let mut c = Counters::default();
        for counter in Counter::ALL {
            let v = self
                .stats
                .get(&(counter as u32), 0)
                .map_err(map_err(names::STATS, "read"))?;
            c.global.push(sum_u64(&v));
        }
        for reason in DropReason::ALL {
            let v = self
                .drops
                .get(&(reason as u32), 0)
                .map_err(map_err(names::DROPS, "read"))?;
            c.drops.push(sum_u64(&v));
        }
        for &id in services {
            let v = self
                .svc_stats
                .get(&id, 0)
                .map_err(map_err(names::SVC_STATS, "read"))?;
            c.services.insert(id, sum_traffic(&v));
        }
        for &id in backends {
            let v = self
                .be_stats
                .get(&id, 0)
                .map_err(map_err(names::BE_STATS, "read"))?;
            c.backends.insert(id, sum_traffic(&v));
        }
        Ok(c)
    }

    fn ct_get(&self, key: &CtKey) -> Result<Option<CtEntry>, DataplaneError> {
        let (got, map) = match key {
            CtKey::V4(flow) => (self.ct4.get(flow, 0), names::CT4),
            CtKey::V6(flow) => (self.ct6.get(flow, 0), names::CT6),
        };
        match got {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map, "read")(e)),
        }
    }

    fn ct_put(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), DataplaneError> {
        match key {
            CtKey::V4(flow) => self
                .ct4
                .insert(flow, entry, 0)
                .map_err(map_err(names::CT4, "write")),
            CtKey::V6(flow) => self
                .ct6
                .insert(flow, entry, 0)
                .map_err(map_err(names::CT6, "write")),
        }
    }

    fn ct_del(&mut self, key: &CtKey) -> Result<(), DataplaneError> {
        let (removed, map) = match key {
            CtKey::V4(flow) => (self.ct4.remove(flow), names::CT4),
            CtKey::V6(flow) => (self.ct6.remove(flow), names::CT6),
        };
        match removed {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map, "delete")(e)),
        }
    }

    fn probe(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
        test_run(self.prog_fd.as_raw_fd(), frame).map_err(DataplaneError::TestRun)
    }
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN` (`struct { ... } test` of
/// `include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the struct is 8-aligned, and the kernel
    /// refuses (EINVAL) an attr whose bytes past the last field it knows are
    /// not all zero; implicit padding holds whatever was on the stack.
    _pad: u32,
}

/// `enum bpf_cmd`: `BPF_PROG_TEST_RUN`.
const BPF_PROG_TEST_RUN: nix::libc::c_long = 10;

/// `bpf(cmd, attr, sizeof attr)`: the raw syscall for what aya 0.14 does
/// not expose (batch updates, a test run on a program the daemon holds).
///
/// # Safety
/// Every pointer inside `attr` must be valid for what `cmd` reads and writes.
unsafe fn sys_bpf<T>(cmd: nix::libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a live, exclusively borrowed `union bpf_attr` prefix
    // of its full size; the caller vouches for the pointers inside it.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One `bpf(BPF_PROG_TEST_RUN)` of `frame` through the XDP program `fd`:
/// its return value and the frame it leaves (room for IPIP to grow it).
pub fn test_run(fd: i32, frame: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: `attr` points at `frame` and `out`, which outlive the call;
    // the kernel writes at most `data_size_out` bytes into `out`.
    unsafe { sys_bpf(BPF_PROG_TEST_RUN, &mut attr)? };
    out.truncate((attr.data_size_out as usize).min(out.len()));
    Ok((attr.retval, out))
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands (`struct { ... } batch`
/// of `include/uapi/linux/bpf.h`, kernel >= 5.6).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `enum bpf_cmd`: `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: nix::libc::c_long = 26;
/// The kernel's internal `ENOTSUPP` (leaks to user space from bpf(2)).
const ENOTSUPP: i32 = 524;

/// Errors that mean "this kernel or map cannot batch": fall back to per-slot
/// updates.
fn batch_unsupported(errno: i32) -> bool {
    errno == nix::libc::EINVAL || errno == ENOTSUPP || errno == nix::libc::EOPNOTSUPP
}

/// One `bpf(BPF_MAP_UPDATE_BATCH)` of `keys[i] -> values[i]` on the array
/// map `fd` (aya 0.14 has no batch call). A partial write (`count` short of
/// the length) is an error; the caller then re-reads the maps.
pub fn update_batch(fd: i32, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` points at key and value arrays that outlive the call;
    // the kernel reads `count` u32s of each and writes back `count`.
    unsafe { sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr)? };
    if attr.count as usize != keys.len() {
        return Err(std::io::Error::other(format!(
            "BPF_MAP_UPDATE_BATCH wrote {} of {} slots",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

/// Maps in memory, for tests of everything above the kernel.
#[derive(Clone, Debug, Default)]
pub struct MemDataplane {
    pub services: StdHashMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, MapBackend>,
    pub rings: BTreeMap<u32, u32>,
    /// `RANGES[RANGES_COUNT]`.
    pub ranges: u32,
    /// Every value `RANGES[RANGES_COUNT]` was set to, in order.
    pub ranges_writes: Vec<u32>,
    pub counters: Counters,
    /// `CT4`.
    pub ct: StdHashMap<Flow4, CtEntry>,
    /// `CT6`.
    pub ct6: StdHashMap<Flow6, CtEntry>,
    /// Outer source address of the IPv4 tunnel packets [`Dataplane::probe`] makes.
    pub outer_src: [u8; 4],
    /// Outer source address of the IPv6 tunnel packets [`Dataplane::probe`] makes.
    pub outer_src6: [u8; 16],
    /// Number of writes so far.
    pub writes: usize,
    /// Fail every write once `writes` reaches this.
    pub fail_at: Option<usize>,
}

impl MemDataplane {
    fn write(&mut self) -> Result<(), DataplaneError> {
        if self.fail_at.is_some_and(|n| self.writes >= n) {
            return Err(DataplaneError::Injected);
        }
        self.writes += 1;
        Ok(())
    }

    /// The backend a flow hashing to `hash` would get, as the program picks it.
    pub fn lookup(&self, key: &ServiceKey, hash: u32) -> Option<u32> {
        let v = self.services.get(key)?;
        if v.ring_size == 0 {
            return None;
        }
        let slot = v.ring_base + lb_common::hash::ring_slot(hash, v.ring_size);
        self.rings.get(&slot).copied().filter(|&id| id != 0)
    }

    /// What the program does with `frame`, roughly: conntrack, else the
    /// ring at a hash of the ports (not the program's hash); a tunnel out,
    /// its outer header of the backend's family (4-in-4, 6-in-4, 4-in-6,
    /// 6-in-6).
    fn fake_run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        use lb_common::packet::{ip4_outer_words, ip6_outer, ipv6_tc, ETH_LEN};
        const PASS: u32 = 2;
        const DROP: u32 = 1;
        const REDIRECT: u32 = 4;
        let Some(flow) = FakeFlow::parse(frame) else {
            return (PASS, frame.to_vec());
        };
        let mut key = ServiceKey {
            addr: flow.dst,
            port_be: flow.dport_be,
            proto: flow.proto,
            _pad: 0,
        };
        // The exact port, else (while RANGES counts any) the VIP's range.
        if !self.services.contains_key(&key) {
            key.port_be = RANGE_PORT.to_be();
            let in_range = self.ranges > 0
                && self
                    .services
                    .get(&key)
                    .is_some_and(|v| lb_common::range_takes(v, u16::from_be(flow.dport_be)));
            if !in_range {
                return (PASS, frame.to_vec());
            }
        }
        let hit = match flow.ct {
            CtKey::V4(f) => self.ct.get(&f),
            CtKey::V6(f) => self.ct6.get(&f),
        }
        .map(|e| e.backend)
        .filter(|id| self.backends.contains_key(id));
        let id = match hit {
            Some(id) => id,
            None => {
                let hash = u32::from(flow.sport_be).wrapping_mul(2654435761);
                let Some(id) = self.lookup(&key, hash) else {
                    return (DROP, frame.to_vec());
                };
                let entry = CtEntry {
                    backend: id,
                    ..Default::default()
                };
                match flow.ct {
                    CtKey::V4(f) => self.ct.insert(f, entry),
                    CtKey::V6(f) => self.ct6.insert(f, entry),
                };
                id
            }
        };
        let addr = self.backends[&id].addr;
        let inner = &frame[ETH_LEN..];
        let (next, tos) = match flow.ct {
            CtKey::V4(_) => (lb_common::PROTO_IPIP, inner[1]),
            CtKey::V6(_) => (lb_common::PROTO_IPV6, ipv6_tc(inner[0], inner[1])),
        };
        let mut out = frame[..12].to_vec();
        match lb_common::v4_unmapped(&addr) {
            Some(a) => {
                out.extend_from_slice(&[0x08, 0x00]);
                let words = ip4_outer_words(self.outer_src, a, inner.len() as u16, tos, next);
                out.extend(words.iter().flat_map(|w| w.to_ne_bytes()));
            }
            None => {
                out.extend_from_slice(&[0x86, 0xdd]);
                let outer = ip6_outer(self.outer_src6, addr, inner.len() as u16, next, tos, 0);
                out.extend_from_slice(&outer);
            }
        }
        out.extend_from_slice(inner);
        (REDIRECT, out)
    }
}

/// `N` bytes of `b` from `at`, if it is long enough.
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

/// The flow of an IPv4 or IPv6 TCP/UDP frame without IP options or
/// extension headers, for [`MemDataplane`]'s fake program.
struct FakeFlow {
    ct: CtKey,
    /// The destination address as `ServiceKey` stores it.
    dst: [u8; 16],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
}

impl FakeFlow {
    fn parse(frame: &[u8]) -> Option<FakeFlow> {
        use lb_common::packet::{ETH_LEN, IPV4_LEN, IPV6_LEN};
        let ip = frame.get(ETH_LEN..)?;
        let (l4_at, proto) = match frame.get(12..14)? {
            [0x08, 0x00] => (IPV4_LEN, *ip.get(9)?),
            [0x86, 0xdd] => (IPV6_LEN, *ip.get(6)?),
            _ => return None,
        };
        let l4 = ip.get(l4_at..l4_at + 4)?;
        let sport_be = u16::from_ne_bytes([l4[0], l4[1]]);
        let dport_be = u16::from_ne_bytes([l4[2], l4[3]]);
        let (ct, dst) = if l4_at == IPV4_LEN {
            let flow = Flow4 {
                src: bytes_at(ip, 12)?,
                dst: bytes_at(ip, 16)?,
                sport_be,
                dport_be,
                proto,
                _pad: [0; 3],
            };
            (CtKey::V4(flow), lb_common::v4_mapped(flow.dst))
        } else {
            let flow = Flow6 {
                src: bytes_at(ip, 8)?,
                dst: bytes_at(ip, 24)?,
                sport_be,
                dport_be,
                proto,
                _pad: [0; 3],
            };
            (CtKey::V6(flow), flow.dst)
        };
        Some(FakeFlow {
            ct,
            dst,
            sport_be,
            dport_be,
            proto,
        })
    }
}

impl Dataplane for MemDataplane {
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DataplaneError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_backends(&self) -> Result<Vec<(u32, MapBackend)>, DataplaneError> {
        Ok(self
            .backends
            .iter()
            .filter(|(_, b)| **b != MapBackend::default())
            .map(|(k, v)| (*k, *v))
            .collect())
    }

    fn read_ring(&self, service: u32, half: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        let base = lb_common::ring_base(service, half);
        Ok((base..base + len)
            .map(|i| self.rings.get(&i).copied().unwrap_or(0))
            .collect())
    }

    fn put_backend(&mut self, id: u32, entry: &MapBackend) -> Result<(), DataplaneError> {
        self.write()?;
        self.backends.insert(id, *entry);
        Ok(())
    }

    fn put_ring(&mut self, index: u32, backend: u32) -> Result<(), DataplaneError> {
        self.write()?;
        self.rings.insert(index, backend);
        Ok(())
    }

    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.write()?;
        self.services.insert(*key, *value);
        Ok(())
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.write()?;
        self.services.remove(key);
        Ok(())
    }

    fn read_ranges(&self) -> Result<u32, DataplaneError> {
        Ok(self.ranges)
    }

    fn put_ranges(&mut self, count: u32) -> Result<(), DataplaneError> {
        self.write()?;
        self.ranges = count;
        self.ranges_writes.push(count);
        Ok(())
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.write()?;
        self.counters.services.remove(&id);
        Ok(())
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.write()?;
        self.counters.backends.remove(&id);
        Ok(())
    }

    fn counters(&self, services: &[u32], backends: &[u32]) -> Result<Counters, DataplaneError> {
        let mut c = self.counters.clone();
        c.global.resize(Counter::COUNT as usize, 0);
        c.drops.resize(DropReason::COUNT as usize, 0);
        c.services = services
            .iter()
            .map(|id| {
                (
                    *id,
                    self.counters.services.get(id).copied().unwrap_or_default(),
                )
            })
            .collect();
        c.backends = backends
            .iter()
            .map(|id| {
                (
                    *id,
                    self.counters.backends.get(id).copied().unwrap_or_default(),
                )
            })
            .collect();
        Ok(c)
    }

    fn ct_get(&self, key: &CtKey) -> Result<Option<CtEntry>, DataplaneError> {
        Ok(match key {
            CtKey::V4(flow) => self.ct.get(flow).copied(),
            CtKey::V6(flow) => self.ct6.get(flow).copied(),
        })
    }

    fn ct_put(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), DataplaneError> {
        match key {
            CtKey::V4(flow) => self.ct.insert(*flow, *entry),
            CtKey::V6(flow) => self.ct6.insert(*flow, *entry),
        };
        Ok(())
    }

    fn ct_del(&mut self, key: &CtKey) -> Result<(), DataplaneError> {
        match key {
            CtKey::V4(flow) => self.ct.remove(flow),
            CtKey::V6(flow) => self.ct6.remove(flow),
        };
        Ok(())
    }

    fn probe(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
        Ok(self.fake_run(frame))
    }
}

/// One [`MemDataplane`] shared between the daemon under test and the test
/// that looks into its maps.
impl Dataplane for std::sync::Arc<std::sync::Mutex<MemDataplane>> {
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, DataplaneError> {
        self.lock().expect("not poisoned").read_services()
    }
    fn read_backends(&self) -> Result<Vec<(u32, MapBackend)>, DataplaneError> {
        self.lock().expect("not poisoned").read_backends()
    }
    fn read_ring(&self, service: u32, half: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        self.lock()
            .expect("not poisoned")
            .read_ring(service, half, len)
    }
    fn put_backend(&mut self, id: u32, entry: &MapBackend) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").put_backend(id, entry)
    }
    fn put_ring(&mut self, index: u32, backend: u32) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").put_ring(index, backend)
    }
    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").put_service(key, value)
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").del_service(key)
    }
    fn read_ranges(&self) -> Result<u32, DataplaneError> {
        self.lock().expect("not poisoned").read_ranges()
    }
    fn put_ranges(&mut self, count: u32) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").put_ranges(count)
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").reset_service_stats(id)
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").reset_backend_stats(id)
    }
    fn counters(&self, services: &[u32], backends: &[u32]) -> Result<Counters, DataplaneError> {
        self.lock()
            .expect("not poisoned")
            .counters(services, backends)
    }
    fn ct_get(&self, key: &CtKey) -> Result<Option<CtEntry>, DataplaneError> {
        self.lock().expect("not poisoned").ct_get(key)
    }
    fn ct_put(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").ct_put(key, entry)
    }
    fn ct_del(&mut self, key: &CtKey) -> Result<(), DataplaneError> {
        self.lock().expect("not poisoned").ct_del(key)
    }
    fn probe(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
        self.lock().expect("not poisoned").probe(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        plan::{plan, service_key},
        state::{BackendSpec, Proto, ServiceSpec},
    };

    /// Every byte of the attr is a field (none is padding the kernel would
    /// find non-zero).
    #[test]
    fn test_run_attr_has_no_implicit_padding() {
        assert_eq!(std::mem::size_of::<TestRunAttr>(), 80);
        assert_eq!(std::mem::size_of::<BatchAttr>(), 56);
    }

    #[test]
    fn applied_plan_reads_back_the_same() {
        let mut s = State::default();
        s.add_service(&ServiceSpec {
            name: "a".into(),
            vip: "10.0.0.10:80".into(),
            proto: Proto::Tcp,
            hash: Default::default(),
            udp_idle_s: None,
            ring_size: Some(31),
            health: Default::default(),
        })
        .unwrap();
        for addr in ["10.0.1.1", "10.0.1.2"] {
            s.add_backend(
                "a",
                &BackendSpec {
                    addr: addr.into(),
                    weight: None,
                },
            )
            .unwrap();
        }
        let mut dp = MemDataplane::default();
        let mut applied = read_applied(&dp, &s).unwrap();
        let p = plan(
            &s,
            &Default::default(),
            &Default::default(),
            Default::default(),
            &applied,
        );
        apply(&mut dp, &p).unwrap();
        applied.record(&p);
        assert_eq!(read_applied(&dp, &s).unwrap(), applied);
        let key = service_key(&s.services[0]);
        let picked: std::collections::BTreeSet<u32> = (0..200u32)
            .filter_map(|h| dp.lookup(&key, h.wrapping_mul(2654435761)))
            .collect();
        assert_eq!(picked.into_iter().collect::<Vec<_>>(), [1, 2]);
    }
}
