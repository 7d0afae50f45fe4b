//! The lifecycle: bind the listeners, start the control plane and the admin listener,
//! and the graceful shutdown (not ready, keep serving for `shutdown_delay`, stop
//! accepting, let in-flight requests finish up to `shutdown_timeout`). Accepting is in
//! `listener`, serving one client connection in `downstream`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::accesslog::AccessLog;
use crate::admin::{self, ListenAddrs, ProcessInfo, Shared};
use crate::config::Config;
use crate::control::Control;
use crate::setup::Setup;
use crate::tls::Certificates;

mod downstream;
mod listener;
mod reload;
mod resting;
mod upgrade;

pub use upgrade::{notify_systemd, FailureReporter, Inherited, SOCKET_ENV};

use listener::{accept_loop, Accepting, Listener, ListenerKind};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("state.path: {0}")]
    State(#[from] crate::control::ControlError),
    /// A file the config names does not load (the same error `switchyard check` gives).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// A started server. Dropping it starts the graceful shutdown (the stop signal goes
/// with it); `shutdown` does the same and waits for the end.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Runs the graceful shutdown sequence and returns when it is complete.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Starts the shutdown sequence without waiting for it.
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Returns once a binary upgrade has handed over to a new process: this one is
    /// draining, and `stopped` returns when it is done.
    pub async fn handed_over(&self) {
        self.shared.handed_over.notified().await;
    }

    /// Waits until the server has stopped (after `begin_shutdown` or `shutdown`).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Loads what `config` names, binds the listeners and starts serving on the current
/// tokio runtime.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    start_with(config, None).await
}

