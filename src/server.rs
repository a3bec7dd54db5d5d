//! Listeners, the accept loops, and graceful shutdown (hyper-util's `server_graceful`
//! recipe): on shutdown `/readyz` turns 503, the API listener closes, in-flight requests get
//! `server.shutdown_grace` to finish, and the admin listener keeps answering until then.
//! While it runs, the config file is followed and reloaded ([`crate::reload`]).

pub mod connections;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use self::connections::{Connections, Protocols};
use crate::state::State;
use crate::{admin, http, reload};

/// The largest request head (`431` past it; HTTP/2: the header list). Also what HTTP/1.1
/// buffers at most per connection while a head arrives. Targets are capped separately, at
/// [`crate::http::MAX_TARGET`].
pub const MAX_HEAD: usize = 64 * 1024;
/// What HTTP/2 buffers per stream beyond the peer's flow-control window.
const MAX_SEND_BUF: usize = 64 * 1024;

/// Limits of the listeners that are not configuration (the contract fixes them); tests shorten
/// the timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client may take to send a request head (the first one counted from the
    /// accept, TLS handshake included), and how long an HTTP/1.1 connection may sit idle
    /// between requests.
    pub header_timeout: Duration,
    /// The same on the admin listener: short, since probes and scrapes send at once and a
    /// held-open idle connection only takes room from them.
    pub admin_header_timeout: Duration,
    /// Connections held open at once on the API listener and on the admin listener.
    pub max_connections: usize,
    pub max_admin_connections: usize,
    /// A response that makes no write progress for this long has its connection closed.
    pub send_timeout: Duration,
    /// Bytes of unfinished request heads held across a listener's connections; past it the
    /// oldest unfinished head's connection is closed.
    pub head_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            admin_header_timeout: Duration::from_secs(2),
            max_connections: 10_000,
            max_admin_connections: 1024,
            send_timeout: Duration::from_secs(60),
            head_budget: 32 << 20,
        }
    }
}

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

/// Serves both listeners until `shutdown` resolves, then drains. Returns when done.
pub async fn run(
    state: Arc<State>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_with(state, listeners, shutdown, Limits::default()).await
}

/// [`run`] with other [`Limits`].
pub async fn run_with(
    state: Arc<State>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> std::io::Result<()> {
    let follow = tokio::spawn(reload::follow_file(Arc::downgrade(&state)));
    let maintain = tokio::spawn(maintain_cache(Arc::downgrade(&state)));
    let shared = tokio::spawn(follow_shared(Arc::downgrade(&state)));
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_HEAD + 16 * 1024)
        .keep_alive(true);
    let mut admin_h1 = h1.clone();
    admin_h1.header_read_timeout(limits.admin_header_timeout);
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEAD as u32)
        // What h2 buffers per stream beyond the peer's window (hyper's default is 400 KiB).
        .max_send_buf_size(MAX_SEND_BUF)
        .keep_alive_interval(Duration::from_secs(30));
    let api_conns = Connections::new(
        "API",
        Protocols { h1, h2: Some(h2) },
        limits.max_connections,
        limits.header_timeout,
        limits.send_timeout,
        limits.head_budget,
    );
    // The admin listener speaks HTTP/1.1 only.
    let admin_conns = Connections::new(
        "admin",
        Protocols {
            h1: admin_h1,
            h2: None,
        },
        limits.max_admin_connections,
        limits.admin_header_timeout,
        limits.send_timeout,
        limits.head_budget,
    );
    let Listeners { api, admin } = listeners;

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = api.accept() => if let Some(stream) = accepted_or_pause(accepted).await {
                // TLS as the configuration in force says, for each new connection.
                let tls = state.policy().tls.as_ref().map(|t| t.acceptor.clone());
                api_conns.serve(&state, stream, tls, http::handle).await;
            },
            accepted = admin.accept() => if let Some(stream) = accepted_or_pause(accepted).await {
                admin_conns.serve(&state, stream, None, admin::handle).await;
            },
            _ = &mut shutdown => break,
        }
    }

    state.begin_shutdown();
    follow.abort();
    maintain.abort();
    shared.abort();
    drop(api);
    let grace = state.policy().config.server.shutdown_grace;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: not ready, API listener closed, draining in-flight requests"
    );
    let drain = tokio::time::timeout(grace, api_conns.graceful.shutdown());
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
                admin_conns.serve(&state, stream, None, admin::handle).await;
            },
        }
    }
    drop(admin);
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_conns.graceful.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

/// How often the cache's pending housekeeping runs.
const MAINTENANCE: Duration = Duration::from_secs(1);

/// Runs the cache's housekeeping every [`MAINTENANCE`] until the state is dropped.
async fn maintain_cache(state: std::sync::Weak<State>) {
    let mut tick = tokio::time::interval(MAINTENANCE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        state.cache.maintain().await;
        // Team buckets that are full again hold nothing worth keeping.
        let policy = state.policy();
        state.traffic().sweep(|team| {
            policy
                .config
                .teams
                .as_ref()
                .is_some_and(|t| t.contains_key(team))
        });
    }
}

/// With `[shared]`: the purges and pauses other replicas publish reach this one (its copies
/// of a purged conversation go, a region Convocore paused pauses here too), and a heartbeat
/// tells the fleet how many replicas share the limits. Subscriptions are made again (after a
/// second) whenever they end: Redis restarted, or a reload changed `[shared]`.
async fn follow_shared(state: std::sync::Weak<State>) {
    loop {
        let Some(redis) = state.upgrade().and_then(|s| s.policy().shared.clone()) else {
            if state.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let purges = {
            let weak = state.clone();
            redis.listen_for_purges(move |agent, convo| {
                if let Some(state) = weak.upgrade() {
                    let (agent, convo) = (agent.to_string(), convo.to_string());
                    tokio::spawn(async move {
                        state.cache.purge(&agent, &convo).await;
                    });
                }
            })
        };
        let pauses = {
            let weak = state.clone();
            redis.listen_for_pauses(move |region, pause| {
                if let Some(state) = weak.upgrade() {
                    let policy = state.policy();
                    if let Some(id) = policy.upstream.regions.by_name(region.as_bytes()) {
                        if let Some(r) = policy.upstream.regions.get(id) {
                            r.traffic.gate.pause_from_peer(pause);
                        }
                    }
                }
            })
        };
        let heartbeat = async {
            loop {
                let pause = if redis.heartbeat().await {
                    crate::shared::limits::HEARTBEAT
                } else {
                    Duration::from_secs(1)
                };
                tokio::time::sleep(pause).await;
            }
        };
        // A reload that changed [shared] built another Redis: follow that one instead, at
        // once (dropping these subscriptions), not when these happen to fail.
        let replaced = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let current = state.upgrade().and_then(|s| s.policy().shared.clone());
                if !current.is_some_and(|c| Arc::ptr_eq(&c, &redis)) {
                    return;
                }
            }
        };
        // Until both subscriptions end (the heartbeat never does by itself), or Redis changes.
        tokio::select! {
            _ = async { tokio::join!(purges, pauses) } => {}
            _ = heartbeat => {}
            _ = replaced => continue,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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
