//! `shoal`: peer-to-peer LLM inference. This binary holds the CLI and node assembly.

mod cli;
mod node;
mod weights;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // SAFETY: nothing else runs yet; the pools read their size once, when first used.
    unsafe { shoal_model_shards::threads::configure_threads(args.threads) };
    cli::init_tracing(args.verbose);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
