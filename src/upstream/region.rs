//! The Convocore regions of one configuration: each with its base path, its origin's pool and
//! its bearer token.

use std::path::Path;
use std::sync::Arc;

use http::header::HeaderValue;
use http::Uri;

use super::pool::{Connector, Origin, Origins};
use crate::config::{Config, ConfigError};
pub use crate::domain::RegionId;
use crate::traffic::{queue, RegionTraffic, Traffic};
use crate::watch::Watched;

/// One Convocore region.
pub struct Region {
    pub id: RegionId,
    pub name: String,
    /// The name as the `X-Convocore-Region` value, built once; also what cache entries keep.
    pub header: HeaderValue,
    /// The path of `base_url` (`/v3`), without a trailing slash.
    pub(super) path: String,
    /// Connections to `base_url`'s origin.
    pub(super) origin: Arc<Origin>,
    /// `Bearer <shared token>`, marked sensitive; follows `token_file`.
    pub(super) authorization: Arc<Watched<HeaderValue>>,
    /// Its slots and fair queue, pause and breaker, retry budget (kept across reloads).
    pub traffic: Arc<RegionTraffic>,
}

/// The configured regions, in configuration order.
pub struct Regions {
    list: Vec<Region>,
}

impl Regions {
    /// Builds every `[regions.*]` entry; token files are read now (and followed).
    pub fn from_config(
        config: &Config,
        origins: &Origins,
        connector: &Connector,
        traffic: &Traffic,
    ) -> Result<Regions, ConfigError> {
        let up = &config.upstream;
        let shared = token_source(
            config,
            "upstream",
            up.token_env.as_deref(),
            up.token_file.as_deref(),
        )?;
        let mut list = Vec::with_capacity(config.regions.len());
        for (i, (name, region)) in config.regions.iter().enumerate() {
            let own = token_source(
                config,
                &format!("regions.{name}"),
                region.token_env.as_deref(),
                region.token_file.as_deref(),
            )?;
            let authorization = own
                .or_else(|| shared.clone())
                .ok_or_else(|| config.err("upstream.token_env", "no Convocore token source"))?;
            let base_err = |m: String| config.err(format!("regions.{name}.base_url"), m);
            let base: Uri = region
                .base_url
                .parse()
                .map_err(|e| base_err(format!("not a URL: {e}")))?;
            let origin = origins.origin(&base, connector).map_err(base_err)?;
            let id = u16::try_from(i)
                .map(RegionId::new)
                .map_err(|_| config.err("regions", "too many regions"))?;
            let slots = queue::Settings {
                max_concurrency: region.max_concurrency.unwrap_or(up.max_concurrency),
                max_queue: region.max_queue.unwrap_or(up.max_queue),
                queue_timeout: region.queue_timeout.unwrap_or(up.queue_timeout),
                rate: region.rate.or(up.rate),
            };
            list.push(Region {
                traffic: traffic.region(name, slots, &up.breaker),
                id,
                header: HeaderValue::from_str(name)
                    .map_err(|_| config.err(format!("regions.{name}"), "not a header value"))?,
                name: name.clone(),
                path: base.path().trim_end_matches('/').to_string(),
                origin,
                authorization,
            });
        }
        Ok(Regions { list })
    }

    pub fn get(&self, id: RegionId) -> Option<&Region> {
        self.list.get(id.index())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Region> {
        self.list.iter()
    }

    /// The region with this name (as a cache entry or a learned agent keeps it), if this
    /// configuration still has it.
    pub fn by_name(&self, name: &[u8]) -> Option<RegionId> {
        self.list
            .iter()
            .find(|r| r.header.as_bytes() == name)
            .map(|r| r.id)
    }

    /// A region's name (its metric label), `none` for no region.
    pub fn name(&self, id: Option<RegionId>) -> &str {
        id.and_then(|id| self.get(id))
            .map_or("none", |r| r.name.as_str())
    }

    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|r| r.name.as_str()).collect()
    }
}

/// `token_env` / `token_file` to a watched `Authorization` value; `None` when neither is set.
fn token_source(
    config: &Config,
    at: &str,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Arc<Watched<HeaderValue>>>, ConfigError> {
    if let Some(var) = env {
        let value = std::env::var(var).map_err(|_| {
            config.err(
                format!("{at}.token_env"),
                format!("environment variable {var} is not set"),
            )
        })?;
        let header = bearer_header(value.as_bytes())
            .map_err(|m| config.err(format!("{at}.token_env"), m))?;
        return Ok(Some(Watched::fixed(header)));
    }
    if let Some(file) = file {
        let path = config.resolve(file);
        let watched = Watched::file(&path, bearer_header)
            .map_err(|m| config.err(format!("{at}.token_file"), m))?;
        return Ok(Some(watched));
    }
    Ok(None)
}

/// A token to `Bearer <token>`; errors never include the token.
fn bearer_header(raw: &[u8]) -> Result<HeaderValue, String> {
    let token = std::str::from_utf8(raw)
        .map_err(|_| "the token is not UTF-8".to_string())?
        .trim();
    if token.is_empty() {
        return Err("the token is empty".to_string());
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token has characters not allowed in a header".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}
