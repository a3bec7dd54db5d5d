//! An accepted connection's socket as the listener watches it: unfinished request heads
//! charged against the listener's budget, writes that make no progress timed out, and the
//! bytes read to choose the protocol given back first.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Activity, Open};

/// `bytes` as a signed amount of the listener's head total (no head or budget nears
/// `isize::MAX`; saturating if one did).
pub(super) fn charge(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

/// The memory an unfinished head of `partial` bytes holds: hyper's read buffer, which starts
/// at 8 KiB and doubles as a head grows (so bytes read undercount it by up to half).
pub(super) fn held_for(partial: usize) -> usize {
    match partial {
        0 => 0,
        n => n.next_power_of_two().max(8 * 1024),
    }
}

/// An accepted connection's socket, with what the listener watches on it:
/// - reads while no request is in progress count against the head budget (past it, the
///   oldest unfinished head is shed);
/// - a write that makes no progress for `send_timeout` fails, and hyper closes the connection
///   (nginx's `send_timeout`): a reader that stops reading cannot pin a response's memory;
/// - bytes read to choose the protocol are given back first (`prefix`).
pub(super) struct Guarded<I> {
    pub(super) io: I,
    pub(super) prefix: Bytes,
    pub(super) send_timeout: Duration,
    /// Set while a write waits: when it fires, the write fails.
    pub(super) stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(super) activity: Arc<Activity>,
    pub(super) open: Arc<Open>,
}

impl<I> Guarded<I> {
    /// `Ready(err)` once a stalled write has waited `send_timeout`; `Pending` (with the
    /// timer's waker set) before.
    fn stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.send_timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "no write progress within the send timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stall(cx).map(Err),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            // Counted when first read.
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 && self.activity.in_progress.load(Ordering::Acquire) == 0 {
            let before = self.activity.partial.fetch_add(read, Ordering::AcqRel);
            // Charged as the buffer holding it is sized, not as the bytes read.
            let grown = held_for(before + read) - held_for(before);
            let heads = &self.activity.heads;
            let grown = charge(grown);
            let total = heads.total.fetch_add(grown, Ordering::AcqRel) + grown;
            if total > charge(heads.budget.load(Ordering::Relaxed)) {
                self.open.shed_oldest_partial();
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{charge, held_for};
    use std::sync::atomic::Ordering;

    /// An h2 stream's request may settle its connection's charge before the read that made it
    /// is added: the total dips below zero for a moment, and is not read as over the budget.
    #[test]
    fn a_settle_before_its_charge_is_not_over_the_budget() {
        let heads = super::super::Heads::default();
        heads.budget.store(64 * 1024, Ordering::Relaxed);
        heads
            .total
            .fetch_sub(charge(held_for(100)), Ordering::AcqRel);
        let dipped = heads.total.load(Ordering::Acquire);
        assert!(dipped < 0, "{dipped}");
        assert!(dipped <= charge(heads.budget.load(Ordering::Relaxed)));
        heads
            .total
            .fetch_add(charge(held_for(100)), Ordering::AcqRel);
        assert_eq!(heads.total.load(Ordering::Acquire), 0);
    }

    #[test]
    fn an_unfinished_head_is_charged_as_its_buffer() {
        assert_eq!(held_for(0), 0);
        assert_eq!(held_for(1), 8 * 1024);
        assert_eq!(held_for(8 * 1024), 8 * 1024);
        assert_eq!(held_for(8 * 1024 + 1), 16 * 1024);
        assert_eq!(held_for(60 * 1024), 64 * 1024);
        // Charges add up as a head grows: what is settled is what was charged.
        let steps = [1usize, 700, 9000, 30_000, 21_700];
        let mut partial = 0;
        let mut total = 0;
        for read in steps {
            total += held_for(partial + read) - held_for(partial);
            partial += read;
        }
        assert_eq!(total, held_for(partial));
    }
}
