//! `mqlb stats --watch`: polls `GET /v1/stats` every interval and shows
//! per-second rates computed from consecutive snapshots.
//!
//! - On a terminal: a full-screen view (alternate screen, redrawn in place,
//!   like `top`); `q`, `Esc` or Ctrl-C quits and restores the terminal, also
//!   on error ([`TermGuard`] restores in `Drop`). When the daemon goes away
//!   the last table stays, an error line shows, and polling continues.
//! - Otherwise: one plain line per service, per backend and for drops each
//!   interval, with a timestamp and no escape codes, until killed; a closed
//!   pipe ends it quietly (exit 0) and a failed poll ends it with the error
//!   (exit 1).
//!
//! Counters are monotonic; one that went down (daemon restart, map reset)
//! shows a rate of 0 for that interval ([`per_second`]).

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use lb_common::{Counter, DropReason};
use ratatui::{
    backend::{Backend, CrosstermBackend},
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Paragraph, Row, Table},
    Frame, Terminal,
};

use crate::{
    api::{BackendStats, ServiceStats, StatsView},
    client::{Client, ClientError},
    health::{HealthView, Status},
};

/// `--interval` when not given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Why `stats --watch` stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the daemon did not answer within {0} s")]
    Timeout(u64),
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Parses `--interval`: `2` (seconds), `500ms`, `1s`, `1m`; 100ms to 1h.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string())?,
    };
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return Err("must be between 100ms and 1h".into());
    }
    Ok(d)
}

/// The per-second increase of a monotonic counter; 0 when it went down
/// (the daemon restarted or the counters were reset) or no time passed.
pub fn per_second(prev: u64, cur: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if cur < prev || secs <= 0.0 {
        return 0.0;
    }
    (cur - prev) as f64 / secs
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub packets: f64,
    pub bytes: f64,
    pub new_flows: f64,
}

/// Per-second rates between two snapshots. A service or backend missing
/// from the older one (just added) has no entry: it shows as `-`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateView {
    /// `Counter` name → packets/s.
    pub counters: BTreeMap<String, f64>,
    /// `DropReason` name → packets/s.
    pub drops: BTreeMap<String, f64>,
    /// Service id → rates.
    pub services: BTreeMap<u32, Rates>,
    /// (service id, backend id) → rates.
    pub backends: BTreeMap<(u32, u32), Rates>,
}

impl RateView {
    pub fn drops_total(&self) -> f64 {
        // Not `sum()`: it starts at -0.0, which prints as `-0.0`.
        self.drops.values().fold(0.0, |a, b| a + b)
    }
}

fn map_rates(
    prev: &BTreeMap<String, u64>,
    cur: &BTreeMap<String, u64>,
    elapsed: Duration,
) -> BTreeMap<String, f64> {
    cur.iter()
        .map(|(k, &v)| {
            let p = prev.get(k).copied().unwrap_or(0);
            (k.clone(), per_second(p, v, elapsed))
        })
        .collect()
}

/// Rates from `prev` to `cur`, `elapsed` apart (pure).
pub fn rates(prev: &StatsView, cur: &StatsView, elapsed: Duration) -> RateView {
    let mut out = RateView {
        counters: map_rates(&prev.counters, &cur.counters, elapsed),
        drops: map_rates(&prev.drops, &cur.drops, elapsed),
        ..Default::default()
    };
    let r = |p: (u64, u64, u64), c: (u64, u64, u64)| Rates {
        packets: per_second(p.0, c.0, elapsed),
        bytes: per_second(p.1, c.1, elapsed),
        new_flows: per_second(p.2, c.2, elapsed),
    };
    for svc in &cur.services {
        // Same id and name: a service deleted and re-added under another
        // name may reuse the id.
        let Some(psvc) = prev
            .services
            .iter()
            .find(|p| p.id == svc.id && p.name == svc.name)
        else {
            continue;
        };
        out.services.insert(
            svc.id,
            r(
                (psvc.packets, psvc.bytes, psvc.new_flows),
                (svc.packets, svc.bytes, svc.new_flows),
            ),
        );
        for b in &svc.backends {
            if let Some(pb) = psvc
                .backends
                .iter()
                .find(|p| p.id == b.id && p.addr == b.addr)
            {
                out.backends.insert(
                    (svc.id, b.id),
                    r(
                        (pb.packets, pb.bytes, pb.new_flows),
                        (b.packets, b.bytes, b.new_flows),
                    ),
                );
            }
        }
    }
    out
}

