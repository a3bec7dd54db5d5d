//! Connections to one origin (scheme, host, port): the upstream regions and `jwks_url`.
//!
//! hyper's own client connections (`hyper::client::conn`), pooled here instead of through
//! hyper-util's general-purpose client: an origin is fixed at start, so a pool is one list of
//! idle HTTP/1.1 senders (most recently used first) and at most one shared HTTP/2 sender,
//! and an exchange costs one uncontended lock, no key hashing, no extra task to put the
//! connection back. `https` origins offer h2 and http/1.1 by ALPN; `http` origins speak
//! HTTP/1.1.
//!
//! Limits: at most [`MAX_IDLE`] idle HTTP/1.1 connections per origin, each kept at most
//! [`IDLE_TIMEOUT`]; `connect_timeout` bounds the TCP connect, the TLS handshake and the HTTP/2
//! preface together. A request that could not be written on a reused connection (the server
//! closed it while idle) is retried once on a new one; nothing is retried once written.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tls::client_config;
use crate::watch::Watched;

use super::wanted::Wanted;

/// Idle HTTP/1.1 connections kept per origin.
pub const MAX_IDLE: usize = 256;

/// How many times a request the server certainly did not process (HTTP/2 REFUSED_STREAM, or
/// above a GOAWAY's last stream) is sent again, each time on a new connection.
const UNPROCESSED_RETRIES: usize = 3;

/// Connections open at once per origin (a request beyond waits for one to come free); the
/// shared HTTP/2 connection counts as one.
pub const MAX_CONNECTIONS: usize = 128;
/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type Body = Empty<Bytes>;
pub type SharedError = Arc<dyn std::error::Error + Send + Sync>;

/// What every origin connects with: the TLS client configuration (it follows
/// `upstream.ca_file`) and `connect_timeout`.
#[derive(Clone)]
pub struct Connector {
    pub tls: Arc<Watched<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// The `ca_file` the TLS configuration follows, if any (part of a pool's identity).
    ca_file: Option<PathBuf>,
}

/// A failed exchange.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Not sent: every caller had gone before a connection was free.
    #[error("abandoned: every caller had gone")]
    Abandoned,
    /// No connection: DNS, TCP connect, TLS handshake, `connect_timeout`.
    #[error("connect: {0}")]
    Connect(#[source] SharedError),
    /// The connection failed during the exchange.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The connection a response arrived on: give it back with [`Origin::release`] once its body
/// has been read to the end, or drop it.
pub struct Conn(Option<Idle1>);

struct Idle1 {
    sender: http1::SendRequest<Body>,
    since: Instant,
    /// The TLS configuration's version it was made with: a new CA bundle retires it.
    tls_version: u64,
}

enum Sender {
    H1(Idle1),
    /// The shared HTTP/2 connection, and which one it is.
    H2(http2::SendRequest<Body>, u64),
}

#[derive(Default)]
struct Idle {
    /// Most recently used last.
    h1: VecDeque<Idle1>,
    /// The shared HTTP/2 connection: its sender, TLS version, generation.
    h2: Option<(http2::SendRequest<Body>, u64, u64)>,
}

pub struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// Host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// For `https`: the name the certificate must carry.
    server_name: Option<ServerName<'static>>,
    host_header: HeaderValue,
    connector: Connector,
    idle: Mutex<Idle>,
    /// One permit per open connection.
    slots: Arc<tokio::sync::Semaphore>,
    /// Signalled when a connection goes back to the idle list.
    released: tokio::sync::Notify,
    /// Whether this origin speaks HTTP/2 (known after the first TLS handshake): then one
    /// connect at a time, so that a GOAWAY does not set off a connect per waiting request.
    speaks_h2: std::sync::atomic::AtomicBool,
    connecting: tokio::sync::Mutex<()>,
    /// Numbers the HTTP/2 connections, so a failure retires only its own.
    generations: std::sync::atomic::AtomicU64,
}

