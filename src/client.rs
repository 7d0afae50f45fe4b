//! Upstream HTTP/1.1 connections: connect with a timeout, and keep idle keep-alive
//! connections per backend in a lock-free queue.
//!
//! The proxy connects *before* it hands the request over, so a refused or timed-out
//! connect leaves the request (and its unread body) intact for a retry on another
//! backend; a pooled connection found closed when the request is offered hands the
//! request back too (`try_send_request`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::RequestBody;

pub type Sender = http1::SendRequest<RequestBody>;

/// Idle connections kept per backend; beyond this a finished connection is closed.
const MAX_IDLE_PER_BACKEND: usize = 512;

pub struct ConnPool {
    idle: ArrayQueue<IdleConn>,
    idle_timeout: Duration,
}

struct IdleConn {
    sender: Sender,
    since: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl ConnPool {
    pub fn new(idle_timeout: Duration) -> ConnPool {
        ConnPool {
            idle: ArrayQueue::new(MAX_IDLE_PER_BACKEND),
            idle_timeout,
        }
    }

    /// A pooled connection that is still open and not past its idle time.
    pub async fn checkout(&self) -> Option<Sender> {
        while let Some(mut conn) = self.idle.pop() {
            if conn.sender.is_closed() || conn.since.elapsed() > self.idle_timeout {
                continue;
            }
            // A connection is returned as soon as its response body ends; hyper marks it
            // ready a moment later, once its connection task has seen the end too.
            if conn.sender.ready().await.is_ok() {
                return Some(conn.sender);
            }
        }
        None
    }

    pub fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        // A full queue drops the connection, which closes it.
        let _ = self.idle.push(IdleConn {
            sender,
            since: Instant::now(),
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }
}

/// Opens a new HTTP/1.1 connection to `addr`; the connection task runs on its own and
/// ends when the connection closes.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(result) => result?,
        Err(_) => return Err(ConnectError::Timeout(timeout)),
    };
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, "upstream connection ended: {e}");
        }
    });
    Ok(sender)
}
