//! The `mqlb` command line: clap definitions, what each command does, and
//! how its answer is printed. Commands other than `up`, `down` and `decap`
//! are API calls to the running daemon.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{ArgGroup, Args, Parser, Subcommand};
use lb_common::{Counter, DropReason};

use crate::{
    api::{BackendView, ServiceView, ShutdownReply, ShutdownRequest, StatsView},
    client::{segment, Client, ClientError},
    daemon::{self, DaemonError, UpOptions, DEFAULT_SOCKET, DEFAULT_STATE_ROOT},
    health::{CheckKind, HealthConfig, HealthSpec, HealthView, OnDown, Status},
    host,
    loader::{self, LoadError, Mode},
    manifest::{self, ApplyReply, ApplyRequest, Desired, Manifest, ManifestError},
    probe::FlowView,
    state::{
        check_health_port, parse_backend_addr, parse_vip, Backend, BackendSpec, BackendState,
        BackendUpdate, Hash, Proto, ServiceSpec, ServiceUpdate, StateError, DEFAULT_UDP_IDLE_S,
        DEFAULT_WEIGHT,
    },
};

/// XDP layer-4 load balancer for AMQP and RTP traffic (direct server return over IPIP).
#[derive(Debug, Parser)]
#[command(name = "mqlb", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's API socket [default: /run/mqlb/mqlb.sock]
    #[arg(long, global = true, env = "MQLB_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground: attach XDP to IF, restore the saved state, serve the API
    Up(UpArgs),
    /// Stop the daemon of IF and detach mqlb from IF (removes its pins; conntrack is lost)
    Down {
        /// Interface to detach from
        #[arg(long, value_name = "IF")]
        iface: String,
    },
    /// Add, delete and list services (VIP:PORT, VIP:LO-HI or VIP:*, and a protocol)
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, change, delete and list the backends of a service
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Show counters: verdicts, drops by reason, per service and per backend
    Stats {
        /// Print JSON instead of tables
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Live view of per-second rates, polled every --interval
        ///
        /// On a terminal: a full-screen table redrawn in place (like top) with
        /// each service and backend's state, weight, health, packets/s, bytes/s
        /// and new flows/s, plus drops/s by reason; q, Esc or Ctrl-C quits. If
        /// the daemon stops answering, the last table stays, an error line shows
        /// and polling goes on until it answers again.
        ///
        /// Otherwise (a pipe or a file): one plain line per service, per backend
        /// and for drops each interval, with an RFC 3339 timestamp, until killed
        /// or the reader goes away (exit 0). If the daemon stops answering, the
        /// error is printed on stderr and the exit code is 1.
        ///
        /// A counter that went down (daemon restarted) shows 0 for that interval.
        #[arg(long, verbatim_doc_comment)]
        watch: bool,
        /// Poll every DURATION with --watch: 2, 500ms, 1m (100ms to 1h) [default: 1s]
        #[arg(long, value_name = "DURATION", requires = "watch", value_parser = crate::watch::parse_interval)]
        interval: Option<Duration>,
    },
    /// Show which backend a client's flow goes to, and why (conntrack or table)
    ///
    /// Asks the loaded program itself: the daemon builds the packet the
    /// client would send to the service's VIP (IPv4 or IPv6, as the VIP; a
    /// TCP ACK, so an existing conntrack entry is honoured, or a UDP
    /// datagram), runs it through the XDP program on the live maps with
    /// BPF_PROG_TEST_RUN, and names the backend from the outer destination
    /// of the tunnel packet that comes out (IPv4 or IPv6, as the backend).
    ///
    /// Side effects: on a conntrack miss the program inserts an entry for the
    /// probe's flow; the daemon deletes it right after (and puts back an
    /// entry the probe replaced), so a probe never pins a later real flow.
    /// The probe packet itself is counted in the counters (`mqlb stats`)
    /// like any packet: one rx, one ct hit or miss, one packet to the
    /// service and the backend (per-CPU counters cannot be undone).
    #[command(verbatim_doc_comment)]
    Flow {
        /// Service name
        service: String,
        /// The client's address and source port, of the VIP's family:
        /// IPV4:PORT or [IPV6]:PORT
        #[arg(long, value_name = "IP:PORT")]
        client: String,
        /// Destination port: one of a port-range service's ports (refused
        /// outside its range, or on a port an exact-port service takes)
        /// [default: the service's port; its lowest for a range]
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Make the daemon's services and backends match FILE; print the changes
    ///
    /// FILE is TOML, as `mqlb export` writes it:
    ///
    ///   seed = 0
    ///
    ///   [[service]]
    ///   name = "amqp"
    ///   vip = "10.0.0.10:5672"
    ///   proto = "tcp"
    ///   check = "amqp"
    ///   backends = [
    ///       { ip = "10.0.1.1", weight = 100 },
    ///       { ip = "10.0.1.2", weight = 200, state = "draining" },
    ///   ]
    ///
    /// A service's keys are the `service add` options in snake case: name,
    /// vip (IP:PORT, IP:LO-HI or IP:*), proto, hash, udp_idle, ring_size,
    /// check, check_interval, check_timeout, rise, fall, check_port,
    /// check_user, check_password, panic_threshold, on_down. A key left out
    /// takes its default. A service or
    /// backend the file does not have is deleted (established flows finish,
    /// as with `del`); `service = []` deletes every service. A service is
    /// known by its name, a backend by its address. Without `seed` the
    /// daemon's seed stays; a new seed re-hashes new flows only.
    /// check_password = "***" keeps the password the daemon has stored.
    ///
    /// The whole file is checked first (errors name FILE:LINE and the
    /// field), then applied in one step and saved: all of it or nothing.
    /// Changes print one per line: `+` added, `-` deleted, `~` changed.
    #[command(verbatim_doc_comment)]
    Apply {
        /// The file to apply; - reads standard input
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Print the changes without applying them
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the daemon's seed, services and backends as a file for `mqlb apply -f`
    ///
    /// `mqlb export > mqlb.toml; mqlb apply -f mqlb.toml` changes nothing.
    /// Check passwords are written as "***" (applying that keeps the stored
    /// password): the export is safe to share but holds no secret.
    #[command(verbatim_doc_comment)]
    Export,
    /// Attach the IPIP decapsulator to IF on a backend host (no daemon needed)
    Decap(DecapArgs),
    /// Print the shell completion script for SHELL to stdout
    Completions {
        /// Shell to complete in
        #[arg(value_enum)]
        shell: crate::docs::Shell,
    },
    /// Print the man page mqlb.1, or write one page per command into DIR
    Man {
        /// Directory to write mqlb.1, mqlb-service.1, ... into
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Interface to load balance on
    #[arg(long, value_name = "IF")]
    pub iface: String,
    /// TOML file: daemon settings (mode, socket, state_dir, ct_entries, seed,
    /// metrics; flags win) and, if it has [[service]] tables (or `service =
    /// []`), the services to run, applied at start as `mqlb apply -f` does
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// XDP mode: auto tries native then falls back to skb [default: auto]
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Directory of the saved state [default: /var/lib/mqlb/IF]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Conntrack capacity for a new conntrack map [default: 1048576, or the pinned map's size]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub ct_entries: Option<u32>,
    /// Flow hash seed, the same on every LB of a cluster (saved) [default: the saved seed, else 0]
    #[arg(long, value_name = "N")]
    pub seed: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9433) [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Add a service
    Add {
        /// Name (letters, digits, '.', '_', '-')
        name: String,
        /// Virtual IP and port (10.0.0.10:5672), a port range (10.0.0.10:5004-5099)
        /// or every port (10.0.0.10:*); IPv6 in brackets ([2001:db8::1]:5004-5099).
        /// One range per VIP and protocol; an exact-port service on the same VIP
        /// (inside the range or not) takes its port from the range
        #[arg(long, value_name = "IP:PORT|IP:LO-HI|IP:*")]
        vip: String,
        /// Transport protocol
        #[arg(long, value_enum)]
        proto: Proto,
        /// Flow hash
        #[arg(long, value_enum, default_value_t = Hash::FiveTuple)]
        hash: Hash,
        /// UDP conntrack idle timeout in seconds (1-86400)
        #[arg(long, value_name = "SECS", default_value_t = DEFAULT_UDP_IDLE_S as u64)]
        udp_idle: u64,
        /// Maglev table size: a prime up to 65537
        #[arg(long, value_name = "N", default_value_t = lb_common::RING_DEFAULT as u64)]
        ring_size: u64,
        #[command(flatten)]
        health: HealthArgs,
    },
    /// Change a service's health check settings (the others keep their values)
    Set {
        /// Service name
        name: String,
        #[command(flatten)]
        health: HealthArgs,
    },
    /// Delete a service (its backends' established flows finish)
    Del {
        /// Service name
        name: String,
    },
    /// List services
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// Health check options of `service add` and `service set`.
#[derive(Debug, Default, Args)]
pub struct HealthArgs {
    /// Health check: none, tcp, amqp or http:URL; in the URL, {backend} stands
    /// for the backend address, e.g.
    /// http:http://{backend}:15672/api/health/checks/alarms [default: none]
    #[arg(long, value_name = "KIND")]
    pub check: Option<String>,
    /// Time between checks, e.g. 2s, 500ms [default: 2s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_ms)]
    pub check_interval: Option<u64>,
    /// Time a check may take, shorter than the interval [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_ms)]
    pub check_timeout: Option<u64>,
    /// Passed checks in a row that bring a backend back (1-100) [default: 2]
    #[arg(long, value_name = "N")]
    pub rise: Option<u64>,
    /// Failed checks in a row that take a backend out (1-100) [default: 3]
    #[arg(long, value_name = "N")]
    pub fall: Option<u64>,
    /// Port the tcp and amqp checks probe on the backend's address; 0: the
    /// service port. A port-range service has no single port: its tcp and
    /// amqp checks need this [default: the service port]
    #[arg(long, value_name = "PORT")]
    pub check_port: Option<u16>,
    /// Basic auth user of the http check; '' removes the credentials
    #[arg(long, value_name = "USER")]
    pub check_user: Option<String>,
    /// Basic auth password of the http check (saved in the state file, mode
    /// 0600; the API shows ***)
    #[arg(long, value_name = "PASSWORD")]
    pub check_password: Option<String>,
    /// Panic mode below this percentage of backends passing their check:
    /// route over all of them; 0 disables it (0-100) [default: 50]
    #[arg(long, value_name = "PCT")]
    pub panic_threshold: Option<u64>,
    /// What happens to the established flows of a backend whose check fails
    /// (it takes no new flows either way) [default: reset]
    #[arg(long, value_enum)]
    pub on_down: Option<OnDown>,
}

impl HealthArgs {
    /// The options as the API takes them; a bad check kind is refused here.
    pub fn spec(&self) -> Result<HealthSpec, StateError> {
        Ok(HealthSpec {
            check: self.check.as_deref().map(str::parse).transpose()?,
            interval_ms: self.check_interval,
            timeout_ms: self.check_timeout,
            rise: self.rise,
            fall: self.fall,
            port: self.check_port,
            user: self.check_user.clone(),
            password: self.check_password.clone(),
            panic_threshold: self.panic_threshold,
            on_down: self.on_down,
        })
    }
}

/// `2s`, `500ms`, `1m` → milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 2s or 500ms)"))?;
    u64::try_from(d.as_millis()).map_err(|_| "too long".to_string())
}

#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a service (active)
    Add {
        /// Service name
        service: String,
        /// Backend address (the IPIP outer destination)
        ip: String,
        /// Relative share of new flows (1-65535)
        #[arg(long, value_name = "W", default_value_t = DEFAULT_WEIGHT as u64)]
        weight: u64,
    },
    /// Change a backend: its weight, or drain it (no new flows) or undrain it
    #[command(group(ArgGroup::new("change").required(true).multiple(false)))]
    Set {
        /// Service name
        service: String,
        /// Backend address
        ip: String,
        /// New weight (1-65535)
        #[arg(long, value_name = "W", group = "change")]
        weight: Option<u64>,
        /// Take it out of the table; established flows stay
        #[arg(long, group = "change")]
        drain: bool,
        /// Put it back in the table
        #[arg(long, group = "change")]
        undrain: bool,
    },
    /// Delete a backend (its established flows finish)
    Del {
        /// Service name
        service: String,
        /// Backend address
        ip: String,
    },
    /// List the backends of a service
    List {
        /// Service name
        service: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct DecapArgs {
    /// Interface the IPIP packets arrive on
    #[arg(long, value_name = "IF")]
    pub iface: String,
    /// XDP mode: auto tries native then falls back to skb
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Detach the decapsulator and remove its pins instead
    #[arg(long)]
    pub detach: bool,
}

/// Everything a command can fail with; each prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot read config file {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "{file} has no services (no [[service]] table); write `service = []` to delete every service"
    )]
    NoServices { file: String },
    #[error("the daemon for {iface} did not exit within {secs} s")]
    StillRunning { iface: String, secs: u64 },
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error(transparent)]
    Docs(#[from] crate::docs::DocsError),
}

/// Runs a parsed command line; what it prints goes to stdout.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let client = Client::new(
        cli.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
    );
    match cli.command {
        Command::Up(args) => {
            let opts = up_options(&args, cli.socket.as_deref())?;
            daemon::run(opts).await?;
        }
        Command::Down { iface } => down(&client, &iface).await?,
        Command::Service(cmd) => service(&client, cmd).await?,
        Command::Backend(cmd) => backend(&client, cmd).await?,
        Command::Stats {
            watch: true,
            interval,
            ..
        } => {
            let interval = interval.unwrap_or(crate::watch::DEFAULT_INTERVAL);
            crate::watch::run(&client, interval).await?;
        }
        Command::Stats { json, .. } => {
            let s: StatsView = client.get("/v1/stats").await?;
            if json {
                println!("{}", to_json(&s));
            } else {
                print!("{}", format_stats(&s));
            }
        }
        Command::Flow {
            service,
            client: addr,
            port,
            json,
        } => {
            crate::probe::parse_client(&addr)?;
            let v: FlowView = client.get(&flow_path(&service, &addr, port)).await?;
            if json {
                println!("{}", to_json(&v));
            } else {
                println!("{}", crate::probe::format_flow(&v));
            }
        }
        Command::Apply { file, dry_run } => apply(&client, &file, dry_run).await?,
        Command::Export => {
            let d: Desired = client.get("/v1/export").await?;
            print!("{}", manifest::to_toml(&d));
        }
        Command::Decap(args) => decap(&args)?,
        Command::Completions { shell } => crate::docs::print_completions(shell)?,
        Command::Man { out } => crate::docs::print_man(out.as_deref())?,
    }
    Ok(())
}

