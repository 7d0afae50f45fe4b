//! The per-request path: route, pick a backend, forward, stream the answer back.
//! Nothing here takes a lock or waits on the control plane: the routing table is one
//! wait-free `ArcSwap` load, and backend state is atomics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{HeaderValue, CONTENT_LENGTH, EXPECT, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;

use prometheus::Histogram;

use crate::accesslog::{AccessLog, AccessRecord};
use crate::backend::{Backend, InFlight, UpstreamTimeout};
use crate::balancer;
use crate::body::{Ending, ProxyBody, RequestBody, RequestBodyError};
use crate::client::{ConnectError, Sender, Upstream, UpstreamBody};
use crate::error::ProxyError;
use crate::headers::{self, Forwarded};
use crate::health;
use crate::metrics::{Metrics, RouteMetrics};
use crate::mirror::MirrorQueue;
use crate::routing::{MirrorRoute, Pool, RoutingTable};
use crate::split::Reason;
use crate::upstream_h1;

/// The response body a client gets from the proxy.
pub type ResponseBody = ProxyBody<Exchange>;

/// Most backends one request may try; `connect_attempts` is capped to this.
const MAX_ATTEMPTS: usize = balancer::MAX_EXCLUDED;

/// Per-request settings, fixed at start.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    pub upstream_header_timeout: Duration,
    pub upstream_body_timeout: Duration,
    pub connect_attempts: u32,
    pub max_request_body: Option<u64>,
    pub client_body_timeout: Duration,
    pub mirror_max_body: u64,
}

pub struct Proxy {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub settings: ProxySettings,
    /// `None` when `[metrics] enabled = false`.
    pub metrics: Option<Arc<Metrics>>,
    /// `None` when the access log is off.
    pub access_log: Option<Arc<AccessLog>>,
    /// Counted whatever `[metrics] enabled` says: it is about clients, not routes.
    pub client_body_timeouts: prometheus::IntCounter,
    /// Where mirrored copies are offered.
    pub mirror: Arc<MirrorQueue>,
}

/// How one attempt on one backend ended, when it did not produce a response.
enum AttemptError {
    /// Nothing reached the backend: the request is whole for another backend.
    NotSent(ConnectError),
    /// The request was (at least partly) written, then the exchange failed.
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// The client's request body failed (too large, too slow, client gone): the
    /// answer that says so.
    Body(ProxyError),
    TimedOut(UpstreamTimeout),
}

/// A mirrored copy whose body is still to be taken from the request's as it streams.
struct PendingCopy {
    pool: Arc<crate::routing::Pool>,
    head: http::request::Parts,
    metrics: Option<Arc<RouteMetrics>>,
    counters: Option<Arc<crate::metrics::MirrorCounters>>,
    limit: u64,
    connect_timeout: Duration,
    deadline: Duration,
}

impl PendingCopy {
    /// Offers the copy to `queue` once `body` has streamed past whole.
    fn take_from(self: Box<Self>, body: &mut RequestBody, queue: &Arc<MirrorQueue>) {
        let queue = Arc::clone(queue);
        let limit = self.limit;
        body.tee(crate::body::Tee::new(
            limit,
            Box::new(move |end| match end {
                crate::body::TeeEnd::Whole(bytes) => queue.offer(crate::mirror::Copy {
                    pool: self.pool,
                    head: self.head,
                    body: bytes,
                    metrics: self.metrics,
                    counters: self.counters,
                    connect_timeout: self.connect_timeout,
                    deadline: self.deadline,
                }),
                crate::body::TeeEnd::TooLarge => {
                    if let Some(counters) = &self.counters {
                        counters.too_large.inc();
                    }
                }
                crate::body::TeeEnd::Broken => {
                    if let Some(counters) = &self.counters {
                        counters.failed.inc();
                    }
                }
            }),
        ));
    }
}

