//! The metrics' bounded label sets and histogram buckets: auth failure reasons, cache outcomes
//! (as slots of the per-configuration children), upstream failures.

use crate::domain::CacheStatus;

/// Request durations: cache hits take tens of microseconds, misses are bounded by the 30 s
/// default `request_timeout`; the buckets are dense below a millisecond and reach 30 s.
pub(super) const REQUEST_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upstream exchanges: a loopback or in-region round trip is a few ms, a large export seconds.
pub(super) const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Waits for an upstream slot: none at all, up to the 10 s default `queue_timeout` and past.
pub(super) const QUEUE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `reason` label of `auth_failures_total`: why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    Missing,
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    UnknownKey,
    Forbidden,
}

impl AuthReason {
    pub const ALL: [AuthReason; 9] = [
        AuthReason::Missing,
        AuthReason::Malformed,
        AuthReason::BadSignature,
        AuthReason::Expired,
        AuthReason::NotYetValid,
        AuthReason::Issuer,
        AuthReason::Audience,
        AuthReason::UnknownKey,
        AuthReason::Forbidden,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthReason::Missing => "missing",
            AuthReason::Malformed => "malformed",
            AuthReason::BadSignature => "bad_signature",
            AuthReason::Expired => "expired",
            AuthReason::NotYetValid => "not_yet_valid",
            AuthReason::Issuer => "issuer",
            AuthReason::Audience => "audience",
            AuthReason::UnknownKey => "unknown_key",
            AuthReason::Forbidden => "forbidden",
        }
    }
}

/// The `cache` label of the request metrics: a [`CacheStatus`], or `none` for a request that
/// never reached the cache.
pub(super) fn cache_slot(cache: Option<CacheStatus>) -> usize {
    match cache {
        Some(CacheStatus::Hit) => 0,
        Some(CacheStatus::Miss) => 1,
        Some(CacheStatus::Stale) => 2,
        Some(CacheStatus::Bypass) => 3,
        Some(CacheStatus::Revalidated) => 4,
        None => 5,
    }
}

pub(super) const CACHE_SLOTS: usize = 6;

pub(super) fn cache_label(slot: usize) -> &'static str {
    ["hit", "miss", "stale", "bypass", "revalidated", "none"][slot.min(CACHE_SLOTS - 1)]
}

/// The `status` label of an upstream exchange that got no HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Timeout,
    Error,
}

impl UpstreamFailure {
    pub fn label(self) -> &'static str {
        match self {
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Error => "error",
        }
    }
}

/// Upstream label slots per region: the status codes 100..=599, then the two failures.
pub(super) const UPSTREAM_SLOTS: usize = 500 + 2;
