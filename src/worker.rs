//! Data-plane workers for `workers > 1`: one OS thread each, running its own
//! current-thread tokio runtime. An accepted connection is handed to one of them and
//! lives there whole: its hyper connection, its requests, the upstream connections
//! they open and the idle ones they pool (`client::ConnPool` keeps one idle list per
//! worker). Nothing on a request's path then wakes another thread, where tokio's
//! work-stealing runtime moved tasks and wake-ups between threads on every request
//! (measured: 1.58x nginx's CPU per request with two of its threads, against 1.25x
//! with one).
//!
//! Without workers (`workers = 1`, and tests that run the server in their own
//! runtime) every connection stays on the runtime that accepted it, as list 0.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

thread_local! {
    /// Which worker this thread is; `None` off the workers.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start worker {index}: {source}")]
pub struct WorkerError {
    index: usize,
    source: std::io::Error,
}

/// Starts `count` workers for the rest of the process. They run until it exits; a
/// connection still open then is cut, as it would be on any exit.
pub fn start(count: usize) -> Result<(), WorkerError> {
    let mut handles = Vec::with_capacity(count);
    for index in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| WorkerError { index, source })?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new()
            .name(format!("switchyard-worker-{index}"))
            .spawn(move || {
                INDEX.with(|cell| cell.set(Some(index)));
                runtime.block_on(std::future::pending::<()>());
            })
            .map_err(|source| WorkerError { index, source })?;
    }
    // Started once, from `main`, before anything is served.
    let _ = WORKERS.set(Workers {
        handles,
        next: AtomicUsize::new(0),
    });
    Ok(())
}

/// The worker runtime for the next accepted connection (round robin), or `None` when
/// there are no workers.
pub fn next() -> Option<&'static Handle> {
    let workers = WORKERS.get()?;
    let i = workers.next.fetch_add(1, Ordering::Relaxed) % workers.handles.len();
    Some(&workers.handles[i])
}

/// How many per-worker lists a pool keeps: one per worker, and one for every thread
/// that is not a worker (the control plane's health checks and mirrored copies, or
/// all traffic when there are no workers).
pub fn lists() -> usize {
    WORKERS.get().map_or(1, |w| w.handles.len() + 1)
}

/// This thread's list, below `lists()`.
pub fn list() -> usize {
    match (INDEX.with(Cell::get), WORKERS.get()) {
        (Some(index), Some(_)) => index + 1,
        _ => 0,
    }
}
