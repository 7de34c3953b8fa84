//! The iroh transport of the stage protocol: one endpoint per node, frames over QUIC
//! unidirectional streams, one connection per pair of peers shared by every session.
//!
//! # Shape
//! - A [`Node`] owns one iroh [`Endpoint`] and exports the protocol handlers its [`Router`]
//!   accepts, as iroh's own protocols do: [`Node::stage_protocol`] for the stage ALPN
//!   ([`crate::protocol::ALPN`]), [`Node::admit_protocol`] for [`ADMIT_ALPN`],
//!   [`Node::gossip`] for iroh-gossip's and [`Node::blobs_protocol`] for iroh-blobs' (the
//!   pieces of model weights in [`Node::blobs`]). An application assembles the router
//!   ([`Node::open`], then [`Node::set_router`]; the `shoal` binary does so in its
//!   `src/node.rs`); [`Node::bind`] does both with exactly these four. Relays and public
//!   address lookup are off unless [`NodeOptions`] turns them on; peers are dialed by node id
//!   through an in-memory address book ([`MemoryLookup`]) filled from tickets and from the
//!   address book of each `OpenSession`.
//! - **Sending**: each peer has one outgoing queue and one writer task that keeps one
//!   long-lived unidirectional stream open on the shared connection, so frames to a peer
//!   arrive in order and a slow peer never blocks the others. The connection is reused for
//!   every session in either direction (an incoming connection from a peer also carries what
//!   this node sends back to it).
//! - **Receiving**: every connection, incoming or outgoing, runs a loop that accepts
//!   unidirectional streams; each stream is read frame by frame with the protocol's checks
//!   ([`frame_len`] before allocating, [`decode_body`]); a bad frame is answered with a typed
//!   error to its sender and, when the framing itself is broken, the stream is stopped.
//! - **Dispatch**: `OpenSession`, `Step` and `CloseSession` go to this node's stage (a
//!   [`StageService`] on its own compute thread, see [`Node::serve`]); `StepResult` and
//!   `Error` about a session this node originates go to that session's [`SessionChannel`];
//!   `Ping` is answered on the spot with the stage's [`PeerInfo`] (never queued behind
//!   compute, so ping times measure the network); `Pong` completes [`Node::ping`].
//! - **Admission**: with a swarm key ([`NodeOptions::swarm_key`]) every connection in either
//!   direction passes the admission of [`crate::admission`] first; nodes outside the private
//!   swarm are refused at the handshake, whatever the ALPN.
//! - **Limits**: every queue is bounded (per-peer send queues, the stage's inbox, each
//!   session's replies; an idle writer task exits); a frame's body is read with a timeout
//!   into a buffer that grows as bytes arrive; writes time out; a peer holds at most
//!   `MAX_CONNS_PER_PEER` incoming stage connections and `MAX_STREAMS_PER_CONN` streams on each.
//! - **Failures**: a frame that cannot be delivered to the next hop (no connection within the
//!   connect timeout, stream reset) makes the stage close that session and report
//!   `NextHopUnreachable` to its origin; a frame the origin cannot deliver to stage 1 becomes
//!   the same error on the origin's own session channel. A peer that dies silently (kill -9)
//!   is found by the origin's deadlines.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::{Connection, RecvStream, SendStream, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey, TransportAddr};
pub use iroh_blobs::BlobsProtocol;
use tokio::sync::{mpsc, oneshot};

pub use crate::admission::{ADMIT_ALPN, AdmitProtocol};
use crate::admission::{AdmissionError, AdmissionHooks, Gate, SwarmKey};
use crate::protocol::{
    ALPN, ErrorCode, HEADER_LEN, MAX_NODE_ADDRS, Message, NodeAddrs, PeerInfo, ProtocolError, StageError,
    decode_body, frame_len, try_encode,
};
use crate::service::{Action, PeerId, StageService, StageStats};

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The endpoint could not bind.
    #[error("could not start the iroh endpoint: {0}")]
    Bind(String),
    /// A bind address was refused.
    #[error("invalid bind address {addr}: {reason}")]
    BindAddr {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A message failed the protocol's checks before sending.
    #[error("refusing to send an invalid {kind}: {source}")]
    Encode {
        /// Kind of message.
        kind: &'static str,
        /// The check that failed.
        source: ProtocolError,
    },
    /// No answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The peer could not be reached.
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Closed,
    /// A ticket did not parse.
    #[error("invalid ticket: {0}")]
    Ticket(String),
}

/// How a node's endpoint is set up.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The node key (its id); a fresh one when `None`.
    pub secret_key: Option<SecretKey>,
    /// Socket to bind; `None` binds every interface on a random port (IPv4 and IPv6).
    pub bind: Option<SocketAddr>,
    /// Use n0's public relays (off by default: everything works offline).
    pub relay: bool,
    /// Publish and resolve addresses through n0's public DNS address lookup (off by default).
    pub discovery: bool,
    /// Find, and be found by, shoal nodes on the local network with mDNS (off by default):
    /// [`Node::local_peers`] lists them, so a swarm can form with no ticket.
    pub local_discovery: bool,
    /// How long dialing a peer may take.
    pub connect_timeout: Duration,
    /// A delay added before every frame this node sends, to emulate a network on loopback
    /// (benchmarks and tests; `tc netem` is not always available). Zero in production.
    pub send_delay: Duration,
    /// How often the stage closes idle sessions.
    pub sweep_interval: Duration,
    /// Whether the stage, when other open sessions have no step queued yet, waits a moment
    /// (as long as its last compute took, 0.2 to 5 ms) for their steps to join the batch.
    /// That pays when the stages of a ring share the cores (several stages in one process,
    /// `shoal run --stages N`): the waiting stage's core goes to the others and the sessions
    /// move round the ring together. A stage on its own machine would only idle while
    /// activations are in flight (off by default; on a namespace bed with 5 ms per egress,
    /// 3 worker processes at 32 streams decoded 0.8x as fast with it).
    pub batch_wait: bool,
    /// The key of a private swarm (see [`crate::admission`]): with one, every connection in
    /// either direction passes the admission first and nodes without this key are refused;
    /// `None` is an open swarm.
    pub swarm_key: Option<SwarmKey>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            secret_key: None,
            bind: None,
            relay: false,
            discovery: false,
            local_discovery: false,
            connect_timeout: Duration::from_secs(5),
            send_delay: Duration::ZERO,
            sweep_interval: Duration::from_secs(1),
            batch_wait: false,
            swarm_key: None,
        }
    }
}

