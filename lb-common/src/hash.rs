//! Flow hashing: flow → 32-bit hash → Maglev slot → backend.
//!
//! The mixing is MurmurHash3's 32-bit block and finalizer (public domain
//! constants), applied to a fixed number of 32-bit words so the eBPF
//! compiler unrolls it into straight-line code with no helper calls.

use crate::maps::{Flow4, Flow6, HashMode, PROTO_UDP};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len_bytes: u32) -> u32 {
    let mut h = h ^ len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// MurmurHash3_x86_32 of a 16-byte block (an address) with `seed`.
#[inline(always)]
pub const fn hash16(seed: u32, b: &[u8; 16]) -> u32 {
    let mut h = mix(seed, word(b, 0));
    h = mix(h, word(b, 4));
    h = mix(h, word(b, 8));
    h = mix(h, word(b, 12));
    finish(h, 16)
}

/// Ports as the hash sees them for `mode` (host byte order in, host order out).
#[inline(always)]
pub const fn hashed_ports(mode: HashMode, sport: u16, dport: u16) -> (u16, u16) {
    match mode {
        HashMode::Rtp => (sport & !1, dport & !1),
        _ => (sport, dport),
    }
}

/// Hash of an IPv4 flow. Addresses as on the wire, ports in host byte order.
#[inline(always)]
pub const fn flow_hash_v4(
    seed: u32,
    mode: HashMode,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    proto: u8,
) -> u32 {
    let src = u32::from_le_bytes(src);
    if let HashMode::SrcIp = mode {
        return finish(mix(seed, src), 4);
    }
    let (sport, dport) = hashed_ports(mode, sport, dport);
    let mut h = mix(seed, src);
    h = mix(h, u32::from_le_bytes(dst));
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 16)
}

/// Hash of an IPv6 flow. Addresses as on the wire, ports in host byte order.
#[inline(always)]
pub const fn flow_hash_v6(
    seed: u32,
    mode: HashMode,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
) -> u32 {
    if let HashMode::SrcIp = mode {
        return hash16(seed, src);
    }
    let (sport, dport) = hashed_ports(mode, sport, dport);
    let mut h = mix(seed, word(src, 0));
    h = mix(h, word(src, 4));
    h = mix(h, word(src, 8));
    h = mix(h, word(src, 12));
    h = mix(h, word(dst, 0));
    h = mix(h, word(dst, 4));
    h = mix(h, word(dst, 8));
    h = mix(h, word(dst, 12));
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 40)
}

/// The outer IPv6 flow label (20 bits, RFC 6438) of a flow whose conntrack
/// key, read as native 64-bit words, XORs to `key_xor`: one finalizer round,
/// cheap enough for every packet, the same for every packet of the flow.
#[inline(always)]
pub const fn flow_label(key_xor: u64) -> u32 {
    finish((key_xor ^ (key_xor >> 32)) as u32, 0) & 0xf_ffff
}

/// XOR of the native 64-bit words of a key (8-byte multiple).
fn key_xor(b: &[u8]) -> u64 {
    b.chunks_exact(8)
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .fold(0, |a, w| a ^ w)
}

/// [`flow_label`] of an IPv4 flow (4-in-6 to an IPv6 backend).
pub fn flow_label_v4(f: &Flow4) -> u32 {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&f.src);
    b[4..8].copy_from_slice(&f.dst);
    b[8..10].copy_from_slice(&f.sport_be.to_ne_bytes());
    b[10..12].copy_from_slice(&f.dport_be.to_ne_bytes());
    b[12] = f.proto;
    flow_label(key_xor(&b))
}

/// [`flow_label`] of an IPv6 flow.
pub fn flow_label_v6(f: &Flow6) -> u32 {
    let mut b = [0u8; 40];
    b[0..16].copy_from_slice(&f.src);
    b[16..32].copy_from_slice(&f.dst);
    b[32..34].copy_from_slice(&f.sport_be.to_ne_bytes());
    b[34..36].copy_from_slice(&f.dport_be.to_ne_bytes());
    b[36] = f.proto;
    flow_label(key_xor(&b))
}

