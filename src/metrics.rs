//! Prometheus metrics in a registry the server owns (not the global one, so tests stay
//! apart). The request path only touches pre-resolved children: label lookups happen
//! when a routing table is built, or once per status code per backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::{AdminState, UpstreamTimeout};

/// Request durations from 0.5 ms to 10 s.
const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The `timeout` label values of `switchyard_client_timeouts_total`: the config keys.
const CLIENT_TIMEOUTS: [&str; 3] = [
    "client_header_timeout",
    "client_body_timeout",
    "send_timeout",
];

const CONNECT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    connect: HistogramVec,
    retries: IntCounterVec,
    traffic_changes: IntCounterVec,
    connections_open: IntGaugeVec,
    pub access_log_dropped: IntCounter,
    pub tls_reloads: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub tls_certificate_expiry: GaugeVec,
    pub http2_reset_floods: IntCounter,
    pub state_file_corrupt: IntCounter,
    /// Failed lookups of backend host names, by pool.
    pub dns_failures: IntCounterVec,
    /// Requests sent by a service's preview header to the pool it named.
    pub preview_requests: IntCounterVec,
    /// 1 while etcd answers (`[cluster]`).
    pub cluster_connected: IntGauge,
    /// The fleet generation applied here (`[cluster]`).
    pub cluster_generation: IntGauge,
    /// `switchyard_client_timeouts_total` by the config key that fired, resolved once.
    pub client_header_timeouts: IntCounter,
    pub client_body_timeouts: IntCounter,
    pub send_timeouts: IntCounter,
    connections_refused: IntCounterVec,
    /// The 1-based step of a service's live rollout; 0 when none is live.
    pub rollout_step: IntGaugeVec,
    /// The canary weight (percent) a service's live rollout holds; 0 when none is live.
    pub rollout_weight: GaugeVec,
    /// Analysis windows judged, by service and result (pass, fail, inconclusive).
    pub rollout_analysis: IntCounterVec,
    /// Mirrored copies, by service, mirror pool and outcome.
    pub mirror_requests: IntCounterVec,
    /// Requests that matched no service.
    unrouted: RouteMetrics,
}

