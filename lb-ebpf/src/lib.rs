//! Build-time anchor for `lb-user/build.rs` (aya-build); the programs are the bins.
#![no_std]
