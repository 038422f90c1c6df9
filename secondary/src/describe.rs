//! Log records and exits in words, for divergence reports.

use ftvm_proto::log::{record::Kind, Record};
use ftvm_vmm::exit::Exit;

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn describe(r: &Record) -> String {
    let what = match &r.kind {
        Some(Kind::PioRead(p)) => format!("PIO read of port {:#x} size {}", p.port, p.size),
        Some(Kind::MmioRead(m)) => format!("MMIO read of {:#x} size {}", m.addr, m.size),
        Some(Kind::Interrupt(i)) => format!("interrupt vector {:#x}", i.vector),
        Some(Kind::InterruptWindow(_)) => "interrupt-window request".into(),
        Some(Kind::GuestWrite(w)) => format!("guest memory write at {:#x}", w.gpa),
        Some(Kind::Inputs(_)) => "inputs".into(),
        Some(Kind::EpochEnd(e)) => format!("end of epoch {}", e.epoch),
        Some(Kind::RunEnd(_)) => "end of run".into(),
        Some(Kind::TscRead(_)) => "TSC read".into(),
        Some(Kind::DiskRead(d)) => format!(
            "disk {} read of {} bytes at sector {} (hash {})",
            d.disk,
            d.length,
            d.sector,
            hex(&d.hash[..8.min(d.hash.len())])
        ),
        None => "empty record".into(),
    };
    if r.at_kick {
        format!("{what} at a kick after exit {}", r.exit_seq)
    } else {
        format!("{what} at exit {}", r.exit_seq)
    }
}

pub(crate) fn describe_exit(e: &Exit) -> String {
    match e {
        Exit::IoIn { port, size, .. } => format!("PIO read of port {port:#x} size {size}"),
        Exit::IoOut { port, size, .. } => format!("PIO write to port {port:#x} size {size}"),
        Exit::MmioRead { addr, len } => format!("MMIO read of {addr:#x} size {len}"),
        Exit::MmioWrite { addr, data } => format!("MMIO write to {addr:#x} size {}", data.len()),
        Exit::TscRead { .. } => "TSC read".into(),
        other => format!("{other:?}"),
    }
}
