//! The `orbit-worker` binary: logging, the runtime, and the CLI of the `orbit_worker` library.

use std::io::IsTerminal;

use clap::Parser;
use orbit_worker::{cli, logging};

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORBIT_LOG")
        // sqlx warns of "slow statements" such as a whole-store DELETE after a bulk build: noise for a CLI.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{},sqlx=error", args.log_level()))
        });
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(logging::writer());
    match args.log_format() {
        cli::LogFormat::Celery => {
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::util::SubscriberInitExt;
            fmt.event_format(logging::CeleryFormat)
                .finish()
                .with(logging::TaskSpans)
                .init()
        }
        cli::LogFormat::Text => fmt.init(),
        cli::LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // The worker's runtime only moves messages: task CPU work runs on rayon and blocking threads.
    // One runtime thread spares the wake-ups between two, which cost a third of the worker's CPU
    // per task (docs/worker.md). TOKIO_WORKER_THREADS still overrides.
    if matches!(args.command, cli::Command::Worker(_))
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none()
    {
        builder.worker_threads(1);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            orbit_worker::errln!("error: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(cli::run(args));
    logging::flush();
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, never a backtrace.
            orbit_worker::errln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
