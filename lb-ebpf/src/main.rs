//! `mqlb`: the XDP load balancer. Parses IPv4 and IPv6 TCP/UDP, finds the
//! service, pins the flow to a backend (conntrack, else Maglev), wraps it in
//! IPIP (4-in-4, 6-in-6, 4-in-6 or 6-in-4, by the families of the client and
//! the backend) and sends it out. ICMP errors that quote a service flow go
//! to that flow's backend. Every decision is a call into `lb-common`.
//!
//! The IPv4 path is this file, straight-line and inlined; IPv6 (`v6.rs`),
//! quoted-flow ICMP (`icmp.rs`) and every encapsulation other than IPv4 to
//! a cached IPv4 next hop (`forward_slow`) are BPF subprograms off it. The
//! deepest chain of calls, `mqlb` → `service6`/`icmp6` → `forward_slow`,
//! must fit the verifier's 512 bytes of stack for all frames together
//! (448 now, frames rounded to 16 bytes).
//!
//! Cost matters here (see `cargo run --release -p mqlb-tests --example
//! prog_cost`): packet fields are read and written as whole words through
//! `ptr::Bytes`, map keys are built in 8-byte aligned stack slots, and packet
//! fields are read where they are used rather than carried across helper
//! calls (only r6-r9 survive a call; the rest spills to the stack).
#![no_std]
#![no_main]
// `asm!` on the BPF target (aya-ebpf enables the same feature): see `ptr.rs`.
#![feature(asm_experimental_arch)]

mod icmp;
mod ptr;
mod v6;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{
        bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    backend_flags, backend_keeps_flows, ct_is_live,
    hash::{flow_hash_v4, flow_hash_v6, flow_label, ring_slot, tcp_syn_rehashes},
    packet::{
        encap_client_mtu, encap_fits, icmp4_frag_needed_hdr, icmp4_frag_needed_ip, ip4_outer_words,
        ipip_client_mtu, ipip_fits, ipip_outer_v4_words, ipv6_head_words, outer_len, ETH_LEN,
        ETH_P_IPV4, ETH_P_IPV6, ICMP4_QUOTE_LEN, ICMP4_TOO_BIG_LEN, ICMP_HDR_LEN, IPV4_DF,
        IPV4_LEN, IPV4_MF, IPV4_OFFSET_MASK, IPV6_LEN, OUTER_TTL,
    },
    Backend, Counter, CtEntry, DropReason, Flow4, Flow6, HashMode, ServiceKey, ServiceValue,
    Traffic, CT_DEFAULT_ENTRIES, CT_REFRESH_NS, MAX_BACKENDS, MAX_SERVICES, PROTO_ICMP, PROTO_IPIP,
    PROTO_TCP, PROTO_UDP, RANGES_COUNT, RANGE_PORT, RING_MAX,
};
use ptr::Bytes;

/// `ServiceKey` → `ServiceValue`; written by the daemon; one entry per service.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// `[RANGES_COUNT]`: port-range services; 0 skips their lookup. Written by the daemon.
#[map]
static RANGES: Array<u32> = Array::with_max_entries(1, 0);
/// Maglev rings, two per service (A/B); slot → backend id; written by the daemon.
#[map]
static RINGS: Array<u32> = Array::with_max_entries(MAX_SERVICES * 2 * RING_MAX, 0);
/// backend id → `Backend` (address, cached next hop); written by the daemon.
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
/// IPv4 flow → `CtEntry`; written here; sized by the daemon at load.
#[map]
static CT4: LruHashMap<Flow4, CtEntry> = LruHashMap::with_max_entries(CT_DEFAULT_ENTRIES, 0);
/// IPv6 flow → `CtEntry`; written here; sized by the daemon at load.
#[map]
static CT6: LruHashMap<Flow6, CtEntry> = LruHashMap::with_max_entries(CT_DEFAULT_ENTRIES, 0);
/// `Counter` → packets, per CPU.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
/// `DropReason` → packets, per CPU.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);
/// service id → `Traffic`, per CPU.
#[map]
static SVC_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
/// backend id → `Traffic`, per CPU.
#[map]
static BE_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// What the fast path reads under one bounds check: Ethernet, IPv4 without
/// options, and the two ports. Offsets below are from the frame start.
const HDRS_LEN: usize = ETH_LEN + IPV4_LEN + 4;
const ETHERTYPE: usize = 12;
const IP_VIHL: usize = ETH_LEN;
const IP_TOS: usize = ETH_LEN + 1;
const IP_TOT_LEN: usize = ETH_LEN + 2;
const IP_FRAG: usize = ETH_LEN + 6;
const IP_PROTO: usize = ETH_LEN + 9;
const IP_SRC: usize = ETH_LEN + 12;
const IP_DST: usize = ETH_LEN + 16;
const L4: usize = ETH_LEN + IPV4_LEN;
/// Offset of the flags byte in a TCP header.
const TCP_FLAGS_OFF: usize = 13;
const TCP_FLAGS: usize = L4 + TCP_FLAGS_OFF;
const UDP_HDR_LEN: usize = 8;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[xdp]
pub fn mqlb(ctx: XdpContext) -> u32 {
    count(Counter::Rx);
    let action = action_of(try_mqlb(&ctx));
    count(match action {
        xdp_action::XDP_TX => Counter::Tx,
        xdp_action::XDP_REDIRECT => Counter::Redirect,
        xdp_action::XDP_DROP => Counter::Drop,
        _ => Counter::Pass,
    });
    action
}

