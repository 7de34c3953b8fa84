//! The driver plans over the swarm's view: announcements in, routes out. Spans, states,
//! load and throughput decide the route; other models' announcements are ignored and peers
//! that leave the view are forgotten.

use shoal_coordinator_free_router::driver::{Driver, DriverConfig, DriverError, ModelInfo};
use shoal_coordinator_free_router::swarm::announce::{Announcement, PeerState};
use shoal_worker::net::{Node, NodeOptions};

const MODEL: [u8; 32] = [9; 32];

fn info() -> ModelInfo {
    ModelInfo { model_id: MODEL, n_layers: 30, vocab_size: 100, max_positions: 1024 }
}

fn peer(n: u8, start: u32, end: u32) -> Announcement {
    Announcement {
        node: [n; 32],
        model: MODEL,
        n_layers: 30,
        start,
        end,
        state: PeerState::Serving,
        throughput: 1000.0,
        load: 0,
        free_kv_bytes: 1 << 30,
        version: "0.1.0".into(),
        seq: 1,
        issued_at_ms: 0,
        ttl_ms: 10_000,
        addrs: vec!["127.0.0.1:9".parse().unwrap()],
        holds: Default::default(),
    }
}

fn route(d: &Driver) -> Vec<(u8, u32, u32)> {
    d.plan_route().unwrap().iter().map(|h| (h.node_id[0], h.start, h.end)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_the_view() {
    let node = Node::bind(NodeOptions::loopback()).await.unwrap();
    let d = Driver::new(node.clone(), info(), DriverConfig::default());
    assert!(matches!(d.plan_route(), Err(DriverError::NoRoute { .. })));

    // Two replicas of 15..30: the idle one is chosen over one with five sessions.
    let mut busy = peer(2, 15, 30);
    busy.load = 5;
    let fresh = d.sync_view(&[peer(1, 0, 15), busy.clone(), peer(3, 15, 30)]);
    assert_eq!(fresh.len(), 3);
    assert_eq!(route(&d), vec![(1, 0, 15), (3, 15, 30)]);
    // ...and a replica three times as fast wins even with some load.
    let mut fast = busy.clone();
    fast.load = 1;
    fast.throughput = 6000.0;
    assert!(d.sync_view(&[peer(1, 0, 15), fast, peer(3, 15, 30)]).is_empty(), "nobody new");
    assert_eq!(route(&d), vec![(1, 0, 15), (2, 15, 30)]);
    // The announced address is known to the node, so the peer can be dialled by id.
    assert_eq!(node.known_addrs(&[1; 32]).addrs, vec!["127.0.0.1:9".parse().unwrap()]);

    // Joining and draining peers take no new sessions; another model's peer is ignored.
    let mut joining = peer(1, 0, 15);
    joining.state = PeerState::Joining;
    let mut draining = peer(2, 15, 30);
    draining.state = PeerState::Draining;
    let mut foreign = peer(4, 0, 15);
    foreign.model = [8; 32];
    let mut other_layout = peer(5, 0, 15);
    other_layout.n_layers = 31;
    d.sync_view(&[joining, draining, peer(3, 15, 30), foreign, other_layout]);
    assert!(matches!(d.plan_route(), Err(DriverError::NoRoute { .. })), "0..15 only has a joining peer");
    assert_eq!(d.peers().len(), 3, "the other model's peers are not kept");

    // A peer that left the view is forgotten; one whole-model peer is a route by itself.
    d.sync_view(&[peer(6, 0, 30)]);
    assert_eq!(route(&d), vec![(6, 0, 30)]);
    assert_eq!(d.peers().len(), 1);
    node.shutdown().await;
}
