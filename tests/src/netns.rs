//! Network namespaces for the lab: create, run code or commands inside, delete.
//!
//! Commands go through `ip -n NAME` and `nsenter --net=/run/netns/NAME`, never
//! `ip netns exec`: that one remounts /sys, which hides the bpffs pins the
//! daemon and the tests share. Rust code runs inside a namespace on a thread
//! that `setns`es into it; sockets made there keep that namespace when used
//! from any other thread.

use anyhow::{anyhow, bail, Context as _, Result};
use nix::sched::{setns, CloneFlags};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd` to completion; its stdout on success, else an error naming
/// the command line and quoting its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{line}`; is it installed? (`cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmd` as a shell-like line, for messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        output(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the handle `nsenter --net=` and `setns` take.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// `ip -n NAME ARGS...`, returning its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        output(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside this namespace (via nsenter,
    /// which execs it: the child's PID is the program's PID).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Writes a sysctl of this namespace (`key` in dotted form, e.g.
    /// `net.ipv4.conf.all.rp_filter`; interface names must not contain dots).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_string();
        // /proc/sys/net resolves against the calling thread's namespace.
        self.run(move || std::fs::write(&path, value.as_bytes()))?
            .with_context(|| format!("cannot set {key} in netns {}", self.name))
    }

    /// Reads a sysctl of this namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        Ok(self
            .run(move || std::fs::read_to_string(&path))?
            .with_context(|| format!("cannot read {key} in netns {}", self.name))?
            .trim()
            .to_string())
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        in_netns(&self.path(), f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = output(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("lab cleanup: {e:#}");
        }
    }
}

/// `/run/netns/NAME`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `f` on a scoped thread that first joins the network namespace at
/// `path`; the caller's thread is never moved.
pub fn in_netns<F, R>(path: &Path, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {} failed", path.display()))?;
            Ok(f())
        })
        .join()
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            anyhow!("code running in netns {} panicked: {msg}", path.display())
        })?
    })
}

/// Deletes namespaces named `{prefix}{pid}-...` whose creating process
/// (`pid`) is gone: what a killed test run left behind. Returns the names.
pub fn remove_stale(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        if output(Command::new("ip").args(["netns", "del", &name])).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Whether a process with this PID exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
