//! Prometheus metrics: one registry owned by the app (never the crate's global), the
//! contract's metrics with their fixed names, and `render()` for `GET /metrics`.
//!
//! Every label value comes from a bounded set: regions from the config plus `none`, HTTP
//! status codes, the cache outcomes, configured teams plus `other`, the auth failure reasons.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::{CacheStatus, RegionId};

mod labels;
use self::labels::{
    cache_label, cache_slot, CACHE_SLOTS, QUEUE_BUCKETS, REQUEST_BUCKETS, UPSTREAM_BUCKETS,
    UPSTREAM_SLOTS,
};
pub use self::labels::{AuthReason, UpstreamFailure};

/// The registry and every metric: made once, kept across reloads. The children that depend on
/// one configuration's regions and teams are resolved by [`Metrics::resolve`] into a
/// [`Resolved`] that the policy of that configuration holds.
pub struct Metrics {
    registry: Registry,
    duration_children: Vec<Histogram>,
    auth_children: Vec<IntCounter>,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub team_requests: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub auth_failures: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub coalesced: IntCounter,
    pub inflight: IntGauge,
    pub jwks_fetches: IntCounterVec,
    pub jwks_last_success: Gauge,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: Gauge,
    pub rate_limited: IntCounterVec,
    pub upstream_queue_depth: IntGaugeVec,
    pub upstream_queue_wait: HistogramVec,
    pub upstream_retries: IntCounterVec,
    pub upstream_paused: IntGaugeVec,
    pub shared_operations: IntCounterVec,
    pub shared_up: IntGauge,
}

