//! The namespace lab: a client, the load balancer and backends on one L2
//! segment, the DSR path of DESIGN.md for real. Used by `tests/e2e.rs` and by
//! `cargo xtask demo` (the `lab` binary).
//!
//! ```text
//!  netns mqlab-P-N-c ──┐                       ┌── netns mqlab-P-N-b1: 10.X.0.11,
//!  client 10.X.0.2,    │  netns mqlab-P-N-br   │   VIP on lo, `mqlb decap`, servers
//!  VIP/32 via the LB   ├── bridge br0 ─────────┼── mqlab-P-N-b2 (.12), -b3 (.13)
//!  netns mqlab-P-N-l ──┘                       │
//!  LB 10.X.0.1, `mqlb up --iface mlP-Nl`       (VIP 10.X.100.1)
//! ```
//! With [`LabConfig::ipv6`] every node also gets `fd00:X::N/64` (LB ::1,
//! client ::2, backends ::11..) and the IPv6 VIP `fd00:X:100::1` is on each
//! backend's lo, routed by the client via the LB's IPv6 address.
//!
//! Client → VIP goes to the LB (the client's route), the LB's XDP program
//! wraps it in IPIP and sends it back out of the same port (XDP_TX) to the
//! backend, whose `mqlb decap` strips it; the backend answers the client
//! straight from the VIP, so the LB never sees the return path.
//!
//! Every name carries the PID and a per-process counter, so parallel tests
//! and parallel runs never collide: namespaces `mqlab-{pid}-{n}-{role}`,
//! interfaces `ml{pid base36}-{n base36}{role}` (≤ 15 bytes; the daemon pins
//! under `/sys/fs/bpf/mqlb/<iface>/`, so interface names must be unique
//! host-wide), temp dirs `/tmp/mqlb-lab-{pid}-*` (socket, state, logs).
//! Everything is removed on drop, also when a test panics; what a killed run
//! left behind is removed by the next lab (its PID is gone), and its daemon
//! got SIGTERM when it died (parent-death signal).

use crate::netns::{self, command_line, output, Netns};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use lb_common::{
    hash::{flow_hash_v4, flow_hash_v6, ring_slot},
    v4_mapped, v4_unmapped, Backend, Counter, HashMode, ServiceKey, ServiceValue, LAYOUT_VERSION,
    MAX_BACKENDS,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Prefix of every lab namespace (`mqlab-{pid}-...`).
pub const NETNS_PREFIX: &str = "mqlab-";
/// Prefix of every lab interface (`ml{pid36}-...`).
pub const IFACE_PREFIX: &str = "ml";
/// Prefix of every lab's temp dir (`/tmp/mqlb-lab-{pid}-XXXX`: socket, state, logs).
pub const TMP_PREFIX: &str = "mqlb-lab-";
/// Where the daemon pins each interface's program and maps.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mqlb";

/// How long the daemon and decap programs get to come up.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a stopped daemon gets to exit on SIGTERM before SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// XDP attach mode for `mqlb up --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Generic XDP: XDP_TX on a veth works with nothing on the peer.
    Skb,
    /// Driver XDP: the LB veth's peer gets an XDP program (`mqlb decap`)
    /// so XDP_TX frames are delivered, and the client's TX checksum offload
    /// is off (ENV-NOTES "veth and XDP").
    Native,
}

impl XdpMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            XdpMode::Skb => "skb",
            XdpMode::Native => "native",
        }
    }
}

impl std::str::FromStr for XdpMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skb" => Ok(XdpMode::Skb),
            "native" => Ok(XdpMode::Native),
            _ => bail!("unknown XDP mode {s:?}: expected skb or native"),
        }
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Backend namespaces (1..=9).
    pub backends: usize,
    pub mode: XdpMode,
    /// Port of `mqlb up --metrics 127.0.0.1:PORT` (metrics and the status
    /// page, reachable inside the LB namespace: [`Lab::metrics_url`]); `None`: off.
    pub metrics: Option<u16>,
    /// Also an IPv6 plane: `fd00:X::N/64` on every node, the IPv6 VIP
    /// ([`Lab::vip6`]) on the backends' lo and routed by the client via the LB.
    pub ipv6: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            backends: 3,
            mode: XdpMode::Skb,
            metrics: None,
            ipv6: false,
        }
    }
}

/// One host of the lab: a namespace with one veth on the bridge.
#[derive(Debug)]
pub struct Node {
    /// Short role name: `client`, `lb`, `b1`, ...
    pub name: String,
    /// Namespace name (`/run/netns/<ns>`).
    pub ns: String,
    /// Its veth (host-wide unique name).
    pub iface: String,
    /// Its address on the segment (/24).
    pub addr: Ipv4Addr,
    /// Its IPv6 address on the segment (/64), with [`LabConfig::ipv6`].
    pub addr6: Option<Ipv6Addr>,
}

impl Node {
    /// Its IPv6 address; panics in a lab without [`LabConfig::ipv6`].
    pub fn v6(&self) -> Ipv6Addr {
        self.addr6
            .unwrap_or_else(|| panic!("{} has no IPv6 address: start the lab with ipv6", self.name))
    }
}

