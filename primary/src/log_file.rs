//! The replication log as a file: [`ftvm_proto::LOG_MAGIC`], a header frame, then one frame
//! per record batch. Each batch is flushed as it is written, so a log cut short by a crash
//! holds every complete epoch before it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use ftvm_proto::frame;
use ftvm_proto::log::{log_frame::Body, LogFrame, LogHeader, RecordBatch};

use crate::LogSink;

/// Writes a log file.
pub struct LogFileWriter {
    out: BufWriter<File>,
    bytes: u64,
}

impl LogFileWriter {
    /// Creates (truncates) `path` and writes the magic and the header.
    pub fn create(path: &Path, header: LogHeader) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let mut w = Self {
            out: BufWriter::new(file),
            bytes: 0,
        };
        w.out.write_all(ftvm_proto::LOG_MAGIC)?;
        w.bytes += ftvm_proto::LOG_MAGIC.len() as u64;
        w.write_frame(&LogFrame {
            body: Some(Body::Header(header)),
        })?;
        Ok(w)
    }

    fn write_frame(&mut self, f: &LogFrame) -> std::io::Result<()> {
        self.bytes += frame::write(&mut self.out, f)? as u64;
        self.out.flush()
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl LogSink for LogFileWriter {
    fn write_batch(&mut self, batch: RecordBatch) -> std::io::Result<()> {
        self.write_frame(&LogFrame {
            body: Some(Body::Batch(batch)),
        })
    }
}