/// As `start`; with `inherited`, this process is the new side of a binary upgrade: it
/// serves on the listeners handed over (where their address is unchanged), runs one
/// round of health checks before it accepts, and then tells the old process.
pub async fn start_with(
    config: Config,
    mut inherited: Option<Inherited>,
) -> Result<Running, ServerError> {
    let setup = Setup::new(config)?;
    let config = &setup.config;
    let proxy_listener = bind_or_take("proxy.listen", config.proxy.listen, &mut inherited).await?;
    let admin_listener = bind_or_take("admin.listen", config.admin.listen, &mut inherited).await?;
    let tls_listener = match &config.proxy.tls {
        Some(tls) => Some(bind_or_take("proxy.tls.listen", tls.listen, &mut inherited).await?),
        None => None,
    };
    let listen = ListenAddrs {
        proxy: local_addr(&proxy_listener, config.proxy.listen),
        admin: local_addr(&admin_listener, config.admin.listen),
        tls: tls_listener
            .as_ref()
            .zip(config.proxy.tls.as_ref())
            .map(|(l, t)| local_addr(l, t.listen)),
    };
    warn_unverified(&setup);

    let Setup {
        config,
        admin_token,
        upstreams,
        listener_tls,
    } = setup;
    let control = Arc::new(Control::start(config, upstreams)?);
    // One copy of the config, shared with the control plane: at 10,000 services each
    // copy is megabytes.
    let config = control.config();
    // Backends written as host names are resolved before anything serves.
    control.refresh_names().await;
    control.start_name_refresh();
    if let Some(cluster_config) = &config.cluster {
        control.expect_cluster();
        let default_name = format!("{}-{}", host_name(), listen.admin.port());
        let admin_url = format!("http://{}", listen.admin);
        let connect = {
            let cluster_config = cluster_config.clone();
            let metrics = Arc::clone(control.metrics());
            move || {
                let (cluster_config, metrics) = (cluster_config.clone(), Arc::clone(&metrics));
                let (admin_url, default_name) = (admin_url.clone(), default_name.clone());
                async move {
                    crate::cluster::Cluster::new(&cluster_config, admin_url, default_name, &metrics)
                        .await
                }
            }
        };
        match connect().await {
            Ok(cluster) => control.join_cluster(Arc::new(cluster)).await,
            Err(crate::cluster::ClusterError::Unavailable(e)) => {
                tracing::warn!("cluster: etcd unavailable at start, serving the cached state; changes wait for it: {e}");
                let control = Arc::clone(&control);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Ok(cluster) = connect().await {
                            control.join_cluster(Arc::new(cluster)).await;
                            return;
                        }
                    }
                });
            }
            Err(e) => {
                return Err(crate::config::ConfigError {
                    file: config.origin.path().to_path_buf(),
                    key: "cluster".into(),
                    line: None,
                    message: e.to_string(),
                }
                .into())
            }
        }
    }
    control.persist_now().await?;
    control.sync_health_checks();
    tokio::spawn(crate::control::drive_rollouts(Arc::downgrade(&control)));
    give_back_start_up_memory();
    {
        // The first round of checks runs every backend's check at once: at 20,000
        // backends a peak of hundreds of MB, kept by the allocator unless given back.
        let control = Arc::downgrade(&control);
        tokio::spawn(async move {
            for _ in 0..240 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                match control.upgrade() {
                    Some(control) if !control.first_round_done() => continue,
                    Some(_) => {
                        tokio::task::spawn_blocking(give_back_start_up_memory);
                    }
                    None => {}
                }
                return;
            }
        });
    }
    if inherited.is_some() {
        // The old process serves meanwhile; take over with every backend checked once,
        // as a fresh start would be before /readyz says ready.
        let deadline = tokio::time::Instant::now() + upgrade::READY_TIMEOUT / 2;
        while !control.first_round_done() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let shared = Arc::new(Shared {
        control: Arc::clone(&control),
        ready: AtomicBool::new(true),
        token: ArcSwapOption::from_pointee(admin_token),
        metrics_require_token: AtomicBool::new(config.admin.metrics_require_token),
        certificates: ArcSwapOption::from(
            listener_tls.as_ref().map(|t| Arc::clone(&t.certificates)),
        ),
        info: ProcessInfo::now(config.origin.path()),
        listen: ArcSwap::from_pointee(listen),
        lifecycle: std::sync::OnceLock::new(),
        handed_over: tokio::sync::Notify::new(),
        stop_admin_accepting: watch::channel(false).0,
        recent: Arc::new(crate::stats::RecentTraffic::starting_now()),
    });
    tokio::spawn(sweep_idle_upstream_connections(Arc::downgrade(
        control.table(),
    )));
    tokio::spawn(crate::stats::sample(
        Arc::clone(control.metrics()),
        Arc::clone(&shared.recent),
    ));
    if let Some(certificates) = shared.certificates.load_full() {
        announce_certificates(control.metrics(), &certificates);
    }
    let metrics = Arc::clone(control.metrics());
    let access_log = AccessLog::start(&config.log, metrics.access_log_dropped.clone());
    let serving = Arc::new(ArcSwap::from_pointee(reload::serving(
        &config,
        &control,
        access_log.clone(),
        listener_tls.map(|t| t.server_config),
        listen.tls,
    )));

    tracing::info!(
        proxy_addr = %listen.proxy,
        admin_addr = %listen.admin,
        tls_addr = %listen.tls.map_or_else(|| "off".to_string(), |a| a.to_string()),
        pools = %describe_pools(&config),
        services = %describe_services(&config),
        "switchyard listening"
    );

    let accepting = Accepting {
        serving,
        // One limit for both listeners: `max_connections` is what the process can hold.
        limit: Arc::new(Semaphore::new(config.proxy.max_connections)),
        tracker: Arc::new(ConnTracker::new()),
        metrics: Arc::clone(&metrics),
    };
    let plain = Bound::accepting(
        config.proxy.listen,
        proxy_listener,
        ListenerKind::Plain,
        &accepting,
    );
    let tls = tls_listener
        .zip(config.proxy.tls.as_ref())
        .map(|(listener, settings)| {
            Bound::accepting(settings.listen, listener, ListenerKind::Tls, &accepting)
        });
    let admin = Bound::admin(config.admin.listen, admin_listener, &shared);
    let file_watcher = reload::watch_certificates(&config, &shared);
    let (handover, handed_over) = watch::channel(false);
    let runtime = Arc::new(reload::Runtime {
        shared: Arc::clone(&shared),
        accepting,
        upgrading: AtomicBool::new(false),
        handover,
        live: tokio::sync::Mutex::new(reload::Live {
            max_connections: config.proxy.max_connections,
            config,
            plain,
            tls,
            admin,
            file_watcher,
            access_log,
            shutting_down: false,
        }),
    });
    let _ = shared
        .lifecycle
        .set(Arc::clone(&runtime) as Arc<dyn crate::admin::Lifecycle>);

    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(lifecycle(runtime, stop_rx, handed_over));
    match &inherited {
        Some(inherited) => {
            inherited.ready();
            upgrade::notify_systemd(&format!("MAINPID={}\nREADY=1", std::process::id()));
            tracing::info!("upgrade: took over the listeners; the old process drains");
        }
        None => upgrade::notify_systemd("READY=1"),
    }
    Ok(Running {
        proxy_addr: listen.proxy,
        admin_addr: listen.admin,
        tls_addr: listen.tls,
        shared,
        stop,
        task,
    })
}

