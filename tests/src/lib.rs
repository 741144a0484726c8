//! Shared helpers of the privileged test layers (run by `cargo xtask test`):
//! `tests/fixtures.rs` runs the compiled program through BPF_PROG_TEST_RUN,
//! `tests/e2e.rs` builds a network-namespace lab.

pub mod frames;
pub mod lab;
pub mod netns;
pub mod privileged;
