//! Health checks: per-service settings ([`HealthConfig`], persisted with the
//! service), the per-backend state machine ([`step`], pure), the probes
//! (`tcp`, `amqp`, `http:URL`; tokio, each bounded by the check timeout) and
//! the task that runs one probe loop per checked backend ([`run`]).
//!
//! Rules:
//! - A probe result names a target status: a pass → up, an http 503 →
//!   draining, anything else → down. A result that agrees with the current
//!   status resets the count; one that disagrees counts. Going to a worse
//!   status (up → down, up → draining, draining → down) takes `fall`
//!   disagreeing results in a row, going to a better one (down → up,
//!   down → draining, draining → up) takes `rise`; the latest result names
//!   where it goes. A flapping backend (fail, 503, fail) keeps counting.
//! - Health is runtime state, never saved. A backend starts up ("unchecked")
//!   so that a daemon restart never empties a table; it needs `fall` failed
//!   checks to leave. Exception: a backend the pinned `BACKENDS` map holds as
//!   `DOWN` (the previous daemon found it down) starts down and needs `rise`;
//!   with `on_down = keep`, so does one it holds as `DRAINING` that the
//!   operator did not drain.
//! - Down: out of the Maglev table, `BACKENDS` state `DOWN` (the program
//!   re-hashes its conntrack hits: UDP flows move, TCP flows fail fast).
//!   Draining (503): out of the table, state `DRAINING` (flows stay).
//! - Panic: when fewer than `panic_threshold` percent of a service's
//!   candidates (administratively active, not draining by its check) are up,
//!   down backends go back into the table and are written `ACTIVE`: the load
//!   is spread over all of them rather than piled onto the few (Envoy's panic
//!   threshold). 0 disables it.
//! - `on_down` ([`OnDown`]): `reset` (the default) writes a down backend
//!   `DOWN` as above; `keep` writes it `DRAINING`: out of the table, its
//!   established flows stay (HAProxy's `on-marked-down`, for backends that
//!   are slow rather than dead). Panic mode overrules both.
//!
//! The HTTP probe uses hyper's HTTP/1.1 client connection (already the CLI's
//! client): one request per connection, `Connection: close`, plain http
//! only (no TLS stack in the daemon).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{body::Bytes, header, Request, Uri};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};
use tracing::debug;

use crate::{
    daemon::Shared,
    state::{Backend, Service, StateError},
};

/// Check interval of a service created without `--check-interval`, in ms.
pub const DEFAULT_INTERVAL_MS: u64 = 2_000;
/// Check timeout without `--check-timeout`, in ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
/// Passing checks a down backend needs to come back.
pub const DEFAULT_RISE: u32 = 2;
/// Failing checks an up backend needs to go down.
pub const DEFAULT_FALL: u32 = 3;
/// Panic below this share of healthy backends, in percent.
pub const DEFAULT_PANIC_PCT: u8 = 50;
/// Longest check interval (one hour), in ms.
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Largest `rise` and `fall`.
pub const MAX_RISE_FALL: u32 = 100;
/// What the API shows instead of a check password.
pub const REDACTED: &str = "***";
/// The placeholder in an http check URL that stands for the backend address.
pub const BACKEND_PLACEHOLDER: &str = "{backend}";
/// The AMQP 0-9-1 protocol header.
pub const AMQP_HEADER: &[u8; 8] = b"AMQP\0\0\x09\x01";
/// Largest Connection.Start frame payload accepted (RabbitMQ's is < 1 KiB).
const AMQP_MAX_FRAME: u32 = 128 * 1024;
/// Largest http check answer body read (the rest is dropped).
const HTTP_MAX_BODY: usize = 64 * 1024;

/// What a service's backends are checked with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CheckKind {
    /// Not checked: every backend counts as up.
    #[default]
    None,
    /// A TCP connect.
    Tcp,
    /// The AMQP 0-9-1 header, answered by a Connection.Start frame.
    Amqp,
    /// An HTTP GET of this URL (`{backend}` in the host: the backend address):
    /// 2xx up, 503 draining, anything else down.
    Http(String),
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::None => f.write_str("none"),
            CheckKind::Tcp => f.write_str("tcp"),
            CheckKind::Amqp => f.write_str("amqp"),
            CheckKind::Http(url) => write!(f, "http:{url}"),
        }
    }
}

impl FromStr for CheckKind {
    type Err = StateError;
    fn from_str(s: &str) -> Result<Self, StateError> {
        match s {
            "none" => Ok(CheckKind::None),
            "tcp" => Ok(CheckKind::Tcp),
            "amqp" => Ok(CheckKind::Amqp),
            _ => match s.strip_prefix("http:") {
                Some(url) => {
                    check_url(url)?;
                    Ok(CheckKind::Http(url.into()))
                }
                None => Err(bad(format!(
                    "unknown check {s:?} (use none, tcp, amqp or http:URL)"
                ))),
            },
        }
    }
}

impl Serialize for CheckKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CheckKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn bad(reason: impl Into<String>) -> StateError {
    StateError::BadCheck {
        reason: reason.into(),
    }
}

/// The URL with `{backend}` replaced by `addr` (IPv6 in brackets).
pub fn expand_url(url: &str, addr: IpAddr) -> String {
    let host = match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    url.replace(BACKEND_PLACEHOLDER, &host)
}

/// Parses an http check URL (with `{backend}` standing for an address).
fn check_url(url: &str) -> Result<Uri, StateError> {
    let why = |reason: &str| bad(format!("bad check url {url:?}: {reason}"));
    let uri: Uri = expand_url(url, IpAddr::from([192, 0, 2, 1]))
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| why(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(why("https is not supported; use http")),
        _ => {
            return Err(why(
                "give a full url, e.g. http://{backend}:15672/api/health/checks/alarms",
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(why("the url names no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(why(
            "give credentials with --check-user/--check-password, not in the url",
        ));
    }
    Ok(uri)
}

/// What happens to the established flows of a backend whose check says down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// Re-hash them: UDP flows move to a healthy backend, TCP clients fail
    /// fast and reconnect (`BACKENDS` state `DOWN`)
    #[default]
    Reset,
    /// They stay on it, for backends that are slow rather than dead
    /// (`BACKENDS` state `DRAINING`)
    Keep,
}

impl fmt::Display for OnDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnDown::Reset => "reset",
            OnDown::Keep => "keep",
        })
    }
}

/// A service's health check settings, saved with the service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    pub check: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    /// Port probed by `tcp` and `amqp` checks; `None`: the service port
    /// (a port-range service has none: its `tcp` and `amqp` checks need one).
    #[serde(default)]
    pub port: Option<u16>,
    /// Basic auth of `http` checks (RabbitMQ's management API needs it).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Percent; 0 disables panic mode.
    pub panic_threshold: u8,
    /// The established flows of a down backend: reset or kept.
    #[serde(default)]
    pub on_down: OnDown,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check: CheckKind::None,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            port: None,
            user: None,
            password: None,
            panic_threshold: DEFAULT_PANIC_PCT,
            on_down: OnDown::Reset,
        }
    }
}

