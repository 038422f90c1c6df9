//! `ftvm-proto`: the wire format of ftvm.
//!
//! - [`log`]: prost types generated from `proto/log.proto` (the replication log);
//! - [`channel`]: prost types generated from `proto/channel.proto` (the pair connection);
//! - [`witness`]: prost types generated from `proto/witness.proto` (the arbiter);
//! - [`frame`]: length-prefixed frames with a CRC32C, shared by log files and sockets;
//! - [`packed`]: the packed record block a `RecordBatch` carries.

/// The replication log schema (generated from `proto/log.proto`).
#[allow(missing_docs, clippy::all)]
pub mod log {
    include!(concat!(env!("OUT_DIR"), "/ftvm.log.rs"));
}

/// The pair channel schema (generated from `proto/channel.proto`).
#[allow(missing_docs, clippy::all)]
pub mod channel {
    include!(concat!(env!("OUT_DIR"), "/ftvm.channel.rs"));
}

/// The witness's requests, answers and state file (generated from `proto/witness.proto`).
#[allow(missing_docs, clippy::all)]
pub mod witness {
    include!(concat!(env!("OUT_DIR"), "/ftvm.witness.rs"));
}

pub mod frame;
pub mod packed;

/// The log format this build writes and reads. Version 2: epoch digests also cover the disk
/// blocks the guest wrote in the epoch. Version 3: a batch's records travel as one packed
/// block ([`packed`]). Version 4: every disk read is logged as a `DiskRead` (disk, sector,
/// length, hash), which the replayer checks against its own copy. Version 5: the header's
/// `rng_seed` is boot randomness the guest was built with (a reader that ignored it would
/// build another guest). Version 6: the header's `rtc_base_s` is the guest's CMOS clock at
/// boot (a reader that ignored it would replay reads of that clock as divergences).
pub const FORMAT_VERSION: u32 = 6;

/// First bytes of a log file.
pub const LOG_MAGIC: &[u8; 8] = b"FTVMLOG\0";

/// The pair protocol this build speaks (exchanged first on every pair connection).
/// Version 3: `Hello` carries the sender's host kind. Version 4: the output a checkpoint
/// carries travels as its own `HeldOutput` message. Version 5: `Abandon`, which a primary
/// sends before it closes the connection to a standby it drops; an older standby would take
/// that close for the primary's death and go live next to a primary that runs on; `Hello`
/// carries the sender's heartbeat interval and timeout, which both sides agree on; `Start`
/// carries the initrd and the witness's VM id and term; repairs carry disk blocks
/// (`Diverged.dirty_blocks`, `PageChunk.blocks`), and digests cover them. Version 6: the
/// disk resync between `Start` and `Ready` (`DiskHashes`, `DiskBlocks`), and a sync's
/// stop-and-copy carries disk blocks. Version 7: a batch's records travel as one packed block
/// ([`packed`]). Version 8: the log carries `DiskRead` records (log format 4), which a
/// standby checks against its own copy of each disk.
pub const PROTOCOL_VERSION: u32 = 8;

/// The witness protocol this build speaks.
pub const WITNESS_VERSION: u32 = 1;

/// First bytes a witness client sends.
pub const WITNESS_MAGIC: &[u8; 8] = b"FTVMWTNS";

/// First bytes each side of a pair connection sends.
pub const CHANNEL_MAGIC: &[u8; 8] = b"FTVMPAIR";