/// The children of one configuration's label sets, resolved up front or on first use, so that
/// counting a request indexes a table instead of hashing label strings under a lock.
pub struct Resolved {
    requests: IntCounterVec,
    team_requests: IntCounterVec,
    upstream_requests: IntCounterVec,
    duration_children: Vec<Histogram>,
    /// `requests_total` children by (region or none, status 100..=599, cache), made on first
    /// use.
    request_children: Vec<OnceLock<IntCounter>>,
    /// The configured regions, then `none`.
    region_labels: Vec<String>,
    /// `team_requests_total` children of the configured teams and `other`.
    team_children: HashMap<String, IntCounter>,
    /// `rate_limited_total` children, likewise.
    rate_limited: IntCounterVec,
    rate_limited_children: HashMap<String, IntCounter>,
    /// `upstream_requests_total` children by (region, status 100..=599 or an
    /// [`UpstreamFailure`]), made on first use, and `upstream_duration_seconds` by region.
    upstream_children: Vec<OnceLock<IntCounter>>,
    upstream_duration_children: Vec<Histogram>,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_requests_total",
                "Export API requests by region, HTTP status and cache outcome.",
            ),
            &["region", "status", "cache"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "convocore_gateway_request_duration_seconds",
                "Time from request to response, by cache outcome.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["cache"],
        )?;
        let team_requests = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_team_requests_total",
                "Authenticated export requests by team (configured teams; other for the rest).",
            ),
            &["team"],
        )?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_upstream_requests_total",
                "Requests sent to Convocore by region and HTTP status (or error, timeout).",
            ),
            &["region", "status"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "convocore_gateway_upstream_duration_seconds",
                "Duration of Convocore exchanges, body included, by region.",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["region"],
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_auth_failures_total",
                "Refused callers by reason.",
            ),
            &["reason"],
        )?;
        let cache_entries = IntGauge::new(
            "convocore_gateway_cache_entries",
            "Entries in the export cache.",
        )?;
        let cache_bytes = IntGauge::new(
            "convocore_gateway_cache_bytes",
            "Weighted bytes in the export cache (bodies plus per-entry overhead).",
        )?;
        let coalesced = IntCounter::new(
            "convocore_gateway_coalesced_requests_total",
            "Requests that waited for another request's upstream fetch instead of making their own.",
        )?;
        let inflight = IntGauge::new(
            "convocore_gateway_inflight_requests",
            "Export API requests being handled now.",
        )?;
        let jwks_fetches = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_jwks_fetches_total",
                "JWKS fetches by result.",
            ),
            &["result"],
        )?;
        let jwks_last_success = Gauge::new(
            "convocore_gateway_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful JWKS fetch (0 if none).",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "convocore_gateway_build_info",
                "Build information; always 1.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_config_reloads_total",
                "Configuration reloads (SIGHUP or a changed file) by result.",
            ),
            &["result"],
        )?;
        let config_last_reload_success = Gauge::new(
            "convocore_gateway_config_last_reload_success_timestamp_seconds",
            "Unix time the configuration in force was loaded (at start or by a reload).",
        )?;

        let rate_limited = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_rate_limited_total",
                "Requests refused with 429 because their team was over its rate, by team.",
            ),
            &["team"],
        )?;
        let upstream_queue_depth = IntGaugeVec::new(
            Opts::new(
                "convocore_gateway_upstream_queue_depth",
                "Requests waiting for an upstream slot, by region.",
            ),
            &["region"],
        )?;
        let upstream_queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "convocore_gateway_upstream_queue_wait_seconds",
                "Time requests waited for an upstream slot, by region.",
            )
            .buckets(QUEUE_BUCKETS.to_vec()),
            &["region"],
        )?;
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_upstream_retries_total",
                "Upstream exchanges tried again, by region.",
            ),
            &["region"],
        )?;
        let upstream_paused = IntGaugeVec::new(
            Opts::new(
                "convocore_gateway_upstream_paused",
                "1 while nothing is sent to a region: paused by a 429 (rate_limited) or its breaker open (breaker).",
            ),
            &["region", "reason"],
        )?;

        let shared_operations = IntCounterVec::new(
            Opts::new(
                "convocore_gateway_shared_operations_total",
                "Operations on the shared Redis by op and result (rejected: a value that did not open).",
            ),
            &["op", "result"],
        )?;
        let shared_up = IntGauge::new(
            "convocore_gateway_shared_up",
            "1 while the shared Redis answers (0 without [shared], or while it fails or is skipped).",
        )?;

        // Children that exist from the start, so dashboards and alerts see zeros, not gaps.
        for reason in AuthReason::ALL {
            auth_failures.with_label_values(&[reason.label()]);
        }
        for result in ["ok", "error"] {
            jwks_fetches.with_label_values(&[result]);
            config_reloads.with_label_values(&[result]);
        }

        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(team_requests.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(jwks_fetches.clone()))?;
        registry.register(Box::new(jwks_last_success.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_last_reload_success.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(upstream_queue_depth.clone()))?;
        registry.register(Box::new(upstream_queue_wait.clone()))?;
        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(upstream_paused.clone()))?;
        registry.register(Box::new(shared_operations.clone()))?;
        registry.register(Box::new(shared_up.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let duration_children = (0..CACHE_SLOTS)
            .map(|c| request_duration.with_label_values(&[cache_label(c)]))
            .collect();
        let auth_children = AuthReason::ALL
            .iter()
            .map(|r| auth_failures.with_label_values(&[r.label()]))
            .collect();
        Ok(Metrics {
            registry,
            duration_children,
            auth_children,
            requests,
            request_duration,
            team_requests,
            upstream_requests,
            upstream_duration,
            auth_failures,
            cache_entries,
            cache_bytes,
            coalesced,
            inflight,
            jwks_fetches,
            jwks_last_success,
            config_reloads,
            config_last_reload_success,
            rate_limited,
            upstream_queue_depth,
            upstream_queue_wait,
            upstream_retries,
            upstream_paused,
            shared_operations,
            shared_up,
        })
    }

    /// The children for one configuration: `regions` and `teams` (plus `other`) are its
    /// bounded label sets.
    pub fn resolve(&self, regions: &[&str], teams: &[&str]) -> Resolved {
        let mut region_labels: Vec<String> = regions.iter().map(|r| r.to_string()).collect();
        region_labels.push("none".to_string());
        let slots = region_labels.len() * 500 * CACHE_SLOTS;
        Resolved {
            requests: self.requests.clone(),
            team_requests: self.team_requests.clone(),
            upstream_requests: self.upstream_requests.clone(),
            duration_children: self.duration_children.clone(),
            request_children: (0..slots).map(|_| OnceLock::new()).collect(),
            team_children: teams
                .iter()
                .chain(std::iter::once(&"other"))
                .map(|t| (t.to_string(), self.team_requests.with_label_values(&[t])))
                .collect(),
            rate_limited: self.rate_limited.clone(),
            rate_limited_children: teams
                .iter()
                .chain(std::iter::once(&"other"))
                .map(|t| (t.to_string(), self.rate_limited.with_label_values(&[t])))
                .collect(),
            upstream_children: (0..regions.len() * UPSTREAM_SLOTS)
                .map(|_| OnceLock::new())
                .collect(),
            upstream_duration_children: regions
                .iter()
                .map(|region| self.upstream_duration.with_label_values(&[region]))
                .collect(),
            region_labels,
        }
    }

    /// Counts a refused caller.
    pub fn auth_failure(&self, reason: AuthReason) {
        match self.auth_children.get(reason as usize) {
            Some(counter) => counter.inc(),
            None => self
                .auth_failures
                .with_label_values(&[reason.label()])
                .inc(),
        }
    }

    /// Counts a configuration reload, and stamps the time of a successful one.
    pub fn config_loaded(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        if ok {
            self.config_last_reload_success.set(unix_now());
        }
    }

    /// The shared store's metrics.
    pub fn shared(&self) -> crate::shared::SharedMetrics {
        crate::shared::SharedMetrics {
            operations: self.shared_operations.clone(),
            up: self.shared_up.clone(),
        }
    }

    /// The JWKS fetch metrics, for the key sources.
    pub fn jwks(&self) -> JwksMetrics {
        JwksMetrics {
            fetches: self.jwks_fetches.clone(),
            last_success: self.jwks_last_success.clone(),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Resolved {
    /// Counts a request refused by its team's bucket (`team`: its metric label).
    pub fn rate_limited(&self, team: &str) {
        match self.rate_limited_children.get(team) {
            Some(counter) => counter.inc(),
            None => self.rate_limited.with_label_values(&[team]).inc(),
        }
    }

    /// Counts one finished request: `requests_total`, its duration, and its team.
    pub fn record_request(
        &self,
        region: Option<RegionId>,
        status: http::StatusCode,
        cache: Option<CacheStatus>,
        elapsed: Duration,
        team: Option<&str>,
    ) {
        let region = region
            .map(RegionId::index)
            .filter(|r| *r + 1 < self.region_labels.len())
            .unwrap_or(self.region_labels.len() - 1);
        let cache = cache_slot(cache);
        let code = usize::from(status.as_u16().clamp(100, 599) - 100);
        let slot = (region * 500 + code) * CACHE_SLOTS + cache;
        match self.request_children.get(slot) {
            Some(cell) => cell
                .get_or_init(|| {
                    self.requests.with_label_values(&[
                        &self.region_labels[region],
                        status.as_str(),
                        cache_label(cache),
                    ])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[
                    &self.region_labels[region],
                    status.as_str(),
                    cache_label(cache),
                ])
                .inc(),
        }
        self.duration_children[cache].observe(elapsed.as_secs_f64());
        if let Some(team) = team {
            match self.team_children.get(team) {
                Some(counter) => counter.inc(),
                None => self.team_requests.with_label_values(&[team]).inc(),
            }
        }
    }

    /// Counts one exchange with a region: its HTTP status, or the failure when there was none.
    pub fn record_upstream(
        &self,
        region: RegionId,
        status: Result<http::StatusCode, UpstreamFailure>,
        elapsed: Duration,
    ) {
        let region = region.index();
        let Some(name) = self
            .region_labels
            .get(region)
            .filter(|_| region + 1 < self.region_labels.len())
        else {
            return;
        };
        let (offset, label) = match &status {
            Ok(code) => (
                usize::from(code.as_u16().clamp(100, 599) - 100),
                code.as_str(),
            ),
            Err(failure) => (500 + *failure as usize, failure.label()),
        };
        let child = || {
            self.upstream_requests
                .with_label_values(&[name.as_str(), label])
        };
        match region
            .checked_mul(UPSTREAM_SLOTS)
            .and_then(|base| base.checked_add(offset))
            .and_then(|slot| self.upstream_children.get(slot))
        {
            Some(cell) => cell.get_or_init(child).inc(),
            None => child().inc(),
        }
        if let Some(histogram) = self.upstream_duration_children.get(region) {
            histogram.observe(elapsed.as_secs_f64());
        }
    }
}

/// The JWKS metrics, shared by every URL.
#[derive(Clone)]
pub struct JwksMetrics {
    pub fetches: IntCounterVec,
    pub last_success: Gauge,
}

/// Decrements the in-flight gauge when the request ends, however it ends.
pub struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    pub fn start(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn upstream_exchanges_are_counted_by_region_and_status() {
        let metrics = Metrics::new().unwrap();
        let m = metrics.resolve(&["eu", "na"], &[]);
        let ms = Duration::from_millis(3);
        let (eu, na) = (RegionId::new(0), RegionId::new(1));
        m.record_upstream(eu, Ok(http::StatusCode::OK), ms);
        m.record_upstream(eu, Ok(http::StatusCode::OK), ms);
        m.record_upstream(na, Ok(http::StatusCode::NOT_FOUND), ms);
        m.record_upstream(na, Err(UpstreamFailure::Timeout), ms);
        m.record_upstream(eu, Err(UpstreamFailure::Error), ms);
        // An index outside the configured regions is not a label value.
        m.record_upstream(RegionId::new(2), Ok(http::StatusCode::OK), ms);
        let m = metrics;
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"convocore_gateway_upstream_requests_total{region="eu",status="200"} 2"#,
            r#"convocore_gateway_upstream_requests_total{region="na",status="404"} 1"#,
            r#"convocore_gateway_upstream_requests_total{region="na",status="timeout"} 1"#,
            r#"convocore_gateway_upstream_requests_total{region="eu",status="error"} 1"#,
            r#"convocore_gateway_upstream_duration_seconds_count{region="eu"} 3"#,
            r#"convocore_gateway_upstream_duration_seconds_count{region="na"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"region="none",status="200""#), "{text}");
        let total: usize = text
            .lines()
            .filter(|l| l.starts_with("convocore_gateway_upstream_requests_total{"))
            .count();
        assert_eq!(total, 4, "{text}");
    }
}
