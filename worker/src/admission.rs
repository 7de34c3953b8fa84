//! Closed swarms: the swarm key, and the admission every connection of a private swarm
//! passes before any other protocol (stage, gossip, weights) is accepted on it.
//!
//! # The key
//! 32 random bytes in a text file (mode 0600), see [`SwarmKey::to_file_text`]:
//!
//! ```text
//! # shoal swarm key: whoever holds this file can join the swarm. Keep it secret.
//! shoal-swarm-key-v1:<64 hex digits>
//! ```
//!
//! The key itself never travels. Two keys are derived from it with BLAKE3's key derivation:
//! a MAC key for admissions and a topic secret that names the swarm's gossip topic (so a
//! private swarm's topic differs from the open swarm's of the same model and from every
//! other key's).
//!
//! # Admission (ALPN [`ADMIT_ALPN`])
//! Before a node of a private swarm opens any connection to a peer, its endpoint's
//! `before_connect` hook dials the peer on the admission ALPN. QUIC's TLS 1.3 handshake has
//! already authenticated both node ids; on one bidirectional stream:
//!
//! ```text
//! dialer -> acceptor: version (1) | mode (0 open, 1 private) | proof (32 bytes, zero if open)
//! acceptor -> dialer: verdict (1) | proof (32 bytes, zero unless the verdict is ADMITTED)
//! proof = BLAKE3-keyed(mac_key, role | dialer id | acceptor id | TLS exporter of this connection)
//! ```
//!
//! `role` is `D` for the dialer's proof and `A` for the acceptor's, so one side's proof is
//! never valid as the other's. The TLS exporter (RFC 5705) is a secret both ends of this one
//! connection derive from its handshake, so a proof is bound to the connection it was made
//! on: an observer of the traffic (who cannot decrypt it anyway) or a peer relaying proofs
//! between two connections learns nothing it could replay. The dialer checks the acceptor's
//! proof too, so a node never joins an impostor of its swarm.
//!
//! An admitted dialer is remembered by the acceptor for [`ADMISSION_TTL`]; every connection
//! it then opens (any ALPN) passes the `after_handshake` hook. An incoming connection on any
//! other ALPN from a node that is not admitted is closed at the end of the handshake with
//! error code [`REFUSED_CODE`] and a reason that starts with "this swarm is private".
//! Connections are long-lived, so the extra round trip is paid once per connection.
//!
//! Open nodes (no key) install no hooks and accept everything, but answer the admission ALPN
//! too, so a node of either kind learns at once why a peer refuses it ([`AdmissionError`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use iroh::endpoint::{AfterHandshakeOutcome, BeforeConnectOutcome, Connection, EndpointHooks, Side, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::{Endpoint, EndpointAddr, EndpointId};

/// The ALPN of the admission handshake.
pub const ADMIT_ALPN: &[u8] = b"shoal/admit/1";

/// The first word of a swarm key file's key line.
pub const KEY_PREFIX: &str = "shoal-swarm-key-v1:";

/// QUIC application error code of a connection refused for want of admission.
pub const REFUSED_CODE: u32 = 403;

/// How long an acceptor lets an admitted dialer open connections without a new admission.
pub const ADMISSION_TTL: Duration = Duration::from_secs(60);

/// Most admitted dialers remembered at once (entries expire after [`ADMISSION_TTL`]).
const MAX_ADMITTED: usize = 16_384;

const VERSION: u8 = 1;
const MODE_OPEN: u8 = 0;
const MODE_PRIVATE: u8 = 1;
/// Both nodes are open.
const OPEN_OK: u8 = 0;
/// The dialer's proof verified; the acceptor's follows.
const ADMITTED: u8 = 1;
/// The acceptor is private and the dialer has no key.
const NEED_KEY: u8 = 2;
/// The dialer's proof did not verify: another key.
const WRONG_KEY: u8 = 3;
/// The acceptor is open and the dialer private.
const ACCEPTOR_OPEN: u8 = 4;
/// The dialer spoke a version this node does not know.
const BAD_VERSION: u8 = 5;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-shoal-admission-v1";

/// A swarm key: whoever holds it can join the private swarm it names.
#[derive(Clone, PartialEq, Eq)]
pub struct SwarmKey {
    secret: [u8; 32],
}

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwarmKey(hidden)")
    }
}

