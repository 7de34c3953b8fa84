//! Signed, expiring gossip announcements and their canonical byte encoding.
//!
//! An [`Announcement`] says "node N serves layers `[start, end)` of model M, in state S, until
//! `issued_at_ms + ttl_ms`". It travels inside a [`Signed`] envelope; [`open`] decodes the body
//! and verifies the signature against the body's `node` (the author, never the forwarder).
//!
//! # Wire format of an announcement body (format version 2)
//!
//! All integers little-endian. The total is 118 + `version_len` + the addresses' and held
//! ranges' bytes (118..=334), and anything longer than [`MAX_ANNOUNCEMENT_BYTES`] is refused
//! before parsing.
//!
//! | offset | size | field           | notes                                             |
//! |-------:|-----:|-----------------|---------------------------------------------------|
//! | 0      | 1    | format          | always [`FORMAT_VERSION`] (1)                     |
//! | 1      | 32   | `node`          | author's public key                               |
//! | 33     | 32   | `model`         |                                                   |
//! | 65     | 4    | `n_layers`      | u32, 1..=[`MAX_LAYERS`]                           |
//! | 69     | 4    | `start`         | u32, `start < end`                                |
//! | 73     | 4    | `end`           | u32, `end <= n_layers`                            |
//! | 77     | 1    | `state`         | 0 = Joining, 1 = Serving, 2 = Draining            |
//! | 78     | 4    | `throughput`    | f32 bits, finite and > 0                          |
//! | 82     | 4    | `load`          | u32                                               |
//! | 86     | 8    | `free_kv_bytes` | u64                                               |
//! | 94     | 8    | `seq`           | u64                                               |
//! | 102    | 8    | `issued_at_ms`  | u64, unix ms by the author's clock                |
//! | 110    | 4    | `ttl_ms`        | u32, [`MIN_TTL_MS`]..=[`MAX_TTL_MS`]              |
//! | 114    | 1    | `version_len`   | u8, 0..=[`MAX_VERSION_BYTES`]                     |
//! | 115    | len  | `version`       | UTF-8                                             |
//! | 115+len| 1    | `n_addrs`       | u8, 0..=[`MAX_ADDRS`]                             |
//! | …      | 7/19 | `addrs[i]`      | family u8 (4 or 6), IP (4 or 16 bytes), port u16  |
//! | …      | 1    | `n_held`        | u8, 0..=[`MAX_HELD_RANGES`]                       |
//! | …      | 8    | `held[i]`       | u32 start, u32 end: layers whose pieces it serves |
//! | …      | 1    | `held_flags`    | bit 0 header and globals, 1 embedding, 2 output norm and LM head |
//!
//! The addresses are where the author accepts connections (its direct socket addresses): with
//! relays and address lookup off, a peer known only by its key could not be dialled. The held
//! ranges and flags say which pieces of the model's manifest (see `shoal_model_shards::manifest`)
//! the author serves to peers that fetch weights: layer pieces by range, the others by flag.
//!
//! # Wire format of a [`Signed`] envelope
//!
//! | offset       | size     | field       |
//! |-------------:|---------:|-------------|
//! | 0            | 2        | `body_len` (u16 LE, at most [`MAX_ANNOUNCEMENT_BYTES`]) |
//! | 2            | body_len | `body`      |
//! | 2 + body_len | 64       | `signature` |
//!
//! Invariant: `decode(&a.encode()) == Ok(a)` exactly when `a.validate()` is `Ok` (encoding is
//! total, so an invalid announcement encodes to bytes that `decode` refuses).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::swarm::{ModelId, PeerId};

/// Leading byte of every encoded announcement body.
pub const FORMAT_VERSION: u8 = 2;
/// Largest accepted encoded body; longer input is refused before parsing.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 352;
/// Most layer ranges of held pieces in one announcement.
pub const MAX_HELD_RANGES: usize = 4;
/// Most socket addresses in one announcement.
pub const MAX_ADDRS: usize = 8;
/// Largest accepted encoded [`Signed`] envelope.
pub const MAX_SIGNED_BYTES: usize = 2 + MAX_ANNOUNCEMENT_BYTES + 64;
/// Largest accepted software version string, in bytes.
pub const MAX_VERSION_BYTES: usize = 32;
/// Largest accepted layer count of a model.
pub const MAX_LAYERS: u32 = 4096;
/// Shortest accepted time-to-live (1 s).
pub const MIN_TTL_MS: u32 = 1_000;
/// Longest accepted time-to-live (10 min).
pub const MAX_TTL_MS: u32 = 600_000;

