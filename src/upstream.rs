//! The Convocore side: the regions with their tokens and connection pools (HTTP/1.1, and
//! HTTP/2 by ALPN over rustls; see [`pool`]), routing and discovery of an agent's region, and
//! one exchange per export ([`client`]). Between [`Upstream::fetch`] and the client sits each
//! region's traffic control ([`crate::traffic`]): pause and breaker, fair queue, retries.

pub mod client;
pub mod pool;
pub mod region;
pub mod routing;
pub mod wanted;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, CONTENT_DISPOSITION, CONTENT_TYPE, ETAG, LAST_MODIFIED,
};
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tracing::Instrument;

use crate::clock::UnixMillis;
use crate::config::{Config, ConfigError};
use crate::domain::Export;
use crate::metrics::{Resolved, UpstreamFailure};
use crate::traffic::{gate, queue, retry, Traffic};

pub use self::pool::{Connector, Origins, SharedError};
pub use self::region::{RegionId, Regions};
use self::routing::{Learned, Route, Router};
pub use self::wanted::{Sent, Waiters, Wanted};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Response headers passed from Convocore to the caller; nothing else is.
pub static PASSED_HEADERS: [HeaderName; 4] =
    [CONTENT_TYPE, CONTENT_DISPOSITION, ETAG, LAST_MODIFIED];

/// The [`PASSED_HEADERS`] of one response, compact because every cached entry holds one: the
/// values are slices of a single buffer of their own (a parsed value is a slice of the
/// connection's read buffer, which a cached entry must not keep alive), in a fixed array
/// instead of a `HeaderMap`'s two tables.
#[derive(Debug, Clone, Default)]
pub struct Passed([Option<HeaderValue>; 4]);

impl Passed {
    /// Copies the passed headers out of an upstream response's headers (the first value of each).
    pub fn copy_from(headers: &HeaderMap) -> Passed {
        let found = PASSED_HEADERS.each_ref().map(|name| headers.get(name));
        let mut buffer = Vec::with_capacity(found.iter().flatten().map(|v| v.len()).sum());
        for v in found.iter().flatten() {
            buffer.extend_from_slice(v.as_bytes());
        }
        let buffer = Bytes::from(buffer);
        let mut at = 0;
        Passed(found.map(|v| {
            let v = v?;
            let slice = buffer.slice(at..at + v.len());
            at += v.len();
            HeaderValue::from_maybe_shared(slice).ok()
        }))
    }

    pub fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        let i = PASSED_HEADERS.iter().position(|n| n == name)?;
        self.0[i].as_ref()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        PASSED_HEADERS
            .iter()
            .zip(&self.0)
            .filter_map(|(name, value)| Some((name, value.as_ref()?)))
    }

    /// These headers with `ETag` and `Last-Modified` replaced by `newer`'s where it has them
    /// (a `304`'s validators update the stored response's, RFC 9111 §4.3.4).
    pub fn updated_by(&self, newer: &Passed) -> Passed {
        let mut next = self.clone();
        for name in [&ETAG, &LAST_MODIFIED] {
            if let (Some(i), Some(value)) = (
                PASSED_HEADERS.iter().position(|n| n == name),
                newer.get(name),
            ) {
                next.0[i] = Some(value.clone());
            }
        }
        next
    }

    /// Bytes of the values (the names are static).
    pub fn value_bytes(&self) -> usize {
        self.0.iter().flatten().map(HeaderValue::len).sum()
    }
}

