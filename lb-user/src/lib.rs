//! mqlb's control plane: the daemon that owns the XDP program and its maps,
//! the HTTP/JSON API on a Unix socket, and the CLI that talks to it.
//! `main.rs` only parses arguments and calls in here.

pub mod programs;