/// Why a swarm key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SwarmKeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("{path} does not hold a swarm key: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl SwarmKey {
    /// A new random key (from the operating system's generator).
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        Self { secret }
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    /// The file's text: a comment and the key line.
    pub fn to_file_text(&self) -> String {
        let hex: String = self.secret.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "# shoal swarm key: whoever holds this file can join the swarm. Keep it secret.\n{KEY_PREFIX}{hex}\n"
        )
    }

    /// Parses a key file's text: comment lines (`#`) and blank lines, and exactly one key line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let line = lines.next().ok_or("no key line")?;
        if lines.next().is_some() {
            return Err("more than one key line".into());
        }
        let hex = line
            .strip_prefix(KEY_PREFIX)
            .ok_or_else(|| format!("the key line must start with {KEY_PREFIX}"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the key must be 64 hex digits".into());
        }
        let mut secret = [0u8; 32];
        for (i, b) in secret.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Self { secret })
    }

    /// Reads a key file. A file others may read is accepted with a warning.
    pub fn read(path: &Path) -> Result<Self, SwarmKeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SwarmKeyError::Io { path: shown.clone(), source })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!("the swarm key {shown} can be read by other users (chmod 600 it)");
            }
        }
        Self::parse(&text).map_err(|reason| SwarmKeyError::Format { path: shown, reason })
    }

    /// Writes a new random key to `path` (mode 0600); an existing file is never overwritten.
    pub fn write_new(path: &Path) -> Result<Self, SwarmKeyError> {
        let key = Self::generate();
        let io = |source| SwarmKeyError::Io { path: path.display().to_string(), source };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        std::io::Write::write_all(&mut file, key.to_file_text().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(key)
    }

    /// The secret that names the swarm's gossip topic (never the key itself).
    pub fn topic_secret(&self) -> [u8; 32] {
        blake3::derive_key("shoal swarm gossip topic v1", &self.secret)
    }

    fn mac_key(&self) -> [u8; 32] {
        blake3::derive_key("shoal swarm admission v1", &self.secret)
    }

    /// The proof of `role` (`b'D'` dialer, `b'A'` acceptor) on the connection with exporter
    /// secret `binding` between `dialer` and `acceptor`.
    fn proof(
        &self,
        role: u8,
        dialer: &EndpointId,
        acceptor: &EndpointId,
        binding: &[u8; 32],
    ) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key());
        h.update(&[role]);
        h.update(dialer.as_bytes());
        h.update(acceptor.as_bytes());
        h.update(binding);
        h.finalize()
    }
}

/// Why a peer and this node cannot be in one swarm (or the admission did not complete).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// This node has no key; the peer's swarm is private.
    #[error(
        "this swarm is private: {peer} admits only nodes holding its swarm key (start this node with --swarm-key FILE)"
    )]
    NeedKey {
        /// The peer (short id).
        peer: String,
    },
    /// The peer did not accept this node's key.
    #[error("this swarm is private: {peer} refused this node's swarm key (the key belongs to another swarm)")]
    WrongKey {
        /// The peer (short id).
        peer: String,
    },
    /// The peer could not prove it holds this node's key.
    #[error("this swarm is private: {peer} could not prove it holds this swarm's key; not joining it")]
    ImpostorPeer {
        /// The peer (short id).
        peer: String,
    },
    /// The peer runs an open swarm and this node a private one.
    #[error("this swarm is private: {peer} is not a member (it runs an open swarm, without a key)")]
    PeerOpen {
        /// The peer (short id).
        peer: String,
    },
    /// The admission did not complete (unreachable peer, timeout, garbled answer).
    #[error("admission by {peer} failed: {reason}")]
    Failed {
        /// The peer (short id).
        peer: String,
        /// Why.
        reason: String,
    },
}

impl AdmissionError {
    /// Whether the peer answered and the answer is that the two nodes are not in one swarm
    /// (as opposed to a network failure).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::Failed { .. })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The admission state of a node: its key (none in an open swarm) and whom it admitted.
#[derive(Debug)]
pub(crate) struct Gate {
    key: Option<SwarmKey>,
    /// This node's id.
    me: EndpointId,
    /// The node's endpoint, for the hook's own admission dials. Set after binding and taken
    /// at shutdown: hooks live inside the endpoint, so holding it for good would be a cycle.
    endpoint: Mutex<Option<Endpoint>>,
    /// Dialers whose proof verified, until when.
    admitted: Mutex<HashMap<EndpointId, Instant>>,
    timeout: Duration,
}

impl Gate {
    pub(crate) fn new(key: Option<SwarmKey>, me: EndpointId, timeout: Duration) -> Arc<Self> {
        Arc::new(Self { key, me, endpoint: Mutex::new(None), admitted: Mutex::new(HashMap::new()), timeout })
    }

    pub(crate) fn key(&self) -> Option<&SwarmKey> {
        self.key.as_ref()
    }

    pub(crate) fn set_endpoint(&self, endpoint: Option<Endpoint>) {
        *lock(&self.endpoint) = endpoint;
    }

    fn is_admitted(&self, peer: &EndpointId) -> bool {
        lock(&self.admitted).get(peer).is_some_and(|until| *until > Instant::now())
    }