/// Size of the fixed part of a body (everything before the version bytes).
const FIXED_BYTES: usize = 115;

/// Lifecycle state of a peer, as it announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerState {
    /// Loading its span; not serving yet (contributes no coverage).
    Joining,
    /// Serving its span.
    Serving,
    /// Finishing open sessions before leaving or moving; takes no new ones.
    Draining,
}

impl PeerState {
    /// Lower-case name: `joining`, `serving` or `draining`.
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Joining => "joining",
            PeerState::Serving => "serving",
            PeerState::Draining => "draining",
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            PeerState::Joining => 0,
            PeerState::Serving => 1,
            PeerState::Draining => 2,
        }
    }

    fn from_byte(b: u8) -> Option<PeerState> {
        match b {
            0 => Some(PeerState::Joining),
            1 => Some(PeerState::Serving),
            2 => Some(PeerState::Draining),
            _ => None,
        }
    }
}

/// Which pieces of the model's manifest a peer serves to others (weights fetched from the
/// swarm).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Layer ranges `(start, end)` whose layer pieces it holds, at most [`MAX_HELD_RANGES`].
    pub layers: Vec<(u32, u32)>,
    /// The header and global tensors.
    pub header: bool,
    /// The token embedding.
    pub embedding: bool,
    /// The final norm and the LM head.
    pub output: bool,
}

impl Holdings {
    /// Everything of a model of `n_layers` layers (a node with the whole file).
    pub fn all(n_layers: u32) -> Self {
        Self { layers: vec![(0, n_layers)], header: true, embedding: true, output: true }
    }

    /// Whether the layer pieces of `layer` are held.
    pub fn has_layer(&self, layer: u32) -> bool {
        self.layers.iter().any(|&(s, e)| s <= layer && layer < e)
    }

    fn flags(&self) -> u8 {
        u8::from(self.header) | u8::from(self.embedding) << 1 | u8::from(self.output) << 2
    }
}

/// One node's statement about what it serves. See the module docs for the byte layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    /// The author.
    pub node: PeerId,
    /// The model served.
    pub model: ModelId,
    /// Layer count of the model (1..=[`MAX_LAYERS`]).
    pub n_layers: u32,
    /// First layer served.
    pub start: u32,
    /// One past the last layer served.
    pub end: u32,
    /// Lifecycle state.
    pub state: PeerState,
    /// Tokens per second this node runs through ONE layer at batch 1, measured at start-up.
    pub throughput: f32,
    /// Sessions currently open.
    pub load: u32,
    /// Free KV-cache memory, bytes.
    pub free_kv_bytes: u64,
    /// Software version, at most [`MAX_VERSION_BYTES`] bytes.
    pub version: String,
    /// Strictly increasing per node (replay detection).
    pub seq: u64,
    /// Unix ms by the author's clock.
    pub issued_at_ms: u64,
    /// Validity after `issued_at_ms`, [`MIN_TTL_MS`]..=[`MAX_TTL_MS`].
    pub ttl_ms: u32,
    /// Where the author accepts connections, at most [`MAX_ADDRS`].
    pub addrs: Vec<SocketAddr>,
    /// The pieces of the model's weights the author serves to others.
    pub holds: Holdings,
}