impl NodeOptions {
    /// Options for a node reachable on loopback only (tests, `shoal run`).
    pub fn loopback() -> Self {
        Self { bind: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)), ..Self::default() }
    }
}

/// Worker threads for a node's async runtime: `SHOAL_NET_THREADS`, else 1 on machines with up
/// to 4 cores and 2 above. Compute runs on the stages' own threads and candle's pool; on a
/// 2-core machine a second network thread competes with compute and lengthens every hop
/// (measured with `benches/pipeline.rs`: 3 stages vs 1 went from about 0.84x to 0.99x).
pub fn default_net_threads() -> usize {
    if let Some(n) = std::env::var("SHOAL_NET_THREADS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0) {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if cores <= 4 { 1 } else { 2 }
}

/// A message that arrived for a session this node originates, with its sender.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// The sender (authenticated by QUIC), or this node for errors it raised itself.
    pub from: PeerId,
    /// A `StepResult`, a `StageOutput` or an `Error`.
    pub msg: Message,
}

/// The receiving end of a session's replies (see [`Node::open_session_channel`]).
/// Dropping it stops the routing of the session's replies.
pub struct SessionChannel {
    session_id: u64,
    rx: mpsc::Receiver<Inbound>,
    inner: Arc<Inner>,
}

impl SessionChannel {
    /// The next reply, or `None` after `deadline`.
    pub async fn recv_until(&mut self, deadline: tokio::time::Instant) -> Option<Inbound> {
        tokio::time::timeout_at(deadline, self.rx.recv()).await.ok().flatten()
    }

    /// The session.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }
}

impl Drop for SessionChannel {
    fn drop(&mut self) {
        lock(&self.inner.sessions).remove(&self.session_id);
    }
}

/// What happens when a frame cannot be delivered.
#[derive(Debug, Clone, Copy)]
enum OnFail {
    /// Nothing but a log line (replies, pongs, closes).
    Log,
    /// The stage forwarded it: the stage closes the session and tells the origin.
    Stage(u64),
    /// This node originated it: the session's channel gets `NextHopUnreachable`.
    Origin(u64),
}

struct Outgoing {
    frame: Vec<u8>,
    on_fail: OnFail,
}

enum Command {
    Deliver(PeerId, Box<Message>),
    NextHopFailed(u64, String),
    PeerGone(PeerId),
    Drain,
    Shutdown(oneshot::Sender<()>),
}

/// The stage side of a node: the compute thread's inbox and a snapshot of its state.
struct StageHandle {
    tx: std::sync::mpsc::SyncSender<Command>,
    info: Arc<Mutex<(PeerInfo, StageStats)>>,
}

/// Completes a [`Node::ping`] with the responder's self-description.
type PongWaiter = oneshot::Sender<Option<PeerInfo>>;

struct Inner {
    endpoint: Endpoint,
    lookup: MemoryLookup,
    runtime: tokio::runtime::Handle,
    options: NodeOptions,
    id: PeerId,
    links: Mutex<HashMap<EndpointId, mpsc::Sender<Outgoing>>>,
    /// Live incoming stage-protocol connections per peer (capped at [`MAX_CONNS_PER_PEER`]).
    incoming: Mutex<HashMap<EndpointId, usize>>,
    conns: Mutex<HashMap<EndpointId, Connection>>,
    sessions: Mutex<HashMap<u64, mpsc::Sender<Inbound>>>,
    pings: Mutex<HashMap<(PeerId, u64), PongWaiter>>,
    stage: Mutex<Option<StageHandle>>,
    closing: std::sync::atomic::AtomicBool,
    learned: Mutex<std::collections::VecDeque<EndpointId>>,
    /// Shoal nodes found on the local network (mDNS), while they advertise.
    local: Arc<Mutex<HashSet<EndpointId>>>,
    local_task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The mDNS service name shoal nodes advertise (`<id>._shoal._udp.local`): other iroh
/// applications on the network are not mistaken for peers.
const MDNS_SERVICE: &str = "shoal";

/// Registers mDNS address lookup on `endpoint` and keeps `found` equal to the shoal nodes
/// it currently sees.
fn start_local_discovery(
    endpoint: &Endpoint,
    found: Arc<Mutex<HashSet<EndpointId>>>,
) -> Result<tokio::task::AbortHandle, NetError> {
    use iroh_mdns_address_lookup::{DiscoveryEvent, MdnsAddressLookup};
    use tokio_stream::StreamExt;
    let mdns = MdnsAddressLookup::builder()
        .service_name(MDNS_SERVICE)
        .build(endpoint.id())
        .map_err(|e| NetError::Bind(format!("local discovery (mDNS): {e}")))?;
    endpoint
        .address_lookup()
        .map_err(|e| NetError::Bind(format!("local discovery (mDNS): {e}")))?
        .add(mdns.clone());
    let me = endpoint.id();
    let task = tokio::spawn(async move {
        let mut events = mdns.subscribe().await;
        while let Some(event) = events.next().await {
            match event {
                DiscoveryEvent::Discovered { endpoint_info, .. } if endpoint_info.endpoint_id != me => {
                    tracing::debug!(peer = %endpoint_info.endpoint_id.fmt_short(), "found on the local network");
                    lock(&found).insert(endpoint_info.endpoint_id);
                }
                DiscoveryEvent::Expired { endpoint_id } => {
                    lock(&found).remove(&endpoint_id);
                }
                _ => {}
            }
        }
    });
    Ok(task.abort_handle())
}

/// Most messages a stage takes from its queue for one batch.
const MAX_BATCH: usize = 64;
/// Shortest and longest wait for other sessions' steps to join a batch.
const BATCH_WAIT_MIN: Duration = Duration::from_micros(200);
const BATCH_WAIT_MAX: Duration = Duration::from_millis(5);
/// Prefill tokens a stage computes per round before it looks at its queue again (see
/// [`crate::service::schedule`]); the origin's prefill chunks are this size by default.
pub const PREFILL_BUDGET: usize = 256;

/// Most addresses a node keeps from other peers' session openings.
const MAX_LEARNED: usize = 4096;

/// Most frames queued for one peer; beyond, sending fails at once (a peer that reads this
/// slowly has stalled).
const LINK_QUEUE: usize = 1024;
/// Most messages queued for the stage's compute thread; beyond, steps are refused
/// (`CapacityExceeded`) instead of piling up in memory.
const STAGE_QUEUE: usize = 4096;
/// Most replies queued for one session this node originates (a peer flooding a session's
/// channel loses its frames, not this node's memory).
const SESSION_QUEUE: usize = 1024;
/// Once a frame's header arrived, its body must arrive within this; a write must complete
/// within it too.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// A frame's body is read in pieces of at most this many bytes, so the buffer grows as
/// bytes arrive instead of being allocated at the size the header declares.
const READ_CHUNK: usize = 64 * 1024;
/// Most stage-protocol connections one peer may hold to this node at once (one is the norm).
const MAX_CONNS_PER_PEER: usize = 4;
/// A peer's writer task ends after this long with nothing to send.
const LINK_IDLE: Duration = Duration::from_secs(300);
/// Most unidirectional streams a peer may have open at once on one connection (the protocol
/// uses one long-lived stream per direction).
const MAX_STREAMS_PER_CONN: u32 = 8;

/// A shoal node on the network: an iroh endpoint speaking the stage protocol, optionally
/// serving a span of layers, and the origin of any number of sessions. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    /// The router accepting this node's protocols, kept to shut it down (see
    /// [`Node::set_router`]).
    router: Arc<Mutex<Option<Router>>>,
    gossip: iroh_gossip::Gossip,
    blobs: iroh_blobs::store::mem::MemStore,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.endpoint.id()).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The 32 bytes of a node id.
