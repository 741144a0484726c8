//! Layer 4: the status page in a real browser. The lab's daemon runs with
//! `--metrics`; traffic flows through the VIP; headless Chromium, inside the
//! LB's namespace, loads `/`, runs its script (`--virtual-time-budget`: the
//! page polls `status.json` a few times) and hands back the DOM it rendered
//! (`--dump-dom`) and a screenshot. The test reads the DOM as a person reads
//! the page: the services and VIPs, every backend with its state and weight,
//! non-zero rates, a chart with points, panic mode; then drains and deletes
//! backends with the CLI and checks the page shows it.
//!
//! Chromium is required (`cargo xtask setup` installs Debian's `chromium`):
//! without it the test fails, it never skips.

use mqlb_tests::conn;
use mqlb_tests::lab::{log_tail, wait_for, Lab, LabConfig, Node};
use mqlb_tests::privileged::require_root;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const AMQP: u16 = 5672;
/// A service whose check fails on every backend (nothing listens): panic mode.
const DEAD: u16 = 5673;
/// `mqlb up --metrics 127.0.0.1:PORT` inside the LB namespace.
const METRICS_PORT: u16 = 9433;
/// How long the page's data gets to show a change (rates need two samples
/// of the daemon's one-second sampler; a check must fail once).
const DEADLINE: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A Chromium run that takes longer is stuck.
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);
/// Virtual milliseconds the page runs before the DOM is taken: three polls.
const VIRTUAL_TIME_MS: u32 = 3000;

