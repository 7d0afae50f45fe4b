//! A load client: keep-alive clients sending GET back to back, every answer recorded
//! with when it started and ended, its status and which stand-in served it
//! (`x-upstream`). The rehearsal judges a deploy by these records; the tests too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::body::{empty, AnyBody};

pub type HttpClient = Client<HttpConnector, AnyBody>;

/// A plain HTTP client (HTTP/1.1, keep-alive).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn get(addr: SocketAddr, path: &str) -> Request<AnyBody> {
    let mut request = Request::new(empty());
    *request.uri_mut() = format!("http://{addr}{path}")
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    request
}

/// What one request of a load run saw.
#[derive(Debug, Clone)]
pub struct Record {
    pub started: Instant,
    pub finished: Instant,
    /// 0 when no answer came.
    pub status: u16,
    /// `x-upstream` of the answer: which stand-in served it.
    pub upstream: String,
    pub error: Option<String>,
}

impl Record {
    pub fn failed(&self) -> bool {
        self.error.is_some() || self.status != 200
    }

    /// Why it failed, for a report; `None` when it did not.
    pub fn failure(&self) -> Option<String> {
        match (&self.error, self.status) {
            (Some(error), _) => Some(error.clone()),
            (None, 200) => None,
            (None, status) => Some(format!("status {status} from `{}`", self.upstream)),
        }
    }
}

/// `workers` keep-alive clients sending GET `path` back to back until `finish`.
pub struct LoadRun {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Record>>>,
}

impl LoadRun {
    pub fn start(addr: SocketAddr, path: &str, workers: usize) -> LoadRun {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let sent = Arc::clone(&sent);
                let path = path.to_string();
                tokio::spawn(async move {
                    // One client per worker: each keeps its own connection.
                    let client = client();
                    let mut records = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        sent.fetch_add(1, Ordering::SeqCst);
                        records.push(one_request(&client, addr, &path, started).await);
                    }
                    records
                })
            })
            .collect();
        LoadRun { stop, sent, tasks }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits until at least `more` further requests have been sent, or `limit` passes
    /// (then `false`).
    pub async fn sent_more(&self, more: u64, limit: Duration) -> bool {
        let target = self.sent() + more;
        let deadline = Instant::now() + limit;
        while self.sent() < target {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Waits until at least `more` further requests have been sent; panics after a
    /// minute (the clients are stuck).
    pub async fn wait_for(&self, more: u64) {
        assert!(
            self.sent_more(more, Duration::from_secs(60)).await,
            "timed out waiting for {more} more requests"
        );
    }

    /// Stops the clients and returns every record, in the order the requests started.
    pub async fn finish(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for task in self.tasks {
            if let Ok(records) = task.await {
                all.extend(records);
            }
        }
        all.sort_by_key(|r| r.started);
        all
    }
}

async fn one_request(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    started: Instant,
) -> Record {
    match client.request(get(addr, path)).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let upstream = response
                .headers()
                .get("x-upstream")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let error = response
                .into_body()
                .collect()
                .await
                .err()
                .map(|e| e.to_string());
            Record {
                started,
                finished: Instant::now(),
                status,
                upstream,
                error,
            }
        }
        Err(e) => Record {
            started,
            finished: Instant::now(),
            status: 0,
            upstream: String::new(),
            error: Some(format!("{e:?}")),
        },
    }
}
