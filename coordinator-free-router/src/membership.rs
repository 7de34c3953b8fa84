//! The swarm's announcements on the wire, signed with node keys: the link between the pure
//! [`crate::swarm::announce`] format and iroh's ed25519 identities. A node id *is* its
//! public key, so [`verify`] checks a signature against the author named inside the body,
//! never against whoever forwarded the message.
//!
//! [`Membership`] runs the swarm over iroh-gossip: one topic per model identity
//! (and swarm key, see [`topic_of`]); every `interval` the node broadcasts its own signed announcement (when it
//! serves a span) and ticks its view; every message received is decoded, its signature checked
//! against its author, and fed to this node's [`SwarmView`]; the addresses an announcement
//! carries are remembered so its author can be dialled with relays and address lookup off.
//! A new gossip neighbour triggers an announcement at once, so a node joining through a
//! ticket learns its neighbours' spans within a round trip.
//!
//! Both loops are owned by the [`Membership`] and stop when it is dropped, as does
//! [`Membership::follow`], which keeps a pipeline driver's peers equal to the view (so an
//! origin finds its routes in the swarm from one ticket).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iroh::{EndpointAddr, PublicKey, SecretKey, Signature, TransportAddr};
use iroh_gossip::TopicId;
use iroh_gossip::api::Event;
use shoal_worker::admission::SwarmKey;
use shoal_worker::net::{Node, endpoint_id};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use crate::driver::Driver;
use crate::swarm::announce::{AnnounceError, Announcement, Holdings, MAX_ADDRS, PeerState, Signed, open};
use crate::swarm::view::{SwarmView, ViewConfig, ViewEvent};
use crate::swarm::{ModelId, PeerId};

/// Encodes `announcement` and signs the bytes with `key` (whose public key must be
/// `announcement.node` for anyone to accept it).
pub fn sign(key: &SecretKey, announcement: &Announcement) -> Signed {
    let body = announcement.encode();
    let signature = key.sign(&body).to_bytes();
    Signed { body, signature }
}

/// Whether `signature` is `author`'s ed25519 signature over `body`.
pub fn verify(author: &PeerId, body: &[u8], signature: &[u8; 64]) -> bool {
    PublicKey::from_bytes(author).is_ok_and(|key| key.verify(body, &Signature::from_bytes(signature)).is_ok())
}

/// Decodes gossip bytes into an announcement whose author signed it.
pub fn open_bytes(bytes: &[u8]) -> Result<Announcement, AnnounceError> {
    open(&Signed::decode(bytes)?, verify)
}

/// The gossip topic of a model's swarm: a hash of the model's identity, so different models
/// (and different quantizations of one model) never share a topic; for a private swarm, a
/// hash of its key's topic secret too, so its topic differs from the open swarm's and from
/// every other key's (and names nothing an outsider could derive).
pub fn topic_of(model: &ModelId, key: Option<&SwarmKey>) -> TopicId {
    let mut h = blake3::Hasher::new();
    match key {
        None => h.update(b"shoal/swarm/1"),
        Some(key) => h.update(b"shoal/swarm/private/1").update(&key.topic_secret()),
    };
    h.update(model);
    TopicId::from_bytes(*h.finalize().as_bytes())
}

/// What a node says about its own span, asked before each announcement.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnSpan {
    /// First layer served.
    pub start: u32,
    /// One past the last layer served.
    pub end: u32,
    /// Lifecycle state.
    pub state: PeerState,
    /// Tokens per second through one layer at batch 1.
    pub throughput: f32,
    /// Sessions open.
    pub load: u32,
    /// Free KV-cache bytes.
    pub free_kv_bytes: u64,
    /// The pieces of the model's weights this node serves to others.
    pub holds: Holdings,
}

/// Timing of the membership loops.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// How often this node announces itself and ticks its view.
    pub interval: Duration,
    /// How long an announcement stays valid (at least three intervals is sensible).
    pub ttl: Duration,
    /// The view's limits (clock skew, sizes).
    pub view: ViewConfig,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(5), ttl: Duration::from_secs(15), view: ViewConfig::default() }
    }
}

/// Why joining the swarm failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The gossip subscription failed.
    #[error("gossip: {0}")]
    Gossip(String),
}

/// Below this many gossip neighbours a node dials more (peers it knows from its view).
const MIN_NEIGHBOURS: usize = 3;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This node's membership in one model's swarm (see the module docs).
pub struct Membership {
    view: Arc<Mutex<SwarmView>>,
    poke: Arc<Notify>,
    interval: Duration,
    tasks: Mutex<JoinSet<()>>,
}

