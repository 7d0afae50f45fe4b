//! A fleet on etcd v3: the traffic state is one key, `{prefix}state`, written only by
//! a transaction that compares its `mod_revision` with the generation the writer has
//! applied (so `If-Match`, and any two racing writes, resolve to exactly one winner),
//! and applied by every instance from a watch. `generation` is that key's
//! `mod_revision`. Each instance registers `{prefix}members/{name}` on a lease, with the
//! generation it has applied. Never on the request path: a request reads the routing
//! table, which only the control plane replaces.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::state::TrafficState;

/// Longest wait for one etcd call: past it the cluster counts as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd is unreachable or has no quorum: {0}")]
    Unavailable(String),
    /// Someone else wrote the state since `expected`: the write was not made.
    #[error("the state changed in the cluster (generation {current})")]
    Conflict { current: u64 },
    #[error("the state in etcd cannot be read: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
}

/// This instance as the others see it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Member {
    pub name: String,
    pub admin: String,
    /// The generation this instance has applied.
    pub generation: u64,
    pub version: String,
    /// RFC 3339, when the instance last wrote its entry.
    pub last_seen: String,
    /// Requests in flight here on each backend out of rotation (`pool/addr`), so a
    /// `wait-drained` anywhere in the fleet can wait for all of them.
    #[serde(default)]
    pub in_flight: std::collections::BTreeMap<String, u64>,
    /// This instance's totals so far of the routes live rollouts are judged on, so the
    /// instance that drives them judges on the whole fleet's traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteCount>,
}

/// One (service, pool) route's totals on one instance (see `Metrics::routes_totals`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteCount {
    pub service: String,
    pub pool: String,
    pub requests: u64,
    pub errors: u64,
    /// Timed requests and the duration histogram's cumulative buckets.
    pub timed: u64,
    pub buckets: Vec<u64>,
}

/// What the fleet tasks need from the control plane.
pub trait FleetState: Send + Sync {
    /// The generation applied here.
    fn applied(&self) -> u64;
    /// In flight here on each backend out of rotation, by `pool/addr`.
    fn draining_in_flight(&self) -> std::collections::BTreeMap<String, u64>;
    /// Apply a state read from etcd; `force`: even if not newer (etcd went backwards).
    fn apply(&self, state: TrafficState, generation: u64, force: bool);
    /// The state key is gone (a wiped etcd): write the one applied here as the first.
    fn recreate(&self);
    /// This instance's totals of the routes live rollouts are judged on; empty when
    /// none is live.
    fn rollout_routes(&self) -> Vec<RouteCount>;
}

pub struct Cluster {
    client: Client,
    state_key: String,
    members_prefix: String,
    name: String,
    admin: String,
    lease_ttl: Duration,
    lease: AtomicI64,
    /// The lease on which this instance holds the rollout driver's seat; 0 when it
    /// does not.
    seat: AtomicI64,
    seat_key: String,
    connected: AtomicBool,
    /// Set when this process leaves the fleet (handed over, or shut down): it stops
    /// publishing its entry.
    retired: AtomicBool,
    pub connected_gauge: prometheus::IntGauge,
    pub generation_gauge: prometheus::IntGauge,
}

