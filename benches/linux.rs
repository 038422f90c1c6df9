//! Linux guest benchmarks on standard KVM (the nested-KVM harness, scripts/nested.sh), each
//! figure printed next to its baseline measured in the same harness run:
//!
//! - boot time of the repo's Linux test guest (Debian kernel + busybox initramfs,
//!   `ftvm.workload=boot`) to the init's first line under `ftvm run`, next to
//!   `qemu-system-x86_64 -accel kvm` (microvm machine) booting the same kernel and initramfs;
//! - disk throughput of `dd` in the guest (`ftvm.workload=dd`: 32 MiB, O_DIRECT, 1 MiB
//!   blocks) on a virtio-mmio disk under ftvm, next to the same workload under QEMU/KVM's
//!   virtio-mmio disk and to `dd` on the raw image file in the harness's own Linux (the
//!   guest's host) and on this machine.
//!
//! - protected runs (`benches/linux/repairs.rs`): the share of epochs verified without a
//!   repair and the repair bytes per epoch for boot, idle and files, with the default TSC
//!   measures, each turned off, and all off (the baseline).
//!
//! - exact replay against repair (`benches/linux/exact.rs`, the harness with the
//!   ftvm-rdtsc-exits module): for boot, idle and files, the share of epochs verified
//!   without a repair with `--tsc repair` (stock: TSC reads native) and `--tsc exits` (every
//!   TSC read an exit, the TSC hidden), the TSC reads per second of guest time, and a
//!   TSC-read exit's cost next to a port-I/O exit's.
//!
//! - what protection costs (`benches/linux/protected.rs`): `files` time and `dd` throughput
//!   protected next to unprotected, and the output delay of the guest's serial output in a
//!   protected run, stage by stage.
//!
//! `cargo bench --bench linux -- repairs [WORKLOAD...]` runs only the repair runs (of the
//! workloads named; default boot, idle, files); `-- exact [WORKLOAD...]` only exact replay
//! against repair (not part of the default run: it needs the module, which
//! `scripts/nested.sh --rdtsc-exits` builds on first use); `-- protected` only the cost of
//! protection;
//! `-- throughput` only boot time and disk throughput.
//!
//! The harness runs the VMMs themselves under QEMU TCG (an exit costs tens of µs there), so
//! the absolute numbers are far below hardware; the comparisons are what the bench is for.
//!
//! `cargo bench --bench linux` (builds the guest with scripts/linux-guest.sh first).

use std::process::Command;

// The helpers the tests use too (tests/common/mod.rs says why they live there).
#[path = "../tests/common/mod.rs"]
mod common;
use common::{field, linux_guest, linux_guest_images, median_f64, nested_with, FTVM};

#[path = "linux/repairs.rs"]
mod repairs;

#[path = "linux/exact.rs"]
mod exact;

#[path = "linux/protected.rs"]
mod protected;

#[path = "pair/breakdown.rs"]
mod breakdown;

const RUNS: usize = 3;