/// A rate for people: `0`, `12.5`, `340`, `1.2k`, `3.4M`, `5.6G`.
pub fn human(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v < 100.0 {
        return format!("{v:.1}");
    }
    if v < 1000.0 {
        return format!("{v:.0}");
    }
    let mut v = v;
    for unit in ["k", "M", "G", "T"] {
        v /= 1000.0;
        if v < 1000.0 || unit == "T" {
            return format!("{v:.1}{unit}");
        }
    }
    unreachable!()
}

fn health_text(h: Option<&HealthView>) -> String {
    match h {
        None => "-".into(),
        Some(h) if !h.checked && h.status == Status::Up => "unchecked".into(),
        Some(h) => h.status.to_string(),
    }
}

fn state_text(b: &BackendStats) -> String {
    if b.in_table {
        b.state.to_string()
    } else {
        format!("{} (out)", b.state)
    }
}

fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One interval's plain lines: one per service, one per backend, and one
/// for drops, each starting with `ts` (RFC 3339, UTC); rates are per second.
pub fn plain_lines(ts: SystemTime, s: &StatsView, r: &RateView) -> String {
    use std::fmt::Write as _;
    let ts = timestamp(ts);
    let rate = |x: Option<&Rates>| match x {
        Some(x) => format!(
            "pkts/s={:.1} bytes/s={:.1} flows/s={:.1}",
            x.packets, x.bytes, x.new_flows
        ),
        None => "pkts/s=- bytes/s=- flows/s=-".into(),
    };
    let mut out = String::new();
    for svc in &s.services {
        let _ = writeln!(
            out,
            "{ts} service={} vip={}/{} panic={} {}",
            svc.name,
            svc.vip,
            svc.proto,
            if svc.panic { "yes" } else { "no" },
            rate(r.services.get(&svc.id))
        );
        for b in &svc.backends {
            let _ = writeln!(
                out,
                "{ts} service={} backend={} state={} in_table={} weight={} health={} {}",
                svc.name,
                b.addr,
                b.state,
                if b.in_table { "yes" } else { "no" },
                b.weight,
                health_text(b.health.as_ref()),
                rate(r.backends.get(&(svc.id, b.id)))
            );
        }
    }
    let mut drops = format!("{ts} drops/s total={:.1}", r.drops_total());
    for d in DropReason::ALL {
        let v = r.drops.get(d.name()).copied().unwrap_or(0.0);
        if v > 0.0 {
            let _ = write!(drops, " {}={v:.1}", d.name());
        }
    }
    out.push_str(&drops);
    out.push('\n');
    out
}

/// What the full-screen view shows.
#[derive(Clone, Debug, Default)]
pub struct WatchView {
    /// The daemon's socket, for the title.
    pub socket: String,
    pub interval: Duration,
    /// The last snapshot (kept, stale, while the daemon does not answer).
    pub stats: Option<StatsView>,
    /// `None` until two snapshots in a row succeeded.
    pub rates: Option<RateView>,
    /// When `stats` was taken.
    pub updated: Option<SystemTime>,
    /// The last poll's error; cleared by the next success.
    pub error: Option<String>,
}

fn rate_cells(r: Option<&Rates>) -> [String; 3] {
    match r {
        Some(r) => [human(r.packets), human(r.bytes), human(r.new_flows)],
        None => ["-".into(), "-".into(), "-".into()],
    }
}

