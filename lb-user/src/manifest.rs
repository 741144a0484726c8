//! The declarative file: `mqlb apply -f FILE`, `mqlb export` and
//! `mqlb up --config FILE` all read or write this one TOML format.
//!
//! ```toml
//! seed = 7                      # absent: apply keeps the daemon's seed
//!
//! [[service]]
//! name = "amqp"
//! vip = "10.0.0.10:5672"       # IP:PORT, IP:LO-HI (a port range) or IP:*
//! proto = "tcp"
//! hash = "five-tuple"           # five-tuple | src-ip | rtp
//! ring_size = 65537
//! check = "amqp"                # none | tcp | amqp | http:URL
//! check_interval = "2s"
//! check_timeout = "1s"
//! rise = 2
//! fall = 3
//! panic_threshold = 50
//! on_down = "reset"             # reset | keep (flows of a down backend)
//! backends = [
//!     { ip = "10.0.1.1", weight = 100 },
//!     { ip = "10.0.1.2", weight = 200, state = "draining" },
//! ]
//! ```
//!
//! Keys are the CLI's flags in snake case (`--udp-idle` is `udp_idle`,
//! `--check-interval` is `check_interval`, a backend's address is `ip`). A
//! key left out takes the default `service add` gives it, so the file says
//! everything: apply makes the daemon's services exactly the file's. Daemon
//! settings (`mode`, `socket`, `state_dir`, `ct_entries`, `metrics`) may sit
//! at the top too: `mqlb up --config` reads them, apply leaves them.
//!
//! Rules:
//! - A file without a `service` key manages no services: `apply` refuses it
//!   (write `service = []` to remove every service), `up --config` leaves the
//!   saved services alone.
//! - A service is known by its name; changing its vip, hash, ring size or
//!   checks changes it in place (its backends keep their ids, so their
//!   established flows stay). A backend is known by its address.
//! - Passwords: `export` writes `check_password = "***"`, never the secret
//!   (the API never sends it). Applying `"***"` keeps the password the daemon
//!   has stored for that service, so `apply(export())` changes nothing; a
//!   service without a stored password needs the real one.
//! - [`apply_to`] validates the whole file before it changes anything and
//!   reuses [`State`]'s own methods, so removing a backend holds its id for
//!   its established flows exactly as `mqlb backend del` does.
//! - Errors carry a [`Loc`] (service, backend, field); [`locate`] turns it
//!   into `FILE:LINE: field F (service S, backend B): problem`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::PathBuf,
    time::Duration,
};

use lb_common::RING_DEFAULT;
use serde::{Deserialize, Serialize};
use toml_edit::{ImDocument, Item, TableLike, Value};

use crate::{
    daemon::ConfigFile,
    health::{CheckKind, HealthConfig, HealthSpec, OnDown, MAX_RISE_FALL, REDACTED},
    loader::Mode,
    state::{
        check_health_port, check_name, check_ring_size, check_udp_idle, check_weight,
        parse_backend_addr, parse_vip, vip_conflict, BackendSpec, BackendState, BackendUpdate,
        Hash, Proto, Service, ServiceSpec, State, StateError, Vip, VipClaim, DEFAULT_UDP_IDLE_S,
        DEFAULT_WEIGHT,
    },
};

/// The file as written: daemon settings (read by `mqlb up --config` only),
/// the seed, and the services.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_entries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    /// `None`: the file manages no services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Vec<ServiceEntry>>,
}

impl Manifest {
    /// The daemon settings `mqlb up --config` takes from the file.
    pub fn config(&self) -> ConfigFile {
        ConfigFile {
            mode: self.mode,
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            ct_entries: self.ct_entries,
            seed: self.seed,
            metrics: self.metrics,
        }
    }

    /// The desired services and seed, if the file has a `service` key.
    pub fn desired(&self) -> Option<Desired> {
        self.service.as_ref().map(|s| Desired {
            seed: self.seed,
            service: s.clone(),
        })
    }

    /// The daemon settings the file sets (apply does not change them).
    pub fn daemon_keys(&self) -> Vec<&'static str> {
        [
            ("mode", self.mode.is_some()),
            ("socket", self.socket.is_some()),
            ("state_dir", self.state_dir.is_some()),
            ("ct_entries", self.ct_entries.is_some()),
            ("metrics", self.metrics.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

/// The desired state: what `POST /v1/apply` takes and `GET /v1/export`
/// answers (JSON, with the file's key names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    /// `None`: keep the daemon's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    #[serde(default)]
    pub service: Vec<ServiceEntry>,
}

/// One `[[service]]` table. Values stay as written (strings, wide integers)
/// so that [`check`] can say which field is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    pub name: String,
    /// `IP:PORT`, `IP:LO-HI` or `IP:*` (see [`parse_vip`]).
    pub vip: String,
    pub proto: Proto,
    #[serde(default)]
    pub hash: Hash,
    /// UDP conntrack idle timeout in seconds [default: 60].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_idle: Option<u64>,
    /// A prime up to 65537 [default: 65537].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_size: Option<u64>,
    /// `none`, `tcp`, `amqp` or `http:URL` [default: none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// A duration: `2s`, `500ms` [default: 2s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u64>,
    /// 0 or absent: the service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_user: Option<String>,
    /// `"***"` keeps the stored password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u64>,
    /// `reset` or `keep` [default: reset].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_down: Option<OnDown>,
    #[serde(default)]
    pub backends: Vec<BackendEntry>,
}

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    pub ip: String,
    /// 1-65535 [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u64>,
    /// `active` or `draining` [default: active].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BackendState>,
}

/// Where in a desired state a problem is: indexes into `service` and its
/// `backends` (0-based), and the key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A desired state that cannot be applied, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ApplyError {
    pub at: Loc,
    /// `service amqp, backend 10.0.1.1`; empty at the top level.
    pub context: String,
    pub problem: String,
    /// The HTTP status the API answers with.
    pub status: u16,
}

impl ApplyError {
    fn render(&self) -> String {
        match (&self.at.field, self.context.is_empty()) {
            (Some(f), false) => format!("field {f} ({}): {}", self.context, self.problem),
            (Some(f), true) => format!("field {f}: {}", self.problem),
            (None, false) => format!("{}: {}", self.context, self.problem),
            (None, true) => self.problem.clone(),
        }
    }
}

/// A problem in a file, with its name and line: `FILE:LINE: message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// One change an apply makes (or, dry run, would make).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Seed {
        from: u32,
        to: u32,
    },
    AddService {
        service: String,
        vip: Vip,
        proto: Proto,
    },
    DelService {
        service: String,
        vip: Vip,
        proto: Proto,
    },
    /// One setting of a kept service (`field` is the file's key).
    SetService {
        service: String,
        field: String,
        from: String,
        to: String,
    },
    AddBackend {
        service: String,
        ip: IpAddr,
        weight: u32,
        state: BackendState,
    },
    /// Its id stays held until its established flows end (`backend del`).
    DelBackend {
        service: String,
        ip: IpAddr,
    },
    SetBackend {
        service: String,
        ip: IpAddr,
        field: String,
        from: String,
        to: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Seed { from, to } => write!(f, "~ seed {from} -> {to}"),
            Change::AddService {
                service,
                vip,
                proto,
            } => write!(f, "+ service {service} {vip}/{proto}"),
            Change::DelService {
                service,
                vip,
                proto,
            } => write!(f, "- service {service} {vip}/{proto}"),
            Change::SetService {
                service,
                field,
                from,
                to,
            } => write!(f, "~ service {service} {field} {from} -> {to}"),
            Change::AddBackend {
                service,
                ip,
                weight,
                state,
            } => {
                write!(f, "+ backend {service} {ip} weight {weight}")?;
                if *state == BackendState::Draining {
                    f.write_str(" draining")?;
                }
                Ok(())
            }
            Change::DelBackend { service, ip } => write!(f, "- backend {service} {ip}"),
            Change::SetBackend {
                service,
                ip,
                field,
                from,
                to,
            } => write!(f, "~ backend {service} {ip} {field} {from} -> {to}"),
        }
    }
}