#[test]
fn status_page_in_chromium() {
    if !require_root("status_page_in_chromium") {
        return;
    }
    let started = Instant::now();
    let browser = chromium();
    let mut lab = Lab::start(LabConfig {
        backends: 3,
        metrics: Some(METRICS_PORT),
        ..LabConfig::default()
    })
    .unwrap_or_else(|e| panic!("the lab did not start: {e:#}"));
    let url = format!("{}/", lab.metrics_url().expect("metrics are on"));
    let b: Vec<String> = lab.backends.iter().map(|n| n.addr.to_string()).collect();
    let vip = format!("{}:{AMQP}", lab.vip);
    let dead_vip = format!("{}:{DEAD}", lab.vip);

    lab.serve_tcp(AMQP).expect("backend TCP servers");
    cli(
        &lab,
        &["service", "add", "amqp", "--vip", &vip, "--proto", "tcp"],
    );
    cli(&lab, &["backend", "add", "amqp", &b[0], "--weight", "200"]);
    cli(&lab, &["backend", "add", "amqp", &b[1]]);
    cli(&lab, &["backend", "add", "amqp", &b[2]]);
    cli(
        &lab,
        &[
            "service",
            "add",
            "dead",
            "--vip",
            &dead_vip,
            "--proto",
            "tcp",
            "--check",
            "tcp",
            "--check-interval",
            "200ms",
            "--check-timeout",
            "100ms",
            "--fall",
            "1",
        ],
    );
    cli(&lab, &["backend", "add", "dead", &b[0]]);
    cli(&lab, &["backend", "add", "dead", &b[1]]);
    wait_status(&lab, "the amqp service's backends in its table", |s| {
        let svc = service(s, "amqp")?;
        backends(svc)
            .iter()
            .all(|x| x["in_table"] == true)
            .then_some(())
    });
    wait_ring(
        &lab,
        &lab.backends.iter().map(|n| n.addr).collect::<Vec<_>>(),
    );

    let traffic = Traffic::start(&lab, 9);
    // The backends that took a flow, by address.
    let busy_addrs: Vec<String> = traffic
        .backends
        .keys()
        .map(|name| lab.backend_by_name(name).unwrap().addr.to_string())
        .collect();
    wait_status(&lab, "rates of the traffic, panic of `dead`", |s| {
        let amqp = service(s, "amqp")?;
        let dead = service(s, "dead")?;
        let rated = |x: &Value| x["rates"]["packets"].as_f64().is_some_and(|r| r > 0.0);
        let ok = rated(amqp)
            && busy_addrs
                .iter()
                .all(|a| backend(amqp, a).is_some_and(rated))
            && dead["panic"] == true
            && backends(dead).iter().all(|x| x["status"] == "down")
            && s["history"].as_array()?.len() >= 3
            && s["history"]
                .as_array()?
                .iter()
                .any(|p| p["services"].as_f64() > Some(0.0));
        ok.then_some(())
    });

    // 1. The page as it first renders.
    let page = browser.dump_dom(&lab, &url);
    let ctx = || format!("the DOM Chromium rendered:\n{}", page.dom);
    assert_eq!(
        page.attr_of("span", "id", "conn", "data-ok").as_deref(),
        Some("true"),
        "the page reads status.json; {}",
        ctx()
    );
    assert!(
        page.text_of("span", "id", "daemon")
            .is_some_and(|t| t.contains(&lab.lb.iface)),
        "the header names the interface; {}",
        ctx()
    );
    let amqp = page
        .element("section", "data-service", "amqp")
        .unwrap_or_else(|| panic!("no section for service amqp; {}", ctx()));
    assert_eq!(amqp.attr("data-vip"), Some(vip.as_str()), "{}", ctx());
    assert_eq!(amqp.attr("data-panic"), Some("false"), "{}", ctx());
    let heading = amqp.text();
    assert!(
        heading.contains("amqp") && heading.contains(&format!("{vip}/tcp")),
        "the service's name and VIP show: {heading}"
    );
    let rows = amqp.children("tr", "class", "backend");
    assert_eq!(rows.len(), 3, "three backend rows; {}", ctx());
    for (i, addr) in b.iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r.attr("data-backend") == Some(addr))
            .unwrap_or_else(|| panic!("no row for backend {addr}; {}", ctx()));
        assert_eq!(row.attr("data-state"), Some("active"), "{addr}");
        let weight = if i == 0 { "200" } else { "100" };
        assert_eq!(row.attr("data-weight"), Some(weight), "{addr}");
        assert!(
            row.text().contains(addr) && row.text().contains("active"),
            "the row shows its address and state: {}",
            row.text()
        );
        if busy_addrs.contains(addr) {
            // Not new flows/s: the flows were opened before the last sample.
            for cell in ["pps", "bps", "packets"] {
                let v = row.cell(cell);
                assert!(
                    v.is_some_and(|v| v > 0.0),
                    "backend {addr} carries flows, but its {cell} cell is {v:?}: {}",
                    row.html
                );
            }
        }
    }
    let total = amqp
        .children("tr", "class", "service-total")
        .pop()
        .unwrap_or_else(|| panic!("no service total row; {}", ctx()));
    assert!(
        total.cell("pps").is_some_and(|v| v > 0.0),
        "service packets/s: {}",
        total.html
    );
    assert!(
        page.attr_of("div", "id", "svc-pps", "data-value")
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.0),
        "the 'to services packets/s' card; {}",
        ctx()
    );
    assert!(
        page.attr_of("span", "data-counter", "rx", "data-value")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v > 0),
        "received packets since start; {}",
        ctx()
    );
    let capacity = page.attr_of("div", "id", "conntrack", "data-capacity");
    assert!(
        capacity.and_then(|c| c.parse::<u64>().ok()) > Some(0),
        "conntrack capacity shows; {}",
        ctx()
    );

    // The chart: points, and a line above zero.
    let chart = page
        .element("svg", "id", "chart")
        .unwrap_or_else(|| panic!("no chart; {}", ctx()));
    let points: usize = chart.attr("data-points").unwrap().parse().unwrap();
    assert!(points >= 3, "the chart has {points} points; {}", chart.html);
    let line = page
        .element("polyline", "data-series", "services")
        .expect("the services line");
    let ys: Vec<f64> = line
        .attr("points")
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.split_once(',').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(ys.len(), points, "{}", line.html);
    let bottom = ys.iter().cloned().fold(f64::MIN, f64::max);
    assert!(
        ys.iter().any(|&y| y < bottom),
        "the line rises above zero: {}",
        line.html
    );

    // Panic mode and down backends.
    let dead = page
        .element("section", "data-service", "dead")
        .unwrap_or_else(|| panic!("no section for service dead; {}", ctx()));
    assert_eq!(dead.attr("data-panic"), Some("true"), "{}", dead.html);
    assert!(dead.text().contains("PANIC"), "{}", dead.text());
    let rows = dead.children("tr", "class", "backend");
    assert_eq!(rows.len(), 2, "{}", dead.html);
    for row in &rows {
        assert_eq!(row.attr("data-state"), Some("down"), "{}", row.html);
        assert_eq!(row.attr("data-health"), Some("down"), "{}", row.html);
    }

    // 2. An operator drains b2 and deletes b3: the page follows.
    cli(&lab, &["backend", "set", "amqp", &b[1], "--drain"]);
    cli(&lab, &["backend", "del", "amqp", &b[2]]);
    wait_status(&lab, "b2 draining and b3 removed", |s| {
        let amqp = service(s, "amqp")?;
        let ok = backend(amqp, &b[1])?["status"] == "draining"
            && backend(amqp, &b[2])?["status"] == "removed";
        ok.then_some(())
    });
    let page = browser.dump_dom(&lab, &url);
    let amqp = page
        .element("section", "data-service", "amqp")
        .unwrap_or_else(|| panic!("no section for service amqp:\n{}", page.dom));
    let state_of = |addr: &str| {
        amqp.children("tr", "class", "backend")
            .into_iter()
            .find(|r| r.attr("data-backend") == Some(addr))
            .unwrap_or_else(|| panic!("no row for {addr}: {}", amqp.html))
    };
    let (r1, r2, r3) = (state_of(&b[0]), state_of(&b[1]), state_of(&b[2]));
    assert_eq!(r1.attr("data-state"), Some("active"), "{}", r1.html);
    assert_eq!(r2.attr("data-state"), Some("draining"), "{}", r2.html);
    assert_eq!(r2.attr("data-in-table"), Some("false"), "{}", r2.html);
    assert!(r2.text().contains("draining"), "{}", r2.text());
    assert_eq!(r3.attr("data-state"), Some("removed"), "{}", r3.html);
    assert!(r3.text().contains("removed"), "{}", r3.text());

    // 3. A screenshot for people (kept as a test artifact).
    let png = artifacts_dir().join("status-page.png");
    browser.screenshot(&lab, &url, &png);
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000,
        "{} is not a full-page PNG ({} bytes)",
        png.display(),
        bytes.len()
    );
    eprintln!("status page screenshot: {}", png.display());

    let errors = traffic.stop();
    assert_eq!(
        errors,
        Vec::<String>::new(),
        "established flows kept working"
    );
    eprintln!("status page test took {:?}", started.elapsed());
}