impl Node {
    /// `/run/netns/<ns>`.
    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.ns)
    }

    /// Runs `f` on a thread inside this node's namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        netns::in_netns(&self.netns_path(), f)
    }

    /// A command that runs `program` inside this node's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// `ip -n <ns> ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        output(Command::new("ip").arg("-n").arg(&self.ns).args(args))
    }

    /// Packets counted by the kernel on this node's veth: (rx, tx).
    pub fn link_packets(&self) -> Result<(u64, u64)> {
        let json = self.ip(&["-j", "-s", "link", "show", "dev", &self.iface])?;
        let v: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("`ip -j -s link` printed no JSON: {json}"))?;
        let stats = &v[0]["stats64"];
        let get = |dir: &str| {
            stats[dir]["packets"]
                .as_u64()
                .ok_or_else(|| anyhow!("no {dir} packets for {} in {json}", self.iface))
        };
        Ok((get("rx")?, get("tx")?))
    }

    /// Whether an XDP program is attached to this node's veth.
    pub fn xdp_attached(&self) -> Result<bool> {
        xdp_attached(&self.ns, &self.iface)
    }
}

fn xdp_attached(ns: &str, iface: &str) -> Result<bool> {
    let json = output(Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", iface]))?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("`ip -j link` printed no JSON: {json}"))?;
    Ok(v[0].get("xdp").is_some())
}

/// A process the lab started (daemon or decap), with its log file.
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
}

/// An XDP decap attachment to undo on drop.
struct Decap {
    ns: String,
    iface: String,
    proc: Proc,
}

/// A running lab. Dropping it stops every process it started (by PID),
/// detaches the programs, deletes the namespaces and the pins.
pub struct Lab {
    /// `{pid}-{n}`, part of every name.
    pub id: String,
    pub mode: XdpMode,
    /// The service address the client routes via the LB.
    pub vip: Ipv4Addr,
    /// The IPv6 service address, with [`LabConfig::ipv6`].
    pub vip6: Option<Ipv6Addr>,
    pub client: Node,
    pub lb: Node,
    pub backends: Vec<Node>,
    mqlb: PathBuf,
    /// `--metrics` port of the daemon, if on.
    metrics: Option<u16>,
    dir: tempfile::TempDir,
    daemon: Option<Proc>,
    decaps: Vec<Decap>,
    servers: Vec<Server>,
    /// Host-wide interface names, for pin cleanup.
    ifaces: Vec<String>,
    /// Dropped last, in reverse order of creation.
    namespaces: Vec<Netns>,
}

