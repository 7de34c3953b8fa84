//! `shoal worker`: serve a span of a model's layers to the swarm.
//!
//! The worker joins the model's swarm (its gossip topic) through `--join` tickets and
//! announces its span, state, speed (measured at start-up), load and free KV cache. With
//! `--layers auto` it sizes its span from `--num-layers` or a memory budget, places it where
//! the swarm's serving throughput is weakest, and at jittered intervals moves when the swarm
//! clearly gains (the moves are `shoal_coordinator_free_router::rebalance`'s; this file says
//! where the weights come from and prints `moved: ...`).

use std::io::Write;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_coordinator_free_router::driver::DriverConfig;
use shoal_coordinator_free_router::membership::Membership;
use shoal_coordinator_free_router::rebalance::{HostError, Own, Rebalancer, SpanHost, announcer, drain};
use shoal_coordinator_free_router::swarm::announce::{Announcement, Holdings, PeerState};
use shoal_coordinator_free_router::swarm::placement::{
    RebalanceConfig, choose_span, planned_coverage, span_len_for_memory,
};
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, parse_ticket, peer_id, short};
use shoal_worker::service::StageService;

use crate::cli::api::{ApiArgs, serve};
use crate::cli::common::{DEFAULT_MODEL, parse_size};
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `shoal worker`.
pub fn run(args: WorkerArgs) -> Result<()> {
    let fixed = if args.layers.trim() == "auto" { None } else { Some(parse_layers(&args.layers)?) };
    if fixed.is_some() && (args.num_layers.is_some() || args.memory_budget.is_some()) {
        bail!("--num-layers and --memory-budget go with --layers auto");
    }
    let budget = args.memory_budget.as_deref().map(parse_size).transpose().context("--memory-budget")?;
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
        let node = crate::node::bind(args.net.options(key)?).await?;
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
                announcer(own.clone(), node.clone()),
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
        weights.serving(span.clone())?;
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
            let rebalancer = Rebalancer {
                host: Host {
                    weights: weights.clone(),
                    node: node.clone(),
                    membership: membership.clone(),
                    limits: args.limits.clone(),
                },
                node: node.clone(),
                membership: membership.clone(),
                own: own.clone(),
                config: RebalanceConfig::default(),
                drain_timeout,
                mean_interval: Duration::from_secs_f64(args.rebalance_interval),
            };
            let id = node.endpoint_id();
            tokio::spawn(rebalancer.run(move |from, to| {
                // Scripts and tests wait for this line.
                println!(
                    "moved: node {id} serves layers {}..{} (was {}..{})",
                    to.start, to.end, from.start, from.end
                );
                let _ = std::io::stdout().flush();
            }))
        });

        // The API's end (Ctrl-C, SIGTERM, or a failure to serve) starts the drain all the same.
        let served = match args.api {
            Some(addr) => {
                let mut net = args.net.clone();
                net.bind = net.bind.map(|b| SocketAddr::new(b.ip(), 0));
                let origin = crate::node::bind(net.options(None)?).await?;
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

/// Where a worker's spans come from: its weights (a local file, or pieces fetched from the
/// swarm) and its stage limits.
struct Host {
    weights: Arc<Weights>,
    node: Node,
    membership: Arc<Membership>,
    limits: StageArgs,
}

impl SpanHost for Host {
    async fn prefetch(&self, span: Range<usize>) -> Result<Option<Holdings>, HostError> {
        if self.weights.fetch_span(&self.node, span, peers_fn(&self.membership), Vec::new()).await?.is_none()
        {
            return Ok(None);
        }
        Ok(Some(self.weights.seed(&self.node).await?))
    }

    fn load(&self, span: Range<usize>) -> Result<(StageService, f64), HostError> {
        let loaded = load_measured(&self.weights.model, self.weights.model_id, span.clone(), &self.limits)?;
        self.weights.serving(span)?;
        Ok(loaded)
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
