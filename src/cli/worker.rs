//! `shoal worker`: serve a span of a model's layers to the swarm.
//!
//! The worker joins the model's swarm (its gossip topic) through `--join` tickets and
//! announces its span, state, speed (measured at start-up), load and free KV cache. With
//! `--layers auto` it sizes its span from `--num-layers` or a memory budget, places it where
//! the swarm's serving throughput is weakest, and at jittered intervals moves when the swarm
//! clearly gains: announce `Draining`, wait for gossip to settle, re-check, hand running
//! sessions back, load the new span (`Joining`), serve it (`Serving`).

use std::io::Write;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_coordinator_free_router::driver::DriverConfig;
use shoal_coordinator_free_router::membership::{Membership, OwnSpan};
use shoal_coordinator_free_router::swarm::announce::{Announcement, Holdings, PeerState};
use shoal_coordinator_free_router::swarm::placement::{
    RebalanceConfig, choose_span, move_target, next_check_ms, planned_coverage, should_move,
    span_len_for_memory,
};
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, parse_ticket, peer_id, short};
use shoal_worker::service::StageService;

use crate::cli::api::{ApiArgs, serve};
use crate::cli::common::DEFAULT_MODEL;
use crate::node::{
    NetArgs, SpeculativeArgs, StageArgs, SwarmArgs, driver, join_swarm, load_or_create_key, load_stage,
    parse_layers, parse_tickets, runtime, shutdown_signal,
};
use crate::weights::{DataArgs, Weights};

/// One-token forwards timed to measure a span's speed.
const SPEED_STEPS: usize = 8;

/// Arguments of `shoal worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Model: a .gguf file or a Hugging Face directory, whose pieces this worker also serves
    /// to peers. Without it, a worker that joins a swarm (`--join`, `--discovery local`)
    /// fetches the swarm's model from its peers, only the pieces of its span, into
    /// `--data-dir`; a worker that joins nothing uses the default model file.
    #[arg(long, env = "SHOAL_MODEL")]
    model: Option<PathBuf>,
    /// The span of layers to serve: `START..END` (end exclusive, e.g. `0..15`), or `auto`:
    /// `--num-layers` layers (or as many as `--memory-budget` holds) placed where the swarm
    /// is weakest, moved later when that clearly helps the swarm.
    #[arg(long, env = "SHOAL_LAYERS", default_value = "auto")]
    layers: String,
    /// With `--layers auto`: how many layers to serve.
    #[arg(long, env = "SHOAL_NUM_LAYERS", value_name = "N")]
    num_layers: Option<usize>,
    /// With `--layers auto` and no `--num-layers`: memory for layer weights, e.g. `512MiB`,
    /// `2GiB` (default: half of the memory available at start).
    #[arg(long, env = "SHOAL_MEMORY_BUDGET", value_name = "SIZE")]
    memory_budget: Option<String>,
    /// With `--layers auto`: mean seconds between rebalancing checks (each jittered by
    /// ±50%); 0 never moves.
    #[arg(long, env = "SHOAL_REBALANCE_INTERVAL", default_value_t = 60.0, value_name = "SECS")]
    rebalance_interval: f64,
    /// A node of the swarm to join through (repeatable; one is enough).
    #[arg(long = "join", env = "SHOAL_JOIN", value_name = "TICKET", value_delimiter = ',')]
    join: Vec<String>,
    /// Write this node's join ticket to this file as well as to stdout.
    #[arg(long, env = "SHOAL_TICKET_FILE")]
    ticket_file: Option<PathBuf>,
    /// The node key: read from this file, created there when missing (stable node id across
    /// restarts). Without it the node id is new at each start.
    #[arg(long, env = "SHOAL_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C (or before moving), wait at most this many seconds for running
    /// sessions to finish before handing them back to their origins.
    #[arg(long, env = "SHOAL_DRAIN_TIMEOUT", default_value_t = 30.0)]
    drain_timeout: f64,
    /// Also serve the OpenAI-compatible API on this address, routing through the swarm.
    #[arg(long, env = "SHOAL_API", value_name = "ADDR")]
    api: Option<SocketAddr>,
    #[command(flatten)]
    api_options: ApiArgs,
    #[command(flatten)]
    speculative: SpeculativeArgs,
    #[command(flatten)]
    spot_check: crate::node::SpotCheckArgs,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    limits: StageArgs,
    #[command(flatten)]
    data: DataArgs,
}