/// The `mqlb` binary under test: `$MQLB_BIN` (set by `cargo xtask test`),
/// else `<workspace>/target/debug/mqlb`.
pub fn mqlb_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("MQLB_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mqlb"),
    };
    if !path.is_file() {
        bail!(
            "the mqlb binary is missing at {}: run `cargo build -p lb-user` or set MQLB_BIN \
             (`cargo xtask test` does both)",
            path.display()
        );
    }
    Ok(path)
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Removes what labs of dead processes left behind: namespaces, pins and
/// temp dirs (their names carry the PID of the process that made them).
pub fn remove_stale() {
    for name in netns::remove_stale(NETNS_PREFIX) {
        eprintln!("lab: removed stale namespace {name}");
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(TMP_PREFIX)
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !netns::pid_alive(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(dir) = std::fs::read_dir(PIN_ROOT) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(IFACE_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| u32::from_str_radix(pid, 36).ok())
        else {
            continue;
        };
        if !netns::pid_alive(pid) && std::fs::remove_dir_all(entry.path()).is_ok() {
            eprintln!("lab: removed stale pins {}", entry.path().display());
        }
    }
}

/// An error that ends a [`wait_for`] at once (the process it waits on died).
#[derive(Debug)]
pub struct GiveUp(pub String);

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GiveUp {}

/// Polls `check` until it returns `Ok(Some(v))` or `deadline` passes; the
/// error then names `what` and the last failure. Other errors are retried,
/// except a [`GiveUp`], which ends the wait at once.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("condition never held");
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if e.downcast_ref::<GiveUp>().is_some() => {
                return Err(e.context(format!("while waiting for {what}")))
            }
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Lab {
    /// Builds the topology, starts `mqlb up` on the LB and `mqlb decap` on
    /// every backend, and waits until the daemon answers on its socket.
    pub fn start(cfg: LabConfig) -> Result<Lab> {
        if !(1..=9).contains(&cfg.backends) {
            bail!("a lab has 1 to 9 backends, not {}", cfg.backends);
        }
        let mqlb = mqlb_bin()?;
        remove_stale();
        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{pid}-{n}");
        let ifbase = format!("{IFACE_PREFIX}{}-{}", base36(pid), base36(n));
        // Isolated namespaces could all use one subnet; a per-lab one keeps
        // captures and logs of parallel labs apart.
        let x = ((pid as usize * 7 + n as usize) % 200 + 20) as u8;
        let node = |name: &str, role: &str, host: u8| Node {
            name: name.to_string(),
            ns: format!("{NETNS_PREFIX}{id}-{role}"),
            iface: format!("{ifbase}{role}"),
            addr: Ipv4Addr::new(10, x, 0, host),
            addr6: cfg
                .ipv6
                .then(|| Ipv6Addr::new(0xfd00, x as u16, 0, 0, 0, 0, 0, host as u16)),
        };
        let mut lab = Lab {
            mode: cfg.mode,
            metrics: cfg.metrics,
            vip: Ipv4Addr::new(10, x, 100, 1),
            vip6: cfg
                .ipv6
                .then(|| Ipv6Addr::new(0xfd00, x as u16, 0x100, 0, 0, 0, 0, 1)),
            client: node("client", "c", 2),
            lb: node("lb", "l", 1),
            backends: (1..=cfg.backends)
                .map(|i| node(&format!("b{i}"), &format!("b{i}"), 10 + i as u8))
                .collect(),
            id,
            mqlb,
            dir: tempfile::Builder::new()
                .prefix(&format!("{TMP_PREFIX}{pid}-"))
                .tempdir()
                .context("cannot create the lab's temp dir")?,
            daemon: None,
            decaps: Vec::new(),
            servers: Vec::new(),
            ifaces: Vec::new(),
            namespaces: Vec::new(),
        };
        // On error, dropping `lab` undoes whatever was built so far.
        lab.build().context("building the namespace lab failed")?;
        lab.start_daemon()
            .context("starting `mqlb up` in the lab failed")?;
        lab.start_decaps()
            .context("starting `mqlb decap` on the backends failed")?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let bridge_ns = format!("{NETNS_PREFIX}{}-br", self.id);
        self.namespaces.push(Netns::create(&bridge_ns)?);
        output(
            Command::new("ip").args(["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]),
        )?;
        output(Command::new("ip").args(["-n", &bridge_ns, "link", "set", "br0", "up"]))?;

        let nodes: Vec<&Node> = std::iter::once(&self.client)
            .chain(std::iter::once(&self.lb))
            .chain(self.backends.iter())
            .collect();
        let mut created = Vec::new();
        let mut ifaces = Vec::new();
        for node in &nodes {
            created.push(Netns::create(&node.ns)?);
            let port = format!("{}p", node.iface);
            // Both ends are created directly inside their namespaces.
            output(Command::new("ip").args([
                "link",
                "add",
                &node.iface,
                "netns",
                &node.ns,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &bridge_ns,
            ]))?;
            ifaces.push(node.iface.clone());
            ifaces.push(port.clone());
            output(Command::new("ip").args([
                "-n", &bridge_ns, "link", "set", &port, "master", "br0", "up",
            ]))?;
            node.ip(&[
                "addr",
                "add",
                &format!("{}/24", node.addr),
                "dev",
                &node.iface,
            ])?;
            if let Some(a6) = node.addr6 {
                // nodad: usable at once (no 1-2 s of tentative state).
                node.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{a6}/64"),
                    "dev",
                    &node.iface,
                    "nodad",
                ])?;
            }
            node.ip(&["link", "set", &node.iface, "up"])?;
        }
        self.namespaces.extend(created);
        self.ifaces = ifaces;

        // Client: the VIP lives behind the LB. TX checksum offload off, or
        // TCP forwarded by XDP arrives with bad checksums (ENV-NOTES).
        self.client.ip(&[
            "route",
            "add",
            &format!("{}/32", self.vip),
            "via",
            &self.lb.addr.to_string(),
        ])?;
        if let (Some(vip6), Some(lb6)) = (self.vip6, self.lb.addr6) {
            self.client.ip(&[
                "-6",
                "route",
                "add",
                &format!("{vip6}/128"),
                "via",
                &lb6.to_string(),
            ])?;
        }
        output(
            self.client
                .command("ethtool")
                .args(["-K", &self.client.iface, "tx", "off"]),
        )?;

        // Backends: the VIP on lo, no reverse-path filter (the inner source
        // is the client, arriving inside IPIP), and no ARP answers or
        // announcements for the VIP (it lives on every backend).
        for b in &self.backends {
            b.ip(&["addr", "add", &format!("{}/32", self.vip), "dev", "lo"])?;
            if let Some(vip6) = self.vip6 {
                // IPv6 answers neighbour solicitations only for addresses of
                // the receiving interface: nothing like arp_ignore needed.
                b.ip(&["-6", "addr", "add", &format!("{vip6}/128"), "dev", "lo"])?;
            }
            let ns = self.netns(&b.ns);
            for key in [
                "net.ipv4.conf.all.rp_filter".to_string(),
                "net.ipv4.conf.default.rp_filter".to_string(),
                "net.ipv4.conf.lo.rp_filter".to_string(),
                format!("net.ipv4.conf.{}.rp_filter", b.iface),
            ] {
                ns.sysctl(&key, "0")?;
            }
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }
        // The LB's sysctls (forwarding, accept_local, send_redirects) are
        // left alone on purpose: DESIGN.md says `mqlb up` sets them itself.
        Ok(())
    }

    fn netns(&self, name: &str) -> &Netns {
        self.namespaces
            .iter()
            .find(|n| n.name() == name)
            .expect("lab namespace exists")
    }

    /// The `mqlb` binary the lab runs.
    pub fn mqlb_path(&self) -> &Path {
        &self.mqlb
    }

    /// `http://127.0.0.1:PORT` of the daemon's metrics and status page when
    /// [`LabConfig::metrics`] is set; it answers inside the LB namespace only.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics.map(|port| format!("http://127.0.0.1:{port}"))
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mqlb.sock")
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's log file (stdout and stderr).
    pub fn daemon_log(&self) -> PathBuf {
        self.dir.path().join("mqlbd.log")
    }

    fn spawn(&self, what: &str, cmd: Command, log_name: &str) -> Result<Proc> {
        let log = self.dir.path().join(log_name);
        let (child, line) = spawn_logged(cmd, &log)?;
        Ok(Proc {
            what: format!("{what} (`{line}`)"),
            child,
            log,
        })
    }

    /// Starts `mqlb up` in the LB namespace and waits until it answers on
    /// its socket with the program attached.
    pub fn start_daemon(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.state_dir())?;
        let mut cmd = self.lb.command(&self.mqlb);
        cmd.arg("up")
            .args(["--iface", &self.lb.iface])
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--mode", self.mode.as_arg()]);
        if let Some(port) = self.metrics {
            cmd.args(["--metrics", &format!("127.0.0.1:{port}")]);
        }
        let proc = self.spawn("mqlb daemon", cmd, "mqlbd.log")?;
        self.daemon = Some(proc);
        let socket = self.socket();
        wait_for("the daemon to answer on its socket", START_DEADLINE, || {
            let proc = self.daemon.as_mut().expect("daemon started");
            if let Some(status) = proc.child.try_wait()? {
                return Err(GiveUp(format!(
                    "{} exited with {status}; its log:\n{}",
                    proc.what,
                    log_tail(&proc.log, 40)
                ))
                .into());
            }
            if !socket.exists() {
                bail!("{} does not exist yet", socket.display());
            }
            output(
                Command::new(&self.mqlb)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["service", "list", "--json"]),
            )?;
            if !self.lb.xdp_attached()? {
                bail!("no XDP program on {} yet", self.lb.iface);
            }
            Ok(Some(()))
        })
        .map_err(|e| {
            if e.downcast_ref::<GiveUp>().is_some() {
                e // already quotes the log
            } else {
                anyhow!("{e:#}\ndaemon log:\n{}", log_tail(&self.daemon_log(), 40))
            }
        })
    }

    fn start_decaps(&mut self) -> Result<()> {
        let mut targets: Vec<(String, String, PathBuf)> = self
            .backends
            .iter()
            .map(|b| (b.ns.clone(), b.iface.clone(), b.netns_path()))
            .collect();
        if self.mode == XdpMode::Native {
            // Native XDP_TX into a veth is delivered only when the peer has
            // an XDP program; decap passes everything not addressed to it.
            let ns = format!("{NETNS_PREFIX}{}-br", self.id);
            let path = netns::netns_path(&ns);
            targets.push((ns, format!("{}p", self.lb.iface), path));
        }
        for (ns, iface, path) in targets {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", path.display()))
                .arg("--")
                .arg(&self.mqlb)
                .args(["decap", "--iface", &iface, "--mode", self.mode.as_arg()]);
            let proc = self.spawn("mqlb decap", cmd, &format!("decap-{iface}.log"))?;
            self.decaps.push(Decap {
                ns: ns.clone(),
                iface: iface.clone(),
                proc,
            });
            let decap = self.decaps.last_mut().expect("just pushed");
            // `mqlb decap` may attach and exit, or stay in the foreground:
            // either way it is ready once the program is on the interface.
            wait_for(&format!("`mqlb decap` on {iface}"), START_DEADLINE, || {
                if let Some(status) = decap.proc.child.try_wait()? {
                    if !status.success() {
                        return Err(GiveUp(format!(
                            "{} exited with {status}; its log:\n{}",
                            decap.proc.what,
                            log_tail(&decap.proc.log, 40)
                        ))
                        .into());
                    }
                }
                Ok(xdp_attached(&ns, &iface)?.then_some(()))
            })?;
        }
        Ok(())
    }

    /// Kills the daemon with SIGKILL (no chance to clean up), checks the
    /// program is still attached, then starts a new daemon on the same
    /// interface, socket and state directory, as an operator would.
    pub fn kill9_and_restart_daemon(&mut self) -> Result<()> {
        self.kill9_daemon()?;
        // The dead daemon could not remove its socket: the new one must cope.
        self.start_daemon()
    }

    /// Stops the daemon with SIGTERM, as `systemctl stop` or the first half
    /// of an upgrade does, waits for it to exit and checks the program stayed
    /// attached. [`Lab::start_daemon`] starts the next one (an upgrade is the
    /// new binary started on the same interface, socket and state).
    pub fn stop_daemon(&mut self) -> Result<()> {
        let mut proc = self.daemon.take().context("no daemon to stop")?;
        let pid = Pid::from_raw(proc.child.id() as i32);
        kill(pid, Signal::SIGTERM).context("SIGTERM the daemon")?;
        let status = proc.child.wait().context("reap the daemon")?;
        if !status.success() {
            bail!(
                "the daemon exited with {status} on SIGTERM; its log:\n{}",
                log_tail(&proc.log, 40)
            );
        }
        if !self.lb.xdp_attached()? {
            bail!("the XDP program was detached when the daemon stopped");
        }
        self.rotate_daemon_log();
        Ok(())
    }

    /// Kills the daemon with SIGKILL and checks the program stayed attached;
    /// [`Lab::start_daemon`] starts the next one.
    pub fn kill9_daemon(&mut self) -> Result<()> {
        let mut proc = self.daemon.take().context("no daemon to kill")?;
        proc.child.kill().context("SIGKILL the daemon")?;
        proc.child.wait().context("reap the daemon")?;
        if !self.lb.xdp_attached()? {
            bail!("the XDP program was detached when the daemon died");
        }
        self.rotate_daemon_log();
        Ok(())
    }

    /// Keeps the last daemon's log beside the next one's (`mqlbd.log.N`).
    fn rotate_daemon_log(&self) {
        let log = self.daemon_log();
        let n = (1..)
            .find(|n| !log.with_extension(format!("log.{n}")).exists())
            .unwrap_or(1);
        let _ = std::fs::rename(&log, log.with_extension(format!("log.{n}")));
    }

    /// The id of the XDP program on the LB's interface.
    pub fn lb_prog_id(&self) -> Result<u64> {
        let json = self.lb.ip(&["-j", "link", "show", "dev", &self.lb.iface])?;
        let v: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("`ip -j link` printed no JSON: {json}"))?;
        let xdp = &v[0]["xdp"];
        xdp["prog"]["id"]
            .as_u64()
            .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
            .ok_or_else(|| anyhow!("no XDP program id on {} in {json}", self.lb.iface))
    }

    /// The kernel's id of the map the daemon pinned as `name`.
    pub fn pinned_map_id(&self, name: &str) -> Result<u64> {
        let path = LbMaps::pin_dir(&self.lb.iface).join(name);
        let json = output(
            Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&path),
        )?;
        let v: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("`bpftool map show` printed no JSON: {json}"))?;
        v["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("no map id for {} in {json}", path.display()))
    }

    /// `mqlb --socket S ARGS...` (the CLI, from the test's namespace: it
    /// only talks to the socket); its stdout.
    pub fn mqlb(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new(&self.mqlb)
                .arg("--socket")
                .arg(self.socket())
                .args(args),
        )
    }

    /// `mqlb service add NAME --vip VIP:PORT --proto P [--hash H]`.
    pub fn add_service(
        &self,
        name: &str,
        port: u16,
        proto: &str,
        hash: Option<&str>,
    ) -> Result<()> {
        self.add_service_at(name, SocketAddr::from((self.vip, port)), proto, hash)
    }

    /// `mqlb service add NAME --vip [VIP6]:PORT --proto P [--hash H]`.
    pub fn add_service6(
        &self,
        name: &str,
        port: u16,
        proto: &str,
        hash: Option<&str>,
    ) -> Result<()> {
        self.add_service_at(name, SocketAddr::from((self.vip6()?, port)), proto, hash)
    }

    /// `mqlb service add NAME --vip VIP --proto P [--hash H]` (`[ADDR]:PORT`
    /// for IPv6, as `SocketAddr` prints it).
    fn add_service_at(
        &self,
        name: &str,
        vip: SocketAddr,
        proto: &str,
        hash: Option<&str>,
    ) -> Result<()> {
        let vip = vip.to_string();
        let mut args = vec!["service", "add", name, "--vip", &vip, "--proto", proto];
        if let Some(h) = hash {
            args.extend(["--hash", h]);
        }
        self.mqlb(&args).map(drop)
    }

    /// The lab's IPv6 VIP, or an error when it was started without IPv6.
    fn vip6(&self) -> Result<Ipv6Addr> {
        self.vip6
            .context("the lab has no IPv6 VIP: start it with ipv6")
    }

    /// `mqlb backend add SERVICE IP6` for backend `b` (its IPv6 address).
    pub fn add_backend6(&self, service: &str, b: &Node) -> Result<()> {
        let a6 = b.addr6.context("the lab has no IPv6 plane")?;
        self.mqlb(&["backend", "add", service, &a6.to_string()])
            .map(drop)
    }

    /// `mqlb backend add SERVICE IP` for backend `b` (its address).
    pub fn add_backend(&self, service: &str, b: &Node) -> Result<()> {
        self.mqlb(&["backend", "add", service, &b.addr.to_string()])
            .map(drop)
    }

    /// `mqlb stats --json`, parsed.
    pub fn stats_json(&self) -> Result<serde_json::Value> {
        let text = self.mqlb(&["stats", "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("`mqlb stats --json` printed: {text}"))
    }

    /// The backend node with address `addr`.
    pub fn backend_by_addr(&self, addr: Ipv4Addr) -> Option<&Node> {
        self.backends.iter().find(|b| b.addr == addr)
    }

    /// The backend node with address `addr`, IPv4 or IPv6.
    pub fn backend_by_ip(&self, addr: IpAddr) -> Option<&Node> {
        self.backends.iter().find(|b| match addr {
            IpAddr::V4(a) => b.addr == a,
            IpAddr::V6(a) => b.addr6 == Some(a),
        })
    }

    /// The backend node named `name` (`b1`, ...).
    pub fn backend_by_name(&self, name: &str) -> Option<&Node> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The daemon's pinned maps (read-only use).
    pub fn maps(&self) -> Result<LbMaps> {
        LbMaps::open(&self.lb.iface)
    }

    /// Starts a TCP server on `VIP:port` in every backend: on connect it
    /// writes `HELLO <name> <its local addr> <client addr>`; every line
    /// `L` gets `<name> L` back; `BULK n` then n bytes gets
    /// `<name> BULK n <fnv1a64 hex>`.
    pub fn serve_tcp(&mut self, port: u16) -> Result<()> {
        self.serve_tcp_at(SocketAddr::from((self.vip, port)))
    }

    /// [`Lab::serve_tcp`] on `[VIP6]:port`.
    pub fn serve_tcp6(&mut self, port: u16) -> Result<()> {
        self.serve_tcp_at(SocketAddr::from((self.vip6()?, port)))
    }

    fn serve_tcp_at(&mut self, addr: SocketAddr) -> Result<()> {
        for b in &self.backends {
            let listener = b
                .run(move || TcpListener::bind(addr))?
                .with_context(|| format!("cannot listen on {addr} in {}", b.ns))?;
            self.servers.push(Server::tcp(b.name.clone(), listener)?);
        }
        Ok(())
    }

    /// [`Lab::serve_udp`] on `[VIP6]:port`.
    pub fn serve_udp6(&mut self, port: u16) -> Result<()> {
        self.serve_udp_at(SocketAddr::from((self.vip6()?, port)))
    }

    /// Starts a UDP server on `VIP:port` in every backend, bound to the VIP
    /// so replies leave from it: each datagram `P` gets `<name> <client addr> P`.
    pub fn serve_udp(&mut self, port: u16) -> Result<()> {
        self.serve_udp_at(SocketAddr::from((self.vip, port)))
    }

    fn serve_udp_at(&mut self, addr: SocketAddr) -> Result<()> {
        for b in &self.backends {
            let socket = b
                .run(move || UdpSocket::bind(addr))?
                .with_context(|| format!("cannot bind {addr} in {}", b.ns))?;
            self.servers.push(Server::udp(b.name.clone(), socket)?);
        }
        Ok(())
    }

    /// Daemon log and stats, for a failure message.
    pub fn diagnostics(&self) -> String {
        let stats = self
            .mqlb(&["stats", "--json"])
            .unwrap_or_else(|e| format!("(stats failed: {e:#})"));
        // What `mqlb up` sets on its interface (the lab does not).
        let lb_sysctls: Vec<String> = ["forwarding", "accept_local", "send_redirects", "rp_filter"]
            .iter()
            .map(|leaf| {
                let k = format!("net.ipv4.conf.{}.{leaf}", self.lb.iface);
                let v = self
                    .netns(&self.lb.ns)
                    .sysctl_get(&k)
                    .unwrap_or_else(|e| format!("? ({e})"));
                format!("{k}={v}")
            })
            .chain(
                ["forwarding", "accept_ra", "force_forwarding"]
                    .iter()
                    .map(|leaf| {
                        let k = format!("net.ipv6.conf.{}.{leaf}", self.lb.iface);
                        let v = self
                            .netns(&self.lb.ns)
                            .sysctl_get(&k)
                            .unwrap_or_else(|e| format!("? ({e})"));
                        format!("{k}={v}")
                    }),
            )
            .collect();
        format!(
            "LB sysctls: {}\nmqlb stats --json: {stats}\ndaemon log (tail):\n{}",
            lb_sysctls.join(" "),
            log_tail(&self.daemon_log(), 30)
        )
    }

    /// The namespace handle of node `node`.
    pub fn netns_of(&self, node: &Node) -> &Netns {
        self.netns(&node.ns)
    }

    fn stop(&mut self) {
        for s in &self.servers {
            s.stop();
        }
        self.servers.clear();
        if let Some(mut proc) = self.daemon.take() {
            // What a user does: `mqlb down` stops the daemon through its
            // socket and removes the pins; then make sure, by PID.
            let mut down = self.lb.command(&self.mqlb);
            down.arg("--socket")
                .arg(self.socket())
                .args(["down", "--iface", &self.lb.iface]);
            if let Err(e) = output(&mut down) {
                eprintln!("lab cleanup: {e:#}");
            }
            stop_proc(&mut proc);
        }
        for mut d in std::mem::take(&mut self.decaps) {
            stop_proc(&mut d.proc);
            let mut detach = Command::new("nsenter");
            detach
                .arg(format!("--net={}", netns::netns_path(&d.ns).display()))
                .arg("--")
                .arg(&self.mqlb)
                .args(["decap", "--iface", &d.iface, "--detach"]);
            if let Err(e) = output(&mut detach) {
                eprintln!("lab cleanup: {e:#}");
            }
        }
        for iface in &self.ifaces {
            let pins = Path::new(PIN_ROOT).join(iface);
            if pins.exists() {
                if let Err(e) = std::fs::remove_dir_all(&pins) {
                    eprintln!("lab cleanup: cannot remove {}: {e}", pins.display());
                }
            }
        }
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lab {}: a test failed; daemon log (tail):\n{}",
                self.id,
                log_tail(&self.daemon_log(), 40)
            );
        }
        self.stop();
    }
}

