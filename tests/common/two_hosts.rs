//! Failover drills on the two-host harness (`scripts/two-hosts.sh`, issue 17), shared by
//! tests/two_hosts.rs and benches/two_hosts.rs.
//!
//! Each drill boots the two hosts. Host A runs the primary (`ftvm run --peer`, the built-in
//! guest's `workload=netecho`, its card on A's TAP `ftvm0`), host B the standby (its own
//! `ftvm0`), across the link between them (192.168.100.1 → .2). The pair's witness and the
//! client run in host B's `client` namespace, a third party on the network: without an
//! arbiter a standby never goes live on silence alone (DESIGN.md §5), and host loss is
//! nothing but silence. The client is the calling test or bench binary itself, run again
//! there with [`CLIENT_ARG`] ([`client_main`]): it sends frame i to the guest's MAC, resends
//! it until the guest answers it, then frame i + 1. Before frame `kill_at` it asks for the
//! loss (a request file in the harness's shared directory) and waits until it is done:
//!
//! - [`Loss::Process`]: host A's command sees `kill-primary` and sends SIGKILL to the
//!   primary's ftvm process; host A's kernel closes its connections.
//! - [`Loss::Host`]: the harness sees `kill-host-a` and SIGKILLs host A's QEMU: the whole
//!   host is gone, and host B hears nothing more from it.
//!
//! In both, every frame must be answered, in order, by whichever side is live; answers to
//! earlier frames (resends, or answers the standby re-emits after go-live) may come again
//! and are skipped; anything else is an error. The standby must announce the guest's
//! address with a gratuitous ARP, which the client must see. The client prints the failover
//! it saw: from the last answer before the request to the first answer after the loss.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::net::{ipv4_frame, PacketSocket, GUEST_IP};
use super::{field, repo, try_keygen, Failure, Scratch, FTVM};

/// The first argument that makes a test or bench binary the drill's client.
pub const CLIENT_ARG: &str = "two-hosts-client";

/// Heartbeat timeout of the pair in the drills. Both hosts are TCG VMs sharing two cores:
/// a pair process can be kept off its emulated CPU for a good part of a second, and a
/// shorter timeout would take that for the peer's death.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 2000;

/// How long the client first waits for an answer before it resends a frame.
pub const RESEND: Duration = Duration::from_millis(20);
/// The longest it waits before a resend while the guest is protected.
pub const RESEND_MAX: Duration = Duration::from_millis(160);

/// What the drill takes away.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Loss {
    /// `kill -9` of the primary's ftvm process on host A.
    Process,
    /// Host A's whole VM: its QEMU process SIGKILLed.
    Host,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::Process => "process kill",
            Loss::Host => "host loss",
        }
    }

    /// The request file (in the shared directory) and the file that says it was done.
    fn files(self) -> (&'static str, &'static str) {
        match self {
            Loss::Process => ("kill-primary", "primary-killed"),
            Loss::Host => ("kill-host-a", "host-a-lost"),
        }
    }
}

/// What one drill showed.
pub struct Outcome {
    /// From the last answer before the loss was asked for to the first answer after it.
    pub failover: Duration,
    /// From the moment the client learnt the loss was done to that first answer.
    pub after_loss: Duration,
    /// Frames the client sent, resends included.
    pub sent: u64,
    /// Gratuitous ARPs for the guest's address the client saw (the standby's announcement).
    pub garps: u64,
    /// The drill's whole run, the two hosts' boot included.
    pub took: Duration,
    /// Both hosts' output and the harness's messages.
    pub log: String,
}

/// Shell text that starts a background loop keeping the host's network state (links with
/// their counters, the bridge's learnt addresses, the load) in `net-HOST.txt` of the shared
/// directory, for a drill that fails.
fn monitor() -> &'static str {
    "( while :; do { date +%T; cat /proc/loadavg; ip -s link; bridge fdb show br br0 | grep -v permanent; } \
     >\"$TWO_HOSTS_DIR/net-$TWO_HOSTS_HOST.tmp\" 2>&1; \
     mv \"$TWO_HOSTS_DIR/net-$TWO_HOSTS_HOST.tmp\" \"$TWO_HOSTS_DIR/net-$TWO_HOSTS_HOST.txt\"; sleep 5; done ) &\n"
}

/// The shell text for host A: the primary, and for a process kill the wait for the request.
fn host_a_script(loss: Loss, key: &str) -> String {
    let (request, done) = loss.files();
    let run = format!(
        "{FTVM} run --peer 192.168.100.2:7070 --connect-timeout-ms 600000 --net tap=ftvm0 \
         --cmdline 'workload=netecho n=1000000' --key {key} --witness 192.168.100.10:7500 \
         --heartbeat-timeout-ms {HEARTBEAT_TIMEOUT_MS} --max-lag-ms 86400000 \
         --max-slowed-ms 86400000"
    );
    let d = "\"$TWO_HOSTS_DIR\"";
    let mut s = monitor().to_string();
    s.push_str(&format!(
        "{run} >{d}/primary.out 2>{d}/primary.err &\n\
         p=$!\n\
         echo \"primary started\"\n"
    ));
    match loss {
        Loss::Process => s.push_str(&format!(
            "while [ ! -e {d}/{request} ]; do\n\
             \x20 kill -0 $p 2>/dev/null || {{ echo \"primary ended before the kill\"; cat {d}/primary.err; exit 3; }}\n\
             \x20 sleep 0.01\n\
             done\n\
             kill -9 $p\n\
             : >{d}/{done}\n\
             echo \"primary killed\"\n\
             wait $p\n\
             exit 0\n"
        )),
        Loss::Host => s.push_str(
            "wait $p\n\
             echo \"primary ended (status $?) before its host was lost\"\n\
             exit 3\n",
        ),
    }
    s
}

