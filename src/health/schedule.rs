//! When each backend is checked: one task keeps every backend's next check time in a
//! heap and starts each check as a short task of its own when it is due. An idle
//! backend costs a heap slot and a small entry, not a sleeping task (with the timer,
//! the settings and the future a task holds), which is what 10,000 pools need.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

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

    /// Checks `target` from now on, under `id` (never reused): the first check comes
    /// after a random part of the jitter, so many backends do not fire at once, then
    /// one every interval, give or take the jitter, after the previous one ended.
    pub fn start(&self, id: u64, target: CheckTarget) {
        // Only fails once the task is gone, when nothing is checked any more anyway.
        let _ = self.commands.send(Command::Start(id, target));
    }

    /// Stops the checks of `id`, aborting one under way.
    pub fn stop(&self, id: u64) {
        let _ = self.commands.send(Command::Stop(id));
    }
}

impl Drop for CheckScheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Entry {
    target: CheckTarget,
    counter: HealthCounter,
    running: Option<AbortHandle>,
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

async fn run(mut commands: mpsc::UnboundedReceiver<Command>, max_running: usize) {
    let mut entries: HashMap<u64, Entry> = HashMap::new();
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    // Check tasks under way, and which entry each is for: a check that panics still
    // gets its backend scheduled again.
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
                    // From the backend's current health, so checks restarted by a
                    // reload do not judge a healthy backend on one failed check.
                    let health = &target.settings.health;
                    let counter =
                        HealthCounter::new(health.healthy_threshold, health.unhealthy_threshold)
                            .resuming(target.backend.health());
                    let first = Instant::now() + jittered(Duration::ZERO, health.jitter);
                    entries.insert(id, Entry { target, counter, running: None });
                    due.push(Reverse((first, id)));
                }
                Some(Command::Stop(id)) => {
                    if let Some(task) = entries.remove(&id).and_then(|e| e.running) {
                        task.abort();
                    }
                }
            },
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                let (task, outcome) = match joined {
                    Ok((task, outcome)) => (task, outcome),
                    Err(e) if e.is_panic() => (e.id(), Err("the check panicked".to_string())),
                    // Aborted by `Stop`: its entry is gone.
                    Err(e) => {
                        running_ids.remove(&e.id());
                        continue;
                    }
                };
                // An entry stopped while its check was finishing is gone: nothing to do.
                let Some(id) = running_ids.remove(&task) else { continue };
                let Some(entry) = entries.get_mut(&id) else { continue };
                entry.running = None;
                let backend = &entry.target.backend;
                backend.record_check(outcome.as_ref().map(|_| ()).map_err(String::as_str));
                if let Some(next) = entry.counter.record(outcome.is_ok()) {
                    apply_transition(&entry.target.pool, backend, next, &outcome);
                }
                let health = &entry.target.settings.health;
                due.push(Reverse((Instant::now() + jittered(health.interval, health.jitter), id)));
            }
            () = &mut timer, if earliest.is_some() && running.len() < max_running => {
                let now = Instant::now();
                while let Some(&Reverse((at, id))) = due.peek() {
                    if at > now || running.len() >= max_running {
                        break;
                    }
                    due.pop();
                    // Stopped since it was scheduled: its slot is just dropped.
                    let Some(entry) = entries.get_mut(&id) else {
                        continue;
                    };
                    let backend = Arc::clone(&entry.target.backend);
                    let settings = Arc::clone(&entry.target.settings);
                    let task = running.spawn(async move {
                        check_once(&backend, &settings.health, &settings.upstream).await
                    });
                    running_ids.insert(task.id(), id);
                    entry.running = Some(task);
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
        let behaviour = PoolBehaviour {
            health: HealthConfig {
                interval: Duration::from_millis(20),
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
        let (kept, stopped) = (target(addr), target(addr));
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
                let target = target(addr);
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
