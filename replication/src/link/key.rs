//! The pair's pre-shared key: made by `ftvm keygen`, kept in a file only its owner can read,
//! named in logs and `ftvm status` by a fingerprint that does not reveal it.

use std::io::{self, Read, Write};
use std::path::Path;

/// Bytes of a pair key.
pub const KEY_LEN: usize = 32;

/// A pair's pre-shared key (`ftvm keygen`). Never printed: [`PairKey::fingerprint`] names it.
pub struct PairKey(pub(super) [u8; KEY_LEN]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PairKey({})", self.fingerprint())
    }
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read the pair key {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not a key.
    #[error("{path} is not an ftvm pair key (expected {} hex digits, as `ftvm keygen` writes)", KEY_LEN * 2)]
    Format {
        /// The file.
        path: String,
    },
    /// Others may read the file.
    #[error("the pair key {path} can be read by others (mode {mode:o}): chmod 600 it")]
    Exposed {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// The file cannot be written.
    #[error("cannot write the pair key {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl PairKey {
    /// A new random key (from the kernel's random source).
    pub fn generate() -> io::Result<Self> {
        let mut key = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        Ok(Self(key))
    }

    /// The key in `text` (hex, surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != KEY_LEN * 2 || !text.is_ascii() {
            return None;
        }
        let mut key = [0u8; KEY_LEN];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(key))
    }

    /// The key as hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a key file; one that others can read is refused.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let name = path.display().to_string();
        let read = |source| KeyError::Read {
            path: name.clone(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: name, mode });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::from_hex(&text).ok_or(KeyError::Format { path: name })
    }

    /// Writes the key to a new file `path`, readable by its owner only (never overwrites).
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(format!("{}\n", self.to_hex()).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(err)
    }

    /// A short name for the key that does not reveal it (in `ftvm status` and logs).
    pub fn fingerprint(&self) -> String {
        let hash = blake3::keyed_hash(b"ftvm pair key fingerprint v1 ...", &self.0);
        hash.to_hex()[..16].to_string()
    }
}
