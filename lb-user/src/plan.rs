//! Desired state → map writes, as a pure function (no kernel, no I/O).
//!
//! [`Applied`] mirrors what the maps hold (read back at start, then updated
//! with every plan that was applied). [`plan`] compares the desired contents
//! with it and returns the writes that get the maps there, in an order that is
//! safe for packets in flight:
//! 1. counters of newly used ids are zeroed;
//! 2. `BACKENDS` entries (a new backend exists before a ring names it);
//! 3. slots of the *inactive* ring half of each service that differ from what
//!    that half already holds;
//! 4. `RANGES` raised, if the port-range entries about to exist outnumber it;
//! 5. `SERVICES` values: pointing a service at the freshly written half is one
//!    map update, the atomic table swap;
//! 6. `SERVICES` deletions;
//! 7. `RANGES` lowered to the number of port-range services, if it is above.
//!
//! `RANGES` gates the program's second lookup (a VIP's port range, under key
//! port `RANGE_PORT`, after the exact port missed): while it is 0 no range
//! entry is looked at. Raising it before the `SERVICES` writes and lowering
//! it after the deletions keeps it at least the number of range entries the
//! map holds at every moment, so a range entry is live from the write that
//! creates it; a count above that only costs a lookup that misses.
//!
//! Health checks ([`Health`]) shape both: a backend whose check says down is
//! out of its table and written `DOWN` (the program re-hashes its
//! established flows), or `DRAINING` if its service says `on_down = keep`
//! (they stay); one that answers draining is out of the table and
//! written `DRAINING`; in a service in panic mode, down backends are in the
//! table and written `ACTIVE`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    backend_flags, backend_state,
    maglev::{self, MaglevBackend},
    ring_base, v4_mapped, Backend as MapBackend, ServiceKey, ServiceValue, RANGE_PORT, RING_MAX,
};

use crate::{
    health::OnDown,
    state::{Backend, BackendState, Service, State},
};

/// What the health checks say, as the plan needs it (runtime, never saved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Backend ids whose check says down.
    pub down: BTreeSet<u32>,
    /// Backend ids whose check says draining (http 503).
    pub draining: BTreeSet<u32>,
    /// Service ids in panic mode: their down backends stay in the table.
    pub panic: BTreeSet<u32>,
}

/// A backend as the data plane should see it: its `BACKENDS` state and
/// whether it is in the service's Maglev table.
pub fn effective(svc: &Service, b: &Backend, health: &Health) -> (u8, bool) {
    // In panic mode the checks' "down" is overruled: route over all of them.
    let down = health.down.contains(&b.id) && !health.panic.contains(&svc.id);
    if down {
        return match svc.health.on_down {
            OnDown::Reset => (backend_state::DOWN, false),
            OnDown::Keep => (backend_state::DRAINING, false),
        };
    }
    if b.state == BackendState::Draining || health.draining.contains(&b.id) {
        return (backend_state::DRAINING, false);
    }
    (backend_state::ACTIVE, true)
}

/// A backend's next hop as the resolver found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub mtu: u16,
    pub src_mac: [u8; 6],
    /// `None` while the neighbour is unresolved: the program falls back to
    /// `bpf_fib_lookup` and passes to the kernel, which resolves it.
    pub dst_mac: Option<[u8; 6]>,
    /// The route's preferred source: the outer source address.
    pub outer_src: IpAddr,
    /// The neighbour whose MAC is `dst_mac` (gateway or the backend itself).
    pub via: IpAddr,
}

impl From<crate::nexthop::NextHop> for Hop {
    fn from(n: crate::nexthop::NextHop) -> Self {
        Hop {
            ifindex: n.ifindex,
            mtu: n.mtu,
            src_mac: n.src_mac,
            dst_mac: n.dst_mac,
            outer_src: n.outer_src,
            via: n.via,
        }
    }
}

/// What the daemon knows the maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: HashMap<ServiceKey, ServiceValue>,
    /// Backend id → entry (ids with an all-zero entry are absent).
    pub backends: BTreeMap<u32, MapBackend>,
    /// (service id, half) → the first slots of that ring half, as far as known.
    /// Slots past the end (or a missing half) are unknown and always written.
    pub rings: BTreeMap<(u32, u32), Vec<u32>>,
    /// `RANGES[RANGES_COUNT]`.
    pub ranges: u32,
}

/// Map writes, in the order they must be applied (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub reset_service_stats: Vec<u32>,
    pub reset_backend_stats: Vec<u32>,
    pub backends: Vec<(u32, MapBackend)>,
    /// (service id, half, slot, backend id).
    pub ring_writes: Vec<RingWrite>,
    /// `RANGES[RANGES_COUNT]` before the `SERVICES` writes: the range
    /// entries the map will hold once they are done, if more than it says.
    pub ranges_raise: Option<u32>,
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub service_deletes: Vec<ServiceKey>,
    /// `RANGES[RANGES_COUNT]` after the deletions: the number of port-range
    /// services, if the count is above it.
    pub ranges_lower: Option<u32>,
}

/// One slot of one ring half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingWrite {
    pub service: u32,
    pub half: u32,
    pub slot: u32,
    pub backend: u32,
}

impl RingWrite {
    /// Index in `RINGS`.
    pub const fn index(&self) -> u32 {
        ring_base(self.service, self.half) + self.slot
    }
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} backend entries, {} ring slots, {} service updates, {} service deletions",
            self.backends.len(),
            self.ring_writes.len(),
            self.services.len(),
            self.service_deletes.len()
        );
        if let Some(n) = self.ranges_lower.or(self.ranges_raise) {
            s.push_str(&format!(", range count {n}"));
        }
        s
    }

    /// What `RANGES[RANGES_COUNT]` holds once the plan is applied.
    pub fn ranges_after(&self, before: u32) -> u32 {
        self.ranges_lower.or(self.ranges_raise).unwrap_or(before)
    }
}

