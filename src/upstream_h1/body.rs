//! A backend's response body, read from its connection as the client takes it: nothing
//! is read ahead of what the client connection can pass on.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::chunked::{Chunked, Step};
use super::head::BodyKind;
use super::{Conn, Error, Io, Upload};

enum Decoding {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Upgrade,
    Done,
}

pub struct ResponseBody {
    /// Taken when the body broke, or by `take_reusable` once it ended.
    conn: Option<Box<Conn>>,
    decoding: Decoding,
    /// The backend keeps the connection open after this response.
    keep_alive: bool,
    /// The request body still going out, sent as this body is read.
    upload: Option<Box<Upload>>,
}

impl ResponseBody {
    pub(super) fn new(
        conn: Box<Conn>,
        kind: BodyKind,
        keep_alive: bool,
        upload: Option<Box<Upload>>,
    ) -> ResponseBody {
        let decoding = match kind {
            BodyKind::Empty => Decoding::Done,
            BodyKind::Length(length) => Decoding::Length(length),
            BodyKind::Chunked => Decoding::Chunked(Chunked::Size),
            BodyKind::UntilClose => Decoding::UntilClose,
            BodyKind::Upgrade => Decoding::Upgrade,
        };
        ResponseBody {
            conn: Some(conn),
            decoding,
            keep_alive,
            upload,
        }
    }

    /// The connection, once the body ended clean on one the backend keeps open and
    /// that holds nothing beyond this response.
    pub fn take_reusable(&mut self) -> Option<Box<Conn>> {
        match self.decoding {
            Decoding::Done if self.keep_alive => {
                let conn = self.conn.take()?;
                conn.read.is_empty().then_some(conn)
            }
            _ => None,
        }
    }

    /// After a 101: the connection, and what the backend sent past the response head.
    pub fn into_upgraded(mut self) -> Option<(Io, Bytes)> {
        match self.decoding {
            Decoding::Upgrade => {
                let (io, read) = (*self.conn.take()?).into_upgraded();
                Some((io, read.freeze()))
            }
            _ => None,
        }
    }

    fn broken(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.decoding = Decoding::Done;
        self.keep_alive = false;
        Poll::Ready(Some(Err(error)))
    }
}

impl ResponseBody {
    /// Part of the request body is still to go out.
    pub fn still_sending(&self) -> bool {
        self.upload.is_some()
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(upload) = &mut this.upload {
                // Sent whole, or failed (the backend stopped reading): either way the
                // answer goes on.
                if conn
                    .poll_write_request(cx, &mut upload.outbox, &mut upload.body)
                    .is_ready()
                {
                    this.upload = None;
                }
            }
            match &mut this.decoding {
                Decoding::Done | Decoding::Upgrade => return Poll::Ready(None),
                Decoding::Length(left) => {
                    if conn.read.is_empty() {
                        match ready!(conn.poll_fill(cx)) {
                            Ok(0) => return this.broken(Error::Truncated),
                            Ok(_) => continue,
                            Err(e) => return this.broken(e.into()),
                        }
                    }
                    let take = (*left).min(conn.read.len() as u64);
                    *left -= take;
                    if *left == 0 {
                        this.decoding = Decoding::Done;
                    }
                    let data = conn.read.split_to(take as usize).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoding::UntilClose => {
                    if !conn.read.is_empty() {
                        let data = conn.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            this.decoding = Decoding::Done;
                            return Poll::Ready(None);
                        }
                        Ok(_) => continue,
                        // A TLS connection closed without close_notify (UnexpectedEof)
                        // may have been cut by anyone on the path: not taken for the
                        // end of a body that only its close delimits.
                        Err(e) => return this.broken(e.into()),
                    }
                }
                Decoding::Chunked(state) => match state.decode(&mut conn.read) {
                    Ok(Some(Step::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Some(Step::End(trailers))) => {
                        this.decoding = Decoding::Done;
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(None) => match ready!(conn.poll_fill(cx)) {
                        Ok(0) => return this.broken(Error::Truncated),
                        Ok(_) => {}
                        Err(e) => return this.broken(e.into()),
                    },
                    Err(e) => return this.broken(e),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoding, Decoding::Done | Decoding::Upgrade) || self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoding {
            Decoding::Length(left) => SizeHint::with_exact(left),
            Decoding::Done | Decoding::Upgrade => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
