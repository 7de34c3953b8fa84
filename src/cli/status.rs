//! `shoal status`: the swarm as one node sees it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use shoal_coordinator_free_router::swarm::announce::{Announcement, PeerState};
use shoal_coordinator_free_router::swarm::view::bottleneck;
use shoal_worker::net::{endpoint_id, short};

use crate::node::{NetArgs, SwarmArgs, join_swarm, parse_tickets, runtime};

/// Arguments of `shoal status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A node of the swarm to join through (repeatable; one is enough; not needed with
    /// `--discovery local` when the swarm is on the local network).
    #[arg(long = "join", env = "SHOAL_JOIN", value_name = "TICKET", value_delimiter = ',')]
    join: Vec<String>,
    /// One line of JSON: `{"model", "n_layers", "peers": [{"id", "start", "end", "state",
    /// "throughput", "load"}]}`.
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
    /// The model, when no ticket is a worker's (its identity names the swarm); by default the
    /// first worker among the tickets says which model it serves.
    #[arg(long, env = "SHOAL_MODEL")]
    model: Option<PathBuf>,
    /// Seconds to listen to the swarm before printing (default: one and a half announcement
    /// intervals, so that every live peer has announced once).
    #[arg(long, env = "SHOAL_WAIT", value_name = "SECS")]
    wait: Option<f64>,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
}

