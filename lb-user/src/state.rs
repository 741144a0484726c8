//! The desired state the daemon owns: services, their backends, the hash
//! seed, and the ids handed out for them. Every change goes through a method
//! here that validates it completely before touching anything, so a change is
//! either applied whole or refused with a [`StateError`].
//!
//! Ids are part of the state, not derived from it: conntrack entries in the
//! pinned `CT4` map hold backend ids across daemon restarts, so an id must
//! keep naming the same backend. Rules:
//! - service ids are `1..MAX_SERVICES`, lowest free first (a service's
//!   counters are zeroed when its id is handed out again);
//! - backend ids are `1..MAX_BACKENDS`; a deleted backend (or every backend of
//!   a deleted service) keeps its id and its `BACKENDS` entry in state
//!   `REMOVED`, so established flows finish. Never-used ids are handed out
//!   first; when none is left, the oldest removed id is reused.
//!
//! [`StateStore`] persists the state atomically (write a temporary file, fsync,
//! rename, fsync the directory).

use std::{
    collections::BTreeSet,
    fmt,
    fs::{self, File},
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    str::FromStr,
};

use lb_common::{maglev::is_prime, HashMode, MAX_BACKENDS, MAX_SERVICES, RING_DEFAULT, RING_MAX};
use serde::{Deserialize, Serialize};

use crate::health::{HealthConfig, HealthSpec};

/// Version of the state file format.
pub const STATE_FORMAT: u32 = 1;
/// Weight of a backend added without `--weight`.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 65535;
/// UDP conntrack idle timeout of a service created without `--udp-idle`, in seconds.
pub const DEFAULT_UDP_IDLE_S: u32 = 60;
/// Largest UDP idle timeout, in seconds (one day).
pub const MAX_UDP_IDLE_S: u32 = 86_400;
/// Longest service name.
pub const MAX_NAME_LEN: usize = 63;

/// A change a person can get wrong, with the message they see.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("unknown service {name}")]
    UnknownService { name: String },
    #[error("service {name} already exists")]
    DuplicateName { name: String },
    #[error("{vip}/{proto} is already used by service {other}")]
    DuplicateVip {
        vip: Vip,
        proto: Proto,
        other: String,
    },
    #[error(
        "{ip}/{proto} already has a port range: service {other} ({other_vip}); one range per \
         vip and protocol (exact-port services on the vip are fine, inside the range too)"
    )]
    DuplicateRange {
        ip: IpAddr,
        proto: Proto,
        other: String,
        other_vip: Vip,
    },
    #[error(
        "a {check} check of port-range service {vip} needs a check port (--check-port PORT): \
         a range has no single service port to probe"
    )]
    RangeNeedsCheckPort { vip: Vip, check: &'static str },
    #[error("bad port {input:?}: expected a number from 1 to 65535")]
    BadPort { input: String },
    #[error("port {port} is not a port of service {service} ({vip})")]
    PortNotInVip {
        service: String,
        vip: Vip,
        port: u16,
    },
    #[error(
        "port {port} of service {service} belongs to service {other} ({other_vip}): an exact \
         port wins over a range; ask `mqlb flow {other}`"
    )]
    PortOwnedByExact {
        service: String,
        port: u16,
        other: String,
        other_vip: Vip,
    },
    #[error(
        "invalid service name {name:?}: use 1-{MAX_NAME_LEN} letters, digits, '.', '_' or '-', \
         starting with a letter or digit"
    )]
    BadName { name: String },
    #[error("bad address {input:?}: {reason}")]
    BadAddress { input: String, reason: String },
    #[error("weight {weight} is out of range (1-{MAX_WEIGHT})")]
    WeightOutOfRange { weight: u64 },
    #[error("udp idle timeout {secs} is out of range (1-{MAX_UDP_IDLE_S} seconds)")]
    UdpIdleOutOfRange { secs: u64 },
    #[error("ring size {size} must be a prime number from 3 to {RING_MAX}")]
    BadRingSize { size: u64 },
    #[error("unknown protocol {input:?} (use tcp or udp)")]
    BadProto { input: String },
    #[error("unknown hash mode {input:?} (use five-tuple, src-ip or rtp)")]
    BadHash { input: String },
    #[error("backend {addr} already exists in service {service}")]
    BackendExists { service: String, addr: IpAddr },
    #[error("backend {addr} not found in service {service}")]
    BackendNotFound { service: String, addr: IpAddr },
    #[error("service limit reached ({} services)", MAX_SERVICES - 1)]
    TooManyServices,
    #[error("backend limit reached ({} backends in use)", MAX_BACKENDS - 1)]
    TooManyBackends,
    #[error("nothing to change: give a weight or a new state")]
    EmptyUpdate,
    #[error("nothing to change: give a health check option")]
    EmptyServiceUpdate,
    /// A health check setting (see [`crate::health::HealthConfig::apply`]).
    #[error("{reason}")]
    BadCheck { reason: String },
}

impl StateError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            StateError::UnknownService { .. } | StateError::BackendNotFound { .. } => 404,
            StateError::DuplicateName { .. }
            | StateError::DuplicateVip { .. }
            | StateError::DuplicateRange { .. }
            | StateError::BackendExists { .. }
            | StateError::TooManyServices
            | StateError::TooManyBackends => 409,
            _ => 400,
        }
    }
}

/// Transport protocol of a service.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self, StateError> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(StateError::BadProto { input: s.into() }),
        }
    }
}

/// How a service hashes flows (see `lb_common::HashMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Hash {
    /// Addresses, ports and protocol (AMQP default).
    #[default]
    FiveTuple,
    /// Client address only: every flow of a client lands on one backend.
    SrcIp,
    /// Five-tuple with the ports' low bit cleared: RTP and RTCP pair up.
    Rtp,
}

impl Hash {
    pub const fn mode(self) -> HashMode {
        match self {
            Hash::FiveTuple => HashMode::FiveTuple,
            Hash::SrcIp => HashMode::SrcIp,
            Hash::Rtp => HashMode::Rtp,
        }
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hash::FiveTuple => "five-tuple",
            Hash::SrcIp => "src-ip",
            Hash::Rtp => "rtp",
        })
    }
}

impl FromStr for Hash {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self, StateError> {
        match s {
            "five-tuple" => Ok(Hash::FiveTuple),
            "src-ip" => Ok(Hash::SrcIp),
            "rtp" => Ok(Hash::Rtp),
            _ => Err(StateError::BadHash { input: s.into() }),
        }
    }
}

/// Whether a backend takes new flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// In the Maglev table: takes new and established flows.
    #[default]
    Active,
    /// Out of the table; established flows stay (conntrack).
    Draining,
}

impl BackendState {
    /// The `lb_common::backend_state` value.
    pub const fn map_value(self) -> u8 {
        match self {
            BackendState::Active => lb_common::backend_state::ACTIVE,
            BackendState::Draining => lb_common::backend_state::DRAINING,
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
        })
    }
}

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Index in `BACKENDS` and `BE_STATS`.
    pub id: u32,
    pub addr: IpAddr,
    pub weight: u32,
    pub state: BackendState,
}

