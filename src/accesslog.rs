//! The access log, written off the request path: requests hand a record to a bounded
//! queue and move on; one task formats and writes. When the sink cannot keep up,
//! records are dropped and counted (`switchyard_access_log_dropped_total`) rather than
//! slowing requests down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::{AccessLogFormat, AccessLogSink, LogConfig};

pub struct AccessRecord {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub service: Option<Arc<str>>,
    pub pool: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub retries: u32,
    /// Why the pool was chosen: active, weight, header, cookie or sticky.
    pub decision: &'static str,
    /// The `x-switchyard-error` code when the proxy answered itself.
    pub error: Option<&'static str>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    client: String,
    method: &'a str,
    path: &'a str,
    status: u16,
    bytes: u64,
    duration_ms: f64,
    service: &'a str,
    pool: &'a str,
    backend: &'a str,
    retries: u32,
    decision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

pub struct AccessLog {
    queue: mpsc::Sender<AccessRecord>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Starts the writer task; `None` when the access log is off.
    pub fn start(config: &LogConfig, dropped: IntCounter) -> Option<Arc<AccessLog>> {
        if config.access == AccessLogSink::Off {
            return None;
        }
        let (queue, records) = mpsc::channel(config.buffer.max(1));
        tokio::spawn(write_stdout(records, config.format));
        Some(Arc::new(AccessLog { queue, dropped }))
    }

    pub fn log(&self, record: AccessRecord) {
        if self.queue.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

async fn write_stdout(mut records: mpsc::Receiver<AccessRecord>, format: AccessLogFormat) {
    let mut out = tokio::io::stdout();
    let mut buffer = Vec::with_capacity(64 * 1024);
    while let Some(record) = records.recv().await {
        format_record(&record, format, &mut buffer);
        // Write in batches: whatever queued up while the last write ran.
        if records.is_empty() || buffer.len() > 48 * 1024 {
            if out.write_all(&buffer).await.is_err() || out.flush().await.is_err() {
                // stdout is gone; keep draining so senders never see a full queue
                // because of it.
            }
            buffer.clear();
        }
    }
}

pub fn format_record(record: &AccessRecord, format: AccessLogFormat, out: &mut Vec<u8>) {
    let dash = |v: &Option<Arc<str>>| v.as_deref().unwrap_or("").to_string();
    match format {
        AccessLogFormat::Json => {
            let line = JsonLine {
                time: humantime::format_rfc3339_millis(record.time).to_string(),
                client: record.client.to_string(),
                method: record.method.as_str(),
                path: &record.path,
                status: record.status,
                bytes: record.bytes,
                duration_ms: record.duration.as_secs_f64() * 1000.0,
                service: record.service.as_deref().unwrap_or(""),
                pool: record.pool.as_deref().unwrap_or(""),
                backend: record.backend.as_deref().unwrap_or(""),
                retries: record.retries,
                decision: record.decision,
                error: record.error,
            };
            if serde_json::to_writer(&mut *out, &line).is_ok() {
                out.push(b'\n');
            }
        }
        AccessLogFormat::Text => {
            let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
            let line = format!(
                "{} {} \"{} {}\" {} {} {:.3}ms service={} pool={} backend={} retries={} decision={}{}\n",
                humantime::format_rfc3339_millis(record.time),
                record.client,
                record.method,
                record.path,
                record.status,
                record.bytes,
                record.duration.as_secs_f64() * 1000.0,
                or_dash(dash(&record.service)),
                or_dash(dash(&record.pool)),
                or_dash(dash(&record.backend)),
                record.retries,
                record.decision,
                record.error.map(|e| format!(" error={e}")).unwrap_or_default(),
            );
            out.extend_from_slice(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord {
            time: SystemTime::UNIX_EPOCH,
            client: "127.0.0.1:5000".parse().unwrap(),
            method: http::Method::GET,
            path: "/a \"quoted\" path".into(),
            status: 200,
            bytes: 42,
            duration: Duration::from_micros(1500),
            service: Some("app".into()),
            pool: Some("blue".into()),
            backend: Some("127.0.0.1:9001".into()),
            retries: 1,
            decision: "weight",
            error: None,
        }
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let mut out = Vec::new();
        format_record(&record(), AccessLogFormat::Json, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a \"quoted\" path");
        assert_eq!(v["pool"], "blue");
        assert_eq!(v["backend"], "127.0.0.1:9001");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert!(v.get("error").is_none());
    }

    #[test]
    fn text_lines_name_each_field() {
        let mut out = Vec::new();
        format_record(&record(), AccessLogFormat::Text, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.contains("\"GET /a \"quoted\" path\" 200 42 1.500ms service=app pool=blue"),
            "{line}"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let (queue, _records) = mpsc::channel(1);
        let log = AccessLog {
            queue,
            dropped: dropped.clone(),
        };
        log.log(record());
        log.log(record());
        log.log(record());
        assert_eq!(dropped.get(), 2);
    }
}
