//! The replication log's one home (DESIGN.md §2): everything that knows its format.
//!
//! - [`LogSink`] / [`LogSource`]: where the recorder writes the log and where the replayer
//!   reads it from (a file, or the pair's channel);
//! - [`LogFileWriter`] / [`LogFileReader`]: the log as a file (`ftvm run --record`,
//!   `ftvm replay`);
//! - the header ([`build_header`], [`check_version`], [`config_from_header`],
//!   [`check_disks`]): the VM a log was recorded with, and the checks that the VM a replay
//!   builds is that one;
//! - [`to_run_end`] / [`from_run_end`]: how the guest stopped, as a log record;
//! - [`LogError`]: a log that is unusable, as opposed to a replay that diverges from it.
//!
//! This lives in `ftvm-replication` because it is the lowest crate that sees both the wire
//! types (`ftvm-proto`) and the VM types (`ftvm-vmm`), and both the primary and the
//! secondary depend on it.

mod disk_read;
mod file;
mod header;
mod run_end;

pub use disk_read::{check_disk_read, to_disk_read};
pub use file::{LogFileReader, LogFileWriter};
pub use header::{
    build_header, check_disks, check_net, check_version, config_from_header, logged_mac,
};
pub use run_end::{from_run_end, to_run_end};

use ftvm_proto::frame::FrameError;
use ftvm_proto::log::RecordBatch;

/// Where the log goes: a file, or the pair's channel.
pub trait LogSink {
    /// Ships one batch of records.
    fn write_batch(&mut self, batch: RecordBatch) -> Result<(), std::io::Error>;

    /// Ships the batch that ends an epoch whose closing (digest first) began at `closing`.
    /// Only the pair's channel uses the time (the latency breakdown of the audit trail).
    fn write_epoch(
        &mut self,
        batch: RecordBatch,
        closing: std::time::Instant,
    ) -> Result<(), std::io::Error> {
        let _ = closing;
        self.write_batch(batch)
    }
}

/// Where the log comes from: a file, or the pair's channel.
pub trait LogSource {
    /// The next batch, or None when the log has ended.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, LogError>;
    /// Byte offset reached (for error messages).
    fn offset(&self) -> u64;
}

/// The log is unusable (as opposed to the replay diverging from it).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file cannot be opened.
    #[error("cannot open log {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// Not a log file.
    #[error("not an ftvm log: bad magic at offset 0")]
    BadMagic,
    /// A frame is damaged.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Written by an incompatible version.
    #[error("unsupported log format version {found} in the header frame at offset {offset} (this ftvm reads version {})", ftvm_proto::FORMAT_VERSION)]
    Version {
        /// Offset of the header frame.
        offset: u64,
        /// The version found.
        found: u32,
    },
    /// A frame of the wrong kind.
    #[error("unexpected frame at offset {offset}: {what}")]
    UnexpectedFrame {
        /// Offset of the frame.
        offset: u64,
        /// What was found.
        what: &'static str,
    },
    /// The log has no header.
    #[error("log ends at offset {offset} before its header")]
    Ended {
        /// Offset of the end.
        offset: u64,
    },
    /// The log ends before the run does.
    #[error("log ends at offset {offset} after exit {exit_seq} without a run-end record (truncated log?)")]
    Truncated {
        /// Offset of the end.
        offset: u64,
        /// The last exit the log covers.
        exit_seq: u64,
    },
    /// A record makes no sense.
    #[error("malformed record in the frame ending at offset {offset}: {why}")]
    Malformed {
        /// Offset reached.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The log was recorded with another kernel.
    #[error("log was recorded with another kernel: log has kernel hash {logged}, {kernel} hashes to {actual}")]
    KernelMismatch {
        /// Hash in the log.
        logged: String,
        /// Hash of the kernel given.
        actual: String,
        /// Which kernel.
        kernel: String,
    },
    /// The header's VM configuration is unusable.
    #[error("invalid VM configuration in the log header: {0}")]
    Config(String),
}
