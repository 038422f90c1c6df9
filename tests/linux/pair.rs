//! The protected pair's drills on the Linux test guest (issues 13 and 18): the script that
//! runs a pair in the harness, how the standby meets the guest, when the primary is killed,
//! and the checks every failover drill passes.

use super::{checksum_lines, fresh_disk, guest_lines, nested_sh_in, FTVM};
use crate::common::linux_guest_images;

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
/// SIGKILLed as `kill` says. It prints
/// `primary-status=`, `standby-status=`, `took-s=`, the primary's `protected run complete`
/// line, both stdouts in hex (`hex-primary=`, `hex-standby=`), whether the two images are
/// identical, and `copy-checksum NAME SHA256` for the files in the standby's copy
/// (debugfs), then the standby's stderr.
pub(super) fn protected_script(
    dir: &str,
    disk: &str,
    copy: &str,
    kill: Kill,
    mode: TscMode,
    start: Start,
) -> String {
    let (kernel, initrd) = linux_guest_images();
    let tsc = match mode {
        TscMode::Repair => "repair",
        TscMode::Exits => "exits",
    };
    // Protected from the boot, the kernel boots `quiet`, as a server's does: each line of
    // its boot log on the serial console ends an epoch, and under the harness that made the
    // protected run 426 s with 221 repairs against 271 s with 150 quiet (one run each).
    let (meet, rendezvous) = match start {
        Start::Boot => (
            "--peer 127.0.0.1:7000 --connect-timeout-ms 30000 --append quiet".to_string(),
            "--listen",
        ),
        Start::Join { pause_s } => (
            format!("--accept-standby 127.0.0.1:7000 --append ftvm.pause={pause_s}"),
            "--join",
        ),
    };
    let primary = format!(
        "FTVM_LOG=ftvm=info {FTVM} run {meet} --kernel {kernel} --initrd {initrd} \
           --disk {disk} --mem-mib 256 --latency-bound-ms 50 {PAIR_OPTIONS} \
           --key {dir}/pair.key --tsc {tsc} >{dir}/p.out 2>{dir}/p.err"
    );
    let standby = format!(
        "FTVM_LOG=ftvm_secondary::standby=info,ftvm_secondary::tsc=info,\
           ftvm_secondary::resync=info {FTVM} standby \
           {rendezvous} 127.0.0.1:7000 --disk {copy} {PAIR_OPTIONS} --key {dir}/pair.key \
           >{dir}/s.out 2>{dir}/s.err &\nsp=$!"
    );
    // A joining standby starts in the guest's pause after its mount, once the primary
    // printed it, and the drill goes on once it follows in lockstep.
    let (standby_first, join) = match start {
        Start::Boot => (standby, String::new()),
        Start::Join { pause_s } => (
            String::new(),
            format!(
                "until grep -q 'pausing {pause_s} s' $D/p.out; do kill -0 $pp 2>/dev/null || break; sleep 0.2; done\n\
                 {standby}\n\
                 until grep -q 'synced: following' $D/s.err; do kill -0 $sp 2>/dev/null || break; sleep 0.2; done\n\
                 echo \"joined-at-ms=$(( $(date +%s%3N) - t0 ))\""
            ),
        ),
    };
    // The primary runs in the background (`$pp`) while the script watches its output: when
    // the guest's init line appears (`init-at-ms=`), when the primary ends, and the kill.
    let kill = match kill {
        Kill::No => String::new(),
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
         {join}\n\
         {kill}\n\
         wait $pp"
    );
    format!(
        "busybox ip link set lo up || exit 98\n\
         cp {disk} {copy} || exit 98\n\
         {FTVM} keygen --out {dir}/pair.key >/dev/null || exit 98\n\
         start=$(date +%s)\n\
         {standby_first}\n\
         {run_primary}\n\
         echo \"primary-status=$?\"\n\
         echo \"primary-ended-at-ms=$(( $(date +%s%3N) - t0 ))\"\n\
         wait $sp; echo \"standby-status=$?\"\n\
         echo \"standby-ended-at-ms=$(( $(date +%s%3N) - t0 ))\"\n\
         echo \"took-s=$(( $(date +%s) - start ))\"\n\
         grep 'protected run complete' {dir}/p.err\n\
         grep -h 'TSC reads are exits' {dir}/p.err {dir}/s.err\n\
         grep -h 'disk resync done' {dir}/s.err\n\
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

/// `key=value` of the harness's output, as bytes decoded from hex.
pub(super) fn hex_field(out: &str, key: &str) -> Vec<u8> {
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the output:\n{out}"));
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// The `copy-checksum` lines, as the guest's `checksum` lines.
pub(super) fn copy_checksums(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("copy-checksum "))
        .map(|l| format!("checksum {}", l.trim_end_matches(" -").trim_end()))
        .collect()
}

/// The number right after the first `key` in `out`.
pub(super) fn number(out: &str, key: &str) -> Option<u64> {
    let at = out.find(key)? + key.len();
    let digits: String = out[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// When a drill SIGKILLs the primary.
#[derive(Clone, Copy, Debug)]
pub(super) enum Kill {
    /// Never: the protected run ends by itself.
    No,
    /// `ms` after the guest's init line appeared in the primary's released output.
    AfterInit { ms: u64 },
    /// `ms` after the guest said it begins writing the files (released output).
    AfterWritesBegin { ms: u64 },
}

/// How the pair keeps the guest's TSC reads in step (issue 18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TscMode {
    /// The stock harness: the TSC is read without exits, repairs heal what it makes differ.
    Repair,
    /// The harness with the ftvm-rdtsc-exits module, the primary at `--tsc exits`: every
    /// TSC read is logged and replayed (exact mode).
    Exits,
}

/// How the standby meets the guest.
#[derive(Clone, Copy, Debug)]
pub(super) enum Start {
    /// At its first instruction: the standby listens, the primary connects (`--peer`).
    Boot,
    /// The primary boots the guest alone (`--accept-standby`); the guest pauses `pause_s`
    /// seconds after its mount (`ftvm.pause`), and the standby joins (`--join`) in that
    /// pause, so the writes are protected.
    Join { pause_s: u32 },
}

/// How a failover drill ended.
pub(super) enum Drill {
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
        /// The standby's reasons for the first diverged repairs (at most three).
        first_divergences: Vec<String>,
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
pub(super) fn failover_drill(name: &str, kill: Kill) -> Drill {
    failover_drill_in(TscMode::Repair, Start::Boot, name, kill)
}

/// [`failover_drill`] with the pair's TSC in `mode`, the standby meeting the guest as
/// `start` says.
pub(super) fn failover_drill_in(mode: TscMode, start: Start, name: &str, kill: Kill) -> Drill {
    let (dir, disk, expected) = fresh_disk(name);
    let copy = dir.path_str("copy.img");
    let d = dir.path_str("");
    let script = format!(
        "D={d}\n{}",
        protected_script(&d, &disk, &copy, kill, mode, start)
    );
    let (status, out) = nested_sh_in(mode, &script, 1200);
    if mode == TscMode::Exits {
        // Exact mode on both sides, or the drill proves nothing about it.
        assert!(out.contains("TSC reads are exits"), "{out}");
        assert!(out.contains("replayed exactly from the log"), "{out}");
    }
    assert_eq!(status, Some(0), "{kill:?}: {out}");
    if let Start::Join { .. } = start {
        // The standby's copy was made before the guest's mount wrote its disk: the join
        // resynced the blocks that differ.
        assert!(out.contains("disk resync done"), "{out}");
        assert!(out.contains("joined-at-ms="), "{out}");
    }
    if out.contains("primary-status=0") && !out.contains("killed-primary") {
        assert!(out.contains("standby-status=0"), "{out}");
        // A drill that joins kills once the standby follows and the writes began: never late.
        assert!(
            matches!(start, Start::Boot),
            "{kill:?}: the primary ended before the kill:\n{out}"
        );
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
    if let Kill::AfterWritesBegin { .. } = kill {
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
    let merged = crate::common::merge_failover_output(&primary, &standby, from)
        .unwrap_or_else(|e| panic!("{kill:?}: {e}"));
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
        first_divergences: out
            .lines()
            .filter(|l| {
                l.contains("asking for a repair") && l.contains("checkpoint_required=false")
            })
            .filter_map(|l| l.split("asking for a repair: ").nth(1))
            .map(str::to_string)
            .collect(),
    }
}

/// The window after the guest's init line in which a random drill kills the primary
/// (`FTVM_LINUX_DRILL_WINDOW_MS`): a protected `files` run in the harness took 25–35 s from
/// the init line to its end on the development machine; a draw past the end is drawn again
/// within the time that run took (and the later drills use that window).
pub(super) const DRILL_WINDOW_MS: u64 = 30_000;
