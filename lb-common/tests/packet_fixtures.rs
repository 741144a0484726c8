//! Header bytes against real packets. The fixtures were made with scapy 2.8
//! (`IP()/TCP()`, `IP()/UDP()`, `IP()/ICMP()`, checksums filled in by scapy,
//! which shares no code with this crate); the checksums of the two headers
//! mqlb originates are also worked out by hand below.

use lb_common::maps::{PROTO_ICMP, PROTO_IPIP, PROTO_TCP, PROTO_UDP};
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

/// A client packet and what its IPv4 header says.
struct Fixture {
    name: &'static str,
    bytes: &'static str,
    repr: Ipv4Repr,
    /// Whether the packet carries its whole transport segment (so the
    /// transport checksum can be verified).
    whole: bool,
}

const CLIENT: [u8; 4] = [192, 0, 2, 10];
const VIP: [u8; 4] = [198, 51, 100, 1];

fn fixtures() -> Vec<Fixture> {
    vec![
        Fixture {
            name: "TCP SYN to AMQP, MSS option",
            bytes: "4500 002c 1c46 4000 4006 3247 c000 020a c633 6401
                    9c40 1628 0000 03e8 0000 0000 6002 faf0 faa5 0000 0204 05b4",
            repr: Ipv4Repr {
                tos: 0,
                total_len: 44,
                ident: 0x1c46,
                frag: IPV4_DF,
                ttl: 64,
                proto: PROTO_TCP,
                src: CLIENT,
                dst: VIP,
            },
            whole: true,
        },
        Fixture {
            name: "TCP PSH/ACK carrying the AMQP protocol header",
            bytes: "4500 0030 1c47 4000 4006 3242 c000 020a c633 6401
                    9c40 1628 0000 03e9 0000 1b59 5018 01f6 5446 0000 414d 5150 0000 0901",
            repr: Ipv4Repr {
                tos: 0,
                total_len: 48,
                ident: 0x1c47,
                frag: IPV4_DF,
                ttl: 64,
                proto: PROTO_TCP,
                src: CLIENT,
                dst: VIP,
            },
            whole: true,
        },
        Fixture {
            name: "UDP RTP, DSCP EF",
            bytes: "45b8 0030 0100 4000 3f11 4dbb c000 0214 c633 6402
                    9c40 138c 001c 3950 8000 0001 0000 00a0 dead beef 0001 0203 0405 0607",
            repr: Ipv4Repr {
                tos: 0xb8,
                total_len: 48,
                ident: 0x0100,
                frag: IPV4_DF,
                ttl: 63,
                proto: PROTO_UDP,
                src: [192, 0, 2, 20],
                dst: [198, 51, 100, 2],
            },
            whole: true,
        },
        Fixture {
            name: "UDP with an odd-length payload",
            bytes: "4500 0021 4242 4000 4011 0c1f c000 0232 c633 6405
                    9c41 138d 000d 1fc8 6865 6c6c 6f",
            repr: Ipv4Repr {
                tos: 0,
                total_len: 33,
                ident: 0x4242,
                frag: IPV4_DF,
                ttl: 64,
                proto: PROTO_UDP,
                src: [192, 0, 2, 50],
                dst: [198, 51, 100, 5],
            },
            whole: true,
        },
        Fixture {
            name: "UDP first fragment (MF)",
            bytes: "4500 0024 abcd 2000 4011 c2a6 c000 021e c633 6403
                    13c4 13c4 05c8 1234 494e 5649 5445 2073",
            repr: Ipv4Repr {
                tos: 0,
                total_len: 36,
                ident: 0xabcd,
                frag: IPV4_MF,
                ttl: 64,
                proto: PROTO_UDP,
                src: [192, 0, 2, 30],
                dst: [198, 51, 100, 3],
            },
            whole: false,
        },
    ]
}

/// One's-complement sum of the IPv4 pseudo-header and the segment: zero
/// (after folding and inverting) when the transport checksum is right.
fn l4_checksum(ip: &Ipv4Repr, segment: &[u8]) -> u16 {
    let mut sum = csum_add(0, &ip.src);
    sum = csum_add(sum, &ip.dst);
    sum = csum_add(sum, &[0, ip.proto]);
    sum = csum_add(sum, &(segment.len() as u16).to_be_bytes());
    csum_fold(csum_add(sum, segment))
}

