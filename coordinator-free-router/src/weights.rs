//! Weights from the swarm: every node seeds the pieces of the model it holds, and a node
//! without the model fetches just the pieces it needs from peers that hold them.
//!
//! A model is a [`Manifest`] of pieces (see `shoal_model_shards::manifest`) whose hash is the
//! model id. Pieces travel over iroh-blobs on each node's endpoint ([`Node::blobs`]):
//! - **Seeding** ([`seed`]): a node adds each piece it holds to its blob store as a zero-copy
//!   view of the memory-mapped file (no copy on disk or in memory), which hashes it once; a
//!   piece whose bytes do not match the manifest (a bad disk) is not served and is reported.
//!   Its announcements say which pieces it serves ([`holdings`]).
//! - **Fetching** ([`fetch_pieces`]): pieces are fetched concurrently, each from the peers
//!   that announce it, in random order, verified chunk by chunk as they arrive (BLAKE3
//!   verified streaming), so a corrupted or lying peer is caught at the first bad chunk. A
//!   peer that fails verification is avoided for the rest of the fetch and logged; a peer that
//!   disconnects or stalls is skipped, and the next one is asked only for the missing ranges.
//! - **A mirror** ([`Mirror`], optional): an HTTP copy of the model file (the Hugging Face
//!   Hub's, say) asked, by byte ranges, for the pieces no peer could provide; what it sends
//!   must hash to the manifest's BLAKE3 hash of the piece, or it is refused.
//! - **Storage** ([`PieceDir`]): a node's data dir holds, per model id, the manifest, a sparse
//!   copy of the file with every fetched piece at its own offset (so the model loads from it as
//!   from the whole file) and the list of complete pieces. A piece is recorded only after its
//!   bytes are written and synced, so a crash loses at most the pieces in flight, and a restart
//!   fetches only what is missing.
//! - **Cache budget** ([`make_room`]): a data dir may be given a budget; before a fetch, the
//!   least recently used complete pieces (of any model in the dir) are evicted until the fetch
//!   fits, never a piece the node uses. An evicted piece is forgotten first, then its bytes are
//!   freed (a hole punched in the sparse file, on Linux), so a crash in between never leaves a
//!   piece recorded complete without its bytes.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use iroh::EndpointId;
use iroh_blobs::Hash;
use iroh_blobs::api::remote::GetProgressItem;
use iroh_blobs::store::mem::MemStore;
use shoal_model_shards::manifest::{Manifest, Piece, PieceKind};
use shoal_worker::net::{Node, endpoint_id, short};
use tokio_stream::StreamExt;

use crate::swarm::PeerId;
use crate::swarm::announce::{Announcement, Holdings, MAX_HELD_RANGES};

/// Errors of seeding and fetching weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The cache budget cannot hold the pieces in use and the ones to fetch.
    #[error(
        "the cache budget of {budget_mib:.1} MiB cannot hold the pieces this node uses and the ones it \
         must fetch ({need_mib:.1} MiB in all): raise --cache-budget"
    )]
    Budget {
        /// The budget.
        budget_mib: f64,
        /// What the pieces in use and the fetch take.
        need_mib: f64,
    },
    /// A local file or directory could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is malformed, or a local file does not match it.
    #[error(transparent)]
    Model(#[from] shoal_model_shards::Error),
    /// No peer could provide a piece.
    #[error("no peer could provide {what}: {why}")]
    Unavailable {
        /// The piece or manifest.
        what: String,
        /// What each peer tried said.
        why: String,
    },
    /// The blob store failed.
    #[error("blob store: {0}")]
    Store(String),
}

type Result<T> = std::result::Result<T, WeightsError>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WeightsError + 'a {
    move |source| WeightsError::Io { what, path: path.to_path_buf(), source }
}

/// A piece's name for messages: `layer 12`, `header`...
pub fn piece_name(p: &Piece) -> String {
    match p.kind {
        PieceKind::Header => "the header".into(),
        PieceKind::Embedding => "the embedding".into(),
        PieceKind::Layer(i) => format!("layer {i}"),
        PieceKind::OutputNorm => "the output norm".into(),
        PieceKind::LmHead => "the LM head".into(),
        PieceKind::Globals => "the global tensors".into(),
    }
}

