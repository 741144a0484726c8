//! Helpers of `cargo xtask bench` (the `bench` binary): statistics, a Ctrl-C
//! flag, a second load-balancer host without XDP for the baselines
//! (nftables DNAT, HAProxy), nftables in lab namespaces, a raw AF_PACKET
//! frame sender with pacing, and CPU-time clocks that other processes on
//! the machine do not disturb.

use crate::lab::{self, Lab, Node, NETNS_PREFIX};
use crate::netns::{self, command_line, output, Netns};
use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- statistics

/// Median (the upper one for an even count); NaN for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile `p` (0..=100); NaN for an empty slice.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable_by(|a, b| a.partial_cmp(b).expect("finite"));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Minimum of the finite values (NaN if none).
pub fn min(v: &[f64]) -> f64 {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::NAN, f64::min)
}

/// Maximum of the finite values (NaN if none).
pub fn max(v: &[f64]) -> f64 {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::NAN, f64::max)
}

/// Which rounds ran in the VM's fast state (ENV-NOTES): a round is fast when
/// its baseline is within 1.25 × the lowest baseline of the run.
pub fn fast_rounds(baselines: &[f64]) -> Vec<bool> {
    let lowest = min(baselines);
    baselines.iter().map(|b| *b <= 1.25 * lowest).collect()
}