/// SIGTERM, a bounded wait, then SIGKILL: only this child, by its PID
/// (it is not reaped before this, so the PID cannot have been reused).
fn stop_proc(proc: &mut Proc) {
    if let Ok(Some(_)) = proc.child.try_wait() {
        return;
    }
    let pid = Pid::from_raw(proc.child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < STOP_DEADLINE {
        if let Ok(Some(_)) = proc.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("lab cleanup: {} ignored SIGTERM; killing it", proc.what);
    let _ = proc.child.kill();
    let _ = proc.child.wait();
}

/// Starts `cmd` with stdin closed and stdout and stderr into `log`, in its
/// own process group (a Ctrl-C at the terminal reaches only the lab or
/// bench, which stops its children itself, in order). Should the starting
/// process die without its Drop (SIGKILL, abort), the child gets SIGTERM
/// instead of living on; the next lab then removes the namespaces and pins
/// (`remove_stale`). The signal follows the creating *thread*: drop what
/// owns the child on the thread that started it. Returns the child and its
/// command line.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Result<(Child, String)> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes one
    // syscall (prctl), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    let line = command_line(&cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    Ok((child, line))
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// FNV-1a 64 over `data`, continuing from `h` (start with [`FNV_OFFSET`]).
pub fn fnv1a64(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A backend's server: its sockets, shut down on stop so blocked threads wake.
struct Server {
    stop: Arc<AtomicBool>,
    listener_fd: Option<i32>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    _listener: Option<Arc<TcpListener>>,
}

impl Server {
    fn tcp(name: String, listener: TcpListener) -> Result<Server> {
        let listener = Arc::new(listener);
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (l, c, st) = (listener.clone(), conns.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("tcp-{name}"))
            .spawn(move || {
                for stream in l.incoming() {
                    if st.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    if let Ok(clone) = stream.try_clone() {
                        c.lock().expect("conns").push(clone);
                    }
                    let name = name.clone();
                    let _ = std::thread::Builder::new()
                        .name(format!("conn-{name}"))
                        .spawn(move || {
                            let _ = serve_tcp_conn(&name, stream);
                        });
                }
            })?;
        Ok(Server {
            stop,
            listener_fd: Some(listener.as_raw_fd()),
            conns,
            _listener: Some(listener),
        })
    }

    fn udp(name: String, socket: UdpSocket) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        // A read timeout lets the loop see `stop`; replies leave from the
        // VIP because the socket is bound to it.
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        std::thread::Builder::new()
            .name(format!("udp-{name}"))
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !st.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut reply = format!("{name} {peer} ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, peer);
                }
            })?;
        Ok(Server {
            stop,
            listener_fd: None,
            conns: Arc::default(),
            _listener: None,
        })
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(fd) = self.listener_fd {
            // Wakes the thread blocked in accept() (Linux).
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
        for c in self.conns.lock().expect("conns").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve_tcp_conn(name: &str, stream: TcpStream) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    // A client that vanished (its namespace deleted) must not pin a thread.
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut out = stream.try_clone()?;
    // One write per line, no Nagle wait: a reply is one segment.
    stream.set_nodelay(true)?;
    out.write_all(format!("HELLO {name} {local} {peer}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let text = line.trim_end();
        if let Some(n) = text.strip_prefix("BULK ") {
            let mut left: usize = n
                .parse()
                .map_err(|_| std::io::Error::other("bad BULK length"))?;
            let total = left;
            let mut h = FNV_OFFSET;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let want = left.min(buf.len());
                let got = reader.read(&mut buf[..want])?;
                if got == 0 {
                    return Ok(());
                }
                h = fnv1a64(h, &buf[..got]);
                left -= got;
            }
            out.write_all(format!("{name} BULK {total} {h:016x}\n").as_bytes())?;
        } else {
            out.write_all(format!("{name} {text}\n").as_bytes())?;
        }
    }
}

/// The daemon's pinned maps under `/sys/fs/bpf/mqlb/<iface>/v<LAYOUT_VERSION>/`,
/// read to predict where the program sends a flow.
pub struct LbMaps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    rings: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    stats: PerCpuArray<MapData, u64>,
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("unexpected map type at {}", path.display()))
}

