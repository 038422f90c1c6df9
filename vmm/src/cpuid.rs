//! The VM's one fixed CPUID table (DESIGN.md §2).
//!
//! The primary derives it once from what its KVM supports and then it is VM configuration:
//! the secondary installs the primary's table as is, so the guest sees the same CPU on both
//! hosts. The table hides what would let the guest read host state without a logged exit:
//! RDRAND/RDSEED, the KVM paravirtual leaves (kvmclock, steal time, PV EOI) and the local APIC
//! (there is none: interrupts come from the userspace PIC). By default it also hides the
//! time-stamp counter and what reads it: TSC (leaf 1), RDTSCP, RDPID, the invariant TSC and
//! MWAITX (its timer counts TSC cycles). The instructions still execute (no KVM API traps
//! them), but Linux without the TSC feature takes neither its clock (sched_clock counts
//! jiffies, the clocksource is the ACPI PM timer) nor its delay loop from the TSC
//! (DESIGN.md §2, measured in `cargo bench --bench linux`). [`TscCpuid::Visible`] keeps them,
//! to measure what hiding gains.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use serde::{Deserialize, Serialize};

/// One CPUID leaf/subleaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input.
    pub function: u32,
    /// ECX input (subleaf).
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    /// Output registers.
    pub ebx: u32,
    /// Output registers.
    pub ecx: u32,
    /// Output registers.
    pub edx: u32,
}

/// The table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidTable {
    /// Entries sorted by (function, index).
    pub entries: Vec<CpuidEntry>,
}

const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_RDRAND: u32 = 1 << 30;
const LEAF1_EDX_APIC: u32 = 1 << 9;
const LEAF1_EDX_TSC: u32 = 1 << 4;
const LEAF7_ECX_RDPID: u32 = 1 << 22;
const EXT1_ECX_MWAITX: u32 = 1 << 29;
const EXT1_EDX_RDTSCP: u32 = 1 << 27;
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// Whether the table shows the guest the time-stamp counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TscCpuid {
    /// Hide TSC, RDTSCP, RDPID, invariant TSC and MWAITX (the default).
    #[default]
    Hidden,
    /// Show what the host supports (to measure what hiding gains).
    Visible,
}
const LEAF7_EBX_RDSEED: u32 = 1 << 18;
const LEAF7_ECX_WAITPKG: u32 = 1 << 5;
const BRAND: &[u8; 48] =
    b"ftvm virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

impl CpuidTable {
    /// Derives the table from the CPUID KVM supports on this host.
    pub fn from_supported(kvm: &kvm_ioctls::Kvm) -> Result<Self, kvm_ioctls::Error> {
        Self::from_supported_with(kvm, TscCpuid::Hidden)
    }

    /// [`Self::from_supported`], showing or hiding the TSC as `tsc` says.
    pub fn from_supported_with(
        kvm: &kvm_ioctls::Kvm,
        tsc: TscCpuid,
    ) -> Result<Self, kvm_ioctls::Error> {
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        let mut t = Self::fixed(supported.as_slice());
        if tsc == TscCpuid::Visible {
            t.show_tsc(supported.as_slice());
        }
        Ok(t)
    }

    /// Applies the fixed policy to a host's supported entries.
    pub fn fixed(supported: &[kvm_cpuid_entry2]) -> Self {
        let mut entries: Vec<CpuidEntry> = supported
            .iter()
            // The hypervisor leaves advertise KVM's paravirtual clock and friends.
            .filter(|e| !(0x4000_0000..0x5000_0000).contains(&e.function))
            .map(|e| {
                let mut c = CpuidEntry {
                    function: e.function,
                    index: e.index,
                    flags: e.flags,
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                };
                match (c.function, c.index) {
                    (1, _) => {
                        // One CPU, APIC ID 0; keep the CLFLUSH line size.
                        c.ebx &= 0x0000_ff00;
                        c.ecx &= !(LEAF1_ECX_RDRAND | LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE);
                        c.edx &= !(LEAF1_EDX_APIC | LEAF1_EDX_TSC);
                    }
                    (7, 0) => {
                        c.ebx &= !LEAF7_EBX_RDSEED;
                        c.ecx &= !(LEAF7_ECX_WAITPKG | LEAF7_ECX_RDPID);
                    }
                    (0x8000_0001, _) => {
                        c.ecx &= !EXT1_ECX_MWAITX;
                        c.edx &= !EXT1_EDX_RDTSCP;
                    }
                    (0x8000_0007, _) => c.edx &= !EXT7_EDX_INVARIANT_TSC,
                    (0x8000_0002..=0x8000_0004, _) => {
                        let at = (c.function - 0x8000_0002) as usize * 16;
                        let word = |i: usize| {
                            let b = &BRAND[at + i * 4..at + i * 4 + 4];
                            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                        };
                        (c.eax, c.ebx, c.ecx, c.edx) = (word(0), word(1), word(2), word(3));
                    }
                    _ => {}
                }
                c
            })
            .collect();
        entries.sort_by_key(|e| (e.function, e.index));
        Self { entries }
    }

