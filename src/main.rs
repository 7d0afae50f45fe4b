use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard::config::Config;

// The proxy allocates and frees a few blocks per request, two of them of several KB
// (hyper's 8 KB read buffer for each request head, the forwarding future): glibc serves
// those from its shared bins, mimalloc from a per-thread page.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Rehearse a whole deploy under load on this machine (stand-in servers, a real
    /// proxy process, 16 clients) and print what the clients saw, phase by phase.
    #[command(hide = true)]
    DeployDemo {
        #[arg(long, default_value_t = 2)]
        backends: usize,
        #[arg(long, default_value_t = 2000)]
        requests_per_phase: u64,
    },
    /// The admin API from a shell: status, switch, canary, promote, rollback, drain...
    Ctl(switchyard::ctl::CtlArgs),
    /// Print a shell completion script: `switchyard completions bash > /etc/bash_completion.d/switchyard`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// One stand-in app server (for benchmarks and example scripts): answers
    /// "hello from NAME (ADDR)", and 200 on /health. Single-threaded.
    #[command(hide = true)]
    StandIn {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "app")]
        name: String,
        /// Serve on this many consecutive ports, starting at --listen's.
        #[arg(long, default_value_t = 1)]
        count: u16,
        /// /health answers 503 while this file exists.
        #[arg(long)]
        health_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Ctl(args) => return ctl(&args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "switchyard",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        other => other,
    };
    init_logging();
    let result = match command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run_or_take_over(&config),
        Command::Demo { config } => run(&config, true, None),
        Command::StandIn {
            listen,
            name,
            count,
            health_file,
        } => stand_in(listen, &name, count, health_file),
        Command::Ctl(args) => return ctl(&args),
        Command::Completions { .. } => return ExitCode::SUCCESS,
        Command::DeployDemo {
            backends,
            requests_per_phase,
        } => deploy_demo(backends, requests_per_phase),
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
    // Logs go to stderr; stdout is left for what a user asked to see (check, demo).
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A closed log pipe must not take the proxy down: by default the subscriber
        // reports a failed write with eprintln!, which panics on a closed stderr.
        .log_internal_errors(false)
        .init();
}

