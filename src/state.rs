//! What the request path shares, in two parts:
//!
//! - [`State`] outlives reloads: the metrics registry, the cache store with its fetches in
//!   flight, the upstream pools, the JWKS fetchers, the verified-token cache, the learned
//!   agent regions, readiness and request ids.
//! - [`Policy`] is what one configuration builds: auth rules and keys, teams, regions and
//!   routing, cache settings, TLS. It sits behind an `ArcSwap`; a request takes one snapshot
//!   when it starts and keeps it to its end, and a reload swaps in a new one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::auth::jwks::Fetchers;
use crate::auth::sources::Context;
use crate::auth::{Auth, VerifiedTokens};
use crate::cache::{self, Cache};
use crate::config::{Config, ConfigError};
use crate::metrics::{Metrics, Resolved};
use crate::shared::Redis;
use crate::tls::Tls;
use crate::traffic::{TeamRules, Traffic};
use crate::upstream::routing::Learned;
use crate::upstream::{Origins, Upstream};
use crate::watch::Stamp;

/// One configuration, built: everything a request decides by.
pub struct Policy {
    pub config: Config,
    /// Counts the configurations this process has built; tells cached verifications apart.
    pub generation: u64,
    pub auth: Auth,
    pub upstream: Upstream,
    pub cache: cache::Settings,
    pub metrics: Resolved,
    pub tls: Option<Tls>,
    /// The teams' rates and shares.
    pub teams: TeamRules,
    /// The shared Redis, with `[shared]`.
    pub shared: Option<Arc<Redis>>,
}

/// The durable half, built once.
pub struct State {
    pub metrics: Metrics,
    pub cache: Cache,
    policy: ArcSwap<Policy>,
    parts: Parts,
    shutting_down: AtomicBool,
    ids: RequestIds,
    /// Held while a reload builds and swaps, so two reloads never interleave; it holds the
    /// version of the config file last read.
    pub(crate) reloading: tokio::sync::Mutex<Option<Stamp>>,
}

impl State {
    /// Builds the durable state and the first policy: loads every key, token and certificate
    /// the config names (file sources are followed from then on, so this must run inside the
    /// tokio runtime).
    pub fn build(config: Config) -> Result<Arc<State>, ConfigError> {
        let metrics = Metrics::new()
            .map_err(|e| ConfigError::new(&config.path, "-", format!("metrics: {e}")))?;
        let parts = Parts {
            origins: Origins::default(),
            fetchers: Fetchers::new(metrics.jwks()),
            verified: Arc::new(VerifiedTokens::default()),
            learned: Arc::new(Learned::default()),
            generations: AtomicU64::new(0),
            traffic: Arc::new(Traffic::new(&metrics)),
            shared: std::sync::Mutex::new(None),
        };
        // The version of the file this config came from, for the file watcher.
        let stamp = Stamp::of(&config.path).ok();
        let policy = parts.build_policy(config, &metrics)?;
        metrics
            .config_last_reload_success
            .set(crate::metrics::unix_now());
        Ok(Arc::new(State {
            cache: Cache::new(&policy.cache),
            metrics,
            policy: ArcSwap::from_pointee(policy),
            parts,
            shutting_down: AtomicBool::new(false),
            ids: RequestIds::new(),
            reloading: tokio::sync::Mutex::new(stamp),
        }))
    }

    /// Builds a policy from a validated config, reusing the durable parts it names (pools,
    /// JWKS fetchers) and reading every file it names now. Blocking file I/O.
    pub fn build_policy(&self, config: Config) -> Result<Policy, ConfigError> {
        self.parts.build_policy(config, &self.metrics)
    }

    /// The configuration in force now: a request keeps the one it started with.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts a new policy in force for the requests that start from now on; the traffic
    /// state of regions it no longer has goes.
    pub(crate) fn install(&self, policy: Policy) {
        self.parts.traffic.retain(&policy.config);
        self.policy.store(Arc::new(policy));
    }

    /// Team buckets, region queues, pauses and breakers.
    pub fn traffic(&self) -> &Traffic {
        &self.parts.traffic
    }

