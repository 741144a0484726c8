//! `mqlb up --metrics ADDR`: `GET /metrics` in the Prometheus text format
//! (0.0.4), through `prometheus-client`. Every scrape builds a fresh registry
//! from the same snapshot `mqlb stats` shows ([`Core::stats`], counters summed
//! over CPUs), so the values are the data plane's own monotonic counters.
//!
//! Conntrack fill: the kernel keeps no element count for an LRU hash map, and
//! walking a million keys per scrape is too slow (about 1.7 s for 1M entries,
//! one syscall per key), so [`count_conntrack`] walks `CT4` and `CT6` in the
//! background (at most `capacity` keys each; every [`CT_COUNT_EVERY`], or 20
//! times the last walk's duration if longer, so it takes at most 5% of one
//! CPU) and the scrape reports the last counts as
//! `mqlb_conntrack_entries{family="ipv4"|"ipv6"}`, next to
//! `mqlb_conntrack_capacity{family}` (one LRU map per family: each fills and
//! evicts on its own, so `sum()` is the total and each series its own fill).
//!
//! The same listener serves a status page for people at `/` (the static
//! `status.html`, vanilla JS, no external URLs) and the JSON it polls every
//! second at `/status.json`. Rates are computed here, not in the browser:
//! [`sample`] reads the counters every [`SAMPLE_EVERY`] while the daemon runs
//! with `--metrics` and keeps [`HISTORY_LEN`] points for the chart, so a page
//! opened late still shows the last minute, and every viewer sees the same
//! rates as `mqlb stats --watch` ([`watch::rates`]).
//!
//! [`Core::stats`]: crate::daemon::Core::stats

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::State as AxState,
    http::{header, HeaderValue, StatusCode},
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use lb_common::{names, Counter as DpCounter, CtEntry, DropReason, Flow4, Flow6};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::{
    api::{BackendStats, StatsView},
    daemon::{error_chain, Shared},
    health::{HealthView, Status},
    state::{BackendState, RemovedBackend},
    watch::{self, Rates},
};

/// How often the background task counts `CT4` and `CT6` (at least).
pub const CT_COUNT_EVERY: Duration = Duration::from_secs(15);

/// An address family's conntrack map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtFamily {
    /// `CT4`.
    Ipv4,
    /// `CT6`.
    Ipv6,
}

impl CtFamily {
    pub const ALL: [CtFamily; 2] = [CtFamily::Ipv4, CtFamily::Ipv6];

    /// The `family` label of the conntrack metrics and the status JSON.
    pub const fn label(self) -> &'static str {
        match self {
            CtFamily::Ipv4 => "ipv4",
            CtFamily::Ipv6 => "ipv6",
        }
    }

    /// The map's name (and pin file name).
    pub const fn map(self) -> &'static str {
        match self {
            CtFamily::Ipv4 => names::CT4,
            CtFamily::Ipv6 => names::CT6,
        }
    }
}

/// What the scrape reports about conntrack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    /// Maximum entries of each family's map (`--ct-entries` sizes `CT4`
    /// and `CT6` alike).
    pub capacity: u32,
    /// Last background count of `CT4`; `None` until the first one finishes.
    pub ipv4: Option<u64>,
    /// Last background count of `CT6`; `None` until the first one finishes.
    pub ipv6: Option<u64>,
}

impl Conntrack {
    /// The last count of `family`'s map.
    pub const fn entries(&self, family: CtFamily) -> Option<u64> {
        match family {
            CtFamily::Ipv4 => self.ipv4,
            CtFamily::Ipv6 => self.ipv6,
        }
    }
}

/// The last conntrack counts, shared with the background counter.
#[derive(Debug)]
pub struct CtCount {
    ipv4: AtomicU64,
    ipv6: AtomicU64,
}

impl Default for CtCount {
    fn default() -> Self {
        CtCount {
            ipv4: AtomicU64::new(u64::MAX),
            ipv6: AtomicU64::new(u64::MAX),
        }
    }
}

impl CtCount {
    fn cell(&self, family: CtFamily) -> &AtomicU64 {
        match family {
            CtFamily::Ipv4 => &self.ipv4,
            CtFamily::Ipv6 => &self.ipv6,
        }
    }

    pub fn set(&self, family: CtFamily, n: u64) {
        self.cell(family).store(n, Ordering::Relaxed);
    }

    pub fn get(&self, family: CtFamily) -> Option<u64> {
        Some(self.cell(family).load(Ordering::Relaxed)).filter(|&n| n != u64::MAX)
    }