fn must<T>(result: prometheus::Result<T>) -> T {
    // Names, labels and buckets are constants of this file: an error is a bug here,
    // found by the tests, never something a client or the config can cause.
    result.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new(state: Arc<dyn Fn() -> LiveState + Send + Sync>) -> Arc<Metrics> {
        let registry = Registry::new();
        let requests = must(IntCounterVec::new(
            Opts::new("switchyard_requests_total", "Requests answered, by service, pool, backend and status code; backend is empty when no backend was reached."),
            &["service", "pool", "backend", "code"],
        ));
        let duration = must(HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from the request's arrival to its response headers, by service and pool.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["service", "pool"],
        ));
        let connect = must(HistogramVec::new(
            HistogramOpts::new(
                "switchyard_upstream_connect_duration_seconds",
                "Time to open a new upstream connection (TCP and HTTP handshake), by pool.",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
            &["pool"],
        ));
        let retries = must(IntCounterVec::new(
            Opts::new(
                "switchyard_retries_total",
                "Requests sent again to another backend after a failure.",
            ),
            &["service", "pool"],
        ));
        let traffic_changes = must(IntCounterVec::new(
            Opts::new(
                "switchyard_traffic_changes_total",
                "Traffic changes (through the admin API, or made by a rollout), by service and kind: switch, canary, canary_abort, promote, rollback, mirror, mirror_off, and rollout_start, rollout_step, rollout_failure, rollout_pause, rollout_resume, rollout_promote, rollout_rollback, rollout_abort.",
            ),
            &["service", "kind"],
        ));
        let connections_open = must(IntGaugeVec::new(
            Opts::new(
                "switchyard_connections_open",
                "Client connections open, by listener.",
            ),
            &["listener"],
        ));
        let access_log_dropped = must(IntCounter::new(
            "switchyard_access_log_dropped_total",
            "Access log lines dropped because the log sink could not keep up.",
        ));
        let tls_reloads = must(IntCounterVec::new(
            Opts::new(
                "switchyard_tls_reloads_total",
                "Certificate reloads (SIGHUP, admin API, changed files), by result (success or failure); on failure the previous certificates stay in use.",
            ),
            &["result"],
        ));
        let tls_handshake_failures = must(IntCounterVec::new(
            Opts::new(
                "switchyard_tls_handshake_failures_total",
                "TLS handshakes on the HTTPS listener that did not complete, by reason (timeout or error).",
            ),
            &["reason"],
        ));
        let tls_certificate_expiry = must(GaugeVec::new(
            Opts::new(
                "switchyard_tls_certificate_expiry_timestamp_seconds",
                "When each certificate in use expires (its notAfter), as a Unix time.",
            ),
            &["cert_file"],
        ));
        let http2_reset_floods = must(IntCounter::new(
            "switchyard_http2_reset_flood_connections_closed_total",
            "HTTP/2 client connections closed because the client cancelled most of its streams before an answer (the rapid-reset pattern).",
        ));
        let state_file_corrupt = must(IntCounter::new(
            "switchyard_state_file_corrupt_total",
            "State files found corrupt at start: moved aside, and the traffic state restarted from the config.",
        ));
        let dns_failures = must(IntCounterVec::new(
            Opts::new(
                "switchyard_dns_lookup_failures_total",
                "Failed lookups of backend host names, by pool; the pool keeps the addresses of the last good lookup.",
            ),
            &["pool"],
        ));
        let cluster_connected = must(IntGauge::new(
            "switchyard_cluster_connected",
            "1 while this instance reaches etcd ([cluster]); 0 while it serves its last applied state without it.",
        ));
        let cluster_generation = must(IntGauge::new(
            "switchyard_cluster_generation",
            "The fleet's state generation (etcd revision) this instance has applied ([cluster]).",
        ));
        let preview_requests = must(IntCounterVec::new(
            Opts::new(
                "switchyard_preview_requests_total",
                "Requests a service's preview header sent to the pool it named, whatever the split, by service and pool.",
            ),
            &["service", "pool"],
        ));
        let client_timeouts = must(IntCounterVec::new(
            Opts::new(
                "switchyard_client_timeouts_total",
                "Client connections closed, and requests cut off, because the client was too slow, by the timeout that fired (client_header_timeout: no complete first request; client_body_timeout: the request body stalled; send_timeout: the client stopped reading the response).",
            ),
            &["timeout"],
        ));
        let connections_refused = must(IntCounterVec::new(
            Opts::new(
                "switchyard_connections_refused_total",
                "Client connections refused because max_connections were open, by listener.",
            ),
            &["listener"],
        ));
        let rollout_step = must(IntGaugeVec::new(
            Opts::new(
                "switchyard_rollout_step",
                "The step (1-based) of the service's rollout in progress; 0 when none is progressing or paused.",
            ),
            &["service"],
        ));
        let rollout_weight = must(GaugeVec::new(
            Opts::new(
                "switchyard_rollout_weight",
                "The canary weight in percent that the service's rollout in progress holds; 0 when none is progressing or paused.",
            ),
            &["service"],
        ));
        let rollout_analysis = must(IntCounterVec::new(
            Opts::new(
                "switchyard_rollout_analysis_total",
                "Rollout analysis windows judged, by service and result (pass, fail, inconclusive).",
            ),
            &["service", "result"],
        ));
        let mirror_requests = must(IntCounterVec::new(
            Opts::new(
                "switchyard_mirror_requests_total",
                "Mirrored copies of requests, by service, mirror pool and outcome (sent: answered, whatever the status; failed: no answer; dropped: the queue was full; too_large: the body was over mirror_max_body).",
            ),
            &["service", "pool", "outcome"],
        ));
        // Present from the start at 0, so `increase()` and alerts see the first one.
        for result in ["success", "failure"] {
            tls_reloads.with_label_values(&[result]);
        }
        let [client_header_timeouts, client_body_timeouts, send_timeouts] =
            CLIENT_TIMEOUTS.map(|timeout| client_timeouts.with_label_values(&[timeout]));
        for reason in ["timeout", "error"] {
            tls_handshake_failures.with_label_values(&[reason]);
        }
        let build_info = must(IntGaugeVec::new(
            Opts::new(
                "switchyard_build_info",
                "Always 1; the version is in the label.",
            ),
            &["version"],
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(requests.clone()) as Box<dyn Collector>,
            Box::new(duration.clone()),
            Box::new(connect.clone()),
            Box::new(retries.clone()),
            Box::new(traffic_changes.clone()),
            Box::new(connections_open.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(tls_reloads.clone()),
            Box::new(tls_handshake_failures.clone()),
            Box::new(tls_certificate_expiry.clone()),
            Box::new(http2_reset_floods.clone()),
            Box::new(state_file_corrupt.clone()),
            Box::new(dns_failures.clone()),
            Box::new(preview_requests.clone()),
            Box::new(cluster_connected.clone()),
            Box::new(cluster_generation.clone()),
            Box::new(client_timeouts.clone()),
            Box::new(connections_refused.clone()),
            Box::new(rollout_step.clone()),
            Box::new(rollout_weight.clone()),
            Box::new(rollout_analysis.clone()),
            Box::new(mirror_requests.clone()),
            Box::new(build_info),
            Box::new(LiveCollector::new(state)),
        ] {
            must(registry.register(collector));
        }
        let unrouted = RouteMetrics::new(
            "".into(),
            "".into(),
            RouteFamilies {
                requests: requests.clone(),
                duration: duration.clone(),
                retries: retries.clone(),
                connect: connect.clone(),
            },
            [],
        );
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            connect,
            retries,
            traffic_changes,
            connections_open,
            access_log_dropped,
            tls_reloads,
            tls_handshake_failures,
            tls_certificate_expiry,
            http2_reset_floods,
            state_file_corrupt,
            dns_failures,
            preview_requests,
            cluster_connected,
            cluster_generation,
            client_header_timeouts,
            client_body_timeouts,
            send_timeouts,
            connections_refused,
            rollout_step,
            rollout_weight,
            rollout_analysis,
            mirror_requests,
            unrouted,
        })
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The children one (service, pool) pair uses on the request path; `backends` are
    /// the pool's backend names, in the pool's order. Each child is made when it is first
    /// used, so a route costs a few hundred bytes until it has traffic and a table of
    /// thousands of idle services adds nothing to a scrape.
    pub fn route<'a>(
        &self,
        service: &Arc<str>,
        pool: &Arc<str>,
        backends: impl IntoIterator<Item = &'a Arc<str>>,
    ) -> Arc<RouteMetrics> {
        Arc::new(RouteMetrics::new(
            Arc::clone(service),
            Arc::clone(pool),
            self.route_families(),
            backends,
        ))
    }

    fn route_families(&self) -> RouteFamilies {
        RouteFamilies {
            requests: self.requests.clone(),
            duration: self.duration.clone(),
            retries: self.retries.clone(),
            connect: self.connect.clone(),
        }
    }

    /// Each pool's totals so far, summed over services and backends: what the status
    /// page's recent-traffic charts are made from. Reads two families, not the registry.
    pub fn pool_totals(&self) -> std::collections::BTreeMap<String, PoolTotals> {
        let mut totals = std::collections::BTreeMap::<String, PoolTotals>::new();
        for family in self.requests.collect() {
            for metric in family.get_metric() {
                let (mut pool, mut code) = (None, 0u16);
                for label in metric.get_label() {
                    match label.name() {
                        "pool" => pool = Some(label.value()),
                        "code" => code = label.value().parse().unwrap_or(0),
                        _ => {}
                    }
                }
                // Requests that matched no service have no pool.
                let Some(pool) = pool.filter(|p| !p.is_empty()) else {
                    continue;
                };
                let entry = totals.entry(pool.to_string()).or_default();
                let count = metric.get_counter().get_value() as u64;
                entry.requests += count;
                if code >= 500 {
                    entry.errors += count;
                }
            }
        }
        for family in self.duration.collect() {
            for metric in family.get_metric() {
                let Some(pool) = metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "pool")
                    .map(|l| l.value())
                else {
                    continue;
                };
                let entry = totals.entry(pool.to_string()).or_default();
                let histogram = metric.get_histogram();
                entry.timed += histogram.get_sample_count();
                for (slot, bucket) in entry.buckets.iter_mut().zip(histogram.get_bucket()) {
                    *slot += bucket.cumulative_count();
                }
            }
        }
        totals
    }

    /// Each (service, pool) route's totals so far: what a rollout's analysis windows
    /// are made from. Reads the two families (every series of the requests one), so
    /// it belongs off the workers, at the analysis interval, not per request.
    pub fn routes_totals(&self, routes: &[(&str, &str)]) -> Vec<PoolTotals> {
        let mut totals = vec![PoolTotals::default(); routes.len()];
        if routes.is_empty() {
            return totals;
        }
        for family in self.requests.collect() {
            for metric in family.get_metric() {
                let (mut service, mut pool, mut code) = ("", "", 0u16);
                for label in metric.get_label() {
                    match label.name() {
                        "service" => service = label.value(),
                        "pool" => pool = label.value(),
                        "code" => code = label.value().parse().unwrap_or(0),
                        _ => {}
                    }
                }
                let Some(at) = routes.iter().position(|r| *r == (service, pool)) else {
                    continue;
                };
                let count = metric.get_counter().get_value() as u64;
                totals[at].requests += count;
                if code >= 500 {
                    totals[at].errors += count;
                }
            }
        }
        for (at, (service, pool)) in routes.iter().enumerate() {
            if let Ok(histogram) = self.duration.get_metric_with_label_values(&[service, pool]) {
                let metric = prometheus::core::Metric::metric(&histogram);
                let histogram = metric.get_histogram();
                totals[at].timed = histogram.get_sample_count();
                for (slot, bucket) in totals[at].buckets.iter_mut().zip(histogram.get_bucket()) {
                    *slot = bucket.cumulative_count();
                }
            }
        }
        totals
    }

    /// Where answers to requests that matched no service are counted (every label
    /// but the code empty).
    pub fn unrouted(&self) -> &RouteMetrics {
        &self.unrouted
    }

    pub fn traffic_change(&self, service: &str, kind: &str) {
        self.traffic_changes
            .with_label_values(&[service, kind])
            .inc();
    }

    /// Replaces the expiry series with those of the certificates now in use.
    pub fn set_certificates(&self, certificates: &[crate::tls::CertificateInfo]) {
        self.tls_certificate_expiry.reset();
        for cert in certificates {
            if let Some(not_after) = cert.not_after {
                self.tls_certificate_expiry
                    .with_label_values(&[&cert.cert_file.display().to_string()])
                    .set(not_after as f64);
            }
        }
    }

    pub fn connections(&self, listener: &str) -> IntGauge {
        self.connections_open.with_label_values(&[listener])
    }

    pub fn connections_refused(&self, listener: &str) -> IntCounter {
        self.connections_refused.with_label_values(&[listener])
    }
}