/// One service (VIP:port/proto or VIP:LO-HI/proto) and its backends,
/// ordered by address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Index in `SVC_STATS`; also picks the service's two Maglev rings.
    pub id: u32,
    pub name: String,
    pub vip: Vip,
    pub proto: Proto,
    pub hash: Hash,
    pub udp_idle_s: u32,
    pub ring_size: u32,
    pub backends: Vec<Backend>,
    /// Health check settings (absent in older state files: no check).
    #[serde(default)]
    pub health: HealthConfig,
}

impl Service {
    /// This service as the API shows it: the check password replaced by `***`.
    pub fn redacted(&self) -> Service {
        Service {
            health: self.health.redacted(),
            ..self.clone()
        }
    }

    pub fn backend(&self, addr: IpAddr) -> Option<&Backend> {
        self.backends.iter().find(|b| b.addr == addr)
    }

    /// The port `tcp` and `amqp` checks probe: the check port, else the
    /// service port (`None` for a port-range service without a check port).
    pub fn check_port(&self) -> Option<u16> {
        self.health.port.or(self.vip.port())
    }

    /// Backends that are in the Maglev table.
    pub fn active(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
    }
}

/// A deleted backend whose id is held so established flows finish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedBackend {
    pub id: u32,
    pub addr: IpAddr,
    /// The service it belonged to (for the operator; not used for routing).
    pub service: String,
}

/// Everything the daemon persists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// Flow hash seed, the same on every LB of a cluster.
    pub seed: u32,
    /// Services in creation order.
    pub services: Vec<Service>,
    /// Removed backends, oldest first.
    pub removed: Vec<RemovedBackend>,
}

impl Default for State {
    fn default() -> Self {
        State {
            format: STATE_FORMAT,
            seed: 0,
            services: Vec::new(),
            removed: Vec::new(),
        }
    }
}

/// `service add` as the API receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// `IP:PORT`, `IP:LO-HI` or `IP:*` (`[v6]:PORT` for IPv6); see [`parse_vip`].
    pub vip: String,
    pub proto: Proto,
    #[serde(default)]
    pub hash: Hash,
    /// Defaults to [`DEFAULT_UDP_IDLE_S`].
    #[serde(default)]
    pub udp_idle_s: Option<u64>,
    /// Defaults to `RING_DEFAULT`.
    #[serde(default)]
    pub ring_size: Option<u64>,
    /// Health check options; each defaults as in [`HealthConfig::default`].
    #[serde(default)]
    pub health: HealthSpec,
}

/// `service set` as the API receives it (`PATCH /v1/services/{name}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceUpdate {
    /// The health check options to change; the others keep their values.
    #[serde(default)]
    pub health: HealthSpec,
}

/// `backend add` as the API receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub addr: String,
    /// Defaults to [`DEFAULT_WEIGHT`].
    #[serde(default)]
    pub weight: Option<u64>,
}

/// `backend set` as the API receives it; at least one field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendUpdate {
    #[serde(default)]
    pub weight: Option<u64>,
    #[serde(default)]
    pub state: Option<BackendState>,
}

/// Where a service listens: an address and one port (`IP:PORT`) or a port
/// range (`IP:LO-HI`; `IP:*` is every port, 1-65535). IPv6 addresses go in
/// brackets: `[2001:db8::1]:5004-5099`.
///
/// Saved, sent and shown as that text ([`parse_vip`] reads it back), so an
/// exact-port VIP reads exactly as the `SocketAddr` older state files hold.
/// A range of one port (`IP:5004-5004`) is that exact port.
///
/// On one address and protocol, services may not share an exact port, and
/// there is at most one range ([`Vip::claim`]); an exact-port service inside
/// a range takes its port from it (the program looks the exact port up first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip {
    ip: IpAddr,
    lo: u16,
    hi: u16,
}

impl Vip {
    /// One address and port.
    pub const fn exact(addr: SocketAddr) -> Vip {
        let port = addr.port();
        Vip {
            ip: addr.ip(),
            lo: port,
            hi: port,
        }
    }

    pub const fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The lowest port (the port of an exact-port VIP).
    pub const fn lo(&self) -> u16 {
        self.lo
    }

    /// The highest port (the port of an exact-port VIP).
    pub const fn hi(&self) -> u16 {
        self.hi
    }

    /// A port-range VIP (`IP:LO-HI` or `IP:*`).
    pub const fn is_range(&self) -> bool {
        self.lo != self.hi
    }

    /// The port of an exact-port VIP; `None` for a range.
    pub const fn port(&self) -> Option<u16> {
        if self.is_range() {
            None
        } else {
            Some(self.lo)
        }
    }

    /// Whether traffic to `port` is for this VIP (unless an exact-port
    /// service on the same address takes it).
    pub const fn takes(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    /// What the VIP claims on its address (per protocol): its exact port,
    /// or `None` for the address's one port range. Two services conflict
    /// when their address, protocol and claim are equal.
    pub const fn claim(&self) -> VipClaim {
        (self.ip, self.port())
    }

    /// The VIP's address with `port`.
    pub const fn with_port(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }
}

/// What a [`Vip`] claims on its address: its exact port, or `None` for
/// the one port range (see [`Vip::claim`]).
pub type VipClaim = (IpAddr, Option<u16>);

impl From<SocketAddr> for Vip {
    fn from(addr: SocketAddr) -> Self {
        Vip::exact(addr)
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(a) => write!(f, "{a}:")?,
            IpAddr::V6(a) => write!(f, "[{a}]:")?,
        }
        match (self.lo, self.hi) {
            (lo, hi) if lo == hi => write!(f, "{lo}"),
            (1, u16::MAX) => f.write_str("*"),
            (lo, hi) => write!(f, "{lo}-{hi}"),
        }
    }
}

impl FromStr for Vip {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self, StateError> {
        parse_vip(s)
    }
}

impl Serialize for Vip {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Vip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_vip(&s).map_err(serde::de::Error::custom)
    }
}

