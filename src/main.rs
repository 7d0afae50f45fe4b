use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard::config::Config;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "L7 load balancer for zero-downtime deployments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 when valid, 1 with the offending key otherwise.
    Check {
        #[arg(long, short, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
    /// Run the proxy with built-in stand-in app servers on every backend address of the
    /// config, to see it work with nothing else running.
    Demo {
        #[arg(long, short, default_value = "config/switchyard.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config, false),
        Command::Demo { config } => run(&config, true),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!(
        "{}: ok ({} pools, {} services)",
        path.display(),
        config.pools.len(),
        config.services.len()
    );
    Ok(())
}

fn run(path: &std::path::Path, demo: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.proxy.workers > 0 {
        runtime.worker_threads(config.proxy.workers);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let stand_ins = if demo {
            Some(switchyard::demo::start_app_servers(&config).await?)
        } else {
            None
        };
        let running = switchyard::server::start(config.clone()).await?;
        if stand_ins.is_some() {
            switchyard::demo::print_guide(&config, running.proxy_addr, running.admin_addr);
        }
        wait_for_signal().await?;
        running.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
