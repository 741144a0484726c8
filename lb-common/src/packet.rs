//! Header bytes the data plane writes, as pure functions (smoltcp-style repr
//! parse/emit over fixed-size arrays, so the eBPF compiler can unroll them).

use crate::counters::DropReason;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const ICMP_HDR_LEN: usize = 8;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv4 flags/fragment-offset field: Don't Fragment.
pub const IPV4_DF: u16 = 0x4000;
/// IPv4 flags/fragment-offset field: More Fragments.
pub const IPV4_MF: u16 = 0x2000;
/// IPv4 flags/fragment-offset field: the 13-bit offset.
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// TTL of headers the load balancer originates (outer IPIP, ICMP answers).
pub const OUTER_TTL: u8 = 64;
/// The smallest MTU every IPv6 link has (RFC 8200).
pub const IPV6_MIN_MTU: u16 = 1280;
/// Bytes of the client's packet an ICMP too-big quotes after its IPv4 header
/// (RFC 792: "64 bits of data"; enough for ports and the TCP sequence number).
pub const ICMP_QUOTE_L4: usize = 8;
/// Size of the whole IPv4 part of an ICMP fragmentation-needed answer.
pub const ICMP4_TOO_BIG_LEN: usize = IPV4_LEN + ICMP_HDR_LEN + IPV4_LEN + ICMP_QUOTE_L4;

/// Why a header could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than the header needs.
    Truncated,
    /// Version, header length or total length do not add up.
    Malformed,
}

/// One's-complement sum folded to 16 bits and inverted (RFC 1071).
#[inline(always)]
pub const fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Unfolded one's-complement sum of the big-endian 16-bit words of `b`
/// (an odd trailing byte is padded with zero).
#[inline(always)]
pub fn csum_add(mut sum: u32, b: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        sum += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    if i < b.len() {
        sum += (b[i] as u32) << 8;
    }
    sum
}

/// An IPv4 header without options, as mqlb reads and writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ipv4Repr {
    pub tos: u8,
    pub total_len: u16,
    pub ident: u16,
    /// Flags and fragment offset, host order (`IPV4_DF`, `IPV4_MF`, offset).
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Repr {
    /// Reads a header; options are skipped (their length is returned).
    pub fn parse(b: &[u8]) -> Result<(Ipv4Repr, usize), ParseError> {
        if b.len() < IPV4_LEN {
            return Err(ParseError::Truncated);
        }
        let ihl = ((b[0] & 0x0f) as usize) * 4;
        let total_len = u16::from_be_bytes([b[2], b[3]]);
        if b[0] >> 4 != 4 || ihl < IPV4_LEN || (total_len as usize) < ihl {
            return Err(ParseError::Malformed);
        }
        if b.len() < ihl {
            return Err(ParseError::Truncated);
        }
        let repr = Ipv4Repr {
            tos: b[1],
            total_len,
            ident: u16::from_be_bytes([b[4], b[5]]),
            frag: u16::from_be_bytes([b[6], b[7]]),
            ttl: b[8],
            proto: b[9],
            src: [b[12], b[13], b[14], b[15]],
            dst: [b[16], b[17], b[18], b[19]],
        };
        Ok((repr, ihl - IPV4_LEN))
    }

    /// Whether this header is any fragment but a whole datagram.
    pub const fn is_fragment(&self) -> bool {
        self.frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0
    }

    /// Writes the 20-byte header with a correct checksum. The sum is taken
    /// over the fields, not the bytes, so the eBPF build keeps it in registers.
    #[inline(always)]
    pub fn emit(&self) -> [u8; IPV4_LEN] {
        let sum = 0x4500
            + self.tos as u32
            + self.total_len as u32
            + self.ident as u32
            + self.frag as u32
            + (((self.ttl as u32) << 8) | self.proto as u32)
            + sum4(self.src)
            + sum4(self.dst);
        let c = csum_fold(sum).to_be_bytes();
        let len = self.total_len.to_be_bytes();
        let id = self.ident.to_be_bytes();
        let frag = self.frag.to_be_bytes();
        let (s, d) = (self.src, self.dst);
        [
            0x45, self.tos, len[0], len[1], id[0], id[1], frag[0], frag[1], self.ttl, self.proto,
            c[0], c[1], s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3],
        ]
    }
}

