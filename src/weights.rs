//! The model a node runs: a local file, whose pieces the node seeds to the swarm, or the
//! swarm's, fetched piece by piece into the data dir (see
//! `shoal_coordinator_free_router::weights`).

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use iroh::EndpointAddr;
use shoal_coordinator_free_router::swarm::PeerId;
use shoal_coordinator_free_router::swarm::announce::{Announcement, Holdings};
use shoal_coordinator_free_router::weights::{
    FetchConfig, FetchReport, Mirror, PieceDir, Progress, RangeRead, announces, fetch_manifest, fetch_pieces,
    holdings, make_room, seed,
};
use shoal_model_shards::manifest::Manifest;
use shoal_model_shards::{Model, ModelFormat};
use shoal_worker::net::{Node, peer_id, short};

/// Where a node keeps what it fetches.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Where model pieces fetched from the swarm and manifests of local model files are kept
    /// (default: `$XDG_DATA_HOME/shoal`, else `~/.local/share/shoal`).
    #[arg(long, env = "SHOAL_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Most bytes of fetched model pieces the data dir keeps (`20GiB`, `500MB`...): before a
    /// fetch, the least recently used pieces are evicted, never one this node uses. Default:
    /// no limit.
    #[arg(long, env = "SHOAL_CACHE_BUDGET", value_name = "SIZE", value_parser = cache_budget)]
    pub cache_budget: Option<u64>,
    /// An HTTP(S) copy of the swarm's model file, e.g. a GGUF on the Hugging Face Hub
    /// (`https://huggingface.co/ORG/REPO/resolve/main/FILE.gguf`): the pieces no peer can
    /// provide are read from it with range requests (only those bytes) and verified against
    /// the swarm's manifest.
    #[arg(long, env = "SHOAL_WEIGHTS_URL", value_name = "URL")]
    pub weights_url: Option<String>,
}

impl DataArgs {
    /// The mirror of `--weights-url`, if given.
    pub fn mirror(&self) -> Result<Option<Mirror>> {
        self.weights_url.as_deref().map(http_mirror).transpose()
    }
}

/// An HTTP(S) copy of the model file, read with range requests. A server that does not
/// answer a range request with 206 Partial Content is refused (it would send the whole file),
/// and a body longer than the range is cut off as an error.
pub fn http_mirror(url: &str) -> Result<Mirror> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--weights-url {url:?} is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("--weights-url {url:?}: only http and https URLs");
    }
    // reqwest's rustls has no bundled crypto provider here: use iroh's (ring). An error means
    // one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .build()
        .context("building the HTTP client for --weights-url")?;
    let read = move |off: u64, len: u64| -> RangeRead {
        let (client, url) = (client.clone(), parsed.clone());
        Box::pin(async move {
            if len == 0 {
                return Ok(bytes::Bytes::new());
            }
            let mut resp = client
                .get(url)
                .header(reqwest::header::RANGE, format!("bytes={off}-{}", off + len - 1))
                .send()
                .await
                .map_err(|e| format!("{e}"))?;
            if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                return Err(format!(
                    "answered {} to a range request (a mirror must serve byte ranges)",
                    resp.status()
                ));
            }
            let mut out = Vec::with_capacity(usize::try_from(len).map_err(|e| e.to_string())?);
            while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{e}"))? {
                if (out.len() + chunk.len()) as u64 > len {
                    return Err(format!("sent more than the {len} bytes asked for"));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out.into())
        })
    };
    Ok(Mirror { name: url.to_owned(), read: Arc::new(read) })
}

fn cache_budget(s: &str) -> std::result::Result<u64, String> {
    crate::cli::common::parse_size(s).map_err(|e| format!("{e:#}"))
}

impl DataArgs {
    /// The data dir.
    pub fn dir(&self) -> Result<PathBuf> {
        if let Some(d) = &self.data_dir {
            return Ok(d.clone());
        }
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d).join("shoal"));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .context("no --data-dir, XDG_DATA_HOME or HOME: give --data-dir")?;
        Ok(PathBuf::from(home).join(".local/share/shoal"))
    }
}