    fn admit(&self, peer: EndpointId) {
        let now = Instant::now();
        let mut admitted = lock(&self.admitted);
        if admitted.len() >= MAX_ADMITTED {
            admitted.retain(|_, until| *until > now);
        }
        if admitted.len() < MAX_ADMITTED || admitted.contains_key(&peer) {
            admitted.insert(peer, now + ADMISSION_TTL);
        }
    }

    /// Runs the dialer's side of the admission with `addr`.
    pub(crate) async fn dial(&self, addr: EndpointAddr) -> Result<(), AdmissionError> {
        let peer = addr.id.fmt_short().to_string();
        let failed = |reason: String| AdmissionError::Failed { peer: peer.clone(), reason };
        let endpoint =
            lock(&self.endpoint).clone().ok_or_else(|| failed("the node is shutting down".into()))?;
        let run = async {
            let conn = endpoint
                .connect(addr, ADMIT_ALPN)
                .await
                .map_err(|e| failed(format!("cannot connect: {e}")))?;
            let result = self.dial_on(&conn, &peer).await;
            conn.close(0u32.into(), b"admission done");
            result
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .unwrap_or_else(|_| Err(failed(format!("no answer within {:?}", self.timeout))))
    }

    async fn dial_on(&self, conn: &Connection, peer: &str) -> Result<(), AdmissionError> {
        let failed = |reason: String| AdmissionError::Failed { peer: peer.to_owned(), reason };
        let me = self.me;
        let them = conn.remote_id();
        let binding = binding(conn).map_err(failed)?;
        let mut hello = [0u8; 34];
        hello[0] = VERSION;
        if let Some(key) = &self.key {
            hello[1] = MODE_PRIVATE;
            hello[2..].copy_from_slice(key.proof(b'D', &me, &them, &binding).as_bytes());
        } else {
            hello[1] = MODE_OPEN;
        }
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
        send.write_all(&hello).await.map_err(|e| failed(e.to_string()))?;
        let _ = send.finish();
        let mut answer = [0u8; 33];
        recv.read_exact(&mut answer).await.map_err(|e| failed(format!("no verdict: {e}")))?;
        let peer = peer.to_owned();
        match (answer[0], &self.key) {
            (OPEN_OK, None) => Ok(()),
            (ADMITTED, Some(key)) => {
                let expected = key.proof(b'A', &me, &them, &binding);
                let given = blake3::Hash::from_bytes(answer[1..].try_into().unwrap_or([0; 32]));
                // blake3::Hash compares in constant time.
                if expected == given { Ok(()) } else { Err(AdmissionError::ImpostorPeer { peer }) }
            }
            (NEED_KEY, _) => Err(AdmissionError::NeedKey { peer }),
            (WRONG_KEY, _) => Err(AdmissionError::WrongKey { peer }),
            (ACCEPTOR_OPEN, _) => Err(AdmissionError::PeerOpen { peer }),
            (BAD_VERSION, _) => Err(failed("the peer speaks another admission version".into())),
            (v, _) => Err(failed(format!("unexpected verdict {v}"))),
        }
    }

    /// Runs the acceptor's side of the admission on `conn`.
    async fn answer(&self, conn: &Connection) -> Result<(), String> {
        let them = conn.remote_id();
        let me = self.me;
        let binding = binding(conn)?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut hello = [0u8; 34];
        recv.read_exact(&mut hello).await.map_err(|e| e.to_string())?;
        let mut answer = [0u8; 33];
        answer[0] = match (hello[0], hello[1], &self.key) {
            (VERSION, MODE_OPEN, None) => OPEN_OK,
            (VERSION, MODE_OPEN, Some(_)) => NEED_KEY,
            (VERSION, MODE_PRIVATE, None) => ACCEPTOR_OPEN,
            (VERSION, MODE_PRIVATE, Some(key)) => {
                let given = blake3::Hash::from_bytes(hello[2..].try_into().unwrap_or([0; 32]));
                if key.proof(b'D', &them, &me, &binding) == given {
                    answer[1..].copy_from_slice(key.proof(b'A', &them, &me, &binding).as_bytes());
                    self.admit(them);
                    ADMITTED
                } else {
                    WRONG_KEY
                }
            }
            _ => BAD_VERSION,
        };
        let verdict = answer[0];
        send.write_all(&answer).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        // Let the dialer read the verdict before the connection goes away.
        conn.closed().await;
        match verdict {
            OPEN_OK | ADMITTED => Ok(()),
            _ => Err(format!("refused {} (verdict {verdict})", them.fmt_short())),
        }
    }
}

/// The connection's exporter secret (RFC 5705): equal at both ends of this connection only.
fn binding(conn: &Connection) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"").map_err(|e| format!("TLS exporter: {e:?}"))?;
    Ok(out)
}

