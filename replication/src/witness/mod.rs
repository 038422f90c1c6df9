//! The embedded witness (DESIGN.md §5): the arbiter a pair consults before a role change it
//! decided on silence. [`server`] is `ftvm witness`; this module is its client and what the
//! pair processes share about it.
//!
//! The witness keeps, per protected VM, the pair's **term** (the count of arbitrated role
//! changes) and its holder. A claim is a compare-and-swap: `claim(vm_id, expected_term,
//! claimant)` is granted (term + 1, persisted with fsync before the answer) only if the term
//! is still `expected_term`; otherwise it is refused with the term and holder now. Of two
//! sides that lost each other and claim the same term, exactly one wins; the other fences
//! itself (stops its guest, releases nothing).
//!
//! One request per TCP connection: `FTVMWTNS`, one framed `WitnessRequest`, one framed
//! `WitnessReply` back (`proto/proto/witness.proto`).

pub mod server;

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvm_proto::channel::ArbiterKind;
use ftvm_proto::frame::{self, FrameReader};
use ftvm_proto::witness::{witness_request, Claim, Query, WitnessReply, WitnessRequest};
use ftvm_proto::{WITNESS_MAGIC, WITNESS_VERSION};

/// How long a pair process waits for the witness's answer to one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a side that could not reach the witness waits before it asks again.
pub const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The witness's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The claimant holds `term` now.
    Granted {
        /// The new term.
        term: u64,
    },
    /// Someone else holds the term: the claimant lost.
    Refused {
        /// The term now.
        term: u64,
        /// Its holder.
        holder: String,
    },
}

/// A claim's outcome as the protocol cores see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The witness answered.
    Decided(Verdict),
    /// The witness could not be asked or did not answer: why. The claimant waits and asks
    /// again; it never guesses.
    Unreachable(String),
}

/// A pair's identity at its witness and its term now, shared by every role a process plays
/// (a switchover or a won claim changes roles or terms, not the VM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairTerm {
    /// The protected VM's id at the witness ("" until the primary named it).
    pub vm_id: String,
    /// The term now.
    pub term: u64,
}

/// Which arbiter keeps the pair's term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `--witness ADDR`: an embedded `ftvm witness`.
    Witness(String),
    /// `--etcd ENDPOINTS`: a transaction in an etcd cluster ([`crate::etcd`]).
    Etcd(crate::etcd::EtcdConfig),
}

impl Backend {
    /// The arbiter as messages name it ("the witness", "etcd").
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Witness(_) => "the witness",
            Backend::Etcd(_) => "etcd",
        }
    }

    /// The kind, as `Start.arbiter` carries it: both sides of a pair must arbitrate at the
    /// same kind of arbiter.
    pub fn kind(&self) -> ArbiterKind {
        match self {
            Backend::Witness(_) => ArbiterKind::Witness,
            Backend::Etcd(_) => ArbiterKind::Etcd,
        }
    }
}

/// The arbiter (`--witness ADDR` or `--etcd ENDPOINTS`): where it is and who this process
/// is to it. The protocol cores never see which one it is; only [`claim_outcome`] does.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// The arbiter.
    pub backend: Backend,
    /// This process, as the witness shows it to a loser ("standby on host pid 123").
    pub claimant: String,
    /// The pair's id and term, shared across role changes.
    pub term: Arc<Mutex<PairTerm>>,
}

impl WitnessConfig {
    /// A witness at `addr`.
    pub fn new(addr: String) -> Self {
        Self::with_backend(Backend::Witness(addr))
    }

    /// An etcd cluster as the arbiter.
    pub fn etcd(config: crate::etcd::EtcdConfig) -> Self {
        Self::with_backend(Backend::Etcd(config))
    }

    /// The arbiter `backend`.
    pub fn with_backend(backend: Backend) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Self {
            backend,
            claimant: format!("ftvm on {host} pid {}", std::process::id()),
            term: Arc::default(),
        }
    }

    /// The pair's id and term now.
    pub fn pair_term(&self) -> PairTerm {
        self.term.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Records the pair's id and term.
    pub fn set_pair_term(&self, pair: PairTerm) {
        if let Ok(mut t) = self.term.lock() {
            *t = pair;
        }
    }
}

/// A new id for a protected VM: unique per primary process start.
pub fn new_vm_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}-{nanos:x}", host.trim(), std::process::id())
}

