//! IPv6: the header walk, service lookup, conntrack (`CT6`), and the
//! ICMPv6 packet-too-big answer. Off the IPv4 path: IPv4 pays one branch on
//! the EtherType it already reads. The walk is inlined into `mqlb`; TCP/UDP
//! (`service6`) and ICMPv6 (`icmp::icmp6`) are BPF subprograms.
//!
//! Policy (decided in `lb_common::packet::ipv6_ext`, documented there):
//! up to `IPV6_MAX_EXT` extension headers are walked; hop-by-hop, destination
//! options, AH, routing with no segments left and atomic fragments are
//! skipped and the packet is forwarded whole. First fragments and routing
//! headers with segments left are counted drops when the packet is for a
//! service; later fragments, longer chains, ESP and unknown headers are
//! passed to the kernel untouched (no ports can be read: the packet cannot
//! be matched to a service). Neighbour discovery, router advertisements and
//! every ICMPv6 message that is not an error pass untouched.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    backend_flags,
    packet::{
        encap_client_mtu, encap_fits, icmp6_too_big_words, ipv6_ext, ipv6_head_words, ipv6_tc,
        outer_len, sum64, Ext6, ETH_LEN, ETH_P_IPV6, ICMP6_QUOTE_LEN, ICMP_HDR_LEN, IPV6_LEN,
        IPV6_MAX_EXT, IPV6_MIN_MTU, OUTER_TTL,
    },
    Backend, Counter, DropReason, PROTO_ICMPV6, PROTO_IPV6, PROTO_TCP,
};

use crate::{
    action_of, count, count_traffic, encap, forward_slow, icmp, pick_backend, ptr::Bytes, send,
    verdict, EthAddrs, FlowKey6, Inner, SvcKey, TooBig, SVC_STATS, TCP_ACK, TCP_FLAGS_OFF, TCP_SYN,
    UDP_HDR_LEN,
};

/// Ethernet and the fixed IPv6 header, read under one bounds check.
pub(crate) const HDRS6_LEN: usize = ETH_LEN + IPV6_LEN;
const IP6_VTC: usize = ETH_LEN;
const IP6_PLEN: usize = ETH_LEN + 4;
const IP6_NH: usize = ETH_LEN + 6;
pub(crate) const IP6_SRC: usize = ETH_LEN + 8;
pub(crate) const IP6_DST: usize = ETH_LEN + 24;

/// `::ffff:0:0/96` as the second memory-order word's low half: an IPv4-mapped
/// destination in an IPv6 packet must not match an IPv4 service's key.
const V4_MAPPED_HI: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv6 packet: its XDP action. The header walk is inlined into `mqlb`,
/// so TCP/UDP (`service6`) and ICMPv6 (`icmp6`) are one call deep: the
/// deepest chain of calls (`mqlb` → `service6` → `forward_slow`) must fit
/// the verifier's 512 bytes of stack for all frames together.
#[inline(always)]
pub(crate) fn mqlb6(ctx: &XdpContext) -> u32 {
    action_of(try_mqlb6(ctx))
}

