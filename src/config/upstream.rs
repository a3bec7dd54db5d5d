//! `[upstream]` and `[regions.*]`: how Convocore is reached, with which token, within which
//! limits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{size, Config, ConfigError};

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
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub base_url: String,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}

pub(super) fn default_regions() -> BTreeMap<String, Region> {
    let region = |url: &str| Region {
        base_url: url.to_string(),
        token_env: None,
        token_file: None,
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