impl Membership {
    /// Joins `model`'s topic through `bootstrap` (none for the first node) and starts the
    /// loops. `own` is asked before each announcement; `None` announces nothing (an origin
    /// that only routes).
    pub async fn join(
        node: &Node,
        model: ModelId,
        n_layers: u32,
        bootstrap: Vec<EndpointAddr>,
        own: impl Fn() -> Option<OwnSpan> + Send + Sync + 'static,
        config: MembershipConfig,
    ) -> Result<Self, MembershipError> {
        let ids: Vec<iroh::EndpointId> = bootstrap.iter().map(|a| a.id).collect();
        let bootstrap_ids: Vec<PeerId> = ids.iter().map(shoal_worker::net::peer_id).collect();
        for addr in bootstrap {
            node.add_peer_addr(addr);
        }
        let topic = node
            .gossip()
            .subscribe(topic_of(&model, node.swarm_key()), ids)
            .await
            .map_err(|e| MembershipError::Gossip(e.to_string()))?;
        let (sender, mut receiver) = topic.split();
        let view = Arc::new(Mutex::new(SwarmView::new(model, n_layers, config.view.clone())));
        let mut tasks = JoinSet::new();
        let key: SecretKey = node.endpoint().secret_key().clone();
        let me = node.id();
        let ttl_ms = u32::try_from(config.ttl.as_millis()).unwrap_or(u32::MAX);
        let poke = Arc::new(Notify::new());
        let neighbours: Arc<Mutex<HashSet<PeerId>>> = Arc::default();
        {
            let (view, node, poke) = (view.clone(), node.clone(), poke.clone());
            let neighbours = neighbours.clone();
            let mut asked: HashMap<PeerId, u64> = HashMap::new();
            let retry_ms = u64::try_from(config.interval.as_millis()).unwrap_or(u64::MAX).saturating_mul(5);
            tasks.spawn(async move {
                let mut seq = 0u64;
                let mut tick = tokio::time::interval(config.interval);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = poke.notified() => {}
                    }
                    let now = now_ms();
                    lock(&view).handle(ViewEvent::Tick, now);
                    // Keep a few gossip neighbours: dial peers of the view (whose addresses
                    // their announcements brought), the bootstrap peers again, or shoal
                    // nodes found on the local network, so the mesh survives the node
                    // everyone joined through and forms with no ticket on a LAN.
                    let have: HashSet<PeerId> = lock(&neighbours).clone();
                    if have.len() < MIN_NEIGHBOURS {
                        asked.retain(|_, at| now.saturating_sub(*at) < retry_ms);
                        let candidates: Vec<PeerId> = {
                            let v = lock(&view);
                            v.peers()
                                .map(|a| a.node)
                                .chain(bootstrap_ids.iter().copied())
                                .chain(node.local_peers())
                                .collect()
                        };
                        let mut dial = Vec::new();
                        for id in candidates {
                            if id != me
                                && !have.contains(&id)
                                && !asked.contains_key(&id)
                                && !dial.contains(&id)
                            {
                                dial.push(id);
                            }
                            if dial.len() + have.len() >= MIN_NEIGHBOURS {
                                break;
                            }
                        }
                        let endpoints: Vec<_> = dial.iter().filter_map(endpoint_id).collect();
                        if !endpoints.is_empty() {
                            for id in dial {
                                asked.insert(id, now);
                            }
                            if let Err(e) = sender.join_peers(endpoints).await {
                                tracing::debug!("gossip join: {e}");
                            }
                        }
                    }
                    let Some(own) = own() else { continue };
                    // Seq from the clock: stays increasing across restarts with the same key.
                    seq = now.max(seq + 1);
                    let addrs = node.addr().ip_addrs().copied().take(MAX_ADDRS).collect();
                    let a = Announcement {
                        node: me,
                        model,
                        n_layers,
                        start: own.start,
                        end: own.end,
                        state: own.state,
                        throughput: own.throughput,
                        load: own.load,
                        free_kv_bytes: own.free_kv_bytes,
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        seq,
                        issued_at_ms: now,
                        ttl_ms,
                        addrs,
                        holds: own.holds,
                    };
                    lock(&view).handle(ViewEvent::Announced(a.clone()), now);
                    if let Err(e) = sender.broadcast(sign(&key, &a).encode().into()).await {
                        tracing::debug!("announce: {e}");
                    }
                }
            });
        }
        {
            let (view, node, poke) = (view.clone(), node.clone(), poke.clone());
            tasks.spawn(async move {
                while let Some(event) = receiver.next().await {
                    let msg = match event {
                        Ok(Event::Received(msg)) => msg,
                        // A new neighbour (often a node joining through this one) hears this
                        // node's announcement now rather than an interval later.
                        Ok(Event::NeighborUp(id)) => {
                            lock(&neighbours).insert(shoal_worker::net::peer_id(&id));
                            poke.notify_one();
                            continue;
                        }
                        Ok(Event::NeighborDown(id)) => {
                            lock(&neighbours).remove(&shoal_worker::net::peer_id(&id));
                            continue;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::debug!("gossip: {e}");
                            break;
                        }
                    };
                    let a = match open_bytes(&msg.content) {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::debug!(from = %msg.delivered_from.fmt_short(), "ignored an announcement: {e}");
                            continue;
                        }
                    };
                    if a.node != me
                        && !a.addrs.is_empty()
                        && let Some(id) = endpoint_id(&a.node)
                    {
                        let mut addr = EndpointAddr::new(id);
                        for s in &a.addrs {
                            addr.addrs.insert(TransportAddr::Ip(*s));
                        }
                        node.add_peer_addr(addr);
                    }
                    let changes = lock(&view).handle(ViewEvent::Announced(a), now_ms());
                    tracing::trace!(?changes, "announcement");
                }
            });
        }
        Ok(Self { view, poke, interval: config.interval, tasks: Mutex::new(tasks) })
    }

    /// Announces this node now (after a change of span or state) instead of at the next
    /// interval.
    pub fn announce_now(&self) {
        self.poke.notify_one();
    }

    /// The interval between announcements.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Runs `f` on this node's view (placement decisions read it whole).
    pub fn with_view<R>(&self, f: impl FnOnce(&SwarmView) -> R) -> R {
        f(&lock(&self.view))
    }

    /// Keeps `driver`'s swarm peers equal to this view ([`Driver::sync_view`]) at every
    /// interval, pinging newcomers for their round trip, until this membership is dropped.
    pub fn follow(&self, driver: Arc<Driver>) {
        let view = self.view.clone();
        let interval = self.interval;
        lock(&self.tasks).spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let peers: Vec<Announcement> = lock(&view).peers().cloned().collect();
                let fresh = driver.sync_view(&peers);
                if !fresh.is_empty() {
                    driver.refresh_peers(&fresh).await;
                }
            }
        });
    }

    /// The peers this node's view holds now (itself included when it announces), by id.
    pub fn peers(&self) -> Vec<Announcement> {
        lock(&self.view).peers().cloned().collect()
    }

    /// Per-layer serving throughput in this node's view.
    pub fn coverage(&self) -> Vec<f64> {
        lock(&self.view).coverage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::announce::PeerState;

    fn announcement(key: &SecretKey) -> Announcement {
        Announcement {
            node: *key.public().as_bytes(),
            model: [7; 32],
            n_layers: 30,
            start: 0,
            end: 15,
            state: PeerState::Serving,
            throughput: 300.0,
            load: 0,
            free_kv_bytes: 1 << 30,
            version: env!("CARGO_PKG_VERSION").into(),
            seq: 1,
            issued_at_ms: 1_800_000_000_000,
            ttl_ms: 30_000,
            addrs: vec!["127.0.0.1:7000".parse().unwrap()],
            holds: Holdings::all(30),
        }
    }

    #[test]
    fn signed_by_the_author_or_refused() {
        let key = SecretKey::from_bytes(&[1; 32]);
        let a = announcement(&key);
        let signed = sign(&key, &a);
        assert_eq!(open_bytes(&signed.encode()), Ok(a.clone()));
        // Signed by another key: refused, whoever forwards it.
        let mallory = SecretKey::from_bytes(&[2; 32]);
        assert_eq!(open_bytes(&sign(&mallory, &a).encode()), Err(AnnounceError::BadSignature));
        // Mallory's key, her own body claiming to be the author: refused too.
        let mut forged = a.clone();
        forged.end = 30;
        let mut bytes = sign(&key, &a).encode();
        let body = forged.encode();
        bytes[2..2 + body.len()].copy_from_slice(&body);
        assert_eq!(open_bytes(&bytes), Err(AnnounceError::BadSignature));
        // A node id that is not a valid curve point never verifies.
        assert!(!verify(&[0xff; 32], &signed.body, &signed.signature));
        // Garbage is refused without reaching the verifier.
        assert_eq!(open_bytes(&[3, 0, 1, 2, 3]), Err(AnnounceError::Truncated));
    }
}