/// The manifest of a local GGUF file, cached in the data dir under the file's path, size and
/// modification time (computing it reads the whole file; see BENCHMARKS.md). A cache that
/// cannot be read or written is only a cost, never an error.
pub fn local_manifest(path: &Path, data: &DataArgs) -> Result<Manifest> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let key = format!("{}\n{}\n{:?}", canonical.display(), meta.len(), mtime);
    let cache = data
        .dir()
        .ok()
        .map(|d| d.join("manifests").join(format!("{}.json", blake3::hash(key.as_bytes()).to_hex())));
    if let Some(bytes) = cache.as_ref().and_then(|c| std::fs::read(c).ok())
        && let Ok(m) = Manifest::from_bytes(&bytes, None)
        && m.file_size == meta.len()
    {
        return Ok(m);
    }
    let started = Instant::now();
    let manifest = Manifest::of_gguf(path).with_context(|| format!("hashing {}", path.display()))?;
    tracing::info!("hashed {} in {:.2?}", path.display(), started.elapsed());
    if let Some(c) = cache {
        let written = c.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
            let tmp = c.with_extension("tmp");
            std::fs::write(&tmp, manifest.to_bytes())?;
            std::fs::rename(&tmp, &c)
        });
        if let Err(e) = written {
            tracing::debug!("caching the manifest at {}: {e}", c.display());
        }
    }
    Ok(manifest)
}

/// Where the weights come from.
enum Source {
    /// A model file or directory on this machine (all of it).
    Local(PathBuf),
    /// The swarm's, in the data dir.
    Swarm(Arc<PieceDir>),
}

/// The model a node runs, and where its weights come from.
pub struct Weights {
    /// The opened model (for a swarm-fetched one, loadable where its pieces are present).
    pub model: Arc<Model>,
    /// The swarm's model id.
    pub model_id: [u8; 32],
    manifest: Option<Manifest>,
    source: Source,
    /// Pieces already served, per node: each piece is hashed into a node's store once.
    seeded: std::sync::Mutex<std::collections::HashMap<PeerId, std::collections::BTreeSet<usize>>>,
    /// The data dir and its cache budget (`--cache-budget`).
    cache: Option<(PathBuf, u64)>,
    /// Spans this node serves or is fetching: their pieces are never evicted.
    in_use: Mutex<Vec<Range<usize>>>,
    /// Asked for the pieces no peer provides (`--weights-url`).
    mirror: Option<Mirror>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Weights {
    /// A model on this machine: a GGUF file (its id is its manifest's) or a Hugging Face
    /// directory.
    pub fn local(path: &Path, data: &DataArgs) -> Result<Self> {
        let model = crate::cli::fetch::open_model(path)?;
        let (model_id, manifest) = match model.format() {
            ModelFormat::Gguf => {
                let m = local_manifest(path, data)?;
                (m.id(), Some(m))
            }
            ModelFormat::HuggingFace => (model.model_id().context("hashing the model")?, None),
        };
        Ok(Self {
            model: Arc::new(model),
            model_id,
            manifest,
            source: Source::Local(path.to_path_buf()),
            seeded: Default::default(),
            cache: None,
            in_use: Mutex::default(),
            mirror: None,
        })
    }

    /// The swarm's model, learned from the nodes of `tickets` (or found on the LAN): its
    /// manifest, header and global tensors are fetched into the data dir (what an origin
    /// needs: tokenizer, chat template, shapes); [`Weights::fetch_span`] fetches a span's.
    pub async fn from_swarm(node: &Node, tickets: &[EndpointAddr], data: &DataArgs) -> Result<Self> {
        let mirror = data.mirror()?;
        let data_dir = data.dir()?;
        let (model_id, _) = identify(node, tickets).await?;
        let providers: Vec<PeerId> =
            tickets.iter().map(|a| peer_id(&a.id)).chain(node.local_peers()).collect();
        let dir = match PieceDir::open(&data_dir, &model_id)? {
            Some(dir) => dir,
            None => {
                let manifest = fetch_manifest(node, model_id, &providers).await?;
                PieceDir::create(&data_dir, manifest)
                    .with_context(|| format!("preparing the data dir {}", data_dir.display()))?
            }
        };
        let dir = Arc::new(dir);
        let want = dir.manifest().pieces_for_span(0..0);
        let fixed = providers.clone();
        let report = fetch_pieces(
            node,
            dir.clone(),
            &want,
            Arc::new(move |_| fixed.clone()),
            FetchConfig { mirror: mirror.clone(), ..FetchConfig::default() },
            Arc::new(|_, _| {}),
        )
        .await
        .context("fetching the model's header from the swarm")?;
        if report.pieces > 0 {
            eprintln!(
                "fetched the model's header from the swarm: {} bytes (model {})",
                report.bytes,
                short(&model_id)
            );
        }
        let path = dir.file();
        let model = Model::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let manifest = dir.manifest().clone();
        Ok(Self {
            model: Arc::new(model),
            model_id,
            manifest: Some(manifest),
            source: Source::Swarm(dir),
            seeded: Default::default(),
            cache: data.cache_budget.map(|b| (data_dir, b)),
            in_use: Mutex::default(),
            mirror,
        })
    }

    /// A name for the model: a local file's stem, or the GGUF's `general.name`.
    pub fn name(&self) -> String {
        let path = match &self.source {
            Source::Local(p) => p,
            Source::Swarm(_) => {
                let general = self.model.gguf_content().and_then(|c| c.metadata.get("general.name"));
                if let Some(Ok(name)) = general.map(|v| v.to_string()) {
                    return name.replace(' ', "-");
                }
                return format!("model-{}", short(&self.model_id));
            }
        };
        path.file_stem().map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned())
    }