/// ctl prints only its answer: no log lines, so scripts can parse stdout.
fn ctl(args: &switchyard::ctl::CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(switchyard::ctl::run(args)) {
        Ok(text) => {
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stand_in(
    listen: std::net::SocketAddr,
    name: &str,
    count: u16,
    health_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let mut servers = Vec::new();
        for offset in 0..count.max(1) {
            let mut addr = listen;
            addr.set_port(
                listen
                    .port()
                    .checked_add(offset)
                    .context("port out of range")?,
            );
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let identity = switchyard_standins::demo::greeter(name, addr, health_file.clone());
            servers.push(switchyard_standins::app::AppServer::serve(
                identity, listener,
            ));
        }
        let _ = tokio::signal::ctrl_c().await;
        anyhow::Ok(())
    })
}

fn deploy_demo(backends: usize, requests_per_phase: u64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    let options = switchyard_standins::rehearsal::Options {
        binary: std::env::current_exe().context("cannot find this binary")?,
        backends: backends.max(2),
        requests_per_phase,
    };
    println!("rehearsing a deploy: blue and green pools of {} stand-in servers, {} keep-alive clients...", options.backends, switchyard_standins::rehearsal::CLIENTS);
    let report = runtime.block_on(switchyard_standins::rehearsal::run(options))?;
    println!("\n{}", report.table());
    for failure in &report.failures {
        println!("failure: {failure}");
    }
    let off: Vec<&str> = report
        .phases
        .iter()
        .filter(|p| !p.split_ok())
        .map(|p| p.name.as_str())
        .collect();
    if report.failed > 0 || !off.is_empty() {
        anyhow::bail!("{} failed requests; split off in: {off:?}", report.failed);
    }
    println!("zero failed requests across the whole deploy");
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // The files the config names are read as start reads them: a certificate that does
    // not load fails here, not at start.
    let config = switchyard::setup::Setup::new(config)?.config;
    println!(
        "{}: ok ({} pools, {} services)",
        path.display(),
        config.pools.len(),
        config.services.len()
    );
    Ok(())
}

/// `run`, or, started by a binary upgrade, the new process's side of it: the listeners
/// come from the old process, and a failure is reported back to it (it keeps serving).
fn run_or_take_over(path: &std::path::Path) -> anyhow::Result<()> {
    let Some(socket) = std::env::var_os(switchyard::server::SOCKET_ENV) else {
        return run(path, false, None);
    };
    // Not passed on: this process's own upgrades make their own socket.
    std::env::remove_var(switchyard::server::SOCKET_ENV);
    let inherited = switchyard::server::Inherited::receive(std::path::Path::new(&socket))
        .context("upgrade: cannot receive the listeners from the old process")?;
    let reporter = inherited.reporter().ok();
    let result = run(path, false, Some(inherited));
    if let (Err(e), Some(reporter)) = (&result, reporter) {
        reporter.fail(&format!("{e:#}"));
    }
    result
}

fn run(
    path: &std::path::Path,
    demo: bool,
    inherited: Option<switchyard::server::Inherited>,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // One worker runs everything on this thread: no work-stealing machinery and no
    // cross-thread wakeups, which is measurably faster for a single-core proxy. More
    // get a thread each, with its own runtime, that serves the connections handed to
    // it (see `worker`); this thread's runtime accepts them and runs the control plane.
    let workers = match config.proxy.workers {
        // As tokio's own runtime read it: the documented override of the default.
        0 => match std::env::var("TOKIO_WORKER_THREADS") {
            Ok(value) => value
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .with_context(|| {
                    format!("TOKIO_WORKER_THREADS={value:?}: expected a number from 1 to 1024")
                })?,
            Err(_) => std::thread::available_parallelism().map_or(1, usize::from),
        },
        n => n,
    };
    if workers > 1 {
        switchyard::worker::start(workers)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        // Watch signals before anything listens, so an early SIGTERM still shuts down
        // gracefully instead of killing the process.
        let signals = Signals::new()?;
        let stand_ins = if demo {
            Some(switchyard_standins::demo::start_app_servers(&demo_pools(&config)).await?)
        } else {
            None
        };
        // What the demo guide prints, taken before the config moves into the server
        // (which keeps the only copy).
        let guide = stand_ins.is_some().then(|| {
            let services: Vec<switchyard_standins::demo::Service> = config
                .services
                .iter()
                .map(|s| switchyard_standins::demo::Service {
                    name: s.name.clone(),
                    active: s.active.clone(),
                })
                .collect();
            (demo_pools(&config), services)
        });
        let running = switchyard::server::start_with(config, inherited).await?;
        if let Some((pools, services)) = guide {
            switchyard_standins::demo::print_guide(
                &pools,
                &services,
                running.proxy_addr,
                running.admin_addr,
            );
        }
        tokio::select! {
            _ = signals.wait(&running.shared) => running.shutdown().await,
            _ = running.handed_over() => running.stopped().await,
        }
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// SIGHUP reloads the whole config file, TLS files included (what `ctl reload` and
/// `POST /api/v1/config/reload` do); a bad file changes nothing and is logged.
fn reload_on_hangup(shared: &std::sync::Arc<switchyard::admin::Shared>) {
    let shared = std::sync::Arc::clone(shared);
    tokio::spawn(async move {
        tracing::info!("SIGHUP: reloading the config file");
        // Success and failure are both logged by the reload itself.
        let _ = shared.reload_config().await;
    });
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            // Without a handler SIGHUP would kill the process, and `systemctl reload`
            // or a log-rotation script sends it.
            hup: signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
            // nginx's upgrade signal: without a handler it would kill the process.
            usr2: signal(SignalKind::user_defined2()).context("cannot watch SIGUSR2")?,
        })
    }

    /// Returns at the first SIGTERM or SIGINT.
    async fn wait(mut self, shared: &std::sync::Arc<switchyard::admin::Shared>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => tracing::info!("SIGTERM received"),
                _ = self.int.recv() => tracing::info!("SIGINT received"),
                _ = self.hup.recv() => {
                    reload_on_hangup(shared);
                    continue;
                }
                _ = self.usr2.recv() => {
                    let shared = std::sync::Arc::clone(shared);
                    tracing::info!("SIGUSR2: upgrading to the binary at this process's path");
                    // Success and failure are both logged by the upgrade itself.
                    tokio::spawn(async move { shared.upgrade().await });
                    continue;
                }
            }
            break;
        }
        // During the graceful shutdown a repeated SIGTERM is ignored: supervisors send
        // it again (a Kubernetes preStop that started the shutdown, then kubelet), and
        // it must not cut the drain short. SIGINT is the operator at a terminal: a
        // second Ctrl-C exits at once.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = self.term.recv() => {
                        tracing::info!("SIGTERM received again: already shutting down");
                    }
                    _ = self.int.recv() => break,
                    _ = self.hup.recv() => {}
                    _ = self.usr2.recv() => {}
                }
            }
            tracing::warn!(
                "SIGINT during shutdown: exiting without waiting for in-flight requests"
            );
            std::process::exit(1);
        });
    }
}

fn demo_pools(config: &Config) -> Vec<switchyard_standins::demo::Pool> {
    config
        .pools
        .iter()
        .map(|p| switchyard_standins::demo::Pool {
            name: p.name.clone(),
            backends: p.backends.iter().map(|b| b.addr).collect(),
        })
        .collect()
}