/// `switchyard_mirror_requests_total` children of one (service, mirror pool).
pub struct MirrorCounters {
    pub sent: IntCounter,
    pub failed: IntCounter,
    pub dropped: IntCounter,
    pub too_large: IntCounter,
}

impl Metrics {
    pub fn mirror_counters(&self, service: &str, pool: &str) -> MirrorCounters {
        let outcome = |o: &str| self.mirror_requests.with_label_values(&[service, pool, o]);
        MirrorCounters {
            sent: outcome("sent"),
            failed: outcome("failed"),
            dropped: outcome("dropped"),
            too_large: outcome("too_large"),
        }
    }
}

/// One pool's counters at one moment (see `Metrics::pool_totals`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolTotals {
    /// Answers, from `switchyard_requests_total`.
    pub requests: u64,
    /// Of those, 5xx (the backend's and the proxy's own).
    pub errors: u64,
    /// Observations of `switchyard_request_duration_seconds`, and its cumulative
    /// buckets (bounds in `DURATION_BOUNDS`).
    pub timed: u64,
    pub buckets: [u64; DURATION_BUCKETS.len()],
}

/// The upper bounds of `PoolTotals::buckets`, in seconds.
pub const DURATION_BOUNDS: &[f64] = &DURATION_BUCKETS;