/// `GET /v1/services/{name}/flow?client=IP:PORT[&port=P]`.
fn flow_path(service: &str, client: &str, port: Option<u16>) -> String {
    let mut path = format!(
        "/v1/services/{}/flow?client={}",
        segment(service),
        segment(client.trim())
    );
    if let Some(p) = port {
        let _ = write!(path, "&port={p}");
    }
    path
}

/// Reads a file (`-`: standard input): its name for messages and its text.
fn read_file(path: &Path) -> Result<(String, String), CliError> {
    let err = |e: std::io::Error| CliError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if path == Path::new("-") {
        let text = std::io::read_to_string(std::io::stdin()).map_err(err)?;
        return Ok(("<stdin>".into(), text));
    }
    let text = std::fs::read_to_string(path).map_err(err)?;
    Ok((path.display().to_string(), text))
}

/// Parses a file and checks its services (if any) without the daemon.
fn read_manifest(path: &Path) -> Result<(String, String, Manifest), CliError> {
    let (name, text) = read_file(path)?;
    let m = manifest::parse(&name, &text)?;
    if let Some(d) = m.desired() {
        manifest::check(&d).map_err(|e| manifest::locate(&name, &text, &e))?;
    }
    Ok((name, text, m))
}

/// `mqlb apply -f FILE`: checked here (FILE:LINE errors before any
/// request), then sent whole in one request; the daemon checks it again
/// against its own state and limits.
async fn apply(client: &Client, file: &Path, dry_run: bool) -> Result<(), CliError> {
    let (name, text, m) = read_manifest(file)?;
    let desired = m
        .desired()
        .ok_or(CliError::NoServices { file: name.clone() })?;
    let keys = m.daemon_keys();
    if !keys.is_empty() {
        eprintln!(
            "note: {name}: {} only apply at `mqlb up --config`; apply leaves them",
            keys.join(", ")
        );
    }
    let req = ApplyRequest { dry_run, desired };
    let reply: ApplyReply = match client
        .call_full(hyper::Method::POST, "/v1/apply", Some(&req))
        .await?
    {
        Ok(r) => r,
        Err((_, e)) if e.at.is_some() => {
            let at = e.at.unwrap_or_default();
            return Err(manifest::locate_message(&name, &text, &at, e.error).into());
        }
        Err((status, e)) => {
            return Err(ClientError::Api {
                status,
                message: e.error,
            }
            .into())
        }
    };
    print!("{}", format_apply(&reply));
    Ok(())
}

