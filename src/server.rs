//! Listeners, the accept loops, TLS, and graceful shutdown (hyper-util's `server_graceful`
//! recipe): on shutdown `/readyz` turns 503, the API listener closes, in-flight requests get
//! `server.shutdown_grace` to finish, and the admin listener keeps answering until then.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::App;
use crate::config::{self, Config, ConfigError};
use crate::watch::Watched;
use crate::{admin, api};

/// Connections held open at once per listener; past this, new connections are closed at once.
const MAX_CONNECTIONS: usize = 10_000;
/// How long a client may take to send a request head (the first one counted from the accept,
/// TLS handshake included), and how long an HTTP/1.1 connection may sit idle between requests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Listeners {
    pub api: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(api: SocketAddr, admin: SocketAddr) -> std::io::Result<Listeners> {
        Ok(Listeners {
            api: TcpListener::bind(api).await?,
            admin: TcpListener::bind(admin).await?,
        })
    }
}

/// The API listener's TLS: certificate and key follow their files.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
}

struct Resolver(Arc<Watched<Arc<CertifiedKey>>>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().as_ref().clone())
    }
}

impl Tls {
    pub fn from_config(config: &Config, tls: &config::Tls) -> Result<Tls, ConfigError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cert_path = config.resolve(&tls.cert_file);
        let key_path = config.resolve(&tls.key_file);
        // Certificate and key change together (cert-manager renews both): either change
        // reloads the pair, and a pair that does not match keeps the last good one.
        let provider_for_load = provider.clone();
        let certified = Watched::files(&[cert_path, key_path], move |files| {
            certified_key(&provider_for_load, &files[0], &files[1])
        })
        .map_err(|m| ConfigError::new(&config.path, "server.tls.cert_file", m))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(&config.path, "server.tls", e))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(certified)));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }
}

fn certified_key(
    provider: &rustls::crypto::CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, String> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cert_file is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("cert_file holds no certificate".to_string());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("key_file is not PEM: {e}"))?
        .ok_or_else(|| "key_file holds no private key".to_string())?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| "key_file: unsupported private key".to_string())?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|_| "cert_file and key_file do not belong together".to_string())?;
    Ok(Arc::new(certified))
}

/// Serves both listeners until `shutdown` resolves, then drains. Returns when done.
pub async fn run(
    app: Arc<App>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    let api_conns = Connections::new("API", builder, MAX_CONNECTIONS);
    let mut admin_builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    admin_builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let admin_conns = Connections::new("admin", admin_builder, 1024);
    let tls = app.tls.as_ref().map(|t| t.acceptor.clone());
    let Listeners { api, admin } = listeners;

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = api.accept() => if let Some(stream) = accepted_or_pause(accepted).await {
                api_conns.serve(&app, stream, tls.clone(), api::handle);
            },
            accepted = admin.accept() => if let Some(stream) = accepted_or_pause(accepted).await {
                admin_conns.serve(&app, stream, None, admin::handle);
            },
            _ = &mut shutdown => break,
        }
    }

    app.begin_shutdown();
    drop(api);
    tracing::info!(
        grace_s = app.config.server.shutdown_grace.as_secs_f64(),
        "shutting down: not ready, API listener closed, draining in-flight requests"
    );
    let drain = tokio::time::timeout(
        app.config.server.shutdown_grace,
        api_conns.graceful.shutdown(),
    );
    tokio::pin!(drain);
    loop {
        tokio::select! {
            result = &mut drain => {
                if result.is_err() {
                    tracing::warn!("shutdown_grace elapsed with requests still in flight");
                }
                break;
            }
            accepted = admin.accept() => if let Some(stream) = accepted_or_pause(accepted).await {
                admin_conns.serve(&app, stream, None, admin::handle);
            },
        }
    }
    drop(admin);
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_conns.graceful.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

/// An accept error (e.g. out of file descriptors) must not end the server: pause and go on.
async fn accepted_or_pause(
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
) -> Option<TcpStream> {
    match accepted {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// The connections of one listener: how they are served, watched for the drain, and capped.
struct Connections {
    name: &'static str,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: GracefulShutdown,
    slots: Arc<Semaphore>,
}

impl Connections {
    fn new(name: &'static str, builder: auto::Builder<TokioExecutor>, max: usize) -> Self {
        Connections {
            name,
            builder: Arc::new(builder),
            graceful: GracefulShutdown::new(),
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// Serves one accepted connection (after a TLS handshake when `tls` is set) in its own
    /// task, with `handle` as the service; past the cap, the connection is closed at once.
    fn serve<H, F>(
        &self,
        app: &Arc<App>,
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handle: H,
    ) where
        H: Fn(Arc<App>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(
                listener = self.name,
                "connection limit reached; closing a new connection"
            );
            return;
        };
        let app = app.clone();
        let builder = self.builder.clone();
        let watcher = self.graceful.watcher();
        let name = self.name;
        tokio::spawn(async move {
            let _permit = permit;
            // The first request head must arrive within HEADER_TIMEOUT of the accept, TLS
            // handshake included. hyper's header_read_timeout only starts once HTTP/1 is
            // chosen: the auto builder's HTTP/2-preface sniff reads without a deadline, so a
            // connection that sends nothing would otherwise be held forever.
            let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
            let first = Arc::new(AtomicBool::new(false));
            let seen = first.clone();
            let service = service_fn(move |req| {
                if !seen.load(Ordering::Relaxed) {
                    seen.store(true, Ordering::Relaxed);
                }
                handle(app.clone(), req)
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

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
