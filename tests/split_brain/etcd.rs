//! A real etcd cluster for the arbiter tests: Debian's `etcd-server` (`etcd`, installed by
//! scripts/setup.sh), its members started as processes with their data in a scratch
//! directory. A test that needs etcd fails, loudly, when it is not installed.

// Each suite compiles this file by itself and uses only part of it.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ftvm_replication::etcd::{self, EtcdConfig};

/// How long a cluster may take to elect a leader and answer.
const START_LIMIT: Duration = Duration::from_secs(60);

/// One member: its client addresses (`host:port`, comma-separated: the first is the one
/// it advertises) and its peer address.
#[derive(Clone)]
pub struct Member {
    pub client: String,
    pub peer: String,
}

fn urls(list: &str) -> String {
    let v: Vec<String> = list.split(',').map(|a| format!("http://{a}")).collect();
    v.join(",")
}

fn first(list: &str) -> &str {
    list.split(',').next().unwrap_or(list)
}

/// A running etcd cluster; its members are killed when it is dropped.
pub struct Cluster {
    pub members: Vec<Member>,
    children: Vec<Option<Child>>,
}

fn etcd_binary() -> &'static str {
    let ok = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "etcd is not installed: these tests need a real etcd (Debian 12: apt-get install etcd-server; scripts/setup.sh installs it)"
    );
    "etcd"
}

impl Cluster {
    /// Starts `members` as one new cluster, in the network namespace `netns` if there is
    /// one, their data and logs under `dir`; returns once a query answers on every member.
    pub fn start(dir: &str, members: &[Member], netns: Option<&str>) -> Self {
        let prefix: Vec<&str> = match netns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => Vec::new(),
        };
        let binary = etcd_binary();
        let initial: Vec<String> = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("m{i}=http://{}", m.peer))
            .collect();
        let initial = initial.join(",");
        let token = format!("ftvm-{}-{}", std::process::id(), dir.len());
        let mut children = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let data = format!("{dir}/etcd-m{i}");
            let log = std::fs::File::create(format!("{dir}/etcd-m{i}.log")).expect("etcd log");
            let (program, pre) = match prefix.split_first() {
                Some((p, rest)) => (*p, rest.to_vec()),
                None => (binary, Vec::new()),
            };
            let mut cmd = Command::new(program);
            cmd.args(&pre);
            if !prefix.is_empty() {
                cmd.arg(binary);
            }
            let child = cmd
                .args(["--name", &format!("m{i}"), "--data-dir", &data])
                .args(["--listen-client-urls", &urls(&m.client)])
                .args(["--advertise-client-urls", &urls(first(&m.client))])
                .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{}", m.peer),
                ])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("etcd log"))
                .stderr(log)
                .spawn()
                .expect("start etcd");
            children.push(Some(child));
        }
        let cluster = Self {
            members: members.to_vec(),
            children,
        };
        for m in members {
            let (client, dir) = (first(&m.client).to_string(), dir.to_string());
            let ready = |c: &Cluster| c.wait_ready(&client, &dir);
            match netns {
                None => ready(&cluster),
                Some(ns) => crate::netns::run_in(ns, || ready(&cluster)),
            }
        }
        cluster
    }

    /// A cluster of `n` members on loopback, on an address of its own.
    ///
    /// Tests run side by side, and a port that was free a moment ago may be taken by the
    /// time etcd binds it. Were it taken by another test's etcd, this cluster's member would
    /// exit and the readiness query would be answered by the other cluster, until that test
    /// killed it. So each cluster listens on its own address in 127.0.0.0/8 (all of it is
    /// loopback on Linux), where no other test listens and no connection takes a port.
    pub fn local(dir: &str, n: usize) -> Self {
        let ip = own_loopback_ip();
        let members: Vec<Member> = (0..n)
            .map(|_| Member {
                client: crate::common::try_free_addr_on(&ip).unwrap_or_else(|e| panic!("{e}")),
                peer: crate::common::try_free_addr_on(&ip).unwrap_or_else(|e| panic!("{e}")),
            })
            .collect();
        Self::start(dir, &members, None)
    }

    fn wait_ready(&self, client: &str, dir: &str) {
        let config = EtcdConfig::parse(client).expect("endpoint");
        let start = Instant::now();
        let logs = || {
            let logs: Vec<String> = (0..self.members.len())
                .map(|i| {
                    std::fs::read_to_string(format!("{dir}/etcd-m{i}.log")).unwrap_or_default()
                })
                .collect();
            logs.join("\n")
        };
        loop {
            // A member that exited (a port it could not bind, say) is not what answers.
            self.assert_running(&logs);
            match etcd::query(&config, "ftvm-test-ready", Duration::from_secs(2)) {
                Ok(_) => {
                    self.assert_running(&logs);
                    return;
                }
                Err(e) => {
                    if start.elapsed() > START_LIMIT {
                        panic!("etcd at {client} never answered ({e}):\n{}", logs());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics, with the members' logs, if a started member has exited.
    fn assert_running(&self, logs: &dyn Fn() -> String) {
        for (i, c) in self.children.iter().enumerate() {
            // try_wait needs &mut; the pid is ours and unreaped, so ask with waitid(WNOHANG
            // | WNOWAIT), which leaves the child for Drop to reap.
            let Some(c) = c else { continue };
            // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on the pid of a child we spawned and have not reaped.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    c.id() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid is valid to read after a successful waitid.
            let exited = rc == 0 && unsafe { info.si_pid() } != 0;
            assert!(!exited, "etcd member {i} exited:\n{}", logs());
        }
    }

    /// `--etcd` for every member.
    pub fn endpoints(&self) -> String {
        let list: Vec<String> = self.members.iter().map(|m| m.client.clone()).collect();
        list.join(",")
    }

    /// Sends `sig` to member `i`.
    pub fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(c) = &self.children[i] {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            let rc = unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            assert_eq!(rc, 0, "kill etcd member {i}");
        }
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            // A stopped member must run to die.
            self.signal(i, libc::SIGCONT);
            self.kill(i);
        }
    }
}

/// A loopback address no other cluster of this test run uses: 127.P.C.1, from the process
/// and a counter.
fn own_loopback_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!(
        "127.{}.{}.{}",
        1 + pid % 250,
        n % 256,
        1 + (pid / 250) % 250
    )
}
