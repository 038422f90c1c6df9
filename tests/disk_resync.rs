//! The disk resync before protection (DESIGN.md §4 "Disks"): a standby's copy that differs
//! from the primary's disk is made identical before the guest is protected, and only the
//! blocks that differ cross the wire (counted in the primary's `disk resync served` line and
//! the standby's `disk resync done` line); a resync whose connection drops resumes where it
//! stopped; a standby joins a running guest with a read-write disk and takes over after a
//! `kill -9` of its primary. These run on PVM with the built-in guest, which never touches
//! its disk, so the primary's image is the same throughout and each copy must end equal to it.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

mod common;
use common::{field, free_addr, Scratch, FTVM};

static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

const BLOCK: usize = 64 << 10;

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `blocks` 64 KiB blocks of non-zero bytes, each block different.
fn pattern(blocks: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..blocks * BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// The `key=` field of the first stderr line containing `message`, as a number.
fn logged(stderr: &str, message: &str, key: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains(message))
        .unwrap_or_else(|| panic!("no {message:?} line in:\n{stderr}"));
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_same_image(copy: &str, disk: &str) {
    let (a, b) = (
        std::fs::read(copy).expect("read copy"),
        std::fs::read(disk).expect("read disk"),
    );
    let differ = a
        .chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(differ, 0, "{differ} blocks of {copy} differ from {disk}");
    assert_eq!(a.len(), b.len());
}

/// A standby copy that differs from the primary's disk in three blocks: the resync before
/// the guest starts sends those three blocks and nothing else (next to the 16 MiB a full
/// copy would send), and the guest then runs protected with identical disks.
#[test]
fn a_copy_differing_in_a_few_blocks_is_resynced_and_only_those_blocks_cross() {
    let _one = one_at_a_time();
    let dir = Scratch::new("resync-few");
    let blocks = 256;
    let data = pattern(blocks);
    let mut copy_data = data.clone();
    for b in [0, 77, blocks - 1] {
        copy_data[b * BLOCK + 100] ^= 0xff;
    }
    let (disk, copy) = (dir.path_str("disk.img"), dir.path_str("copy.img"));
    std::fs::write(&disk, &data).expect("write disk");
    std::fs::write(&copy, &copy_data).expect("write copy");
    let addr = free_addr();
    let standby = Command::new(FTVM)
        .args(["standby", "--listen", &addr, "--disk", &copy])
        .args(common::key_args(&[]))
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the standby");
    let primary = Command::new(FTVM)
        .args(["run", "--peer", &addr, "--disk", &disk])
        .args(common::key_args(&[]))
        .args(["--cmdline", "workload=counter ticks=5"])
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run the primary");
    let standby = standby.wait_with_output().expect("wait for the standby");
    let (perr, serr) = (stderr(&primary), stderr(&standby));
    assert_eq!(primary.status.code(), Some(0), "primary: {perr}");
    assert_eq!(standby.status.code(), Some(0), "standby: {serr}");
    assert!(perr.contains("protected_to_end=true"), "{perr}");
    assert_eq!(
        logged(&perr, "disk resync served", "compared"),
        blocks as u64
    );
    assert_eq!(logged(&perr, "disk resync served", "sent"), 3);
    assert_eq!(
        logged(&perr, "disk resync served", "bytes"),
        3 * BLOCK as u64
    );
    assert_eq!(
        logged(&perr, "disk resync served", "hash_bytes"),
        blocks as u64 * 32
    );
    assert_eq!(logged(&serr, "disk resync done", "differed"), 3);
    assert_same_image(&copy, &disk);
}

/// `ftvm run --accept-standby ADDR --disk DISK` with the counter guest, long enough for a
/// standby to join and sync.
fn accepting_primary(accept: &str, disk: &str, ticks: u32) -> Child {
    Command::new(FTVM)
        .args(["run", "--accept-standby", accept, "--disk", disk])
        .args(common::key_args(&[]))
        .args(["--cmdline", &format!("workload=counter ticks={ticks}")])
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the primary")
}

/// A joining standby's resync is cut after 12 MiB of its 32 MiB: the standby reconnects and
/// the primary sends only the blocks it had not received (not the whole disk again), then
/// the sync completes and the guest runs protected to its end with identical disks.
#[test]
fn a_resync_cut_midway_resumes_where_it_stopped() {
    let _one = one_at_a_time();
    let dir = Scratch::new("resync-cut");
    let blocks = 512u64;
    let (disk, copy) = (dir.path_str("disk.img"), dir.path_str("copy.img"));
    std::fs::write(&disk, pattern(blocks as usize)).expect("write disk");
    std::fs::write(&copy, vec![0u8; blocks as usize * BLOCK]).expect("write copy");
    let accept = free_addr();
    let primary = accepting_primary(&accept, &disk, 300);
    let proxy = common::cutting_proxy(accept, 12 << 20);
    std::thread::sleep(Duration::from_millis(200));
    let standby = Command::new(FTVM)
        .args(["standby", "--join", &proxy, "--disk", &copy])
        .args(common::key_args(&[]))
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run the standby");
    let primary = primary.wait_with_output().expect("wait for the primary");
    let (perr, serr) = (stderr(&primary), stderr(&standby));
    assert_eq!(standby.status.code(), Some(0), "standby: {serr}");
    assert_eq!(primary.status.code(), Some(0), "primary: {perr}");
    assert!(perr.contains("protected_to_end=true"), "{perr}");
    let before = logged(&serr, "reconnecting to resume the disk resync", "received");
    let after = logged(&perr, "disk resync served", "sent");
    eprintln!("resync of {blocks} blocks: {before} arrived before the cut, {after} sent after");
    assert!(before > 0, "nothing arrived before the cut:\n{serr}");
    assert_eq!(
        before + after,
        blocks,
        "the resumed resync sent {after} blocks after {before} arrived:\n{perr}\n{serr}"
    );
    assert_same_image(&copy, &disk);
}

/// A standby joins a running guest whose read-write disk its copy differs from (a few
/// blocks), syncs, and when its primary is killed (SIGKILL) it goes live and runs the guest
/// to its end: exit 0, the counter's last line, and a copy identical to the primary's disk.
#[test]
fn a_standby_joins_a_guest_with_a_read_write_disk_and_takes_over() {
    let _one = one_at_a_time();
    let dir = Scratch::new("resync-join-failover");
    let blocks = 64;
    let data = pattern(blocks);
    let mut copy_data = data.clone();
    copy_data[5 * BLOCK] ^= 1;
    copy_data[40 * BLOCK + 7] ^= 1;
    let (disk, copy) = (dir.path_str("disk.img"), dir.path_str("copy.img"));
    std::fs::write(&disk, &data).expect("write disk");
    std::fs::write(&copy, &copy_data).expect("write copy");
    let accept = free_addr();
    let mut primary = accepting_primary(&accept, &disk, 400);
    std::thread::sleep(Duration::from_millis(200));
    let mut standby = Command::new(FTVM)
        .args(["standby", "--join", &accept, "--disk", &copy])
        .args(common::key_args(&[]))
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the standby");
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = BufReader::new(standby.stderr.take().expect("stderr"));
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut serr = String::new();
    for line in rx.iter() {
        serr.push_str(&line);
        serr.push('\n');
        if line.contains("synced: following the primary in lockstep") {
            break;
        }
    }
    assert!(
        serr.contains("synced:"),
        "the standby never synced:\n{serr}"
    );
    assert_eq!(logged(&serr, "disk resync done", "differed"), 2);
    primary.kill().expect("kill -9 the primary");
    let primary = primary.wait_with_output().expect("reap the primary");
    let perr = stderr(&primary);
    assert_eq!(logged(&perr, "disk resync served", "sent"), 2, "{perr}");
    let mut out = String::new();
    standby
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read the standby's output");
    let status = standby.wait().expect("wait for the standby");
    serr.extend(rx.iter().map(|l| l + "\n"));
    assert_eq!(status.code(), Some(0), "standby: {serr}");
    assert!(serr.contains("going live"), "{serr}");
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.starts_with("done sum=")),
        "{out}"
    );
    assert_same_image(&copy, &disk);
}