/// Health check options as `service add` and `service set` send them; every
/// field is optional (`None` keeps the current value or the default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u64>,
    /// 0 goes back to the service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// An empty user clears the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_down: Option<OnDown>,
}

impl HealthSpec {
    pub fn is_empty(&self) -> bool {
        *self == HealthSpec::default()
    }
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

impl HealthConfig {
    /// This config with `spec` applied, validated as a whole.
    pub fn apply(&self, spec: &HealthSpec) -> Result<HealthConfig, StateError> {
        let mut c = self.clone();
        if let Some(k) = &spec.check {
            c.check = k.clone();
        }
        if let Some(v) = spec.interval_ms {
            c.interval_ms = v;
        }
        if let Some(v) = spec.timeout_ms {
            c.timeout_ms = v;
        }
        let range = |what: &str, v: u64| -> Result<u32, StateError> {
            if (1..=MAX_RISE_FALL as u64).contains(&v) {
                Ok(v as u32)
            } else {
                Err(bad(format!(
                    "{what} {v} is out of range (1-{MAX_RISE_FALL})"
                )))
            }
        };
        if let Some(v) = spec.rise {
            c.rise = range("rise", v)?;
        }
        if let Some(v) = spec.fall {
            c.fall = range("fall", v)?;
        }
        if let Some(p) = spec.port {
            c.port = (p != 0).then_some(p);
        }
        match (&spec.user, &spec.password) {
            (Some(u), _) if u.is_empty() => {
                c.user = None;
                c.password = None;
            }
            (u, p) => {
                if let Some(u) = u {
                    c.user = Some(u.clone());
                }
                if let Some(p) = p {
                    c.password = Some(p.clone());
                }
            }
        }
        if let Some(v) = spec.panic_threshold {
            c.panic_threshold = u8::try_from(v).ok().filter(|v| *v <= 100).ok_or_else(|| {
                bad(format!(
                    "panic threshold {v} is out of range (0-100 percent)"
                ))
            })?;
        }
        if let Some(v) = spec.on_down {
            c.on_down = v;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the invariants (also of a config read from the state file).
    pub fn validate(&self) -> Result<(), StateError> {
        if let CheckKind::Http(url) = &self.check {
            check_url(url)?;
        }
        if self.timeout_ms == 0 {
            return Err(bad("check timeout must be at least 1ms"));
        }
        if self.interval_ms > MAX_INTERVAL_MS {
            return Err(bad(format!(
                "check interval {} is too long (at most {})",
                fmt_ms(self.interval_ms),
                fmt_ms(MAX_INTERVAL_MS)
            )));
        }
        if self.interval_ms <= self.timeout_ms {
            return Err(bad(format!(
                "check interval ({}) must be longer than the check timeout ({})",
                fmt_ms(self.interval_ms),
                fmt_ms(self.timeout_ms)
            )));
        }
        for (what, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=MAX_RISE_FALL).contains(&v) {
                return Err(bad(format!(
                    "{what} {v} is out of range (1-{MAX_RISE_FALL})"
                )));
            }
        }
        if self.panic_threshold > 100 {
            return Err(bad(format!(
                "panic threshold {} is out of range (0-100 percent)",
                self.panic_threshold
            )));
        }
        let http = matches!(self.check, CheckKind::Http(_));
        if self.port.is_some() && http {
            return Err(bad(
                "the check port applies to tcp and amqp checks (an http check takes its port \
                 from the url); clear it with --check-port 0",
            ));
        }
        match (&self.user, &self.password) {
            (None, None) => {}
            (Some(_), Some(_)) if !http => {
                return Err(bad(
                    "check credentials apply to http checks only; clear them with --check-user ''",
                ))
            }
            (Some(u), Some(_)) if u.contains(':') => {
                return Err(bad("the check user must not contain ':' (basic auth)"))
            }
            (Some(_), Some(_)) => {}
            _ => return Err(bad("give --check-user and --check-password together")),
        }
        Ok(())
    }

    /// Whether the service's backends are checked.
    pub fn enabled(&self) -> bool {
        self.check != CheckKind::None
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// This config as the API shows it: the password replaced by `***`.
    pub fn redacted(&self) -> HealthConfig {
        let mut c = self.clone();
        if c.password.is_some() {
            c.password = Some(REDACTED.into());
        }
        c
    }

    /// One line for people, e.g. `amqp :5672 every 2s (timeout 1s, rise 2,
    /// fall 3), panic below 50%` (`, keeps flows of down backends` added
    /// with `on_down = keep`); never the password. `service_port` is
    /// `None` for a port-range service.
    pub fn summary(&self, service_port: Option<u16>) -> String {
        let what = match &self.check {
            CheckKind::None => return "no health check".into(),
            CheckKind::Tcp | CheckKind::Amqp => match self.port.or(service_port) {
                Some(port) => format!("{} :{port}", self.check),
                None => format!("{} (no check port)", self.check),
            },
            CheckKind::Http(_) => match &self.user {
                Some(u) => format!("{} as {u}:{REDACTED}", self.check),
                None => self.check.to_string(),
            },
        };
        let panic = if self.panic_threshold == 0 {
            "no panic mode".to_string()
        } else {
            format!("panic below {}%", self.panic_threshold)
        };
        let keep = match self.on_down {
            OnDown::Reset => "",
            OnDown::Keep => ", keeps flows of down backends",
        };
        format!(
            "{what} every {} (timeout {}, rise {}, fall {}), {panic}{keep}",
            fmt_ms(self.interval_ms),
            fmt_ms(self.timeout_ms),
            self.rise,
            self.fall
        )
    }
}

/// A backend's health as the checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Up,
    Down,
    /// The backend answered 503: no new flows, established ones stay.
    Draining,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Up => "up",
            Status::Down => "down",
            Status::Draining => "draining",
        })
    }
}

/// What one probe found, with the words for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Pass(String),
    /// HTTP 503: the backend asks for no new flows.
    Drain(String),
    Fail(String),
}

impl ProbeResult {
    /// The status this result points to.
    pub fn target(&self) -> Status {
        match self {
            ProbeResult::Pass(_) => Status::Up,
            ProbeResult::Drain(_) => Status::Draining,
            ProbeResult::Fail(_) => Status::Down,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            ProbeResult::Pass(r) | ProbeResult::Drain(r) | ProbeResult::Fail(r) => r,
        }
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            ProbeResult::Pass(_) => "pass",
            ProbeResult::Drain(_) => "drain",
            ProbeResult::Fail(_) => "fail",
        };
        write!(f, "{word}: {}", self.reason())
    }
}

