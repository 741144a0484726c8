//! ICMP and ICMPv6 errors about a service flow. With direct server return
//! the backend's replies leave from the VIP, so a router that cannot deliver
//! one (too big for its next link, TTL exceeded, unreachable) answers to the
//! VIP, and that answer reaches the load balancer. The backend owns the
//! socket that must learn of it: the error is encapsulated, untouched, to the
//! backend that owns the quoted flow (conntrack, else the Maglev ring),
//! without creating or refreshing a conntrack entry.
//!
//! Only an error whose quote is a packet the VIP sent (quoted source = the
//! error's destination) from a service port, with an IPv4 header without
//! options or an IPv6 header without extension headers before TCP/UDP, is
//! taken; everything else ICMP (echo, neighbour discovery, router
//! advertisements, errors about other traffic) passes untouched.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    packet::{
        icmp4_is_error, icmp6_is_error, ETH_LEN, ICMP_HDR_LEN, IPV4_LEN, IPV4_MF, IPV4_OFFSET_MASK,
        IPV6_LEN,
    },
    Counter, DropReason, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP,
};

use crate::{
    action_of, count, count_traffic, flow_owner, forward_slow,
    ptr::Bytes,
    v6::{HDRS6_LEN, IP6_DST},
    verdict, FlowKey, FlowKey6, Inner, SvcKey, TooBig, IP_DST, IP_FRAG, IP_TOS, IP_TOT_LEN,
    IP_VIHL, L4, SVC_STATS,
};

/// Where the quoted IPv4 header starts, and what is read of the error:
/// through the quoted ports.
const Q4: usize = L4 + ICMP_HDR_LEN;
const ICMP4_READ: usize = Q4 + IPV4_LEN + 4;

/// An ICMPv4 packet (the caller saw protocol 1 in an IPv4 header): its XDP action.
#[inline(never)]
pub(crate) fn icmp4(ctx: &XdpContext) -> u32 {
    action_of(try_icmp4(ctx))
}

#[inline(always)]
fn try_icmp4(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(b) = Bytes::<ICMP4_READ>::at(ctx, 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let frag = u16::from_be(b.u16::<IP_FRAG>());
    let qfrag = u16::from_be(b.u16::<{ Q4 + 6 }>());
    let qproto = b.u8::<{ Q4 + 9 }>();
    if b.u8::<IP_VIHL>() != 0x45
        || frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0
        || !icmp4_is_error(b.u8::<L4>())
        || b.u8::<Q4>() != 0x45
        || qfrag & IPV4_OFFSET_MASK != 0
        || (qproto != PROTO_TCP && qproto != PROTO_UDP)
        || b.u32::<{ Q4 + 12 }>() != b.u32::<IP_DST>()
    {
        return Ok(xdp_action::XDP_PASS);
    }
    // The quoted packet went VIP:port → client: its source port names the service.
    let qports = b.u32::<{ Q4 + IPV4_LEN }>();
    let [s0, s1, _, _] = qports.to_ne_bytes();
    let key = SvcKey::v4(
        b.u32::<{ Q4 + 12 }>().to_ne_bytes(),
        u16::from_ne_bytes([s0, s1]),
        qproto,
    );
    let Some(svc) = crate::service(key) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let len = u16::from_be(b.u16::<IP_TOT_LEN>());
    count_traffic(&SVC_STATS, svc.id, len, false);
    if (len as usize) < IPV4_LEN || ctx.data() + ETH_LEN + len as usize > ctx.data_end() {
        return Err(DropReason::MalformedIp);
    }
    // The flow as the client sends it: addresses and ports swapped.
    let flow = FlowKey::new(
        b.u64::<{ Q4 + 12 }>().rotate_left(32),
        qports.rotate_left(16),
        qproto,
    );
    let inner = Inner {
        len,
        tos: b.u8::<IP_TOS>(),
        proto: PROTO_IPIP,
        label: flow.label(),
    };
    let be = flow_owner(svc, flow.get(), len)?;
    count(Counter::IcmpForward);
    verdict(ctx, forward_slow(ctx, &inner, be), TooBig::Never)
}

/// An ICMPv6 packet whose header is at `off` (after any extension headers):
/// its XDP action.
#[inline(never)]
pub(crate) fn icmp6(ctx: &XdpContext, off: usize) -> u32 {
    action_of(try_icmp6(ctx, off))
}

#[inline(always)]
fn try_icmp6(ctx: &XdpContext, off: usize) -> Result<u32, DropReason> {
    const Q: usize = ICMP_HDR_LEN;
    let (Some(h), Some(e)) = (
        Bytes::<HDRS6_LEN>::at(ctx, 0),
        Bytes::<{ Q + IPV6_LEN + 4 }>::at(ctx, off),
    ) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let qnh = e.u8::<{ Q + 6 }>();
    let qsrc = [e.u64::<{ Q + 8 }>(), e.u64::<{ Q + 16 }>()];
    if !icmp6_is_error(e.u8::<0>())
        || (qnh != PROTO_TCP && qnh != PROTO_UDP)
        || qsrc != [h.u64::<IP6_DST>(), h.u64::<{ IP6_DST + 8 }>()]
    {
        return Ok(xdp_action::XDP_PASS);
    }
    let qports = e.u32::<{ Q + IPV6_LEN }>();
    let [s0, s1, _, _] = qports.to_ne_bytes();
    let key = SvcKey::v6(qsrc, u16::from_ne_bytes([s0, s1]), qnh);
    let Some(svc) = crate::service(key) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let payload_len = u16::from_be(h.u16::<{ ETH_LEN + 4 }>()) as usize;
    let len = (IPV6_LEN + payload_len) as u16;
    count_traffic(&SVC_STATS, svc.id, len, false);
    if payload_len > u16::MAX as usize - IPV6_LEN
        || ctx.data() + HDRS6_LEN + payload_len > ctx.data_end()
    {
        return Err(DropReason::MalformedIp);
    }
    // The flow as the client sends it: client → VIP.
    let flow = FlowKey6::new(
        [
            e.u64::<{ Q + 24 }>(),
            e.u64::<{ Q + 32 }>(),
            qsrc[0],
            qsrc[1],
        ],
        qports.rotate_left(16),
        qnh,
    );
    let inner = Inner {
        len,
        tos: lb_common::packet::ipv6_tc(h.u8::<ETH_LEN>(), h.u8::<{ ETH_LEN + 1 }>()),
        proto: PROTO_IPV6,
        label: flow.label(),
    };
    let be = flow_owner(svc, flow.get(), len)?;
    count(Counter::IcmpForward);
    verdict(ctx, forward_slow(ctx, &inner, be), TooBig::Never)
}
