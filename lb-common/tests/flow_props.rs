//! Flow hash properties: the same flow always reaches the same backend, the
//! hash modes ignore exactly what they promise to ignore, and the hash is the
//! published MurmurHash3_x86_32 so any LB instance (or a test) can predict it.
//!
//! Several properties are exact rather than statistical: every step of the
//! hash (`k * c1`, `rotl`, `k * c2`, `h ^ k`, `h * 5 + c`, and the finaliser's
//! xorshifts and odd multiplies) is a bijection of u32, so for fixed other
//! fields the hash is injective in each 32-bit input word and in the seed.

use lb_common::hash::{flow_hash_v4, flow_hash_v6, hash16, hashed_ports, ring_slot};
use lb_common::maglev::{build, MaglevBackend};
use lb_common::maps::{v4_mapped, HashMode, PROTO_TCP, PROTO_UDP};
use proptest::prelude::*;

/// Reference MurmurHash3_x86_32 (Austin Appleby, public domain), any length.
fn murmur3_32(seed: u32, data: &[u8]) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let scramble = |k: u32| k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        h ^= scramble(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let k = tail
            .iter()
            .enumerate()
            .fold(0u32, |k, (i, &b)| k | (b as u32) << (8 * i));
        h ^= scramble(k);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The flow as the hash reads it: addresses as on the wire, then the port
/// word `sport << 16 | dport` and the protocol, both little-endian u32.
fn tuple_bytes(src: &[u8], dst: &[u8], sport: u16, dport: u16, proto: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(src.len() + dst.len() + 8);
    b.extend_from_slice(src);
    b.extend_from_slice(dst);
    b.extend_from_slice(&(((sport as u32) << 16) | dport as u32).to_le_bytes());
    b.extend_from_slice(&(proto as u32).to_le_bytes());
    b
}

#[test]
fn reference_murmur3_matches_published_vectors() {
    assert_eq!(murmur3_32(0, b""), 0);
    assert_eq!(murmur3_32(1, b""), 0x514e_28b7);
    assert_eq!(murmur3_32(0, &[0, 0, 0, 0]), 0x2362_f9de);
    assert_eq!(murmur3_32(0x9747_b28c, b"aaaa"), 0x5a97_808a);
    assert_eq!(murmur3_32(0x9747_b28c, b"Hello, world!"), 0x2488_4cba);
    assert_eq!(
        murmur3_32(0x9747_b28c, b"The quick brown fox jumps over the lazy dog"),
        0x2fa8_26cd
    );
}

fn hash_mode() -> impl Strategy<Value = HashMode> {
    prop_oneof![
        Just(HashMode::FiveTuple),
        Just(HashMode::SrcIp),
        Just(HashMode::Rtp)
    ]
}

fn proto() -> impl Strategy<Value = u8> {
    prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP), any::<u8>()]
}

