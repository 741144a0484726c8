//! Part 2 of `cargo xtask bench`: Maglev table build time, balance and
//! disruption (lb-common's `maglev::build`), and the time to push a changed
//! table into the real `RINGS` map of the compiled program: one
//! `BPF_MAP_UPDATE_ELEM` per slot (aya `Array::set`, what the daemon does)
//! against one `BPF_MAP_UPDATE_BATCH` (aya 0.14 has no batch API: a raw
//! `bpf(2)` call here).

use crate::bench_util::{check_interrupted, fast_rounds, max, mean, median, min, round_to};
use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::maglev::{self, MaglevBackend};
use lb_common::{ring_base, v4_mapped};
use serde_json::{json, Value};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::time::Instant;

/// Backend counts and table sizes of the issue.
pub const BACKENDS: [usize; 4] = [3, 10, 100, 1000];
pub const TABLE_SIZES: [u32; 2] = [65537, 655373];
/// Katran's extra disruption (slots moved beyond the removed backend's own,
/// % of the table) at M = 65537, the reference of the target.
pub const KATRAN_EXTRA_PCT: [(usize, f64); 2] = [(10, 0.26), (100, 0.57)];

fn members(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            addr: v4_mapped([10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            id: i as u32 + 1,
            weight: 1,
        })
        .collect()
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Build time, balance and disruption for every (N, M).
pub fn tables(rounds: usize) -> Result<Value> {
    let configs: Vec<(usize, u32)> = TABLE_SIZES
        .iter()
        .flat_map(|&m| BACKENDS.iter().map(move |&n| (n, m)))
        .collect();
    let sets: Vec<Vec<MaglevBackend>> = configs.iter().map(|&(n, _)| members(n)).collect();
    // Warm-up (page faults of the first allocations), then interleaved
    // rounds: every config once per round.
    for (set, &(_, m)) in sets.iter().zip(&configs) {
        std::hint::black_box(maglev::build(set, m));
    }
    let mut times = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        check_interrupted()?;
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let start = Instant::now();
            std::hint::black_box(maglev::build(&sets[i], configs[i].1));
            times[i].push(ms(start));
        }
    }
    let mut rows = Vec::new();
    for (i, &(n, m)) in configs.iter().enumerate() {
        check_interrupted()?;
        let table = maglev::build(&sets[i], m);
        let counts = maglev::slot_counts(&table);
        let max_slots = *counts.values().max().unwrap_or(&0);
        let min_slots = *counts.values().min().unwrap_or(&0);
        // Remove up to 10 backends, one at a time, spread over the set.
        let k = n.min(10);
        let (mut moved, mut own, mut extra) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..k {
            let victim = sets[i][j * n / k];
            let rest: Vec<MaglevBackend> = sets[i]
                .iter()
                .copied()
                .filter(|b| b.id != victim.id)
                .collect();
            let after = maglev::build(&rest, m);
            let changed = table.iter().zip(&after).filter(|(a, b)| a != b).count();
            let its_own = table.iter().filter(|&&id| id == victim.id).count();
            let pct = |x: usize| 100.0 * x as f64 / m as f64;
            moved.push(pct(changed));
            own.push(pct(its_own));
            extra.push(pct(changed - its_own));
        }
        let katran = KATRAN_EXTRA_PCT
            .iter()
            .find(|(kn, _)| *kn == n && m == 65537)
            .map(|(_, v)| *v);
        let fast = fast_rounds(&times[i]);
        let fast_times: Vec<f64> = times[i]
            .iter()
            .zip(&fast)
            .filter(|(_, f)| **f)
            .map(|(t, _)| *t)
            .collect();
        rows.push(json!({
            "backends": n,
            "table_size": m,
            "build_ms_median": round_to(median(&times[i]), 3),
            "build_ms_min": round_to(min(&times[i]), 3),
            "build_ms_median_fast_rounds": round_to(median(&fast_times), 3),
            "build_ms_per_round": times[i].iter().map(|t| round_to(*t, 3)).collect::<Vec<_>>(),
            "slots_max": max_slots,
            "slots_min": min_slots,
            "balance_max_over_min": round_to(max_slots as f64 / min_slots.max(1) as f64, 5),
            "removals": k,
            "moved_pct_mean": round_to(mean(&moved), 4),
            "removed_backend_share_pct_mean": round_to(mean(&own), 4),
            "ideal_moved_pct": round_to(100.0 / n as f64, 4),
            "extra_moved_pct_mean": round_to(mean(&extra), 4),
            "extra_moved_pct_max": round_to(max(&extra), 4),
            "katran_extra_moved_pct": katran,
        }));
    }
    Ok(json!({ "rounds": rounds, "tables": rows }))
}

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] → values[i]` on map `fd`: the
/// daemon's own call, so the bench times exactly what `mqlb` does.
fn update_batch(fd: i32, keys: &[u32], values: &[u32]) -> Result<()> {
    lb_user::dataplane::update_batch(fd, keys, values).context("BPF_MAP_UPDATE_BATCH on RINGS")
}

/// Time to write a changed ring into `RINGS` of the real program object.
pub fn map_push(rounds: usize) -> Result<Value> {
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries(lb_common::names::CT4, 1024)
        .map_max_entries(lb_common::names::CT6, 1024)
        .load(lb_user::programs::LB_OBJECT)
        .context("cannot load the mqlb object (root needed)")?;
    let fd = match ebpf.map(lb_common::names::RINGS) {
        Some(Map::Array(data)) => data.fd().as_fd().as_raw_fd(),
        _ => bail!("the object has no RINGS array"),
    };
    let mut rings: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(lb_common::names::RINGS)
            .context("no RINGS map")?,
    )?;
    const M: u32 = 65537;
    let base = ring_base(1, 0);

    // (name, slots, [table A, table B]): the bench writes A and B in turn,
    // so every write changes what the map holds.
    struct Case {
        name: String,
        slots: Vec<u32>,
        tables: [Vec<u32>; 2],
    }
    let mut cases = Vec::new();
    for n in [10usize, 100] {
        let set = members(n);
        let before = maglev::build(&set, M);
        let after = maglev::build(&set[1..], M);
        let slots: Vec<u32> = (0..M)
            .filter(|&i| before[i as usize] != after[i as usize])
            .collect();
        cases.push(Case {
            name: format!("one of {n} backends removed"),
            slots,
            tables: [before, after],
        });
    }
    {
        let set = members(100);
        let full = maglev::build(&set, M);
        let other = maglev::build(&members(99), M);
        cases.push(Case {
            name: "whole ring (first table of a service)".into(),
            slots: (0..M).collect(),
            tables: [full, other],
        });
    }
    // Start from table A everywhere.
    let keys_all: Vec<u32> = (0..M).map(|i| base + i).collect();
    update_batch(fd, &keys_all, &cases[0].tables[0])?;

    // times[case][method] per round; method 0 = per slot, 1 = batch.
    let mut times = vec![[Vec::new(), Vec::new()]; cases.len()];
    let mut flip = 0usize;
    for round in 0..rounds {
        check_interrupted()?;
        for k in 0..cases.len() * 2 {
            let idx = (k + round) % (cases.len() * 2);
            let (c, method) = (idx / 2, idx % 2);
            let case = &cases[c];
            // Put the map at "the other" table first (untimed), then time
            // writing this table's changed slots.
            flip ^= 1;
            let from = &case.tables[1 - flip];
            let to = &case.tables[flip];
            update_batch(fd, &keys_all, from)?;
            let keys: Vec<u32> = case.slots.iter().map(|&s| base + s).collect();
            let values: Vec<u32> = case.slots.iter().map(|&s| to[s as usize]).collect();
            let start = Instant::now();
            if method == 0 {
                for (k, v) in keys.iter().zip(&values) {
                    rings.set(*k, *v, 0)?;
                }
            } else {
                update_batch(fd, &keys, &values)?;
            }
            times[c][method].push(ms(start));
            // The write took: spot-check the first and last written slot.
            for s in [case.slots[0], *case.slots.last().expect("slots")] {
                let got = rings.get(&(base + s), 0)?;
                if got != to[s as usize] {
                    bail!(
                        "RINGS[{s}] holds {got} after the write, expected {}",
                        to[s as usize]
                    );
                }
            }
        }
    }
    let rows: Vec<Value> = cases
        .iter()
        .zip(&times)
        .map(|(case, t)| {
            let ratios: Vec<f64> = t[0].iter().zip(&t[1]).map(|(a, b)| a / b).collect();
            json!({
                "case": case.name,
                "slots_written": case.slots.len(),
                "slots_written_pct": round_to(100.0 * case.slots.len() as f64 / M as f64, 3),
                "per_slot_update_ms_median": round_to(median(&t[0]), 3),
                "batch_update_ms_median": round_to(median(&t[1]), 3),
                "per_slot_ns_per_slot": round_to(median(&t[0]) * 1e6 / case.slots.len() as f64, 1),
                "batch_ns_per_slot": round_to(median(&t[1]) * 1e6 / case.slots.len() as f64, 1),
                "per_slot_over_batch_ratio_median": round_to(median(&ratios), 2),
            })
        })
        .collect();
    Ok(json!({
        "table_size": M,
        "rounds": rounds,
        "cases": rows,
        "daemon_today": "per-slot Array::set (one BPF_MAP_UPDATE_ELEM each) of only the slots that \
            differ from the idle half of the service's A/B ring (which holds the table from before \
            the previous change), then one SERVICES update that swaps the halves \
            (lb-user/src/plan.rs, dataplane.rs apply)",
        "batch_api": "aya 0.14 has no batch update; the bench calls bpf(BPF_MAP_UPDATE_BATCH) \
            directly with arrays of keys and values",
    }))
}
