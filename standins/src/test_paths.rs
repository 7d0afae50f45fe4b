//! The two paths only the tests need, behind the `test-paths` feature: `/upload`
//! proves a body arrived byte for byte, `/ws` that an upgraded connection flows both
//! ways.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::body::{empty, full, AnyBody};

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the whole body; answers `sha256hex length`.
pub(crate) async fn upload(mut req: Request<Incoming>) -> Response<AnyBody> {
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let body = req.body_mut();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            let mut response = Response::new(full("body error"));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        };
        if let Some(data) = frame.data_ref() {
            hasher.update(data);
            length += data.len() as u64;
        }
    }
    Response::new(full(Bytes::from(format!(
        "{} {length}",
        hex(&hasher.finalize())
    ))))
}

/// Accepts the upgrade and echoes every message until the client closes.
pub(crate) fn websocket_echo(mut req: Request<Incoming>) -> Response<AnyBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut response = Response::new(full("no key"));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() || ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    headers.insert("connection", HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", accept);
    }
    response
}
