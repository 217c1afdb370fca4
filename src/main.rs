//! orbit-worker: the Rust worker for OrbitingFox's Celery tasks, and the CLI around its pipeline.

mod celery;
mod cli;
mod config;
mod embedders;
mod services;
mod tasks;
mod worker;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORBIT_LOG")
        // sqlx warns of "slow statements" such as a whole-store DELETE after a bulk build: noise for a CLI.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{},sqlx=error", args.log_level()))
        });
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        cli::LogFormat::Text => fmt.init(),
        cli::LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, never a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
