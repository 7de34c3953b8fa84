//! `shoal run`: a whole swarm in one process (N stages on loopback plus an origin).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use shoal_coordinator_free_router::driver::LocalWeights;
use shoal_coordinator_free_router::membership::OwnSpan;
use shoal_coordinator_free_router::swarm::announce::{Holdings, PeerState};
use shoal_worker::net::{Node, NodeOptions};

use crate::cli::api::{ApiArgs, serve};
use crate::cli::common::{DEFAULT_MODEL, GenOptions, generate_with, prepare};
use crate::node::{
    DriverArgs, StageArgs, SwarmArgs, driver, join_swarm, load_stage, runtime, shutdown_signal,
};
use crate::weights::{DataArgs, Weights};

/// Arguments of `shoal run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model: a .gguf file or a Hugging Face directory.
    #[arg(long, env = "SHOAL_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Stages to split the layers into, evenly; each is its own iroh endpoint on loopback.
    #[arg(long, env = "SHOAL_STAGES", default_value_t = 3)]
    stages: usize,
    /// Generate once for this prompt and exit; without it, keep serving until Ctrl-C.
    #[arg(long, env = "SHOAL_PROMPT", conflicts_with = "listen")]
    prompt: Option<String>,
    /// Serve the OpenAI-compatible API on this address (e.g. 127.0.0.1:8000; port 0 picks
    /// one, printed on stdout).
    #[arg(long, env = "SHOAL_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    options: GenOptions,
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    driver: DriverArgs,
    #[command(flatten)]
    limits: StageArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    data: DataArgs,
}

/// What a stage of `shoal run` announces: its span, load and free cache, `throughput` tokens/s
/// per layer; `draining` once it refuses sessions.
fn stage_announcer(
    node: &Node,
    throughput: f64,
    holds: Holdings,
) -> impl Fn() -> Option<OwnSpan> + Send + Sync + 'static {
    let node = node.clone();
    move || {
        let info = node.stage_info()?;
        Some(OwnSpan {
            start: info.start,
            end: info.end,
            state: if info.draining { PeerState::Draining } else { PeerState::Serving },
            throughput: throughput as f32,
            load: info.sessions,
            free_kv_bytes: info.free_kv_bytes,
            holds: holds.clone(),
        })
    }
}

/// Splits `n_layers` into `stages` contiguous spans whose lengths differ by at most one.
pub fn even_spans(n_layers: usize, stages: usize) -> Vec<std::ops::Range<usize>> {
    (0..stages).map(|i| (i * n_layers / stages)..((i + 1) * n_layers / stages)).collect()
}

/// Runs `shoal run`.
pub fn run(args: RunArgs) -> Result<()> {
    let weights = Weights::local(&args.model, &args.data)?;
    let model = weights.model.clone();
    let n_layers = model.spec().n_layers;
    if args.stages == 0 || args.stages > n_layers {
        bail!("--stages must be between 1 and the model's {n_layers} layers");
    }
    let prepared = args.prompt.as_deref().map(|p| prepare(&model, p, &args.options)).transpose()?;
    let model_id = weights.model_id;
    let mut services = Vec::new();
    for span in even_spans(n_layers, args.stages) {
        services.push((span.clone(), load_stage(&model, model_id, span, &args.limits)?));
    }
    runtime()?.block_on(async move {
        let mut net = args.driver.net.clone();
        net.bind.get_or_insert(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
        let mut nodes = Vec::new();
        let mut memberships = Vec::new();
        // Stages in one process share its cores: they wait a moment for batches to fill.
        let stage_options = NodeOptions { batch_wait: services.len() > 1, ..net.options(None)? };
        for (span, service) in services {
            let node = crate::node::bind(stage_options.clone()).await?;
            if prepared.is_none() {
                // A serving swarm announces its stages, so `shoal status` and `shoal worker
                // --join` (a replica, more layers) work against any stage's ticket.
                let throughput = service.shard().measure_layer_throughput(8)?;
                let bootstrap = nodes.first().map(|(_, n): &(_, Node)| n.addr()).into_iter().collect();
                // The first stage's node also serves the model's pieces to workers that join
                // with no model file.
                let holds = if nodes.is_empty() { weights.seed(&node).await? } else { Holdings::default() };
                let own = stage_announcer(&node, throughput, holds);
                memberships
                    .push(join_swarm(&node, model_id, n_layers as u32, bootstrap, own, &args.swarm).await?);
            }
            node.serve(service);
            tracing::info!(node = %node.endpoint_id(), "stage {}..{} ready", span.start, span.end);
            nodes.push((span, node));
        }
        let origin = crate::node::bind(net.options(None)?).await?;
        let d = std::sync::Arc::new(driver(&model, model_id, origin.clone(), args.driver.config()));
        // This process holds the whole model: spot-checks can use it.
        d.set_local_weights(LocalWeights::new(model.clone()));
        for (_, node) in &nodes {
            d.add_peer(node.addr()).await?;
        }
        if let Some((_, first)) = nodes.first().filter(|_| prepared.is_none()) {
            // Workers that join through a stage's ticket serve requests too.
            let m = join_swarm(&origin, model_id, n_layers as u32, vec![first.addr()], || None, &args.swarm)
                .await?;
            m.follow(d.clone());
            memberships.push(m);
        }
        let result = match (prepared, args.listen) {
            (Some(p), _) => generate_with(&d, p, &args.options).await,
            (None, Some(addr)) => serve(&model, &weights.name(), d.clone(), addr, &args.api).await,
            (None, None) => {
                for (span, node) in &nodes {
                    println!("stage {}..{}: {}", span.start, span.end, node.ticket());
                }
                println!("ready: {} stages on loopback; Ctrl-C stops", nodes.len());
                shutdown_signal().await;
                Ok(())
            }
        };
        origin.shutdown().await;
        drop(memberships);
        for (_, node) in &nodes {
            node.shutdown().await;
        }
        result
    })
}
