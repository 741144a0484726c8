//! IPv6 header bytes against real packets. The fixtures were made with scapy
//! 2.8 (`IPv6()/TCP()`, `IPv6(nh=41)`, `IPv6()/ICMPv6PacketTooBig()`,
//! checksums filled in by scapy, which shares no code with this crate); the
//! ICMPv6 checksum is also checked with this file's own RFC 1071 loop over the
//! RFC 8200 pseudo-header.

use lb_common::counters::DropReason;
use lb_common::maps::{PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP};
use lb_common::packet::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    assert_eq!(s.len() % 2, 0, "odd number of hex digits");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

const CLIENT: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const VIP: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
const LB: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
const BACKEND: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11,
];

/// scapy: `IPv6(src=CLIENT, dst=VIP, tc=0xb8, fl=0x12345, hlim=63) /
/// TCP(sport=40000, dport=5672, flags="A", seq=1000, ack=2000, window=0xfaf0) /
/// (b"\x5a" * 1400)`: the IPv6 header and the TCP header.
const CLIENT_HEAD: &str = "6b812345 058c063f 20010db8000c0000 0000000000000010
    20010db8000f0000 0000000000000001 9c401628 000003e8 000007d0 5010faf0 869e0000";
const CLIENT_LEN: usize = 1460;

/// The whole client packet of [`CLIENT_HEAD`] (its payload is 1400 × 0x5a).
fn client_packet() -> Vec<u8> {
    let mut p = hex(CLIENT_HEAD);
    p.resize(CLIENT_LEN, 0x5a);
    p
}

/// RFC 1071 over big-endian words, independent of lb-common's sums.
fn rfc1071(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The RFC 8200 pseudo-header checksum of an upper-layer packet.
fn checksum6(src: &[u8], dst: &[u8], next_header: u8, upper: &[u8]) -> u16 {
    let mut b = src.to_vec();
    b.extend_from_slice(dst);
    b.extend_from_slice(&(upper.len() as u32).to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, next_header]);
    b.extend_from_slice(upper);
    rfc1071(&b)
}

#[test]
fn client_header_parses_and_reemits_byte_for_byte() {
    let p = client_packet();
    let r = Ipv6Repr::parse(&p).unwrap();
    assert_eq!(
        r,
        Ipv6Repr {
            tc: 0xb8,
            flow_label: 0x12345,
            payload_len: 1420,
            next_header: PROTO_TCP,
            hop_limit: 63,
            src: CLIENT,
            dst: VIP,
        }
    );
    assert_eq!(r.emit().as_slice(), &p[..40]);
    assert_eq!(
        checksum6(&CLIENT, &VIP, PROTO_TCP, &p[40..]),
        0,
        "scapy's TCP checksum is valid"
    );
}

#[test]
fn parse_rejects_short_and_foreign_headers() {
    let p = client_packet();
    assert_eq!(Ipv6Repr::parse(&p[..39]), Err(ParseError::Truncated));
    let mut v4 = p.clone();
    v4[0] = 0x45;
    assert_eq!(Ipv6Repr::parse(&v4), Err(ParseError::Malformed));
}

