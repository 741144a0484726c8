//! `mqlb up`: the daemon. [`Core`] holds the state, the maps, the next
//! hops and the health of every checked backend behind one mutex, so API
//! calls and check results are serialised; every change is validated in
//! full, persisted, then written to the maps. [`run`] loads and attaches the
//! program, restores the saved state, keeps next hops resolved, runs the
//! health checks ([`crate::health::run`]) and serves the API until
//! SIGTERM/SIGINT or `mqlb down`. On exit the program stays attached and the
//! pins stay: a restart drops no packet.
//!
//! A health transition (see [`crate::health`]) is logged with its reason,
//! counted, and rebuilds the tables at once; so does entering or leaving
//! panic mode.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    future::Future,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use lb_common::{Counter, DropReason};
use serde::{Deserialize, Serialize};
use tokio::{
    net::UnixListener,
    sync::{mpsc, watch, Mutex, Notify},
};
use tracing::{debug, info, warn};

use crate::{
    api::{BackendStats, BackendView, ServiceStats, ServiceView, StatsView, StatusView},
    dataplane::{apply, read_applied, Dataplane, DataplaneError, KernelDataplane},
    health::{self, BackendHealth, CheckTarget, HealthView, ProbeResult, Status},
    host,
    loader::{self, Attached, LoadError, Mode},
    manifest::{self, ApplyError, ApplyReply, Change, Desired},
    nexthop::{self, Resolver},
    plan::{self, addr16, plan, Applied, DefaultSrc, Hop},
    probe::{self, FlowView},
    state::{
        Backend, BackendSpec, BackendState, BackendUpdate, Service, ServiceSpec, ServiceUpdate,
        State, StateError, StateStore, StoreError,
    },
};

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/mqlb/mqlb.sock";
/// Parent of the per-interface state directories.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/mqlb";
/// Next hops are re-resolved this often (keeps neighbour entries fresh).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// ... and this often while some backend's neighbour is not resolved yet.
pub const RESOLVE_RETRY: Duration = Duration::from_secs(1);

/// Why an API change failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    State(#[from] StateError),
    /// `POST /v1/apply`: the desired state, and where it is wrong.
    #[error(transparent)]
    Apply(Box<ApplyError>),
    #[error("the change was not saved")]
    Store(#[source] StoreError),
    #[error("the change was saved, but writing the maps failed (the daemon retries)")]
    Dataplane(#[source] DataplaneError),
    #[error("probing the loaded program failed")]
    Probe(#[source] DataplaneError),
}

impl From<ApplyError> for CoreError {
    fn from(e: ApplyError) -> Self {
        CoreError::Apply(Box::new(e))
    }
}

impl CoreError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            CoreError::State(e) => e.status(),
            CoreError::Apply(e) => e.status,
            _ => 500,
        }
    }
}

/// The daemon's state, its maps and its next hops; one per interface.
pub struct Core {
    state: State,
    store: StateStore,
    dp: Box<dyn Dataplane>,
    applied: Applied,
    hops: BTreeMap<IpAddr, Hop>,
    hop_errors: BTreeMap<IpAddr, String>,
    default_src: DefaultSrc,
    /// `default_src` was set once (its first value is logged).
    src_known: bool,
    /// The last apply failed: re-read the maps before planning again.
    resync: bool,
    status: StatusView,
    /// Health of every backend of a checked service, by backend id.
    health: BTreeMap<u32, BackendHealth>,
    /// Ids of the services in panic mode.
    panic: BTreeSet<u32>,
    /// Counts saved state changes (the health checks follow it).
    changes: watch::Sender<u64>,
}