/// A failed exchange; cheap to clone, so one failure can answer every coalesced waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Unreachable(#[source] SharedError),
    #[error("timed out")]
    Timeout,
    #[error("response body over max_response_bytes")]
    TooLarge,
    #[error("protocol: {0}")]
    Protocol(#[source] SharedError),
    /// Not sent: every caller of the fetch had gone before a connection was free.
    #[error("not sent: every caller had gone")]
    Abandoned,
    /// The connection closed before a response came.
    #[error("connection closed before a response: {0}")]
    Closed(#[source] SharedError),
    /// Not sent: the region is paused by Convocore's `429` for this much longer.
    #[error("not sent: the region is paused by Convocore's 429")]
    Paused(Duration),
    /// Not sent: the region's breaker is open for this much longer.
    #[error("not sent: the region's breaker is open")]
    BreakerOpen(Duration),
    /// Not sent: the region's queue was full.
    #[error("not sent: the region's queue is full")]
    QueueFull,
    /// Not sent: no upstream slot came free within `queue_timeout`.
    #[error("not sent: no upstream slot within queue_timeout")]
    QueueTimeout,
}

impl UpstreamError {
    /// The `status` label of `convocore_gateway_upstream_requests_total` for a failed exchange.
    pub fn failure(&self) -> UpstreamFailure {
        match self {
            UpstreamError::Timeout => UpstreamFailure::Timeout,
            _ => UpstreamFailure::Error,
        }
    }

    /// Whether nothing went to Convocore (the gateway held it back).
    pub fn not_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Abandoned
                | UpstreamError::Paused(_)
                | UpstreamError::BreakerOpen(_)
                | UpstreamError::QueueFull
                | UpstreamError::QueueTimeout
        )
    }

    /// The status a stale answer names as `fwd-status`: a paused region stands for its 429.
    pub fn fwd_status(&self) -> Option<u16> {
        match self {
            UpstreamError::Paused(_) => Some(429),
            _ => None,
        }
    }
}

/// Why an export could not be had: Convocore failed, or the gateway itself did.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Fault {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// A fault, with the region it happened in (by name: it may reach a request of another
/// configuration through a shared fetch).
#[derive(Debug, Clone)]
pub struct Failed {
    pub region: Option<HeaderValue>,
    pub fault: Fault,
}

/// What Convocore answered.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: StatusCode,
    /// Only [`PASSED_HEADERS`].
    pub headers: Passed,
    pub body: Bytes,
    /// False when Convocore said `Cache-Control: no-store` or `private`.
    pub storable: bool,
    /// Time spent upstream (all discovery attempts included).
    pub elapsed: Duration,
    /// When the response arrived, on the wall clock: the cache's age counts from here.
    pub received: UnixMillis,
    /// The name of the region that answered (also its `X-Convocore-Region` value).
    pub region: HeaderValue,
    /// Convocore's `Retry-After`, as a delay from when it came.
    pub retry_after: Option<Duration>,
    /// Read from the shared Redis (another replica fetched it), not from Convocore.
    pub from_shared: bool,
    /// The body's encodings made so far (`[cache] compress`), kept with the entry.
    pub encoded: crate::compress::Encoded,
}

impl Fetched {
    /// This stored entry made fresh again by an upstream `304 Not Modified`: the same status,
    /// body and headers, with the `304`'s validators where it sent them, its store time, region
    /// and timing. Storable only if both said so.
    pub fn renewed(&self, not_modified: &Fetched) -> Fetched {
        Fetched {
            status: self.status,
            headers: self.headers.updated_by(&not_modified.headers),
            body: self.body.clone(),
            storable: self.storable && not_modified.storable,
            elapsed: not_modified.elapsed,
            received: not_modified.received,
            region: not_modified.region.clone(),
            retry_after: None,
            from_shared: false,
            // The same body: its encodings still hold.
            encoded: self.encoded.clone(),
        }
    }
}

/// What a conditional upstream request sends to revalidate a stored entry: its `ETag` (as
/// `If-None-Match`) and `Last-Modified` (as `If-Modified-Since`).
#[derive(Debug, Clone)]
pub struct Validators {
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
}

impl Validators {
    /// The validators of a stored `200`, if it has any.
    pub fn of(entry: &Fetched) -> Option<Validators> {
        let etag = entry.headers.get(&ETAG).cloned();
        let last_modified = entry.headers.get(&LAST_MODIFIED).cloned();
        (entry.status == StatusCode::OK && (etag.is_some() || last_modified.is_some())).then_some(
            Validators {
                etag,
                last_modified,
            },
        )
    }
}

/// Whether a failed exchange is tried again: Convocore cannot have acted on it (no
/// connection, or closed before a response) or said it may be (`502`/`503`/`504` without
/// `Retry-After`). Never a `429`, never a `503` with `Retry-After`.
fn retryable(result: &Result<Fetched, UpstreamError>) -> bool {
    match result {
        Err(UpstreamError::Unreachable(_) | UpstreamError::Closed(_)) => true,
        Ok(f) => {
            matches!(
                f.status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ) && f.retry_after.is_none()
        }
        Err(_) => false,
    }
}