    /// Serves every piece this node holds to the swarm; returns what to announce.
    /// Pieces already served are not hashed again.
    pub async fn seed(&self, node: &Node) -> Result<Holdings> {
        let Some(manifest) = &self.manifest else { return Ok(Holdings::default()) };
        let (path, held) = match &self.source {
            Source::Local(p) => (p.clone(), (0..manifest.pieces.len()).collect::<Vec<_>>()),
            Source::Swarm(d) => (d.file(), d.complete()),
        };
        let done = self.lock_seeded().get(&node.id()).cloned().unwrap_or_default();
        let new: Vec<usize> = held.iter().copied().filter(|i| !done.contains(i)).collect();
        let served = seed(node, &path, manifest, &new).await?;
        if let Source::Swarm(d) = &self.source {
            let bad: Vec<usize> = new.iter().copied().filter(|i| !served.contains(i)).collect();
            if !bad.is_empty() {
                // Damaged on disk: fetched again when next needed.
                d.forget(&bad)?;
            }
        }
        let mut seeded = self.lock_seeded();
        let all = seeded.entry(node.id()).or_default();
        all.extend(served);
        let all: Vec<usize> = all.iter().copied().collect();
        Ok(holdings(manifest, &all))
    }

    fn lock_seeded(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<PeerId, std::collections::BTreeSet<usize>>> {
        self.seeded.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fetches the pieces layers `span` need from the peers that announce them (`peers`, the
    /// node's view), with a progress bar on a terminal; nothing for a local model.
    pub async fn fetch_span(
        &self,
        node: &Node,
        span: Range<usize>,
        peers: impl Fn() -> Vec<Announcement> + Send + Sync + 'static,
        fallback: Vec<PeerId>,
    ) -> Result<Option<FetchReport>> {
        let Source::Swarm(dir) = &self.source else { return Ok(None) };
        let want = dir.manifest().pieces_for_span(span.clone());
        let missing = dir.missing(&want);
        lock(&self.in_use).push(span.clone());
        if missing.is_empty() {
            dir.touch(&want)?;
            return Ok(None);
        }
        let total = dir.manifest().bytes_of(&missing);
        if let Some((data_dir, budget)) = &self.cache {
            let keep: BTreeSet<usize> =
                lock(&self.in_use).iter().flat_map(|s| dir.manifest().pieces_for_span(s.clone())).collect();
            let evicted = make_room(data_dir, *budget, dir, &keep, total)?;
            if !evicted.pieces.is_empty() {
                eprintln!(
                    "cache budget: evicted {} pieces ({:.1} MiB), least recently used first",
                    evicted.pieces.len(),
                    mib(evicted.bytes)
                );
                // This model's evicted pieces are no longer served.
                let gone: BTreeSet<usize> =
                    evicted.pieces.iter().filter(|(id, _)| *id == self.model_id).map(|&(_, i)| i).collect();
                for served in self.lock_seeded().values_mut() {
                    served.retain(|i| !gone.contains(i));
                }
            }
        }
        eprintln!(
            "fetching layers {}..{} from the swarm: {} pieces, {:.1} MiB (the whole file is {:.1} MiB)",
            span.start,
            span.end,
            missing.len(),
            mib(total),
            mib(dir.manifest().file_size)
        );
        let bar = progress_bar(total);
        let providers = Arc::new(move |piece: &shoal_model_shards::manifest::Piece| {
            let mut ids: Vec<PeerId> =
                peers().into_iter().filter(|a| announces(a, piece)).map(|a| a.node).collect();
            if ids.is_empty() {
                ids = fallback.clone();
            }
            ids
        });
        let report = fetch_pieces(node, dir.clone(), &missing, providers, self.fetch_config(), bar.clone())
            .await
            .with_context(|| format!("fetching layers {}..{} from the swarm", span.start, span.end))?;
        let secs = report.elapsed.as_secs_f64().max(1e-6);
        eprintln!(
            "fetched: {} bytes in {} pieces in {:.2?} ({:.1} MB/s); the file is {} bytes{}{}",
            report.bytes,
            report.pieces,
            report.elapsed,
            report.bytes as f64 / secs / 1e6,
            dir.manifest().file_size,
            match (report.mirror_pieces, &self.mirror) {
                (n, Some(m)) if n > 0 => format!("; {n} pieces from {}", m.name),
                _ => String::new(),
            },
            if report.corrupt_peers.is_empty() {
                String::new()
            } else {
                format!(
                    "; peers caught sending corrupted bytes: {}",
                    report.corrupt_peers.iter().map(short).collect::<Vec<_>>().join(", ")
                )
            }
        );
        dir.touch(&want)?;
        Ok(Some(report))
    }

    fn fetch_config(&self) -> FetchConfig {
        FetchConfig { mirror: self.mirror.clone(), ..FetchConfig::default() }
    }

    /// Records that this node now serves `span` (alone): the pieces of spans it served before
    /// may be evicted by the cache budget.
    pub fn serving(&self, span: Range<usize>) -> Result<()> {
        *lock(&self.in_use) = vec![span.clone()];
        if let Source::Swarm(dir) = &self.source {
            dir.touch(&dir.manifest().pieces_for_span(span))?;
        }
        Ok(())
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A progress callback: a bar (bytes, rate, ETA) on a terminal, a line every 10% otherwise.
fn progress_bar(total: u64) -> Progress {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        return Arc::new(move |done, _| {
            bar.set_position(done);
            if done >= total {
                bar.finish_and_clear();
            }
        });
    }
    let last = std::sync::Mutex::new(0u64);
    Arc::new(move |done, total| {
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        let mut l = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if tenth > *l {
            *l = tenth;
            eprintln!("fetch progress: {done}/{total} bytes");
        }
    })
}

/// The model a swarm serves, from the first ticket (or node found on the local network)
/// whose node serves layers: its id and layer count. A worker that is moving serves nothing
/// for a moment, and mDNS takes a moment too: asks again for up to ten seconds.
pub async fn identify(node: &Node, tickets: &[EndpointAddr]) -> Result<([u8; 32], u32)> {
    // Refused by a private swarm: say so rather than time out.
    crate::node::check_admission(node, tickets).await?;
    for addr in tickets {
        node.add_peer_addr(addr.clone());
    }
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut why = Vec::new();
        let ids: Vec<_> = tickets.iter().map(|a| peer_id(&a.id)).chain(node.local_peers()).collect();
        if ids.is_empty() {
            why.push("no node found on the local network yet".to_owned());
        }
        for id in ids {
            match node.ping(id, Duration::from_secs(5)).await {
                Ok((_, Some(info))) => return Ok((info.model_id, info.n_layers)),
                Ok((_, None)) => why.push(format!("{} serves no layers", short(&id))),
                Err(e) => why.push(format!("{}: {e}", short(&id))),
            }
        }
        if Instant::now() >= until {
            bail!("no ticket is a worker's, so the model is unknown ({}); give --model", why.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
