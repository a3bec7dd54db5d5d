//! The connections of one listener: each served in its own task, over HTTP/1.1 or HTTP/2
//! (chosen by ALPN under TLS, else by the HTTP/2 preface), watched for the drain, capped in
//! number, and given a deadline for its first request.
//!
//! The protocol is chosen here rather than by hyper-util's auto builder so that hyper's own
//! HTTP/1 builder can be used, with its exact request-head limit (`max_header_size`: a `431`
//! for a head over it, which its buffer limit alone enforces only roughly).
//!
//! At the cap, the connection idle the longest (no request in progress) is closed to make room
//! for the new one, as Envoy's overload manager does: idle clients cannot lock out health
//! checks or real callers. Refusals are logged at most once a second, with a count.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::state::State;

mod guarded;
use self::guarded::{charge, held_for, Guarded};

/// What a cleartext HTTP/2 connection (prior knowledge) starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How one listener speaks: HTTP/1.1 always, HTTP/2 when `h2` is set.
pub struct Protocols {
    pub h1: http1::Builder,
    pub h2: Option<http2::Builder<TokioExecutor>>,
}

/// How long a new connection at the cap waits for the slot an evicted idle one frees.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// The connections of one listener: how they are served, watched for the drain, and capped.
pub struct Connections {
    name: &'static str,
    protocols: Arc<Protocols>,
    pub graceful: GracefulShutdown,
    slots: Arc<Semaphore>,
    /// How long the first request head may take, from the accept (TLS included).
    header_timeout: Duration,
    /// How long a write may make no progress before the connection is closed.
    send_timeout: Duration,
    open: Arc<Open>,
    refusals: Throttled,
}

/// The open connections, for eviction at the cap and for the budget of unfinished heads.
#[derive(Default)]
struct Open {
    next_id: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Activity>>>,
    /// Ticks on every connection opened and every request ended: an order of events, cheaper
    /// than reading the clock on every request.
    events: Arc<AtomicU64>,
    heads: Arc<Heads>,
}

/// Memory held for bytes read on every connection while it had no request in progress
/// (request heads on their way, charged as [`held_for`] sizes their buffer), against a budget
/// for the listener: past it, the oldest such connection is
/// closed, so that 10,000 connections trickling heads cannot hold 10,000 x 64 KiB.
///
/// Signed: a connection's read and the settling of its charge may run on two tasks (an h2
/// stream's request settles while its connection reads), so the total can dip below zero for a
/// moment; unsigned, it would wrap and look far over the budget.
#[derive(Default)]
struct Heads {
    total: AtomicIsize,
    budget: AtomicUsize,
}

/// One connection's activity: requests in progress, and when (in [`Open::events`] order) the
/// last one ended or the connection opened, for "idle the longest".
struct Activity {
    in_progress: AtomicUsize,
    idle_since: AtomicU64,
    events: Arc<AtomicU64>,
    /// Bytes read since the last request reached the service (or the accept).
    partial: AtomicUsize,
    heads: Arc<Heads>,
    close: Notify,
}