    /// The last counts, with the maps' `capacity`.
    pub fn conntrack(&self, capacity: u32) -> Conntrack {
        Conntrack {
            capacity,
            ipv4: self.get(CtFamily::Ipv4),
            ipv6: self.get(CtFamily::Ipv6),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

fn counters(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauges(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The `/metrics` body for one snapshot.
pub fn render(stats: &StatsView, ct: &Conntrack) -> String {
    let mut reg = Registry::default();
    let get = |m: &std::collections::BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);

    // `_total` is appended to counter names by the encoder.
    let rx = Counter::<u64>::default();
    rx.inc_by(get(&stats.counters, DpCounter::Rx.name()));
    reg.register("mqlb_rx_packets", "Packets the XDP program saw", rx);
    let verdicts = counters(
        &mut reg,
        "mqlb_packets",
        "Packets by XDP verdict (pass, tx, redirect, drop)",
    );
    let events = counters(
        &mut reg,
        "mqlb_events",
        "Data plane events (conntrack_hit, conntrack_miss, icmp_too_big, fib_lookup, \
         nexthop_pass, decap, icmp_forward)",
    );
    for c in DpCounter::ALL {
        let v = get(&stats.counters, c.name());
        match c {
            DpCounter::Rx => {}
            DpCounter::Pass | DpCounter::Tx | DpCounter::Redirect | DpCounter::Drop => {
                verdicts
                    .get_or_create(&vec![("verdict", c.name().into())])
                    .inc_by(v);
            }
            DpCounter::CtHit
            | DpCounter::CtMiss
            | DpCounter::IcmpTooBig
            | DpCounter::FibLookup
            | DpCounter::NexthopPass
            | DpCounter::Decap
            | DpCounter::IcmpForward => {
                events
                    .get_or_create(&vec![("event", c.name().into())])
                    .inc_by(v);
            }
        }
    }
    let drops = counters(&mut reg, "mqlb_drops", "Packets dropped, by reason");
    for r in DropReason::ALL {
        drops
            .get_or_create(&vec![("reason", r.name().into())])
            .inc_by(get(&stats.drops, r.name()));
    }

    let svc_packets = counters(&mut reg, "mqlb_service_packets", "Packets to a service");
    let svc_bytes = counters(&mut reg, "mqlb_service_bytes", "Bytes to a service");
    let svc_flows = counters(
        &mut reg,
        "mqlb_service_new_flows",
        "New flows (conntrack misses) to a service",
    );
    let svc_panic = gauges(
        &mut reg,
        "mqlb_service_panic",
        "1 when the service is in panic mode (too few backends pass their check)",
    );
    let svc_in_table = gauges(
        &mut reg,
        "mqlb_service_backends_in_table",
        "Backends in the service's Maglev table",
    );
    let be_packets = counters(
        &mut reg,
        "mqlb_backend_packets",
        "Packets sent to a backend",
    );
    let be_bytes = counters(&mut reg, "mqlb_backend_bytes", "Bytes sent to a backend");
    let be_flows = counters(
        &mut reg,
        "mqlb_backend_new_flows",
        "New flows assigned to a backend",
    );
    let be_up = gauges(
        &mut reg,
        "mqlb_backend_up",
        "1 when the backend passes its health check (or its service is not checked), \
         0 when down or draining by its check",
    );
    let be_checked = gauges(
        &mut reg,
        "mqlb_backend_checked",
        "1 when the backend's service has a health check and a probe result came in",
    );
    let be_weight = gauges(&mut reg, "mqlb_backend_weight", "Backend weight");
    let be_in_table = gauges(
        &mut reg,
        "mqlb_backend_in_table",
        "1 when the backend is in the Maglev table (takes new flows)",
    );
    let be_drained = gauges(
        &mut reg,
        "mqlb_backend_drained",
        "1 when the backend was drained by an operator (`backend set --drain`)",
    );
    let transitions = counters(
        &mut reg,
        "mqlb_health_transitions",
        "Health transitions since the daemon started, by destination status",
    );
    for s in &stats.services {
        let sl: Labels = vec![("service", s.name.clone())];
        svc_packets.get_or_create(&sl).inc_by(s.packets);
        svc_bytes.get_or_create(&sl).inc_by(s.bytes);
        svc_flows.get_or_create(&sl).inc_by(s.new_flows);
        svc_panic.get_or_create(&sl).set(i64::from(s.panic));
        svc_in_table
            .get_or_create(&sl)
            .set(s.backends.iter().filter(|b| b.in_table).count() as i64);
        for b in &s.backends {
            let bl: Labels = vec![("service", s.name.clone()), ("backend", b.addr.to_string())];
            be_packets.get_or_create(&bl).inc_by(b.packets);
            be_bytes.get_or_create(&bl).inc_by(b.bytes);
            be_flows.get_or_create(&bl).inc_by(b.new_flows);
            let up = b.health.as_ref().is_none_or(|h| h.status == Status::Up);
            be_up.get_or_create(&bl).set(i64::from(up));
            be_checked
                .get_or_create(&bl)
                .set(i64::from(b.health.as_ref().is_some_and(|h| h.checked)));
            be_weight.get_or_create(&bl).set(i64::from(b.weight));
            be_in_table.get_or_create(&bl).set(i64::from(b.in_table));
            be_drained
                .get_or_create(&bl)
                .set(i64::from(b.state == BackendState::Draining));
            if let Some(h) = &b.health {
                for (to, n) in [
                    (Status::Down, h.transitions.down),
                    (Status::Up, h.transitions.up),
                    (Status::Draining, h.transitions.draining),
                ] {
                    let mut l = bl.clone();
                    l.push(("to", to.to_string()));
                    transitions.get_or_create(&l).inc_by(n);
                }
            }
        }
    }

    let capacity = gauges(
        &mut reg,
        "mqlb_conntrack_capacity",
        "Maximum entries of the conntrack map (LRU) of an address family",
    );
    let counted = CtFamily::ALL
        .iter()
        .filter_map(|&f| Some((f, ct.entries(f)?)))
        .collect::<Vec<_>>();
    let entries = (!counted.is_empty()).then(|| {
        gauges(
            &mut reg,
            "mqlb_conntrack_entries",
            "Entries of the conntrack map of an address family at the last background count \
             (every 15 s or more)",
        )
    });
    for f in CtFamily::ALL {
        let l = vec![("family", f.label().to_string())];
        capacity.get_or_create(&l).set(i64::from(ct.capacity));
        if let (Some(entries), Some(n)) = (&entries, ct.entries(f)) {
            entries.get_or_create(&l).set(i(n));
        }
    }

    let mut out = String::new();
    prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// How often [`sample`] reads the counters for the status page.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Chart points the status page gets: one minute at [`SAMPLE_EVERY`].
pub const HISTORY_LEN: usize = 60;

/// The status page itself (served at `/`).
pub const STATUS_HTML: &str = include_str!("status.html");

/// One point of the status page's chart: packets per second over the
/// sampling interval that ended at `t_unix_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Point {
    pub t_unix_ms: u64,
    /// Every packet the XDP program saw.
    pub rx: f64,
    /// Packets to services (the sum over services).
    pub services: f64,
    /// Packets dropped, every reason.
    pub drops: f64,
}

/// Rates over the last sampling interval and the chart's points, fed by
/// [`sample`]. Rates are keyed by name and address, not id: an id may be
/// handed out again to another service or backend between two samples.
#[derive(Debug, Default)]
pub struct History {
    last: Option<(Instant, StatsView)>,
    /// Seconds between the two samples the rates come from.
    interval_s: Option<f64>,
    counters: BTreeMap<String, f64>,
    drops: BTreeMap<String, f64>,
    services: HashMap<String, Rates>,
    backends: HashMap<(String, IpAddr), Rates>,
    points: VecDeque<Point>,
}

impl History {
    /// Adds the snapshot `stats` taken at `at` (`unix_ms` on the wall clock).
    pub fn push(&mut self, at: Instant, unix_ms: u64, stats: StatsView) {
        if let Some((prev_at, prev)) = &self.last {
            let elapsed = at.saturating_duration_since(*prev_at);
            let r = watch::rates(prev, &stats, elapsed);
            self.interval_s = Some(elapsed.as_secs_f64());
            self.services.clear();
            self.backends.clear();
            for svc in &stats.services {
                if let Some(x) = r.services.get(&svc.id) {
                    self.services.insert(svc.name.clone(), *x);
                }
                for b in &svc.backends {
                    if let Some(x) = r.backends.get(&(svc.id, b.id)) {
                        self.backends.insert((svc.name.clone(), b.addr), *x);
                    }
                }
            }
            let point = Point {
                t_unix_ms: unix_ms,
                rx: r.counters.get(DpCounter::Rx.name()).copied().unwrap_or(0.0),
                services: r.services.values().fold(0.0, |a, x| a + x.packets),
                drops: r.drops_total(),
            };
            self.counters = r.counters;
            self.drops = r.drops;
            if self.points.len() == HISTORY_LEN {
                self.points.pop_front();
            }
            self.points.push_back(point);
        }
        self.last = Some((at, stats));
    }
}

/// Per-second rates in `/status.json`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RatesJson {
    pub packets: f64,
    pub bytes: f64,
    pub new_flows: f64,
}

impl From<Rates> for RatesJson {
    fn from(r: Rates) -> Self {
        RatesJson {
            packets: r.packets,
            bytes: r.bytes,
            new_flows: r.new_flows,
        }
    }
}

/// A global counter or a drop reason: its total and its rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CounterJson {
    pub name: String,
    pub packets: u64,
    /// `None` until two samples were taken.
    pub per_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendJson {
    pub addr: IpAddr,
    /// What the page shows: `active`, `draining` (by an operator or its
    /// check), `down` (its check fails) or `removed` (deleted; its
    /// established flows finish).
    pub status: &'static str,
    /// `None` for a removed backend.
    pub weight: Option<u32>,
    /// In the Maglev table (takes new flows).
    pub in_table: bool,
    /// `-` (not checked), `unchecked` (no result yet), `up`, `down`, `draining`.
    pub health: String,
    /// The last probe's words (`pass: …`, `fail: …`).
    pub last_check: Option<String>,
    /// Totals; `None` for a removed backend (its counters are not read).
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    pub new_flows: Option<u64>,
    /// `None` for a backend added since the last sample, or removed.
    pub rates: Option<RatesJson>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceJson {
    pub name: String,
    pub vip: String,
    pub proto: String,
    pub hash: String,
    pub check: String,
    /// Too few backends pass their check: the table holds the down ones too.
    pub panic: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rates: Option<RatesJson>,
    /// Its backends, then its removed ones.
    pub backends: Vec<BackendJson>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConntrackJson {
    /// Both families' maps together.
    pub capacity: u64,
    /// Both families together at the last background count (every 15 s or
    /// more); `None` until both are counted.
    pub entries: Option<u64>,
    /// Per map, `ipv4` then `ipv6` (as `mqlb_conntrack_*{family}`): each
    /// fills and evicts on its own.
    pub families: Vec<CtFamilyJson>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CtFamilyJson {
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    pub capacity: u32,
    /// Last background count; `None` before the first.
    pub entries: Option<u64>,
}

impl From<&Conntrack> for ConntrackJson {
    fn from(ct: &Conntrack) -> Self {
        let families: Vec<CtFamilyJson> = CtFamily::ALL
            .iter()
            .map(|&f| CtFamilyJson {
                family: f.label(),
                capacity: ct.capacity,
                entries: ct.entries(f),
            })
            .collect();
        ConntrackJson {
            capacity: families.iter().map(|f| u64::from(f.capacity)).sum(),
            entries: families.iter().map(|f| f.entries).sum(),
            families,
        }
    }
}

/// `GET /status.json`: everything the status page shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusJson {
    pub iface: String,
    pub pid: u32,
    pub time_unix_ms: u64,
    /// Seconds the rates are measured over; `None` until two samples.
    pub rate_interval_s: Option<f64>,
    /// `rx`, then the verdicts and events (`lb_common::Counter` names).
    pub counters: Vec<CounterJson>,
    /// Every drop reason.
    pub drops: Vec<CounterJson>,
    pub conntrack: ConntrackJson,
    pub services: Vec<ServiceJson>,
    /// Removed backends whose service was deleted too.
    pub removed: Vec<RemovedBackendJson>,
    /// Oldest first, one per [`SAMPLE_EVERY`], at most [`HISTORY_LEN`].
    pub history: Vec<Point>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemovedBackendJson {
    pub addr: IpAddr,
    pub service: String,
}

/// What [`status_json`] reads from the daemon, taken under one lock.
#[derive(Clone, Debug)]
pub struct StatusInput {
    pub stats: StatsView,
    pub iface: String,
    pub pid: u32,
    pub conntrack: Conntrack,
    /// Service name → (hash, check), for the services in `stats`.
    pub settings: HashMap<String, (String, String)>,
    pub removed: Vec<RemovedBackend>,
    pub time_unix_ms: u64,
}

/// The word the page shows for a backend's state: an operator's drain
/// first, then what its check says.
pub fn backend_status(b: &BackendStats) -> &'static str {
    let health = b.health.as_ref().map(|h| h.status);
    match (b.state, health) {
        (BackendState::Draining, _) | (_, Some(Status::Draining)) => "draining",
        (_, Some(Status::Down)) => "down",
        (BackendState::Active, _) => "active",
    }
}

/// A backend's health as `mqlb stats` words it.
fn health_text(h: Option<&HealthView>) -> String {
    match h {
        None => "-".into(),
        Some(h) if !h.checked && h.status == Status::Up => "unchecked".into(),
        Some(h) => h.status.to_string(),
    }
}

/// The `/status.json` body (pure).
pub fn status_json(input: &StatusInput, history: &History) -> StatusJson {
    let counter = |names: &mut dyn Iterator<Item = &'static str>,
                   totals: &BTreeMap<String, u64>,
                   rates: &BTreeMap<String, f64>| {
        names
            .map(|name| CounterJson {
                name: name.into(),
                packets: totals.get(name).copied().unwrap_or(0),
                per_s: history
                    .interval_s
                    .map(|_| rates.get(name).copied().unwrap_or(0.0)),
            })
            .collect::<Vec<_>>()
    };
    let stats = &input.stats;
    let counters = counter(
        &mut DpCounter::ALL.iter().map(|c| c.name()),
        &stats.counters,
        &history.counters,
    );
    let drops = counter(
        &mut DropReason::ALL.iter().map(|r| r.name()),
        &stats.drops,
        &history.drops,
    );
    let services = stats
        .services
        .iter()
        .map(|s| {
            let (hash, check) = input.settings.get(&s.name).cloned().unwrap_or_default();
            let mut backends: Vec<BackendJson> = s
                .backends
                .iter()
                .map(|b| BackendJson {
                    addr: b.addr,
                    status: backend_status(b),
                    weight: Some(b.weight),
                    in_table: b.in_table,
                    health: health_text(b.health.as_ref()),
                    last_check: b.health.as_ref().and_then(|h| h.last_check.clone()),
                    packets: Some(b.packets),
                    bytes: Some(b.bytes),
                    new_flows: Some(b.new_flows),
                    rates: history
                        .backends
                        .get(&(s.name.clone(), b.addr))
                        .map(|&r| r.into()),
                })
                .collect();
            backends.extend(
                input
                    .removed
                    .iter()
                    .filter(|r| r.service == s.name)
                    .map(|r| BackendJson {
                        addr: r.addr,
                        status: "removed",
                        weight: None,
                        in_table: false,
                        health: "-".into(),
                        last_check: None,
                        packets: None,
                        bytes: None,
                        new_flows: None,
                        rates: None,
                    }),
            );
            ServiceJson {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                proto: s.proto.to_string(),
                hash,
                check,
                panic: s.panic,
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                rates: history.services.get(&s.name).map(|&r| r.into()),
                backends,
            }
        })
        .collect();
    let removed = input
        .removed
        .iter()
        .filter(|r| !stats.services.iter().any(|s| s.name == r.service))
        .map(|r| RemovedBackendJson {
            addr: r.addr,
            service: r.service.clone(),
        })
        .collect();
    StatusJson {
        iface: input.iface.clone(),
        pid: input.pid,
        time_unix_ms: input.time_unix_ms,
        rate_interval_s: history.interval_s,
        counters,
        drops,
        conntrack: ConntrackJson::from(&input.conntrack),
        services,
        removed,
        history: history.points.iter().copied().collect(),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads the counters into `history` every [`SAMPLE_EVERY`], forever.
pub async fn sample(shared: Arc<Shared>, history: Arc<Mutex<History>>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        let stats = shared.core.lock().await.stats();
        match stats {
            Ok(stats) => {
                history
                    .lock()
                    .expect("history lock")
                    .push(Instant::now(), unix_ms(), stats)
            }
            Err(e) if !warned => {
                warn!(error = %error_chain(&e), "reading counters for the status page failed");
                warned = true;
            }
            Err(_) => {}
        }
    }
}

#[derive(Clone)]
struct MetricsState {
    shared: Arc<Shared>,
    ct: Arc<CtCount>,
    history: Arc<Mutex<History>>,
}

/// `GET /metrics`, `GET /` (the status page) and `GET /status.json`;
/// [`sample`] fills `history`.
pub fn router(shared: Arc<Shared>, ct: Arc<CtCount>, history: Arc<Mutex<History>>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .route("/status.json", get(status))
        .with_state(MetricsState {
            shared,
            ct,
            history,
        })
}

async fn metrics(AxState(s): AxState<MetricsState>) -> axum::response::Response {
    let (stats, capacity) = {
        let core = s.shared.core.lock().await;
        (core.stats(), core.status().ct_entries)
    };
    match stats {
        Ok(stats) => {
            let ct = s.ct.conntrack(capacity);
            (
                [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                render(&stats, &ct),
            )
                .into_response()
        }
        Err(e) => counters_failed(&e),
    }
}

fn counters_failed(e: &dyn std::error::Error) -> axum::response::Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("reading counters failed: {}\n", error_chain(e)),
    )
        .into_response()
}

/// The page loads nothing from elsewhere; the policy makes sure of it.
const STATUS_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src data:";

async fn status_page() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(STATUS_CSP),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        STATUS_HTML,
    )
}

async fn status(AxState(s): AxState<MetricsState>) -> axum::response::Response {
    let input = {
        let core = s.shared.core.lock().await;
        let stats = match core.stats() {
            Ok(stats) => stats,
            Err(e) => return counters_failed(&e),
        };
        let status = core.status();
        StatusInput {
            stats,
            iface: status.iface,
            pid: status.pid,
            conntrack: s.ct.conntrack(status.ct_entries),
            settings: core
                .state()
                .services
                .iter()
                .map(|svc| {
                    (
                        svc.name.clone(),
                        (svc.hash.to_string(), svc.health.check.to_string()),
                    )
                })
                .collect(),
            removed: core.state().removed.clone(),
            time_unix_ms: unix_ms(),
        }
    };
    let body = status_json(&input, &s.history.lock().expect("history lock"));
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response()
}

/// Binds `addr` (before the daemon touches the interface).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `/metrics` and the status page until the daemon shuts down.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    ct: Arc<CtCount>,
) -> std::io::Result<()> {
    let mut stop = shared.shutdown.subscribe();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics on http://{addr}/metrics and the status page on http://{addr}/");
    }
    let history = Arc::new(Mutex::new(History::default()));
    let sampler = AbortOnDrop(tokio::spawn(sample(shared.clone(), history.clone())));
    let served = axum::serve(listener, router(shared, ct, history))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    drop(sampler);
    served
}

/// Stops a spawned task when dropped (also when `serve` is cancelled).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts the keys of the pinned conntrack map (key `K`: `Flow4` or
/// `Flow6`) at `pin`, at most `limit` (an LRU walk restarts when the key it
/// stands on is evicted).
pub fn count_pinned<K: aya::Pod>(
    pin: &std::path::Path,
    limit: u64,
) -> Result<u64, aya::maps::MapError> {
    let data = aya::maps::MapData::from_pin(pin)?;
    let map = aya::maps::HashMap::<_, K, CtEntry>::try_from(aya::maps::Map::LruHashMap(data))?;
    let mut n = 0u64;
    for k in map.keys() {
        k?;
        n += 1;
        if n >= limit {
            break;
        }
    }
    Ok(n)
}

/// Counts `CT4` (pinned at `ct4_pin`) and `CT6` (pinned beside it) into
/// `out` every [`CT_COUNT_EVERY`] (or 20 times the walks' duration if
/// longer), off the async threads.
pub async fn count_conntrack(ct4_pin: PathBuf, capacity: u32, out: Arc<CtCount>) {
    let mut warned = [false; 2];
    loop {
        let started = std::time::Instant::now();
        for (family, warned) in CtFamily::ALL.into_iter().zip(&mut warned) {
            let pin = ct4_pin.with_file_name(family.map());
            let limit = u64::from(capacity);
            let result = tokio::task::spawn_blocking(move || match family {
                CtFamily::Ipv4 => count_pinned::<Flow4>(&pin, limit),
                CtFamily::Ipv6 => count_pinned::<Flow6>(&pin, limit),
            })
            .await;
            match result {
                Ok(Ok(n)) => {
                    debug!(family = family.label(), entries = n, "counted conntrack");
                    out.set(family, n);
                }
                Ok(Err(e)) if !*warned => {
                    warn!(
                        family = family.label(), error = %error_chain(&e),
                        "counting conntrack entries failed"
                    );
                    *warned = true;
                }
                _ => {}
            }
        }
        let took = started.elapsed();
        tokio::time::sleep(CT_COUNT_EVERY.max(took * 20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{BackendStats, ServiceStats, StatusView},
        daemon::Core,
        dataplane::MemDataplane,
        health::{HealthView, TransitionCounts},
        state::{BackendSpec, Proto, ServiceSpec, State, StateStore},
    };
    use lb_common::Traffic;
    use prometheus_parse::{Scrape, Value};
    use std::collections::BTreeMap;

    fn snapshot() -> StatsView {
        let counters = DpCounter::ALL
            .iter()
            .enumerate()
            .map(|(n, c)| (c.name().to_string(), 100 + n as u64))
            .collect();
        let drops = DropReason::ALL
            .iter()
            .enumerate()
            .map(|(n, r)| (r.name().to_string(), 200 + n as u64))
            .collect();
        let backend = |addr: &str, id, weight, health: Option<HealthView>| BackendStats {
            addr: addr.parse().unwrap(),
            id,
            state: if id == 2 {
                BackendState::Draining
            } else {
                BackendState::Active
            },
            weight,
            in_table: id == 1,
            health,
            packets: 10 * u64::from(id),
            bytes: 1000 * u64::from(id),
            new_flows: u64::from(id),
        };
        let down = HealthView {
            status: Status::Down,
            checked: true,
            transitions: TransitionCounts {
                down: 3,
                up: 2,
                draining: 1,
            },
            last_transition: None,
            last_transition_unix_s: None,
            last_check: None,
            last_latency_us: None,
        };
        StatsView {
            counters,
            drops,
            services: vec![ServiceStats {
                name: "amqp".into(),
                id: 1,
                vip: "10.0.0.10:5672".parse().unwrap(),
                proto: Proto::Tcp,
                panic: true,
                packets: 30,
                bytes: 3000,
                new_flows: 3,
                backends: vec![
                    backend("10.0.1.1", 1, 100, None),
                    backend("10.0.1.2", 2, 250, Some(down)),
                ],
            }],
        }
    }

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    /// The value of the one sample named `name` with exactly `labels`.
    fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Value {
        let found: Vec<_> = s
            .samples
            .iter()
            .filter(|x| {
                x.metric == name
                    && x.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value.clone()
    }

    fn counter(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        match value(s, name, labels) {
            Value::Counter(v) => v,
            v => panic!("{name} {labels:?} is not a counter: {v:?}"),
        }
    }

    fn gauge(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        match value(s, name, labels) {
            Value::Gauge(v) => v,
            v => panic!("{name} {labels:?} is not a gauge: {v:?}"),
        }
    }

    #[test]
    fn renders_every_counter_with_its_labels() {
        let text = render(
            &snapshot(),
            &Conntrack {
                capacity: 1 << 20,
                ipv4: Some(1234),
                ipv6: Some(56),
            },
        );
        let s = parse(&text);
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("mqlb_")),
            "{text}"
        );
        assert_eq!(counter(&s, "mqlb_rx_packets_total", &[]), 100.0);
        for (n, c) in DpCounter::ALL.iter().enumerate().skip(1) {
            let (name, label) = match c {
                DpCounter::Pass | DpCounter::Tx | DpCounter::Redirect | DpCounter::Drop => {
                    ("mqlb_packets_total", "verdict")
                }
                _ => ("mqlb_events_total", "event"),
            };
            assert_eq!(
                counter(&s, name, &[(label, c.name())]),
                100.0 + n as f64,
                "{}",
                c.name()
            );
        }
        for (n, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(
                counter(&s, "mqlb_drops_total", &[("reason", r.name())]),
                200.0 + n as f64
            );
        }
        let svc = [("service", "amqp")];
        assert_eq!(counter(&s, "mqlb_service_packets_total", &svc), 30.0);
        assert_eq!(counter(&s, "mqlb_service_bytes_total", &svc), 3000.0);
        assert_eq!(counter(&s, "mqlb_service_new_flows_total", &svc), 3.0);
        assert_eq!(gauge(&s, "mqlb_service_panic", &svc), 1.0);
        assert_eq!(gauge(&s, "mqlb_service_backends_in_table", &svc), 1.0);
        let b1 = [("service", "amqp"), ("backend", "10.0.1.1")];
        let b2 = [("service", "amqp"), ("backend", "10.0.1.2")];
        assert_eq!(counter(&s, "mqlb_backend_packets_total", &b1), 10.0);
        assert_eq!(counter(&s, "mqlb_backend_bytes_total", &b2), 2000.0);
        assert_eq!(counter(&s, "mqlb_backend_new_flows_total", &b2), 2.0);
        assert_eq!(gauge(&s, "mqlb_backend_up", &b1), 1.0, "unchecked is up");
        assert_eq!(gauge(&s, "mqlb_backend_up", &b2), 0.0);
        assert_eq!(gauge(&s, "mqlb_backend_checked", &b1), 0.0);
        assert_eq!(gauge(&s, "mqlb_backend_checked", &b2), 1.0);
        assert_eq!(gauge(&s, "mqlb_backend_weight", &b2), 250.0);
        assert_eq!(gauge(&s, "mqlb_backend_in_table", &b1), 1.0);
        assert_eq!(gauge(&s, "mqlb_backend_in_table", &b2), 0.0);
        assert_eq!(gauge(&s, "mqlb_backend_drained", &b2), 1.0);
        for (to, n) in [("down", 3.0), ("up", 2.0), ("draining", 1.0)] {
            let l = [b2[0], b2[1], ("to", to)];
            assert_eq!(counter(&s, "mqlb_health_transitions_total", &l), n);
        }
        assert!(
            !s.samples
                .iter()
                .any(|x| x.metric == "mqlb_health_transitions_total"
                    && x.labels.get("backend") == Some("10.0.1.1")),
            "no transitions for an unchecked backend"
        );
        for (family, n) in [("ipv4", 1234.0), ("ipv6", 56.0)] {
            let l = [("family", family)];
            assert_eq!(gauge(&s, "mqlb_conntrack_capacity", &l), 1048576.0);
            assert_eq!(gauge(&s, "mqlb_conntrack_entries", &l), n);
        }
        for name in ["mqlb_conntrack_capacity", "mqlb_conntrack_entries"] {
            let series: Vec<_> = s.samples.iter().filter(|x| x.metric == name).collect();
            assert_eq!(series.len(), 2, "{name}: one series per family");
            assert!(series.iter().all(|x| x.labels.len() == 1), "{name}");
        }
        // Every sample has HELP and a known TYPE; counters end in `_total`.
        for x in &s.samples {
            assert!(s.docs.contains_key(&x.metric), "{} has no HELP", x.metric);
            if let Value::Counter(_) = x.value {
                assert!(x.metric.ends_with("_total"), "{}", x.metric);
            } else {
                assert!(matches!(x.value, Value::Gauge(_)), "{}", x.metric);
                assert!(!x.metric.ends_with("_total"), "{}", x.metric);
            }
        }
        let none = render(&snapshot(), &Conntrack::default());
        assert!(!none.contains("mqlb_conntrack_entries"), "no count yet");
        let v4_only = Conntrack {
            capacity: 8,
            ipv4: Some(3),
            ipv6: None,
        };
        let s = parse(&render(&snapshot(), &v4_only));
        assert_eq!(
            gauge(&s, "mqlb_conntrack_entries", &[("family", "ipv4")]),
            3.0
        );
        assert!(
            !s.samples
                .iter()
                .any(|x| x.metric == "mqlb_conntrack_entries"
                    && x.labels.get("family") == Some("ipv6")),
            "CT6 not counted yet"
        );
        assert_eq!(
            gauge(&s, "mqlb_conntrack_capacity", &[("family", "ipv6")]),
            8.0
        );
    }

    /// A daemon core (in-memory data plane) with service `amqp` on
    /// 10.0.0.10:5672 and backend 10.0.1.1 (weight 3), served on 127.0.0.1:0.
    struct TestServer {
        addr: SocketAddr,
        shared: Arc<Shared>,
        mem: Arc<std::sync::Mutex<MemDataplane>>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
        _dir: tempfile::TempDir,
    }

    impl TestServer {
        async fn start() -> TestServer {
            let dir = tempfile::tempdir().unwrap();
            let mem: Arc<std::sync::Mutex<MemDataplane>> = Default::default();
            let status = StatusView {
                iface: "eth1".into(),
                pid: 4242,
                ct_entries: 4096,
                ..Default::default()
            };
            let mut core = Core::new(
                State::default(),
                StateStore::new(dir.path()),
                Box::new(mem.clone()),
                status,
            )
            .unwrap();
            core.add_service(&ServiceSpec {
                name: "amqp".into(),
                vip: "10.0.0.10:5672".into(),
                proto: Proto::Tcp,
                hash: Default::default(),
                udp_idle_s: None,
                ring_size: Some(13),
                health: Default::default(),
            })
            .unwrap();
            core.add_backend(
                "amqp",
                &BackendSpec {
                    addr: "10.0.1.1".into(),
                    weight: Some(3),
                },
            )
            .unwrap();
            let shared = Shared::new(core);
            let ct = Arc::new(CtCount::default());
            ct.set(CtFamily::Ipv4, 17);
            ct.set(CtFamily::Ipv6, 5);
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(serve(listener, shared.clone(), ct));
            TestServer {
                addr,
                shared,
                mem,
                server,
                _dir: dir,
            }
        }

        /// Sets the counters (after any backend add: an add resets them).
        fn set_counters(&self) {
            let c = &mut self.mem.lock().unwrap().counters;
            c.global = vec![0; DpCounter::COUNT as usize];
            c.global[DpCounter::Rx as usize] = 7;
            c.drops = vec![0; DropReason::COUNT as usize];
            c.drops[DropReason::NoBackend as usize] = 5;
            c.backends = BTreeMap::from([(
                1,
                Traffic {
                    packets: 9,
                    bytes: 900,
                    new_flows: 2,
                },
            )]);
        }

        /// `GET path`: (status line and headers, body).
        async fn get(&self, path: &str) -> (String, String) {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut conn = tokio::net::TcpStream::connect(self.addr).await.unwrap();
            conn.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut resp = String::new();
            conn.read_to_string(&mut resp).await.unwrap();
            let (head, body) = resp.split_once("\r\n\r\n").unwrap();
            (head.to_string(), body.to_string())
        }

        async fn stop(self) {
            self.shared.shutdown.send_replace(true);
            tokio::time::timeout(Duration::from_secs(5), self.server)
                .await
                .expect("stops on shutdown")
                .unwrap()
                .unwrap();
        }
    }

    fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let t = TestServer::start().await;
        t.set_counters();
        let (head, body) = t.get("/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        let s = parse(&body);
        assert_eq!(counter(&s, "mqlb_rx_packets_total", &[]), 7.0);
        assert_eq!(
            counter(&s, "mqlb_drops_total", &[("reason", "no_backend")]),
            5.0
        );
        let b = [("service", "amqp"), ("backend", "10.0.1.1")];
        assert_eq!(counter(&s, "mqlb_backend_bytes_total", &b), 900.0);
        assert_eq!(gauge(&s, "mqlb_backend_weight", &b), 3.0);
        assert_eq!(gauge(&s, "mqlb_backend_in_table", &b), 1.0);
        assert_eq!(gauge(&s, "mqlb_backend_up", &b), 1.0);
        for (family, n) in [("ipv4", 17.0), ("ipv6", 5.0)] {
            let l = [("family", family)];
            assert_eq!(gauge(&s, "mqlb_conntrack_capacity", &l), 4096.0);
            assert_eq!(gauge(&s, "mqlb_conntrack_entries", &l), n);
        }

        let (head, _) = t.get("/other").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        t.stop().await;
    }

    #[tokio::test]
    async fn serves_the_status_page() {
        let t = TestServer::start().await;
        let (head, body) = t.get("/").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(
            header_of(&head, "content-type"),
            Some("text/html; charset=utf-8"),
            "{head}"
        );
        let csp = header_of(&head, "content-security-policy").expect("a CSP header");
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert_eq!(body, STATUS_HTML);
        for hook in [
            "id=\"chart\"",
            "id=\"services\"",
            "id=\"conntrack\"",
            "id=\"ct-families\"",
            "\"data-family\"",
            "fetch(\"status.json\"",
            "data-backend",
            "data-state",
            "textContent",
        ] {
            assert!(body.contains(hook), "the page lacks {hook}");
        }
        // Nothing from elsewhere (the browser may have no internet), and no
        // daemon string is ever parsed as HTML.
        assert!(!body.contains("://"), "the page names an external URL");
        assert!(
            !body.contains("innerHTML"),
            "the page writes HTML from strings"
        );
        t.stop().await;
    }

    #[tokio::test]
    async fn serves_status_json() {
        let t = TestServer::start().await;
        {
            let mut core = t.shared.core.lock().await;
            for addr in ["10.0.1.2", "10.0.1.3"] {
                core.add_backend(
                    "amqp",
                    &BackendSpec {
                        addr: addr.into(),
                        weight: None,
                    },
                )
                .unwrap();
            }
            core.set_backend(
                "amqp",
                "10.0.1.2",
                &crate::state::BackendUpdate {
                    weight: None,
                    state: Some(BackendState::Draining),
                },
            )
            .unwrap();
            core.del_backend("amqp", "10.0.1.3").unwrap();
        }
        t.set_counters();
        let (head, body) = t.get("/status.json").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(
            header_of(&head, "content-type"),
            Some("application/json"),
            "{head}"
        );
        assert_eq!(header_of(&head, "cache-control"), Some("no-store"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["iface"], "eth1");
        assert_eq!(v["pid"], 4242);
        assert!(v["time_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(
            v["conntrack"],
            serde_json::json!({
                "capacity": 8192,
                "entries": 22,
                "families": [
                    {"family": "ipv4", "capacity": 4096, "entries": 17},
                    {"family": "ipv6", "capacity": 4096, "entries": 5},
                ],
            }),
            "both families, and each"
        );
        let named = |list: &serde_json::Value, name: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no {name} in {list}"))
                .clone()
        };
        assert_eq!(named(&v["counters"], "rx")["packets"], 7);
        assert_eq!(named(&v["drops"], "no_backend")["packets"], 5);
        assert_eq!(
            v["drops"].as_array().unwrap().len(),
            DropReason::ALL.len(),
            "every reason"
        );
        let svc = &v["services"][0];
        assert_eq!(v["services"].as_array().unwrap().len(), 1);
        assert_eq!(svc["name"], "amqp");
        assert_eq!(svc["vip"], "10.0.0.10:5672");
        assert_eq!(svc["proto"], "tcp");
        assert_eq!(svc["hash"], "five-tuple");
        assert_eq!(svc["check"], "none");
        assert_eq!(svc["panic"], false);
        let backends: Vec<_> = svc["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["addr"].as_str().unwrap().to_string(),
                    b["status"].as_str().unwrap().to_string(),
                    b["weight"].clone(),
                    b["in_table"].as_bool().unwrap(),
                )
            })
            .collect();
        let w = |n: u32| serde_json::Value::from(n);
        assert_eq!(
            backends,
            vec![
                ("10.0.1.1".into(), "active".into(), w(3), true),
                ("10.0.1.2".into(), "draining".into(), w(100), false),
                (
                    "10.0.1.3".into(),
                    "removed".into(),
                    serde_json::Value::Null,
                    false
                ),
            ]
        );
        let b1 = &svc["backends"][0];
        assert_eq!(b1["packets"], 9);
        assert_eq!(b1["bytes"], 900);
        assert_eq!(b1["new_flows"], 2);
        assert_eq!(b1["health"], "-");
        assert_eq!(svc["backends"][2]["packets"], serde_json::Value::Null);
        assert_eq!(v["removed"], serde_json::json!([]));
        assert!(v["history"].as_array().unwrap().len() <= HISTORY_LEN);
        t.stop().await;
    }

    #[test]
    fn backend_status_words() {
        let s = snapshot();
        let mut b = s.services[0].backends[0].clone();
        assert_eq!(backend_status(&b), "active", "unchecked");
        let health = |status| {
            Some(HealthView {
                status,
                checked: true,
                transitions: TransitionCounts::default(),
                last_transition: None,
                last_transition_unix_s: None,
                last_check: Some("fail: refused".into()),
                last_latency_us: None,
            })
        };
        b.health = health(Status::Up);
        assert_eq!(backend_status(&b), "active");
        b.health = health(Status::Down);
        assert_eq!(backend_status(&b), "down");
        b.health = health(Status::Draining);
        assert_eq!(backend_status(&b), "draining", "drained by its check");
        b.state = BackendState::Draining;
        b.health = health(Status::Down);
        assert_eq!(backend_status(&b), "draining", "an operator's drain first");
    }

    /// `snapshot()` with every counter of service `amqp` and its backends
    /// scaled by `k`, and `rx` set to `rx`.
    fn scaled(k: u64, rx: u64) -> StatsView {
        let mut s = snapshot();
        s.counters.insert(DpCounter::Rx.name().into(), rx);
        let svc = &mut s.services[0];
        svc.packets *= k;
        svc.bytes *= k;
        svc.new_flows *= k;
        for b in &mut svc.backends {
            b.packets *= k;
            b.bytes *= k;
            b.new_flows *= k;
        }
        s
    }

    fn input(stats: StatsView, removed: Vec<RemovedBackend>) -> StatusInput {
        StatusInput {
            stats,
            iface: "eth1".into(),
            pid: 1,
            conntrack: Conntrack {
                capacity: 100,
                ..Default::default()
            },
            settings: HashMap::from([("amqp".into(), ("src-ip".into(), "tcp".into()))]),
            removed,
            time_unix_ms: 5_000,
        }
    }

    #[test]
    fn history_gives_rates_by_name_and_chart_points() {
        let t0 = Instant::now();
        let mut h = History::default();
        let j = status_json(&input(scaled(1, 1000), vec![]), &h);
        assert_eq!(j.rate_interval_s, None);
        assert!(j.history.is_empty());
        assert!(j.counters.iter().all(|c| c.per_s.is_none()));

        h.push(t0, 1_000, scaled(1, 1000));
        h.push(t0 + Duration::from_secs(2), 3_000, scaled(3, 1500));
        let j = status_json(&input(scaled(3, 1500), vec![]), &h);
        assert_eq!(j.rate_interval_s, Some(2.0));
        let svc = &j.services[0];
        assert_eq!(
            svc.rates,
            Some(RatesJson {
                packets: 30.0, // 30 → 90 packets in 2 s
                bytes: 3000.0,
                new_flows: 3.0,
            })
        );
        assert_eq!(svc.backends[1].rates.unwrap().packets, 20.0);
        assert_eq!((svc.hash.as_str(), svc.check.as_str()), ("src-ip", "tcp"));
        let rx = j.counters.iter().find(|c| c.name == "rx").unwrap();
        assert_eq!((rx.packets, rx.per_s), (1500, Some(250.0)));
        assert_eq!(
            j.history,
            vec![Point {
                t_unix_ms: 3_000,
                rx: 250.0,
                services: 30.0,
                drops: 0.0,
            }]
        );

        // A service deleted and re-added under the same id gets no rate
        // from its predecessor; counters that went down give 0, not a spike.
        let mut renamed = scaled(3, 1500);
        renamed.services[0].name = "other".into();
        let j = status_json(&input(renamed, vec![]), &h);
        assert_eq!(j.services[0].rates, None);
        h.push(t0 + Duration::from_secs(3), 4_000, scaled(1, 10));
        assert_eq!(h.points.back().unwrap().rx, 0.0);

        for n in 0..2 * HISTORY_LEN as u64 {
            h.push(t0 + Duration::from_secs(4 + n), 5_000 + n, scaled(1, 10));
        }
        assert_eq!(h.points.len(), HISTORY_LEN, "one minute of points");
        assert_eq!(
            h.points.back().unwrap().t_unix_ms,
            5_000 + 2 * HISTORY_LEN as u64 - 1
        );
    }

    #[test]
    fn status_json_places_removed_backends() {
        let removed = vec![
            RemovedBackend {
                id: 7,
                addr: "10.0.1.7".parse().unwrap(),
                service: "amqp".into(),
            },
            RemovedBackend {
                id: 8,
                addr: "10.0.1.8".parse().unwrap(),
                service: "gone".into(),
            },
        ];
        let j = status_json(&input(snapshot(), removed), &History::default());
        let words: Vec<_> = j.services[0]
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.status))
            .collect();
        assert_eq!(
            words,
            [
                ("10.0.1.1".to_string(), "active"),
                ("10.0.1.2".to_string(), "draining"),
                ("10.0.1.7".to_string(), "removed"),
            ]
        );
        assert!(j.services[0].panic);
        assert_eq!(j.services[0].backends[1].health, "down");
        assert_eq!(
            j.services[0].backends[1].last_check, None,
            "the snapshot's check said nothing"
        );
        assert_eq!(
            j.removed,
            [RemovedBackendJson {
                addr: "10.0.1.8".parse().unwrap(),
                service: "gone".into(),
            }]
        );
    }
}
