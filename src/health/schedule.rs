//! When each backend is checked: one task keeps every probe's next check time in a
//! heap and starts each check as a short task of its own when it is due. An idle
//! backend costs a heap slot and a small entry, not a sleeping task (with the timer,
//! the settings and the future a task holds), which is what 10,000 pools need.
//!
//! Backends of several pools that are the same address checked the same way share one
//! probe: each result is recorded on every one of them, each with its own counter.
//! The same request to the same server gets the same answer, and 10,000 services in
//! front of the same few app servers should not send those servers 10,000 checks
//! every interval.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::{apply_transition, check_once, jittered, HealthCounter};
use crate::backend::Backend;
use crate::routing::PoolSettings;

/// What to check: a backend object with the settings of the pool it is in.
pub struct CheckTarget {
    pub pool: Arc<str>,
    pub backend: Arc<Backend>,
    pub settings: Arc<PoolSettings>,
}

enum Command {
    Start(u64, CheckTarget),
    Stop(u64),
}

/// The handle on the scheduling task; dropping it stops every check.
pub struct CheckScheduler {
    commands: mpsc::UnboundedSender<Command>,
    task: AbortHandle,
}

impl CheckScheduler {
    /// Needs a tokio runtime.
    pub fn spawn() -> CheckScheduler {
        CheckScheduler::with_limit(MAX_RUNNING)
    }

    /// At most `max_running` checks under way at once.
    fn with_limit(max_running: usize) -> CheckScheduler {
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(receiver, max_running.max(1))).abort_handle();
        CheckScheduler { commands, task }
    }

    /// Checks `target` from now on, under `id` (never reused). A target that is the
    /// same probe as one already checked joins it, and takes its latest result at
    /// once. Otherwise the first check comes after a random part of the jitter, so
    /// many backends do not fire at once, then one every interval, give or take the
    /// jitter, after the previous one ended.
    pub fn start(&self, id: u64, target: CheckTarget) {
        // Only fails once the task is gone, when nothing is checked any more anyway.
        let _ = self.commands.send(Command::Start(id, target));
    }

    /// Stops the checks of `id`; the probe it shared goes on for the others, and a
    /// probe nobody is left on is aborted if under way.
    pub fn stop(&self, id: u64) {
        let _ = self.commands.send(Command::Stop(id));
    }
}

impl Drop for CheckScheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What makes two targets one probe: the address, the TLS name, and everything of the
/// pool's settings that a check uses. Holds the first target's settings rather than a
/// copy of them: a key is made for every target.
struct ProbeKey {
    addr: SocketAddr,
    tls_name: Option<ServerName<'static>>,
    settings: Arc<PoolSettings>,
}

impl ProbeKey {
    fn of(target: &CheckTarget) -> ProbeKey {
        ProbeKey {
            addr: target.backend.addr,
            tls_name: target.backend.tls_name().cloned(),
            settings: Arc::clone(&target.settings),
        }
    }

    /// A TLS client is made per pool, from its files: only the same one is equal.
    fn tls_client(&self) -> Option<usize> {
        let tls = self.settings.upstream.tls.as_ref();
        tls.map(|tls| Arc::as_ptr(tls) as usize)
    }
}

impl PartialEq for ProbeKey {
    fn eq(&self, other: &ProbeKey) -> bool {
        self.addr == other.addr
            && self.tls_name == other.tls_name
            && self.settings.health == other.settings.health
            && self.settings.upstream.protocol == other.settings.upstream.protocol
            && self.tls_client() == other.tls_client()
    }
}

impl Eq for ProbeKey {}

impl Hash for ProbeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
        self.tls_name.hash(state);
        self.settings.health.hash(state);
        self.settings.upstream.protocol.hash(state);
        self.tls_client().hash(state);
    }
}

/// One probe and the targets that share its results.
struct Probe {
    key: ProbeKey,
    /// A vector, not a map: nearly every probe has one target, and a map of one
    /// allocates room for several.
    targets: Vec<(u64, Subscriber)>,
    running: Option<AbortHandle>,
    latest: Option<Result<(), String>>,
}

struct Subscriber {
    target: CheckTarget,
    counter: HealthCounter,
}

