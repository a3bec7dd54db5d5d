//! The test servers' accept loop, shared by the mock Convocore and the tests' own servers
//! (a JWKS endpoint, a Prometheus target): HTTP/1.1 and HTTP/2 (by ALPN over TLS, or h2c with
//! prior knowledge), connections counted, dropped or rotated on demand.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A test server's accept loop: serves HTTP/1.1 and HTTP/2 (by ALPN over `tls`, or h2c prior
/// knowledge) with `handler` until the task is aborted, which closes every connection.
/// `on_accept` runs for each accepted connection; a change of `drops` (when given) closes the
/// open ones; `rotate_after` (read at each accept) shuts a connection down gracefully after
/// that many requests.
pub async fn serve_http<H, F, B, E>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
    on_accept: impl Fn(),
    drops: Option<tokio::sync::watch::Receiver<u64>>,
    rotate_after: impl Fn() -> Option<usize>,
) where
    H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    serve_http_with(
        builder,
        listener,
        tls,
        handler,
        on_accept,
        drops,
        rotate_after,
    )
    .await
}

/// [`serve_http`] with the connections' `builder` (e.g. HTTP/2 settings).
pub(super) async fn serve_http_with<H, F, B, E>(
    builder: auto::Builder<TokioExecutor>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
    on_accept: impl Fn(),
    drops: Option<tokio::sync::watch::Receiver<u64>>,
    rotate_after: impl Fn() -> Option<usize>,
) where
    H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(builder);
    // Connections live in the set, so aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        on_accept();
        let rotate_after = rotate_after();
        let mut drops = drops.clone();
        if let Some(d) = &mut drops {
            d.mark_unchanged();
        }
        let builder = builder.clone();
        let tls = tls.clone();
        let handler = handler.clone();
        connections.spawn(async move {
            let served = Arc::new(AtomicU64::new(0));
            let rotate = Arc::new(tokio::sync::Notify::new());
            let (count, notify) = (served.clone(), rotate.clone());
            let service = service_fn(move |req| {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                if rotate_after.is_some_and(|every| n as usize == every) {
                    notify.notify_one();
                }
                handler(req)
            });
            let serve = async move {
                let io = match tls {
                    None => Some(Either::Plain(stream)),
                    Some(acceptor) => acceptor
                        .accept(stream)
                        .await
                        .ok()
                        .map(|s| Either::Tls(Box::new(s))),
                };
                let Some(io) = io else { return };
                let conn = builder.serve_connection(TokioIo::new(io), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    () = rotate.notified() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            };
            // Dropping the connection's future closes its socket.
            let dropped = async {
                match &mut drops {
                    Some(d) => {
                        let _ = d.changed().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = dropped => {}
            }
        });
    }
}

/// A plain or TLS stream, so one connection future serves both.
enum Either {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Either {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Either::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Either {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Either::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Either::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Plain(s) => Pin::new(s).poll_flush(cx),
            Either::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Either::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