pub fn peer_id(id: &EndpointId) -> PeerId {
    *id.as_bytes()
}

/// A node id from its bytes (fails for bytes that are not an ed25519 point).
pub fn endpoint_id(id: &PeerId) -> Option<EndpointId> {
    EndpointId::from_bytes(id).ok()
}

/// Short printable form of a node id (first 10 hex digits), for logs.
pub fn short(id: &PeerId) -> String {
    id.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

impl Node {
    /// Binds an endpoint with `options` and starts accepting this node's four protocols
    /// (stage, admission, gossip, blobs) on a router of its own. Must run inside a
    /// multi-threaded tokio runtime.
    pub async fn bind(options: NodeOptions) -> Result<Self, NetError> {
        let node = Self::open(options).await?;
        let router = Router::builder(node.endpoint().clone())
            .accept(ALPN, node.stage_protocol())
            .accept(ADMIT_ALPN, node.admit_protocol())
            .accept(iroh_gossip::ALPN, node.gossip().clone())
            .accept(iroh_blobs::ALPN, node.blobs_protocol())
            .spawn();
        node.set_router(router);
        Ok(node)
    }

    /// Binds an endpoint with `options`, with no router yet: nothing is accepted until the
    /// caller spawns a [`Router`] on [`Self::endpoint`] with this node's protocol handlers
    /// (and any of its own) and hands it to [`Self::set_router`]. A node without the stage
    /// and admission protocols cannot take part in a swarm. Must run inside a
    /// multi-threaded tokio runtime.
    pub async fn open(options: NodeOptions) -> Result<Self, NetError> {
        let lookup = MemoryLookup::new();
        let mut builder = Endpoint::builder(presets::Minimal)
            .relay_mode(if options.relay { RelayMode::Default } else { RelayMode::Disabled })
            .address_lookup(lookup.clone());
        if options.discovery {
            builder = builder
                .address_lookup(iroh::address_lookup::PkarrPublisher::n0_dns())
                .address_lookup(iroh::address_lookup::PkarrResolver::n0_dns())
                .address_lookup(iroh::address_lookup::DnsAddressLookup::n0_dns());
        }
        // The key is chosen here because the admission hooks need the node's id.
        let secret_key = options.secret_key.clone().unwrap_or_else(SecretKey::generate);
        let gate = Gate::new(options.swarm_key.clone(), secret_key.public(), options.connect_timeout);
        builder = builder.secret_key(secret_key);
        if options.swarm_key.is_some() {
            builder = builder.hooks(AdmissionHooks { gate: gate.clone() });
        }
        if let Some(addr) = options.bind {
            builder = builder
                .clear_ip_transports()
                .bind_addr(addr)
                .map_err(|e| NetError::BindAddr { addr, reason: e.to_string() })?;
        }
        let endpoint = builder.bind().await.map_err(|e| NetError::Bind(e.to_string()))?;
        gate.set_endpoint(Some(endpoint.clone()));
        let id = peer_id(&endpoint.id());
        let local: Arc<Mutex<HashSet<EndpointId>>> = Arc::default();
        let local_task = if options.local_discovery {
            Some(start_local_discovery(&endpoint, local.clone())?)
        } else {
            None
        };
        let inner = Arc::new(Inner {
            endpoint: endpoint.clone(),
            lookup,
            runtime: tokio::runtime::Handle::current(),
            options,
            id,
            links: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            pings: Mutex::new(HashMap::new()),
            stage: Mutex::new(None),
            closing: std::sync::atomic::AtomicBool::new(false),
            learned: Mutex::new(std::collections::VecDeque::new()),
            local,
            local_task: Mutex::new(local_task),
        });
        // Gossip carries the swarm's announcements (small: far below this message limit).
        let gossip = iroh_gossip::Gossip::builder().max_message_size(4096).spawn(endpoint.clone());
        // Pieces of model weights this node serves (added by whoever holds them; see
        // `shoal_coordinator_free_router::weights`). In memory: pieces are zero-copy views of
        // memory-mapped model files.
        let blobs = iroh_blobs::store::mem::MemStore::new();
        Ok(Self { inner, router: Arc::default(), gossip, blobs, gate })
    }

    /// The handler of the stage protocol ([`ALPN`]): sessions, steps and pings.
    pub fn stage_protocol(&self) -> StageProtocol {
        StageProtocol { inner: self.inner.clone() }
    }

    /// The handler of the admission protocol ([`ADMIT_ALPN`]); open nodes accept it too, to
    /// tell a private node that they hold no key.
    pub fn admit_protocol(&self) -> AdmitProtocol {
        AdmitProtocol { gate: self.gate.clone() }
    }

    /// The handler of iroh-blobs' protocol, serving [`Self::blobs`].
    pub fn blobs_protocol(&self) -> BlobsProtocol {
        BlobsProtocol::new(&self.blobs, None)
    }

    /// Keeps the router that accepts this node's protocols, so that [`Self::shutdown`] shuts
    /// it down (replacing one set before).
    pub fn set_router(&self, router: Router) {
        *lock(&self.router) = Some(router);
    }

    /// Shoal nodes found on the local network by mDNS (empty unless
    /// [`NodeOptions::local_discovery`]); their addresses are known to this node.
    pub fn local_peers(&self) -> Vec<PeerId> {
        lock(&self.inner.local).iter().map(peer_id).collect()
    }

    /// This node's id.
    pub fn id(&self) -> PeerId {
        self.inner.id
    }

    /// This node's iroh endpoint id.
    pub fn endpoint_id(&self) -> EndpointId {
        self.inner.endpoint.id()
    }

    /// The iroh endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The key of the private swarm this node is in (`None`: an open swarm).
    pub fn swarm_key(&self) -> Option<&SwarmKey> {
        self.gate.key()
    }

    /// Runs the admission handshake with `addr` (see [`crate::admission`]): `Ok` when the
    /// peer and this node are in the same swarm (both open, or both holding one key), else
    /// why not ("this swarm is private: ...") or why the handshake failed.
    pub async fn check_admission(&self, addr: EndpointAddr) -> Result<(), AdmissionError> {
        self.gate.dial(addr).await
    }

    /// The gossip protocol of this node (the swarm's membership runs on it).
    pub fn gossip(&self) -> &iroh_gossip::Gossip {
        &self.gossip
    }

    /// The content-addressed store whose blobs this node serves to peers over iroh-blobs
    /// (pieces of model weights).
    pub fn blobs(&self) -> &iroh_blobs::api::Store {
        &self.blobs
    }

    /// How to reach this node: its id and direct addresses (the bound sockets, with an
    /// unspecified bind address replaced by the interfaces' addresses iroh reports).
    pub fn addr(&self) -> EndpointAddr {
        let ep = &self.inner.endpoint;
        let mut addr = EndpointAddr::new(ep.id());
        for s in ep.addr().ip_addrs() {
            addr.addrs.insert(TransportAddr::Ip(*s));
        }
        for s in ep.bound_sockets() {
            if !s.ip().is_unspecified() {
                addr.addrs.insert(TransportAddr::Ip(s));
            } else if addr.ip_addrs().next().is_none() {
                let ip = if s.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
                };
                addr.addrs.insert(TransportAddr::Ip(SocketAddr::new(ip, s.port())));
            }
        }
        for relay in ep.addr().relay_urls() {
            addr.addrs.insert(TransportAddr::Relay(relay.clone()));
        }
        addr
    }

    /// A join ticket for this node (an iroh endpoint ticket: id and addresses).
    pub fn ticket(&self) -> String {
        iroh_tickets::endpoint::EndpointTicket::new(self.addr()).to_string()
    }

    /// This node's entry for an `OpenSession` address book.
    pub fn node_addrs(&self) -> NodeAddrs {
        node_addrs(&self.addr())
    }

    /// Remembers how to reach a peer (from a ticket, an announcement...).
    pub fn add_peer_addr(&self, addr: EndpointAddr) {
        self.inner.lookup.add_endpoint_info(addr);
    }

    /// The address this node knows for `peer`, as an address-book entry.
    pub fn known_addrs(&self, peer: &PeerId) -> NodeAddrs {
        let addrs = endpoint_id(peer)
            .and_then(|id| self.inner.lookup.get_endpoint_info(id))
            .map(|info| info.ip_addrs().copied().take(MAX_NODE_ADDRS).collect())
            .unwrap_or_default();
        NodeAddrs { node_id: *peer, addrs }
    }

    /// Starts serving `service` on a compute thread of its own. A node serves at most one
    /// stage; a second call replaces nothing and returns `false`.
    pub fn serve(&self, service: StageService) -> bool {
        self.serve_with(service, |_| {})
    }

    /// Serves `service` as [`Node::serve`] does, but passes every batch of the stage's actions
    /// through `tamper` before sending them: a stage that lies, for tests of the origin's
    /// spot-checks. Only with the `fault-injection` feature, which the `shoal` binary never
    /// enables.
    #[cfg(feature = "fault-injection")]
    pub fn serve_tampered(
        &self,
        service: StageService,
        tamper: impl FnMut(&mut Vec<Action>) + Send + 'static,
    ) -> bool {
        self.serve_with(service, tamper)
    }

    fn serve_with(
        &self,
        mut service: StageService,
        tamper: impl FnMut(&mut Vec<Action>) + Send + 'static,
    ) -> bool {
        let mut slot = lock(&self.inner.stage);
        if slot.is_some() {
            return false;
        }
        // As the last stage of a route, the service opens what origins seal for this node.
        service.set_identity(self.inner.endpoint.secret_key());
        let (tx, rx) = std::sync::mpsc::sync_channel(STAGE_QUEUE);
        let info = Arc::new(Mutex::new((service.info(), service.stats())));
        let inner = self.inner.clone();
        let snapshot = info.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-stage".into())
            .spawn(move || stage_loop(service, rx, inner, snapshot, tamper));
        if let Err(e) = spawned {
            tracing::error!("could not start the stage thread: {e}");
            return false;
        }
        *slot = Some(StageHandle { tx, info });
        true
    }

    /// The stage's state (span, load), if this node serves one.
    pub fn stage_info(&self) -> Option<PeerInfo> {
        self.inner.stage_info()
    }

    /// The stage's load, if this node serves one.
    pub fn stage_stats(&self) -> Option<StageStats> {
        lock(&self.inner.stage).as_ref().map(|h| lock(&h.info).1)
    }

    /// Stops accepting new sessions; running ones keep being served.
    pub fn drain(&self) {
        self.inner.stage_command(Command::Drain);
    }

    /// Closes every session of the stage, telling each origin (`Draining`) so it reroutes at
    /// once, and waits until the closes are queued.
    pub async fn close_stage_sessions(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.stage_command(Command::Shutdown(tx)) {
            let _ = rx.await;
            // Give the writer tasks a moment to put the frames on the wire.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops serving: closes every session as [`Node::close_stage_sessions`] does, ends the
    /// stage's thread and frees its layers; pings then say the node serves nothing, and it
    /// may [`Node::serve`] another span (a worker moving in the swarm).
    pub async fn stop_serving(&self) {
        self.close_stage_sessions().await;
        lock(&self.inner.stage).take();
    }

    /// Routes replies for `session_id` (results and errors) to the returned channel until it
    /// is dropped.
    pub fn open_session_channel(&self, session_id: u64) -> SessionChannel {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        lock(&self.inner.sessions).insert(session_id, tx);
        SessionChannel { session_id, rx, inner: self.inner.clone() }
    }

    /// Sends a message that belongs to a session this node originates: when it cannot be
    /// delivered, the session's channel receives a `NextHopUnreachable` error from `to`.
    pub fn send_for_session(&self, to: PeerId, session_id: u64, msg: &Message) -> Result<(), NetError> {
        self.inner.send(to, msg, OnFail::Origin(session_id))
    }

    /// Sends a message; delivery failures are only logged.
    pub fn send(&self, to: PeerId, msg: &Message) -> Result<(), NetError> {
        self.inner.send(to, msg, OnFail::Log)
    }

    /// Pings `peer`: the round-trip time and what it says about itself.
    pub async fn ping(
        &self,
        peer: PeerId,
        timeout: Duration,
    ) -> Result<(Duration, Option<PeerInfo>), NetError> {
        let nonce: u64 = rand::random();
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pings).insert((peer, nonce), tx);
        let started = Instant::now();
        let sent = self.inner.send(peer, &Message::Ping { nonce }, OnFail::Log);
        let result = match sent {
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(info)) => Ok((started.elapsed(), info)),
                Ok(Err(_)) => Err(NetError::Closed),
                Err(_) => {
                    Err(NetError::Timeout { what: format!("ping to {}", short(&peer)), after: timeout })
                }
            },
            Err(e) => Err(e),
        };
        lock(&self.inner.pings).remove(&(peer, nonce));
        result
    }

    /// Hands the stage's sessions back to their origins (see
    /// [`Self::close_stage_sessions`]), then closes every connection and the endpoint.
    pub async fn shutdown(&self) {
        if let Some(task) = lock(&self.inner.local_task).take() {
            task.abort();
        }
        self.close_stage_sessions().await;
        self.inner.closing.store(true, std::sync::atomic::Ordering::Relaxed);
        lock(&self.inner.stage).take();
        lock(&self.inner.links).clear();
        let router = lock(&self.router).take();
        match router {
            Some(router) => {
                if let Err(e) = router.shutdown().await {
                    tracing::debug!("router shutdown: {e}");
                }
            }
            None => self.inner.endpoint.close().await,
        }
        // The admission hooks live inside the endpoint: drop their handle on it.
        self.gate.set_endpoint(None);
    }
}

