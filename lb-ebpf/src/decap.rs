//! `mqlb-decap`: runs on backend hosts. Strips the outer IPv4 header of IPIP
//! packets addressed to one of this host's addresses (`DECAP_ADDRS`) and
//! passes the inner packet, addressed to the VIP on `lo`, to the stack.
//! Kernels without the ipip module need it; everything else passes untouched.
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
    packet::{ETH_LEN, ETH_P_IPV4, IPV4_LEN, IPV4_MF, IPV4_OFFSET_MASK},
    v4_mapped, Counter, PROTO_IPIP,
};
use network_types::ip::Ipv4Hdr;
use ptr::{ptr_at, ptr_at_mut};

/// Local address (IPv4-mapped) → 1; outer destinations we decapsulate; written by `mqlb decap`.
#[map]
static DECAP_ADDRS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(256, 0);
/// `Counter` → packets, per CPU (`Rx`, `Decap`, `Pass`).
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

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

/// Returns whether the packet was decapsulated.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> bool {
    let Some(eth) = ptr_at::<[u8; ETH_LEN]>(ctx, 0) else {
        return false;
    };
    let eth = unsafe { *eth };
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IPV4 {
        return false;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return false;
    };
    let ip = unsafe { &*ip };
    let frag = u16::from_be_bytes(ip.frags);
    if ip.proto as u8 != PROTO_IPIP || ip.vihl != 0x45 || frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return false;
    }
    if unsafe { DECAP_ADDRS.get(&v4_mapped(ip.dst_addr)) }.is_none() {
        return false;
    }
    // The inner header must be there and be IPv4 before we commit.
    let Some(inner) = ptr_at::<u8>(ctx, ETH_LEN + IPV4_LEN) else {
        return false;
    };
    if unsafe { *inner } >> 4 != 4 {
        return false;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_LEN as i32) } != 0 {
        return false;
    }
    let Some(new_eth) = ptr_at_mut::<[u8; ETH_LEN]>(ctx, 0) else {
        return false;
    };
    unsafe { *new_eth = eth };
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
