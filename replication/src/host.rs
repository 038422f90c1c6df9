//! The kind of host a pair process runs on, exchanged in the handshake's `Hello`.
//!
//! A guest recorded on one kind of host cannot be replayed deterministically on another: PVM
//! emulates or paravirtualizes guest code (RDTSC reads the host TSC, the RIP reported at an
//! I/O exit differs) where VMX and SVM run it on the CPU, and VMX and SVM differ in turn
//! (and with them the CPU vendor: CPUID, instruction timing, errata). So both sides of a pair
//! must run on the same KVM flavour and the same CPU vendor; a mismatched pair is refused
//! ([`crate::ChannelError::HostMismatch`]).
//!
//! Detection, once per process ([`HostKind::local`]):
//! - the KVM flavour from the KVM vendor module present under `/sys/module` (loaded, or built
//!   in with parameters): `kvm_pvm` is PVM, `kvm_intel` VMX, `kvm_amd` SVM;
//! - the CPU vendor from CPUID leaf 0 (the host's, or what its hypervisor reports).

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use ftvm_proto::channel::{Host, KvmFlavour as WireFlavour};

/// The kind of KVM behind `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmFlavour {
    /// PVM (`kvm_pvm`): needs no VMX/SVM; guest code is emulated or paravirtualized.
    Pvm,
    /// Hardware-assisted KVM on Intel VT-x (`kvm_intel`).
    Vmx,
    /// Hardware-assisted KVM on AMD-V (`kvm_amd`).
    Svm,
    /// Not identified; what was found instead.
    Unknown(String),
}

/// The vendor modules detection looks for, and what each means.
const MODULES: [(&str, KvmFlavour); 3] = [
    ("kvm_pvm", KvmFlavour::Pvm),
    ("kvm_intel", KvmFlavour::Vmx),
    ("kvm_amd", KvmFlavour::Svm),
];

