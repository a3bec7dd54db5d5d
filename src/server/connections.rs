//! The connections of one listener: each served in its own task by hyper-util's auto builder,
//! watched for the drain, capped in number, and given a deadline for its first request.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::state::State;

/// The connections of one listener: how they are served, watched for the drain, and capped.
pub struct Connections {
    name: &'static str,
    builder: Arc<auto::Builder<TokioExecutor>>,
    pub graceful: GracefulShutdown,
    slots: Arc<Semaphore>,
    /// How long the first request head may take, from the accept (TLS included).
    header_timeout: Duration,
}

impl Connections {
    pub fn new(
        name: &'static str,
        builder: auto::Builder<TokioExecutor>,
        max: usize,
        header_timeout: Duration,
    ) -> Self {
        Connections {
            name,
            builder: Arc::new(builder),
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
        let header_timeout = self.header_timeout;
        let builder = self.builder.clone();
        let watcher = self.graceful.watcher();
        let name = self.name;
        tokio::spawn(async move {
            let _permit = permit;
            // The first request head must arrive within header_timeout of the accept, TLS
            // handshake included. hyper's header_read_timeout only starts once HTTP/1 is
            // chosen: the auto builder's HTTP/2-preface sniff reads without a deadline, so a
            // connection that sends nothing would otherwise be held forever.
            let deadline = tokio::time::Instant::now() + header_timeout;
            let first = Arc::new(AtomicBool::new(false));
            let seen = first.clone();
            let service = service_fn(move |req| {
                if !seen.load(Ordering::Relaxed) {
                    seen.store(true, Ordering::Relaxed);
                }
                handle(state.clone(), req)
            });
            let result = match tls {
                None => {
                    let conn =
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                    first_request_within(deadline, &first, conn).await
                }
                Some(acceptor) => {
                    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(listener = name, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn =
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                    first_request_within(deadline, &first, conn).await
                }
            };
            match result {
                Some(Err(e)) => {
                    tracing::debug!(listener = name, error = %e, "connection ended with an error");
                }
                None => {
                    tracing::debug!(
                        listener = name,
                        "no request head in time; connection closed"
                    );
                }
                Some(Ok(())) => {}
            }
        });
    }
}

/// Drives `conn`, and drops it (closing the connection) if no request has reached the service
/// by `deadline`; `None` then. After the first request the deadline is no longer watched.
async fn first_request_within<F, T>(
    deadline: tokio::time::Instant,
    first: &AtomicBool,
    conn: F,
) -> Option<T>
where
    F: Future<Output = T>,
{
    tokio::pin!(conn);
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            result = &mut conn => return Some(result),
            () = &mut timer, if watching => {
                if !first.load(Ordering::Relaxed) {
                    return None;
                }
                watching = false;
            }
        }
    }
}