/// Why bytes or an announcement were refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnnounceError {
    /// Input longer than allowed (checked before parsing).
    TooLarge {
        /// Input length.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// Input ended early.
    Truncated,
    /// Bytes left over after a complete value.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// Unknown leading format byte.
    UnknownFormat(u8),
    /// Unknown state byte.
    UnknownState(u8),
    /// Version string longer than [`MAX_VERSION_BYTES`].
    VersionTooLong(usize),
    /// Version string is not UTF-8.
    VersionNotUtf8,
    /// `n_layers` is 0 or above [`MAX_LAYERS`].
    BadLayerCount(u32),
    /// `start >= end`.
    EmptySpan {
        /// First layer.
        start: u32,
        /// One past the last layer.
        end: u32,
    },
    /// `end > n_layers`.
    SpanBeyondModel {
        /// One past the last layer.
        end: u32,
        /// Layer count.
        n_layers: u32,
    },
    /// Throughput not finite or not positive.
    BadThroughput(f32),
    /// TTL outside [`MIN_TTL_MS`]..=[`MAX_TTL_MS`].
    BadTtl(u32),
    /// Envelope body length field above [`MAX_ANNOUNCEMENT_BYTES`].
    BodyTooLarge(usize),
    /// The signature does not verify against the author's key.
    BadSignature,
    /// More than [`MAX_ADDRS`] addresses.
    TooManyAddrs(usize),
    /// An address family byte other than 4 or 6.
    UnknownAddrFamily(u8),
    /// More than [`MAX_HELD_RANGES`] held layer ranges.
    TooManyHeldRanges(usize),
    /// A held layer range that is empty or beyond the model.
    BadHeldRange {
        /// First layer.
        start: u32,
        /// One past the last layer.
        end: u32,
    },
    /// Unknown bits in the held flags.
    UnknownHeldFlags(u8),
}

impl fmt::Display for AnnounceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnnounceError::TooLarge { len, max } => write!(f, "input of {len} bytes exceeds {max}"),
            AnnounceError::Truncated => write!(f, "input is truncated"),
            AnnounceError::TrailingBytes { extra } => write!(f, "{extra} trailing bytes"),
            AnnounceError::UnknownFormat(b) => write!(f, "unknown format version {b}"),
            AnnounceError::UnknownState(b) => write!(f, "unknown peer state {b}"),
            AnnounceError::VersionTooLong(n) => {
                write!(f, "version string of {n} bytes exceeds {MAX_VERSION_BYTES}")
            }
            AnnounceError::VersionNotUtf8 => write!(f, "version string is not UTF-8"),
            AnnounceError::BadLayerCount(n) => write!(f, "layer count {n} not in 1..={MAX_LAYERS}"),
            AnnounceError::EmptySpan { start, end } => write!(f, "empty span [{start}, {end})"),
            AnnounceError::SpanBeyondModel { end, n_layers } => {
                write!(f, "span end {end} beyond model of {n_layers} layers")
            }
            AnnounceError::BadThroughput(t) => write!(f, "throughput {t} is not finite and positive"),
            AnnounceError::BadTtl(t) => write!(f, "ttl {t} ms not in {MIN_TTL_MS}..={MAX_TTL_MS}"),
            AnnounceError::BodyTooLarge(n) => write!(f, "envelope body of {n} bytes is too large"),
            AnnounceError::BadSignature => write!(f, "signature does not verify"),
            AnnounceError::TooManyAddrs(n) => write!(f, "{n} addresses exceed {MAX_ADDRS}"),
            AnnounceError::UnknownAddrFamily(b) => write!(f, "unknown address family {b}"),
            AnnounceError::TooManyHeldRanges(n) => {
                write!(f, "{n} held layer ranges exceed {MAX_HELD_RANGES}")
            }
            AnnounceError::BadHeldRange { start, end } => write!(f, "bad held layer range [{start}, {end})"),
            AnnounceError::UnknownHeldFlags(b) => write!(f, "unknown held flags {b:#x}"),
        }
    }
}

impl std::error::Error for AnnounceError {}

