//! Part 3 of `cargo xtask bench`: UDP forwarding on the namespace lab.
//!
//! A raw AF_PACKET sender in the client namespace sends 60-byte UDP frames
//! (256 flows, round robin) three ways, interleaved in every round:
//! - `direct`: to the backends' own MACs (the VIP is on their `lo`), no LB;
//! - `mqlb`: to the LB's MAC, forwarded by the XDP program (IPIP, DSR);
//! - `nftables_dnat`: to a second LB host without XDP that forwards with an
//!   nftables DNAT rule (jhash over source address and port, conntrack).
//!
//! Each backend counts the frames with an nftables counter (and drops them).
//!
//! On veth everything a frame causes (bridge, LB, backend) runs as softirq
//! work inline in the sender's `sendmmsg`, on the sender's CPU. So the CPU
//! cost per packet is the sender thread's CPU time (plus any ksoftirqd time)
//! over the packets sent, and the LB's cost is that minus the `direct` cost
//! of the same round: the LB's processing plus the one extra veth/bridge
//! hop any LB on this topology adds (and, for mqlb, the backend's decap).
//! These clocks count only this work, not other processes on the machine.

use crate::bench_util::{
    check_interrupted, fast_rounds, in_node, link_info, median, nft, nft_counter, round_to,
    udp_frame, PlainLb, RawSender, SendStats,
};
use crate::lab::Lab;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::time::Duration;

const PORT: u16 = 9000;
const FLOWS: usize = 256;
const PAYLOAD: usize = 18; // 14 + 20 + 8 + 18 = 60-byte frames
const COUNTER_TABLE: &str = "mqlbbench";
/// Loss allowed at the "highest rate" (0.1 %).
const MAX_LOSS: f64 = 0.001;

pub const VARIANTS: [&str; 3] = ["direct", "mqlb", "nftables_dnat"];

/// One send and what the backends counted.
#[derive(Clone, Copy, Debug)]
struct Run {
    stats: SendStats,
    delivered: u64,
}

impl Run {
    fn cpu_ns_per_packet(&self) -> f64 {
        (self.stats.thread_cpu_ns + self.stats.softirqd_ns) as f64 / self.stats.sent.max(1) as f64
    }
    fn loss(&self) -> f64 {
        1.0 - self.delivered as f64 / self.stats.sent.max(1) as f64
    }
}

struct Setup<'a> {
    lab: &'a Lab,
    client_ifindex: i32,
    frames: Vec<Vec<Vec<u8>>>,
}

impl Setup<'_> {
    fn delivered(&self) -> Result<u64> {
        let mut sum = 0;
        for b in &self.lab.backends {
            sum += nft_counter(&b.ns, COUNTER_TABLE, "fwd")?;
        }
        Ok(sum)
    }

    fn run(&self, variant: usize, rate: Option<f64>, dur: Duration) -> Result<Run> {
        let before = self.delivered()?;
        let frames = &self.frames[variant];
        let ifindex = self.client_ifindex;
        let stats = in_node(&self.lab.client, move || -> Result<SendStats> {
            let sender = RawSender::open(ifindex)?;
            Ok(sender.send(rate, dur, None, |n, buf| {
                let f = &frames[n as usize % frames.len()];
                buf[..f.len()].copy_from_slice(f);
                f.len()
            }))
        })??;
        // Forwarding is synchronous on veth; a short pause covers anything
        // left to ksoftirqd.
        std::thread::sleep(Duration::from_millis(30));
        let delivered = self.delivered()? - before;
        Ok(Run { stats, delivered })
    }
}

