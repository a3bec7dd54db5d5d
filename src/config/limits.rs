//! `[limits]` and the rate strings every traffic-control key shares: `"N/s"` or `"N/m"`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{Config, ConfigError};

/// The most requests per second a rate may say (more is no limit at all).
const MAX_PER_SECOND: u64 = 1_000_000;
/// The largest burst (bucket size) of a team.
pub const MAX_BURST: u32 = 1_000_000;

/// A rate: `count` per `per` (a second or a minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    /// The time one unit takes to come back (GCRA's emission interval).
    pub fn interval(&self) -> Duration {
        self.per / u32::try_from(self.count).unwrap_or(u32::MAX).max(1)
    }

    /// Units per second, for documentation and the `RateLimit-Policy` window.
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }

    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("invalid rate {text:?}; use e.g. \"10/s\" or \"600/m\"");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!(
                "rate {text:?} must be at least 1 per second or minute"
            ));
        }
        if count / per.as_secs() > MAX_PER_SECOND {
            return Err(format!("rate {text:?} is above {MAX_PER_SECOND}/s"));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per.as_secs() == 60 { "m" } else { "s" };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let text = String::deserialize(d)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[limits]`: the per-team request rate at the gateway, hits included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub team_rate: Option<Rate>,
    pub team_burst: Option<u32>,
}

impl Limits {
    pub(super) fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        check_burst(self.team_burst, "limits.team_burst", c)?;
        if self.team_burst.is_some() && self.team_rate.is_none() {
            return Err(c.err("limits.team_burst", "needs limits.team_rate"));
        }
        Ok(())
    }
}

pub(super) fn check_burst(burst: Option<u32>, key: &str, c: &Config) -> Result<(), ConfigError> {
    match burst {
        Some(0) => Err(c.err(key, "must be at least 1")),
        Some(b) if b > MAX_BURST => Err(c.err(key, format!("must be at most {MAX_BURST}"))),
        _ => Ok(()),
    }
}

/// A team's bucket: `burst` requests, refilled at `rate`. Without a burst, one second's worth
/// (at least 1).
pub fn bucket(rate: Rate, burst: Option<u32>) -> (Rate, u32) {
    let default = u32::try_from(rate.per_second().ceil() as u64)
        .unwrap_or(MAX_BURST)
        .clamp(1, MAX_BURST);
    (rate, burst.unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let r = Rate::parse("10/s").unwrap();
        assert_eq!(r.interval(), Duration::from_millis(100));
        assert_eq!(r.to_string(), "10/s");
        let r = Rate::parse(" 600/m ").unwrap();
        assert_eq!(r.interval(), Duration::from_millis(100));
        assert_eq!(
            Rate::parse("1/m").unwrap().interval(),
            Duration::from_secs(60)
        );
        for bad in [
            "",
            "10",
            "10/h",
            "0/s",
            "-1/s",
            "x/s",
            "10/ s/",
            "2000000/s",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad:?}");
        }
    }
}
