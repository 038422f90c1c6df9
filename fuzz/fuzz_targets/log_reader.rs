//! The log-file reader on arbitrary bytes (`ftvm replay` of a damaged or hostile file):
//! the header and every batch are read or refused with an error, never a panic.
#![no_main]

use ftvm_replication::log::{LogFileReader, LogSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((mut reader, header)) = LogFileReader::from_reader(std::io::Cursor::new(data)) else {
        return;
    };
    let _ =
        ftvm_replication::log::config_from_header(&header, Vec::new(), "kernel", None, Vec::new());
    while let Ok(Some(_)) = reader.next_batch() {}
});
