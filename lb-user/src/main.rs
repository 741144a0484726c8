//! `mqlb`: parses the command line, sets up logging and the runtime, runs
//! the command, and turns any error into one line on stderr and exit code 1.
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use lb_user::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Up(_)) {
        // The daemon logs to stderr (journald picks it up); RUST_LOG overrides.
        // aya warns at length (a whole BTF dump) when the kernel refuses the
        // object's BTF, which Rust-built programs do not need: hide that.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aya::bpf=error"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(cli::run(cli))
        .map_err(|e| anyhow::anyhow!(lb_user::daemon::error_chain(&e)))
}
