//! Node assembly shared by the subcommands: the tokio runtime, node keys, stage limits, a
//! stage for a span of layers, and a pipeline driver.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use iroh::SecretKey;
use std::sync::Arc;
use std::time::Instant;

use iroh::EndpointAddr;
use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo};
use shoal_coordinator_free_router::membership::{Membership, MembershipConfig, OwnSpan};
use shoal_coordinator_free_router::speculative::Speculation;
use shoal_coordinator_free_router::verify::{DEFAULT_SHARE, SpotCheckConfig};
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::admission::SwarmKey;
use shoal_worker::net::{Node, NodeOptions, parse_ticket};
use shoal_worker::protocol::WireDType;
use shoal_worker::service::{StageConfig, StageService};

/// Binds this process's node: an iroh endpoint with `options`, and the router that accepts
/// the node's protocols. Every shoal node speaks four: the stage protocol (sessions, steps,
/// pings), admission (the private-swarm handshake; open nodes answer it too), iroh-gossip
/// (the swarm's announcements) and iroh-blobs (pieces of model weights).
pub async fn bind(options: NodeOptions) -> Result<Node> {
    let node = Node::open(options).await?;
    let router = iroh::protocol::Router::builder(node.endpoint().clone())
        .accept(shoal_worker::protocol::ALPN, node.stage_protocol())
        .accept(shoal_worker::admission::ADMIT_ALPN, node.admit_protocol())
        .accept(iroh_gossip::ALPN, node.gossip().clone())
        .accept(iroh_blobs::ALPN, node.blobs_protocol())
        .spawn();
    node.set_router(router);
    Ok(node)
}

/// The runtime of the network commands (compute runs on the stages' own threads).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(shoal_worker::net::default_net_threads())
        .thread_name("shoal-net")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Network options of a node.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// Socket to bind (default: every interface, a random port).
    #[arg(long, env = "SHOAL_BIND", value_name = "ADDR")]
    pub bind: Option<SocketAddr>,
    /// Use n0's public relays (off: works offline, peers must reach each other directly).
    #[arg(long, env = "SHOAL_RELAY")]
    pub relay: bool,
    /// How to find peers besides join tickets (repeatable): `local` finds shoal nodes on
    /// the local network with mDNS (no ticket needed there); `dns` publishes and looks up
    /// addresses through n0's public DNS. Neither by default (offline, tickets only).
    #[arg(long, env = "SHOAL_DISCOVERY", value_enum, value_name = "HOW", value_delimiter = ',')]
    pub discovery: Vec<Discovery>,
    /// Delay added before each frame this node sends, in milliseconds (emulates a network
    /// on loopback for benchmarks).
    #[arg(long, env = "SHOAL_SEND_DELAY_MS", default_value_t = 0.0, hide = true)]
    pub send_delay_ms: f64,
    /// The key file of a private swarm (`shoal swarm new-key FILE` writes one): only nodes
    /// holding the same key can connect to this node, gossip with it or fetch weights from
    /// it, and it joins only such nodes. Without it the swarm is open.
    #[arg(long, env = "SHOAL_SWARM_KEY", value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
}

/// A way of finding peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Discovery {
    /// mDNS on the local network.
    Local,
    /// n0's public DNS address lookup.
    Dns,
}

impl NetArgs {
    /// Whether peers on the local network are found with mDNS.
    pub fn local_discovery(&self) -> bool {
        self.discovery.contains(&Discovery::Local)
    }

    /// Node options with an optional persistent key (reads the swarm key file, if any).
    pub fn options(&self, secret_key: Option<SecretKey>) -> Result<NodeOptions> {
        let swarm_key = match &self.swarm_key {
            Some(path) => Some(SwarmKey::read(path).context("--swarm-key")?),
            None => None,
        };
        Ok(NodeOptions {
            secret_key,
            bind: self.bind,
            relay: self.relay,
            discovery: self.discovery.contains(&Discovery::Dns),
            local_discovery: self.local_discovery(),
            send_delay: Duration::from_secs_f64(self.send_delay_ms.max(0.0) / 1000.0),
            swarm_key,
            ..NodeOptions::default()
        })
    }
}