/// An address-book entry for `addr` (IP addresses only, at most [`MAX_NODE_ADDRS`]).
pub fn node_addrs(addr: &EndpointAddr) -> NodeAddrs {
    NodeAddrs { node_id: peer_id(&addr.id), addrs: addr.ip_addrs().copied().take(MAX_NODE_ADDRS).collect() }
}

/// Parses a join ticket into the peer's address.
pub fn parse_ticket(ticket: &str) -> Result<EndpointAddr, NetError> {
    ticket
        .trim()
        .parse::<iroh_tickets::endpoint::EndpointTicket>()
        .map(|t| t.endpoint_addr().clone())
        .map_err(|e| NetError::Ticket(e.to_string()))
}

impl Inner {
    /// Adds addresses learned from a peer's message, keeping at most [`MAX_LEARNED`] such
    /// entries (oldest forgotten first) so a stream of openings naming fresh node ids cannot
    /// grow the address book without bound.
    fn learn(&self, addr: EndpointAddr) {
        let id = addr.id;
        self.lookup.add_endpoint_info(addr);
        let mut learned = lock(&self.learned);
        if learned.contains(&id) {
            return;
        }
        learned.push_back(id);
        if learned.len() > MAX_LEARNED
            && let Some(old) = learned.pop_front()
            && !lock(&self.conns).contains_key(&old)
        {
            self.lookup.remove_endpoint_info(old);
        }
    }

