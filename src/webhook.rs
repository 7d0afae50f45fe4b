//! Rollout gates: a JSON POST to a URL that must answer 2xx in time. Plain HTTP only:
//! gates are CI or test services next to the proxy, and a gate that cannot be reached
//! counts as a refusal, never as a pass.

use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a gate may take to answer.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(5);

/// A checked `http://host[:port]/path` URL.
#[derive(Debug, Clone)]
pub struct Target {
    uri: Uri,
    authority: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("`{url}` must be an http:// URL"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.host()),
        };
        Ok(Target { uri, authority })
    }

    /// POSTs `body`; `Ok` on a 2xx within `GATE_TIMEOUT`, else why not.
    pub async fn call(&self, body: &serde_json::Value) -> Result<(), String> {
        match tokio::time::timeout(GATE_TIMEOUT, self.post(body)).await {
            Ok(result) => result,
            Err(_) => Err(format!("{}: no answer within {GATE_TIMEOUT:?}", self.uri)),
        }
    }

    async fn post(&self, body: &serde_json::Value) -> Result<(), String> {
        let failed = |e: &dyn std::fmt::Display| format!("{}: {e}", self.uri);
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| failed(&e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| failed(&e))?;
        tokio::spawn(connection);
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let request = Request::post(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "switchyard-rollout")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| failed(&e))?;
        let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
        let status = response.status();
        // Read (a little of) the answer so the server sees a complete exchange.
        let _ =
            tokio::time::timeout(Duration::from_millis(200), response.into_body().collect()).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{} answered {}", self.uri, describe(status)))
        }
    }
}

fn describe(status: StatusCode) -> String {
    status.as_u16().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host() {
        assert!(Target::parse("http://127.0.0.1:8080/gate").is_ok());
        assert_eq!(
            Target::parse("http://ci.local/gate").unwrap().authority,
            "ci.local:80"
        );
        for bad in ["https://x/y", "ftp://x", "/just/a/path", "not a url"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