impl KvmFlavour {
    /// The flavour of the KVM vendor module under `sys_module` (normally `/sys/module`).
    /// Exactly one of `kvm_pvm`, `kvm_intel`, `kvm_amd` must be there; otherwise the flavour
    /// is unknown and says what was found.
    pub fn detect_in(sys_module: &Path) -> Self {
        let entries = match std::fs::read_dir(sys_module) {
            Ok(entries) => entries,
            Err(e) => return Self::Unknown(format!("{} unreadable: {e}", sys_module.display())),
        };
        let mut kvm_modules: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name == "kvm" || name.starts_with("kvm_"))
            .collect();
        kvm_modules.sort();
        Self::from_modules(&kvm_modules)
    }

    /// The flavour given the names of the KVM modules present.
    pub fn from_modules<S: AsRef<str>>(modules: &[S]) -> Self {
        let present = |name: &str| modules.iter().any(|m| m.as_ref() == name);
        let found: Vec<&(&str, KvmFlavour)> =
            MODULES.iter().filter(|(name, _)| present(name)).collect();
        match found.as_slice() {
            [(_, flavour)] => flavour.clone(),
            [] if modules.is_empty() => Self::Unknown("no KVM module".into()),
            [] => Self::Unknown(format!(
                "no KVM vendor module among {}",
                modules
                    .iter()
                    .map(|m| m.as_ref())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            several => Self::Unknown(format!(
                "several KVM vendor modules: {}",
                several
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmFlavour::Pvm => f.write_str("PVM"),
            KvmFlavour::Vmx => f.write_str("KVM (VMX)"),
            KvmFlavour::Svm => f.write_str("KVM (SVM)"),
            KvmFlavour::Unknown(what) => write!(f, "an unidentified KVM ({what})"),
        }
    }
}

/// What a pair's two hosts must agree on: the KVM flavour and the CPU vendor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKind {
    /// The KVM flavour.
    pub kvm: KvmFlavour,
    /// The CPU vendor string, CPUID leaf 0 ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
}

impl HostKind {
    /// This host, detected on first use and then kept for the life of the process.
    pub fn local() -> &'static HostKind {
        static LOCAL: OnceLock<HostKind> = OnceLock::new();
        LOCAL.get_or_init(|| {
            let host = Self::detect();
            if let KvmFlavour::Unknown(_) = host.kvm {
                tracing::warn!(
                    "cannot tell which KVM this host runs ({host}): it can pair only with a host of the same description"
                );
            }
            host
        })
    }

    /// Detects this host: `/sys/module` and CPUID.
    pub fn detect() -> Self {
        Self {
            kvm: KvmFlavour::detect_in(Path::new("/sys/module")),
            vendor: cpu_vendor(),
        }
    }

    /// Whether a guest can be replayed on `other` that was recorded here (and the other way
    /// round): same KVM flavour, same CPU vendor.
    pub fn compatible(&self, other: &HostKind) -> bool {
        self == other
    }

    /// The wire form, for `Hello`.
    pub fn to_proto(&self) -> Host {
        let (kvm, kvm_detail) = match &self.kvm {
            KvmFlavour::Pvm => (WireFlavour::Pvm, String::new()),
            KvmFlavour::Vmx => (WireFlavour::Vmx, String::new()),
            KvmFlavour::Svm => (WireFlavour::Svm, String::new()),
            KvmFlavour::Unknown(what) => (WireFlavour::Unknown, what.clone()),
        };
        Host {
            kvm: kvm as i32,
            kvm_detail,
            cpu_vendor: self.vendor.clone(),
        }
    }

    /// From the wire form; a peer that sent none (or a flavour this build does not know) is
    /// of an unknown kind.
    pub fn from_proto(host: Option<&Host>) -> Self {
        let Some(host) = host else {
            return Self {
                kvm: KvmFlavour::Unknown("not reported".into()),
                vendor: String::new(),
            };
        };
        let kvm = match WireFlavour::try_from(host.kvm) {
            Ok(WireFlavour::Pvm) => KvmFlavour::Pvm,
            Ok(WireFlavour::Vmx) => KvmFlavour::Vmx,
            Ok(WireFlavour::Svm) => KvmFlavour::Svm,
            Ok(WireFlavour::Unknown) => KvmFlavour::Unknown(host.kvm_detail.clone()),
            Err(_) => KvmFlavour::Unknown(format!("flavour {} unknown to this ftvm", host.kvm)),
        };
        Self {
            kvm,
            vendor: host.cpu_vendor.clone(),
        }
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.vendor.is_empty() {
            write!(f, "{} on an unknown CPU vendor", self.kvm)
        } else {
            write!(f, "{} on {}", self.kvm, self.vendor)
        }
    }
}

/// The CPU vendor string from CPUID leaf 0: EBX, EDX, ECX as 12 ASCII bytes.
#[cfg(target_arch = "x86_64")]
pub fn cpu_vendor() -> String {
    let leaf = core::arch::x86_64::__cpuid(0);
    let mut bytes = Vec::with_capacity(12);
    for reg in [leaf.ebx, leaf.edx, leaf.ecx] {
        bytes.extend_from_slice(&reg.to_le_bytes());
    }
    vendor_from_bytes(&bytes)
}

/// The CPU vendor string: none on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_vendor() -> String {
    String::new()
}