/// A routed request, ready for its pool's backends.
struct Prepared {
    pool: Arc<Pool>,
    outgoing: Outgoing,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// The request as it goes to backends. An HTTP/1.1 attempt only borrows it, so it is
/// whole again for the next attempt unless its body was taken; an HTTP/2 attempt takes
/// it, or a copy of its head when it may be sent again.
struct Outgoing {
    head: UpstreamHead,
    body: RequestBody,
    /// Bodiless and idempotent: it may go to another backend after one failed it
    /// mid-exchange (nginx's `proxy_next_upstream error` for idempotent methods).
    resendable: bool,
    /// Taken by an HTTP/2 connection that did not give it back.
    spent: bool,
}

/// The request's head in the form its pool's backends take.
enum UpstreamHead {
    /// Encoded when the request was prepared (see `EncodedRequest`).
    H1(upstream_h1::EncodedRequest),
    /// hyper's HTTP/2 client takes the request itself.
    H2(http::request::Parts),
}

impl Outgoing {
    /// The request for an HTTP/2 connection; `None` if it was prepared for HTTP/1.1.
    fn for_h2(&mut self) -> Option<Request<RequestBody>> {
        let UpstreamHead::H2(parts) = &mut self.head else {
            return None;
        };
        if self.resendable {
            let mut req = Request::new(RequestBody::empty());
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            return Some(req);
        }
        self.spent = true;
        let (empty, ()) = Request::new(()).into_parts();
        let parts = std::mem::replace(parts, empty);
        let body = std::mem::replace(&mut self.body, RequestBody::empty());
        Some(Request::from_parts(parts, body))
    }

    /// A request an HTTP/2 connection refused before sending it.
    fn back_from_h2(&mut self, req: Request<RequestBody>) {
        if self.spent {
            let (parts, body) = req.into_parts();
            self.head = UpstreamHead::H2(parts);
            self.body = body;
            self.spent = false;
        }
    }
}

/// A request prepared for one HTTP version met a new connection of the other: never,
/// as both follow the pool's `protocol`. (A pooled one can, after a reload changed the
/// protocol: that one is dropped and the next tried.)
fn protocol_mismatch() -> AttemptError {
    AttemptError::Failed(Box::new(std::io::Error::other(
        "request prepared for another HTTP version than the backend connection's",
    )))
}

/// Who sent a request: the same for every request on a connection, so made once.
pub struct Peer {
    pub addr: SocketAddr,
    /// The request came over TLS.
    pub tls: bool,
    /// `addr`'s IP as an `X-Forwarded-For` item.
    forwarded_for: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr, tls: bool) -> Peer {
        Peer {
            addr,
            tls,
            forwarded_for: headers::forwarded_for_value(addr.ip()),
        }
    }
}

/// What the request path learned about one request, for metrics and the access log.
struct Trace {
    service: Option<Arc<str>>,
    pool: Option<Arc<Pool>>,
    route: Option<Arc<RouteMetrics>>,
    backend: Option<usize>,
    retries: u32,
    reason: Reason,
}