/// This machine's name, for a default cluster member name.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    if name.is_empty() {
        "switchyard".into()
    } else {
        name
    }
}

fn warn_unverified(setup: &Setup) {
    for pool in &setup.config.pools {
        let unverified = setup
            .upstreams
            .get(&pool.name)
            .and_then(|u| u.tls.as_ref())
            .is_some_and(|t| t.unverified);
        if unverified {
            tracing::warn!(
                pool = %pool.name,
                "insecure_skip_verify: this pool's backend certificates are not verified; anyone on the path can pose as them"
            );
        }
    }
}

fn announce_certificates(metrics: &crate::metrics::Metrics, certificates: &Certificates) {
    let store = certificates.current();
    metrics.set_certificates(&store.info);
    for cert in &store.info {
        tracing::info!(cert_file = %cert.cert_file.display(), names = %cert.names.join(","), "certificate loaded");
        if cert.not_after.is_some_and(|t| t < crate::tls::now_unix()) {
            tracing::warn!(cert_file = %cert.cert_file.display(), "certificate has expired");
        }
    }
}

/// The admin listener, as axum serves it: told to stop accepting (a binary upgrade's
/// handover), it closes its socket and accepts no more, but the connections it has
/// stay open and are answered with `Connection: close` (no idle connection is closed
/// under a request the client is sending).
struct AdminListener {
    listener: Option<TcpListener>,
    stop_accepting: watch::Receiver<bool>,
}

impl axum::serve::Listener for AdminListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(listener) = &self.listener else {
                return std::future::pending().await;
            };
            let accepted = tokio::select! {
                biased;
                _ = self.stop_accepting.wait_for(|s| *s) => None,
                accepted = listener.accept() => Some(accepted),
            };
            match accepted {
                None => self.listener = None,
                Some(Ok(pair)) => return pair,
                Some(Err(e)) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(std::io::Error::other("the admin listener is closed")),
        }
    }
}

/// A close-on-exec copy of `listener`'s descriptor (`None` if the process is out of
/// descriptors: that listener is then bound anew by an upgrade's new process).
fn duplicate(listener: &TcpListener) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    listener.as_fd().try_clone_to_owned().ok()
}

/// A listening socket being served: the address configured for it, and how to stop its
/// loop (which closes the socket; connections already accepted carry on).
struct Bound {
    configured: SocketAddr,
    /// A second descriptor of the listening socket, to hand over in an upgrade.
    fd: Option<std::os::fd::OwnedFd>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Bound {
    /// A placeholder for a listener already closed.
    fn closed() -> Bound {
        Bound {
            configured: SocketAddr::from(([0, 0, 0, 0], 0)),
            fd: None,
            stop: watch::channel(true).0,
            task: tokio::spawn(async {}),
        }
    }

    fn accepting(
        configured: SocketAddr,
        listener: TcpListener,
        kind: ListenerKind,
        accepting: &Accepting,
    ) -> Bound {
        let fd = duplicate(&listener);
        let (stop, stopped) = watch::channel(false);
        let (label, metrics) = match kind {
            ListenerKind::Plain => ("http", &accepting.metrics),
            ListenerKind::Tls => ("https", &accepting.metrics),
        };
        let config = Listener {
            kind,
            open: metrics.connections(label),
            refused: metrics.connections_refused(label),
        };
        let task = tokio::spawn(accept_loop(listener, config, accepting.clone(), stopped));
        Bound {
            configured,
            fd,
            stop,
            task,
        }
    }

    fn admin(configured: SocketAddr, listener: TcpListener, shared: &Arc<Shared>) -> Bound {
        let fd = duplicate(&listener);
        let (stop, mut stopped) = watch::channel(false);
        let app = admin::app(Arc::clone(shared));
        let listener = AdminListener {
            listener: Some(listener),
            stop_accepting: shared.stop_admin_accepting.subscribe(),
        };
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("admin listener failed: {e}");
            }
        });
        Bound {
            configured,
            fd,
            stop,
            task,
        }
    }

    /// Stops accepting; the loop's end is awaited by the returned handle.
    fn close(self) -> JoinHandle<()> {
        let _ = self.stop.send(true);
        self.task
    }
}