impl Announcement {
    /// Checks every field constraint that [`Announcement::decode`] enforces.
    pub fn validate(&self) -> Result<(), AnnounceError> {
        if self.n_layers == 0 || self.n_layers > MAX_LAYERS {
            return Err(AnnounceError::BadLayerCount(self.n_layers));
        }
        if self.start >= self.end {
            return Err(AnnounceError::EmptySpan { start: self.start, end: self.end });
        }
        if self.end > self.n_layers {
            return Err(AnnounceError::SpanBeyondModel { end: self.end, n_layers: self.n_layers });
        }
        if !self.throughput.is_finite() || self.throughput <= 0.0 {
            return Err(AnnounceError::BadThroughput(self.throughput));
        }
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&self.ttl_ms) {
            return Err(AnnounceError::BadTtl(self.ttl_ms));
        }
        if self.version.len() > MAX_VERSION_BYTES {
            return Err(AnnounceError::VersionTooLong(self.version.len()));
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(AnnounceError::TooManyAddrs(self.addrs.len()));
        }
        if self.holds.layers.len() > MAX_HELD_RANGES {
            return Err(AnnounceError::TooManyHeldRanges(self.holds.layers.len()));
        }
        if let Some(&(start, end)) = self.holds.layers.iter().find(|&&(s, e)| s >= e || e > self.n_layers) {
            return Err(AnnounceError::BadHeldRange { start, end });
        }
        Ok(())
    }

    /// Unix ms (author's clock) after which this announcement is no longer valid.
    pub fn expires_at_ms(&self) -> u64 {
        self.issued_at_ms.saturating_add(u64::from(self.ttl_ms))
    }

    /// Canonical encoding (see the module docs). Total: an announcement that fails
    /// [`Announcement::validate`] still encodes, to bytes that [`Announcement::decode`] refuses.
    pub fn encode(&self) -> Vec<u8> {
        let version = self.version.as_bytes();
        let vlen = version.len().min(usize::from(u8::MAX));
        let mut out = Vec::with_capacity(FIXED_BYTES + vlen + 1 + 19 * self.addrs.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.node);
        out.extend_from_slice(&self.model);
        out.extend_from_slice(&self.n_layers.to_le_bytes());
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.end.to_le_bytes());
        out.push(self.state.to_byte());
        out.extend_from_slice(&self.throughput.to_bits().to_le_bytes());
        out.extend_from_slice(&self.load.to_le_bytes());
        out.extend_from_slice(&self.free_kv_bytes.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.issued_at_ms.to_le_bytes());
        out.extend_from_slice(&self.ttl_ms.to_le_bytes());
        out.push(vlen as u8);
        out.extend_from_slice(&version[..vlen]);
        // Total like the rest: more than MAX_ADDRS encodes a count that decode refuses.
        let n = self.addrs.len().min(usize::from(u8::MAX));
        out.push(n as u8);
        for addr in &self.addrs[..n] {
            match addr.ip() {
                IpAddr::V4(ip) => {
                    out.push(4);
                    out.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    out.push(6);
                    out.extend_from_slice(&ip.octets());
                }
            }
            out.extend_from_slice(&addr.port().to_le_bytes());
        }
        let n = self.holds.layers.len().min(usize::from(u8::MAX));
        out.push(n as u8);
        for &(start, end) in &self.holds.layers[..n] {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&end.to_le_bytes());
        }
        out.push(self.holds.flags());
        out
    }

    /// Parses and validates a canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Announcement, AnnounceError> {
        if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(AnnounceError::TooLarge { len: bytes.len(), max: MAX_ANNOUNCEMENT_BYTES });
        }
        let mut r = Reader { bytes, pos: 0 };
        let format = r.u8()?;
        if format != FORMAT_VERSION {
            return Err(AnnounceError::UnknownFormat(format));
        }
        let node = r.array32()?;
        let model = r.array32()?;
        let n_layers = r.u32()?;
        let start = r.u32()?;
        let end = r.u32()?;
        let state_byte = r.u8()?;
        let state = PeerState::from_byte(state_byte).ok_or(AnnounceError::UnknownState(state_byte))?;
        let throughput = f32::from_bits(r.u32()?);
        let load = r.u32()?;
        let free_kv_bytes = r.u64()?;
        let seq = r.u64()?;
        let issued_at_ms = r.u64()?;
        let ttl_ms = r.u32()?;
        let vlen = usize::from(r.u8()?);
        if vlen > MAX_VERSION_BYTES {
            return Err(AnnounceError::VersionTooLong(vlen));
        }
        let version = std::str::from_utf8(r.take(vlen)?).map_err(|_| AnnounceError::VersionNotUtf8)?;
        let n_addrs = usize::from(r.u8()?);
        if n_addrs > MAX_ADDRS {
            return Err(AnnounceError::TooManyAddrs(n_addrs));
        }
        let mut addrs = Vec::with_capacity(n_addrs);
        for _ in 0..n_addrs {
            let ip = match r.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(r.fixed::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(r.fixed::<16>()?)),
                other => return Err(AnnounceError::UnknownAddrFamily(other)),
            };
            addrs.push(SocketAddr::new(ip, r.u16()?));
        }
        let n_held = usize::from(r.u8()?);
        if n_held > MAX_HELD_RANGES {
            return Err(AnnounceError::TooManyHeldRanges(n_held));
        }
        let mut layers = Vec::with_capacity(n_held);
        for _ in 0..n_held {
            layers.push((r.u32()?, r.u32()?));
        }
        let flags = r.u8()?;
        if flags & !0b111 != 0 {
            return Err(AnnounceError::UnknownHeldFlags(flags));
        }
        let holds =
            Holdings { layers, header: flags & 1 != 0, embedding: flags & 2 != 0, output: flags & 4 != 0 };
        r.finish()?;
        let a = Announcement {
            node,
            model,
            n_layers,
            start,
            end,
            state,
            throughput,
            load,
            free_kv_bytes,
            version: version.to_owned(),
            seq,
            issued_at_ms,
            ttl_ms,
            addrs,
            holds,
        };
        a.validate()?;
        Ok(a)
    }
}