fn service_row(svc: &ServiceStats, r: Option<&RateView>) -> Vec<String> {
    let [p, b, f] = rate_cells(r.and_then(|r| r.services.get(&svc.id)));
    vec![
        svc.name.clone(),
        format!("{}/{}", svc.vip, svc.proto),
        if svc.panic { "PANIC" } else { "" }.into(),
        String::new(),
        String::new(),
        p,
        b,
        f,
    ]
}

fn backend_row(svc: &ServiceStats, be: &BackendStats, r: Option<&RateView>) -> Vec<String> {
    let [p, b, f] = rate_cells(r.and_then(|r| r.backends.get(&(svc.id, be.id))));
    vec![
        String::new(),
        format!("  {}", be.addr),
        state_text(be),
        be.weight.to_string(),
        health_text(be.health.as_ref()),
        p,
        b,
        f,
    ]
}

const HEADER: [&str; 8] = [
    "SERVICE",
    "VIP / BACKEND",
    "STATE",
    "WEIGHT",
    "HEALTH",
    "PKTS/S",
    "BYTES/S",
    "FLOWS/S",
];

/// Draws one frame of the full-screen view.
pub fn draw(f: &mut Frame, v: &WatchView) {
    let [title, counters, drops, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let updated = v.updated.map(timestamp).unwrap_or_else(|| "-".into());
    f.render_widget(
        Paragraph::new(format!(
            "mqlb stats --watch  {}  every {}  updated {}  (q quits)",
            v.socket,
            humantime::format_duration(v.interval),
            updated
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    let rates = v.rates.as_ref();
    let get = |m: Option<&BTreeMap<String, f64>>, k: &str| match m {
        Some(m) => human(m.get(k).copied().unwrap_or(0.0)),
        None => "-".into(),
    };
    let cs: Vec<String> = Counter::ALL
        .iter()
        .map(|c| format!("{} {}", c.name(), get(rates.map(|r| &r.counters), c.name())))
        .collect();
    f.render_widget(
        Paragraph::new(format!("pkts/s:  {}", cs.join("  "))),
        counters,
    );
    let mut ds = vec![format!(
        "total {}",
        rates.map_or("-".into(), |r| human(r.drops_total()))
    )];
    if let Some(r) = rates {
        ds.extend(DropReason::ALL.iter().filter_map(|d| {
            let x = r.drops.get(d.name()).copied().unwrap_or(0.0);
            (x > 0.0).then(|| format!("{} {}", d.name(), human(x)))
        }));
    }
    f.render_widget(Paragraph::new(format!("drops/s: {}", ds.join("  "))), drops);

    match &v.stats {
        None => f.render_widget(Paragraph::new("waiting for the daemon…"), body),
        Some(s) if s.services.is_empty() => f.render_widget(Paragraph::new("no services"), body),
        Some(s) => {
            let mut rows: Vec<Vec<String>> = Vec::new();
            for svc in &s.services {
                rows.push(service_row(svc, rates));
                for b in &svc.backends {
                    rows.push(backend_row(svc, b, rates));
                }
            }
            let mut widths: Vec<u16> = HEADER.iter().map(|h| h.len() as u16).collect();
            for row in &rows {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count() as u16);
                }
            }
            let table = Table::new(
                rows.into_iter().map(Row::new),
                widths.into_iter().map(Constraint::Length),
            )
            .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::REVERSED)))
            .column_spacing(2);
            // Leave a blank line between the summary and the table.
            let [_, body] =
                Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(body);
            f.render_widget(table, body);
        }
    }
    if let Some(e) = &v.error {
        f.render_widget(
            Paragraph::new(Line::from(format!(
                "error: {e} (retrying every {})",
                humantime::format_duration(v.interval)
            )))
            .style(Style::new().fg(Color::Red)),
            foot,
        );
    }
}

/// Raw mode, alternate screen and a hidden cursor, undone in `Drop` (also
/// when the view stops on an error or a panic unwinds).
pub struct TermGuard;