/// Parses a VIP: `IP:PORT`, `IP:LO-HI` or `IP:*`; IPv6 as `[ADDR]:PORT`,
/// `[ADDR]:LO-HI`, `[ADDR]:*`. Ports are 1-65535 and LO <= HI. The one
/// parser the CLI, the API, the state file and `mqlb apply` use.
pub fn parse_vip(input: &str) -> Result<Vip, StateError> {
    const FORMS: &str = "IP:PORT, IP:LO-HI or IP:*";
    let bad = |reason: String| StateError::BadAddress {
        input: input.into(),
        reason,
    };
    let text = input.trim();
    let (ip, ports): (IpAddr, &str) = if let Some(rest) = text.strip_prefix('[') {
        let (addr, ports) = rest.split_once(']').ok_or_else(|| {
            bad("no closing ']': write an ipv6 vip as [ADDR]:PORT, e.g. [2001:db8::1]:5004".into())
        })?;
        let ip: std::net::Ipv6Addr = addr
            .parse()
            .map_err(|_| bad(format!("{addr:?} in brackets is not an ipv6 address")))?;
        let ports = ports
            .strip_prefix(':')
            .ok_or_else(|| bad("give the vip as [ADDR]:PORT, [ADDR]:LO-HI or [ADDR]:*".into()))?;
        (ip.into(), ports)
    } else {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => return Err(bad(format!("give the vip as {FORMS}"))),
            Ok(IpAddr::V6(_)) => {
                return Err(bad(
                    "give the vip as [ADDR]:PORT (an ipv6 address goes in brackets)".into(),
                ))
            }
            Err(_) => {}
        }
        let (addr, ports) = text
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("expected {FORMS}, e.g. 10.0.0.10:5672")))?;
        if addr.contains(':') {
            return Err(bad(
                "put an ipv6 address in brackets: [ADDR]:PORT or [ADDR]:LO-HI".into(),
            ));
        }
        let ip: std::net::Ipv4Addr = addr
            .parse()
            .map_err(|_| bad(format!("expected {FORMS}, e.g. 10.0.0.10:5672")))?;
        (ip.into(), ports)
    };
    let port = |p: &str| -> Result<u16, StateError> {
        let n: u16 = p
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| p.parse().ok())
            .flatten()
            .ok_or_else(|| {
                bad(format!(
                    "{p:?} is not a port: ports are 1-65535 (write {FORMS})"
                ))
            })?;
        if n == 0 {
            return Err(bad("port must be 1-65535".into()));
        }
        Ok(n)
    };
    let (lo, hi) = match ports {
        "*" => (1, u16::MAX),
        p => match p.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(bad(format!(
                        "port range {lo}-{hi} runs backwards: write LO-HI with LO <= HI, \
                         e.g. {hi}-{lo}"
                    )));
                }
                (lo, hi)
            }
            None => {
                let p = port(p)?;
                (p, p)
            }
        },
    };
    check_unicast(ip).map_err(|r| bad(r.into()))?;
    Ok(Vip { ip, lo, hi })
}

/// The error for a service `vip`/`proto` that claims what service `other`
/// (with `other_vip`) already has (see [`Vip::claim`]).
pub fn vip_conflict(vip: Vip, proto: Proto, other: &str, other_vip: Vip) -> StateError {
    if vip.is_range() {
        StateError::DuplicateRange {
            ip: vip.ip(),
            proto,
            other: other.into(),
            other_vip,
        }
    } else {
        StateError::DuplicateVip {
            vip,
            proto,
            other: other.into(),
        }
    }
}

/// Checks that the health checks of a service on `vip` have a port to
/// probe: a port-range service's `tcp` and `amqp` checks need a check port.
pub fn check_health_port(vip: Vip, health: &HealthConfig) -> Result<(), StateError> {
    use crate::health::CheckKind;
    let check = match health.check {
        CheckKind::Tcp => "tcp",
        CheckKind::Amqp => "amqp",
        CheckKind::None | CheckKind::Http(_) => return Ok(()),
    };
    if vip.is_range() && health.port.is_none() {
        return Err(StateError::RangeNeedsCheckPort { vip, check });
    }
    Ok(())
}

/// Parses a backend address.
pub fn parse_backend_addr(input: &str) -> Result<IpAddr, StateError> {
    let addr: IpAddr = input.trim().parse().map_err(|_| StateError::BadAddress {
        input: input.into(),
        reason: "expected an ipv4 or ipv6 address".into(),
    })?;
    check_unicast(addr).map_err(|r| StateError::BadAddress {
        input: input.into(),
        reason: r.into(),
    })?;
    if addr.is_loopback() {
        return Err(StateError::BadAddress {
            input: input.into(),
            reason: "a loopback address cannot be a backend".into(),
        });
    }
    Ok(addr)
}

fn check_unicast(addr: IpAddr) -> Result<(), &'static str> {
    if addr.is_unspecified() {
        return Err("the unspecified address is not allowed");
    }
    if addr.is_multicast() {
        return Err("a multicast address is not allowed");
    }
    if let IpAddr::V4(v4) = addr {
        if v4.is_broadcast() {
            return Err("the broadcast address is not allowed");
        }
    }
    // The maps hold IPv4 addresses IPv4-mapped: `::ffff:a.b.c.d` would be
    // the IPv4 address a.b.c.d to the data plane but IPv6 to everything else.
    if let IpAddr::V6(v6) = addr {
        if v6.to_ipv4_mapped().is_some() {
            return Err("an IPv4-mapped IPv6 address (::ffff:a.b.c.d): write the IPv4 address");
        }
    }
    Ok(())
}

/// Checks a service name (as `service add` does).
pub fn check_name(name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName { name: name.into() })
    }
}

/// Checks a backend weight: 1-[`MAX_WEIGHT`].
pub fn check_weight(weight: u64) -> Result<u32, StateError> {
    if (1..=MAX_WEIGHT as u64).contains(&weight) {
        Ok(weight as u32)
    } else {
        Err(StateError::WeightOutOfRange { weight })
    }
}

/// Checks a UDP idle timeout in seconds: 1-[`MAX_UDP_IDLE_S`].
pub fn check_udp_idle(secs: u64) -> Result<u32, StateError> {
    if (1..=MAX_UDP_IDLE_S as u64).contains(&secs) {
        Ok(secs as u32)
    } else {
        Err(StateError::UdpIdleOutOfRange { secs })
    }
}

/// Checks a Maglev table size: a prime from 3 to `RING_MAX`.
pub fn check_ring_size(size: u64) -> Result<u32, StateError> {
    if (3..=RING_MAX as u64).contains(&size) && is_prime(size as u32) {
        Ok(size as u32)
    } else {
        Err(StateError::BadRingSize { size })
    }
}