/// A byte range of a memory-mapped file, as the owner of a zero-copy [`Bytes`].
struct MapSlice {
    map: Arc<memmap2::Mmap>,
    range: Range<usize>,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

fn piece_bytes(map: &Arc<memmap2::Mmap>, piece: &Piece) -> Option<Bytes> {
    let range = |&[off, len]: &[u64; 2]| -> Option<Range<usize>> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        (end <= map.len()).then_some(start..end)
    };
    if let [one] = piece.ranges.as_slice() {
        return Some(Bytes::from_owner(MapSlice { map: map.clone(), range: range(one)? }));
    }
    // Rare (a layer's tensors split by another's): one copy of the piece.
    let mut out = Vec::with_capacity(usize::try_from(piece.len()).ok()?);
    for r in &piece.ranges {
        out.extend_from_slice(&map[range(r)?]);
    }
    Some(out.into())
}

/// Serves `pieces` of the model file at `path` (the whole file, or a [`PieceDir`]'s sparse
/// copy) from `node`'s blob store, with the manifest itself. Each piece is hashed as it is
/// added; those whose bytes do not match the manifest are left out and logged. Returns the
/// pieces served.
pub async fn seed(node: &Node, path: &Path, manifest: &Manifest, pieces: &[usize]) -> Result<Vec<usize>> {
    let file = File::open(path).map_err(io("opening", path))?;
    // SAFETY: mapped read-only; the file is not truncated while served (a node's own model file
    // or its data dir's copy, which only grows by whole pieces).
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io("mapping", path))?);
    let store = node.blobs();
    store.add_bytes(manifest.to_bytes()).await.map_err(|e| WeightsError::Store(e.to_string()))?;
    let mut served = Vec::with_capacity(pieces.len());
    for &i in pieces {
        let Some(piece) = manifest.pieces.get(i) else { continue };
        let Some(bytes) = piece_bytes(&map, piece) else {
            tracing::warn!(path = %path.display(), "{} lies beyond the file: not served", piece_name(piece));
            continue;
        };
        let tag = store.add_bytes(bytes).await.map_err(|e| WeightsError::Store(e.to_string()))?;
        if tag.hash.as_bytes() != &piece.hash_bytes()? {
            tracing::warn!(
                path = %path.display(),
                "{} of the local file does not match the model's manifest (a damaged file?): not served",
                piece_name(piece)
            );
            continue;
        }
        served.push(i);
    }
    Ok(served)
}

/// What an announcement says of `pieces`: layer pieces as at most [`MAX_HELD_RANGES`] ranges
/// (the longest ones when there are more), the others as flags.
pub fn holdings(manifest: &Manifest, pieces: &[usize]) -> Holdings {
    let kinds: BTreeSet<PieceKind> =
        pieces.iter().filter_map(|&i| manifest.pieces.get(i)).map(|p| p.kind).collect();
    let has = |k| kinds.contains(&k);
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for k in &kinds {
        if let PieceKind::Layer(i) = *k {
            match ranges.last_mut() {
                Some(r) if r.1 == i => r.1 = i + 1,
                _ => ranges.push((i, i + 1)),
            }
        }
    }
    if ranges.len() > MAX_HELD_RANGES {
        ranges.sort_by_key(|r| std::cmp::Reverse(r.1 - r.0));
        ranges.truncate(MAX_HELD_RANGES);
        ranges.sort_unstable();
    }
    let tied = manifest.index_of(PieceKind::LmHead).is_none();
    Holdings {
        layers: ranges,
        header: has(PieceKind::Header)
            && (manifest.index_of(PieceKind::Globals).is_none() || has(PieceKind::Globals)),
        embedding: has(PieceKind::Embedding),
        output: has(PieceKind::OutputNorm) && (tied || has(PieceKind::LmHead)),
    }
}

/// Whether an announcement says its author serves `piece`.
pub fn announces(a: &Announcement, piece: &Piece) -> bool {
    match piece.kind {
        PieceKind::Header | PieceKind::Globals => a.holds.header,
        PieceKind::Layer(i) => a.holds.has_layer(i),
        PieceKind::Embedding => a.holds.embedding,
        PieceKind::OutputNorm | PieceKind::LmHead => a.holds.output,
    }
}