proptest! {
    #[test]
    fn hash16_is_murmur3(seed: u32, addr: [u8; 16]) {
        prop_assert_eq!(hash16(seed, &addr), murmur3_32(seed, &addr));
    }

    #[test]
    fn v4_hash_is_murmur3_of_the_tuple(
        seed: u32, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto in proto(),
    ) {
        prop_assert_eq!(
            flow_hash_v4(seed, HashMode::FiveTuple, src, dst, sport, dport, proto),
            murmur3_32(seed, &tuple_bytes(&src, &dst, sport, dport, proto))
        );
        prop_assert_eq!(
            flow_hash_v4(seed, HashMode::Rtp, src, dst, sport, dport, proto),
            murmur3_32(seed, &tuple_bytes(&src, &dst, sport & !1, dport & !1, proto))
        );
        prop_assert_eq!(
            flow_hash_v4(seed, HashMode::SrcIp, src, dst, sport, dport, proto),
            murmur3_32(seed, &src)
        );
    }

    #[test]
    fn v6_hash_is_murmur3_of_the_tuple(
        seed: u32, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto in proto(),
    ) {
        prop_assert_eq!(
            flow_hash_v6(seed, HashMode::FiveTuple, &src, &dst, sport, dport, proto),
            murmur3_32(seed, &tuple_bytes(&src, &dst, sport, dport, proto))
        );
        prop_assert_eq!(
            flow_hash_v6(seed, HashMode::Rtp, &src, &dst, sport, dport, proto),
            murmur3_32(seed, &tuple_bytes(&src, &dst, sport & !1, dport & !1, proto))
        );
        prop_assert_eq!(
            flow_hash_v6(seed, HashMode::SrcIp, &src, &dst, sport, dport, proto),
            murmur3_32(seed, &src)
        );
    }

    /// `rtp`: an even port and the odd port above it (RTP and RTCP of one
    /// stream) hash alike, on either side, in any combination.
    #[test]
    fn rtp_pairs_even_port_with_next_odd(
        seed: u32, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, flip_s: bool, flip_d: bool,
    ) {
        let (s, d) = (sport & !1, dport & !1);
        let (s2, d2) = (s | flip_s as u16, d | flip_d as u16);
        let v4 = |s, d| {
            flow_hash_v4(seed, HashMode::Rtp, [src[0], src[1], src[2], src[3]], [dst[0], dst[1], dst[2], dst[3]], s, d, PROTO_UDP)
        };
        let v6 = |s, d| flow_hash_v6(seed, HashMode::Rtp, &src, &dst, s, d, PROTO_UDP);
        prop_assert_eq!(v4(s, d), v4(s2, d2));
        prop_assert_eq!(v6(s, d), v6(s2, d2));
        prop_assert_eq!(hashed_ports(HashMode::Rtp, s2, d2), (s, d));
        // ...but a different pair of ports is a different stream.
        let s3 = s.wrapping_add(2);
        prop_assert_ne!(v4(s, d), v4(s3, d));
        prop_assert_ne!(v6(s, d), v6(s3, d));
    }

    /// `src-ip`: only the client address (and the seed) count.
    #[test]
    fn src_ip_ignores_everything_but_the_source(
        seed: u32, src: [u8; 16], dst: [u8; 16], dst2: [u8; 16],
        ports: (u16, u16), ports2: (u16, u16), proto in proto(), proto2 in proto(),
    ) {
        let s4 = [src[0], src[1], src[2], src[3]];
        prop_assert_eq!(
            flow_hash_v4(seed, HashMode::SrcIp, s4, [dst[0], dst[1], dst[2], dst[3]], ports.0, ports.1, proto),
            flow_hash_v4(seed, HashMode::SrcIp, s4, [dst2[0], dst2[1], dst2[2], dst2[3]], ports2.0, ports2.1, proto2)
        );
        prop_assert_eq!(
            flow_hash_v6(seed, HashMode::SrcIp, &src, &dst, ports.0, ports.1, proto),
            flow_hash_v6(seed, HashMode::SrcIp, &src, &dst2, ports2.0, ports2.1, proto2)
        );
    }

    /// Changing any one field of a five-tuple changes its hash (exact: the
    /// hash is injective in each word, see the module comment).
    #[test]
    fn five_tuple_sees_every_field(
        seed: u32, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8,
        field in 0usize..5, delta in 1u32..,
    ) {
        let h = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8| {
            flow_hash_v4(seed, HashMode::FiveTuple, src, dst, sport, dport, proto)
        };
        let before = h(src, dst, sport, dport, proto);
        let bump4 = |a: [u8; 4]| u32::from_be_bytes(a).wrapping_add(delta).to_be_bytes();
        let after = match field {
            0 => h(bump4(src), dst, sport, dport, proto),
            1 => h(src, bump4(dst), sport, dport, proto),
            2 => h(src, dst, sport.wrapping_add(delta as u16 | 1), dport, proto),
            3 => h(src, dst, sport, dport.wrapping_add(delta as u16 | 1), proto),
            _ => h(src, dst, sport, dport, proto.wrapping_add(delta as u8 | 1)),
        };
        prop_assert_ne!(before, after, "field {} changed", field);
    }

    /// The seed is part of the config: a different seed hashes every flow
    /// differently (exact, the first mix is injective in the seed).
    #[test]
    fn seed_changes_every_hash(
        seed: u32, other in any::<u32>(), mode in hash_mode(),
        src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8,
    ) {
        prop_assume!(seed != other);
        prop_assert_ne!(
            flow_hash_v6(seed, mode, &src, &dst, sport, dport, proto),
            flow_hash_v6(other, mode, &src, &dst, sport, dport, proto)
        );
        let (s4, d4) = ([src[0], src[1], src[2], src[3]], [dst[0], dst[1], dst[2], dst[3]]);
        prop_assert_ne!(
            flow_hash_v4(seed, mode, s4, d4, sport, dport, proto),
            flow_hash_v4(other, mode, s4, d4, sport, dport, proto)
        );
    }

    #[test]
    fn ring_slot_is_in_range(hash: u32, size in 1u32..) {
        prop_assert!(ring_slot(hash, size) < size);
    }
}

/// Backends with distinct addresses, ids 1..=n.
fn backends(max: usize) -> impl Strategy<Value = Vec<MaglevBackend>> {
    proptest::collection::btree_set(any::<[u8; 4]>(), 1..=max).prop_map(|addrs| {
        addrs
            .into_iter()
            .enumerate()
            .map(|(i, a)| MaglevBackend {
                addr: v4_mapped(a),
                id: i as u32 + 1,
                weight: 1,
            })
            .collect()
    })
}

/// Table size for these tests: prime, big enough for both fill phases,
/// small enough for unoptimised test builds.
const RING: u32 = 4099;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Same flow, same backend: from a table built on another LB instance
    /// (same backends, listed in another order), for RTP and RTCP of one
    /// stream, and for every connection of one client in `src-ip` mode.
    #[test]
    fn same_flow_same_backend(
        (bs, shuffled) in backends(40).prop_flat_map(|bs| (Just(bs.clone()), Just(bs).prop_shuffle())),
        seed: u32, client: [u8; 4], vip: [u8; 4], sport: u16, dport: u16, sport2: u16,
    ) {
        let here = build(&bs, RING);
        let there = build(&shuffled, RING);
        let backend = |table: &[u32], h: u32| table[ring_slot(h, RING) as usize];
        for mode in [HashMode::FiveTuple, HashMode::SrcIp, HashMode::Rtp] {
            let h = flow_hash_v4(seed, mode, client, vip, sport, dport, PROTO_UDP);
            prop_assert_eq!(backend(&here, h), backend(&there, h));
            prop_assert_ne!(backend(&here, h), 0, "every slot has a backend");
        }
        let rtp = flow_hash_v4(seed, HashMode::Rtp, client, vip, sport & !1, dport & !1, PROTO_UDP);
        let rtcp = flow_hash_v4(seed, HashMode::Rtp, client, vip, sport | 1, dport | 1, PROTO_UDP);
        prop_assert_eq!(backend(&here, rtp), backend(&there, rtcp));
        let conn1 = flow_hash_v4(seed, HashMode::SrcIp, client, vip, sport, dport, PROTO_TCP);
        let conn2 = flow_hash_v4(seed, HashMode::SrcIp, client, vip, sport2, dport, PROTO_TCP);
        prop_assert_eq!(backend(&here, conn1), backend(&there, conn2));
    }
}
