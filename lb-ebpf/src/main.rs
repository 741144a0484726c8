//! `mqlb`: the XDP load balancer. Parses IPv4 TCP/UDP, finds the service,
//! pins the flow to a backend (conntrack, else Maglev), wraps it in IPIP and
//! sends it out. Every decision is a call into `lb-common`.
#![no_std]
#![no_main]

mod ptr;

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
    backend_flags, ct_is_live,
    hash::{flow_hash_v4, ring_slot, tcp_syn_rehashes},
    packet::{
        icmp4_frag_needed_hdr, icmp4_frag_needed_ip, ipip_client_mtu, ipip_fits, ipip_outer_v4,
        ETH_LEN, ETH_P_IPV4, ICMP4_QUOTE_LEN, ICMP4_TOO_BIG_LEN, ICMP_HDR_LEN, IPV4_DF, IPV4_LEN,
        IPV4_MF, IPV4_OFFSET_MASK,
    },
    v4_mapped, Backend, Counter, CtEntry, DropReason, Flow4, HashMode, ServiceKey, ServiceValue,
    Traffic, CT_DEFAULT_ENTRIES, CT_REFRESH_NS, MAX_BACKENDS, MAX_SERVICES, PROTO_TCP, PROTO_UDP,
    RING_MAX,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use ptr::{ptr_at, ptr_at_mut};

/// `ServiceKey` → `ServiceValue`; written by the daemon; one entry per service.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// Maglev rings, two per service (A/B); slot → backend id; written by the daemon.
#[map]
static RINGS: Array<u32> = Array::with_max_entries(MAX_SERVICES * 2 * RING_MAX, 0);
/// backend id → `Backend` (address, cached next hop); written by the daemon.
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
/// IPv4 flow → `CtEntry`; written here; sized by the daemon at load.
#[map]
static CT4: LruHashMap<Flow4, CtEntry> = LruHashMap::with_max_entries(CT_DEFAULT_ENTRIES, 0);
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

const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;

#[xdp]
pub fn mqlb(ctx: XdpContext) -> u32 {
    count(Counter::Rx);
    let action = match try_mqlb(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            if let Some(n) = DROPS.get_ptr_mut(reason as u32) {
                unsafe { *n += 1 };
            }
            xdp_action::XDP_DROP
        }
    };
    count(match action {
        xdp_action::XDP_TX => Counter::Tx,
        xdp_action::XDP_REDIRECT => Counter::Redirect,
        xdp_action::XDP_DROP => Counter::Drop,
        _ => Counter::Pass,
    });
    action
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

/// The packet's fields mqlb decides on (IPv4; read before any rewrite).
struct Packet {
    flow: Flow4,
    tos: u8,
    total_len: u16,
    dont_fragment: bool,
    syn: bool,
}

fn try_mqlb(ctx: &XdpContext) -> Result<u32, DropReason> {
    // Anything we cannot read far enough to name a service is not ours.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if unsafe { (*eth).ether_type } != ETH_P_IPV4.to_be() {
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let ip = unsafe { &*ip };
    let proto = ip.proto as u8;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if (proto != PROTO_TCP && proto != PROTO_UDP) || ihl < IPV4_LEN {
        return Ok(xdp_action::XDP_PASS);
    }
    let frag = u16::from_be_bytes(ip.frags);
    // A non-first fragment carries no ports: it cannot be matched to a
    // service, so it is the kernel's (which drops it: the VIP is not local).
    if frag & IPV4_OFFSET_MASK != 0 {
        return Ok(xdp_action::XDP_PASS);
    }
    let l4 = ETH_LEN + (ihl & 0x3c);
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let ports = unsafe { *ports };
    let key = ServiceKey {
        addr: v4_mapped(ip.dst_addr),
        port_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        _pad: 0,
    };
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let total_len = u16::from_be_bytes(ip.tot_len);
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
    let syn = if proto == PROTO_TCP {
        let Some(flags) = ptr_at::<u8>(ctx, ETH_LEN + IPV4_LEN + TCP_FLAGS_OFF) else {
            return Err(DropReason::MalformedL4);
        };
        let flags = unsafe { *flags };
        tcp_syn_rehashes(flags & TCP_SYN != 0, flags & TCP_ACK != 0)
    } else {
        if ptr_at::<[u8; 8]>(ctx, ETH_LEN + IPV4_LEN).is_none() {
            return Err(DropReason::MalformedL4);
        }
        false
    };
    let pkt = Packet {
        flow: Flow4 {
            src: ip.src_addr,
            dst: ip.dst_addr,
            sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
            dport_be: key.port_be,
            proto,
            _pad: [0; 3],
        },
        tos: ip.tos,
        total_len,
        dont_fragment: frag & IPV4_DF != 0,
        syn,
    };
    let (id, backend) = pick_backend(svc, &pkt)?;
    forward(ctx, &pkt, id, backend)
}