impl Ipv4Repr {
    /// The same 20 bytes as [`Ipv4Repr::emit`], as five 32-bit words in
    /// memory order: storing word `i` as is (native byte order) at byte `4 * i`
    /// writes the header. This is how the eBPF build writes it, five stores
    /// instead of twenty. The checksum is summed over the native-order words
    /// (RFC 1071: the sum does not depend on byte order) and folded once.
    #[inline(always)]
    pub const fn emit_words(&self) -> [u32; 5] {
        let len = self.total_len.to_be_bytes();
        let id = self.ident.to_be_bytes();
        let frag = self.frag.to_be_bytes();
        let w0 = u32::from_ne_bytes([0x45, self.tos, len[0], len[1]]);
        let w1 = u32::from_ne_bytes([id[0], id[1], frag[0], frag[1]]);
        let w2 = u32::from_ne_bytes([self.ttl, self.proto, 0, 0]);
        let w3 = u32::from_ne_bytes(self.src);
        let w4 = u32::from_ne_bytes(self.dst);
        let sum = w0 as u64 + w1 as u64 + w2 as u64 + w3 as u64 + w4 as u64;
        let c = csum_fold64(sum).to_ne_bytes();
        let w2 = u32::from_ne_bytes([self.ttl, self.proto, c[0], c[1]]);
        [w0, w1, w2, w3, w4]
    }
}

/// One's-complement sum of 32-bit words accumulated in a u64, folded to 16
/// bits and inverted: the checksum in the byte order the words were summed in.
#[inline(always)]
pub const fn csum_fold64(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    csum_fold(s as u32)
}

/// [`ipip_outer_v4`] as the five memory-order words of [`Ipv4Repr::emit_words`].
#[inline(always)]
pub const fn ipip_outer_v4_words(
    src: [u8; 4],
    dst: [u8; 4],
    inner_len: u16,
    inner_tos: u8,
) -> [u32; 5] {
    ipip_outer_repr(src, dst, inner_len, inner_tos).emit_words()
}

/// One's-complement partial sum of four bytes as two big-endian words.
#[inline(always)]
const fn sum4(b: [u8; 4]) -> u32 {
    (((b[0] as u32) << 8) | b[1] as u32) + (((b[2] as u32) << 8) | b[3] as u32)
}

/// Outer header of IPv4-in-IPv4 for an inner packet of `inner_len` bytes.
/// DSCP/ECN are copied from the inner header (RFC 6040 normal mode); DF is set
/// so a too-small path answers with ICMP instead of fragmenting.
#[inline(always)]
pub fn ipip_outer_v4(src: [u8; 4], dst: [u8; 4], inner_len: u16, inner_tos: u8) -> [u8; IPV4_LEN] {
    ipip_outer_repr(src, dst, inner_len, inner_tos).emit()
}

#[inline(always)]
const fn ipip_outer_repr(src: [u8; 4], dst: [u8; 4], inner_len: u16, inner_tos: u8) -> Ipv4Repr {
    Ipv4Repr {
        tos: inner_tos,
        total_len: inner_len.wrapping_add(IPV4_LEN as u16),
        ident: 0,
        frag: IPV4_DF,
        ttl: OUTER_TTL,
        proto: crate::maps::PROTO_IPIP,
        src,
        dst,
    }
}

/// Whether an inner IPv4 packet of `inner_len` bytes still fits `mtu` once
/// encapsulated in IPv4.
#[inline(always)]
pub const fn ipip_fits(inner_len: u16, mtu: u16) -> bool {
    encap_fits(inner_len, mtu, IPV4_LEN as u16)
}

/// The MTU to advertise to a client whose path continues through an IPIP
/// tunnel over a link of `egress_mtu`.
#[inline(always)]
pub const fn ipip_client_mtu(egress_mtu: u16) -> u16 {
    encap_client_mtu(egress_mtu, IPV4_LEN as u16)
}

/// Bytes of the client's packet an ICMP too-big quotes: its IPv4 header
/// (without options) and the first transport bytes.
pub const ICMP4_QUOTE_LEN: usize = IPV4_LEN + ICMP_QUOTE_L4;