/// `POST /v1/apply`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// Compute the changes, change nothing.
    #[serde(default)]
    pub dry_run: bool,
    pub desired: Desired,
}

/// The answer to `POST /v1/apply`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReply {
    /// In the order they were made.
    pub changes: Vec<Change>,
    /// False for a dry run.
    pub applied: bool,
}

/// The changes, one line each; `no changes` when there are none.
pub fn format_changes(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no changes\n".into();
    }
    changes.iter().map(|c| format!("{c}\n")).collect()
}

// ---------------------------------------------------------------- parsing

/// Parses a file; `name` is how errors name it.
pub fn parse(name: &str, text: &str) -> Result<Manifest, ManifestError> {
    toml::from_str::<Manifest>(text).map_err(|e| {
        let span = e.span();
        let found = span.as_ref().and_then(|s| path_at(text, s.start));
        let message = match found {
            Some((at, context)) => ApplyError {
                at,
                context,
                problem: one_line(e.message()),
                status: 400,
            }
            .to_string(),
            None => one_line(e.message()),
        };
        ManifestError {
            file: name.into(),
            line: span.map(|s| line_of(text, s.start)),
            message,
        }
    })
}

/// A parser message on one line (the TOML parser's have several).
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The problem `err` names, pinned to its line in the file it came from.
pub fn locate(name: &str, text: &str, err: &ApplyError) -> ManifestError {
    locate_message(name, text, &err.at, err.to_string())
}

/// `message` (e.g. a daemon's refusal) pinned to the line `at` points to.
pub fn locate_message(name: &str, text: &str, at: &Loc, message: String) -> ManifestError {
    ManifestError {
        file: name.into(),
        line: line_at(text, at),
        message,
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

/// The tables of an array of tables or of an array of inline tables.
fn elements(item: &Item) -> Vec<(&dyn TableLike, Option<Range<usize>>)> {
    match item {
        Item::ArrayOfTables(a) => a.iter().map(|t| (t as &dyn TableLike, t.span())).collect(),
        Item::Value(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_inline_table().map(|t| (t as &dyn TableLike, t.span())))
            .collect(),
        _ => Vec::new(),
    }
}

/// The key of `t` whose key or value holds `offset`.
fn key_at(t: &dyn TableLike, offset: usize) -> Option<String> {
    t.iter().find_map(|(k, _)| {
        let (key, item) = t.get_key_value(k)?;
        (contains(key.span(), offset) || contains(item.span(), offset)).then(|| k.to_string())
    })
}

fn str_key<'a>(t: &'a dyn TableLike, key: &str) -> Option<&'a str> {
    t.get(key).and_then(Item::as_str)
}

fn context_of(
    service: Option<(usize, &dyn TableLike)>,
    backend: Option<(usize, &dyn TableLike)>,
) -> String {
    let mut parts = Vec::new();
    if let Some((i, t)) = service {
        parts.push(match str_key(t, "name") {
            Some(n) => format!("service {n}"),
            None => format!("service #{}", i + 1),
        });
    }
    if let Some((j, t)) = backend {
        parts.push(match str_key(t, "ip") {
            Some(ip) => format!("backend {ip}"),
            None => format!("backend #{}", j + 1),
        });
    }
    parts.join(", ")
}

/// Which service, backend and key of the file hold byte `offset`, and the
/// context naming them.
fn path_at(text: &str, offset: usize) -> Option<(Loc, String)> {
    let doc = ImDocument::parse(text).ok()?;
    let root = doc.as_table();
    let services = root.get("service").map(elements).unwrap_or_default();
    for (i, (svc, span)) in services.iter().enumerate() {
        let backends = svc.get("backends").map(elements).unwrap_or_default();
        for (j, (b, bspan)) in backends.iter().enumerate() {
            if let Some(field) = key_at(*b, offset) {
                let loc = Loc {
                    service: Some(i),
                    backend: Some(j),
                    field: Some(field),
                };
                return Some((loc, context_of(Some((i, *svc)), Some((j, *b)))));
            }
            if contains(bspan.clone(), offset) {
                let loc = Loc {
                    service: Some(i),
                    backend: Some(j),
                    field: None,
                };
                return Some((loc, context_of(Some((i, *svc)), Some((j, *b)))));
            }
        }
        let field = key_at(*svc, offset);
        if field.is_some() || contains(span.clone(), offset) {
            let loc = Loc {
                service: Some(i),
                backend: None,
                field,
            };
            return Some((loc, context_of(Some((i, *svc)), None)));
        }
    }
    let field = key_at(root, offset)?;
    Some((
        Loc {
            field: Some(field),
            ..Loc::default()
        },
        String::new(),
    ))
}

/// The line `at` points to: the key if the file has it, else the table.
fn line_at(text: &str, at: &Loc) -> Option<usize> {
    let doc = ImDocument::parse(text).ok()?;
    let root = doc.as_table();
    let key_line = |t: &dyn TableLike, field: &Option<String>| {
        let (key, _) = t.get_key_value(field.as_deref()?)?;
        key.span().map(|s| line_of(text, s.start))
    };
    let Some(i) = at.service else {
        return key_line(root, &at.field);
    };
    let services = root.get("service").map(elements).unwrap_or_default();
    let (svc, span) = services.get(i)?;
    let (table, span) = match at.backend {
        Some(j) => {
            let backends = svc.get("backends").map(elements).unwrap_or_default();
            let (b, bspan) = backends.get(j)?;
            (*b, bspan.clone())
        }
        None => (*svc, span.clone()),
    };
    key_line(table, &at.field).or_else(|| span.map(|s| line_of(text, s.start)))
}

// ---------------------------------------------------------------- export

fn fmt_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// The state as a desired state: `apply_to(state, &export(state))` changes
/// nothing. The check password reads `***`.
pub fn export(state: &State) -> Desired {
    Desired {
        seed: Some(state.seed),
        service: state.services.iter().map(export_service).collect(),
    }
}

fn export_service(s: &Service) -> ServiceEntry {
    let h = &s.health;
    let d = HealthConfig::default();
    // Check timing only where it matters or was changed.
    let timing = h.enabled();
    let some_if = |cond: bool, v: u64| cond.then_some(v);
    ServiceEntry {
        name: s.name.clone(),
        vip: s.vip.to_string(),
        proto: s.proto,
        hash: s.hash,
        udp_idle: some_if(
            s.proto == Proto::Udp || s.udp_idle_s != DEFAULT_UDP_IDLE_S,
            s.udp_idle_s.into(),
        ),
        ring_size: Some(s.ring_size.into()),
        check: Some(h.check.to_string()),
        check_interval: (timing || h.interval_ms != d.interval_ms).then(|| fmt_ms(h.interval_ms)),
        check_timeout: (timing || h.timeout_ms != d.timeout_ms).then(|| fmt_ms(h.timeout_ms)),
        rise: some_if(timing || h.rise != d.rise, h.rise.into()),
        fall: some_if(timing || h.fall != d.fall, h.fall.into()),
        check_port: h.port,
        check_user: h.user.clone(),
        check_password: h.password.as_ref().map(|_| REDACTED.to_string()),
        panic_threshold: some_if(
            timing || h.panic_threshold != d.panic_threshold,
            h.panic_threshold.into(),
        ),
        on_down: (h.on_down != d.on_down).then_some(h.on_down),
        backends: s
            .backends
            .iter()
            .map(|b| BackendEntry {
                ip: b.addr.to_string(),
                weight: Some(b.weight.into()),
                state: (b.state == BackendState::Draining).then_some(BackendState::Draining),
            })
            .collect(),
    }
}

