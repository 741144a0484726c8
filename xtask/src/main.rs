//! `cargo xtask`: the project's jobs.
//!
//! - `setup`: installs what building and testing need on a fresh Debian 12
//!   machine (pinned toolchain, rust-src, bpf-linker, Debian tools, bpffs),
//!   checking first, so it is fast when everything is there.
//! - `test`: setup, then every test layer in order, stopping at the first
//!   failure; a layer that ran no test fails. `.ci/run` runs exactly this.
//! - `demo`: setup, build, then the namespace lab (`mqlb-tests`' `lab` binary).
//! - `bench`: setup, release build, every benchmark against its baselines
//!   (`bench.rs`, BENCHMARKS.md).

mod bench;
mod setup;
mod test;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::Command;

#[derive(Parser)]
#[command(about = "mqlb's jobs: setup, test, demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain, rust-src, bpf-linker, Debian tools; mount bpffs.
    Setup {
        /// Rebuild bpf-linker even when one is installed (into $CARGO_HOME).
        #[arg(long, hide = true)]
        force_bpf_linker: bool,
    },
    /// Run every test layer: fmt, clippy, build, host, control plane,
    /// BPF_PROG_TEST_RUN fixtures, end-to-end lab.
    Test,
    /// Run the namespace lab: three RabbitMQ nodes behind mqlb, AMQP clients
    /// through the VIP, stats, a broker killed and its failover.
    Demo {
        /// Arguments for the lab: --connections N, --mode skb|native, --hold
        /// (keep it up until Ctrl-C), --echo (TCP echo servers, no RabbitMQ).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks (root): program cost, Maglev, forwarding vs
    /// nftables, AMQP connections vs HAProxy, control-plane reaction.
    Bench {
        /// Write every figure as JSON here [default: target/bench/bench.json]
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write the chart of the ratios (PNG) here [default: target/bench/bench.png]
        #[arg(long, value_name = "FILE")]
        chart: Option<PathBuf>,
        /// XDP mode of the lab's load balancer: skb or native
        #[arg(long, default_value = "skb")]
        mode: String,
        /// Fewer and shorter rounds (a smoke run, about a minute)
        #[arg(long)]
        quick: bool,
        /// Only these parts, e.g. 2,3 (1 = prog_cost is always run by xtask)
        #[arg(long, value_name = "LIST")]
        parts: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup { force_bpf_linker } => setup::setup(force_bpf_linker),
        Cmd::Test => test::test(),
        Cmd::Demo { args } => demo(&args),
        Cmd::Bench {
            json,
            chart,
            mode,
            quick,
            parts,
        } => bench::bench(&bench::BenchArgs {
            json,
            chart,
            mode,
            quick,
            parts,
        }),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// `cargo` (the rustup proxy: rust-toolchain.toml picks the toolchain),
/// run from the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// The build's target directory (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cannot run `cargo metadata`")?;
    anyhow::ensure!(
        out.status.success(),
        "`cargo metadata` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`cargo metadata` printed no JSON")?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` has no target_directory")
}

fn demo(args: &[String]) -> Result<()> {
    setup::setup(false)?;
    test::run_step(
        "build mqlb and the lab",
        cargo().args([
            "build",
            "-p",
            "lb-user",
            "-p",
            "mqlb-tests",
            "--bin",
            "mqlb",
            "--bin",
            "lab",
        ]),
    )?;
    let debug = target_dir()?.join("debug");
    let mut lab = Command::new(debug.join("lab"));
    lab.args(args).env("MQLB_BIN", debug.join("mqlb"));
    // Hand the terminal to the lab: Ctrl-C reaches it alone, and it removes
    // the namespaces and stops what it started before it exits.
    use std::os::unix::process::CommandExt as _;
    let err = lab.exec();
    Err(err).context("cannot start the lab binary")
}
