//! `[shared]`: the Redis (or Valkey) that replicas share their cache, fetches, purges and
//! limits through.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Config, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shared {
    /// `redis://host:port/db` or `rediss://` (TLS); an ACL user may be in it, never a password.
    pub url: String,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Base64 32-byte keys, one a line: the first seals, every one opens.
    pub encryption_key_file: Option<PathBuf>,
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Per Redis operation: slower or failed counts as Redis having nothing.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_prefix() -> String {
    "convocore-gateway:".to_string()
}

fn default_timeout() -> Duration {
    Duration::from_millis(50)
}

impl Shared {
    pub(super) fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        let url = self.url.trim();
        let rest = url
            .strip_prefix("redis://")
            .or_else(|| url.strip_prefix("rediss://"))
            .ok_or_else(|| c.err("shared.url", "must start with redis:// or rediss://"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            // Never echo it: the part before '@' may be a secret.
            if userinfo.contains(':') {
                return Err(c.err(
                    "shared.url",
                    "must not hold a password: put it in shared.password_file or shared.password_env",
                ));
            }
        }
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host.is_empty() {
            return Err(c.err("shared.url", "has no host"));
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            return Err(c.err(
                "shared.password_env",
                "set password_env or password_file, not both",
            ));
        }
        if self.encryption_key_file.is_none() {
            return Err(c.err(
                "shared.encryption_key_file",
                "is required: every value written to Redis is encrypted",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.len() > 64 {
            return Err(c.err("shared.key_prefix", "must be 1 to 64 characters"));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(5) {
            return Err(c.err("shared.timeout", "must be above 0 and at most 5s"));
        }
        Ok(())
    }
}
