//! The one place packet memory is read and written.
//!
//! A [`Bytes`] is a window of `N` packet bytes proven to lie before
//! `data_end`: one bounds check, which the verifier remembers, then any number
//! of fixed-offset accesses (offsets checked at compile time).
//!
//! Accesses are single BPF load/store instructions written as inline asm,
//! because packet data has no alignment Rust could rely on (an IPv4 header
//! starts 14 bytes into the frame) and the BPF backend splits every access it
//! cannot prove aligned into byte loads and shifts. The instruction itself is
//! well defined: the verifier accepts unaligned packet access where the CPU
//! handles it (x86-64, arm64), and the JIT emits a plain `mov`. Values are raw,
//! in memory order; `u16::from_be` and friends make them numbers.
// Shared by both programs; each uses the accessors it needs.
#![allow(dead_code)]

use core::arch::asm;

use aya_ebpf::{helpers::bpf_csum_diff, programs::XdpContext};

/// `N` bytes of packet starting at `p`, all before `data_end`. A window
/// does not survive a resize of the frame (`bpf_xdp_adjust_head/tail`): the
/// verifier rejects a program that uses one after that, so take a new one.
#[derive(Clone, Copy)]
pub struct Bytes<const N: usize> {
    p: usize,
}

macro_rules! load {
    ($name:ident, $ty:ty, $width:literal) => {
        /// The raw value at `OFF` (memory order).
        #[inline(always)]
        pub fn $name<const OFF: usize>(self) -> $ty {
            const { assert!(OFF + core::mem::size_of::<$ty>() <= N) };
            let v: u64;
            // SAFETY: `OFF + size_of` bytes from `p` are inside the packet
            // (checked in `at`), and the load reads nothing else.
            unsafe {
                asm!(
                    concat!("{v} = *(", $width, " *)({p} + {off})"),
                    v = lateout(reg) v,
                    p = in(reg) self.p,
                    off = const OFF,
                    options(readonly, nostack, preserves_flags),
                )
            };
            v as $ty
        }
    };
}

macro_rules! store {
    ($name:ident, $ty:ty, $width:literal) => {
        /// Writes the raw value `v` (memory order) at `OFF`.
        #[inline(always)]
        pub fn $name<const OFF: usize>(self, v: $ty) {
            const { assert!(OFF + core::mem::size_of::<$ty>() <= N) };
            // SAFETY: as for loads; packet memory is writable in XDP.
            unsafe {
                asm!(
                    concat!("*(", $width, " *)({p} + {off}) = {v}"),
                    v = in(reg) v as u64,
                    p = in(reg) self.p,
                    off = const OFF,
                    options(nostack, preserves_flags),
                )
            };
        }
    };
}

impl<const N: usize> Bytes<N> {
    /// The `N` bytes at `offset`, if the packet is that long.
    #[inline(always)]
    pub fn at(ctx: &XdpContext, offset: usize) -> Option<Self> {
        let p = ctx.data() + offset;
        if p + N > ctx.data_end() {
            return None;
        }
        Some(Bytes { p })
    }

    /// The one's-complement sum of the `N` bytes as native-order 32-bit
    /// words, added to `seed` (`bpf_csum_diff`, which takes at most 512
    /// bytes). The result may be folded or not; either sums on correctly.
    #[inline(always)]
    pub fn csum(self, seed: u32) -> u32 {
        const { assert!(N % 4 == 0 && N <= 512) };
        // SAFETY: the helper reads the `N` bytes at `p`, all inside the
        // packet (checked in `at`), and writes nothing.
        let r =
            unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, self.p as *mut u32, N as u32, seed) };
        r as u32
    }

    load!(u8, u8, "u8");
    load!(u16, u16, "u16");
    load!(u32, u32, "u32");
    load!(u64, u64, "u64");
    store!(set_u16, u16, "u16");
    store!(set_u32, u32, "u32");
    store!(set_u64, u64, "u64");
}
