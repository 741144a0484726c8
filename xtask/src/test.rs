//! `cargo xtask test`: setup, then the checks and the four test layers of
//! STYLE.md in order, stopping at the first failure. Each layer is its own
//! `cargo test` run; the tests each binary ran are read from libtest's
//! `test result:` lines, and a layer that ran none fails.

use crate::{cargo, setup, target_dir};
use anyhow::{bail, Context as _, Result};
use std::io::{BufRead as _, BufReader};
use std::process::Command;

/// One `cargo test` run and what it must show.
struct Run {
    /// What the summary calls it.
    label: String,
    /// Arguments after `cargo test`.
    args: Vec<String>,
    /// Whether running zero tests fails the run (the four layers).
    layer: bool,
}

/// Tests one test binary reported.
struct Binary {
    name: String,
    passed: u64,
    failed: u64,
    ignored: u64,
}

struct Outcome {
    label: String,
    layer: bool,
    binaries: Vec<Binary>,
}

impl Outcome {
    fn ran(&self) -> u64 {
        self.binaries.iter().map(|b| b.passed + b.failed).sum()
    }
}

/// Runs a check whose output streams to the terminal.
pub fn run_step(what: &str, cmd: &mut Command) -> Result<()> {
    println!("==> {what}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn test() -> Result<()> {
    println!("==> cargo xtask setup");
    setup::setup(false)?;
    run_step(
        "cargo fmt --all -- --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )
    .context("formatting differs (diff above): run `cargo fmt --all`")?;
    // lb-ebpf is a bpfel-only crate (built by lb-user/build.rs): clippy
    // would build it for the host.
    run_step(
        "cargo clippy --workspace --exclude lb-ebpf --all-targets -- -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )
    .context("clippy found problems (above): fix them, warnings included")?;
    run_step(
        "cargo build -p lb-user",
        cargo().args(["build", "-p", "lb-user"]),
    )
    .context("the mqlb binary does not build (errors above)")?;
    let mqlb = target_dir()?.join("debug/mqlb");
    if !mqlb.is_file() {
        bail!(
            "`cargo build -p lb-user` left no binary at {}",
            mqlb.display()
        );
    }

    let mut outcomes = Vec::new();
    for run in plan()? {
        let line = format!("cargo test {}", run.args.join(" "));
        println!("==> {} ({line})", run.label);
        let mut cmd = cargo();
        cmd.arg("test").args(&run.args).env("MQLB_BIN", &mqlb);
        // Privileged layers must not skip under CI=true: pass it through.
        if let Some(ci) = std::env::var_os("CI") {
            cmd.env("CI", ci);
        }
        let (ok, binaries) = run_and_count(&mut cmd)?;
        let outcome = Outcome {
            label: run.label,
            layer: run.layer,
            binaries,
        };
        let empty = outcome.layer && outcome.ran() == 0;
        outcomes.push(outcome);
        if !ok || empty {
            summary(&outcomes);
            if !ok {
                bail!("`{line}` failed; see its output above");
            }
            bail!("`{line}` ran no test: a layer with no tests fails");
        }
    }
    summary(&outcomes);
    Ok(())
}

/// The runs, in layer order, from `cargo metadata` (default members).
fn plan() -> Result<Vec<Run>> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cannot run `cargo metadata`")?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let default: Vec<&str> = meta["workspace_default_members"]
        .as_array()
        .context("no workspace_default_members in `cargo metadata` (cargo too old?)")?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let packages: Vec<&serde_json::Value> = meta["packages"]
        .as_array()
        .context("no packages in `cargo metadata`")?
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| default.contains(&id)))
        .collect();
    let name_of = |p: &serde_json::Value| p["name"].as_str().unwrap_or("").to_string();
    let run = |label: &str, args: &[&str], layer: bool| Run {
        label: label.to_string(),
        args: args.iter().map(|s| s.to_string()).collect(),
        layer,
    };

    let mut runs = Vec::new();
    let mut rest = Vec::new();
    let has = |name: &str| packages.iter().any(|p| name_of(p) == name);
    if has("lb-common") {
        runs.push(run(
            "layer 1: lb-common on the host",
            &["-p", "lb-common"],
            true,
        ));
    }
    if has("lb-user") {
        runs.push(run(
            "layer 2: lb-user without a kernel",
            &["-p", "lb-user"],
            true,
        ));
    }
    for p in &packages {
        let name = name_of(p);
        if !["lb-common", "lb-user", "mqlb-tests"].contains(&name.as_str()) {
            rest.push(run(&format!("{name} (no minimum)"), &["-p", &name], false));
        }
    }
    runs.extend(rest);
    if let Some(p) = packages.iter().find(|p| name_of(p) == "mqlb-tests") {
        runs.push(run(
            "mqlb-tests helpers (no minimum)",
            &["-p", "mqlb-tests", "--lib", "--bins"],
            false,
        ));
        let tests: Vec<String> = p["targets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .filter(|t| {
                        t["kind"]
                            .as_array()
                            .is_some_and(|k| k.iter().any(|k| k == "test"))
                    })
                    .filter_map(|t| t["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // Layer 3: every privileged test file but the labs' (BPF_PROG_TEST_RUN);
        // layer 4: `e2e.rs` and every `e2e_*.rs` (namespace labs).
        let is_e2e = |t: &String| t == "e2e" || t.starts_with("e2e_");
        let fixtures: Vec<&String> = tests.iter().filter(|t| !is_e2e(t)).collect();
        let mut args = vec!["-p", "mqlb-tests"];
        for t in &fixtures {
            args.extend(["--test", t.as_str()]);
        }
        if fixtures.is_empty() {
            bail!("layer 3 has no test file: expected tests/tests/fixtures.rs in mqlb-tests");
        }
        runs.push(run(
            "layer 3: the program through BPF_PROG_TEST_RUN",
            &args,
            true,
        ));
        if !tests.iter().any(|t| t == "e2e") {
            bail!("layer 4 has no test file: expected tests/tests/e2e.rs in mqlb-tests");
        }
        let mut args = vec!["-p", "mqlb-tests"];
        for t in tests.iter().filter(|t| is_e2e(t)) {
            args.extend(["--test", t.as_str()]);
        }
        runs.push(run(
            "layer 4: end to end in network namespaces",
            &args,
            true,
        ));
    } else {
        bail!("package mqlb-tests (layers 3 and 4) is not a default member");
    }
    Ok(runs)
}

/// Runs `cmd` with stdout and stderr on one pipe (so cargo's `Running X`
/// lines and libtest's results stay in order), echoes it, and returns
/// (exit ok, per-binary counts).
fn run_and_count(cmd: &mut Command) -> Result<(bool, Vec<Binary>)> {
    let (reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd.spawn().context("cannot start cargo test")?;
    // The Command holds the write ends: without dropping them the pipe
    // never reaches end of file.
    drop(std::mem::replace(cmd, Command::new("true")));
    let mut binaries = Vec::new();
    let mut current = String::from("?");
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("Running ") {
            current = rest.split(" (").next().unwrap_or(rest).to_string();
        } else if let Some(rest) = t.strip_prefix("Doc-tests ") {
            current = format!("doc-tests {rest}");
        } else if let Some(counts) = parse_result(t) {
            binaries.push(Binary {
                name: current.clone(),
                passed: counts.0,
                failed: counts.1,
                ignored: counts.2,
            });
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((status.success(), binaries))
}

/// (passed, failed, ignored) of a libtest line
/// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
fn parse_result(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut passed = None;
    let mut failed = None;
    let mut ignored = 0;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => passed = Some(n),
            "failed" => failed = Some(n),
            "ignored" => ignored = n,
            _ => {}
        }
    }
    Some((passed?, failed?, ignored))
}

fn summary(outcomes: &[Outcome]) {
    println!("\n==> summary");
    for o in outcomes {
        let status = if o.layer && o.ran() == 0 {
            "NO TESTS"
        } else if o.binaries.iter().any(|b| b.failed > 0) {
            "FAILED"
        } else {
            "ok"
        };
        println!("{status:<9} {}: {} tests ran", o.label, o.ran());
        for b in &o.binaries {
            let ignored = if b.ignored > 0 {
                format!(", {} ignored", b.ignored)
            } else {
                String::new()
            };
            println!(
                "            {:<40} {} passed, {} failed{ignored}",
                b.name, b.passed, b.failed
            );
        }
    }
    let passed: u64 = outcomes
        .iter()
        .flat_map(|o| &o.binaries)
        .map(|b| b.passed)
        .sum();
    let failed: u64 = outcomes
        .iter()
        .flat_map(|o| &o.binaries)
        .map(|b| b.failed)
        .sum();
    println!("total: {passed} passed, {failed} failed");
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn reads_libtest_result_lines() {
        assert_eq!(
            parse_result(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some((12, 0, 1))
        );
        assert_eq!(
            parse_result(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((3, 2, 0))
        );
        assert_eq!(parse_result("running 3 tests"), None);
    }
}