/// A model's pieces in a node's data dir: `DIR/models/<id>/` with `manifest.json`,
/// `model.gguf` (sparse: only fetched pieces are written), `pieces.json` (the complete
/// pieces' indices) and `used.json` (when each piece was last used, for the cache budget).
#[derive(Debug)]
pub struct PieceDir {
    dir: PathBuf,
    manifest: Manifest,
    complete: Mutex<BTreeSet<usize>>,
    /// Piece index → last use (milliseconds since the Unix epoch).
    used: Mutex<std::collections::BTreeMap<usize, u64>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Frees the disk blocks of `len` bytes at `off` in `file` (they read as zeros after).
#[cfg(target_os = "linux")]
fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::other("range beyond the file"));
    };
    // SAFETY: a plain system call on a file descriptor this function borrows for its duration.
    let r = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
    };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Elsewhere the bytes are overwritten with zeros (the disk space stays allocated).
#[cfg(not(target_os = "linux"))]
fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 16];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], off + at)?;
        at += n;
    }
    Ok(())
}

impl PieceDir {
    /// The directory of `model_id` under `data_dir`.
    pub fn path_for(data_dir: &Path, model_id: &[u8; 32]) -> PathBuf {
        let hex: String = model_id.iter().map(|b| format!("{b:02x}")).collect();
        data_dir.join("models").join(hex)
    }