/// What this worker says about itself in its announcements.
#[derive(Debug, Clone)]
struct Own {
    span: Option<Range<usize>>,
    state: PeerState,
    throughput: f64,
    holds: Holdings,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `shoal worker`.
pub fn run(args: WorkerArgs) -> Result<()> {
    let fixed = if args.layers.trim() == "auto" { None } else { Some(parse_layers(&args.layers)?) };
    if fixed.is_some() && (args.num_layers.is_some() || args.memory_budget.is_some()) {
        bail!("--num-layers and --memory-budget go with --layers auto");
    }
    let budget = args.memory_budget.as_deref().map(parse_size).transpose()?;
    if !(args.rebalance_interval.is_finite() && args.rebalance_interval >= 0.0) {
        bail!("--rebalance-interval must be a number of seconds, 0 or more");
    }
    let bootstrap = parse_tickets(&args.join)?;
    args.swarm.config()?;
    if args.api.is_some() {
        // Bad API options (an unreadable key file...) fail before any layer is loaded.
        args.api_options.config()?;
    }
    let joins = !bootstrap.is_empty() || args.net.local_discovery();
    let local = match (&args.model, joins) {
        (Some(path), _) => Some(Weights::local(path, &args.data)?),
        (None, false) => Some(Weights::local(Path::new(DEFAULT_MODEL), &args.data)?),
        (None, true) => None,
    };
    runtime()?.block_on(async move {
        let key = args.key_file.as_deref().map(load_or_create_key).transpose()?;
        let node = Node::bind(args.net.options(key)?).await?;
        let weights = Arc::new(match local {
            Some(w) => w,
            None => Weights::from_swarm(&node, &bootstrap, &args.data).await?,
        });
        let model = weights.model.clone();
        let model_id = weights.model_id;
        let n_layers = model.spec().n_layers;
        let len = span_len(&model, fixed.as_ref(), args.num_layers, budget)?;
        let holds = weights.seed(&node).await?;
        let own = Arc::new(Mutex::new(Own { span: None, state: PeerState::Joining, throughput: 0.0, holds }));
        let membership = Arc::new(
            join_swarm(
                &node,
                model_id,
                n_layers as u32,
                bootstrap.clone(),
                own_fn(own.clone(), node.clone()),
                &args.swarm,
            )
            .await?,
        );
        let ticket = node.ticket();
        if let Some(path) = &args.ticket_file {
            write_atomically(path, &format!("{ticket}\n"))?;
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "ticket: {ticket}")?;
        out.flush()?;
        drop(out);
        for t in &args.join {
            check_peer(&node, t, model_id).await?;
        }

        let span = match fixed.clone() {
            Some(span) => span,
            None => {
                // A one-layer probe gives this machine's speed for placement; the loaded
                // span is measured again below.
                let probe = tokio::task::block_in_place(|| -> Result<f64> {
                    let shard = Shard::load(&model, 0..1, &Device::Cpu, DType::F32)?;
                    Ok(shard.measure_layer_throughput(SPEED_STEPS)?)
                })
                .context("measuring this machine's speed")?;
                lock(&own).throughput = probe;
                if !bootstrap.is_empty() {
                    // Every live peer announces once per interval: wait for each to be heard.
                    tokio::time::sleep(membership.interval().mul_f64(1.5)).await;
                } else if args.net.local_discovery() {
                    // mDNS needs a few of its rounds (0.7 s) to find the LAN's nodes first.
                    tokio::time::sleep(membership.interval().mul_f64(1.5).max(Duration::from_secs(3))).await;
                }
                let start =
                    membership.with_view(|v| choose_span(&planned_coverage(v), len as u32, probe)) as usize;
                start..start + len
            }
        };
        {
            let mut o = lock(&own);
            o.span = Some(span.clone());
            o.state = PeerState::Joining;
        }
        membership.announce_now();
        let fallback: Vec<_> = bootstrap.iter().map(|a| peer_id(&a.id)).collect();
        if weights.fetch_span(&node, span.clone(), peers_fn(&membership), fallback).await?.is_some() {
            lock(&own).holds = weights.seed(&node).await?;
        }
        let (stage, throughput) = load_measured(&model, model_id, span.clone(), &args.limits)?;
        node.serve(stage);
        {
            let mut o = lock(&own);
            o.state = PeerState::Serving;
            o.throughput = throughput;
        }
        membership.announce_now();
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ready: node {} serves layers {}..{} of {n_layers} (model {}, {:.0} tokens/s per layer)",
            node.endpoint_id(),
            span.start,
            span.end,
            short(&model_id),
            throughput
        )?;
        out.flush()?;
        drop(out);

        let drain_timeout = Duration::from_secs_f64(args.drain_timeout.max(0.0));
        let mover = (fixed.is_none() && args.rebalance_interval > 0.0).then(|| {
            let mover = Mover {
                weights: weights.clone(),
                limits: args.limits.clone(),
                node: node.clone(),
                membership: membership.clone(),
                own: own.clone(),
                config: RebalanceConfig::default(),
                drain_timeout,
                base_ms: (args.rebalance_interval * 1000.0) as u64,
            };
            tokio::spawn(mover.run())
        });

        // The API's end (Ctrl-C, SIGTERM, or a failure to serve) starts the drain all the same.
        let served = match args.api {
            Some(addr) => {
                let mut net = args.net.clone();
                net.bind = net.bind.map(|b| SocketAddr::new(b.ip(), 0));
                let origin = Node::bind(net.options(None)?).await?;
                let config = DriverConfig {
                    spot_check: args.spot_check.config(),
                    speculation: args.speculative.speculative,
                    ..DriverConfig::default()
                };
                let d = Arc::new(driver(&model, model_id, origin.clone(), config));
                membership.follow(d.clone());
                let served = serve(&model, &weights.name(), d, addr, &args.api_options).await;
                origin.shutdown().await;
                served
            }
            None => {
                shutdown_signal().await;
                Ok(())
            }
        };
        if let Some(m) = mover {
            m.abort();
        }
        lock(&own).state = PeerState::Draining;
        membership.announce_now();
        eprintln!("draining: no new sessions; waiting up to {}s for running ones", args.drain_timeout);
        drain(&node, drain_timeout).await;
        node.close_stage_sessions().await;
        drop(membership);
        node.shutdown().await;
        eprintln!("stopped");
        served
    })
}