/// The `SERVICES` key of a service: its port, or `RANGE_PORT` for a
/// port-range service (the value holds the range).
pub fn service_key(svc: &Service) -> ServiceKey {
    ServiceKey {
        addr: addr16(svc.vip.ip()),
        port_be: svc.vip.port().unwrap_or(RANGE_PORT).to_be(),
        proto: svc.proto.number(),
        _pad: 0,
    }
}

/// Whether a `SERVICES` key is a VIP's port-range entry.
pub const fn is_range_key(key: &ServiceKey) -> bool {
    key.port_be == RANGE_PORT.to_be()
}

/// An address as every map stores it (IPv4-mapped for IPv4).
pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The ring half a `SERVICES` value points at.
pub const fn half_of(value: &ServiceValue) -> u32 {
    (value.ring_base / RING_MAX) & 1
}

/// The Maglev table of a service over the backends that take new flows
/// (empty if none).
pub fn table(svc: &Service, health: &Health) -> Vec<u32> {
    let backends: Vec<MaglevBackend> = svc
        .backends
        .iter()
        .filter(|b| effective(svc, b, health).1)
        .map(|b| MaglevBackend {
            addr: addr16(b.addr),
            id: b.id,
            weight: b.weight,
        })
        .collect();
    if backends.is_empty() {
        return Vec::new();
    }
    maglev::build(&backends, svc.ring_size)
}

/// The outer source of a backend whose route gave none (or is unresolved):
/// the LB interface's first address of the backend's family, since the
/// outer header has the backend's family (4-in-6 and 6-in-4 included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultSrc {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl DefaultSrc {
    /// The first IPv4 and the first IPv6 address of a list (the interface's,
    /// in the kernel's order); IPv6 link-local addresses do not count, as
    /// an outer source to an off-link backend they would not route back.
    pub fn from_addrs(addrs: &[IpAddr]) -> DefaultSrc {
        DefaultSrc {
            v4: addrs.iter().find_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            }),
            v6: addrs.iter().find_map(|a| match a {
                IpAddr::V6(a) if !a.is_unicast_link_local() && !a.is_loopback() => Some(*a),
                _ => None,
            }),
        }
    }

    /// The source for a backend of `addr`'s family.
    pub fn for_backend(&self, addr: IpAddr) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }
}

/// The `BACKENDS` entry for a backend address in a given state.
pub fn backend_entry(
    addr: IpAddr,
    state: u8,
    hop: Option<&Hop>,
    default_src: DefaultSrc,
) -> MapBackend {
    // The data plane picks the outer header's family from this flag alone.
    let mut entry = MapBackend {
        addr: addr16(addr),
        state,
        flags: backend_flags::family(&addr16(addr)),
        ..MapBackend::default()
    };
    match hop {
        Some(h) => {
            entry.outer_src = addr16(h.outer_src);
            entry.ifindex = h.ifindex;
            entry.mtu = h.mtu;
            entry.src_mac = h.src_mac;
            if let Some(mac) = h.dst_mac {
                entry.dst_mac = mac;
                entry.flags |= backend_flags::NEXTHOP;
            }
        }
        None => {
            if let Some(src) = default_src.for_backend(addr) {
                entry.outer_src = addr16(src);
            }
        }
    }
    entry
}

/// Everything `BACKENDS` should hold.
pub fn desired_backends(
    state: &State,
    health: &Health,
    hops: &BTreeMap<IpAddr, Hop>,
    default_src: DefaultSrc,
) -> BTreeMap<u32, MapBackend> {
    let mut out = BTreeMap::new();
    for svc in &state.services {
        for b in &svc.backends {
            let (map_state, _) = effective(svc, b, health);
            out.insert(
                b.id,
                backend_entry(b.addr, map_state, hops.get(&b.addr), default_src),
            );
        }
    }
    for r in &state.removed {
        out.insert(
            r.id,
            backend_entry(
                r.addr,
                backend_state::REMOVED,
                hops.get(&r.addr),
                default_src,
            ),
        );
    }
    out
}

