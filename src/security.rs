//! The pair key on the command line: `ftvm keygen`, and `--key FILE` / `--insecure` on every
//! command that opens a pair process's connections (DESIGN.md §6).

use std::path::PathBuf;

use ftvm_replication::link::{PairKey, Security};

/// How a command protects its connections. One of the two is required: there is no
/// unprotected default.
#[derive(clap::Args, Clone)]
pub struct SecurityArgs {
    /// The pair key (`ftvm keygen --out FILE`, copied to both hosts, mode 0600): every
    /// connection (pair channel, join port, control socket) is authenticated with it and
    /// encrypted (Noise NNpsk0, AES-256-GCM); a peer without it gets nothing.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub key: Option<PathBuf>,
    /// Plain TCP, no authentication or encryption: only on a link where every host that can
    /// reach these ports is trusted. `ftvm status` says `channel=insecure`.
    #[arg(long)]
    pub insecure: bool,
}

impl SecurityArgs {
    /// The key, `--insecure`, or an error that says how to get a key.
    pub fn security(&self) -> Result<Security, String> {
        match (&self.key, self.insecure) {
            (Some(path), _) => PairKey::load(path)
                .map(Security::key)
                .map_err(|e| e.to_string()),
            (None, true) => Ok(Security::Insecure),
            (None, false) => Err(
                "no pair key: give --key FILE (make one with `ftvm keygen --out FILE` and copy it to both hosts) \
                 or --insecure on a trusted link"
                    .into(),
            ),
        }
    }
}

/// `ftvm keygen`.
#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Where to write the new key (created with mode 0600; an existing file is never
    /// overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Writes a new pair key and prints its fingerprint.
pub fn keygen(args: &KeygenArgs) -> Result<u8, String> {
    let key = PairKey::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    key.write_new(&args.out).map_err(|e| e.to_string())?;
    println!(
        "wrote pair key {} (fingerprint {}); copy it to both hosts of the pair",
        args.out.display(),
        key.fingerprint()
    );
    Ok(0)
}