/// The layers to serve: a fixed span's, `--num-layers`, or as many as the memory budget
/// (default: half the memory available) holds.
fn span_len(
    model: &Model,
    fixed: Option<&Range<usize>>,
    num_layers: Option<usize>,
    budget: Option<u64>,
) -> Result<usize> {
    let n_layers = model.spec().n_layers;
    Ok(match (fixed, num_layers) {
        (Some(span), _) => {
            if span.end > n_layers {
                bail!("layers {}..{} are outside the model's {n_layers} layers", span.start, span.end);
            }
            span.len()
        }
        (None, Some(n)) if n == 0 || n > n_layers => bail!("--num-layers must be 1..={n_layers}, got {n}"),
        (None, Some(n)) => n,
        (None, None) => {
            let budget = match budget {
                Some(b) => b,
                None => available_memory()? / 2,
            };
            let per_layer = model.layer_bytes();
            if budget < per_layer {
                bail!(
                    "a memory budget of {} MiB does not hold one layer ({} MiB)",
                    budget >> 20,
                    per_layer.div_ceil(1 << 20)
                );
            }
            span_len_for_memory(budget, per_layer, n_layers as u32) as usize
        }
    })
}

/// The peers of the membership's view (the providers of pieces).
fn peers_fn(membership: &Arc<Membership>) -> impl Fn() -> Vec<Announcement> + Send + Sync + 'static {
    let m = membership.clone();
    move || m.peers()
}

