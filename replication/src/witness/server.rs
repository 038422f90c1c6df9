//! `ftvm witness --listen ADDR --state FILE`: the arbiter's process. It answers one request
//! per connection; a claim that changes a term is written to FILE (temporary file, fsync,
//! rename, fsync of the directory) before the answer goes out, so a witness restarted from
//! FILE never grants a term twice.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ftvm_proto::frame::{self, FrameReader};
use ftvm_proto::witness::{
    witness_request, Claim, VmTerm, WitnessReply, WitnessRequest, WitnessState,
};
use ftvm_proto::{WITNESS_MAGIC, WITNESS_VERSION};

/// How long the witness waits for a client's request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the witness's state file.
#[derive(Debug, thiserror::Error)]
#[error("witness state {path}: {why}")]
pub struct StateError {
    path: String,
    why: String,
}

/// The terms, as kept in memory and in the state file.
#[derive(Debug)]
pub struct Terms {
    path: PathBuf,
    vms: BTreeMap<String, (u64, String)>,
}

impl Terms {
    /// Loads the state file at `path` (none yet: no VM has a term).
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let err = |why: String| StateError {
            path: path.display().to_string(),
            why,
        };
        let mut vms = BTreeMap::new();
        match File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
            Ok(f) => {
                let state = FrameReader::new(f, 0)
                    .read_frame::<WitnessState>()
                    .map_err(|e| err(e.to_string()))?
                    .map(|(_, s)| s)
                    .unwrap_or_default();
                for vm in state.vms {
                    vms.insert(vm.vm_id, (vm.term, vm.holder));
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            vms,
        })
    }

    /// The term of `vm_id` and its holder (0 and "" for a VM never claimed).
    pub fn get(&self, vm_id: &str) -> (u64, String) {
        self.vms.get(vm_id).cloned().unwrap_or_default()
    }

    /// Compare-and-swap (see `proto/witness.proto`): the reply, after the new state is on
    /// disk.
    pub fn claim(&mut self, c: &Claim) -> WitnessReply {
        let (term, holder) = self.get(&c.vm_id);
        if term == c.expected_term {
            let new = (term + 1, c.claimant.clone());
            let old = self.vms.insert(c.vm_id.clone(), new.clone());
            if let Err(e) = self.persist() {
                // Not on disk: not granted.
                match old {
                    Some(old) => self.vms.insert(c.vm_id.clone(), old),
                    None => self.vms.remove(&c.vm_id),
                };
                return WitnessReply {
                    error: e.to_string(),
                    ..Default::default()
                };
            }
            tracing::info!(vm = c.vm_id, term = new.0, holder = new.1, "term granted");
            return WitnessReply {
                granted: true,
                term: new.0,
                holder: new.1,
                error: String::new(),
            };
        }
        // The claimant won this very term before and did not hear the answer.
        let granted = term == c.expected_term + 1 && holder == c.claimant;
        tracing::info!(
            vm = c.vm_id,
            expected = c.expected_term,
            term,
            holder,
            claimant = c.claimant,
            granted,
            "claim of a term that moved on"
        );
        WitnessReply {
            granted,
            term,
            holder,
            error: String::new(),
        }
    }

    /// Writes the state: a temporary file, fsynced, renamed over the old one, and the
    /// directory fsynced, so the file holds the old state or the new one, never less.
    fn persist(&self) -> Result<(), StateError> {
        let err = |why: String| StateError {
            path: self.path.display().to_string(),
            why,
        };
        let state = WitnessState {
            vms: self
                .vms
                .iter()
                .map(|(vm_id, (term, holder))| VmTerm {
                    vm_id: vm_id.clone(),
                    term: *term,
                    holder: holder.clone(),
                })
                .collect(),
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(|e| err(e.to_string()))?;
        f.write_all(&frame::encode(&state))
            .and_then(|()| f.sync_all())
            .map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| err(e.to_string()))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(format!("fsync of {}: {e}", dir.display())))
    }

    /// Answers one request.
    pub fn answer(&mut self, request: WitnessRequest) -> WitnessReply {
        if request.version != WITNESS_VERSION {
            return WitnessReply {
                error: format!(
                    "witness protocol version {} (this witness speaks {WITNESS_VERSION})",
                    request.version
                ),
                ..Default::default()
            };
        }
        match request.body {
            Some(witness_request::Body::Claim(c)) => self.claim(&c),
            Some(witness_request::Body::Query(q)) => {
                let (term, holder) = self.get(&q.vm_id);
                WitnessReply {
                    term,
                    holder,
                    ..Default::default()
                }
            }
            None => WitnessReply {
                error: "an empty request".into(),
                ..Default::default()
            },
        }
    }
}