#[test]
fn outer_header_matches_scapy() {
    // scapy: IPv6(src=LB, dst=BACKEND, nh=41, tc=0xb8, fl=0xabcde, hlim=64, plen=1460)
    let want = hex("6b8abcde 05b42940 20010db800010000 0000000000000001
                    20010db800010000 0000000000000011");
    let h = ip6_outer(LB, BACKEND, CLIENT_LEN as u16, PROTO_IPV6, 0xb8, 0xabcde);
    assert_eq!(h.as_slice(), want.as_slice());
    // Only 20 bits of the label are used.
    assert_eq!(
        ip6_outer(LB, BACKEND, 1460, PROTO_IPV6, 0xb8, 0xfff_abcde),
        h
    );
    let four = ip6_outer(LB, BACKEND, 60, PROTO_IPIP, 0, 0);
    assert_eq!(&four[..8], &[0x60, 0, 0, 0, 0, 60, 4, 64]);
}

#[test]
fn fits_and_client_mtu_per_outer_family() {
    assert!(encap_fits(1460, 1500, outer_len(true)));
    assert!(!encap_fits(1461, 1500, outer_len(true)));
    assert!(encap_fits(1480, 1500, outer_len(false)));
    assert_eq!(encap_client_mtu(1500, outer_len(true)), 1460);
    assert_eq!(encap_client_mtu(1500, outer_len(false)), 1480);
    assert_eq!(encap_client_mtu(30, outer_len(true)), 0);
}

#[test]
fn packet_too_big_matches_scapy() {
    // scapy: IPv6(src=VIP, dst=CLIENT, hlim=64) / ICMPv6PacketTooBig(mtu=1460) / quote
    let p = client_packet();
    let quote: [u8; ICMP6_QUOTE_LEN] = p[..ICMP6_QUOTE_LEN].try_into().unwrap();
    let out = icmp6_too_big(&quote, 1460);
    let want_head = hex("60000000 04d83a40 20010db8000f0000 0000000000000001
                         20010db8000c0000 0000000000000010 02003ed8 000005b4");
    assert_eq!(
        &out[..48],
        want_head.as_slice(),
        "header and scapy's checksum"
    );
    assert_eq!(&out[48..], &quote[..]);
    assert_eq!(out.len(), 1280, "exactly the IPv6 minimum MTU");
    assert_eq!(checksum6(&VIP, &CLIENT, PROTO_ICMPV6, &out[40..]), 0);
}

#[test]
fn extension_header_policy() {
    use ext6::*;
    let skip = |len, next, drop| Ext6::Skip { len, next, drop };
    assert_eq!(ipv6_ext(PROTO_TCP, [0; 4]), Ext6::Upper);
    assert_eq!(ipv6_ext(PROTO_UDP, [0; 4]), Ext6::Upper);
    assert_eq!(ipv6_ext(PROTO_ICMPV6, [0; 4]), Ext6::Upper);
    // Hop-by-hop with 8 bytes (length 0), then TCP.
    assert_eq!(
        ipv6_ext(HOP_BY_HOP, [PROTO_TCP, 0, 1, 4]),
        skip(8, PROTO_TCP, None)
    );
    assert_eq!(
        ipv6_ext(DEST_OPTS, [PROTO_UDP, 2, 0, 0]),
        skip(24, PROTO_UDP, None)
    );
    // Authentication header: length in 4-byte units, minus 2.
    assert_eq!(
        ipv6_ext(AUTH, [PROTO_TCP, 4, 0, 0]),
        skip(24, PROTO_TCP, None)
    );
    // Routing: segments left 0 is done with; otherwise not for us.
    assert_eq!(
        ipv6_ext(ROUTING, [PROTO_TCP, 2, 4, 0]),
        skip(24, PROTO_TCP, None)
    );
    assert_eq!(
        ipv6_ext(ROUTING, [PROTO_TCP, 2, 4, 1]),
        skip(24, PROTO_TCP, Some(DropReason::Ipv6ExtHeader))
    );
    // Fragments: atomic, first, later.
    assert_eq!(
        ipv6_ext(FRAGMENT, [PROTO_TCP, 0, 0, 0]),
        skip(8, PROTO_TCP, None)
    );
    assert_eq!(
        ipv6_ext(FRAGMENT, [PROTO_TCP, 0, 0, 1]),
        skip(8, PROTO_TCP, Some(DropReason::Ipv6Fragment))
    );
    assert_eq!(ipv6_ext(FRAGMENT, [PROTO_TCP, 0, 0x05, 0x08]), Ext6::Pass);
    assert_eq!(ipv6_ext(FRAGMENT, [PROTO_TCP, 0, 0x05, 0x09]), Ext6::Pass);
    // ESP, no next header, unknown.
    assert_eq!(ipv6_ext(50, [0; 4]), Ext6::Pass);
    assert_eq!(ipv6_ext(59, [0; 4]), Ext6::Pass);
    assert_eq!(ipv6_ext(253, [0; 4]), Ext6::Pass);
}

#[test]
fn icmp_error_types() {
    for t in [3, 11, 12] {
        assert!(icmp4_is_error(t));
    }
    for t in [0, 5, 8, 13] {
        assert!(!icmp4_is_error(t));
    }
    for t in 1..=4 {
        assert!(icmp6_is_error(t));
    }
    // Echo, and neighbour discovery / router advertisements: never errors.
    for t in [0, 128, 129, 133, 134, 135, 136, 137] {
        assert!(!icmp6_is_error(t));
    }
}

#[test]
fn tunnel_inner_ethertypes() {
    assert_eq!(tunnel_inner_ethertype(PROTO_IPIP), Some(ETH_P_IPV4));
    assert_eq!(tunnel_inner_ethertype(PROTO_IPV6), Some(ETH_P_IPV6));
    assert_eq!(tunnel_inner_ethertype(PROTO_TCP), None);
}

fn repr6() -> impl Strategy<Value = Ipv6Repr> {
    (
        any::<u8>(),
        0u32..1 << 20,
        any::<u16>(),
        any::<u8>(),
        any::<u8>(),
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
    )
        .prop_map(
            |(tc, flow_label, payload_len, next_header, hop_limit, src, dst)| Ipv6Repr {
                tc,
                flow_label,
                payload_len,
                next_header,
                hop_limit,
                src,
                dst,
            },
        )
}

proptest! {
    #[test]
    fn emitted_headers_round_trip(r in repr6()) {
        prop_assert_eq!(Ipv6Repr::parse(&r.emit()).unwrap(), r);
    }

    #[test]
    fn too_big_checksum_is_valid_for_any_quote(
        quote in proptest::collection::vec(any::<u8>(), ICMP6_QUOTE_LEN),
        mtu: u16,
    ) {
        let q: [u8; ICMP6_QUOTE_LEN] = quote.as_slice().try_into().unwrap();
        let out = icmp6_too_big(&q, mtu);
        prop_assert_eq!(checksum6(&out[8..24], &out[24..40], PROTO_ICMPV6, &out[40..]), 0);
        prop_assert_eq!(&out[8..24], &q[24..40], "from the address the client wrote to");
        prop_assert_eq!(&out[24..40], &q[8..24]);
        prop_assert_eq!(&out[44..48], &(mtu as u32).to_be_bytes());
    }

    #[test]
    fn words_sum_in_any_split(b in proptest::collection::vec(any::<u8>(), 0..64usize)) {
        let n = b.len() / 8 * 8;
        let words: u64 = b[..n]
            .chunks_exact(8)
            .map(|c| sum64(u64::from_ne_bytes(c.try_into().unwrap())))
            .sum();
        prop_assert_eq!(csum_fold64(words), csum_fold64(csum_ne(&b[..n])));
    }

    #[test]
    fn ext_walk_never_panics(nh: u8, b: [u8; 4]) {
        if let Ext6::Skip { len, .. } = ipv6_ext(nh, b) {
            prop_assert!((8..=2048).contains(&len));
        }
    }
}