/// Errors talking to a witness.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// No connection, no answer in time, or a broken answer.
    #[error("{addr}: {why}")]
    Unreachable {
        /// The arbiter ("witness ADDR", "etcd ENDPOINTS").
        addr: String,
        /// What went wrong.
        why: String,
    },
    /// The arbiter answered with an error.
    #[error("{addr} refused to answer: {why}")]
    Failed {
        /// The arbiter ("witness ADDR", "etcd ENDPOINTS").
        addr: String,
        /// Its reason.
        why: String,
    },
}

fn ask(
    addr: &str,
    body: witness_request::Body,
    timeout: Duration,
) -> Result<WitnessReply, WitnessError> {
    let unreachable = |why: String| WitnessError::Unreachable {
        addr: format!("witness {addr}"),
        why,
    };
    let sockaddr = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("the address resolves to nothing".into()))?;
    let mut s =
        TcpStream::connect_timeout(&sockaddr, timeout).map_err(|e| unreachable(e.to_string()))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| unreachable(e.to_string()))?;
    let mut request = WITNESS_MAGIC.to_vec();
    request.extend(frame::encode(&WitnessRequest {
        version: WITNESS_VERSION,
        body: Some(body),
    }));
    s.write_all(&request)
        .map_err(|e| unreachable(e.to_string()))?;
    let reply = FrameReader::new(&mut s, 0)
        .read_frame::<WitnessReply>()
        .map_err(|e| unreachable(e.to_string()))?
        .ok_or_else(|| unreachable("it closed the connection without an answer".into()))?
        .1;
    if !reply.error.is_empty() {
        return Err(WitnessError::Failed {
            addr: format!("witness {addr}"),
            why: reply.error,
        });
    }
    Ok(reply)
}

/// Claims term `expected_term + 1` of `vm_id` for `claimant`.
pub fn claim(
    addr: &str,
    vm_id: &str,
    expected_term: u64,
    claimant: &str,
    timeout: Duration,
) -> Result<Verdict, WitnessError> {
    let reply = ask(
        addr,
        witness_request::Body::Claim(Claim {
            vm_id: vm_id.into(),
            expected_term,
            claimant: claimant.into(),
        }),
        timeout,
    )?;
    Ok(if reply.granted {
        Verdict::Granted { term: reply.term }
    } else {
        Verdict::Refused {
            term: reply.term,
            holder: reply.holder,
        }
    })
}

/// The term of `vm_id` now and its holder.
pub fn query(addr: &str, vm_id: &str, timeout: Duration) -> Result<(u64, String), WitnessError> {
    let reply = ask(
        addr,
        witness_request::Body::Query(Query {
            vm_id: vm_id.into(),
        }),
        timeout,
    )?;
    Ok((reply.term, reply.holder))
}

/// Makes a claim on a helper thread (it may take [`REQUEST_TIMEOUT`]): the outcome goes to
/// `tx`, then `waker` wakes the channel thread. A granted term is recorded in the pair's
/// [`PairTerm`] first.
pub fn spawn_claim(
    witness: &WitnessConfig,
    vm_id: String,
    expected_term: u64,
    tx: crossbeam_channel::Sender<ClaimOutcome>,
    waker: Arc<mio::Waker>,
) {
    let witness = witness.clone();
    let failed = tx.clone();
    let spawned = std::thread::Builder::new()
        .name("ftvm-claim".into())
        .spawn(move || {
            let outcome = claim_outcome(&witness, &vm_id, expected_term);
            if let ClaimOutcome::Decided(Verdict::Granted { term }) = &outcome {
                witness.set_pair_term(PairTerm { vm_id, term: *term });
            }
            let _ = tx.send(outcome);
            let _ = waker.wake();
        });
    if let Err(e) = spawned {
        let _ = failed.send(ClaimOutcome::Unreachable(format!(
            "cannot start a thread to ask the arbiter: {e}"
        )));
    }
}

/// A claim at the configured arbiter ([`claim`] at a witness, [`crate::etcd::claim`] in
/// etcd) as a [`ClaimOutcome`] (an arbiter that answers with an error counts as
/// unreachable: the claimant waits and asks again).
pub fn claim_outcome(config: &WitnessConfig, vm_id: &str, expected_term: u64) -> ClaimOutcome {
    let verdict = match &config.backend {
        Backend::Witness(addr) => claim(
            addr,
            vm_id,
            expected_term,
            &config.claimant,
            REQUEST_TIMEOUT,
        ),
        Backend::Etcd(etcd) => crate::etcd::claim(
            etcd,
            vm_id,
            expected_term,
            &config.claimant,
            REQUEST_TIMEOUT,
        ),
    };
    match verdict {
        Ok(v) => ClaimOutcome::Decided(v),
        Err(e) => ClaimOutcome::Unreachable(e.to_string()),
    }
}