#[inline(always)]
fn try_mqlb6(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(h) = Bytes::<HDRS6_LEN>::at(ctx, 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    // Walk the extension headers to the transport header. `l4` holds its
    // first 4 bytes (ports, or the ICMPv6 type), `off` its offset.
    let mut nh = h.u8::<IP6_NH>();
    let mut off = HDRS6_LEN;
    let mut pending: Option<DropReason> = None;
    let mut found = false;
    for _ in 0..=IPV6_MAX_EXT {
        let Some(e) = Bytes::<4>::at(ctx, off) else {
            return Ok(xdp_action::XDP_PASS);
        };
        let [b0, b1, b2, b3] = e.u32::<0>().to_ne_bytes();
        match ipv6_ext(nh, [b0, b1, b2, b3]) {
            Ext6::Upper => {
                found = true;
                break;
            }
            Ext6::Skip { len, next, drop } => {
                off += len as usize;
                nh = next;
                if pending.is_none() {
                    pending = drop;
                }
            }
            Ext6::Pass => return Ok(xdp_action::XDP_PASS),
        }
    }
    // A longer chain than we walk: no ports, not matchable; the kernel's.
    if !found {
        return Ok(xdp_action::XDP_PASS);
    }
    if nh == PROTO_ICMPV6 {
        if pending.is_some() {
            return Ok(xdp_action::XDP_PASS);
        }
        return Ok(icmp::icmp6(ctx, off));
    }
    Ok(service6(ctx, off, nh, pending))
}

/// TCP or UDP (`nh`) at `off`, after extension headers that left `pending`.
/// A subprogram of its own, next to `icmp6`: each keeps its keys on its
/// own stack frame, and the walk above stays small.
#[inline(never)]
fn service6(ctx: &XdpContext, off: usize, nh: u8, pending: Option<DropReason>) -> u32 {
    action_of(try_service6(ctx, off, nh, pending))
}

#[inline(always)]
fn try_service6(
    ctx: &XdpContext,
    off: usize,
    nh: u8,
    pending: Option<DropReason>,
) -> Result<u32, DropReason> {
    let (Some(h), Some(l4)) = (Bytes::<HDRS6_LEN>::at(ctx, 0), Bytes::<4>::at(ctx, off)) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let dst = [h.u64::<IP6_DST>(), h.u64::<{ IP6_DST + 8 }>()];
    if dst[0] == 0 && dst[1] as u32 == V4_MAPPED_HI {
        return Ok(xdp_action::XDP_PASS);
    }
    let ports = l4.u32::<0>();
    let [_, _, d0, d1] = ports.to_ne_bytes();
    let key = SvcKey::v6(dst, u16::from_ne_bytes([d0, d1]), nh);
    let Some(svc) = crate::service(key) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let payload_len = u16::from_be(h.u16::<IP6_PLEN>()) as usize;
    let len = (IPV6_LEN + payload_len) as u16;
    count_traffic(&SVC_STATS, svc.id, len, false);
    if let Some(reason) = pending {
        return Err(reason);
    }
    // A jumbogram (payload length 0) or a length beyond the frame.
    if payload_len > u16::MAX as usize - IPV6_LEN
        || off + UDP_HDR_LEN > HDRS6_LEN + payload_len
        || ctx.data() + HDRS6_LEN + payload_len > ctx.data_end()
    {
        return Err(DropReason::MalformedIp);
    }
    let syn = if nh == PROTO_TCP {
        let Some(t) = Bytes::<{ TCP_FLAGS_OFF + 1 }>::at(ctx, off) else {
            return Err(DropReason::MalformedL4);
        };
        let flags = t.u8::<TCP_FLAGS_OFF>();
        lb_common::hash::tcp_syn_rehashes(flags & TCP_SYN != 0, flags & TCP_ACK != 0)
    } else {
        if Bytes::<UDP_HDR_LEN>::at(ctx, off).is_none() {
            return Err(DropReason::MalformedL4);
        }
        false
    };
    let flow = FlowKey6::new(
        [
            h.u64::<IP6_SRC>(),
            h.u64::<{ IP6_SRC + 8 }>(),
            h.u64::<IP6_DST>(),
            h.u64::<{ IP6_DST + 8 }>(),
        ],
        ports,
        nh,
    );
    let be = pick_backend(svc, flow.get(), len, syn)?;
    let inner = Inner {
        len,
        tos: ipv6_tc(h.u8::<IP6_VTC>(), h.u8::<{ IP6_VTC + 1 }>()),
        proto: PROTO_IPV6,
        label: flow.label(),
    };
    forward6(ctx, &inner, be)
}

/// 6-in-6 to a cached next hop inline; anything else is `forward_slow`.
#[inline(always)]
fn forward6(ctx: &XdpContext, inner: &Inner, be: &Backend) -> Result<u32, DropReason> {
    const CACHED_V6: u8 = backend_flags::NEXTHOP | backend_flags::IPV6;
    if be.flags & CACHED_V6 != CACHED_V6 {
        return verdict(ctx, forward_slow(ctx, inner, be), TooBig::Icmp6);
    }
    let hdr = outer_len(true);
    if !encap_fits(inner.len, be.mtu, hdr) {
        return too_big6(ctx, encap_client_mtu(be.mtu, hdr));
    }
    encap(ctx, inner, be, true, Some(EthAddrs::of_backend(be)))?;
    Ok(send(ctx, be.ifindex))
}

/// Where the client's packet starts in the answer: after Ethernet, the
/// answer's IPv6 header and the ICMPv6 header.
const QUOTE: usize = ETH_LEN + IPV6_LEN + ICMP_HDR_LEN;
/// The quote is summed in pieces: `bpf_csum_diff` takes at most 512 bytes.
const QUOTE_A: usize = 512;
const QUOTE_B: usize = 512;
const QUOTE_C: usize = ICMP6_QUOTE_LEN - QUOTE_A - QUOTE_B;

/// Answers the client with ICMPv6 packet-too-big (RFC 4443) carrying `mtu`,
/// from the VIP, out of the port it came in on, quoting the first
/// `ICMP6_QUOTE_LEN` bytes of its packet (the answer is 1280 bytes, the
/// IPv6 minimum MTU). An MTU under 1280 would not be believed (RFC 8201):
/// such a backend path cannot carry this client's traffic; counted drop.
#[inline(never)]
pub(crate) fn too_big6(ctx: &XdpContext, mtu: u16) -> Result<u32, DropReason> {
    if mtu < IPV6_MIN_MTU {
        return Err(DropReason::MtuBelowIpv6Min);
    }
    // The packet is longer than `mtu` + 14 ≥ 1294 bytes, so cutting it to
    // Ethernet and the quote shrinks it; then room for the two new headers
    // in front. The client's packet stays where it is and becomes the quote.
    let len = (ctx.data_end() - ctx.data()) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (ETH_LEN + ICMP6_QUOTE_LEN) as i32 - len) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((IPV6_LEN + ICMP_HDR_LEN) as i32)) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    let (Some(a), Some(b), Some(c)) = (
        Bytes::<QUOTE_A>::at(ctx, QUOTE),
        Bytes::<QUOTE_B>::at(ctx, QUOTE + QUOTE_A),
        Bytes::<QUOTE_C>::at(ctx, QUOTE + QUOTE_A + QUOTE_B),
    ) else {
        return Err(DropReason::AdjustFailed);
    };
    let quote_sum = c.csum(b.csum(a.csum(0)));
    let Some(f) = Bytes::<{ QUOTE + IPV6_LEN }>::at(ctx, 0) else {
        return Err(DropReason::AdjustFailed);
    };
    // The client's addresses, from the quoted header; its Ethernet header
    // now sits just before the quote, inside what the new headers overwrite.
    const Q_SRC: usize = QUOTE + 8;
    const Q_DST: usize = QUOTE + 24;
    const OLD_ETH: usize = QUOTE - ETH_LEN;
    let (s0, s1) = (f.u64::<Q_SRC>(), f.u64::<{ Q_SRC + 8 }>());
    let (d0, d1) = (f.u64::<Q_DST>(), f.u64::<{ Q_DST + 8 }>());
    let (lb_mac0, lb_mac1) = (f.u32::<OLD_ETH>(), f.u16::<{ OLD_ETH + 4 }>());
    let (cl_mac0, cl_mac1) = (f.u16::<{ OLD_ETH + 6 }>(), f.u32::<{ OLD_ETH + 8 }>());
    let sum = sum64(s0) + sum64(s1) + sum64(d0) + sum64(d1) + quote_sum as u64;
    let [i0, i1] = icmp6_too_big_words(mtu, sum);
    let [w0, w1] = ipv6_head_words(
        0,
        0,
        (ICMP_HDR_LEN + ICMP6_QUOTE_LEN) as u16,
        PROTO_ICMPV6,
        OUTER_TTL,
    );
    // Back to the client: its MAC as destination, ours as source.
    f.set_u16::<0>(cl_mac0);
    f.set_u32::<2>(cl_mac1);
    f.set_u32::<6>(lb_mac0);
    f.set_u16::<10>(lb_mac1);
    f.set_u16::<12>(ETH_P_IPV6.to_be());
    f.set_u32::<ETH_LEN>(w0);
    f.set_u32::<{ ETH_LEN + 4 }>(w1);
    // From the VIP (the client's destination) to the client.
    f.set_u64::<IP6_SRC>(d0);
    f.set_u64::<{ IP6_SRC + 8 }>(d1);
    f.set_u64::<IP6_DST>(s0);
    f.set_u64::<{ IP6_DST + 8 }>(s1);
    f.set_u32::<HDRS6_LEN>(i0);
    f.set_u32::<{ HDRS6_LEN + 4 }>(i1);
    count(Counter::IcmpTooBig);
    Ok(xdp_action::XDP_TX)
}
