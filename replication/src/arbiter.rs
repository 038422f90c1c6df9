//! The pair's side of the arbiter (DESIGN.md §5), with no I/O inside: the term this side
//! knows, and a claim under way. Both protocol cores use it; the claim itself is made by
//! their drivers ([`crate::witness::claim_outcome`]), whose outcome comes back in.

use std::time::{Duration, Instant};

use crate::witness::{ClaimOutcome, Verdict, RETRY_AFTER};

/// What `ftvm` exits with when it lost the term at the witness and fenced itself: its guest
/// stopped, nothing it held was released.
pub const STATUS_FENCED: u8 = 11;

/// The arbiter as one side of the pair knows it.
#[derive(Debug, Clone)]
pub struct Arbiter {
    /// The protected VM's id at the witness.
    pub vm_id: String,
    /// The term this side knows (the last one granted, to anyone, that it heard of).
    pub term: u64,
    /// The arbiter as messages name it ("the witness", "etcd").
    pub name: &'static str,
    /// A claim under way.
    pub claim: Option<Claim>,
}

/// A claim of term `term + 1`.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Why this side claims (how it lost its peer).
    pub why: String,
    /// The request is out; its outcome has not come back.
    pub in_flight: bool,
    /// Ask again at this time (after the witness could not be reached); None: at once.
    pub retry_at: Option<Instant>,
    /// Why the witness could not be reached, last time.
    pub unreachable: Option<String>,
}

impl Arbiter {
    /// The arbiter of `vm_id`, at `term`, a witness.
    pub fn new(vm_id: String, term: u64) -> Self {
        Self::named(vm_id, term, "the witness")
    }

    /// The arbiter of `vm_id`, at `term`, as messages name it (`Backend::name`).
    pub fn named(vm_id: String, term: u64, name: &'static str) -> Self {
        Self {
            vm_id,
            term,
            name,
            claim: None,
        }
    }

    /// Starts claiming the next term (once: a claim under way goes on); the request is due
    /// at once.
    pub fn start(&mut self, why: String) {
        if self.claim.is_none() {
            self.claim = Some(Claim {
                why,
                in_flight: false,
                retry_at: None,
                unreachable: None,
            });
        }
    }

    /// A claim is under way.
    pub fn claiming(&self) -> bool {
        self.claim.is_some()
    }

    /// Gives up a claim whose request is not out (the peer came back).
    pub fn cancel(&mut self) -> bool {
        if self.claim.as_ref().is_some_and(|c| !c.in_flight) {
            self.claim = None;
            return true;
        }
        false
    }

    /// The request to send at `now`, if one is due: (vm id, expected term).
    pub fn due(&mut self, now: Instant) -> Option<(String, u64)> {
        let c = self.claim.as_mut()?;
        if c.in_flight || c.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        c.in_flight = true;
        Some((self.vm_id.clone(), self.term))
    }

    /// How long until a retry is due, if one waits.
    pub fn until_retry(&self, now: Instant) -> Option<Duration> {
        let c = self.claim.as_ref().filter(|c| !c.in_flight)?;
        Some(
            c.retry_at
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
        )
    }

    /// The claim's outcome came back at `now`. Returns the verdict and why this side
    /// claimed, or None while the witness cannot be reached (asked again later).
    pub fn outcome(&mut self, outcome: ClaimOutcome, now: Instant) -> Option<(Verdict, String)> {
        let c = self.claim.as_mut()?;
        c.in_flight = false;
        match outcome {
            ClaimOutcome::Unreachable(why) => {
                if c.unreachable.is_none() {
                    tracing::warn!("cannot reach {} ({why}): waiting, asking again", self.name);
                }
                c.unreachable = Some(why);
                c.retry_at = Some(now + RETRY_AFTER);
                None
            }
            ClaimOutcome::Decided(v) => {
                let why = self.claim.take().map(|c| c.why).unwrap_or_default();
                match &v {
                    Verdict::Granted { term } | Verdict::Refused { term, .. } => {
                        self.term = self.term.max(*term)
                    }
                }
                Some((v, why))
            }
        }
    }

    /// Whether the witness answered the last request (true while none failed).
    pub fn reachable(&self) -> bool {
        self.claim.as_ref().is_none_or(|c| c.unreachable.is_none())
    }

    /// For `ftvm status`: the claim under way.
    pub fn describe(&self) -> Option<String> {
        let c = self.claim.as_ref()?;
        Some(match &c.unreachable {
            Some(e) => format!(
                "claiming term {} at {}, which cannot be reached ({e})",
                self.term + 1,
                self.name
            ),
            None => format!("claiming term {} at {}", self.term + 1, self.name),
        })
    }
}