/// The changes, then one summary line (nothing more when there are none).
pub fn format_apply(reply: &ApplyReply) -> String {
    let mut out = manifest::format_changes(&reply.changes);
    let n = reply.changes.len();
    let changes = if n == 1 { "change" } else { "changes" };
    if n > 0 && reply.applied {
        let _ = writeln!(out, "applied {n} {changes}");
    } else if n > 0 {
        let _ = writeln!(out, "dry run: {n} {changes}, nothing applied");
    }
    out
}

/// Merges flags, the config file and defaults (flags win).
pub fn up_options(args: &UpArgs, socket: Option<&Path>) -> Result<UpOptions, CliError> {
    let (desired, file) = match &args.config {
        Some(path) => {
            let (_, _, m) = read_manifest(path)?;
            (m.desired(), m.config())
        }
        None => (None, Default::default()),
    };
    Ok(UpOptions {
        iface: args.iface.clone(),
        mode: args.mode.or(file.mode).unwrap_or_default(),
        socket: socket
            .map(Path::to_path_buf)
            .or(file.socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.into()),
        state_dir: args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| Path::new(DEFAULT_STATE_ROOT).join(&args.iface)),
        ct_entries: args.ct_entries.or(file.ct_entries),
        seed: args.seed.or(file.seed),
        metrics: args.metrics.or(file.metrics),
        desired,
        config: args.config.clone(),
    })
}

async fn service(client: &Client, cmd: ServiceCmd) -> Result<(), CliError> {
    match cmd {
        ServiceCmd::Add {
            name,
            vip,
            proto,
            hash,
            udp_idle,
            ring_size,
            health,
        } => {
            let vip_addr = parse_vip(&vip)?;
            let health = health.spec()?;
            // Refuse bad check settings before any request.
            check_health_port(vip_addr, &HealthConfig::default().apply(&health)?)?;
            let spec = ServiceSpec {
                name,
                vip,
                proto,
                hash,
                udp_idle_s: Some(udp_idle),
                ring_size: Some(ring_size),
                health,
            };
            let s: ServiceView = client.post("/v1/services", &spec).await?;
            let s = s.service;
            println!(
                "service {} added: {}/{}, hash {}, id {}; {}",
                s.name,
                s.vip,
                s.proto,
                s.hash,
                s.id,
                s.health.summary(s.vip.port())
            );
        }
        ServiceCmd::Set { name, health } => {
            let update = ServiceUpdate {
                health: health.spec()?,
            };
            if update.health.is_empty() {
                return Err(StateError::EmptyServiceUpdate.into());
            }
            let s: ServiceView = client
                .patch(&format!("/v1/services/{}", segment(&name)), &update)
                .await?;
            let s = s.service;
            println!("service {}: {}", s.name, s.health.summary(s.vip.port()));
        }
        ServiceCmd::Del { name } => {
            let s: ServiceView = client
                .delete(&format!("/v1/services/{}", segment(&name)))
                .await?;
            let s = s.service;
            if s.backends.is_empty() {
                println!("service {} deleted", s.name);
            } else {
                println!(
                    "service {} deleted; its {} backends keep their established flows",
                    s.name,
                    s.backends.len()
                );
            }
        }
        ServiceCmd::List { json } => {
            let list: Vec<ServiceView> = client.get("/v1/services").await?;
            if json {
                println!("{}", to_json(&list));
            } else {
                print!("{}", format_services(&list));
            }
        }
    }
    Ok(())
}

