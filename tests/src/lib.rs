//! Shared helpers of the privileged test layers (run by `cargo xtask test`):
//! `tests/fixtures.rs` runs the compiled program through BPF_PROG_TEST_RUN,
//! `tests/e2e.rs` builds a network-namespace lab.

pub mod bench_conn;
pub mod bench_fwd;
pub mod bench_maglev;
pub mod bench_react;
pub mod bench_report;
pub mod bench_util;
pub mod conn;
pub mod frames;
pub mod lab;
pub mod media;
pub mod netns;
pub mod privileged;
pub mod rabbit;
pub mod xdp;