#[test]
fn client_packets_parse_and_reemit_byte_for_byte() {
    for f in fixtures() {
        let pkt = hex(f.bytes);
        let (repr, opts) = Ipv4Repr::parse(&pkt).unwrap_or_else(|e| panic!("{}: {e:?}", f.name));
        assert_eq!(opts, 0, "{}: no options", f.name);
        assert_eq!(repr, f.repr, "{}: fields", f.name);
        assert_eq!(
            repr.total_len as usize,
            pkt.len(),
            "{}: total length",
            f.name
        );
        assert_eq!(repr.is_fragment(), !f.whole, "{}: fragment", f.name);
        assert_eq!(
            repr.emit().as_slice(),
            &pkt[..IPV4_LEN],
            "{}: re-emitted header",
            f.name
        );
        assert_eq!(
            csum_fold(csum_add(0, &pkt[..IPV4_LEN])),
            0,
            "{}: IPv4 checksum",
            f.name
        );
        if f.whole {
            assert_eq!(
                l4_checksum(&repr, &pkt[IPV4_LEN..]),
                0,
                "{}: L4 checksum",
                f.name
            );
        }
    }
}

#[test]
fn options_are_skipped_and_reported() {
    // scapy: IP(options=b"\x01\x01\x01\x00")/UDP(sport=1, dport=2): NOP NOP NOP EOL.
    let pkt = hex("4600 0020 0007 0000 4011 8b65 c000 0228 c633 6404 0101 0100
                   0001 0002 0008 137b");
    let (repr, opts) = Ipv4Repr::parse(&pkt).unwrap();
    assert_eq!(opts, 4);
    assert_eq!((repr.total_len, repr.ident, repr.proto), (32, 7, PROTO_UDP));
    assert_eq!((repr.src, repr.dst), ([192, 0, 2, 40], [198, 51, 100, 4]));
    assert_eq!(
        csum_fold(csum_add(0, &pkt[..24])),
        0,
        "checksum covers the options"
    );
    assert_eq!(l4_checksum(&repr, &pkt[24..]), 0);
    assert_eq!(Ipv4Repr::parse(&pkt[..23]), Err(ParseError::Truncated));
}

/// The RTP fixture above, encapsulated for backend 10.0.1.2 by an LB at
/// 10.0.0.1 (scapy: `IP(src, dst, tos=0xb8, id=0, flags="DF", ttl=64,
/// proto=4)/Raw(inner)`).
///
/// Outer checksum by hand: 45b8 + 0044 + 0000 + 4000 + 4004 + 0a00 + 0001 +
/// 0a00 + 0102 = db03 (no carry), !db03 = 24fc.
#[test]
fn ipip_outer_header_matches_hand_computed_bytes() {
    let inner = hex(fixtures()[2].bytes);
    let outer = ipip_outer_v4([10, 0, 0, 1], [10, 0, 1, 2], inner.len() as u16, inner[1]);
    assert_eq!(
        outer.as_slice(),
        hex("45b8 0044 0000 4000 4004 24fc 0a00 0001 0a00 0102")
    );
    let mut pkt = outer.to_vec();
    pkt.extend_from_slice(&inner);
    assert_eq!(
        pkt,
        hex("45b8 0044 0000 4000 4004 24fc 0a00 0001 0a00 0102
             45b8 0030 0100 4000 3f11 4dbb c000 0214 c633 6402
             9c40 138c 001c 3950 8000 0001 0000 00a0 dead beef 0001 0203 0405 0607"),
        "whole encapsulated packet"
    );
    let (repr, _) = Ipv4Repr::parse(&pkt).unwrap();
    assert_eq!(
        (repr.proto, repr.frag, repr.ttl),
        (PROTO_IPIP, IPV4_DF, OUTER_TTL)
    );
}

/// A 1500-byte DF segment from the client to the VIP that does not fit the
/// tunnel: the answer comes from the VIP and quotes the client's header and
/// first 8 transport bytes (scapy: `IP(src=VIP, dst=client, id=0, ttl=64)/
/// ICMP(type=3, code=4, nexthopmtu=1480)/Raw(quote)`).
///
/// IPv4 checksum by hand: 4500 + 0038 + 0000 + 0000 + 4001 + c633 + 6401 +
/// c000 + 020a = 2_7177, folded 7179, !7179 = 8e86.
/// ICMP checksum: 0304 + 0000 + 05c8 + (quoted header 4500 05dc 1c48 4000
/// 3f06 2d95 c000 020a c633 6401) + (9c40 1628 0102 0304) = 3_bf37, folded
/// bf3a, !bf3a = 40c5.
#[test]
fn icmp_frag_needed_matches_hand_computed_bytes() {
    let quote: [u8; ICMP4_QUOTE_LEN] =
        hex("4500 05dc 1c48 4000 3f06 2d95 c000 020a c633 6401 9c40 1628 0102 0304")
            .try_into()
            .unwrap();
    let out = icmp4_frag_needed(&quote, ipip_client_mtu(1500));
    assert_eq!(
        out.as_slice(),
        hex("4500 0038 0000 0000 4001 8e86 c633 6401 c000 020a
             0304 40c5 0000 05c8
             4500 05dc 1c48 4000 3f06 2d95 c000 020a c633 6401 9c40 1628 0102 0304")
    );
    let (repr, _) = Ipv4Repr::parse(&out).unwrap();
    assert_eq!((repr.src, repr.dst, repr.proto), (VIP, CLIENT, PROTO_ICMP));
}

#[test]
fn parse_rejects_short_and_foreign_headers() {
    let syn = hex(fixtures()[0].bytes);
    for len in 0..IPV4_LEN {
        assert_eq!(
            Ipv4Repr::parse(&syn[..len]),
            Err(ParseError::Truncated),
            "{len} bytes"
        );
    }
    let mut v6 = syn.clone();
    v6[0] = 0x60;
    assert_eq!(
        Ipv4Repr::parse(&v6),
        Err(ParseError::Malformed),
        "version 6"
    );
    let mut short_ihl = syn.clone();
    short_ihl[0] = 0x44;
    assert_eq!(
        Ipv4Repr::parse(&short_ihl),
        Err(ParseError::Malformed),
        "IHL 4"
    );
    let mut short_total = syn.clone();
    short_total[2..4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(
        Ipv4Repr::parse(&short_total),
        Err(ParseError::Malformed),
        "total length 19"
    );
}

fn repr() -> impl Strategy<Value = Ipv4Repr> {
    (
        any::<u8>(),
        IPV4_LEN as u16..,
        any::<u16>(),
        any::<u16>(),
        any::<u8>(),
        any::<u8>(),
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
    )
        .prop_map(
            |(tos, total_len, ident, frag, ttl, proto, src, dst)| Ipv4Repr {
                tos,
                total_len,
                ident,
                frag,
                ttl,
                proto,
                src,
                dst,
            },
        )
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for each 16-bit word m that
/// became m'.
fn incremental_checksum(old: &[u8; IPV4_LEN], new: &[u8; IPV4_LEN]) -> u16 {
    let word = |h: &[u8; IPV4_LEN], i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let mut sum = !word(old, 10) as u32;
    for i in (0..IPV4_LEN).step_by(2).filter(|&i| i != 10) {
        if word(old, i) != word(new, i) {
            sum += !word(old, i) as u32 + word(new, i) as u32;
        }
    }
    csum_fold(sum)
}

proptest! {
    /// Every emitted header checksums to zero and parses back to itself.
    #[test]
    fn emitted_headers_sum_to_zero_and_round_trip(r in repr()) {
        let h = r.emit();
        prop_assert_eq!(csum_fold(csum_add(0, &h)), 0);
        prop_assert_eq!(Ipv4Repr::parse(&h), Ok((r, 0)));
    }

    /// Updating the checksum incrementally (as a router rewriting TTL, DSCP,
    /// length or id does) gives the full checksum of the new header.
    #[test]
    fn incremental_checksum_equals_full(
        r in repr(), ttl: u8, tos: u8, total_len in IPV4_LEN as u16.., ident: u16, which in 1u8..16,
    ) {
        let mut n = r;
        if which & 1 != 0 { n.ttl = ttl; }
        if which & 2 != 0 { n.tos = tos; }
        if which & 4 != 0 { n.total_len = total_len; }
        if which & 8 != 0 { n.ident = ident; }
        let (old, new) = (r.emit(), n.emit());
        prop_assert_eq!(incremental_checksum(&old, &new).to_be_bytes(), [new[10], new[11]]);
    }

    /// Summing a buffer in pieces (at even offsets) equals summing it whole.
    #[test]
    fn checksum_sums_in_pieces(b in proptest::collection::vec(any::<u8>(), 0..200), cut in 0usize..100) {
        let cut = (cut * 2).min(b.len() & !1);
        prop_assert_eq!(csum_add(csum_add(0, &b[..cut]), &b[cut..]), csum_add(0, &b));
    }

    /// Arbitrary bytes never panic the parser, and a successful parse means
    /// a version 4 header whose lengths add up.
    #[test]
    fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok((r, opts)) = Ipv4Repr::parse(&b) {
            prop_assert_eq!(b[0] >> 4, 4);
            prop_assert_eq!(IPV4_LEN + opts, (b[0] & 0xf) as usize * 4);
            prop_assert!(r.total_len as usize >= IPV4_LEN + opts);
            prop_assert!(b.len() >= IPV4_LEN + opts);
        }
    }

    #[test]
    fn ipip_outer_header_is_valid(
        src: [u8; 4], dst: [u8; 4], inner_len in IPV4_LEN as u16..=u16::MAX - IPV4_LEN as u16, tos: u8, mtu: u16,
    ) {
        let h = ipip_outer_v4(src, dst, inner_len, tos);
        prop_assert_eq!(csum_fold(csum_add(0, &h)), 0);
        let (r, _) = Ipv4Repr::parse(&h).unwrap();
        prop_assert_eq!(r, Ipv4Repr {
            tos, total_len: inner_len + IPV4_LEN as u16, ident: 0, frag: IPV4_DF,
            ttl: OUTER_TTL, proto: PROTO_IPIP, src, dst,
        });
        prop_assert_eq!(ipip_fits(inner_len, mtu), inner_len as u32 + IPV4_LEN as u32 <= mtu as u32);
        prop_assert!(ipip_fits(ipip_client_mtu(mtu), mtu) || mtu < IPV4_LEN as u16);
    }

    /// The ICMP header's checksum, computed from the quote's unfolded sum
    /// plus the header words (as the data plane does, without re-reading the
    /// quote), equals the full checksum over header and quote.
    #[test]
    fn icmp_header_checksum_from_quote_sum_equals_full(quote: [u8; ICMP4_QUOTE_LEN], mtu: u16) {
        let hdr = icmp4_frag_needed_hdr(mtu, csum_add(0, &quote));
        prop_assert_eq!(csum_fold(csum_add(csum_add(0, &hdr), &quote)), 0);
        let mut zeroed = hdr;
        zeroed[2..4].fill(0);
        let full = csum_fold(csum_add(csum_add(0, &zeroed), &quote));
        prop_assert_eq!(&hdr[2..4], &full.to_be_bytes()[..]);
    }

    #[test]
    fn icmp_frag_needed_is_valid(client in repr(), l4: [u8; ICMP_QUOTE_L4], mtu: u16) {
        let quoted = client.emit();
        let mut quote = [0u8; ICMP4_QUOTE_LEN];
        quote[..IPV4_LEN].copy_from_slice(&quoted);
        quote[IPV4_LEN..].copy_from_slice(&l4);
        let out = icmp4_frag_needed(&quote, mtu);
        prop_assert_eq!(csum_fold(csum_add(0, &out[..IPV4_LEN])), 0, "IPv4 checksum");
        prop_assert_eq!(csum_fold(csum_add(0, &out[IPV4_LEN..])), 0, "ICMP checksum");
        let (r, _) = Ipv4Repr::parse(&out).unwrap();
        prop_assert_eq!((r.src, r.dst, r.proto), (client.dst, client.src, PROTO_ICMP));
        prop_assert_eq!(r.total_len as usize, ICMP4_TOO_BIG_LEN);
        prop_assert_eq!(&out[IPV4_LEN..IPV4_LEN + 2], &[3u8, 4][..], "type 3 code 4");
        prop_assert_eq!(&out[IPV4_LEN + 6..IPV4_LEN + 8], &mtu.to_be_bytes()[..]);
        prop_assert_eq!(&out[IPV4_LEN + ICMP_HDR_LEN..IPV4_LEN + ICMP_HDR_LEN + IPV4_LEN], &quoted[..]);
        prop_assert_eq!(&out[ICMP4_TOO_BIG_LEN - ICMP_QUOTE_L4..], &l4[..]);
    }
}