/// Per (service, pool): what a request records once its backend is known.
pub struct RouteMetrics {
    /// Shared with the routing table's names.
    service: Arc<str>,
    pool: Arc<str>,
    families: RouteFamilies,
    duration: OnceLock<Histogram>,
    retries: OnceLock<IntCounter>,
    connect: OnceLock<Histogram>,
    /// Aligned with the pool's backends.
    backends: Box<[CodeCounters]>,
    /// Answers that never reached a backend (503, 502, 504).
    no_backend: CodeCounters,
}

/// The families a route's children come from (each handle is one pointer).
#[derive(Clone)]
struct RouteFamilies {
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    connect: HistogramVec,
}

impl RouteMetrics {
    fn new<'a>(
        service: Arc<str>,
        pool: Arc<str>,
        families: RouteFamilies,
        backends: impl IntoIterator<Item = &'a Arc<str>>,
    ) -> RouteMetrics {
        RouteMetrics {
            service,
            pool,
            families,
            duration: OnceLock::new(),
            retries: OnceLock::new(),
            connect: OnceLock::new(),
            backends: backends
                .into_iter()
                .map(|b| CodeCounters::new(Some(Arc::clone(b))))
                .collect(),
            no_backend: CodeCounters::new(None),
        }
    }

    /// Counts one answer with status `code`, from the pool's backend at index
    /// `backend`, or from the proxy itself (`None`).
    pub fn count(&self, backend: Option<usize>, code: u16) {
        let counters = backend
            .and_then(|i| self.backends.get(i))
            .unwrap_or(&self.no_backend);
        counters.inc(self, code);
    }

    pub fn duration(&self) -> &Histogram {
        self.duration.get_or_init(|| {
            self.families
                .duration
                .with_label_values(&[&*self.service, &*self.pool])
        })
    }

    pub fn retries(&self) -> &IntCounter {
        self.retries.get_or_init(|| {
            self.families
                .retries
                .with_label_values(&[&*self.service, &*self.pool])
        })
    }

    pub fn connect(&self) -> &Histogram {
        self.connect
            .get_or_init(|| self.families.connect.with_label_values(&[&*self.pool]))
    }

    /// True when these children are for `service` and `pool` with exactly `backends`,
    /// in that order: a rebuilt table can then keep them, and the children they made.
    pub fn fits<'a>(
        &self,
        service: &str,
        pool: &str,
        backends: impl ExactSizeIterator<Item = &'a Arc<str>>,
    ) -> bool {
        *self.service == *service
            && *self.pool == *pool
            && self.backends.len() == backends.len()
            && self
                .backends
                .iter()
                .zip(backends)
                .all(|(c, b)| c.backend.as_deref() == Some(&**b))
    }
}

