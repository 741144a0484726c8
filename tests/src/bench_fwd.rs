//! Part 3 of `cargo xtask bench`: UDP forwarding on the namespace lab.
//!
//! A raw AF_PACKET sender in the client namespace sends 60-byte UDP frames
//! (256 flows, round robin) four ways, interleaved in every round:
//! - `direct`: to the backends' own MACs (the VIP is on their `lo`), no LB;
//! - `l2_bounce`: to a third host that only rewrites the MACs and sends the
//!   frame back out to a backend (nftables `fwd` in the netdev ingress hook):
//!   the cheapest possible forwarder, i.e. the cost of the extra veth/bridge
//!   hop any LB on this topology adds;
//! - `mqlb`: to the LB's MAC, forwarded by the XDP program (IPIP, DSR);
//! - `nftables_dnat`: to a second LB host without XDP that forwards with an
//!   nftables DNAT rule (jhash over source address and port, conntrack).
//!
//! Each backend counts the frames with an nftables counter (and drops them).
//!
//! On veth everything a frame causes (bridge, LB, backend) runs as softirq
//! work inline in the sender's `sendmmsg`, on the sender's CPU. So the CPU
//! cost per forwarded packet is the sender thread's CPU time (plus any
//! ksoftirqd time) over the packets the backends counted. The LB's own
//! processing is that minus `l2_bounce` of the same round; minus `direct`
//! it also includes the extra hop. mqlb's figures include the backends'
//! decap (the price of DSR over IPIP). These clocks count only this work,
//! not other processes on the machine.

use crate::bench_util::{
    check_interrupted, fast_rounds, in_node, link_info, median, nft, nft_counter, round_to,
    udp_frame, PlainLb, RawSender,
};
use crate::lab::Lab;
use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// Each variant has its own UDP port (9000 + index), so one round can
/// interleave them finely and the backends still count each apart.
const PORT_BASE: u16 = 9000;
const FLOWS: usize = 256;
const PAYLOAD: usize = 18; // 14 + 20 + 8 + 18 = 60-byte frames
const COUNTER_TABLE: &str = "mqlbbench";
/// Loss allowed at the "highest rate" (0.1 %).
const MAX_LOSS: f64 = 0.001;
/// One slice of a round: this long on one variant, then the next variant.
/// The VM's speed state flips every few seconds; slices this short put
/// every variant of a round in the same mix of states.
const SLICE: Duration = Duration::from_millis(25);

pub const VARIANTS: [&str; 4] = ["direct", "l2_bounce", "mqlb", "nftables_dnat"];
const DIRECT: usize = 0;
const BOUNCE: usize = 1;
const MQLB: usize = 2;
const NFT: usize = 3;

fn port(variant: usize) -> u16 {
    PORT_BASE + variant as u16
}

/// One variant's share of a round and what the backends counted.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    sent: u64,
    cpu_ns: u64,
    secs: f64,
    delivered: u64,
}

impl Run {
    /// CPU ns per packet the backends received (forwarded).
    fn cpu_ns_per_packet(&self) -> f64 {
        self.cpu_ns as f64 / self.delivered.max(1) as f64
    }
    fn loss(&self) -> f64 {
        1.0 - self.delivered as f64 / self.sent.max(1) as f64
    }
    fn rate_pps(&self) -> f64 {
        self.sent as f64 / self.secs
    }
}

struct Setup<'a> {
    lab: &'a Lab,
    client_ifindex: i32,
    frames: Vec<Vec<Vec<u8>>>,
}

impl Setup<'_> {
    /// Packets counted at the backends, per variant.
    fn delivered(&self) -> Result<Vec<u64>> {
        let mut sum = vec![0; VARIANTS.len()];
        for b in &self.lab.backends {
            for (v, s) in sum.iter_mut().enumerate() {
                *s += nft_counter(&b.ns, COUNTER_TABLE, &format!("pkts{v}"))?;
            }
        }
        Ok(sum)
    }

    /// `slices` slices of [`SLICE`] for each of `variants`, in turn, at
    /// `rate` (None: unpaced). One [`Run`] per variant.
    fn round(&self, variants: &[usize], rate: Option<f64>, slices: usize) -> Result<Vec<Run>> {
        let before = self.delivered()?;
        let ifindex = self.client_ifindex;
        let frames = &self.frames;
        let mut runs = in_node(&self.lab.client, move || -> Result<Vec<Run>> {
            let sender = RawSender::open(ifindex)?;
            let mut runs = vec![Run::default(); variants.len()];
            for slice in 0..slices {
                for k in 0..variants.len() {
                    // Rotate the order so no variant always follows another.
                    let i = (k + slice) % variants.len();
                    let fr = &frames[variants[i]];
                    let st = sender.send(rate, SLICE, None, |n, buf| {
                        let f = &fr[n as usize % fr.len()];
                        buf[..f.len()].copy_from_slice(f);
                        f.len()
                    });
                    runs[i].sent += st.sent;
                    runs[i].cpu_ns += st.thread_cpu_ns + st.softirqd_ns;
                    runs[i].secs += st.elapsed.as_secs_f64();
                }
            }
            Ok(runs)
        })??;
        // Forwarding is synchronous on veth; a short pause covers anything
        // left to ksoftirqd.
        std::thread::sleep(Duration::from_millis(30));
        let after = self.delivered()?;
        for (run, &v) in runs.iter_mut().zip(variants) {
            run.delivered = after[v] - before[v];
        }
        Ok(runs)
    }
}

