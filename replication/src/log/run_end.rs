//! How the guest stopped, as the log's `RunEnd` record (also carried by a checkpoint taken
//! after the end of the run).

use ftvm_proto::log::{run_end::Stop, RunEnd};
use ftvm_vmm::devices::StopRequest;

/// The `RunEnd` record of a guest that stopped as `stop` says.
pub fn to_run_end(stop: StopRequest) -> RunEnd {
    RunEnd {
        stop: Some(match stop {
            StopRequest::Exit(status) => Stop::ExitStatus(u32::from(status)),
            StopRequest::Reset => Stop::Reset(true),
        }),
    }
}

/// How the guest stopped according to a `RunEnd` record (None: the record says nothing).
pub fn from_run_end(end: &RunEnd) -> Option<StopRequest> {
    match end.stop {
        Some(Stop::ExitStatus(s)) => Some(StopRequest::Exit(s as u8)),
        Some(Stop::Reset(_)) => Some(StopRequest::Reset),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_requests_survive_the_round_trip() {
        for stop in [
            StopRequest::Exit(0),
            StopRequest::Exit(255),
            StopRequest::Reset,
        ] {
            assert_eq!(from_run_end(&to_run_end(stop)), Some(stop));
        }
        assert_eq!(from_run_end(&RunEnd { stop: None }), None);
    }
}