/// Hidden-state dtype between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WireArg {
    /// 4 bytes per value: bit-identical to one process.
    F32,
    /// 2 bytes per value.
    F16,
    /// 2 bytes per value, f32's range.
    Bf16,
}

impl From<WireArg> for WireDType {
    fn from(w: WireArg) -> Self {
        match w {
            WireArg::F32 => WireDType::F32,
            WireArg::F16 => WireDType::F16,
            WireArg::Bf16 => WireDType::Bf16,
        }
    }
}

/// Options of the origin side (the pipeline driver).
#[derive(Debug, Clone, Args)]
pub struct DriverArgs {
    /// Dtype of hidden states between stages.
    #[arg(long, env = "SHOAL_WIRE_DTYPE", value_enum, default_value_t = WireArg::F32)]
    pub wire_dtype: WireArg,
    /// Deadline of one decode step around the ring, in seconds; a step that misses it
    /// fails over to another route.
    #[arg(long, env = "SHOAL_STEP_TIMEOUT", default_value_t = 10.0)]
    pub step_timeout: f64,
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
    #[command(flatten)]
    pub spot_check: SpotCheckArgs,
    #[command(flatten)]
    pub net: NetArgs,
}

/// Speculative decoding of an origin (`shoal generate`, `run`, `api`, `worker --api`, `bench`).
#[derive(Debug, Clone, Args)]
pub struct SpeculativeArgs {
    /// Speculative decoding: `off`; `ngram` (draft the next tokens from n-gram matches in the
    /// prompt and the text so far, and verify them in one round trip through the pipeline);
    /// or `draft:PATH` (draft them with a small model with the same tokenizer, a GGUF file or
    /// Hugging Face directory loaded whole on this origin). The tokens are the same in every
    /// mode; text that repeats its context, or any text across slow links, comes faster.
    #[arg(long, env = "SHOAL_SPECULATIVE", default_value_t = Speculation::Off, value_name = "MODE")]
    pub speculative: Speculation,
}

/// How much of the workers' arithmetic the origin checks.
#[derive(Debug, Clone, Args)]
pub struct SpotCheckArgs {
    /// Share of decode steps the origin re-runs on another replica of each span (or on its own
    /// copy of the weights) and compares, 0 to 1; the first steps through a new peer are
    /// checked too unless it is 0. A peer caught returning wrong results is banned.
    #[arg(long = "spot-check", env = "SHOAL_SPOT_CHECK", default_value_t = DEFAULT_SHARE,
          value_name = "SHARE", value_parser = parse_share)]
    pub share: f64,
}

fn parse_share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1")),
    }
}

impl SpotCheckArgs {
    /// The driver's spot-check settings.
    pub fn config(&self) -> SpotCheckConfig {
        SpotCheckConfig {
            share: self.share,
            first_steps: if self.share > 0.0 { SpotCheckConfig::default().first_steps } else { 0 },
            ..SpotCheckConfig::default()
        }
    }
}

impl DriverArgs {
    /// The driver's configuration.
    pub fn config(&self) -> DriverConfig {
        DriverConfig {
            wire_dtype: self.wire_dtype.into(),
            step_timeout: Duration::from_secs_f64(self.step_timeout.max(0.001)),
            speculation: self.speculative.speculative.clone(),
            spot_check: self.spot_check.config(),
            ..DriverConfig::default()
        }
    }
}

/// Options of a node's membership in a model's swarm.
#[derive(Debug, Clone, Args)]
pub struct SwarmArgs {
    /// Seconds between this node's announcements to the swarm; an announcement expires
    /// after three intervals, so a silent peer leaves every view within about that.
    #[arg(long, env = "SHOAL_ANNOUNCE_INTERVAL", default_value_t = 5.0, value_name = "SECS")]
    pub announce_interval: f64,
}