/// Reads one request from `s` (nothing a client sends is trusted).
fn read_request(s: &mut TcpStream) -> Result<WitnessRequest, String> {
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic != WITNESS_MAGIC {
        return Err("not an ftvm witness client".into());
    }
    FrameReader::new(&mut *s, magic.len() as u64)
        .read_frame::<WitnessRequest>()
        .map_err(|e| e.to_string())?
        .map(|(_, r)| r)
        .ok_or_else(|| "no request".into())
}

/// Serves requests on `listener` forever, one at a time (each is tiny; a slow client costs
/// at most the client timeout).
pub fn serve(
    listener: &TcpListener,
    terms: &mut Terms,
    metrics: Option<&crate::telemetry::witness::WitnessMetrics>,
) {
    for conn in listener.incoming() {
        let mut s = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("witness: cannot accept: {e}");
                continue;
            }
        };
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut claim = false;
        let reply = match read_request(&mut s) {
            Ok(request) => {
                claim = matches!(request.body, Some(witness_request::Body::Claim(_)));
                terms.answer(request)
            }
            Err(why) => {
                tracing::warn!(peer, "witness: bad request: {why}");
                WitnessReply {
                    error: why,
                    ..Default::default()
                }
            }
        };
        if let Some(m) = metrics {
            let outcome = match (&reply, claim) {
                (r, _) if !r.error.is_empty() => "error",
                (r, true) if r.granted => "granted",
                (_, true) => "refused",
                _ => "query",
            };
            let highest = terms.vms.values().map(|(t, _)| *t).max().unwrap_or(0);
            m.answered(outcome, terms.vms.len(), highest);
        }
        if let Err(e) = s.write_all(&frame::encode(&reply)) {
            tracing::warn!(peer, "witness: cannot answer: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(vm: &str, expected: u64, who: &str) -> Claim {
        Claim {
            vm_id: vm.into(),
            expected_term: expected,
            claimant: who.into(),
        }
    }

    #[test]
    fn a_term_is_granted_once_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("ftvm-witness-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state");
        let mut t = Terms::load(&path).expect("load");
        let r = t.claim(&claim("vm", 0, "standby"));
        assert!(r.granted && r.term == 1, "{r:?}");
        // The other side of the pair claims the same term: refused, told who holds it.
        let r = t.claim(&claim("vm", 0, "primary"));
        assert!(!r.granted && r.term == 1 && r.holder == "standby", "{r:?}");
        // The winner asking again (its answer was lost) hears it won.
        let r = t.claim(&claim("vm", 0, "standby"));
        assert!(r.granted && r.term == 1, "{r:?}");
        // Another VM has its own term.
        assert!(t.claim(&claim("other", 0, "primary")).granted);
        // A restart reads the state back: term 1 is never granted again.
        let mut t = Terms::load(&path).expect("reload");
        let r = t.claim(&claim("vm", 0, "primary"));
        assert!(!r.granted && r.term == 1, "{r:?}");
        let r = t.claim(&claim("vm", 1, "primary"));
        assert!(r.granted && r.term == 2 && r.holder == "primary", "{r:?}");
        assert_eq!(Terms::load(&path).expect("reload").get("vm").0, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_claim_that_cannot_be_persisted_is_not_granted() {
        let mut t = Terms::load(Path::new("/nonexistent-dir/state")).expect("load");
        let r = t.claim(&claim("vm", 0, "standby"));
        assert!(!r.granted && !r.error.is_empty(), "{r:?}");
        assert_eq!(t.get("vm").0, 0);
    }
}