/// Loads `span` and measures its speed.
fn load_measured(
    model: &Model,
    model_id: [u8; 32],
    span: Range<usize>,
    limits: &StageArgs,
) -> Result<(StageService, f64)> {
    tokio::task::block_in_place(|| {
        let stage = load_stage(model, model_id, span, limits)?;
        let throughput =
            stage.shard().measure_layer_throughput(SPEED_STEPS).context("measuring the span's speed")?;
        Ok((stage, throughput))
    })
}

/// Refuses new sessions and waits at most `timeout` for the running ones to end.
async fn drain(node: &Node, timeout: Duration) {
    node.drain();
    let until = Instant::now() + timeout;
    while node.stage_stats().is_some_and(|s| s.sessions > 0) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = node.stage_stats().map_or(0, |s| s.sessions);
    if left > 0 {
        eprintln!("handing {left} sessions back to their origins");
    }
}

/// The announcement source: this worker's span and state, the stage's load and free cache.
fn own_fn(own: Arc<Mutex<Own>>, node: Node) -> impl Fn() -> Option<OwnSpan> + Send + Sync + 'static {
    move || {
        let o = lock(&own).clone();
        let span = o.span?;
        let info = node.stage_info();
        Some(OwnSpan {
            start: span.start as u32,
            end: span.end as u32,
            state: o.state,
            throughput: o.throughput as f32,
            load: info.as_ref().map_or(0, |i| i.sessions),
            free_kv_bytes: info.map_or(0, |i| i.free_kv_bytes),
            holds: o.holds,
        })
    }
}

/// Rebalancing: at jittered intervals, asks the placement rules whether to move, and moves
/// with the drain → re-check → join protocol.
struct Mover {
    weights: Arc<Weights>,
    limits: StageArgs,
    node: Node,
    membership: Arc<Membership>,
    own: Arc<Mutex<Own>>,
    config: RebalanceConfig,
    drain_timeout: Duration,
    base_ms: u64,
}

impl Mover {
    /// Fetches the pieces `span` needs that this node lacks (nothing for a local model file),
    /// then serves and announces them.
    async fn prefetch(&self, span: Range<usize>) -> Result<()> {
        if self.weights.fetch_span(&self.node, span, peers_fn(&self.membership), Vec::new()).await?.is_some()
        {
            lock(&self.own).holds = self.weights.seed(&self.node).await?;
        }
        Ok(())
    }

    async fn run(self) {
        let mut rng = StdRng::from_os_rng();
        loop {
            tokio::time::sleep(Duration::from_millis(next_check_ms(&mut rng, self.base_ms))).await;
            if let Err(e) = self.check().await {
                eprintln!("rebalancing failed: {e:#}");
            }
        }
    }

    fn set(&self, span: Range<usize>, state: PeerState) {
        {
            let mut o = lock(&self.own);
            o.span = Some(span);
            o.state = state;
        }
        self.membership.announce_now();
    }

