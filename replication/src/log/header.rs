//! The log header: the VM a log was recorded with. The primary builds it from its VM
//! configuration; a replay (or a standby) turns it back into the same configuration and
//! checks that the kernel, initrd and disks it was given are the recorded ones.

use ftvm_proto::log::{DiskSpec, LogHeader};
use ftvm_vmm::cpuid::CpuidTable;
use ftvm_vmm::devices::virtio::block::{DiskConfig, DiskInfo};
use ftvm_vmm::devices::virtio::net::MacAddr;
use ftvm_vmm::digest::hash;
use ftvm_vmm::VmConfig;

use super::LogError;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The header of a log for `config` running with `cpuid` and `disks` (as opened), pending
/// interrupts delivered through interrupt-window exits if `interrupt_windows`.
pub fn build_header(
    config: &VmConfig,
    cpuid: &CpuidTable,
    disks: &[DiskInfo],
    interrupt_windows: bool,
) -> LogHeader {
    let table = ftvm_vmm::state::encode(cpuid);
    LogHeader {
        format_version: ftvm_proto::FORMAT_VERSION,
        interrupt_windows,
        // Set by the recorder once it has installed the TSC-exit filter (`tsc_exits`).
        tsc_exits: false,
        config: Some(ftvm_proto::log::VmConfig {
            mem_mib: config.mem_mib,
            cmdline: config.cmdline.clone(),
            kernel_hash: hash(&config.kernel).to_vec(),
            cpuid_hash: hash(&table).to_vec(),
            cpuid_table: table,
            initrd_hash: config
                .initrd
                .as_ref()
                .map(|i| hash(i).to_vec())
                .unwrap_or_default(),
            disks: disks
                .iter()
                .map(|d| DiskSpec {
                    sectors: d.sectors,
                    read_only: d.read_only,
                })
                .collect(),
            // What KVM gives a new vCPU here, as the primary's has (no rate is ever set on it).
            tsc_khz: ftvm_vmm::vm::host_tsc_khz().unwrap_or(0),
            net_mac: config.net.map_or(0, |m| m.to_u64()),
            rng_seed: config.rng_seed.clone(),
            rtc_base_s: config.rtc_base_s,
        }),
    }
}

/// Checks that the header (found at byte `offset`) was written in this build's log format.
pub fn check_version(header: &LogHeader, offset: u64) -> Result<(), LogError> {
    if header.format_version != ftvm_proto::FORMAT_VERSION {
        return Err(LogError::Version {
            offset,
            found: header.format_version,
        });
    }
    Ok(())
}

/// The VM configuration a log header describes, with `kernel` (named `kernel_name` in errors)
/// as the image, `initrd` and `disks`; the kernel and initrd must be the ones the log was
/// recorded with (the disks are checked against the header by [`check_disks`] once opened).
pub fn config_from_header(
    header: &LogHeader,
    kernel: Vec<u8>,
    kernel_name: &str,
    initrd: Option<Vec<u8>>,
    disks: Vec<DiskConfig>,
) -> Result<VmConfig, LogError> {
    let c = header
        .config
        .as_ref()
        .ok_or_else(|| LogError::Config("no VM configuration".into()))?;
    let actual = hash(&kernel);
    if actual.as_slice() != c.kernel_hash.as_slice() {
        return Err(LogError::KernelMismatch {
            logged: hex(&c.kernel_hash),
            actual: hex(&actual),
            kernel: kernel_name.to_string(),
        });
    }
    if hash(&c.cpuid_table).as_slice() != c.cpuid_hash.as_slice() {
        return Err(LogError::Config(
            "CPUID table does not match its hash".into(),
        ));
    }
    if !matches!(c.rng_seed.len(), 0 | ftvm_vmm::boot::RNG_SEED_LEN) {
        return Err(LogError::Config(format!(
            "boot randomness of {} bytes (0 or {} are written)",
            c.rng_seed.len(),
            ftvm_vmm::boot::RNG_SEED_LEN
        )));
    }
    if c.rtc_base_s > ftvm_vmm::devices::rtc::MAX_BASE_S {
        return Err(LogError::Config(format!(
            "a clock that starts at {} s, past the year 9999",
            c.rtc_base_s
        )));
    }
    let cpuid: CpuidTable = ftvm_vmm::state::decode(&c.cpuid_table)
        .map_err(|e| LogError::Config(format!("CPUID table: {e}")))?;
    match (&initrd, c.initrd_hash.is_empty()) {
        (None, false) => {
            return Err(LogError::Config(
                "the guest was recorded with an initrd; give the same one (--initrd)".into(),
            ))
        }
        (Some(_), true) => {
            return Err(LogError::Config(
                "the guest was recorded without an initrd, but one was given".into(),
            ))
        }
        (Some(i), false) if hash(i).as_slice() != c.initrd_hash.as_slice() => {
            return Err(LogError::Config(format!(
                "the initrd given hashes to {}, the log's to {}",
                hex(&hash(i)),
                hex(&c.initrd_hash)
            )))
        }
        _ => {}
    }
    if disks.len() != c.disks.len() {
        return Err(LogError::Config(format!(
            "the guest was recorded with {} disks, {} given (--disk)",
            c.disks.len(),
            disks.len()
        )));
    }
    Ok(VmConfig {
        mem_mib: c.mem_mib,
        kernel,
        initrd,
        disks,
        cmdline: c.cmdline.clone(),
        cpuid: Some(cpuid),
        net: logged_mac(header)?,
        rng_seed: c.rng_seed.clone(),
        rtc_base_s: c.rtc_base_s,
    })
}