    /// Opens the data dir's copy of `model_id` if its manifest is there.
    pub fn open(data_dir: &Path, model_id: &[u8; 32]) -> Result<Option<Self>> {
        let dir = Self::path_for(data_dir, model_id);
        let path = dir.join("manifest.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let manifest = Manifest::from_bytes(&bytes, Some(*model_id))?;
        let complete: BTreeSet<usize> = match std::fs::read(dir.join("pieces.json")) {
            Ok(b) => serde_json::from_slice::<Vec<usize>>(&b)
                .unwrap_or_default()
                .into_iter()
                .filter(|&i| i < manifest.pieces.len())
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        let file = dir.join("model.gguf");
        let size = std::fs::metadata(&file).map(|m| m.len()).ok();
        let complete = if size == Some(manifest.file_size) { complete } else { BTreeSet::new() };
        let used = std::fs::read(dir.join("used.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<(usize, u64)>>(&b).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|(i, _)| complete.contains(i))
            .collect();
        let this = Self { dir, manifest, complete: Mutex::new(complete), used: Mutex::new(used) };
        this.ensure_file()?;
        Ok(Some(this))
    }

    /// Creates (or reuses) the data dir's copy of `manifest`'s model.
    pub fn create(data_dir: &Path, manifest: Manifest) -> Result<Self> {
        let id = manifest.id();
        if let Some(existing) = Self::open(data_dir, &id)? {
            return Ok(existing);
        }
        let dir = Self::path_for(data_dir, &id);
        std::fs::create_dir_all(&dir).map_err(io("creating the data dir", &dir))?;
        write_atomically(&dir.join("manifest.json"), &manifest.to_bytes())?;
        let this = Self { dir, manifest, complete: Mutex::new(BTreeSet::new()), used: Mutex::default() };
        this.ensure_file()?;
        Ok(this)
    }

    /// Makes the sparse file exist with the model file's size (holes take no disk space).
    fn ensure_file(&self) -> Result<()> {
        let path = self.file();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("creating", &path))?;
        if f.metadata().map_err(io("reading", &path))?.len() != self.manifest.file_size {
            f.set_len(self.manifest.file_size).map_err(io("sizing", &path))?;
        }
        Ok(())
    }

    /// The model's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The sparse model file (opens as a GGUF once the header is in).
    pub fn file(&self) -> PathBuf {
        self.dir.join("model.gguf")
    }

    /// Pieces already complete.
    pub fn complete(&self) -> Vec<usize> {
        lock(&self.complete).iter().copied().collect()
    }

    /// Of `want`, the pieces not yet complete.
    pub fn missing(&self, want: &[usize]) -> Vec<usize> {
        let done = lock(&self.complete);
        want.iter().copied().filter(|i| !done.contains(i)).collect()
    }

    /// Forgets pieces (e.g. that failed verification when seeded), so they are fetched again.
    pub fn forget(&self, pieces: &[usize]) -> Result<()> {
        let mut done = lock(&self.complete);
        for i in pieces {
            done.remove(i);
        }
        self.save(&done)
    }

    /// Bytes of the complete pieces.
    pub fn held_bytes(&self) -> u64 {
        self.manifest.bytes_of(&self.complete())
    }

    /// Records that `pieces` were used now (fetched, loaded, served): the cache budget evicts
    /// the least recently used first.
    pub fn touch(&self, pieces: &[usize]) -> Result<()> {
        let now = now_ms();
        let done = lock(&self.complete);
        let mut used = lock(&self.used);
        for &i in pieces.iter().filter(|i| done.contains(i)) {
            used.insert(i, now);
        }
        let list: Vec<(usize, u64)> = used.iter().map(|(&i, &t)| (i, t)).collect();
        drop(used);
        write_atomically(&self.dir.join("used.json"), &serde_json::to_vec(&list).unwrap_or_default())
    }

    /// The complete pieces not in `keep`, least recently used first, with their sizes.
    fn eviction_order(&self, keep: &BTreeSet<usize>) -> Vec<(u64, usize, u64)> {
        let used = lock(&self.used);
        let mut order: Vec<(u64, usize, u64)> = lock(&self.complete)
            .iter()
            .filter(|i| !keep.contains(i))
            .filter_map(|&i| {
                let len = self.manifest.pieces.get(i)?.len();
                Some((used.get(&i).copied().unwrap_or(0), i, len))
            })
            .collect();
        order.sort_unstable();
        order
    }

    /// Evicts `pieces`: forgets them, then frees their bytes in the sparse file. Returns the
    /// bytes freed.
    pub fn evict(&self, pieces: &[usize]) -> Result<u64> {
        self.forget(pieces)?;
        {
            let mut used = lock(&self.used);
            for i in pieces {
                used.remove(i);
            }
        }
        let path = self.file();
        let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io("opening", &path))?;
        let mut freed = 0;
        for piece in pieces.iter().filter_map(|&i| self.manifest.pieces.get(i)) {
            for &[off, len] in &piece.ranges {
                punch_hole(&f, off, len).map_err(io("freeing a piece of", &path))?;
            }
            freed += piece.len();
        }
        Ok(freed)
    }

    /// Writes a verified piece at its offsets, syncs, then records it as complete.
    fn write_piece(&self, index: usize, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let piece =
            self.manifest.pieces.get(index).ok_or_else(|| WeightsError::Store("bad piece index".into()))?;
        if bytes.len() as u64 != piece.len() {
            return Err(WeightsError::Store(format!(
                "{} came with {} bytes, the manifest says {}",
                piece_name(piece),
                bytes.len(),
                piece.len()
            )));
        }
        let path = self.file();
        let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io("opening", &path))?;
        let mut at = 0usize;
        for &[off, len] in &piece.ranges {
            let len = len as usize;
            f.write_all_at(&bytes[at..at + len], off).map_err(io("writing a piece to", &path))?;
            at += len;
        }
        f.sync_data().map_err(io("syncing", &path))?;
        let mut done = lock(&self.complete);
        done.insert(index);
        self.save(&done)?;
        drop(done);
        self.touch(&[index])
    }

    fn save(&self, done: &BTreeSet<usize>) -> Result<()> {
        let list: Vec<usize> = done.iter().copied().collect();
        write_atomically(&self.dir.join("pieces.json"), &serde_json::to_vec(&list).unwrap_or_default())
    }
}

/// What [`make_room`] evicted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Pieces evicted, as (model id, piece index).
    pub pieces: Vec<([u8; 32], usize)>,
    /// Their bytes.
    pub bytes: u64,
}