/// The listener handed over for `what` by the process being upgraded, if its address
/// is unchanged; else a new one, bound.
async fn bind_or_take(
    what: &'static str,
    addr: SocketAddr,
    inherited: &mut Option<Inherited>,
) -> Result<TcpListener, ServerError> {
    if let Some(listener) = inherited.as_mut().and_then(|i| i.take(what, addr)) {
        return TcpListener::from_std(listener).map_err(|source| ServerError::Bind {
            what,
            addr,
            source,
        });
    }
    bind(what, addr).await
}

/// How often idle upstream connections are looked over (`ConnPool::sweep`).
const UPSTREAM_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Closes, every `UPSTREAM_SWEEP_INTERVAL`, the pooled upstream connections of the
/// current table's backends that their backend closed or that outlived
/// `upstream_idle_timeout`; ends with the server.
async fn sweep_idle_upstream_connections(
    table: std::sync::Weak<ArcSwap<crate::routing::RoutingTable>>,
) {
    let mut ticks = tokio::time::interval(UPSTREAM_SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(table) = table.upgrade() else {
            return;
        };
        let pools = table.load_full();
        drop(table);
        for pool in &pools.pools {
            for backend in &pool.backends {
                backend.conns.sweep(&pool.settings.upstream);
            }
            // A look at a closed connection spends the task's I/O budget; spent, the
            // rest would look open. A fresh budget for each pool.
            tokio::task::yield_now().await;
        }
    }
}

/// Returns to the system the heap that loading the config, building the first tables
/// and the first round of health checks used and freed. glibc keeps freed memory for
/// reuse, and at 10,000 services that start-up peak was most of the process' resident
/// memory for its whole life.
pub(crate) fn give_back_start_up_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Binds the listener of config key `what`, naming it if that fails.
async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// Pools and services named in the start-up line; beyond these it says how many more,
/// so a config of 10,000 services does not log a megabyte line.
const DESCRIBED: usize = 20;

fn described(items: impl ExactSizeIterator<Item = String>) -> String {
    let total = items.len();
    let mut text = items.take(DESCRIBED).collect::<Vec<_>>().join(" ");
    if total > DESCRIBED {
        text.push_str(&format!(" (and {} more)", total - DESCRIBED));
    }
    text
}

fn describe_pools(config: &Config) -> String {
    described(config.pools.iter().map(|p| {
        let backends: Vec<String> = p.backends.iter().map(|b| b.addr.to_string()).collect();
        format!("{}=[{}]", p.name, backends.join(","))
    }))
}

fn describe_services(config: &Config) -> String {
    described(config.services.iter().map(|s| {
        let hosts: Vec<String> = s.hosts.iter().map(ToString::to_string).collect();
        format!(
            "{}({} {})->{}",
            s.name,
            hosts.join(","),
            s.path_prefix,
            s.active
        )
    }))
}