/// The writes that take the maps from `applied` to `state`.
pub fn plan(
    state: &State,
    health: &Health,
    hops: &BTreeMap<IpAddr, Hop>,
    default_src: DefaultSrc,
    applied: &Applied,
) -> Plan {
    let mut plan = Plan::default();

    let want_backends = desired_backends(state, health, hops, default_src);
    for (&id, entry) in &want_backends {
        match applied.backends.get(&id) {
            Some(old) if old == entry => {}
            Some(old) if old.addr == entry.addr => plan.backends.push((id, *entry)),
            // A new id, or an id handed to another address: fresh counters.
            _ => {
                plan.reset_backend_stats.push(id);
                plan.backends.push((id, *entry));
            }
        }
    }
    for &id in applied.backends.keys() {
        if !want_backends.contains_key(&id) {
            plan.backends.push((id, MapBackend::default()));
        }
    }

    let live_ids: BTreeMap<u32, &ServiceValue> =
        applied.services.values().map(|v| (v.id, v)).collect();
    let mut wanted_keys = HashSet::new();
    for svc in &state.services {
        let key = service_key(svc);
        wanted_keys.insert(key);
        let live = applied.services.get(&key).filter(|v| v.id == svc.id);
        if live.is_none() && !live_ids.contains_key(&svc.id) {
            plan.reset_service_stats.push(svc.id);
        }
        let table = table(svc, health);
        let mut value = ServiceValue {
            id: svc.id,
            ring_base: ring_base(svc.id, 0),
            ring_size: table.len() as u32,
            seed: state.seed,
            udp_idle_s: svc.udp_idle_s,
            hash_mode: svc.hash.mode() as u8,
            ..Default::default()
        };
        if svc.vip.is_range() {
            value.port_lo = svc.vip.lo();
            value.port_hi = svc.vip.hi();
        }
        if !table.is_empty() {
            let live_half = live.filter(|v| v.ring_size > 0).map(half_of);
            let unchanged = live_half.is_some_and(|h| {
                live.map(|v| v.ring_size) == Some(table.len() as u32)
                    && applied
                        .rings
                        .get(&(svc.id, h))
                        .is_some_and(|held| held.get(..table.len()) == Some(&table[..]))
            });
            let half = match live_half {
                Some(h) if unchanged => h,
                Some(h) => 1 - h,
                None => 0,
            };
            if !unchanged {
                let held = applied
                    .rings
                    .get(&(svc.id, half))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                for (slot, &backend) in table.iter().enumerate() {
                    if held.get(slot) != Some(&backend) {
                        plan.ring_writes.push(RingWrite {
                            service: svc.id,
                            half,
                            slot: slot as u32,
                            backend,
                        });
                    }
                }
            }
            value.ring_base = ring_base(svc.id, half);
        } else if let Some(v) = live {
            // No backend: keep pointing where it did, with an empty ring.
            value.ring_base = v.ring_base;
        }
        if live != Some(&value) {
            plan.services.push((key, value));
        }
    }
    for (key, value) in &applied.services {
        if !wanted_keys.contains(key) {
            plan.service_deletes.push(*key);
            if !state.services.iter().any(|s| s.id == value.id) {
                plan.reset_service_stats.push(value.id);
            }
        }
    }
    // Deterministic order (the key type is not `Ord`).
    plan.service_deletes
        .sort_unstable_by_key(|k| (k.addr, k.port_be, k.proto));
    plan.reset_service_stats.sort_unstable();
    plan.reset_service_stats.dedup();

    // The range entries between the writes and the deletions: those the map
    // holds plus those the plan adds; after the deletions, the wanted ones.
    let during = applied
        .services
        .keys()
        .chain(plan.services.iter().map(|(k, _)| k))
        .filter(|k| is_range_key(k))
        .collect::<HashSet<_>>()
        .len() as u32;
    let wanted = wanted_keys.iter().filter(|k| is_range_key(k)).count() as u32;
    let mut count = applied.ranges;
    if during > count {
        plan.ranges_raise = Some(during);
        count = during;
    }
    if count > wanted {
        plan.ranges_lower = Some(wanted);
    }
    plan
}

impl Applied {
    /// Records that `plan` was applied in full.
    pub fn record(&mut self, plan: &Plan) {
        for &(id, entry) in &plan.backends {
            if entry == MapBackend::default() {
                self.backends.remove(&id);
            } else {
                self.backends.insert(id, entry);
            }
        }
        for w in &plan.ring_writes {
            let ring = self.rings.entry((w.service, w.half)).or_default();
            let slot = w.slot as usize;
            if slot < ring.len() {
                ring[slot] = w.backend;
            } else if slot == ring.len() {
                ring.push(w.backend);
            } else {
                // A gap would make unknown slots look known; writes come in
                // slot order, so this only happens with a partial cache.
                ring.truncate(0);
            }
        }
        for (key, value) in &plan.services {
            self.services.insert(*key, *value);
        }
        for key in &plan.service_deletes {
            self.services.remove(key);
        }
        self.ranges = plan.ranges_after(self.ranges);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackendSpec, BackendState, BackendUpdate, Hash, Proto, ServiceSpec};
    use std::collections::BTreeSet;

    const RING: u64 = 13;

    fn state() -> State {
        let mut s = State::default();
        s.add_service(&ServiceSpec {
            name: "amqp".into(),
            vip: "10.0.0.10:5672".into(),
            proto: Proto::Tcp,
            hash: Hash::FiveTuple,
            udp_idle_s: None,
            ring_size: Some(RING),
            health: Default::default(),
        })
        .unwrap();
        s
    }

    fn add(s: &mut State, addr: &str) -> u32 {
        s.add_backend(
            "amqp",
            &BackendSpec {
                addr: addr.into(),
                weight: None,
            },
        )
        .unwrap()
        .id
    }

    fn no_hops() -> BTreeMap<IpAddr, Hop> {
        BTreeMap::new()
    }

    fn src() -> DefaultSrc {
        DefaultSrc {
            v4: Some("10.0.0.1".parse().unwrap()),
            v6: Some("fd00::1".parse().unwrap()),
        }
    }

    /// Plans and records, as the daemon does after a successful apply.
    fn step(s: &State, applied: &mut Applied) -> Plan {
        step_with(s, &Health::default(), applied)
    }

    fn step_with(s: &State, h: &Health, applied: &mut Applied) -> Plan {
        let p = plan(s, h, &no_hops(), src(), applied);
        applied.record(&p);
        p
    }

    /// What the data plane would see: the ring the service value points at.
    fn live_ring(s: &State, applied: &Applied) -> Vec<u32> {
        let v = applied.services[&service_key(&s.services[0])];
        let ring = &applied.rings[&(v.id, half_of(&v))];
        ring[..v.ring_size as usize].to_vec()
    }