/// Makes room in `data_dir` for `need` more bytes under `budget`: evicts the least recently
/// used complete pieces of the dir's models, never one of `current`'s pieces in `keep` (the
/// pieces the node uses and the ones it is about to fetch). `current` is the node's own open
/// copy of its model (the dir's other models are opened here). Fails, evicting nothing, when
/// the pieces in `keep` and `need` alone exceed the budget.
pub fn make_room(
    data_dir: &Path,
    budget: u64,
    current: &PieceDir,
    keep: &BTreeSet<usize>,
    need: u64,
) -> Result<Evicted> {
    let current_id = current.manifest.id();
    let mut others = Vec::new();
    if let Ok(entries) = std::fs::read_dir(data_dir.join("models")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = parse_model_dir(&name.to_string_lossy()) else { continue };
            if id == current_id {
                continue;
            }
            if let Ok(Some(dir)) = PieceDir::open(data_dir, &id) {
                others.push(dir);
            }
        }
    }
    let kept = current
        .manifest
        .bytes_of(&current.complete().into_iter().filter(|i| keep.contains(i)).collect::<Vec<_>>());
    let held: u64 = current.held_bytes() + others.iter().map(PieceDir::held_bytes).sum::<u64>();
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    if kept + need > budget {
        return Err(WeightsError::Budget { budget_mib: mib(budget), need_mib: mib(kept + need) });
    }
    let none = BTreeSet::new();
    // (last use, dir index, piece, bytes); dir 0 is the current model.
    let mut order: Vec<(u64, usize, usize, u64)> = Vec::new();
    for (d, dir) in std::iter::once(current).chain(others.iter()).enumerate() {
        let keep = if d == 0 { keep } else { &none };
        order.extend(dir.eviction_order(keep).into_iter().map(|(t, i, len)| (t, d, i, len)));
    }
    order.sort_unstable();
    let mut over = (held + need).saturating_sub(budget);
    let mut chosen: Vec<Vec<usize>> = vec![Vec::new(); others.len() + 1];
    for (_, d, i, len) in order {
        if over == 0 {
            break;
        }
        chosen[d].push(i);
        over = over.saturating_sub(len);
    }
    let mut evicted = Evicted::default();
    for (d, dir) in std::iter::once(current).chain(others.iter()).enumerate() {
        if chosen[d].is_empty() {
            continue;
        }
        evicted.bytes += dir.evict(&chosen[d])?;
        let id = dir.manifest.id();
        evicted.pieces.extend(chosen[d].iter().map(|&i| (id, i)));
    }
    Ok(evicted)
}

fn parse_model_dir(name: &str) -> Option<[u8; 32]> {
    if name.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (k, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * k..2 * k + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Writes `path` through a temporary file of this process, so two processes sharing a data
/// dir never interleave their writes.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let mut f = File::create(&tmp).map_err(io("writing", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("writing", path))
}

/// The future of one byte-range read from a [`Mirror`].
pub type RangeRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<Bytes, String>> + Send>>;

/// A copy of the model file outside the swarm (e.g. a GGUF on the Hugging Face Hub), read by
/// byte ranges: `read(offset, len)` returns exactly those bytes of the file, or why not.
#[derive(Clone)]
pub struct Mirror {
    /// Where it is, for messages.
    pub name: String,
    /// Reads `len` bytes at `offset` of the file.
    pub read: Arc<dyn Fn(u64, u64) -> RangeRead + Send + Sync>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Mirror {
    /// Reads `piece` (its byte ranges, concatenated) and checks its hash.
    async fn piece(&self, piece: &Piece) -> std::result::Result<Bytes, String> {
        let mut out = Vec::with_capacity(usize::try_from(piece.len()).map_err(|e| e.to_string())?);
        for &[off, len] in &piece.ranges {
            let got = (self.read)(off, len).await?;
            if got.len() as u64 != len {
                return Err(format!("asked for {len} bytes at {off}, got {}", got.len()));
            }
            out.extend_from_slice(&got);
        }
        let want = piece.hash_bytes().map_err(|e| e.to_string())?;
        if blake3::hash(&out).as_bytes() != &want {
            return Err(
                "its bytes fail verification against the manifest (another file, or corrupted)".into()
            );
        }
        Ok(out.into())
    }
}

/// How fetching behaves.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Pieces fetched at once (each from its own provider).
    pub concurrency: usize,
    /// Dialing a provider may take this long.
    pub connect_timeout: Duration,
    /// A provider that sends nothing for this long is skipped.
    pub stall_timeout: Duration,
    /// Try a piece's providers in random order (spreads the load over seeders); `false`
    /// keeps the order given (tests).
    pub shuffle: bool,
    /// Asked for the pieces no peer could provide.
    pub mirror: Option<Mirror>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
            shuffle: true,
            mirror: None,
        }
    }
}

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// Pieces fetched.
    pub pieces: usize,
    /// Verified bytes received (pieces' bytes; more than their sum only when a provider failed
    /// part-way and another sent the rest).
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Providers caught sending bytes that fail verification.
    pub corrupt_peers: Vec<PeerId>,
    /// Provider failures that were recovered from (disconnects, stalls, corrupt data).
    pub failovers: usize,
    /// Pieces that came from the mirror ([`FetchConfig::mirror`]).
    pub mirror_pieces: usize,
}

