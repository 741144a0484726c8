//! Real RabbitMQ behind mqlb: [`RabbitLab`] wraps the namespace [`Lab`] and
//! runs one independent RabbitMQ node (Debian's `rabbitmq-server`) in each
//! backend namespace it is asked for, listening on 0.0.0.0:5672 so it
//! accepts what DSR delivers to the VIP on its `lo`. Each node has its own
//! cluster name (`mqlb-b1`, ...), so a client reads in Connection.Start
//! which node it reached. [`AmqpClient`] is a real AMQP 0-9-1 client
//! (lapin) in the client namespace, bound to a source port the test picks,
//! so the test can predict its backend from the pinned maps.
//!
//! Used by `tests/e2e_rabbitmq.rs` and the demo (`lab` binary).
//!
//! Per node, under the lab's temp dir (`/tmp/mqlb-lab-{pid}-rabbit-*`, which
//! [`crate::lab::remove_stale`] removes when its process is gone): `home/`
//! (the Erlang cookie, mode 0400), `mnesia/`, `log/`, `rabbitmq.conf`.
//! Each namespace gets its own `epmd`, started by the lab, so every process
//! the lab starts is its child: the broker (the start script `exec`s the VM,
//! see [`Broker::spawn`]) and `epmd` get SIGTERM should the test process die,
//! and Drop kills them by PID, then whatever else still runs in the
//! namespaces the lab made (what `ip netns pids` lists: inet_gethost, a
//! stray rabbitmqctl), except `mqlb decap`, which the [`Lab`] stops itself.
//! (The VM's helpers, orphaned when it dies, are reaped by PID 1.)

use crate::lab::{log_tail, spawn_logged, wait_for, GiveUp, Lab, LabConfig, Node, TMP_PREFIX};
use crate::netns::{self, output};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use async_rs::{traits::Reactor, util::RuntimeParts, Runtime, Tokio};
use futures_lite::StreamExt as _;
use lapin::{
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    protocol::{self, AMQPClass},
    types::{AMQPValue, FieldTable},
    uri::AMQPUri,
    AsyncTcpStream, BasicProperties, Channel, Connection, ConnectionProperties, Consumer,
};
use lb_common::PROTO_TCP;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The broker start script (run directly: the `/usr/sbin` wrapper switches user).
pub const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
const RABBITMQ_UPGRADE: &str = "/usr/lib/rabbitmq/bin/rabbitmq-upgrade";
/// The AMQP port of the service and of every node.
pub const AMQP_PORT: u16 = 5672;
/// The service name the lab gives `mqlb service add`.
pub const SERVICE: &str = "amqp";

/// How long nodes get to answer AMQP after their start: ~6 s of CPU each,
/// and four of them share two cores.
const BROKER_START_DEADLINE: Duration = Duration::from_secs(120);
/// One AMQP operation (connect, publish + confirm, a delivery): generous,
/// only reached when something is lost.
pub const AMQP_TIMEOUT: Duration = Duration::from_secs(20);
/// Source ports the lab hands out: below the kernel's ephemeral range
/// (32768-60999), so no connection the kernel numbers collides with them.
const FIRST_PORT: u32 = 20000;
const LAST_PORT: u32 = 32767;
/// How many bytes of a connection's first reads are kept for Connection.Start.
const SNIFF_LIMIT: usize = 8192;

/// Fails clearly when the broker is not installed (layer 4 never skips).
pub fn require_rabbitmq() -> Result<()> {
    for tool in [
        RABBITMQ_SERVER,
        RABBITMQCTL,
        RABBITMQ_UPGRADE,
        "/usr/bin/epmd",
    ] {
        if !Path::new(tool).exists() {
            bail!(
                "{tool} is missing: RabbitMQ is not installed; run `cargo xtask setup` \
                 (or `apt-get install rabbitmq-server`)"
            );
        }
    }
    Ok(())
}

/// Health-check settings of the lab's `amqp` service (`mqlb service add --check amqp`).
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for Check {
    /// Fast enough for a test, slow enough not to load the brokers. A
    /// killed or drained node refuses the connection, so it fails at once;
    /// the timeout and `fall` only guard against a node that is slow to
    /// answer. With 500 ms and `fall` 2, a node busy accepting 90
    /// connections on two loaded cores missed two checks in a row and was
    /// taken out (and its connections reset): 900 ms and 3 in a row.
    fn default() -> Self {
        Check {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(900),
            rise: 2,
            fall: 3,
        }
    }
}

impl Check {
    /// The longest a dead backend may stay in the table: `fall` checks,
    /// the last of which may wait `timeout` (the bound).
    pub fn down_bound(&self) -> Duration {
        self.interval * self.fall + self.timeout
    }

    /// The same for a recovered one: `rise` passing checks.
    pub fn up_bound(&self) -> Duration {
        self.interval * self.rise + self.timeout
    }
}

/// What [`RabbitLab::start`] builds.
#[derive(Clone, Debug)]
pub struct RabbitConfig {
    pub lab: LabConfig,
    /// The first `brokers` backends run RabbitMQ from the start.
    pub brokers: usize,
    pub check: Check,
    /// When set (by a SIGINT handler, say), every wait of the lab ends at
    /// once with an error, so the caller drops the lab promptly.
    pub cancel: Option<&'static AtomicBool>,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig {
            lab: LabConfig::default(),
            brokers: 3,
            check: Check::default(),
            cancel: None,
        }
    }
}

/// Ends a [`wait_for`] when `cancel` is set.
fn cancelled(cancel: Option<&AtomicBool>) -> Result<()> {
    if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
        return Err(GiveUp("interrupted".into()).into());
    }
    Ok(())
}

/// One RabbitMQ node in a backend namespace.
struct Broker {
    /// The backend's name (`b1`, ...) and index in `lab.backends`.
    name: String,
    idx: usize,
    /// What Connection.Start says (`rabbitmqctl set_cluster_name`).
    cluster_name: String,
    dir: PathBuf,
    epmd: Option<Child>,
    server: Option<Child>,
    /// Starts so far (names the stdout log of each).
    starts: u32,
}