async fn lifecycle(
    runtime: Arc<reload::Runtime>,
    mut stop: watch::Receiver<bool>,
    mut handed_over: watch::Receiver<bool>,
) {
    let upgraded = tokio::select! {
        _ = stop.wait_for(|s| *s) => false,
        _ = handed_over.wait_for(|h| *h) => true,
    };
    let shared = Arc::clone(&runtime.shared);
    shared.ready.store(false, Ordering::SeqCst);
    // Taken for good: a reload in progress finishes first, and none starts after.
    let mut live = runtime.live.lock().await;
    live.shutting_down = true;
    let (mut delay, timeout) = (
        live.config.proxy.shutdown_delay,
        live.config.proxy.shutdown_timeout,
    );
    if upgraded {
        // The new process already accepts on the same sockets: nobody needs the time
        // to notice this one is going, and admin calls must reach the new process
        // (this one's state is frozen).
        delay = Duration::ZERO;
        shared.stop_admin_accepting.send_replace(true);
        shared.handed_over.notify_one();
    }
    tracing::info!(
        shutdown_delay = ?delay,
        shutdown_timeout = ?timeout,
        "shutting down: /readyz now answers 503"
    );
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let plain = std::mem::replace(&mut live.plain, Bound::closed());
    let mut closing = vec![plain.close()];
    if let Some(tls) = live.tls.take() {
        closing.push(tls.close());
    }
    for task in closing {
        if let Err(e) = task.await {
            tracing::error!("accept loop failed: {e}");
        }
    }
    if let Some(watcher) = live.file_watcher.take() {
        watcher.abort();
    }
    tracing::info!("stopped accepting; waiting for in-flight requests");
    let deadline = tokio::time::Instant::now() + timeout;
    // HTTP connections first, then what outlives them: upgraded tunnels (WebSockets)
    // still count as in flight on their backends.
    let tracker = Arc::clone(&runtime.accepting.tracker);
    let busy = || -> u64 {
        shared
            .table()
            .load()
            .pools
            .iter()
            .flat_map(|p| p.backends.iter())
            .map(|b| b.in_flight())
            .sum()
    };
    let metrics = &runtime.accepting.metrics;
    let open_connections =
        || metrics.connections("http").get() + metrics.connections("https").get();
    let drained = tokio::time::timeout_at(deadline, async {
        // What the drain still waits for, every few seconds: a drain that takes long
        // shows which client connections or requests hold it.
        let mut closed = std::pin::pin!(tracker.shutdown());
        let mut report = tokio::time::interval(DRAIN_REPORT_INTERVAL);
        report.tick().await;
        loop {
            tokio::select! {
                () = &mut closed => break,
                _ = report.tick() => tracing::info!(
                    client_connections = open_connections(),
                    requests_in_flight = busy(),
                    "draining: client connections still open"
                ),
            }
        }
        let mut waited = Duration::ZERO;
        loop {
            let in_flight = busy();
            if in_flight == 0 {
                break;
            }
            if waited >= DRAIN_REPORT_INTERVAL {
                waited = Duration::ZERO;
                tracing::info!(
                    requests_in_flight = in_flight,
                    "draining: client connections closed, upstream requests (tunnels) still in flight"
                );
            }
            tokio::time::sleep(DRAIN_POLL).await;
            waited += DRAIN_POLL;
        }
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("all requests and tunnels finished"),
        Err(_) => tracing::warn!(
            "shutdown_timeout of {timeout:?} passed with requests still in flight; closing them"
        ),
    }
    shared.control.stop_health_checks();
    shared.control.leave_cluster().await;
    // An admin long poll (wait-drained) must not hold the exit: a moment to answer,
    // then the admin listener is dropped.
    let admin = std::mem::replace(&mut live.admin, Bound::closed());
    let mut admin_task = admin.close();
    if tokio::time::timeout(Duration::from_secs(1), &mut admin_task)
        .await
        .is_err()
    {
        admin_task.abort();
    }
}

/// How often a drain that is still waiting says what for.
const DRAIN_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How often the drain looks at the backends' in-flight counts once the client
/// connections are closed.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Client connections still open, for the graceful shutdown: each holds a receiver
/// that says when to finish, and the shutdown waits for every receiver to be dropped.
struct ConnTracker {
    stop: watch::Sender<bool>,
}

impl ConnTracker {
    fn new() -> ConnTracker {
        ConnTracker {
            stop: watch::channel(false).0,
        }
    }

    fn watcher(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    async fn shutdown(&self) {
        self.stop.send_replace(true);
        self.stop.closed().await;
    }
}