impl Proxy {
    /// The answer to one client request. Routing and preparing the request happen
    /// here, when hyper hands the request over, before the future that sends it
    /// exists:
    /// - a future keeps room for every local it held across an await (the request as
    ///   it came, its parts, its body, each moved on but not forgotten), and hyper
    ///   moves the request's future for every request (into the HTTP/1 dispatcher,
    ///   into each HTTP/2 stream's task);
    /// - hyper's HTTP/1 dispatcher looks at the connection (for the client's close)
    ///   before it first polls the future, and while the request's fields still hold
    ///   its read buffer, that look has to make it a new one.
    ///
    /// So a mirrored copy of a bodiless request is queued here, even if hyper then
    /// drops the future unpolled (its connection closing at that moment).
    pub fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: &Arc<Peer>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
        let started = Instant::now();
        let head = self
            .access_log
            .as_ref()
            .map(|_| (req.method().clone(), req.uri().path().to_string()));
        let mut trace = Trace {
            service: None,
            pool: None,
            route: None,
            backend: None,
            retries: 0,
            reason: Reason::Active,
        };
        // Boxed: the sending future is over a kilobyte, and one allocation is cheaper
        // than the copies hyper would make of it (+15-25% HTTP/2 req/s measured, HTTP/1
        // unchanged).
        let sending = match self.prepare(req, peer, &mut trace) {
            Ok(prepared) => Ok(Box::pin(Arc::clone(self).send(prepared, trace))),
            Err(error) => Err((error, trace)),
        };
        let (proxy, peer) = (Arc::clone(self), Arc::clone(peer));
        async move {
            let (forwarded, trace) = match sending {
                Ok(sending) => sending.await,
                Err((error, trace)) => (Err(error), trace),
            };
            proxy.account(forwarded, &trace, started, head, &peer)
        }
    }

    /// Counts and logs the answer.
    fn account(
        &self,
        forwarded: Result<Response<ResponseBody>, ProxyError>,
        trace: &Trace,
        started: Instant,
        head: Option<(Method, String)>,
        peer: &Peer,
    ) -> Response<ResponseBody> {
        let (mut response, error) = match forwarded {
            Ok(response) => (response, None),
            Err(error) => (error.response(), Some(error.code())),
        };
        let status = response.status().as_u16();
        match (&trace.route, &self.metrics) {
            (Some(route), _) => {
                route.duration().observe(started.elapsed().as_secs_f64());
                route.count(trace.backend, status);
                // Made with the route's first request, at 0, so `rate()` over it is 0
                // rather than empty before the first retry.
                let retries = route.retries();
                if trace.retries > 0 {
                    retries.inc_by(u64::from(trace.retries));
                }
            }
            (None, Some(metrics)) if trace.service.is_none() => {
                metrics.unrouted().count(None, status)
            }
            _ => {}
        }
        if let (Some(sink), Some((method, path))) = (&self.access_log, head) {
            let record = AccessRecord {
                time: std::time::SystemTime::now() - started.elapsed(),
                client: peer.addr,
                method,
                path,
                status,
                bytes: 0,
                duration: started.elapsed(),
                service: trace.service.clone(),
                pool: trace.pool.as_ref().map(|p| Arc::clone(&p.name)),
                backend: trace
                    .pool
                    .as_ref()
                    .zip(trace.backend)
                    .and_then(|(p, i)| p.backends.get(i))
                    .map(|b| Arc::clone(&b.name)),
                retries: trace.retries,
                decision: trace.reason.as_str(),
                error,
            };
            let pending = Box::new(PendingLog {
                record,
                sink: Arc::clone(sink),
                started,
            });
            // Upstream bodies log when they end (with their size); the rest now.
            match response.body_mut().ending_mut() {
                Some(exchange) => exchange.log = Some(pending),
                None => pending.send(
                    http_body::Body::size_hint(response.body())
                        .exact()
                        .unwrap_or(0),
                ),
            }
        }
        response
    }

    /// Sends a prepared request to its pool's backends; gives the trace back with the
    /// answer. Not an `async fn`, which would keep a second copy of the request.
    fn send(
        self: Arc<Self>,
        prepared: Prepared,
        mut trace: Trace,
    ) -> impl Future<Output = (Result<Response<ResponseBody>, ProxyError>, Trace)> + Send + 'static
    {
        let Prepared {
            pool,
            mut outgoing,
            client_upgrade,
        } = prepared;
        async move {
            let sent = self
                .send_with_retries(&pool, &mut outgoing, &mut trace)
                .await;
            let answer =
                sent.map(|(response, in_flight)| self.respond(response, in_flight, client_upgrade));
            (answer, trace)
        }
    }

    /// Routes the request and prepares it for its backends.
    fn prepare(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
        trace: &mut Trace,
    ) -> Result<Prepared, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest);
        }
        if let (Some(limit), Some(length)) = (
            self.settings.max_request_body,
            content_length(req.headers()),
        ) {
            if length > limit {
                return Err(ProxyError::BodyTooLarge);
            }
        }
        let host = headers::request_host(&req).map_err(|_| ProxyError::InvalidHost)?;
        // Boxed: a copy's head is hundreds of bytes, which every request's future
        // would otherwise carry.
        let mirror: Option<Option<Box<PendingCopy>>>;
        let pool = {
            let table = self.table.load();
            let service = table
                .route(host, req.uri().path())
                .ok_or(ProxyError::NoRoute)?;
            let choice = service.choose(req.headers());
            trace.service = Some(Arc::clone(&service.name));
            trace.route = choice.metrics.cloned();
            trace.reason = choice.reason;
            let pool = Arc::clone(choice.pool);
            // The preview header chooses a pool; the app does not see it.
            if let Some(preview) = &service.preview {
                req.headers_mut().remove(&preview.header);
            }
            mirror = service
                .mirror
                .as_deref()
                .filter(|m| crate::random::below(10_000) < u64::from(m.share_bp))
                .map(|m| self.mirror_copy(m, &req, peer));
            pool
        };
        trace.pool = Some(Arc::clone(&pool));

        let upstream = &pool.settings.upstream;
        // Upgrades (WebSocket) are HTTP/1.1 only, on both sides.
        let upgrade = req.version() == Version::HTTP_11
            && !upstream.protocol.is_h2()
            && headers::is_upgrade_request(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        let forwarded = prepare_upstream_request(&mut parts, peer, upgrade, upstream, false)?;
        let mut body = RequestBody::new(
            body,
            self.settings.max_request_body,
            self.settings.client_body_timeout,
            &self.client_body_timeouts,
        );
        if let Some(copy) = mirror.flatten().filter(|_| !upgrade) {
            copy.take_from(&mut body, &self.mirror);
        }
        let resendable = self.settings.connect_attempts > 1
            && http_body::Body::is_end_stream(&body)
            && upstream_h1::is_idempotent(&parts.method);
        let head = if upstream.protocol.is_h2() {
            UpstreamHead::H2(parts)
        } else {
            // `parts` and `forwarded` end here: the request's fields no longer hold
            // the client connection's read buffer (see `EncodedRequest`).
            UpstreamHead::H1(upstream_h1::EncodedRequest::new(
                parts,
                forwarded.as_ref(),
                &body,
                upgrade,
            ))
        };
        Ok(Prepared {
            pool,
            outgoing: Outgoing {
                head,
                body,
                resendable,
                spent: false,
            },
            client_upgrade,
        })
    }

    /// The head of a mirrored copy of `req`, prepared for the mirror pool; `None` when
    /// the copy cannot be made (counted) or its body is known to be over the limit.
    fn mirror_copy(
        &self,
        mirror: &MirrorRoute,
        req: &Request<Incoming>,
        peer: &Peer,
    ) -> Option<Box<PendingCopy>> {
        let counters = mirror.counters.clone();
        let limit = self.settings.mirror_max_body;
        if content_length(req.headers()).is_some_and(|length| length > limit) {
            if let Some(counters) = &counters {
                counters.too_large.inc();
            }
            return None;
        }
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        let (mut head, ()) = head.into_parts();
        let upstream = &mirror.pool.settings.upstream;
        // A copy goes out through `Sender::send_request`, which sends the fields as
        // they are.
        if prepare_upstream_request(&mut head, peer, false, upstream, true).is_err() {
            // The request itself will be refused the same way.
            return None;
        }
        head.headers
            .insert("x-switchyard-mirror", HeaderValue::from_static("1"));
        Some(Box::new(PendingCopy {
            pool: Arc::clone(&mirror.pool),
            head,
            metrics: mirror.metrics.clone(),
            counters,
            limit,
            connect_timeout: self.settings.connect_timeout,
            deadline: self.settings.upstream_header_timeout,
        }))
    }

    async fn send_with_retries(
        &self,
        pool: &Pool,
        outgoing: &mut Outgoing,
        trace: &mut Trace,
    ) -> Result<(Response<UpstreamBody>, InFlight), ProxyError> {
        let attempts = (self.settings.connect_attempts as usize).min(MAX_ATTEMPTS);
        // Backends this request will not go to again: tried, or drained under it.
        let mut excluded = [usize::MAX; MAX_ATTEMPTS];
        let mut skipped = 0;
        let mut failure = ProxyError::NoHealthyBackend;
        let connect_metric = trace.route.as_ref().map(|r| r.connect());
        let mut attempt = 0;
        while attempt < attempts && skipped < MAX_ATTEMPTS {
            let Some(index) = balancer::pick(pool, &excluded[..skipped]) else {
                break;
            };
            excluded[skipped] = index;
            skipped += 1;
            let backend = &pool.backends[index];
            // Counted before the last look at its admin state, so a drain that waits for
            // in-flight 0 cannot miss this request (see `track_if_in_rotation`).
            let Some(in_flight) = backend.track_if_in_rotation() else {
                continue;
            };
            trace.retries = attempt as u32;
            attempt += 1;
            if outgoing.spent {
                break;
            }
            match self
                .send_to(backend, &pool.settings.upstream, outgoing, connect_metric)
                .await
            {
                Ok(response) => {
                    health::report(pool, backend, !response.status().is_server_error());
                    trace.backend = Some(index);
                    return Ok((response, in_flight));
                }
                Err(AttemptError::NotSent(error)) => {
                    // Not reached: the answer (503) is counted under no backend.
                    trace.backend = None;
                    health::report(pool, backend, false);
                    backend.warn_rate_limited("upstream connect failed", &error);
                    failure = ProxyError::UpstreamConnect;
                }
                Err(AttemptError::Body(answer)) => return Err(answer),
                Err(AttemptError::Failed(error)) => {
                    // The backend that broke the exchange is the one the 502 is counted
                    // and logged under.
                    trace.backend = Some(index);
                    health::report(pool, backend, false);
                    backend.warn_rate_limited("upstream request failed", &error);
                    failure = ProxyError::UpstreamError;
                    if !outgoing.resendable {
                        break;
                    }
                }
                Err(AttemptError::TimedOut(which)) => {
                    trace.backend = Some(index);
                    health::report(pool, backend, false);
                    backend.count_timeout(which);
                    match which {
                        UpstreamTimeout::Header => backend.warn_rate_limited(
                            "upstream timed out",
                            &format_args!(
                                "no response headers within {:?}",
                                self.settings.upstream_header_timeout
                            ),
                        ),
                        UpstreamTimeout::Body => backend.warn_rate_limited(
                            "upstream timed out",
                            &format_args!(
                                "the backend took none of the request body for {:?}",
                                self.settings.upstream_body_timeout
                            ),
                        ),
                    }
                    return Err(ProxyError::UpstreamTimeout);
                }
            }
        }
        Err(failure)
    }

    /// One backend: a pooled connection if one is open, else a new one. A pooled
    /// connection that turns out closed before it took the request leaves the request
    /// whole, and the next is tried.
    async fn send_to(
        &self,
        backend: &Backend,
        upstream: &Upstream,
        outgoing: &mut Outgoing,
        connect_metric: Option<&Histogram>,
    ) -> Result<Response<UpstreamBody>, AttemptError> {
        let timeout = self.settings.upstream_header_timeout;
        let mut resent_stale = false;
        loop {
            let (sender, pooled) = match backend.conns.checkout(upstream) {
                Some(sender) => (sender, true),
                None => {
                    let started = Instant::now();
                    // Boxed: opening a connection (TLS state above all) is a large
                    // future, and inline it would make every request's future that
                    // large, copied on each spawn and poll setup, pooled or not.
                    let connected = Box::pin(backend.conns.connect(
                        backend.addr,
                        backend.tls_name(),
                        upstream,
                        self.settings.connect_timeout,
                    ))
                    .await;
                    match connected {
                        Ok(sender) => {
                            if let Some(metric) = connect_metric {
                                metric.observe(started.elapsed().as_secs_f64());
                            }
                            (sender, false)
                        }
                        Err(error) => return Err(AttemptError::NotSent(error)),
                    }
                }
            };
            let mut h2 = match sender {
                Sender::H1(conn) => {
                    let UpstreamHead::H1(request) = &mut outgoing.head else {
                        // Pooled before a reload made the pool HTTP/2: closed, and the
                        // next connection tried; the request has not gone anywhere.
                        drop(conn);
                        if pooled {
                            continue;
                        }
                        return Err(protocol_mismatch());
                    };
                    let body_timeout = self.settings.upstream_body_timeout;
                    let sent = conn
                        .send(request, &mut outgoing.body, timeout, body_timeout)
                        .await;
                    return match sent {
                        Ok((head, body)) => Ok(Response::from_parts(head, UpstreamBody::H1(body))),
                        // Closed by the backend while it was idle, most likely: once,
                        // the request goes on the next connection.
                        Err(upstream_h1::SendError::Stale(_)) if !resent_stale => {
                            resent_stale = true;
                            continue;
                        }
                        Err(upstream_h1::SendError::Stale(e)) => {
                            Err(AttemptError::Failed(Box::new(e)))
                        }
                        Err(upstream_h1::SendError::Failed(e)) => {
                            Err(AttemptError::Failed(Box::new(e)))
                        }
                        Err(upstream_h1::SendError::Body(e)) => {
                            Err(AttemptError::Body(body_failure(&e)))
                        }
                        Err(upstream_h1::SendError::TimedOut) => {
                            Err(AttemptError::TimedOut(UpstreamTimeout::Header))
                        }
                        Err(upstream_h1::SendError::Stalled) => {
                            Err(AttemptError::TimedOut(UpstreamTimeout::Body))
                        }
                    };
                }
                Sender::H2(h2) => {
                    if !matches!(outgoing.head, UpstreamHead::H2(_)) {
                        // The shared connection of a pool a reload made HTTP/1.1:
                        // forgotten (it closes once its last stream ends), and the next
                        // connection tried.
                        if pooled {
                            backend.conns.forget_shared();
                            continue;
                        }
                        return Err(protocol_mismatch());
                    }
                    h2
                }
            };
            // In a block: the request moves into the exchange, and out of this future.
            let (exchange, body_sent) = {
                let Some(mut req) = outgoing.for_h2() else {
                    return Err(protocol_mismatch());
                };
                let body_sent = req.body_mut().notify_end();
                (h2.try_send_request(req), body_sent)
            };
            let deadline = async {
                if let Some(body_sent) = body_sent {
                    let _ = body_sent.await;
                }
                tokio::time::sleep(timeout).await;
            };
            let outcome = tokio::select! {
                outcome = exchange => outcome,
                () = deadline => return Err(AttemptError::TimedOut(UpstreamTimeout::Header)),
            };
            match outcome {
                Ok(response) => return Ok(response.map(UpstreamBody::H2)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => {
                        outgoing.back_from_h2(unsent);
                        if !pooled {
                            return Err(AttemptError::NotSent(ConnectError::Handshake(
                                error.into_error(),
                            )));
                        }
                        backend.conns.forget_shared();
                    }
                    None => {
                        let error = error.into_error();
                        return Err(match request_body_error(&error) {
                            Some(body_error) => AttemptError::Body(body_failure(body_error)),
                            None => AttemptError::Failed(Box::new(error)),
                        });
                    }
                },
            }
        }
    }

    fn respond(
        &self,
        response: Response<UpstreamBody>,
        in_flight: InFlight,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = response.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let upgraded = match body {
                UpstreamBody::H1(body) => body.into_upgraded(),
                UpstreamBody::H2(_) => None,
            };
            let (Some(client_upgrade), Some((upstream, read_ahead))) = (client_upgrade, upgraded)
            else {
                // A 101 nobody asked for cannot be passed on.
                return ProxyError::UpstreamError.response();
            };
            tokio::spawn(tunnel(client_upgrade, upstream, read_ahead, in_flight));
            headers::strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(parts, ProxyBody::empty());
        }
        headers::strip_hop_by_hop(&mut parts.headers, false);
        let exchange = Exchange {
            in_flight,
            log: None,
            bytes: 0,
        };
        let body_timeout = self.settings.upstream_body_timeout;
        Response::from_parts(parts, ProxyBody::upstream(body, exchange, body_timeout))
    }
}