/// Conntrack first (unless a SYN starts the flow over), else the Maglev ring.
#[inline(always)]
fn pick_backend(svc: &ServiceValue, pkt: &Packet) -> Result<(u32, &'static Backend), DropReason> {
    let udp = pkt.flow.proto == PROTO_UDP;
    let now = if udp {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if !pkt.syn {
        if let Some(ct) = CT4.get_ptr_mut(&pkt.flow) {
            let ct = unsafe { &mut *ct };
            if ct_is_live(pkt.flow.proto, ct.seen_ns, now, svc.udp_idle_s) {
                if udp && now.wrapping_sub(ct.seen_ns) > CT_REFRESH_NS {
                    ct.seen_ns = now;
                }
                let backend = backend(ct.backend)?;
                count(Counter::CtHit);
                count_traffic(&BE_STATS, ct.backend, pkt.total_len, false);
                return Ok((ct.backend, backend));
            }
        }
    }
    count(Counter::CtMiss);
    if svc.ring_size == 0 {
        return Err(DropReason::NoBackend);
    }
    let f = &pkt.flow;
    let hash = flow_hash_v4(
        svc.seed,
        HashMode::from_u8(svc.hash_mode),
        f.src,
        f.dst,
        u16::from_be(f.sport_be),
        u16::from_be(f.dport_be),
        f.proto,
    );
    let slot = svc.ring_base.wrapping_add(ring_slot(hash, svc.ring_size));
    let id = match RINGS.get(slot) {
        Some(&id) if id != 0 => id,
        _ => return Err(DropReason::NoBackend),
    };
    let backend = backend(id)?;
    let entry = CtEntry {
        backend: id,
        _pad: 0,
        seen_ns: now,
    };
    // An LRU insert cannot fail for lack of room; a failure here only costs
    // the next packet a second ring lookup, which picks the same backend.
    let _ = CT4.insert(&pkt.flow, &entry, 0);
    count_traffic(&BE_STATS, id, pkt.total_len, true);
    Ok((id, backend))
}

#[inline(always)]
fn backend(id: u32) -> Result<&'static Backend, DropReason> {
    match BACKENDS.get(id) {
        Some(b) if b.addr != [0u8; 16] => Ok(b),
        _ => Err(DropReason::BackendMissing),
    }
}

/// Where the encapsulated packet goes: the cached next hop, else the FIB.
struct NextHop {
    ifindex: u32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    /// The MAC is unknown: hand the encapsulated packet to the kernel.
    pass: bool,
}

#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, _id: u32, be: &Backend) -> Result<u32, DropReason> {
    let outer_dst = [be.addr[12], be.addr[13], be.addr[14], be.addr[15]];
    let outer_src = [
        be.outer_src[12],
        be.outer_src[13],
        be.outer_src[14],
        be.outer_src[15],
    ];
    let hop = if be.flags & backend_flags::NEXTHOP != 0 {
        if !ipip_fits(pkt.total_len, be.mtu) {
            return too_big(ctx, pkt, ipip_client_mtu(be.mtu));
        }
        NextHop {
            ifindex: be.ifindex,
            src_mac: be.src_mac,
            dst_mac: be.dst_mac,
            pass: false,
        }
    } else {
        match fib_next_hop(ctx, pkt, outer_src, outer_dst)? {
            Ok(hop) => hop,
            Err(mtu) => return too_big(ctx, pkt, ipip_client_mtu(mtu)),
        }
    };

    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_LEN as i32)) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    let Some(eth) = ptr_at_mut::<[u8; ETH_LEN]>(ctx, 0) else {
        return Err(DropReason::AdjustFailed);
    };
    let Some(outer) = ptr_at_mut::<[u8; IPV4_LEN]>(ctx, ETH_LEN) else {
        return Err(DropReason::AdjustFailed);
    };
    let t = ETH_P_IPV4.to_be_bytes();
    let (d, s) = (hop.dst_mac, hop.src_mac);
    unsafe {
        *eth = [
            d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5], t[0], t[1],
        ];
        *outer = ipip_outer_v4(outer_src, outer_dst, pkt.total_len, pkt.tos);
    }
    if hop.pass {
        count(Counter::NexthopPass);
        return Ok(xdp_action::XDP_PASS);
    }
    if hop.ifindex as usize == ctx.ingress_ifindex() {
        Ok(xdp_action::XDP_TX)
    } else {
        Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
    }
}