/// A TOML string (quoted and escaped).
fn q(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

/// The desired state as the file [`parse`] reads back to the same value.
pub fn to_toml(d: &Desired) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# mqlb desired state (`mqlb export`); `mqlb apply -f FILE` makes a daemon match it.\n",
    );
    if d.service.iter().any(|s| s.check_password.is_some()) {
        out.push_str("# check_password = \"***\" keeps the password the daemon has stored.\n");
    }
    if let Some(seed) = d.seed {
        let _ = writeln!(out, "seed = {seed}");
    }
    if d.service.is_empty() {
        out.push_str("service = []\n");
    }
    for s in &d.service {
        let _ = writeln!(out, "\n[[service]]");
        let _ = writeln!(out, "name = {}", q(&s.name));
        let _ = writeln!(out, "vip = {}", q(&s.vip));
        let _ = writeln!(out, "proto = {}", q(&s.proto.to_string()));
        let _ = writeln!(out, "hash = {}", q(&s.hash.to_string()));
        let num = |out: &mut String, k: &str, v: Option<u64>| {
            if let Some(v) = v {
                let _ = writeln!(out, "{k} = {v}");
            }
        };
        let text = |out: &mut String, k: &str, v: &Option<String>| {
            if let Some(v) = v {
                let _ = writeln!(out, "{k} = {}", q(v));
            }
        };
        num(&mut out, "udp_idle", s.udp_idle);
        num(&mut out, "ring_size", s.ring_size);
        text(&mut out, "check", &s.check);
        text(&mut out, "check_interval", &s.check_interval);
        text(&mut out, "check_timeout", &s.check_timeout);
        num(&mut out, "rise", s.rise);
        num(&mut out, "fall", s.fall);
        num(&mut out, "check_port", s.check_port.map(u64::from));
        text(&mut out, "check_user", &s.check_user);
        text(&mut out, "check_password", &s.check_password);
        num(&mut out, "panic_threshold", s.panic_threshold);
        text(&mut out, "on_down", &s.on_down.map(|v| v.to_string()));
        if s.backends.is_empty() {
            out.push_str("backends = []\n");
            continue;
        }
        out.push_str("backends = [\n");
        for b in &s.backends {
            let _ = write!(out, "    {{ ip = {}", q(&b.ip));
            if let Some(w) = b.weight {
                let _ = write!(out, ", weight = {w}");
            }
            if let Some(st) = b.state {
                let _ = write!(out, ", state = {}", q(&st.to_string()));
            }
            out.push_str(" },\n");
        }
        out.push_str("]\n");
    }
    out
}

// ---------------------------------------------------------------- validation

/// A service of the desired state, validated, with its defaults filled in.
#[derive(Clone, Debug)]
struct Norm {
    index: usize,
    name: String,
    vip: Vip,
    proto: Proto,
    hash: Hash,
    udp_idle_s: u32,
    ring_size: u32,
    health: HealthConfig,
    backends: Vec<NormBackend>,
}

#[derive(Clone, Debug)]
struct NormBackend {
    index: usize,
    addr: IpAddr,
    weight: u32,
    state: BackendState,
}

/// Builds located errors for one entry.
struct At<'a> {
    service: usize,
    name: &'a str,
    backend: Option<(usize, &'a str)>,
}

impl At<'_> {
    fn err(&self, field: &str, problem: impl fmt::Display, status: u16) -> ApplyError {
        let mut context = format!("service {}", self.name);
        if let Some((_, ip)) = self.backend {
            context.push_str(&format!(", backend {ip}"));
        }
        ApplyError {
            at: Loc {
                service: Some(self.service),
                backend: self.backend.map(|(j, _)| j),
                field: Some(field.into()),
            },
            context,
            problem: problem.to_string(),
            status,
        }
    }

    fn state(&self, field: &str) -> impl FnOnce(StateError) -> ApplyError + '_ {
        let field = field.to_string();
        move |e| {
            let status = e.status();
            self.err(&field, e, status)
        }
    }

    fn bad(&self, field: &str) -> impl FnOnce(StateError) -> ApplyError + '_ {
        let field = field.to_string();
        move |e| self.err(&field, e, 400)
    }
}

/// Which key a whole-config health check error is about (its message names it).
fn health_field(e: &StateError) -> &'static str {
    let m = e.to_string();
    [
        ("url", "check"),
        ("interval", "check_interval"),
        ("timeout", "check_timeout"),
        ("password", "check_password"),
        ("user", "check_user"),
        ("credentials", "check_user"),
        ("port", "check_port"),
        ("rise", "rise"),
        ("fall", "fall"),
        ("panic", "panic_threshold"),
    ]
    .into_iter()
    .find(|(word, _)| m.contains(word))
    .map_or("check", |(_, f)| f)
}

/// How a `"***"` password is taken.
#[derive(Clone, Copy)]
enum Secrets<'a> {
    /// As it is (checking a file without the daemon's state).
    Placeholder,
    /// The password stored for the service of the same name.
    Stored(&'a State),
}

fn norm_health(e: &ServiceEntry, at: &At, secrets: Secrets) -> Result<HealthConfig, ApplyError> {
    let duration = |field: &str, v: &Option<String>| -> Result<Option<u64>, ApplyError> {
        v.as_deref()
            .map(|s| {
                crate::cli::parse_duration_ms(s)
                    .map_err(|why| at.err(field, format!("{s:?}: {why}"), 400))
            })
            .transpose()
    };
    let count = |field: &str, v: Option<u64>| -> Result<Option<u64>, ApplyError> {
        match v {
            Some(n) if !(1..=MAX_RISE_FALL as u64).contains(&n) => Err(at.err(
                field,
                format!("{field} {n} is out of range (1-{MAX_RISE_FALL})"),
                400,
            )),
            v => Ok(v),
        }
    };
    if let Some(p) = e.panic_threshold.filter(|&p| p > 100) {
        return Err(at.err(
            "panic_threshold",
            format!("panic threshold {p} is out of range (0-100 percent)"),
            400,
        ));
    }
    let password = match (e.check_password.as_deref(), secrets) {
        (Some(REDACTED), Secrets::Stored(state)) => Some(
            state
                .service(&e.name)
                .ok()
                .and_then(|s| s.health.password.clone())
                .ok_or_else(|| {
                    at.err(
                        "check_password",
                        format!(
                            "{REDACTED:?} stands for the password the daemon has stored, and \
                             service {} has none; write the password",
                            e.name
                        ),
                        400,
                    )
                })?,
        ),
        (p, _) => p.map(str::to_string),
    };
    let spec = HealthSpec {
        check: e
            .check
            .as_deref()
            .map(str::parse::<CheckKind>)
            .transpose()
            .map_err(at.bad("check"))?,
        interval_ms: duration("check_interval", &e.check_interval)?,
        timeout_ms: duration("check_timeout", &e.check_timeout)?,
        rise: count("rise", e.rise)?,
        fall: count("fall", e.fall)?,
        port: e.check_port,
        user: e.check_user.clone(),
        password,
        panic_threshold: e.panic_threshold,
        on_down: e.on_down,
    };
    HealthConfig::default().apply(&spec).map_err(|err| {
        let field = match health_field(&err) {
            // Interval against timeout: point at the one the file sets.
            "check_interval" if e.check_interval.is_none() && e.check_timeout.is_some() => {
                "check_timeout"
            }
            f => f,
        };
        at.err(field, err, 400)
    })
}