/// The network card the header describes (None: the guest has none).
pub fn logged_mac(header: &LogHeader) -> Result<Option<MacAddr>, LogError> {
    let mac = header.config.as_ref().map_or(0, |c| c.net_mac);
    if mac == 0 {
        return Ok(None);
    }
    MacAddr::from_u64(mac)
        .map(Some)
        .ok_or_else(|| LogError::Config(format!("network card MAC {mac:#x} is not 48 bits")))
}

/// Checks a standby's `--net` against the primary's card: both sides have a card with the
/// same MAC address, or neither has one (`given`: this side's `--net` MAC).
pub fn check_net(header: &LogHeader, given: Option<MacAddr>) -> Result<(), LogError> {
    match (logged_mac(header)?, given) {
        (None, None) => Ok(()),
        (Some(l), Some(g)) if l == g => Ok(()),
        (Some(l), None) => Err(LogError::Config(format!(
            "the primary's guest has a network card (MAC {l}) and this side has no --net: give it --net tap=NAME,mac={l} (its own TAP, on the same network)"
        ))),
        (None, Some(_)) => Err(LogError::Config(
            "this side has --net but the primary's guest has no network card: give both sides --net, or neither".into(),
        )),
        (Some(l), Some(g)) => Err(LogError::Config(format!(
            "the primary's guest card has MAC {l}, this side's --net says {g}: give the same mac= on both sides"
        ))),
    }
}

/// Checks the opened disks against the ones the header describes (same count, size and
/// mode). Their contents cannot be checked here: a disk that differs shows as a divergence.
pub fn check_disks(header: &LogHeader, disks: &[DiskInfo]) -> Result<(), LogError> {
    let logged = header.config.as_ref().map_or(&[][..], |c| &c.disks[..]);
    if logged.len() != disks.len() {
        return Err(LogError::Config(format!(
            "the guest was recorded with {} disks, {} given",
            logged.len(),
            disks.len()
        )));
    }
    for (i, (l, d)) in logged.iter().zip(disks).enumerate() {
        if l.sectors != d.sectors || l.read_only != d.read_only {
            return Err(LogError::Config(format!(
                "disk {i}: recorded with {} sectors{}, given {} sectors{}",
                l.sectors,
                if l.read_only { " read-only" } else { "" },
                d.sectors,
                if d.read_only { " read-only" } else { "" },
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_with(net_mac: u64) -> LogHeader {
        LogHeader {
            config: Some(ftvm_proto::log::VmConfig {
                net_mac,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn net_on_one_side_only_or_another_mac_is_refused() {
        let mac: MacAddr = "52:54:00:00:00:07".parse().unwrap();
        let with = header_with(mac.to_u64());
        let without = header_with(0);
        assert_eq!(logged_mac(&with).unwrap(), Some(mac));
        check_net(&with, Some(mac)).unwrap();
        check_net(&without, None).unwrap();
        let e = check_net(&with, None).unwrap_err().to_string();
        assert!(e.contains("has no --net"), "{e}");
        let e = check_net(&without, Some(mac)).unwrap_err().to_string();
        assert!(e.contains("has no network card"), "{e}");
        let e = check_net(&with, Some(MacAddr::DEFAULT))
            .unwrap_err()
            .to_string();
        assert!(e.contains("same mac="), "{e}");
    }

    #[test]
    fn the_boot_randomness_and_the_clock_travel_and_values_past_their_bounds_are_refused() {
        let config = VmConfig {
            mem_mib: 64,
            kernel: b"a kernel".to_vec(),
            initrd: None,
            disks: Vec::new(),
            net: None,
            cmdline: "quiet".into(),
            cpuid: None,
            rng_seed: vec![9; ftvm_vmm::boot::RNG_SEED_LEN],
            rtc_base_s: 1_796_169_600,
        };
        let cpuid = CpuidTable::fixed(&[]);
        let mut header = build_header(&config, &cpuid, &[], false);
        let back =
            config_from_header(&header, config.kernel.clone(), "k", None, Vec::new()).unwrap();
        assert_eq!(back.rng_seed, config.rng_seed);
        assert_eq!(back.rtc_base_s, config.rtc_base_s);
        let mut late = header.clone();
        if let Some(c) = late.config.as_mut() {
            c.rtc_base_s = u64::MAX;
        }
        let e = config_from_header(&late, config.kernel.clone(), "k", None, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("past the year 9999"), "{e}");
        if let Some(c) = header.config.as_mut() {
            c.rng_seed = vec![9; 5];
        }
        let e = config_from_header(&header, config.kernel.clone(), "k", None, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("boot randomness of 5 bytes"), "{e}");
    }
}
