//! orbit-worker: the Rust worker for OrbitingFox's Celery tasks, and the CLI around its pipeline.

mod celery;
mod cli;
mod config;
mod embedders;
mod services;
mod tasks;
mod worker;

use std::io::IsTerminal;

use clap::Parser;

/// Bytes of log lines gathered into one write.
const LOG_BUFFER: usize = 64 * 1024;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORBIT_LOG")
        // sqlx warns of "slow statements" such as a whole-store DELETE after a bulk build: noise for a CLI.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{},sqlx=error", args.log_level()))
        });
    // Log lines go through a writer thread that drains whatever is queued into one buffered
    // write: a busy worker logs two lines per task, and a syscall per line cost it 40% of its CPU.
    // Never lossy: a full queue makes the logger wait rather than drop lines.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            LOG_BUFFER,
            std::io::stderr(),
        ));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(writer);
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
