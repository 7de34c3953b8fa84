//! The bed itself: hosts reach each other through the bridge; the delay program holds every
//! packet at least its delay and lets packets out in the order they came; loss drops a share
//! (all of them at probability 1); a rate limit installs a tbf qdisc.
//!
//! Needs root, iproute2 and iptables, as CI has; it fails without them (unless
//! `SHOAL_NETBED_SKIP=1`, which prints why it skips).

use std::net::UdpSocket;
use std::time::Duration;

use shoal_netbed::{Bed, Link};

/// Datagrams sent by [`send_and_receive`].
const DATAGRAMS: u32 = 2000;

/// Sends [`DATAGRAMS`] numbered UDP datagrams from host 0 to host 1 and returns the numbers
/// received, in arrival order.
fn send_and_receive(bed: &Bed) -> Vec<u32> {
    let to = bed.host(1).addr;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            bed.run_in(1, || {
                let sock = UdpSocket::bind((to, 9000)).expect("bind the receiver");
                sock.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
                tx.send(()).expect("signal");
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while let Ok(n) = sock.recv(&mut buf) {
                    got.push(u32::from_le_bytes(buf[..n.min(4)].try_into().expect("4 bytes")));
                }
                got
            })
            .expect("in host 1")
        });
        rx.recv().expect("the receiver is bound");
        bed.run_in(0, || {
            let sock = UdpSocket::bind((bed.host(0).addr, 0)).expect("bind the sender");
            for i in 0..DATAGRAMS {
                sock.send_to(&i.to_le_bytes(), (to, 9000)).expect("send");
                if i % 50 == 49 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
        .expect("in host 0");
        receiver.join().expect("receiver")
    })
}

fn assert_increasing(got: &[u32]) {
    assert!(got.windows(2).all(|w| w[0] < w[1]), "datagrams reordered: {got:?}");
}

#[test]
fn delay_holds_every_packet_and_keeps_the_order() {
    if !shoal_netbed::require() {
        return;
    }
    let d = Duration::from_millis(20);
    let bed = Bed::new(&[Link::delay_ms(20.0), Link::delay_ms(20.0), Link::default()]).expect("bed");
    let p = bed.ping(0, 1, 5).expect("ping");
    eprintln!("ping with 20 ms per egress: {p:?}");
    assert_eq!((p.sent, p.received), (5, 5));
    // Each way waits at least its host's delay in the delay program.
    assert!(p.min.expect("replies") >= 2 * d, "{p:?}");
    // Host 2 has no delay: a ping from it to host 0 waits for host 0's reply only.
    let p = bed.ping(2, 0, 3).expect("ping");
    eprintln!("ping with 20 ms on one side: {p:?}");
    assert!(p.min.expect("replies") >= d, "{p:?}");

    let got = send_and_receive(&bed);
    assert_increasing(&got);
    assert_eq!(got.len(), DATAGRAMS as usize, "no loss configured, none expected");
}

#[test]
fn loss_drops_a_share_and_rate_limits_install() {
    if !shoal_netbed::require() {
        return;
    }
    let lossy = Link { loss: 0.3, ..Link::default() };
    let limited = Link { rate_kbit: Some(8000), ..Link::default() };
    let bed = Bed::new(&[lossy, limited, Link { loss: 1.0, ..Link::default() }]).expect("bed");
    let got = send_and_receive(&bed);
    assert_increasing(&got);
    let share = got.len() as f64 / f64::from(DATAGRAMS);
    eprintln!("with 30% loss {} of {DATAGRAMS} datagrams arrived", got.len());
    // Binomial(2000, 0.7): the standard deviation is about 0.01.
    assert!((0.6..0.8).contains(&share), "{share}");

    let p = bed.ping(2, 1, 3).expect("ping");
    assert_eq!((p.sent, p.received), (3, 0), "loss 1 drops everything host 2 sends");

    let out = bed.command(1, "tc").args(["qdisc", "show", "dev", "eth0"]).output().expect("tc");
    let qdisc = String::from_utf8_lossy(&out.stdout);
    assert!(qdisc.contains("tbf") && qdisc.contains("8Mbit"), "{qdisc}");
}

#[test]
fn dropping_the_bed_removes_its_namespaces() {
    if !shoal_netbed::require() {
        return;
    }
    let bed = Bed::new(&[Link::delay_ms(1.0), Link::default()]).expect("bed");
    let names: Vec<String> = bed.hosts().iter().map(|h| h.netns.clone()).collect();
    let list = || {
        String::from_utf8(
            std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip").stdout,
        )
        .expect("utf-8")
    };
    assert!(names.iter().all(|n| list().contains(n.as_str())));
    drop(bed);
    let after = list();
    assert!(names.iter().all(|n| !after.contains(n.as_str())), "{after}");
}
