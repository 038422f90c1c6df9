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
    let (status, stdout, stderr) = common::nested(&["sh", "-c", script], timeout_s);
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
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
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
