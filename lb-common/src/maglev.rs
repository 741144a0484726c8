//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! The table depends only on the set of (address, id, weight) triples:
//! backends are ordered by address before filling, and each backend's
//! preference list comes from a hash of its address, so every LB instance
//! with the same config builds the same table whatever order backends were
//! added in.
//!
//! Filling is Maglev's: backends take turns, and at its turn a backend claims
//! the first slot of its preference list that is still free.
//!
//! Weights: each round every backend earns its weight in credit and claims one
//! slot per `max_weight` of credit, so a backend's slots are within
//! `1 + (N - 2) * w / W` of its share `M * w / W` (the proof is in
//! `tests/maglev_props.rs`), and with equal weights every backend gets
//! `floor(M / N)` or `ceil(M / N)` slots.
//!
//! Preference lists. The paper's lists are arithmetic progressions,
//! `offset + j * skip (mod M)`. Those are correlated across backends (two
//! skips in a small ratio walk the table in lock-step), and then removing one
//! backend moves many slots of the others too: at M = 65537 about one removal
//! in a thousand moved 1.3-2.4% of the table on top of the removed backend's
//! own slots, for N from 5 to 20. Here a backend's list is a pseudo-random
//! stream of slots instead: a Weyl sequence (odd increment, full period 2^64)
//! through a bijective multiply-xorshift mixer, scaled onto `0..M` by a
//! multiply-high (no division). Every slot occurs in every stream, so a pick
//! always ends, and the extra moves stay close to their mean (at M = 65537:
//! 0.34% of the table at N = 10, 0.63% at N = 100, at most 0.71% over 12000
//! removals with N from 3 to 100).
//!
//! Endgame: with `F` slots free a stream needs `M / F` probes per pick, so the
//! last few hundred slots would cost more than the rest of the table. Once at
//! most `ENDGAME` slots are free, each backend at its turn takes the free slot
//! with the smallest `hash(backend, slot)` instead (rendezvous hashing over
//! what is left), at `F` hashes per pick. The switch point depends on `M`
//! only, so it is the same in every build of a service's table.

use crate::hash::hash16;

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Identity: the backend address (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Value written into the table's slots (the backend id in `BACKENDS`).
    pub id: u32,
    /// Relative share; 0 means "not in the table".
    pub weight: u32,
}

const STREAM_SEED_HI: u32 = 0x6d71_6c62; // "mqlb"
const STREAM_SEED_LO: u32 = 0x6d61_676c; // "magl"
const RANK_SEED: u32 = 0x7261_6e6b; // "rank"

/// Weyl increment of the preference streams (odd: full period 2^64).
const WEYL: u64 = 0x9e37_79b9_7f4a_7c15;
/// Odd multiplier of the stream mixer.
const MIX: u64 = 0xd6e8_feb8_6659_fd93;

/// Free slots left when filling switches from streams to rendezvous picks.
/// Stream and rendezvous picks cost the same at `F = sqrt(M)` (256 for the
/// default size); the switch sits below that because endgame picks ignore
/// the streams, so endgame slots move more often when a backend leaves
/// (at 128 that adds ≈0.05% of the table to the extra moves, at 256 ≈0.1%).
const ENDGAME: usize = 128;

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Slot `0..m` of stream position `pos`: mix (a bijection of u64), then the
/// high word of `mixed * m`.
#[inline(always)]
fn stream_slot(pos: u64, m: u64) -> usize {
    let mixed = (pos ^ (pos >> 32)).wrapping_mul(MIX);
    ((mixed as u128 * m as u128) >> 64) as usize
}

/// The first slot after stream position `pos` not set in `taken`, and its
/// position. Out of line: the caller's many live values would otherwise
/// crowd this loop's registers.
#[inline(never)]
fn next_free(taken: &[u64], mut pos: u64, m: u64) -> (usize, u64) {
    loop {
        pos = pos.wrapping_add(WEYL);
        let x = stream_slot(pos, m);
        if taken[x / 64] >> (x % 64) & 1 == 0 {
            return (x, pos);
        }
    }
}

/// Rendezvous rank of `slot` for the backend with rank key `key` (lower wins).
#[inline(always)]
fn rank(key: u64, slot: u32) -> u64 {
    let t = (key ^ slot as u64) as u128 * WEYL as u128;
    (t >> 64) as u64 ^ t as u64
}

