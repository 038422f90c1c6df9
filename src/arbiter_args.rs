//! The arbiter flags of `ftvm run` and `ftvm standby` (DESIGN.md §5): `--witness ADDR` or
//! `--etcd ENDPOINTS`, one of them, the same on both sides of a pair.

use ftvm_replication::etcd::EtcdConfig;
use ftvm_replication::witness::WitnessConfig;

#[derive(clap::Args)]
pub struct ArbiterArgs {
    /// The witness (`ftvm witness`) that arbitrates role changes decided on silence: a
    /// standby goes live, and a primary that lost its standby releases output, only after
    /// winning the pair's next term there. Give both sides the same witness.
    #[arg(long, value_name = "ADDR", conflicts_with = "etcd")]
    pub witness: Option<String>,
    /// An etcd cluster as the arbiter instead of a witness: its members' client URLs,
    /// comma-separated (`http://host:2379,host2:2379`). The term of each protected VM is a
    /// transaction on its key under /ftvm/pairs/. Give both sides the same cluster.
    #[arg(long, value_name = "ENDPOINTS")]
    pub etcd: Option<String>,
}

impl ArbiterArgs {
    /// The arbiter configured, if any (Err: the endpoints do not parse).
    pub fn config(&self) -> Result<Option<WitnessConfig>, String> {
        if let Some(list) = &self.etcd {
            return EtcdConfig::parse(list).map(|c| Some(WitnessConfig::etcd(c)));
        }
        Ok(self.witness.clone().map(WitnessConfig::new))
    }
}
