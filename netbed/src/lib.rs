//! A test bed for shoal's tests and benchmarks: N hosts as Linux network namespaces on one
//! bridge, each with its own IPv4 address, and per-host egress delay, random loss and rate
//! limit.
//!
//! # Layout
//! - A hub namespace holds a bridge `br0`; host `i` is a namespace with `lo` and `eth0`
//!   (address `10.99.0.{i+1}/24`), a veth pair whose other end is on the bridge. Nothing is
//!   routed beyond the bed: the hosts see each other and their own loopback only. The
//!   addresses are the same in every bed; beds never meet, since each has its own namespaces.
//! - Names are `sbed{pid}-{n}-hub` and `sbed{pid}-{n}-h{i}`: unique per process and bed, so
//!   tests running at once never collide. A bed whose process died without cleaning up (a
//!   SIGKILL) is deleted by the next bed made on the machine.
//! - Dropping a [`Bed`] stops its delay programs and deletes its namespaces (iptables rules
//!   and qdiscs go with them), also when a test panics.
//!
//! # Link emulation (egress of each host, [`Link`])
//! This kernel has no `tc netem`, so:
//! - delay and loss: `iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 0` in the host hands
//!   every outgoing packet to `shoal-netbed-delay` (this crate's binary) running in the
//!   host, which holds it for the delay in FIFO order, or drops it with the loss probability;
//! - rate: a `tbf` qdisc on `eth0`.
//!
//! A ping between two hosts with delay D each therefore takes about 2·D.
//!
//! # Requirements
//! Root, `ip` (iproute2), `tc`, `iptables` (`SHOAL_NETBED_IPTABLES` names another, e.g.
//! `iptables-legacy`), `ping` (iputils-ping) for [`Bed::ping`], and the `shoal-netbed-delay`
//! binary built next to the test or bench executable (`cargo build -p shoal-netbed`, which
//! `cargo nextest run --workspace` does) or named by `SHOAL_NETBED_DELAY`. [`require`] says
//! what is missing.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Queue number of the delay rule in each host (queues are per namespace).
const QUEUE: &str = "0";

/// Beds made by this process (for unique names).
static BEDS: AtomicUsize = AtomicUsize::new(0);

/// Why the bed cannot be built, or a step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr, or why it could not start.
        detail: String,
    },
    /// The delay program did not start.
    #[error("the delay program in {host} did not start: {detail}")]
    Delay {
        /// The host's namespace.
        host: String,
        /// What went wrong.
        detail: String,
    },
    /// Output that could not be read.
    #[error("{0}")]
    Parse(String),
}

/// The egress of one host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    /// Delay added to every packet the host sends.
    pub delay: Duration,
    /// Probability that a packet the host sends is dropped (0..=1).
    pub loss: f64,
    /// Rate limit of the host's egress in kbit/s (`None`: the veth's speed).
    pub rate_kbit: Option<u32>,
}

impl Link {
    /// A link with this one-way delay, no loss, no rate limit.
    pub fn delay_ms(ms: f64) -> Self {
        Self { delay: Duration::from_secs_f64(ms / 1e3), ..Self::default() }
    }
}

/// One host of the bed.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace (for `ip netns exec`).
    pub netns: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
    /// Its egress.
    pub link: Link,
}

/// A bed of hosts; dropping it removes everything it made.
#[derive(Debug)]
pub struct Bed {
    hub: String,
    hosts: Vec<Host>,
    /// Namespaces made so far (deleted on drop, also when building fails midway).
    made: Vec<String>,
    /// The delay programs.
    delays: Vec<Child>,
}

/// Round-trip times of [`Bed::ping`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ping {
    /// Replies received.
    pub received: u32,
    /// Echo requests sent.
    pub sent: u32,
    /// Smallest round trip (`None` without replies).
    pub min: Option<Duration>,
    /// Mean round trip.
    pub avg: Option<Duration>,
    /// Largest round trip.
    pub max: Option<Duration>,
}

