//! Map names, sizes and `repr(C)` key/value layouts shared by program and daemon.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`)
//! so IPv6 needs no layout change. IPv4 conntrack has its own compact map
//! (`CT4`, 16-byte key) because the key is hashed on every packet.
//! Any change here bumps [`LAYOUT_VERSION`], which is part of the pin path.

/// Version of every layout in this file; pinned maps live under `v{LAYOUT_VERSION}`.
pub const LAYOUT_VERSION: u32 = 2;

/// Largest Maglev ring; every service owns two rings of this stride (A/B).
pub const RING_MAX: u32 = 65537;
/// Default Maglev ring size (prime).
pub const RING_DEFAULT: u32 = 65537;
/// Service ids are `1..MAX_SERVICES`; id 0 is never used.
pub const MAX_SERVICES: u32 = 32;
/// Backend ids are `1..MAX_BACKENDS`; id 0 means "empty slot".
pub const MAX_BACKENDS: u32 = 4096;
/// Default conntrack capacity per address family.
pub const CT_DEFAULT_ENTRIES: u32 = 1 << 20;

/// Map names as the kernel sees them (15 bytes at most).
pub mod names {
    /// `ServiceKey` → `ServiceValue`; HASH; written by the daemon.
    pub const SERVICES: &str = "SERVICES";
    /// ring index → backend id (`u32`); ARRAY of `MAX_SERVICES * 2 * RING_MAX`.
    pub const RINGS: &str = "RINGS";
    /// backend id → `Backend`; ARRAY of `MAX_BACKENDS`; written by the daemon.
    pub const BACKENDS: &str = "BACKENDS";
    /// `Flow4` → `CtEntry`; LRU_HASH; written by the program.
    pub const CT4: &str = "CT4";
    /// `Flow6` → `CtEntry`; LRU_HASH; written by the program.
    pub const CT6: &str = "CT6";
    /// `Counter` → u64; PERCPU_ARRAY.
    pub const STATS: &str = "STATS";
    /// `DropReason` → u64; PERCPU_ARRAY.
    pub const DROPS: &str = "DROPS";
    /// service id → `Traffic`; PERCPU_ARRAY.
    pub const SVC_STATS: &str = "SVC_STATS";
    /// `[RANGES_COUNT]` → port-range services (gates the range lookup).
    pub const RANGES: &str = "RANGES";
    /// backend id → `Traffic`; PERCPU_ARRAY.
    pub const BE_STATS: &str = "BE_STATS";
    /// local address → u32 (1); HASH; decap program only.
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_ICMP: u8 = 1;
/// IPv6 encapsulated in IPv4 or IPv6 (the outer header's protocol / next header).
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_ICMPV6: u8 = 58;

/// IPv4 address as an IPv4-mapped IPv6 address, the form every map stores.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped address, if it is one.
pub fn v4_unmapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// How a service turns a flow into a hash.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashMode {
    /// Source and destination address and port, protocol (AMQP default).
    FiveTuple = 0,
    /// Source address only: every flow of one client lands on one backend.
    SrcIp = 1,
    /// Five-tuple with the low bit of both ports cleared: RTP (even) and RTCP (+1) pair up.
    Rtp = 2,
}

impl HashMode {
    pub const fn from_u8(v: u8) -> HashMode {
        match v {
            1 => HashMode::SrcIp,
            2 => HashMode::Rtp,
            _ => HashMode::FiveTuple,
        }
    }
}

/// Key of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// VIP, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Destination port in network byte order (as read from the packet).
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `SERVICES`. Replaced whole by the daemon; that replace is the atomic ring swap.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Index into `SVC_STATS`, `1..MAX_SERVICES`.
    pub id: u32,
    /// Index in `RINGS` of slot 0 of the live ring.
    pub ring_base: u32,
    /// Slots in the live ring (a prime ≤ `RING_MAX`); 0 means no backend.
    pub ring_size: u32,
    /// Flow hash seed (the same on every LB of a cluster).
    pub seed: u32,
    /// UDP conntrack entries older than this are re-hashed, in seconds.
    pub udp_idle_s: u32,
    /// `HashMode` as u8.
    pub hash_mode: u8,
    pub _pad: u8,
    /// A port-range service (its key has port [`RANGE_PORT`]) takes
    /// destination ports `port_lo..=port_hi`; 0 and 0 in an exact-port service.
    pub port_lo: u16,
    pub port_hi: u16,
    pub _pad2: u16,
}

/// The `ServiceKey::port_be` of a VIP's port-range service: port 0 is no
/// real destination, so the range's entry cannot collide with an exact port.
/// The program looks it up only after the exact port missed, so an
/// exact-port service on the same VIP wins.
pub const RANGE_PORT: u16 = 0;

/// Index 0 of `RANGES`: how many port-range services exist. The program
/// skips the second lookup while it is 0, so VIPs without ranges (and
/// traffic that is not for a VIP) pay nothing for the feature.
pub const RANGES_COUNT: u32 = 0;

/// Whether a port-range service `lo..=hi` takes destination port `port`.
#[inline(always)]
pub const fn range_takes(value: &ServiceValue, port: u16) -> bool {
    value.port_lo <= port && port <= value.port_hi
}

