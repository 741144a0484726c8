//! The compiled eBPF objects, embedded at build time by `build.rs` (aya-build).

/// The load balancer (`#[xdp] mqlb`), maps named in `lb_common::maps::names`.
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mqlb"));
/// Name of the load balancer program inside [`LB_OBJECT`].
pub const LB_PROGRAM: &str = "mqlb";

/// The backend-side IPIP decapsulator (`#[xdp] mqlb_decap`).
pub static DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mqlb-decap"));
/// Name of the decap program inside [`DECAP_OBJECT`].
pub const DECAP_PROGRAM: &str = "mqlb_decap";

/// Baselines for benchmarks: `xdp_pass` (empty) and `xdp_swap_tx`.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mqlb-baseline"));
