//! `shoal`: peer-to-peer LLM inference. This binary holds the CLI and node assembly.

mod cli;
mod config;
mod node;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The config file goes into the flags' environment variables before clap reads them.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let root = config::command();
    let config = match config::discover(&root, &argv) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(file), Some(command)) = (&config, config::subcommand_of(&root, &argv)) {
        // SAFETY: no other thread exists yet.
        unsafe { file.apply(&root, &command) };
    }
    let args = cli::Cli::parse();
    // SAFETY: nothing else runs yet; the pools read their size once, when first used.
    unsafe { shoal_model_shards::threads::configure_threads(args.threads) };
    cli::init_tracing(args.verbose);
    match cli::run(args, config.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
