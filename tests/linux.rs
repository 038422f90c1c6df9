//! Linux guests on standard KVM: the repo-built Debian test guest (scripts/linux-guest.sh: the
//! Debian kernel, a busybox initramfs whose init runs a disk workload) booted by ftvm inside
//! the nested-KVM harness (scripts/nested.sh), with a virtio-mmio disk. /dev/kvm on the
//! development machines is PVM, which cannot boot an unmodified Linux kernel; the harness
//! offers a standard /dev/kvm (emulated SVM, kvm-amd nested=1).
//!
//! `cargo test --release --test linux`; the first run installs QEMU, busybox-static, cpio
//! and e2fsprogs and downloads the kernel package.

use std::process::Command;
use std::sync::Mutex;

mod common;
use common::{linux_guest, linux_guest_images, ReplaySummary, Scratch, FTVM};

/// One VM at a time: each takes both cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Runs a shell script inside the harness; returns (status, output).
fn nested_sh(script: &str, timeout_s: u32) -> (Option<i32>, String) {
    nested_sh_in(TscMode::Repair, script, timeout_s)
}

/// [`nested_sh`] in the harness `mode` needs: with the ftvm-rdtsc-exits module for
/// [`TscMode::Exits`].
fn nested_sh_in(mode: TscMode, script: &str, timeout_s: u32) -> (Option<i32>, String) {
    let harness: &[&str] = match mode {
        TscMode::Repair => &[],
        TscMode::Exits => &["--rdtsc-exits"],
    };
    let (status, stdout, stderr) = common::nested_with(harness, &["sh", "-c", script], timeout_s);
    (
        status,
        format!("{stdout}\n--- harness stderr ---\n{stderr}"),
    )
}

/// The guest's own lines (the kernel's log lines start with "[").
fn guest_lines(out: &str) -> Vec<&str> {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.starts_with('['))
        .collect()
}

fn checksum_lines(out: &str) -> Vec<String> {
    guest_lines(out)
        .into_iter()
        .filter(|l| l.starts_with("checksum "))
        .map(str::to_string)
        .collect()
}