impl LbMaps {
    /// Where the daemon pins the maps of `iface`.
    pub fn pin_dir(iface: &str) -> PathBuf {
        Path::new(PIN_ROOT)
            .join(iface)
            .join(format!("v{LAYOUT_VERSION}"))
    }

    pub fn open(iface: &str) -> Result<LbMaps> {
        use lb_common::names;
        let dir = Self::pin_dir(iface);
        Ok(LbMaps {
            services: open_pinned(&dir, names::SERVICES)?.try_into()?,
            rings: open_pinned(&dir, names::RINGS)?.try_into()?,
            backends: open_pinned(&dir, names::BACKENDS)?.try_into()?,
            stats: open_pinned(&dir, names::STATS)?.try_into()?,
        })
    }

    /// The live `SERVICES` entry of an IPv4 service.
    pub fn service_v4(&self, vip: Ipv4Addr, port: u16, proto: u8) -> Result<ServiceValue> {
        let key = ServiceKey {
            addr: v4_mapped(vip.octets()),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        self.services
            .get(&key, 0)
            .with_context(|| format!("no SERVICES entry for {vip}:{port}/{proto}"))
    }

    /// The live `SERVICES` entry of an IPv6 service (the key holds the VIP's
    /// 16 raw bytes).
    pub fn service_v6(&self, vip: Ipv6Addr, port: u16, proto: u8) -> Result<ServiceValue> {
        let key = ServiceKey {
            addr: vip.octets(),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        self.services
            .get(&key, 0)
            .with_context(|| format!("no SERVICES entry for [{vip}]:{port}/{proto}"))
    }

    /// The address of `BACKENDS[id]`, IPv4 (mapped in the map) or IPv6.
    pub fn backend_ip(&self, id: u32) -> Result<IpAddr> {
        let b = self.backend(id)?;
        Ok(match v4_unmapped(&b.addr) {
            Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
            None => IpAddr::V6(Ipv6Addr::from(b.addr)),
        })
    }

    /// The backend id the program picks for a new flow of either family
    /// (conntrack miss): `flow_hash_v6` over the raw addresses for IPv6.
    pub fn predict_id_any(
        &self,
        svc: &ServiceValue,
        src: SocketAddr,
        dst: SocketAddr,
        proto: u8,
    ) -> Result<u32> {
        match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => self.predict_id(svc, s, d, proto),
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                let hash = flow_hash_v6(
                    svc.seed,
                    HashMode::from_u8(svc.hash_mode),
                    &s.ip().octets(),
                    &d.ip().octets(),
                    s.port(),
                    d.port(),
                    proto,
                );
                self.ring_pick(svc, hash, dst)
            }
            _ => bail!("flow {src} -> {dst} mixes address families"),
        }
    }

