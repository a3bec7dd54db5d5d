//! The connections of one listener: each served in its own task, over HTTP/1.1 or HTTP/2
//! (chosen by ALPN under TLS, else by the HTTP/2 preface), watched for the drain, capped in
//! number, and given a deadline for its first request.
//!
//! The protocol is chosen here rather than by hyper-util's auto builder so that hyper's own
//! HTTP/1 builder can be used, with its exact request-head limit (`max_header_size`: a `431`
//! for a head over it, which its buffer limit alone enforces only roughly).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::state::State;

/// What a cleartext HTTP/2 connection (prior knowledge) starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How one listener speaks: HTTP/1.1 always, HTTP/2 when `h2` is set.
pub struct Protocols {
    pub h1: http1::Builder,
    pub h2: Option<http2::Builder<TokioExecutor>>,
}

/// The connections of one listener: how they are served, watched for the drain, and capped.
pub struct Connections {
    name: &'static str,
    protocols: Arc<Protocols>,
    pub graceful: GracefulShutdown,
    slots: Arc<Semaphore>,
    /// How long the first request head may take, from the accept (TLS included).
    header_timeout: Duration,
}

impl Connections {
    pub fn new(
        name: &'static str,
        protocols: Protocols,
        max: usize,
        header_timeout: Duration,
    ) -> Self {
        Connections {
            name,
            protocols: Arc::new(protocols),
            graceful: GracefulShutdown::new(),
            slots: Arc::new(Semaphore::new(max)),
            header_timeout,
        }
    }

    /// Serves one accepted connection (after a TLS handshake when `tls` is set) in its own
    /// task, with `handle` as the service; past the cap, the connection is closed at once.
    pub fn serve<H, F>(
        &self,
        state: &Arc<State>,
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handle: H,
    ) where
        H: Fn(Arc<State>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(
                listener = self.name,
                "connection limit reached; closing a new connection"
            );
            return;
        };
        let state = state.clone();
        let protocols = self.protocols.clone();
        let watcher = self.graceful.watcher();
        let name = self.name;
        // The first request head must arrive within header_timeout of the accept, TLS
        // handshake and protocol choice included (hyper's header_read_timeout starts only
        // once HTTP/1 is chosen, so a connection that sends nothing would be held forever).
        let deadline = tokio::time::Instant::now() + self.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let first = Arc::new(AtomicBool::new(false));
            let seen = first.clone();
            let service = service_fn(move |req| {
                if !seen.load(Ordering::Relaxed) {
                    seen.store(true, Ordering::Relaxed);
                }
                handle(state.clone(), req)
            });
            let served = match tls {
                None => {
                    let conn = Conn {
                        protocols: &protocols,
                        watcher,
                        deadline,
                        first: &first,
                    };
                    conn.serve(stream, None, service).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let conn = Conn {
                                protocols: &protocols,
                                watcher,
                                deadline,
                                first: &first,
                            };
                            conn.serve(stream, Some(h2), service).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = name, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            match served {
                Served::Ended(Err(e)) => {
                    tracing::debug!(listener = name, error = %e, "connection ended with an error");
                }
                Served::TimedOut => {
                    tracing::debug!(
                        listener = name,
                        "no request head in time; connection closed"
                    );
                }
                Served::Ended(Ok(())) => {}
            }
        });
    }
}

enum Served {
    Ended(Result<(), hyper::Error>),
    /// No request reached the service by the deadline.
    TimedOut,
}

/// One connection being set up.
struct Conn<'a> {
    protocols: &'a Protocols,
    watcher: Watcher,
    deadline: tokio::time::Instant,
    first: &'a AtomicBool,
}

impl Conn<'_> {
    /// `alpn_h2`: what TLS negotiated (`None` for cleartext: the preface decides).
    async fn serve<I, S, B>(self, mut io: I, alpn_h2: Option<bool>, service: S) -> Served
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = B> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (h2, prefix) = match (alpn_h2, &self.protocols.h2) {
            (_, None) => (false, Bytes::new()),
            (Some(h2), Some(_)) => (h2, Bytes::new()),
            (None, Some(_)) => {
                match tokio::time::timeout_at(self.deadline, sniff(&mut io)).await {
                    Ok(Ok(sniffed)) => sniffed,
                    // The client went away before saying anything.
                    Ok(Err(_)) => return Served::Ended(Ok(())),
                    Err(_) => return Served::TimedOut,
                }
            }
        };
        let io = TokioIo::new(Prefixed { prefix, io });
        match (&self.protocols.h2, h2) {
            (Some(builder), true) => {
                let conn = self.watcher.watch(builder.serve_connection(io, service));
                first_request_within(self.deadline, self.first, conn).await
            }
            _ => {
                let conn = self
                    .watcher
                    .watch(self.protocols.h1.serve_connection(io, service));
                first_request_within(self.deadline, self.first, conn).await
            }
        }
    }
}

/// Reads until the HTTP/2 preface is seen or ruled out: whether it is HTTP/2, and the bytes
/// read (given back to whichever protocol serves the connection).
async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<(bool, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < H2_PREFACE.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if buf[..filled] != H2_PREFACE[..filled] {
            return Ok((false, Bytes::copy_from_slice(&buf[..filled])));
        }
    }
    Ok((
        filled == H2_PREFACE.len(),
        Bytes::copy_from_slice(&buf[..filled]),
    ))
}

/// An IO that first gives back bytes already read from it.
struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Drives `conn`, and drops it (closing the connection) if no request has reached the service
/// by `deadline`. After the first request the deadline is no longer watched.
async fn first_request_within<F>(
    deadline: tokio::time::Instant,
    first: &AtomicBool,
    conn: F,
) -> Served
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            result = &mut conn => return Served::Ended(result),
            () = &mut timer, if watching => {
                if !first.load(Ordering::Relaxed) {
                    return Served::TimedOut;
                }
                watching = false;
            }
        }
    }
}