impl Origin {
    /// The origin of an absolute `http` or `https` URL.
    pub fn new(url: &Uri, connector: Connector) -> Result<Origin, String> {
        let scheme = url.scheme().cloned().ok_or("the URL has no scheme")?;
        let https = if scheme == Scheme::HTTPS {
            true
        } else if scheme == Scheme::HTTP {
            false
        } else {
            return Err(format!("unsupported scheme {scheme}"));
        };
        let authority = url.authority().cloned().ok_or("the URL has no host")?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let server_name = if https {
            Some(
                ServerName::try_from(host.clone())
                    .map_err(|_| format!("{host:?} is not a TLS server name"))?,
            )
        } else {
            None
        };
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| "the host is not a header value".to_string())?;
        Ok(Origin {
            scheme,
            authority,
            host,
            port,
            server_name,
            host_header,
            connector,
            idle: Mutex::new(Idle::default()),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            released: tokio::sync::Notify::new(),
            // Offered by ALPN on every TLS origin: assume it until a handshake says otherwise,
            // so that a cold burst to an HTTP/2 origin makes one connection, not one each.
            speaks_h2: std::sync::atomic::AtomicBool::new(https),
            connecting: tokio::sync::Mutex::new(()),
            generations: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Sends `req` (origin-form URI: path and query) and returns the response head and body
    /// with the connection it came on. Once a connection is had, `wanted` is asked whether
    /// anyone still waits for the answer: if not, nothing is sent.
    pub async fn send(
        &self,
        req: Request<Body>,
        wanted: &Wanted,
    ) -> Result<(Response<Incoming>, Conn), PoolError> {
        let mut req = Some(req);
        // A request is tried again only when it was certainly not processed: a reused
        // connection turned out closed before it was written (once), or, on HTTP/2, the
        // server refused its stream or sent GOAWAY below it (RFC 9113 §8.7; a few times, each
        // on a new connection). Nothing that may have been processed is sent twice.
        let mut closed_retries = 1;
        let mut refused_retries = UNPROCESSED_RETRIES;
        loop {
            let Some(mut request) = req.take() else { break };
            let (sender, reused) = self.checkout().await?;
            if !wanted.still() {
                if let Sender::H1(idle) = sender {
                    self.release(Conn(Some(idle)));
                }
                return Err(PoolError::Abandoned);
            }
            wanted.sent.mark();
            let (mut failed, copy, generation) = match sender {
                Sender::H1(mut idle) => {
                    request.headers_mut().insert(HOST, self.host_header.clone());
                    match idle.sender.try_send_request(request).await {
                        Ok(response) => return Ok((response, Conn(Some(idle)))),
                        Err(e) => (e, None, None),
                    }
                }
                Sender::H2(mut sender, generation) => {
                    request.headers_mut().remove(HOST);
                    let mut parts = std::mem::take(request.uri_mut()).into_parts();
                    parts.scheme = Some(self.scheme.clone());
                    parts.authority = Some(self.authority.clone());
                    *request.uri_mut() =
                        Uri::from_parts(parts).map_err(|e| PoolError::Connect(Arc::new(e)))?;
                    let copy = copy_request(&request);
                    match sender.try_send_request(request).await {
                        Ok(response) => return Ok((response, Conn(None))),
                        Err(e) => (e, Some(copy), Some(generation)),
                    }
                }
            };
            if let Some(generation) = generation {
                // That connection is going away: the next attempt makes a new one.
                self.retire_h2(generation);
            }
            if let Some(unsent) = failed.take_message() {
                if reused && closed_retries > 0 {
                    closed_retries -= 1;
                    req = Some(unsent);
                    continue;
                }
            } else if let Some(copy) = copy {
                if refused_retries > 0 && unprocessed(failed.error()) {
                    refused_retries -= 1;
                    req = Some(copy);
                    continue;
                }
            }
            return Err(PoolError::Http(failed.into_error()));
        }
        Err(PoolError::Connect(Arc::new(std::io::Error::other(
            "the connection closed before the request was sent",
        ))))
    }

    /// Forgets the shared HTTP/2 connection if it is still the one of `generation`.
    fn retire_h2(&self, generation: u64) {
        let mut pool = self.lock();
        if pool.h2.as_ref().is_some_and(|(_, _, g)| *g == generation) {
            pool.h2 = None;
        }
    }

    /// Returns a connection whose response body was read to the end.
    pub fn release(&self, conn: Conn) {
        let Some(mut idle) = conn.0 else { return };
        if idle.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        idle.since = now;
        let mut pool = self.lock();
        while pool
            .h1
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.since) > IDLE_TIMEOUT)
        {
            pool.h1.pop_front();
        }
        if pool.h1.len() < MAX_IDLE {
            pool.h1.push_back(idle);
        }
        drop(pool);
        self.released.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        // The pool holds no invariant a panic could break halfway.
        lock(&self.idle)
    }

