//! `ftvm-proto`: the wire format of ftvm.
//!
//! - [`log`]: prost types generated from `proto/log.proto` (the replication log);
//! - [`frame`]: length-prefixed frames with a CRC32C, shared by log files and sockets.

/// The replication log schema (generated from `proto/log.proto`).
#[allow(missing_docs, clippy::all)]
pub mod log {
    include!(concat!(env!("OUT_DIR"), "/ftvm.log.rs"));
}

pub mod frame;

/// The log format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// First bytes of a log file.
pub const LOG_MAGIC: &[u8; 8] = b"FTVMLOG\0";
