//! The swarm's membership over real iroh-gossip on loopback: nodes that join through one
//! ticket see each other's signed announcements; a forged announcement (another node's id,
//! signed with the forger's key) changes nobody's view; a node that stops announcing leaves
//! every view after its ttl plus the tolerated clock skew.

use std::time::{Duration, Instant};

use shoal_coordinator_free_router::membership::{Membership, MembershipConfig, OwnSpan, sign, topic_of};
use shoal_coordinator_free_router::swarm::announce::{Announcement, PeerState};
use shoal_coordinator_free_router::swarm::view::ViewConfig;
use shoal_worker::net::{Node, NodeOptions};

const MODEL: [u8; 32] = [42; 32];

fn config() -> MembershipConfig {
    MembershipConfig {
        interval: Duration::from_millis(200),
        ttl: Duration::from_millis(1000),
        view: ViewConfig { max_clock_skew_ms: 200, ..ViewConfig::default() },
    }
}

fn span(start: u32, end: u32) -> impl Fn() -> Option<OwnSpan> + Send + Sync + 'static {
    move || {
        Some(OwnSpan {
            start,
            end,
            state: PeerState::Serving,
            throughput: 100.0,
            load: 0,
            free_kv_bytes: 1 << 30,
            holds: Default::default(),
        })
    }
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spans(m: &Membership) -> Vec<(u32, u32)> {
    let mut v: Vec<_> = m.peers().iter().map(|a| (a.start, a.end)).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_find_each_other_forgeries_fail_and_silence_expires() {
    let a = Node::bind(NodeOptions::loopback()).await.unwrap();
    let b = Node::bind(NodeOptions::loopback()).await.unwrap();
    let c = Node::bind(NodeOptions::loopback()).await.unwrap();
    let ma = Membership::join(&a, MODEL, 30, vec![], span(0, 10), config()).await.unwrap();
    // B and C know only A's ticket.
    let mb = Membership::join(&b, MODEL, 30, vec![a.addr()], span(10, 20), config()).await.unwrap();
    let mc = Membership::join(&c, MODEL, 30, vec![a.addr()], span(20, 30), config()).await.unwrap();
    let all = vec![(0, 10), (10, 20), (20, 30)];
    wait_for("every view to hold all three", || [&ma, &mb, &mc].iter().all(|m| spans(m) == all)).await;
    assert!(ma.coverage().iter().all(|&c| c == 100.0), "{:?}", ma.coverage());
    // B only had A's ticket; the addresses gossip brought (C's announcement carries them) let
    // it dial C by id.
    let (rtt, _) = b.ping(c.id(), Duration::from_secs(5)).await.expect("B dials C by id");
    assert!(rtt < Duration::from_secs(5));

    // A forger broadcasts an announcement in A's name, signed with its own key.
    let forger = Node::bind(NodeOptions::loopback()).await.unwrap();
    // A's address first: the subscription dials A at once.
    forger.add_peer_addr(a.addr());
    let topic = forger.gossip().subscribe(topic_of(&MODEL), vec![a.endpoint_id()]).await.unwrap();
    let (sender, mut receiver) = topic.split();
    tokio::time::timeout(Duration::from_secs(10), receiver.joined()).await.expect("joined").unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let fake = Announcement {
        node: a.id(),
        model: MODEL,
        n_layers: 30,
        start: 0,
        end: 30,
        state: PeerState::Serving,
        throughput: 1e6,
        load: 0,
        free_kv_bytes: 1 << 40,
        version: "evil".into(),
        seq: u64::MAX - 1,
        issued_at_ms: now,
        ttl_ms: 60_000,
        addrs: vec![],
        holds: Default::default(),
    };
    for _ in 0..5 {
        sender.broadcast(sign(forger.endpoint().secret_key(), &fake).encode().into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The same path delivers the forger's own, honestly signed announcement: so the forgeries
    // did reach B and C, and were refused there.
    let honest =
        Announcement { node: forger.id(), start: 5, end: 6, version: "honest".into(), ..fake.clone() };
    sender.broadcast(sign(forger.endpoint().secret_key(), &honest).encode().into()).await.unwrap();
    wait_for("the forger's honest announcement", || {
        [&mb, &mc].iter().all(|m| m.peers().iter().any(|p| p.version == "honest"))
    })
    .await;
    for m in [&mb, &mc] {
        assert!(m.peers().iter().all(|p| p.version != "evil"), "the forgery changed a view");
        let a_entry = m.peers().into_iter().find(|p| p.node == a.id()).expect("A is in the view");
        assert_eq!((a_entry.start, a_entry.end), (0, 10));
    }

    // C goes silent: it leaves A's and B's views within ttl + skew (+ a tick).
    drop(mc);
    c.shutdown().await;
    let t0 = Instant::now();
    let left = [(0, 10), (5, 6), (10, 20)];
    wait_for("C to expire", || spans(&ma) == left && spans(&mb) == left).await;
    eprintln!("a silent peer left both views after {:?} (ttl 1 s + skew 0.2 s)", t0.elapsed());
    drop((ma, mb));
    for n in [a, b, forger] {
        n.shutdown().await;
    }
}