/// The script the harness runs: every measurement, as `key=value` lines.
fn script(ftvm: &str, kernel: &str, initrd: &str, disk: &str) -> String {
    format!(
        r#"
set -u
K={kernel}; I={initrd}; D={disk}
# Milliseconds from the start of CMD... to the guest's first init line (or 0 if none).
time_to_init() {{
    start=$(date +%s%N)
    "$@" 2>/dev/null | while IFS= read -r line; do
        case "$line" in
        *"ftvm-linux-guest: init"*) echo $(( ($(date +%s%N) - start) / 1000000 )) ;;
        esac
    done | head -1
}}
tsc=$(awk '/^cpu MHz/ {{ printf "%d", $4 * 1000; exit }}' /proc/cpuinfo)
qemu() {{
    qemu-system-x86_64 -M microvm,rtc=off,isa-serial=on,acpi=on -accel kvm -cpu host -m 256 \
        -kernel $K -initrd $I -nographic -no-reboot -nodefaults -serial stdio \
        -device isa-debug-exit,iobase=0xf4,iosize=1 "$@" </dev/null
}}
for i in $(seq {RUNS}); do
    echo "ftvm_boot_ms=$(time_to_init {ftvm} run --kernel $K --initrd $I --mem-mib 256 \
        --append 'quiet ftvm.workload=boot')"
    echo "qemu_boot_ms=$(time_to_init qemu -append "console=ttyS0 quiet reboot=k panic=-1 tsc_early_khz=$tsc ftvm.workload=boot")"
done
cp $D /tmp/ftvm-dd.img; cp $D /tmp/qemu-dd.img
echo "ftvm_$({ftvm} run --kernel $K --initrd $I --mem-mib 256 --disk /tmp/ftvm-dd.img \
    --append 'quiet ftvm.workload=dd' 2>/dev/null | grep '^dd ')"
echo "qemu_$(qemu -append "console=ttyS0 quiet reboot=k panic=-1 tsc_early_khz=$tsc ftvm.workload=dd" \
    -drive id=d,file=/tmp/qemu-dd.img,format=raw,if=none -device virtio-blk-device,drive=d \
    2>/dev/null | tr -d '\r' | grep '^dd ')"
# The raw image in the guest's host: write 32 MiB with fsync, then read it back uncached.
t0=$(date +%s%N); dd if=/dev/zero of=/tmp/raw.img bs=1M count=32 conv=fsync 2>/dev/null
t1=$(date +%s%N); sync; echo 3 > /proc/sys/vm/drop_caches
t2=$(date +%s%N); dd if=/tmp/raw.img of=/dev/null bs=1M 2>/dev/null; t3=$(date +%s%N)
echo "l1_dd write_ms=$(( (t1 - t0) / 1000000 )) read_ms=$(( (t3 - t2) / 1000000 ))"
rm -f /tmp/ftvm-dd.img /tmp/qemu-dd.img /tmp/raw.img
"#
    )
}

/// Whether a protected run's result line says it went through: both VMMs exited 0 and the
/// pair stayed protected to the end.
fn protected_run_ok(line: &str) -> bool {
    field(line, "primary_status") == Some("0")
        && field(line, "standby_status") == Some("0")
        && field(line, "protected_to_end") == Some("true")
}

fn values(out: &str, key: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .filter_map(|v| v.trim().parse().ok())
        .filter(|v| *v > 0.0)
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    (!v.is_empty()).then(|| median_f64(&mut v))
}

/// MiB/s from a `dd write_bytes=N write_cs=C read_bytes=N read_cs=C` line.
fn dd_rates(out: &str, prefix: &str) -> Option<(f64, f64)> {
    let line = out.lines().find(|l| l.starts_with(prefix))?;
    let number = |k: &str| -> Option<f64> { field(line, k)?.parse().ok() };
    let mib = |bytes: f64, cs: f64| bytes / 1048576.0 / (cs.max(1.0) / 100.0);
    Some((
        mib(number("write_bytes")?, number("write_cs")?),
        mib(number("read_bytes")?, number("read_cs")?),
    ))
}

/// dd on the raw image on this machine (the development host).
fn host_raw_dd() -> (f64, f64) {
    let img = std::env::temp_dir().join(format!("ftvm-bench-raw-{}.img", std::process::id()));
    let img = img.to_string_lossy();
    let t = std::time::Instant::now();
    let w = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={img}"),
            "bs=1M",
            "count=32",
            "conv=fsync",
        ])
        .output()
        .expect("dd");
    let write = t.elapsed().as_secs_f64();
    assert!(w.status.success());
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let t = std::time::Instant::now();
    let r = Command::new("dd")
        .args([&format!("if={img}"), "of=/dev/null", "bs=1M"])
        .output()
        .expect("dd");
    let read = t.elapsed().as_secs_f64();
    assert!(r.status.success());
    let _ = std::fs::remove_file(&*img);
    (32.0 / write, 32.0 / read)
}

/// Runs `script` in the harness (through a file: the harness's /tmp is an overlay over
/// this one); its output, or a panic with what it printed.
fn run_script(name: &str, script: &str, timeout_s: u32) -> String {
    run_script_with(&[], name, script, timeout_s)
}