async fn backend(client: &Client, cmd: BackendCmd) -> Result<(), CliError> {
    match cmd {
        BackendCmd::Add {
            service,
            ip,
            weight,
        } => {
            parse_backend_addr(&ip)?;
            let spec = BackendSpec {
                addr: ip,
                weight: Some(weight),
            };
            let b: Backend = client
                .post(
                    &format!("/v1/services/{}/backends", segment(&service)),
                    &spec,
                )
                .await?;
            println!(
                "backend {} added to {service} (weight {}, id {})",
                b.addr, b.weight, b.id
            );
        }
        BackendCmd::Set {
            service,
            ip,
            weight,
            drain,
            undrain,
        } => {
            let addr = parse_backend_addr(&ip)?;
            let update = BackendUpdate {
                weight,
                state: if drain {
                    Some(BackendState::Draining)
                } else if undrain {
                    Some(BackendState::Active)
                } else {
                    None
                },
            };
            let b: Backend = client.patch(&backend_path(&service, addr), &update).await?;
            println!(
                "backend {} of {service}: {}, weight {}",
                b.addr, b.state, b.weight
            );
        }
        BackendCmd::Del { service, ip } => {
            let addr = parse_backend_addr(&ip)?;
            let b: Backend = client.delete(&backend_path(&service, addr)).await?;
            println!(
                "backend {} deleted from {service}; its established flows finish",
                b.addr
            );
        }
        BackendCmd::List { service, json } => {
            let list: Vec<BackendView> = client
                .get(&format!("/v1/services/{}/backends", segment(&service)))
                .await?;
            if json {
                println!("{}", to_json(&list));
            } else {
                print!("{}", format_backends(&list));
            }
        }
    }
    Ok(())
}

fn backend_path(service: &str, addr: IpAddr) -> String {
    format!(
        "/v1/services/{}/backends/{}",
        segment(service),
        segment(&addr.to_string())
    )
}