    /// A live connection: the shared HTTP/2 one, the most recently used idle HTTP/1.1 one, or
    /// a new one; `true` when it is reused.
    async fn checkout(&self) -> Result<(Sender, bool), PoolError> {
        let tls_version = self.connector.tls.version();
        if let Some(found) = self.reuse(tls_version).await {
            return Ok((found, true));
        }
        // A connection of our own: a free slot, or wait for one (or for an idle connection).
        let permit = loop {
            if let Ok(permit) = self.slots.clone().try_acquire_owned() {
                break permit;
            }
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => break permit,
                    Err(_) => return Err(PoolError::Connect(Arc::new(std::io::Error::other("pool closed")))),
                },
                () = self.released.notified() => {
                    if let Some(found) = self.reuse(tls_version).await {
                        return Ok((found, true));
                    }
                }
            }
        };
        // An HTTP/2 origin gets one connect at a time; who waited finds the new connection.
        let _one = if self.speaks_h2.load(std::sync::atomic::Ordering::Relaxed) {
            let guard = self.connecting.lock().await;
            if let Some(found) = self.reuse(tls_version).await {
                return Ok((found, true));
            }
            // The connect before this one may have found an HTTP/1.1 origin: then connects
            // need not wait for each other.
            self.speaks_h2
                .load(std::sync::atomic::Ordering::Relaxed)
                .then_some(guard)
        } else {
            None
        };
        // Boxed: the connect future (TLS and HTTP/2 handshakes) is kilobytes, and inline it
        // would make every exchange's future that large, copied at every await of a reuse.
        let sender = tokio::time::timeout(
            self.connector.connect_timeout,
            Box::pin(self.connect(permit)),
        )
        .await
        .map_err(|_| {
            PoolError::Connect(Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect_timeout",
            )))
        })??;
        Ok((sender, false))
    }

    /// The shared HTTP/2 connection or an idle HTTP/1.1 one, if there is one now.
    async fn reuse(&self, tls_version: u64) -> Option<Sender> {
        loop {
            let candidate = {
                let mut pool = self.lock();
                if let Some((h2, version, generation)) = &pool.h2 {
                    if !h2.is_closed() && *version == tls_version {
                        return Some(Sender::H2(h2.clone(), *generation));
                    }
                    pool.h2 = None;
                }
                pool.h1.pop_back()
            };
            let mut idle = candidate?;
            if idle.tls_version != tls_version
                || idle.since.elapsed() > IDLE_TIMEOUT
                || idle.sender.is_closed()
            {
                continue;
            }
            if idle.sender.ready().await.is_ok() {
                return Some(Sender::H1(idle));
            }
        }
    }

    /// A new connection, holding `permit` for as long as it is open.
    async fn connect(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Sender, PoolError> {
        let tls_version = self.connector.tls.version();
        let connect_err = |e: std::io::Error| PoolError::Connect(Arc::new(e));
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(connect_err)?;
        tcp.set_nodelay(true).map_err(connect_err)?;
        let Some(name) = &self.server_name else {
            return handshake_h1(tcp, tls_version, permit).await;
        };
        let config = self.connector.tls.get();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name.clone(), tcp)
            .await
            .map_err(connect_err)?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            self.speaks_h2
                .store(false, std::sync::atomic::Ordering::Relaxed);
            return handshake_h1(tls, tls_version, permit).await;
        }
        self.speaks_h2
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| PoolError::Connect(Arc::new(e)))?;
        tokio::spawn(async move {
            let _permit = permit;
            let _ = conn.await;
        });
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().h2 = Some((sender.clone(), tls_version, generation));
        Ok(Sender::H2(sender, generation))
    }
}