/// The IPv4 header of a fragmentation-needed answer to a client that sent
/// `client_src` → `client_dst`: it comes from the address the client wrote
/// to (the VIP), so the client's stack matches it to its socket.
#[inline(always)]
pub const fn icmp4_frag_needed_ip(client_src: [u8; 4], client_dst: [u8; 4]) -> Ipv4Repr {
    Ipv4Repr {
        tos: 0,
        total_len: ICMP4_TOO_BIG_LEN as u16,
        ident: 0,
        frag: 0,
        ttl: OUTER_TTL,
        proto: crate::maps::PROTO_ICMP,
        src: client_dst,
        dst: client_src,
    }
}

/// The 8-byte ICMP header of a fragmentation-needed (type 3, code 4,
/// RFC 1191) message advertising `next_hop_mtu`, given `quote_sum`, the
/// unfolded one's-complement sum of the quoted bytes that follow it.
#[inline(always)]
pub const fn icmp4_frag_needed_hdr(next_hop_mtu: u16, quote_sum: u32) -> [u8; ICMP_HDR_LEN] {
    let c = csum_fold(0x0304 + next_hop_mtu as u32 + (quote_sum & 0xffff) + (quote_sum >> 16))
        .to_be_bytes();
    let mtu = next_hop_mtu.to_be_bytes();
    [3, 4, c[0], c[1], 0, 0, mtu[0], mtu[1]]
}

/// The whole IPv4 part of a fragmentation-needed answer quoting `quoted`
/// (the client's IPv4 header and first 8 transport bytes).
pub fn icmp4_frag_needed(
    quoted: &[u8; ICMP4_QUOTE_LEN],
    next_hop_mtu: u16,
) -> [u8; ICMP4_TOO_BIG_LEN] {
    let src = [quoted[12], quoted[13], quoted[14], quoted[15]];
    let dst = [quoted[16], quoted[17], quoted[18], quoted[19]];
    let mut out = [0u8; ICMP4_TOO_BIG_LEN];
    out[..IPV4_LEN].copy_from_slice(&icmp4_frag_needed_ip(src, dst).emit());
    out[IPV4_LEN..IPV4_LEN + ICMP_HDR_LEN]
        .copy_from_slice(&icmp4_frag_needed_hdr(next_hop_mtu, csum_add(0, quoted)));
    out[IPV4_LEN + ICMP_HDR_LEN..].copy_from_slice(quoted);
    out
}

/// The outer IPv4 header of a tunnel carrying `proto` ([`PROTO_IPIP`] for
/// IPv4, [`PROTO_IPV6`] for IPv6 inside), as the five memory-order words of
/// [`Ipv4Repr::emit_words`]. TOS copied from the inner packet, DF set.
///
/// [`PROTO_IPIP`]: crate::maps::PROTO_IPIP
/// [`PROTO_IPV6`]: crate::maps::PROTO_IPV6
#[inline(always)]
pub const fn ip4_outer_words(
    src: [u8; 4],
    dst: [u8; 4],
    inner_len: u16,
    inner_tos: u8,
    proto: u8,
) -> [u32; 5] {
    let mut r = ipip_outer_repr(src, dst, inner_len, inner_tos);
    r.proto = proto;
    r.emit_words()
}

// ---------------------------------------------------------------- IPv6