/// The XDP action of a result: a drop reason is counted, and the packet dropped.
///
/// Subprograms (`v6.rs`, `icmp.rs`, `forward_slow`) return their action
/// through this rather than a `Result`: a BPF function returns one register,
/// and a `Result` would come back through the caller's stack, which the IPv4
/// hot path would then share.
#[inline(always)]
fn action_of(r: Result<u32, DropReason>) -> u32 {
    match r {
        Ok(action) => action,
        Err(reason) => {
            if let Some(n) = DROPS.get_ptr_mut(reason as u32) {
                unsafe { *n += 1 };
            }
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(n) = STATS.get_ptr_mut(c as u32) {
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn count_traffic(map: &PerCpuArray<Traffic>, id: u32, bytes: u16, new_flow: bool) {
    if let Some(t) = map.get_ptr_mut(id) {
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes as u64;
            (*t).new_flows += new_flow as u64;
        }
    }
}

/// A `ServiceKey` built as the words of its layout (address, port,
/// protocol): three stores into an 8-byte aligned stack slot. Built field by
/// field, the compiler writes it a byte at a time and zeroes the prefix with
/// a `memset` call.
#[repr(C, align(8))]
struct SvcKey([u64; 3]);

impl SvcKey {
    /// An IPv4 VIP, stored IPv4-mapped (`::ffff:a.b.c.d`).
    #[inline(always)]
    fn v4(dst: [u8; 4], port_be: u16, proto: u8) -> Self {
        let [d0, d1, d2, d3] = dst;
        let [p0, p1] = port_be.to_ne_bytes();
        SvcKey([
            0,
            u64::from_ne_bytes([0, 0, 0xff, 0xff, d0, d1, d2, d3]),
            u64::from_ne_bytes([p0, p1, proto, 0, 0, 0, 0, 0]),
        ])
    }

    /// An IPv6 VIP from its two memory-order words.
    #[inline(always)]
    fn v6(dst: [u64; 2], port_be: u16, proto: u8) -> Self {
        let [p0, p1] = port_be.to_ne_bytes();
        SvcKey([
            dst[0],
            dst[1],
            u64::from_ne_bytes([p0, p1, proto, 0, 0, 0, 0, 0]),
        ])
    }

    /// The key of the same VIP's port-range service (`RANGE_PORT`).
    #[inline(always)]
    fn range(&self) -> Self {
        let [_, _, proto, ..] = self.0[2].to_ne_bytes();
        let [p0, p1] = RANGE_PORT.to_ne_bytes();
        SvcKey([
            self.0[0],
            self.0[1],
            u64::from_ne_bytes([p0, p1, proto, 0, 0, 0, 0, 0]),
        ])
    }

    #[inline(always)]
    fn get(&self) -> &ServiceKey {
        const {
            assert!(core::mem::size_of::<ServiceKey>() <= core::mem::size_of::<SvcKey>());
            assert!(core::mem::offset_of!(ServiceKey, port_be) == 16);
            assert!(core::mem::offset_of!(ServiceKey, proto) == 18);
        }
        // SAFETY: same size or larger, stricter alignment, and every byte of
        // a `ServiceKey` is an integer (any bit pattern is valid).
        unsafe { &*(self as *const Self as *const ServiceKey) }
    }
}

/// A `Flow4` as the two words of its layout: the packet's source and
/// destination addresses (adjacent on the wire, so one load), then the ports
/// (also adjacent) and the protocol.
#[repr(C, align(8))]
struct FlowKey([u64; 2]);

impl FlowKey {
    #[inline(always)]
    fn new(addrs: u64, ports: u32, proto: u8) -> Self {
        let [a, b, c, d] = ports.to_ne_bytes();
        FlowKey([addrs, u64::from_ne_bytes([a, b, c, d, proto, 0, 0, 0])])
    }

    #[inline(always)]
    fn get(&self) -> &Flow4 {
        const {
            assert!(core::mem::size_of::<Flow4>() == core::mem::size_of::<FlowKey>());
            assert!(core::mem::offset_of!(Flow4, dst) == 4);
            assert!(core::mem::offset_of!(Flow4, sport_be) == 8);
            assert!(core::mem::offset_of!(Flow4, dport_be) == 10);
            assert!(core::mem::offset_of!(Flow4, proto) == 12);
        }
        // SAFETY: as for `SvcKey::get`.
        unsafe { &*(self as *const Self as *const Flow4) }
    }

    /// The outer IPv6 flow label of this flow (4-in-6).
    #[inline(always)]
    fn label(&self) -> u32 {
        flow_label(self.0[0] ^ self.0[1])
    }
}

/// A `Flow6` as the five words of its layout: source and destination
/// (adjacent on the wire: four loads), ports and protocol.
#[repr(C, align(8))]
struct FlowKey6([u64; 5]);

impl FlowKey6 {
    #[inline(always)]
    fn new(addrs: [u64; 4], ports: u32, proto: u8) -> Self {
        let [a, b, c, d] = ports.to_ne_bytes();
        FlowKey6([
            addrs[0],
            addrs[1],
            addrs[2],
            addrs[3],
            u64::from_ne_bytes([a, b, c, d, proto, 0, 0, 0]),
        ])
    }

    #[inline(always)]
    fn get(&self) -> &Flow6 {
        const {
            assert!(core::mem::size_of::<Flow6>() == core::mem::size_of::<FlowKey6>());
            assert!(core::mem::offset_of!(Flow6, dst) == 16);
            assert!(core::mem::offset_of!(Flow6, sport_be) == 32);
            assert!(core::mem::offset_of!(Flow6, proto) == 36);
        }
        // SAFETY: as for `SvcKey::get`.
        unsafe { &*(self as *const Self as *const Flow6) }
    }

    /// The outer IPv6 flow label of this flow (6-in-6).
    #[inline(always)]
    fn label(&self) -> u32 {
        let w = &self.0;
        flow_label(w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4])
    }
}

/// What conntrack and the ring need of a flow key, per address family.
trait CtKey: Sized + 'static {
    /// The conntrack map of this family.
    fn ct() -> &'static LruHashMap<Self, CtEntry>;
    fn proto(&self) -> u8;
    /// The flow's hash for `svc`'s Maglev ring (what userspace predicts with).
    fn hash(&self, svc: &ServiceValue) -> u32;
}

impl CtKey for Flow4 {
    #[inline(always)]
    fn ct() -> &'static LruHashMap<Self, CtEntry> {
        &CT4
    }
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
    #[inline(always)]
    fn hash(&self, svc: &ServiceValue) -> u32 {
        flow_hash_v4(
            svc.seed,
            HashMode::from_u8(svc.hash_mode),
            self.src,
            self.dst,
            u16::from_be(self.sport_be),
            u16::from_be(self.dport_be),
            self.proto,
        )
    }
}

