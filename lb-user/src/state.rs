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
        vip: SocketAddr,
        proto: Proto,
        other: String,
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
    #[error("backend {addr} is {backend_family} but service {service} has an {vip_family} vip; ipip needs both in one family")]
    FamilyMismatch {
        service: String,
        addr: IpAddr,
        backend_family: &'static str,
        vip_family: &'static str,
    },
    #[error("ipv6 services are not supported yet (the data plane forwards ipv4 only)")]
    Ipv6Unsupported,
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

/// One service (VIP:port/proto) and its backends, ordered by address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Index in `SVC_STATS`; also picks the service's two Maglev rings.
    pub id: u32,
    pub name: String,
    pub vip: SocketAddr,
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
    /// `IP:PORT` (`[v6]:PORT` for IPv6).
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

/// Parses `IP:PORT` (or `[IPv6]:PORT`) for a VIP.
pub fn parse_vip(input: &str) -> Result<SocketAddr, StateError> {
    let bad = |reason: &str| StateError::BadAddress {
        input: input.into(),
        reason: reason.into(),
    };
    let vip: SocketAddr = input.parse().map_err(|_| {
        if input.parse::<IpAddr>().is_ok() {
            bad("give the vip as IP:PORT")
        } else {
            bad("expected IP:PORT, e.g. 10.0.0.10:5672")
        }
    })?;
    if vip.port() == 0 {
        return Err(bad("port must be 1-65535"));
    }
    check_unicast(vip.ip()).map_err(bad)?;
    Ok(vip)
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

fn family(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
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
        if vip.is_ipv6() {
            return Err(StateError::Ipv6Unsupported);
        }
        let udp_idle_s = check_udp_idle(spec.udp_idle_s.unwrap_or(DEFAULT_UDP_IDLE_S as u64))?;
        let ring_size = check_ring_size(spec.ring_size.unwrap_or(RING_DEFAULT as u64))?;
        let health = HealthConfig::default().apply(&spec.health)?;
        if self.services.iter().any(|s| s.name == spec.name) {
            return Err(StateError::DuplicateName {
                name: spec.name.clone(),
            });
        }
        if let Some(other) = self
            .services
            .iter()
            .find(|s| s.vip == vip && s.proto == spec.proto)
        {
            return Err(StateError::DuplicateVip {
                vip,
                proto: spec.proto,
                other: other.name.clone(),
            });
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
        svc.health = svc.health.apply(&update.health)?;
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
        let svc = self.service(service)?;
        if family(addr) != family(svc.vip.ip()) {
            return Err(StateError::FamilyMismatch {
                service: service.into(),
                addr,
                backend_family: family(addr),
                vip_family: family(svc.vip.ip()),
            });
        }
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
            if !vips.insert((s.vip, s.proto)) {
                return Err(format!("{}/{} appears twice", s.vip, s.proto));
            }
            check_ring_size(s.ring_size as u64).map_err(|e| e.to_string())?;
            check_udp_idle(s.udp_idle_s as u64).map_err(|e| e.to_string())?;
            s.health
                .validate()
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
        let err = s
            .add_service(&spec("v6", "[fd00::1]:80", Proto::Tcp))
            .unwrap_err();
        assert_eq!(err, StateError::Ipv6Unsupported);
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
        assert!(msg(s.add_backend("amqp", &be("fd00::1")).unwrap_err()).contains("one family"));
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
    fn state_json_is_readable() {
        let mut s = with_amqp();
        s.add_backend("amqp", &be("10.0.1.1")).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["services"][0]["vip"], "10.0.0.10:5672");
        assert_eq!(v["services"][0]["proto"], "tcp");
        assert_eq!(v["services"][0]["hash"], "five-tuple");
        assert_eq!(v["services"][0]["backends"][0]["state"], "active");
    }
}