/// An IPv6 fixed header, as mqlb reads and writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ipv6Repr {
    /// Traffic class (DSCP and ECN).
    pub tc: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl Ipv6Repr {
    /// Reads the 40-byte fixed header (extension headers are the caller's).
    pub fn parse(b: &[u8]) -> Result<Ipv6Repr, ParseError> {
        if b.len() < IPV6_LEN {
            return Err(ParseError::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(ParseError::Malformed);
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&b[8..24]);
        dst.copy_from_slice(&b[24..40]);
        Ok(Ipv6Repr {
            tc: ipv6_tc(b[0], b[1]),
            flow_label: u32::from_be_bytes([0, b[1] & 0x0f, b[2], b[3]]),
            payload_len: u16::from_be_bytes([b[4], b[5]]),
            next_header: b[6],
            hop_limit: b[7],
            src,
            dst,
        })
    }

    /// Writes the 40-byte header.
    pub fn emit(&self) -> [u8; IPV6_LEN] {
        let mut out = [0u8; IPV6_LEN];
        let [w0, w1] = ipv6_head_words(
            self.tc,
            self.flow_label,
            self.payload_len,
            self.next_header,
            self.hop_limit,
        );
        out[0..4].copy_from_slice(&w0.to_ne_bytes());
        out[4..8].copy_from_slice(&w1.to_ne_bytes());
        out[8..24].copy_from_slice(&self.src);
        out[24..40].copy_from_slice(&self.dst);
        out
    }
}

/// The traffic class of an IPv6 header from its first two bytes.
#[inline(always)]
pub const fn ipv6_tc(b0: u8, b1: u8) -> u8 {
    (b0 << 4) | (b1 >> 4)
}

/// The first two 32-bit words of an IPv6 header (version, traffic class,
/// flow label; payload length, next header, hop limit) in memory order:
/// storing word `i` as is at byte `4 * i` writes them. The addresses follow.
#[inline(always)]
pub const fn ipv6_head_words(
    tc: u8,
    flow_label: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
) -> [u32; 2] {
    let fl = flow_label.to_be_bytes();
    let len = payload_len.to_be_bytes();
    [
        u32::from_ne_bytes([0x60 | (tc >> 4), (tc << 4) | (fl[1] & 0x0f), fl[2], fl[3]]),
        u32::from_ne_bytes([len[0], len[1], next_header, hop_limit]),
    ]
}

/// The outer IPv6 header of a tunnel to a backend, carrying an inner packet
/// of `inner_len` bytes (`next_header` [`PROTO_IPIP`] for IPv4 inside,
/// [`PROTO_IPV6`] for IPv6): traffic class copied from the inner packet
/// (RFC 6040 normal mode), `flow_label` derived from the inner flow
/// (RFC 6438), hop limit [`OUTER_TTL`].
///
/// [`PROTO_IPIP`]: crate::maps::PROTO_IPIP
/// [`PROTO_IPV6`]: crate::maps::PROTO_IPV6
pub fn ip6_outer(
    src: [u8; 16],
    dst: [u8; 16],
    inner_len: u16,
    next_header: u8,
    inner_tc: u8,
    flow_label: u32,
) -> [u8; IPV6_LEN] {
    Ipv6Repr {
        tc: inner_tc,
        flow_label: flow_label & 0xf_ffff,
        payload_len: inner_len,
        next_header,
        hop_limit: OUTER_TTL,
        src,
        dst,
    }
    .emit()
}

/// Length of the outer header of a tunnel: IPv6 or IPv4.
#[inline(always)]
pub const fn outer_len(ipv6: bool) -> u16 {
    if ipv6 {
        IPV6_LEN as u16
    } else {
        IPV4_LEN as u16
    }
}

/// Whether an inner packet of `inner_len` bytes still fits `mtu` under an
/// outer header of `outer_len` bytes.
#[inline(always)]
pub const fn encap_fits(inner_len: u16, mtu: u16, outer_len: u16) -> bool {
    inner_len as u32 + outer_len as u32 <= mtu as u32
}

/// The MTU to advertise to a client whose path continues through a tunnel
/// with an outer header of `outer_len` bytes over a link of `egress_mtu`.
#[inline(always)]
pub const fn encap_client_mtu(egress_mtu: u16, outer_len: u16) -> u16 {
    egress_mtu.saturating_sub(outer_len)
}

/// How many IPv6 extension headers mqlb walks to find the transport header.
/// RFC 8200's recommended order has at most hop-by-hop, destination options,
/// routing and fragment before it; a longer chain is passed to the kernel
/// untouched (its ports are never guessed).
pub const IPV6_MAX_EXT: usize = 4;

/// IPv6 extension header numbers mqlb knows (RFC 8200, RFC 4302).
pub mod ext6 {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTH: u8 = 51;
    pub const DEST_OPTS: u8 = 60;
}

/// What the IPv6 parser does with the header that `next_header` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext6 {
    /// TCP, UDP or ICMPv6: the header mqlb reads.
    Upper,
    /// An extension header of `len` bytes followed by `next`. If the packet
    /// turns out to be for a service it is dropped with `drop`, if set.
    Skip {
        len: u16,
        next: u8,
        drop: Option<DropReason>,
    },
    /// Nothing mqlb can read ports from (a later fragment, ESP, no next
    /// header, an unknown header): the packet passes untouched.
    Pass,
}