/// Builds a table of `size` slots (a prime). Slots hold backend ids; a table
/// with no weighted backend is all zeros (0 = no backend).
pub fn build(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "maglev table size {size} is not prime");
    let m = size as usize;
    let mut table = vec![0u32; m];
    let mut live: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return table;
    }
    // The whole triple, so that even duplicates cannot make the result
    // depend on input order.
    live.sort_unstable_by_key(|b| (b.addr, b.id, b.weight));
    let max_weight = live.iter().map(|b| b.weight).max().unwrap_or(1) as u64;
    let weights: Vec<u64> = live.iter().map(|b| b.weight as u64).collect();
    let ids: Vec<u32> = live.iter().map(|b| b.id).collect();
    // Stream position per backend; the first probe is at start + WEYL.
    let mut pos: Vec<u64> = live
        .iter()
        .map(|b| {
            ((hash16(STREAM_SEED_HI, &b.addr) as u64) << 32)
                | hash16(STREAM_SEED_LO, &b.addr) as u64
        })
        .collect();
    let rank_keys: Vec<u64> = live
        .iter()
        .map(|b| ((hash16(RANK_SEED, &b.addr) as u64) << 32) | hash16(!RANK_SEED, &b.addr) as u64)
        .collect();
    let mut credit = vec![0u64; live.len()];
    let mut taken = vec![0u64; m.div_ceil(64)];
    let mut free_left = m;
    // Free slots, once in the endgame.
    let mut free: Vec<u32> = Vec::new();
    loop {
        for i in 0..live.len() {
            credit[i] += weights[i];
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let slot = if free_left > ENDGAME {
                let (slot, p) = next_free(&taken, pos[i], m as u64);
                pos[i] = p;
                taken[slot / 64] |= 1 << (slot % 64);
                slot
            } else {
                if free.is_empty() {
                    // First endgame pick (the list only empties when the table is full).
                    free = free_slots(&taken, m);
                }
                let key = rank_keys[i];
                let mut best = 0;
                let mut best_rank = (rank(key, free[0]), free[0]);
                for (j, &x) in free.iter().enumerate().skip(1) {
                    let r = (rank(key, x), x);
                    if r < best_rank {
                        best_rank = r;
                        best = j;
                    }
                }
                free.swap_remove(best) as usize
            };
            table[slot] = ids[i];
            free_left -= 1;
            if free_left == 0 {
                return table;
            }
        }
    }
}

/// Slots not set in `taken`, ascending.
fn free_slots(taken: &[u64], m: usize) -> Vec<u32> {
    let mut free = Vec::new();
    for (w, &word) in taken.iter().enumerate() {
        let mut bits = !word;
        while bits != 0 {
            let x = w * 64 + bits.trailing_zeros() as usize;
            if x >= m {
                break;
            }
            free.push(x as u32);
            bits &= bits - 1;
        }
    }
    free
}

/// Slots per backend id in `table`.
pub fn slot_counts(table: &[u32]) -> std::collections::BTreeMap<u32, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for &id in table {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::v4_mapped;

    fn be(i: u32, weight: u32) -> MaglevBackend {
        MaglevBackend {
            addr: v4_mapped([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            id: i + 1,
            weight,
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(655373));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
    }

    #[test]
    fn every_slot_filled_and_order_free() {
        let bs: Vec<_> = (0..7).map(|i| be(i, 1)).collect();
        for size in [13, 251, 257, 65537] {
            let t = build(&bs, size);
            assert!(t.iter().all(|&id| id != 0), "size {size} has an empty slot");
            let mut rev = bs.clone();
            rev.reverse();
            assert_eq!(build(&rev, size), t, "size {size} depends on input order");
        }
    }

    #[test]
    fn empty_and_zero_weight() {
        assert!(build(&[], 13).iter().all(|&x| x == 0));
        let t = build(&[be(1, 0), be(2, 3)], 13);
        assert!(t.iter().all(|&x| x == 3));
    }

    #[test]
    fn free_slots_lists_clear_bits_below_m() {
        let taken = [!0b1010u64, !0u64 ^ (1 << 63), 0];
        assert_eq!(free_slots(&taken, 130), vec![1, 3, 127, 128, 129]);
    }

    /// Every stream reaches every slot: the mixer is a bijection of u64.
    #[test]
    fn stream_mixer_is_invertible() {
        fn unmix(y: u64) -> u64 {
            // Inverse of `MIX` mod 2^64 by Newton's iteration, then of the xorshift.
            let mut inv = MIX;
            for _ in 0..5 {
                inv = inv.wrapping_mul(2u64.wrapping_sub(MIX.wrapping_mul(inv)));
            }
            let x = y.wrapping_mul(inv);
            x ^ (x >> 32)
        }
        for p in [0u64, 1, WEYL, u64::MAX, 0x0123_4567_89ab_cdef] {
            let mixed = (p ^ (p >> 32)).wrapping_mul(MIX);
            assert_eq!(unmix(mixed), p);
        }
    }
}
