//! `shoal generate`: a completion from the whole model in this process.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use shoal_model_shards::generate::generate;
use shoal_model_shards::{DType, Device, Shard};

use crate::cli::common::{DEFAULT_MODEL, GenOptions, Printer, generate_remote, prepare};
use crate::cli::fetch::open_model;

/// Arguments of `shoal generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a .gguf file or a Hugging Face directory.
    #[arg(long, env = "SHOAL_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
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
}

/// Runs `shoal generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let model = open_model(&args.model)?;
    let p = prepare(&model, &args.prompt, &args.options)?;
    if !args.join.is_empty() || args.net.net.local_discovery() {
        return crate::node::runtime()?.block_on(generate_remote(
            &model,
            p,
            &args.options,
            &args.join,
            &args.net,
            &args.swarm,
            args.route_wait,
        ));
    }
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
