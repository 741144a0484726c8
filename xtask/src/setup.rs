//! `cargo xtask setup`: check each item, install only what is missing, one
//! line per item. Idempotent and fast when everything is present.

use crate::workspace_root;
use anyhow::{bail, ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Commands the lab and tests run, and the Debian package of each.
const DEBIAN_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("tcpdump", "tcpdump"),
    ("nsenter", "util-linux"),
    // The status page test renders `/` in headless Chromium.
    ("chromium", "chromium"),
    // The RabbitMQ lab (issue 5): real broker nodes, one per namespace.
    ("rabbitmq-server", "rabbitmq-server"),
    ("rabbitmqctl", "rabbitmq-server"),
    // The media tests (issue 6): real RTP/RTCP senders, GStreamer's rtpbin
    // (plugins-good: rtpmanager, rtp, udp; plugins-base: audiotestsrc).
    ("gst-launch-1.0", "gstreamer1.0-tools"),
    ("gst-inspect-1.0", "gstreamer1.0-tools"),
    ("pkg:gstreamer1.0-plugins-good", "gstreamer1.0-plugins-good"),
    ("pkg:gstreamer1.0-plugins-base", "gstreamer1.0-plugins-base"),
];

/// bpf-linker's version, and the major its LLVM must share with the toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn report(status: &str, item: &str) {
    println!("{status:<10}{item}");
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// stdout of a command that must succeed.
fn run_out(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    ensure!(
        out.status.success(),
        "{:?} {:?} failed: {}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command whose output streams to the terminal; fails on a non-zero exit.
fn run_loud(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// The toolchain pinned by rust-toolchain.toml.
pub fn pinned_toolchain() -> Result<String> {
    let path = workspace_root().join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .with_context(|| format!("no `channel = \"...\"` in {}", path.display()))
}

pub fn setup(force_bpf_linker: bool) -> Result<()> {
    let toolchain = pinned_toolchain()?;
    toolchain_and_components(&toolchain)?;
    bpf_linker(&toolchain, force_bpf_linker)?;
    debian_tools()?;
    bpffs()?;
    Ok(())
}

fn toolchain_and_components(toolchain: &str) -> Result<()> {
    let list = run_out(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed (https://rustup.rs); it is part of this machine kind")?;
    let installed = list.lines().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|t| t == toolchain || t.starts_with(&format!("{toolchain}-")))
    });
    if installed {
        report("ok", &format!("toolchain {toolchain}"));
    } else {
        // RUSTUP_AUTO_INSTALL=0 on these machines: install it explicitly.
        run_loud(
            "installing the toolchain",
            Command::new("rustup").args([
                "toolchain",
                "install",
                toolchain,
                "--profile",
                "minimal",
            ]),
        )?;
        report("installed", &format!("toolchain {toolchain}"));
    }
    let comps = run_out(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]))?;
    // rust-src builds `core` for the bpfel target; rustfmt and clippy are
    // part of `cargo xtask test`.
    for comp in ["rust-src", "rustfmt", "clippy"] {
        if comps
            .lines()
            .any(|l| l == comp || l.starts_with(&format!("{comp}-")))
        {
            report("ok", comp);
        } else {
            run_loud(
                &format!("adding {comp}"),
                Command::new("rustup").args(["component", "add", comp, "--toolchain", toolchain]),
            )?;
            report("installed", comp);
        }
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// `bpf-linker --version` of the first one found ($CARGO_HOME/bin, then PATH).
fn bpf_linker_version() -> Option<String> {
    let candidates = [
        cargo_home().join("bin/bpf-linker"),
        PathBuf::from("bpf-linker"),
    ];
    candidates.iter().find_map(|bin| {
        let out = Command::new(bin).arg("--version").output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

/// bpf-linker built against the pinned toolchain's own LLVM (ENV-NOTES: a
/// plain `cargo install` cannot find -lLLVM; the LLVM majors must match).
fn bpf_linker(toolchain: &str, force: bool) -> Result<()> {
    let want = BPF_LINKER_VERSION
        .rsplit_once('.')
        .map(|(major_minor, _)| major_minor)
        .unwrap_or(BPF_LINKER_VERSION);
    if !force {
        if let Some(v) = bpf_linker_version() {
            if v.split_whitespace()
                .nth(1)
                .is_some_and(|ver| ver == want || ver.starts_with(&format!("{want}.")))
            {
                report("ok", &v);
                return Ok(());
            }
            println!("          found {v}, want {want}: rebuilding");
        }
    }
    let sysroot = run_out(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| {
            format!(
                "toolchain {toolchain} ships no libLLVM.so.*-rust-* in {}",
                lib.display()
            )
        })?;
    let (prefix, feature) = llvm_prefix(&lib, &llvm)?;
    println!(
        "          building bpf-linker {BPF_LINKER_VERSION} against {llvm} ({feature}, about a minute)"
    );
    run_loud(
        "cargo install bpf-linker",
        Command::new("cargo")
            .arg(format!("+{toolchain}"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                &feature,
            ])
            .arg("--force")
            .env("LLVM_PREFIX", &prefix)
            // Not inside the workspace: its config and toolchain file are not
            // this install's business.
            .current_dir(&prefix),
    )?;
    match bpf_linker_version() {
        Some(v) if v.contains(want) => report("installed", &v),
        other => bail!("bpf-linker installed but `bpf-linker --version` says {other:?}"),
    }
    Ok(())
}

/// Copies the toolchain's libLLVM into a private prefix (the installed
/// bpf-linker keeps its rpath there) and links it as `libLLVM.so`.
/// Returns (prefix, cargo feature `llvm-<major>`).
fn llvm_prefix(lib: &Path, llvm: &str) -> Result<(PathBuf, String)> {
    let major = llvm
        .strip_prefix("libLLVM.so.")
        .and_then(|v| v.split(['.', '-']).next())
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()) && !m.is_empty())
        .with_context(|| format!("cannot read the LLVM major from {llvm}"))?;
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache"));
    let prefix = cache.join("mqlb/llvm");
    let dest_dir = prefix.join("lib");
    std::fs::create_dir_all(&dest_dir)
        .with_context(|| format!("cannot create {}", dest_dir.display()))?;
    let src = lib.join(llvm);
    let dest = dest_dir.join(llvm);
    let same = match (std::fs::metadata(&src), std::fs::metadata(&dest)) {
        (Ok(a), Ok(b)) => a.len() == b.len(),
        _ => false,
    };
    if !same {
        std::fs::copy(&src, &dest)
            .with_context(|| format!("cannot copy {} to {}", src.display(), dest.display()))?;
    }
    let link = dest_dir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(llvm, &link)
        .with_context(|| format!("cannot link {}", link.display()))?;
    Ok((prefix, format!("llvm-{major}")))
}

/// Whether `cmd` is an executable in PATH or the sbin directories (root's
/// tools live there and CI's PATH may lack them); `pkg:NAME` asks dpkg
/// whether package NAME is installed (for packages of plugins, not commands).
fn have_command(cmd: &str) -> bool {
    if let Some(pkg) = cmd.strip_prefix("pkg:") {
        return Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .any(|dir| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(dir.join(cmd))
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn debian_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (cmd, pkg) in DEBIAN_TOOLS {
        if have_command(cmd) {
            report("ok", &format!("{cmd} ({pkg})"));
        } else if !missing.contains(pkg) {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: installing them needs root; run `sudo -E cargo xtask setup`",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_loud("apt-get update", &mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run_loud(
        &format!("apt-get install {}", missing.join(" ")),
        &mut install,
    )?;
    for (cmd, pkg) in DEBIAN_TOOLS {
        if missing.contains(pkg) {
            ensure!(
                have_command(cmd),
                "{pkg} installed but `{cmd}` is still missing"
            );
            report("installed", &format!("{cmd} ({pkg})"));
        }
    }
    Ok(())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
            })
        })
        .unwrap_or(false)
}

fn bpffs() -> Result<()> {
    if bpffs_mounted() {
        report("ok", "bpffs on /sys/fs/bpf");
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted on /sys/fs/bpf and mounting it needs root; run `sudo -E cargo xtask setup`");
    }
    run_loud(
        "mounting bpffs",
        Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
    )?;
    ensure!(
        bpffs_mounted(),
        "mount reported success but /sys/fs/bpf is not bpffs"
    );
    report("mounted", "bpffs on /sys/fs/bpf");
    Ok(())
}
