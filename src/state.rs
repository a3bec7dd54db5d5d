//! `App`: everything the request path shares, built once from a validated `Config`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::HeaderValue;

use crate::auth::Auth;
use crate::cache::Cache;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::server::Tls;
use crate::upstream::Upstream;

pub struct App {
    pub config: Config,
    pub auth: Auth,
    pub upstream: Upstream,
    pub router: Router,
    pub cache: Cache,
    pub metrics: Metrics,
    pub tls: Option<Tls>,
    shutting_down: AtomicBool,
    ids: RequestIds,
}

impl App {
    /// Loads every key, token and certificate the config names; file sources are followed
    /// from then on, so this must run inside the tokio runtime.
    pub fn build(config: Config) -> Result<App, ConfigError> {
        let region_names: Vec<&str> = config.regions.keys().map(String::as_str).collect();
        let team_names: Vec<&str> = config
            .teams
            .iter()
            .flat_map(|t| t.keys().map(String::as_str))
            .collect();
        let metrics = Metrics::new(&region_names, &team_names)
            .map_err(|e| ConfigError::new(&config.path, "-", format!("metrics: {e}")))?;
        let upstream = Upstream::from_config(&config)?;
        let auth = Auth::from_config(&config, upstream.connector(), &metrics.jwks())?;
        let router = Router::new(&config, &upstream);
        let cache = Cache::new(&config.cache);
        let tls = match &config.server.tls {
            Some(tls) => Some(Tls::from_config(&config, tls)?),
            None => None,
        };
        Ok(App {
            config,
            auth,
            upstream,
            router,
            cache,
            metrics,
            tls,
            shutting_down: AtomicBool::new(false),
            ids: RequestIds::new(),
        })
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
        } else if !self.auth.ready() {
            Some("JWKS keys are not loaded yet, or the IdP has failed for longer than max_stale")
        } else {
            None
        }
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// A region's name (its metric label), by index.
    pub fn region_name(&self, region: usize) -> &str {
        self.upstream
            .regions
            .get(region)
            .map(|r| r.name.as_str())
            .unwrap_or("none")
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