/// The kernel's FIB for a backend whose next hop the daemon has not cached.
/// `Ok(Err(mtu))`: the encapsulated packet would not fit that MTU.
#[inline(never)]
fn fib_next_hop(
    ctx: &XdpContext,
    pkt: &Packet,
    src: [u8; 4],
    dst: [u8; 4],
) -> Result<Result<NextHop, u16>, DropReason> {
    count(Counter::FibLookup);
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = lb_common::PROTO_IPIP;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_1.tot_len = pkt.total_len.wrapping_add(IPV4_LEN as u16);
    p.__bindgen_anon_2.tos = pkt.tos;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_SUCCESS => Ok(Ok(NextHop {
            ifindex: p.ifindex,
            src_mac: p.smac,
            dst_mac: p.dmac,
            pass: false,
        })),
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Ok(NextHop {
            ifindex: 0,
            src_mac: [0; 6],
            dst_mac: [0; 6],
            pass: true,
        })),
        aya_ebpf::bindings::BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            Ok(Err(unsafe { p.__bindgen_anon_1.mtu_result }))
        }
        _ => Err(DropReason::NoRoute),
    }
}

/// Answers the client with ICMP fragmentation-needed carrying `mtu`, from
/// the VIP, out of the port it came in on. Without DF the client's stack
/// would not act on it, so such packets are dropped and counted instead.
#[inline(never)]
fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<u32, DropReason> {
    if !pkt.dont_fragment {
        return Err(DropReason::TooBigNoDf);
    }
    let keep = (ETH_LEN + ICMP4_TOO_BIG_LEN) as i32;
    let len = (ctx.data_end() - ctx.data()) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep - len) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    // Rewrite in place: [eth][ip][8 bytes of l4] becomes
    // [eth swapped][answer ip][icmp][quote of ip + 8 bytes of l4].
    const ICMP_OFF: usize = ETH_LEN + IPV4_LEN;
    const QUOTE_OFF: usize = ICMP_OFF + ICMP_HDR_LEN;
    let (Some(eth), Some(orig), Some(quote)) = (
        ptr_at_mut::<[u8; ETH_LEN]>(ctx, 0),
        ptr_at::<[u8; ICMP4_QUOTE_LEN]>(ctx, ETH_LEN),
        ptr_at_mut::<[u16; ICMP4_QUOTE_LEN / 2]>(ctx, QUOTE_OFF),
    ) else {
        return Err(DropReason::AdjustFailed);
    };
    let (Some(out_ip), Some(out_icmp), Some(src), Some(dst)) = (
        ptr_at_mut::<[u8; IPV4_LEN]>(ctx, ETH_LEN),
        ptr_at_mut::<[u8; ICMP_HDR_LEN]>(ctx, ICMP_OFF),
        ptr_at::<[u8; 4]>(ctx, ETH_LEN + 12),
        ptr_at::<[u8; 4]>(ctx, ETH_LEN + 16),
    ) else {
        return Err(DropReason::AdjustFailed);
    };
    unsafe {
        let (src, dst) = (*src, *dst);
        core::ptr::copy_nonoverlapping(orig as *const u8, quote as *mut u8, ICMP4_QUOTE_LEN);
        let mut sum = 0u32;
        let mut i = 0;
        while i < ICMP4_QUOTE_LEN / 2 {
            sum += u16::from_be(core::ptr::read_unaligned(&(*quote)[i])) as u32;
            i += 1;
        }
        *out_ip = icmp4_frag_needed_ip(src, dst).emit();
        *out_icmp = icmp4_frag_needed_hdr(mtu, sum);
        let e = &mut *eth;
        let client_mac: [u8; 6] = [e[6], e[7], e[8], e[9], e[10], e[11]];
        e.copy_within(0..6, 6);
        e[..6].copy_from_slice(&client_mac);
    }
    count(Counter::IcmpTooBig);
    Ok(xdp_action::XDP_TX)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