impl CtKey for Flow6 {
    #[inline(always)]
    fn ct() -> &'static LruHashMap<Self, CtEntry> {
        &CT6
    }
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
    #[inline(always)]
    fn hash(&self, svc: &ServiceValue) -> u32 {
        flow_hash_v6(
            svc.seed,
            HashMode::from_u8(svc.hash_mode),
            &self.src,
            &self.dst,
            u16::from_be(self.sport_be),
            u16::from_be(self.dport_be),
            self.proto,
        )
    }
}

/// The word at byte `OFF` of a map value. Map values are 8-byte aligned (the
/// kernel rounds every value slot up to 8 bytes), so a word-aligned `OFF` is
/// an aligned load; through a `[u8; N]` field the compiler loads byte by byte.
#[inline(always)]
fn value_word<V, T: Copy, const OFF: usize>(v: &V) -> T {
    const {
        assert!(OFF % core::mem::size_of::<T>() == 0);
        assert!(OFF + core::mem::size_of::<T>() <= core::mem::size_of::<V>());
        assert!(core::mem::size_of::<T>() <= 8);
    }
    // SAFETY: inside the value, aligned (see above), and `T` is an integer.
    unsafe { ((v as *const V as *const u8).add(OFF) as *const T).read() }
}

/// A packet to a service, as mqlb decides on it (IPv4 without options).
struct Packet {
    /// Ethernet, IPv4 and ports; valid until the frame is resized. Fields
    /// are read from here where they are used: a value read earlier and kept
    /// across a helper call would be spilled to the stack and back.
    hdr: Bytes<HDRS_LEN>,
    total_len: u16,
    /// A TCP SYN without ACK: the flow starts over.
    syn: bool,
}

