//! Counter indexes shared by the program, the CLI and the metrics.
//!
//! Both enums are append-only: a variant's number is its index in a pinned
//! per-CPU array, so renumbering would make an old daemon misread a new
//! program's counters.

/// Why the program dropped a packet. Index into the `DROPS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The service exists but has no backend in its Maglev table.
    NoBackend = 0,
    /// An IPv4 fragment addressed to a service: ports are missing or unreliable.
    Fragment = 1,
    /// An IPv4 header with options addressed to a service (not forwarded, as Katran).
    IpOptions = 2,
    /// A packet to a service whose TCP/UDP header is cut short or malformed.
    MalformedL4 = 3,
    /// A packet to a service whose IP header is inconsistent (IPv4 ihl or total
    /// length, IPv6 payload length).
    MalformedIp = 4,
    /// Too big to encapsulate and DF clear: cannot send fragmentation-needed.
    TooBigNoDf = 5,
    /// `bpf_xdp_adjust_head`/`adjust_tail` refused to grow or shrink the frame.
    AdjustFailed = 6,
    /// The Maglev slot or conntrack entry names a backend id with no map entry.
    BackendMissing = 7,
    /// The kernel FIB has no usable route to the backend (blackhole, unreachable).
    NoRoute = 8,
    /// An IPv6 first fragment addressed to a service (as `Fragment` for IPv4).
    Ipv6Fragment = 9,
    /// An IPv6 packet to a service with an extension header mqlb does not
    /// forward: a routing header with segments left (the VIP is not its
    /// final destination).
    Ipv6ExtHeader = 10,
    /// Too big to encapsulate for an IPv6 client, and the backend's MTU leaves
    /// less than IPv6's minimum 1280 bytes: packet-too-big cannot help (RFC 8201).
    MtuBelowIpv6Min = 11,
    /// An ICMP error quoting a service flow, too big to encapsulate to that
    /// flow's backend (an ICMP error is never answered with ICMP).
    IcmpErrorTooBig = 12,
}

impl DropReason {
    /// Number of variants; the `DROPS` map has this many entries.
    pub const COUNT: u32 = 13;
    /// Every variant, in index order.
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        DropReason::NoBackend,
        DropReason::Fragment,
        DropReason::IpOptions,
        DropReason::MalformedL4,
        DropReason::MalformedIp,
        DropReason::TooBigNoDf,
        DropReason::AdjustFailed,
        DropReason::BackendMissing,
        DropReason::NoRoute,
        DropReason::Ipv6Fragment,
        DropReason::Ipv6ExtHeader,
        DropReason::MtuBelowIpv6Min,
        DropReason::IcmpErrorTooBig,
    ];

    /// Stable snake_case name used by `mqlb stats` and the metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::Fragment => "fragment",
            DropReason::IpOptions => "ip_options",
            DropReason::MalformedL4 => "malformed_l4",
            DropReason::MalformedIp => "malformed_ip",
            DropReason::TooBigNoDf => "too_big_no_df",
            DropReason::AdjustFailed => "adjust_failed",
            DropReason::BackendMissing => "backend_missing",
            DropReason::NoRoute => "no_route",
            DropReason::Ipv6Fragment => "ipv6_fragment",
            DropReason::Ipv6ExtHeader => "ipv6_ext_header",
            DropReason::MtuBelowIpv6Min => "mtu_below_ipv6_min",
            DropReason::IcmpErrorTooBig => "icmp_error_too_big",
        }
    }

    /// The reason stored at `index`, if any.
    pub const fn from_index(index: u32) -> Option<DropReason> {
        if index < Self::COUNT {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }
}

/// Global per-CPU event counters. Index into the `STATS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Every packet the program saw.
    Rx = 0,
    /// Verdict XDP_PASS (not ours, or handed to the kernel).
    Pass = 1,
    /// Verdict XDP_TX (encapsulated, or an ICMP answer, out of the same port).
    Tx = 2,
    /// Verdict XDP_REDIRECT (encapsulated out of another interface).
    Redirect = 3,
    /// Verdict XDP_DROP (see `DROPS` for why).
    Drop = 4,
    /// A packet to a service found its flow in conntrack.
    CtHit = 5,
    /// A packet to a service chose its backend from the Maglev table.
    CtMiss = 6,
    /// ICMP fragmentation-needed or ICMPv6 packet-too-big sent back to a client.
    IcmpTooBig = 7,
    /// The backend's cached next hop was missing: `bpf_fib_lookup` used.
    FibLookup = 8,
    /// The next hop is not resolved yet: handed to the kernel (XDP_PASS).
    NexthopPass = 9,
    /// Decap program: IPIP stripped and passed to the stack.
    Decap = 10,
    /// An ICMP or ICMPv6 error quoting a service flow (a router's too-big, an
    /// unreachable), forwarded to the backend that owns the flow.
    IcmpForward = 11,
}

impl Counter {
    /// Number of variants; the `STATS` map has this many entries.
    pub const COUNT: u32 = 12;
    /// Every variant, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Rx,
        Counter::Pass,
        Counter::Tx,
        Counter::Redirect,
        Counter::Drop,
        Counter::CtHit,
        Counter::CtMiss,
        Counter::IcmpTooBig,
        Counter::FibLookup,
        Counter::NexthopPass,
        Counter::Decap,
        Counter::IcmpForward,
    ];

    /// Stable snake_case name used by `mqlb stats` and the metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Rx => "rx",
            Counter::Pass => "pass",
            Counter::Tx => "tx",
            Counter::Redirect => "redirect",
            Counter::Drop => "drop",
            Counter::CtHit => "conntrack_hit",
            Counter::CtMiss => "conntrack_miss",
            Counter::IcmpTooBig => "icmp_too_big",
            Counter::FibLookup => "fib_lookup",
            Counter::NexthopPass => "nexthop_pass",
            Counter::Decap => "decap",
            Counter::IcmpForward => "icmp_forward",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_match_discriminants() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "DropReason::{r:?} out of order");
            assert_eq!(DropReason::from_index(i as u32), Some(*r));
        }
        assert_eq!(DropReason::from_index(DropReason::COUNT), None);
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "Counter::{c:?} out of order");
        }
    }

    #[test]
    fn names_are_unique_snake_case() {
        let mut names: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.extend(Counter::ALL.iter().map(|c| c.name()));
        for n in &names {
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{n}"
            );
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }
}
