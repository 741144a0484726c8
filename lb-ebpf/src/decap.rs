//! `mqlb-decap`: runs on backend hosts. Strips the outer IPv4 or IPv6 header
//! of tunnelled packets (IPv4 or IPv6 inside: 4-in-4, 6-in-4, 4-in-6,
//! 6-in-6) addressed to one of this host's addresses (`DECAP_ADDRS`) and
//! passes the inner packet, addressed to the VIP on `lo`, to the stack.
//! Kernels without the ipip/ip6_tunnel modules need it; everything else
//! (an outer header with options or extension headers, a fragment, another
//! address) passes untouched.
#![no_std]
#![no_main]
// `asm!` on the BPF target (aya-ebpf enables the same feature): see `ptr.rs`.
#![feature(asm_experimental_arch)]

mod ptr;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    packet::{
        tunnel_inner_ethertype, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, IPV4_LEN, IPV4_MF,
        IPV4_OFFSET_MASK, IPV6_LEN,
    },
    Counter,
};
use ptr::Bytes;

/// Local address (IPv4-mapped for IPv4) → 1; outer destinations we decapsulate; written by `mqlb decap`.
#[map]
static DECAP_ADDRS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(256, 0);
/// `Counter` → packets, per CPU (`Rx`, `Decap`, `Pass`).
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Ethernet, the outer IPv4 header (no options) and the first byte of the
/// inner one: what is read before deciding, under one bounds check.
const HDRS_LEN: usize = ETH_LEN + IPV4_LEN + 1;
/// The same with an outer IPv6 header.
const HDRS6_LEN: usize = ETH_LEN + IPV6_LEN + 1;

#[xdp]
pub fn mqlb_decap(ctx: XdpContext) -> u32 {
    count(Counter::Rx);
    if try_decap(&ctx) {
        count(Counter::Decap);
    }
    count(Counter::Pass);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(n) = STATS.get_ptr_mut(c as u32) {
        unsafe { *n += 1 };
    }
}

/// An IPv4-mapped address key, as its two words in an 8-byte aligned slot
/// (built byte by byte, it costs a store per byte and a `memset` call).
#[repr(C, align(8))]
struct MappedV4([u64; 2]);

impl MappedV4 {
    #[inline(always)]
    fn new(addr: [u8; 4]) -> Self {
        let [a, b, c, d] = addr;
        MappedV4([0, u64::from_ne_bytes([0, 0, 0xff, 0xff, a, b, c, d])])
    }

    #[inline(always)]
    fn get(&self) -> &[u8; 16] {
        // SAFETY: same size, stricter alignment, any bytes are a valid `[u8; 16]`.
        unsafe { &*(self as *const Self as *const [u8; 16]) }
    }
}

/// An IPv6 address key, as its two memory-order words in an 8-byte aligned slot.
#[repr(C, align(8))]
struct Addr16([u64; 2]);

impl Addr16 {
    #[inline(always)]
    fn get(&self) -> &[u8; 16] {
        // SAFETY: same size, stricter alignment, any bytes are a valid `[u8; 16]`.
        unsafe { &*(self as *const Self as *const [u8; 16]) }
    }
}

/// Returns whether the packet was decapsulated.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> bool {
    // Shorter than an outer header and one inner byte: nothing to strip.
    let Some(h) = Bytes::<HDRS_LEN>::at(ctx, 0) else {
        return false;
    };
    if h.u16::<12>() != ETH_P_IPV4.to_be() {
        if h.u16::<12>() == ETH_P_IPV6.to_be() {
            return try_decap6(ctx);
        }
        return false;
    }
    let frag = u16::from_be(h.u16::<{ ETH_LEN + 6 }>());
    let Some(inner_type) = tunnel_inner_ethertype(h.u8::<{ ETH_LEN + 9 }>()) else {
        return false;
    };
    if h.u8::<ETH_LEN>() != 0x45 || frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return false;
    }
    let key = MappedV4::new(h.u32::<{ ETH_LEN + 16 }>().to_ne_bytes());
    if unsafe { DECAP_ADDRS.get(key.get()) }.is_none() {
        return false;
    }
    // The inner header must be what the outer one says before we commit.
    // The Ethernet addresses are read here, after the lookup: read before,
    // they would be spilled to the stack across the call.
    if h.u8::<{ ETH_LEN + IPV4_LEN }>() >> 4 != ip_version(inner_type) {
        return false;
    }
    strip::<IPV4_LEN>(ctx, h.u64::<0>(), h.u32::<8>(), inner_type)
}

/// The IP version an EtherType carries.
#[inline(always)]
fn ip_version(ethertype: u16) -> u8 {
    if ethertype == ETH_P_IPV6 {
        6
    } else {
        4
    }
}

/// An outer IPv6 header with the tunnel right behind it (no extension
/// headers: mqlb never sends any).
#[inline(never)]
fn try_decap6(ctx: &XdpContext) -> bool {
    let Some(h) = Bytes::<HDRS6_LEN>::at(ctx, 0) else {
        return false;
    };
    let Some(inner_type) = tunnel_inner_ethertype(h.u8::<{ ETH_LEN + 6 }>()) else {
        return false;
    };
    let key = Addr16([h.u64::<{ ETH_LEN + 24 }>(), h.u64::<{ ETH_LEN + 32 }>()]);
    if unsafe { DECAP_ADDRS.get(key.get()) }.is_none() {
        return false;
    }
    if h.u8::<{ ETH_LEN + IPV6_LEN }>() >> 4 != ip_version(inner_type) {
        return false;
    }
    strip::<IPV6_LEN>(ctx, h.u64::<0>(), h.u32::<8>(), inner_type)
}

/// Removes the `OUTER` bytes after the Ethernet header and rewrites the
/// Ethernet header (same addresses, the inner packet's EtherType).
#[inline(always)]
fn strip<const OUTER: usize>(
    ctx: &XdpContext,
    addrs_lo: u64,
    addrs_hi: u32,
    inner_type: u16,
) -> bool {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER as i32) } != 0 {
        return false;
    }
    let Some(eth) = Bytes::<ETH_LEN>::at(ctx, 0) else {
        return false;
    };
    eth.set_u64::<0>(addrs_lo);
    eth.set_u32::<8>(addrs_hi);
    eth.set_u16::<12>(inner_type.to_be());
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