fn try_mqlb(ctx: &XdpContext) -> Result<u32, DropReason> {
    // Anything we cannot read far enough to name a service is not ours. The
    // cheapest tests come first: most traffic that is not ours stops at the
    // ethertype or the protocol, before a map lookup.
    let Some(h) = Bytes::<HDRS_LEN>::at(ctx, 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if h.u16::<ETHERTYPE>() != ETH_P_IPV4.to_be() {
        if h.u16::<ETHERTYPE>() == ETH_P_IPV6.to_be() {
            return Ok(v6::mqlb6(ctx));
        }
        return Ok(xdp_action::XDP_PASS);
    }
    let proto = h.u8::<IP_PROTO>();
    if proto != PROTO_TCP && proto != PROTO_UDP {
        if proto == PROTO_ICMP {
            return Ok(icmp::icmp4(ctx));
        }
        return Ok(xdp_action::XDP_PASS);
    }
    let ihl = ((h.u8::<IP_VIHL>() & 0x0f) as usize) * 4;
    let frag = u16::from_be(h.u16::<IP_FRAG>());
    // A non-first fragment carries no ports: it cannot be matched to a
    // service, so it is the kernel's (which drops it: the VIP is not local).
    if ihl < IPV4_LEN || frag & IPV4_OFFSET_MASK != 0 {
        return Ok(xdp_action::XDP_PASS);
    }
    let ports = if ihl == IPV4_LEN {
        h.u32::<L4>()
    } else {
        // Options move the ports; such a packet is read only far enough to
        // find its service, then dropped below.
        match Bytes::<4>::at(ctx, ETH_LEN + ihl) {
            Some(p) => p.u32::<0>(),
            None => return Ok(xdp_action::XDP_PASS),
        }
    };
    let [_, _, d0, d1] = ports.to_ne_bytes();
    let dport_be = u16::from_ne_bytes([d0, d1]);
    let Some(svc) = service(SvcKey::v4(h.u32::<IP_DST>().to_ne_bytes(), dport_be, proto)) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let total_len = u16::from_be(h.u16::<IP_TOT_LEN>());
    count_traffic(&SVC_STATS, svc.id, total_len, false);

    // Policy for service traffic we will not forward (Katran does the same):
    // first fragments would split a flow's packets between backends, and
    // options are not worth a variable-length encapsulation path.
    if frag & IPV4_MF != 0 {
        return Err(DropReason::Fragment);
    }
    if ihl != IPV4_LEN {
        return Err(DropReason::IpOptions);
    }
    if (total_len as usize) < IPV4_LEN || ctx.data() + ETH_LEN + total_len as usize > ctx.data_end()
    {
        return Err(DropReason::MalformedIp);
    }
    // Read again rather than kept across the lookup (see `Packet::hdr`).
    let proto = h.u8::<IP_PROTO>();
    let syn = if proto == PROTO_TCP {
        let Some(t) = Bytes::<{ TCP_FLAGS + 1 }>::at(ctx, 0) else {
            return Err(DropReason::MalformedL4);
        };
        let flags = t.u8::<TCP_FLAGS>();
        tcp_syn_rehashes(flags & TCP_SYN != 0, flags & TCP_ACK != 0)
    } else {
        if Bytes::<{ L4 + UDP_HDR_LEN }>::at(ctx, 0).is_none() {
            return Err(DropReason::MalformedL4);
        }
        false
    };
    let flow = FlowKey::new(h.u64::<IP_SRC>(), h.u32::<L4>(), proto);
    let pkt = Packet {
        hdr: h,
        total_len,
        syn,
    };
    let backend = pick_backend(svc, flow.get(), pkt.total_len, pkt.syn)?;
    forward(ctx, &pkt, backend, &flow)
}

/// The service of a destination: its exact port first, then the VIP's port
/// range (only while some range service exists).
#[inline(always)]
pub(crate) fn service(key: SvcKey) -> Option<&'static ServiceValue> {
    if let Some(svc) = unsafe { SERVICES.get(key.get()) } {
        return Some(svc);
    }
    if RANGES.get(RANGES_COUNT).is_none_or(|n| *n == 0) {
        return None;
    }
    let port = u16::from_be(key.get().port_be);
    let svc = unsafe { SERVICES.get(key.range().get()) }?;
    lb_common::range_takes(svc, port).then_some(svc)
}

/// Conntrack first (unless a SYN starts the flow over), else the Maglev ring
/// (and a new conntrack entry). `len`: IP bytes, for the traffic counters.
#[inline(always)]
fn pick_backend<F: CtKey>(
    svc: &ServiceValue,
    f: &F,
    len: u16,
    syn: bool,
) -> Result<&'static Backend, DropReason> {
    let udp = f.proto() == PROTO_UDP;
    // The clock costs a helper call; only UDP entries age.
    let now = if udp {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if !syn {
        if let Some(ct) = F::ct().get_ptr_mut(f) {
            let ct = unsafe { &mut *ct };
            if ct_is_live(f.proto(), ct.seen_ns, now, svc.udp_idle_s) {
                if udp && now.wrapping_sub(ct.seen_ns) > CT_REFRESH_NS {
                    ct.seen_ns = now;
                }
                let id = ct.backend;
                let backend = backend(id)?;
                // A backend that failed its health check no longer pins
                // flows: UDP moves to a healthy one, TCP is re-hashed so the
                // client gets a reset at once instead of waiting on a dead peer.
                if backend_keeps_flows(backend.state) {
                    count(Counter::CtHit);
                    count_traffic(&BE_STATS, id, len, false);
                    return Ok(backend);
                }
            }
        }
    }
    count(Counter::CtMiss);
    let (id, backend) = ring_backend(svc, f)?;
    let entry = CtEntry {
        backend: id,
        _pad: 0,
        seen_ns: now,
    };
    // An LRU insert cannot fail for lack of room; a failure here only costs
    // the next packet a second ring lookup, which picks the same backend.
    let _ = F::ct().insert(f, &entry, 0);
    count_traffic(&BE_STATS, id, len, true);
    if let Some(t) = SVC_STATS.get_ptr_mut(svc.id) {
        unsafe { (*t).new_flows += 1 };
    }
    Ok(backend)
}