/// Progress of a fetch: verified bytes so far and the total to fetch.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// The peers that announce a piece.
pub type Providers = Arc<dyn Fn(&Piece) -> Vec<PeerId> + Send + Sync>;

/// Fetches the manifest of `model_id` from `providers` (any peer of the swarm serves it).
pub async fn fetch_manifest(node: &Node, model_id: [u8; 32], providers: &[PeerId]) -> Result<Manifest> {
    let store = MemStore::new();
    let hash = Hash::from_bytes(model_id);
    let mut why = Vec::new();
    for p in providers {
        match fetch_from(node, &store, hash, *p, &FetchConfig::default(), &|_| {}).await {
            Ok(_) => {
                let bytes = store.get_bytes(hash).await.map_err(|e| WeightsError::Store(e.to_string()))?;
                return Ok(Manifest::from_bytes(&bytes, Some(model_id))?);
            }
            Err(e) => why.push(format!("{}: {}", short(p), e.message)),
        }
    }
    Err(WeightsError::Unavailable { what: "the model's manifest".into(), why: join_why(why) })
}

fn join_why(why: Vec<String>) -> String {
    if why.is_empty() { "no peer announces it".into() } else { why.join("; ") }
}

struct FetchFailure {
    message: String,
    /// The provider sent bytes that fail verification.
    corrupt: bool,
    /// No connection could be made.
    unreachable: bool,
}