/// `switchyard_requests_total` children of one route and backend. A status class (2xx,
/// 4xx, ...) gets its hundred slots when its first code is seen, and each slot its
/// child then: a route costs a few words until it has traffic, so tables with
/// thousands of backends stay small. Afterwards an increment is three atomic loads and
/// one atomic add.
struct CodeCounters {
    /// `None` for answers that never reached a backend (the label is empty).
    backend: Option<Arc<str>>,
    /// One word until the first answer: most routes of a large table never see one.
    classes: OnceLock<Box<CodeClasses>>,
}

/// By status class (`code / 100`), the children of its hundred codes.
type CodeClasses = [OnceLock<Box<[OnceLock<IntCounter>; 100]>>; 6];

impl CodeCounters {
    fn new(backend: Option<Arc<str>>) -> CodeCounters {
        CodeCounters {
            backend,
            classes: OnceLock::new(),
        }
    }

    fn inc(&self, route: &RouteMetrics, code: u16) {
        // An upstream may send 600-999, which the http crate accepts: counted as 599.
        let code = code.min(599);
        let (class, slot) = (usize::from(code / 100), usize::from(code % 100));
        self.classes.get_or_init(Default::default)[class]
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())))[slot]
            .get_or_init(|| {
                route.families.requests.with_label_values(&[
                    &*route.service,
                    &*route.pool,
                    self.backend.as_deref().unwrap_or(""),
                    &code.to_string(),
                ])
            })
            .inc();
    }
}

