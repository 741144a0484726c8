//! `mqlb up --metrics ADDR`: `GET /metrics` in the Prometheus text format
//! (0.0.4), through `prometheus-client`. Every scrape builds a fresh registry
//! from the same snapshot `mqlb stats` shows ([`Core::stats`], counters summed
//! over CPUs), so the values are the data plane's own monotonic counters.
//!
//! Conntrack fill: the kernel keeps no element count for an LRU hash map, and
//! walking a million keys per scrape is too slow (about 1.7 s for 1M entries,
//! one syscall per key), so [`count_conntrack`] walks `CT4` in the background
//! (at most `capacity` keys; every [`CT_COUNT_EVERY`], or 20 times the last
//! walk's duration if longer, so it takes at most 5% of one CPU) and the
//! scrape reports the last count as `mqlb_conntrack_entries`.
//!
//! [`Core::stats`]: crate::daemon::Core::stats

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::State as AxState,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use lb_common::{Counter as DpCounter, CtEntry, DropReason, Flow4};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{debug, info, warn};

use crate::{
    api::StatsView,
    daemon::{error_chain, Shared},
    health::Status,
    state::BackendState,
};

/// How often the background task counts `CT4` (at least).
pub const CT_COUNT_EVERY: Duration = Duration::from_secs(15);

/// What the scrape reports about conntrack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    /// Maximum entries of `CT4`.
    pub capacity: u32,
    /// Last background count; `None` until the first one finishes.
    pub entries: Option<u64>,
}

/// The last conntrack count, shared with the background counter.
#[derive(Debug)]
pub struct CtCount(AtomicU64);

impl Default for CtCount {
    fn default() -> Self {
        CtCount(AtomicU64::new(u64::MAX))
    }
}

impl CtCount {
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&n| n != u64::MAX)
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

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
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

    gauge(
        &mut reg,
        "mqlb_conntrack_capacity",
        "Maximum entries of the IPv4 conntrack (LRU)",
        i64::from(ct.capacity),
    );
    if let Some(n) = ct.entries {
        gauge(
            &mut reg,
            "mqlb_conntrack_entries",
            "Entries of the IPv4 conntrack at the last background count (every 15 s or more)",
            i(n),
        );
    }

    let mut out = String::new();
    prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

#[derive(Clone)]
struct MetricsState {
    shared: Arc<Shared>,
    ct: Arc<CtCount>,
}

/// `GET /metrics`.
pub fn router(shared: Arc<Shared>, ct: Arc<CtCount>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(MetricsState { shared, ct })
}

async fn metrics(AxState(s): AxState<MetricsState>) -> axum::response::Response {
    let (stats, capacity) = {
        let core = s.shared.core.lock().await;
        (core.stats(), core.status().ct_entries)
    };
    match stats {
        Ok(stats) => {
            let ct = Conntrack {
                capacity,
                entries: s.ct.get(),
            };
            (
                [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                render(&stats, &ct),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading counters failed: {}\n", error_chain(&e)),
        )
            .into_response(),
    }
}

/// Binds `addr` (before the daemon touches the interface).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `/metrics` until the daemon shuts down.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    ct: Arc<CtCount>,
) -> std::io::Result<()> {
    let mut stop = shared.shutdown.subscribe();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics on http://{addr}/metrics");
    }
    axum::serve(listener, router(shared, ct))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

/// Counts the keys of the pinned `CT4` map at `pin`, at most `limit`
/// (an LRU walk restarts when the key it stands on is evicted).
pub fn count_pinned(pin: &std::path::Path, limit: u64) -> Result<u64, aya::maps::MapError> {
    let data = aya::maps::MapData::from_pin(pin)?;
    let map = aya::maps::HashMap::<_, Flow4, CtEntry>::try_from(aya::maps::Map::LruHashMap(data))?;
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

/// Counts `CT4` into `out` every [`CT_COUNT_EVERY`] (or 20 times the walk's
/// duration if longer), off the async threads.
pub async fn count_conntrack(pin: PathBuf, capacity: u32, out: Arc<CtCount>) {
    let mut warned = false;
    loop {
        let p = pin.clone();
        let started = std::time::Instant::now();
        let result =
            tokio::task::spawn_blocking(move || count_pinned(&p, u64::from(capacity))).await;
        let took = started.elapsed();
        match result {
            Ok(Ok(n)) => {
                debug!(entries = n, ?took, "counted conntrack");
                out.set(n);
            }
            Ok(Err(e)) if !warned => {
                warn!(error = %error_chain(&e), "counting conntrack entries failed");
                warned = true;
            }
            _ => {}
        }
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
                entries: Some(1234),
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
        assert_eq!(gauge(&s, "mqlb_conntrack_capacity", &[]), 1048576.0);
        assert_eq!(gauge(&s, "mqlb_conntrack_entries", &[]), 1234.0);
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
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let dir = tempfile::tempdir().unwrap();
        let mem: Arc<std::sync::Mutex<MemDataplane>> = Default::default();
        let status = StatusView {
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
        {
            // After the add: a new backend's counters are reset.
            let c = &mut mem.lock().unwrap().counters;
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
        let shared = Shared::new(core);
        let ct = Arc::new(CtCount::default());
        ct.set(17);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, shared.clone(), ct));

        let get = |path: &'static str| async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut resp = String::new();
            conn.read_to_string(&mut resp).await.unwrap();
            let (head, body) = resp.split_once("\r\n\r\n").unwrap();
            (head.to_string(), body.to_string())
        };
        let (head, body) = get("/metrics").await;
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
        assert_eq!(gauge(&s, "mqlb_conntrack_capacity", &[]), 4096.0);
        assert_eq!(gauge(&s, "mqlb_conntrack_entries", &[]), 17.0);

        let (head, _) = get("/other").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");

        shared.shutdown.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops on shutdown")
            .unwrap()
            .unwrap();
    }
}
