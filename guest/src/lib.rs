//! The built-in ftvm test guest.
//!
//! A tiny freestanding x86_64 kernel written in C and assembly (see `src/*.c`,
//! `src/*.S` and `README.md` in this crate). `build.rs` compiles it with the
//! host's `gcc` and links it with `ld` into a static ELF64 executable that is
//! loaded at physical address 0x200000 and entered through the Linux 64-bit
//! boot protocol, exactly like a `vmlinux`. The workload it runs is chosen on
//! the kernel command line (`workload=counter ticks=10`, `workload=echo`, ...).

/// The guest kernel: a static ELF64 x86_64 executable, loaded and linked at
/// physical address 0x200000, entry point `_start` (64-bit boot protocol,
/// RSI = `boot_params`).
pub static KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ftvm-guest.elf"));
