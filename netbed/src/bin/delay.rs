//! `shoal-netbed-delay`: holds every packet of one NFQUEUE queue for a fixed delay, then lets
//! it go; drops a random share instead when asked. The test bed ([`shoal_netbed::Bed`]) runs
//! one inside each host's network namespace, behind an iptables rule on the host's egress
//! (`-A OUTPUT -o eth0 -j NFQUEUE --queue-num N`); this kernel has no `tc netem`.
//!
//! ```text
//! shoal-netbed-delay --queue N --delay-ms D [--loss P] [--seed S]
//! ```
//!
//! - Packets leave in the order they came (one delay for all, a FIFO): no reordering beyond
//!   what the delay implies. A packet's clock starts when this program reads it, so a packet
//!   is held at least D.
//! - No busy waiting: one thread sleeps in `ppoll` on the queue's netlink socket, with the
//!   oldest held packet's release time as the timeout.
//! - Real-time scheduling (`SCHED_FIFO`, priority [`RT_PRIORITY`]): the program needs little
//!   CPU but must wake on time. Under the normal scheduler it waits behind the processes it
//!   serves (shoal's compute threads spin while they wait for work): a ping through two
//!   hosts with 5 ms each took 16-20 ms on average, up to 44 ms, on this 2-core machine under
//!   load; as a real-time thread, 10.3 ms with a 0.03 ms deviation under the same load.
//! - Loss: each packet is dropped with probability P (a seeded generator, so a run can be
//!   repeated). A packet dropped here looks sent to the sender, as on a real link; an
//!   iptables `DROP` in OUTPUT would instead fail the sender's `sendmsg` with EPERM.
//! - Only packet metadata is copied to user space (`NFQNL_COPY_META`): the verdict does not
//!   need the payload.
//! - "ready" is printed on stdout once the queue is bound; errors go to stderr with exit
//!   status 1. It stops when killed (the kernel then drops what the queue holds).

use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};

/// Packets the kernel may hold for this queue before it drops new ones.
const QUEUE_MAX_LEN: u32 = 1 << 16;

/// `SCHED_FIFO` priority of the program (1..=99; the kernel's threaded interrupts use 50).
const RT_PRIORITY: libc::c_int = 40;

#[derive(Debug)]
struct Args {
    queue: u16,
    delay: Duration,
    loss: f64,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { queue: 0, delay: Duration::ZERO, loss: 0.0, seed: 0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag} {value}: {what}");
        match flag.as_str() {
            "--queue" => args.queue = value.parse().map_err(|_| bad("not a queue number (0..65535)"))?,
            "--delay-ms" => {
                let ms: f64 = value.parse().map_err(|_| bad("not a number of milliseconds"))?;
                if !(0.0..=10_000.0).contains(&ms) {
                    return Err(bad("must be between 0 and 10000"));
                }
                args.delay = Duration::from_secs_f64(ms / 1e3);
            }
            "--loss" => {
                args.loss = value.parse().map_err(|_| bad("not a probability"))?;
                if !(0.0..=1.0).contains(&args.loss) {
                    return Err(bad("must be between 0 and 1"));
                }
            }
            "--seed" => args.seed = value.parse().map_err(|_| bad("not an unsigned integer"))?,
            _ => return Err(format!("unknown argument {flag} (--queue, --delay-ms, --loss, --seed)")),
        }
    }
    Ok(args)
}

/// The open file descriptors of this process.
fn open_fds() -> Result<BTreeSet<RawFd>, String> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("reading /proc/self/fd: {e}"))?;
    Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of a c_int and a socklen_t.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &raw mut len) };
    (rc == 0).then_some(v)
}

/// Opens the queue and finds its netlink socket (`nfq` does not expose it; this process
/// opens no other NETLINK_NETFILTER socket, so the one among its descriptors is the queue's).
fn open_queue() -> Result<(Queue, RawFd), String> {
    let queue = Queue::open().map_err(|e| format!("opening an NFQUEUE socket (needs root): {e}"))?;
    let found: Vec<RawFd> = open_fds()?
        .into_iter()
        .filter(|&fd| {
            sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
                && sockopt(fd, libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER)
        })
        .collect();
    let &[fd] = found.as_slice() else {
        return Err(format!("expected one netfilter netlink socket, found descriptors {found:?}"));
    };
    Ok((queue, fd))
}

/// Waits until `fd` is readable or `timeout` passes (`None`: no timeout).
fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> Result<(), String> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: one valid pollfd; `ts_ptr` is null or points to a live timespec; no sigmask.
    let rc = unsafe { libc::ppoll(&raw mut pfd, 1, ts_ptr, std::ptr::null()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("ppoll: {e}"));
        }
    }
    Ok(())
}

/// splitmix64: a small seeded generator for the loss draws.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Makes this process a real-time (`SCHED_FIFO`) one.
fn realtime() -> Result<(), String> {
    let param = libc::sched_param { sched_priority: RT_PRIORITY };
    // SAFETY: a valid sched_param for this process (pid 0).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("SCHED_FIFO (without it, delays stretch under CPU load): {e}"));
    }
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    realtime()?;
    let (mut queue, fd) = open_queue()?;
    let q = args.queue;
    let cfg = |what: &str, e: std::io::Error| format!("configuring queue {q} ({what}): {e}");
    queue.bind(q).map_err(|e| cfg("bind; is another program bound to it?", e))?;
    queue.set_copy_range(q, 0).map_err(|e| cfg("copy range", e))?;
    queue.set_queue_max_len(q, QUEUE_MAX_LEN).map_err(|e| cfg("max length", e))?;
    queue.set_nonblocking(true);
    let mut out = std::io::stdout();
    writeln!(out, "ready").and_then(|()| out.flush()).map_err(|e| format!("stdout: {e}"))?;

    let mut rng = Rng(args.seed);
    let mut held: VecDeque<(Instant, Message)> = VecDeque::new();
    loop {
        let timeout = held.front().map(|(at, _)| at.saturating_duration_since(Instant::now()));
        wait_readable(fd, timeout)?;
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    if args.loss > 0.0 && rng.next_f64() < args.loss {
                        msg.set_verdict(Verdict::Drop);
                        queue.verdict(msg).map_err(|e| format!("verdict: {e}"))?;
                    } else {
                        held.push_back((Instant::now() + args.delay, msg));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading the queue: {e}")),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, mut msg)) = held.pop_front() {
                msg.set_verdict(Verdict::Accept);
                queue.verdict(msg).map_err(|e| format!("verdict: {e}"))?;
            }
        }
    }
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-netbed-delay: {e}");
            ExitCode::FAILURE
        }
    }
}