/// What the bed needs that this machine lacks (`None`: everything is there).
pub fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("root (network namespaces, iptables and NFQUEUE need it)".into());
    }
    for (program, arg, package) in
        [("ip", "-V", "iproute2"), ("tc", "-V", "iproute2"), (&*iptables(), "--version", "iptables")]
    {
        if !Command::new(program).arg(arg).output().is_ok_and(|o| o.status.success()) {
            return Some(format!("`{program}` (Debian package {package})"));
        }
    }
    if let Err(e) = delay_program() {
        return Some(e);
    }
    None
}

/// Whether a test on the bed should run: `true` when the bed can be built. Otherwise it panics
/// with what is missing, unless `SHOAL_NETBED_SKIP=1` explicitly allows skipping, in which case
/// it prints why on stderr and returns `false`.
pub fn require() -> bool {
    let Some(what) = missing() else { return true };
    if std::env::var("SHOAL_NETBED_SKIP").is_ok_and(|v| v == "1") {
        eprintln!(
            "SKIPPED: this test needs the network test bed, which needs {what}; SHOAL_NETBED_SKIP=1 allows skipping"
        );
        return false;
    }
    panic!(
        "this test needs the network test bed, which needs {what} (CI runs as root with them; set SHOAL_NETBED_SKIP=1 to skip it explicitly)"
    );
}

fn iptables() -> String {
    std::env::var("SHOAL_NETBED_IPTABLES").unwrap_or_else(|_| "iptables".into())
}