    /// The backend address the program picks for a new flow of either family.
    pub fn predict_any(
        &self,
        svc: &ServiceValue,
        src: SocketAddr,
        dst: SocketAddr,
        proto: u8,
    ) -> Result<IpAddr> {
        let id = self.predict_id_any(svc, src, dst, proto)?;
        self.backend_ip(id)
    }

    /// Backend id → address (`BACKENDS`).
    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends
            .get(&id, 0)
            .with_context(|| format!("no BACKENDS entry {id}"))
    }

    /// Overwrites `BACKENDS[id]`: stages a data-plane state the daemon would
    /// not write while it runs (stop it first).
    pub fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        self.backends
            .set(id, b, 0)
            .with_context(|| format!("cannot write BACKENDS[{id}]"))
    }

    /// The id of the `BACKENDS` entry with address `addr`, if any.
    pub fn backend_id(&self, addr: Ipv4Addr) -> Result<Option<u32>> {
        let want = v4_mapped(addr.octets());
        for id in 1..MAX_BACKENDS {
            if self.backend(id)?.addr == want {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    fn backend_v4(&self, id: u32) -> Result<Ipv4Addr> {
        let b = self.backend(id)?;
        v4_unmapped(&b.addr)
            .map(Ipv4Addr::from)
            .ok_or_else(|| anyhow!("backend {id} is not IPv4: {:?}", b.addr))
    }

    /// The backend id the program picks for a new flow (conntrack miss).
    pub fn predict_id(
        &self,
        svc: &ServiceValue,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        proto: u8,
    ) -> Result<u32> {
        let hash = flow_hash_v4(
            svc.seed,
            HashMode::from_u8(svc.hash_mode),
            src.ip().octets(),
            dst.ip().octets(),
            src.port(),
            dst.port(),
            proto,
        );
        self.ring_pick(svc, hash, SocketAddr::V4(dst))
    }

    /// The backend id in the live ring's slot for flow hash `hash`.
    fn ring_pick(&self, svc: &ServiceValue, hash: u32, dst: SocketAddr) -> Result<u32> {
        if svc.ring_size == 0 {
            bail!("service {dst} has an empty ring");
        }
        let slot = svc.ring_base + ring_slot(hash, svc.ring_size);
        self.rings
            .get(&slot, 0)
            .with_context(|| format!("cannot read RINGS[{slot}]"))
    }

    /// The backend address the program picks for a new flow.
    pub fn predict(
        &self,
        svc: &ServiceValue,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        proto: u8,
    ) -> Result<Ipv4Addr> {
        let id = self.predict_id(svc, src, dst, proto)?;
        self.backend_v4(id)
    }

    /// The live ring of a service, slot by slot (backend ids).
    pub fn ring(&self, svc: &ServiceValue) -> Result<Vec<u32>> {
        (svc.ring_base..svc.ring_base + svc.ring_size)
            .map(|i| {
                self.rings
                    .get(&i, 0)
                    .with_context(|| format!("cannot read RINGS[{i}]"))
            })
            .collect()
    }

    /// The backend addresses present in a service's live ring.
    pub fn ring_members(&self, svc: &ServiceValue) -> Result<BTreeSet<Ipv4Addr>> {
        let ids: BTreeSet<u32> = self.ring(svc)?.into_iter().collect();
        ids.into_iter()
            .filter(|&id| id != 0)
            .map(|id| self.backend_v4(id))
            .collect()
    }

    /// A global counter (`STATS`), summed over CPUs.
    pub fn counter(&self, c: Counter) -> Result<u64> {
        let values = self
            .stats
            .get(&(c as u32), 0)
            .with_context(|| format!("cannot read STATS[{}]", c.name()))?;
        Ok(values.iter().sum())
    }
}

/// The first number found under key `name` anywhere in `v` (for counters in
/// `mqlb stats --json`, whatever its nesting).
pub fn find_counter(v: &serde_json::Value, name: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(map) => map
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| map.values().find_map(|x| find_counter(x, name))),
        serde_json::Value::Array(items) => items.iter().find_map(|x| find_counter(x, name)),
        _ => None,
    }
}
