//! Baselines for `cargo xtask bench`: what any XDP program costs at least.
#![no_std]
#![no_main]
// `asm!` on the BPF target (aya-ebpf enables the same feature): see `ptr.rs`.
#![feature(asm_experimental_arch)]

mod ptr;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    packet::{ETH_LEN, IPV4_LEN},
    Backend, Counter, CtEntry, Flow4, ServiceKey, ServiceValue, Traffic, MAX_BACKENDS,
    MAX_SERVICES,
};
use ptr::Bytes;

/// The floor: an empty program.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The least a forwarder does: swap the MACs and send the frame back.
#[xdp]
pub fn xdp_swap_tx(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let eth = start as *mut [u8; 12];
    unsafe {
        let e = *eth;
        *eth = [
            e[6], e[7], e[8], e[9], e[10], e[11], e[0], e[1], e[2], e[3], e[4], e[5],
        ];
    }
    xdp_action::XDP_TX
}

// The maps `xdp_calls_floor` touches: mqlb's names and layouts, so a
// benchmark fills them as it fills mqlb's (conntrack kept small).
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static CT4: LruHashMap<Flow4, CtEntry> = LruHashMap::with_max_entries(4096, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static SVC_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
static BE_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

const XDP_TX: u32 = xdp_action::XDP_TX;

/// mqlb's kernel calls and map accesses with none of its logic: what its
/// paths cost at least with this design. Not a service: rx, the service
/// lookup (a miss), pass. Established flow: rx, the service lookup, its
/// counters, the conntrack lookup, the backend entry, its counters, room for
/// the outer header (one word written), tx. Keys are taken from the packet
/// without any check beyond the bounds the verifier needs.
#[xdp]
pub fn xdp_calls_floor(ctx: XdpContext) -> u32 {
    bump(Counter::Rx);
    let action = calls(&ctx);
    bump(if action == XDP_TX {
        Counter::Tx
    } else {
        Counter::Pass
    });
    action
}

#[inline(always)]
fn calls(ctx: &XdpContext) -> u32 {
    let Some(h) = Bytes::<{ ETH_LEN + IPV4_LEN + 4 }>::at(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let [d0, d1, d2, d3] = h.u32::<30>().to_ne_bytes();
    let [s0, s1, p0, p1] = h.u32::<34>().to_ne_bytes();
    let proto = h.u8::<23>();
    let key = Key([
        0,
        u64::from_ne_bytes([0, 0, 0xff, 0xff, d0, d1, d2, d3]),
        u64::from_ne_bytes([p0, p1, proto, 0, 0, 0, 0, 0]),
    ]);
    // SAFETY: 24 bytes, 8-byte aligned, any bytes are a valid key.
    let Some(svc) = (unsafe { SERVICES.get(&*(&key as *const Key as *const ServiceKey)) }) else {
        return xdp_action::XDP_PASS;
    };
    traffic(&SVC_STATS, svc.id);
    let flow = Key([
        h.u64::<26>(),
        u64::from_ne_bytes([s0, s1, p0, p1, proto, 0, 0, 0]),
        0,
    ]);
    // SAFETY: as above.
    let Some(ct) = CT4.get_ptr_mut(unsafe { &*(&flow as *const Key as *const Flow4) }) else {
        return xdp_action::XDP_PASS;
    };
    let id = unsafe { (*ct).backend };
    if BACKENDS.get(id).is_none() {
        return xdp_action::XDP_PASS;
    }
    bump(Counter::CtHit);
    traffic(&BE_STATS, id);
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_LEN as i32)) } != 0 {
        return xdp_action::XDP_DROP;
    }
    let Some(out) = Bytes::<ETH_LEN>::at(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    out.set_u32::<0>(0);
    XDP_TX
}

#[repr(C, align(8))]
struct Key([u64; 3]);

#[inline(always)]
fn bump(c: Counter) {
    if let Some(n) = STATS.get_ptr_mut(c as u32) {
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn traffic(map: &PerCpuArray<Traffic>, id: u32) {
    if let Some(t) = map.get_ptr_mut(id) {
        unsafe {
            (*t).packets += 1;
            (*t).bytes += 1;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