/// Validates every entry on its own and against the others, in file order.
fn normalize(d: &Desired, secrets: Secrets) -> Result<Vec<Norm>, ApplyError> {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut vips: BTreeMap<(VipClaim, Proto), (&str, Vip)> = BTreeMap::new();
    let mut out = Vec::with_capacity(d.service.len());
    for (i, e) in d.service.iter().enumerate() {
        let at = At {
            service: i,
            name: &e.name,
            backend: None,
        };
        check_name(&e.name).map_err(at.bad("name"))?;
        if let Some(first) = names.insert(&e.name, i) {
            return Err(at.err(
                "name",
                format!(
                    "service {} appears twice (as service #{} and #{})",
                    e.name,
                    first + 1,
                    i + 1
                ),
                400,
            ));
        }
        let vip = parse_vip(&e.vip).map_err(at.bad("vip"))?;
        if let Some((other, other_vip)) = vips.insert((vip.claim(), e.proto), (&e.name, vip)) {
            let dup = vip_conflict(vip, e.proto, other, other_vip);
            return Err(at.err("vip", dup, 400));
        }
        let udp_idle_s = check_udp_idle(e.udp_idle.unwrap_or(DEFAULT_UDP_IDLE_S.into()))
            .map_err(at.bad("udp_idle"))?;
        let ring_size = check_ring_size(e.ring_size.unwrap_or(RING_DEFAULT.into()))
            .map_err(at.bad("ring_size"))?;
        let health = norm_health(e, &at, secrets)?;
        // Point at check_port = 0 if the file has it, else at the check.
        let field = if e.check_port.is_some() {
            "check_port"
        } else {
            "check"
        };
        check_health_port(vip, &health).map_err(at.bad(field))?;
        let mut seen = BTreeSet::new();
        let mut backends = Vec::with_capacity(e.backends.len());
        for (j, b) in e.backends.iter().enumerate() {
            let at = At {
                service: i,
                name: &e.name,
                backend: Some((j, &b.ip)),
            };
            let addr = parse_backend_addr(&b.ip).map_err(at.bad("ip"))?;
            if !seen.insert(addr) {
                return Err(at.err(
                    "ip",
                    format!("backend {addr} appears twice in service {}", e.name),
                    400,
                ));
            }
            let weight = check_weight(b.weight.unwrap_or(DEFAULT_WEIGHT.into()))
                .map_err(at.bad("weight"))?;
            backends.push(NormBackend {
                index: j,
                addr,
                weight,
                state: b.state.unwrap_or_default(),
            });
        }
        out.push(Norm {
            index: i,
            name: e.name.clone(),
            vip,
            proto: e.proto,
            hash: e.hash,
            udp_idle_s,
            ring_size,
            health,
            backends,
        });
    }
    Ok(out)
}

/// Checks a desired state on its own, without a daemon: everything a file
/// can get wrong by itself (the daemon adds its limits and stored passwords).
pub fn check(d: &Desired) -> Result<(), ApplyError> {
    normalize(d, Secrets::Placeholder).map(drop)
}

// ---------------------------------------------------------------- apply

fn opt<T: fmt::Display>(v: &Option<T>, none: &str) -> String {
    v.as_ref()
        .map_or_else(|| none.to_string(), ToString::to_string)
}

/// The settings of `old` that `new` changes, as (key, from, to).
fn setting_changes(old: &Service, n: &Norm) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let mut diff = |k: &'static str, a: String, b: String| {
        if a != b {
            out.push((k, a, b));
        }
    };
    diff("vip", old.vip.to_string(), n.vip.to_string());
    diff("proto", old.proto.to_string(), n.proto.to_string());
    diff("hash", old.hash.to_string(), n.hash.to_string());
    diff(
        "udp_idle",
        old.udp_idle_s.to_string(),
        n.udp_idle_s.to_string(),
    );
    diff(
        "ring_size",
        old.ring_size.to_string(),
        n.ring_size.to_string(),
    );
    let (a, b) = (&old.health, &n.health);
    diff("check", a.check.to_string(), b.check.to_string());
    diff(
        "check_interval",
        fmt_ms(a.interval_ms),
        fmt_ms(b.interval_ms),
    );
    diff("check_timeout", fmt_ms(a.timeout_ms), fmt_ms(b.timeout_ms));
    diff("rise", a.rise.to_string(), b.rise.to_string());
    diff("fall", a.fall.to_string(), b.fall.to_string());
    diff(
        "check_port",
        opt(&a.port, "service-port"),
        opt(&b.port, "service-port"),
    );
    diff("check_user", opt(&a.user, "-"), opt(&b.user, "-"));
    // The password shows as *** (set) or - (none), never itself.
    let secret = |p: &Option<String>| if p.is_some() { REDACTED } else { "-" };
    let to = match (&a.password, &b.password) {
        (Some(x), Some(y)) if x != y => format!("{REDACTED} (new)"),
        (_, y) => secret(y).into(),
    };
    diff("check_password", secret(&a.password).into(), to);
    diff(
        "panic_threshold",
        a.panic_threshold.to_string(),
        b.panic_threshold.to_string(),
    );
    diff("on_down", a.on_down.to_string(), b.on_down.to_string());
    out
}

