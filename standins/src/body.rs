//! Bodies the stand-ins and the load client send: whole, empty, in parts, or a long run
//! of bytes made on the fly.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Any body, boxed: what the app server answers with and the client sends.
pub type AnyBody = BoxBody<Bytes, std::io::Error>;

pub fn full(data: impl Into<Bytes>) -> AnyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> AnyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of `remaining` bytes made on the fly, so neither side holds it in memory.
pub struct Repeat {
    remaining: u64,
    chunk: Bytes,
}

impl Repeat {
    pub fn new(total: u64) -> Repeat {
        Repeat {
            remaining: total,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// A body sent as the given parts, of unknown length (chunked on HTTP/1.1).
pub struct Parts(VecDeque<Bytes>);

impl Parts {
    pub fn new(parts: impl IntoIterator<Item = Bytes>) -> Parts {
        Parts(parts.into_iter().collect())
    }
}

impl Body for Parts {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front().map(|part| Ok(Frame::data(part))))
    }
}