    fn stage_info(&self) -> Option<PeerInfo> {
        lock(&self.stage).as_ref().map(|h| lock(&h.info).0.clone())
    }

    /// Queues a command for the stage; `false` when this node serves no stage. A control
    /// command that finds the queue full waits for room on a blocking thread; messages from
    /// peers go through [`Self::to_stage`], which refuses them instead.
    fn stage_command(&self, cmd: Command) -> bool {
        let Some(tx) = lock(&self.stage).as_ref().map(|h| h.tx.clone()) else {
            return false;
        };
        match tx.try_send(cmd) {
            Ok(()) => true,
            Err(std::sync::mpsc::TrySendError::Full(cmd)) => {
                self.runtime.spawn_blocking(move || tx.send(cmd));
                true
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        }
    }

    fn send(self: &Arc<Self>, to: PeerId, msg: &Message, on_fail: OnFail) -> Result<(), NetError> {
        if to == self.id {
            // A node that is both origin and stage talks to itself without the network.
            self.dispatch(to, msg.clone());
            return Ok(());
        }
        let frame = try_encode(msg).map_err(|source| NetError::Encode { kind: msg.kind_name(), source })?;
        let Some(peer) = endpoint_id(&to) else {
            return Err(NetError::Unreachable { peer: short(&to), reason: "not a valid node id".into() });
        };
        let mut links = lock(&self.links);
        if links.get(&peer).is_some_and(mpsc::Sender::is_closed) {
            links.remove(&peer);
        }
        let link = links.entry(peer).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            self.runtime.spawn(link_task(self.clone(), peer, rx));
            tx
        });
        link.try_send(Outgoing { frame, on_fail }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NetError::Unreachable {
                peer: short(&to),
                reason: format!("{LINK_QUEUE} frames are already queued for it"),
            },
            mpsc::error::TrySendError::Closed(_) => NetError::Closed,
        })
    }

    /// Reports a frame that could not be delivered to `to`.
    fn delivery_failed(self: &Arc<Self>, to: EndpointId, on_fail: OnFail, reason: &str) {
        let detail = format!("{}: {reason}", short(&peer_id(&to)));
        match on_fail {
            OnFail::Log => tracing::debug!("could not deliver a frame to {detail}"),
            OnFail::Stage(session_id) => {
                tracing::info!(session_id, "next hop unreachable: {detail}");
                self.stage_command(Command::NextHopFailed(session_id, detail));
            }
            OnFail::Origin(session_id) => {
                let msg = Message::Error(StageError::new(
                    ErrorCode::NextHopUnreachable,
                    Some(session_id),
                    None,
                    &format!("cannot reach {detail}"),
                ));
                // From this node itself: the driver blames the peer it could not reach.
                self.to_session(session_id, self.id, msg);
            }
        }
    }

    /// A live connection to `peer`, dialing one if needed.
    async fn connection(self: &Arc<Self>, peer: EndpointId) -> Result<Connection, String> {
        let cached = lock(&self.conns).get(&peer).filter(|c| c.close_reason().is_none()).cloned();
        if let Some(c) = cached {
            return Ok(c);
        }
        let timeout = self.options.connect_timeout;
        let conn = match tokio::time::timeout(timeout, self.endpoint.connect(peer, ALPN)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no connection within {timeout:?}")),
        };
        conn.set_max_concurrent_uni_streams(MAX_STREAMS_PER_CONN.into());
        lock(&self.conns).insert(peer, conn.clone());
        self.runtime.spawn(read_connection(self.clone(), conn.clone()));
        Ok(conn)
    }

    /// Routes one decoded message.
    fn dispatch(self: &Arc<Self>, from: PeerId, msg: Message) {
        match msg {
            Message::Ping { nonce } => {
                let pong = Message::Pong { nonce, info: self.stage_info() };
                if let Err(e) = self.send(from, &pong, OnFail::Log) {
                    tracing::debug!("pong: {e}");
                }
            }
            Message::Pong { nonce, info } => {
                if let Some(tx) = lock(&self.pings).remove(&(from, nonce)) {
                    let _ = tx.send(info);
                }
            }
            Message::StepResult(ref r) => self.to_session(r.session_id, from, msg),
            Message::StageOutput(ref o) => self.to_session(o.session_id, from, msg),
            Message::Error(ref e) => match e.session_id {
                Some(id) if lock(&self.sessions).contains_key(&id) => self.to_session(id, from, msg),
                _ => {
                    tracing::info!(from = %short(&from), code = %e.code, message = %e.message, "error from a peer")
                }
            },
            Message::OpenSession(ref open) => {
                // Only the addresses this stage may need: the next hop's and the origin's.
                let next = open.route.get(open.hop_index as usize + 1).map(|h| h.node_id);
                for entry in &open.address_book {
                    let wanted = Some(entry.node_id) == next || entry.node_id == open.origin;
                    if !wanted || entry.node_id == self.id || entry.addrs.is_empty() {
                        continue;
                    }
                    if let Some(id) = endpoint_id(&entry.node_id) {
                        self.learn(EndpointAddr::from_parts(
                            id,
                            entry.addrs.iter().copied().map(TransportAddr::Ip),
                        ));
                    }
                }
                let session_id = open.session_id;
                self.to_stage(from, msg, Some(session_id));
            }
            Message::Step(ref s) => {
                let session_id = s.session_id;
                self.to_stage(from, msg, Some(session_id));
            }
            Message::CloseSession(_) | Message::Tap(_) => {
                self.stage_command(Command::Deliver(from, Box::new(msg)));
            }
        }
    }

    fn to_session(&self, session_id: u64, from: PeerId, msg: Message) {
        let sessions = lock(&self.sessions);
        match sessions.get(&session_id) {
            Some(tx) => {
                if tx.try_send(Inbound { from, msg }).is_err() {
                    tracing::debug!(session_id, from = %short(&from), "a session's reply queue is full: dropped");
                }
            }
            None => tracing::debug!(session_id, "a reply for a session this node does not drive"),
        }
    }

    fn to_stage(self: &Arc<Self>, from: PeerId, msg: Message, session_id: Option<u64>) {
        let step_id = match &msg {
            Message::Step(s) => Some(s.step_id),
            _ => None,
        };
        let tx = lock(&self.stage).as_ref().map(|h| h.tx.clone());
        let err = match tx.map(|tx| tx.try_send(Command::Deliver(from, Box::new(msg)))) {
            Some(Ok(())) => return,
            Some(Err(std::sync::mpsc::TrySendError::Full(_))) => StageError::new(
                ErrorCode::CapacityExceeded,
                session_id,
                step_id,
                &format!("this stage has {STAGE_QUEUE} messages queued; try another replica"),
            ),
            None | Some(Err(std::sync::mpsc::TrySendError::Disconnected(_))) => {
                StageError::new(ErrorCode::Unsupported, session_id, None, "this node serves no layers")
            }
        };
        if let Err(e) = self.send(from, &Message::Error(err), OnFail::Log) {
            tracing::debug!("error reply: {e}");
        }
    }

    /// Answers a frame that failed to decode.
    fn reply_bad_frame(self: &Arc<Self>, from: PeerId, e: &ProtocolError) {
        tracing::info!(from = %short(&from), "refused a frame: {e}");
        let err = StageError::new(e.code(), None, None, &e.to_string());
        if let Err(e) = self.send(from, &Message::Error(err), OnFail::Log) {
            tracing::debug!("error reply: {e}");
        }
    }
}