impl From<gate::Closed> for UpstreamError {
    fn from(closed: gate::Closed) -> UpstreamError {
        match closed {
            gate::Closed::Paused(left) => UpstreamError::Paused(left),
            gate::Closed::Open(left) => UpstreamError::BreakerOpen(left),
        }
    }
}

/// One fetch's particulars, as they travel down to the client: the export, the request id
/// sent with it, whether anyone still wants it, and the metrics that count its exchanges.
pub struct Ask<'a> {
    pub metrics: &'a Resolved,
    pub export: &'a Export,
    pub request_id: &'a HeaderValue,
    pub wanted: &'a Wanted,
    /// The team the exchange is charged to (the caller that leads the fetch), and its weight
    /// in the regions' fair queues.
    pub team: &'a str,
    pub weight: u32,
    /// The shared Redis, with `[shared]`: a `429`'s pause is published to every replica.
    pub shared: Option<&'a Arc<crate::shared::Redis>>,
    /// Revalidating a stored entry: its validators, sent as the request's conditions.
    pub validators: Option<&'a Validators>,
}

/// One configuration's upstream side: its regions and routing, and the exchange limits.
pub struct Upstream {
    pub regions: Regions,
    pub router: Router,
    limits: client::Limits,
    learned: Arc<Learned>,
}

impl Upstream {
    /// Reads the token files now; the pools come from `origins`, so a reload that keeps a
    /// region keeps its connections.
    pub fn from_config(
        config: &Config,
        origins: &Origins,
        connector: &Connector,
        traffic: &Traffic,
        learned: Arc<Learned>,
    ) -> Result<Upstream, ConfigError> {
        let regions = Regions::from_config(config, origins, connector, traffic)?;
        Ok(Upstream {
            router: Router::new(config, &regions),
            regions,
            limits: client::Limits {
                request_timeout: config.upstream.request_timeout,
                max_response_bytes: config.upstream.max_response_bytes,
                retries: config.upstream.retries,
            },
            learned,
        })
    }

    /// Fetches an export from its agent's region; an agent of unknown region is discovered.
    /// Nothing is sent once `wanted` says every caller has gone.
    pub async fn fetch(&self, ask: &Ask<'_>) -> Result<Fetched, Failed> {
        match self
            .router
            .route(&ask.export.agent, &self.learned, &self.regions)
            .await
        {
            Route::Region(region) => self.fetch_from(ask, region).await,
            Route::Discover => {
                // Another replica may have discovered it already.
                if let Some(region) = self.shared_region(ask).await {
                    return self.fetch_from(ask, region).await;
                }
                // The one fetch path that logs: its lines carry the request id through this
                // span (a span costs ~1 µs, too much for every miss). Boxed: rare, and it
                // would make every request's future larger.
                let request_id = ask.request_id.to_str().unwrap_or("-");
                let span = tracing::info_span!("request", request_id);
                Box::pin(self.discover(ask).instrument(span)).await
            }
        }
    }

    /// The region another replica discovered for the agent (with `[shared]`), learned here too.
    async fn shared_region(&self, ask: &Ask<'_>) -> Option<RegionId> {
        let redis = ask.shared?;
        let name = redis.agent_region(&ask.export.agent).await?;
        let id = self.regions.by_name(name.as_bytes())?;
        let header = self.regions.get(id)?.header.clone();
        self.learned.learn(&ask.export.agent, &header).await;
        Some(id)
    }