/// One exchange with a backend, from its response headers until its body has been passed
/// on: whole, the connection goes back to the backend's pool; broken off or dropped
/// early (client gone), the connection closes with the body that holds it. Either way
/// the request stops counting as in flight and its access log line, if any, is sent
/// then, with the bytes passed on.
pub struct Exchange {
    in_flight: InFlight,
    log: Option<Box<PendingLog>>,
    bytes: u64,
}

impl Ending for Exchange {
    type Body = UpstreamBody;

    fn passed(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    fn ended(&mut self, body: &mut UpstreamBody) {
        if let Some(conn) = body.take_reusable() {
            self.in_flight.backend().conns.checkin(conn);
        }
    }

    fn broken(&mut self) {
        // The body dropped its broken connection: nothing to pool.
    }

    fn still_sending(&self, body: &UpstreamBody) -> bool {
        body.still_sending()
    }

    fn stalled(&mut self, waited: Duration) -> Box<dyn std::error::Error + Send + Sync> {
        // The connection goes with the body: whatever the backend sends later would be
        // read as the next response's.
        let backend = self.in_flight.backend();
        backend.count_timeout(UpstreamTimeout::Body);
        let error = format!("no more of the response body for {waited:?}");
        backend.warn_rate_limited("upstream timed out", &error);
        error.into()
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.send(self.bytes);
        }
        // `in_flight` goes with it.
    }
}

