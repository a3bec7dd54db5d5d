//! State shared by every replica, in Redis or Valkey (`[shared]`): the second-level cache of
//! sealed exports, and (to come) one fetch per key for the fleet, purges everywhere and
//! fleet-wide limits.
//!
//! The client is redis-rs's multiplexed connection, kept and replaced here rather than by its
//! `ConnectionManager` (whose users report it stuck after a broken connection, redis-rs #984,
//! no reconnect over TLS, #549, a broken pipe after idleness, #1415): every operation runs
//! under `timeout`; a failed connection is dropped and a new one made in the background, so no
//! request waits for a connect; after three failures in a row Redis is skipped for two seconds
//! and then probed by the next operation. Redis failing is Redis having nothing: the caller
//! goes on from memory and upstream.

pub mod entries;
pub mod lease;
pub mod limits;
pub mod purge;
pub mod seal;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge};
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use self::seal::Keys;
use crate::config::{Config, ConfigError};
use crate::watch::Watched;

/// Failures in a row after which Redis is skipped for [`SKIP_FOR`].
const FAILURES_TO_SKIP: u32 = 3;
const SKIP_FOR: Duration = Duration::from_secs(2);
/// The longest a background connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `op` label of `shared_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    Lock,
    Purge,
    Limit,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Lock => "lock",
            Op::Purge => "purge",
            Op::Limit => "limit",
        }
    }
}

/// The metrics of the shared store.
#[derive(Clone)]
pub struct SharedMetrics {
    pub operations: IntCounterVec,
    pub up: IntGauge,
}

/// One Redis, as one configuration names it.
pub struct Redis {
    /// What it was built from: a reload that keeps it keeps the connection.
    pub settings: crate::config::Shared,
    client: Mutex<redis::Client>,
    base: redis::ConnectionInfo,
    password: Option<Arc<Watched<String>>>,
    ca_pem: Option<Vec<u8>>,
    conn: Mutex<Option<MultiplexedConnection>>,
    connecting: AtomicBool,
    failures: AtomicU32,
    skip_until: Mutex<Option<Instant>>,
    pub keys: Arc<Watched<Keys>>,
    metrics: SharedMetrics,
    /// Background writes in flight (see [`entries::MAX_WRITES`]).
    writes: Arc<tokio::sync::Semaphore>,
    /// This replica's name in the heartbeat set (random), and the replicas last seen there.
    instance: String,
    replicas: AtomicU32,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL's user or anything of the password.
        f.debug_struct("Redis")
            .field("prefix", &self.settings.key_prefix)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Reads the password and key files now (and follows them); connects in the background.
    pub fn from_config(
        config: &Config,
        shared: &crate::config::Shared,
        metrics: SharedMetrics,
    ) -> Result<Arc<Redis>, ConfigError> {
        let base: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(shared.url.trim()).map_err(|e| {
                config.err(
                    "shared.url",
                    format!("not a Redis URL ({})", e.kind_label()),
                )
            })?;
        let password = if let Some(var) = &shared.password_env {
            let value = std::env::var(var).map_err(|_| {
                config.err(
                    "shared.password_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            Some(Watched::fixed(value.trim().to_string()))
        } else if let Some(file) = &shared.password_file {
            let path = config.resolve(file);
            Some(
                Watched::file(&path, |raw| {
                    let text = std::str::from_utf8(raw)
                        .map_err(|_| "the password is not UTF-8".to_string())?
                        .trim();
                    if text.is_empty() {
                        return Err("the password file is empty".to_string());
                    }
                    Ok(text.to_string())
                })
                .map_err(|m| config.err("shared.password_file", m))?,
            )
        } else {
            None
        };
        let key_file = shared
            .encryption_key_file
            .as_ref()
            .ok_or_else(|| config.err("shared.encryption_key_file", "is required"))?;
        let keys = Watched::file(&config.resolve(key_file), Keys::parse)
            .map_err(|m| config.err("shared.encryption_key_file", m))?;
        let ca_pem = match &config.upstream.ca_file {
            Some(f) if shared.url.trim().starts_with("rediss://") => Some(
                std::fs::read(config.resolve(f))
                    .map_err(|e| config.err("upstream.ca_file", format!("cannot read: {e}")))?,
            ),
            _ => None,
        };
        let client = build_client(&base, password.as_ref(), ca_pem.as_deref())
            .map_err(|m| config.err("shared.url", m))?;
        metrics.up.set(0);
        let redis = Arc::new(Redis {
            settings: shared.clone(),
            client: Mutex::new(client),
            base,
            password,
            ca_pem,
            conn: Mutex::new(None),
            connecting: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            skip_until: Mutex::new(None),
            keys,
            metrics,
            writes: Arc::new(tokio::sync::Semaphore::new(entries::MAX_WRITES)),
            instance: instance_id(),
            replicas: AtomicU32::new(1),
        });
        redis.reconnect();
        Ok(redis)
    }

    /// The full Redis key for `suffix`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.settings.key_prefix)
    }

    /// Whether the last operation (or connect) worked.
    pub fn is_up(&self) -> bool {
        self.metrics.up.get() == 1
    }

    /// Runs one command under `timeout`; `None` when Redis failed, timed out or is skipped.
    pub async fn run<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        op: Op,
        cmd: &redis::Cmd,
    ) -> Option<T> {
        let mut conn = self.ready(op)?;
        let result = tokio::time::timeout(self.settings.timeout, cmd.query_async::<T>(&mut conn));
        self.settle(op, result.await)
    }

    /// Runs a Lua script under `timeout` (EVALSHA, loading it when Redis lacks it).
    pub async fn run_script<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        op: Op,
        script: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.ready(op)?;
        let result =
            tokio::time::timeout(self.settings.timeout, script.invoke_async::<T>(&mut conn));
        self.settle(op, result.await)
    }

