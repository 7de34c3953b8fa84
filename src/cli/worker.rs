//! `shoal worker`: serve a span of a model's layers to the swarm.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use shoal_coordinator_free_router::driver::DriverConfig;
use shoal_model_shards::Model;
use shoal_worker::net::{Node, parse_ticket, peer_id, short};

use crate::cli::api::{ApiArgs, serve};
use crate::cli::generate::DEFAULT_MODEL;
use crate::node::{
    NetArgs, StageArgs, driver, load_or_create_key, load_stage, parse_layers, runtime, shutdown_signal,
};

/// Arguments of `shoal worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Model: a .gguf file or a Hugging Face directory.
    #[arg(long, env = "SHOAL_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The span of layers to serve, `START..END` (end exclusive), e.g. `0..15`.
    #[arg(long)]
    layers: String,
    /// A peer to contact at start (repeatable); its span is checked against this model.
    #[arg(long = "join", value_name = "TICKET")]
    join: Vec<String>,
    /// Write this node's join ticket to this file as well as to stdout.
    #[arg(long)]
    ticket_file: Option<PathBuf>,
    /// The node key: read from this file, created there when missing (stable node id across
    /// restarts). Without it the node id is new at each start.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C, wait at most this many seconds for running sessions to finish
    /// before handing them back to their origins.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Also serve the OpenAI-compatible API on this address, routing through this worker
    /// and the peers of `--join`.
    #[arg(long, value_name = "ADDR")]
    api: Option<SocketAddr>,
    #[command(flatten)]
    api_options: ApiArgs,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    limits: StageArgs,
}

/// Runs `shoal worker`.
pub fn run(args: WorkerArgs) -> Result<()> {
    let span = parse_layers(&args.layers)?;
    if args.api.is_some() {
        // Bad API options (an unreadable key file...) fail before any layer is loaded.
        args.api_options.config()?;
    }
    let model = Model::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?;
    let model_id = model.model_id().context("hashing the model")?;
    let stage = load_stage(&model, model_id, span.clone(), &args.limits)?;
    let n_layers = model.spec().n_layers;
    // The API needs the tokenizer and chat template; a plain worker frees the rest.
    let api_model = if args.api.is_some() { Some(model) } else { None };
    runtime()?.block_on(async move {
        let key = args.key_file.as_deref().map(load_or_create_key).transpose()?;
        let node = Node::bind(args.net.options(key)).await?;
        node.serve(stage);
        let ticket = node.ticket();
        if let Some(path) = &args.ticket_file {
            write_atomically(path, &format!("{ticket}\n"))?;
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "ticket: {ticket}")?;
        out.flush()?;
        drop(out);
        for t in &args.join {
            check_peer(&node, t, model_id).await;
        }
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ready: node {} serves layers {}..{} of {n_layers} (model {})",
            node.endpoint_id(),
            span.start,
            span.end,
            short(&model_id)
        )?;
        out.flush()?;
        drop(out);

        // The API's end (Ctrl-C, SIGTERM, or a failure to serve) starts the drain all the same.
        let served = match (args.api, &api_model) {
            (Some(addr), Some(model)) => {
                let mut net = args.net.clone();
                net.bind = net.bind.map(|b| SocketAddr::new(b.ip(), 0));
                let origin = Node::bind(net.options(None)).await?;
                let d = driver(model, model_id, origin.clone(), DriverConfig::default());
                let mut peers = vec![node.addr()];
                peers.extend(args.join.iter().filter_map(|t| parse_ticket(t).ok()));
                let served = serve(model, &args.model, d, addr, &args.api_options, peers).await;
                origin.shutdown().await;
                served
            }
            _ => {
                shutdown_signal().await;
                Ok(())
            }
        };
        eprintln!("draining: no new sessions; waiting up to {}s for running ones", args.drain_timeout);
        node.drain();
        let until = Instant::now() + Duration::from_secs_f64(args.drain_timeout.max(0.0));
        while node.stage_stats().is_some_and(|s| s.sessions > 0) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = node.stage_stats().map_or(0, |s| s.sessions);
        if left > 0 {
            eprintln!("handing {left} sessions back to their origins");
        }
        node.close_stage_sessions().await;
        node.shutdown().await;
        eprintln!("stopped");
        served
    })
}

/// Pings a peer from a ticket and reports what it serves.
async fn check_peer(node: &Node, ticket: &str, model_id: [u8; 32]) {
    let addr = match parse_ticket(ticket) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("warning: --join {ticket:.16}…: {e}");
            return;
        }
    };
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
        Ok((_, Some(_))) => eprintln!("warning: peer {} serves a different model", short(&id)),
        Ok((_, None)) => eprintln!("peer {} serves no layers", short(&id)),
        Err(e) => eprintln!("warning: peer {}: {e}", short(&id)),
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