impl Core {
    /// Takes over the maps: reads back what they hold and holds ids found in
    /// them that `state` does not know. Writes nothing yet (see [`Core::sync`]).
    pub fn new(
        mut state: State,
        store: StateStore,
        dp: Box<dyn Dataplane>,
        status: StatusView,
    ) -> Result<Core, DataplaneError> {
        let in_map: Vec<(u32, IpAddr)> = dp
            .read_backends()?
            .into_iter()
            .map(|(id, b)| (id, map_addr(&b.addr)))
            .collect();
        let adopted = state.adopt_orphans(&in_map);
        if !adopted.is_empty() {
            warn!(
                ids = ?adopted,
                "BACKENDS holds ids the saved state does not know; keeping them as removed \
                 so their established flows finish"
            );
            if let Err(e) = store.save(&state) {
                warn!(error = %e, "could not save the adopted ids");
            }
        }
        let applied = read_applied(&*dp, &state)?;
        // Health is not saved, but a backend the previous daemon wrote DOWN
        // stays down until it passes `rise` checks. With `on_down = keep` a
        // down backend was written DRAINING: one the operator did not drain
        // was taken out by its check (down or 503), so it starts down too.
        let mut health = BTreeMap::new();
        for svc in state.services.iter().filter(|s| s.health.enabled()) {
            let keep = svc.health.on_down == health::OnDown::Keep;
            for b in &svc.backends {
                let out_by_check = |st: u8| {
                    st == lb_common::backend_state::DOWN
                        || (keep
                            && st == lb_common::backend_state::DRAINING
                            && b.state == BackendState::Active)
                };
                let was_down = applied
                    .backends
                    .get(&b.id)
                    .is_some_and(|e| out_by_check(e.state) && e.addr == addr16(b.addr));
                if was_down {
                    info!(
                        service = %svc.name, backend = %b.addr,
                        "backend was down before the restart; it returns after {} passed checks",
                        svc.health.rise
                    );
                    let mut h = BackendHealth::new(b.addr, Status::Down);
                    h.last_reason = Some("down before the daemon restarted".into());
                    health.insert(b.id, h);
                }
            }
        }
        let mut core = Core {
            state,
            store,
            dp,
            applied,
            hops: BTreeMap::new(),
            hop_errors: BTreeMap::new(),
            default_src: DefaultSrc::default(),
            src_known: false,
            resync: false,
            status,
            health,
            panic: BTreeSet::new(),
            changes: watch::channel(0).0,
        };
        core.refresh_health();
        Ok(core)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn status(&self) -> StatusView {
        let mut s = self.status.clone();
        s.seed = self.state.seed;
        s.services = self.state.services.len();
        s.backends = self.state.services.iter().map(|s| s.backends.len()).sum();
        s.removed_backends = self.state.removed.len();
        s.unresolved = self
            .state
            .backend_addrs()
            .into_iter()
            .filter(|a| self.hops.get(a).is_none_or(|h| h.dst_mac.is_none()))
            .map(|a| a.to_string())
            .collect();
        s
    }

    /// Writes whatever the maps lack. After a failed apply, re-reads them first.
    pub fn sync(&mut self) -> Result<(), DataplaneError> {
        if self.resync {
            let t = std::time::Instant::now();
            self.applied = read_applied(&*self.dp, &self.state)?;
            self.resync = false;
            debug!(
                elapsed_us = t.elapsed().as_micros() as u64,
                "maps read back"
            );
        }
        let t = std::time::Instant::now();
        let p = plan(
            &self.state,
            &self.plan_health(),
            &self.hops,
            self.default_src,
            &self.applied,
        );
        let plan_us = t.elapsed().as_micros() as u64;
        if p.is_empty() {
            debug!(plan_us, "maps up to date");
            return Ok(());
        }
        let t = std::time::Instant::now();
        match apply(&mut *self.dp, &p) {
            Ok(()) => {
                self.applied.record(&p);
                debug!(
                    plan = %p.summary(), plan_us, write_us = t.elapsed().as_micros() as u64,
                    "maps written"
                );
                Ok(())
            }
            Err(e) => {
                self.resync = true;
                Err(e)
            }
        }
    }

    /// Validates `f` on a copy of the state, saves the result, then writes
    /// the maps. A refused change leaves nothing behind.
    fn change<T>(
        &mut self,
        f: impl FnOnce(&mut State) -> Result<T, StateError>,
    ) -> Result<T, CoreError> {
        let mut next = self.state.clone();
        let out = f(&mut next)?;
        self.commit(next)?;
        self.sync().map_err(CoreError::Dataplane)?;
        Ok(out)
    }

    /// Saves `next` (if it differs) and makes it the state; the maps are
    /// written by the next [`Core::sync`].
    fn commit(&mut self, next: State) -> Result<(), CoreError> {
        if next != self.state {
            let t = std::time::Instant::now();
            self.store.save(&next).map_err(CoreError::Store)?;
            debug!(
                elapsed_us = t.elapsed().as_micros() as u64,
                "state saved (file and directory fsync)"
            );
            self.state = next;
            self.refresh_health();
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// `mqlb apply`: makes the state match `desired` in one change. Every
    /// entry is validated (also against this daemon's limits and stored
    /// passwords) before anything changes; the result is saved once, then
    /// written to the maps in one plan. A dry run only computes the changes.
    pub fn apply(&mut self, desired: &Desired, dry_run: bool) -> Result<ApplyReply, CoreError> {
        let (next, changes) = manifest::apply_to(&self.state, desired)?;
        if dry_run {
            return Ok(ApplyReply {
                changes,
                applied: false,
            });
        }
        self.commit(next)?;
        log_changes(&changes, "applied");
        self.sync().map_err(CoreError::Dataplane)?;
        Ok(ApplyReply {
            changes,
            applied: true,
        })
    }

    /// `mqlb up --config FILE` with services: like [`Core::apply`], but the
    /// maps are written later, once next hops are resolved.
    pub fn apply_at_start(&mut self, desired: &Desired) -> Result<Vec<Change>, CoreError> {
        let (next, changes) = manifest::apply_to(&self.state, desired)?;
        self.commit(next)?;
        log_changes(&changes, "applied from the config file");
        Ok(changes)
    }

    /// Follows saved state changes (the health checks restart their probes).
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The health checks' verdicts as the plan takes them.
    fn plan_health(&self) -> plan::Health {
        let mut h = plan::Health {
            panic: self.panic.clone(),
            ..Default::default()
        };
        for (&id, bh) in &self.health {
            match bh.state.status {
                Status::Up => {}
                Status::Down => {
                    h.down.insert(id);
                }
                Status::Draining => {
                    h.draining.insert(id);
                }
            }
        }
        h
    }

    /// Keeps a health entry for every backend of a checked service (new ones
    /// start up), drops the others, and re-evaluates panic mode.
    fn refresh_health(&mut self) {
        let mut old = std::mem::take(&mut self.health);
        for svc in self.state.services.iter().filter(|s| s.health.enabled()) {
            for b in &svc.backends {
                let h = old
                    .remove(&b.id)
                    .filter(|h| h.addr == b.addr)
                    .unwrap_or_else(|| BackendHealth::new(b.addr, Status::Up));
                self.health.insert(b.id, h);
            }
        }
        self.refresh_panic();
    }

    fn status_of(&self, backend: u32) -> Status {
        self.health
            .get(&backend)
            .map_or(Status::Up, |h| h.state.status)
    }

    /// Enters or leaves panic mode per service, and says so in the log.
    fn refresh_panic(&mut self) {
        let mut panic = BTreeSet::new();
        for svc in &self.state.services {
            let pct = svc.health.panic_threshold;
            let (candidates, up) = if svc.health.enabled() {
                let candidates: Vec<u32> = svc
                    .backends
                    .iter()
                    .filter(|b| b.state == BackendState::Active)
                    .map(|b| b.id)
                    .filter(|&id| self.status_of(id) != Status::Draining)
                    .collect();
                let up = candidates
                    .iter()
                    .filter(|&&id| self.status_of(id) == Status::Up)
                    .count();
                (candidates.len(), up)
            } else {
                (0, 0)
            };
            let now = health::in_panic(candidates, up, pct);
            let was = self.panic.contains(&svc.id);
            if now {
                panic.insert(svc.id);
            }
            if now && !was {
                warn!(
                    service = %svc.name, up, backends = candidates, threshold_pct = pct,
                    "panic mode: only {up} of {candidates} backends pass their check (below \
                     {pct}%); routing over all of them"
                );
            } else if was && !now {
                info!(
                    service = %svc.name, up, backends = candidates, threshold_pct = pct,
                    "panic mode over: {up} of {candidates} backends pass their check; down \
                     backends leave the table"
                );
            }
        }
        self.panic = panic;
    }

    /// The checks the daemon should be running.
    pub fn check_targets(&self) -> Vec<CheckTarget> {
        self.state
            .services
            .iter()
            .flat_map(health::targets)
            .collect()
    }

    /// Takes a probe result. A transition is logged with its reason, counted,
    /// and written to the maps at once. Results of a check that no longer
    /// matches the state (changed or deleted meanwhile) are ignored.
    pub fn report(&mut self, target: &CheckTarget, result: ProbeResult, latency: Duration) {
        let Some(svc) = self.state.services.iter().find(|s| s.id == target.service) else {
            return;
        };
        let Some(b) = svc.backends.iter().find(|b| b.id == target.backend) else {
            return;
        };
        if health::target(svc, b).as_ref() != Some(target) {
            return;
        }
        let (service, addr) = (svc.name.clone(), b.addr);
        let h = self
            .health
            .entry(b.id)
            .or_insert_with(|| BackendHealth::new(addr, Status::Up));
        let Some(t) = h.record(result, latency, target.rise, target.fall) else {
            return;
        };
        let (downs, ups) = (h.to_down, h.to_up);
        match t.to {
            Status::Down => warn!(
                service, backend = %addr, from = %t.from, to = %t.to, reason = %t.reason,
                downs, ups, "backend down: out of the table, its flows are re-hashed"
            ),
            Status::Up => info!(
                service, backend = %addr, from = %t.from, to = %t.to, reason = %t.reason,
                downs, ups, "backend up: back in the table"
            ),
            Status::Draining => info!(
                service, backend = %addr, from = %t.from, to = %t.to, reason = %t.reason,
                downs, ups, "backend draining by its check: no new flows, established flows stay"
            ),
        }
        self.refresh_panic();
        if let Err(e) = self.sync() {
            warn!(error = %error_chain(&e), "writing the maps after a health change failed; retrying");
        }
    }

    /// A backend's health (`None` when its service is not checked).
    pub fn health_of(&self, backend: u32) -> Option<HealthView> {
        self.health.get(&backend).map(BackendHealth::view)
    }

    /// Whether a service is in panic mode.
    pub fn in_panic(&self, service: u32) -> bool {
        self.panic.contains(&service)
    }

    /// A service as the API shows it (password redacted).
    pub fn service_view(&self, svc: &Service) -> ServiceView {
        let h = self.plan_health();
        ServiceView {
            service: svc.redacted(),
            panic: self.in_panic(svc.id),
            in_table: svc
                .backends
                .iter()
                .filter(|b| plan::effective(svc, b, &h).1)
                .count(),
        }
    }

    pub fn service_views(&self) -> Vec<ServiceView> {
        self.state
            .services
            .iter()
            .map(|s| self.service_view(s))
            .collect()
    }

    /// The backends of a service with their health.
    pub fn backend_views(&self, name: &str) -> Result<Vec<BackendView>, CoreError> {
        let svc = self.state.service(name)?;
        let h = self.plan_health();
        Ok(svc
            .backends
            .iter()
            .map(|b| BackendView {
                backend: b.clone(),
                in_table: plan::effective(svc, b, &h).1,
                health: self.health_of(b.id),
            })
            .collect())
    }

    /// Changes a service's health check settings.
    pub fn set_service(
        &mut self,
        name: &str,
        update: &ServiceUpdate,
    ) -> Result<Service, CoreError> {
        let svc = self.change(|s| s.set_service(name, update))?;
        info!(
            service = %svc.name, check = %svc.health.summary(svc.vip.port()),
            "service changed"
        );
        Ok(svc)
    }

    /// Sets the hash seed (from `mqlb up --seed`).
    pub fn set_seed(&mut self, seed: u32) -> Result<(), CoreError> {
        let old = self.state.seed;
        self.change(|s| {
            s.seed = seed;
            Ok(())
        })?;
        if old != seed {
            info!(old, new = seed, "hash seed changed");
        }
        Ok(())
    }

    pub fn add_service(&mut self, spec: &ServiceSpec) -> Result<Service, CoreError> {
        let svc = self.change(|s| s.add_service(spec).cloned())?;
        info!(
            service = %svc.name, id = svc.id, vip = %svc.vip, proto = %svc.proto,
            hash = %svc.hash, check = %svc.health.summary(svc.vip.port()), "service added"
        );
        Ok(svc)
    }

    pub fn del_service(&mut self, name: &str) -> Result<Service, CoreError> {
        let svc = self.change(|s| s.del_service(name))?;
        info!(
            service = %svc.name, backends = svc.backends.len(),
            "service deleted; its backends are kept as removed until their flows end"
        );
        Ok(svc)
    }

    pub fn service(&self, name: &str) -> Result<Service, CoreError> {
        Ok(self.state.service(name)?.clone())
    }

    /// `mqlb flow`: where the loaded program sends `client`'s flow to the
    /// service ([`probe::probe`], on the live maps).
    pub fn flow(
        &mut self,
        name: &str,
        client: &str,
        port: Option<u16>,
    ) -> Result<FlowView, CoreError> {
        probe::probe(&self.state, self.dp.as_mut(), name, client, port)
    }

    pub fn add_backend(&mut self, service: &str, spec: &BackendSpec) -> Result<Backend, CoreError> {
        let b = self.change(|s| s.add_backend(service, spec))?;
        info!(service, backend = %b.addr, id = b.id, weight = b.weight, "backend added");
        Ok(b)
    }

    pub fn set_backend(
        &mut self,
        service: &str,
        addr: &str,
        update: &BackendUpdate,
    ) -> Result<Backend, CoreError> {
        let b = self.change(|s| s.set_backend(service, addr, update))?;
        info!(service, backend = %b.addr, weight = b.weight, state = %b.state, "backend changed");
        Ok(b)
    }

    pub fn del_backend(&mut self, service: &str, addr: &str) -> Result<Backend, CoreError> {
        let b = self.change(|s| s.del_backend(service, addr))?;
        info!(service, backend = %b.addr, id = b.id, "backend deleted; established flows finish");
        Ok(b)
    }

    /// Takes a round of next-hop results and the interface's default outer
    /// source, logs what changed, and writes the backends that changed.
    pub fn update_hops(
        &mut self,
        results: BTreeMap<IpAddr, Result<Hop, String>>,
        default_src: DefaultSrc,
    ) -> Result<(), DataplaneError> {
        if default_src != self.default_src || !self.src_known {
            let first = !self.src_known;
            if first || default_src.v4 != self.default_src.v4 {
                match default_src.v4 {
                    Some(src) => info!(%src, "default ipv4 outer source address"),
                    None => warn!(
                        "the interface has no ipv4 address: an ipv4 backend without a resolved \
                         route gets no outer source address"
                    ),
                }
            }
            if first || default_src.v6 != self.default_src.v6 {
                match default_src.v6 {
                    Some(src) => info!(%src, "default ipv6 outer source address"),
                    // Most hosts serve IPv4 only: not worth a warning.
                    None => info!(
                        "the interface has no global ipv6 address: an ipv6 backend without a \
                         resolved route gets no outer source address"
                    ),
                }
            }
            self.default_src = default_src;
            self.src_known = true;
        }
        for (addr, r) in results {
            match r {
                Ok(hop) => {
                    let old = self.hops.insert(addr, hop);
                    if self.hop_errors.remove(&addr).is_some() || old != Some(hop) {
                        log_hop(addr, &hop, old.as_ref());
                    }
                }
                Err(e) => {
                    self.hops.remove(&addr);
                    if self.hop_errors.get(&addr) != Some(&e) {
                        warn!(backend = %addr, error = %e, "next hop unresolved; the program uses the kernel FIB for it");
                        self.hop_errors.insert(addr, e);
                    }
                }
            }
        }
        let live = self.state.backend_addrs();
        self.hops.retain(|a, _| live.contains(a));
        self.hop_errors.retain(|a, _| live.contains(a));
        self.sync()
    }

    /// The next hops in use: (ifindex, neighbour).
    pub fn vias(&self) -> BTreeSet<(u32, IpAddr)> {
        self.hops.values().map(|h| (h.ifindex, h.via)).collect()
    }

    /// Counters, per service and backend, summed over CPUs.
    pub fn stats(&self) -> Result<StatsView, DataplaneError> {
        let sids: Vec<u32> = self.state.services.iter().map(|s| s.id).collect();
        let bids: Vec<u32> = self
            .state
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let c = self.dp.counters(&sids, &bids)?;
        let counters = Counter::ALL
            .iter()
            .map(|k| {
                (
                    k.name().to_string(),
                    c.global.get(*k as usize).copied().unwrap_or(0),
                )
            })
            .collect();
        let drops = DropReason::ALL
            .iter()
            .map(|k| {
                (
                    k.name().to_string(),
                    c.drops.get(*k as usize).copied().unwrap_or(0),
                )
            })
            .collect();
        let h = self.plan_health();
        let services = self
            .state
            .services
            .iter()
            .map(|s| {
                let t = c.services.get(&s.id).copied().unwrap_or_default();
                ServiceStats {
                    name: s.name.clone(),
                    id: s.id,
                    vip: s.vip,
                    proto: s.proto,
                    panic: self.in_panic(s.id),
                    packets: t.packets,
                    bytes: t.bytes,
                    new_flows: t.new_flows,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| {
                            let t = c.backends.get(&b.id).copied().unwrap_or_default();
                            BackendStats {
                                addr: b.addr,
                                id: b.id,
                                state: b.state,
                                weight: b.weight,
                                in_table: plan::effective(s, b, &h).1,
                                health: self.health_of(b.id),
                                packets: t.packets,
                                bytes: t.bytes,
                                new_flows: t.new_flows,
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(StatsView {
            counters,
            drops,
            services,
        })
    }
}

fn log_changes(changes: &[Change], what: &str) {
    if changes.is_empty() {
        info!("desired state {what}: no changes");
    }
    for c in changes {
        info!(change = %c, "desired state {what}");
    }
}

fn map_addr(a: &[u8; 16]) -> IpAddr {
    match lb_common::v4_unmapped(a) {
        Some(v4) => IpAddr::from(v4),
        None => IpAddr::from(*a),
    }
}

fn log_hop(addr: IpAddr, hop: &Hop, old: Option<&Hop>) {
    let mac = hop.dst_mac.map(|m| nexthop::format_mac(&m));
    match (&mac, old) {
        (Some(mac), _) => info!(
            backend = %addr, via = %hop.via, ifindex = hop.ifindex, mac = %mac,
            mtu = hop.mtu, src = %hop.outer_src, "next hop resolved"
        ),
        (None, _) => info!(
            backend = %addr, via = %hop.via, ifindex = hop.ifindex,
            "neighbour not resolved yet; the kernel is resolving it"
        ),
    }
}

/// Where next hops come from: netlink in the daemon, a table in tests.
pub trait HopSource: Send + Sync + 'static {
    fn resolve(&self, addr: IpAddr) -> impl Future<Output = Result<Hop, String>> + Send;
    /// The daemon no longer uses this neighbour.
    fn release(&self, ifindex: u32, via: IpAddr) -> impl Future<Output = ()> + Send;
}

impl HopSource for Resolver {
    async fn resolve(&self, addr: IpAddr) -> Result<Hop, String> {
        Resolver::resolve(self, addr)
            .await
            .map(Hop::from)
            .map_err(|e| error_chain(&e))
    }

    async fn release(&self, ifindex: u32, via: IpAddr) {
        if let Err(e) = Resolver::release(self, ifindex, via).await {
            debug!(%via, ifindex, error = %error_chain(&e), "releasing neighbour failed");
        }
    }
}

/// `error: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Shared between the API handlers and the daemon's tasks.
pub struct Shared {
    pub core: Mutex<Core>,
    /// Ask the resolver to run now (a backend was added).
    pub poke: Notify,
    /// Set to true to stop the daemon.
    pub shutdown: watch::Sender<bool>,
}

impl Shared {
    pub fn new(core: Core) -> Arc<Shared> {
        Arc::new(Shared {
            core: Mutex::new(core),
            poke: Notify::new(),
            shutdown: watch::channel(false).0,
        })
    }
}

/// The interface's first address of each family, for backends whose route
/// gives none (the outer source must always be set).
fn default_src(iface: &str) -> DefaultSrc {
    DefaultSrc::from_addrs(&host::interface_addrs(iface).unwrap_or_default())
}

/// One round: resolve every backend, hand the results to the core, release
/// neighbours no longer used. Returns whether some neighbour is unresolved.
async fn resolve_round<S: HopSource>(
    shared: &Shared,
    src: &S,
    iface: &str,
    in_use: &mut BTreeSet<(u32, IpAddr)>,
) -> bool {
    let addrs = shared.core.lock().await.state().backend_addrs();
    let mut results = BTreeMap::new();
    for a in addrs {
        results.insert(a, src.resolve(a).await);
    }
    let pending = results
        .values()
        .any(|r| !matches!(r, Ok(h) if h.dst_mac.is_some()));
    let vias = {
        let mut core = shared.core.lock().await;
        if let Err(e) = core.update_hops(results, default_src(iface)) {
            warn!(error = %error_chain(&e), "writing next hops failed; retrying");
        }
        core.vias()
    };
    for &(ifindex, via) in in_use.difference(&vias) {
        src.release(ifindex, via).await;
    }
    *in_use = vias;
    pending
}

/// Keeps next hops fresh: on netlink events, when poked, and periodically.
async fn resolve_loop<S: HopSource>(
    shared: Arc<Shared>,
    src: S,
    mut events: Option<mpsc::Receiver<()>>,
    iface: String,
) {
    let mut stop = shared.shutdown.subscribe();
    let mut in_use = BTreeSet::new();
    loop {
        let pending = resolve_round(&shared, &src, &iface, &mut in_use).await;
        let wait = if pending {
            RESOLVE_RETRY
        } else {
            RESOLVE_EVERY
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.poke.notified() => {}
            ev = async {
                match events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if ev.is_none() {
                    warn!("netlink events stopped; next hops are refreshed every {RESOLVE_EVERY:?} only");
                    events = None;
                }
                // Let a burst of events settle.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// Everything `mqlb up` needs, after flags and config file are merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpOptions {
    pub iface: String,
    pub mode: Mode,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// `None`: keep a pinned conntrack's size, else the default.
    pub ct_entries: Option<u32>,
    /// `None`: keep the saved seed.
    pub seed: Option<u32>,
    /// Serve `/metrics` for Prometheus on this TCP address.
    pub metrics: Option<std::net::SocketAddr>,
    /// The services of the `--config` file (it has a `service` key): the
    /// daemon makes its state match them at start, as `mqlb apply` does.
    pub desired: Option<Desired>,
    /// The `--config` file, for messages.
    pub config: Option<PathBuf>,
}

/// `mqlb up --config FILE`: daemon settings (flags win over the file). The
/// file is parsed by [`crate::manifest`], which also takes its services.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub mode: Option<Mode>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub ct_entries: Option<u32>,
    pub seed: Option<u32>,
    pub metrics: Option<std::net::SocketAddr>,
}

/// Errors that stop `mqlb up`.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Host(host::HostError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot use the maps")]
    Dataplane(#[from] DataplaneError),
    #[error("restoring the saved state failed")]
    Restore(#[source] CoreError),
    #[error("applying the services of {} failed", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: Box<CoreError>,
    },
    #[error("cannot open netlink for next hops")]
    Resolver(#[source] nexthop::NextHopError),
    #[error("another mqlb daemon already serves {path}; stop it or pass another --socket")]
    SocketInUse { path: PathBuf },
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("another mqlb daemon already runs for {iface} (it holds {path})")]
    Locked { iface: String, path: PathBuf },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.to_path_buf();
    move |source| DaemonError::Io {
        action,
        path,
        source,
    }
}

/// Binds the API socket: mode 0600, directory created, a stale file replaced.
pub async fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .map_err(io_err("chmod", dir))?;
        }
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(DaemonError::SocketInUse { path: path.into() });
        }
        fs::remove_file(path).map_err(io_err("remove stale", path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_err("listen on", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))?;
    Ok(listener)
}

/// Removes the API socket when the daemon stops, however it stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `mqlb up`: runs until SIGTERM/SIGINT or `mqlb down`.
pub async fn run(opts: UpOptions) -> Result<(), DaemonError> {
    loader::require_root("mqlb up")?;
    let ifindex = host::ifindex(&opts.iface).map_err(DaemonError::Host)?;

    // One daemon per interface: the lock lives as long as this process.
    let store = StateStore::new(&opts.state_dir);
    fs::create_dir_all(store.dir()).map_err(io_err("create", store.dir()))?;
    let lock_path = store.dir().join("lock");
    let lock = fs::File::create(&lock_path).map_err(io_err("create", &lock_path))?;
    if lock.try_lock().is_err() {
        return Err(DaemonError::Locked {
            iface: opts.iface.clone(),
            path: lock_path,
        });
    }

    let state = match store.load()? {
        Some(s) => {
            info!(
                path = %store.path().display(), services = s.services.len(),
                "restoring saved state"
            );
            s
        }
        None => {
            info!(path = %store.path().display(), "no saved state; starting empty");
            State::default()
        }
    };

    // Bound early so a second daemon on the same socket fails before it
    // touches the interface; requests wait in the backlog until we serve.
    let listener = bind_socket(&opts.socket).await?;
    let _socket = RemoveOnDrop(opts.socket.clone());
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(
            crate::metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };

    if loader::ensure_bpffs()? {
        info!("mounted bpffs at {}", loader::BPFFS);
    }
    let mut loaded = loader::load_lb(
        crate::programs::LB_OBJECT,
        crate::programs::LB_PROGRAM,
        &opts.iface,
        opts.mode,
        opts.ct_entries,
    )?;
    info!(
        iface = %opts.iface, prog_id = loaded.prog_id, ct_entries = loaded.ct_entries,
        pins = %loaded.pins.root.display(), "XDP program {}", loaded.attached
    );
    if loaded.attached == Attached::Replaced && opts.mode != Mode::Auto {
        info!(
            "--mode {} does not apply to an existing link; `mqlb down` first to change it",
            opts.mode
        );
    }

    for c in host::ensure_dsr_sysctls(&opts.iface).map_err(DaemonError::Host)? {
        info!(sysctl = %c.key, from = %c.from, to = %c.to, "changed sysctl for the DSR path");
    }

    let dp = KernelDataplane::new(&mut loaded.ebpf)?;
    let status = StatusView {
        iface: opts.iface.clone(),
        ifindex,
        pid: std::process::id(),
        attached: loaded.attached,
        prog_id: loaded.prog_id,
        ct_entries: loaded.ct_entries,
        pins: loaded.pins.root.clone(),
        state_file: store.path(),
        socket: opts.socket.clone(),
        ..StatusView::default()
    };
    let mut core = Core::new(state, store, Box::new(dp), status)?;
    if let Some(desired) = &opts.desired {
        // The flag's seed wins over the file's (see `cli::up_options`).
        let desired = Desired {
            seed: opts.seed.or(desired.seed),
            ..desired.clone()
        };
        core.apply_at_start(&desired)
            .map_err(|source| DaemonError::Config {
                path: opts.config.clone().unwrap_or_default(),
                source: Box::new(source),
            })?;
    } else if let Some(seed) = opts.seed {
        core.set_seed(seed).map_err(DaemonError::Restore)?;
    }
    let shared = Shared::new(core);

    // Resolve every backend before the first write, so restored backends
    // keep their cached next hop instead of falling back to the FIB.
    let resolver = Resolver::new().await.map_err(DaemonError::Resolver)?;
    let events = resolver.subscribe();
    let mut in_use = BTreeSet::new();
    resolve_round(&shared, &resolver, &opts.iface, &mut in_use).await;
    shared
        .core
        .lock()
        .await
        .sync()
        .map_err(|e| DaemonError::Restore(CoreError::Dataplane(e)))?;
    let resolver_task = tokio::spawn(resolve_loop(
        shared.clone(),
        resolver,
        Some(events),
        opts.iface.clone(),
    ));

    let health_task = tokio::spawn(health::run(shared.clone()));
    let metrics_tasks = metrics_listener.map(|listener| {
        let ct = Arc::new(crate::metrics::CtCount::default());
        let pin = loaded.pins.map(lb_common::names::CT4);
        (
            tokio::spawn(crate::metrics::count_conntrack(
                pin,
                loaded.ct_entries,
                ct.clone(),
            )),
            tokio::spawn(crate::metrics::serve(listener, shared.clone(), ct)),
        )
    });

    info!(socket = %opts.socket.display(), "serving the API");
    let mut stop = shared.shutdown.subscribe();
    let signals = {
        let shared = shared.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => info!("SIGINT"),
                _ = stop.changed() => info!("stop requested by `mqlb down`"),
            }
            shared.shutdown.send_replace(true);
        }
    };
    let served = axum::serve(listener, crate::api::router(shared.clone()))
        .with_graceful_shutdown(signals)
        .await;
    resolver_task.abort();
    health_task.abort();
    if let Some((count, serve)) = metrics_tasks {
        count.abort();
        serve.abort();
    }
    served.map_err(io_err("serve on", &opts.socket))?;
    info!(
        iface = %opts.iface,
        "stopped; the XDP program stays attached and the maps stay pinned (`mqlb down` detaches)"
    );
    drop(lock);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dataplane::MemDataplane, state::Proto};

    pub(crate) fn core_in(dir: &Path, dp: MemDataplane) -> Core {
        Core::new(
            State::default(),
            StateStore::new(dir),
            Box::new(dp),
            StatusView::default(),
        )
        .unwrap()
    }

    fn amqp() -> ServiceSpec {
        ServiceSpec {
            name: "amqp".into(),
            vip: "10.0.0.10:5672".into(),
            proto: Proto::Tcp,
            hash: Default::default(),
            udp_idle_s: None,
            ring_size: Some(13),
            health: Default::default(),
        }
    }

    #[test]
    fn changes_are_saved_before_the_maps_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = core_in(
            dir.path(),
            MemDataplane {
                fail_at: Some(0),
                ..Default::default()
            },
        );
        let err = core.add_service(&amqp()).unwrap_err();
        assert!(matches!(err, CoreError::Dataplane(_)), "{err}");
        assert_eq!(err.status(), 500);
        let saved = StateStore::new(dir.path()).load().unwrap().unwrap();
        assert_eq!(saved.services.len(), 1, "saved although the maps failed");
        assert!(core.resync);
    }

    #[test]
    fn refused_changes_are_not_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = core_in(dir.path(), MemDataplane::default());
        core.add_service(&amqp()).unwrap();
        let before = fs::read(StateStore::new(dir.path()).path()).unwrap();
        let err = core.add_service(&amqp()).unwrap_err();
        assert_eq!(err.status(), 409);
        assert_eq!(
            fs::read(StateStore::new(dir.path()).path()).unwrap(),
            before
        );
    }

    #[test]
    fn a_failed_apply_is_retried_from_the_maps() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = core_in(
            dir.path(),
            MemDataplane {
                fail_at: Some(3),
                ..Default::default()
            },
        );
        core.add_service(&amqp()).unwrap();
        let err = core
            .add_backend(
                "amqp",
                &BackendSpec {
                    addr: "10.0.1.1".into(),
                    weight: None,
                },
            )
            .unwrap_err();
        assert!(matches!(err, CoreError::Dataplane(_)));
        // The map recovers; the next sync completes the job.
        core.dp = Box::new(MemDataplane::default());
        core.sync().unwrap();
        let p = plan(
            &core.state,
            &core.plan_health(),
            &core.hops,
            core.default_src,
            &core.applied,
        );
        assert!(p.is_empty());
        assert_eq!(core.applied.services.values().next().unwrap().ring_size, 13);
    }

    #[test]
    fn orphans_in_the_maps_are_adopted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut dp = MemDataplane::default();
        dp.backends.insert(
            5,
            crate::plan::backend_entry("10.0.1.5".parse().unwrap(), 0, None, Default::default()),
        );
        let core = core_in(dir.path(), dp);
        assert_eq!(core.state().removed[0].id, 5);
        assert_eq!(core.state().removed[0].addr.to_string(), "10.0.1.5");
    }