impl SwarmArgs {
    /// The membership's timing.
    pub fn config(&self) -> Result<MembershipConfig> {
        if !(self.announce_interval.is_finite() && self.announce_interval >= 0.05) {
            bail!("--announce-interval must be at least 0.05 seconds");
        }
        let interval = Duration::from_secs_f64(self.announce_interval);
        let view = shoal_coordinator_free_router::swarm::view::ViewConfig {
            // Clocks of volunteers differ; tolerate up to an interval (at least 2 s) of skew.
            max_clock_skew_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(2000),
            ..Default::default()
        };
        Ok(MembershipConfig { interval, ttl: interval * 3, view })
    }
}

/// Parses join tickets, naming the bad one.
pub fn parse_tickets(tickets: &[String]) -> Result<Vec<EndpointAddr>> {
    tickets
        .iter()
        .map(|t| {
            parse_ticket(t).with_context(|| format!("--join {}…", t.chars().take(16).collect::<String>()))
        })
        .collect()
}

/// Joins `model_id`'s swarm from `node` through `bootstrap`, announcing what `own` says
/// (nothing for an origin that only routes). Each bootstrap peer is asked first whether this
/// node may join it (the admission of private swarms): when every one that answers refuses,
/// joining fails with its reason ("this swarm is private: ...").
pub async fn join_swarm(
    node: &Node,
    model_id: [u8; 32],
    n_layers: u32,
    bootstrap: Vec<EndpointAddr>,
    own: impl Fn() -> Option<OwnSpan> + Send + Sync + 'static,
    swarm: &SwarmArgs,
) -> Result<Membership> {
    check_admission(node, &bootstrap).await?;
    Membership::join(node, model_id, n_layers, bootstrap, own, swarm.config()?)
        .await
        .context("joining the swarm's gossip topic")
}