/// The state machine's state: the status and how many results in a row
/// disagreed with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthState {
    pub status: Status,
    pub count: u32,
}

impl HealthState {
    pub const fn new(status: Status) -> Self {
        HealthState { status, count: 0 }
    }
}

/// A change of status, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Status,
    pub to: Status,
    pub reason: String,
}

/// Results needed in a row to go from `from` to `to` (see the module doc).
const fn needed(from: Status, to: Status, rise: u32, fall: u32) -> u32 {
    match (from, to) {
        (_, Status::Down) | (Status::Up, Status::Draining) => fall,
        _ => rise,
    }
}

/// One probe result through the state machine. Pure.
pub fn step(
    state: HealthState,
    result: &ProbeResult,
    rise: u32,
    fall: u32,
) -> (HealthState, Option<Transition>) {
    let target = result.target();
    if target == state.status {
        return (HealthState::new(state.status), None);
    }
    let count = state.count.saturating_add(1);
    let need = needed(state.status, target, rise, fall).max(1);
    if count < need {
        return (
            HealthState {
                status: state.status,
                count,
            },
            None,
        );
    }
    let reason = match target {
        Status::Down => format!(
            "{count} checks in a row did not pass, last: {}",
            result.reason()
        ),
        Status::Up => format!("{count} checks in a row passed, last: {}", result.reason()),
        Status::Draining => format!(
            "{count} checks in a row answered draining, last: {}",
            result.reason()
        ),
    };
    (
        HealthState::new(target),
        Some(Transition {
            from: state.status,
            to: target,
            reason,
        }),
    )
}

/// Panic mode: fewer than `threshold_pct` percent of `candidates` are up.
pub const fn in_panic(candidates: usize, up: usize, threshold_pct: u8) -> bool {
    threshold_pct > 0 && candidates > 0 && up * 100 < threshold_pct as usize * candidates
}

/// A backend's health in the daemon (runtime only, never saved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub addr: IpAddr,
    pub state: HealthState,
    /// A probe result has come in since the daemon started.
    pub checked: bool,
    pub to_down: u64,
    pub to_up: u64,
    pub to_draining: u64,
    /// Why the last transition happened, and when.
    pub last_reason: Option<String>,
    pub last_change: Option<SystemTime>,
    /// The last probe's result and how long it took.
    pub last_result: Option<ProbeResult>,
    pub last_latency: Option<Duration>,
}

impl BackendHealth {
    pub fn new(addr: IpAddr, status: Status) -> Self {
        BackendHealth {
            addr,
            state: HealthState::new(status),
            checked: false,
            to_down: 0,
            to_up: 0,
            to_draining: 0,
            last_reason: None,
            last_change: None,
            last_result: None,
            last_latency: None,
        }
    }

    /// Takes a probe result; returns the transition it caused, counted.
    pub fn record(
        &mut self,
        result: ProbeResult,
        latency: Duration,
        rise: u32,
        fall: u32,
    ) -> Option<Transition> {
        let (next, t) = step(self.state, &result, rise, fall);
        self.state = next;
        self.checked = true;
        self.last_result = Some(result);
        self.last_latency = Some(latency);
        if let Some(t) = &t {
            match t.to {
                Status::Down => self.to_down += 1,
                Status::Up => self.to_up += 1,
                Status::Draining => self.to_draining += 1,
            }
            self.last_reason = Some(t.reason.clone());
            self.last_change = Some(SystemTime::now());
        }
        t
    }

    pub fn view(&self) -> HealthView {
        HealthView {
            status: self.state.status,
            checked: self.checked,
            transitions: TransitionCounts {
                down: self.to_down,
                up: self.to_up,
                draining: self.to_draining,
            },
            last_transition: self.last_reason.clone(),
            last_transition_unix_s: self.last_change.and_then(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            }),
            last_check: self.last_result.as_ref().map(ToString::to_string),
            last_latency_us: self.last_latency.map(|d| d.as_micros() as u64),
        }
    }
}

/// A backend's health in the API (`backend list`, `stats`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    pub status: Status,
    /// False until the first probe result since the daemon started.
    pub checked: bool,
    pub transitions: TransitionCounts,
    /// Why the last transition happened.
    pub last_transition: Option<String>,
    pub last_transition_unix_s: Option<u64>,
    /// `pass: …`, `drain: …` or `fail: …`.
    pub last_check: Option<String>,
    pub last_latency_us: Option<u64>,
}

/// Transitions since the daemon started, by destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionCounts {
    pub down: u64,
    pub up: u64,
    pub draining: u64,
}

/// Where and how to probe one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Tcp(SocketAddr),
    Amqp(SocketAddr),
    Http {
        url: String,
        /// `Authorization` header value.
        auth: Option<String>,
    },
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp(a) => write!(f, "tcp {a}"),
            Probe::Amqp(a) => write!(f, "amqp {a}"),
            Probe::Http { url, .. } => write!(f, "http {url}"),
        }
    }
}

/// One checked backend: what its task probes and how often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTarget {
    pub service: u32,
    pub backend: u32,
    pub addr: IpAddr,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// The checks of a service's backends (none when it is not checked).
pub fn targets(svc: &Service) -> Vec<CheckTarget> {
    svc.backends.iter().filter_map(|b| target(svc, b)).collect()
}

/// The check of one backend of `svc` (`None` when the service is not checked).
pub fn target(svc: &Service, b: &Backend) -> Option<CheckTarget> {
    let c = &svc.health;
    // A port-range service always has a check port (`check_health_port`).
    let probe = match &c.check {
        CheckKind::None => return None,
        CheckKind::Tcp => Probe::Tcp(SocketAddr::new(b.addr, svc.check_port()?)),
        CheckKind::Amqp => Probe::Amqp(SocketAddr::new(b.addr, svc.check_port()?)),
        CheckKind::Http(url) => Probe::Http {
            url: expand_url(url, b.addr),
            auth: match (&c.user, &c.password) {
                (Some(u), Some(p)) => {
                    use base64::Engine as _;
                    let token =
                        base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                    Some(format!("Basic {token}"))
                }
                _ => None,
            },
        },
    };
    Some(CheckTarget {
        service: svc.id,
        backend: b.id,
        addr: b.addr,
        probe,
        interval: c.interval(),
        timeout: c.timeout(),
        rise: c.rise,
        fall: c.fall,
    })
}

/// Runs one probe within `timeout`; returns the result and how long it took.
pub async fn probe(p: &Probe, timeout: Duration) -> (ProbeResult, Duration) {
    let start = Instant::now();
    let fut = async {
        match p {
            Probe::Tcp(addr) => probe_tcp(*addr).await,
            Probe::Amqp(addr) => probe_amqp(*addr).await,
            Probe::Http { url, auth } => probe_http(url, auth.as_deref()).await,
        }
    };
    let result = match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => ProbeResult::Fail(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    };
    (result, start.elapsed())
}