    /// `/readyz`: config, files and tokens are loaded by construction; every `jwks_url` must
    /// have been fetched and be within `max_stale`; not ready once shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why `/readyz` says 503, if it does.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        if self.shutting_down.load(Ordering::Relaxed) {
            Some("the gateway is shutting down")
        } else if !self.policy.load().auth.ready() {
            Some("JWKS keys are not loaded yet, or the IdP has failed for longer than max_stale")
        } else {
            None
        }
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// The caller's `X-Request-Id` when it is 1 to 128 visible ASCII characters, else a new one.
    pub fn request_id(&self, caller: Option<&HeaderValue>) -> HeaderValue {
        if let Some(v) = caller {
            let b = v.as_bytes();
            if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| (0x21..=0x7e).contains(c)) {
                return v.clone();
            }
        }
        self.ids.next()
    }
}

/// The durable parts a policy is built with and shares with the next one.
struct Parts {
    origins: Origins,
    fetchers: Fetchers,
    verified: Arc<VerifiedTokens>,
    learned: Arc<Learned>,
    generations: AtomicU64,
    traffic: Arc<Traffic>,
    /// The Redis of the last configuration, kept while `[shared]` stays the same.
    shared: std::sync::Mutex<Option<Arc<Redis>>>,
}

impl Parts {
    fn build_policy(&self, config: Config, metrics: &Metrics) -> Result<Policy, ConfigError> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let up = &config.upstream;
        let ca_file = up.ca_file.as_ref().map(|f| config.resolve(f));
        let connector = self
            .origins
            .connector(ca_file.as_deref(), up.connect_timeout)
            .map_err(|m| {
                let key = if ca_file.is_some() {
                    "upstream.ca_file"
                } else {
                    "upstream"
                };
                config.err(key, m)
            })?;
        let upstream = Upstream::from_config(
            &config,
            &self.origins,
            &connector,
            &self.traffic,
            self.learned.clone(),
        )?;
        let cx = Context {
            origins: &self.origins,
            connector: &connector,
            fetchers: &self.fetchers,
        };
        let auth = Auth::from_config(&config, &cx, self.verified.clone(), generation)?;
        let tls = match &config.server.tls {
            Some(tls) => Some(Tls::from_config(&config, tls)?),
            None => None,
        };
        let teams: Vec<&str> = config
            .teams
            .iter()
            .flat_map(|t| t.keys().map(String::as_str))
            .collect();
        let shared = match &config.shared {
            None => {
                metrics.shared_up.set(0);
                None
            }
            Some(settings) => {
                let mut kept = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                match kept.as_ref() {
                    Some(redis) if redis.settings == *settings => Some(redis.clone()),
                    _ => {
                        let redis = Redis::from_config(&config, settings, metrics.shared())?;
                        *kept = Some(redis.clone());
                        Some(redis)
                    }
                }
            }
        };
        let metrics = metrics.resolve(&upstream.regions.names(), &teams);
        let teams = TeamRules::from_config(&config);
        Ok(Policy {
            cache: cache::Settings {
                shared: shared.clone(),
                lease: crate::shared::lease::Lease {
                    // Past the holder's own queue wait and exchange.
                    hold: config
                        .upstream
                        .queue_timeout
                        .saturating_add(config.upstream.request_timeout)
                        .saturating_add(std::time::Duration::from_secs(1)),
                    wait: config.upstream.request_timeout,
                },
                ..cache::Settings::from_config(&config.cache)
            },
            config,
            generation,
            auth,
            upstream,
            metrics,
            tls,
            teams,
            shared,
        })
    }
}

/// Request ids: a random per-process prefix and a counter, so ids are unique across restarts
/// and replicas without a random draw per request.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        let mut bytes = [0u8; 8];
        // A failed draw only makes ids less unique across processes; the time stands in.
        if aws_lc_rs::rand::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            bytes = nanos.to_le_bytes();
        }
        RequestIds {
            prefix: u64::from_le_bytes(bytes),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = Vec::with_capacity(32);
        for word in [self.prefix, n] {
            for shift in (0..16).rev() {
                id.push(HEX[((word >> (shift * 4)) & 0xf) as usize]);
            }
        }
        HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
            .unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }
}