    #[test]
    fn hop_updates_write_only_changed_backends() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = core_in(dir.path(), MemDataplane::default());
        core.add_service(&amqp()).unwrap();
        core.add_backend(
            "amqp",
            &BackendSpec {
                addr: "10.0.1.1".into(),
                weight: None,
            },
        )
        .unwrap();
        let addr: IpAddr = "10.0.1.1".parse().unwrap();
        let hop = Hop {
            ifindex: 2,
            mtu: 1500,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: Some([2, 0, 0, 0, 0, 2]),
            outer_src: "10.0.0.1".parse().unwrap(),
            via: addr,
        };
        core.update_hops([(addr, Ok(hop))].into(), DefaultSrc::default())
            .unwrap();
        let entry = core.applied.backends[&1];
        assert_eq!(entry.flags, lb_common::backend_flags::NEXTHOP);
        assert_eq!(core.vias(), [(2, addr)].into());
        assert!(core.status().unresolved.is_empty());
        core.update_hops(
            [(addr, Err("no route".into()))].into(),
            DefaultSrc {
                v4: Some("10.0.0.9".parse().unwrap()),
                v6: Some("fd00::9".parse().unwrap()),
            },
        )
        .unwrap();
        let entry = core.applied.backends[&1];
        assert_eq!(entry.flags, 0);
        assert_eq!(entry.outer_src, lb_common::v4_mapped([10, 0, 0, 9]));
        assert_eq!(core.status().unresolved, ["10.0.1.1"]);
    }

    type SharedMem = Arc<std::sync::Mutex<MemDataplane>>;

    /// A core whose maps the test can look into.
    fn core_with_maps(dir: &Path) -> (Core, SharedMem) {
        let mem: SharedMem = Default::default();
        let core = Core::new(
            State::default(),
            StateStore::new(dir),
            Box::new(mem.clone()),
            StatusView::default(),
        )
        .unwrap();
        (core, mem)
    }

    /// `amqp` checked with `check`, with backends 10.0.1.1..=n.
    fn checked(core: &mut Core, n: u8) -> Vec<u32> {
        let mut spec = amqp();
        spec.health.check = Some(health::CheckKind::Amqp);
        core.add_service(&spec).unwrap();
        (1..=n)
            .map(|i| {
                core.add_backend(
                    "amqp",
                    &BackendSpec {
                        addr: format!("10.0.1.{i}"),
                        weight: None,
                    },
                )
                .unwrap()
                .id
            })
            .collect()
    }

    /// The backend ids in the service's live table, as the program sees it.
    fn live_table(mem: &SharedMem, core: &Core) -> BTreeSet<u32> {
        let mem = mem.lock().unwrap();
        let key = crate::plan::service_key(&core.state().services[0]);
        let v = mem.services[&key];
        (v.ring_base..v.ring_base + v.ring_size)
            .map(|i| mem.rings[&i])
            .collect()
    }

    fn map_state(mem: &SharedMem, id: u32) -> u8 {
        mem.lock().unwrap().backends[&id].state
    }

    fn target(core: &Core, id: u32) -> CheckTarget {
        core.check_targets()
            .into_iter()
            .find(|t| t.backend == id)
            .unwrap()
    }

    fn fail() -> ProbeResult {
        ProbeResult::Fail("connect: connection refused".into())
    }

    fn pass() -> ProbeResult {
        ProbeResult::Pass("AMQP Connection.Start (0-9)".into())
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_down_transition_rebuilds_the_table_and_writes_down() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let ids = checked(&mut core, 3);
        let (a, b, c) = (ids[0], ids[1], ids[2]);
        assert_eq!(live_table(&mem, &core), [a, b, c].into());
        assert!(!core.health_of(b).unwrap().checked, "starts up, unchecked");
        let t = target(&core, b);
        assert_eq!(
            t.probe,
            health::Probe::Amqp("10.0.1.2:5672".parse().unwrap())
        );

        let writes = mem.lock().unwrap().writes;
        core.report(&t, fail(), MS);
        core.report(&t, fail(), MS);
        assert_eq!(
            mem.lock().unwrap().writes,
            writes,
            "no transition, no write"
        );
        assert_eq!(live_table(&mem, &core), [a, b, c].into());
        core.report(&t, fail(), MS);
        assert_eq!(
            live_table(&mem, &core),
            [a, c].into(),
            "out of the table at once"
        );
        assert_eq!(map_state(&mem, b), lb_common::backend_state::DOWN);
        assert_eq!(map_state(&mem, a), lb_common::backend_state::ACTIVE);
        let h = core.health_of(b).unwrap();
        assert_eq!(h.status, Status::Down);
        assert_eq!(h.transitions.down, 1);
        assert_eq!(
            h.last_transition.as_deref(),
            Some("3 checks in a row did not pass, last: connect: connection refused")
        );
        let views = core.backend_views("amqp").unwrap();
        assert!(!views[1].in_table && views[0].in_table);
        assert_eq!(core.service_views()[0].in_table, 2);
        assert!(!core.service_views()[0].panic, "2 of 3 up");

        core.report(&t, pass(), MS);
        assert_eq!(
            map_state(&mem, b),
            lb_common::backend_state::DOWN,
            "rise is 2"
        );
        core.report(&t, pass(), MS);
        assert_eq!(live_table(&mem, &core), [a, b, c].into());
        assert_eq!(map_state(&mem, b), lb_common::backend_state::ACTIVE);
        let h = core.health_of(b).unwrap();
        assert_eq!((h.transitions.down, h.transitions.up), (1, 1));
        let stats = core.stats().unwrap();
        assert_eq!(
            stats.services[0].backends[1]
                .health
                .as_ref()
                .unwrap()
                .transitions
                .up,
            1
        );
    }

    #[test]
    fn a_503_drains_without_touching_established_flows() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let ids = checked(&mut core, 2);
        let t = target(&core, ids[0]);
        for _ in 0..3 {
            core.report(&t, ProbeResult::Drain("http 503".into()), MS);
        }
        assert_eq!(live_table(&mem, &core), [ids[1]].into());
        assert_eq!(map_state(&mem, ids[0]), lb_common::backend_state::DRAINING);
        assert_eq!(core.health_of(ids[0]).unwrap().transitions.draining, 1);
    }

    #[test]
    fn panic_mode_routes_over_all_backends() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let ids = checked(&mut core, 4);
        let down = |core: &mut Core, id: u32| {
            let t = target(core, id);
            for _ in 0..3 {
                core.report(&t, fail(), MS);
            }
        };
        down(&mut core, ids[0]);
        down(&mut core, ids[1]);
        assert_eq!(
            live_table(&mem, &core),
            [ids[2], ids[3]].into(),
            "2 of 4: not below 50%"
        );
        assert!(!core.in_panic(1));
        down(&mut core, ids[2]);
        assert!(core.in_panic(1), "1 of 4 is below 50%");
        assert_eq!(live_table(&mem, &core), ids.iter().copied().collect());
        for &id in &ids {
            assert_eq!(map_state(&mem, id), lb_common::backend_state::ACTIVE);
        }
        assert!(core.service_views()[0].panic);
        assert!(core.stats().unwrap().services[0].panic);
        assert_eq!(
            core.health_of(ids[0]).unwrap().status,
            Status::Down,
            "still down"
        );

        // One comes back: 2 of 4, panic over, the down ones leave.
        let t = target(&core, ids[0]);
        core.report(&t, pass(), MS);
        core.report(&t, pass(), MS);
        assert!(!core.in_panic(1));
        assert_eq!(live_table(&mem, &core), [ids[0], ids[3]].into());
        assert_eq!(map_state(&mem, ids[1]), lb_common::backend_state::DOWN);

        // Threshold 0: no panic mode, even with one of four up.
        core.set_service(
            "amqp",
            &ServiceUpdate {
                health: health::HealthSpec {
                    panic_threshold: Some(0),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        down(&mut core, ids[0]);
        assert!(!core.in_panic(1));
        assert_eq!(live_table(&mem, &core), [ids[3]].into());
    }

    #[test]
    fn a_restart_keeps_down_backends_down() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let ids = checked(&mut core, 3);
        let t = target(&core, ids[1]);
        for _ in 0..3 {
            core.report(&t, fail(), MS);
        }
        drop(core);
        // A new daemon: the saved state and the (pinned) maps.
        let state = StateStore::new(dir.path()).load().unwrap().unwrap();
        let mut core = Core::new(
            state,
            StateStore::new(dir.path()),
            Box::new(mem.clone()),
            StatusView::default(),
        )
        .unwrap();
        core.sync().unwrap();
        let h = core.health_of(ids[1]).unwrap();
        assert_eq!((h.status, h.checked), (Status::Down, false));
        assert_eq!(
            h.last_transition.as_deref(),
            Some("down before the daemon restarted")
        );
        assert_eq!(core.health_of(ids[0]).unwrap().status, Status::Up);
        assert_eq!(live_table(&mem, &core), [ids[0], ids[2]].into());
        assert_eq!(map_state(&mem, ids[1]), lb_common::backend_state::DOWN);
        let t = target(&core, ids[1]);
        core.report(&t, pass(), MS);
        core.report(&t, pass(), MS);
        assert_eq!(live_table(&mem, &core).len(), 3);
    }

    #[test]
    fn on_down_keep_leaves_flows_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let ids = checked(&mut core, 3);
        core.set_service(
            "amqp",
            &ServiceUpdate {
                health: health::HealthSpec {
                    on_down: Some(health::OnDown::Keep),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        let t = target(&core, ids[1]);
        for _ in 0..3 {
            core.report(&t, fail(), MS);
        }
        assert_eq!(core.health_of(ids[1]).unwrap().status, Status::Down);
        assert_eq!(live_table(&mem, &core), [ids[0], ids[2]].into());
        assert_eq!(
            map_state(&mem, ids[1]),
            lb_common::backend_state::DRAINING,
            "its flows stay"
        );
        drop(core);
        let state = StateStore::new(dir.path()).load().unwrap().unwrap();
        let mut core = Core::new(
            state,
            StateStore::new(dir.path()),
            Box::new(mem.clone()),
            StatusView::default(),
        )
        .unwrap();
        core.sync().unwrap();
        assert_eq!(core.health_of(ids[1]).unwrap().status, Status::Down);
        assert_eq!(live_table(&mem, &core), [ids[0], ids[2]].into());
        assert_eq!(map_state(&mem, ids[1]), lb_common::backend_state::DRAINING);
        let t = target(&core, ids[1]);
        core.report(&t, pass(), MS);
        core.report(&t, pass(), MS);
        assert_eq!(map_state(&mem, ids[1]), lb_common::backend_state::ACTIVE);
        assert_eq!(live_table(&mem, &core).len(), 3);
    }

    #[test]
    fn results_of_an_outdated_check_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, _mem) = core_with_maps(dir.path());
        let ids = checked(&mut core, 2);
        let old = target(&core, ids[0]);
        core.set_service(
            "amqp",
            &ServiceUpdate {
                health: health::HealthSpec {
                    port: Some(5673),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        for _ in 0..3 {
            core.report(&old, fail(), MS);
        }
        let h = core.health_of(ids[0]).unwrap();
        assert_eq!((h.status, h.checked), (Status::Up, false));
        assert_eq!(
            target(&core, ids[0]).probe,
            health::Probe::Amqp("10.0.1.1:5673".parse().unwrap())
        );
    }

    #[test]
    fn turning_the_check_off_brings_down_backends_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let ids = checked(&mut core, 2);
        let changes = core.subscribe_changes();
        let t = target(&core, ids[0]);
        for _ in 0..3 {
            core.report(&t, fail(), MS);
        }
        assert!(
            !changes.has_changed().unwrap(),
            "health is not a saved change"
        );
        assert_eq!(live_table(&mem, &core), [ids[1]].into());
        let err = core
            .set_service("amqp", &ServiceUpdate::default())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "nothing to change: give a health check option"
        );
        let err = core
            .set_service(
                "amqp",
                &ServiceUpdate {
                    health: health::HealthSpec {
                        interval_ms: Some(500),
                        ..Default::default()
                    },
                },
            )
            .unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(
            StateStore::new(dir.path())
                .load()
                .unwrap()
                .unwrap()
                .services[0]
                .health
                .interval_ms,
            2000,
            "a refused change is not saved"
        );
        core.set_service(
            "amqp",
            &ServiceUpdate {
                health: health::HealthSpec {
                    check: Some(health::CheckKind::None),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        assert!(changes.has_changed().unwrap());
        assert!(core.health_of(ids[0]).is_none());
        assert!(core.check_targets().is_empty());
        assert_eq!(live_table(&mem, &core), ids.iter().copied().collect());
        assert_eq!(map_state(&mem, ids[0]), lb_common::backend_state::ACTIVE);
    }

    fn desired(text: &str) -> Desired {
        manifest::parse("t.toml", text).unwrap().desired().unwrap()
    }

    const TWO: &str = "seed = 3\n[[service]]\nname = \"amqp\"\nvip = \"10.0.0.10:5672\"\n\
                       proto = \"tcp\"\nring_size = 13\ncheck = \"amqp\"\n\
                       backends = [{ ip = \"10.0.1.1\" }, { ip = \"10.0.1.2\" }]\n";

    #[test]
    fn an_apply_is_one_saved_change_and_one_plan() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let changes = core.subscribe_changes();
        let reply = core.apply(&desired(TWO), false).unwrap();
        assert!(reply.applied);
        assert_eq!(reply.changes.len(), 4);
        assert_eq!(*changes.borrow(), 1, "saved once");
        assert_eq!(live_table(&mem, &core), [1, 2].into());
        assert_eq!(core.state().seed, 3);
        assert_eq!(core.check_targets().len(), 2, "the checks follow");
        let saved = StateStore::new(dir.path()).load().unwrap().unwrap();
        assert_eq!(&saved, core.state());

        // Again: nothing to do, nothing saved or written.
        let writes = mem.lock().unwrap().writes;
        let reply = core.apply(&desired(TWO), false).unwrap();
        assert_eq!(reply.changes, []);
        assert_eq!(*changes.borrow(), 1);
        assert_eq!(mem.lock().unwrap().writes, writes);

        // A dry run of a real change: computed, not made.
        let drop_one = TWO.replace(", { ip = \"10.0.1.2\" }", "");
        let reply = core.apply(&desired(&drop_one), true).unwrap();
        assert_eq!(
            reply
                .changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["- backend amqp 10.0.1.2"]
        );
        assert!(!reply.applied);
        assert_eq!(live_table(&mem, &core), [1, 2].into());
        assert_eq!(mem.lock().unwrap().writes, writes);
    }

    #[test]
    fn an_apply_whose_maps_fail_is_saved_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = core_in(
            dir.path(),
            MemDataplane {
                fail_at: Some(2),
                ..Default::default()
            },
        );
        let err = core.apply(&desired(TWO), false).unwrap_err();
        assert!(matches!(err, CoreError::Dataplane(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "the change was saved, but writing the maps failed (the daemon retries)"
        );
        let saved = StateStore::new(dir.path()).load().unwrap().unwrap();
        assert_eq!(saved.services[0].backends.len(), 2, "all of it saved");
        core.dp = Box::new(MemDataplane::default());
        core.sync().unwrap();
        let p = plan(
            &core.state,
            &core.plan_health(),
            &core.hops,
            core.default_src,
            &core.applied,
        );
        assert!(p.is_empty(), "the maps caught up with the saved state");
    }

    #[test]
    fn a_refused_apply_leaves_state_maps_and_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        core.apply(&desired(TWO), false).unwrap();
        let before = core.state().clone();
        let file = fs::read(StateStore::new(dir.path()).path()).unwrap();
        let writes = mem.lock().unwrap().writes;
        let bad = TWO.replace("ring_size = 13", "ring_size = 12");
        let err = core.apply(&desired(&bad), false).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(
            err.to_string(),
            "field ring_size (service amqp): ring size 12 must be a prime number from 3 to 65537"
        );
        assert_eq!(*core.state(), before);
        assert_eq!(fs::read(StateStore::new(dir.path()).path()).unwrap(), file);
        assert_eq!(mem.lock().unwrap().writes, writes);
    }

    #[test]
    fn the_config_files_services_are_saved_at_start_and_written_after() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        let changes = core.apply_at_start(&desired(TWO)).unwrap();
        assert_eq!(changes.len(), 4);
        assert_eq!(mem.lock().unwrap().writes, 0, "no write before next hops");
        assert!(StateStore::new(dir.path()).load().unwrap().is_some());
        core.sync().unwrap();
        assert_eq!(live_table(&mem, &core), [1, 2].into());
    }

    #[test]
    fn config_file_reads_settings() {
        let c: ConfigFile = toml::from_str(
            "mode = \"skb\"\nsocket = \"/tmp/x.sock\"\nct_entries = 4096\nseed = 7\n",
        )
        .unwrap();
        assert_eq!(c.mode, Some(Mode::Skb));
        assert_eq!(c.ct_entries, Some(4096));
        assert!(toml::from_str::<ConfigFile>("colour = 1").is_err());
    }

    fn udp_service(name: &str, vip: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            vip: vip.into(),
            proto: Proto::Udp,
            hash: crate::state::Hash::Rtp,
            udp_idle_s: None,
            ring_size: Some(13),
            health: Default::default(),
        }
    }

    fn backend(core: &mut Core, service: &str, addr: &str) -> u32 {
        core.add_backend(
            service,
            &BackendSpec {
                addr: addr.into(),
                weight: None,
            },
        )
        .unwrap()
        .id
    }

    /// A port-range service and an exact-port one inside it: RANGES counts
    /// the range across a restart and back to 0 on delete; `flow` asks
    /// about one port of the range (default: its lowest) and refuses ports
    /// outside it or taken by the exact-port service.
    #[test]
    fn range_services_keep_the_count_and_answer_flows_per_port() {
        let dir = tempfile::tempdir().unwrap();
        let (mut core, mem) = core_with_maps(dir.path());
        mem.lock().unwrap().outer_src = [10, 0, 0, 1];
        core.add_service(&udp_service("media", "10.0.0.10:5004-5099"))
            .unwrap();
        core.add_service(&udp_service("exact", "10.0.0.10:5010"))
            .unwrap();
        let relay = backend(&mut core, "media", "10.0.1.1");
        let other = backend(&mut core, "exact", "10.0.1.2");
        assert_eq!(mem.lock().unwrap().ranges, 1);
        assert_eq!(mem.lock().unwrap().ranges_writes, [1]);

        let v = core.flow("media", "10.0.0.2:40000", None).unwrap();
        assert_eq!(v.vip.to_string(), "10.0.0.10:5004", "the lowest port");
        assert_eq!(
            (v.backend_id, v.reason),
            (Some(relay), probe::FlowReason::Table)
        );
        let v = core.flow("media", "10.0.0.2:40000", Some(5099)).unwrap();
        assert_eq!(v.vip.to_string(), "10.0.0.10:5099");
        assert_eq!(v.backend_id, Some(relay));
        let v = core.flow("exact", "10.0.0.2:40000", None).unwrap();
        assert_eq!(v.backend_id, Some(other));
        assert!(mem.lock().unwrap().ct.is_empty(), "probes leave no entry");

        let err = |e: CoreError| (e.status(), e.to_string());
        assert_eq!(
            err(core
                .flow("media", "10.0.0.2:40000", Some(5100))
                .unwrap_err()),
            (
                400,
                "port 5100 is not a port of service media (10.0.0.10:5004-5099)".into()
            )
        );
        assert_eq!(
            err(core
                .flow("exact", "10.0.0.2:40000", Some(5011))
                .unwrap_err()),
            (
                400,
                "port 5011 is not a port of service exact (10.0.0.10:5010)".into()
            )
        );
        assert_eq!(
            err(core
                .flow("media", "10.0.0.2:40000", Some(5010))
                .unwrap_err()),
            (
                400,
                "port 5010 of service media belongs to service exact (10.0.0.10:5010): an exact \
                 port wins over a range; ask `mqlb flow exact`"
                    .into()
            )
        );

        // A restarted daemon reads the count back and writes nothing.
        let state = StateStore::new(dir.path()).load().unwrap().unwrap();
        drop(core);
        let writes = mem.lock().unwrap().writes;
        let mut core = Core::new(
            state,
            StateStore::new(dir.path()),
            Box::new(mem.clone()),
            StatusView::default(),
        )
        .unwrap();
        core.sync().unwrap();
        assert_eq!(mem.lock().unwrap().writes, writes);

        // Deleting the range: its entry, then the count, go; the exact stays.
        core.del_service("media").unwrap();
        let m = mem.lock().unwrap();
        assert_eq!((m.ranges, m.ranges_writes.as_slice()), (0, &[1, 0][..]));
        assert_eq!(m.services.len(), 1);
        assert!(m.services.keys().all(|k| k.port_be == 5010u16.to_be()));
    }
}