/// The writer of one peer's queue: one long-lived unidirectional stream on the shared
/// connection; a failed frame is reported and the next one dials again.
async fn link_task(inner: Arc<Inner>, peer: EndpointId, mut rx: mpsc::Receiver<Outgoing>) {
    let mut stream: Option<SendStream> = None;
    loop {
        let out = match tokio::time::timeout(LINK_IDLE, rx.recv()).await {
            Ok(Some(out)) => out,
            Ok(None) => break,
            Err(_) => {
                // Idle: the link goes (a new one starts with the next frame), so links to
                // peers met once do not pile up.
                let mut links = lock(&inner.links);
                if rx.is_empty() {
                    links.remove(&peer);
                    break;
                }
                continue;
            }
        };
        if !inner.options.send_delay.is_zero() {
            tokio::time::sleep(inner.options.send_delay).await;
        }
        if stream.is_none() {
            match inner.connection(peer).await {
                Ok(conn) => match conn.open_uni().await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        lock(&inner.conns).remove(&peer);
                        inner.delivery_failed(peer, out.on_fail, &e.to_string());
                        continue;
                    }
                },
                Err(reason) => {
                    inner.delivery_failed(peer, out.on_fail, &reason);
                    continue;
                }
            }
        }
        if let Some(s) = stream.as_mut() {
            let written = match tokio::time::timeout(FRAME_TIMEOUT, s.write_all(&out.frame)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("the peer took no frame for {FRAME_TIMEOUT:?}")),
            };
            if let Err(e) = written {
                stream = None;
                lock(&inner.conns).remove(&peer);
                inner.delivery_failed(peer, out.on_fail, &e);
            }
        }
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
    }
}