/// `Backend::state`: whether the backend takes flows.
pub mod backend_state {
    /// Takes new and established flows.
    pub const ACTIVE: u8 = 0;
    /// Out of the ring; established flows stay.
    pub const DRAINING: u8 = 1;
    /// Deleted by the user; kept only so established flows finish.
    pub const REMOVED: u8 = 2;
    /// Failed its health check: out of the ring, and its conntrack entries
    /// no longer pin flows (UDP moves to a healthy backend, TCP re-hashes so
    /// the client fails fast instead of waiting on a dead peer).
    pub const DOWN: u8 = 3;
}

/// Whether a conntrack entry pointing at a backend in `state` still pins its flow.
pub const fn backend_keeps_flows(state: u8) -> bool {
    state != backend_state::DOWN
}

/// `Backend::flags` bits.
pub mod backend_flags {
    /// `ifindex`, MACs and `mtu` hold a resolved next hop.
    pub const NEXTHOP: u8 = 1;
    /// `addr` and `outer_src` are IPv6 addresses: packets to this backend
    /// are encapsulated in IPv6 (6-in-6, or 4-in-6 for an IPv4 service).
    /// Without it both are IPv4-mapped and the outer header is IPv4.
    pub const IPV6: u8 = 2;

    /// The family bit of a backend address as maps store it: [`IPV6`]
    /// unless it is IPv4-mapped. The daemon sets it with the address.
    pub fn family(addr: &[u8; 16]) -> u8 {
        if crate::maps::v4_unmapped(addr).is_some() {
            0
        } else {
            IPV6
        }
    }
}

/// Value of `BACKENDS`: where to send, and how, resolved by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Backend address (outer destination), IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// LB address used as outer source (route's preferred source).
    pub outer_src: [u8; 16],
    /// Egress interface index of the cached next hop.
    pub ifindex: u32,
    /// Egress MTU: encapsulated packets larger than this get ICMP too-big.
    pub mtu: u16,
    /// `backend_flags` bits: `IPV6` always matches `addr`, `NEXTHOP` when resolved.
    pub flags: u8,
    /// `backend_state` value.
    pub state: u8,
    /// Egress interface MAC (outer Ethernet source).
    pub src_mac: [u8; 6],
    /// Next hop MAC (outer Ethernet destination).
    pub dst_mac: [u8; 6],
}

/// Key of `CT4`: an IPv4 flow as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Flow4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of `CT6`: an IPv6 flow as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Flow6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `CT4`/`CT6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// Backend id the flow is pinned to.
    pub backend: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when last refreshed (refreshed at most once a second).
    pub seen_ns: u64,
}

/// Value of `SVC_STATS` and `BE_STATS` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Refresh a conntrack entry's timestamp only when it is this much older (ns).
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Whether a conntrack entry still pins its flow. Pure: `now - seen < idle` for UDP, TCP always.
pub const fn ct_is_live(proto: u8, seen_ns: u64, now_ns: u64, udp_idle_s: u32) -> bool {
    if proto != PROTO_UDP {
        return true;
    }
    now_ns.saturating_sub(seen_ns) < udp_idle_s as u64 * 1_000_000_000
}

/// Index in `RINGS` of a service's ring `half` (0 or 1).
pub const fn ring_base(service_id: u32, half: u32) -> u32 {
    (service_id * 2 + (half & 1)) * RING_MAX
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no
    // pointers; every bit pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for ServiceKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for ServiceValue {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for Backend {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for Flow4 {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for Flow6 {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for CtEntry {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for Traffic {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 28);
        assert_eq!(size_of::<Backend>(), 52);
        assert_eq!(size_of::<Flow4>(), 16);
        assert_eq!(size_of::<Flow6>(), 40);
        assert_eq!(size_of::<CtEntry>(), 16);
        assert_eq!(size_of::<Traffic>(), 24);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let m = v4_mapped([10, 0, 0, 1]);
        assert_eq!(v4_unmapped(&m), Some([10, 0, 0, 1]));
        assert_eq!(v4_unmapped(&[0u8; 16]), None);
    }

    #[test]
    fn backend_family_follows_the_address() {
        assert_eq!(backend_flags::family(&v4_mapped([10, 0, 0, 1])), 0);
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(backend_flags::family(&v6), backend_flags::IPV6);
    }

    #[test]
    fn udp_entries_idle_out_tcp_never() {
        let s = 1_000_000_000u64;
        assert!(ct_is_live(PROTO_UDP, 0, 59 * s, 60));
        assert!(!ct_is_live(PROTO_UDP, 0, 60 * s, 60));
        assert!(ct_is_live(PROTO_TCP, 0, 1_000 * s, 60));
    }

    #[test]
    fn rings_do_not_overlap() {
        assert_eq!(ring_base(1, 0) + RING_MAX, ring_base(1, 1));
        assert_eq!(ring_base(1, 1) + RING_MAX, ring_base(2, 0));
        assert!(ring_base(MAX_SERVICES - 1, 1) + RING_MAX <= MAX_SERVICES * 2 * RING_MAX);
    }
}
