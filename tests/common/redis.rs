//! The Redis workload's checks (issue 17), shared by the one-host suite (tests/linux_redis.rs,
//! scripts/lib/redis-scenario.sh) and the two-host drills (tests/two_hosts.rs,
//! scripts/lib/redis-hosts.sh), whose scripts print the same `key=value` lines.

use std::process::Command;
use std::time::{Duration, Instant};

use super::two_hosts::Loss;
use super::{linux_guest, linux_guest_redis_images, repo, try_keygen, Failure, Scratch, FTVM};

/// The value of the first `key=value` word on any line of `out`.
pub fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| super::field(l, key))
}

/// The number in the first `key=value` word of `out`.
pub fn number(out: &str, key: &str) -> Result<u64, Failure> {
    field(out, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no number {key}= in the output"))
}

/// What the disk must hold after `n` writes: `key:I VALUE` for I in 1..=n, sorted as the
/// scripts list them (bytewise), the values those of scripts/lib/redis-net.sh's
/// `redis_value`.
pub fn expected_disk_keys(n: u32) -> Vec<String> {
    let mut keys: Vec<String> = (1..=u64::from(n))
        .map(|i| format!("key:{i} value-{i}-{:08x}", (i * 2_654_435_761) % (1 << 32)))
        .collect();
    keys.sort();
    keys
}

/// The checks every finished run passes: all `n` writes acknowledged and read back with
/// their values, the guest ended by SHUTDOWN with status 0 (`guest_end`: the status of the
/// VMM it ended in), and the disk it leaves (or the standby's copy) passes `e2fsck -n` and
/// holds exactly the `n` keys with their values in its AOF. Err names the first that fails.
pub fn check_workload_whole(out: &str, n: u32, guest_end: &str) -> Result<(), Failure> {
    let check = |what: &str, ok: bool| if ok { Ok(()) } else { Err(what.to_string()) };
    check("a write failed", !out.contains("writes-failed"))?;
    check(
        "not every write acknowledged",
        number(out, "acked")? == u64::from(n),
    )?;
    check(
        "the read-back missed or changed a key",
        out.contains(&format!("read-back acked={n} missing=0 wrong=0")),
    )?;
    check(
        &format!("{guest_end} is not 0"),
        field(out, guest_end) == Some("0"),
    )?;
    check(
        "the disk fails e2fsck -n",
        field(out, "disk-fsck-clean") == Some("yes"),
    )?;
    check(
        "an acknowledged key is not in the disk's AOF",
        field(out, "disk-has-acked") == Some("yes"),
    )?;
    let on_disk: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("disk-key "))
        .map(str::to_string)
        .collect();
    check(
        "the disk's AOF holds other keys than those written",
        on_disk == expected_disk_keys(n),
    )
}

/// The pair's heartbeat timeout in the two-host Redis drills (scripts/lib/redis-hosts.sh's
/// REDIS_HEARTBEAT_TIMEOUT_MS): a
/// protected Linux guest keeps a TCG host's one CPU busy, so a pair process can be kept off
/// it for a good part of a second.
pub const HOSTS_HEARTBEAT_TIMEOUT_MS: u64 = 3000;

/// What a two-host Redis drill showed.
pub struct HostsOutcome {
    /// From the last acknowledged write before the loss to the first after it, as the
    /// client saw it.
    pub failover_ms: u64,
    /// The median gap between acknowledgements before the loss (a write's round trip).
    pub median_ack_ms: u64,
    /// No error answer after the loss: the client's TCP connection survived.
    pub connection_survived: bool,
    /// From the hosts' start until Redis answered.
    pub ready_s: u64,
    /// From the hosts' start until the standby followed the guest in lockstep (with the
    /// default `join`, once it had joined the running guest; with `boot`, as Redis answered).
    pub protected_s: u64,
    /// The whole drill, the hosts' boot included.
    pub took: Duration,
}

/// One Redis drill on the two-host harness (scripts/lib/redis-hosts.sh): the protected
/// guest's primary on host A, its standby, the witness and the client on host B; the loss
/// after `kill_after` of `writes` acknowledged writes. Checks that the loss happened, the
/// standby went live, and the workload is whole on the standby's copy. The standby joins
/// the running guest before the writes (the script's default, `REDIS_HOSTS_PROTECT=join`);
/// `REDIS_HOSTS_PROTECT=boot` in the environment protects it from its first instruction.
pub fn hosts_drill(loss: Loss, writes: u32, kill_after: u32) -> Result<HostsOutcome, Failure> {
    let (kernel, initrd) = linux_guest_redis_images();
    let dir = Scratch::try_new(&format!("redis-hosts-{kill_after}"))?;
    let disk = dir.path_str("disk.img");
    linux_guest(&["disk", &disk]);
    let key = try_keygen(&dir)?;
    let kind = match loss {
        Loss::Process => "process",
        Loss::Host => "host",
    };
    let started = Instant::now();
    let o = Command::new(repo().join("scripts/lib/redis-hosts.sh"))
        .args([kind, FTVM, &kernel, &initrd, &disk, &key])
        .arg(writes.to_string())
        .arg(kill_after.to_string())
        .env(
            "REDIS_HEARTBEAT_TIMEOUT_MS",
            HOSTS_HEARTBEAT_TIMEOUT_MS.to_string(),
        )
        // A bound on the whole drill, so a stuck one fails within CI's time.
        .env("REDIS_HOSTS_TIMEOUT", "1800")
        .current_dir(repo())
        .output()
        .map_err(|e| format!("run scripts/lib/redis-hosts.sh: {e}"))?;
    let took = started.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let log = format!("{out}--- harness ---\n{err}");
    let fail = |what: &str| format!("Redis {} drill: {what}:\n{log}", loss.name());
    if o.status.code() != Some(0) {
        return Err(fail(&format!(
            "scripts/lib/redis-hosts.sh exited with {:?} after {took:.0?}",
            o.status.code()
        )));
    }
    let b: String = out
        .lines()
        .filter_map(|l| l.strip_prefix("B: "))
        .map(|l| format!("{l}\n"))
        .collect();
    match loss {
        Loss::Process => {
            if !out.lines().any(|l| l == "A: primary killed") {
                return Err(fail("host A never killed the primary"));
            }
        }
        Loss::Host => {
            if !err.contains("host A lost") {
                return Err(fail("the harness never killed host A"));
            }
        }
    }
    if !b.lines().any(|l| l == "standby: went live") {
        return Err(fail("the standby never went live"));
    }
    check_workload_whole(&b, writes, "standby-status").map_err(|e| fail(&e))?;
    let num = |k: &str| number(&b, k).map_err(|e| fail(&e));
    Ok(HostsOutcome {
        failover_ms: num("failover-ms")?,
        median_ack_ms: num("median-ack-ms")?,
        connection_survived: field(&b, "connection-survived") == Some("yes"),
        ready_s: num("ready-after-s")?,
        protected_s: num("protected-after-s")?,
        took,
    })
}
