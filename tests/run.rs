//! `ftvm run` end to end: the built-in guest booted on the real /dev/kvm, its serial console on
//! the process's stdin/stdout, its exit status passed through.

use std::io::Write;
use std::process::{Command, Output, Stdio};

mod common;
use common::FTVM;

fn ftvm_run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(FTVM)
        .arg("run")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait for ftvm")
}

fn workload(cmdline: &str) -> Output {
    ftvm_run(&["--cmdline", cmdline], b"")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn hex_field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|t| t.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn counter_prints_exactly_n_ticks_then_done() {
    let o = workload("workload=counter ticks=20");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 21, "{out}");
    for (i, line) in lines[..20].iter().enumerate() {
        assert!(
            line.starts_with(&format!("tick {} sum=", i + 1)),
            "line {i}: {line}"
        );
        u64::from_str_radix(hex_field(line, "sum="), 16).expect("hex sum");
    }
    assert!(lines[20].starts_with("done sum="), "{out}");
    assert_eq!(hex_field(lines[20], "sum="), hex_field(lines[19], "sum="));
}

#[test]
fn default_cmdline_runs_the_counter() {
    let o = ftvm_run(&[], b"");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().filter(|l| l.starts_with("tick ")).count(), 20);
    assert!(out.ends_with('\n') && out.lines().last().unwrap().starts_with("done sum="));
}

#[test]
fn echo_round_trips_lines_from_stdin() {
    let o = ftvm_run(
        &["--cmdline", "workload=echo"],
        b"hello\nfault tolerant\n\nabc\r\nquit\nnever read\n",
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "echo olleh\necho tnarelot tluaf\necho cba\n");
}

#[test]
fn echo_accepts_input_larger_than_the_uart_fifo() {
    let line = "x".repeat(200) + "y";
    let input = format!("{line}\n{line}\n{line}\nquit\n");
    let o = ftvm_run(&["--cmdline", "workload=echo"], input.as_bytes());
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let expected = format!("echo y{}\n", "x".repeat(200)).repeat(3);
    assert_eq!(stdout(&o), expected);
}

#[test]
fn echo_with_closed_input_and_no_timer_is_reported_not_hung() {
    let o = ftvm_run(&["--cmdline", "workload=echo"], b"one\n");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "echo eno\n");
    assert!(
        stderr(&o).contains("serial input is closed and no timer is armed"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn spin_is_interrupted_by_the_timer_without_exits() {
    let o = workload("workload=spin ms=150");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    // The loop ends at tick 15; a tick may land before the line is printed.
    let ticks: u64 = out
        .strip_prefix("spin ticks=")
        .and_then(|r| r.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((15..=17).contains(&ticks), "{out}");
    assert_eq!(out.lines().last(), Some("done"));
}

#[test]
fn rdtsc_prints_its_values() {
    let o = workload("workload=rdtsc n=4");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    for (i, l) in lines[..4].iter().enumerate() {
        assert!(l.starts_with(&format!("rdtsc {i} value=")), "{l}");
    }
    assert_eq!(lines[4], "done");
}

#[test]
fn guest_sees_the_pit_counter_advance() {
    let o = workload("workload=pit");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let field = |k: &str| -> u64 {
        out.trim()
            .split(' ')
            .find_map(|t| t.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {out}"))
    };
    assert!(field("changes=") > 0, "{out}");
    assert!(field("first=") <= 11932 && field("last=") <= 11932, "{out}");
    assert_ne!(field("first="), field("last="), "{out}");
}

#[test]
fn exit_status_propagates_from_the_guest() {
    let o = workload("workload=nosuchthing");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stdout(&o), "error: unknown workload nosuchthing\n");
}

#[test]
fn i8042_reset_powers_the_vm_off() {
    let o = workload("workload=reset");
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "resetting\n");
}

#[test]
fn triple_fault_reports_rip_and_exit_sequence_number() {
    let o = workload("workload=crash");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "crashing\n");
    let err = stderr(&o);
    assert!(
        err.contains("ftvm: error: guest triple fault at rip=0x")
            && err.contains("(exit sequence number "),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn assert_one_line_error(o: &Output, expected: &str) {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    let err = stderr(o);
    assert!(err.starts_with("ftvm: error: "), "{err}");
    assert!(err.contains(expected), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(o.stdout.is_empty());
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let o = ftvm_run(&["--kernel", "/nonexistent/vmlinux"], b"");
    assert_one_line_error(&o, "cannot read kernel /nonexistent/vmlinux: No such file");
}

#[test]
fn a_file_that_is_not_a_kernel_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ftvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("not-a-kernel.txt");
    std::fs::write(&text, "this is not an ELF file\n").unwrap();
    let o = ftvm_run(&["--kernel", text.to_str().unwrap()], b"");
    assert_one_line_error(
        &o,
        "not a kernel image: neither ELF64 (vmlinux) nor bzImage",
    );
    // A 32-bit ELF header is refused too.
    let mut elf32 = vec![0x7f, b'E', b'L', b'F', 1, 1, 1];
    elf32.resize(64, 0);
    let f = dir.join("elf32");
    std::fs::write(&f, &elf32).unwrap();
    let o = ftvm_run(&["--kernel", f.to_str().unwrap()], b"");
    assert_one_line_error(&o, "not an ELF64 x86_64 kernel");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_size_out_of_range_is_a_clear_error() {
    for mib in ["4", "2000000"] {
        let o = ftvm_run(&["--mem-mib", mib], b"");
        assert_one_line_error(&o, &format!("memory size {mib} MiB is out of range"));
    }
}

/// Runs ftvm with /dev hidden or replaced, in a private mount namespace. Needs root (CI runs
/// as root); without it the test fails, it does not skip.
fn ftvm_with_dev(setup: &str) -> Output {
    Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!("{setup} && exec {FTVM} run"))
        .output()
        .expect("unshare (util-linux) must be installed")
}

#[test]
fn no_dev_kvm_is_a_clear_error() {
    let o = ftvm_with_dev("mount -t tmpfs none /dev");
    assert_one_line_error(&o, "/dev/kvm does not exist");
}

#[test]
fn a_dev_kvm_that_is_not_kvm_is_a_clear_error() {
    let o = ftvm_with_dev("mount --bind /dev/null /dev/kvm");
    assert_one_line_error(&o, "/dev/kvm is not a KVM device");
}

#[test]
fn no_permission_on_dev_kvm_is_a_clear_error() {
    // Copy the binary somewhere an unprivileged user can execute it.
    let dir = std::env::temp_dir().join(format!("ftvm-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("ftvm");
    std::fs::copy(FTVM, &bin).unwrap();
    Command::new("chmod")
        .args(["755", dir.to_str().unwrap(), bin.to_str().unwrap()])
        .status()
        .unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("run")
        .output()
        .expect("setpriv (util-linux) must be installed");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_one_line_error(&o, "permission denied opening /dev/kvm");
}