fn unavailable(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Unavailable(e.to_string())
}

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable(format!(
            "no answer within {}s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

impl Cluster {
    /// A client for `config`'s endpoints (no call is made yet: etcd may be down).
    pub async fn new(
        config: &ClusterConfig,
        admin: String,
        default_name: String,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Cluster, ClusterError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if config.ca_file.is_some() || config.cert_file.is_some() {
            let read = |key: &str, path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    ClusterError::Config(format!(
                        "cluster.{key}: cannot read {}: {e}",
                        path.display()
                    ))
                })
            };
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read("ca_file", ca)?));
            }
            if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read("cert_file", cert)?,
                    read("key_file", key)?,
                ));
            }
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&config.username, &config.password_file) {
            let password = std::fs::read_to_string(file).map_err(|e| {
                ClusterError::Config(format!(
                    "cluster.password_file: cannot read {}: {e}",
                    file.display()
                ))
            })?;
            options = options.with_user(user.clone(), password.trim().to_string());
        }
        let client = tokio::time::timeout(
            CALL_TIMEOUT * 2,
            Client::connect(&config.etcd, Some(options)),
        )
        .await
        .map_err(|_| unavailable("connecting timed out"))?
        .map_err(|e| match &e {
            // etcd answered, and refused who we are: a config error, not an outage.
            etcd_client::Error::GRpcStatus(status)
                if matches!(
                    format!("{:?}", status.code()).as_str(),
                    "Unauthenticated" | "PermissionDenied" | "InvalidArgument"
                ) =>
            {
                ClusterError::Config(format!(
                    "etcd refused the credentials: {}",
                    status.message()
                ))
            }
            _ => unavailable(e),
        })?;
        Ok(Cluster {
            client,
            state_key: format!("{}state", config.prefix),
            members_prefix: format!("{}members/", config.prefix),
            name: config.name.clone().unwrap_or(default_name),
            admin,
            lease_ttl: config.lease_ttl,
            lease: AtomicI64::new(0),
            seat: AtomicI64::new(0),
            seat_key: format!("{}rollout-driver", config.prefix),
            connected: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            connected_gauge: metrics.cluster_connected.clone(),
            generation_gauge: metrics.cluster_generation.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn mark(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.connected_gauge.set(i64::from(connected));
    }

    fn observe<T>(&self, result: Result<T, ClusterError>) -> Result<T, ClusterError> {
        match &result {
            Err(ClusterError::Unavailable(_)) => self.mark(false),
            _ => self.mark(true),
        }
        result
    }

    /// The state in etcd and its generation, if it has been written.
    pub async fn read(&self) -> Result<Option<(TrafficState, u64)>, ClusterError> {
        Ok(self.read_at().await?.0)
    }

    /// As `read`, with etcd's store revision at the read: a watch from there on misses
    /// nothing, and one lower than what was applied means etcd went back in time.
    pub async fn read_at(&self) -> Result<(Option<(TrafficState, u64)>, u64), ClusterError> {
        let mut kv = self.client.kv_client();
        let got = self.observe(bounded(kv.get(self.state_key.clone(), None)).await)?;
        let revision = got.header().map_or(0, |h| h.revision()) as u64;
        let Some(kv) = got.kvs().first() else {
            return Ok((None, revision));
        };
        let mut state: TrafficState = serde_json::from_slice(kv.value())
            .map_err(|e| ClusterError::Corrupt(format!("{}: {e}", self.state_key)))?;
        let generation = kv.mod_revision() as u64;
        state.generation = generation;
        state.fill_unknown_history_generations(generation);
        Ok((Some((state, generation)), revision))
    }

    /// Writes `state` if the key was last written at `expected` (0: if it does not exist
    /// yet). Returns the new generation.
    pub async fn write(&self, expected: u64, state: &TrafficState) -> Result<u64, ClusterError> {
        let mut stored = state.clone();
        stored.generation = 0;
        let value =
            serde_json::to_vec(&stored).map_err(|e| ClusterError::Corrupt(e.to_string()))?;
        let compare = if expected == 0 {
            Compare::version(self.state_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(self.state_key.clone(), CompareOp::Equal, expected as i64)
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(self.state_key.clone(), value, None)])
            .or_else([TxnOp::get(self.state_key.clone(), None)]);
        let mut kv = self.client.kv_client();
        let answer = self.observe(bounded(kv.txn(txn)).await)?;
        let revision = answer.header().map_or(0, |h| h.revision()) as u64;
        if answer.succeeded() {
            self.generation_gauge.set(revision as i64);
            Ok(revision)
        } else {
            // The generation to retry with is the key's, not the store's revision.
            let current = answer
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    etcd_client::TxnOpResponse::Get(get) => {
                        Some(get.kvs().first().map_or(0, |kv| kv.mod_revision() as u64))
                    }
                    _ => None,
                })
                .unwrap_or(0);
            Err(ClusterError::Conflict { current })
        }
    }

    /// Calls `apply(state, generation)` for every write of the state after `from`,
    /// until the stream breaks (then returns, for the caller to read and watch again).
    pub async fn watch(
        &self,
        from: u64,
        mut apply: impl FnMut(Option<(TrafficState, u64)>),
    ) -> Result<(), ClusterError> {
        let mut watch_client = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(from as i64 + 1);
        let (_watcher, mut stream) =
            self.observe(bounded(watch_client.watch(self.state_key.clone(), Some(options))).await)?;
        loop {
            let message = stream.message().await.map_err(unavailable);
            let Some(response) = self.observe(message)? else {
                return Err(unavailable("the watch ended"));
            };
            if response.canceled() || response.compact_revision() > 0 {
                // Compacted past what was applied, or cancelled: read the whole state.
                return Err(ClusterError::Unavailable(format!(
                    "the watch was cancelled (compacted at revision {})",
                    response.compact_revision()
                )));
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => match serde_json::from_slice::<TrafficState>(kv.value()) {
                        Ok(mut state) => {
                            let generation = kv.mod_revision() as u64;
                            state.generation = generation;
                            state.fill_unknown_history_generations(generation);
                            apply(Some((state, generation)));
                        }
                        Err(e) => tracing::error!(
                            key = %self.state_key,
                            "the state written to etcd cannot be read, ignored: {e}"
                        ),
                    },
                    EventType::Delete => apply(None),
                }
            }
        }
    }

    /// Registers this instance on a lease and keeps it alive, republishing what it has
    /// applied every third of the TTL (every 100 ms while backends drain, for
    /// `wait-drained` elsewhere). Returns when etcd goes away (the caller retries).
    pub async fn keep_registered(&self, fleet: &dyn FleetState) -> Result<(), ClusterError> {
        let mut lease_client = self.client.lease_client();
        let ttl = self.lease_ttl.as_secs().max(2) as i64;
        let granted = self.observe(bounded(lease_client.grant(ttl, None)).await)?;
        let lease = granted.id();
        self.lease.store(lease, Ordering::SeqCst);
        let (mut keeper, mut answers) =
            self.observe(bounded(lease_client.keep_alive(lease)).await)?;
        let tick = self.lease_ttl / 3;
        let mut last_keep_alive = tokio::time::Instant::now() - tick;
        loop {
            let in_flight = fleet.draining_in_flight();
            let routes = fleet.rollout_routes();
            // Fast while backends drain (for `wait-drained` elsewhere) and while a
            // rollout is judged on these counts.
            let draining = !in_flight.is_empty() || !routes.is_empty();
            self.publish(lease, fleet.applied(), in_flight, routes)
                .await?;
            if last_keep_alive.elapsed() >= tick {
                self.observe(bounded(keeper.keep_alive()).await)?;
                let answer = self.observe(bounded(answers.message()).await)?;
                if answer.is_none_or(|a| a.ttl() <= 0) {
                    return Err(unavailable("the lease expired"));
                }
                last_keep_alive = tokio::time::Instant::now();
            }
            tokio::time::sleep(if draining {
                Duration::from_millis(100)
            } else {
                tick
            })
            .await;
        }
    }

    /// Leaves the fleet: no more entry updates, and the lease is revoked so the entry
    /// goes at once (a new process of the same name publishes its own).
    pub async fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        let lease = self.lease.swap(0, Ordering::SeqCst);
        if lease != 0 {
            let mut leases = self.client.lease_client();
            let _ = bounded(leases.revoke(lease)).await;
        }
    }

    async fn publish(
        &self,
        lease: i64,
        generation: u64,
        in_flight: std::collections::BTreeMap<String, u64>,
        routes: Vec<RouteCount>,
    ) -> Result<(), ClusterError> {
        if self.retired.load(Ordering::SeqCst) {
            return Ok(());
        }
        let member = Member {
            name: self.name.clone(),
            admin: self.admin.clone(),
            generation,
            version: env!("CARGO_PKG_VERSION").to_string(),
            last_seen: crate::state::now_rfc3339(),
            in_flight,
            routes,
        };
        let value =
            serde_json::to_vec(&member).map_err(|e| ClusterError::Corrupt(e.to_string()))?;
        let mut kv = self.client.kv_client();
        self.observe(
            bounded(kv.put(
                format!("{}{}", self.members_prefix, self.name),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ))
            .await,
        )?;
        Ok(())
    }

    /// Republishes this instance's entry now, saying it has applied `generation` (the
    /// caller's, which may not be in `fleet.applied()` yet), if it is registered;
    /// failures are left to the keep-alive loop.
    pub async fn announce(&self, fleet: &dyn FleetState, generation: u64) {
        let lease = self.lease.load(Ordering::SeqCst);
        if lease != 0 {
            let generation = generation.max(fleet.applied());
            let _ = self
                .publish(
                    lease,
                    generation,
                    fleet.draining_in_flight(),
                    fleet.rollout_routes(),
                )
                .await;
        }
    }

    /// Waits until every other live member has applied `generation` and has nothing in
    /// flight on `backend` (`pool/addr`); the members still busy otherwise.
    pub async fn drained_elsewhere(
        &self,
        backend: &str,
        generation: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), Vec<Member>> {
        loop {
            let busy: Vec<Member> = match self.members().await {
                Ok(members) => members
                    .into_iter()
                    .filter(|m| m.name != self.name)
                    .filter(|m| m.generation < generation || m.in_flight.get(backend) != Some(&0))
                    .collect(),
                // etcd away for a moment: try again until the deadline.
                Err(_) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Vec::new());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if busy.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(busy);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Does this instance hold the rollout driver's seat? One instance of the fleet at
    /// a time holds it, on its member lease: when that lease ends (the instance died,
    /// lost etcd, or left), the next candidate gets it. Two instances may both think
    /// they hold it for the moment it takes the old holder to notice its lease
    /// expired; a rollout's moves are state writes conditional on the generation, so
    /// even then a move is made once.
    pub fn holds_rollout_seat(&self) -> bool {
        let seat = self.seat.load(Ordering::SeqCst);
        seat != 0 && seat == self.lease.load(Ordering::SeqCst)
    }

    /// Campaigns for the seat on the member lease, again whenever the lease changes.
    async fn campaign_for_rollout_seat(&self) {
        let mut election = self.client.election_client();
        loop {
            if self.retired.load(Ordering::SeqCst) {
                self.seat.store(0, Ordering::SeqCst);
                return;
            }
            let lease = self.lease.load(Ordering::SeqCst);
            if lease == 0 || self.seat.load(Ordering::SeqCst) == lease {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            self.seat.store(0, Ordering::SeqCst);
            // Waits while another instance holds the seat: no call timeout here, but a
            // new lease (the old one expired) starts a new campaign.
            let campaign = election.campaign(self.seat_key.clone(), self.name.clone(), lease);
            let lease_changed = async {
                while self.lease.load(Ordering::SeqCst) == lease {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            };
            let outcome = tokio::select! {
                outcome = campaign => outcome,
                () = lease_changed => continue,
            };
            match outcome {
                Ok(_) => {
                    if self.lease.load(Ordering::SeqCst) == lease {
                        tracing::info!(name = %self.name, "cluster: this instance drives the fleet's rollouts");
                        self.seat.store(lease, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    tracing::debug!("cluster: campaign for the rollout seat failed: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The live members (their leases have not expired).
    pub async fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let mut kv = self.client.kv_client();
        let got = self.observe(
            bounded(kv.get(
                self.members_prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            ))
            .await,
        )?;
        let mut members: Vec<Member> = got
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(members)
    }

    /// Waits until every live member has applied `generation`; the laggards otherwise.
    pub async fn converged(&self, generation: u64, timeout: Duration) -> Result<(), Vec<Member>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let laggards: Vec<Member> = match self.members().await {
                Ok(members) => members
                    .into_iter()
                    .filter(|m| m.generation < generation)
                    .collect(),
                Err(_) => Vec::new(),
            };
            let reachable = self.is_connected();
            if reachable && laggards.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(laggards);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The generation a write based on `current` gives the history entries it adds: 0,
/// filled in from the key's revision when read (see `TrafficState::fill_unknown_history_generations`).
pub const UNKNOWN_GENERATION: u64 = 0;

/// Keeps `cluster` connected, watching and registered for as long as the process runs.
pub fn run(cluster: Arc<Cluster>, fleet: Arc<dyn FleetState>) {
    {
        let cluster = Arc::clone(&cluster);
        tokio::spawn(async move { cluster.campaign_for_rollout_seat().await });
    }
    {
        let cluster = Arc::clone(&cluster);
        let fleet = Arc::clone(&fleet);
        tokio::spawn(async move {
            loop {
                if cluster.retired.load(Ordering::SeqCst) {
                    return;
                }
                if let Err(e) = cluster.keep_registered(fleet.as_ref()).await {
                    tracing::warn!("cluster: registration lost, retrying: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    tokio::spawn(async move {
        loop {
            // A full read first, every time: after an outage, a compaction or a
            // restored etcd, the watch resumes from what etcd has, never a mix.
            let applied = fleet.applied();
            match cluster.read_at().await {
                Ok((Some((state, generation)), revision)) => {
                    // etcd's whole store older than what was applied here: restored from
                    // an older snapshot, or another cluster. What it holds now is the
                    // fleet's state.
                    let restored = revision < applied;
                    if restored {
                        tracing::warn!(
                            revision,
                            applied,
                            "cluster: etcd is older than the state applied here; applying etcd's"
                        );
                    }
                    if generation != applied {
                        fleet.apply(state, generation, restored);
                    }
                    // From the store's revision, not the key's: other keys move it on,
                    // and a compaction past the key's would cancel every watch.
                    let result = cluster
                        .watch(revision, |change| match change {
                            Some((state, generation)) => fleet.apply(state, generation, false),
                            None => fleet.recreate(),
                        })
                        .await;
                    if let Err(e) = result {
                        tracing::warn!("cluster: watch interrupted, reading the state again: {e}");
                    }
                }
                Ok((None, _)) => {
                    tracing::warn!("cluster: the fleet's state is missing from etcd; writing the one applied here");
                    fleet.recreate();
                }
                Err(e) => {
                    tracing::warn!("cluster: cannot read the state, serving the last applied: {e}")
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}