impl Subscriber {
    fn new(target: CheckTarget) -> Subscriber {
        // From the backend's current health, so checks restarted by a reload do not
        // judge a healthy backend on one failed check.
        let health = &target.settings.health;
        let counter = HealthCounter::new(health.healthy_threshold, health.unhealthy_threshold)
            .resuming(target.backend.health());
        Subscriber { target, counter }
    }

    fn record(&mut self, outcome: &Result<(), String>) {
        let backend = &self.target.backend;
        backend.record_check(outcome.as_ref().map(|_| ()).map_err(String::as_str));
        if let Some(next) = self.counter.record(outcome.is_ok()) {
            apply_transition(&self.target.pool, backend, next, outcome);
        }
    }
}

/// A deadline far enough away to stand for "nothing is due".
const IDLE: Duration = Duration::from_secs(3600);

/// Checks under way at once, at most. At start every backend is due within the first
/// jitter: 20,000 backends would mean 20,000 sockets opened at once (a SYN burst at the
/// backends, and a file-descriptor limit that fails checks of healthy backends), and
/// that many check tasks' memory kept by the allocator afterwards. Checks that find
/// no room wait for one; only when a thousand checks are hanging until their timeout
/// does this slow a round.
const MAX_RUNNING: usize = 1024;

#[derive(Default)]
struct Probes {
    by_id: HashMap<u64, Probe>,
    by_key: HashMap<ProbeKey, u64>,
    /// Which probe each target is on.
    probe_of: HashMap<u64, u64>,
    next_id: u64,
}

impl Probes {
    /// Adds the target; returns the new probe's id when it made one.
    fn start(&mut self, id: u64, target: CheckTarget) -> Option<u64> {
        let key = ProbeKey::of(&target);
        let mut subscriber = Subscriber::new(target);
        if let Some(&probe_id) = self.by_key.get(&key) {
            if let Some(probe) = self.by_id.get_mut(&probe_id) {
                if let Some(latest) = &probe.latest {
                    subscriber.record(latest);
                }
                probe.targets.push((id, subscriber));
                self.probe_of.insert(id, probe_id);
                return None;
            }
        }
        self.next_id += 1;
        let probe_id = self.next_id;
        self.by_key
            .insert(ProbeKey::of(&subscriber.target), probe_id);
        self.by_id.insert(
            probe_id,
            Probe {
                key,
                targets: vec![(id, subscriber)],
                running: None,
                latest: None,
            },
        );
        self.probe_of.insert(id, probe_id);
        Some(probe_id)
    }

    fn stop(&mut self, id: u64) {
        let Some(probe_id) = self.probe_of.remove(&id) else {
            return;
        };
        let Some(probe) = self.by_id.get_mut(&probe_id) else {
            return;
        };
        if let Some(at) = probe.targets.iter().position(|(target, _)| *target == id) {
            probe.targets.swap_remove(at);
        }
        if probe.targets.is_empty() {
            if let Some(probe) = self.by_id.remove(&probe_id) {
                self.by_key.remove(&probe.key);
                if let Some(task) = probe.running {
                    task.abort();
                }
            }
        }
    }
}

