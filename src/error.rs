//! Responses the proxy makes itself. Each failure maps to one status, a short text body
//! and an `x-switchyard-error` header, so a client or an operator reading a trace knows
//! whether the proxy or the app answered.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::{Ending, ProxyBody};

pub static X_SWITCHYARD_ERROR: http::HeaderName =
    http::HeaderName::from_static("x-switchyard-error");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// No service matches the request's host and path.
    NoRoute,
    /// The pool has no backend that may take a request.
    NoHealthyBackend,
    /// Every connect attempt failed (refused, reset before the request was written, timed out).
    UpstreamConnect,
    /// The upstream broke the exchange (reset, bad response).
    UpstreamError,
    /// No response headers within `upstream_header_timeout`.
    UpstreamTimeout,
    /// The request body passed `max_request_body`.
    BodyTooLarge,
    /// The client's request could not be forwarded (malformed, unsupported method).
    BadRequest,
    /// `max_connections` reached.
    Overloaded,
    /// The Host is missing (HTTP/1.1), repeated, or not a host name.
    InvalidHost,
    /// The client stopped sending its request body for `client_body_timeout`.
    ClientBodyTimeout,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            // A backend that cannot be reached is not available, as far as the client can
            // tell: 503, as Envoy and HAProxy answer. 502 is kept for a backend that
            // answered badly or broke the exchange.
            ProxyError::NoHealthyBackend | ProxyError::UpstreamConnect | ProxyError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamError => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest | ProxyError::InvalidHost => StatusCode::BAD_REQUEST,
            ProxyError::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The `x-switchyard-error` value.
    pub fn code(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no-route",
            ProxyError::NoHealthyBackend => "no-healthy-backend",
            ProxyError::UpstreamConnect => "upstream-connect-failed",
            ProxyError::UpstreamError => "upstream-error",
            ProxyError::UpstreamTimeout => "upstream-timeout",
            ProxyError::BodyTooLarge => "request-body-too-large",
            ProxyError::BadRequest => "bad-request",
            ProxyError::Overloaded => "too-many-connections",
            ProxyError::InvalidHost => "invalid-host",
            ProxyError::ClientBodyTimeout => "client-body-timeout",
        }
    }

    pub fn body(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no service matches this host and path\n",
            ProxyError::NoHealthyBackend => "no healthy backend is available for this service\n",
            ProxyError::UpstreamConnect => "could not connect to any backend\n",
            ProxyError::UpstreamError => "the backend failed to answer\n",
            ProxyError::UpstreamTimeout => "the backend did not answer in time\n",
            ProxyError::BodyTooLarge => "request body too large\n",
            ProxyError::BadRequest => "request cannot be proxied\n",
            ProxyError::Overloaded => "too many connections\n",
            ProxyError::InvalidHost => {
                "the request's host is missing, repeated or not a host name\n"
            }
            ProxyError::ClientBodyTimeout => "the request body stopped arriving\n",
        }
    }

    pub fn response<E: Ending>(self) -> Response<ProxyBody<E>> {
        let mut response = Response::new(ProxyBody::text(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            X_SWITCHYARD_ERROR.clone(),
            HeaderValue::from_static(self.code()),
        );
        response
    }

    /// The whole HTTP/1.1 response as bytes, for the accept loop, which answers before
    /// any HTTP machinery runs.
    pub fn raw_http1(self) -> Vec<u8> {
        let body = self.body();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-switchyard-error: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            self.status().as_u16(),
            self.status().canonical_reason().unwrap_or(""),
            self.code(),
            body.len(),
            body
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_maps_to_its_status() {
        assert_eq!(ProxyError::NoRoute.status(), 404);
        assert_eq!(ProxyError::NoHealthyBackend.status(), 503);
        assert_eq!(ProxyError::UpstreamConnect.status(), 503);
        assert_eq!(ProxyError::UpstreamError.status(), 502);
        assert_eq!(ProxyError::UpstreamTimeout.status(), 504);
        assert_eq!(ProxyError::BodyTooLarge.status(), 413);
        assert_eq!(ProxyError::InvalidHost.status(), 400);
        assert_eq!(ProxyError::ClientBodyTimeout.status(), 408);
    }

    /// An ending for a body that never comes from upstream.
    struct Unused;

    impl Ending for Unused {
        type Body = http_body_util::Empty<bytes::Bytes>;
        fn passed(&mut self, _: u64) {}
        fn ended(&mut self, _: &mut Self::Body) {}
        fn broken(&mut self) {}
        fn stalled(&mut self, _: std::time::Duration) -> std::convert::Infallible {
            unreachable!("an empty body never waits")
        }
    }

    #[test]
    fn responses_carry_the_error_header() {
        let r = ProxyError::UpstreamTimeout.response::<Unused>();
        assert_eq!(r.headers()["x-switchyard-error"], "upstream-timeout");
    }

    #[test]
    fn raw_response_is_well_formed() {
        let raw = String::from_utf8(ProxyError::Overloaded.raw_http1()).unwrap();
        assert!(raw.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(raw.ends_with("\r\n\r\ntoo many connections\n"));
    }
}