impl State {
    pub fn service(&self, name: &str) -> Result<&Service, StateError> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| StateError::UnknownService { name: name.into() })
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service, StateError> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| StateError::UnknownService { name: name.into() })
    }

    /// Every backend id in use, live or removed.
    fn backend_ids(&self) -> BTreeSet<u32> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .chain(self.removed.iter().map(|r| r.id))
            .collect()
    }

    /// Every address the daemon keeps a next hop for (live and removed).
    pub fn backend_addrs(&self) -> BTreeSet<IpAddr> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.addr))
            .chain(self.removed.iter().map(|r| r.addr))
            .collect()
    }

    /// Adds a service. Validates everything first.
    pub fn add_service(&mut self, spec: &ServiceSpec) -> Result<&Service, StateError> {
        check_name(&spec.name)?;
        let vip = parse_vip(&spec.vip)?;
        let udp_idle_s = check_udp_idle(spec.udp_idle_s.unwrap_or(DEFAULT_UDP_IDLE_S as u64))?;
        let ring_size = check_ring_size(spec.ring_size.unwrap_or(RING_DEFAULT as u64))?;
        let health = HealthConfig::default().apply(&spec.health)?;
        check_health_port(vip, &health)?;
        if self.services.iter().any(|s| s.name == spec.name) {
            return Err(StateError::DuplicateName {
                name: spec.name.clone(),
            });
        }
        if let Some(other) = self
            .services
            .iter()
            .find(|s| s.vip.claim() == vip.claim() && s.proto == spec.proto)
        {
            return Err(vip_conflict(vip, spec.proto, &other.name, other.vip));
        }
        let used: BTreeSet<u32> = self.services.iter().map(|s| s.id).collect();
        let id = (1..MAX_SERVICES)
            .find(|id| !used.contains(id))
            .ok_or(StateError::TooManyServices)?;
        self.services.push(Service {
            id,
            name: spec.name.clone(),
            vip,
            proto: spec.proto,
            hash: spec.hash,
            udp_idle_s,
            ring_size,
            backends: Vec::new(),
            health,
        });
        Ok(self.services.last().expect("just pushed"))
    }

    /// Changes a service's health check settings. Validates the result whole.
    pub fn set_service(
        &mut self,
        name: &str,
        update: &ServiceUpdate,
    ) -> Result<Service, StateError> {
        if update.health.is_empty() {
            return Err(StateError::EmptyServiceUpdate);
        }
        let svc = self.service_mut(name)?;
        let health = svc.health.apply(&update.health)?;
        check_health_port(svc.vip, &health)?;
        svc.health = health;
        Ok(svc.clone())
    }

    /// Deletes a service; its backends become removed (their flows finish).
    pub fn del_service(&mut self, name: &str) -> Result<Service, StateError> {
        let pos = self
            .services
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| StateError::UnknownService { name: name.into() })?;
        let svc = self.services.remove(pos);
        self.removed
            .extend(svc.backends.iter().map(|b| RemovedBackend {
                id: b.id,
                addr: b.addr,
                service: svc.name.clone(),
            }));
        Ok(svc)
    }

    /// Adds a backend to a service, active. Validates everything first.
    pub fn add_backend(
        &mut self,
        service: &str,
        spec: &BackendSpec,
    ) -> Result<Backend, StateError> {
        let addr = parse_backend_addr(&spec.addr)?;
        let weight = check_weight(spec.weight.unwrap_or(DEFAULT_WEIGHT as u64))?;
        // Families may mix: the data plane does 4-in-4, 6-in-6, 4-in-6 and 6-in-4.
        let svc = self.service(service)?;
        if svc.backend(addr).is_some() {
            return Err(StateError::BackendExists {
                service: service.into(),
                addr,
            });
        }
        let id = self.allocate_backend_id()?;
        let backend = Backend {
            id,
            addr,
            weight,
            state: BackendState::Active,
        };
        let svc = self.service_mut(service)?;
        svc.backends.push(backend.clone());
        svc.backends.sort_by_key(|b| b.addr);
        Ok(backend)
    }

    /// A never-used id if any is left, else the oldest removed one (taken off
    /// the removed list: its remaining flows now reach the new backend).
    fn allocate_backend_id(&mut self) -> Result<u32, StateError> {
        let used = self.backend_ids();
        if let Some(id) = (1..MAX_BACKENDS).find(|id| !used.contains(id)) {
            return Ok(id);
        }
        if self.removed.is_empty() {
            return Err(StateError::TooManyBackends);
        }
        Ok(self.removed.remove(0).id)
    }

    /// Changes a backend's weight and/or state.
    pub fn set_backend(
        &mut self,
        service: &str,
        addr: &str,
        update: &BackendUpdate,
    ) -> Result<Backend, StateError> {
        let addr = parse_backend_addr(addr)?;
        if update.weight.is_none() && update.state.is_none() {
            return Err(StateError::EmptyUpdate);
        }
        let weight = update.weight.map(check_weight).transpose()?;
        let svc = self.service_mut(service)?;
        let backend = svc
            .backends
            .iter_mut()
            .find(|b| b.addr == addr)
            .ok_or_else(|| StateError::BackendNotFound {
                service: service.into(),
                addr,
            })?;
        if let Some(w) = weight {
            backend.weight = w;
        }
        if let Some(s) = update.state {
            backend.state = s;
        }
        Ok(backend.clone())
    }

    /// Deletes a backend; its id stays held (`REMOVED`) so its flows finish.
    pub fn del_backend(&mut self, service: &str, addr: &str) -> Result<Backend, StateError> {
        let addr = parse_backend_addr(addr)?;
        let svc = self.service_mut(service)?;
        let pos = svc
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| StateError::BackendNotFound {
                service: service.into(),
                addr,
            })?;
        let backend = svc.backends.remove(pos);
        let name = svc.name.clone();
        self.removed.push(RemovedBackend {
            id: backend.id,
            addr: backend.addr,
            service: name,
        });
        Ok(backend)
    }

    /// Holds ids found in the pinned `BACKENDS` map that the state does not
    /// know (state file lost or older than the maps), so they are not handed
    /// out while conntrack may still point at them. Returns the ids adopted.
    pub fn adopt_orphans(&mut self, in_map: &[(u32, IpAddr)]) -> Vec<u32> {
        let known = self.backend_ids();
        let mut adopted = Vec::new();
        for &(id, addr) in in_map {
            if (1..MAX_BACKENDS).contains(&id) && !known.contains(&id) {
                self.removed.push(RemovedBackend {
                    id,
                    addr,
                    service: String::new(),
                });
                adopted.push(id);
            }
        }
        adopted
    }

    /// Checks the invariants of a state read from disk.
    pub fn check(&self) -> Result<(), String> {
        if self.format != STATE_FORMAT {
            return Err(format!(
                "state format {} is not supported (this mqlb reads format {STATE_FORMAT})",
                self.format
            ));
        }
        let mut names = BTreeSet::new();
        let mut sids = BTreeSet::new();
        let mut vips = BTreeSet::new();
        let mut bids = BTreeSet::new();
        for s in &self.services {
            check_name(&s.name).map_err(|e| e.to_string())?;
            if !names.insert(s.name.as_str()) {
                return Err(format!("service {} appears twice", s.name));
            }
            if !(1..MAX_SERVICES).contains(&s.id) || !sids.insert(s.id) {
                return Err(format!(
                    "service {} has a bad or repeated id {}",
                    s.name, s.id
                ));
            }
            if !vips.insert((s.vip.claim(), s.proto)) {
                return Err(match s.vip.is_range() {
                    true => format!("{}/{} has two port ranges", s.vip.ip(), s.proto),
                    false => format!("{}/{} appears twice", s.vip, s.proto),
                });
            }
            check_ring_size(s.ring_size as u64).map_err(|e| e.to_string())?;
            check_udp_idle(s.udp_idle_s as u64).map_err(|e| e.to_string())?;
            s.health
                .validate()
                .and_then(|()| check_health_port(s.vip, &s.health))
                .map_err(|e| format!("service {}: {e}", s.name))?;
            let mut addrs = BTreeSet::new();
            for b in &s.backends {
                check_weight(b.weight as u64).map_err(|e| e.to_string())?;
                if !addrs.insert(b.addr) {
                    return Err(format!("backend {} appears twice in {}", b.addr, s.name));
                }
                if !(1..MAX_BACKENDS).contains(&b.id) || !bids.insert(b.id) {
                    return Err(format!(
                        "backend {} has a bad or repeated id {}",
                        b.addr, b.id
                    ));
                }
            }
        }
        for r in &self.removed {
            if !(1..MAX_BACKENDS).contains(&r.id) || !bids.insert(r.id) {
                return Err(format!("removed backend id {} is bad or repeated", r.id));
            }
        }
        Ok(())
    }
}

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {reason}; fix or move it away")]
    Invalid { path: PathBuf, reason: String },
}