/// Slot of `hash` in a ring of `ring_size` slots (`ring_size` > 0).
#[inline(always)]
pub const fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    hash % ring_size
}

/// Whether a packet of this flow must pick a backend afresh even when conntrack
/// knows it: a TCP SYN (without ACK) starts a new connection.
#[inline(always)]
pub const fn tcp_syn_rehashes(syn: bool, ack: bool) -> bool {
    syn && !ack
}

/// Whether `proto` is subject to the UDP idle timeout.
#[inline(always)]
pub const fn is_udp(proto: u8) -> bool {
    proto == PROTO_UDP
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MurmurHash3_x86_32 reference vectors (from the SMHasher verification set).
    #[test]
    fn murmur3_reference_vectors() {
        fn murmur(seed: u32, data: &[u8]) -> u32 {
            assert_eq!(data.len() % 4, 0);
            let mut h = seed;
            for c in data.chunks(4) {
                h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
            finish(h, data.len() as u32)
        }
        assert_eq!(murmur(0, b""), 0);
        assert_eq!(murmur(1, b""), 0x514E_28B7);
        assert_eq!(murmur(0, &[0, 0, 0, 0]), 0x2362_F9DE);
        assert_eq!(murmur(0x9747_b28c, b"aaaa"), 0x5A97_808A);
        let addr = *b"0123456789abcdef";
        assert_eq!(hash16(7, &addr), murmur(7, &addr));
    }

    #[test]
    fn rtp_pairs_rtp_and_rtcp() {
        let a = flow_hash_v4(
            1,
            HashMode::Rtp,
            [1, 2, 3, 4],
            [5, 6, 7, 8],
            40000,
            5004,
            17,
        );
        let b = flow_hash_v4(
            1,
            HashMode::Rtp,
            [1, 2, 3, 4],
            [5, 6, 7, 8],
            40001,
            5005,
            17,
        );
        assert_eq!(a, b);
        let c = flow_hash_v4(
            1,
            HashMode::FiveTuple,
            [1, 2, 3, 4],
            [5, 6, 7, 8],
            40000,
            5004,
            17,
        );
        let d = flow_hash_v4(
            1,
            HashMode::FiveTuple,
            [1, 2, 3, 4],
            [5, 6, 7, 8],
            40001,
            5005,
            17,
        );
        assert_ne!(c, d);
    }

    #[test]
    fn src_ip_ignores_ports_and_seed_matters() {
        let a = flow_hash_v4(1, HashMode::SrcIp, [1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 6);
        let b = flow_hash_v4(1, HashMode::SrcIp, [1, 2, 3, 4], [9, 9, 9, 9], 3, 4, 17);
        assert_eq!(a, b);
        let c = flow_hash_v4(2, HashMode::SrcIp, [1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 6);
        assert_ne!(a, c);
    }

    #[test]
    fn flow_labels_are_20_bits_and_differ_per_flow() {
        let f = |sport: u16| Flow6 {
            src: [0x20, 1, 0xd, 0xb8, 0, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
            dst: [0x20, 1, 0xd, 0xb8, 0, 0xf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            sport_be: sport.to_be(),
            dport_be: 5672u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        let labels: std::collections::BTreeSet<u32> =
            (40000..40100).map(|p| flow_label_v6(&f(p))).collect();
        assert!(labels.iter().all(|&l| l < 1 << 20));
        assert!(labels.len() > 95, "100 flows, {} labels", labels.len());
        assert_eq!(flow_label_v6(&f(40000)), flow_label_v6(&f(40000)));
        let g = Flow4 {
            src: [192, 0, 2, 10],
            dst: [10, 99, 0, 1],
            sport_be: 40000u16.to_be(),
            dport_be: 5672u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        assert!(flow_label_v4(&g) < 1 << 20);
    }

    #[test]
    fn syn_without_ack_rehashes() {
        assert!(tcp_syn_rehashes(true, false));
        assert!(!tcp_syn_rehashes(true, true));
        assert!(!tcp_syn_rehashes(false, true));
    }
}
