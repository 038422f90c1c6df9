//! What a TSC-read exit costs (the ftvm-rdtsc-exits host module, kmod/), next to a port-I/O
//! exit measured in the same VM: in the nested-KVM harness with the module
//! (`scripts/nested.sh --rdtsc-exits`), `ftvm tsc-probe --measure N` runs N RDTSCs and then N
//! OUTs to port 0x80 in the same loop shape in a throwaway VM and times each phase. Five runs
//! in one harness boot; the medians are printed with every run.
//!
//! The harness runs the VMM under QEMU TCG, so both figures are far above hardware; the
//! ratio is what the bench is for.
//!
//! `cargo bench --bench tsc_exits` (the first run builds the module with kmod/build.sh).

#[path = "../tests/common/mod.rs"]
mod common;
use common::{field, median_f64, nested_with, FTVM};

const RUNS: usize = 5;
const EXITS: u32 = 2000;

fn main() {
    let script =
        format!("for i in $(seq {RUNS}); do {FTVM} tsc-probe --measure {EXITS} || exit 1; done");
    let (status, out, err) = nested_with(&["--rdtsc-exits"], &["sh", "-c", &script], 600);
    if status != Some(0) {
        eprintln!("tsc_exits bench failed ({status:?}):\n{out}\n{err}");
        std::process::exit(1);
    }
    let (mut tsc, mut pio, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for line in out.lines().filter(|l| l.starts_with("n=")) {
        let num = |k: &str| -> f64 {
            field(line, k)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k}= in {line:?}"))
        };
        tsc.push(num("tsc_exit_ns"));
        pio.push(num("pio_exit_ns"));
        ratio.push(num("ratio"));
        println!("run: {line}");
    }
    if tsc.len() != RUNS || !out.contains("tsc-exits: present") {
        eprintln!("tsc_exits bench: expected {RUNS} measurements with the module:\n{out}\n{err}");
        std::process::exit(1);
    }
    println!(
        "TSC-read exit (median of {RUNS}, {EXITS} exits each): {:.0} ns; port-I/O exit (baseline, same VM): {:.0} ns; ratio {:.2}",
        median_f64(&mut tsc),
        median_f64(&mut pio),
        median_f64(&mut ratio)
    );
}