impl Activity {
    /// The head bytes held for this connection are no longer held (a request started, or
    /// the connection ended).
    fn settle(&self) {
        let partial = self.partial.swap(0, Ordering::AcqRel);
        self.heads
            .total
            .fetch_sub(charge(held_for(partial)), Ordering::AcqRel);
    }
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self) -> (u64, Arc<Activity>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            in_progress: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.events.fetch_add(1, Ordering::Relaxed)),
            events: self.events.clone(),
            partial: AtomicUsize::new(0),
            heads: self.heads.clone(),
            close: Notify::new(),
        });
        self.lock().insert(id, activity.clone());
        (id, activity)
    }

    /// Over the head budget: asks the connection whose unfinished head is the oldest to close.
    fn shed_oldest_partial(&self) {
        let map = self.lock();
        let oldest = map
            .values()
            .filter(|a| {
                a.in_progress.load(Ordering::Acquire) == 0 && a.partial.load(Ordering::Acquire) > 0
            })
            .min_by_key(|a| a.idle_since.load(Ordering::Relaxed));
        if let Some(activity) = oldest {
            activity.close.notify_one();
        }
    }

    /// Asks the connection idle the longest to close; whether there was one.
    fn evict_longest_idle(&self) -> bool {
        let map = self.lock();
        let oldest = map
            .values()
            .filter(|a| a.in_progress.load(Ordering::Acquire) == 0)
            .min_by_key(|a| a.idle_since.load(Ordering::Relaxed));
        match oldest {
            Some(activity) => {
                activity.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes the connection from [`Open`] when its task ends.
struct Registered {
    open: Arc<Open>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(activity) = self.open.lock().remove(&self.id) {
            activity.settle();
        }
    }
}

/// Marks a request in progress on its connection until dropped.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn start(activity: &Arc<Activity>) -> InProgress {
        activity.in_progress.fetch_add(1, Ordering::AcqRel);
        activity.settle();
        InProgress(activity.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let now = self.0.events.fetch_add(1, Ordering::Relaxed);
        self.0.idle_since.store(now, Ordering::Relaxed);
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A warning logged at most once a second, with how many were not logged.
#[derive(Default)]
struct Throttled {
    /// Milliseconds since `start` of the last line, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
    start: std::sync::OnceLock<Instant>,
}

impl Throttled {
    /// Whether to log now, and how many were suppressed since the last line.
    fn due(&self) -> Option<u64> {
        let start = *self.start.get_or_init(Instant::now);
        let now = start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Connections {
    pub fn new(
        name: &'static str,
        protocols: Protocols,
        max: usize,
        header_timeout: Duration,
        send_timeout: Duration,
        head_budget: usize,
    ) -> Self {
        let open = Open::default();
        open.heads.budget.store(head_budget, Ordering::Relaxed);
        Connections {
            name,
            protocols: Arc::new(protocols),
            graceful: GracefulShutdown::new(),
            slots: Arc::new(Semaphore::new(max)),
            header_timeout,
            send_timeout,
            open: Arc::new(open),
            refusals: Throttled::default(),
        }
    }

    /// A slot for a new connection: a free one, or, at the cap, the one the connection idle
    /// the longest gives up (waiting at most [`EVICTION_WAIT`]). `None`: every connection is
    /// busy.
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        if !self.open.evict_longest_idle() {
            return None;
        }
        tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Serves one accepted connection (after a TLS handshake when `tls` is set) in its own
    /// task, with `handle` as the service; at the cap, the longest-idle connection makes room,
    /// and when every connection is busy the new one is closed at once.
    pub async fn serve<H, F>(
        &self,
        state: &Arc<State>,
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handle: H,
    ) where
        H: Fn(Arc<State>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let Some(permit) = self.slot().await else {
            if let Some(suppressed) = self.refusals.due() {
                tracing::warn!(
                    listener = self.name,
                    suppressed,
                    "connection limit reached with every connection busy; closing new connections"
                );
            }
            return;
        };
        let (id, activity) = self.open.add();
        let registered = Registered {
            open: self.open.clone(),
            id,
        };
        let state = state.clone();
        let protocols = self.protocols.clone();
        let watcher = self.graceful.watcher();
        let name = self.name;
        // The first request head must arrive within header_timeout of the accept, TLS
        // handshake and protocol choice included (hyper's header_read_timeout starts only
        // once HTTP/1 is chosen, so a connection that sends nothing would be held forever).
        let deadline = tokio::time::Instant::now() + self.header_timeout;
        let mut stream = Guarded {
            io: stream,
            prefix: Bytes::new(),
            send_timeout: self.send_timeout,
            stalled: None,
            activity: activity.clone(),
            open: self.open.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            let _registered = registered;
            let first = Arc::new(AtomicBool::new(false));
            let seen = first.clone();
            let requests = activity.clone();
            let service = service_fn(move |req| {
                if !seen.load(Ordering::Relaxed) {
                    seen.store(true, Ordering::Relaxed);
                }
                let in_progress = InProgress::start(&requests);
                let response = handle(state.clone(), req);
                async move {
                    let response = response.await;
                    drop(in_progress);
                    response
                }
            });

            let serving = async move {
                let conn = Conn {
                    protocols: &protocols,
                    watcher,
                    deadline,
                    first: &first,
                };
                match tls {
                    None => {
                        // Cleartext: the HTTP/2 preface decides, where HTTP/2 is spoken.
                        let mut h2 = false;
                        if protocols.h2.is_some() {
                            match tokio::time::timeout_at(deadline, sniff(&mut stream)).await {
                                Ok(Ok((sniffed, prefix))) => {
                                    h2 = sniffed;
                                    stream.prefix = prefix;
                                }
                                // The client went away before saying anything.
                                Ok(Err(_)) => return Served::Ended(Ok(())),
                                Err(_) => return Served::TimedOut,
                            }
                        }
                        conn.serve(stream, h2, service).await
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                                conn.serve(stream, h2, service).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(listener = name, error = %e, "TLS handshake failed");
                                Served::Ended(Ok(()))
                            }
                            Err(_) => Served::TimedOut,
                        }
                    }
                }
            };
            // Eviction at the cap can come at any point: TLS, protocol choice, between requests.
            let served = unless_evicted(&activity, serving).await;
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
                Served::Evicted => {
                    tracing::debug!(
                        listener = name,
                        "idle the longest at the connection cap; closed to make room"
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
    /// Closed, idle, to make room at the cap.
    Evicted,
}

/// One connection being set up.
struct Conn<'a> {
    protocols: &'a Protocols,
    watcher: Watcher,
    deadline: tokio::time::Instant,
    first: &'a AtomicBool,
}

impl Conn<'_> {
    /// Serves the connection over HTTP/2 when `h2` (ALPN, or the preface) and the listener
    /// speaks it, else HTTP/1.1.
    async fn serve<I, S, B>(self, io: I, h2: bool, service: S) -> Served
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = B> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let io = TokioIo::new(io);
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

/// Drives `serving` until it ends or the connection is asked to make room while idle (a
/// request that started meanwhile is let finish: the notice is ignored then).
async fn unless_evicted(activity: &Activity, serving: impl Future<Output = Served>) -> Served {
    tokio::pin!(serving);
    loop {
        tokio::select! {
            served = &mut serving => return served,
            () = activity.close.notified() => {
                if activity.in_progress.load(Ordering::Acquire) == 0 {
                    return Served::Evicted;
                }
            }
        }
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
