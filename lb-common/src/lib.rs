//! mqlb's decisions, as pure functions over plain values.
//!
//! `lb-ebpf` touches packets and calls into this crate; `lb-user` builds map
//! contents with it; the tests predict the data plane with it. Everything here
//! is `no_std`, allocation-free (except Maglev table building, behind `std`),
//! and tested on the host.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(unsafe_code)]

pub mod counters;
pub mod hash;
pub mod maps;
pub mod packet;

#[cfg(feature = "std")]
pub mod maglev;

pub use counters::{Counter, DropReason};
pub use maps::*;
