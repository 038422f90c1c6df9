//! The standby's check of the pair's arbiter (DESIGN.md §5).

use ftvm_proto::channel::{ArbiterKind, Start};
use ftvm_replication::ChannelOptions;

use crate::standby::StandbyError;

/// Both sides of a pair must arbitrate at the same kind of arbiter: a witness and an etcd
/// cluster would each grant the same term once, to each side (DESIGN.md §5).
pub(crate) fn same_arbiter(start: &Start, options: &ChannelOptions) -> Result<(), StandbyError> {
    let Some(w) = &options.witness else {
        return Ok(());
    };
    if start.vm_id.is_empty() {
        return Ok(());
    }
    let (theirs, ours) = (start.arbiter(), w.backend.kind());
    if theirs == ours {
        return Ok(());
    }
    let flag = |k: ArbiterKind| match k {
        ArbiterKind::Witness => "--witness",
        ArbiterKind::Etcd => "--etcd",
    };
    let (theirs, ours) = (flag(theirs), flag(ours));
    Err(StandbyError::Arbiter(format!(
        "the primary arbitrates role changes with {theirs}, this standby with {ours}: give both sides the same arbiter"
    )))
}
