//! `[cache]`: the export cache's size, freshness windows and the encodings it offers.

use std::time::Duration;

use serde::Deserialize;

use super::{size, Config, ConfigError};
use crate::compress::Coding;

/// The longest freshness or stale window: a year (the store cannot keep entries past 1,000
/// years, and a year is past any export's use).
const MAX_WINDOW: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    pub enabled: bool,
    #[serde(deserialize_with = "size")]
    pub max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// Encodings offered to callers by `Accept-Encoding`, in preference order; empty: none.
    pub compress: Vec<Coding>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            enabled: true,
            max_bytes: 256 << 20,
            ttl: Duration::from_secs(300),
            stale_if_error: Duration::from_secs(3600),
            stale_while_revalidate: Duration::ZERO,
            compress: vec![Coding::Zstd, Coding::Br, Coding::Gzip],
        }
    }
}

impl Cache {
    pub(super) fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        for (key, value) in [
            ("cache.ttl", self.ttl),
            ("cache.stale_if_error", self.stale_if_error),
            ("cache.stale_while_revalidate", self.stale_while_revalidate),
        ] {
            if value > MAX_WINDOW {
                return Err(c.err(key, "must be at most 365d"));
            }
        }
        for (i, coding) in self.compress.iter().enumerate() {
            if self.compress[..i].contains(coding) {
                return Err(c.err(
                    "cache.compress",
                    format!("lists \"{}\" twice", coding.name()),
                ));
            }
        }
        if self.enabled && self.max_bytes == 0 {
            return Err(c.err("cache.max_bytes", "must be greater than 0"));
        }
        if self.enabled && self.ttl.is_zero() {
            return Err(c.err("cache.ttl", "must be greater than 0"));
        }
        Ok(())
    }
}