/// The step of the IPv6 header walk for the header `next_header` names,
/// given its first 4 bytes (`b[0]` next header, `b[1]` length; for a
/// routing header `b[3]` segments left; for a fragment `b[2..4]` offset and
/// M flag). Policy:
/// - hop-by-hop, destination options, authentication: skipped;
/// - routing with no segments left: skipped; with segments left the VIP is
///   not the final destination: [`DropReason::Ipv6ExtHeader`] if for a service;
/// - fragment: an atomic one (offset 0, no M) is skipped; a first fragment
///   is [`DropReason::Ipv6Fragment`] if for a service (as IPv4: a flow's
///   fragments would split between backends); a later one has no ports and passes.
pub const fn ipv6_ext(next_header: u8, b: [u8; 4]) -> Ext6 {
    use crate::maps::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
    let len8 = (b[1] as u16 + 1) * 8;
    match next_header {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => Ext6::Upper,
        ext6::HOP_BY_HOP | ext6::DEST_OPTS => Ext6::Skip {
            len: len8,
            next: b[0],
            drop: None,
        },
        ext6::AUTH => Ext6::Skip {
            len: (b[1] as u16 + 2) * 4,
            next: b[0],
            drop: None,
        },
        ext6::ROUTING => Ext6::Skip {
            len: len8,
            next: b[0],
            drop: if b[3] != 0 {
                Some(DropReason::Ipv6ExtHeader)
            } else {
                None
            },
        },
        ext6::FRAGMENT => {
            let off_m = u16::from_be_bytes([b[2], b[3]]);
            if off_m & 0xfff8 != 0 {
                Ext6::Pass
            } else {
                Ext6::Skip {
                    len: 8,
                    next: b[0],
                    drop: if off_m & 1 != 0 {
                        Some(DropReason::Ipv6Fragment)
                    } else {
                        None
                    },
                }
            }
        }
        _ => Ext6::Pass,
    }
}

// ---------------------------------------------------------------- ICMP

/// ICMP types that are errors quoting the packet that caused them: destination
/// unreachable (fragmentation-needed included), time exceeded, parameter
/// problem (RFC 792, RFC 1191).
#[inline(always)]
pub const fn icmp4_is_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 11 | 12)
}

/// ICMPv6 error types (RFC 4443): destination unreachable, packet too big, time
/// exceeded, parameter problem. Informational ones (echo, neighbour discovery,
/// router advertisements: 128 and up) are not.
#[inline(always)]
pub const fn icmp6_is_error(icmp_type: u8) -> bool {
    icmp_type >= 1 && icmp_type <= 4
}

/// Bytes of the client's packet an ICMPv6 packet-too-big quotes: as much as
/// fits in the IPv6 minimum MTU (RFC 4443 section 2.4 (c)).
pub const ICMP6_QUOTE_LEN: usize = IPV6_MIN_MTU as usize - IPV6_LEN - ICMP_HDR_LEN;
/// Size of the whole IPv6 packet-too-big answer.
pub const ICMP6_TOO_BIG_LEN: usize = IPV6_MIN_MTU as usize;

/// The IPv6 header of a packet-too-big answer to a client that sent
/// `client_src` → `client_dst`: from the address the client wrote to (the VIP).
pub const fn icmp6_too_big_ip(client_src: [u8; 16], client_dst: [u8; 16]) -> Ipv6Repr {
    Ipv6Repr {
        tc: 0,
        flow_label: 0,
        payload_len: (ICMP_HDR_LEN + ICMP6_QUOTE_LEN) as u16,
        next_header: crate::maps::PROTO_ICMPV6,
        hop_limit: OUTER_TTL,
        src: client_dst,
        dst: client_src,
    }
}