/// An access log record waiting for its response body to end.
struct PendingLog {
    record: AccessRecord,
    sink: Arc<AccessLog>,
    started: Instant,
}

impl PendingLog {
    fn send(mut self, bytes: u64) {
        self.record.bytes = bytes;
        self.record.duration = self.started.elapsed();
        self.sink.log(self.record);
    }
}

/// Both sides of an upgraded connection, copied until either closes. The backend counts
/// it as in flight for as long as it is open.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut upstream: upstream_h1::Io,
    read_ahead: bytes::Bytes,
    in_flight: InFlight,
) {
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!(backend = %in_flight.backend().name, "upgrade failed: {e}");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    // What the backend sent right behind its 101 goes first.
    if let Err(e) = client.write_all(&read_ahead).await {
        tracing::debug!(backend = %in_flight.backend().name, "tunnel ended: {e}");
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(backend = %in_flight.backend().name, "tunnel ended: {e}");
    }
    drop(in_flight);
}

/// The request as `upstream` is to get it. What the backend is told of the request's
/// origin is put in its fields for HTTP/2 or when `forwarded_in_fields`, else given back
/// for the HTTP/1.1 encoder to write (`headers::Forwarded`).
fn prepare_upstream_request(
    parts: &mut http::request::Parts,
    peer: &Peer,
    upgrade: bool,
    upstream: &Upstream,
    forwarded_in_fields: bool,
) -> Result<Option<Forwarded>, ProxyError> {
    // Routed by the URI's authority when there is one (HTTP/2, absolute-form), so that
    // is the Host the backend gets too (RFC 9112 §3.2.2), whatever Host came with it.
    if let Some(authority) = parts.uri.authority() {
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::BadRequest)?;
        parts.headers.insert(HOST, host);
    }
    let original_host = parts.headers.get(HOST).cloned();
    let names_a_host = original_host.is_some();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    // The proxy answers `Expect: 100-continue` itself when it starts reading the body.
    parts.headers.remove(EXPECT);
    let forwarded = Forwarded::new(&peer.forwarded_for, peer.tls, original_host, parts.version);
    if upstream.protocol.is_h2() {
        forwarded.apply(&mut parts.headers);
        // HTTP/2 carries the host as `:authority` and needs `:scheme`.
        let authority = match parts.headers.remove(HOST) {
            Some(host) => http::uri::Authority::try_from(host.as_bytes())
                .map_err(|_| ProxyError::BadRequest)?,
            None => http::uri::Authority::from_static("localhost"),
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(upstream.scheme());
        uri.authority = Some(authority);
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest)?;
        parts.version = Version::HTTP_2;
        return Ok(None);
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        // Upstreams get origin-form, byte for byte the path and query the client sent.
        let origin = match parts.uri.path_and_query() {
            Some(pq) => Uri::try_from(pq.as_str()).map_err(|_| ProxyError::BadRequest)?,
            None => Uri::from_static("/"),
        };
        parts.uri = origin;
    }
    parts.version = Version::HTTP_11;
    if !names_a_host {
        // An HTTP/1.0 request may name no host, but it goes out as HTTP/1.1, which
        // must (RFC 9112 §3.2): the same stand-in the HTTP/2 path uses.
        parts
            .headers
            .insert(HOST, HeaderValue::from_static("localhost"));
    }
    if forwarded_in_fields {
        forwarded.apply(&mut parts.headers);
        return Ok(None);
    }
    Ok(Some(forwarded))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The answer to a request whose body failed.
fn body_failure(error: &RequestBodyError) -> ProxyError {
    match error {
        RequestBodyError::TooLarge(_) => ProxyError::BodyTooLarge,
        RequestBodyError::Client(_) => ProxyError::BadRequest,
        RequestBodyError::TimedOut(_) => ProxyError::ClientBodyTimeout,
    }
}

/// Was this failure caused by the client's request body (too large, client gone)?
fn request_body_error(error: &hyper::Error) -> Option<&RequestBodyError> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(body_error) = cause.downcast_ref::<RequestBodyError>() {
            return Some(body_error);
        }
        source = cause.source();
    }
    None
}