fn io_reason(what: &str, e: &std::io::Error) -> String {
    format!("{what}: {}", e.kind())
}

async fn probe_tcp(addr: SocketAddr) -> ProbeResult {
    match TcpStream::connect(addr).await {
        Ok(_) => ProbeResult::Pass("tcp connect".into()),
        Err(e) => ProbeResult::Fail(io_reason("connect", &e)),
    }
}

/// Up to 16 bytes of what a server sent, for the log.
fn snippet(bytes: &[u8]) -> String {
    let s: String = bytes
        .iter()
        .take(16)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect();
    format!("\"{s}\"")
}

/// Checks the 7-byte frame header of the server's first frame; returns the
/// payload size.
pub fn amqp_frame_header(head: &[u8; 7]) -> Result<u32, String> {
    if head[..4] == AMQP_HEADER[..4] {
        return Err("answered with a protocol header: the server does not speak AMQP 0-9-1".into());
    }
    if head[0] != 1 || head[1..3] != [0, 0] {
        return Err(format!(
            "answered {} instead of an AMQP method frame on channel 0",
            snippet(head)
        ));
    }
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
    if !(6..=AMQP_MAX_FRAME).contains(&size) {
        return Err(format!(
            "AMQP frame of {size} bytes is not a Connection.Start"
        ));
    }
    Ok(size)
}