/// The state `d` asks for, reached from `current` with the same steps the
/// single-change API takes (ids kept, removed backends held), and the
/// changes in file order. Validates everything first; `current` is not
/// touched, so a refused apply leaves nothing behind.
pub fn apply_to(current: &State, d: &Desired) -> Result<(State, Vec<Change>), ApplyError> {
    let norms = normalize(d, Secrets::Stored(current))?;
    let mut next = current.clone();
    let mut head = Vec::new();
    if let Some(seed) = d.seed.filter(|&s| s != current.seed) {
        head.push(Change::Seed {
            from: current.seed,
            to: seed,
        });
        next.seed = seed;
    }

    // Services the file no longer has: their backends' flows finish.
    let wanted: BTreeSet<&str> = norms.iter().map(|n| n.name.as_str()).collect();
    for svc in current
        .services
        .iter()
        .filter(|s| !wanted.contains(s.name.as_str()))
    {
        head.push(Change::DelService {
            service: svc.name.clone(),
            vip: svc.vip,
            proto: svc.proto,
        });
        head.extend(svc.backends.iter().map(|b| Change::DelBackend {
            service: svc.name.clone(),
            ip: b.addr,
        }));
        next.del_service(&svc.name).map_err(internal)?;
    }

    // Kept services first (a vip may move from one to another), then new
    // ones; the changes are listed in file order.
    let mut per_entry: Vec<Vec<Change>> = vec![Vec::new(); norms.len()];
    let (kept, new): (Vec<&Norm>, Vec<&Norm>) =
        norms.iter().partition(|n| current.service(&n.name).is_ok());
    for n in kept {
        let at = At {
            service: n.index,
            name: &n.name,
            backend: None,
        };
        let changes = &mut per_entry[n.index];
        let svc = next
            .services
            .iter_mut()
            .find(|s| s.name == n.name)
            .ok_or_else(|| {
                internal(StateError::UnknownService {
                    name: n.name.clone(),
                })
            })?;
        for (field, from, to) in setting_changes(svc, n) {
            changes.push(Change::SetService {
                service: n.name.clone(),
                field: field.into(),
                from,
                to,
            });
        }
        svc.vip = n.vip;
        svc.proto = n.proto;
        svc.hash = n.hash;
        svc.udp_idle_s = n.udp_idle_s;
        svc.ring_size = n.ring_size;
        svc.health = n.health.clone();
        let old = svc.clone();
        let keep: BTreeSet<IpAddr> = n.backends.iter().map(|b| b.addr).collect();
        for b in old.backends.iter().filter(|b| !keep.contains(&b.addr)) {
            changes.push(Change::DelBackend {
                service: n.name.clone(),
                ip: b.addr,
            });
            next.del_backend(&n.name, &b.addr.to_string())
                .map_err(internal)?;
        }
        for nb in &n.backends {
            let ip = nb.addr.to_string();
            let at = At {
                backend: Some((nb.index, &ip)),
                ..at
            };
            match old.backend(nb.addr) {
                Some(b) => {
                    let mut update = BackendUpdate::default();
                    if b.weight != nb.weight {
                        changes.push(Change::SetBackend {
                            service: n.name.clone(),
                            ip: b.addr,
                            field: "weight".into(),
                            from: b.weight.to_string(),
                            to: nb.weight.to_string(),
                        });
                        update.weight = Some(nb.weight.into());
                    }
                    if b.state != nb.state {
                        changes.push(Change::SetBackend {
                            service: n.name.clone(),
                            ip: b.addr,
                            field: "state".into(),
                            from: b.state.to_string(),
                            to: nb.state.to_string(),
                        });
                        update.state = Some(nb.state);
                    }
                    if update != BackendUpdate::default() {
                        next.set_backend(&n.name, &b.addr.to_string(), &update)
                            .map_err(internal)?;
                    }
                }
                None => add_backend(&mut next, &n.name, nb, changes).map_err(at.state("ip"))?,
            }
        }
    }
    for n in new {
        let at = At {
            service: n.index,
            name: &n.name,
            backend: None,
        };
        let changes = &mut per_entry[n.index];
        next.add_service(&ServiceSpec {
            name: n.name.clone(),
            vip: n.vip.to_string(),
            proto: n.proto,
            hash: n.hash,
            udp_idle_s: Some(n.udp_idle_s.into()),
            ring_size: Some(n.ring_size.into()),
            health: HealthSpec::default(),
        })
        .map_err(at.state("name"))?;
        changes.push(Change::AddService {
            service: n.name.clone(),
            vip: n.vip,
            proto: n.proto,
        });
        if let Some(svc) = next.services.iter_mut().find(|s| s.name == n.name) {
            svc.health = n.health.clone();
        }
        for nb in &n.backends {
            let ip = nb.addr.to_string();
            let at = At {
                backend: Some((nb.index, &ip)),
                ..at
            };
            add_backend(&mut next, &n.name, nb, changes).map_err(at.state("ip"))?;
        }
    }
    // What the state file would refuse at the next start is refused now.
    next.check().map_err(|reason| ApplyError {
        at: Loc::default(),
        context: String::new(),
        problem: format!("the result would not be a valid state: {reason}"),
        status: 500,
    })?;
    head.extend(per_entry.into_iter().flatten());
    Ok((next, head))
}

/// `backend add` (and `--drain` when the file says draining).
fn add_backend(
    next: &mut State,
    service: &str,
    nb: &NormBackend,
    changes: &mut Vec<Change>,
) -> Result<(), StateError> {
    let ip = nb.addr.to_string();
    next.add_backend(
        service,
        &BackendSpec {
            addr: ip.clone(),
            weight: Some(nb.weight.into()),
        },
    )?;
    if nb.state != BackendState::Active {
        next.set_backend(
            service,
            &ip,
            &BackendUpdate {
                weight: None,
                state: Some(nb.state),
            },
        )?;
    }
    changes.push(Change::AddBackend {
        service: service.into(),
        ip: nb.addr,
        weight: nb.weight,
        state: nb.state,
    });
    Ok(())
}