/// A scratch directory (under /tmp, seen by the harness; what the VM writes stays in the VM)
/// holding a fresh ext4 disk image, and the checksum lines the files
/// workload must print (computed on the host).
fn fresh_disk(name: &str) -> (Scratch, String, Vec<String>) {
    let expected: Vec<String> = linux_guest(&["expected"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(expected.len(), 3, "{expected:?}");
    let dir = Scratch::new(&format!("linux-{name}"));
    let disk = dir.path_str("disk.img");
    linux_guest(&["disk", &disk]);
    (dir, disk, expected)
}

/// The command of the "done when", on the default command line: the Debian kernel
/// boots to the init's first line, the disk workload's checksums are the ones the host
/// computes, and ftvm exits with the guest's status 0.
#[test]
fn debian_kernel_boots_and_the_disk_workload_checksums_are_right() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (kernel, initrd) = linux_guest_images();
    let (_dir, disk, expected) = fresh_disk("boot");
    let script = format!(
        "timeout 400 {FTVM} run --kernel {kernel} --initrd {initrd} --disk {disk} --mem-mib 256"
    );
    let (status, out) = nested_sh(&script, 480);
    let lines = guest_lines(&out);
    let first = lines
        .iter()
        .position(|l| *l == "ftvm-linux-guest: init")
        .unwrap_or_else(|| panic!("the init's first line never came:\n{out}"));
    assert!(
        out.contains("Run /init as init process"),
        "no kernel boot log:\n{out}"
    );
    assert_eq!(checksum_lines(&out), expected, "{out}");
    assert!(lines[first..].contains(&"workload ok"), "{out}");
    assert_eq!(status, Some(0), "{out}");
    // The kernel read the date from the CMOS clock (ftvm starts it at the host's time; without
    // it the guest lived in 1970 after polling the missing clock for a second).
    let today = |at: &str| -> String {
        let o = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d", "-d", at])
            .output()
            .expect("date");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let clock = lines[first..]
        .iter()
        .find_map(|l| l.strip_prefix("ftvm-linux-guest: clock "))
        .unwrap_or_else(|| panic!("no clock line:\n{out}"));
    assert!(
        [today("now"), today("-1 hour")].contains(&clock.to_string()),
        "the guest's date {clock}, the host's {}:\n{out}",
        today("now")
    );
    assert!(
        !out.contains("Unable to read current time from RTC"),
        "{out}"
    );
}

/// A Linux guest recorded and replayed: the recording completes with the right checksums;
/// the replay either verifies every epoch or, as Linux reads the TSC without an exit, reports
/// the divergence (or a checkpoint-required stop) with the exit it happened at and exits 1.
/// It never passes one silently.
#[test]
fn a_recorded_linux_guest_replays_or_reports_where_it_diverged() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (kernel, initrd) = linux_guest_images();
    let (dir, disk, expected) = fresh_disk("replay");
    let log = dir.path_str("linux.log");
    // The replay gets a copy of the image as it was when the recording started.
    let script = format!(
        "cp {disk} /tmp/replay-disk.img || exit 98; \
         timeout 300 {FTVM} run --kernel {kernel} --initrd {initrd} --disk {disk} \
           --mem-mib 256 --append quiet --record {log}; echo \"record-status=$?\"; \
         timeout 300 {FTVM} replay {log} --kernel {kernel} --initrd {initrd} \
           --disk /tmp/replay-disk.img; echo \"replay-status=$?\""
    );
    let (status, out) = nested_sh(&script, 700);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("record-status=0"), "{out}");
    assert_eq!(checksum_lines(&out), expected, "{out}");
    let s = ReplaySummary::find(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let summary = &s.line;
    let (epochs, verified) = (s.epochs, s.verified);
    let (diverged, stopped) = (s.diverged, s.checkpoint_required);
    if diverged + stopped == 0 {
        assert_eq!(verified, epochs, "{summary}");
        assert!(out.contains("replay-status=0"), "{out}");
    } else {
        assert!(out.contains("replay-status=1"), "{out}");
        if diverged > 0 {
            assert!(
                out.lines()
                    .any(|l| l.contains("diverged") && l.contains("exit")),
                "a divergence without the exit it happened at:\n{out}"
            );
        }
    }
    let divergence = out.lines().find(|l| l.starts_with("diverged epoch="));
    eprintln!(
        "Linux replay: {summary}; {}",
        divergence.unwrap_or("no divergence")
    );
}

/// The same kernel as an ELF `vmlinux` (the bzImage's XZ payload, decompressed as the
/// kernel's scripts/extract-vmlinux does) boots through the ELF path to the init.
#[test]
fn the_debian_kernel_as_an_elf_vmlinux_boots_too() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (kernel, initrd) = linux_guest_images();
    let image = std::fs::read(&kernel).unwrap();
    let xz_magic = b"\xfd7zXZ\0";
    let at = image
        .windows(xz_magic.len())
        .position(|w| w == xz_magic)
        .expect("Debian's bzImage carries an XZ payload");
    let dir = Scratch::new("linux-vmlinux");
    let vmlinux = dir.path_str("vmlinux");
    let mut xz = Command::new("xz")
        .args(["-dc"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&vmlinux).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run xz");
    // xz stops at the end of its stream and complains about the bytes after it.
    let _ = std::io::Write::write_all(xz.stdin.as_mut().unwrap(), &image[at..]);
    drop(xz.stdin.take());
    let _ = xz.wait();
    let elf = std::fs::read(&vmlinux).unwrap();
    assert!(elf.starts_with(b"\x7fELF\x02"), "not an ELF64 vmlinux");
    let script = format!(
        "timeout 200 {FTVM} run --kernel {vmlinux} --initrd {initrd} --append 'quiet ftvm.workload=boot'"
    );
    let (status, out) = nested_sh(&script, 300);
    let lines = guest_lines(&out);
    assert!(lines.contains(&"ftvm-linux-guest: init"), "{out}");
    assert!(lines.contains(&"ftvm-linux-guest: booted"), "{out}");
    assert_eq!(status, Some(0), "{out}");
}

/// Runs `ftvm run ARGS` on this host (bad input is refused before the guest starts, so
/// these need no standard KVM).
fn ftvm_run(args: &[&str]) -> std::process::Output {
    Command::new(FTVM)
        .arg("run")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ftvm")
}

/// One `ftvm: error: ...` line containing `what`, exit status 1, no panic.
fn assert_clear_error(o: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Lifecycle lines logged at INFO may come before the one error line, which is the last.
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ftvm: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert_eq!(err.lines().last(), Some(lines[0]), "{err}");
    assert!(
        lines[0].starts_with("ftvm: error: ") && lines[0].contains(what),
        "expected an error about {what:?}, got {err}"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn a_truncated_bzimage_is_a_clear_error() {
    let (kernel, initrd) = linux_guest_images();
    let image = std::fs::read(&kernel).unwrap();
    let dir = Scratch::new("linux-truncated");
    let cut = dir.path_str("vmlinuz-truncated");
    std::fs::write(&cut, &image[..image.len() / 2]).unwrap();
    let o = ftvm_run(&["--kernel", &cut, "--initrd", &initrd]);
    assert_clear_error(&o, "truncated bzImage");
    // Cut inside the boot sectors: still a clear error.
    std::fs::write(&cut, &image[..0x300]).unwrap();
    let o = ftvm_run(&["--kernel", &cut]);
    assert_clear_error(&o, "truncated bzImage");
}

#[test]
fn a_missing_initrd_is_a_clear_error() {
    let (kernel, _) = linux_guest_images();
    let o = ftvm_run(&["--kernel", &kernel, "--initrd", "/nonexistent/initrd.gz"]);
    assert_clear_error(
        &o,
        "cannot read initrd /nonexistent/initrd.gz: No such file or directory",
    );
}

#[test]
fn bad_disks_are_clear_errors() {
    let (kernel, initrd) = linux_guest_images();
    let dir = Scratch::new("linux-disks");
    let run = |disk: &str| ftvm_run(&["--kernel", &kernel, "--initrd", &initrd, "--disk", disk]);
    // A directory.
    let o = run(&dir.path_str(""));
    assert_clear_error(&o, "is a directory, not a raw image file");
    // A read-only image opened read-write; accepted with ,ro (then the guest boots: not
    // run to the end here, PVM cannot boot Linux).
    let image = dir.path_str("ro.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut perms = std::fs::metadata(&image).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&image, perms).unwrap();
    let o = run(&image);
    assert_clear_error(&o, &format!("disk image {image} is read-only"));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("--disk {image},ro")));
    // Missing, and a size that is not whole sectors.
    let o = run(&dir.path_str("missing.img"));
    assert_clear_error(&o, "No such file or directory");
    let odd = dir.path_str("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let o = run(&odd);
    assert_clear_error(&o, "size 1000 is not a multiple of 512 bytes");
    // An unknown option.
    let o = run(&format!("{odd},rw2"));
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown disk option"));
}

/// Options both processes of a protected pair get in the harness: the VMM runs under TCG
/// there, on one emulated CPU the two processes share, so a peer may be left off the CPU
/// for a second; heartbeats every 200 ms, a peer lost after 3 s of silence (a killed
/// process is seen at once anyway: its connection closes). The recorder's latency bound is
/// 50 ms, as in the nested suites (see tests/nested.rs).
///
/// The back-pressure bounds are lifted: Linux diverges at almost every epoch (its TSC reads),
/// so the standby is repaired again and again in the slow harness; these tests are about the
/// disk and failover, not about slowing or dropping a lagging standby (tests/backpressure.rs
/// is). The lag is now bounded by time with repairs as progress (DESIGN.md §6), which should
/// let these tests keep the default bounds; that has not been tried in the harness yet.
const PAIR_OPTIONS: &str = "--heartbeat-ms 200 --heartbeat-timeout-ms 3000 \
    --max-lag-ms 86400000 --max-slowed-ms 86400000 --max-standby-backlog-mib 4096";

/// The shell script that runs a protected pair of the Linux guest's files workload in the
/// harness, the standby on its own copy of `disk` (`copy`); with `kill`, the primary is
/// SIGKILLed during the disk writes (see [`KILL_DURING_WRITES`]). It prints
/// `primary-status=`, `standby-status=`, `took-s=`, the primary's `protected run complete`
/// line, both stdouts in hex (`hex-primary=`, `hex-standby=`), whether the two images are
/// identical, and `copy-checksum NAME SHA256` for the files in the standby's copy
/// (debugfs), then the standby's stderr.
fn protected_script(dir: &str, disk: &str, copy: &str, kill: Kill, mode: TscMode) -> String {
    let (kernel, initrd) = linux_guest_images();
    let tsc = match mode {
        TscMode::Repair => "repair",
        TscMode::Exits => "exits",
    };
    let primary = format!(
        "FTVM_LOG=ftvm=info {FTVM} run --peer 127.0.0.1:7000 \
           --connect-timeout-ms 30000 --kernel {kernel} --initrd {initrd} --disk {disk} \
           --mem-mib 256 --latency-bound-ms 50 {PAIR_OPTIONS} --key {dir}/pair.key \
           --tsc {tsc} >{dir}/p.out 2>{dir}/p.err"
    );
    // The primary runs in the background (`$pp`) while the script watches its output: when
    // the guest's init line appears (`init-at-ms=`), when the primary ends, and the kill.
    let kill = match kill {
        Kill::No => String::new(),
        Kill::DuringWrites => KILL_DURING_WRITES.to_string(),
        Kill::AfterInit { ms } => format!(
            "sleep {}.{:03}; kill -9 $pp && echo killed-primary \
             && echo \"killed-at-ms=$(( $(date +%s%3N) - t0 ))\"",
            ms / 1000,
            ms % 1000
        ),
        Kill::AfterWritesBegin { ms } => format!(
            "until grep -q 'writing the files' $D/p.out; do kill -0 $pp 2>/dev/null || break; sleep 0.05; done\n\
             sleep {}.{:03}; kill -9 $pp && echo killed-primary \
             && echo \"killed-at-ms=$(( $(date +%s%3N) - t0 ))\"",
            ms / 1000,
            ms % 1000
        ),
    };
    let run_primary = format!(
        "t0=$(date +%s%3N)\n{primary} & pp=$!\n\
         until grep -q 'ftvm-linux-guest: init' $D/p.out; do kill -0 $pp 2>/dev/null || break; sleep 0.05; done\n\
         echo \"init-at-ms=$(( $(date +%s%3N) - t0 ))\"\n\
         {kill}\n\
         wait $pp"
    );
    format!(
        "busybox ip link set lo up || exit 98\n\
         cp {disk} {copy} || exit 98\n\
         {FTVM} keygen --out {dir}/pair.key >/dev/null || exit 98\n\
         start=$(date +%s)\n\
         FTVM_LOG=ftvm_secondary::standby=info,ftvm_secondary::tsc=info {FTVM} standby \
           --listen 127.0.0.1:7000 --disk {copy} {PAIR_OPTIONS} --key {dir}/pair.key \
           >{dir}/s.out 2>{dir}/s.err &\n\
         sp=$!\n\
         {run_primary}\n\
         echo \"primary-status=$?\"\n\
         echo \"primary-ended-at-ms=$(( $(date +%s%3N) - t0 ))\"\n\
         wait $sp; echo \"standby-status=$?\"\n\
         echo \"standby-ended-at-ms=$(( $(date +%s%3N) - t0 ))\"\n\
         echo \"took-s=$(( $(date +%s) - start ))\"\n\
         grep 'protected run complete' {dir}/p.err\n\
         grep -v 'protected run complete' {dir}/p.err | tail -20\n\
         echo \"hex-primary=$(od -An -v -tx1 {dir}/p.out | tr -d ' \\n')\"\n\
         echo \"hex-standby=$(od -An -v -tx1 {dir}/s.out | tr -d ' \\n')\"\n\
         cmp {disk} {copy} && echo images-identical\n\
         e2fsck -fn {copy} >/dev/null 2>&1 && echo copy-fsck-clean\n\
         for f in small.dat medium.dat large.dat; do \
           echo \"copy-checksum $f $(debugfs -R \"cat /$f\" {copy} 2>/dev/null | sha256sum)\"; \
         done\n\
         echo \"repairs-diverged=$(grep 'asking for a repair' {dir}/s.err | grep -c 'checkpoint_required=false')\"\n\
         echo \"repairs-checkpoint-required=$(grep 'asking for a repair' {dir}/s.err | grep -c 'checkpoint_required=true')\"\n\
         grep 'asking for a repair' {dir}/s.err | grep 'checkpoint_required=false' | head -3\n\
         echo '--- standby stderr (repairs) ---'\n\
         grep -c 'checkpoint installed' {dir}/s.err\n\
         grep -v 'checkpoint installed\\|asking for a repair' {dir}/s.err | tail -20\n"
    )
}

/// Waits (in the harness's shell, the primary being `$pp`) until the guest mounted
/// /dev/vda (the kernel's line is in the primary's released output), then until the
/// standby next asks for a repair that covers disk blocks its guest wrote: the guest is
/// writing the disk, and the standby's copy has blocks the primary must repair. Then
/// SIGKILLs the primary.
const KILL_DURING_WRITES: &str = "\
until grep -q 'EXT4-fs (vda): mounted' $D/p.out; do kill -0 $pp 2>/dev/null || break; sleep 0.2; done
base=$(grep -c 'dirty_blocks=[1-9]' $D/s.err)
while [ \"$(grep -c 'dirty_blocks=[1-9]' $D/s.err)\" -le \"$base\" ]; do kill -0 $pp 2>/dev/null || break; sleep 0.05; done
kill -9 $pp && echo killed-primary && echo \"killed-at-ms=$(( $(date +%s%3N) - t0 ))\" && grep 'dirty_blocks=[1-9]' $D/s.err | tail -1";

/// `key=value` of the harness's output, as bytes decoded from hex.
fn hex_field(out: &str, key: &str) -> Vec<u8> {
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the output:\n{out}"));
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// The `copy-checksum` lines, as the guest's `checksum` lines.
fn copy_checksums(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("copy-checksum "))
        .map(|l| format!("checksum {}", l.trim_end_matches(" -").trim_end()))
        .collect()
}

/// The number right after the first `key` in `out`.
fn number(out: &str, key: &str) -> Option<u64> {
    let at = out.find(key)? + key.len();
    let digits: String = out[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Issue 13: the pair takes a Linux guest with a disk. The primary ships the kernel and
/// initrd; the standby replays onto its own copy of the disk; Linux reads the TSC, so the
/// standby diverges and is repaired again and again, and each repair covers the disk blocks
/// either side wrote. At the end both exit 0, the guest printed the right checksums, and the
/// standby's copy is the primary's image byte for byte (and holds the right files).
#[test]
fn a_protected_linux_guest_keeps_the_standbys_disk_identical() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, disk, expected) = fresh_disk("protected");
    let copy = dir.path_str("copy.img");
    let d = dir.path_str("");
    let script = format!(
        "D={d}\n{}",
        protected_script(&d, &disk, &copy, Kill::No, TscMode::Repair)
    );
    let started = std::time::Instant::now();
    let (status, out) = nested_sh(&script, 1200);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("primary-status=0"), "{out}");
    assert!(out.contains("standby-status=0"), "{out}");
    let primary = String::from_utf8_lossy(&hex_field(&out, "hex-primary")).into_owned();
    assert_eq!(checksum_lines(&primary), expected, "{primary}\n{out}");
    assert!(guest_lines(&primary).contains(&"workload ok"), "{primary}");
    assert!(
        hex_field(&out, "hex-standby").is_empty(),
        "the standby printed output"
    );
    assert!(out.contains("images-identical"), "{out}");
    assert!(out.contains("copy-fsck-clean"), "{out}");
    assert_eq!(copy_checksums(&out), expected, "{out}");
    let complete = out
        .lines()
        .find(|l| l.contains("protected run complete"))
        .unwrap_or_else(|| panic!("no summary from the primary:\n{out}"));
    assert!(complete.contains("protected_to_end=true"), "{complete}");
    eprintln!(
        "protected Linux files workload: {} s in the pair ({:.0?} with the harness), repairs={}",
        number(&out, "took-s=").unwrap_or(0),
        started.elapsed(),
        number(complete, "repairs=").unwrap_or(0)
    );
}

/// When a drill SIGKILLs the primary.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// Never: the protected run ends by itself.
    No,
    /// During the disk writes (see [`KILL_DURING_WRITES`]).
    DuringWrites,
    /// `ms` after the guest's init line appeared in the primary's released output.
    AfterInit { ms: u64 },
    /// `ms` after the guest said it begins writing the files (released output).
    AfterWritesBegin { ms: u64 },
}

/// How the pair keeps the guest's TSC reads in step (issue 18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TscMode {
    /// The stock harness: the TSC is read without exits, repairs heal what it makes differ.
    Repair,
    /// The harness with the ftvm-rdtsc-exits module, the primary at `--tsc exits`: every
    /// TSC read is logged and replayed (exact mode).
    Exits,
}

/// How a failover drill ended.
enum Drill {
    /// The primary was killed, and the standby took over correctly (the checks passed):
    /// the bytes the primary released, where the standby re-emitted from, the seconds.
    FailedOver {
        released: usize,
        from: usize,
        took_s: u64,
        /// ms from the kill to the standby's end (it finished the workload live).
        after_kill: Option<u64>,
        /// Repairs the standby asked for because an epoch diverged, and because the primary
        /// had kicked the vCPU (checkpoint-required).
        diverged: u64,
        checkpoint_required: u64,
    },
    /// The primary had ended before the kill (a random moment drawn too late), this many
    /// ms after the guest's init line.
    TooLate { ran_ms: Option<u64> },
}

/// One failover drill of the `files` workload (issue 13): the standby goes live on its own
/// copy, finishes the workload and prints the right checksums; the output a client saw (the
/// primary's released bytes, then the standby's from the sequence number it re-emits from)
/// is the guest's output of one execution with no gap; the standby's copy holds the right
/// files and a clean file system.
fn failover_drill(name: &str, kill: Kill) -> Drill {
    failover_drill_in(TscMode::Repair, name, kill)
}

/// [`failover_drill`] with the pair's TSC in `mode`.
fn failover_drill_in(mode: TscMode, name: &str, kill: Kill) -> Drill {
    let (dir, disk, expected) = fresh_disk(name);
    let copy = dir.path_str("copy.img");
    let d = dir.path_str("");
    let script = format!("D={d}\n{}", protected_script(&d, &disk, &copy, kill, mode));
    let (status, out) = nested_sh_in(mode, &script, 1200);
    if mode == TscMode::Exits {
        // Exact mode on both sides, or the drill proves nothing about it.
        assert!(out.contains("TSC reads are exits"), "{out}");
        assert!(out.contains("replayed exactly from the log"), "{out}");
    }
    assert_eq!(status, Some(0), "{kill:?}: {out}");
    if out.contains("primary-status=0") && !out.contains("killed-primary") {
        assert!(out.contains("standby-status=0"), "{out}");
        let ran_ms = number(&out, "primary-ended-at-ms=")
            .zip(number(&out, "init-at-ms="))
            .map(|(end, init)| end.saturating_sub(init));
        return Drill::TooLate { ran_ms };
    }
    assert!(
        out.contains("killed-primary"),
        "{kill:?}: the primary was not killed:\n{out}"
    );
    assert!(out.contains("primary-status=137"), "{kill:?}: {out}");
    assert!(out.contains("standby-status=0"), "{kill:?}: {out}");
    let primary = hex_field(&out, "hex-primary");
    let standby = hex_field(&out, "hex-standby");
    if let Kill::DuringWrites | Kill::AfterWritesBegin { .. } = kill {
        let ptext = String::from_utf8_lossy(&primary).into_owned();
        assert!(
            checksum_lines(&ptext).len() < expected.len(),
            "the primary was killed after the workload had ended:\n{ptext}"
        );
    }
    // The standby names the output sequence number it re-emits from; the primary's bytes
    // past it are the duplicate window and must be what the standby printed first.
    let from = number(&out, "re-emitting output from sequence ")
        .unwrap_or_else(|| panic!("{kill:?}: no go-live line from the standby:\n{out}"))
        as usize;
    assert!(
        from <= primary.len(),
        "{kill:?}: re-emits from {from}, primary printed {}",
        primary.len()
    );
    assert!(
        standby.starts_with(&primary[from..]),
        "{kill:?}: the primary's last {} bytes are not what the standby re-emitted first",
        primary.len() - from
    );
    let mut merged = primary[..from].to_vec();
    merged.extend_from_slice(&standby);
    let merged = String::from_utf8_lossy(&merged).into_owned();
    let lines = guest_lines(&merged);
    assert_eq!(
        lines
            .iter()
            .filter(|l| **l == "ftvm-linux-guest: init")
            .count(),
        1,
        "{kill:?}: {merged}"
    );
    assert_eq!(checksum_lines(&merged), expected, "{kill:?}: {merged}");
    assert!(lines.contains(&"workload ok"), "{kill:?}: {merged}");
    assert!(
        lines.contains(&"ftvm-linux-guest: exit status 0"),
        "{kill:?}: {merged}"
    );
    assert!(out.contains("copy-fsck-clean"), "{kill:?}: {out}");
    assert_eq!(copy_checksums(&out), expected, "{kill:?}: {out}");
    let after_kill = number(&out, "standby-ended-at-ms=")
        .zip(number(&out, "killed-at-ms="))
        .map(|(end, kill)| end.saturating_sub(kill));
    Drill::FailedOver {
        released: primary.len(),
        from,
        took_s: number(&out, "took-s=").unwrap_or(0),
        after_kill,
        diverged: number(&out, "repairs-diverged=").unwrap_or(0),
        checkpoint_required: number(&out, "repairs-checkpoint-required=").unwrap_or(0),
    }
}

/// The window after the guest's init line in which a random drill kills the primary
/// (`FTVM_LINUX_DRILL_WINDOW_MS`): a protected `files` run in the harness took 25–35 s from
/// the init line to its end on the development machine; a draw past the end is drawn again
/// within the time that run took (and the later drills use that window).
const DRILL_WINDOW_MS: u64 = 30_000;

/// Issue 13: `kill -9` of the primary during the `files` workload: once while the guest
/// writes its disk, then `FTVM_LINUX_DRILLS` times (default 0 in `cargo test`: each is
/// another protected Linux boot, about 5 minutes of CI's time; `scripts/linux-drill.sh N`
/// runs N) at a random moment after the guest's init line (the seed is printed). Each
/// drill passes the checks of [`failover_drill`].
#[test]
fn failovers_during_the_files_workload_finish_it_on_the_standbys_copy() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let drills: u64 = std::env::var("FTVM_LINUX_DRILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut window: u64 = std::env::var("FTVM_LINUX_DRILL_WINDOW_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DRILL_WINDOW_MS);
    let mut seed = std::env::var("FTVM_DRILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("Linux failover drills: {drills} at random moments in {window} ms, seed {seed}");
    let report = |what: &str, d: Drill| match d {
        Drill::FailedOver {
            released,
            from,
            took_s,
            after_kill,
            diverged,
            checkpoint_required,
        } => eprintln!(
            "  {what}: failed over; the primary released {released} bytes, the standby \
             re-emitted from {from} ({} bytes twice) and ended {} ms after the kill; {took_s} s; \
             repairs before the kill: {diverged} diverged, {checkpoint_required} \
             checkpoint-required",
            released - from,
            after_kill.map_or("?".into(), |m| m.to_string())
        ),
        Drill::TooLate { ran_ms } => eprintln!(
            "  {what}: the primary had ended before the kill, {} ms after init",
            ran_ms.map_or("?".into(), |m| m.to_string())
        ),
    };
    match failover_drill("failover-writes", Kill::DuringWrites) {
        Drill::TooLate { .. } => panic!("the disk writes ended before the kill"),
        d => report("during the disk writes", d),
    }
    for i in 0..drills {
        let mut span = window.max(1000);
        loop {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let ms = seed % span;
            let what = format!("drill {} of {drills}, kill {ms} ms after init", i + 1);
            match failover_drill(&format!("failover-{i}"), Kill::AfterInit { ms }) {
                Drill::TooLate { ran_ms } if span > 1000 => {
                    report(&what, Drill::TooLate { ran_ms });
                    // Drawn again within the time the workload took, or half the window.
                    span = ran_ms.unwrap_or(span / 2).min(span / 2).max(1000);
                    window = span;
                }
                Drill::TooLate { .. } => panic!("{what}: the primary ended before every draw"),
                d => {
                    report(&what, d);
                    break;
                }
            }
        }
    }
}

/// Issue 13: a standby joins a running Linux guest with a read-write disk (`--join`), its
/// copy made before the guest started (so what the guest's mount wrote differs): the disk
/// resync sends the blocks that differ, the sync's stop-and-copy the blocks written during
/// it; then `kill -9` of the primary, and the standby finishes the workload on its copy:
/// exit 0, `workload ok`, the right files in its copy, a clean file system. The guest
/// pauses 30 s between its mount and its writes (`ftvm.pause=30`) and the standby joins in
/// that pause: a busy guest under the nested harness can finish the workload before the
/// memory pre-copy converges (seen once in CI), and the join would then find no guest.
#[test]
fn a_standby_joins_a_running_linux_guest_with_a_disk_then_takes_over() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let (kernel, initrd) = linux_guest_images();
    let (dir, disk, expected) = fresh_disk("join");
    let copy = dir.path_str("copy.img");
    let d = dir.path_str("");
    let script = format!(
        "busybox ip link set lo up || exit 98\n\
         cp {disk} {copy} || exit 98\n\
         {FTVM} keygen --out {d}/pair.key >/dev/null || exit 98\n\
         FTVM_LOG=ftvm=info {FTVM} run --accept-standby 127.0.0.1:7001 --kernel {kernel} \
           --initrd {initrd} --disk {disk} --mem-mib 256 --latency-bound-ms 50 {PAIR_OPTIONS} \
           --append ftvm.pause=30 --key {d}/pair.key >{d}/p.out 2>{d}/p.err & pp=$!\n\
         until grep -q 'pausing 30 s' {d}/p.out; do kill -0 $pp || break; sleep 0.2; done\n\
         FTVM_LOG=ftvm_secondary=info {FTVM} standby --join 127.0.0.1:7001 --disk {copy} \
           {PAIR_OPTIONS} --key {d}/pair.key >{d}/s.out 2>{d}/s.err & sp=$!\n\
         until grep -q 'synced: following' {d}/s.err; do kill -0 $sp || break; sleep 0.2; done\n\
         kill -9 $pp && echo killed-primary\n\
         wait $pp; echo \"primary-status=$?\"\n\
         wait $sp; echo \"standby-status=$?\"\n\
         grep 'disk resync' {d}/p.err {d}/s.err\n\
         echo \"standby-out-begin\"; cat {d}/s.out; echo \"standby-out-end\"\n\
         e2fsck -fn {copy} >/dev/null 2>&1 && echo copy-fsck-clean\n\
         for f in small.dat medium.dat large.dat; do \
           echo \"copy-checksum $f $(debugfs -R \"cat /$f\" {copy} 2>/dev/null | sha256sum)\"; \
         done\n\
         echo '--- standby stderr ---'; tail -20 {d}/s.err\n"
    );
    let (status, out) = nested_sh(&script, 1200);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("killed-primary"), "{out}");
    assert!(out.contains("primary-status=137"), "{out}");
    assert!(out.contains("standby-status=0"), "{out}");
    let standby = out
        .split("standby-out-begin")
        .nth(1)
        .and_then(|s| s.split("standby-out-end").next())
        .unwrap_or_default();
    assert!(guest_lines(standby).contains(&"workload ok"), "{out}");
    assert!(out.contains("disk resync done"), "{out}");
    assert!(out.contains("copy-fsck-clean"), "{out}");
    assert_eq!(copy_checksums(&out), expected, "{out}");
    eprintln!(
        "join of a running Linux guest with a disk, then failover: {}",
        out.lines()
            .filter(|l| l.contains("disk resync"))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// Issue 18: a protected pair in exact mode (the harness with the ftvm-rdtsc-exits module,
/// the primary at `--tsc exits`: every guest TSC read logged and replayed) survives `kill -9`
/// of its primary while the guest writes its files, with every check of [`failover_drill`]:
/// the standby finishes the workload on its copy, the right files, one execution's output.
/// It prints the repairs the standby asked for before the kill, split into diverged epochs
/// and checkpoint-required ones (README, "Exact replay with the host module").
///
/// Ignored in `cargo test` for its length, not for a failure: it passed in 833 s (39
/// diverged and 22 checkpoint-required repairs before the kill) while the guest still saw
/// the TSC and its clocksource read it constantly, every read an exit. Exact mode now hides
/// the TSC (`TscMeasures::for_run`); a run with that had not finished after 628 s on a
/// machine whose two cores also ran two other nested VMs, and was stopped, so its time
/// unloaded is not known yet. `cargo test --test linux -- --ignored an_exact_mode` runs it.
#[test]
#[ignore = "over 10 minutes in the harness (a protected Linux pair with every TSC read an \
            exit); run with --ignored"]
fn an_exact_mode_pair_survives_a_kill_during_the_writes() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    match failover_drill_in(
        TscMode::Exits,
        "exact-writes",
        Kill::AfterWritesBegin { ms: 1500 },
    ) {
        Drill::TooLate { ran_ms } => {
            panic!("the files were written before the kill ({ran_ms:?} ms after init)")
        }
        Drill::FailedOver {
            diverged,
            checkpoint_required,
            took_s,
            ..
        } => eprintln!(
            "exact-mode Linux pair, kill during the writes: failed over; repairs before the \
             kill: {diverged} diverged, {checkpoint_required} checkpoint-required; {took_s} s"
        ),
    }
}