/// [`run_script`] with the harness's `options` (`--rdtsc-exits`).
fn run_script_with(options: &[&str], name: &str, script: &str, timeout_s: u32) -> String {
    let script_file =
        std::env::temp_dir().join(format!("ftvm-bench-{name}-{}.sh", std::process::id()));
    std::fs::write(&script_file, script).expect("write script");
    let (status, stdout, stderr) = nested_with(
        options,
        &["bash", &script_file.to_string_lossy()],
        timeout_s,
    );
    let _ = std::fs::remove_file(&script_file);
    let out = stdout.replace('\r', "");
    if status != Some(0) {
        eprintln!("{out}\n{stderr}");
        panic!("the harness failed: {status:?}");
    }
    out
}

fn main() {
    // `cargo bench` passes --bench; the words after `--` choose the parts.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let part = args.first().map(String::as_str);
    let (kernel, initrd) = linux_guest_images();
    let disk = std::env::temp_dir().join(format!("ftvm-bench-disk-{}.img", std::process::id()));
    let disk = disk.to_string_lossy().into_owned();
    linux_guest(&["disk", &disk, "40"]);
    if part == Some("exact") {
        let workloads: Vec<&str> = if args.len() > 1 {
            args[1..].iter().map(String::as_str).collect()
        } else {
            exact::WORKLOADS.to_vec()
        };
        let script = exact::script(FTVM, &kernel, &initrd, &disk, &workloads);
        let out = run_script_with(&["--rdtsc-exits"], "exact", &script, 3400);
        exact::report(&out, &workloads);
        let _ = std::fs::remove_file(&disk);
        return;
    }
    if part != Some("throughput") && part != Some("protected") {
        let workloads: Vec<&str> = match part {
            Some("repairs") if args.len() > 1 => args[1..].iter().map(String::as_str).collect(),
            _ => repairs::WORKLOADS.to_vec(),
        };
        let script = repairs::script(FTVM, &kernel, &initrd, &disk, &workloads);
        let out = run_script("repairs", &script, 3000);
        repairs::report(&out, &workloads);
        if part == Some("repairs") {
            let _ = std::fs::remove_file(&disk);
            return;
        }
    }

    if part != Some("throughput") {
        let out = run_script(
            "protected",
            &protected::script(FTVM, &kernel, &initrd, &disk),
            2400,
        );
        protected::report(&out);
        if part == Some("protected") {
            let _ = std::fs::remove_file(&disk);
            return;
        }
    }

    let out = run_script("linux", &script(FTVM, &kernel, &initrd, &disk), 1200);
    let _ = std::fs::remove_file(&disk);

    println!("Linux guest on standard KVM (nested harness: the VMMs run under QEMU TCG)");
    println!("kernel {kernel}\n");
    let ftvm_boot = values(&out, "ftvm_boot_ms");
    let qemu_boot = values(&out, "qemu_boot_ms");
    println!("boot to the init's first line, median of {RUNS} (ms):");
    println!(
        "  ftvm run                      {:>8.0}   runs {ftvm_boot:?}",
        median(ftvm_boot.clone()).unwrap_or(f64::NAN)
    );
    println!(
        "  qemu -accel kvm (microvm)     {:>8.0}   runs {qemu_boot:?}   (baseline)",
        median(qemu_boot.clone()).unwrap_or(f64::NAN)
    );

    println!(
        "\ndisk throughput, 32 MiB in 1 MiB blocks (MiB/s, write with fsync / read uncached):"
    );
    let show = |name: &str, r: Option<(f64, f64)>| match r {
        Some((w, r)) => println!("  {name:<32} {w:>8.1} / {r:>8.1}"),
        None => println!("  {name:<32} no result"),
    };
    show("guest dd under ftvm", dd_rates(&out, "ftvm_dd "));
    show("guest dd under qemu -accel kvm", dd_rates(&out, "qemu_dd "));
    let l1 = out.lines().find(|l| l.starts_with("l1_dd ")).and_then(|l| {
        let ms = |k: &str| -> Option<f64> { field(l, k)?.parse().ok() };
        Some((
            32.0 / (ms("write_ms")?.max(1.0) / 1000.0),
            32.0 / (ms("read_ms")?.max(1.0) / 1000.0),
        ))
    });
    show("raw image in the guest's host", l1);
    show("raw image on this machine", Some(host_raw_dd()));
}