/// The backend the Maglev ring of `svc` gives `f`, and its id.
#[inline(always)]
fn ring_backend<F: CtKey>(
    svc: &ServiceValue,
    f: &F,
) -> Result<(u32, &'static Backend), DropReason> {
    if svc.ring_size == 0 {
        return Err(DropReason::NoBackend);
    }
    let hash = f.hash(svc);
    let slot = svc.ring_base.wrapping_add(ring_slot(hash, svc.ring_size));
    let id = match RINGS.get(slot) {
        Some(&id) if id != 0 => id,
        _ => return Err(DropReason::NoBackend),
    };
    Ok((id, backend(id)?))
}

/// The backend that owns flow `f` of `svc`, for a packet about the flow
/// rather than of it (an ICMP error quoting it): conntrack, else the ring,
/// and neither creates nor refreshes a conntrack entry. Counts the packet
/// to the backend, not as a new flow.
#[inline(always)]
fn flow_owner<F: CtKey>(
    svc: &ServiceValue,
    f: &F,
    len: u16,
) -> Result<&'static Backend, DropReason> {
    if let Some(ct) = unsafe { F::ct().get(f) } {
        let now = if f.proto() == PROTO_UDP {
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        };
        if ct_is_live(f.proto(), ct.seen_ns, now, svc.udp_idle_s) {
            let id = ct.backend;
            let backend = backend(id)?;
            if backend_keeps_flows(backend.state) {
                count_traffic(&BE_STATS, id, len, false);
                return Ok(backend);
            }
        }
    }
    let (id, backend) = ring_backend(svc, f)?;
    count_traffic(&BE_STATS, id, len, false);
    Ok(backend)
}

/// The backend entry of `id`, if the daemon configured it (a non-zero address).
#[inline(always)]
fn backend(id: u32) -> Result<&'static Backend, DropReason> {
    match BACKENDS.get(id) {
        Some(b) if value_word::<_, u64, 0>(b) | value_word::<_, u64, 8>(b) != 0 => Ok(b),
        _ => Err(DropReason::BackendMissing),
    }
}

/// The IPv4 address inside an IPv4-mapped `Backend` address field.
#[inline(always)]
fn addr4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// IPv4 to a backend with a cached IPv4 next hop, inline: the hot path.
/// Anything else (an IPv6 backend, no cached next hop) is `forward_slow`.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    be: &Backend,
    flow: &FlowKey,
) -> Result<u32, DropReason> {
    if be.flags & (backend_flags::NEXTHOP | backend_flags::IPV6) != backend_flags::NEXTHOP {
        let h = pkt.hdr;
        let how = if dont_fragment(h) {
            TooBig::Icmp4
        } else {
            TooBig::Icmp4NoDf
        };
        let inner = Inner {
            len: pkt.total_len,
            tos: h.u8::<IP_TOS>(),
            proto: PROTO_IPIP,
            label: flow.label(),
        };
        return verdict(ctx, forward_slow(ctx, &inner, be), how);
    }
    if !ipip_fits(pkt.total_len, be.mtu) {
        return too_big(ctx, dont_fragment(pkt.hdr), ipip_client_mtu(be.mtu));
    }
    // Backend fields are read after the helper call: read before, they
    // would be spilled to the stack across it.
    let out = grow_for_ipip(ctx)?;
    write_outer(
        out,
        addr4(&be.outer_src),
        addr4(&be.addr),
        EthAddrs::of_backend(be),
    );
    Ok(send(ctx, be.ifindex))
}

/// Whether the client set Don't Fragment (so it will act on ICMP too-big).
#[inline(always)]
fn dont_fragment(h: Bytes<HDRS_LEN>) -> bool {
    u16::from_be(h.u16::<IP_FRAG>()) & IPV4_DF != 0
}