/// The shell text for host B: the witness and the client in the `client` namespace, the
/// standby; then what became of the standby.
fn host_b_script(loss: Loss, key: &str, client: &str, frames: usize, kill_at: usize) -> String {
    let (request, done) = loss.files();
    let d = "\"$TWO_HOSTS_DIR\"";
    let mut s = monitor().to_string();
    s.push_str(&format!(
        "ip netns exec client {FTVM} witness --listen 192.168.100.10:7500 --state /tmp/witness.terms \
         >{d}/witness.out 2>&1 &\n\
         w=$!\n\
         {FTVM} standby --listen 192.168.100.2:7070 --net tap=ftvm0 --key {key} \
         --witness 192.168.100.10:7500 --heartbeat-timeout-ms {HEARTBEAT_TIMEOUT_MS} \
         --max-lag-ms 86400000 --max-slowed-ms 86400000 >{d}/standby.out 2>{d}/standby.err &\n\
         s=$!\n\
         ip netns exec client {client} {CLIENT_ARG} {frames} {kill_at} {d}/{request} {d}/{done}\n\
         rc=$?\n\
         grep -q 'going live' {d}/standby.err && echo 'standby: went live'\n\
         kill -0 $s 2>/dev/null && echo 'standby: still running'\n\
         grep -E 'going live|primary lost|claiming term|won term|silent' {d}/standby.err | sed 's/^/standby log: /'\n\
         [ $rc -eq 0 ] || {{ echo '--- standby stderr'; tail -20 {d}/standby.err; echo '--- primary stderr'; tail -20 {d}/primary.err; cat {d}/net-a.txt {d}/net-b.txt; }}\n\
         kill -9 $s $w 2>/dev/null\n\
         wait $s $w 2>/dev/null\n\
         exit $rc\n"
    ));
    s
}