/// Fails when every bootstrap peer that answers the admission refuses this node; peers that
/// cannot be reached now are left to the gossip's retries.
pub async fn check_admission(node: &Node, bootstrap: &[EndpointAddr]) -> Result<()> {
    let mut refusal = None;
    for addr in bootstrap {
        match node.check_admission(addr.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_refusal() => refusal = Some(e),
            Err(e) => tracing::info!("{e}"),
        }
    }
    match refusal {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Waits until `driver` can plan a route through the swarm, at most `timeout`; the error
/// says what the driver knows.
pub async fn wait_for_route(driver: &Driver, timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    loop {
        match driver.plan_route() {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= until => {
                return Err(e).context(format!("no route through the swarm after {timeout:?}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// An origin in the swarm: a driver whose peers follow a membership's view.
pub struct SwarmOrigin {
    /// The driver.
    pub driver: Arc<Driver>,
    /// The membership the driver follows (dropping it stops following).
    _membership: Membership,
}

impl SwarmOrigin {
    /// Joins the swarm from `node` (announcing nothing) through `tickets` and follows it.
    pub async fn join(
        model: &Model,
        model_id: [u8; 32],
        node: Node,
        config: DriverConfig,
        tickets: &[String],
        swarm: &SwarmArgs,
    ) -> Result<Self> {
        let bootstrap = parse_tickets(tickets)?;
        let n_layers = model.spec().n_layers as u32;
        let driver = Arc::new(driver(model, model_id, node.clone(), config));
        let membership = join_swarm(&node, model_id, n_layers, bootstrap, || None, swarm).await?;
        membership.follow(driver.clone());
        Ok(Self { driver, _membership: membership })
    }
}

/// Limits of a stage (see the worker crate's `StageConfig`).
#[derive(Debug, Clone, Args)]
pub struct StageArgs {
    /// Most sessions open at once.
    #[arg(long, env = "SHOAL_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,
    /// KV-cache memory of the stage, in MiB, shared in blocks of 16 positions; a step that
    /// does not fit is refused.
    #[arg(long, env = "SHOAL_KV_BUDGET_MIB", default_value_t = 2048)]
    pub kv_budget_mib: usize,
    /// Most sessions one peer may hold open here.
    #[arg(long, env = "SHOAL_PER_PEER_SESSIONS", default_value_t = 16)]
    pub per_peer_sessions: usize,
    /// Most sessions one upstream peer (the stage before this one in their routes) may open
    /// here for origins other than itself.
    #[arg(long, env = "SHOAL_PER_FORWARDER_SESSIONS", default_value_t = 64)]
    pub per_forwarder_sessions: usize,
    /// Close a session after this many seconds without a message.
    #[arg(long, env = "SHOAL_IDLE_TIMEOUT", default_value_t = 120.0)]
    pub idle_timeout: f64,
    /// Longest session, in positions (also capped by the model).
    #[arg(long, env = "SHOAL_MAX_SEQ_LEN", default_value_t = 8192)]
    pub max_seq_len: usize,
}

/// Parses `A..B` into a layer range.
pub fn parse_layers(s: &str) -> Result<Range<usize>> {
    let (a, b) = s.split_once("..").with_context(|| format!("--layers wants START..END, got {s:?}"))?;
    let start: usize = a.trim().parse().with_context(|| format!("bad start layer in {s:?}"))?;
    let end: usize = b.trim().parse().with_context(|| format!("bad end layer in {s:?}"))?;
    if start >= end {
        bail!("--layers {s}: the span is empty");
    }
    Ok(start..end)
}

/// Loads a stage for `span` of `model`.
pub fn load_stage(
    model: &Model,
    model_id: [u8; 32],
    span: Range<usize>,
    limits: &StageArgs,
) -> Result<StageService> {
    let n = model.spec().n_layers;
    if span.end > n {
        bail!("layers {}..{} are outside the model's {n} layers", span.start, span.end);
    }
    let shard = Shard::load(model, span.clone(), &Device::Cpu, DType::F32)
        .with_context(|| format!("loading layers {}..{}", span.start, span.end))?;
    let config = StageConfig {
        max_sessions: limits.max_sessions,
        kv_budget_bytes: limits.kv_budget_mib.saturating_mul(1 << 20),
        per_peer_sessions: limits.per_peer_sessions,
        per_forwarder_sessions: limits.per_forwarder_sessions,
        idle_timeout: Duration::from_secs_f64(limits.idle_timeout.max(0.001)),
        max_seq_len: limits.max_seq_len,
        model_id,
    };
    Ok(StageService::new(shard, config))
}

/// A driver for `model` sending from `node`.
pub fn driver(model: &Model, model_id: [u8; 32], node: Node, config: DriverConfig) -> Driver {
    let spec = model.spec();
    let info = ModelInfo {
        model_id,
        n_layers: spec.n_layers as u32,
        vocab_size: spec.vocab_size as u32,
        max_positions: spec.max_position_embeddings,
    };
    Driver::new(node, info, config)
}

/// Reads the node key from `path` (64 hex digits), creating it (mode 0600) when missing.
pub fn load_or_create_key(path: &Path) -> Result<SecretKey> {
    if path.exists() {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let hex = text.trim();
        let bytes =
            decode_hex32(hex).with_context(|| format!("{} does not hold a node key", path.display()))?;
        return Ok(SecretKey::from_bytes(&bytes));
    }
    let key = SecretKey::generate();
    let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(path, format!("{hex}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

fn decode_hex32(s: &str) -> Result<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("expected 64 hex digits");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_parse_and_reject_bad_spans() {
        assert_eq!(parse_layers("0..15").unwrap(), 0..15);
        assert_eq!(parse_layers(" 3 .. 7 ").unwrap(), 3..7);
        for bad in ["15", "5..5", "7..3", "a..3", "0..", "-1..4"] {
            assert!(parse_layers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_file_is_created_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("shoal-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/node.key");
        let first = load_or_create_key(&path).unwrap();
        let again = load_or_create_key(&path).unwrap();
        assert_eq!(first.public(), again.public(), "the node id is stable across restarts");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(&path, "not a key").unwrap();
        let err = load_or_create_key(&path).unwrap_err();
        assert!(format!("{err:#}").contains("does not hold a node key"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn spans_split_evenly() {
        assert_eq!(crate::cli::run::even_spans(30, 3), vec![0..10, 10..20, 20..30]);
        assert_eq!(crate::cli::run::even_spans(30, 4), vec![0..7, 7..15, 15..22, 22..30]);
        assert_eq!(crate::cli::run::even_spans(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
    }
}