impl TermGuard {
    pub fn enter() -> std::io::Result<Self> {
        terminal::enable_raw_mode()?;
        let guard = TermGuard;
        execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for TermGuard {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
        let _ = terminal::disable_raw_mode();
    }
}

enum Input {
    Quit,
    Redraw,
}

/// Reads keys on a thread; stopped and joined in `Drop`.
struct KeyReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeyReader {
    fn start(tx: tokio::sync::mpsc::UnboundedSender<Input>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match event::poll(Duration::from_millis(100)) {
                    Ok(false) => continue,
                    Ok(true) => {}
                    Err(_) => {
                        let _ = tx.send(Input::Quit);
                        return;
                    }
                }
                let input = match event::read() {
                    Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => match k.code {
                        KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => Input::Quit,
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            Input::Quit
                        }
                        _ => continue,
                    },
                    Ok(Event::Resize(..)) => Input::Redraw,
                    Ok(_) => continue,
                    Err(_) => Input::Quit,
                };
                let quit = matches!(input, Input::Quit);
                if tx.send(input).is_err() || quit {
                    return;
                }
            }
        });
        KeyReader {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for KeyReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Sample {
    at: Instant,
    stats: StatsView,
}

async fn sample(client: &Client, timeout: Duration) -> Result<Sample, WatchError> {
    let stats = tokio::time::timeout(timeout, client.get::<StatsView>("/v1/stats"))
        .await
        .map_err(|_| WatchError::Timeout(timeout.as_secs().max(1)))??;
    Ok(Sample {
        at: Instant::now(),
        stats,
    })
}

fn poll_timeout(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(2))
}