/// XDP_TX when the next hop is out of the port the packet came in on.
#[inline(always)]
fn send(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex as usize == ctx.ingress_ifindex() {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// The outer destination and source MACs as the four words `write_outer`
/// stores at frame offsets 0, 2, 6 and 10.
struct EthAddrs(u16, u32, u32, u16);

impl EthAddrs {
    #[inline(always)]
    fn new(dst: &[u8; 6], src: &[u8; 6]) -> Self {
        let (d, s) = (dst, src);
        EthAddrs(
            u16::from_ne_bytes([d[0], d[1]]),
            u32::from_ne_bytes([d[2], d[3], d[4], d[5]]),
            u32::from_ne_bytes([s[0], s[1], s[2], s[3]]),
            u16::from_ne_bytes([s[4], s[5]]),
        )
    }

    /// From the backend's cached next hop, as four aligned loads: the
    /// source MAC sits at offset 40 of the map value, the destination at 46.
    #[inline(always)]
    fn of_backend(be: &Backend) -> Self {
        const {
            assert!(core::mem::offset_of!(Backend, src_mac) == 40);
            assert!(core::mem::offset_of!(Backend, dst_mac) == 46);
        }
        EthAddrs(
            value_word::<_, u16, 46>(be),
            value_word::<_, u32, 48>(be),
            value_word::<_, u32, 40>(be),
            value_word::<_, u16, 44>(be),
        )
    }
}

/// Makes room for the outer IPv4 header. Returns the frame's first
/// `HDRS_LEN` bytes (there: the frame held that many before it grew): the
/// outer Ethernet and IPv4 headers to write, then the first word of the
/// inner IPv4 header.
#[inline(always)]
fn grow_for_ipip(ctx: &XdpContext) -> Result<Bytes<HDRS_LEN>, DropReason> {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_LEN as i32)) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    Bytes::at(ctx, 0).ok_or(DropReason::AdjustFailed)
}

/// Writes the outer Ethernet and IPv4 headers as words. TOS and length come
/// from the inner header, read here rather than carried across the helper
/// call that made room.
#[inline(always)]
fn write_outer(out: Bytes<HDRS_LEN>, src: [u8; 4], dst: [u8; 4], macs: EthAddrs) {
    const INNER: usize = ETH_LEN + IPV4_LEN;
    let tos = out.u8::<{ INNER + 1 }>();
    let inner_len = u16::from_be(out.u16::<{ INNER + 2 }>());
    let ip = ipip_outer_v4_words(src, dst, inner_len, tos);
    out.set_u16::<0>(macs.0);
    out.set_u32::<2>(macs.1);
    out.set_u32::<6>(macs.2);
    out.set_u16::<10>(macs.3);
    out.set_u16::<ETHERTYPE>(ETH_P_IPV4.to_be());
    out.set_u32::<ETH_LEN>(ip[0]);
    out.set_u32::<{ ETH_LEN + 4 }>(ip[1]);
    out.set_u32::<{ ETH_LEN + 8 }>(ip[2]);
    out.set_u32::<{ ETH_LEN + 12 }>(ip[3]);
    out.set_u32::<{ ETH_LEN + 16 }>(ip[4]);
}

/// What the encapsulation needs to know of the packet it wraps, read
/// before the frame is resized.
#[derive(Clone, Copy)]
struct Inner {
    /// Bytes of the IP packet, header included.
    len: u16,
    /// IPv4 TOS or IPv6 traffic class, copied to the outer header.
    tos: u8,
    /// The outer protocol / next header: `PROTO_IPIP` (IPv4 inside) or `PROTO_IPV6`.
    proto: u8,
    /// The outer IPv6 flow label.
    label: u32,
}

/// What `forward_slow` did: an XDP action (on its way, handed to the
/// kernel, or dropped with its reason counted), or `SENT_TOO_BIG | mtu`: too
/// big for the path to the backend, and the caller answers with the MTU left
/// for the client. Answering there, not in `forward_slow`, keeps the chain of
/// BPF calls, and so the stack, short. (A plain `u32`: see `action_of`.)
type Sent = u32;
const SENT_TOO_BIG: Sent = 1 << 16;

/// How a packet too big for the tunnel is answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TooBig {
    /// IPv4 with DF: ICMP fragmentation-needed.
    Icmp4,
    /// IPv4 without DF: the client would ignore ICMP; dropped.
    Icmp4NoDf,
    /// IPv6: ICMPv6 packet-too-big.
    Icmp6,
    /// An ICMP error being forwarded: never answered with ICMP; dropped.
    Never,
}

/// The verdict for what `forward_slow` returned: too big is answered as `how` says.
#[inline(always)]
fn verdict(ctx: &XdpContext, sent: Sent, how: TooBig) -> Result<u32, DropReason> {
    if sent & SENT_TOO_BIG != 0 {
        return answer_too_big(ctx, how, sent as u16);
    }
    Ok(sent)
}

/// Every encapsulation but IPv4 to a cached IPv4 next hop: to an IPv6
/// backend (4-in-6, 6-in-6) or an IPv4 one (6-in-4, quoted ICMP), through the
/// cached next hop, else the kernel's FIB (`bpf_fib_lookup`).
#[inline(never)]
fn forward_slow(ctx: &XdpContext, inner: &Inner, be: &Backend) -> Sent {
    action_of(try_forward_slow(ctx, inner, be))
}

