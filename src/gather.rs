//! Small vectored writes to a plain TCP socket sent as one `send`.
//!
//! A proxied answer goes out as two or three slices (the head, a body chunk, a chunk
//! trailer). `writev` costs measurably more in the kernel than `send` for the same
//! bytes (the iovec is copied in and checked, and the call goes through the VFS layer),
//! so when the slices are small, copying them into one buffer first is cheaper than
//! the system call it replaces. Large slices still go out with `writev`: there the copy
//! would cost more than the call.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// Up to this many bytes in all, the slices are copied into one buffer.
pub const GATHER_MAX: usize = 8 * 1024;

thread_local! {
    // One per thread, not per connection: the bytes are only held for one write call
    // (a partial write is reported as such, and the caller offers the rest again).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `poll_write_vectored` for a socket where a plain write is the cheaper call.
pub fn poll_write_gathered<W: AsyncWrite + Unpin>(
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut filled = bufs.iter().filter(|b| !b.is_empty());
    let Some(first) = filled.next() else {
        return io.poll_write(cx, &[]);
    };
    let Some(second) = filled.next() else {
        return io.poll_write(cx, first);
    };
    let total: usize = first.len() + second.len() + filled.map(|b| b.len()).sum::<usize>();
    if total > GATHER_MAX {
        return io.poll_write_vectored(cx, bufs);
    }
    SCRATCH.with(|scratch| {
        // A write that re-entered this function would find the buffer borrowed; no
        // socket does, but then the slices simply go out as they are.
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return io.poll_write_vectored(cx, bufs);
        };
        scratch.clear();
        scratch.reserve(GATHER_MAX);
        for buf in bufs {
            scratch.extend_from_slice(buf);
        }
        io.poll_write(cx, &scratch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each call it gets: whether vectored, and the bytes.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(bool, Vec<u8>)>,
        /// Takes at most this many bytes per call.
        take: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.take.map_or(buf.len(), |t| t.min(buf.len()));
            self.calls.push((false, buf[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = self.take.map_or(all.len(), |t| t.min(all.len()));
            self.calls.push((true, all[..n].to_vec()));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(recorder: &mut Recorder, bufs: &[&[u8]]) -> usize {
        let slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match poll_write_gathered(Pin::new(recorder), &mut cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn small_slices_go_out_as_one_plain_write() {
        let mut recorder = Recorder::default();
        assert_eq!(
            write(&mut recorder, &[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"hello"]),
            24
        );
        assert_eq!(
            recorder.calls,
            vec![(false, b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec())]
        );
    }

    #[test]
    fn one_slice_is_written_as_it_is() {
        let mut recorder = Recorder::default();
        let big = vec![7u8; GATHER_MAX * 2];
        assert_eq!(write(&mut recorder, &[b"", &big]), big.len());
        assert_eq!(recorder.calls, vec![(false, big)]);
    }

    #[test]
    fn large_slices_stay_vectored() {
        let mut recorder = Recorder::default();
        let big = vec![7u8; GATHER_MAX];
        assert_eq!(write(&mut recorder, &[b"head", &big]), big.len() + 4);
        assert!(recorder.calls[0].0, "gathered past GATHER_MAX");
    }

    #[test]
    fn a_partial_write_reports_only_what_was_taken() {
        let mut recorder = Recorder {
            take: Some(3),
            ..Recorder::default()
        };
        assert_eq!(write(&mut recorder, &[b"ab", b"cd"]), 3);
        assert_eq!(recorder.calls, vec![(false, b"abc".to_vec())]);
    }

    #[test]
    fn nothing_to_write_is_a_zero_write() {
        let mut recorder = Recorder::default();
        assert_eq!(write(&mut recorder, &[b"", b""]), 0);
        assert_eq!(write(&mut recorder, &[]), 0);
    }
}