/// Runs part 3. `rounds` interleaved rounds of `run_ms` unpaced sends per
/// variant, then a paced step-down for any variant that lost ≥ 0.1 %.
pub fn run(lab: &Lab, plain: &PlainLb, rounds: usize, run_ms: u64) -> Result<Value> {
    // mqlb: a UDP service on the VIP with every backend.
    lab.add_service("bench-udp", PORT, "udp", None)?;
    for b in &lab.backends {
        lab.add_backend("bench-udp", b)?;
    }
    // nftables DNAT on the plain LB, spreading flows by hash like an LB.
    let map: Vec<String> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {}", b.addr))
        .collect();
    nft(
        &plain.node.ns,
        &format!(
            "table ip mqlbbench {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
             ip daddr {vip} udp dport {PORT} dnat to jhash ip saddr . udp sport mod {n} map {{ {map} }}\n }}\n}}\n",
            vip = lab.vip,
            n = lab.backends.len(),
            map = map.join(", ")
        ),
    )
    .context("nftables DNAT on the plain LB")?;
    // Every backend counts and drops what reaches it (after decap).
    for b in &lab.backends {
        nft(
            &b.ns,
            &format!(
                "table inet {COUNTER_TABLE} {{\n counter fwd {{ }}\n chain pre {{\n  \
                 type filter hook prerouting priority raw; policy accept;\n  \
                 udp dport {PORT} counter name \"fwd\" drop\n }}\n}}\n"
            ),
        )
        .with_context(|| format!("nftables counter in {}", b.ns))?;
    }
    let (client_mac, client_ifindex) = link_info(&lab.client.ns, &lab.client.iface)?;
    let (lb_mac, _) = link_info(&lab.lb.ns, &lab.lb.iface)?;
    let mut backend_macs = Vec::new();
    for b in &lab.backends {
        backend_macs.push(link_info(&b.ns, &b.iface)?.0);
    }
    let make = |dst_mac: &dyn Fn(usize) -> [u8; 6]| -> Vec<Vec<u8>> {
        (0..FLOWS)
            .map(|i| {
                udp_frame(
                    dst_mac(i),
                    client_mac,
                    lab.client.addr,
                    lab.vip,
                    20000 + i as u16,
                    PORT,
                    PAYLOAD,
                )
            })
            .collect()
    };
    let frames = vec![
        make(&|i| backend_macs[i % backend_macs.len()]),
        make(&|_| lb_mac),
        make(&|_| plain.mac),
    ];
    let frame_bytes = frames[0][0].len();
    let setup = Setup {
        lab,
        client_ifindex,
        frames,
    };

    // Warm-up: neighbours resolved, conntrack entries made, caches warm;
    // and a check that each path forwards at all.
    for (v, name) in VARIANTS.iter().enumerate() {
        let r = setup.run(v, Some(20_000.0), Duration::from_millis(300))?;
        if r.loss() > 0.05 {
            bail!(
                "{name}: only {} of {} warm-up frames reached the backends\n{}",
                r.delivered,
                r.stats.sent,
                lab.diagnostics()
            );
        }
    }

    let dur = Duration::from_millis(run_ms);
    // runs[v][round]
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for k in 0..VARIANTS.len() {
            check_interrupted()?;
            let v = (k + round) % VARIANTS.len();
            runs[v].push(setup.run(v, None, dur)?);
        }
    }

    let cost: Vec<Vec<f64>> = runs
        .iter()
        .map(|rs| rs.iter().map(Run::cpu_ns_per_packet).collect())
        .collect();
    let net = |v: usize| -> Vec<f64> { (0..rounds).map(|r| cost[v][r] - cost[0][r]).collect() };
    let (net_mqlb, net_nft) = (net(1), net(2));
    let ratio: Vec<f64> = (0..rounds).map(|r| net_mqlb[r] / net_nft[r]).collect();
    let fast = fast_rounds(&cost[0]);
    let pick = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .zip(&fast)
            .filter(|(_, f)| **f)
            .map(|(x, _)| *x)
            .collect()
    };

    // Highest rate with < 0.1 % loss: the unpaced rate when it lost less;
    // otherwise paced runs stepping down from it.
    let mut variants = serde_json::Map::new();
    let mut max_rates = Vec::new();
    for (v, name) in VARIANTS.iter().enumerate() {
        let rates: Vec<f64> = runs[v].iter().map(|r| r.stats.rate_pps()).collect();
        let losses: Vec<f64> = runs[v].iter().map(Run::loss).collect();
        let unpaced_rate = median(&rates);
        let mut steps = Vec::new();
        let max_rate = if median(&losses) < MAX_LOSS {
            unpaced_rate
        } else {
            let mut found = f64::NAN;
            for f in [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1] {
                check_interrupted()?;
                let target = unpaced_rate * f;
                let r = setup.run(v, Some(target), dur)?;
                steps.push(json!({
                    "offered_pps": round_to(target, 0),
                    "sent_pps": round_to(r.stats.rate_pps(), 0),
                    "loss_pct": round_to(100.0 * r.loss(), 4),
                }));
                if r.loss() < MAX_LOSS && r.stats.rate_pps() >= 0.98 * target {
                    found = r.stats.rate_pps();
                    break;
                }
            }
            found
        };
        max_rates.push(max_rate);
        variants.insert(
            name.to_string(),
            json!({
                "cpu_ns_per_packet_median": round_to(median(&cost[v]), 1),
                "cpu_ns_per_packet_per_round": cost[v].iter().map(|x| round_to(*x, 1)).collect::<Vec<_>>(),
                "net_of_direct_ns_per_packet_median": if v == 0 { Value::Null } else { json!(round_to(median(&net(v)), 1)) },
                "net_of_direct_ns_per_packet_median_fast_rounds": if v == 0 { Value::Null } else { json!(round_to(median(&pick(&net(v))), 1)) },
                "unpaced_rate_pps_median": round_to(unpaced_rate, 0),
                "unpaced_loss_pct_per_round": losses.iter().map(|l| round_to(100.0 * l, 4)).collect::<Vec<_>>(),
                "max_rate_pps_below_0_1pct_loss": round_to(max_rate, 0),
                "step_down": steps,
                "packets_sent_total": runs[v].iter().map(|r| r.stats.sent).sum::<u64>(),
                "packets_delivered_total": runs[v].iter().map(|r| r.delivered).sum::<u64>(),
            }),
        );
    }
    Ok(json!({
        "xdp_mode": lab.mode.as_arg(),
        "frame_bytes": frame_bytes,
        "flows": FLOWS,
        "rounds": rounds,
        "run_ms": run_ms,
        "fast_rounds": fast.iter().filter(|f| **f).count(),
        "variants": variants,
        "lb_cost_ns_per_packet_mqlb": round_to(median(&net_mqlb), 1),
        "lb_cost_ns_per_packet_nftables_dnat": round_to(median(&net_nft), 1),
        "mqlb_over_nft_cost_ratio_median": round_to(median(&ratio), 3),
        "mqlb_over_nft_cost_ratio_per_round": ratio.iter().map(|x| round_to(*x, 3)).collect::<Vec<_>>(),
        "mqlb_over_nft_cost_ratio_median_fast_rounds": round_to(median(&pick(&ratio)), 3),
        "max_rate_pps_mqlb": round_to(max_rates[1], 0),
        "max_rate_pps_nftables_dnat": round_to(max_rates[2], 0),
        "max_rate_pps_direct": round_to(max_rates[0], 0),
        "mqlb_over_nft_max_rate_ratio": round_to(max_rates[1] / max_rates[2], 3),
        "method": "raw AF_PACKET sender (sendmmsg, 32 per call) in the client namespace; on veth the \
            whole path runs inline in the sender's softirq, so CPU per packet = sender thread CPU time \
            + ksoftirqd time, over packets sent; LB cost = that minus `direct` in the same round \
            (includes one extra veth+bridge hop, and for mqlb the backend's decap); counted at the \
            backends by nftables counters",
    }))
}