/// `mqlb down`: stop the daemon (if one serves IF), then unpin (detach).
async fn down(client: &Client, iface: &str) -> Result<(), CliError> {
    loader::require_root("mqlb down")?;
    let req = ShutdownRequest {
        iface: Some(iface.into()),
    };
    let mut stopped = false;
    match client.post::<ShutdownReply>("/v1/shutdown", &req).await {
        Ok(reply) => {
            let secs = 10;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
            while client.is_running().await {
                if tokio::time::Instant::now() > deadline {
                    return Err(CliError::StillRunning {
                        iface: iface.into(),
                        secs,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!(
                "stopped the mqlb daemon of {} (pid {})",
                reply.iface, reply.pid
            );
            stopped = true;
        }
        Err(ClientError::NotRunning { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    match loader::unload_lb(iface) {
        Ok(removed) => {
            let maps = removed.iter().filter(|p| !p.ends_with("link")).count();
            let link = removed.iter().any(|p| p.ends_with("link"));
            println!(
                "detached mqlb from {iface}: removed {}{maps} map pins under {}",
                if link { "the link pin and " } else { "" },
                loader::Pins::new(iface).root.display()
            );
            Ok(())
        }
        Err(LoadError::NotAttached { .. }) if stopped => {
            println!(
                "no pins left under {}",
                loader::Pins::new(iface).root.display()
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// `mqlb decap`: attach (or replace) the decapsulator, or detach it.
fn decap(args: &DecapArgs) -> Result<(), CliError> {
    loader::require_root("mqlb decap")?;
    if args.detach {
        let removed = loader::unload_decap(&args.iface)?;
        println!(
            "decap: detached from {}; removed {} pins under {}",
            args.iface,
            removed.len(),
            loader::Pins::new(&args.iface).decap().display()
        );
        return Ok(());
    }
    host::ifindex(&args.iface)?;
    if loader::ensure_bpffs()? {
        println!("decap: mounted bpffs at {}", loader::BPFFS);
    }
    let addrs = host::interface_addrs(&args.iface)?;
    let d = loader::load_decap(
        crate::programs::DECAP_OBJECT,
        crate::programs::DECAP_PROGRAM,
        &args.iface,
        args.mode,
        &addrs,
    )?;
    println!(
        "decap: {} {} on {} (prog id {}); link pinned at {}",
        crate::programs::DECAP_PROGRAM,
        d.attached,
        args.iface,
        d.prog_id,
        d.link.display()
    );
    if d.addrs.is_empty() {
        println!(
            "decap: {} has no address yet: nothing is decapsulated; run `mqlb decap` again after adding one",
            args.iface
        );
    } else {
        let list: Vec<String> = d.addrs.iter().map(ToString::to_string).collect();
        println!("decap: decapsulating IPIP addressed to {}", list.join(", "));
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("serializes")
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// The CHECK column: kind, port or URL, credentials as `user:***`.
fn check_cell(s: &crate::state::Service) -> String {
    let c = &s.health;
    match &c.check {
        CheckKind::None => "-".into(),
        CheckKind::Tcp | CheckKind::Amqp => match s.check_port() {
            Some(port) => format!("{}:{port}", c.check),
            None => c.check.to_string(),
        },
        CheckKind::Http(url) => match &c.user {
            Some(u) => format!("http {url} ({u}:{})", crate::health::REDACTED),
            None => format!("http {url}"),
        },
    }
}

pub fn format_services(list: &[ServiceView]) -> String {
    if list.is_empty() {
        return "no services\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            let s = &v.service;
            vec![
                s.name.clone(),
                s.vip.to_string(),
                s.proto.to_string(),
                s.hash.to_string(),
                if s.proto == Proto::Udp {
                    format!("{}s", s.udp_idle_s)
                } else {
                    "-".into()
                },
                s.ring_size.to_string(),
                format!("{}/{}", v.in_table, s.backends.len()),
                if v.panic { "PANIC" } else { "-" }.into(),
                check_cell(s),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "VIP",
            "PROTO",
            "HASH",
            "UDP-IDLE",
            "RING",
            "IN-TABLE/BACKENDS",
            "PANIC",
            "CHECK",
        ],
        &rows,
    )
}

/// The HEALTH column: `-` (not checked), `unchecked`, `up`, `down`, `draining`.
fn health_cell(h: Option<&HealthView>) -> String {
    match h {
        None => "-".into(),
        Some(h) if !h.checked && h.status == Status::Up => "unchecked".into(),
        Some(h) => h.status.to_string(),
    }
}

fn latency_cell(h: Option<&HealthView>) -> String {
    match h.and_then(|h| h.last_latency_us) {
        None => "-".into(),
        Some(us) if us < 10_000 => format!("{:.1}ms", us as f64 / 1000.0),
        Some(us) => format!("{}ms", us / 1000),
    }
}

/// Transitions to down / to up (and to draining when there were any).
fn transitions_cell(h: Option<&HealthView>) -> String {
    match h {
        None => "-".into(),
        Some(h) if h.transitions.draining > 0 => format!(
            "{}/{}/{}",
            h.transitions.down, h.transitions.up, h.transitions.draining
        ),
        Some(h) => format!("{}/{}", h.transitions.down, h.transitions.up),
    }
}

pub fn format_backends(list: &[BackendView]) -> String {
    if list.is_empty() {
        return "no backends\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            let b: &Backend = &v.backend;
            let h = v.health.as_ref();
            vec![
                b.addr.to_string(),
                b.weight.to_string(),
                b.state.to_string(),
                health_cell(h),
                if v.in_table { "yes" } else { "no" }.into(),
                latency_cell(h),
                transitions_cell(h),
                b.id.to_string(),
                h.and_then(|h| h.last_transition.clone())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "ADDR",
            "WEIGHT",
            "STATE",
            "HEALTH",
            "IN-TABLE",
            "CHECK-TIME",
            "DOWN/UP",
            "ID",
            "LAST-CHANGE",
        ],
        &rows,
    )
}

pub fn format_stats(s: &StatsView) -> String {
    let mut out = String::new();
    let get = |m: &std::collections::BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let counters: Vec<String> = Counter::ALL
        .iter()
        .map(|c| format!("{} {}", c.name(), get(&s.counters, c.name())))
        .collect();
    let _ = writeln!(out, "packets: {}", counters.join("  "));
    let drops: Vec<String> = DropReason::ALL
        .iter()
        .map(|d| format!("{} {}", d.name(), get(&s.drops, d.name())))
        .collect();
    let _ = writeln!(out, "drops:   {}", drops.join("  "));
    if s.services.is_empty() {
        out.push_str("no services\n");
        return out;
    }
    let mut rows = Vec::new();
    for svc in &s.services {
        rows.push(vec![
            svc.name.clone(),
            format!("{}/{}", svc.vip, svc.proto),
            if svc.panic { "PANIC" } else { "" }.into(),
            String::new(),
            String::new(),
            String::new(),
            svc.packets.to_string(),
            svc.bytes.to_string(),
            svc.new_flows.to_string(),
        ]);
        for b in &svc.backends {
            let h = b.health.as_ref();
            rows.push(vec![
                String::new(),
                format!("  {}", b.addr),
                b.state.to_string(),
                health_cell(h),
                transitions_cell(h),
                b.weight.to_string(),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.new_flows.to_string(),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table(
        &[
            "SERVICE",
            "VIP / BACKEND",
            "STATE",
            "HEALTH",
            "DOWN/UP",
            "WEIGHT",
            "PACKETS",
            "BYTES",
            "NEW-FLOWS",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mqlb").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_takes_its_flags() {
        let cli = parse(&[
            "up",
            "--iface",
            "eth1",
            "--mode",
            "skb",
            "--ct-entries",
            "4096",
            "--seed",
            "9",
            "--state-dir",
            "/tmp/s",
        ])
        .unwrap();
        let Command::Up(args) = cli.command else {
            panic!("not up")
        };
        let o = up_options(&args, None).unwrap();
        assert_eq!(o.iface, "eth1");
        assert_eq!(o.mode, Mode::Skb);
        assert_eq!(o.ct_entries, Some(4096));
        assert_eq!(o.seed, Some(9));
        assert_eq!(o.state_dir, Path::new("/tmp/s"));
        assert_eq!(o.socket, Path::new(DEFAULT_SOCKET));
        assert!(parse(&["up"]).is_err(), "--iface is required");
        assert!(parse(&["up", "--iface", "x", "--mode", "turbo"]).is_err());
        assert!(parse(&["up", "--iface", "x", "--ct-entries", "0"]).is_err());
    }

    #[test]
    fn up_defaults_and_config_file() {
        let cli = parse(&["up", "--iface", "eth1"]).unwrap();
        let Command::Up(args) = cli.command else {
            panic!()
        };
        let o = up_options(&args, None).unwrap();
        assert_eq!(o.mode, Mode::Auto);
        assert_eq!(o.state_dir, Path::new("/var/lib/mqlb/eth1"));
        assert_eq!((o.ct_entries, o.seed), (None, None));

        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("mqlb.toml");
        std::fs::write(
            &cfg,
            "mode = \"native\"\nseed = 5\nsocket = \"/tmp/c.sock\"\n",
        )
        .unwrap();
        let cli = parse(&[
            "--socket",
            "/tmp/flag.sock",
            "up",
            "--iface",
            "eth1",
            "--config",
            cfg.to_str().unwrap(),
            "--seed",
            "6",
        ])
        .unwrap();
        let Command::Up(args) = cli.command else {
            panic!()
        };
        let o = up_options(&args, cli.socket.as_deref()).unwrap();
        assert_eq!(o.mode, Mode::Native, "from the file");
        assert_eq!(o.seed, Some(6), "the flag wins");
        assert_eq!(o.socket, Path::new("/tmp/flag.sock"));

        std::fs::write(&cfg, "bogus = 1\n").unwrap();
        let err = up_options(&args, None).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:1: field bogus: unknown field", cfg.display())),
            "{err}"
        );
        std::fs::remove_file(&cfg).unwrap();
        let err = up_options(&args, None).unwrap_err().to_string();
        assert!(err.starts_with("cannot read config file"), "{err}");
    }

    #[test]
    fn up_metrics_is_off_unless_given() {
        let up = |argv: &[&str]| {
            let Command::Up(args) = parse(argv).unwrap().command else {
                panic!("not up")
            };
            up_options(&args, None).unwrap()
        };
        assert_eq!(up(&["up", "--iface", "eth1"]).metrics, None);
        let o = up(&["up", "--iface", "eth1", "--metrics", "127.0.0.1:9433"]);
        assert_eq!(o.metrics, Some("127.0.0.1:9433".parse().unwrap()));
        assert!(parse(&["up", "--iface", "x", "--metrics", "localhost"]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("mqlb.toml");
        std::fs::write(&cfg, "metrics = \"[::1]:9433\"\n").unwrap();
        let path = cfg.to_str().unwrap();
        let o = up(&["up", "--iface", "eth1", "--config", path]);
        assert_eq!(o.metrics, Some("[::1]:9433".parse().unwrap()));
        let o = up(&[
            "up",
            "--iface",
            "eth1",
            "--config",
            path,
            "--metrics",
            "0.0.0.0:1",
        ]);
        assert_eq!(
            o.metrics,
            Some("0.0.0.0:1".parse().unwrap()),
            "the flag wins"
        );
    }

    #[test]
    fn service_add_parses() {
        let cli = parse(&[
            "service",
            "add",
            "media",
            "--vip",
            "10.0.0.10:4000",
            "--proto",
            "udp",
            "--hash",
            "rtp",
            "--udp-idle",
            "300",
        ])
        .unwrap();
        match cli.command {
            Command::Service(ServiceCmd::Add {
                name,
                vip,
                proto,
                hash,
                udp_idle,
                ring_size,
                health,
            }) => {
                assert_eq!(health.spec().unwrap(), HealthSpec::default());
                assert_eq!(name, "media");
                assert_eq!(vip, "10.0.0.10:4000");
                assert_eq!(proto, Proto::Udp);
                assert_eq!(hash, Hash::Rtp);
                assert_eq!(udp_idle, 300);
                assert_eq!(ring_size, 65537);
            }
            c => panic!("{c:?}"),
        }
        assert!(
            parse(&["service", "add", "x", "--vip", "1.2.3.4:5"]).is_err(),
            "--proto required"
        );
        assert!(parse(&[
            "service",
            "add",
            "x",
            "--vip",
            "1.2.3.4:5",
            "--proto",
            "sctp"
        ])
        .is_err());
        assert!(parse(&[
            "service",
            "add",
            "x",
            "--vip",
            "1.2.3.4:5",
            "--proto",
            "tcp",
            "--hash",
            "src-ip"
        ])
        .is_ok());
        assert!(parse(&["service", "list", "--json"]).is_ok());
        assert!(parse(&["service", "del", "x"]).is_ok());
    }

    #[test]
    fn backend_set_takes_exactly_one_change() {
        assert!(parse(&["backend", "set", "s", "10.0.0.1", "--weight", "5"]).is_ok());
        assert!(parse(&["backend", "set", "s", "10.0.0.1", "--drain"]).is_ok());
        assert!(parse(&["backend", "set", "s", "10.0.0.1", "--undrain"]).is_ok());
        assert!(parse(&["backend", "set", "s", "10.0.0.1"]).is_err());
        assert!(parse(&["backend", "set", "s", "10.0.0.1", "--drain", "--undrain"]).is_err());
        assert!(parse(&["backend", "set", "s", "10.0.0.1", "--drain", "--weight", "3"]).is_err());
        let cli = parse(&["backend", "add", "s", "10.0.0.1"]).unwrap();
        match cli.command {
            Command::Backend(BackendCmd::Add { weight, .. }) => assert_eq!(weight, 100),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn socket_comes_from_flag_or_env() {
        let cli = parse(&["stats", "--socket", "/tmp/a.sock"]).unwrap();
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/tmp/a.sock")));
        let cli = parse(&["--socket", "/tmp/b.sock", "stats", "--json"]).unwrap();
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/tmp/b.sock")));
        let arg = Cli::command()
            .get_arguments()
            .find(|a| a.get_id() == "socket")
            .cloned()
            .unwrap();
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("MQLB_SOCKET"));
    }

    #[test]
    fn decap_and_down_parse() {
        let cli = parse(&["decap", "--iface", "eth0", "--mode", "native"]).unwrap();
        match cli.command {
            Command::Decap(a) => assert_eq!((a.mode, a.detach), (Mode::Native, false)),
            c => panic!("{c:?}"),
        }
        assert!(parse(&["decap", "--iface", "eth0", "--detach"]).is_ok());
        assert!(parse(&["down", "--iface", "eth0"]).is_ok());
        assert!(parse(&["down"]).is_err());
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_any_request() {
        // No daemon at this socket: a bad address must be reported, not "not running".
        let cli = parse(&[
            "--socket",
            "/nonexistent/x.sock",
            "backend",
            "add",
            "s",
            "10.0.0.300",
        ])
        .unwrap();
        let err = run(cli).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "bad address \"10.0.0.300\": expected an ipv4 or ipv6 address"
        );
        let cli = parse(&[
            "--socket",
            "/nonexistent/x.sock",
            "service",
            "add",
            "s",
            "--vip",
            "10.0.0.1",
            "--proto",
            "tcp",
        ])
        .unwrap();
        let err = run(cli).await.unwrap_err().to_string();
        assert!(err.contains("IP:PORT"), "{err}");
        let cli = parse(&["--socket", "/nonexistent/x.sock", "service", "list"]).unwrap();
        let err = run(cli).await.unwrap_err().to_string();
        assert!(err.starts_with("mqlb daemon is not running (no socket at /nonexistent/x.sock)"));
    }

    #[test]
    fn tables_read_well() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = crate::daemon::Core::new(
            crate::state::State::default(),
            crate::state::StateStore::new(dir.path()),
            Box::new(crate::dataplane::MemDataplane::default()),
            Default::default(),
        )
        .unwrap();
        core.add_service(&ServiceSpec {
            name: "amqp".into(),
            vip: "10.0.0.10:5672".into(),
            proto: Proto::Tcp,
            hash: Hash::FiveTuple,
            udp_idle_s: None,
            ring_size: Some(13),
            health: HealthSpec {
                check: Some(CheckKind::Amqp),
                ..Default::default()
            },
        })
        .unwrap();
        core.add_service(&ServiceSpec {
            name: "mgmt".into(),
            vip: "10.0.0.10:15672".into(),
            proto: Proto::Tcp,
            hash: Hash::FiveTuple,
            udp_idle_s: None,
            ring_size: Some(13),
            health: HealthSpec {
                check: Some(
                    "http:http://{backend}:15672/api/health/checks/alarms"
                        .parse()
                        .unwrap(),
                ),
                user: Some("guest".into()),
                password: Some("secret".into()),
                ..Default::default()
            },
        })
        .unwrap();
        for addr in ["10.0.1.1", "10.0.1.2"] {
            core.add_backend(
                "amqp",
                &BackendSpec {
                    addr: addr.into(),
                    weight: None,
                },
            )
            .unwrap();
        }
        let targets = core.check_targets();
        let fail = crate::health::ProbeResult::Fail("connect: connection refused".into());
        for _ in 0..3 {
            core.report(&targets[1], fail.clone(), Duration::from_micros(1500));
        }
        core.report(
            &targets[0],
            crate::health::ProbeResult::Pass("AMQP Connection.Start (0-9)".into()),
            Duration::from_micros(2500),
        );
        let t = format_services(&core.service_views());
        assert!(!t.contains("secret"));
        assert_eq!(
            t,
            "NAME  VIP              PROTO  HASH        UDP-IDLE  RING  IN-TABLE/BACKENDS  PANIC  CHECK\n\
             amqp  10.0.0.10:5672   tcp    five-tuple  -         13    1/2                -      amqp:5672\n\
             mgmt  10.0.0.10:15672  tcp    five-tuple  -         13    0/0                -      \
             http http://{backend}:15672/api/health/checks/alarms (guest:***)\n"
        );
        let t = format_backends(&core.backend_views("amqp").unwrap());
        assert_eq!(
            t,
            "ADDR      WEIGHT  STATE   HEALTH  IN-TABLE  CHECK-TIME  DOWN/UP  ID  LAST-CHANGE\n\
             10.0.1.1  100     active  up      yes       2.5ms       0/0      1   -\n\
             10.0.1.2  100     active  down    no        1.5ms       1/0      2   \
             3 checks in a row did not pass, last: connect: connection refused\n"
        );
        let stats = format_stats(&core.stats().unwrap());
        let line = stats.lines().find(|l| l.contains("10.0.1.2")).unwrap();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["10.0.1.2", "active", "down", "1/0", "100", "0", "0", "0"],
            "{stats}"
        );
        assert_eq!(format_services(&[]), "no services\n");
    }

    /// Port-range VIPs read `IP:LO-HI` (or `IP:*`) wherever a VIP shows:
    /// service list, stats, stats JSON, `stats --watch` lines, status page.
    #[test]
    fn port_ranges_show_as_lo_hi_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = crate::daemon::Core::new(
            crate::state::State::default(),
            crate::state::StateStore::new(dir.path()),
            Box::new(crate::dataplane::MemDataplane::default()),
            Default::default(),
        )
        .unwrap();
        let spec = |name: &str, vip: &str, check: Option<(CheckKind, u16)>| ServiceSpec {
            name: name.into(),
            vip: vip.into(),
            proto: Proto::Udp,
            hash: Hash::Rtp,
            udp_idle_s: None,
            ring_size: Some(13),
            health: HealthSpec {
                port: check.as_ref().map(|c| c.1),
                check: check.map(|c| c.0),
                ..Default::default()
            },
        };
        core.add_service(&spec(
            "media",
            "10.0.0.10:5004-5099",
            Some((CheckKind::Tcp, 8080)),
        ))
        .unwrap();
        core.add_service(&spec("rtcp", "10.0.0.10:5005", None))
            .unwrap();
        core.add_service(&spec("any", "10.0.0.11:*", None)).unwrap();
        let t = format_services(&core.service_views());
        assert_eq!(
            t,
            "NAME   VIP                  PROTO  HASH  UDP-IDLE  RING  IN-TABLE/BACKENDS  PANIC  CHECK\n\
             media  10.0.0.10:5004-5099  udp    rtp   60s       13    0/0                -      tcp:8080\n\
             rtcp   10.0.0.10:5005       udp    rtp   60s       13    0/0                -      -\n\
             any    10.0.0.11:*          udp    rtp   60s       13    0/0                -      -\n"
        );
        let stats = core.stats().unwrap();
        let text = format_stats(&stats);
        for want in [
            "10.0.0.10:5004-5099/udp",
            "10.0.0.10:5005/udp",
            "10.0.0.11:*/udp",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["services"][0]["vip"], "10.0.0.10:5004-5099");
        assert_eq!(json["services"][2]["vip"], "10.0.0.11:*");
        let back: StatsView = serde_json::from_value(json).unwrap();
        assert_eq!(back, stats, "the CLI reads the API's answer back");
        let lines = crate::watch::plain_lines(
            std::time::UNIX_EPOCH,
            &stats,
            &crate::watch::rates(&stats, &stats, Duration::from_secs(1)),
        );
        assert!(
            lines.contains(" service=media vip=10.0.0.10:5004-5099/udp "),
            "{lines}"
        );
        let page = crate::metrics::status_json(
            &crate::metrics::StatusInput {
                stats,
                iface: "eth1".into(),
                pid: 1,
                conntrack: crate::metrics::Conntrack {
                    capacity: 1,
                    ..Default::default()
                },
                settings: Default::default(),
                removed: vec![],
                time_unix_ms: 0,
            },
            &Default::default(),
        );
        assert_eq!(page.services[0].vip, "10.0.0.10:5004-5099");
        assert_eq!(page.services[2].vip, "10.0.0.11:*");
        let line = core.service("media").unwrap().health.summary(None);
        assert!(line.starts_with("tcp :8080 every 2s"), "{line}");
    }

    #[test]
    fn service_set_takes_health_options() {
        let cli = parse(&[
            "service",
            "set",
            "amqp",
            "--check",
            "http:http://{backend}:15672/api/health/checks/alarms",
            "--check-interval",
            "5s",
            "--check-timeout",
            "1500ms",
            "--rise",
            "1",
            "--fall",
            "2",
            "--check-user",
            "guest",
            "--check-password",
            "guest",
            "--panic-threshold",
            "0",
            "--on-down",
            "keep",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Set { name, health }) = cli.command else {
            panic!("not service set")
        };
        assert_eq!(name, "amqp");
        let spec = health.spec().unwrap();
        assert_eq!(spec.interval_ms, Some(5000));
        assert_eq!(spec.timeout_ms, Some(1500));
        assert_eq!(
            (spec.rise, spec.fall, spec.panic_threshold),
            (Some(1), Some(2), Some(0))
        );
        assert!(matches!(spec.check, Some(CheckKind::Http(_))));
        assert_eq!(spec.on_down, Some(OnDown::Keep));
        let cli = parse(&[
            "service",
            "add",
            "a",
            "--vip",
            "10.0.0.1:5672",
            "--proto",
            "tcp",
            "--check",
            "amqp",
            "--check-port",
            "5673",
        ])
        .unwrap();
        let Command::Service(ServiceCmd::Add { health, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(health.spec().unwrap().port, Some(5673));
        assert_eq!(health.spec().unwrap().on_down, None, "left out: unchanged");
        let err = parse(&["service", "set", "a", "--on-down", "drop"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        let first = err.to_string();
        let first = first.lines().next().unwrap();
        assert!(
            first.contains("invalid value 'drop' for '--on-down <ON_DOWN>'"),
            "{err}"
        );
        let possible = err.render().to_string();
        assert!(
            possible.contains("[possible values: reset, keep]"),
            "{possible}"
        );
        let err = parse(&["service", "set", "a", "--check-interval", "soon"]).unwrap_err();
        assert!(err.to_string().contains("2s or 500ms"), "{err}");
    }

    #[tokio::test]
    async fn bad_health_options_are_refused_before_any_request() {
        let run_args = |args: &[&str]| {
            let mut all = vec!["--socket", "/nonexistent/x.sock"];
            all.extend_from_slice(args);
            run(parse(&all).unwrap())
        };
        let add = [
            "service",
            "add",
            "a",
            "--vip",
            "10.0.0.1:5672",
            "--proto",
            "tcp",
        ];
        let with = |extra: &[&'static str]| {
            let mut v = add.to_vec();
            v.extend_from_slice(extra);
            v
        };
        let err = run_args(&with(&["--check", "ping"])).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown check \"ping\" (use none, tcp, amqp or http:URL)"
        );
        let err = run_args(&with(&["--check", "tcp", "--check-interval", "1s"]))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "check interval (1s) must be longer than the check timeout (1s)"
        );
        let err = run_args(&with(&["--check", "tcp", "--rise", "0"]))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "rise 0 is out of range (1-100)");
        let err = run_args(&["service", "set", "a"]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "nothing to change: give a health check option"
        );
        let err = run_args(&["service", "set", "a", "--rise", "3"])
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("mqlb daemon is not running"),
            "{err}"
        );
    }

    #[test]
    fn flow_takes_a_service_and_a_client() {
        let cli = parse(&["flow", "amqp", "--client", "10.0.0.2:40000", "--json"]).unwrap();
        let Command::Flow {
            service,
            client,
            port,
            json,
        } = cli.command
        else {
            panic!("not flow");
        };
        assert_eq!(
            (service.as_str(), client.as_str(), port, json),
            ("amqp", "10.0.0.2:40000", None, true)
        );
        assert!(parse(&["flow", "amqp"]).is_err(), "--client is required");
        assert!(parse(&["flow", "--client", "10.0.0.2:1"]).is_err());
    }

    #[test]
    fn flow_takes_a_destination_port() {
        let cli = parse(&[
            "flow",
            "media",
            "--client",
            "10.0.0.2:4000",
            "--port",
            "5005",
        ])
        .unwrap();
        let Command::Flow { port, .. } = cli.command else {
            panic!("not flow");
        };
        assert_eq!(port, Some(5005));
        for bad in ["0", "65536", "x"] {
            assert!(
                parse(&["flow", "media", "--client", "10.0.0.2:4000", "--port", bad]).is_err(),
                "--port {bad}"
            );
        }
        assert_eq!(
            flow_path("media", " 10.0.0.2:4000 ", Some(5005)),
            "/v1/services/media/flow?client=10.0.0.2:4000&port=5005"
        );
        assert_eq!(
            flow_path("amqp", "10.0.0.2:4000", None),
            "/v1/services/amqp/flow?client=10.0.0.2:4000"
        );
        let path = flow_path("amqp6", "[fd00:1::2]:4000", Some(5005));
        assert_eq!(
            path,
            "/v1/services/amqp6/flow?client=%5Bfd00:1::2%5D:4000&port=5005"
        );
        let query = path.split_once('?').unwrap().1;
        assert_eq!(
            crate::api::query_param(query, "client").as_deref(),
            Some("[fd00:1::2]:4000"),
            "the daemon reads the client back"
        );
    }

    #[tokio::test]
    async fn flow_checks_the_client_before_asking_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let sock = sock.to_str().unwrap();
        let run_flow = |client: &'static str| {
            let cli = parse(&["--socket", sock, "flow", "amqp", "--client", client]).unwrap();
            run(cli)
        };
        let e = run_flow("10.0.0.2").await.unwrap_err().to_string();
        assert!(e.starts_with("bad address \"10.0.0.2\""), "{e}");
        for good in ["10.0.0.2:40000", "[fd00:1::2]:40000"] {
            let e = run_flow(good).await.unwrap_err().to_string();
            assert!(e.starts_with("mqlb daemon is not running"), "{good}: {e}");
        }
        let e = run_flow("fd00:1::2").await.unwrap_err().to_string();
        assert!(e.starts_with("bad address \"fd00:1::2\""), "{e}");
    }

    #[test]
    fn apply_and_export_parse() {
        let cli = parse(&["apply", "-f", "mqlb.toml", "--dry-run"]).unwrap();
        let Command::Apply { file, dry_run } = cli.command else {
            panic!("not apply")
        };
        assert_eq!((file, dry_run), (PathBuf::from("mqlb.toml"), true));
        let cli = parse(&["apply", "--file", "-"]).unwrap();
        assert!(matches!(cli.command, Command::Apply { dry_run: false, .. }));
        assert!(parse(&["apply"]).is_err(), "-f is required");
        assert!(matches!(
            parse(&["export"]).unwrap().command,
            Command::Export
        ));
        assert!(parse(&["export", "x"]).is_err());
    }

    const GOOD: &str = "[[service]]\nname = \"amqp\"\nvip = \"10.0.0.10:5672\"\nproto = \"tcp\"\n\
                        ring_size = 13\nbackends = [{ ip = \"10.0.1.1\" }]\n";

    /// `mqlb --socket SOCK apply -f FILE` with FILE holding `text`.
    async fn apply_text(sock: &Path, text: &str) -> Result<(), CliError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mqlb.toml");
        std::fs::write(&file, text).unwrap();
        let cli = parse(&[
            "--socket",
            sock.to_str().unwrap(),
            "apply",
            "-f",
            file.to_str().unwrap(),
        ])
        .unwrap();
        run(cli).await.map_err(|e| {
            // Name the file as the user would see it relative to its dir.
            match e {
                CliError::Manifest(mut m) => {
                    m.file = "mqlb.toml".into();
                    CliError::Manifest(m)
                }
                e => e,
            }
        })
    }

    #[tokio::test]
    async fn apply_refuses_a_bad_file_before_any_request() {
        let none = Path::new("/nonexistent/x.sock");
        let err = apply_text(none, &GOOD.replace("10.0.1.1", "10.0.1.300"))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "mqlb.toml:6: field ip (service amqp, backend 10.0.1.300): bad address \"10.0.1.300\": \
             expected an ipv4 or ipv6 address"
        );
        let err = apply_text(none, &GOOD.replace("proto", "protocol"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("mqlb.toml:4: field protocol (service amqp): unknown field `protocol`"),
            "{err}"
        );
        let err = apply_text(none, "seed = 1\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.ends_with(
            "has no services (no [[service]] table); write `service = []` to delete every service"
        ));
        let err = apply_text(none, GOOD).await.unwrap_err().to_string();
        assert!(err.starts_with("mqlb daemon is not running"), "{err}");
        let cli = parse(&["apply", "-f", "/nonexistent/mqlb.toml"]).unwrap();
        let err = run(cli).await.unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read config file /nonexistent/mqlb.toml: "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_daemon_refusal_names_the_line_too() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let core = crate::daemon::Core::new(
            crate::state::State::default(),
            crate::state::StateStore::new(dir.path()),
            Box::new(crate::dataplane::MemDataplane::default()),
            Default::default(),
        )
        .unwrap();
        let shared = crate::daemon::Shared::new(core);
        let listener = crate::daemon::bind_socket(&sock).await.unwrap();
        let app = crate::api::router(shared.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        apply_text(&sock, GOOD).await.unwrap();
        assert_eq!(shared.core.lock().await.state().services.len(), 1);
        // Valid on its own, but the daemon has no password for "***".
        let text = format!(
            "{GOOD}\n[[service]]\nname = \"mgmt\"\nvip = \"10.0.0.10:15672\"\nproto = \"tcp\"\n\
             check = \"http:http://{{backend}}:15672/\"\ncheck_user = \"guest\"\n\
             check_password = \"***\"\n"
        );
        let err = apply_text(&sock, &text).await.unwrap_err().to_string();
        assert!(
            err.starts_with(
                "mqlb.toml:14: field check_password (service mgmt): \"***\" stands for"
            ),
            "{err}"
        );
        assert_eq!(shared.core.lock().await.state().services.len(), 1);
        server.abort();
    }

    #[test]
    fn apply_output_reads_well() {
        use crate::manifest::Change;
        let reply = |changes: Vec<Change>, applied| ApplyReply { changes, applied };
        assert_eq!(format_apply(&reply(vec![], true)), "no changes\n");
        let del = Change::DelBackend {
            service: "amqp".into(),
            ip: "10.0.0.11".parse().unwrap(),
        };
        assert_eq!(
            format_apply(&reply(vec![del.clone()], true)),
            "- backend amqp 10.0.0.11\napplied 1 change\n"
        );
        assert_eq!(
            format_apply(&reply(vec![del.clone(), del], false)),
            "- backend amqp 10.0.0.11\n- backend amqp 10.0.0.11\ndry run: 2 changes, nothing applied\n"
        );
    }

    #[test]
    fn up_config_may_hold_the_services() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("mqlb.toml");
        let path = cfg.to_str().unwrap();
        let up = |extra: &[&str]| {
            let mut argv = vec!["up", "--iface", "eth1", "--config", path];
            argv.extend_from_slice(extra);
            let Command::Up(args) = parse(&argv).unwrap().command else {
                panic!("not up")
            };
            up_options(&args, None)
        };
        std::fs::write(&cfg, format!("mode = \"skb\"\nseed = 5\n{GOOD}")).unwrap();
        let o = up(&[]).unwrap();
        assert_eq!((o.mode, o.seed), (Mode::Skb, Some(5)));
        let d = o.desired.expect("the file's services");
        assert_eq!(d.service[0].name, "amqp");
        assert_eq!(o.config.as_deref(), Some(cfg.as_path()));
        std::fs::write(&cfg, "mode = \"skb\"\n").unwrap();
        assert_eq!(
            up(&[]).unwrap().desired,
            None,
            "no service key: state untouched"
        );
        std::fs::write(&cfg, GOOD.replace("ring_size = 13", "ring_size = 4")).unwrap();
        let err = up(&[]).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{path}:5: field ring_size (service amqp): ring size 4"
            )),
            "{err}"
        );
    }
}
