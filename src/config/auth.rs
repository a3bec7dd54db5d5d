//! `[auth]` and `[[auth.keys]]`: which team JWTs are accepted, and the keys that verify them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Config, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    pub team_claim: String,
    pub keys: Vec<Key>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway: Duration::from_secs(30),
            team_claim: "team".to_string(),
            keys: Vec::new(),
        }
    }
}

/// The largest clock skew allowed on `exp` / `nbf`.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// One `[[auth.keys]]` entry: exactly one source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    pub kid: Option<String>,
    pub algorithm: Option<String>,
    pub public_key_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub refresh: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_stale: Option<Duration>,
}

impl Auth {
    pub(super) fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        // Clock skew is seconds, not years (a leeway past the epoch broke every check).
        if self.leeway > MAX_LEEWAY {
            return Err(c.err("auth.leeway", "must be at most 1h"));
        }
        if self.team_claim.is_empty() {
            return Err(c.err("auth.team_claim", "must not be empty"));
        }
        if self.keys.is_empty() {
            return Err(c.err(
                "auth.keys",
                "at least one [[auth.keys]] entry is required to verify team JWTs",
            ));
        }
        for (i, key) in self.keys.iter().enumerate() {
            key.validate(c, &format!("auth.keys[{i}]"))?;
        }
        Ok(())
    }
}

impl Key {
    fn validate(&self, c: &Config, at: &str) -> Result<(), ConfigError> {
        let sources = [
            self.public_key_file.is_some(),
            self.secret_env.is_some(),
            self.secret_file.is_some(),
            self.jwks_file.is_some(),
            self.jwks_url.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => {
                return Err(c.err(
                    at,
                    "needs one key source: public_key_file, secret_env, secret_file, \
                     jwks_file or jwks_url",
                ))
            }
            _ => return Err(c.err(at, "set exactly one key source per [[auth.keys]] entry")),
        }
        let jwks = self.jwks_file.is_some() || self.jwks_url.is_some();
        if !jwks && self.algorithm.is_none() {
            return Err(c.err(
                format!("{at}.algorithm"),
                "required for public_key_file, secret_env and secret_file keys",
            ));
        }
        if self.jwks_url.is_none() && (self.refresh.is_some() || self.max_stale.is_some()) {
            return Err(c.err(
                format!("{at}.refresh"),
                "refresh and max_stale apply to jwks_url keys only",
            ));
        }
        if jwks && self.kid.is_some() {
            return Err(c.err(
                format!("{at}.kid"),
                "a JWKS names its own kids; kid applies to single keys only",
            ));
        }
        if let Some(url) = &self.jwks_url {
            check_jwks_url(url).map_err(|m| c.err(format!("{at}.jwks_url"), m))?;
        }
        if self.refresh.is_some_and(|r| r.is_zero()) {
            return Err(c.err(format!("{at}.refresh"), "must be greater than 0"));
        }
        if self.max_stale.is_some_and(|r| r.is_zero()) {
            return Err(c.err(format!("{at}.max_stale"), "must be greater than 0"));
        }
        Ok(())
    }
}

/// JWKS URLs are HTTPS; plain HTTP only on loopback (a local sidecar IdP, tests).
fn check_jwks_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if host == "localhost" || host == "127.0.0.1" || host == "[::1]" => Ok(()),
        _ => Err(format!("{url:?} must be an https:// URL")),
    }
}