/// The endpoint hooks of a private node: admission before every outgoing connection, and
/// refusal of incoming connections from nodes that were not admitted.
#[derive(Debug)]
pub(crate) struct AdmissionHooks {
    pub(crate) gate: Arc<Gate>,
}

impl EndpointHooks for AdmissionHooks {
    async fn before_connect<'a>(&'a self, remote: &'a EndpointAddr, alpn: &'a [u8]) -> BeforeConnectOutcome {
        if alpn == ADMIT_ALPN || self.gate.key.is_none() {
            return BeforeConnectOutcome::Accept;
        }
        match self.gate.dial(remote.clone()).await {
            Ok(()) => BeforeConnectOutcome::Accept,
            Err(e) => {
                tracing::warn!(alpn = %String::from_utf8_lossy(alpn), "not connecting: {e}");
                BeforeConnectOutcome::Reject
            }
        }
    }

    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        if self.gate.key.is_none()
            || conn.alpn() == ADMIT_ALPN
            || conn.side() == Side::Client
            || self.gate.is_admitted(&conn.remote_id())
        {
            return AfterHandshakeOutcome::accept();
        }
        tracing::info!(
            peer = %conn.remote_id().fmt_short(),
            alpn = %String::from_utf8_lossy(conn.alpn()),
            "refused a connection from a node that was not admitted"
        );
        AfterHandshakeOutcome::Reject {
            error_code: VarInt::from_u32(REFUSED_CODE),
            reason: b"this swarm is private: this node accepts only members of its swarm (admission on shoal/admit/1 first)"
                .to_vec(),
        }
    }
}

/// The protocol handler of [`ADMIT_ALPN`] (open and private nodes alike); see
/// [`crate::net::Node::admit_protocol`].
#[derive(Debug, Clone)]
pub struct AdmitProtocol {
    pub(crate) gate: Arc<Gate>,
}

impl ProtocolHandler for AdmitProtocol {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        match tokio::time::timeout(self.gate.timeout, self.gate.answer(&connection)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::info!("admission: {e}"),
            Err(_) => tracing::debug!("admission: no hello within {:?}", self.gate.timeout),
        }
        connection.close(0u32.into(), b"admission done");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_refuses_garbage() {
        let key = SwarmKey::generate();
        assert_ne!(key, SwarmKey::generate(), "keys are random");
        let text = key.to_file_text();
        assert!(text.starts_with("# "), "{text}");
        assert_eq!(SwarmKey::parse(&text), Ok(key.clone()));
        assert!(!format!("{key:?}").contains(&text[text.len() - 10..text.len() - 1]), "Debug hides the key");
        let hex = "ab".repeat(32);
        for bad in [
            String::new(),
            "# only a comment\n".into(),
            hex.clone(),
            format!("{KEY_PREFIX}{}", &hex[..62]),
            format!("{KEY_PREFIX}{}zz", &hex[..62]),
            format!("{KEY_PREFIX}{hex}\n{KEY_PREFIX}{hex}\n"),
        ] {
            assert!(SwarmKey::parse(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            SwarmKey::parse(&format!("\n  {KEY_PREFIX}{hex}  \n")),
            Ok(SwarmKey::from_bytes([0xab; 32]))
        );
    }

    #[test]
    fn new_key_file_is_private_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("shoal-swarm-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("swarm.key");
        let key = SwarmKey::write_new(&path).unwrap();
        assert_eq!(SwarmKey::read(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(SwarmKey::write_new(&path).is_err(), "an existing key is kept");
        assert_eq!(SwarmKey::read(&path).unwrap(), key);
        std::fs::write(&path, "nope").unwrap();
        let err = SwarmKey::read(&path).unwrap_err().to_string();
        assert!(err.contains("does not hold a swarm key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proofs_bind_role_ids_connection_and_key() {
        let key = SwarmKey::from_bytes([1; 32]);
        let other = SwarmKey::from_bytes([2; 32]);
        let a = iroh::SecretKey::from_bytes(&[3; 32]).public();
        let b = iroh::SecretKey::from_bytes(&[4; 32]).public();
        let c = iroh::SecretKey::from_bytes(&[5; 32]).public();
        let p = key.proof(b'D', &a, &b, &[9; 32]);
        assert_eq!(p, key.proof(b'D', &a, &b, &[9; 32]));
        assert_ne!(p, key.proof(b'A', &a, &b, &[9; 32]), "role");
        assert_ne!(p, key.proof(b'D', &b, &a, &[9; 32]), "direction");
        assert_ne!(p, key.proof(b'D', &a, &c, &[9; 32]), "acceptor");
        assert_ne!(p, key.proof(b'D', &a, &b, &[8; 32]), "connection");
        assert_ne!(p, other.proof(b'D', &a, &b, &[9; 32]), "key");
        assert_ne!(key.topic_secret(), other.topic_secret());
        assert_ne!(key.topic_secret(), key.mac_key());
    }
}