    #[test]
    fn new_service_without_backends_has_an_empty_ring() {
        let s = state();
        let mut applied = Applied::default();
        let p = step(&s, &mut applied);
        assert_eq!(p.reset_service_stats, [1]);
        assert!(p.ring_writes.is_empty());
        assert_eq!(p.services.len(), 1);
        let (key, value) = p.services[0];
        assert_eq!(key.port_be, 5672u16.to_be());
        assert_eq!(key.proto, lb_common::PROTO_TCP);
        assert_eq!(key.addr, v4_mapped([10, 0, 0, 10]));
        assert_eq!(value.ring_size, 0);
        assert_eq!(value.udp_idle_s, 60);
        assert!(
            step(&s, &mut applied).is_empty(),
            "a second plan is a no-op"
        );
    }

    #[test]
    fn first_backend_fills_half_zero_then_swaps() {
        let mut s = state();
        let mut applied = Applied::default();
        step(&s, &mut applied);
        let id1 = add(&mut s, "10.0.1.1");
        let p = step(&s, &mut applied);
        assert_eq!(p.reset_backend_stats, [id1]);
        assert_eq!(p.backends.len(), 1);
        assert_eq!(
            p.ring_writes.len(),
            RING as usize,
            "unknown half: every slot"
        );
        assert!(p
            .ring_writes
            .iter()
            .all(|w| w.half == 0 && w.backend == id1));
        assert_eq!(p.services[0].1.ring_size, RING as u32);
        assert_eq!(p.services[0].1.ring_base, ring_base(1, 0));
        assert_eq!(live_ring(&s, &applied), vec![id1; RING as usize]);

        let id2 = add(&mut s, "10.0.1.2");
        let p = step(&s, &mut applied);
        assert!(
            p.ring_writes.iter().all(|w| w.half == 1),
            "writes the other half"
        );
        assert_eq!(
            p.services[0].1.ring_base,
            ring_base(1, 1),
            "then swaps to it"
        );
        let ring = live_ring(&s, &applied);
        assert_eq!(ring, table(&s.services[0], &Health::default()));
        assert!(ring.contains(&id1) && ring.contains(&id2));

        // Half 0 holds the one-backend table; the next change diffs against it.
        let id3 = add(&mut s, "10.0.1.3");
        let p = step(&s, &mut applied);
        let want = table(&s.services[0], &Health::default());
        let expected: Vec<u32> = want
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b != id1)
            .map(|(i, _)| i as u32)
            .collect();
        let written: Vec<u32> = p.ring_writes.iter().map(|w| w.slot).collect();
        assert_eq!(written, expected, "only the slots that differ are written");
        assert!(p.ring_writes.iter().all(|w| w.half == 0));
        assert_eq!(live_ring(&s, &applied), want);
        assert!(want.contains(&id3));
    }

    #[test]
    fn ring_writes_precede_the_swap_in_plan_order() {
        let mut s = state();
        add(&mut s, "10.0.1.1");
        let p = plan(
            &s,
            &Health::default(),
            &no_hops(),
            src(),
            &Applied::default(),
        );
        // The struct fields are applied in declaration order; a swap only
        // points at a half whose slots are all in ring_writes or already held.
        let (_, v) = p.services[0];
        let half = half_of(&v);
        let slots: BTreeSet<u32> = p
            .ring_writes
            .iter()
            .filter(|w| w.half == half)
            .map(|w| w.slot)
            .collect();
        assert_eq!(slots.len(), v.ring_size as usize);
    }

    #[test]
    fn draining_and_weight_rebuild_the_table_but_keep_entries() {
        let mut s = state();
        let mut applied = Applied::default();
        let a = add(&mut s, "10.0.1.1");
        let b = add(&mut s, "10.0.1.2");
        step(&s, &mut applied);
        s.set_backend(
            "amqp",
            "10.0.1.2",
            &BackendUpdate {
                weight: None,
                state: Some(BackendState::Draining),
            },
        )
        .unwrap();
        let p = step(&s, &mut applied);
        assert_eq!(live_ring(&s, &applied), vec![a; RING as usize]);
        assert_eq!(
            p.backends.len(),
            1,
            "the draining backend's state is written"
        );
        assert_eq!(p.backends[0].1.state, backend_state::DRAINING);
        assert!(p.reset_backend_stats.is_empty());
        assert_eq!(applied.backends[&b].addr, v4_mapped([10, 0, 1, 2]));

        // Draining the last active backend: empty ring, flows still pinned.
        s.set_backend(
            "amqp",
            "10.0.1.1",
            &BackendUpdate {
                weight: None,
                state: Some(BackendState::Draining),
            },
        )
        .unwrap();
        let p = step(&s, &mut applied);
        assert_eq!(p.services[0].1.ring_size, 0);
        assert!(p.ring_writes.is_empty());
    }

    #[test]
    fn a_down_backend_leaves_the_table_and_is_written_down() {
        let mut s = state();
        let mut applied = Applied::default();
        let a = add(&mut s, "10.0.1.1");
        let b = add(&mut s, "10.0.1.2");
        let c = add(&mut s, "10.0.1.3");
        step(&s, &mut applied);
        let mut h = Health::default();
        h.down.insert(b);
        let p = step_with(&s, &h, &mut applied);
        assert_eq!(p.backends.len(), 1, "only the down backend's entry changes");
        assert_eq!(
            (p.backends[0].0, p.backends[0].1.state),
            (b, backend_state::DOWN)
        );
        assert!(
            p.reset_backend_stats.is_empty(),
            "same backend, same counters"
        );
        let ring = live_ring(&s, &applied);
        assert!(!ring.contains(&b));
        assert!(ring.contains(&a) && ring.contains(&c));

        // Back up: back in the table, ACTIVE again.
        let p = step(&s, &mut applied);
        assert_eq!(p.backends[0].1.state, backend_state::ACTIVE);
        assert!(live_ring(&s, &applied).contains(&b));

        // Draining by its check (http 503): out of the table, flows stay.
        let mut h = Health::default();
        h.draining.insert(c);
        let p = step_with(&s, &h, &mut applied);
        assert_eq!(
            (p.backends[0].0, p.backends[0].1.state),
            (c, backend_state::DRAINING)
        );
        assert!(!live_ring(&s, &applied).contains(&c));

        // Drained by the operator and down: down wins (its flows fail fast).
        s.set_backend(
            "amqp",
            "10.0.1.1",
            &BackendUpdate {
                weight: None,
                state: Some(BackendState::Draining),
            },
        )
        .unwrap();
        let mut h = Health::default();
        h.down.insert(a);
        step_with(&s, &h, &mut applied);
        assert_eq!(applied.backends[&a].state, backend_state::DOWN);
    }

    #[test]
    fn panic_mode_puts_down_backends_back() {
        let mut s = state();
        let mut applied = Applied::default();
        let a = add(&mut s, "10.0.1.1");
        let b = add(&mut s, "10.0.1.2");
        let c = add(&mut s, "10.0.1.3");
        let mut h = Health::default();
        h.down.extend([a, b]);
        h.draining.insert(c);
        step_with(&s, &h, &mut applied);
        assert_eq!(applied.services[&service_key(&s.services[0])].ring_size, 0);
        h.panic.insert(s.services[0].id);
        step_with(&s, &h, &mut applied);
        let ring = live_ring(&s, &applied);
        assert!(ring.contains(&a) && ring.contains(&b));
        assert!(!ring.contains(&c), "draining stays out even in panic");
        assert_eq!(applied.backends[&a].state, backend_state::ACTIVE);
        assert_eq!(applied.backends[&c].state, backend_state::DRAINING);
    }

    #[test]
    fn on_down_keep_writes_down_backends_draining() {
        let mut s = state();
        let mut applied = Applied::default();
        let a = add(&mut s, "10.0.1.1");
        let b = add(&mut s, "10.0.1.2");
        let c = add(&mut s, "10.0.1.3");
        step(&s, &mut applied);
        let mut h = Health::default();
        h.down.insert(b);

        // reset (the default): DOWN, the program re-hashes its flows.
        assert_eq!(s.services[0].health.on_down, OnDown::Reset);
        step_with(&s, &h, &mut applied);
        assert_eq!(applied.backends[&b].state, backend_state::DOWN);
        assert!(!live_ring(&s, &applied).contains(&b));

        // keep: DRAINING, still out of the table, its flows stay.
        s.services[0].health.on_down = OnDown::Keep;
        let p = step_with(&s, &h, &mut applied);
        assert_eq!(
            p.backends
                .iter()
                .map(|(id, e)| (*id, e.state))
                .collect::<Vec<_>>(),
            [(b, backend_state::DRAINING)],
            "only the down backend is rewritten"
        );
        let ring = live_ring(&s, &applied);
        assert!(!ring.contains(&b), "no new flows: {ring:?}");
        assert!(ring.contains(&a) && ring.contains(&c));
        assert_eq!(applied.backends[&a].state, backend_state::ACTIVE);

        // Panic mode still routes over it, ACTIVE.
        h.down.insert(c);
        h.panic.insert(s.services[0].id);
        step_with(&s, &h, &mut applied);
        let ring = live_ring(&s, &applied);
        assert!(ring.contains(&a) && ring.contains(&b) && ring.contains(&c));
        assert_eq!(applied.backends[&b].state, backend_state::ACTIVE);
        assert_eq!(applied.backends[&c].state, backend_state::ACTIVE);

        // An operator's drain works as before.
        h.panic.clear();
        h.down.clear();
        s.set_backend(
            "amqp",
            "10.0.1.1",
            &BackendUpdate {
                weight: None,
                state: Some(BackendState::Draining),
            },
        )
        .unwrap();
        step_with(&s, &h, &mut applied);
        assert_eq!(applied.backends[&a].state, backend_state::DRAINING);
        assert!(!live_ring(&s, &applied).contains(&a));
    }

    #[test]
    fn deleted_backend_stays_as_removed() {
        let mut s = state();
        let mut applied = Applied::default();
        let a = add(&mut s, "10.0.1.1");
        let b = add(&mut s, "10.0.1.2");
        step(&s, &mut applied);
        s.del_backend("amqp", "10.0.1.2").unwrap();
        let p = step(&s, &mut applied);
        assert_eq!(p.backends, vec![(b, applied.backends[&b])]);
        assert_eq!(applied.backends[&b].state, backend_state::REMOVED);
        assert_eq!(applied.backends[&b].addr, v4_mapped([10, 0, 1, 2]));
        assert_eq!(live_ring(&s, &applied), vec![a; RING as usize]);
    }

    #[test]
    fn deleted_service_is_removed_and_its_backends_kept() {
        let mut s = state();
        let mut applied = Applied::default();
        let a = add(&mut s, "10.0.1.1");
        step(&s, &mut applied);
        let key = service_key(&s.services[0]);
        s.del_service("amqp").unwrap();
        let p = step(&s, &mut applied);
        assert_eq!(p.service_deletes, [key]);
        assert_eq!(p.reset_service_stats, [1], "its counters are cleared");
        assert!(applied.services.is_empty());
        assert_eq!(applied.backends[&a].state, backend_state::REMOVED);
    }

    #[test]
    fn reused_id_gets_fresh_counters() {
        let mut s = state();
        let mut applied = Applied::default();
        let a = add(&mut s, "10.0.1.1");
        step(&s, &mut applied);
        // Pretend the id space is exhausted: the removed id comes back for
        // another address.
        s.del_backend("amqp", "10.0.1.1").unwrap();
        step(&s, &mut applied);
        s.removed.clear();
        s.services[0].backends.push(crate::state::Backend {
            id: a,
            addr: "10.0.1.9".parse().unwrap(),
            weight: 1,
            state: BackendState::Active,
        });
        let p = step(&s, &mut applied);
        assert_eq!(p.reset_backend_stats, [a]);
    }

    #[test]
    fn next_hops_fill_backend_entries() {
        let mut s = state();
        let a = add(&mut s, "10.0.1.1");
        let b = add(&mut s, "10.0.1.2");
        let mut hops = BTreeMap::new();
        hops.insert(
            "10.0.1.1".parse().unwrap(),
            Hop {
                ifindex: 4,
                mtu: 1500,
                src_mac: [2, 0, 0, 0, 0, 1],
                dst_mac: Some([2, 0, 0, 0, 0, 2]),
                outer_src: "10.0.0.2".parse().unwrap(),
                via: "10.0.1.1".parse().unwrap(),
            },
        );
        hops.insert(
            "10.0.1.2".parse().unwrap(),
            Hop {
                ifindex: 4,
                mtu: 1500,
                src_mac: [2, 0, 0, 0, 0, 1],
                dst_mac: None,
                outer_src: "10.0.0.2".parse().unwrap(),
                via: "10.0.1.2".parse().unwrap(),
            },
        );
        let want = desired_backends(&s, &Health::default(), &hops, src());
        assert_eq!(want[&a].flags, backend_flags::NEXTHOP);
        assert_eq!(want[&a].dst_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(want[&a].ifindex, 4);
        assert_eq!(want[&a].mtu, 1500);
        assert_eq!(want[&a].outer_src, v4_mapped([10, 0, 0, 2]));
        assert_eq!(want[&b].flags, 0, "no neighbour yet: fib fallback");
        assert_eq!(want[&b].outer_src, v4_mapped([10, 0, 0, 2]));

        // A neighbour appearing is one backend write, nothing else.
        let mut applied = Applied::default();
        applied.record(&plan(&s, &Health::default(), &hops, src(), &applied));
        hops.get_mut(&"10.0.1.2".parse().unwrap()).unwrap().dst_mac = Some([2, 0, 0, 0, 0, 3]);
        let p = plan(&s, &Health::default(), &hops, src(), &applied);
        assert_eq!(p.backends.len(), 1);
        assert_eq!(p.backends[0].0, b);
        assert!(p.ring_writes.is_empty() && p.services.is_empty());
        assert!(p.reset_backend_stats.is_empty());
    }

    #[test]
    fn ipv6_backend_entries_carry_the_family_flag() {
        let v6: IpAddr = "2001:db8:1::11".parse().unwrap();
        let e = backend_entry(v6, backend_state::ACTIVE, None, DefaultSrc::default());
        assert_eq!(e.flags, backend_flags::IPV6);
        assert_eq!(e.addr, addr16(v6));
        let hop = Hop {
            ifindex: 4,
            mtu: 1500,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: Some([2, 0, 0, 0, 0, 2]),
            outer_src: "2001:db8:1::1".parse().unwrap(),
            via: v6,
        };
        let e = backend_entry(v6, backend_state::ACTIVE, Some(&hop), src());
        assert_eq!(e.flags, backend_flags::IPV6 | backend_flags::NEXTHOP);
        assert_eq!(e.outer_src, addr16("2001:db8:1::1".parse().unwrap()));
        let v4 = backend_entry("10.0.1.1".parse().unwrap(), 0, None, DefaultSrc::default());
        assert_eq!(v4.flags, 0);
    }

    #[test]
    fn ipv6_service_with_backends_of_both_families() {
        let mut s = State::default();
        for (name, vip, proto) in [
            ("amqp6", "[fd00:7::100:1]:5672", Proto::Tcp),
            ("rtp6", "[fd00:7::100:1]:10000-10099", Proto::Udp),
        ] {
            s.add_service(&ServiceSpec {
                name: name.into(),
                vip: vip.into(),
                proto,
                hash: Hash::FiveTuple,
                udp_idle_s: None,
                ring_size: Some(RING),
                health: Default::default(),
            })
            .unwrap();
        }
        let b6 = s
            .add_backend(
                "amqp6",
                &BackendSpec {
                    addr: "fd00:7::2".into(),
                    weight: None,
                },
            )
            .unwrap()
            .id;
        let b4 = s
            .add_backend(
                "amqp6",
                &BackendSpec {
                    addr: "10.0.1.1".into(),
                    weight: None,
                },
            )
            .unwrap()
            .id;
        let p = plan(
            &s,
            &Health::default(),
            &no_hops(),
            src(),
            &Applied::default(),
        );
        let vip: [u8; 16] = "fd00:7::100:1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let keys: Vec<&ServiceKey> = p.services.iter().map(|(k, _)| k).collect();
        // The VIP's raw 16 bytes, never IPv4-mapped; the range key has port 0.
        assert!(keys.contains(&&ServiceKey {
            addr: vip,
            port_be: 5672u16.to_be(),
            proto: 6,
            _pad: 0
        }));
        let range = ServiceKey {
            addr: vip,
            port_be: RANGE_PORT.to_be(),
            proto: 17,
            _pad: 0,
        };
        let (_, rv) = p.services.iter().find(|(k, _)| *k == range).unwrap();
        assert_eq!((rv.port_lo, rv.port_hi), (10000, 10099));
        assert_eq!(p.ranges_after(0), 1);
        let entries: BTreeMap<u32, MapBackend> = p.backends.iter().copied().collect();
        // 6-in-6: the IPv6 flag and the interface's IPv6 address as outer source.
        assert_eq!(entries[&b6].addr, addr16("fd00:7::2".parse().unwrap()));
        assert_eq!(entries[&b6].flags, backend_flags::IPV6);
        assert_eq!(entries[&b6].outer_src, addr16("fd00::1".parse().unwrap()));
        // 6-in-4: an IPv4 backend stays IPv4-mapped with an IPv4 outer source.
        assert_eq!(entries[&b4].addr, v4_mapped([10, 0, 1, 1]));
        assert_eq!(entries[&b4].flags, 0);
        assert_eq!(entries[&b4].outer_src, v4_mapped([10, 0, 0, 1]));
        let ring: BTreeSet<u32> = p.ring_writes.iter().map(|w| w.backend).collect();
        assert_eq!(ring, [b4, b6].into());
    }

    #[test]
    fn default_source_per_family() {
        let addrs: Vec<IpAddr> = ["fe80::1", "10.0.0.1", "fd00::5", "10.0.0.2", "fd00::6"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let d = DefaultSrc::from_addrs(&addrs);
        assert_eq!(d.for_backend("10.9.9.9".parse().unwrap()), Some(addrs[1]));
        assert_eq!(d.for_backend("fd00::9".parse().unwrap()), Some(addrs[2]));
        let only_ll = DefaultSrc::from_addrs(&["fe80::1".parse().unwrap()]);
        assert_eq!(only_ll, DefaultSrc::default());
        // Without an address of the family the entry has no outer source.
        let e = backend_entry("fd00::9".parse().unwrap(), 0, None, only_ll);
        assert_eq!(e.outer_src, [0; 16]);
    }

    #[test]
    fn unresolved_backend_still_has_an_outer_source() {
        let mut s = state();
        let a = add(&mut s, "10.0.1.1");
        let want = desired_backends(&s, &Health::default(), &no_hops(), src());
        assert_eq!(want[&a].outer_src, v4_mapped([10, 0, 0, 1]));
        assert_eq!(want[&a].flags, 0);
    }

    #[test]
    fn seed_and_idle_changes_update_the_value_only() {
        let mut s = state();
        let mut applied = Applied::default();
        add(&mut s, "10.0.1.1");
        step(&s, &mut applied);
        s.seed = 7;
        s.services[0].udp_idle_s = 5;
        let p = step(&s, &mut applied);
        assert!(p.ring_writes.is_empty());
        assert_eq!(p.services.len(), 1);
        assert_eq!(p.services[0].1.seed, 7);
        assert_eq!(p.services[0].1.udp_idle_s, 5);
    }

    #[test]
    fn restart_with_maps_read_back_writes_nothing() {
        let mut s = state();
        let mut applied = Applied::default();
        add(&mut s, "10.0.1.1");
        add(&mut s, "10.0.1.2");
        step(&s, &mut applied);
        add(&mut s, "10.0.1.3");
        step(&s, &mut applied);
        // A restarted daemon reads the maps back into a fresh `Applied`.
        let reread = applied.clone();
        assert!(plan(&s, &Health::default(), &no_hops(), src(), &reread).is_empty());
        // Without the ring contents (unknown), the rings are rewritten whole
        // into the inactive half, never into the live one.
        let mut blind = applied.clone();
        blind.rings.clear();
        let v = applied.services[&service_key(&s.services[0])];
        let p = plan(&s, &Health::default(), &no_hops(), src(), &blind);
        assert!(p.ring_writes.iter().all(|w| w.half != half_of(&v)));
        assert_eq!(p.ring_writes.len(), RING as usize);
    }

    #[test]
    fn unknown_entries_in_the_maps_are_cleared() {
        let s = state();
        let mut applied = Applied::default();
        applied.backends.insert(
            9,
            backend_entry("10.0.9.9".parse().unwrap(), 0, None, src()),
        );
        let stray = ServiceKey {
            addr: v4_mapped([10, 9, 9, 9]),
            port_be: 80u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        applied.services.insert(
            stray,
            ServiceValue {
                id: 5,
                ..Default::default()
            },
        );
        let p = plan(&s, &Health::default(), &no_hops(), src(), &applied);
        assert!(p.backends.contains(&(9, MapBackend::default())));
        assert_eq!(p.service_deletes, [stray]);
        assert_eq!(p.reset_service_stats, [1, 5]);
    }

    #[test]
    fn weights_shape_the_table() {
        let mut s = state();
        s.services[0].ring_size = 65537;
        let a = add(&mut s, "10.0.1.1");
        let b = add(&mut s, "10.0.1.2");
        s.set_backend(
            "amqp",
            "10.0.1.2",
            &BackendUpdate {
                weight: Some(300),
                state: None,
            },
        )
        .unwrap();
        let counts = maglev::slot_counts(&table(&s.services[0], &Health::default()));
        let ratio = counts[&b] as f64 / counts[&a] as f64;
        assert!((2.8..3.2).contains(&ratio), "ratio {ratio}");
    }

    fn add_svc(s: &mut State, name: &str, vip: &str) -> u32 {
        s.add_service(&ServiceSpec {
            name: name.into(),
            vip: vip.into(),
            proto: Proto::Udp,
            hash: Hash::Rtp,
            udp_idle_s: None,
            ring_size: Some(RING),
            health: Default::default(),
        })
        .unwrap()
        .id
    }

    fn range_key(addr: [u8; 4]) -> ServiceKey {
        ServiceKey {
            addr: v4_mapped(addr),
            port_be: RANGE_PORT.to_be(),
            proto: lb_common::PROTO_UDP,
            _pad: 0,
        }
    }

    #[test]
    fn a_range_service_is_keyed_on_port_0_with_its_range_in_the_value() {
        let mut s = State::default();
        let media = add_svc(&mut s, "media", "10.0.0.10:5004-5099");
        let exact = add_svc(&mut s, "exact", "10.0.0.10:5010");
        let all = add_svc(&mut s, "all", "10.0.0.11:*");
        let mut applied = Applied::default();
        let p = step(&s, &mut applied);
        let by_id: BTreeMap<u32, (ServiceKey, ServiceValue)> =
            p.services.iter().map(|&(k, v)| (v.id, (k, v))).collect();
        let (k, v) = by_id[&media];
        assert_eq!(k, range_key([10, 0, 0, 10]));
        assert!(is_range_key(&k));
        assert_eq!((v.port_lo, v.port_hi), (5004, 5099));
        let (k, v) = by_id[&exact];
        assert_eq!(k.port_be, 5010u16.to_be());
        assert!(!is_range_key(&k));
        assert_eq!((v.port_lo, v.port_hi), (0, 0), "exact: no range");
        let (k, v) = by_id[&all];
        assert_eq!(k, range_key([10, 0, 0, 11]));
        assert_eq!((v.port_lo, v.port_hi), (1, 65535));
        // Two range services: RANGES counts them, raised before the writes.
        assert_eq!((p.ranges_raise, p.ranges_lower), (Some(2), None));
        assert_eq!(applied.ranges, 2);
        assert!(step(&s, &mut applied).is_empty(), "then nothing to do");
        // A change of range is a value update under the same key.
        s.services[0].vip = crate::state::parse_vip("10.0.0.10:6000-6999").unwrap();
        let p = step(&s, &mut applied);
        assert_eq!(p.services.len(), 1);
        assert_eq!(
            (p.services[0].1.port_lo, p.services[0].1.port_hi),
            (6000, 6999)
        );
        assert_eq!((p.ranges_raise, p.ranges_lower), (None, None));
    }

    #[test]
    fn ranges_count_never_falls_below_the_range_entries_in_the_map() {
        let mut s = State::default();
        let mut applied = Applied::default();
        add_svc(&mut s, "exact", "10.0.0.10:5010");
        let p = step(&s, &mut applied);
        assert_eq!(
            (p.ranges_raise, p.ranges_lower),
            (None, None),
            "no range: 0 stays"
        );

        // First range: raised before its entry is written.
        add_svc(&mut s, "a", "10.0.0.10:5004-5099");
        let p = step(&s, &mut applied);
        assert_eq!((p.ranges_raise, p.ranges_lower), (Some(1), None));
        assert_eq!(applied.ranges, 1);

        // Range a replaced by range b (another vip) in one plan: b's entry is
        // written before a's is deleted, so the count covers both meanwhile.
        s.del_service("a").unwrap();
        add_svc(&mut s, "b", "10.0.0.11:*");
        let p = step(&s, &mut applied);
        assert_eq!(p.service_deletes, [range_key([10, 0, 0, 10])]);
        assert_eq!((p.ranges_raise, p.ranges_lower), (Some(2), Some(1)));
        assert_eq!(applied.ranges, 1);

        // Range b becomes exact: its range entry goes, lowered after that.
        s.services[1].vip = crate::state::parse_vip("10.0.0.11:7000").unwrap();
        let p = step(&s, &mut applied);
        assert_eq!(p.service_deletes, [range_key([10, 0, 0, 11])]);
        assert_eq!((p.ranges_raise, p.ranges_lower), (None, Some(0)));
        assert_eq!(applied.ranges, 0);

        // A stale count in the map (e.g. left by a crash) is corrected.
        add_svc(&mut s, "c", "10.0.0.12:5004-5005");
        step(&s, &mut applied);
        applied.ranges = 5;
        let p = plan(&s, &Health::default(), &no_hops(), src(), &applied);
        assert_eq!((p.ranges_raise, p.ranges_lower), (None, Some(1)));
        applied.ranges = 0;
        let p = plan(&s, &Health::default(), &no_hops(), src(), &applied);
        assert_eq!((p.ranges_raise, p.ranges_lower), (Some(1), None));
    }

    #[test]
    fn ranges_writes_bracket_the_service_writes_when_applied() {
        use crate::dataplane::{apply, read_applied, MemDataplane};
        let mut s = State::default();
        add_svc(&mut s, "a", "10.0.0.10:5004-5099");
        let mut dp = MemDataplane::default();
        let mut applied = read_applied(&dp, &s).unwrap();
        let p = plan(&s, &Health::default(), &no_hops(), src(), &applied);
        // Order of the writes: the count (1) first, then the entry.
        dp.fail_at = Some(p.reset_service_stats.len() + 1);
        assert!(apply(&mut dp, &p).is_err());
        assert_eq!(dp.ranges, 1, "count raised before the entry exists");
        assert!(dp.services.is_empty());
        dp.fail_at = None;
        apply(&mut dp, &p).unwrap();
        applied.record(&p);
        assert_eq!(read_applied(&dp, &s).unwrap(), applied, "reads back alike");

        // Deleting it: the entry goes first, then the count.
        s.del_service("a").unwrap();
        let p = plan(&s, &Health::default(), &no_hops(), src(), &applied);
        let writes = dp.writes;
        dp.fail_at = Some(writes + p.reset_service_stats.len() + 1);
        assert!(apply(&mut dp, &p).is_err());
        assert!(dp.services.is_empty(), "entry deleted");
        assert_eq!(dp.ranges, 1, "count still covers it");
        dp.fail_at = None;
        apply(&mut dp, &p).unwrap();
        assert_eq!(dp.ranges, 0);
        assert_eq!(dp.ranges_writes, [1, 1, 0]);
    }
}