/// One drill: boots the two hosts (scripts/two-hosts.sh), loses the primary as `loss` says
/// after `kill_at` of `frames` answers, and checks what the client and the standby saw.
/// `client` is the binary to run as the client (the caller's own).
pub fn drill(loss: Loss, client: &Path, frames: usize, kill_at: usize) -> Result<Outcome, Failure> {
    let scratch = Scratch::try_new(&format!("two-hosts-{}", kill_at))?;
    let key = try_keygen(&scratch)?;
    let client = client.to_string_lossy();
    let started = Instant::now();
    let o = Command::new(repo().join("scripts/two-hosts.sh"))
        .args(["--timeout", "900", "--a"])
        .arg(host_a_script(loss, &key))
        .arg("--b")
        .arg(host_b_script(loss, &key, &client, frames, kill_at))
        .current_dir(repo())
        .output()
        .map_err(|e| format!("run scripts/two-hosts.sh: {e}"))?;
    let took = started.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let log = format!("{out}--- harness ---\n{err}");
    if o.status.code() != Some(0) {
        return Err(format!(
            "{} drill: scripts/two-hosts.sh exited with {:?} after {took:.0?}:\n{log}",
            loss.name(),
            o.status.code()
        ));
    }
    let check = |what: &str, ok: bool| -> Result<(), Failure> {
        if ok {
            Ok(())
        } else {
            Err(format!("{} drill: {what}:\n{log}", loss.name()))
        }
    };
    let lines: Vec<&str> = out.lines().collect();
    let has = |l: &str| lines.contains(&l);
    match loss {
        Loss::Process => check("host A never killed the primary", has("A: primary killed"))?,
        Loss::Host => check(
            "the harness never killed host A",
            err.contains("host A lost"),
        )?,
    }
    check("the standby never went live", has("B: standby: went live"))?;
    check("the live standby ended", has("B: standby: still running"))?;
    let result = lines
        .iter()
        .find(|l| l.starts_with("B: client: every frame answered"))
        .ok_or_else(|| format!("{} drill: no result from the client:\n{log}", loss.name()))?;
    let num = |k: &str| -> Result<f64, Failure> {
        field(result, k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {k}= in {result:?}"))
    };
    let garps = num("garps")? as u64;
    check(
        "the client saw no gratuitous ARP for the guest's address",
        garps > 0,
    )?;
    Ok(Outcome {
        failover: Duration::from_secs_f64(num("failover_ms")? / 1000.0),
        after_loss: Duration::from_secs_f64(num("after_loss_ms")? / 1000.0),
        sent: num("sent")? as u64,
        garps,
        took,
        log,
    })
}

/// Whether `got` is the guest's answer to `sent` (an [`ipv4_frame`]): back to the sender,
/// from the guest's address, the same payload.
fn answers(got: &[u8], sent: &[u8]) -> bool {
    got.len() >= 34 && got[34..] == sent[34..] && got[..6] == sent[6..12] && got[26..30] == GUEST_IP
}

/// The drills' binaries (tests/two_hosts.rs, benches/two_hosts.rs) are run again inside
/// host B as the client: with [`CLIENT_ARG`] first, this runs [`client_main`] on the rest
/// of the command line and returns the exit code; otherwise None.
pub fn run_as_client_if_asked() -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some(CLIENT_ARG) {
        return None;
    }
    Some(match client_main(&args[1..]) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("client: {e}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// The client, in host B's `client` namespace: `CLIENT_ARG FRAMES KILL_AT REQUEST DONE`.
/// Prints its result line and returns Err on any failure.
///
/// It sends IPv4 frames (the guest's address is what the standby announces at go-live; no
/// bridge here filters IPv4) and resends a frame nobody answered after [`RESEND`], doubling
/// the wait up to [`RESEND_MAX`]: the guest answers every copy, and while it is protected
/// each answer waits for the standby to verify it (under TCG, about a second), so resending
/// at a fixed short interval floods the pair with copies and the wait grows without bound.
/// From the loss until the first answer after it, it resends every [`RESEND`]: nothing
/// holds answers then, and this is the interval the measured failover rounds up to.
pub fn client_main(args: &[String]) -> Result<(), Failure> {
    let [frames, kill_at, request, done] = args else {
        return Err(format!(
            "usage: {CLIENT_ARG} FRAMES KILL_AT REQUEST_FILE DONE_FILE"
        ));
    };
    let frames: usize = frames.parse().map_err(|_| format!("bad FRAMES {frames}"))?;
    let kill_at: usize = kill_at
        .parse()
        .map_err(|_| format!("bad KILL_AT {kill_at}"))?;
    if kill_at == 0 || kill_at >= frames {
        return Err(format!("KILL_AT {kill_at} must lie in 1..{frames}"));
    }
    let sock = PacketSocket::open_for("eth0", 0x0800);
    // The announcement at go-live, kept in this socket's buffer until the end.
    let arp = PacketSocket::open_for("eth0", 0x0806);
    arp.set_timeout(Duration::from_millis(1));
    let mut sent = 0u64;
    let mut last_before = None;
    let mut loss_done = None;
    let mut first_after = None;
    for i in 0..frames {
        if i == kill_at {
            last_before = Some(Instant::now());
            std::fs::write(request, b"").map_err(|e| format!("write {request}: {e}"))?;
            // A failure guard, not a timed assertion.
            let asked = Instant::now();
            while !Path::new(done).exists() {
                if asked.elapsed() > Duration::from_secs(120) {
                    return Err(format!("{done} never appeared"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            loss_done = Some(Instant::now());
            println!("client: {i} frames answered; the loss is done");
        }
        let f = ipv4_frame(i);
        // Resend until the answer comes; the first frame waits for the pair to start (two
        // TCG hosts boot and hand the guest over slowly). A failure guard again.
        let since = Instant::now();
        let mut wait = RESEND;
        let mut sends = 0;
        'answered: loop {
            if since.elapsed() > Duration::from_secs(600) {
                return Err(format!("frame {i} never answered ({sent} sent)"));
            }
            sock.set_timeout(wait);
            sock.send(&f);
            sent += 1;
            sends += 1;
            while let Some(got) = sock.try_recv_from_guest() {
                if answers(&got, &f) {
                    break 'answered;
                }
                if !(0..i).any(|j| answers(&got, &ipv4_frame(j))) {
                    return Err(format!(
                        "while waiting for answer {i}: a frame that answers none sent before: {:02x?}",
                        &got[..got.len().min(64)]
                    ));
                }
            }
            if i != kill_at {
                wait = (wait * 2).min(RESEND_MAX);
            }
        }
        if i == kill_at {
            first_after = Some(Instant::now());
        }
        println!("client: answer {i} after {sends} sends");
    }
    let (Some(before), Some(done_at), Some(after)) = (last_before, loss_done, first_after) else {
        return Err("the loss never happened".into());
    };
    let mut garps = 0;
    while let Some(f) = arp.try_recv_from_guest() {
        if f.len() >= 42 && f[..6] == [0xff; 6] && f[28..32] == GUEST_IP && f[38..42] == GUEST_IP {
            garps += 1;
        }
    }
    println!(
        "client: every frame answered in order: frames={frames} kill_at={kill_at} sent={sent} \
         failover_ms={:.1} after_loss_ms={:.1} garps={garps}",
        (after - before).as_secs_f64() * 1000.0,
        (after - done_at).as_secs_f64() * 1000.0
    );
    Ok(())
}