/// One's-complement sum of the two 32-bit halves of a 64-bit word (any byte
/// order, as long as every word of one sum is read alike).
#[inline(always)]
pub const fn sum64(w: u64) -> u64 {
    (w & 0xffff_ffff) + (w >> 32)
}

/// One's-complement sum of `b` (a multiple of 4 bytes long) as native-order
/// 32-bit words: what the eBPF build gets from word loads or `bpf_csum_diff`.
pub fn csum_ne(b: &[u8]) -> u64 {
    b.chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as u64)
        .sum()
}

/// The 8-byte ICMPv6 header of a packet-too-big (type 2, code 0, RFC 4443)
/// advertising `mtu`, as two memory-order words. `addrs_quote_sum` is the
/// native-order sum ([`csum_ne`], [`sum64`]) of the answer's source and
/// destination addresses and of the quote; the rest of the pseudo-header
/// (RFC 8200 section 8.1: length, next header 58) is added here.
#[inline(always)]
pub const fn icmp6_too_big_words(mtu: u16, addrs_quote_sum: u64) -> [u32; 2] {
    let len = ((ICMP_HDR_LEN + ICMP6_QUOTE_LEN) as u32).to_be_bytes();
    let pseudo = u32::from_ne_bytes(len) as u64
        + u32::from_ne_bytes([0, 0, 0, crate::maps::PROTO_ICMPV6]) as u64;
    let m = (mtu as u32).to_be_bytes();
    let mtu_w = u32::from_ne_bytes(m);
    let sum = addrs_quote_sum + pseudo + u32::from_ne_bytes([2, 0, 0, 0]) as u64 + mtu_w as u64;
    let c = csum_fold64(sum).to_ne_bytes();
    [u32::from_ne_bytes([2, 0, c[0], c[1]]), mtu_w]
}

/// The whole IPv6 packet-too-big answer quoting `quoted` (the first
/// [`ICMP6_QUOTE_LEN`] bytes of the client's IPv6 packet).
pub fn icmp6_too_big(quoted: &[u8; ICMP6_QUOTE_LEN], mtu: u16) -> [u8; ICMP6_TOO_BIG_LEN] {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&quoted[8..24]);
    dst.copy_from_slice(&quoted[24..40]);
    let ip = icmp6_too_big_ip(src, dst).emit();
    let sum = csum_ne(&ip[8..40]) + csum_ne(quoted);
    let [w0, w1] = icmp6_too_big_words(mtu, sum);
    let mut out = [0u8; ICMP6_TOO_BIG_LEN];
    out[..IPV6_LEN].copy_from_slice(&ip);
    out[IPV6_LEN..IPV6_LEN + 4].copy_from_slice(&w0.to_ne_bytes());
    out[IPV6_LEN + 4..IPV6_LEN + 8].copy_from_slice(&w1.to_ne_bytes());
    out[IPV6_LEN + ICMP_HDR_LEN..].copy_from_slice(quoted);
    out
}