/// Runs `shoal status`.
pub fn run(args: StatusArgs) -> Result<()> {
    let tickets = parse_tickets(&args.join)?;
    if tickets.is_empty() && !args.net.local_discovery() {
        bail!(
            "give a node's ticket with --join TICKET (or find the swarm on the LAN with --discovery local)"
        );
    }
    let config = args.swarm.config()?;
    let wait = match args.wait {
        Some(w) if w.is_finite() && w >= 0.0 => Duration::from_secs_f64(w),
        Some(_) => bail!("--wait must be a number of seconds, 0 or more"),
        None => config.interval.mul_f64(1.5),
    };
    let local = args
        .model
        .as_ref()
        .map(|p| -> Result<_> {
            let m = crate::cli::fetch::open_model(p)?;
            Ok((m.model_id()?, m.spec().n_layers as u32))
        })
        .transpose()?;
    runtime()?.block_on(async move {
        let node = crate::node::bind(args.net.options(None)?).await?;
        let result = async {
            let (model_id, n_layers) = match local {
                Some(m) => m,
                None => crate::weights::identify(&node, &tickets).await?,
            };
            let membership = join_swarm(&node, model_id, n_layers, tickets, || None, &args.swarm).await?;
            tokio::time::sleep(wait).await;
            let mut peers = membership.peers();
            peers.sort_by_key(|a| (a.start, a.end, a.node));
            let coverage = membership.coverage();
            let text = if args.json {
                json_line(&model_id, n_layers, &peers)
            } else {
                table(&model_id, n_layers, &peers, &coverage)
            };
            println!("{text}");
            Ok(())
        }
        .await;
        node.shutdown().await;
        result
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn id_string(a: &Announcement) -> String {
    endpoint_id(&a.node).map_or_else(|| hex(&a.node), |id| id.to_string())
}

/// The `--json` line.
pub fn json_line(model_id: &[u8; 32], n_layers: u32, peers: &[Announcement]) -> String {
    let peers: Vec<serde_json::Value> = peers
        .iter()
        .map(|a| {
            serde_json::json!({
                "id": id_string(a),
                "start": a.start,
                "end": a.end,
                "state": a.state.name(),
                "throughput": a.throughput,
                "load": a.load,
            })
        })
        .collect();
    serde_json::json!({ "model": hex(model_id), "n_layers": n_layers, "peers": peers }).to_string()
}

/// The human form: a summary, one row per peer and a per-layer coverage bar.
pub fn table(model_id: &[u8; 32], n_layers: u32, peers: &[Announcement], coverage: &[f64]) -> String {
    let mut out = String::new();
    let serving = peers.iter().filter(|a| a.state == PeerState::Serving).count();
    let holes: Vec<usize> = coverage.iter().enumerate().filter(|(_, c)| **c <= 0.0).map(|(i, _)| i).collect();
    let _ = writeln!(
        out,
        "model {} · {n_layers} layers · {} peers ({serving} serving) · {}",
        short(model_id),
        peers.len(),
        if holes.is_empty() {
            format!("every layer covered, bottleneck {:.0} tokens/s", bottleneck(coverage))
        } else {
            format!("{} layers uncovered: {}", holes.len(), ranges(&holes))
        }
    );
    let _ = writeln!(
        out,
        "{:<12} {:>9}  {:<9} {:>14} {:>5} {:>10}",
        "PEER", "LAYERS", "STATE", "TOK/S/LAYER", "LOAD", "FREE KV"
    );
    for a in peers {
        let _ = writeln!(
            out,
            "{:<12} {:>9}  {:<9} {:>14.0} {:>5} {:>6} MiB",
            short(&a.node),
            format!("{}..{}", a.start, a.end),
            a.state.name(),
            a.throughput,
            a.load,
            a.free_kv_bytes >> 20
        );
    }
    let _ = write!(out, "coverage 0 |{}| {n_layers}", bar(coverage));
    out
}

/// One character per layer: a block whose height is the layer's serving throughput against
/// the best-served layer, `·` for an uncovered layer.
fn bar(coverage: &[f64]) -> String {
    const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = coverage.iter().copied().fold(0.0f64, f64::max);
    coverage
        .iter()
        .map(|&c| {
            if c <= 0.0 {
                '·'
            } else {
                let i = ((c / max) * LEVELS.len() as f64).ceil() as usize;
                LEVELS[i.clamp(1, LEVELS.len()) - 1]
            }
        })
        .collect()
}

/// `0..3, 7, 9..12` for sorted layer indices (ranges end-exclusive as spans are).
fn ranges(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { layers[i].to_string() } else { format!("{}..{}", layers[i], layers[j] + 1) });
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8, start: u32, end: u32, state: PeerState) -> Announcement {
        Announcement {
            node: [n; 32],
            model: [1; 32],
            n_layers: 6,
            start,
            end,
            state,
            throughput: 100.0,
            load: u32::from(n),
            free_kv_bytes: 1 << 30,
            version: "0".into(),
            seq: 1,
            issued_at_ms: 0,
            ttl_ms: 1000,
            addrs: vec![],
            holds: Default::default(),
        }
    }

    #[test]
    fn json_has_the_documented_shape() {
        let peers = vec![peer(2, 0, 3, PeerState::Serving), peer(3, 3, 6, PeerState::Draining)];
        let v: serde_json::Value = serde_json::from_str(&json_line(&[0xab; 32], 6, &peers)).unwrap();
        assert_eq!(v["model"], "ab".repeat(32));
        assert_eq!(v["n_layers"], 6);
        let p = &v["peers"][1];
        assert_eq!((p["start"].as_u64(), p["end"].as_u64()), (Some(3), Some(6)));
        assert_eq!(p["state"], "draining");
        assert_eq!(p["throughput"], 100.0);
        assert_eq!(p["load"], 3);
        assert!(p["id"].is_string());
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 6, "{keys:?}");
    }

    #[test]
    fn the_bar_shows_holes_and_levels() {
        assert_eq!(bar(&[0.0, 100.0, 200.0, 50.0]), "·▄█▂");
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0..3, 5, 7..9");
        let t = table(&[1; 32], 4, &[peer(2, 1, 3, PeerState::Serving)], &[0.0, 100.0, 100.0, 0.0]);
        assert!(t.contains("2 layers uncovered: 0, 3"), "{t}");
        assert!(t.contains("coverage 0 |·██·| 4"), "{t}");
    }
}
