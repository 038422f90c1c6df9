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

#[path = "linux/pair.rs"]
mod pair;
use pair::{
    copy_checksums, failover_drill, failover_drill_in, hex_field, number, protected_script, Drill,
    Kill, Start, TscMode, DRILL_WINDOW_MS,
};

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
        protected_script(&d, &disk, &copy, Kill::No, TscMode::Repair, Start::Boot)
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

/// Issue 13: `kill -9` of the primary during the `files` workload: once while the guest
/// writes its disk, then `FTVM_LINUX_DRILLS` times (default 0 in `cargo test`: each is
/// another protected Linux boot, about 5 minutes of CI's time; `scripts/linux-drill.sh N`
/// runs N) at a random moment after the guest's init line (the seed is printed). Each
/// drill passes the checks of [`failover_drill`].
///
/// The first drill protects a running guest: the standby joins (`--join`) with a copy of
/// the disk made before the guest's mount wrote it, in a 45 s pause the guest takes after
/// its mount (`ftvm.pause=45`), so the join resyncs the blocks that differ (memory
/// pre-copy, disk resync, stop-and-copy); then the writes are protected, and the primary
/// is killed 1.5 s after the guest says it begins them. (It used to wait for the next
/// repair that carried disk blocks; in one CI run that repair had come before the line was
/// released, none came after, and the drill never killed.) A busy guest under the nested harness could finish the workload
/// before the memory pre-copy converged (seen once in CI), hence the pause. The random
/// drills protect the guest from its boot, as does
/// [`a_protected_linux_guest_keeps_the_standbys_disk_identical`].
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
            ..
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
    match failover_drill_in(
        TscMode::Repair,
        Start::Join { pause_s: 45 },
        "failover-writes",
        Kill::AfterWritesBegin { ms: 1500 },
    ) {
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

/// Issue 18: a protected pair in exact mode (the harness with the ftvm-rdtsc-exits module,
/// the primary at `--tsc exits`: every guest TSC read logged and replayed) survives `kill -9`
/// of its primary while the guest writes its files, with every check of [`failover_drill`]:
/// the standby finishes the workload on its copy, the right files, one execution's output.
/// It prints the repairs the standby asked for before the kill, split into diverged epochs
/// and checkpoint-required ones (README, "Exact replay with the host module"), and none may
/// have diverged: every TSC read is logged, and both sides count the same dirty pages
/// (DESIGN.md §2, "Dirty sets"; before that, 11 of the 11 repairs of one run had diverged,
/// all from pages only the standby counted dirty).
///
/// The standby joins the running guest in its pause before the writes, as the Redis drills
/// do: the boot is not protected work, so the drill fits in CI. Protected from the boot, it
/// is [`an_exact_mode_pair_protected_from_the_boot_survives_a_kill`].
#[test]
fn an_exact_mode_pair_survives_a_kill_during_the_writes() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    exact_drill(Start::Join { pause_s: 30 }, "exact-join");
}

/// [`an_exact_mode_pair_survives_a_kill_during_the_writes`] with the pair protecting the
/// guest from its first instruction.
///
/// Ignored in `cargo test` for its length, not for a failure: it passed in 833 s (39
/// diverged and 22 checkpoint-required repairs before the kill) while the guest still saw
/// the TSC and its clocksource read it constantly, every read an exit. Exact mode now hides
/// the TSC (`TscMeasures::for_run`); a run with that had not finished after 628 s on a
/// machine whose two cores also ran two other nested VMs, and was stopped, so its time
/// unloaded is not known yet. `cargo test --test linux -- --ignored from_the_boot` runs it.
#[test]
#[ignore = "over 10 minutes in the harness (a protected Linux boot with every TSC read an \
            exit); run with --ignored"]
fn an_exact_mode_pair_protected_from_the_boot_survives_a_kill() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    exact_drill(Start::Boot, "exact-boot");
}

/// The exact-mode drill: `kill -9` of the primary 1.5 s after the guest said it begins its
/// writes; the checks of [`failover_drill`], and no repair but for checkpoint-required
/// epochs (a kick: no instruction counter says where it landed), the standby's reasons
/// named if one diverged.
fn exact_drill(start: Start, name: &str) {
    match failover_drill_in(
        TscMode::Exits,
        start,
        name,
        Kill::AfterWritesBegin { ms: 1500 },
    ) {
        Drill::TooLate { ran_ms } => {
            panic!("the files were written before the kill ({ran_ms:?} ms after init)")
        }
        Drill::FailedOver {
            diverged,
            checkpoint_required,
            took_s,
            first_divergences,
            ..
        } => {
            eprintln!(
                "exact-mode Linux pair ({start:?}), kill during the writes: failed over; \
                 repairs before the kill: {diverged} diverged, {checkpoint_required} \
                 checkpoint-required; {took_s} s"
            );
            assert_eq!(
                diverged, 0,
                "exact mode: an epoch diverged (the first reasons: {first_divergences:?})"
            );
        }
    }
}