/// One provider's attempt at `hash` into `store` (asks only for what `store` lacks).
async fn fetch_from(
    node: &Node,
    store: &MemStore,
    hash: Hash,
    provider: PeerId,
    config: &FetchConfig,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> std::result::Result<(), FetchFailure> {
    let fail = |message: String| FetchFailure { message, corrupt: false, unreachable: false };
    let unreachable = |message: String| FetchFailure { message, corrupt: false, unreachable: true };
    let id: EndpointId = endpoint_id(&provider).ok_or_else(|| unreachable("not a node id".into()))?;
    let conn = tokio::time::timeout(config.connect_timeout, node.endpoint().connect(id, iroh_blobs::ALPN))
        .await
        .map_err(|_| unreachable(format!("no connection within {:?}", config.connect_timeout)))?
        .map_err(|e| unreachable(format!("cannot connect: {e}")))?;
    let mut stream = store.remote().fetch(conn.clone(), hash).stream();
    let result = loop {
        match tokio::time::timeout(config.stall_timeout, stream.next()).await {
            Err(_) => break Err(fail(format!("sent nothing for {:?}", config.stall_timeout))),
            Ok(None) => break Err(fail("the transfer ended early".into())),
            Ok(Some(GetProgressItem::Progress(n))) => on_bytes(n),
            Ok(Some(GetProgressItem::Done(_))) => break Ok(()),
            Ok(Some(GetProgressItem::Error(e))) => {
                let message = format!("{e:#}");
                let corrupt = message.contains("hash mismatch");
                break Err(FetchFailure { message, corrupt, unreachable: false });
            }
        }
    };
    if result.is_err() {
        conn.close(0u32.into(), b"fetch failed");
    }
    result
}

/// Fetches `want`'s missing pieces into `dir`; `providers(piece)` lists the peers that
/// announce a piece (tried in random order). See the module docs.
pub async fn fetch_pieces(
    node: &Node,
    dir: Arc<PieceDir>,
    want: &[usize],
    providers: Providers,
    config: FetchConfig,
    progress: Progress,
) -> Result<FetchReport> {
    let started = Instant::now();
    let missing = dir.missing(want);
    let total: u64 = dir.manifest().bytes_of(&missing);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let report = Arc::new(Mutex::new(FetchReport::default()));
    // Peers caught sending corrupted bytes, and peers that could not be reached: not asked
    // again during this fetch.
    let corrupt: Arc<Mutex<HashSet<PeerId>>> = Arc::default();
    let unreachable: Arc<Mutex<HashSet<PeerId>>> = Arc::default();
    let queue = Arc::new(Mutex::new(missing.into_iter().collect::<std::collections::VecDeque<_>>()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (node, dir, providers, config, progress) =
            (node.clone(), dir.clone(), providers.clone(), config.clone(), progress.clone());
        let (done, report, corrupt, queue) = (done.clone(), report.clone(), corrupt.clone(), queue.clone());
        let unreachable = unreachable.clone();
        tasks.spawn(async move {
            loop {
                let Some(index) = lock(&queue).pop_front() else { return Ok(()) };
                let Some(piece) = dir.manifest().pieces.get(index).cloned() else { continue };
                let mut peers = providers(&piece);
                peers.retain(|p| *p != node.id());
                if config.shuffle {
                    use rand::seq::SliceRandom;
                    peers.shuffle(&mut rand::rng());
                }
                let store = MemStore::new();
                let hash = Hash::from_bytes(piece.hash_bytes()?);
                let mut why = Vec::new();
                let mut got = false;
                let piece_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
                for p in peers {
                    if lock(&corrupt).contains(&p) {
                        why.push(format!("{}: sent corrupted bytes earlier", short(&p)));
                        continue;
                    }
                    if lock(&unreachable).contains(&p) {
                        why.push(format!("{}: unreachable earlier", short(&p)));
                        continue;
                    }
                    let on_bytes = {
                        let (done, progress, piece_done) =
                            (done.clone(), progress.clone(), piece_done.clone());
                        move |n: u64| {
                            // `n` counts this attempt's bytes; progress counts each byte once.
                            let before = piece_done.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                            if n > before {
                                let d = done.fetch_add(n - before, std::sync::atomic::Ordering::Relaxed);
                                progress(d + n - before, total);
                            }
                        }
                    };
                    match fetch_from(&node, &store, hash, p, &config, &on_bytes).await {
                        Ok(()) => {
                            got = true;
                            break;
                        }
                        Err(f) => {
                            lock(&report).failovers += 1;
                            if f.corrupt {
                                tracing::warn!(
                                    "peer {} sent bytes of {} that fail verification: avoiding it",
                                    short(&p),
                                    piece_name(&piece)
                                );
                                lock(&corrupt).insert(p);
                                lock(&report).corrupt_peers.push(p);
                            } else {
                                if f.unreachable {
                                    lock(&unreachable).insert(p);
                                }
                                tracing::warn!(
                                    "peer {} could not provide {}: {}; trying another",
                                    short(&p),
                                    piece_name(&piece),
                                    f.message
                                );
                            }
                            why.push(format!("{}: {}", short(&p), f.message));
                        }
                    }
                }
                let bytes = if got {
                    store.get_bytes(hash).await.map_err(|e| WeightsError::Store(e.to_string()))?
                } else if let Some(mirror) = &config.mirror {
                    match mirror.piece(&piece).await {
                        Ok(bytes) => {
                            let d = done.fetch_add(piece.len(), std::sync::atomic::Ordering::Relaxed);
                            progress(d + piece.len(), total);
                            lock(&report).mirror_pieces += 1;
                            bytes
                        }
                        Err(e) => {
                            why.push(format!("the mirror {}: {e}", mirror.name));
                            return Err(WeightsError::Unavailable {
                                what: piece_name(&piece),
                                why: why.join("; "),
                            });
                        }
                    }
                } else {
                    return Err(WeightsError::Unavailable { what: piece_name(&piece), why: join_why(why) });
                };
                let d = dir.clone();
                tokio::task::spawn_blocking(move || d.write_piece(index, &bytes))
                    .await
                    .map_err(|e| WeightsError::Store(e.to_string()))??;
                let mut r = lock(&report);
                r.pieces += 1;
                r.bytes += piece.len();
            }
        });
    }
    let mut first_error = None;
    while let Some(res) = tasks.join_next().await {
        let res = res.map_err(|e| WeightsError::Store(e.to_string())).and_then(|r| r);
        if let Err(e) = res {
            if first_error.is_none() {
                first_error = Some(e);
            }
            tasks.abort_all();
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let mut report = lock(&report).clone();
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests;
