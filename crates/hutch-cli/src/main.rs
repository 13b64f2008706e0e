//! `hutch`: the command line. Parses arguments into typed plans, then hands them to the library crates.

mod agent;
mod bench;
mod cli;
mod config;
mod detach;
mod doctor;
mod egress;
mod envcache;
mod fetch;
mod image;
mod remote;
mod repo;
mod run;
mod runs;
mod serve;
mod shell;
mod socket;
mod term;
mod tokens;

use clap::Parser;

fn main() {
    // A rootless image build runs this binary again inside a user namespace for the root filesystem.
    if let Some(code) = hutch_image::rootless_helper_main() {
        std::process::exit(code);
    }
    let args = cli::Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hutch: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async {
        match cli::dispatch(args).await {
            Ok(code) => code,
            Err(e) => {
                // Errors can quote guest-chosen names (file names, agent messages) or a daemon's words.
                eprintln!("hutch: error: {}", hutch_text::escape_lines(format!("{e:#}").as_bytes()));
                1
            }
        }
    });
    // Exit without waiting for a blocked stdin reader thread.
    std::process::exit(code);
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUTCH_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_timer(tracing_subscriber::fmt::time::uptime()).init();
}
