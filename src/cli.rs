//! Command-line interface: argument parsing and the subcommands.

pub mod api;
mod bench;
pub mod common;
mod dashboard;
pub(crate) mod fetch;
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
    #[arg(short, long, global = true, env = "SHOAL_VERBOSE", action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// A TOML file of settings: keys are flag names (`kv-budget-mib = 1024`), at the top
    /// level for every command or in a `[COMMAND]` table. A flag and an environment variable
    /// win over the file. Default: `$XDG_CONFIG_HOME/shoal/config.toml` (or
    /// `~/.config/shoal/config.toml`), else `/etc/shoal/config.toml`, when one exists.
    #[arg(long, global = true, env = crate::config::CONFIG_ENV, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
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
    /// Benchmark end to end: tokens/s, time to first token and hop latency under concurrency.
    ///
    /// Against a local swarm (`--stages N`), a swarm (`--join TICKET`) or an OpenAI-compatible
    /// API (`--url URL`). Every stream gets the same `--prompt-tokens` ids (a fixed English
    /// text, repeated and cut) and generates `--gen-tokens` greedily (an API may stop earlier
    /// at the end of sequence: what came is counted). For each level of `--concurrency`, that
    /// many streams start at once; a row reports aggregate tok/s (tokens / time to the last
    /// stream's end), per-stream tok/s (mean decode speed after the first token), TTFT p50 and
    /// p99 (nearest rank), hop p50 (half the ping round trip to the route's peers after the
    /// run; not known for --url) and failed streams. A table on stdout (a progress bar on
    /// stderr), or one JSON line with `--json`.
    Bench(bench::BenchArgs),
    /// Private swarms: `shoal swarm new-key FILE` writes a swarm key; give it to every node of
    /// the swarm with `--swarm-key FILE` (nodes without it are refused).
    Swarm(SwarmCommandArgs),
    /// The config file: `shoal config print [COMMAND [FLAGS...]]` shows the settings a command
    /// runs with and where each comes from (flag, env, file or default).
    Config(ConfigArgs),
}

/// Arguments of `shoal config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print the effective settings of a command (of every command when none is named), as a
    /// config file whose comments say where each value comes from.
    Print {
        /// The command: run, worker, api, generate, status or bench.
        command: Option<String>,
        /// That command's flags, as they would be given to it.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        flags: Vec<String>,
    },
}

/// Arguments of `shoal swarm`.
#[derive(Debug, clap::Args)]
pub struct SwarmCommandArgs {
    #[command(subcommand)]
    action: SwarmAction,
}

#[derive(Debug, Subcommand)]
enum SwarmAction {
    /// Write a new random swarm key to FILE (mode 0600; an existing file is never
    /// overwritten). Whoever holds the file can join the swarm: copy it only to its nodes.
    NewKey {
        /// Where to write the key.
        file: std::path::PathBuf,
    },
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

/// Runs the chosen subcommand (`config` is the config file `main` read, if any).
pub fn run(cli: Cli, config: Option<&crate::config::ConfigFile>) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Run(args) => run::run(args),
        Command::Api(args) => api::run(args),
        Command::Status(args) => status::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Swarm(SwarmCommandArgs { action: SwarmAction::NewKey { file } }) => {
            shoal_worker::admission::SwarmKey::write_new(&file)
                .map_err(|e| anyhow::anyhow!("writing a swarm key: {e}"))?;
            println!("wrote a new swarm key to {}", file.display());
            println!("start every node of the swarm with --swarm-key {}", file.display());
            Ok(())
        }
        Command::Config(ConfigArgs { action: ConfigAction::Print { command, flags } }) => {
            let text = crate::config::print(config, command.as_deref(), &flags)?;
            print!("{text}");
            Ok(())
        }
    }
}