    /// A connection to run `op` on, unless Redis is skipped now or not connected (a connect
    /// is then started in the background and the operation counts as failed).
    fn ready(self: &Arc<Self>, op: Op) -> Option<MultiplexedConnection> {
        if self.skipping() {
            return None;
        }
        let conn = self.connection();
        if conn.is_none() {
            self.failed(op, "error");
        }
        conn
    }

    /// Counts how an operation went; a broken connection is dropped for a new one.
    fn settle<T>(
        &self,
        op: Op,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        match result {
            Ok(Ok(value)) => {
                self.succeeded(op);
                Some(value)
            }
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.drop_connection();
                }
                self.failed(op, "error");
                None
            }
            Err(_) => {
                self.failed(op, "timeout");
                None
            }
        }
    }

    /// The redis-rs client as of now (with the current password), for a connection of its own.
    pub fn client(&self) -> redis::Client {
        lock(&self.client).clone()
    }

    /// Counts a value that did not open.
    pub fn rejected(&self, op: Op) {
        self.count(op, "rejected");
    }

    fn count(&self, op: Op, result: &str) {
        self.metrics
            .operations
            .with_label_values(&[op.label(), result])
            .inc();
    }

    fn succeeded(&self, op: Op) {
        self.failures.store(0, Ordering::Relaxed);
        self.metrics.up.set(1);
        self.count(op, "ok");
    }

    fn failed(&self, op: Op, result: &str) {
        self.count(op, result);
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= FAILURES_TO_SKIP {
            self.metrics.up.set(0);
            *lock(&self.skip_until) = Some(Instant::now() + SKIP_FOR);
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    fn skipping(&self) -> bool {
        let mut skip = lock(&self.skip_until);
        match *skip {
            Some(until) if until > Instant::now() => true,
            Some(_) => {
                // The window is over: the next operation probes.
                *skip = None;
                false
            }
            None => false,
        }
    }

    fn connection(self: &Arc<Self>) -> Option<MultiplexedConnection> {
        let conn = lock(&self.conn).clone();
        if conn.is_none() {
            self.reconnect();
        }
        conn
    }

    fn drop_connection(&self) {
        *lock(&self.conn) = None;
    }

    /// Starts a connect in the background unless one is under way.
    fn reconnect(self: &Arc<Self>) {
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The password may have changed since the client was built.
            if let Some(password) = &me.password {
                if let Ok(client) = build_client(&me.base, Some(password), me.ca_pem.as_deref()) {
                    *lock(&me.client) = client;
                }
            }
            let client = lock(&me.client).clone();
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(None);
            match tokio::time::timeout(
                CONNECT_TIMEOUT,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await
            {
                Ok(Ok(conn)) => {
                    *lock(&me.conn) = Some(conn);
                    me.failures.store(0, Ordering::Relaxed);
                    me.metrics.up.set(1);
                }
                Ok(Err(e)) => {
                    me.metrics.up.set(0);
                    tracing::warn!(error = %e.kind_label(), "cannot connect to the shared Redis");
                }
                Err(_) => {
                    me.metrics.up.set(0);
                    tracing::warn!("cannot connect to the shared Redis: timed out");
                }
            }
            me.connecting.store(false, Ordering::Release);
        });
    }
}

/// A random name for this replica.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A redis-rs client for `base` with the current password and, for `rediss://`, the CA.
fn build_client(
    base: &redis::ConnectionInfo,
    password: Option<&Arc<Watched<String>>>,
    ca_pem: Option<&[u8]>,
) -> Result<redis::Client, String> {
    let mut info = base.clone();
    if let Some(password) = password {
        let settings = info
            .redis_settings()
            .clone()
            .set_password(password.get().as_str());
        info = info.set_redis_settings(settings);
    }
    let result = match ca_pem {
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => redis::Client::open(info),
    };
    result.map_err(|e| format!("cannot use it ({})", e.kind_label()))
}

/// A short, secret-free name of a redis-rs error.
trait KindLabel {
    fn kind_label(&self) -> String;
}

impl KindLabel for redis::RedisError {
    fn kind_label(&self) -> String {
        format!("{:?}", self.kind())
    }
}
