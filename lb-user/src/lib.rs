//! mqlb's control plane: the daemon that owns the XDP program and its maps,
//! the HTTP/JSON API on a Unix socket, and the CLI that talks to it.
//! `main.rs` only parses arguments and calls in here.
//!
//! - [`state`]: services, backends, ids; validation; atomic persistence.
//! - [`manifest`]: the declarative TOML file of `apply`, `export` and `up --config`.
//! - [`plan`]: desired state → map writes (pure, tested without a kernel).
//! - [`dataplane`]: the maps behind a trait (kernel or in memory).
//! - [`loader`]: load, pin, attach or replace the XDP programs.
//! - [`nexthop`], [`host`]: next hops from netlink; interface sysctls.
//! - [`daemon`]: `mqlb up`; [`api`]: its HTTP/JSON API; [`client`]: the CLI's side.
//! - [`health`]: health checks (settings, state machine, probes, their tasks).
//! - [`metrics`]: `/metrics` for Prometheus (`mqlb up --metrics ADDR`).
//! - [`watch`]: `mqlb stats --watch`, the live view of per-second rates.
//! - [`probe`]: `mqlb flow`, a packet run through the loaded program (BPF_PROG_TEST_RUN).
//! - [`cli`]: the command line; [`docs`]: its shell completions and man pages.

pub mod api;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod dataplane;
pub mod docs;
pub mod health;
pub mod host;
pub mod loader;
pub mod manifest;
pub mod metrics;
pub mod nexthop;
pub mod plan;
pub mod probe;
pub mod programs;
pub mod state;
pub mod watch;