/// A signed envelope as carried by gossip: the encoded announcement and the author's signature
/// over exactly those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// An encoded [`Announcement`].
    pub body: Vec<u8>,
    /// Signature by the body's `node` over `body`.
    pub signature: [u8; 64],
}

impl Signed {
    /// Envelope encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let blen = self.body.len().min(usize::from(u16::MAX));
        let mut out = Vec::with_capacity(2 + blen + 64);
        out.extend_from_slice(&(blen as u16).to_le_bytes());
        out.extend_from_slice(&self.body[..blen]);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses an envelope; the body is not decoded here (see [`open`]).
    pub fn decode(bytes: &[u8]) -> Result<Signed, AnnounceError> {
        if bytes.len() > MAX_SIGNED_BYTES {
            return Err(AnnounceError::TooLarge { len: bytes.len(), max: MAX_SIGNED_BYTES });
        }
        let mut r = Reader { bytes, pos: 0 };
        let blen = usize::from(r.u16()?);
        if blen > MAX_ANNOUNCEMENT_BYTES {
            return Err(AnnounceError::BodyTooLarge(blen));
        }
        let body = r.take(blen)?.to_vec();
        let signature = r.array64()?;
        r.finish()?;
        Ok(Signed { body, signature })
    }
}

/// Decodes the body, then checks the signature against the body's author (`node`) with the
/// injected `verify(author, body, signature)`. Only a fully valid, correctly signed
/// announcement is returned.
pub fn open(
    signed: &Signed,
    verify: impl Fn(&PeerId, &[u8], &[u8; 64]) -> bool,
) -> Result<Announcement, AnnounceError> {
    let a = Announcement::decode(&signed.body)?;
    if !verify(&a.node, &signed.body, &signed.signature) {
        return Err(AnnounceError::BadSignature);
    }
    Ok(a)
}

/// Bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AnnounceError> {
        let end = self.pos.checked_add(n).ok_or(AnnounceError::Truncated)?;
        let s = self.bytes.get(self.pos..end).ok_or(AnnounceError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], AnnounceError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, AnnounceError> {
        Ok(self.fixed::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, AnnounceError> {
        Ok(u16::from_le_bytes(self.fixed()?))
    }

    fn u32(&mut self) -> Result<u32, AnnounceError> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    fn u64(&mut self) -> Result<u64, AnnounceError> {
        Ok(u64::from_le_bytes(self.fixed()?))
    }

    fn array32(&mut self) -> Result<[u8; 32], AnnounceError> {
        self.fixed()
    }

    fn array64(&mut self) -> Result<[u8; 64], AnnounceError> {
        self.fixed()
    }

    fn finish(&self) -> Result<(), AnnounceError> {
        match self.bytes.len() - self.pos {
            0 => Ok(()),
            extra => Err(AnnounceError::TrailingBytes { extra }),
        }
    }
}

#[cfg(test)]
mod tests;