/// Accepts the streams of one connection until it closes.
async fn read_connection(inner: Arc<Inner>, conn: Connection) {
    let from = peer_id(&conn.remote_id());
    loop {
        match conn.accept_uni().await {
            Ok(recv) => {
                inner.runtime.spawn(read_stream(inner.clone(), from, recv));
            }
            Err(e) => {
                tracing::debug!(peer = %short(&from), "connection closed: {e}");
                break;
            }
        }
    }
    let still_connected = {
        let mut conns = lock(&inner.conns);
        if conns.get(&conn.remote_id()).is_some_and(|c| c.stable_id() == conn.stable_id()) {
            conns.remove(&conn.remote_id());
        }
        conns.get(&conn.remote_id()).is_some_and(|c| c.close_reason().is_none())
    };
    if !still_connected && !inner.closing.load(std::sync::atomic::Ordering::Relaxed) {
        // Sessions forwarded to this peer may have lost a frame: reroute them now rather
        // than at the origin's deadline.
        inner.stage_command(Command::PeerGone(from));
    }
}

/// Reads frames from one stream: header, size check, body, decode, dispatch.
async fn read_stream(inner: Arc<Inner>, from: PeerId, mut recv: RecvStream) {
    loop {
        let mut header = [0u8; HEADER_LEN];
        if recv.read_exact(&mut header).await.is_err() {
            return; // finished, reset or connection lost
        }
        let len = match frame_len(header) {
            Ok(n) => n,
            Err(e) => {
                // The framing is lost: nothing after this header can be trusted.
                inner.reply_bad_frame(from, &e);
                let _ = recv.stop(0u32.into());
                return;
            }
        };
        let body = match tokio::time::timeout(FRAME_TIMEOUT, read_body(&mut recv, len)).await {
            Ok(Some(body)) => body,
            Ok(None) => return,
            Err(_) => {
                tracing::info!(peer = %short(&from), "a frame's body did not arrive within {FRAME_TIMEOUT:?}");
                let _ = recv.stop(0u32.into());
                return;
            }
        };
        match decode_body(&body) {
            Ok(msg) => inner.dispatch(from, msg),
            Err(e) => inner.reply_bad_frame(from, &e),
        }
    }
}

/// Reads `len` bytes, the buffer growing as they arrive; `None` when the stream ends first.
async fn read_body(recv: &mut RecvStream, len: usize) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    while body.len() < len {
        let have = body.len();
        let want = (len - have).min(READ_CHUNK);
        body.resize(have + want, 0);
        match recv.read(&mut body[have..]).await {
            Ok(Some(n)) => body.truncate(have + n),
            _ => return None,
        }
    }
    Some(body)
}

/// The iroh protocol handler of the stage ALPN ([`Node::stage_protocol`]).
#[derive(Clone)]
pub struct StageProtocol {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StageProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StageProtocol")
    }
}

