//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! The table depends only on the set of (address, weight) pairs: backends are
//! ordered by address before filling, and each backend's permutation comes
//! from a hash of its address, so every LB instance with the same config
//! builds the same table whatever order backends were added in.
//!
//! Weights: each round every backend earns its weight in credit and claims one
//! slot per `max_weight` of credit, so slot counts are proportional to weights.

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

const OFFSET_SEED: u32 = 0x6d71_6c62; // "mqlb"
const SKIP_SEED: u32 = 0x6d61_676c; // "magl"

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Builds a table of `size` slots (a prime). Slots hold backend ids; a table
/// with no weighted backend is all zeros (0 = no backend).
pub fn build(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "maglev table size {size} is not prime");
    let m = size as u64;
    let mut live: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    let mut table = vec![0u32; size as usize];
    if live.is_empty() {
        return table;
    }
    live.sort_by(|a, b| a.addr.cmp(&b.addr));
    let max_weight = live.iter().map(|b| b.weight).max().unwrap_or(1) as u64;
    // Permutation of backend i: (offset + j * skip) mod m, j = 0, 1, ...
    let perm: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = hash16(OFFSET_SEED, &b.addr) as u64 % m;
            let skip = hash16(SKIP_SEED, &b.addr) as u64 % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut taken = vec![false; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for i in 0..live.len() {
            credit[i] += live[i].weight as u64;
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = perm[i];
            let mut slot = (offset + next[i] * skip) % m;
            while taken[slot as usize] {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            taken[slot as usize] = true;
            table[slot as usize] = live[i].id;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
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
        let t = build(&bs, 251);
        assert!(t.iter().all(|&id| id != 0));
        let mut rev = bs.clone();
        rev.reverse();
        assert_eq!(build(&rev, 251), t);
    }

    #[test]
    fn empty_and_zero_weight() {
        assert!(build(&[], 13).iter().all(|&x| x == 0));
        let t = build(&[be(1, 0), be(2, 3)], 13);
        assert!(t.iter().all(|&x| x == 3));
    }
}