/// The `shoal-netbed-delay` binary: `SHOAL_NETBED_DELAY`, or next to the running executable
/// (a test in `target/*/deps/` finds it in `target/*/`).
pub fn delay_program() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SHOAL_NETBED_DELAY") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("SHOAL_NETBED_DELAY={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("the current executable's path: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("shoal-netbed-delay");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} (build it with `cargo build -p shoal-netbed`)", p.display()))
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Command { command: command.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Error::Command { command, detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<(), Error> {
    run("ip", args).map(drop)
}

/// Deletes the namespaces of beds whose process is gone (killed before it could clean up).
fn delete_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("sbed").and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Bed {
    /// Builds a bed with one host per link.
    pub fn new(links: &[Link]) -> Result<Self, Error> {
        delete_stale();
        let prefix = format!("sbed{}-{}", std::process::id(), BEDS.fetch_add(1, Ordering::Relaxed));
        let mut bed =
            Self { hub: format!("{prefix}-hub"), hosts: Vec::new(), made: Vec::new(), delays: Vec::new() };
        let hub = bed.hub.clone();
        bed.add_netns(&hub)?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, link) in links.iter().enumerate() {
            let netns = format!("{prefix}-h{i}");
            let addr = Ipv4Addr::new(
                10,
                99,
                0,
                u8::try_from(i + 1).map_err(|_| Error::Parse("at most 250 hosts".into()))?,
            );
            bed.add_netns(&netns)?;
            let port = format!("p{i}");
            ip(&["-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            if let Some(kbit) = link.rate_kbit {
                // A bucket of 10 ms at the rate, at least a few full-size packets.
                let burst = (u64::from(kbit) * 1000 / 8 / 100).max(16 * 1024);
                run(
                    "tc",
                    &[
                        "-n",
                        &netns,
                        "qdisc",
                        "add",
                        "dev",
                        "eth0",
                        "root",
                        "tbf",
                        "rate",
                        &format!("{kbit}kbit"),
                        "burst",
                        &burst.to_string(),
                        "latency",
                        "100ms",
                    ],
                )?;
            }
            if !link.delay.is_zero() || link.loss > 0.0 {
                bed.start_delay(&netns, link, i as u64)?;
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &netns,
                        &iptables(),
                        "-w",
                        "-A",
                        "OUTPUT",
                        "-o",
                        "eth0",
                        "-j",
                        "NFQUEUE",
                        "--queue-num",
                        QUEUE,
                    ],
                )?;
            }
            bed.hosts.push(Host { netns, addr, link: *link });
        }
        Ok(bed)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), Error> {
        ip(&["netns", "add", name])?;
        self.made.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// Starts the delay program in `netns` and waits until its queue is bound.
    fn start_delay(&mut self, netns: &str, link: &Link, seed: u64) -> Result<(), Error> {
        let program = delay_program().map_err(|detail| Error::Delay { host: netns.into(), detail })?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(program)
            .args(["--queue", QUEUE, "--delay-ms", &(link.delay.as_secs_f64() * 1e3).to_string()])
            .args(["--loss", &link.loss.to_string(), "--seed", &seed.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the delay program dies with this process, so
        // a killed test leaves no program holding packets.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child =
            cmd.spawn().map_err(|e| Error::Delay { host: netns.into(), detail: e.to_string() })?;
        let stdout = child.stdout.take();
        self.delays.push(child);
        let mut line = String::new();
        if let Some(out) = stdout {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "ready" {
            return Err(Error::Delay {
                host: netns.into(),
                detail: "it exited before binding its queue (see its stderr)".into(),
            });
        }
        Ok(())
    }

    /// The hosts, in the order of the links given.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// `program` to be run in host `i` (`ip netns exec NETNS program`).
    pub fn command(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].netns]).arg(program);
        c
    }

    /// Runs `f` on a new thread inside host `i`'s network namespace (sockets it opens are the
    /// host's; a thread's namespace is its own) and returns its result.
    pub fn run_in<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let path = format!("/run/netns/{}", self.hosts[i].netns);
        let ns = std::fs::File::open(&path).map_err(|e| Error::Parse(format!("{path}: {e}")))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid namespace descriptor; affects only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::Parse(format!("setns {path}: {}", std::io::Error::last_os_error())));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `count` pings from host `from` to host `to`, 0.2 s apart.
    pub fn ping(&self, from: usize, to: usize, count: u32) -> Result<Ping, Error> {
        let to = self.hosts[to].addr.to_string();
        let ns = &self.hosts[from].netns;
        let c = count.to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "2", &to])
            .output()
            .map_err(|e| Error::Command { command: format!("ping {to}"), detail: e.to_string() })?;
        parse_ping(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Reads ping's summary: `N packets transmitted, M received, …` and
/// `rtt min/avg/max/mdev = a/b/c/d ms` (absent without replies).
fn parse_ping(out: &str) -> Result<Ping, Error> {
    let bad = || Error::Parse(format!("unexpected ping output: {out}"));
    let counts = out.lines().find(|l| l.contains("packets transmitted")).ok_or_else(bad)?;
    let mut nums =
        counts.split(',').map(|part| part.split_whitespace().next().and_then(|n| n.parse::<u32>().ok()));
    let (Some(Some(sent)), Some(Some(received))) = (nums.next(), nums.next()) else { return Err(bad()) };
    let mut ping = Ping { received, sent, min: None, avg: None, max: None };
    if let Some(rtt) =
        out.lines().find_map(|l| l.split_once(" = ").filter(|(k, _)| k.starts_with("rtt")).map(|(_, v)| v))
    {
        let ms: Vec<f64> = rtt.trim_end_matches(" ms").split('/').filter_map(|v| v.parse().ok()).collect();
        let [min, avg, max, _] = ms[..] else { return Err(bad()) };
        let d = |ms: f64| Some(Duration::from_secs_f64(ms / 1e3));
        (ping.min, ping.avg, ping.max) = (d(min), d(avg), d(max));
    }
    Ok(ping)
}

impl Drop for Bed {
    fn drop(&mut self) {
        for child in &mut self.delays {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.made.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ping_summaries() {
        let out = "PING 10.99.0.2 (10.99.0.2) 56(84) bytes of data.\n\n--- 10.99.0.2 ping statistics ---\n\
                   5 packets transmitted, 4 received, 20% packet loss, time 801ms\n\
                   rtt min/avg/max/mdev = 20.101/20.502/21.003/0.300 ms\n";
        let p = parse_ping(out).expect("parses");
        assert_eq!((p.sent, p.received), (5, 4));
        assert_eq!(p.avg, Some(Duration::from_secs_f64(0.020502)));
        assert_eq!(p.max, Some(Duration::from_secs_f64(0.021003)));
        let none = "3 packets transmitted, 0 received, 100% packet loss, time 2040ms\n";
        let p = parse_ping(none).expect("parses");
        assert_eq!((p.sent, p.received, p.avg), (3, 0, None));
        assert!(parse_ping("garbage").is_err());
    }
}
