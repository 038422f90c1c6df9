//! Reading a log file written by `ftvm run --record`, trusting nothing in it: every error
//! names the byte offset of the frame at fault.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use ftvm_proto::frame::{FrameError, FrameReader};
use ftvm_proto::log::{log_frame::Body, LogFrame, LogHeader, RecordBatch};

use crate::{LogError, LogSource};

/// A log file opened for replay.
pub struct LogFileReader {
    frames: FrameReader<BufReader<File>>,
}

impl LogFileReader {
    /// Opens `path`, checks the magic and reads the header (whose format version must be this
    /// build's).
    pub fn open(path: &Path) -> Result<(Self, LogHeader), LogError> {
        let file = File::open(path).map_err(|source| LogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mut input = BufReader::new(file);
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
        if header.format_version != ftvm_proto::FORMAT_VERSION {
            return Err(LogError::Version {
                offset,
                found: header.format_version,
            });
        }
        Ok((Self { frames }, header))
    }
}

impl LogSource for LogFileReader {
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, LogError> {
        let offset = self.frames.offset();
        match self.frames.read_frame::<LogFrame>()? {
            None => Ok(None),
            Some((
                _,
                LogFrame {
                    body: Some(Body::Batch(b)),
                },
            )) => Ok(Some(b)),
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