async fn run(mut commands: mpsc::UnboundedReceiver<Command>, max_running: usize) {
    let mut probes = Probes::default();
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    // Check tasks under way, and which probe each is for: a check that panics still
    // gets its probe scheduled again.
    let mut running: JoinSet<Result<(), String>> = JoinSet::new();
    let mut running_ids: HashMap<tokio::task::Id, u64> = HashMap::new();
    // One timer, moved as the earliest deadline changes, rather than one per wake-up.
    let timer = tokio::time::sleep(IDLE);
    tokio::pin!(timer);
    let mut armed_for = None;
    loop {
        let earliest = due.peek().map(|Reverse((at, _))| *at);
        if earliest != armed_for {
            timer
                .as_mut()
                .reset(earliest.unwrap_or_else(|| Instant::now() + IDLE));
            armed_for = earliest;
        }
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Start(id, target)) => {
                    let jitter = target.settings.health.jitter;
                    if let Some(probe) = probes.start(id, target) {
                        let first = Instant::now() + jittered(Duration::ZERO, jitter);
                        due.push(Reverse((first, probe)));
                    }
                }
                Some(Command::Stop(id)) => probes.stop(id),
            },
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                let (task, outcome) = match joined {
                    Ok((task, outcome)) => (task, outcome),
                    Err(e) if e.is_panic() => (e.id(), Err("the check panicked".to_string())),
                    // Aborted by `Stop`: its probe is gone.
                    Err(e) => {
                        running_ids.remove(&e.id());
                        continue;
                    }
                };
                // A probe stopped while its check was finishing is gone: nothing to do.
                let Some(probe_id) = running_ids.remove(&task) else { continue };
                let Some(probe) = probes.by_id.get_mut(&probe_id) else { continue };
                probe.running = None;
                for (_, subscriber) in &mut probe.targets {
                    subscriber.record(&outcome);
                }
                probe.latest = Some(outcome);
                let health = &probe.key.settings.health;
                let next = Instant::now() + jittered(health.interval, health.jitter);
                due.push(Reverse((next, probe_id)));
            }
            () = &mut timer, if earliest.is_some() && running.len() < max_running => {
                let now = Instant::now();
                while let Some(&Reverse((at, probe_id))) = due.peek() {
                    if at > now || running.len() >= max_running {
                        break;
                    }
                    due.pop();
                    // Stopped since it was scheduled: its slot is just dropped.
                    let Some(probe) = probes.by_id.get_mut(&probe_id) else {
                        continue;
                    };
                    // Any of its targets will do: they are the same probe.
                    let Some((_, subscriber)) = probe.targets.first() else {
                        continue;
                    };
                    let backend = Arc::clone(&subscriber.target.backend);
                    let settings = Arc::clone(&subscriber.target.settings);
                    let task = running.spawn(async move {
                        check_once(&backend, &settings.health, &settings.upstream).await
                    });
                    running_ids.insert(task.id(), probe_id);
                    probe.running = Some(task);
                }
                // The heap's top has changed: re-arm on the next turn.
                armed_for = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthConfig;
    use crate::routing::PoolBehaviour;

    fn target(addr: std::net::SocketAddr) -> CheckTarget {
        target_with(addr, HealthConfig::tcp_default().timeout)
    }

    /// Targets with different timeouts are checked apart, even at one address.
    fn target_with(addr: std::net::SocketAddr, timeout: Duration) -> CheckTarget {
        target_checked(addr, Duration::from_millis(20), timeout)
    }

    fn target_checked(
        addr: std::net::SocketAddr,
        interval: Duration,
        timeout: Duration,
    ) -> CheckTarget {
        let behaviour = PoolBehaviour {
            health: HealthConfig {
                interval,
                timeout,
                jitter: Duration::ZERO,
                ..HealthConfig::tcp_default()
            },
            ..Default::default()
        };
        CheckTarget {
            pool: "p".into(),
            backend: Arc::new(Backend::new(addr, 1, Duration::from_secs(1))),
            settings: Arc::new(PoolSettings::new(Arc::new(behaviour))),
        }
    }

    async fn until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn checks_repeat_until_stopped_and_only_the_stopped_one_ends() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        let scheduler = CheckScheduler::spawn();
        let (kept, stopped) = (
            target_with(addr, Duration::from_secs(1)),
            target_with(addr, Duration::from_secs(2)),
        );
        let (kept_backend, stopped_backend) =
            (Arc::clone(&kept.backend), Arc::clone(&stopped.backend));
        scheduler.start(1, kept);
        scheduler.start(2, stopped);
        until("three checks each", || {
            kept_backend.checks() >= 3 && stopped_backend.checks() >= 3
        })
        .await;
        assert_eq!(stopped_backend.health(), crate::backend::Health::Healthy);
        scheduler.stop(2);
        // Once the stop is seen, at most the check under way still finishes.
        let at_stop = stopped_backend.checks();
        let kept_at_stop = kept_backend.checks();
        until("ten more checks of the kept one", || {
            kept_backend.checks() >= kept_at_stop + 10
        })
        .await;
        assert!(
            stopped_backend.checks() <= at_stop + 1,
            "{} checks after the stop",
            stopped_backend.checks() - at_stop
        );
    }

    #[tokio::test]
    async fn checks_beyond_the_limit_wait_their_turn_and_all_run() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        let scheduler = CheckScheduler::with_limit(3);
        let backends: Vec<Arc<Backend>> = (1..=40)
            .map(|id| {
                let target = target_with(addr, Duration::from_millis(1000 + id));
                let backend = Arc::clone(&target.backend);
                scheduler.start(id, target);
                backend
            })
            .collect();
        until("two checks of every backend", || {
            backends.iter().all(|b| b.checks() >= 2)
        })
        .await;
        assert!(backends
            .iter()
            .all(|b| b.health() == crate::backend::Health::Healthy));
    }

    /// A listener that counts the connections it accepts.
    async fn counting_listener() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn pools_checking_one_address_alike_share_each_check_and_stopping_one_keeps_the_other() {
        use std::sync::atomic::Ordering::Relaxed;
        let (addr, accepted) = counting_listener().await;
        let scheduler = CheckScheduler::spawn();
        let (first, second) = (target(addr), target(addr));
        let backends = [Arc::clone(&first.backend), Arc::clone(&second.backend)];
        scheduler.start(1, first);
        scheduler.start(2, second);
        until("ten checks each", || {
            backends.iter().all(|b| b.checks() >= 10)
        })
        .await;
        let checks: u64 = backends.iter().map(|b| b.checks()).max().unwrap();
        // Allow for the probe under way and the first result the second one took.
        assert!(
            accepted.load(Relaxed) <= checks + 2,
            "{} connections for {checks} checks of each",
            accepted.load(Relaxed)
        );
        scheduler.stop(1);
        let at_stop = backends[1].checks();
        until("more checks of the other", || {
            backends[1].checks() >= at_stop + 5
        })
        .await;
        assert_eq!(backends[1].health(), crate::backend::Health::Healthy);
    }

    #[tokio::test]
    async fn checked_differently_one_address_gets_a_check_for_each() {
        use std::sync::atomic::Ordering::Relaxed;
        let (addr, accepted) = counting_listener().await;
        let scheduler = CheckScheduler::spawn();
        let (first, second) = (
            target_with(addr, Duration::from_secs(1)),
            target_with(addr, Duration::from_secs(2)),
        );
        let backends = [Arc::clone(&first.backend), Arc::clone(&second.backend)];
        scheduler.start(1, first);
        scheduler.start(2, second);
        until("ten checks each", || {
            backends.iter().all(|b| b.checks() >= 10)
        })
        .await;
        let checks: u64 = backends.iter().map(|b| b.checks()).sum();
        assert!(
            accepted.load(Relaxed) + 2 >= checks,
            "{} connections for {checks} checks in all",
            accepted.load(Relaxed)
        );
    }

    #[tokio::test]
    async fn a_target_joining_a_probe_takes_its_latest_result_at_once() {
        let (addr, _) = counting_listener().await;
        let scheduler = CheckScheduler::spawn();
        // Checked once a minute: the second target could only be judged this soon by
        // taking the first one's result.
        let minute = Duration::from_secs(60);
        let first = target_checked(addr, minute, Duration::from_secs(1));
        let second = target_checked(addr, minute, Duration::from_secs(1));
        let (early, late) = (Arc::clone(&first.backend), Arc::clone(&second.backend));
        scheduler.start(1, first);
        until("the first check", || early.checks() >= 1).await;
        scheduler.start(2, second);
        until("the joiner's result", || late.checks() >= 1).await;
        assert_eq!(late.health(), crate::backend::Health::Healthy);
    }

    #[tokio::test]
    async fn a_refused_connect_makes_the_backend_unhealthy_with_the_reason() {
        // A port that was just free: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let scheduler = CheckScheduler::spawn();
        let target = target(addr);
        let backend = Arc::clone(&target.backend);
        scheduler.start(1, target);
        until("a failed check", || backend.checks() >= 1).await;
        assert_eq!(backend.health(), crate::backend::Health::Unhealthy);
        assert!(backend
            .last_check_error()
            .is_some_and(|e| e.starts_with("connect")));
        drop(scheduler);
    }
}