/// Checks the payload and frame end of the server's first frame: a
/// Connection.Start (class 10, method 10) for AMQP 0-9.
pub fn amqp_connection_start(payload_and_end: &[u8]) -> Result<(), String> {
    let (end, payload) = payload_and_end.split_last().ok_or("empty AMQP frame")?;
    if *end != 0xCE {
        return Err(format!("AMQP frame ends with 0x{end:02x}, not 0xce"));
    }
    if payload.len() < 6 {
        return Err("AMQP frame too short for a method".into());
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    if (class, method) != (10, 10) {
        return Err(format!(
            "first AMQP method is {class}.{method}, not Connection.Start (10.10)"
        ));
    }
    if payload[4..6] != [0, 9] {
        return Err(format!(
            "server offers AMQP version {}-{}, not 0-9",
            payload[4], payload[5]
        ));
    }
    Ok(())
}

async fn probe_amqp(addr: SocketAddr) -> ProbeResult {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return ProbeResult::Fail(io_reason("connect", &e)),
    };
    if let Err(e) = s.write_all(AMQP_HEADER).await {
        return ProbeResult::Fail(io_reason("sending the AMQP header", &e));
    }
    // The 7-byte frame header, and whatever came with it.
    let mut buf = Vec::with_capacity(512);
    while buf.len() < 7 {
        let mut chunk = [0u8; 256];
        match s.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => {
                return ProbeResult::Fail("closed the connection without answering".into())
            }
            Ok(0) => {
                return ProbeResult::Fail(format!(
                    "answered {} and closed the connection",
                    snippet(&buf)
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return ProbeResult::Fail(io_reason("reading the answer", &e)),
        }
        // Refuse garbage as soon as it shows (a protocol header back is
        // told apart below).
        let n = buf.len().min(4);
        if buf[0] != 1 && buf[..n] != AMQP_HEADER[..n] {
            return ProbeResult::Fail(format!(
                "answered {} instead of an AMQP frame",
                snippet(&buf)
            ));
        }
    }
    let head: [u8; 7] = buf[..7].try_into().expect("7 bytes");
    let size = match amqp_frame_header(&head) {
        Ok(n) => n as usize,
        Err(e) => return ProbeResult::Fail(e),
    };
    let mut rest = buf.split_off(7);
    rest.truncate(size + 1);
    let have = rest.len();
    rest.resize(size + 1, 0);
    if let Err(e) = s.read_exact(&mut rest[have..]).await {
        return ProbeResult::Fail(io_reason("reading Connection.Start", &e));
    }
    if let Err(e) = amqp_connection_start(&rest) {
        return ProbeResult::Fail(e);
    }
    // Close politely: everything the server sent was read, so this is a FIN,
    // not a reset. (Closing the AMQP way would need a login.)
    let _ = s.shutdown().await;
    ProbeResult::Pass("AMQP Connection.Start (0-9)".into())
}

async fn probe_http(url: &str, auth: Option<&str>) -> ProbeResult {
    let uri: Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return ProbeResult::Fail(format!("bad url: {e}")),
    };
    let Some(authority) = uri.authority().cloned() else {
        return ProbeResult::Fail("the url names no host".into());
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = match TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(e) => return ProbeResult::Fail(io_reason("connect", &e)),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return ProbeResult::Fail(format!("http: {e}")),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(
            header::USER_AGENT,
            concat!("mqlb/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close");
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let req = match req.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return ProbeResult::Fail(format!("bad request: {e}")),
    };
    let exchange = async move {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        // Read (a bounded part of) the body so the connection ends cleanly.
        let _ = Limited::new(resp.into_body(), HTTP_MAX_BODY)
            .collect()
            .await;
        Ok::<_, hyper::Error>(status)
    };
    let (answer, _) = tokio::join!(exchange, conn);
    match answer {
        Ok(s) if s.is_success() => ProbeResult::Pass(format!("http {}", s.as_u16())),
        Ok(s) if s == hyper::StatusCode::SERVICE_UNAVAILABLE => {
            ProbeResult::Drain("http 503".into())
        }
        Ok(s) => ProbeResult::Fail(format!("http {s}")),
        Err(e) => ProbeResult::Fail(format!("http: {e}")),
    }
}

/// One backend's probe loop: probe, report, wait out the interval.
async fn check_loop(shared: Arc<Shared>, target: CheckTarget) {
    // Spread the first probes of many backends over the interval.
    let offset = target.interval * (target.backend % 8) / 8;
    tokio::time::sleep(offset).await;
    loop {
        let start = tokio::time::Instant::now();
        let (result, latency) = probe(&target.probe, target.timeout).await;
        debug!(backend = %target.addr, probe = %target.probe, ?latency, %result, "health check");
        shared.core.lock().await.report(&target, result, latency);
        tokio::time::sleep_until(start + target.interval).await;
    }
}

/// A probe task that ends when its handle is dropped (also when [`run`]
/// itself is aborted).
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps one probe task per checked backend, following every state change
/// (the core's change counter), until the daemon stops.
pub async fn run(shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    let mut changes = shared.core.lock().await.subscribe_changes();
    // A task is replaced when its target changes (address, settings).
    let mut tasks: BTreeMap<u32, (CheckTarget, Task)> = BTreeMap::new();
    loop {
        let want: BTreeMap<u32, CheckTarget> = shared
            .core
            .lock()
            .await
            .check_targets()
            .into_iter()
            .map(|t| (t.backend, t))
            .collect();
        tasks.retain(|id, (t, _)| want.get(id) == Some(t));
        for (id, t) in want {
            if let std::collections::btree_map::Entry::Vacant(e) = tasks.entry(id) {
                let h = tokio::spawn(check_loop(shared.clone(), t.clone()));
                e.insert((t, Task(h)));
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = stop.changed() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn pass() -> ProbeResult {
        ProbeResult::Pass("ok".into())
    }
    fn fail() -> ProbeResult {
        ProbeResult::Fail("connect: connection refused".into())
    }
    fn drain() -> ProbeResult {
        ProbeResult::Drain("http 503".into())
    }

    /// Runs results through the machine from `status`; returns the final
    /// state and the transitions.
    fn run_seq(
        status: Status,
        seq: &[ProbeResult],
        rise: u32,
        fall: u32,
    ) -> (HealthState, Vec<Transition>) {
        let mut s = HealthState::new(status);
        let mut out = Vec::new();
        for r in seq {
            let (n, t) = step(s, r, rise, fall);
            s = n;
            out.extend(t);
        }
        (s, out)
    }

    #[test]
    fn up_goes_down_after_fall_failures_in_a_row() {
        let (s, t) = run_seq(Status::Up, &[fail(), fail()], 2, 3);
        assert_eq!(
            s,
            HealthState {
                status: Status::Up,
                count: 2
            }
        );
        assert!(t.is_empty());
        let (s, t) = run_seq(Status::Up, &[fail(), fail(), fail()], 2, 3);
        assert_eq!(s, HealthState::new(Status::Down));
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].from, t[0].to), (Status::Up, Status::Down));
        assert_eq!(
            t[0].reason,
            "3 checks in a row did not pass, last: connect: connection refused"
        );
    }

    #[test]
    fn a_pass_resets_the_count() {
        let (s, t) = run_seq(Status::Up, &[fail(), fail(), pass(), fail(), fail()], 2, 3);
        assert_eq!(
            s,
            HealthState {
                status: Status::Up,
                count: 2
            }
        );
        assert!(t.is_empty());
    }

    #[test]
    fn down_comes_back_after_rise_passes() {
        let (s, t) = run_seq(Status::Down, &[pass(), fail(), pass()], 2, 3);
        assert_eq!(s.status, Status::Down, "a failure in between resets");
        assert!(t.is_empty());
        let (s, t) = run_seq(Status::Down, &[pass(), pass()], 2, 3);
        assert_eq!(s, HealthState::new(Status::Up));
        assert_eq!((t[0].from, t[0].to), (Status::Down, Status::Up));
        assert!(
            t[0].reason.starts_with("2 checks in a row passed"),
            "{}",
            t[0].reason
        );
    }

    #[test]
    fn draining_follows_fall_from_up_and_rise_from_down() {
        let (s, t) = run_seq(Status::Up, &[drain(), drain()], 2, 2);
        assert_eq!(s.status, Status::Draining);
        assert_eq!(t[0].to, Status::Draining);
        let (s, _) = run_seq(Status::Down, &[drain()], 1, 5);
        assert_eq!(s.status, Status::Draining, "alive again but draining: rise");
        let (s, t) = run_seq(Status::Draining, &[pass(), pass()], 2, 3);
        assert_eq!(s.status, Status::Up);
        assert_eq!(t[0].from, Status::Draining);
        let (s, _) = run_seq(Status::Draining, &[fail(), fail(), fail()], 2, 3);
        assert_eq!(s.status, Status::Down);
    }

    #[test]
    fn flapping_keeps_counting_and_the_last_result_decides() {
        let (s, t) = run_seq(Status::Up, &[fail(), drain(), fail()], 2, 3);
        assert_eq!(s.status, Status::Down);
        assert_eq!(t.len(), 1);
        let (s, _) = run_seq(Status::Up, &[fail(), fail(), drain()], 2, 3);
        assert_eq!(s.status, Status::Draining);
    }

    #[test]
    fn rise_and_fall_of_one_act_at_once() {
        let (s, t) = run_seq(Status::Up, &[fail(), pass(), fail()], 1, 1);
        assert_eq!(s.status, Status::Down);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn record_counts_transitions() {
        let mut h = BackendHealth::new("10.0.1.1".parse().unwrap(), Status::Up);
        assert!(!h.checked);
        for _ in 0..3 {
            h.record(fail(), Duration::from_millis(3), 2, 3);
        }
        for _ in 0..2 {
            h.record(pass(), Duration::from_millis(1), 2, 3);
        }
        let v = h.view();
        assert_eq!(v.status, Status::Up);
        assert!(v.checked);
        assert_eq!(
            v.transitions,
            TransitionCounts {
                down: 1,
                up: 1,
                draining: 0
            }
        );
        assert!(v.last_transition.unwrap().contains("passed"));
        assert_eq!(v.last_check.as_deref(), Some("pass: ok"));
        assert_eq!(v.last_latency_us, Some(1000));
        assert!(v.last_transition_unix_s.is_some());
    }

    #[test]
    fn panic_threshold() {
        assert!(in_panic(4, 1, 50));
        assert!(!in_panic(4, 2, 50), "exactly half is not below half");
        assert!(!in_panic(4, 0, 0), "0 disables");
        assert!(!in_panic(0, 0, 50), "no candidates, no panic");
        assert!(in_panic(3, 2, 100));
    }

    #[test]
    fn check_kinds_parse_and_print() {
        for s in [
            "none",
            "tcp",
            "amqp",
            "http:http://{backend}:15672/api/health/checks/alarms",
        ] {
            assert_eq!(s.parse::<CheckKind>().unwrap().to_string(), s);
        }
        let err = |s: &str| s.parse::<CheckKind>().unwrap_err().to_string();
        assert_eq!(
            err("icmp"),
            "unknown check \"icmp\" (use none, tcp, amqp or http:URL)"
        );
        assert!(
            err("http:https://x/").contains("https is not supported"),
            "{}",
            err("http:https://x/")
        );
        assert!(err("http:/api/health").contains("give a full url"));
        assert!(err("http:http://a b/").starts_with("bad check url"));
        assert!(err("http:http://u:p@{backend}/").contains("--check-user"));
        let k: CheckKind = serde_json::from_str("\"amqp\"").unwrap();
        assert_eq!(k, CheckKind::Amqp);
        assert!(serde_json::from_str::<CheckKind>("\"ping\"").is_err());
    }

    #[test]
    fn urls_expand_the_backend() {
        let url = "http://{backend}:15672/api/health/checks/alarms";
        assert_eq!(
            expand_url(url, "10.0.1.1".parse().unwrap()),
            "http://10.0.1.1:15672/api/health/checks/alarms"
        );
        assert_eq!(
            expand_url(url, "fd00::1".parse().unwrap()),
            "http://[fd00::1]:15672/api/health/checks/alarms"
        );
    }

    fn spec() -> HealthSpec {
        HealthSpec::default()
    }

    #[test]
    fn config_validation_says_what_is_wrong() {
        let base = HealthConfig::default();
        let err = |s: HealthSpec| base.apply(&s).unwrap_err().to_string();
        assert_eq!(
            err(HealthSpec {
                interval_ms: Some(1000),
                ..spec()
            }),
            "check interval (1s) must be longer than the check timeout (1s)"
        );
        assert_eq!(
            err(HealthSpec {
                timeout_ms: Some(0),
                ..spec()
            }),
            "check timeout must be at least 1ms"
        );
        assert_eq!(
            err(HealthSpec {
                rise: Some(0),
                ..spec()
            }),
            "rise 0 is out of range (1-100)"
        );
        assert_eq!(
            err(HealthSpec {
                fall: Some(101),
                ..spec()
            }),
            "fall 101 is out of range (1-100)"
        );
        assert_eq!(
            err(HealthSpec {
                panic_threshold: Some(101),
                ..spec()
            }),
            "panic threshold 101 is out of range (0-100 percent)"
        );
        assert!(err(HealthSpec {
            interval_ms: Some(MAX_INTERVAL_MS + 1),
            ..spec()
        })
        .contains("too long"));
        let http = CheckKind::Http("http://{backend}:15672/".into());
        assert!(err(HealthSpec {
            check: Some(http.clone()),
            port: Some(15672),
            ..spec()
        })
        .contains("--check-port 0"));
        assert_eq!(
            err(HealthSpec {
                check: Some(http.clone()),
                user: Some("guest".into()),
                ..spec()
            }),
            "give --check-user and --check-password together"
        );
        assert!(err(HealthSpec {
            check: Some(CheckKind::Amqp),
            user: Some("guest".into()),
            password: Some("x".into()),
            ..spec()
        })
        .contains("http checks only"));
        assert!(err(HealthSpec {
            check: Some(http.clone()),
            user: Some("a:b".into()),
            password: Some("x".into()),
            ..spec()
        })
        .contains("':'"));
    }

    #[test]
    fn config_changes_apply_whole() {
        let c = HealthConfig::default()
            .apply(&HealthSpec {
                check: Some(CheckKind::Http(
                    "http://{backend}:15672/api/health/checks/alarms".into(),
                )),
                user: Some("guest".into()),
                password: Some("secret".into()),
                interval_ms: Some(5000),
                timeout_ms: Some(1500),
                rise: Some(1),
                fall: Some(2),
                panic_threshold: Some(0),
                ..spec()
            })
            .unwrap();
        assert_eq!(
            (
                c.interval_ms,
                c.timeout_ms,
                c.rise,
                c.fall,
                c.panic_threshold
            ),
            (5000, 1500, 1, 2, 0)
        );
        let s = c.summary(Some(5672));
        assert_eq!(
            s,
            "http:http://{backend}:15672/api/health/checks/alarms as guest:*** every 5s \
             (timeout 1s 500ms, rise 1, fall 2), no panic mode"
        );
        assert!(!s.contains("secret"));
        assert_eq!(c.redacted().password.as_deref(), Some("***"));
        // Back to amqp: the credentials must go too, in the same change.
        let c2 = c
            .apply(&HealthSpec {
                check: Some(CheckKind::Amqp),
                user: Some(String::new()),
                port: Some(5673),
                ..spec()
            })
            .unwrap();
        assert_eq!((c2.user, c2.password, c2.port), (None, None, Some(5673)));
        let c3 = HealthConfig {
            check: CheckKind::Amqp,
            port: Some(5673),
            ..Default::default()
        }
        .apply(&HealthSpec {
            port: Some(0),
            ..spec()
        })
        .unwrap();
        assert_eq!(c3.port, None, "0 goes back to the service port");
        assert_eq!(
            c3.summary(Some(5672)),
            "amqp :5672 every 2s (timeout 1s, rise 2, fall 3), panic below 50%"
        );
        let keep = c3
            .apply(&HealthSpec {
                on_down: Some(OnDown::Keep),
                ..spec()
            })
            .unwrap();
        assert_eq!(keep.on_down, OnDown::Keep);
        assert_eq!(
            keep.summary(Some(5672)),
            "amqp :5672 every 2s (timeout 1s, rise 2, fall 3), panic below 50%, \
             keeps flows of down backends"
        );
        let back = keep.apply(&HealthSpec {
            on_down: Some(OnDown::Reset),
            ..spec()
        });
        assert_eq!(back.unwrap(), c3, "reset is the default");
    }

    // ---- probes against real sockets on loopback ----

    const T: Duration = Duration::from_millis(500);

    async fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    }

    #[tokio::test]
    async fn tcp_probe_passes_on_a_listener_and_fails_on_a_closed_port() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (r, _) = probe(&Probe::Tcp(l.local_addr().unwrap()), T).await;
        assert_eq!(r, ProbeResult::Pass("tcp connect".into()));
        let (r, _) = probe(&Probe::Tcp(closed_port().await), T).await;
        assert_eq!(r, ProbeResult::Fail("connect: connection refused".into()));
    }

    /// A Connection.Start frame as AMQP 0-9-1 (section 4.2.3) lays it out,
    /// with RabbitMQ-like contents.
    fn connection_start() -> Vec<u8> {
        fn short_str(out: &mut Vec<u8>, s: &str) {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        fn long_str(out: &mut Vec<u8>, s: &[u8]) {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s);
        }
        let mut table = Vec::new();
        for (k, v) in [
            ("product", "RabbitMQ"),
            ("version", "3.10.8"),
            ("cluster_name", "test"),
        ] {
            short_str(&mut table, k);
            table.push(b'S');
            long_str(&mut table, v.as_bytes());
        }
        let mut payload = Vec::new();
        payload.extend_from_slice(&10u16.to_be_bytes()); // class connection
        payload.extend_from_slice(&10u16.to_be_bytes()); // method start
        payload.extend_from_slice(&[0, 9]); // version-major, version-minor
        long_str(&mut payload, &table); // server-properties
        long_str(&mut payload, b"PLAIN AMQPLAIN"); // mechanisms
        long_str(&mut payload, b"en_US"); // locales
        let mut frame = vec![1, 0, 0]; // type method, channel 0
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        frame
    }

    /// A server that reads the 8-byte header, answers `answer`, and (if
    /// `close`) reads until the client closes. Returns its address and what
    /// it received.
    async fn amqp_server(answer: Vec<u8>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = vec![0u8; 8];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(&answer).await.unwrap();
            // Wait for the client's close (EOF) and collect anything after.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
            got.extend(rest);
            got
        });
        (addr, h)
    }

    #[tokio::test]
    async fn amqp_probe_accepts_connection_start_and_closes() {
        let (addr, server) = amqp_server(connection_start()).await;
        let (r, latency) = probe(&Probe::Amqp(addr), T).await;
        assert_eq!(r, ProbeResult::Pass("AMQP Connection.Start (0-9)".into()));
        assert!(latency < T);
        let got = tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got, AMQP_HEADER,
            "sent the protocol header, then closed (EOF)"
        );
    }

    #[tokio::test]
    async fn amqp_probe_refuses_other_answers() {
        let (addr, _s) = amqp_server(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
        let (r, _) = probe(&Probe::Amqp(addr), T).await;
        assert_eq!(r.target(), Status::Down);
        assert!(r.reason().starts_with("answered \"HTTP/1.1 400 Bad"), "{r}");

        // A protocol header back: RabbitMQ's way of refusing a version.
        let (addr, _s) = amqp_server(b"AMQP\0\0\x09\x01".to_vec()).await;
        let (r, _) = probe(&Probe::Amqp(addr), T).await;
        assert!(r.reason().contains("protocol header"), "{r}");

        // Another method than Connection.Start.
        let mut other = connection_start();
        other[10] = 50; // method 10.50 (close)
        let (addr, _s) = amqp_server(other).await;
        let (r, _) = probe(&Probe::Amqp(addr), T).await;
        assert!(r.reason().contains("10.50"), "{r}");

        // A bad frame end.
        let mut bad_end = connection_start();
        *bad_end.last_mut().unwrap() = 0;
        let (addr, _s) = amqp_server(bad_end).await;
        let (r, _) = probe(&Probe::Amqp(addr), T).await;
        assert!(r.reason().contains("0xce"), "{r}");

        // Version 0-8.
        let mut v08 = connection_start();
        v08[12] = 8;
        let (addr, _s) = amqp_server(v08).await;
        let (r, _) = probe(&Probe::Amqp(addr), T).await;
        assert!(r.reason().contains("version 0-8"), "{r}");
    }

    #[tokio::test]
    async fn amqp_probe_times_out_on_silence_and_fails_on_a_closed_port() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _server = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let (r, latency) = probe(&Probe::Amqp(addr), Duration::from_millis(200)).await;
        assert_eq!(r, ProbeResult::Fail("no answer within 200ms".into()));
        assert!(latency >= Duration::from_millis(200));
        let (r, _) = probe(&Probe::Amqp(closed_port().await), T).await;
        assert_eq!(r, ProbeResult::Fail("connect: connection refused".into()));
        // Accepts, then closes without a word.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut h = [0u8; 8];
            let _ = s.read_exact(&mut h).await;
        });
        let (r, _) = probe(&Probe::Amqp(addr), T).await;
        assert_eq!(
            r,
            ProbeResult::Fail("closed the connection without answering".into())
        );
    }

    /// A tiny HTTP server: `/ok` 200, `/drain` 503, `/broken` 500,
    /// `/auth` 200 with `guest:secret`, else 401.
    async fn http_server() -> SocketAddr {
        use axum::{http::HeaderMap, routing::get, Router};
        async fn auth(h: HeaderMap) -> (hyper::StatusCode, &'static str) {
            // "guest:secret" in base64.
            if h.get("authorization").and_then(|v| v.to_str().ok())
                == Some("Basic Z3Vlc3Q6c2VjcmV0")
            {
                (hyper::StatusCode::OK, "{\"status\":\"ok\"}")
            } else {
                (hyper::StatusCode::UNAUTHORIZED, "no")
            }
        }
        let app = Router::new()
            .route("/ok", get(|| async { "{\"status\":\"ok\"}" }))
            .route(
                "/drain",
                get(|| async { (hyper::StatusCode::SERVICE_UNAVAILABLE, "alarm") }),
            )
            .route(
                "/broken",
                get(|| async { (hyper::StatusCode::INTERNAL_SERVER_ERROR, "x") }),
            )
            .route("/auth", get(auth));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        addr
    }

    fn http(addr: SocketAddr, path: &str, auth: Option<&str>) -> Probe {
        Probe::Http {
            url: format!("http://{addr}{path}"),
            auth: auth.map(Into::into),
        }
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let a = http_server().await;
        let (r, _) = probe(&http(a, "/ok", None), T).await;
        assert_eq!(r, ProbeResult::Pass("http 200".into()));
        let (r, _) = probe(&http(a, "/drain", None), T).await;
        assert_eq!(r, ProbeResult::Drain("http 503".into()));
        let (r, _) = probe(&http(a, "/broken", None), T).await;
        assert_eq!(
            r,
            ProbeResult::Fail("http 500 Internal Server Error".into())
        );
        let (r, _) = probe(&http(a, "/nothing", None), T).await;
        assert_eq!(r.target(), Status::Down);
        let (r, _) = probe(&http(closed_port().await, "/ok", None), T).await;
        assert_eq!(r, ProbeResult::Fail("connect: connection refused".into()));
    }

    #[tokio::test]
    async fn http_probe_sends_basic_auth_from_the_config() {
        let a = http_server().await;
        let (r, _) = probe(&http(a, "/auth", None), T).await;
        assert_eq!(r, ProbeResult::Fail("http 401 Unauthorized".into()));
        let mut svc = crate::state::State::default();
        svc.add_service(&crate::state::ServiceSpec {
            name: "mgmt".into(),
            vip: format!("10.0.0.10:{}", a.port()),
            proto: crate::state::Proto::Tcp,
            hash: Default::default(),
            udp_idle_s: None,
            ring_size: Some(13),
            health: HealthSpec {
                check: Some(CheckKind::Http(format!(
                    "http://127.0.0.1:{}/auth",
                    a.port()
                ))),
                user: Some("guest".into()),
                password: Some("wrong".into()),
                ..spec()
            },
        })
        .unwrap();
        svc.add_backend(
            "mgmt",
            &crate::state::BackendSpec {
                addr: "10.0.1.1".into(),
                weight: None,
            },
        )
        .unwrap();
        let t = targets(&svc.services[0]);
        let (r, _) = probe(&t[0].probe, T).await;
        assert_eq!(
            r,
            ProbeResult::Fail("http 401 Unauthorized".into()),
            "wrong password"
        );
        svc.services[0].health.password = Some("secret".into());
        let t = targets(&svc.services[0]);
        let (r, _) = probe(&t[0].probe, T).await;
        assert_eq!(r, ProbeResult::Pass("http 200".into()));
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _server = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let (r, _) = probe(&http(addr, "/", None), Duration::from_millis(200)).await;
        assert_eq!(r, ProbeResult::Fail("no answer within 200ms".into()));
    }

    /// The daemon's check tasks end to end: an http check (on loopback, the
    /// URL names no `{backend}`) that answers 500, then 200; the backend's
    /// `BACKENDS` entry follows, and a service change restarts the probes.
    #[tokio::test]
    async fn check_tasks_follow_results_and_changes() {
        use crate::{
            daemon::Core,
            dataplane::MemDataplane,
            state::{BackendSpec, Proto, ServiceSpec, ServiceUpdate, State, StateStore},
        };
        use axum::{routing::get, Router};
        use std::sync::atomic::{AtomicU16, Ordering};

        let answer = Arc::new(AtomicU16::new(500));
        let app = {
            let answer = answer.clone();
            Router::new().route(
                "/health",
                get(move || {
                    let code = answer.load(Ordering::SeqCst);
                    async move { hyper::StatusCode::from_u16(code).unwrap() }
                }),
            )
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

        let dir = tempfile::tempdir().unwrap();
        let mem: Arc<std::sync::Mutex<MemDataplane>> = Default::default();
        let mut core = Core::new(
            State::default(),
            StateStore::new(dir.path()),
            Box::new(mem.clone()),
            Default::default(),
        )
        .unwrap();
        core.add_service(&ServiceSpec {
            name: "mgmt".into(),
            vip: "10.0.0.10:15672".into(),
            proto: Proto::Tcp,
            hash: Default::default(),
            udp_idle_s: None,
            ring_size: Some(13),
            health: HealthSpec {
                check: Some(CheckKind::Http(format!("http://127.0.0.1:{port}/health"))),
                interval_ms: Some(50),
                timeout_ms: Some(40),
                rise: Some(1),
                fall: Some(1),
                // One backend down would be panic mode (0 of 1 up).
                panic_threshold: Some(0),
                ..spec()
            },
        })
        .unwrap();
        let id = core
            .add_backend(
                "mgmt",
                &BackendSpec {
                    addr: "10.0.1.1".into(),
                    weight: None,
                },
            )
            .unwrap()
            .id;
        let shared = Shared::new(core);
        let task = tokio::spawn(run(shared.clone()));
        let state_is = |want: u8| {
            let mem = mem.clone();
            async move {
                for _ in 0..200 {
                    if mem.lock().unwrap().backends.get(&id).map(|b| b.state) == Some(want) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("BACKENDS state of {id} never became {want}");
            }
        };
        state_is(lb_common::backend_state::DOWN).await;
        let h = shared.core.lock().await.health_of(id).unwrap();
        assert_eq!(
            h.last_check.as_deref(),
            Some("fail: http 500 Internal Server Error")
        );
        answer.store(200, Ordering::SeqCst);
        state_is(lb_common::backend_state::ACTIVE).await;
        answer.store(503, Ordering::SeqCst);
        state_is(lb_common::backend_state::DRAINING).await;

        // A change of URL restarts the probe: this one is refused.
        let closed = closed_port().await;
        shared
            .core
            .lock()
            .await
            .set_service(
                "mgmt",
                &ServiceUpdate {
                    health: HealthSpec {
                        check: Some(CheckKind::Http(format!("http://{closed}/health"))),
                        ..spec()
                    },
                },
            )
            .unwrap();
        state_is(lb_common::backend_state::DOWN).await;
        let h = shared.core.lock().await.health_of(id).unwrap();
        assert_eq!(
            h.last_check.as_deref(),
            Some("fail: connect: connection refused")
        );

        shared.shutdown.send_replace(true);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
    }

    /// By hand, against a real RabbitMQ (see ENV-NOTES for running one in
    /// a namespace): `MQLB_TEST_AMQP=IP:PORT [MQLB_TEST_MGMT=http://IP:15672]
    /// cargo test -p lb-user real_rabbitmq -- --ignored`.
    #[tokio::test]
    #[ignore = "needs a RabbitMQ node: MQLB_TEST_AMQP=IP:PORT"]
    async fn real_rabbitmq() {
        let amqp: SocketAddr = std::env::var("MQLB_TEST_AMQP")
            .expect("MQLB_TEST_AMQP=IP:PORT")
            .parse()
            .expect("IP:PORT");
        let (r, latency) = probe(&Probe::Amqp(amqp), Duration::from_secs(1)).await;
        println!("amqp {amqp}: {r} in {latency:?}");
        assert_eq!(r, ProbeResult::Pass("AMQP Connection.Start (0-9)".into()));
        if let Ok(mgmt) = std::env::var("MQLB_TEST_MGMT") {
            let url = format!("{mgmt}/api/health/checks/alarms");
            let guest = format!("Basic {}", {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode("guest:guest")
            });
            let (r, latency) = probe(
                &Probe::Http {
                    url: url.clone(),
                    auth: Some(guest),
                },
                Duration::from_secs(1),
            )
            .await;
            println!("http {url}: {r} in {latency:?}");
            assert_eq!(r, ProbeResult::Pass("http 200".into()));
            let (r, _) = probe(&Probe::Http { url, auth: None }, Duration::from_secs(1)).await;
            println!("without credentials: {r}");
            assert_eq!(r.target(), Status::Down);
        }
    }

    #[test]
    fn targets_use_the_backend_address_and_the_check_port() {
        let mut s = crate::state::State::default();
        s.add_service(&crate::state::ServiceSpec {
            name: "amqp".into(),
            vip: "10.0.0.10:5672".into(),
            proto: crate::state::Proto::Tcp,
            hash: Default::default(),
            udp_idle_s: None,
            ring_size: Some(13),
            health: HealthSpec {
                check: Some(CheckKind::Amqp),
                ..spec()
            },
        })
        .unwrap();
        s.add_backend(
            "amqp",
            &crate::state::BackendSpec {
                addr: "10.0.1.1".into(),
                weight: None,
            },
        )
        .unwrap();
        let t = targets(&s.services[0]);
        assert_eq!(t[0].probe, Probe::Amqp("10.0.1.1:5672".parse().unwrap()));
        assert_eq!(
            (t[0].interval, t[0].timeout),
            (Duration::from_secs(2), Duration::from_secs(1))
        );
        s.services[0].health.port = Some(5673);
        assert_eq!(
            targets(&s.services[0])[0].probe,
            Probe::Amqp("10.0.1.1:5673".parse().unwrap())
        );
        s.services[0].health.check = CheckKind::None;
        assert!(targets(&s.services[0]).is_empty());

        // A port-range service probes its check port (it must have one).
        s.services[0].vip = crate::state::parse_vip("10.0.0.10:5004-5099").unwrap();
        s.services[0].health.check = CheckKind::Tcp;
        assert_eq!(
            targets(&s.services[0])[0].probe,
            Probe::Tcp("10.0.1.1:5673".parse().unwrap())
        );
        s.services[0].health.port = None;
        assert!(
            targets(&s.services[0]).is_empty(),
            "no port: nothing to probe"
        );
        assert!(s.services[0]
            .health
            .summary(None)
            .starts_with("tcp (no check port) every"));
    }
}