/// The EtherType of the packet inside a tunnel whose outer header names
/// `proto` (IPv4 protocol or IPv6 next header), if it is one mqlb makes.
#[inline(always)]
pub const fn tunnel_inner_ethertype(proto: u8) -> Option<u16> {
    match proto {
        crate::maps::PROTO_IPIP => Some(ETH_P_IPV4),
        crate::maps::PROTO_IPV6 => Some(ETH_P_IPV6),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The worked example header from Wikipedia's "IPv4 header checksum" article.
    #[test]
    fn checksum_matches_known_header() {
        let h = hex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7");
        let (repr, opts) = Ipv4Repr::parse(&h).unwrap();
        assert_eq!(opts, 0);
        assert_eq!(repr.src, [192, 168, 0, 1]);
        assert_eq!(repr.total_len, 0x73);
        assert_eq!(repr.emit().as_slice(), h.as_slice());
        assert_eq!(csum_fold(csum_add(0, &h)), 0, "a valid header sums to zero");
    }

    #[test]
    fn parse_rejects_truncated_and_malformed() {
        let h = hex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7");
        assert_eq!(Ipv4Repr::parse(&h[..19]), Err(ParseError::Truncated));
        let mut bad = h.clone();
        bad[0] = 0x44;
        assert_eq!(Ipv4Repr::parse(&bad), Err(ParseError::Malformed));
        let mut opts = h.clone();
        opts[0] = 0x46;
        assert_eq!(Ipv4Repr::parse(&opts), Err(ParseError::Truncated));
        opts.extend_from_slice(&[1, 1, 1, 0]);
        assert_eq!(Ipv4Repr::parse(&opts).unwrap().1, 4);
    }

    #[test]
    fn fragments_are_recognised() {
        let mut r = Ipv4Repr {
            frag: IPV4_DF,
            ..Default::default()
        };
        assert!(!r.is_fragment());
        r.frag = IPV4_MF;
        assert!(r.is_fragment());
        r.frag = 185;
        assert!(r.is_fragment());
    }

    #[test]
    fn outer_header_bytes() {
        let h = ipip_outer_v4([10, 0, 0, 1], [10, 0, 1, 2], 60, 0xb8);
        let expect = hex("45b8 0050 0000 4000 4004 0000 0a00 0001 0a00 0102");
        assert_eq!(&h[..10], &expect[..10]);
        assert_eq!(&h[12..], &expect[12..]);
        assert_eq!(csum_fold(csum_add(0, &h)), 0);
        assert!(ipip_fits(1480, 1500));
        assert!(!ipip_fits(1481, 1500));
        assert_eq!(ipip_client_mtu(1500), 1480);
    }

    #[test]
    fn header_words_are_the_header_bytes() {
        // A simple LCG walks many headers, extreme sums included.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 32) as u32
        };
        for i in 0..10_000 {
            let r = if i == 0 {
                Ipv4Repr {
                    tos: 0xff,
                    total_len: 0xffff,
                    ident: 0xffff,
                    frag: 0xffff,
                    ttl: 0xff,
                    proto: 0xff,
                    src: [0xff; 4],
                    dst: [0xff; 4],
                }
            } else {
                Ipv4Repr {
                    tos: next() as u8,
                    total_len: next() as u16,
                    ident: next() as u16,
                    frag: next() as u16,
                    ttl: next() as u8,
                    proto: next() as u8,
                    src: next().to_be_bytes(),
                    dst: next().to_be_bytes(),
                }
            };
            let bytes: Vec<u8> = r
                .emit_words()
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            assert_eq!(bytes.as_slice(), r.emit().as_slice(), "{r:?}");
        }
        let (s, d) = ([10, 0, 0, 1], [10, 0, 1, 2]);
        let words = ipip_outer_v4_words(s, d, 60, 0xb8);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes.as_slice(), ipip_outer_v4(s, d, 60, 0xb8).as_slice());
    }

    #[test]
    fn frag_needed_quotes_and_sums() {
        let q = Ipv4Repr {
            total_len: 1500,
            frag: IPV4_DF,
            ttl: 63,
            proto: 6,
            src: [192, 0, 2, 10],
            dst: [198, 51, 100, 1],
            ..Default::default()
        }
        .emit();
        let l4 = [0x9c, 0x40, 0x16, 0x28, 0, 0, 0, 1];
        let mut quoted = [0u8; ICMP4_QUOTE_LEN];
        quoted[..20].copy_from_slice(&q);
        quoted[20..].copy_from_slice(&l4);
        let out = icmp4_frag_needed(&quoted, 1480);
        let (ip, _) = Ipv4Repr::parse(&out).unwrap();
        assert_eq!(ip.src, [198, 51, 100, 1]);
        assert_eq!(ip.dst, [192, 0, 2, 10]);
        assert_eq!(ip.proto, 1);
        assert_eq!(ip.total_len as usize, ICMP4_TOO_BIG_LEN);
        assert_eq!(csum_fold(csum_add(0, &out[..20])), 0);
        assert_eq!(&out[20..24], &[3, 4, out[22], out[23]]);
        assert_eq!(&out[26..28], &1480u16.to_be_bytes());
        assert_eq!(&out[28..48], &q);
        assert_eq!(&out[48..], &l4);
        assert_eq!(csum_fold(csum_add(0, &out[20..])), 0, "ICMP checksum");
    }
}
