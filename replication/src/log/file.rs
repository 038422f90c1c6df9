//! The replication log as a file: [`ftvm_proto::LOG_MAGIC`], a header frame, then one frame
//! per record batch. Each batch is flushed as it is written, so a log cut short by a crash
//! holds every complete epoch before it. The reader trusts nothing in the file: every error
//! names the byte offset of the frame at fault.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use ftvm_proto::frame::{self, FrameError, FrameReader};
use ftvm_proto::log::{log_frame::Body, LogFrame, LogHeader, RecordBatch};

use super::{check_version, LogError, LogSink, LogSource};

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
            body: Some(Body::Batch(ftvm_proto::packed::pack_batch(batch))),
        })
    }
}

/// A log file opened for replay (any reader: a file, or bytes in memory).
pub struct LogFileReader<R: Read = BufReader<File>> {
    frames: FrameReader<R>,
}

impl LogFileReader {
    /// Opens `path`, checks the magic and reads the header (whose format version must be this
    /// build's).
    pub fn open(path: &Path) -> Result<(Self, LogHeader), LogError> {
        let file = File::open(path).map_err(|source| LogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_reader(BufReader::new(file))
    }
}

impl<R: Read> LogFileReader<R> {
    /// Reads a log from `input`: checks the magic and reads the header.
    pub fn from_reader(mut input: R) -> Result<(Self, LogHeader), LogError> {
        let mut magic = [0u8; 8];
        let mut got = 0;
        while got < magic.len() {
            match input.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(LogError::Frame(FrameError::Io { offset: 0, source }));
                }
            }
        }
        if got < magic.len() || &magic != ftvm_proto::LOG_MAGIC {
            return Err(LogError::BadMagic);
        }
        let mut frames = FrameReader::new(input, magic.len() as u64);
        let offset = frames.offset();
        let header = match frames.read_frame::<LogFrame>()? {
            Some((
                _,
                LogFrame {
                    body: Some(Body::Header(h)),
                },
            )) => h,
            Some(_) => {
                return Err(LogError::UnexpectedFrame {
                    offset,
                    what: "a record batch where the header belongs",
                })
            }
            None => return Err(LogError::Ended { offset }),
        };
        check_version(&header, offset)?;
        Ok((Self { frames }, header))
    }
}

impl<R: Read> LogSource for LogFileReader<R> {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, LogError> {
        let offset = self.frames.offset();
        match self.frames.read_frame::<LogFrame>()? {
            None => Ok(None),
            Some((
                _,
                LogFrame {
                    body: Some(Body::Batch(b)),
                },
            )) => match ftvm_proto::packed::unpack_batch(b) {
                Ok(b) => Ok(Some(b)),
                Err(e) => Err(LogError::Malformed {
                    offset: self.frames.offset(),
                    why: e.to_string(),
                }),
            },
            Some(_) => Err(LogError::UnexpectedFrame {
                offset,
                what: "a frame that is not a record batch",
            }),
        }
    }

    fn offset(&self) -> u64 {
        self.frames.offset()
    }
}
