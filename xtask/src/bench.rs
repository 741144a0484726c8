//! `cargo xtask bench`: every benchmark of the project, reported against
//! baselines measured in the same run (BENCHMARKS.md explains the output).
//!
//! 1. setup, plus the Debian packages the baselines need (nftables,
//!    HAProxy, a TTF font for the chart);
//! 2. a release build of `mqlb`, the `bench` binary and the `prog_cost`
//!    example;
//! 3. part 1: `prog_cost --json FILE` (its stdout is kept too, and parsed
//!    when the JSON is missing);
//! 4. parts 2-5 and the report: the `bench` binary (mqlb-tests), which
//!    merges part 1, prints the table and writes the JSON and the chart.

use crate::{cargo, setup, target_dir, test::run_step};
use anyhow::{bail, ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What the bench needs beyond `cargo xtask setup`: (file that shows the
/// package is installed, Debian package).
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("/usr/sbin/nft", "nftables"),
    ("/usr/sbin/haproxy", "haproxy"),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

/// Options of `cargo xtask bench`.
pub struct BenchArgs {
    pub json: Option<PathBuf>,
    pub chart: Option<PathBuf>,
    pub mode: String,
    pub quick: bool,
    pub parts: Option<String>,
}

/// Installs the bench's Debian packages that are missing (apt-get, as
/// `cargo xtask setup` does for its tools).
pub fn bench_packages() -> Result<()> {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    for (file, pkg) in BENCH_PACKAGES {
        if Path::new(file).exists() {
            println!("{:<10}{pkg}", "ok");
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !setup::is_root() {
        bail!(
            "missing Debian packages {}: installing them needs root; run `sudo -E cargo xtask bench`",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_step("apt-get update", &mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run_step(
        &format!("apt-get install {}", missing.join(" ")),
        &mut install,
    )?;
    for (file, pkg) in BENCH_PACKAGES {
        if missing.contains(pkg) {
            ensure!(
                Path::new(file).exists(),
                "{pkg} installed but {file} is still missing"
            );
            println!("{:<10}{pkg}", "installed");
        }
    }
    Ok(())
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if !setup::is_root() {
        bail!("the bench loads BPF programs and builds network namespaces: run `sudo -E cargo xtask bench`");
    }
    setup::setup(false)?;
    bench_packages()?;
    run_step(
        "build mqlb, the bench and prog_cost (release)",
        cargo().args([
            "build",
            "--release",
            "-p",
            "lb-user",
            "-p",
            "mqlb-tests",
            "--bin",
            "mqlb",
            "--bin",
            "bench",
            "--example",
            "prog_cost",
        ]),
    )?;
    let target = target_dir()?;
    let release = target.join("release");
    let out = target.join("bench");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    // Part 1. A JSON left by an earlier run must not pass for this one.
    let pc_json = out.join("prog_cost.json");
    let pc_text = out.join("prog_cost.txt");
    let _ = std::fs::remove_file(&pc_json);
    println!("==> part 1: prog_cost (BPF_PROG_TEST_RUN)");
    let text_file = std::fs::File::create(&pc_text)
        .with_context(|| format!("cannot create {}", pc_text.display()))?;
    let status = Command::new(release.join("examples/prog_cost"))
        .arg("--json")
        .arg(&pc_json)
        .stdout(Stdio::from(text_file))
        .status()
        .context("cannot run the prog_cost example")?;
    if !status.success() {
        eprintln!(
            "xtask: prog_cost failed ({status}); the report goes on without part 1 (its output: {})",
            pc_text.display()
        );
    }

    let json = args.json.clone().unwrap_or_else(|| out.join("bench.json"));
    let chart = args.chart.clone().unwrap_or_else(|| out.join("bench.png"));
    let mut cmd = Command::new(release.join("bench"));
    cmd.env("MQLB_BIN", release.join("mqlb"))
        .arg("--json")
        .arg(&json)
        .arg("--chart")
        .arg(&chart)
        .arg("--prog-cost-json")
        .arg(&pc_json)
        .arg("--prog-cost-text")
        .arg(&pc_text)
        .args(["--mode", &args.mode]);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(parts) = &args.parts {
        cmd.args(["--parts", parts]);
    }
    run_step("parts 2-5 and the report", &mut cmd)
}
