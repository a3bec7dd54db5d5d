//! `[upstream]` and `[regions.*]`: how Convocore is reached, with which token, within which
//! limits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::limits::Rate;
use super::{size, Config, ConfigError};

/// The most exchanges in flight, and the longest queue, a region may be given.
const MAX_CONCURRENCY: usize = 10_000;
const MAX_QUEUE: usize = 1_000_000;
const MAX_RETRIES: u32 = 5;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(deserialize_with = "size")]
    pub max_response_bytes: u64,
    pub ca_file: Option<PathBuf>,
    /// Per region: exchanges in flight at once; more wait in the region's fair queue.
    pub max_concurrency: usize,
    /// Per region: exchanges started per second or minute; absent, no cap.
    pub rate: Option<Rate>,
    /// Per region: requests waiting for a slot; beyond, 503.
    pub max_queue: usize,
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Extra attempts for an exchange that failed before Convocore could process it.
    pub retries: u32,
    pub breaker: Breaker,
}

/// `[upstream.breaker]`, per region.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Breaker {
    pub failure_ratio: f64,
    pub window: usize,
    pub min_exchanges: usize,
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            failure_ratio: 0.5,
            window: 20,
            min_exchanges: 10,
            open_for: Duration::from_secs(5),
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            token_env: None,
            token_file: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            max_response_bytes: 32 << 20,
            ca_file: None,
            max_concurrency: 32,
            rate: None,
            max_queue: 1000,
            queue_timeout: Duration::from_secs(10),
            retries: 1,
            breaker: Breaker::default(),
        }
    }
}

impl Upstream {
    /// Whether a shared token source is set (regions may still override it).
    pub fn has_token(&self) -> bool {
        self.token_env.is_some() || self.token_file.is_some()
    }

    pub(super) fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() {
            return Err(c.err("upstream.connect_timeout", "must be greater than 0"));
        }
        if self.request_timeout.is_zero() {
            return Err(c.err("upstream.request_timeout", "must be greater than 0"));
        }
        if self.max_response_bytes == 0 {
            return Err(c.err("upstream.max_response_bytes", "must be greater than 0"));
        }
        if self.token_env.is_some() && self.token_file.is_some() {
            return Err(c.err(
                "upstream.token_env",
                "set token_env or token_file, not both",
            ));
        }
        check_slots(
            "upstream",
            Some(self.max_concurrency),
            Some(self.max_queue),
            Some(self.queue_timeout),
            c,
        )?;
        if self.retries > MAX_RETRIES {
            return Err(c.err("upstream.retries", format!("must be at most {MAX_RETRIES}")));
        }
        let b = &self.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            return Err(c.err(
                "upstream.breaker.failure_ratio",
                "must be above 0 and at most 1",
            ));
        }
        if b.window == 0 || b.window > 10_000 {
            return Err(c.err("upstream.breaker.window", "must be 1 to 10000"));
        }
        if b.min_exchanges == 0 || b.min_exchanges > b.window {
            return Err(c.err(
                "upstream.breaker.min_exchanges",
                "must be at least 1 and at most window",
            ));
        }
        if b.open_for.is_zero() || b.open_for > Duration::from_secs(3600) {
            return Err(c.err(
                "upstream.breaker.open_for",
                "must be above 0 and at most 1h",
            ));
        }
        Ok(())
    }
}

/// The slot settings shared by `[upstream]` and a region's overrides.
fn check_slots(
    at: &str,
    max_concurrency: Option<usize>,
    max_queue: Option<usize>,
    queue_timeout: Option<Duration>,
    c: &Config,
) -> Result<(), ConfigError> {
    if max_concurrency.is_some_and(|n| n == 0 || n > MAX_CONCURRENCY) {
        return Err(c.err(
            format!("{at}.max_concurrency"),
            format!("must be 1 to {MAX_CONCURRENCY}"),
        ));
    }
    if max_queue.is_some_and(|n| n > MAX_QUEUE) {
        return Err(c.err(
            format!("{at}.max_queue"),
            format!("must be at most {MAX_QUEUE}"),
        ));
    }
    if queue_timeout.is_some_and(|t| t.is_zero() || t > Duration::from_secs(3600)) {
        return Err(c.err(
            format!("{at}.queue_timeout"),
            "must be above 0 and at most 1h",
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub base_url: String,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Overrides of `[upstream]`'s slot settings for this region.
    pub max_concurrency: Option<usize>,
    pub rate: Option<Rate>,
    pub max_queue: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
}

pub(super) fn default_regions() -> BTreeMap<String, Region> {
    let region = |url: &str| Region {
        base_url: url.to_string(),
        token_env: None,
        token_file: None,
        max_concurrency: None,
        rate: None,
        max_queue: None,
        queue_timeout: None,
    };
    BTreeMap::from([
        (
            "eu".to_string(),
            region("https://eu-gcp-api.vg-stuff.com/v3"),
        ),
        (
            "na".to_string(),
            region("https://na-gcp-api.vg-stuff.com/v3"),
        ),
    ])
}

/// `[regions.*]`: names, base URLs, and a token source for each (its own or the shared one).
pub(super) fn validate_regions(c: &Config) -> Result<(), ConfigError> {
    if c.regions.is_empty() {
        return Err(c.err("regions", "at least one region is required"));
    }
    for (name, region) in &c.regions {
        let key = format!("regions.{name}");
        if name.is_empty()
            || name.len() > 32
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(c.err(key, "region names are 1 to 32 characters of a-z 0-9 -"));
        }
        check_base_url(&region.base_url).map_err(|m| c.err(format!("{key}.base_url"), m))?;
        if region.token_env.is_some() && region.token_file.is_some() {
            return Err(c.err(
                format!("{key}.token_env"),
                "set token_env or token_file, not both",
            ));
        }
        check_slots(
            &key,
            region.max_concurrency,
            region.max_queue,
            region.queue_timeout,
            c,
        )?;
        if !c.upstream.has_token() && region.token_env.is_none() && region.token_file.is_none() {
            return Err(c.err(
                "upstream.token_env",
                format!(
                    "no Convocore token source: set upstream.token_env or upstream.token_file \
                     (or a token source on region {name})"
                ),
            ));
        }
    }
    Ok(())
}

fn check_base_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return Err(format!("{url:?} must start with https:// or http://")),
    }
    if uri.host().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query"));
    }
    Ok(())
}