    async fn check(&self) -> Result<()> {
        let me = self.node.id();
        if self.membership.with_view(|v| should_move(v, me, &self.config)).is_none() {
            return Ok(());
        }
        let (old, throughput) = {
            let o = lock(&self.own);
            (o.span.clone().context("no span")?, o.throughput)
        };
        let len = old.len();
        // Fetch first: a worker moving to layers whose pieces it lacks fetches them while it
        // still serves its span, so coverage never drops for the download.
        if let Some(dest) = self
            .membership
            .with_view(|v| move_target(v, me, old.start as u32, old.end as u32, throughput, &self.config))
        {
            let dest = dest as usize;
            self.prefetch(dest..dest + len).await?;
        }
        eprintln!("rebalancing: layers {}..{} may move; draining to re-check", old.start, old.end);
        // Origins stop routing new sessions here as soon as they see this.
        self.set(old.clone(), PeerState::Draining);
        tokio::time::sleep(self.membership.interval() * 2).await;
        let again = self
            .membership
            .with_view(|v| move_target(v, me, old.start as u32, old.end as u32, throughput, &self.config));
        let Some(dest) = again.map(|d| d as usize) else {
            eprintln!("rebalancing: staying on layers {}..{} (the swarm changed)", old.start, old.end);
            self.set(old, PeerState::Serving);
            return Ok(());
        };
        let new = dest..dest + len;
        // Normally fetched already; the re-check may have chosen another destination.
        if let Err(e) = self.prefetch(new.clone()).await {
            eprintln!("rebalancing: staying on layers {}..{} ({e:#})", old.start, old.end);
            self.set(old, PeerState::Serving);
            return Ok(());
        }
        drain(&self.node, self.drain_timeout).await;
        self.node.stop_serving().await;
        self.set(new.clone(), PeerState::Joining);
        let (stage, throughput, span) =
            match load_measured(&self.weights.model, self.weights.model_id, new.clone(), &self.limits) {
                Ok((stage, t)) => (stage, t, new),
                Err(e) => {
                    eprintln!(
                        "rebalancing: loading layers {}..{} failed ({e:#}); back to {}..{}",
                        new.start, new.end, old.start, old.end
                    );
                    self.set(old.clone(), PeerState::Joining);
                    let (stage, t) =
                        load_measured(&self.weights.model, self.weights.model_id, old.clone(), &self.limits)?;
                    (stage, t, old.clone())
                }
            };
        self.node.serve(stage);
        lock(&self.own).throughput = throughput;
        self.set(span.clone(), PeerState::Serving);
        println!(
            "moved: node {} serves layers {}..{} (was {}..{})",
            self.node.endpoint_id(),
            span.start,
            span.end,
            old.start,
            old.end
        );
        std::io::stdout().flush()?;
        Ok(())
    }
}

/// Half of this is the default memory budget: `MemAvailable` from `/proc/meminfo`.
fn available_memory() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context(
        "reading /proc/meminfo for the default memory budget; give --memory-budget or --num-layers",
    )?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemAvailable in /proc/meminfo; give --memory-budget or --num-layers")
}

/// Parses a size: a number with an optional unit, `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`,
/// `T`/`TiB` (powers of 1024), or `KB`, `MB`, `GB`, `TB` (powers of 1000); case-insensitive.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 =
        num.parse().with_context(|| format!("--memory-budget {s:?}: expected a size like 512MiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => bail!("--memory-budget {s:?}: unknown unit {other:?}"),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        bail!("--memory-budget {s:?} is not a usable size");
    }
    Ok(bytes as u64)
}

/// Pings a peer from a ticket and reports what it serves; a peer that serves another model
/// (another file, or other bytes of it) is an error naming both model ids.
async fn check_peer(node: &Node, ticket: &str, model_id: [u8; 32]) -> Result<()> {
    let Ok(addr) = parse_ticket(ticket) else { return Ok(()) };
    let id = peer_id(&addr.id);
    node.add_peer_addr(addr);
    match node.ping(id, Duration::from_secs(5)).await {
        Ok((rtt, Some(info))) if info.model_id == model_id => {
            eprintln!(
                "peer {} serves layers {}..{} (round trip {rtt:.1?})",
                short(&id),
                info.start,
                info.end
            );
        }
        Ok((_, Some(info))) => bail!(
            "peer {} serves model {}, but this worker's model is {}: the local file is not the \
             swarm's model (another model, or damaged bytes); drop --model to fetch the swarm's",
            short(&id),
            hex(&info.model_id),
            hex(&model_id)
        ),
        Ok((_, None)) => eprintln!("peer {} serves no layers", short(&id)),
        Err(e) => eprintln!("warning: peer {}: {e}", short(&id)),
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 3 GB ").unwrap(), 3_000_000_000);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        for bad in ["", "MiB", "12 parsecs", "0", "-1G", "1e400", "0.1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