/// What the scrape reads from the live traffic state, as plain data: the control plane
/// fills it from the routing table and the backends' atomics at scrape time.
#[derive(Debug, Default)]
pub struct LiveState {
    pub generation: u64,
    pub backends: Vec<BackendSample>,
    pub services: Vec<ServiceSample>,
}

#[derive(Debug)]
pub struct BackendSample {
    pub pool: Arc<str>,
    pub backend: Arc<str>,
    pub in_flight: u64,
    pub healthy: bool,
    pub ejected: bool,
    pub state: AdminState,
    /// Active checks so far: passed, failed.
    pub checks: (u64, u64),
    /// Requests given up on it, in `UpstreamTimeout::ALL` order.
    pub timeouts: [u64; 2],
}

#[derive(Debug)]
pub struct ServiceSample {
    pub name: Arc<str>,
    pub active_pool: Arc<str>,
    /// The canary pool and its weight in percent.
    pub canary: Option<(Arc<str>, f64)>,
    /// The pools its preview header can name.
    pub preview_pools: Vec<Arc<str>>,
}

/// Gauges computed at scrape time from the routing table and backend atomics, so the
/// request path never updates them. Each scrape builds its samples directly rather
/// than through metric vectors: at 20,000 backends those kept 160,000 children alive
/// between scrapes and hashed every label set twice.
struct LiveCollector {
    state: Arc<dyn Fn() -> LiveState + Send + Sync>,
    in_flight: Desc,
    healthy: Desc,
    ejected: Desc,
    backend_state: Desc,
    health_checks: Desc,
    upstream_timeouts: Desc,
    canary_weight: Desc,
    active_pool: Desc,
    generation: Desc,
    /// Each service's pools so far (see `collect`); one scrape at a time updates it.
    pools_so_far: Mutex<HashMap<Arc<str>, Vec<Arc<str>>>>,
}

fn desc(name: &str, help: &str, labels: &[&str]) -> Desc {
    must(Desc::new(
        name.into(),
        help.into(),
        labels.iter().map(|l| l.to_string()).collect(),
        HashMap::new(),
    ))
}

