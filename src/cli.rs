//! Command-line interface: argument parsing and the subcommands.

pub mod api;
pub mod generate;
pub mod run;
mod status;
mod worker;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Peer-to-peer LLM inference: layer spans on volunteers' machines, activations over iroh,
/// an OpenAI-compatible API on any node.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about, long_about = None)]
pub struct Cli {
    /// Compute threads (default: all cores). Set before any thread pool starts.
    #[arg(long, global = true, env = "SHOAL_THREADS")]
    pub threads: Option<usize>,
    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a completion: locally (the whole model in this process) or, with `--join`,
    /// through the swarm of the given tickets.
    Generate(generate::GenerateArgs),
    /// Serve a span of a model's layers to the swarm.
    Worker(worker::WorkerArgs),
    /// A whole swarm in one process: N stages on loopback and an origin.
    Run(run::RunArgs),
    /// Serve the OpenAI-compatible API, routing through the swarm of the given tickets.
    Api(api::ApiCommandArgs),
    /// Show the swarm as one node sees it: peers, spans, states, speed, load, coverage.
    Status(status::StatusArgs),
}

/// Installs the tracing subscriber (stderr).
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Run(args) => run::run(args),
        Command::Api(args) => api::run(args),
        Command::Status(args) => status::run(args),
    }
}
