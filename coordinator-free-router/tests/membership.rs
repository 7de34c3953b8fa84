//! The swarm's membership over real iroh-gossip on loopback: nodes that join through one
//! ticket see each other's signed announcements; a forged announcement (another node's id,
//! signed with the forger's key) changes nobody's view; a node that stops announcing leaves
//! every view after its ttl plus the tolerated clock skew.
//!
//! Closed swarms: nodes holding one swarm key admit each other and share a view; a node
//! without a key and one with another key are told why they are refused ("this swarm is
//! private: ..."), every connection they open to a member (stage protocol, gossip, weights)
//! is closed at the handshake, and even when handed the private topic's id they never reach a
//! member's view, while a later member does.

use std::time::{Duration, Instant};

use iroh::endpoint::ConnectionError;
use shoal_coordinator_free_router::membership::{Membership, MembershipConfig, OwnSpan, sign, topic_of};
use shoal_coordinator_free_router::swarm::announce::{Announcement, PeerState};
use shoal_coordinator_free_router::swarm::view::ViewConfig;
use shoal_worker::admission::{AdmissionError, REFUSED_CODE, SwarmKey};
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
    let topic = forger.gossip().subscribe(topic_of(&MODEL, None), vec![a.endpoint_id()]).await.unwrap();
    let (sender, mut receiver) = topic.split();
    tokio::time::timeout(Duration::from_secs(10), receiver.joined()).await.expect("joined").unwrap();
    let fake = Announcement {
        node: a.id(),
        version: "evil".into(),
        seq: u64::MAX - 1,
        addrs: vec![],
        ..announcement(&forger)
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

async fn bind(key: Option<&SwarmKey>) -> Node {
    Node::bind(NodeOptions { swarm_key: key.cloned(), ..NodeOptions::loopback() }).await.unwrap()
}

fn ids(m: &Membership) -> Vec<[u8; 32]> {
    let mut v: Vec<_> = m.peers().iter().map(|a| a.node).collect();
    v.sort();
    v
}

/// An announcement of `node` serving every layer at a million tokens/s (version `intruder`).
fn announcement(node: &Node) -> Announcement {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    Announcement {
        node: node.id(),
        model: MODEL,
        n_layers: 30,
        start: 0,
        end: 30,
        state: PeerState::Serving,
        throughput: 1e6,
        load: 0,
        free_kv_bytes: 1 << 40,
        version: "intruder".into(),
        seq: now,
        issued_at_ms: now,
        ttl_ms: 60_000,
        addrs: node.addr().ip_addrs().copied().collect(),
        holds: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_admit_each_other_and_outsiders_are_refused_at_the_connection() {
    let key = SwarmKey::generate();
    let other = SwarmKey::generate();
    let a = bind(Some(&key)).await;
    let b = bind(Some(&key)).await;
    let open = bind(None).await;
    let open2 = bind(None).await;
    let stranger = bind(Some(&other)).await;

    // The admission, with the reason of each refusal.
    b.check_admission(a.addr()).await.expect("a member is admitted");
    open.check_admission(open2.addr()).await.expect("open nodes admit each other");
    let need = open.check_admission(a.addr()).await.unwrap_err();
    assert!(matches!(need, AdmissionError::NeedKey { .. }), "{need:?}");
    let wrong = stranger.check_admission(a.addr()).await.unwrap_err();
    assert!(matches!(wrong, AdmissionError::WrongKey { .. }), "{wrong:?}");
    let peer_open = a.check_admission(open.addr()).await.unwrap_err();
    assert!(matches!(peer_open, AdmissionError::PeerOpen { .. }), "{peer_open:?}");
    for e in [&need, &wrong, &peer_open] {
        assert!(e.is_refusal());
        assert!(e.to_string().starts_with("this swarm is private: "), "{e}");
    }

    // Every protocol a member serves is closed to outsiders at the handshake: the open node
    // gets through TLS and is closed with the refusal code and reason; the stranger's own
    // endpoint will not even dial a node that refused its key.
    for alpn in [shoal_worker::protocol::ALPN, iroh_gossip::ALPN, iroh_blobs::ALPN] {
        let name = String::from_utf8_lossy(alpn).into_owned();
        // The close may come before or after the open node's side of the handshake ends.
        let reason = match open.endpoint().connect(a.addr(), alpn).await {
            Err(e) => format!("{e:#}"),
            Ok(conn) => match conn.closed().await {
                ConnectionError::ApplicationClosed(close) => {
                    assert_eq!(close.error_code, REFUSED_CODE.into(), "{name}");
                    String::from_utf8_lossy(&close.reason).into_owned()
                }
                other => panic!("{name}: closed otherwise: {other:?}"),
            },
        };
        assert!(reason.contains("this swarm is private"), "{name}: {reason}");
        assert!(stranger.endpoint().connect(a.addr(), alpn).await.is_err(), "{name}");
        // A member connects and the connection stays open.
        let conn = b.endpoint().connect(a.addr(), alpn).await.expect("a member connects");
        assert!(conn.close_reason().is_none(), "{name}");
        conn.close(0u32.into(), b"done");
    }
    // The stage protocol end to end: a member's ping is answered, an outsider's is not.
    b.add_peer_addr(a.addr());
    open.add_peer_addr(a.addr());
    stranger.add_peer_addr(a.addr());
    b.ping(a.id(), Duration::from_secs(5)).await.expect("a member's ping");
    assert!(open.ping(a.id(), Duration::from_secs(2)).await.is_err());
    assert!(stranger.ping(a.id(), Duration::from_secs(2)).await.is_err());

    // Gossip: members share a view; outsiders who even know the private topic's id cannot
    // join it or put an announcement into a member's view.
    let ma = Membership::join(&a, MODEL, 30, vec![], span(0, 15), config()).await.unwrap();
    let mb = Membership::join(&b, MODEL, 30, vec![a.addr()], span(15, 30), config()).await.unwrap();
    wait_for("both members in both views", || ids(&ma).len() == 2 && ids(&mb).len() == 2).await;
    let private_topic = topic_of(&MODEL, Some(&key));
    assert_ne!(private_topic, topic_of(&MODEL, None), "a private swarm's topic is not the open one");
    assert_ne!(private_topic, topic_of(&MODEL, Some(&other)));
    let mut senders = Vec::new();
    for intruder in [&open, &stranger] {
        let topic =
            intruder.gossip().subscribe(private_topic, vec![a.endpoint_id(), b.endpoint_id()]).await.unwrap();
        let (sender, receiver) = topic.split();
        senders.push((intruder, sender, receiver));
    }
    // The open swarm's membership of the same model, joined through a member: it stays alone.
    let mo = Membership::join(&open, MODEL, 30, vec![a.addr()], span(0, 30), config()).await.unwrap();
    let broadcast_all = |senders: &Vec<(&Node, iroh_gossip::api::GossipSender, _)>| {
        let msgs: Vec<_> = senders
            .iter()
            .map(|(n, s, _)| (s.clone(), sign(n.endpoint().secret_key(), &announcement(n)).encode()))
            .collect();
        async move {
            for (s, m) in msgs {
                let _ = s.broadcast(m.into()).await;
            }
        }
    };
    broadcast_all(&senders).await;
    // A third member joins meanwhile and is seen by all: the gossip did run.
    let c = bind(Some(&key)).await;
    let mc = Membership::join(&c, MODEL, 30, vec![b.addr()], span(10, 20), config()).await.unwrap();
    let mut members = vec![a.id(), b.id(), c.id()];
    members.sort();
    for _ in 0..10 {
        broadcast_all(&senders).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("all three members in every member's view", || {
        [&ma, &mb, &mc].iter().all(|m| ids(m) == members)
    })
    .await;
    for _ in 0..5 {
        broadcast_all(&senders).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for m in [&ma, &mb, &mc] {
        assert_eq!(ids(m), members, "only members in a member's view");
        assert!(m.peers().iter().all(|p| p.version != "intruder"));
    }
    assert_eq!(ids(&mo), vec![open.id()], "the open node sees only itself");
    for (_, _, mut receiver) in senders {
        let joined = tokio::time::timeout(Duration::from_millis(200), receiver.joined()).await;
        assert!(!matches!(joined, Ok(Ok(()))), "an outsider joined the private topic");
    }
    for n in [a, b, c, open, open2, stranger] {
        n.shutdown().await;
    }
}