/// A step that validation should have made impossible.
fn internal(e: StateError) -> ApplyError {
    ApplyError {
        at: Loc::default(),
        context: String::new(),
        problem: format!("internal error applying the desired state: {e}"),
        status: 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "mqlb.toml";

    const BASIC: &str = r#"
seed = 7

[[service]]
name = "amqp"
vip = "10.0.0.10:5672"
proto = "tcp"
ring_size = 13
backends = [
    { ip = "10.0.1.1" },
    { ip = "10.0.1.2", weight = 200 },
    { ip = "10.0.1.3", state = "draining" },
]

[[service]]
name = "media"
vip = "10.0.0.10:5004"
proto = "udp"
hash = "rtp"
udp_idle = 300
ring_size = 7
check = "tcp"
check_port = 5005

[[service.backends]]
ip = "10.0.2.1"
weight = 5
"#;

    fn desired(text: &str) -> Desired {
        parse(FILE, text)
            .unwrap_or_else(|e| panic!("{e}"))
            .desired()
            .expect("has services")
    }

    fn applied(text: &str) -> State {
        apply_to(&State::default(), &desired(text))
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    /// The error for `text`, as the CLI prints it.
    fn file_error(text: &str) -> String {
        match parse(FILE, text) {
            Err(e) => e.to_string(),
            Ok(m) => {
                let d = m.desired().expect("has services");
                let e = check(&d).expect_err("should be refused");
                locate(FILE, text, &e).to_string()
            }
        }
    }

    #[test]
    fn a_file_becomes_state_with_defaults() {
        let (s, changes) = apply_to(&State::default(), &desired(BASIC)).unwrap();
        assert_eq!(s.seed, 7);
        let amqp = s.service("amqp").unwrap();
        assert_eq!((amqp.id, amqp.ring_size, amqp.udp_idle_s), (1, 13, 60));
        assert_eq!(amqp.hash, Hash::FiveTuple);
        let ws: Vec<_> = amqp
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight, b.state))
            .collect();
        assert_eq!(
            ws,
            [
                ("10.0.1.1".to_string(), 100, BackendState::Active),
                ("10.0.1.2".to_string(), 200, BackendState::Active),
                ("10.0.1.3".to_string(), 100, BackendState::Draining),
            ]
        );
        let media = s.service("media").unwrap();
        assert_eq!((media.hash, media.udp_idle_s), (Hash::Rtp, 300));
        assert_eq!(
            (media.health.check.clone(), media.health.port),
            (CheckKind::Tcp, Some(5005))
        );
        assert_eq!(
            media.backends[0].weight, 5,
            "[[service.backends]] works too"
        );
        assert_eq!(
            lines(&changes),
            [
                "~ seed 0 -> 7",
                "+ service amqp 10.0.0.10:5672/tcp",
                "+ backend amqp 10.0.1.1 weight 100",
                "+ backend amqp 10.0.1.2 weight 200",
                "+ backend amqp 10.0.1.3 weight 100 draining",
                "+ service media 10.0.0.10:5004/udp",
                "+ backend media 10.0.2.1 weight 5",
            ]
        );
    }

    fn rich_state() -> State {
        let mut s = applied(BASIC);
        let spec = ServiceSpec {
            name: "mgmt".into(),
            vip: "10.0.0.10:15672".into(),
            proto: Proto::Tcp,
            hash: Hash::SrcIp,
            udp_idle_s: Some(90),
            ring_size: Some(13),
            health: HealthSpec {
                check: Some(
                    "http:http://{backend}:15672/api/health/checks/alarms"
                        .parse()
                        .unwrap(),
                ),
                interval_ms: Some(5500),
                timeout_ms: Some(1500),
                user: Some("gu\"est".into()),
                password: Some("s3cret".into()),
                panic_threshold: Some(0),
                on_down: Some(OnDown::Keep),
                ..Default::default()
            },
        };
        s.add_service(&spec).unwrap();
        s.del_backend("amqp", "10.0.1.1").unwrap();
        s
    }

    #[test]
    fn export_round_trips_and_applies_as_no_change() {
        for s in [State::default(), applied(BASIC), rich_state()] {
            let d = export(&s);
            let text = to_toml(&d);
            let back = desired(&text);
            assert_eq!(back, d, "parse(to_toml(export)) == export:\n{text}");
            let (next, changes) = apply_to(&s, &back).unwrap();
            assert_eq!(changes, [], "{text}");
            assert_eq!(next, s, "apply(export()) is a no-op");
            // The JSON the API carries round-trips too.
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<Desired>(&json).unwrap(), d);
        }
    }

    #[test]
    fn on_down_round_trips_and_is_written_only_when_not_the_default() {
        let s = rich_state();
        let text = to_toml(&export(&s));
        assert_eq!(text.matches("on_down").count(), 1, "{text}");
        assert!(
            text.contains("panic_threshold = 0\non_down = \"keep\"\n"),
            "{text}"
        );
        let (next, changes) = apply_to(&s, &desired(&text)).unwrap();
        assert_eq!((changes, &next), (vec![], &s));
        assert_eq!(next.service("mgmt").unwrap().health.on_down, OnDown::Keep);
        // Left out: back to reset, shown as a change.
        let edited = text.replace("on_down = \"keep\"\n", "");
        let (next, changes) = apply_to(&s, &desired(&edited)).unwrap();
        assert_eq!(lines(&changes), ["~ service mgmt on_down keep -> reset"]);
        assert_eq!(next.service("mgmt").unwrap().health.on_down, OnDown::Reset);
        let again = desired(&edited.replace(
            "panic_threshold = 0\n",
            "panic_threshold = 0\non_down = \"keep\"\n",
        ));
        assert_eq!(apply_to(&next, &again).unwrap().0, s);
    }

    #[test]
    fn export_never_shows_the_password() {
        let s = rich_state();
        let text = to_toml(&export(&s));
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("check_password = \"***\""), "{text}");
        assert!(text.contains("check_user = 'gu\"est'"), "quoted: {text}");
        assert!(text.contains("check_interval = \"5s 500ms\""), "{text}");
        assert!(text.contains("udp_idle = 90"), "non-default on tcp: {text}");
        assert!(
            text.contains("backends = [\n    { ip = \"10.0.1.2\", weight = 200 },\n"),
            "{text}"
        );
        assert!(text.contains("state = \"draining\""), "{text}");
        // The placeholder keeps the stored password; a new one replaces it.
        let mut d = export(&s);
        let (next, _) = apply_to(&s, &d).unwrap();
        assert_eq!(
            next.service("mgmt").unwrap().health.password.as_deref(),
            Some("s3cret")
        );
        d.service[2].check_password = Some("other".into());
        let (next, changes) = apply_to(&s, &d).unwrap();
        assert_eq!(
            lines(&changes),
            ["~ service mgmt check_password *** -> *** (new)"]
        );
        assert_eq!(
            next.service("mgmt").unwrap().health.password.as_deref(),
            Some("other")
        );
        // A placeholder with nothing stored is refused, with its place.
        let mut d = export(&s);
        d.service[2].name = "mgmt2".into();
        let err = apply_to(&s, &d).unwrap_err();
        assert_eq!(err.at.field.as_deref(), Some("check_password"));
        assert!(
            err.problem.contains("has none; write the password"),
            "{err}"
        );
        assert!(
            check(&d).is_ok(),
            "without the daemon the placeholder passes"
        );
    }

    #[test]
    fn no_services_is_written_as_an_empty_list() {
        let text = to_toml(&export(&State::default()));
        assert!(text.contains("seed = 0\nservice = []\n"), "{text}");
        let m = parse(FILE, "seed = 1\n").unwrap();
        assert_eq!(m.desired(), None, "no service key: manages no services");
        assert_eq!(
            parse(FILE, "service = []\n").unwrap().desired(),
            Some(Desired::default())
        );
    }

    #[test]
    fn diffs_add_remove_and_change() {
        let s = applied(BASIC);
        let edited = BASIC
            .replace(r#"{ ip = "10.0.1.1" },"#, "")
            .replace("weight = 200", "weight = 300")
            .replace(
                r#"{ ip = "10.0.1.3", state = "draining" },"#,
                r#"{ ip = "10.0.1.3" }, { ip = "10.0.1.4", weight = 7 },"#,
            )
            .replace("hash = \"rtp\"", "hash = \"src-ip\"")
            .replace("check_port = 5005\n", "check_interval = \"10s\"\n")
            .replace("seed = 7", "seed = 8");
        let (next, changes) = apply_to(&s, &desired(&edited)).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "~ seed 7 -> 8",
                "- backend amqp 10.0.1.1",
                "~ backend amqp 10.0.1.2 weight 200 -> 300",
                "~ backend amqp 10.0.1.3 state draining -> active",
                "+ backend amqp 10.0.1.4 weight 7",
                "~ service media hash rtp -> src-ip",
                "~ service media check_interval 2s -> 10s",
                "~ service media check_port 5005 -> service-port",
            ]
        );
        // The removed backend went the `backend del` way: its id is held.
        let gone = s
            .service("amqp")
            .unwrap()
            .backend("10.0.1.1".parse().unwrap())
            .unwrap()
            .id;
        assert_eq!(next.removed.len(), 1);
        assert_eq!(
            (next.removed[0].id, next.removed[0].service.as_str()),
            (gone, "amqp")
        );
        let new = next
            .service("amqp")
            .unwrap()
            .backend("10.0.1.4".parse().unwrap())
            .unwrap();
        assert!(new.id != gone, "a held id is not handed out again");
        // Kept backends keep their ids.
        for b in &s.service("amqp").unwrap().backends[1..] {
            assert_eq!(
                next.service("amqp").unwrap().backend(b.addr).unwrap().id,
                b.id
            );
        }

        // A service the file drops goes with its backends.
        let only_amqp = BASIC.split("[[service]]\nname = \"media\"").next().unwrap();
        let (next, changes) = apply_to(&s, &desired(only_amqp)).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "- service media 10.0.0.10:5004/udp",
                "- backend media 10.0.2.1"
            ]
        );
        assert_eq!(next.services.len(), 1);
        assert_eq!(next.removed[0].addr.to_string(), "10.0.2.1");
        // `service = []` empties it; the seed absent is kept.
        let (next, changes) = apply_to(&s, &Desired::default()).unwrap();
        assert_eq!(changes.len(), 6);
        assert_eq!((next.services.len(), next.seed), (0, 7));
    }

    #[test]
    fn a_vip_can_move_between_services_in_one_apply() {
        let two = "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\nproto = \"tcp\"\n\
                   backends = [{ ip = \"10.0.1.1\" }]\n\n\
                   [[service]]\nname = \"b\"\nvip = \"10.0.0.2:80\"\nproto = \"tcp\"\n";
        let s = applied(two);
        let swapped = two
            .replace("10.0.0.1:80", "X")
            .replace("10.0.0.2:80", "10.0.0.1:80")
            .replace("X", "10.0.0.2:80");
        let (next, changes) = apply_to(&s, &desired(&swapped)).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "~ service a vip 10.0.0.1:80 -> 10.0.0.2:80",
                "~ service b vip 10.0.0.2:80 -> 10.0.0.1:80",
            ]
        );
        assert_eq!(next.service("a").unwrap().id, 1, "changed in place");
        assert_eq!(
            next.service("a").unwrap().backends[0].id,
            1,
            "backends kept"
        );
        next.check().unwrap();
        // A new service may take the vip an old one gives up.
        let text = two.replace("name = \"a\"", "name = \"c\"");
        let (next, changes) = apply_to(&s, &desired(&text)).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "- service a 10.0.0.1:80/tcp",
                "- backend a 10.0.1.1",
                "+ service c 10.0.0.1:80/tcp",
                "+ backend c 10.0.1.1 weight 100",
            ]
        );
        assert_eq!(next.removed.len(), 1, "a's backend id is held");
        next.check().unwrap();
    }

    #[test]
    fn limits_are_checked_against_the_daemon_state() {
        let mut s = State::default();
        for i in 1..lb_common::MAX_SERVICES {
            s.add_service(&ServiceSpec {
                name: format!("s{i}"),
                vip: format!("10.0.1.{i}:80"),
                proto: Proto::Tcp,
                hash: Hash::FiveTuple,
                udp_idle_s: None,
                ring_size: Some(13),
                health: Default::default(),
            })
            .unwrap();
        }
        let mut d = export(&s);
        d.service.push(desired(BASIC).service[0].clone());
        let before = s.clone();
        let err = apply_to(&s, &d).unwrap_err();
        assert_eq!(err.status, 409);
        assert_eq!(
            err.to_string(),
            "field name (service amqp): service limit reached (31 services)"
        );
        assert_eq!(err.at.service, Some(d.service.len() - 1));
        assert_eq!(s, before);
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:5672\"\nproto = \"tcp\"\nweigth = 3\n",
                "mqlb.toml:5: field weigth (service a): unknown field `weigth`, expected one of",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:5672\"\nproto = \"tcp\"\n\
                 backends = [\n  { ip = \"10.0.1.1\" },\n  { ip = \"10.0.1.2\", wieght = 2 },\n]\n",
                "mqlb.toml:7: field wieght (service a, backend 10.0.1.2): unknown field `wieght`",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.300:5672\"\nproto = \"tcp\"\n",
                "mqlb.toml:3: field vip (service a): bad address \"10.0.0.300:5672\"",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:0\"\nproto = \"tcp\"\n",
                "mqlb.toml:3: field vip (service a): bad address \"10.0.0.1:0\": port must be 1-65535",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n\n\
                 [[service]]\nname = \"a\"\nvip = \"10.0.0.2:1\"\nproto = \"tcp\"\n",
                "mqlb.toml:7: field name (service a): service a appears twice (as service #1 and #2)",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n\n\
                 [[service]]\nname = \"b\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n",
                "mqlb.toml:8: field vip (service b): 10.0.0.1:1/tcp is already used by service a",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n\
                 backends = [{ ip = \"10.0.1.1\", weight = 70000 }]\n",
                "mqlb.toml:5: field weight (service a, backend 10.0.1.1): weight 70000 is out of range (1-65535)",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n\n\
                 [[service.backends]]\nip = \"10.0.1.1\"\n\n[[service.backends]]\nip = \"10.0.1.1\"\n",
                "mqlb.toml:10: field ip (service a, backend 10.0.1.1): backend 10.0.1.1 appears twice in service a",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\ncheck = \"ping\"\n",
                "mqlb.toml:5: field check (service a): unknown check \"ping\" (use none, tcp, amqp or http:URL)",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"sctp\"\n",
                "mqlb.toml:4: field proto (service a): unknown variant `sctp`, expected `tcp` or `udp`",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n\
                 check = \"tcp\"\ncheck_interval = \"1s\"\n",
                "mqlb.toml:6: field check_interval (service a): check interval (1s) must be longer than the check timeout (1s)",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\ncheck_timeout = \"soon\"\n",
                "mqlb.toml:5: field check_timeout (service a): \"soon\": ",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\nring_size = 100\n",
                "mqlb.toml:5: field ring_size (service a): ring size 100 must be a prime number from 3 to 65537",
            ),
            (
                "[[service]]\nname = \"a\"\nproto = \"tcp\"\n",
                "mqlb.toml:1: service a: missing field `vip`",
            ),
            ("seed = -1\n", "mqlb.toml:1: field seed: "),
            ("seed = \n", "mqlb.toml:1: "),
            (
                "[[service]]\nname = \"a b\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n",
                "mqlb.toml:2: field name (service a b): invalid service name",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\nrise = 0\n",
                "mqlb.toml:5: field rise (service a): rise 0 is out of range (1-100)",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\ncheck = \"tcp\"\n\
                 check_user = \"u\"\ncheck_password = \"p\"\n",
                "mqlb.toml:6: field check_user (service a): check credentials apply to http checks only",
            ),
            (
                "[[service]]\nname = \"a\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\non_down = \"drop\"\n",
                "mqlb.toml:5: field on_down (service a): unknown variant `drop`, expected `reset` or `keep`",
            ),
        ];
        for (text, want) in cases {
            let got = file_error(text);
            assert!(
                got.starts_with(want),
                "for\n{text}\ngot:  {got}\nwant: {want}…"
            );
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
    }

    #[test]
    fn daemon_errors_map_back_to_lines() {
        let text = "seed = 1\n\n[[service]]\nname = \"m\"\nvip = \"10.0.0.1:1\"\nproto = \"tcp\"\n\
                    check = \"http:http://{backend}/\"\ncheck_user = \"u\"\ncheck_password = \"***\"\n";
        let d = desired(text);
        check(&d).unwrap();
        let err = apply_to(&State::default(), &d).unwrap_err();
        let e = locate(FILE, text, &err).to_string();
        assert!(
            e.starts_with("mqlb.toml:9: field check_password (service m): \"***\" stands for"),
            "{e}"
        );
        // A location whose key is absent points at its table.
        let at = Loc {
            service: Some(0),
            backend: None,
            field: Some("ring_size".into()),
        };
        assert_eq!(line_at(text, &at), Some(3));
        assert_eq!(
            line_at(
                text,
                &Loc {
                    field: Some("seed".into()),
                    ..Loc::default()
                }
            ),
            Some(1)
        );
    }

    #[test]
    fn daemon_settings_share_the_file() {
        let text = "mode = \"skb\"\nct_entries = 4096\nmetrics = \"127.0.0.1:9433\"\nseed = 3\n\
                    service = []\n";
        let m = parse(FILE, text).unwrap();
        assert_eq!(m.config().mode, Some(Mode::Skb));
        assert_eq!(m.config().seed, Some(3));
        assert_eq!(m.daemon_keys(), ["mode", "ct_entries", "metrics"]);
        assert_eq!(m.desired().unwrap().seed, Some(3));
        let e = parse(FILE, "colour = 1\n").unwrap_err().to_string();
        assert!(
            e.starts_with("mqlb.toml:1: field colour: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn change_lines_read_well() {
        let c = Change::SetBackend {
            service: "amqp".into(),
            ip: "10.0.0.11".parse().unwrap(),
            field: "weight".into(),
            from: "100".into(),
            to: "200".into(),
        };
        assert_eq!(c.to_string(), "~ backend amqp 10.0.0.11 weight 100 -> 200");
        assert_eq!(format_changes(&[]), "no changes\n");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["change"], "set_backend");
        assert_eq!(serde_json::from_value::<Change>(json).unwrap(), c);
    }

    /// IPv6: a VIP in brackets, 6-in-6, 4-in-6 and 6-in-4 services, and
    /// addresses written the long way (they compare as addresses).
    const IPV6: &str = r#"
[[service]]
name = "amqp6"
vip = "[FD00:1:0:0:100:0:0:1]:5672"
proto = "tcp"
ring_size = 13
backends = [{ ip = "fd00:1::11" }, { ip = "FD00:1:0:0:0:0:0:12", weight = 200 }]

[[service]]
name = "four-in-six"
vip = "10.0.0.10:5672"
proto = "tcp"
ring_size = 13
backends = [{ ip = "fd00:1::11" }, { ip = "fd00:1::13", state = "draining" }]

[[service]]
name = "six-in-four"
vip = "[fd00:1:100::1]:5004-5099"
proto = "udp"
ring_size = 7
backends = [{ ip = "10.0.1.1" }, { ip = "fd00:1::13" }]
"#;

    #[test]
    fn ipv6_vips_and_backends_round_trip_through_the_file() {
        let (s, changes) = apply_to(&State::default(), &desired(IPV6)).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "+ service amqp6 [fd00:1::100:0:0:1]:5672/tcp",
                "+ backend amqp6 fd00:1::11 weight 100",
                "+ backend amqp6 fd00:1::12 weight 200",
                "+ service four-in-six 10.0.0.10:5672/tcp",
                "+ backend four-in-six fd00:1::11 weight 100",
                "+ backend four-in-six fd00:1::13 weight 100 draining",
                "+ service six-in-four [fd00:1:100::1]:5004-5099/udp",
                "+ backend six-in-four 10.0.1.1 weight 100",
                "+ backend six-in-four fd00:1::13 weight 100",
            ]
        );
        let d = export(&s);
        let text = to_toml(&d);
        assert!(
            text.contains("vip = \"[fd00:1::100:0:0:1]:5672\"\n"),
            "{text}"
        );
        assert!(
            text.contains("{ ip = \"fd00:1::12\", weight = 200 }"),
            "{text}"
        );
        assert_eq!(desired(&text), d, "parse(to_toml(export)) == export");
        let (next, changes) = apply_to(&s, &desired(&text)).unwrap();
        assert_eq!((next, changes), (s.clone(), vec![]), "apply(export())");
        // The file as written (long forms, upper case) is no change either.
        let (next, changes) = apply_to(&s, &desired(IPV6)).unwrap();
        assert_eq!((next, changes), (s.clone(), vec![]), "apply(file) again");

        // An edit: a backend of the other family, a vip that changes family.
        let edited = IPV6
            .replace(
                "{ ip = \"fd00:1::11\" }, { ip = \"FD00",
                "{ ip = \"10.0.1.2\" }, { ip = \"FD00",
            )
            .replace("10.0.0.10:5672", "[fd00:1:100::2]:5672");
        let (next, changes) = apply_to(&s, &desired(&edited)).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "- backend amqp6 fd00:1::11",
                "+ backend amqp6 10.0.1.2 weight 100",
                "~ service four-in-six vip 10.0.0.10:5672 -> [fd00:1:100::2]:5672",
            ]
        );
        next.check().unwrap();

        // The same address twice, written two ways, is refused.
        let twice = IPV6.replace("FD00:1:0:0:0:0:0:12", "fd00:1:0::11");
        assert_eq!(
            file_error(&twice),
            "mqlb.toml:7: field ip (service amqp6, backend fd00:1:0::11): backend fd00:1::11 \
             appears twice in service amqp6"
        );
        // An ipv6 vip needs its brackets, with the line of the mistake.
        assert!(
            file_error(&IPV6.replace("[FD00:1:0:0:100:0:0:1]:5672", "fd00:1::1"))
                .starts_with("mqlb.toml:4: field vip (service amqp6): bad address"),
            "{}",
            file_error(&IPV6.replace("[FD00:1:0:0:100:0:0:1]:5672", "fd00:1::1"))
        );
    }

    const RANGES: &str = r#"