/// A vendor string from CPUID's bytes, trimmed of NULs and spaces, anything non-printable
/// escaped (it goes into error messages).
fn vendor_from_bytes(bytes: &[u8]) -> String {
    let text: String = bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    text.trim_end_matches("\\x00").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(kvm: KvmFlavour, vendor: &str) -> HostKind {
        HostKind {
            kvm,
            vendor: vendor.into(),
        }
    }

    #[test]
    fn flavour_from_the_vendor_module() {
        assert_eq!(
            KvmFlavour::from_modules(&["kvm", "kvm_pvm"]),
            KvmFlavour::Pvm
        );
        assert_eq!(
            KvmFlavour::from_modules(&["kvm", "kvm_intel"]),
            KvmFlavour::Vmx
        );
        assert_eq!(
            KvmFlavour::from_modules(&["kvm", "kvm_amd"]),
            KvmFlavour::Svm
        );
        assert_eq!(
            KvmFlavour::from_modules(&["kvm"]),
            KvmFlavour::Unknown("no KVM vendor module among kvm".into())
        );
        assert_eq!(
            KvmFlavour::from_modules::<&str>(&[]),
            KvmFlavour::Unknown("no KVM module".into())
        );
        assert_eq!(
            KvmFlavour::from_modules(&["kvm", "kvm_amd", "kvm_pvm"]),
            KvmFlavour::Unknown("several KVM vendor modules: kvm_pvm, kvm_amd".into())
        );
    }

    #[test]
    fn flavour_from_a_sys_module_directory() {
        let dir = std::env::temp_dir().join(format!("ftvm-host-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for m in ["kvm", "kvm_intel", "loop", "kvmfoo"] {
            std::fs::create_dir_all(dir.join(m).join("parameters")).expect("mkdir");
        }
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Vmx);
        std::fs::remove_dir_all(dir.join("kvm_intel")).expect("rmdir");
        assert_eq!(
            KvmFlavour::detect_in(&dir),
            KvmFlavour::Unknown("no KVM vendor module among kvm".into())
        );
        std::fs::remove_dir_all(&dir).expect("rmdir");
        match KvmFlavour::detect_in(&dir) {
            KvmFlavour::Unknown(what) => assert!(what.contains("unreadable"), "{what}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn display_names_flavour_and_vendor() {
        assert_eq!(
            host(KvmFlavour::Pvm, "AuthenticAMD").to_string(),
            "PVM on AuthenticAMD"
        );
        assert_eq!(
            host(KvmFlavour::Svm, "AuthenticAMD").to_string(),
            "KVM (SVM) on AuthenticAMD"
        );
        assert_eq!(
            host(KvmFlavour::Vmx, "GenuineIntel").to_string(),
            "KVM (VMX) on GenuineIntel"
        );
        assert_eq!(
            host(KvmFlavour::Unknown("no KVM module".into()), "GenuineIntel").to_string(),
            "an unidentified KVM (no KVM module) on GenuineIntel"
        );
        assert_eq!(
            HostKind::from_proto(None).to_string(),
            "an unidentified KVM (not reported) on an unknown CPU vendor"
        );
    }

    #[test]
    fn compatible_only_with_the_same_flavour_and_vendor() {
        let pvm_amd = host(KvmFlavour::Pvm, "AuthenticAMD");
        assert!(pvm_amd.compatible(&pvm_amd.clone()));
        assert!(!pvm_amd.compatible(&host(KvmFlavour::Svm, "AuthenticAMD")));
        assert!(!pvm_amd.compatible(&host(KvmFlavour::Pvm, "GenuineIntel")));
        assert!(!host(KvmFlavour::Vmx, "GenuineIntel")
            .compatible(&host(KvmFlavour::Svm, "GenuineIntel")));
        let unknown = host(KvmFlavour::Unknown("no KVM module".into()), "AuthenticAMD");
        assert!(unknown.compatible(&unknown.clone()));
        assert!(!unknown.compatible(&pvm_amd));
        assert!(!pvm_amd.compatible(&HostKind::from_proto(None)));
    }

    #[test]
    fn wire_form_round_trips() {
        for h in [
            host(KvmFlavour::Pvm, "AuthenticAMD"),
            host(KvmFlavour::Vmx, "GenuineIntel"),
            host(KvmFlavour::Svm, "HygonGenuine"),
            host(KvmFlavour::Unknown("no KVM module".into()), "GenuineIntel"),
        ] {
            assert_eq!(HostKind::from_proto(Some(&h.to_proto())), h);
        }
        let future = Host {
            kvm: 42,
            kvm_detail: String::new(),
            cpu_vendor: "GenuineIntel".into(),
        };
        assert_eq!(
            HostKind::from_proto(Some(&future)).kvm,
            KvmFlavour::Unknown("flavour 42 unknown to this ftvm".into())
        );
    }

    #[test]
    fn vendor_bytes_are_printable() {
        assert_eq!(vendor_from_bytes(b"AuthenticAMD"), "AuthenticAMD");
        assert_eq!(vendor_from_bytes(b"KVMKVMKVM\0\0\0"), "KVMKVMKVM");
        assert_eq!(vendor_from_bytes(b"Bad\x01Vendor\n"), "Bad\\x01Vendor\\n");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn this_host_is_detected() {
        let h = HostKind::detect();
        assert!(!h.vendor.is_empty(), "{h}");
        assert_eq!(HostKind::local(), &h);
        // This development machine runs PVM; CI or users' hosts may run VMX or SVM.
        println!("this host: {h}");
    }
}