/// Runs part 3: `rounds` rounds in which every variant is sent unpaced for
/// `run_ms` in all, in interleaved slices; then a paced step-down for any
/// variant that lost ≥ 0.1 % in some round.
pub fn run(
    lab: &Lab,
    plain: &PlainLb,
    bounce: &PlainLb,
    rounds: usize,
    run_ms: u64,
) -> Result<Value> {
    // mqlb: a UDP service on the VIP with every backend.
    lab.add_service("bench-udp", port(MQLB), "udp", None)?;
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
             ip daddr {vip} udp dport {p} dnat to jhash ip saddr . udp sport mod {n} map {{ {map} }}\n }}\n}}\n",
            vip = lab.vip,
            p = port(NFT),
            n = lab.backends.len(),
            map = map.join(", ")
        ),
    )
    .context("nftables DNAT on the plain LB")?;
    // The bounce: new source and destination MAC, back out of the port.
    let (b1_mac, _) = link_info(&lab.backends[0].ns, &lab.backends[0].iface)?;
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    nft(
        &bounce.node.ns,
        &format!(
            "table netdev mqlbbounce {{\n chain in {{\n  \
             type filter hook ingress device \"{dev}\" priority 0; policy accept;\n  \
             udp dport {p} ether saddr set {src} ether daddr set {dst} fwd to \"{dev}\"\n }}\n}}\n",
            dev = bounce.node.iface,
            p = port(BOUNCE),
            src = mac(bounce.mac),
            dst = mac(b1_mac),
        ),
    )
    .context("nftables bounce on the bounce host")?;
    // Every backend counts and drops what reaches it (after decap), per port.
    let rules: String = (0..VARIANTS.len())
        .map(|v| {
            format!(
                " counter pkts{v} {{ }}\n chain pre{v} {{\n  \
                 type filter hook prerouting priority raw; policy accept;\n  \
                 udp dport {} counter name \"pkts{v}\" drop\n }}\n",
                port(v)
            )
        })
        .collect();
    for b in &lab.backends {
        nft(
            &b.ns,
            &format!("table inet {COUNTER_TABLE} {{\n{rules}}}\n"),
        )
        .with_context(|| format!("nftables counters in {}", b.ns))?;
    }
    let (client_mac, client_ifindex) = link_info(&lab.client.ns, &lab.client.iface)?;
    let (lb_mac, _) = link_info(&lab.lb.ns, &lab.lb.iface)?;
    let mut backend_macs = Vec::new();
    for b in &lab.backends {
        backend_macs.push(link_info(&b.ns, &b.iface)?.0);
    }
    let make = |v: usize, dst_mac: &dyn Fn(usize) -> [u8; 6]| -> Vec<Vec<u8>> {
        (0..FLOWS)
            .map(|i| {
                udp_frame(
                    dst_mac(i),
                    client_mac,
                    lab.client.addr,
                    lab.vip,
                    20000 + i as u16,
                    port(v),
                    PAYLOAD,
                )
            })
            .collect()
    };
    let frames = vec![
        make(DIRECT, &|i| backend_macs[i % backend_macs.len()]),
        make(BOUNCE, &|_| bounce.mac),
        make(MQLB, &|_| lb_mac),
        make(NFT, &|_| plain.mac),
    ];
    let frame_bytes = frames[0][0].len();
    let setup = Setup {
        lab,
        client_ifindex,
        frames,
    };

    // Warm-up: neighbours resolved, conntrack entries made, caches warm;
    // and a check that each path forwards at all.
    let all: Vec<usize> = (0..VARIANTS.len()).collect();
    let warm = setup.round(&all, Some(20_000.0), 4)?;
    for (r, name) in warm.iter().zip(VARIANTS) {
        if r.loss() > 0.05 {
            bail!(
                "{name}: only {} of {} warm-up frames reached the backends\n{}",
                r.delivered,
                r.sent,
                lab.diagnostics()
            );
        }
    }

    let slices = (run_ms as usize / SLICE.as_millis() as usize).max(1);
    // runs[v][round]
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); VARIANTS.len()];
    for _ in 0..rounds {
        check_interrupted()?;
        for (v, r) in setup.round(&all, None, slices)?.into_iter().enumerate() {
            runs[v].push(r);
        }
    }

    let cost: Vec<Vec<f64>> = runs
        .iter()
        .map(|rs| rs.iter().map(Run::cpu_ns_per_packet).collect())
        .collect();
    // Per round: a variant minus a baseline, and mqlb's over nftables'.
    let minus = |v: usize, base: usize| -> Vec<f64> {
        (0..rounds).map(|r| cost[v][r] - cost[base][r]).collect()
    };
    let over = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let (proc_mqlb, proc_nft) = (minus(MQLB, BOUNCE), minus(NFT, BOUNCE));
    let (hop_mqlb, hop_nft) = (minus(MQLB, DIRECT), minus(NFT, DIRECT));
    let ratio_proc = over(&proc_mqlb, &proc_nft);
    let ratio_hop = over(&hop_mqlb, &hop_nft);
    let fast = fast_rounds(&cost[DIRECT]);
    let pick = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .zip(&fast)
            .filter(|(_, f)| **f)
            .map(|(x, _)| *x)
            .collect()
    };
    let rounded = |v: &[f64], d: i32| v.iter().map(|x| round_to(*x, d)).collect::<Vec<_>>();

    // Highest rate with < 0.1 % loss: the unpaced rate when it lost less;
    // otherwise paced runs stepping down from it.
    let mut variants = serde_json::Map::new();
    let mut max_rates = Vec::new();
    for (v, name) in VARIANTS.iter().enumerate() {
        let rates: Vec<f64> = runs[v].iter().map(Run::rate_pps).collect();
        let losses: Vec<f64> = runs[v].iter().map(Run::loss).collect();
        let unpaced_rate = median(&rates);
        let mut steps = Vec::new();
        let max_rate = if losses.iter().all(|l| *l < MAX_LOSS) {
            unpaced_rate
        } else {
            let mut found = f64::NAN;
            for f in [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1] {
                check_interrupted()?;
                let target = unpaced_rate * f;
                let r = setup.round(&[v], Some(target), slices)?[0];
                steps.push(json!({
                    "offered_pps": round_to(target, 0),
                    "sent_pps": round_to(r.rate_pps(), 0),
                    "loss_pct": round_to(100.0 * r.loss(), 4),
                }));
                if r.loss() < MAX_LOSS && r.rate_pps() >= 0.98 * target {
                    found = r.rate_pps();
                    break;
                }
            }
            found
        };
        max_rates.push(max_rate);
        let net = |base: usize| {
            if v <= base {
                Value::Null
            } else {
                json!(round_to(median(&minus(v, base)), 1))
            }
        };
        variants.insert(
            name.to_string(),
            json!({
                "cpu_ns_per_packet_median": round_to(median(&cost[v]), 1),
                "cpu_ns_per_packet_per_round": rounded(&cost[v], 1),
                "minus_l2_bounce_ns_per_packet_median": net(BOUNCE),
                "minus_direct_ns_per_packet_median": net(DIRECT),
                "unpaced_rate_pps_median": round_to(unpaced_rate, 0),
                "unpaced_loss_pct_per_round": rounded(&losses.iter().map(|l| 100.0 * l).collect::<Vec<_>>(), 4),
                "max_rate_pps_below_0_1pct_loss": round_to(max_rate, 0),
                "step_down": steps,
                "packets_sent_total": runs[v].iter().map(|r| r.sent).sum::<u64>(),
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
        "lb_processing_ns_per_packet_mqlb": round_to(median(&proc_mqlb), 1),
        "lb_processing_ns_per_packet_nftables_dnat": round_to(median(&proc_nft), 1),
        "mqlb_over_nft_processing_ratio_median": round_to(median(&ratio_proc), 3),
        "mqlb_over_nft_processing_ratio_per_round": rounded(&ratio_proc, 3),
        "mqlb_over_nft_processing_ratio_median_fast_rounds": round_to(median(&pick(&ratio_proc)), 3),
        "lb_hop_ns_per_packet_mqlb": round_to(median(&hop_mqlb), 1),
        "lb_hop_ns_per_packet_nftables_dnat": round_to(median(&hop_nft), 1),
        "mqlb_over_nft_hop_ratio_median": round_to(median(&ratio_hop), 3),
        "mqlb_over_nft_hop_ratio_per_round": rounded(&ratio_hop, 3),
        "max_rate_pps_direct": round_to(max_rates[DIRECT], 0),
        "max_rate_pps_l2_bounce": round_to(max_rates[BOUNCE], 0),
        "max_rate_pps_mqlb": round_to(max_rates[MQLB], 0),
        "max_rate_pps_nftables_dnat": round_to(max_rates[NFT], 0),
        "mqlb_over_nft_max_rate_ratio": round_to(max_rates[MQLB] / max_rates[NFT], 3),
        "method": "raw AF_PACKET sender (sendmmsg, 32 per call) in the client namespace, the four \
            variants interleaved in 25 ms slices within each round; on veth the whole path runs inline in the sender's softirq, so CPU per forwarded packet = \
            (sender thread CPU time + ksoftirqd time) / packets counted at the backends; \
            LB processing = variant minus l2_bounce (an nftables netdev MAC rewrite + fwd) in the \
            same round; LB hop = variant minus direct (adds the veth/bridge hop); mqlb's figures \
            include the backends' IPIP decap; a highest rate is the unpaced rate when every round \
            lost < 0.1 %, else found by paced runs stepping down",
    }))
}