async fn handshake_h1<I>(
    io: I,
    tls_version: u64,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Sender, PoolError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| PoolError::Connect(Arc::new(e)))?;
    // The connection's slot is held until the connection ends (its sender dropped, or closed).
    tokio::spawn(async move {
        let _permit = permit;
        let _ = conn.await;
    });
    Ok(Sender::H1(Idle1 {
        sender,
        since: Instant::now(),
        tls_version,
    }))
}

/// Every origin's pool and every TLS client configuration, shared by the policies that use
/// them: a reload that keeps a region's URL, `ca_file` and `connect_timeout` keeps its pooled
/// connections. Held weakly, so what no policy uses any more is dropped with it.
#[derive(Default)]
pub struct Origins {
    tls: Mutex<HashMap<Option<PathBuf>, Weak<Watched<rustls::ClientConfig>>>>,
    origins: Mutex<HashMap<OriginKey, Weak<Origin>>>,
}

/// A pool's identity: `scheme://authority`, the `ca_file` its TLS trusts, `connect_timeout`.
type OriginKey = (String, Option<PathBuf>, Duration);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Origins {
    /// The connector for `ca_file` (resolved; `None` for webpki's roots only): the one in use,
    /// with its file looked at now, or a new one. Blocking file I/O.
    pub fn connector(
        &self,
        ca_file: Option<&Path>,
        connect_timeout: Duration,
    ) -> Result<Connector, String> {
        let key = ca_file.map(Path::to_path_buf);
        let existing = lock(&self.tls).get(&key).and_then(Weak::upgrade);
        let tls = match existing {
            Some(tls) => {
                tls.check_now()?;
                tls
            }
            None => {
                let tls = match ca_file {
                    Some(path) => Watched::file(path, |pem| client_config(Some(pem)))?,
                    None => Watched::fixed(client_config(None)?),
                };
                let mut map = lock(&self.tls);
                map.retain(|_, w| w.strong_count() > 0);
                map.insert(key.clone(), Arc::downgrade(&tls));
                tls
            }
        };
        Ok(Connector {
            tls,
            connect_timeout,
            ca_file: key,
        })
    }

    /// The pool for `url`'s origin reached through `connector`: the one in use, or a new one.
    pub fn origin(&self, url: &Uri, connector: &Connector) -> Result<Arc<Origin>, String> {
        let scheme = url.scheme_str().unwrap_or("");
        let authority = url.authority().map_or("", |a| a.as_str());
        let key = (
            format!("{scheme}://{authority}"),
            connector.ca_file.clone(),
            connector.connect_timeout,
        );
        let mut map = lock(&self.origins);
        if let Some(origin) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(origin);
        }
        let origin = Arc::new(Origin::new(url, connector.clone())?);
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(key, Arc::downgrade(&origin));
        Ok(origin)
    }
}

/// The same request again (an upstream request has no body): for a retry on another
/// connection after HTTP/2 said the first was not processed.
fn copy_request(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(Body::new());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Whether HTTP/2 says the request was not processed (RFC 9113 §8.7): its stream was refused,
/// or the server's GOAWAY came with a last stream below it; or hyper canceled it before it
/// was sent (a request waiting for a stream slot when the connection went away: "dispatch
/// task is gone").
fn unprocessed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = err.source();
    }
    false
}