    /// Shows the TSC bits the host (`supported`) has, after [`Self::fixed`] hid them.
    fn show_tsc(&mut self, supported: &[kvm_cpuid_entry2]) {
        for e in &mut self.entries {
            let Some(host) = supported
                .iter()
                .find(|h| h.function == e.function && h.index == e.index)
            else {
                continue;
            };
            match e.function {
                1 => e.edx |= host.edx & LEAF1_EDX_TSC,
                7 if e.index == 0 => e.ecx |= host.ecx & LEAF7_ECX_RDPID,
                0x8000_0001 => {
                    e.ecx |= host.ecx & EXT1_ECX_MWAITX;
                    e.edx |= host.edx & EXT1_EDX_RDTSCP;
                }
                0x8000_0007 => e.edx |= host.edx & EXT7_EDX_INVARIANT_TSC,
                _ => {}
            }
        }
    }

    /// The table in the form KVM_SET_CPUID2 takes.
    pub fn to_kvm(&self) -> Result<CpuId, vmm_sys_util::fam::Error> {
        let raw: Vec<kvm_cpuid_entry2> = self
            .entries
            .iter()
            .map(|c| kvm_cpuid_entry2 {
                function: c.function,
                index: c.index,
                flags: c.flags,
                eax: c.eax,
                ebx: c.ebx,
                ecx: c.ecx,
                edx: c.edx,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&raw)
    }

    /// Looks up a leaf.
    pub fn get(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.entries
            .iter()
            .find(|e| e.function == function && e.index == index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, ecx: u32, ebx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            ebx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn hides_rdrand_rdseed_apic_and_kvm_leaves() {
        let host = [
            entry(0x4000_0001, 0, 0, 0),
            entry(7, 0xffff_ffff, 0xffff_ffff, 0),
            entry(1, 0xffff_ffff, 0x0102_0800, 0xffff_ffff),
            entry(0x4000_0000, 0, 0x4b4d_564b, 0),
            entry(0x8000_0002, 0, 0, 0),
        ];
        let t = CpuidTable::fixed(&host);
        assert_eq!(t.entries.len(), 3);
        assert!(t.entries.windows(2).all(|w| w[0].function < w[1].function));
        let l1 = t.get(1, 0).unwrap();
        assert_eq!(l1.ecx & LEAF1_ECX_RDRAND, 0);
        assert_eq!(l1.edx & LEAF1_EDX_APIC, 0);
        assert_eq!(l1.ebx, 0x0800);
        assert_eq!(t.get(7, 0).unwrap().ebx & LEAF7_EBX_RDSEED, 0);
        assert_eq!(t.get(0x8000_0002, 0).unwrap().eax.to_le_bytes(), *b"ftvm");
        assert_eq!(t.to_kvm().unwrap().as_slice().len(), 3);
    }

    #[test]
    fn hides_the_tsc_and_what_reads_it_unless_asked_to_show_it() {
        let host = [
            entry(1, 0, 0, 0xffff_ffff),
            entry(7, 0xffff_ffff, 0, 0),
            entry(0x8000_0001, 0xffff_ffff, 0, 0xffff_ffff),
            entry(0x8000_0007, 0, 0, 0xffff_ffff),
        ];
        let mut t = CpuidTable::fixed(&host);
        assert_eq!(t.get(1, 0).unwrap().edx & LEAF1_EDX_TSC, 0);
        assert_eq!(t.get(7, 0).unwrap().ecx & LEAF7_ECX_RDPID, 0);
        let ext1 = *t.get(0x8000_0001, 0).unwrap();
        assert_eq!(ext1.ecx & EXT1_ECX_MWAITX, 0);
        assert_eq!(ext1.edx & EXT1_EDX_RDTSCP, 0);
        assert_eq!(t.get(0x8000_0007, 0).unwrap().edx, !EXT7_EDX_INVARIANT_TSC);
        t.show_tsc(&host);
        assert_ne!(t.get(1, 0).unwrap().edx & LEAF1_EDX_TSC, 0);
        assert_ne!(t.get(7, 0).unwrap().ecx & LEAF7_ECX_RDPID, 0);
        assert_ne!(t.get(0x8000_0001, 0).unwrap().edx & EXT1_EDX_RDTSCP, 0);
        assert_eq!(t.get(0x8000_0007, 0).unwrap().edx, 0xffff_ffff);
        // What stays hidden whatever the TSC setting.
        assert_eq!(t.get(1, 0).unwrap().edx & LEAF1_EDX_APIC, 0);
    }
}