/// The state file of one interface: `<dir>/state.json`.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }

    /// Reads the saved state; `None` if there is none yet.
    pub fn load(&self) -> Result<Option<State>, StoreError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io("read", &path)(e)),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        state
            .check()
            .map_err(|reason| StoreError::Invalid { path, reason })?;
        Ok(Some(state))
    }

    /// Replaces the saved state atomically: after a crash at any point the
    /// file holds either the old or the new state, never a mix.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        fs::create_dir_all(&self.dir).map_err(Self::io("create", &self.dir))?;
        let path = self.path();
        let tmp = self.dir.join("state.json.tmp");
        let mut text = serde_json::to_vec_pretty(state).expect("state serializes");
        text.push(b'\n');
        {
            // 0600: the state holds health check credentials.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(Self::io("create", &tmp))?;
            f.write_all(&text).map_err(Self::io("write", &tmp))?;
            f.sync_all().map_err(Self::io("fsync", &tmp))?;
        }
        fs::rename(&tmp, &path).map_err(Self::io("rename to", &path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io("fsync", &self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vip: &str, proto: Proto) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            vip: vip.into(),
            proto,
            hash: Hash::FiveTuple,
            udp_idle_s: None,
            ring_size: None,
            health: Default::default(),
        }
    }

    fn be(addr: &str) -> BackendSpec {
        BackendSpec {
            addr: addr.into(),
            weight: None,
        }
    }

    fn with_amqp() -> State {
        let mut s = State::default();
        s.add_service(&spec("amqp", "10.0.0.10:5672", Proto::Tcp))
            .unwrap();
        s
    }

    #[test]
    fn service_defaults_and_ids() {
        let mut s = with_amqp();
        let svc = s.service("amqp").unwrap();
        assert_eq!(svc.id, 1);
        assert_eq!(svc.udp_idle_s, DEFAULT_UDP_IDLE_S);
        assert_eq!(svc.ring_size, RING_DEFAULT);
        assert_eq!(svc.hash, Hash::FiveTuple);
        let id = s
            .add_service(&spec("media", "10.0.0.10:5672", Proto::Udp))
            .unwrap()
            .id;
        assert_eq!(
            id, 2,
            "same vip:port, other protocol is a different service"
        );
        s.del_service("amqp").unwrap();
        let id = s
            .add_service(&spec("again", "10.0.0.11:1", Proto::Tcp))
            .unwrap()
            .id;
        assert_eq!(id, 1, "lowest free service id");
    }

    #[test]
    fn service_errors_say_what_is_wrong() {
        let mut s = with_amqp();
        let before = s.clone();
        let err = s
            .add_service(&spec("amqp", "10.0.0.11:5672", Proto::Tcp))
            .unwrap_err();
        assert_eq!(err.to_string(), "service amqp already exists");
        let err = s
            .add_service(&spec("other", "10.0.0.10:5672", Proto::Tcp))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "10.0.0.10:5672/tcp is already used by service amqp"
        );
        let err = s
            .add_service(&spec("x", "10.0.0.300:1", Proto::Tcp))
            .unwrap_err();
        assert!(
            err.to_string().starts_with("bad address \"10.0.0.300:1\""),
            "{err}"
        );
        let err = s
            .add_service(&spec("x", "10.0.0.1", Proto::Tcp))
            .unwrap_err();
        assert!(err.to_string().contains("IP:PORT"), "{err}");
        let err = s
            .add_service(&spec("x", "10.0.0.1:0", Proto::Tcp))
            .unwrap_err();
        assert!(err.to_string().contains("port must be 1-65535"), "{err}");
        let err = s
            .add_service(&spec("x", "0.0.0.0:80", Proto::Tcp))
            .unwrap_err();
        assert!(err.to_string().contains("unspecified"), "{err}");
        let err = s
            .add_service(&spec("-x", "10.0.0.1:80", Proto::Tcp))
            .unwrap_err();
        assert!(matches!(err, StateError::BadName { .. }));
        let err = s
            .add_service(&spec("a/b", "10.0.0.1:80", Proto::Tcp))
            .unwrap_err();
        assert!(matches!(err, StateError::BadName { .. }));
        let mut bad_ring = spec("r", "10.0.0.1:80", Proto::Tcp);
        bad_ring.ring_size = Some(65536);
        assert_eq!(
            s.add_service(&bad_ring).unwrap_err().to_string(),
            "ring size 65536 must be a prime number from 3 to 65537"
        );
        bad_ring.ring_size = Some(655373);
        assert!(
            s.add_service(&bad_ring).is_err(),
            "prime but above RING_MAX"
        );
        let mut bad_idle = spec("u", "10.0.0.1:80", Proto::Udp);
        bad_idle.udp_idle_s = Some(0);
        assert_eq!(
            s.add_service(&bad_idle).unwrap_err().to_string(),
            "udp idle timeout 0 is out of range (1-86400 seconds)"
        );
        assert_eq!(s, before, "refused changes leave nothing behind");
        assert_eq!(
            s.del_service("nope").unwrap_err().to_string(),
            "unknown service nope"
        );
    }

    #[test]
    fn service_limit() {
        let mut s = State::default();
        for i in 1..MAX_SERVICES {
            s.add_service(&spec(
                &format!("s{i}"),
                &format!("10.0.1.{i}:80"),
                Proto::Tcp,
            ))
            .unwrap();
        }
        let err = s
            .add_service(&spec("last", "10.0.2.1:80", Proto::Tcp))
            .unwrap_err();
        assert_eq!(err, StateError::TooManyServices);
        assert_eq!(err.status(), 409);
    }

    #[test]
    fn backend_add_set_del() {
        let mut s = with_amqp();
        let b = s.add_backend("amqp", &be("10.0.1.2")).unwrap();
        assert_eq!(
            (b.id, b.weight, b.state),
            (1, DEFAULT_WEIGHT, BackendState::Active)
        );
        let b = s
            .add_backend(
                "amqp",
                &BackendSpec {
                    addr: "10.0.1.1".into(),
                    weight: Some(7),
                },
            )
            .unwrap();
        assert_eq!((b.id, b.weight), (2, 7));
        let svc = s.service("amqp").unwrap();
        let order: Vec<String> = svc.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(order, ["10.0.1.1", "10.0.1.2"], "kept ordered by address");

        let b = s
            .set_backend(
                "amqp",
                "10.0.1.1",
                &BackendUpdate {
                    weight: None,
                    state: Some(BackendState::Draining),
                },
            )
            .unwrap();
        assert_eq!((b.weight, b.state), (7, BackendState::Draining));
        assert_eq!(s.service("amqp").unwrap().active().count(), 1);
        let b = s
            .set_backend(
                "amqp",
                "10.0.1.1",
                &BackendUpdate {
                    weight: Some(9),
                    state: None,
                },
            )
            .unwrap();
        assert_eq!((b.weight, b.state), (9, BackendState::Draining));

        let gone = s.del_backend("amqp", "10.0.1.2").unwrap();
        assert_eq!(gone.id, 1);
        assert_eq!(
            s.removed,
            vec![RemovedBackend {
                id: 1,
                addr: "10.0.1.2".parse().unwrap(),
                service: "amqp".into()
            }]
        );
        let b = s.add_backend("amqp", &be("10.0.1.2")).unwrap();
        assert_eq!(b.id, 3, "a removed id is not reused while fresh ids remain");
    }

    #[test]
    fn ipv6_services_take_backends_of_both_families() {
        let mut s = State::default();
        let svc = s
            .add_service(&spec("v6", "[fd00::100:1]:5672", Proto::Tcp))
            .unwrap()
            .clone();
        assert_eq!(svc.vip.ip(), "fd00::100:1".parse::<IpAddr>().unwrap());
        assert_eq!(svc.vip.to_string(), "[fd00::100:1]:5672");
        s.add_service(&spec("v6r", "[fd00::100:1]:10000-10099", Proto::Udp))
            .unwrap();
        // 6-in-6 and 6-in-4 behind one VIP; 4-in-6 behind an IPv4 VIP.
        let b6 = s.add_backend("v6", &be("fd00::2")).unwrap();
        let b4 = s.add_backend("v6", &be("10.0.1.1")).unwrap();
        assert_ne!(b6.id, b4.id);
        s.add_service(&spec("v4", "10.0.0.1:5672", Proto::Tcp))
            .unwrap();
        s.add_backend("v4", &be("fd00::3")).unwrap();
        let addrs: Vec<IpAddr> = s
            .service("v6")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        assert_eq!(addrs.len(), 2);
        assert!(s.backend_addrs().contains(&"fd00::3".parse().unwrap()));
        let err = s
            .add_service(&spec("dup", "[fd00::100:1]:5672", Proto::Tcp))
            .unwrap_err();
        assert!(matches!(err, StateError::DuplicateVip { .. }), "{err}");
    }

    #[test]
    fn backend_errors_say_what_is_wrong() {
        let mut s = with_amqp();
        s.add_backend("amqp", &be("10.0.1.1")).unwrap();
        let before = s.clone();
        let msg = |e: StateError| e.to_string();
        assert_eq!(
            msg(s.add_backend("amqp", &be("10.0.1.1")).unwrap_err()),
            "backend 10.0.1.1 already exists in service amqp"
        );
        assert_eq!(
            msg(s.add_backend("nope", &be("10.0.1.1")).unwrap_err()),
            "unknown service nope"
        );
        assert_eq!(
            msg(s.add_backend("amqp", &be("10.0.1")).unwrap_err()),
            "bad address \"10.0.1\": expected an ipv4 or ipv6 address"
        );
        assert!(msg(s.add_backend("amqp", &be("127.0.0.1")).unwrap_err()).contains("loopback"));
        assert!(msg(s.add_backend("amqp", &be("::1")).unwrap_err()).contains("loopback"));
        for w in [0, 65536, u64::MAX] {
            let e = s
                .add_backend(
                    "amqp",
                    &BackendSpec {
                        addr: "10.0.1.9".into(),
                        weight: Some(w),
                    },
                )
                .unwrap_err();
            assert_eq!(msg(e), format!("weight {w} is out of range (1-65535)"));
        }
        let upd = BackendUpdate {
            weight: Some(5),
            state: None,
        };
        assert_eq!(
            msg(s.set_backend("amqp", "10.0.1.7", &upd).unwrap_err()),
            "backend 10.0.1.7 not found in service amqp"
        );
        assert_eq!(
            s.set_backend("amqp", "10.0.1.1", &BackendUpdate::default())
                .unwrap_err(),
            StateError::EmptyUpdate
        );
        assert_eq!(
            msg(s.del_backend("amqp", "10.0.1.7").unwrap_err()),
            "backend 10.0.1.7 not found in service amqp"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn deleting_a_service_holds_its_backend_ids() {
        let mut s = with_amqp();
        s.add_backend("amqp", &be("10.0.1.1")).unwrap();
        s.add_backend("amqp", &be("10.0.1.2")).unwrap();
        s.del_service("amqp").unwrap();
        let ids: Vec<u32> = s.removed.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(s.backend_addrs().len(), 2, "next hops stay resolved");
    }

    #[test]
    fn ids_wrap_to_the_oldest_removed_when_exhausted() {
        let mut s = with_amqp();
        // Fill every id: the first three get removed, in the order 2, 1, 3.
        for i in 1..MAX_BACKENDS {
            let addr = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            s.add_backend("amqp", &be(&addr)).unwrap();
        }
        for addr in ["10.0.0.2", "10.0.0.1", "10.0.0.3"] {
            s.del_backend("amqp", addr).unwrap();
        }
        let b = s.add_backend("amqp", &be("10.9.9.9")).unwrap();
        assert_eq!(b.id, 2, "oldest removed id first");
        let b = s.add_backend("amqp", &be("10.9.9.8")).unwrap();
        assert_eq!(b.id, 1);
        assert_eq!(s.removed.len(), 1);
        s.add_backend("amqp", &be("10.9.9.7")).unwrap();
        assert_eq!(
            s.add_backend("amqp", &be("10.9.9.6")).unwrap_err(),
            StateError::TooManyBackends
        );
        s.check().unwrap();
    }

    #[test]
    fn orphans_in_the_map_are_held() {
        let mut s = with_amqp();
        s.add_backend("amqp", &be("10.0.1.1")).unwrap();
        let adopted = s.adopt_orphans(&[
            (1, "10.0.1.1".parse().unwrap()),
            (7, "10.0.1.7".parse().unwrap()),
        ]);
        assert_eq!(adopted, [7]);
        assert_eq!(s.removed[0].id, 7);
        s.check().unwrap();
    }

    #[test]
    fn check_rejects_broken_files() {
        let mut s = with_amqp();
        s.add_backend("amqp", &be("10.0.1.1")).unwrap();
        s.check().unwrap();
        let mut dup = s.clone();
        dup.removed.push(RemovedBackend {
            id: 1,
            addr: "10.0.1.5".parse().unwrap(),
            service: String::new(),
        });
        assert!(dup.check().unwrap_err().contains("repeated"));
        let mut fmt = s.clone();
        fmt.format = 99;
        assert!(fmt.check().unwrap_err().contains("format 99"));
    }

    #[test]
    fn store_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("eth9"));
        assert_eq!(store.load().unwrap(), None, "no file yet");
        let mut s = with_amqp();
        s.seed = 42;
        s.add_backend("amqp", &be("10.0.1.1")).unwrap();
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), Some(s.clone()));
        s.del_backend("amqp", "10.0.1.1").unwrap();
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), Some(s));
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["state.json"], "no temporary file left behind");
    }

    #[test]
    fn a_crash_before_rename_keeps_the_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let s = with_amqp();
        store.save(&s).unwrap();
        // A crash mid-write leaves a partial temporary file: it is ignored.
        fs::write(dir.path().join("state.json.tmp"), b"{\"format\": 1, \"se").unwrap();
        assert_eq!(store.load().unwrap(), Some(s.clone()));
        // The next save replaces it.
        store.save(&s).unwrap();
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn corrupt_state_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(store.path(), b"not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.starts_with(&format!(
            "state file {} is not valid",
            store.path().display()
        )));
        assert!(err.ends_with("fix or move it away"), "{err}");
    }

    #[test]
    fn health_settings_are_validated_whole_and_saved() {
        use crate::health::{CheckKind, HealthSpec};
        let mut s = with_amqp();
        assert_eq!(s.service("amqp").unwrap().health, HealthConfig::default());
        let before = s.clone();
        let upd = |h: HealthSpec| ServiceUpdate { health: h };
        let err = s
            .set_service(
                "amqp",
                &upd(HealthSpec {
                    check: Some(CheckKind::Tcp),
                    rise: Some(0),
                    ..Default::default()
                }),
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "rise 0 is out of range (1-100)");
        assert_eq!(err.status(), 400);
        assert_eq!(s, before, "nothing half-applied");
        assert_eq!(
            s.set_service("amqp", &ServiceUpdate::default())
                .unwrap_err(),
            StateError::EmptyServiceUpdate
        );
        assert_eq!(
            s.set_service(
                "nope",
                &upd(HealthSpec {
                    rise: Some(1),
                    ..Default::default()
                })
            )
            .unwrap_err()
            .to_string(),
            "unknown service nope"
        );
        let svc = s
            .set_service(
                "amqp",
                &upd(HealthSpec {
                    check: Some(CheckKind::Amqp),
                    fall: Some(5),
                    ..Default::default()
                }),
            )
            .unwrap();
        assert_eq!(
            (svc.health.check, svc.health.fall, svc.health.rise),
            (CheckKind::Amqp, 5, 2)
        );
        let mut bad = spec("b", "10.0.0.11:1", Proto::Tcp);
        bad.health.check = Some(CheckKind::Tcp);
        bad.health.timeout_ms = Some(3000);
        assert!(s
            .add_service(&bad)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
        // A broken setting in the file is refused at load.
        let mut broken = s.clone();
        broken.services[0].health.fall = 0;
        assert!(broken
            .check()
            .unwrap_err()
            .starts_with("service amqp: fall 0"));
    }

    #[test]
    fn state_files_without_health_settings_load() {
        let text = r#"{"format":1,"seed":0,"removed":[],"services":[{"id":1,"name":"a",
            "vip":"10.0.0.10:5672","proto":"tcp","hash":"five-tuple","udp_idle_s":60,
            "ring_size":13,"backends":[]}]}"#;
        let s: State = serde_json::from_str(text).unwrap();
        s.check().unwrap();
        assert_eq!(s.services[0].health, HealthConfig::default());
    }

    #[test]
    fn state_files_without_on_down_load_as_reset() {
        // A health config as saved before `on_down` existed.
        let text = r#"{"format":1,"seed":0,"removed":[],"services":[{"id":1,"name":"a",
            "vip":"10.0.0.10:5672","proto":"tcp","hash":"five-tuple","udp_idle_s":60,
            "ring_size":13,"backends":[],"health":{"check":"tcp","interval_ms":2000,
            "timeout_ms":1000,"rise":2,"fall":3,"panic_threshold":50}}]}"#;
        let s: State = serde_json::from_str(text).unwrap();
        s.check().unwrap();
        assert_eq!(s.services[0].health.on_down, crate::health::OnDown::Reset);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["services"][0]["health"]["on_down"], "reset");
    }

    #[test]
    fn state_json_is_readable() {
        let mut s = with_amqp();
        s.add_backend("amqp", &be("10.0.1.1")).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["services"][0]["vip"], "10.0.0.10:5672");
        assert_eq!(v["services"][0]["proto"], "tcp");
        assert_eq!(v["services"][0]["hash"], "five-tuple");
        assert_eq!(v["services"][0]["backends"][0]["state"], "active");
    }

    fn vip(s: &str) -> Vip {
        parse_vip(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn vips_parse_and_print_in_every_form() {
        let v = vip("10.0.0.10:5672");
        assert_eq!(
            (v.lo(), v.hi(), v.port(), v.is_range()),
            (5672, 5672, Some(5672), false)
        );
        assert_eq!(v, Vip::exact("10.0.0.10:5672".parse().unwrap()));
        let v = vip("10.0.0.10:5004-5099");
        assert_eq!(
            (v.lo(), v.hi(), v.port(), v.is_range()),
            (5004, 5099, None, true)
        );
        assert!(v.takes(5004) && v.takes(5099) && !v.takes(5003) && !v.takes(5100));
        assert_eq!(v.claim(), ("10.0.0.10".parse().unwrap(), None));
        let v = vip("10.0.0.10:*");
        assert_eq!((v.lo(), v.hi()), (1, 65535));
        assert_eq!(vip("10.0.0.10:1-65535"), v, "the full range is *");
        assert_eq!(
            vip("10.0.0.10:5004-5004"),
            vip("10.0.0.10:5004"),
            "one port is exact"
        );
        let v = vip("[2001:db8::1]:5004-5099");
        assert_eq!(v.ip(), "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!((v.lo(), v.hi()), (5004, 5099));
        assert_eq!(vip(" 10.0.0.10:80 "), vip("10.0.0.10:80"), "spaces around");
        // What is printed parses back to the same VIP.
        for (input, shown) in [
            ("10.0.0.10:5672", "10.0.0.10:5672"),
            ("10.0.0.10:5004-5099", "10.0.0.10:5004-5099"),
            ("10.0.0.10:*", "10.0.0.10:*"),
            ("10.0.0.10:1-65535", "10.0.0.10:*"),
            ("10.0.0.10:1-65534", "10.0.0.10:1-65534"),
            ("10.0.0.10:7-7", "10.0.0.10:7"),
            ("[2001:db8::1]:5004", "[2001:db8::1]:5004"),
            ("[2001:db8::1]:5004-5099", "[2001:db8::1]:5004-5099"),
            ("[2001:db8::1]:*", "[2001:db8::1]:*"),
        ] {
            assert_eq!(vip(input).to_string(), shown, "{input}");
            assert_eq!(vip(shown), vip(input), "{shown} parses back");
        }
        // An exact VIP prints as the SocketAddr it replaced.
        let sa: SocketAddr = "[fd00::1]:443".parse().unwrap();
        assert_eq!(Vip::exact(sa).to_string(), sa.to_string());
    }

    #[test]
    fn bad_vips_say_what_is_wrong_in_one_line() {
        let err = |s: &str| {
            let e = parse_vip(s).unwrap_err();
            assert!(matches!(e, StateError::BadAddress { .. }), "{s}: {e:?}");
            let m = e.to_string();
            assert!(!m.contains('\n'), "{m}");
            assert!(m.starts_with(&format!("bad address {s:?}: ")), "{m}");
            m
        };
        assert!(err("10.0.0.10:5099-5004").contains(
            "port range 5099-5004 runs backwards: write LO-HI with LO <= HI, e.g. 5004-5099"
        ));
        assert!(err("10.0.0.10:0-100").contains("port must be 1-65535"));
        assert!(err("10.0.0.10:0").contains("port must be 1-65535"));
        assert!(err("10.0.0.10:5004-65536").contains("\"65536\" is not a port"));
        assert!(err("10.0.0.10:5004-").contains("\"\" is not a port"));
        assert!(err("10.0.0.10:-5004").contains("is not a port"));
        assert!(err("10.0.0.10:+80").contains("is not a port"));
        assert!(err("10.0.0.10:5004..5099").contains("IP:LO-HI"));
        assert!(err("10.0.0.10:**").contains("is not a port"));
        assert!(err("[::ffff:10.0.0.10]:5672").contains("write the IPv4 address"));
        let e = parse_backend_addr("::ffff:10.0.1.1")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "bad address \"::ffff:10.0.1.1\": an IPv4-mapped IPv6 address (::ffff:a.b.c.d): \
             write the IPv4 address"
        );
        assert!(err("10.0.0.10").contains("IP:PORT, IP:LO-HI or IP:*"));
        assert!(err("host:80").contains("IP:PORT, IP:LO-HI or IP:*"));
        assert!(err("10.0.0.300:80").contains("IP:PORT"));
        assert!(err("fd00::1:80").contains("brackets"));
        assert!(err("fd00::1").contains("brackets"));
        assert!(err("[fd00::1]").contains("[ADDR]:PORT"));
        assert!(err("[fd00::1:80").contains("no closing ']'"));
        assert!(err("[10.0.0.1]:80").contains("not an ipv6 address"));
        assert!(err("0.0.0.0:1-10").contains("unspecified"));
        assert!(err("224.0.0.1:*").contains("multicast"));
        assert!(err("[ff02::1]:5004-5099").contains("multicast"));
    }

    #[test]
    fn vips_serialize_as_text_and_old_files_read_alike() {
        let mut s = with_amqp();
        s.add_service(&spec("media", "10.0.0.10:5004-5099", Proto::Udp))
            .unwrap();
        s.add_service(&spec("all", "10.0.0.11:*", Proto::Udp))
            .unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["services"][0]["vip"], "10.0.0.10:5672", "as before");
        assert_eq!(v["services"][1]["vip"], "10.0.0.10:5004-5099");
        assert_eq!(v["services"][2]["vip"], "10.0.0.11:*");
        let back: State = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        back.check().unwrap();
        let bad = r#"{"format":1,"seed":0,"removed":[],"services":[{"id":1,"name":"a",
            "vip":"10.0.0.10:9-1","proto":"tcp","hash":"five-tuple","udp_idle_s":60,
            "ring_size":13,"backends":[]}]}"#;
        let e = serde_json::from_str::<State>(bad).unwrap_err().to_string();
        assert!(e.contains("runs backwards"), "{e}");
    }

    #[test]
    fn a_range_and_exact_ports_share_a_vip_but_not_two_ranges() {
        let mut s = State::default();
        s.add_service(&spec("media", "10.0.0.10:5004-5099", Proto::Udp))
            .unwrap();
        // Exact ports on the range's VIP: inside the range or not.
        s.add_service(&spec("inside", "10.0.0.10:5010", Proto::Udp))
            .unwrap();
        s.add_service(&spec("outside", "10.0.0.10:6000", Proto::Udp))
            .unwrap();
        // A range on another protocol or another address.
        s.add_service(&spec("tcp-range", "10.0.0.10:5004-5099", Proto::Tcp))
            .unwrap();
        s.add_service(&spec("other-ip", "10.0.0.11:*", Proto::Udp))
            .unwrap();
        s.check().unwrap();
        let before = s.clone();
        for other in ["10.0.0.10:5004-5099", "10.0.0.10:7000-7999", "10.0.0.10:*"] {
            let e = s
                .add_service(&spec("second", other, Proto::Udp))
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "10.0.0.10/udp already has a port range: service media (10.0.0.10:5004-5099); \
                 one range per vip and protocol (exact-port services on the vip are fine, \
                 inside the range too)",
                "{other}"
            );
            assert_eq!(e.status(), 409);
        }
        let e = s
            .add_service(&spec("again", "10.0.0.10:5010", Proto::Udp))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "10.0.0.10:5010/udp is already used by service inside"
        );
        assert_eq!(s, before);
        // A state file with two ranges on one VIP is refused at load.
        let mut two = s.clone();
        two.services[3].proto = Proto::Udp;
        assert_eq!(
            two.check().unwrap_err(),
            "10.0.0.10/udp has two port ranges"
        );
    }

    #[test]
    fn range_checks_need_a_check_port() {
        use crate::health::{CheckKind, HealthSpec};
        let mut s = State::default();
        let mut media = spec("media", "10.0.0.10:5004-5099", Proto::Udp);
        media.health.check = Some(CheckKind::Tcp);
        let e = s.add_service(&media).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a tcp check of port-range service 10.0.0.10:5004-5099 needs a check port \
             (--check-port PORT): a range has no single service port to probe"
        );
        assert_eq!(e.status(), 400);
        media.health.port = Some(8080);
        let svc = s.add_service(&media).unwrap();
        assert_eq!(svc.check_port(), Some(8080));
        // Taking the check port away again is refused; so is an amqp check
        // without one.
        let upd = |h: HealthSpec| ServiceUpdate { health: h };
        let e = s
            .set_service(
                "media",
                &upd(HealthSpec {
                    port: Some(0),
                    ..Default::default()
                }),
            )
            .unwrap_err();
        assert!(
            matches!(e, StateError::RangeNeedsCheckPort { check: "tcp", .. }),
            "{e}"
        );
        assert_eq!(s.service("media").unwrap().health.port, Some(8080));
        // No check, or an http check (its port is in the url): no port needed.
        let mut plain = spec("plain", "10.0.0.11:*", Proto::Udp);
        assert_eq!(s.add_service(&plain).unwrap().check_port(), None);
        plain.name = "web".into();
        plain.vip = "10.0.0.12:*".into();
        plain.health.check = Some(CheckKind::Http("http://{backend}:8080/health".into()));
        s.add_service(&plain).unwrap();
        // An exact-port service checks its own port.
        let mut amqp = spec("amqp", "10.0.0.10:5672", Proto::Tcp);
        amqp.health.check = Some(CheckKind::Amqp);
        assert_eq!(s.add_service(&amqp).unwrap().check_port(), Some(5672));
        // A state file with such a check is refused at load.
        let mut broken = s.clone();
        broken.services[0].health.port = None;
        assert!(broken
            .check()
            .unwrap_err()
            .starts_with("service media: a tcp check of port-range service"));
    }
}