[[service]]
name = "media"
vip = "10.0.0.10:5004-5099"
proto = "udp"
hash = "rtp"
ring_size = 7
check = "tcp"
check_port = 8080
backends = [{ ip = "10.0.2.1" }, { ip = "10.0.2.2" }]

[[service]]
name = "rtcp-5005"
vip = "10.0.0.10:5005"
proto = "udp"
ring_size = 7
backends = [{ ip = "10.0.2.3" }]

[[service]]
name = "any"
vip = "10.0.0.11:*"
proto = "udp"
ring_size = 7
"#;

    #[test]
    fn port_ranges_round_trip_through_the_file() {
        let (s, changes) = apply_to(&State::default(), &desired(RANGES)).unwrap();
        let media = s.service("media").unwrap();
        assert_eq!((media.vip.lo(), media.vip.hi()), (5004, 5099));
        assert_eq!(media.check_port(), Some(8080));
        assert_eq!(s.service("any").unwrap().vip.to_string(), "10.0.0.11:*");
        assert_eq!(
            lines(&changes)
                .into_iter()
                .filter(|l| l.contains("service"))
                .collect::<Vec<_>>(),
            [
                "+ service media 10.0.0.10:5004-5099/udp",
                "+ service rtcp-5005 10.0.0.10:5005/udp",
                "+ service any 10.0.0.11:*/udp",
            ]
        );
        let d = export(&s);
        let text = to_toml(&d);
        assert!(text.contains("vip = \"10.0.0.10:5004-5099\"\n"), "{text}");
        assert!(text.contains("vip = \"10.0.0.11:*\"\n"), "{text}");
        assert_eq!(desired(&text), d);
        let (next, changes) = apply_to(&s, &desired(&text)).unwrap();
        assert_eq!(
            (next, changes),
            (s.clone(), vec![]),
            "apply(export()) is a no-op"
        );

        // A range that moves, and an exact port that becomes a range.
        let moved = RANGES
            .replace("10.0.0.10:5004-5099", "10.0.0.10:6000-6999")
            .replace("10.0.0.11:*", "10.0.0.11:7000");
        let (_, changes) = apply_to(&s, &desired(&moved)).unwrap();
        assert_eq!(
            lines(&changes),
            [
                "~ service media vip 10.0.0.10:5004-5099 -> 10.0.0.10:6000-6999",
                "~ service any vip 10.0.0.11:* -> 10.0.0.11:7000",
            ]
        );
    }

    #[test]
    fn port_range_mistakes_name_their_line() {
        let second = format!(
            "{RANGES}\n[[service]]\nname = \"media2\"\nvip = \"10.0.0.10:*\"\nproto = \"udp\"\n"
        );
        let line = second
            .lines()
            .position(|l| l == "vip = \"10.0.0.10:*\"")
            .unwrap()
            + 1;
        assert_eq!(
            file_error(&second),
            format!(
                "mqlb.toml:{line}: field vip (service media2): 10.0.0.10/udp already has a port \
                 range: service media (10.0.0.10:5004-5099); one range per vip and protocol \
                 (exact-port services on the vip are fine, inside the range too)"
            )
        );
        let no_port = RANGES.replace("check_port = 8080\n", "");
        assert!(file_error(&RANGES.replace("8080", "0"))
            .starts_with("mqlb.toml:9: field check_port (service media): a tcp check"));
        assert_eq!(
            file_error(&no_port),
            "mqlb.toml:8: field check (service media): a tcp check of port-range service \
             10.0.0.10:5004-5099 needs a check port (--check-port PORT): a range has no single \
             service port to probe"
        );
        assert_eq!(
            file_error(&RANGES.replace("5004-5099", "5099-5004")),
            "mqlb.toml:4: field vip (service media): bad address \"10.0.0.10:5099-5004\": port \
             range 5099-5004 runs backwards: write LO-HI with LO <= HI, e.g. 5004-5099"
        );
    }
}