/// A read-only copy is never written, so one that differs from the primary's disk cannot be
/// resynced: both sides refuse the guest with one error naming the differing blocks, exit 1,
/// and no guest starts.
#[test]
fn a_read_only_copy_that_differs_is_refused_on_both_sides() {
    let _one = one_at_a_time();
    let dir = Scratch::new("resync-ro");
    let data = pattern(16);
    let mut copy_data = data.clone();
    copy_data[3 * BLOCK] ^= 1;
    let (disk, copy) = (dir.path_str("disk.img"), dir.path_str("copy.img"));
    std::fs::write(&disk, &data).expect("write disk");
    std::fs::write(&copy, &copy_data).expect("write copy");
    let addr = free_addr();
    let standby = Command::new(FTVM)
        .args([
            "standby",
            "--listen",
            &addr,
            "--disk",
            &format!("{copy},ro"),
        ])
        .args(common::key_args(&[]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the standby");
    let primary = Command::new(FTVM)
        .args(["run", "--peer", &addr, "--disk", &format!("{disk},ro")])
        .args(common::key_args(&[]))
        .args(["--cmdline", "workload=counter ticks=5"])
        .stdin(Stdio::null())
        .output()
        .expect("run the primary");
    let standby = standby.wait_with_output().expect("wait for the standby");
    for (who, o) in [("primary", &primary), ("standby", &standby)] {
        let err = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{who}: {err}");
        assert!(
            err.contains("read-only copies differ") && err.contains("disk 0: 1 block(s)"),
            "{who}: {err}"
        );
        assert!(o.stdout.is_empty(), "{who} printed guest output");
    }
    assert_eq!(copy_data, std::fs::read(&copy).expect("read copy"));
}

/// Disk reads are logged as (disk, sector, length, hash) (DESIGN.md §2): a standby whose copy
/// changes under it while the pair is protected (here between the two passes of the test
/// guest's `diskread`, 3 bytes of its sixth block) is caught at the read that returns other
/// data, asks for a repair naming the disk and the sector, and the repair brings the
/// primary's block over: both exit 0 and the copy ends equal to the primary's disk.
#[test]
fn a_copy_that_changes_while_protected_is_caught_at_the_read_and_repaired() {
    use std::io::Write;
    let _one = one_at_a_time();
    let dir = Scratch::new("resync-read");
    let data = pattern(8);
    let (disk, copy) = (dir.path_str("disk.img"), dir.path_str("copy.img"));
    std::fs::write(&disk, &data).expect("write disk");
    std::fs::write(&copy, &data).expect("write copy");
    let addr = free_addr();
    let standby = Command::new(FTVM)
        .args(["standby", "--listen", &addr, "--disk", &copy])
        .args(common::key_args(&[]))
        .env("FTVM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the standby");
    let mut primary = Command::new(FTVM)
        .args(["run", "--peer", &addr, "--disk", &disk])
        .args(common::key_args(&[]))
        .args(["--cmdline", "workload=diskread n=2 wait=1"])
        .env("FTVM_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the primary");
    let mut out = BufReader::new(primary.stdout.take().expect("stdout"));
    let mut seen = String::new();
    // Released output: the standby has verified the whole first pass when this line shows.
    while !seen.ends_with("diskread wait\n") {
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("read the primary's output");
        assert!(n > 0, "the primary ended before its wait:\n{seen}");
        seen.push_str(&line);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .expect("open the copy");
    std::os::unix::fs::FileExt::write_all_at(&f, &[1, 2, 3], 5 * BLOCK as u64 + 1000)
        .expect("change the copy");
    drop(f);
    let mut stdin = primary.stdin.take().expect("stdin");
    stdin.write_all(b"\n").expect("wake the guest");
    out.read_to_string(&mut seen).expect("read the rest");
    let primary = primary.wait_with_output().expect("wait for the primary");
    drop(stdin);
    let standby = standby.wait_with_output().expect("wait for the standby");
    let (perr, serr) = (stderr(&primary), stderr(&standby));
    assert_eq!(primary.status.code(), Some(0), "primary: {perr}");
    assert_eq!(standby.status.code(), Some(0), "standby: {serr}");
    let repair = serr
        .lines()
        .find(|l| l.contains("asking for a repair"))
        .unwrap_or_else(|| panic!("no repair asked for:\n{serr}"));
    assert!(
        repair.contains("disk 0 read of 65536 bytes at sector 640 returned other data"),
        "{repair}"
    );
    assert!(perr.contains("protected_to_end=true"), "{perr}");
    // The guest read the primary's disk both times.
    let sums: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("pass ")?.split_once(' ').map(|x| x.1))
        .collect();
    assert_eq!(sums.len(), 2, "{seen}");
    assert_eq!(sums[0], sums[1], "{seen}");
    assert!(seen.ends_with("diskread done\n"), "{seen}");
    assert_same_image(&copy, &disk);
}