#[inline(always)]
fn try_forward_slow(ctx: &XdpContext, inner: &Inner, be: &Backend) -> Result<Sent, DropReason> {
    let v6 = be.flags & backend_flags::IPV6 != 0;
    let hdr = outer_len(v6);
    if be.flags & backend_flags::NEXTHOP != 0 {
        if !encap_fits(inner.len, be.mtu, hdr) {
            return Ok(SENT_TOO_BIG | encap_client_mtu(be.mtu, hdr) as u32);
        }
        encap(ctx, inner, be, v6, Some(EthAddrs::of_backend(be)))?;
        return Ok(send(ctx, be.ifindex));
    }
    count(Counter::FibLookup);
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.l4_protocol = inner.proto;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_1.tot_len = inner.len.wrapping_add(hdr);
    if v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_2.flowinfo = (inner.label | (inner.tos as u32) << 20).to_be();
        p.__bindgen_anon_3.ipv6_src = [
            value_word::<_, u32, 16>(be),
            value_word::<_, u32, 20>(be),
            value_word::<_, u32, 24>(be),
            value_word::<_, u32, 28>(be),
        ];
        p.__bindgen_anon_4.ipv6_dst = [
            value_word::<_, u32, 0>(be),
            value_word::<_, u32, 4>(be),
            value_word::<_, u32, 8>(be),
            value_word::<_, u32, 12>(be),
        ];
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_2.tos = inner.tos;
        p.__bindgen_anon_3.ipv4_src = value_word::<_, u32, OUTER_SRC4>(be);
        p.__bindgen_anon_4.ipv4_dst = value_word::<_, u32, ADDR4>(be);
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_SUCCESS => {
            encap(ctx, inner, be, v6, Some(EthAddrs::new(&p.dmac, &p.smac)))?;
            Ok(send(ctx, p.ifindex))
        }
        // The MAC is unknown: hand the encapsulated packet to the kernel,
        // which resolves the neighbour. It keeps the frame's own Ethernet
        // addresses: sent to this host's MAC, the stack takes it as
        // PACKET_HOST and forwards it (any other destination MAC makes it
        // PACKET_OTHERHOST, which IPv4 and IPv6 input drop).
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_NO_NEIGH => {
            encap(ctx, inner, be, v6, KEEP_MACS)?;
            count(Counter::NexthopPass);
            Ok(xdp_action::XDP_PASS)
        }
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
            Ok(SENT_TOO_BIG | encap_client_mtu(mtu, hdr) as u32)
        }
        _ => Err(DropReason::NoRoute),
    }
}

/// `encap`'s MACs when the frame keeps its own Ethernet addresses.
const KEEP_MACS: Option<EthAddrs> = None;

/// Offsets of the IPv4 address inside the IPv4-mapped `Backend::addr` and
/// `Backend::outer_src`.
const ADDR4: usize = 12;
const OUTER_SRC4: usize = 16 + 12;

/// Grows the frame by the outer header and writes Ethernet and the outer
/// IPv4 or IPv6 header in front of the inner packet.
#[inline(always)]
fn encap(
    ctx: &XdpContext,
    inner: &Inner,
    be: &Backend,
    v6: bool,
    macs: Option<EthAddrs>,
) -> Result<(), DropReason> {
    let hdr = outer_len(v6) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -hdr) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    // Every packet here held at least an Ethernet and an IPv4 header and
    // 4 bytes of ports, so the grown frame holds Ethernet and an IPv6 header.
    let Some(out) = Bytes::<{ ETH_LEN + IPV6_LEN }>::at(ctx, 0) else {
        return Err(DropReason::AdjustFailed);
    };
    let macs = match macs {
        Some(m) => m,
        // The frame's Ethernet header now starts after the outer one.
        None if v6 => EthAddrs(
            out.u16::<40>(),
            out.u32::<42>(),
            out.u32::<46>(),
            out.u16::<50>(),
        ),
        None => EthAddrs(
            out.u16::<20>(),
            out.u32::<22>(),
            out.u32::<26>(),
            out.u16::<30>(),
        ),
    };
    out.set_u16::<0>(macs.0);
    out.set_u32::<2>(macs.1);
    out.set_u32::<6>(macs.2);
    out.set_u16::<10>(macs.3);
    if v6 {
        out.set_u16::<ETHERTYPE>(ETH_P_IPV6.to_be());
        let [w0, w1] = ipv6_head_words(inner.tos, inner.label, inner.len, inner.proto, OUTER_TTL);
        out.set_u32::<ETH_LEN>(w0);
        out.set_u32::<{ ETH_LEN + 4 }>(w1);
        out.set_u64::<{ ETH_LEN + 8 }>(value_word::<_, u64, 16>(be));
        out.set_u64::<{ ETH_LEN + 16 }>(value_word::<_, u64, 24>(be));
        out.set_u64::<{ ETH_LEN + 24 }>(value_word::<_, u64, 0>(be));
        out.set_u64::<{ ETH_LEN + 32 }>(value_word::<_, u64, 8>(be));
    } else {
        out.set_u16::<ETHERTYPE>(ETH_P_IPV4.to_be());
        let ip = ip4_outer_words(
            value_word::<_, u32, OUTER_SRC4>(be).to_ne_bytes(),
            value_word::<_, u32, ADDR4>(be).to_ne_bytes(),
            inner.len,
            inner.tos,
            inner.proto,
        );
        out.set_u32::<ETH_LEN>(ip[0]);
        out.set_u32::<{ ETH_LEN + 4 }>(ip[1]);
        out.set_u32::<{ ETH_LEN + 8 }>(ip[2]);
        out.set_u32::<{ ETH_LEN + 12 }>(ip[3]);
        out.set_u32::<{ ETH_LEN + 16 }>(ip[4]);
    }
    Ok(())
}