/// `mqlb ARGS...` against the lab's daemon; panics with its error.
fn cli(lab: &Lab, args: &[&str]) {
    lab.mqlb(args)
        .unwrap_or_else(|e| panic!("mqlb {}: {e:#}", args.join(" ")));
}

/// Waits until the daemon's live ring for VIP:5672 holds exactly `addrs`.
fn wait_ring(lab: &Lab, addrs: &[Ipv4Addr]) {
    let want: std::collections::BTreeSet<Ipv4Addr> = addrs.iter().copied().collect();
    wait_for("the amqp ring to hold every backend", DEADLINE, || {
        let maps = lab.maps()?;
        let svc = maps.service_v4(lab.vip, AMQP, lb_common::PROTO_TCP)?;
        Ok((maps.ring_members(&svc)? == want).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
}

/// `GET path` from the daemon's metrics listener, inside the LB namespace.
fn http_get(lb: &Node, path: &str) -> anyhow::Result<(String, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    let mut conn = lb.run(move || TcpStream::connect_timeout(&addr, IO_TIMEOUT))??;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: mqlb\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {resp:?}"))?;
    Ok((head.to_string(), body.to_string()))
}

/// Polls `/status.json` until `check` says yes.
fn wait_status<T>(lab: &Lab, what: &str, check: impl Fn(&Value) -> Option<T>) -> T {
    let mut last = Value::Null;
    wait_for(what, DEADLINE, || {
        let (head, body) = http_get(&lab.lb, "/status.json")?;
        anyhow::ensure!(head.starts_with("HTTP/1.0 200"), "{head}\n{body}");
        last = serde_json::from_str(&body)?;
        Ok(check(&last))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nlast status.json: {last:#}\n{}", lab.diagnostics()))
}

fn service<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["services"].as_array()?.iter().find(|x| x["name"] == name)
}

fn backends(svc: &Value) -> &[Value] {
    svc["backends"].as_array().map_or(&[], |v| v.as_slice())
}

fn backend<'a>(svc: &'a Value, addr: &str) -> Option<&'a Value> {
    backends(svc).iter().find(|x| x["addr"] == addr)
}

/// TCP connections from the client through the VIP, each echoing a line
/// every few milliseconds on a thread until stopped.
struct Traffic {
    /// Backend name → connections it took.
    backends: BTreeMap<String, usize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl Traffic {
    fn start(lab: &Lab, n: usize) -> Traffic {
        let conns = conn::open_conns(lab, SocketAddr::from((lab.vip, AMQP)), n);
        let mut backends = BTreeMap::new();
        for c in &conns {
            *backends.entry(c.backend.clone()).or_insert(0) += 1;
        }
        let mut conns: Vec<_> = conns
            .into_iter()
            .map(|c| (c.stream, c.reader, c.backend))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut round = 0u64;
            while !st.load(Ordering::Relaxed) && !conns.is_empty() {
                round += 1;
                conns.retain_mut(|(s, reader, name)| {
                    let mut line = String::new();
                    let ok = s.write_all(format!("ping {round}\n").as_bytes()).is_ok()
                        && reader.read_line(&mut line).is_ok_and(|n| n > 0)
                        && line.starts_with(name.as_str());
                    if !ok {
                        errors.push(format!("flow to {name} broke in round {round}: {line:?}"));
                    }
                    ok
                });
                // Pacing, not synchronisation: a steady few hundred packets/s.
                std::thread::sleep(Duration::from_millis(10));
            }
            errors
        });
        Traffic {
            backends,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the traffic; the flows that broke.
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("traffic thread")
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `target/test-artifacts/` (`$CARGO_TARGET_DIR` if set).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Headless Chromium, run once per page load with a fresh profile.
struct Chromium {
    bin: PathBuf,
}

/// Finds Chromium in `PATH`; fails (never skips) when it is missing.
fn chromium() -> Chromium {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
        .map(|bin| Chromium { bin })
        .unwrap_or_else(|| {
            panic!(
                "chromium is missing (no `chromium` or `chromium-browser` in PATH): the status \
                 page test needs a real browser; run `cargo xtask setup` (it installs Debian's \
                 `chromium`) or `apt-get install chromium`"
            )
        })
}

impl Chromium {
    /// Runs Chromium in the LB's namespace on `url` with `extra` flags;
    /// returns its stdout.
    fn run(&self, lab: &Lab, url: &str, extra: &[String]) -> String {
        let profile = tempfile::Builder::new()
            .prefix("mqlb-chromium-")
            .tempdir()
            .expect("a profile dir");
        let out_path = profile.path().join("stdout");
        let err_path = profile.path().join("stderr");
        let mut cmd = lab.lb.command(&self.bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("data").display()
        ))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .args(extra)
        .arg(url)
        // Nothing of the browser's lands in root's home.
        .env("HOME", profile.path())
        .env("XDG_CONFIG_HOME", profile.path().join("config"))
        .env("XDG_CACHE_HOME", profile.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        // Its own process group, so a stuck browser goes with all its children.
        .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let status = wait_for("Chromium to finish", BROWSER_DEADLINE, || {
            Ok(child.try_wait()?)
        })
        .unwrap_or_else(|e| {
            let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
            let _ = child.wait();
            panic!("{e:#}; its stderr:\n{}", log_tail(&err_path, 30))
        });
        assert!(
            status.success(),
            "chromium on {url} exited with {status}; its stderr:\n{}",
            log_tail(&err_path, 30)
        );
        std::fs::read_to_string(&out_path).expect("chromium's stdout")
    }

    /// The DOM after the page's script ran.
    fn dump_dom(&self, lab: &Lab, url: &str) -> Dom {
        let dom = self.run(lab, url, &["--dump-dom".into()]);
        assert!(
            dom.contains("</html>"),
            "chromium printed no DOM for {url}:\n{dom}"
        );
        Dom { dom }
    }

    fn screenshot(&self, lab: &Lab, url: &str, png: &Path) {
        let _ = std::fs::remove_file(png);
        self.run(lab, url, &[format!("--screenshot={}", png.display())]);
    }
}

/// The serialised DOM, read just enough to find the page's hooks: elements
/// by an attribute, their attributes, cells and text.
struct Dom {
    dom: String,
}

/// One element: its attributes and its HTML up to its closing tag (the
/// page does not nest an element inside one of the same name).
struct Element {
    attrs: BTreeMap<String, String>,
    html: String,
}

impl Dom {
    /// The first `<tag>` whose attribute `key` is `value`.
    fn element(&self, tag: &str, key: &str, value: &str) -> Option<Element> {
        elements(&self.dom, tag)
            .into_iter()
            .find(|e| e.attr(key) == Some(value))
    }

    fn attr_of(&self, tag: &str, key: &str, value: &str, attr: &str) -> Option<String> {
        self.element(tag, key, value)?
            .attr(attr)
            .map(str::to_string)
    }

    fn text_of(&self, tag: &str, key: &str, value: &str) -> Option<String> {
        Some(self.element(tag, key, value)?.text())
    }
}

impl Element {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }

    /// `<tag>` children whose attribute `key` holds the word `word`.
    fn children(&self, tag: &str, key: &str, word: &str) -> Vec<Element> {
        elements(&self.html, tag)
            .into_iter()
            .filter(|e| e.attr(key).is_some_and(|v| v.split(' ').any(|w| w == word)))
            .collect()
    }

    /// The `data-value` of the cell with class `class`.
    fn cell(&self, class: &str) -> Option<f64> {
        self.children("td", "class", class)
            .first()?
            .attr("data-value")?
            .parse()
            .ok()
    }

    /// The text a person reads, tags removed.
    fn text(&self) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in self.html.chars() {
            match c {
                '<' => in_tag = true,
                '>' => {
                    in_tag = false;
                    out.push(' ');
                }
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        unescape(&out.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Every `<tag ...>` in `html`, with its attributes and its HTML up to the
/// next `</tag>`.
fn elements(html: &str, tag: &str) -> Vec<Element> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = html[at..].find(&open) {
        let start = at + i;
        let rest = &html[start + open.len()..];
        at = start + open.len();
        // `<tr` must not match `<track`.
        if !rest.starts_with([' ', '>', '/']) {
            continue;
        }
        let Some(end) = tag_end(rest) else { break };
        let attrs = parse_attrs(&rest[..end]);
        let body_end = html[start..]
            .find(&close)
            .map_or(html.len(), |j| start + j + close.len());
        out.push(Element {
            attrs,
            html: html[start..body_end].to_string(),
        });
    }
    out
}

/// The offset of the `>` that ends a start tag (quoted values may hold `>`).
fn tag_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// `name="value"` pairs as Chromium serialises them (always double quotes).
fn parse_attrs(s: &str) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() && !rest.starts_with('/') {
        let name_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let name = rest[..name_end].to_string();
        rest = &rest[name_end..];
        let value = if let Some(r) = rest.strip_prefix("=\"") {
            let end = r.find('"').unwrap_or(r.len());
            let v = unescape(&r[..end]);
            rest = &r[(end + 1).min(r.len())..];
            v
        } else {
            String::new()
        };
        attrs.insert(name, value);
        rest = rest.trim_start();
    }
    attrs
}
