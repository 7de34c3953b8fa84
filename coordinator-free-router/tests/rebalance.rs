//! A worker's moves on live nodes (real iroh-gossip on loopback, the real SmolLM2-135M's
//! layers): two workers on layers 0..15 of 30 leave 15..30 uncovered, so the one that checks
//! fetches the destination's weights first, drains, re-checks, loads 15..30 and serves it, and
//! the other's view shows it there; a destination that fails to load sends it back to its old
//! span, served again.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_coordinator_free_router::membership::{Membership, MembershipConfig, OwnSpan};
use shoal_coordinator_free_router::rebalance::{HostError, Outcome, Own, Rebalancer, SpanHost, announcer};
use shoal_coordinator_free_router::swarm::announce::{Holdings, PeerState};
use shoal_coordinator_free_router::swarm::placement::RebalanceConfig;
use shoal_coordinator_free_router::swarm::view::ViewConfig;
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, NodeOptions};
use shoal_worker::service::{StageConfig, StageService};

fn model() -> Model {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    Model::open(p).expect("SmolLM2 opens")
}

fn config() -> MembershipConfig {
    MembershipConfig {
        interval: Duration::from_millis(200),
        ttl: Duration::from_millis(1500),
        view: ViewConfig { max_clock_skew_ms: 200, ..ViewConfig::default() },
    }
}

/// Loads spans of the real model (refusing `broken`), and records what it was asked.
struct TestHost {
    model: Model,
    broken: Option<Range<usize>>,
    calls: Mutex<Vec<String>>,
}

impl SpanHost for TestHost {
    async fn prefetch(&self, span: Range<usize>) -> Result<Option<Holdings>, HostError> {
        self.calls.lock().unwrap().push(format!("prefetch {span:?}"));
        Ok(None)
    }

    fn load(&self, span: Range<usize>) -> Result<(StageService, f64), HostError> {
        self.calls.lock().unwrap().push(format!("load {span:?}"));
        if self.broken.as_ref() == Some(&span) {
            return Err(format!("layers {span:?} are damaged").into());
        }
        let shard = Shard::load(&self.model, span, &Device::Cpu, DType::F32)?;
        let config = StageConfig {
            max_sessions: 16,
            kv_budget_bytes: 64 << 20,
            per_peer_sessions: 16,
            per_forwarder_sessions: 64,
            idle_timeout: Duration::from_secs(60),
            max_seq_len: 256,
            model_id: self.model.model_id()?,
        };
        Ok((StageService::new(shard, config), 100.0))
    }
}

fn fixed(start: u32, end: u32) -> impl Fn() -> Option<OwnSpan> + Send + Sync + 'static {
    move || {
        Some(OwnSpan {
            start,
            end,
            state: PeerState::Serving,
            throughput: 100.0,
            load: 0,
            free_kv_bytes: 1 << 30,
            holds: Holdings::default(),
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

/// Worker A fixed on 0..15; worker B on 0..15 too, serving it, with a rebalancer.
async fn two_on_one_half(broken: Option<Range<usize>>) -> (Node, Membership, Rebalancer<TestHost>) {
    let model = model();
    let model_id = model.model_id().unwrap();
    let host = TestHost { model, broken, calls: Mutex::default() };
    let a = Node::bind(NodeOptions::loopback()).await.unwrap();
    let ma = Membership::join(&a, model_id, 30, vec![], fixed(0, 15), config()).await.unwrap();
    let b = Node::bind(NodeOptions::loopback()).await.unwrap();
    let (stage, throughput) = host.load(0..15).unwrap();
    assert!(b.serve(stage));
    let own = Arc::new(Mutex::new(Own {
        span: Some(0..15),
        state: PeerState::Serving,
        throughput,
        holds: Holdings::default(),
    }));
    let mb = Membership::join(&b, model_id, 30, vec![a.addr()], announcer(own.clone(), b.clone()), config())
        .await
        .unwrap();
    let both = |m: &Membership| m.peers().iter().filter(|p| (p.start, p.end) == (0, 15)).count() == 2;
    wait_for("both views to hold both workers", || both(&ma) && both(&mb)).await;
    host.calls.lock().unwrap().clear();
    let rebalancer = Rebalancer {
        host,
        node: b,
        membership: Arc::new(mb),
        own,
        config: RebalanceConfig::default(),
        drain_timeout: Duration::from_secs(1),
        mean_interval: Duration::from_secs(60),
    };
    (a, ma, rebalancer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_doubly_served_span_moves_to_the_uncovered_layers() {
    let (a, ma, r) = two_on_one_half(None).await;
    let b_id = r.node.id();
    let outcome = r.check().await.expect("the check runs");
    assert_eq!(outcome, Outcome::Moved { from: 0..15, to: 15..30 });
    // The destination was fetched before the drain, then loaded once.
    assert_eq!(*r.host.calls.lock().unwrap(), ["prefetch 15..30", "prefetch 15..30", "load 15..30"]);
    let info = r.node.stage_info().expect("B serves a stage");
    assert_eq!((info.start, info.end), (15, 30));
    let own = r.own.lock().unwrap().clone();
    assert_eq!((own.span, own.state), (Some(15..30), PeerState::Serving));
    wait_for("A to see B serving 15..30", || {
        ma.peers().iter().any(|p| p.node == b_id && (p.start, p.end, p.state) == (15, 30, PeerState::Serving))
    })
    .await;
    assert!(ma.coverage().iter().all(|&c| c > 0.0), "every layer is served: {:?}", ma.coverage());
    // Nothing more to gain: the next check does not start a move.
    assert_eq!(r.check().await.expect("the check runs"), Outcome::Unneeded);
    drop(ma);
    r.node.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_fails_to_load_sends_the_worker_back_to_its_span() {
    let (a, ma, r) = two_on_one_half(Some(15..30)).await;
    let outcome = r.check().await.expect("the old span loads again");
    assert_eq!(outcome, Outcome::FellBack(0..15));
    assert_eq!(
        *r.host.calls.lock().unwrap(),
        ["prefetch 15..30", "prefetch 15..30", "load 15..30", "load 0..15"]
    );
    let info = r.node.stage_info().expect("B serves a stage again");
    assert_eq!((info.start, info.end), (0, 15));
    let own = r.own.lock().unwrap().clone();
    assert_eq!((own.span, own.state), (Some(0..15), PeerState::Serving));
    drop(ma);
    r.node.shutdown().await;
    a.shutdown().await;
}