/// One sample; `labels` in name order, as the metric vectors print them.
fn sample(labels: &[(&str, &str)], kind: MetricType, value: f64) -> Metric {
    let pairs = labels
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect();
    let mut metric = Metric::from_label(pairs);
    if kind == MetricType::COUNTER {
        let mut counter = prometheus::proto::Counter::default();
        counter.set_value(value);
        metric.set_counter(counter);
    } else {
        let mut gauge = prometheus::proto::Gauge::default();
        gauge.set_value(value);
        metric.set_gauge(gauge);
    }
    metric
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

impl LiveCollector {
    fn new(state: Arc<dyn Fn() -> LiveState + Send + Sync>) -> LiveCollector {
        let backend = ["pool", "backend"];
        let service = ["service", "pool"];
        LiveCollector {
            state,
            in_flight: desc("switchyard_backend_in_flight", "Requests (and open upgraded connections) in flight on a backend.", &backend),
            healthy: desc("switchyard_backend_healthy", "1 when the backend is healthy, 0 when unhealthy or not checked yet.", &backend),
            ejected: desc("switchyard_backend_ejected", "1 while passive ejection (failures of real traffic) keeps the backend out, whatever its active health checks say.", &backend),
            backend_state: desc("switchyard_backend_state", "1 for the backend's admin state (active, draining, disabled), 0 for the others.", &["pool", "backend", "state"]),
            health_checks: desc("switchyard_health_checks_total", "Active health check results each pool's backend received, by result (success or failure); pools checking one address alike share each check.", &["pool", "backend", "result"]),
            upstream_timeouts: desc("switchyard_upstream_timeouts_total", "Requests that gave up waiting on a backend, by the timeout that fired: upstream_header_timeout (no response head; the client got 504), upstream_body_timeout (stuck in the middle of a body: a 504 before the response began, a cut-off response after).", &["pool", "backend", "timeout"]),
            canary_weight: desc("switchyard_canary_weight", "Percent of a service's traffic sent to its canary pool (0 when none).", &service),
            active_pool: desc("switchyard_active_pool", "1 for a service's active pool, 0 for the other pools it has used.", &service),
            generation: desc("switchyard_config_generation", "Generation of the traffic state; every admin change adds one.", &[]),
            pools_so_far: Mutex::new(HashMap::new()),
        }
    }
}

impl Collector for LiveCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![
            &self.in_flight,
            &self.healthy,
            &self.ejected,
            &self.backend_state,
            &self.health_checks,
            &self.upstream_timeouts,
            &self.canary_weight,
            &self.active_pool,
            &self.generation,
        ]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use MetricType::{COUNTER, GAUGE};
        let live = (self.state)();
        let n = live.backends.len();
        let (mut in_flight, mut healthy, mut ejected) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut states = Vec::with_capacity(3 * n);
        let mut checks = Vec::with_capacity(2 * n);
        let mut timeouts = Vec::with_capacity(2 * n);
        for b in &live.backends {
            let labels = [("backend", &*b.backend), ("pool", &*b.pool)];
            in_flight.push(sample(&labels, GAUGE, b.in_flight as f64));
            healthy.push(sample(&labels, GAUGE, f64::from(u8::from(b.healthy))));
            ejected.push(sample(&labels, GAUGE, f64::from(u8::from(b.ejected))));
            let (passed, failed) = b.checks;
            for (result, count) in [("success", passed), ("failure", failed)] {
                let labels = [labels[0], labels[1], ("result", result)];
                checks.push(sample(&labels, COUNTER, count as f64));
            }
            for (which, count) in UpstreamTimeout::ALL.iter().zip(b.timeouts) {
                let labels = [labels[0], labels[1], ("timeout", which.key())];
                timeouts.push(sample(&labels, COUNTER, count as f64));
            }
            for state in [
                AdminState::Active,
                AdminState::Draining,
                AdminState::Disabled,
            ] {
                let labels = [labels[0], labels[1], ("state", state.as_str())];
                states.push(sample(
                    &labels,
                    GAUGE,
                    f64::from(u8::from(state == b.state)),
                ));
            }
        }
        // A service's traffic gauges cover the pools it has used since the start (active,
        // canary, preview), so a pool it leaves reads 0 rather than vanishing, without
        // a series for every service and pool: that is quadratic, 10^8 series for
        // 10,000 services of one pool each.
        let mut pools_so_far = self
            .pools_so_far
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut kept = HashMap::with_capacity(live.services.len());
        let (mut active, mut weights) = (Vec::new(), Vec::new());
        for service in &live.services {
            let mut pools = pools_so_far.remove(&service.name).unwrap_or_default();
            let now = std::iter::once(&service.active_pool)
                .chain(service.canary.as_ref().map(|(pool, _)| pool))
                .chain(&service.preview_pools);
            for pool in now {
                if !pools.contains(pool) {
                    pools.push(Arc::clone(pool));
                }
            }
            for pool in &pools {
                let labels = [("pool", &**pool), ("service", &*service.name)];
                let is_active = service.active_pool == *pool;
                active.push(sample(&labels, GAUGE, f64::from(u8::from(is_active))));
                let weight = match &service.canary {
                    Some((canary, weight)) if canary == pool => *weight,
                    _ => 0.0,
                };
                weights.push(sample(&labels, GAUGE, weight));
            }
            kept.insert(Arc::clone(&service.name), pools);
        }
        // Services no longer in the table (a reload removed them) are forgotten.
        *pools_so_far = kept;
        drop(pools_so_far);
        vec![
            family(&self.in_flight, GAUGE, in_flight),
            family(&self.healthy, GAUGE, healthy),
            family(&self.ejected, GAUGE, ejected),
            family(&self.backend_state, GAUGE, states),
            family(&self.health_checks, COUNTER, checks),
            family(&self.upstream_timeouts, COUNTER, timeouts),
            family(&self.canary_weight, GAUGE, weights),
            family(&self.active_pool, GAUGE, active),
            family(
                &self.generation,
                GAUGE,
                vec![sample(&[], GAUGE, live.generation as f64)],
            ),
        ]
    }
}