/// `round(x, digits)` for JSON and tables (NaN stays NaN → null in JSON).
pub fn round_to(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

// ------------------------------------------------------------------- Ctrl-C

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag the bench checks between steps, so the lab is
/// always torn down by its Drop.
pub fn install_signal_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(sig, &action) }.expect("install signal handler");
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err` once Ctrl-C was pressed.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

// ------------------------------------------------------------------- clocks

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread (ns). On this kernel (no
/// IRQ_TIME_ACCOUNTING) it includes the softirq work the thread ran inline,
/// which is where veth + bridge forwarding of its own packets happens.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of this whole process, every thread (also exited ones), in ns
/// (`getrusage(RUSAGE_SELF)`, µs resolution).
pub fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime) + us(ru.ru_stime)) * 1000
}

/// CPU time of every thread of process `pid` (ns, `/proc/PID/task/*/schedstat`).
pub fn process_sched_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let tids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/task/{t}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// PIDs of the `ksoftirqd/N` threads.
pub fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// Total time on CPU of `pids` (ns, from `/proc/PID/schedstat`).
pub fn sched_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

// ------------------------------------------------------------ lab helpers

/// MAC address and ifindex of `iface` in namespace `ns`.
pub fn link_info(ns: &str, iface: &str) -> Result<([u8; 6], i32)> {
    let json = output(Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", iface]))?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("`ip -j link` printed no JSON: {json}"))?;
    let text = v[0]["address"]
        .as_str()
        .with_context(|| format!("no MAC for {iface} in {json}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("cannot parse MAC {text:?} of {iface}");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {text}"))?;
    }
    let ifindex = v[0]["ifindex"]
        .as_i64()
        .with_context(|| format!("no ifindex for {iface}"))? as i32;
    Ok((mac, ifindex))
}

/// Runs `nft -f -` with `script` inside namespace `ns`.
pub fn nft(ns: &str, script: &str) -> Result<()> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns::netns_path(ns).display()))
        .args(["--", "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = command_line(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{line}`; is nftables installed?"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{line}` failed: {}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Packets of the named nftables counter `inet TABLE NAME` in namespace `ns`.
pub fn nft_counter(ns: &str, table: &str, name: &str) -> Result<u64> {
    let text = output(
        Command::new("nsenter")
            .arg(format!("--net={}", netns::netns_path(ns).display()))
            .args(["--", "nft", "-j", "list", "counter", "inet", table, name]),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("`nft -j` printed: {text}"))?;
    crate::lab::find_counter(&v, "packets").with_context(|| format!("no packets in {text}"))
}

/// A process the bench started in a namespace (HAProxy), stopped by PID on drop.
pub struct BgProc {
    pub what: String,
    child: Child,
    pub log: PathBuf,
}

impl BgProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `program args` in namespace `ns`, output to `log`; it gets
    /// SIGTERM should the bench die without its Drop.
    pub fn spawn(ns: &str, program: &str, args: &[&str], log: &Path) -> Result<BgProc> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns::netns_path(ns).display()))
            .arg("--")
            .arg(program)
            .args(args);
        let (child, line) = lab::spawn_logged(cmd, log)?;
        Ok(BgProc {
            what: line,
            child,
            log: log.to_path_buf(),
        })
    }

    /// Whether it is still running; an error quoting its log if it exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "`{}` exited with {status}: {}",
                self.what,
                crate::lab::log_tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for BgProc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // Only this child, by its PID (not reaped yet, so not reused).
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Another load-balancer host on the lab's bridge, without XDP: where the
/// baselines run (nftables DNAT and HAProxy on one, an L2 bounce on
/// another), so they pay nothing for mqlb's program. Namespace
/// `mqlab-{lab id}-{role}` (removed on drop, and by the next lab's stale
/// cleanup should the bench be killed), address `10.X.0.{host}`.
pub struct PlainLb {
    pub node: Node,
    pub mac: [u8; 6],
    /// Processes started in it, stopped before the namespace goes.
    pub procs: Vec<BgProc>,
    ns: Option<Netns>,
}

impl PlainLb {
    /// `role`: one letter not used by the lab (`n`, `m`); `host`: 3..=9.
    pub fn create(lab: &Lab, name: &str, role: char, host: u8) -> Result<PlainLb> {
        let bridge_ns = format!("{NETNS_PREFIX}{}-br", lab.id);
        let iface = format!(
            "{}{role}",
            lab.lb
                .iface
                .strip_suffix('l')
                .context("the lab's LB interface name ends in 'l'")?
        );
        let o = lab.lb.addr.octets();
        let node = Node {
            name: name.into(),
            ns: format!("{NETNS_PREFIX}{}-{role}", lab.id),
            iface: iface.clone(),
            addr: Ipv4Addr::new(o[0], o[1], o[2], host),
            addr6: None,
        };
        let ns = Netns::create(&node.ns)?;
        let port = format!("{iface}p");
        output(Command::new("ip").args([
            "link", "add", &iface, "netns", &node.ns, "type", "veth", "peer", "name", &port,
            "netns", &bridge_ns,
        ]))?;
        output(Command::new("ip").args([
            "-n", &bridge_ns, "link", "set", &port, "master", "br0", "up",
        ]))?;
        node.ip(&["addr", "add", &format!("{}/24", node.addr), "dev", &iface])?;
        node.ip(&["link", "set", &iface, "up"])?;
        // A router on a stick: forward, no redirects (every forwarded packet
        // leaves by the port it came in on), no reverse-path filter.
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ns.sysctl(k, v)?;
        }
        ns.sysctl(&format!("net.ipv4.conf.{iface}.send_redirects"), "0")?;
        ns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        let (mac, _) = link_info(&node.ns, &iface)?;
        Ok(PlainLb {
            node,
            mac,
            procs: Vec::new(),
            ns: Some(ns),
        })
    }

    pub fn netns(&self) -> &Netns {
        self.ns.as_ref().expect("namespace lives until drop")
    }
}

impl Drop for PlainLb {
    fn drop(&mut self) {
        self.procs.clear();
        self.ns.take();
    }
}

// ------------------------------------------------------------------ frames

/// Ethernet + IPv4 + UDP with a valid IPv4 checksum and a UDP checksum of 0
/// (allowed for IPv4), `payload` bytes of zeros.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(42 + payload, 0);
    set_ip_checksum(&mut f);
    f
}

/// Rewrites source address and port of a frame made by [`udp_frame`].
pub fn set_udp_source(f: &mut [u8], src: Ipv4Addr, sport: u16) {
    f[26..30].copy_from_slice(&src.octets());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    set_ip_checksum(f);
}

fn set_ip_checksum(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let c = crate::frames::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

// ------------------------------------------------------------- raw sender

/// An AF_PACKET socket bound to one interface, sending whole frames. Open
/// it on a thread inside the interface's namespace.
pub struct RawSender {
    fd: OwnedFd,
    softirqd: Vec<u32>,
}

/// What one paced send did.
#[derive(Clone, Copy, Debug, Default)]
pub struct SendStats {
    pub sent: u64,
    pub elapsed: Duration,
    /// CPU time of the sending thread, softirq work it ran inline included.
    pub thread_cpu_ns: u64,
    /// CPU time of the ksoftirqd threads meanwhile (work deferred to them).
    pub softirqd_ns: u64,
}

impl SendStats {
    pub fn rate_pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

const BATCH: usize = 32;
const FRAME_MAX: usize = 256;

impl RawSender {
    pub fn open(ifindex: i32) -> Result<RawSender> {
        // SAFETY: plain socket/bind/setsockopt calls on a descriptor we own.
        unsafe {
            // Protocol 0: this socket receives nothing.
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex;
            if libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) < 0
            {
                return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
            }
            // As trafgen: straight to the driver (veth has no qdisc anyway).
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            Ok(RawSender {
                fd,
                softirqd: ksoftirqd_pids(),
            })
        }
    }

    /// Sends frames for `duration` (or until `stop`), at `rate_pps` (None:
    /// as fast as it can), in batches of up to 32 (`sendmmsg`). `fill(n,
    /// buf)` writes frame number `n` into `buf` and returns its length.
    pub fn send(
        &self,
        rate_pps: Option<f64>,
        duration: Duration,
        stop: Option<&AtomicBool>,
        mut fill: impl FnMut(u64, &mut [u8]) -> usize,
    ) -> SendStats {
        let softirqd = &self.softirqd;
        // Precise sleeps for the pacing (the default slack is 50 µs).
        // SAFETY: prctl on the calling thread only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
        let mut bufs = vec![[0u8; FRAME_MAX]; BATCH];
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
        // SAFETY: zeroed mmsghdr is a valid empty message header.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        let cpu0 = thread_cpu_ns();
        let soft0 = sched_ns(softirqd);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut errors = 0u64;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= duration || stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                break;
            }
            let want = match rate_pps {
                None => BATCH as u64,
                Some(r) => {
                    let due = (r * elapsed.as_secs_f64()) as u64;
                    if due < sent + BATCH as u64 {
                        // Wait until a whole batch is due: sleeping, not
                        // spinning, so the thread's CPU time stays the
                        // sending and forwarding work.
                        let next = Duration::from_secs_f64((sent + BATCH as u64) as f64 / r);
                        let wait = next.saturating_sub(elapsed);
                        if wait > Duration::from_micros(20) {
                            std::thread::sleep(wait);
                            continue;
                        }
                    }
                    due.saturating_sub(sent).clamp(1, BATCH as u64)
                }
            } as usize;
            iovs.clear();
            for (i, buf) in bufs.iter_mut().take(want).enumerate() {
                let len = fill(sent + i as u64, buf);
                iovs.push(libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                    iov_len: len,
                });
            }
            for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
                m.msg_hdr.msg_iov = iov as *mut libc::iovec;
                m.msg_hdr.msg_iovlen = 1;
                m.msg_len = 0;
            }
            // SAFETY: `msgs[..want]` point at iovecs and buffers that live
            // across the call.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    want as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                sent += n as u64;
            } else {
                errors += 1;
                if errors > 1_000_000 {
                    break;
                }
                std::thread::yield_now();
            }
        }
        SendStats {
            sent,
            elapsed: start.elapsed(),
            thread_cpu_ns: thread_cpu_ns() - cpu0,
            softirqd_ns: sched_ns(softirqd).saturating_sub(soft0),
        }
    }
}

/// Runs `f` on a thread inside `node`'s namespace (for senders and clients).
pub fn in_node<F, R>(node: &Node, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    netns::in_netns(&node.netns_path(), f)
}