fn ticker(interval: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// `mqlb stats --watch`: the full-screen view on a terminal, plain lines
/// otherwise.
pub async fn run(client: &Client, interval: Duration) -> Result<(), WatchError> {
    if std::io::stdout().is_terminal() {
        tui(client, interval).await
    } else {
        plain(client, interval, &mut std::io::stdout()).await
    }
}

/// Plain lines to `out` until a write fails; a closed pipe is a quiet end.
pub async fn plain(
    client: &Client,
    interval: Duration,
    out: &mut impl Write,
) -> Result<(), WatchError> {
    let mut tick = ticker(interval);
    tick.tick().await;
    let mut prev = sample(client, poll_timeout(interval)).await?;
    loop {
        tick.tick().await;
        let cur = sample(client, poll_timeout(interval)).await?;
        let r = rates(&prev.stats, &cur.stats, cur.at - prev.at);
        let text = plain_lines(SystemTime::now(), &cur.stats, &r);
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        prev = cur;
    }
}

async fn tui(client: &Client, interval: Duration) -> Result<(), WatchError> {
    let _guard = TermGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    terminal.clear()?;
    let (tx, mut input) = tokio::sync::mpsc::unbounded_channel();
    // Declared after the guard: stops before the terminal is restored.
    let _keys = KeyReader::start(tx);
    let mut view = WatchView {
        socket: client.socket().display().to_string(),
        interval,
        ..Default::default()
    };
    let mut prev: Option<Sample> = None;
    let mut tick = ticker(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => poll_into(client, &mut view, &mut prev).await,
            i = input.recv() => match i {
                Some(Input::Redraw) => {}
                Some(Input::Quit) | None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
        redraw(&mut terminal, &view)?;
    }
    Ok(())
}

async fn poll_into(client: &Client, view: &mut WatchView, prev: &mut Option<Sample>) {
    match sample(client, poll_timeout(view.interval)).await {
        Ok(cur) => {
            view.rates = prev
                .as_ref()
                .map(|p| rates(&p.stats, &cur.stats, cur.at - p.at));
            view.stats = Some(cur.stats.clone());
            view.updated = Some(SystemTime::now());
            view.error = None;
            *prev = Some(cur);
        }
        Err(e) => {
            // Rates across an outage would mislead: start over.
            view.error = Some(crate::daemon::error_chain(&e));
            view.rates = None;
            *prev = None;
        }
    }
}

fn redraw<B: Backend>(terminal: &mut Terminal<B>, view: &WatchView) -> std::io::Result<()> {
    terminal.draw(|f| draw(f, view)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        health::TransitionCounts,
        state::{BackendState, Proto},
    };
    use ratatui::backend::TestBackend;

    fn backend(id: u32, addr: &str, packets: u64, bytes: u64, flows: u64) -> BackendStats {
        BackendStats {
            addr: addr.parse().unwrap(),
            id,
            state: BackendState::Active,
            weight: 100,
            in_table: true,
            health: Some(HealthView {
                status: Status::Up,
                checked: true,
                transitions: TransitionCounts::default(),
                last_transition: None,
                last_transition_unix_s: None,
                last_check: None,
                last_latency_us: None,
            }),
            packets,
            bytes,
            new_flows: flows,
        }
    }

    fn stats(svc: (u64, u64, u64), be: (u64, u64, u64), drop: u64) -> StatsView {
        StatsView {
            counters: [("pass".to_string(), svc.0)].into(),
            drops: [(DropReason::ALL[0].name().to_string(), drop)].into(),
            services: vec![ServiceStats {
                name: "amqp".into(),
                id: 1,
                vip: "10.0.0.10:5672".parse().unwrap(),
                proto: Proto::Tcp,
                panic: false,
                packets: svc.0,
                bytes: svc.1,
                new_flows: svc.2,
                backends: vec![backend(7, "10.1.0.1", be.0, be.1, be.2)],
            }],
        }
    }

    #[test]
    fn per_second_divides_by_elapsed_and_clamps_resets() {
        assert_eq!(per_second(100, 300, Duration::from_secs(2)), 100.0);
        assert_eq!(per_second(100, 100, Duration::from_secs(1)), 0.0);
        assert_eq!(per_second(100, 150, Duration::from_millis(500)), 100.0);
        // A counter that went down (daemon restart): 0, not negative or huge.
        assert_eq!(per_second(1_000, 5, Duration::from_secs(1)), 0.0);
        assert_eq!(per_second(u64::MAX, 0, Duration::from_secs(1)), 0.0);
        assert_eq!(per_second(0, 10, Duration::ZERO), 0.0);
    }

    #[test]
    fn rates_per_service_backend_and_drop() {
        let a = stats((1_000, 100_000, 10), (600, 60_000, 6), 5);
        let b = stats((3_000, 300_000, 30), (1_600, 160_000, 16), 25);
        let r = rates(&a, &b, Duration::from_secs(2));
        assert_eq!(
            r.services[&1],
            Rates {
                packets: 1_000.0,
                bytes: 100_000.0,
                new_flows: 10.0
            }
        );
        assert_eq!(
            r.backends[&(1, 7)],
            Rates {
                packets: 500.0,
                bytes: 50_000.0,
                new_flows: 5.0
            }
        );
        assert_eq!(r.drops[DropReason::ALL[0].name()], 10.0);
        assert_eq!(r.drops_total(), 10.0);
        assert_eq!(r.counters["pass"], 1_000.0);
    }

    #[test]
    fn rates_after_a_reset_are_zero() {
        let before = stats((1_000_000, 9_000_000, 500), (900, 9_000, 9), 100);
        let after = stats((10, 1_000, 1), (5, 500, 1), 0);
        let r = rates(&before, &after, Duration::from_secs(1));
        assert_eq!(r.services[&1], Rates::default());
        assert_eq!(r.backends[&(1, 7)], Rates::default());
        assert_eq!(r.drops_total(), 0.0);
        assert_eq!(r.counters["pass"], 0.0);
    }

    #[test]
    fn new_services_and_backends_have_no_rate_yet() {
        let mut before = stats((1, 1, 1), (1, 1, 1), 0);
        before.services[0].backends.clear();
        let after = stats((2, 2, 2), (2, 2, 2), 0);
        let r = rates(&before, &after, Duration::from_secs(1));
        assert!(r.services.contains_key(&1));
        assert!(!r.backends.contains_key(&(1, 7)));
        // Same id, another name: a different service.
        let mut renamed = after.clone();
        renamed.services[0].name = "other".into();
        let r = rates(&before, &renamed, Duration::from_secs(1));
        assert!(r.services.is_empty());
    }

    #[test]
    fn human_rates() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(12.25), "12.2");
        assert_eq!(human(340.4), "340");
        assert_eq!(human(1_234.0), "1.2k");
        assert_eq!(human(3_400_000.0), "3.4M");
        assert_eq!(human(5.6e9), "5.6G");
    }

    #[test]
    fn interval_parses() {
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn plain_lines_read_well() {
        let a = stats((1_000, 100_000, 10), (600, 60_000, 6), 5);
        let b = stats((3_000, 300_000, 30), (1_600, 160_000, 16), 25);
        let r = rates(&a, &b, Duration::from_secs(2));
        let ts = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let text = plain_lines(ts, &b, &r);
        let d = DropReason::ALL[0].name();
        assert_eq!(
            text,
            format!(
                "2023-11-14T22:13:20Z service=amqp vip=10.0.0.10:5672/tcp panic=no \
                 pkts/s=1000.0 bytes/s=100000.0 flows/s=10.0\n\
                 2023-11-14T22:13:20Z service=amqp backend=10.1.0.1 state=active in_table=yes \
                 weight=100 health=up pkts/s=500.0 bytes/s=50000.0 flows/s=5.0\n\
                 2023-11-14T22:13:20Z drops/s total=10.0 {d}=10.0\n"
            )
        );
        assert!(!text.contains('\x1b'));
        // Without a previous snapshot for a backend: dashes.
        let text = plain_lines(ts, &b, &RateView::default());
        assert!(text.contains("backend=10.1.0.1 state=active in_table=yes weight=100 health=up pkts/s=- bytes/s=- flows/s=-"));
        assert!(text.ends_with("drops/s total=0.0\n"));
    }

    fn screen(view: &WatchView) -> String {
        let mut t = Terminal::new(TestBackend::new(110, 12)).unwrap();
        redraw(&mut t, view).unwrap();
        let buf = t.backend().buffer();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn one_frame_shows_services_backends_and_rates() {
        let a = stats((1_000, 100_000, 10), (600, 60_000, 6), 5);
        let b = stats((3_000, 300_000, 30), (1_600, 160_000, 16), 25);
        let view = WatchView {
            socket: "/run/mqlb/mqlb.sock".into(),
            interval: Duration::from_secs(1),
            rates: Some(rates(&a, &b, Duration::from_secs(2))),
            stats: Some(b),
            updated: Some(SystemTime::UNIX_EPOCH),
            error: None,
        };
        let text = screen(&view);
        assert!(text.contains("amqp"), "{text}");
        assert!(text.contains("10.0.0.10:5672/tcp"), "{text}");
        assert!(text.contains("10.1.0.1"), "{text}");
        assert!(text.contains("PKTS/S"), "{text}");
        // Service 1000 pkts/s, 100 kB/s; backend 500 pkts/s, 50 kB/s.
        assert!(text.contains("1.0k"), "{text}");
        assert!(text.contains("100.0k"), "{text}");
        assert!(text.contains("500"), "{text}");
        assert!(text.contains("50.0k"), "{text}");
        assert!(text.contains("active"), "{text}");
        assert!(
            text.contains(&format!("{} 10.0", DropReason::ALL[0].name())),
            "{text}"
        );
        assert!(!text.contains("error"), "{text}");
    }

    #[test]
    fn a_failed_poll_keeps_the_table_and_shows_the_error() {
        let b = stats((3_000, 300_000, 30), (1_600, 160_000, 16), 25);
        let view = WatchView {
            socket: "/run/mqlb/mqlb.sock".into(),
            interval: Duration::from_secs(1),
            rates: None,
            stats: Some(b),
            updated: Some(SystemTime::UNIX_EPOCH),
            error: Some("mqlb daemon is not running".into()),
        };
        let text = screen(&view);
        assert!(text.contains("10.1.0.1"), "{text}");
        assert!(
            text.contains("error: mqlb daemon is not running (retrying every 1s)"),
            "{text}"
        );
    }
}
