//! The accept loop of one listener: the connection limit (and what a refused client
//! gets), the TLS handshake with its slots and timeout, then the connection handed to
//! `downstream`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use arc_swap::ArcSwap;

use super::downstream::{Builders, Connection, Served};
use super::ConnTracker;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::proxy::Proxy;

pub(super) struct Listener {
    pub(super) kind: ListenerKind,
    pub(super) open: prometheus::IntGauge,
    pub(super) refused: prometheus::IntCounter,
}

/// Connections over `max_connections` that are answered with a 503 at leisure (their
/// request read first, so the close does not reset the answer away). Past this many at
/// once, the rest are answered and closed on the spot: a flood costs no tasks, timers
/// or file descriptors held.
const MAX_REFUSALS: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ListenerKind {
    Plain,
    Tls,
}

/// What a connection is served with, taken when it is accepted: a reload swaps it
/// whole, so connections accepted after it get the new settings and open ones keep
/// theirs.
pub(super) struct Serving {
    pub(super) proxy: Arc<Proxy>,
    pub(super) builders: Arc<Builders>,
    pub(super) h2c: bool,
    /// Every request on the plain port is answered with a redirect to HTTPS on this port.
    pub(super) redirect_to_port: Option<u16>,
    pub(super) tls: Option<TlsServing>,
}

pub(super) struct TlsServing {
    pub(super) acceptor: tokio_rustls::TlsAcceptor,
    pub(super) handshake_timeout: Duration,
    /// Handshakes are the expensive part of a TLS connection: only this many at once,
    /// the rest wait (within their handshake timeout).
    pub(super) handshakes: Arc<Semaphore>,
}

/// What every listener's accept loop shares: the serving settings, the one connection
/// limit, the connection tracker and the metrics.
#[derive(Clone)]
pub(super) struct Accepting {
    pub(super) serving: Arc<ArcSwap<Serving>>,
    pub(super) limit: Arc<Semaphore>,
    pub(super) tracker: Arc<ConnTracker>,
    pub(super) metrics: Arc<Metrics>,
}

/// Accepts until `stop` says so (then the listening socket is closed). Connections are
/// watched by `tracker`, so the shutdown can wait for them; they outlive the loop.
pub(super) async fn accept_loop(
    listener: TcpListener,
    config: Listener,
    accepting: Accepting,
    mut stop: watch::Receiver<bool>,
) {
    let Accepting {
        serving,
        limit,
        tracker,
        metrics,
    } = accepting;
    let overloaded = bytes::Bytes::from(ProxyError::Overloaded.raw_http1());
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            config.refused.inc();
            if config.kind == ListenerKind::Plain {
                match Arc::clone(&refusals).try_acquire_owned() {
                    Ok(slot) => {
                        let answer = overloaded.clone();
                        tokio::spawn(async move {
                            refuse(stream, &answer).await;
                            drop(slot);
                        });
                    }
                    // A flood: answer with what fits in the socket buffer, close, and
                    // hold nothing.
                    Err(_) => refuse_now(stream, &overloaded),
                }
            }
            // A TLS client cannot read a plain answer: closing is all there is.
            continue;
        };
        let _ = stream.set_nodelay(true);
        config.open.inc();
        let open = config.open.clone();
        let watcher = tracker.watcher();
        let serving = serving.load_full();
        let metrics = Arc::clone(&metrics);
        let kind = config.kind;
        // With workers, the connection is served on one of them (see `worker`): the
        // socket leaves this runtime's reactor for that worker's.
        let (accepted, worker) = match crate::worker::next() {
            None => (Accepted::Here(stream), None),
            Some(worker) => match stream.into_std() {
                Ok(stream) => (Accepted::Moved(stream), Some(worker)),
                Err(e) => {
                    tracing::warn!(%peer, "cannot hand a connection to a worker: {e}");
                    open.dec();
                    continue;
                }
            },
        };
        let task = async move {
            let stream = match accepted {
                Accepted::Here(stream) => stream,
                Accepted::Moved(stream) => match TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(%peer, "a worker cannot take a connection: {e}");
                        open.dec();
                        return;
                    }
                },
            };
            let builders = &serving.builders;
            let proxy = Arc::clone(&serving.proxy);
            match (kind, &serving.tls) {
                (ListenerKind::Plain, _) => {
                    let conn = Connection {
                        proxy,
                        peer,
                        tls: false,
                        redirect_to_port: serving.redirect_to_port,
                        metrics,
                    };
                    if serving.h2c {
                        // Boxed: the generic connection's future is kilobytes, which
                        // every plain HTTP/1.1 connection's task would carry too
                        // (4,288 B, against 992 B without it).
                        Box::pin(conn.serve(builders, Served::Detect, stream, watcher)).await;
                    } else {
                        conn.serve_plain_http1(builders, stream, watcher).await;
                    }
                }
                // Boxed: the handshake and the generic connection make a future of
                // kilobytes that plain connections would otherwise carry too.
                (ListenerKind::Tls, Some(tls)) => {
                    Box::pin(async move {
                        let handshake = tokio::time::timeout(tls.handshake_timeout, async {
                            let _slot = tls.handshakes.acquire().await;
                            tls.acceptor.accept(stream).await
                        })
                        .await;
                        let stream = match handshake {
                            Ok(Ok(stream)) => Some(stream),
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, "TLS handshake failed: {e}");
                                failed_handshake(&metrics, "error")
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                failed_handshake(&metrics, "timeout")
                            }
                        };
                        if let Some(stream) = stream {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let served = if h2 { Served::Http2 } else { Served::Http1 };
                            let conn = Connection {
                                proxy,
                                peer,
                                tls: true,
                                redirect_to_port: None,
                                metrics,
                            };
                            conn.serve(builders, served, stream, watcher).await;
                        }
                    })
                    .await
                }
                // TLS was removed by a reload while this listener was closing.
                (ListenerKind::Tls, None) => {}
            }
            open.dec();
            drop(permit);
        };
        match worker {
            None => drop(tokio::spawn(task)),
            Some(worker) => drop(worker.spawn(task)),
        }
    }
}

/// An accepted connection on its way to the runtime that serves it.
enum Accepted {
    /// Registered with this runtime, which serves it.
    Here(TcpStream),
    /// Out of any reactor, for a worker to register.
    Moved(std::net::TcpStream),
}

fn failed_handshake<T>(metrics: &Metrics, reason: &str) -> Option<T> {
    metrics
        .tls_handshake_failures
        .with_label_values(&[reason])
        .inc();
    None
}

/// Answers a connection the proxy will not serve with a complete HTTP response. The
/// request is read first (briefly), so closing does not reset the connection before the
/// client has read the answer.
async fn refuse(mut stream: TcpStream, answer: &[u8]) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.write_all(answer)).await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
}

/// As `refuse`, without waiting for anything: what has arrived of the request is read,
/// the answer written if the socket takes it, and the connection closed.
fn refuse_now(stream: TcpStream, answer: &[u8]) {
    let mut buf = [0u8; 4096];
    let _ = stream.try_read(&mut buf);
    let _ = stream.try_write(answer);
}