    /// One exchange with one region, through its traffic control: nothing is sent while the
    /// region is paused or its breaker open; the exchange waits for a slot in the region's
    /// fair queue; a failure Convocore cannot have acted on is tried again within the retry
    /// budget. Each attempt is counted in the upstream metrics.
    async fn fetch_from(&self, ask: &Ask<'_>, id: RegionId) -> Result<Fetched, Failed> {
        let Some(region) = self.regions.get(id) else {
            return Err(Failed {
                region: None,
                fault: Fault::Internal("a route named a region this configuration lacks"),
            });
        };
        let failed = |error: UpstreamError| Failed {
            region: Some(region.header.clone()),
            fault: Fault::Upstream(error),
        };
        let traffic = &region.traffic;
        // Closed regions answer at once: no queueing for a region nothing may be sent to.
        traffic.gate.peek().map_err(|c| failed(c.into()))?;
        let slot = traffic
            .queue
            .acquire(ask.team, ask.weight, ask.wanted.gone())
            .await;
        let (_permit, waited) = match slot {
            Ok(Some(slot)) => slot,
            Ok(None) => return Err(failed(UpstreamError::Abandoned)),
            Err(queue::Refused::Full) => return Err(failed(UpstreamError::QueueFull)),
            Err(queue::Refused::Timeout) => return Err(failed(UpstreamError::QueueTimeout)),
        };
        ask.wanted.sent.queued(waited);
        let deadline = crate::clock::deadline(self.limits.request_timeout);
        traffic.budget.attempt(Instant::now());
        let mut attempt = 0;
        loop {
            // Paused or opened while this one waited: still nothing is sent.
            let ticket = traffic.gate.admit().map_err(|c| failed(c.into()))?;
            // With [shared], the region's `rate` holds for the fleet: each start is reserved in
            // Redis (without it, this replica keeps to its share of the rate).
            if let (Some(rate), Some(redis)) = (traffic.queue.settings().rate, ask.shared) {
                match redis.reserve_start(&region.name, rate).await {
                    Some(wait) if crate::clock::deadline(wait) >= deadline => {
                        return Err(failed(UpstreamError::QueueTimeout));
                    }
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => {
                        traffic
                            .queue
                            .pace_at(rate.interval().saturating_mul(redis.replicas()))
                            .await
                    }
                }
            }
            let started = Instant::now();
            let result = client::exchange(&self.limits, region, ask, deadline).await;
            let outcome = match &result {
                Ok(f) if f.status == StatusCode::TOO_MANY_REQUESTS => {
                    gate::Outcome::RateLimited(f.retry_after.unwrap_or(gate::DEFAULT_PAUSE))
                }
                Ok(f) if f.status.is_server_error() && f.status != StatusCode::NOT_IMPLEMENTED => {
                    gate::Outcome::Failure
                }
                Ok(_) | Err(UpstreamError::TooLarge) => gate::Outcome::Success,
                Err(e) if e.not_sent() => gate::Outcome::NotSent,
                Err(_) => gate::Outcome::Failure,
            };
            if let (gate::Outcome::RateLimited(pause), Some(redis)) = (outcome, ask.shared) {
                redis.publish_pause(&region.name, pause).await;
            }
            ticket.report(outcome);
            if !matches!(&result, Err(e) if e.not_sent()) {
                let status = match &result {
                    Ok(f) => Ok(f.status),
                    Err(e) => Err(e.failure()),
                };
                ask.metrics.record_upstream(id, status, started.elapsed());
            }
            if attempt < self.limits.retries && retryable(&result) && ask.wanted.still() {
                let pause = retry::backoff();
                let now = Instant::now();
                if now + pause < deadline && traffic.budget.try_retry(now) {
                    attempt += 1;
                    traffic.retries.inc();
                    tokio::time::sleep(pause).await;
                    traffic.queue.pace().await;
                    continue;
                }
            }
            return result.map_err(failed);
        }
    }

    /// Asks the default region and on its 404 the others in turn, and remembers the region
    /// that had the agent. No region knowing the agent answers with the first 404.
    async fn discover(&self, ask: &Ask<'_>) -> Result<Fetched, Failed> {
        let mut first_404: Option<Fetched> = None;
        let mut elapsed = Duration::ZERO;
        for &id in self.router.discovery_order() {
            let mut fetched = self.fetch_from(ask, id).await?;
            elapsed += fetched.elapsed;
            fetched.elapsed = elapsed;
            if fetched.status == StatusCode::NOT_FOUND {
                first_404.get_or_insert(fetched);
                continue;
            }
            if fetched.status.is_success() {
                tracing::info!(agent = %ask.export.agent, region = self.regions.name(Some(id)), "discovered the agent's region");
                self.learned.learn(&ask.export.agent, &fetched.region).await;
                if let (Some(redis), Ok(name)) = (ask.shared, fetched.region.to_str()) {
                    redis.learn_agent_region(&ask.export.agent, name).await;
                }
            }
            return Ok(fetched);
        }
        let mut fetched = first_404.ok_or(Failed {
            region: None,
            fault: Fault::Internal("no region to discover the agent in"),
        })?;
        fetched.elapsed = elapsed;
        Ok(fetched)
    }
}