/// Answers a packet that does not fit the tunnel, as `how` says.
#[inline(always)]
fn answer_too_big(ctx: &XdpContext, how: TooBig, mtu: u16) -> Result<u32, DropReason> {
    match how {
        TooBig::Icmp4 => too_big(ctx, true, mtu),
        TooBig::Icmp4NoDf => Err(DropReason::TooBigNoDf),
        TooBig::Icmp6 => v6::too_big6(ctx, mtu),
        TooBig::Never => Err(DropReason::IcmpErrorTooBig),
    }
}

/// Answers the client with ICMP fragmentation-needed carrying `mtu`, from
/// the VIP, out of the port it came in on. Without DF the client's stack
/// would not act on it, so such packets are dropped and counted instead.
#[inline(never)]
fn too_big(ctx: &XdpContext, dont_fragment: bool, mtu: u16) -> Result<u32, DropReason> {
    if !dont_fragment {
        return Err(DropReason::TooBigNoDf);
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, ICMP_ANSWER_LEN as i32 - len) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    let Some(b) = Bytes::<ICMP_ANSWER_LEN>::at(ctx, 0) else {
        return Err(DropReason::AdjustFailed);
    };
    // Rewrite in place: [eth][ip][8 bytes of l4] becomes
    // [eth swapped][answer ip][icmp][quote of ip + 8 bytes of l4].
    // The quote goes after the ICMP header, so it is copied (and summed for
    // the ICMP checksum) before the headers overwrite what it quotes.
    const Q: usize = ETH_LEN + IPV4_LEN + ICMP_HDR_LEN;
    const _: () = assert!(Q == ETH_LEN + ICMP4_QUOTE_LEN && Q + ICMP4_QUOTE_LEN == ICMP_ANSWER_LEN);
    let (src, dst) = (
        b.u32::<IP_SRC>().to_ne_bytes(),
        b.u32::<IP_DST>().to_ne_bytes(),
    );
    let sum = quote4::<ETH_LEN, Q>(b)
        + quote4::<{ ETH_LEN + 4 }, { Q + 4 }>(b)
        + quote4::<{ ETH_LEN + 8 }, { Q + 8 }>(b)
        + quote4::<{ ETH_LEN + 12 }, { Q + 12 }>(b)
        + quote4::<{ ETH_LEN + 16 }, { Q + 16 }>(b)
        + quote4::<{ ETH_LEN + 20 }, { Q + 20 }>(b)
        + quote4::<{ ETH_LEN + 24 }, { Q + 24 }>(b);
    let ip = icmp4_frag_needed_ip(src, dst).emit_words();
    b.set_u32::<ETH_LEN>(ip[0]);
    b.set_u32::<{ ETH_LEN + 4 }>(ip[1]);
    b.set_u32::<{ ETH_LEN + 8 }>(ip[2]);
    b.set_u32::<{ ETH_LEN + 12 }>(ip[3]);
    b.set_u32::<{ ETH_LEN + 16 }>(ip[4]);
    let [i0, i1, i2, i3, i4, i5, i6, i7] = icmp4_frag_needed_hdr(mtu, sum);
    b.set_u32::<L4>(u32::from_ne_bytes([i0, i1, i2, i3]));
    b.set_u32::<{ L4 + 4 }>(u32::from_ne_bytes([i4, i5, i6, i7]));
    // Back to the client: swap the Ethernet addresses.
    let (d0, d1, s0, s1) = (b.u32::<0>(), b.u16::<4>(), b.u16::<6>(), b.u32::<8>());
    b.set_u16::<0>(s0);
    b.set_u32::<2>(s1);
    b.set_u32::<6>(d0);
    b.set_u16::<10>(d1);
    count(Counter::IcmpTooBig);
    Ok(xdp_action::XDP_TX)
}

/// The frame `too_big` sends: Ethernet and the whole ICMP answer.
const ICMP_ANSWER_LEN: usize = ETH_LEN + ICMP4_TOO_BIG_LEN;

/// Copies the 4 bytes at `FROM` to `TO`; returns their sum as two
/// big-endian 16-bit words.
#[inline(always)]
fn quote4<const FROM: usize, const TO: usize>(b: Bytes<ICMP_ANSWER_LEN>) -> u32 {
    let w = b.u32::<FROM>();
    b.set_u32::<TO>(w);
    let [x0, x1, x2, x3] = w.to_ne_bytes();
    u16::from_be_bytes([x0, x1]) as u32 + u16::from_be_bytes([x2, x3]) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
