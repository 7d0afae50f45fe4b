//! Mirroring: copies of a share of a service's requests, sent to another pool after
//! the fact, their answers read and discarded. The request path only offers a copy to
//! a bounded queue (never waiting: a full queue drops it and counts it), so a slow or
//! dead mirror pool costs clients nothing; a fixed number of copies are under way at
//! once, and each has a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Semaphore};

use crate::balancer;
use crate::body::RequestBody;
use crate::metrics::{MirrorCounters, RouteMetrics};
use crate::routing::Pool;

/// Copies waiting to be sent, at most; more are dropped.
pub const QUEUE: usize = 1024;
/// Copies under way at once, at most.
pub const IN_FLIGHT: usize = 256;
/// The most of a mirrored answer's body that is read (the rest closes the connection).
const ANSWER_READ_LIMIT: usize = 1 << 20;

/// One copy to send.
pub struct Copy {
    pub pool: Arc<Pool>,
    pub head: http::request::Parts,
    pub body: Bytes,
    pub metrics: Option<Arc<RouteMetrics>>,
    pub counters: Option<Arc<MirrorCounters>>,
    pub connect_timeout: Duration,
    /// For the whole copy: connect, answer and its body.
    pub deadline: Duration,
}

/// The queue's sending side, shared by every connection.
pub struct MirrorQueue {
    copies: mpsc::Sender<Copy>,
}

impl MirrorQueue {
    /// Starts the sender task. Needs a tokio runtime.
    pub fn start() -> Arc<MirrorQueue> {
        let (copies, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(send_all(receiver));
        Arc::new(MirrorQueue { copies })
    }

    /// Never waits: a full queue drops the copy.
    pub fn offer(&self, copy: Copy) {
        if let Err(e) = self.copies.try_send(copy) {
            let copy = match e {
                mpsc::error::TrySendError::Full(copy) | mpsc::error::TrySendError::Closed(copy) => {
                    copy
                }
            };
            if let Some(counters) = &copy.counters {
                counters.dropped.inc();
            }
        }
    }
}

async fn send_all(mut copies: mpsc::Receiver<Copy>) {
    let room = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(copy) = copies.recv().await {
        // While every slot is taken the queue fills, and further copies are dropped.
        let Ok(slot) = Arc::clone(&room).acquire_owned().await else {
            return;
        };
        tokio::spawn(async move {
            let _slot = slot;
            send(copy).await;
        });
    }
}

async fn send(copy: Copy) {
    let started = Instant::now();
    let Copy {
        pool,
        head,
        body,
        metrics,
        counters,
        connect_timeout,
        deadline,
    } = copy;
    let answered = tokio::time::timeout(deadline, async {
        let index = balancer::pick(&pool, &[]).ok_or(())?;
        let backend = &pool.backends[index];
        let _in_flight = backend.track_if_in_rotation().ok_or(())?;
        let upstream = &pool.settings.upstream;
        let sender = match backend.conns.checkout(upstream) {
            Some(sender) => sender,
            None => Box::pin(backend.conns.connect(
                backend.addr,
                backend.tls_name(),
                upstream,
                connect_timeout,
            ))
            .await
            .map_err(|_| ())?,
        };
        let request = Request::from_parts(head, RequestBody::fixed(body));
        let response = sender
            .send_request(request, deadline)
            .await
            .map_err(|_| ())?;
        let status = response.status().as_u16();
        // Read whole (up to a limit) so the connection can carry the next copy.
        let mut answer = response.into_body();
        let mut read = 0;
        while let Some(frame) = answer.frame().await {
            let frame = frame.map_err(|_| ())?;
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > ANSWER_READ_LIMIT {
                return Err(());
            }
        }
        if let Some(conn) = answer.take_reusable() {
            backend.conns.checkin(conn);
        }
        Ok::<_, ()>((index, status))
    })
    .await;
    match answered {
        Ok(Ok((index, status))) => {
            if let Some(route) = &metrics {
                route.duration().observe(started.elapsed().as_secs_f64());
                route.count(Some(index), status);
            }
            if let Some(counters) = &counters {
                counters.sent.inc();
            }
        }
        _ => {
            // Counted as the proxy's own 502 would be: a mirror pool that cannot
            // answer shows the error rate it would give users.
            if let Some(route) = &metrics {
                route.duration().observe(started.elapsed().as_secs_f64());
                route.count(None, 502);
            }
            if let Some(counters) = &counters {
                counters.failed.inc();
            }
        }
    }
}