impl Broker {
    fn node_name(&self) -> String {
        format!("mqlb-{}@localhost", self.name)
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("server-{}.log", self.starts))
    }

    /// The node's own log (RabbitMQ's, not stdout).
    fn rabbit_log(&self) -> PathBuf {
        self.dir
            .join("log")
            .join(format!("{}.log", self.node_name()))
    }

    /// The environment every RabbitMQ tool of this node runs with: nothing
    /// from the test process (cargo's variables, `HOME`), only this node's
    /// files. rabbitmqctl finds the node and the cookie through it.
    fn env(&self, cmd: &mut Command) {
        cmd.env_clear()
            .current_dir(&self.dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("HOME", self.dir.join("home"))
            .env("RABBITMQ_NODENAME", self.node_name())
            .env("RABBITMQ_NODE_IP_ADDRESS", "0.0.0.0")
            .env("RABBITMQ_NODE_PORT", AMQP_PORT.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"));
    }

    /// Writes the node's files (first start only).
    fn prepare(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let home = self.dir.join("home");
        for d in [&home, &self.dir.join("mnesia"), &self.dir.join("log")] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("mqlb-lab-{}", self.name))?;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
        // Guest may log in from anywhere (the clients are not on loopback).
        std::fs::write(self.dir.join("rabbitmq.conf"), "loopback_users = none\n")?;
        // No plugins (none is needed; each costs start-up time).
        std::fs::write(self.dir.join("enabled_plugins"), "[].\n")?;
        // Not /etc/rabbitmq/rabbitmq-env.conf: nothing of the host's setup.
        std::fs::write(self.dir.join("rabbitmq-env.conf"), "")?;
        Ok(())
    }

    /// Starts the broker in `node`'s namespace (and its epmd, once). Must
    /// run on the thread that owns the lab: the children's parent-death
    /// signal follows the creating thread.
    fn spawn(&mut self, node: &Node, cancel: Option<&AtomicBool>) -> Result<()> {
        if self.epmd.is_none() {
            // Our own epmd, in the foreground: a child with a parent-death
            // signal, not the daemon the VM would start (which outlives all).
            let mut cmd = node.command("/usr/bin/epmd");
            cmd.env_clear().env("PATH", "/usr/bin:/bin");
            let (child, _) = spawn_logged(cmd, &self.dir.join("epmd.log"))?;
            self.epmd = Some(child);
            wait_for(
                &format!("epmd in {}", node.ns),
                Duration::from_secs(10),
                || {
                    cancelled(cancel)?;
                    node.run(|| {
                        TcpStream::connect_timeout(
                            &SocketAddr::from(([127, 0, 0, 1], 4369)),
                            Duration::from_millis(500),
                        )
                    })?
                    .map(|_| Some(()))
                    .map_err(Into::into)
                },
            )?;
        }
        self.starts += 1;
        let mut cmd = node.command(RABBITMQ_SERVER);
        self.env(&mut cmd);
        // NOTIFY_SOCKET makes the start script `exec` the VM ("running under
        // systemd") instead of running it under a signal-forwarding shell:
        // the PID the lab holds is the broker's, so `kill -9` hits the
        // broker and the parent-death signal reaches it. Nothing listens
        // there; RabbitMQ only notes that the notification failed.
        cmd.env("NOTIFY_SOCKET", self.dir.join("notify.sock"));
        let (child, _) = spawn_logged(cmd, &self.log())?;
        self.server = Some(child);
        Ok(())
    }

    /// Polls a real AMQP handshake from inside the node's namespace to its
    /// own address (where mqlb's check goes) until Connection.Start comes;
    /// returns the cluster name in it. Ends at once if the broker exits.
    fn wait_ready(
        &mut self,
        node: &Node,
        deadline: Duration,
        cancel: Option<&AtomicBool>,
    ) -> Result<String> {
        let addr = SocketAddrV4::new(node.addr, AMQP_PORT);
        let (log, rabbit_log) = (self.log(), self.rabbit_log());
        let server = self.server.as_mut().context("the broker is not started")?;
        wait_for(
            &format!("RabbitMQ on {} to answer AMQP", self.name),
            deadline,
            || {
                cancelled(cancel)?;
                if let Some(status) = server.try_wait()? {
                    return Err(GiveUp(format!(
                        "rabbitmq-server in {} exited with {status}; its output:\n{}\n\
                         its log:\n{}",
                        node.ns,
                        log_tail(&log, 30),
                        log_tail(&rabbit_log, 30)
                    ))
                    .into());
                }
                Ok(Some(node.run(move || amqp_hello(addr))??))
            },
        )
    }

    /// SIGKILL to the broker's VM, by its PID; reaps it.
    fn kill9(&mut self) -> Result<()> {
        let mut child = self.server.take().context("the broker is not running")?;
        child.kill().context("kill -9 the broker")?;
        child.wait().context("reap the broker")?;
        Ok(())
    }

    /// Stops every process of this node the lab started (by PID).
    fn stop(&mut self) {
        for mut child in [self.server.take(), self.epmd.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Opens an AMQP connection to `addr` (from the calling thread's namespace),
/// sends the protocol header and returns the cluster name from the broker's
/// Connection.Start; then closes, as mqlb's own `amqp` check does.
pub fn amqp_hello(addr: SocketAddrV4) -> Result<String> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr.into(), timeout)
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"AMQP\x00\x00\x09\x01")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(name) = connection_start_cluster_name(&buf)? {
            return Ok(name);
        }
        let n = s
            .read(&mut chunk)
            .with_context(|| format!("read Connection.Start from {addr}"))?;
        ensure!(n > 0, "{addr} closed before Connection.Start");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The `cluster_name` server property of the Connection.Start frame at the
/// start of `bytes`; `None` while the frame is incomplete.
pub fn connection_start_cluster_name(bytes: &[u8]) -> Result<Option<String>> {
    // Frame: type u8 (1 = method), channel u16, size u32, payload, 0xCE.
    if bytes.len() < 7 {
        return Ok(None);
    }
    ensure!(
        bytes[0] == 1 && bytes[1..3] == [0, 0],
        "not a method frame on channel 0: {:02x?}",
        &bytes[..7]
    );
    let size = u32::from_be_bytes(bytes[3..7].try_into().expect("4 bytes")) as usize;
    if bytes.len() < 7 + size + 1 {
        return Ok(None);
    }
    ensure!(bytes[7 + size] == 0xCE, "frame end marker missing");
    let (_, class) = protocol::parse_class(&bytes[7..7 + size])
        .map_err(|e| anyhow!("cannot parse the first method frame: {e:?}"))?;
    let AMQPClass::Connection(protocol::connection::AMQPMethod::Start(start)) = class else {
        bail!("the first frame is not Connection.Start: {class:?}");
    };
    match start.server_properties.inner().get("cluster_name") {
        Some(AMQPValue::LongString(s)) => Ok(Some(s.to_string())),
        other => bail!("Connection.Start has no cluster_name string: {other:?}"),
    }
}

/// A running lab with RabbitMQ nodes. Dropping it kills the brokers (and
/// their epmd), then drops the [`Lab`].
pub struct RabbitLab {
    brokers: Vec<Broker>,
    check: Check,
    cancel: Option<&'static AtomicBool>,
    next_port: AtomicU32,
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    /// Dropped after the brokers are gone.
    pub lab: Lab,
}

impl std::ops::Deref for RabbitLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl std::ops::DerefMut for RabbitLab {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

impl RabbitLab {
    /// Builds the lab of `cfg.lab`, starts RabbitMQ on the first
    /// `cfg.brokers` backends (all at once), waits until each answers AMQP
    /// and names itself `mqlb-<backend>` in Connection.Start. No service
    /// yet: see [`RabbitLab::add_service`].
    pub fn start(cfg: RabbitConfig) -> Result<RabbitLab> {
        require_rabbitmq()?;
        let RabbitConfig {
            lab,
            brokers,
            check,
            cancel,
        } = cfg;
        ensure!(
            brokers <= lab.backends,
            "{brokers} brokers need as many backends, not {}",
            lab.backends
        );
        let lab = Lab::start(lab)?;
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{pid}-rabbit-"))
            .tempdir()
            .context("cannot create the RabbitMQ temp dir")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let mut rl = RabbitLab {
            brokers: Vec::new(),
            check,
            cancel,
            next_port: AtomicU32::new(FIRST_PORT),
            rt,
            dir,
            lab,
        };
        let names: Vec<String> = rl.lab.backends[..brokers]
            .iter()
            .map(|b| b.name.clone())
            .collect();
        rl.start_brokers(&names)?;
        Ok(rl)
    }

    /// Starts RabbitMQ on the backends named (not running yet), in parallel.
    pub fn start_brokers(&mut self, names: &[String]) -> Result<()> {
        let t0 = Instant::now();
        for name in names {
            let idx = self
                .lab
                .backends
                .iter()
                .position(|b| &b.name == name)
                .with_context(|| format!("no backend {name}"))?;
            ensure!(
                !self.brokers.iter().any(|b| &b.name == name),
                "{name} already has a broker"
            );
            let broker = Broker {
                name: name.clone(),
                idx,
                cluster_name: format!("mqlb-{name}"),
                dir: self.dir.path().join(name),
                epmd: None,
                server: None,
                starts: 0,
            };
            broker.prepare()?;
            self.brokers.push(broker);
            let b = self.brokers.last_mut().expect("just pushed");
            b.spawn(&self.lab.backends[idx], self.cancel)
                .with_context(|| format!("starting RabbitMQ on {name}"))?;
        }
        self.wait_brokers(names)?;
        eprintln!(
            "rabbit: {} answering AMQP as {} after {:.1?}",
            names.join(", "),
            names
                .iter()
                .map(|n| format!("mqlb-{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            t0.elapsed()
        );
        Ok(())
    }

    /// Waits (in parallel) until the named brokers answer AMQP, then makes
    /// sure each names itself by its cluster name.
    fn wait_brokers(&mut self, names: &[String]) -> Result<()> {
        let backends = &self.lab.backends;
        let cancel = self.cancel;
        let results: Vec<(String, Result<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .brokers
                .iter_mut()
                .filter(|b| names.contains(&b.name))
                .map(|b| {
                    let node = &backends[b.idx];
                    let env = {
                        let mut cmd = node.command(RABBITMQCTL);
                        b.env(&mut cmd);
                        cmd
                    };
                    s.spawn(move || {
                        let res =
                            b.wait_ready(node, BROKER_START_DEADLINE, cancel)
                                .and_then(|name| {
                                    if name == b.cluster_name {
                                        return Ok(name);
                                    }
                                    let mut cmd = env;
                                    cmd.args(["set_cluster_name", &b.cluster_name]);
                                    output(&mut cmd)?;
                                    let addr = SocketAddrV4::new(node.addr, AMQP_PORT);
                                    node.run(move || amqp_hello(addr))?
                                });
                        (b.name.clone(), res)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("broker wait thread"))
                .collect()
        });
        for (name, res) in results {
            let got = res.with_context(|| format!("RabbitMQ on {name} did not come up"))?;
            ensure!(
                got == format!("mqlb-{name}"),
                "{name} names itself {got:?} in Connection.Start after set_cluster_name"
            );
        }
        Ok(())
    }

    fn broker(&self, name: &str) -> Result<&Broker> {
        self.brokers
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("no RabbitMQ node on {name}"))
    }

    fn broker_mut(&mut self, name: &str) -> Result<&mut Broker> {
        self.brokers
            .iter_mut()
            .find(|b| b.name == name)
            .with_context(|| format!("no RabbitMQ node on {name}"))
    }

    /// Names of the backends running a broker, in start order.
    pub fn broker_names(&self) -> Vec<String> {
        self.brokers.iter().map(|b| b.name.clone()).collect()
    }

    /// The PID of node `name`'s broker (its Erlang VM), if it runs.
    pub fn broker_pid(&self, name: &str) -> Option<u32> {
        self.broker(name).ok()?.server.as_ref().map(Child::id)
    }

    /// The backend whose broker names itself `cluster_name`.
    pub fn backend_of_cluster(&self, cluster_name: &str) -> Option<&str> {
        self.brokers
            .iter()
            .find(|b| b.cluster_name == cluster_name)
            .map(|b| b.name.as_str())
    }

    /// The health-check settings of the service.
    pub fn check(&self) -> Check {
        self.check
    }

    /// Runs a RabbitMQ CLI tool (`rabbitmqctl`, `rabbitmq-upgrade`,
    /// `rabbitmq-diagnostics`, ...) against node `name`, in its namespace
    /// and with its environment; its stdout.
    pub fn rabbit_tool(&self, name: &str, tool: &str, args: &[&str]) -> Result<String> {
        let b = self.broker(name)?;
        let node = &self.lab.backends[b.idx];
        let mut cmd = node.command(format!("/usr/lib/rabbitmq/bin/{tool}"));
        b.env(&mut cmd);
        cmd.args(args);
        output(&mut cmd)
    }

    /// A shell command line that runs `rabbitmqctl ARGS` against node
    /// `name` by hand (its namespace, cookie and node name).
    pub fn rabbitmqctl_line(&self, name: &str, args: &str) -> Result<String> {
        let b = self.broker(name)?;
        Ok(format!(
            "HOME={} RABBITMQ_NODENAME={} nsenter --net={} {RABBITMQCTL} {args}",
            b.dir.join("home").display(),
            b.node_name(),
            self.lab.backends[b.idx].netns_path().display()
        ))
    }

    /// `rabbitmqctl ARGS...` on node `name`.
    pub fn rabbitmqctl(&self, name: &str, args: &[&str]) -> Result<String> {
        self.rabbit_tool(name, "rabbitmqctl", args)
    }

    /// The client ends (peer address and port) of the AMQP connections node
    /// `name` has, from `rabbitmqctl list_connections`. The daemon's own
    /// `--check amqp` probes (from the LB's address, a few milliseconds each)
    /// are left out: one caught open would look like a stray client.
    pub fn broker_connections(&self, name: &str) -> Result<BTreeSet<SocketAddrV4>> {
        let text = self.rabbitmqctl(
            name,
            &[
                "list_connections",
                "--quiet",
                "--no-table-headers",
                "peer_host",
                "peer_port",
            ],
        )?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut it = l.split_whitespace();
                let (Some(host), Some(port)) = (it.next(), it.next()) else {
                    bail!("unexpected list_connections line {l:?}");
                };
                Ok(SocketAddrV4::new(
                    host.parse()
                        .with_context(|| format!("peer_host in {l:?}"))?,
                    port.parse()
                        .with_context(|| format!("peer_port in {l:?}"))?,
                ))
            })
            .filter(|peer| !matches!(peer, Ok(p) if *p.ip() == self.lab.lb.addr))
            .collect()
    }

    /// [`RabbitLab::broker_connections`] of every node (in parallel; each
    /// rabbitmqctl call is a second of Erlang start-up).
    pub fn all_broker_connections(&self) -> Result<BTreeMap<String, BTreeSet<SocketAddrV4>>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .brokers
                .iter()
                .filter(|b| b.server.is_some())
                .map(|b| {
                    s.spawn(move || {
                        (
                            b.name.clone(),
                            self.broker_connections(&b.name)
                                .with_context(|| format!("list_connections on {}", b.name)),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    let (name, res) = h.join().expect("list_connections thread");
                    res.map(|set| (name, set))
                })
                .collect()
        })
    }

    /// `kill -9` of node `name`'s broker (its VM, by PID). Its epmd stays,
    /// as it would on a host whose broker crashed.
    pub fn kill9(&mut self, name: &str) -> Result<()> {
        self.broker_mut(name)?.kill9()
    }

    /// Starts node `name`'s broker again on its old data (after
    /// [`RabbitLab::kill9`]) and waits until it answers AMQP under its name.
    pub fn restart(&mut self, name: &str) -> Result<()> {
        let idx = self.broker(name)?.idx;
        let node = &self.lab.backends[idx];
        let b = self
            .brokers
            .iter_mut()
            .find(|b| b.name == name)
            .expect("found above");
        ensure!(b.server.is_none(), "{name}'s broker still runs");
        b.spawn(node, self.cancel)?;
        self.wait_brokers(&[name.to_string()])
    }

    /// `rabbitmq-upgrade drain` on node `name`: maintenance mode (it closes
    /// its client connections and stops accepting new ones).
    pub fn drain(&self, name: &str) -> Result<()> {
        self.rabbit_tool(name, "rabbitmq-upgrade", &["drain"])
            .map(drop)
    }

    /// `rabbitmq-upgrade revive` on node `name`: back to regular operation.
    pub fn revive(&self, name: &str) -> Result<()> {
        self.rabbit_tool(name, "rabbitmq-upgrade", &["revive"])
            .map(drop)
    }

    /// Adds the service `amqp` (VIP:5672/tcp, `--check amqp` with this lab's
    /// [`Check`]) with the backends named, and waits until the live ring
    /// holds exactly them and the checks see them up.
    pub fn add_service(&self, names: &[&str]) -> Result<()> {
        let vip = format!("{}:{AMQP_PORT}", self.lab.vip);
        let c = self.check;
        let (interval, timeout) = (
            format!("{}ms", c.interval.as_millis()),
            format!("{}ms", c.timeout.as_millis()),
        );
        let (rise, fall) = (c.rise.to_string(), c.fall.to_string());
        self.lab.mqlb(&[
            "service",
            "add",
            SERVICE,
            "--vip",
            &vip,
            "--proto",
            "tcp",
            "--check",
            "amqp",
            "--check-interval",
            &interval,
            "--check-timeout",
            &timeout,
            "--rise",
            &rise,
            "--fall",
            &fall,
        ])?;
        for name in names {
            self.add_backend(name)?;
        }
        self.wait_ring(names, Duration::from_secs(20))?;
        for name in names {
            self.wait_health(name, "up", Duration::from_secs(20))?;
        }
        Ok(())
    }

    /// `mqlb backend add amqp <address of backend name>`.
    pub fn add_backend(&self, name: &str) -> Result<()> {
        let b = self
            .lab
            .backend_by_name(name)
            .with_context(|| format!("no backend {name}"))?;
        self.lab
            .mqlb(&["backend", "add", SERVICE, &b.addr.to_string()])
            .map(drop)
    }

    /// The backends (names) in the service's live Maglev ring.
    pub fn ring_members(&self) -> Result<BTreeSet<String>> {
        let maps = self.lab.maps()?;
        let svc = maps.service_v4(self.lab.vip, AMQP_PORT, PROTO_TCP)?;
        maps.ring_members(&svc)?
            .into_iter()
            .map(|addr| self.name_of(addr))
            .collect()
    }

    fn name_of(&self, addr: Ipv4Addr) -> Result<String> {
        self.lab
            .backend_by_addr(addr)
            .map(|b| b.name.clone())
            .with_context(|| format!("{addr} is no backend of the lab"))
    }

    /// Waits until the live ring holds exactly the backends named.
    pub fn wait_ring(&self, names: &[&str], deadline: Duration) -> Result<Duration> {
        let want: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
        let t0 = Instant::now();
        wait_for(&format!("the ring to hold {names:?}"), deadline, || {
            cancelled(self.cancel)?;
            let members = self.ring_members()?;
            if members == want {
                Ok(Some(t0.elapsed()))
            } else {
                bail!("the ring holds {members:?}")
            }
        })
    }

    /// `backend list --json`'s entry for backend `name`.
    fn backend_entry(&self, name: &str) -> Result<serde_json::Value> {
        let addr = self
            .lab
            .backend_by_name(name)
            .with_context(|| format!("no backend {name}"))?
            .addr
            .to_string();
        let text = self.lab.mqlb(&["backend", "list", SERVICE, "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("`mqlb backend list --json` printed {text}"))?;
        v.as_array()
            .and_then(|list| list.iter().find(|b| b["addr"] == addr.as_str()))
            .cloned()
            .with_context(|| format!("{name} ({addr}) not in `backend list`: {text}"))
    }

    /// How often the daemon has taken backend `name` down and put it back
    /// up since it started (`DOWN/UP` in `backend list`).
    pub fn transitions(&self, name: &str) -> Result<(u64, u64)> {
        let entry = self.backend_entry(name)?;
        let t = &entry["health"]["transitions"];
        match (t["down"].as_u64(), t["up"].as_u64()) {
            (Some(d), Some(u)) => Ok((d, u)),
            _ => bail!("no health transitions for {name}: {entry}"),
        }
    }

    /// The health status (`up`, `down`, `draining`) the daemon reports for
    /// backend `name` (`mqlb backend list amqp --json`), or `unchecked`
    /// before its first probe (a new backend, or a restarted daemon, starts
    /// `up` without having been probed, as `backend list` shows).
    pub fn health(&self, name: &str) -> Result<String> {
        let entry = self.backend_entry(name)?;
        if entry["health"]["checked"] == false {
            return Ok("unchecked".into());
        }
        entry["health"]["status"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no health status for {name}: {entry}"))
    }

    /// Waits until the daemon reports backend `name` as `status`; returns
    /// how long that took.
    pub fn wait_health(&self, name: &str, status: &str, deadline: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        wait_for(&format!("mqlb to see {name} {status}"), deadline, || {
            cancelled(self.cancel)?;
            let now = self.health(name)?;
            if now == status {
                Ok(Some(t0.elapsed()))
            } else {
                bail!("{name} is {now}")
            }
        })
    }

    /// `n` fresh source ports for client connections (each is used once:
    /// a new port is a new flow, which the program hashes anew).
    pub fn ports(&self, n: usize) -> Result<Vec<u16>> {
        let first = self.next_port.fetch_add(n as u32, Ordering::Relaxed);
        ensure!(
            first + n as u32 <= LAST_PORT + 1,
            "the lab ran out of client source ports"
        );
        Ok((first..first + n as u32).map(|p| p as u16).collect())
    }

    /// The backend (name) the program picks for a new connection from the
    /// client's `port` to the VIP, from the live ring (lb-common's function).
    pub fn predict(&self, ports: &[u16]) -> Result<Vec<String>> {
        let maps = self.lab.maps()?;
        let svc = maps.service_v4(self.lab.vip, AMQP_PORT, PROTO_TCP)?;
        let dst = SocketAddrV4::new(self.lab.vip, AMQP_PORT);
        ports
            .iter()
            .map(|&p| {
                let src = SocketAddrV4::new(self.lab.client.addr, p);
                self.name_of(maps.predict(&svc, src, dst, PROTO_TCP)?)
            })
            .collect()
    }

    /// `n` fresh source ports whose connections the live ring sends to
    /// backend `name` (other ports drawn on the way are left unused).
    pub fn ports_to(&self, name: &str, n: usize) -> Result<Vec<u16>> {
        let mut found = Vec::new();
        while found.len() < n {
            let batch = self.ports(32)?;
            let names = self.predict(&batch)?;
            found.extend(
                batch
                    .into_iter()
                    .zip(names)
                    .filter(|(_, b)| b == name)
                    .map(|(p, _)| p),
            );
        }
        found.truncate(n);
        Ok(found)
    }

    /// Where clients connect from: the client namespace, to VIP:5672.
    pub fn client_side(&self) -> ClientSide {
        ClientSide {
            netns: self.lab.client.netns_path(),
            addr: self.lab.client.addr,
            vip: SocketAddrV4::new(self.lab.vip, AMQP_PORT),
            handle: self.rt.handle().clone(),
        }
    }

    /// Runs `f` on the lab's tokio runtime (clients' I/O runs there).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Opens one AMQP client per port, 16 at a time: each connects from the
    /// client namespace with that source port and sets up its queue. The
    /// results are in port order.
    pub fn connect(&self, ports: &[u16]) -> Vec<Result<AmqpClient>> {
        let side = self.client_side();
        let slots = Arc::new(tokio::sync::Semaphore::new(16));
        self.rt.block_on(async {
            let tasks: Vec<_> = ports
                .iter()
                .map(|&p| {
                    let (side, slots) = (side.clone(), slots.clone());
                    tokio::spawn(async move {
                        let _slot = slots.acquire().await;
                        AmqpClient::connect(&side, p).await
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(
                    t.await
                        .unwrap_or_else(|e| Err(anyhow!("connect task: {e}"))),
                );
            }
            out
        })
    }

    /// [`RabbitLab::connect`], failing on the first connection that failed.
    pub fn connect_all(&self, ports: &[u16]) -> Result<Vec<AmqpClient>> {
        self.connect(ports)
            .into_iter()
            .zip(ports)
            .map(|(r, p)| r.with_context(|| format!("AMQP client from port {p} through the VIP")))
            .collect()
    }

    /// Starts `clients` publishing and consuming in rounds of `batch`
    /// confirmed messages, `pause` apart, until [`Load::stop`].
    pub fn start_load(&self, clients: Vec<AmqpClient>, batch: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let confirmed = Arc::new(AtomicU64::new(0));
        let errors: Arc<Mutex<Vec<(SocketAddrV4, String)>>> = Arc::default();
        let tasks = clients
            .into_iter()
            .map(|mut c| {
                let (stop, confirmed, errors) = (stop.clone(), confirmed.clone(), errors.clone());
                self.rt.spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = c.round(batch).await {
                            errors
                                .lock()
                                .expect("errors")
                                .push((c.src, format!("{e:#}")));
                            return (c, Err(e));
                        }
                        confirmed.fetch_add(batch as u64, Ordering::Relaxed);
                        tokio::time::sleep(pause).await;
                    }
                    (c, Ok(()))
                })
            })
            .collect();
        Load {
            stop,
            confirmed,
            errors,
            tasks,
            cancel: self.cancel,
        }
    }

    /// Runs `rounds` rounds of `batch` confirmed messages on every client,
    /// all clients at once; hands them back with how each ended.
    pub fn run_rounds(
        &self,
        clients: Vec<AmqpClient>,
        rounds: usize,
        batch: usize,
    ) -> Vec<(AmqpClient, Result<()>)> {
        self.rt.block_on(async {
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|mut c| {
                    tokio::spawn(async move {
                        for _ in 0..rounds {
                            if let Err(e) = c.round(batch).await {
                                return (c, Err(e));
                            }
                        }
                        (c, Ok(()))
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(t.await.expect("client task panicked"));
            }
            out
        })
    }

    /// Ends the load and hands the clients back with how each ended.
    pub fn stop_load(&self, load: Load) -> Vec<(AmqpClient, Result<()>)> {
        load.stop.store(true, Ordering::Relaxed);
        self.rt.block_on(async {
            let mut out = Vec::new();
            for t in load.tasks {
                out.push(t.await.expect("load task panicked"));
            }
            out
        })
    }

    /// Closes `clients` cleanly, each checking that its queue is empty:
    /// every confirmed message was consumed exactly once.
    pub fn finish(&self, clients: Vec<AmqpClient>) -> Result<Tally> {
        self.rt.block_on(async {
            let mut total = Tally::default();
            for c in clients {
                let src = c.src;
                let t = c
                    .finish()
                    .await
                    .with_context(|| format!("closing the client from {src}"))?;
                total.confirmed += t.confirmed;
                total.consumed += t.consumed;
                total.left += t.left;
                total.clients += 1;
            }
            Ok(total)
        })
    }

    /// Per-node log tails and the lab's diagnostics, for a failure message.
    pub fn rabbit_diagnostics(&self) -> String {
        let mut out = self.lab.diagnostics();
        for b in &self.brokers {
            out.push_str(&format!(
                "\n--- RabbitMQ {} ({}), log tail:\n{}",
                b.name,
                if b.server.is_some() {
                    "running"
                } else {
                    "stopped"
                },
                log_tail(&b.rabbit_log(), 15)
            ));
        }
        out
    }
}

impl Drop for RabbitLab {
    fn drop(&mut self) {
        for b in &mut self.brokers {
            b.stop();
        }
        // Whatever the VMs left (inet_gethost, a stray rabbitmqctl, an epmd
        // the VM started): every process in our backend namespaces except
        // `mqlb decap`, which the Lab stops and detaches itself. Until none
        // is left (children of a dying VM may still be on their way out).
        let namespaces: Vec<PathBuf> = self
            .brokers
            .iter()
            .map(|b| self.lab.backends[b.idx].netns_path())
            .collect();
        let t0 = Instant::now();
        loop {
            let left: Vec<(i32, String)> = namespaces
                .iter()
                .flat_map(|ns| pids_in_netns(ns))
                .filter(|(_, comm)| comm != "mqlb")
                .collect();
            if left.is_empty() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                eprintln!("rabbit cleanup: still running in the lab's namespaces: {left:?}");
                break;
            }
            for (pid, comm) in left {
                if t0.elapsed() > Duration::from_millis(500) {
                    eprintln!("rabbit cleanup: killing {comm} ({pid})");
                }
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if std::thread::panicking() {
            for b in &self.brokers {
                eprintln!(
                    "rabbit {}: log tail:\n{}",
                    b.name,
                    log_tail(&b.rabbit_log(), 20)
                );
            }
        }
    }
}

/// The processes (PID, command name) whose network namespace is the one
/// at `netns` (what `ip netns pids` prints, without running it).
fn pids_in_netns(netns: &Path) -> Vec<(i32, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(want) = std::fs::metadata(netns) else {
        return Vec::new();
    };
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
        })
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_string())
        })
        .collect()
}

/// Where AMQP clients connect from (cheap to clone, `Send`).
#[derive(Clone, Debug)]
pub struct ClientSide {
    netns: PathBuf,
    addr: Ipv4Addr,
    vip: SocketAddrV4,
    handle: tokio::runtime::Handle,
}

/// Counts of a finished client (or a sum of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub clients: u64,
    /// Messages the broker confirmed (publisher confirms, ack).
    pub confirmed: u64,
    /// Messages consumed (and acked), each checked to be the next one.
    pub consumed: u64,
    /// Messages left in the queues at the end.
    pub left: u64,
}

/// Clients running in rounds on the lab's runtime ([`RabbitLab::start_load`]).
pub struct Load {
    stop: Arc<AtomicBool>,
    confirmed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<(SocketAddrV4, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<(AmqpClient, Result<()>)>>,
    cancel: Option<&'static AtomicBool>,
}

impl Load {
    /// Confirmed (and consumed back) messages so far, all clients.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// The clients that failed so far (their source) and why.
    pub fn errors(&self) -> Vec<(SocketAddrV4, String)> {
        self.errors.lock().expect("errors").clone()
    }

    /// Waits until `more` messages beyond now were confirmed and consumed
    /// (the load is flowing), or fails after `deadline`.
    pub fn wait_progress(&self, more: u64, deadline: Duration) -> Result<()> {
        let target = self.confirmed() + more;
        wait_for("the load to make progress", deadline, || {
            cancelled(self.cancel)?;
            Ok((self.confirmed() >= target).then_some(()))
        })
    }
}

/// A real AMQP client through the VIP: one connection from a chosen source
/// port, one channel in confirm mode with a consumer (manual acks) on its
/// own queue on the node it reached.
pub struct AmqpClient {
    /// The client's end of the flow (what the LB hashes).
    pub src: SocketAddrV4,
    /// The node that answered, by its Connection.Start cluster name.
    pub cluster_name: String,
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
    queue: String,
    /// Id of the next message to publish / expected from the consumer.
    next: u64,
    expect: u64,
    confirmed: u64,
    consumed: u64,
}

impl AmqpClient {
    /// Connects from `side`'s namespace and `port` to the VIP, reads which
    /// node answered, declares the queue `q-<port>` there, turns on
    /// publisher confirms and starts consuming it with manual acks.
    pub async fn connect(side: &ClientSide, port: u16) -> Result<AmqpClient> {
        let src = SocketAddrV4::new(side.addr, port);
        tokio::time::timeout(AMQP_TIMEOUT, Self::connect_inner(side, src))
            .await
            .map_err(|_| anyhow!("no AMQP connection from {src} within {AMQP_TIMEOUT:?}"))?
    }

    async fn connect_inner(side: &ClientSide, src: SocketAddrV4) -> Result<AmqpClient> {
        let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
        let tokio = Tokio::default().with_handle(side.handle.clone());
        let runtime = Runtime::new(RuntimeParts::new(tokio.clone(), SniffReactor(tokio)));
        let uri: AMQPUri = format!("amqp://guest:guest@{}/%2f", side.vip)
            .parse()
            .map_err(|e| anyhow!("AMQP URI: {e}"))?;
        let (netns, vip, sniffed) = (side.netns.clone(), side.vip, seen.clone());
        let conn = Connection::connector(
            uri,
            runtime,
            async move |_uri, _rt| {
                // The socket is made and bound inside the client namespace;
                // it stays there whichever thread uses it.
                let socket = netns::in_netns(&netns, || -> io::Result<tokio::net::TcpSocket> {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    s.set_reuseaddr(true)?;
                    s.bind(src.into())?;
                    Ok(s)
                })
                .map_err(io::Error::other)??;
                let stream = socket.connect(vip.into()).await?;
                stream.set_nodelay(true)?;
                Ok(AsyncTcpStream::Plain(Sniffed {
                    inner: stream,
                    seen: sniffed.clone(),
                }))
            },
            ConnectionProperties::default().with_connection_name(format!("mqlb-test {src}").into()),
        )
        .await
        .with_context(|| format!("AMQP connection from {src} to {}", side.vip))?;
        let cluster_name = connection_start_cluster_name(&seen.lock().expect("sniffed"))?
            .context("the connection is up but no Connection.Start was seen")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let queue = format!("q-{}", src.port());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "c".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(AmqpClient {
            src,
            cluster_name,
            conn,
            channel,
            consumer,
            queue,
            next: 0,
            expect: 0,
            confirmed: 0,
            consumed: 0,
        })
    }

    /// Whether the connection is still open.
    pub fn connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// Messages the broker confirmed so far.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Messages consumed (in order, each once) and acked so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Publishes `n` messages and waits for the broker to
    /// confirm every one, then consumes `n` and acks each, checking each is
    /// the next one published (none lost, none twice, none redelivered).
    pub async fn round(&mut self, n: usize) -> Result<()> {
        let src = self.src;
        tokio::time::timeout(AMQP_TIMEOUT, self.round_inner(n))
            .await
            .map_err(|_| anyhow!("client {src}: a round took over {AMQP_TIMEOUT:?}"))?
            .with_context(|| format!("client {src} on {}", self.cluster_name))
    }

    async fn round_inner(&mut self, n: usize) -> Result<()> {
        let mut confirms = Vec::with_capacity(n);
        for _ in 0..n {
            let mut payload = self.next.to_be_bytes().to_vec();
            payload.resize(64, b'm');
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default(),
                )
                .await
                .with_context(|| format!("publish message {}", self.next))?;
            confirms.push((self.next, confirm));
            self.next += 1;
        }
        for (id, confirm) in confirms {
            let c = confirm
                .await
                .with_context(|| format!("confirm of message {id}"))?;
            ensure!(c.is_ack(), "the broker did not confirm message {id}: {c:?}");
            self.confirmed += 1;
        }
        for _ in 0..n {
            let delivery = self
                .consumer
                .next()
                .await
                .context("the consumer ended")?
                .context("delivery")?;
            let id = delivery
                .data
                .get(..8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
                .context("a message without an id")?;
            ensure!(
                id == self.expect,
                "consumed message {id}, expected {} (lost or duplicated)",
                self.expect
            );
            ensure!(!delivery.redelivered, "message {id} was redelivered");
            delivery
                .ack(BasicAckOptions::default())
                .await
                .with_context(|| format!("ack of message {id}"))?;
            self.expect += 1;
            self.consumed += 1;
        }
        Ok(())
    }

    /// Stops consuming (no delivery may be pending: that would be a message
    /// twice), deletes the queue (it must be empty) and closes the connection.
    pub async fn finish(mut self) -> Result<Tally> {
        tokio::time::timeout(AMQP_TIMEOUT, async {
            self.channel
                .basic_cancel("c".into(), BasicCancelOptions::default())
                .await?;
            if let Ok(Some(Ok(extra))) =
                tokio::time::timeout(Duration::from_millis(100), self.consumer.next()).await
            {
                bail!(
                    "a delivery beyond the {} consumed: {:?}",
                    self.consumed,
                    extra.data.get(..8)
                );
            }
            let left = self
                .channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            self.conn.close(200, "OK".into()).await?;
            Ok(Tally {
                clients: 1,
                confirmed: self.confirmed,
                consumed: self.consumed,
                left: left.into(),
            })
        })
        .await
        .map_err(|_| anyhow!("closing took over {AMQP_TIMEOUT:?}"))?
    }
}

/// A reactor that is tokio's except that its TCP stream type is
/// [`Sniffed`]: lapin does not expose the server properties of
/// Connection.Start, so the client's stream keeps a copy of the first bytes
/// it reads, which [`connection_start_cluster_name`] parses.
#[derive(Clone, Debug)]
struct SniffReactor(Tokio);

impl Reactor for SniffReactor {
    type TcpStream = Sniffed;
    type Sleep = <Tokio as Reactor>::Sleep;

    fn register<H>(
        &self,
        socket: H,
    ) -> io::Result<impl futures_io::AsyncRead + futures_io::AsyncWrite + Send + Unpin + 'static>
    where
        H: io::Read + io::Write + std::os::fd::AsFd + std::os::fd::AsRawFd + Send + 'static,
    {
        self.0.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(
        &self,
        dur: Duration,
    ) -> impl futures_lite::Stream<Item = Instant> + Send + 'static {
        self.0.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Sniffed>> + Send + 'static {
        // Not used by the lab (it connects itself), but a whole reactor.
        let handle = self.0.clone();
        async move {
            let stream = handle.tcp_connect_addr(addr).await?.into_inner();
            Ok(Sniffed {
                inner: stream,
                seen: Arc::default(),
            })
        }
    }
}

/// A tokio TCP stream as a futures-io stream that keeps a copy of the first
/// [`SNIFF_LIMIT`] bytes it reads.
struct Sniffed {
    inner: tokio::net::TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl futures_io::AsyncRead for Sniffed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut rb = tokio::io::ReadBuf::new(buf);
        match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.inner), cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                let mut seen = self.seen.lock().expect("sniffed");
                let room = SNIFF_LIMIT.saturating_sub(seen.len()).min(n);
                seen.extend_from_slice(&buf[..room]);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures_io::AsyncWrite for Sniffed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(Pin::new(&mut self.inner), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.inner), cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Connection.Start frame as RabbitMQ 3.10 sends it, trimmed to the
    /// properties that matter here.
    fn start_frame(cluster_name: &str) -> Vec<u8> {
        let mut table = Vec::new();
        let mut prop = |k: &str, v: &str| {
            table.push(k.len() as u8);
            table.extend_from_slice(k.as_bytes());
            table.push(b'S');
            table.extend_from_slice(&(v.len() as u32).to_be_bytes());
            table.extend_from_slice(v.as_bytes());
        };
        prop("cluster_name", cluster_name);
        prop("product", "RabbitMQ");
        let mut payload = vec![0, 10, 0, 10, 0, 9];
        payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
        payload.extend_from_slice(&table);
        for s in ["PLAIN AMQPLAIN", "en_US"] {
            payload.extend_from_slice(&(s.len() as u32).to_be_bytes());
            payload.extend_from_slice(s.as_bytes());
        }
        let mut frame = vec![1, 0, 0];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        frame
    }

    #[test]
    fn cluster_name_from_connection_start() {
        let frame = start_frame("mqlb-b2");
        for cut in 0..frame.len() {
            assert_eq!(
                connection_start_cluster_name(&frame[..cut]).unwrap(),
                None,
                "incomplete at {cut}"
            );
        }
        assert_eq!(
            connection_start_cluster_name(&frame).unwrap().as_deref(),
            Some("mqlb-b2")
        );
        let mut more = frame.clone();
        more.extend_from_slice(&[1, 0, 1]);
        assert_eq!(
            connection_start_cluster_name(&more).unwrap().as_deref(),
            Some("mqlb-b2"),
            "bytes after the frame are ignored"
        );
        let mut bad = frame;
        bad[0] = 8;
        assert!(connection_start_cluster_name(&bad).is_err());
    }
}
