//! `shoal generate`: a completion from the whole model in this process.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use shoal_model_shards::generate::generate;
use shoal_model_shards::{DType, Device, Shard};

use crate::cli::common::{DEFAULT_MODEL, GenOptions, Printer, generate_remote, prepare};
use crate::cli::fetch::open_model;
use crate::weights::Weights;

/// Arguments of `shoal generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model file; with
    /// `--join` and no `--model`, the swarm's model, of which only the header is fetched).
    #[arg(long, env = "SHOAL_MODEL")]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, env = "SHOAL_PROMPT")]
    prompt: String,
    #[command(flatten)]
    options: GenOptions,
    /// Generate through the swarm of this node's ticket (repeatable; one is enough) instead
    /// of locally; this process then only tokenizes and routes (`--discovery local` also
    /// generates through the swarm, found on the local network).
    #[arg(long = "join", env = "SHOAL_JOIN", value_name = "TICKET", value_delimiter = ',')]
    join: Vec<String>,
    /// With `--join`: seconds to wait for the swarm to cover every layer.
    #[arg(long, env = "SHOAL_ROUTE_WAIT", default_value_t = 30.0, value_name = "SECS")]
    route_wait: f64,
    #[command(flatten)]
    net: crate::node::DriverArgs,
    #[command(flatten)]
    swarm: crate::node::SwarmArgs,
    #[command(flatten)]
    data: crate::weights::DataArgs,
}

/// Runs `shoal generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    if !args.join.is_empty() || args.net.net.local_discovery() {
        let tickets = crate::node::parse_tickets(&args.join)?;
        let local = args.model.as_deref().map(|m| Weights::local(m, &args.data)).transpose()?;
        return crate::node::runtime()?.block_on(async {
            let origin = crate::node::bind(args.net.net.options(None)?).await?;
            let weights = match local {
                Some(w) => Ok(w),
                None => Weights::from_swarm(&origin, &tickets, &args.data).await,
            };
            let run = async {
                let weights = weights?;
                let p = prepare(&weights.model, &args.prompt, &args.options)?;
                generate_remote(
                    &weights.model,
                    weights.model_id,
                    origin.clone(),
                    p,
                    &args.options,
                    &args.join,
                    &args.net,
                    &args.swarm,
                    args.route_wait,
                )
                .await
            };
            let result = run.await;
            origin.shutdown().await;
            result
        });
    }
    let path = args.model.unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    let model = open_model(&path)?;
    let p = prepare(&model, &args.prompt, &args.options)?;
    let n_layers = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n_layers, &Device::Cpu, DType::F32)?;
    let mut printer = Printer::new(&p.tokenizer, args.options.json);
    let generation = generate(
        std::slice::from_ref(&shard),
        &p.prompt,
        &p.params,
        args.options.max_tokens,
        &p.stop_ids,
        |tok| printer.token(tok.id),
    )?;
    printer.finish(
        p.prompt.len(),
        &generation.token_ids,
        generation.finish_reason,
        generation.prefill_time,
        generation.decode_time,
    )
}