impl ProtocolHandler for StageProtocol {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let peer = connection.remote_id();
        {
            let mut incoming = lock(&self.inner.incoming);
            let n = incoming.entry(peer).or_insert(0);
            if *n >= MAX_CONNS_PER_PEER {
                drop(incoming);
                tracing::info!(peer = %peer.fmt_short(), "refused a connection over the per-peer limit");
                connection.close(429u32.into(), b"too many connections from this peer");
                return Ok(());
            }
            *n += 1;
        }
        connection.set_max_concurrent_uni_streams(MAX_STREAMS_PER_CONN.into());
        {
            // Reuse the incoming connection for what we send back unless one is already live.
            let mut conns = lock(&self.inner.conns);
            let live = conns.get(&peer).is_some_and(|c| c.close_reason().is_none());
            if !live {
                conns.insert(peer, connection.clone());
            }
        }
        read_connection(self.inner.clone(), connection).await;
        let mut incoming = lock(&self.inner.incoming);
        if let Some(n) = incoming.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                incoming.remove(&peer);
            }
        }
        Ok(())
    }
}

/// The compute thread of a stage: messages in, actions out, idle sweeps in between.
fn stage_loop(
    mut service: StageService,
    rx: std::sync::mpsc::Receiver<Command>,
    inner: Arc<Inner>,
    snapshot: Arc<Mutex<(PeerInfo, StageStats)>>,
    mut tamper: impl FnMut(&mut Vec<Action>),
) {
    let sweep = inner.options.sweep_interval;
    let mut last_sweep = Instant::now();
    // A command taken from the queue while gathering a batch, to run next.
    let mut held: Option<Command> = None;
    // Messages scheduled for a later round (prefill chunks over the round's budget and what
    // came after them), run before anything that arrives meanwhile.
    let mut deferred: Vec<(PeerId, Message)> = Vec::new();
    // How long the last batch of steps took to compute.
    let mut last_compute = Duration::ZERO;
    loop {
        let cmd = match held.take() {
            Some(cmd) => Some(cmd),
            None if !deferred.is_empty() => match rx.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(std::sync::mpsc::TryRecvError::Empty) => None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            },
            None => match rx.recv_timeout(sweep) {
                Ok(cmd) => Some(cmd),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        let now = Instant::now();
        let mut actions = Vec::new();
        let mut done = None;
        let arrived = match cmd {
            Some(Command::Deliver(from, msg)) => Some((from, *msg)),
            other => {
                held = other;
                None
            }
        };
        if arrived.is_some() || (held.is_none() && !deferred.is_empty()) {
            // Everything already queued goes in together: the service batches the decode
            // steps of distinct sessions into one forward (continuous batching), decode steps
            // first and prefill chunks up to a budget (`schedule`).
            //
            // Sessions in a ring fall out of phase: while one session's step computes, the
            // next step of another arrives, and each would then run alone in turn. With
            // `batch_wait` (stages sharing cores), when other open sessions have no step
            // queued yet, the stage waits a moment (as long as the last compute took, 0.2 to
            // 5 ms) for their steps to join: a batch split in two costs a whole second
            // forward, a wait at most one compute, and the waiting stage's core goes to the
            // other stages. Without it (a stage on its own machine), what is queued runs now.
            let mut msgs = std::mem::take(&mut deferred);
            msgs.extend(arrived);
            let expected = service.stats().sessions.min(MAX_BATCH);
            let wait = last_compute.clamp(BATCH_WAIT_MIN, BATCH_WAIT_MAX);
            let deadline = Instant::now() + wait;
            let is_decode = |m: &Message| matches!(m, Message::Step(s) if crate::service::batchable(s));
            while held.is_none() && msgs.len() < MAX_BATCH {
                let next = match rx.try_recv() {
                    Ok(cmd) => Ok(cmd),
                    Err(_)
                        if inner.options.batch_wait
                            && msgs.len() < expected
                            && msgs.iter().all(|(_, m)| is_decode(m)) =>
                    {
                        match deadline.checked_duration_since(Instant::now()) {
                            Some(left) => rx.recv_timeout(left).map_err(|_| ()),
                            None => Err(()),
                        }
                    }
                    Err(_) => Err(()),
                };
                match next {
                    Ok(Command::Deliver(from, msg)) => msgs.push((from, *msg)),
                    Ok(other) => held = Some(other),
                    Err(()) => break,
                }
            }
            let (mut run, later) = crate::service::schedule(msgs, PREFILL_BUDGET);
            deferred = later;
            let started = Instant::now();
            actions = if run.len() == 1 {
                let (from, msg) = run.remove(0);
                service.handle(from, msg, now)
            } else {
                service.handle_many(run, now)
            };
            last_compute = started.elapsed();
        }
        match held.take() {
            Some(Command::NextHopFailed(session_id, detail)) => {
                actions.extend(service.next_hop_failed(session_id, &detail));
            }
            Some(Command::PeerGone(peer)) => actions.extend(service.peer_gone(peer)),
            Some(Command::Drain) => service.drain(),
            Some(Command::Shutdown(reply)) => {
                actions.extend(service.shutdown_sessions());
                done = Some(reply);
            }
            // Never held (steps are gathered above); if one were, it runs next round.
            Some(Command::Deliver(from, msg)) => deferred.push((from, *msg)),
            None => {}
        }
        if now.duration_since(last_sweep) >= sweep {
            actions.extend(service.sweep_idle(now));
            last_sweep = now;
        }
        tamper(&mut actions);
        for action in actions {
            let sent = match &action {
                Action::ToNext { to, msg } => {
                    let session_id = match msg {
                        Message::OpenSession(m) => Some(m.session_id),
                        Message::Step(m) => Some(m.session_id),
                        _ => None,
                    };
                    let on_fail = session_id.map_or(OnFail::Log, OnFail::Stage);
                    inner.send(*to, msg, on_fail)
                }
                Action::ToOrigin { to, msg } => inner.send(*to, msg, OnFail::Log),
                Action::Closed { session_id } => {
                    tracing::debug!(session_id, "session closed");
                    Ok(())
                }
            };
            if let Err(e) = sent {
                tracing::warn!("could not send: {e}");
            }
        }
        *lock(&snapshot) = (service.info(), service.stats());
        if let Some(reply) = done {
            let _ = reply.send(());
            break;
        }
    }
}
