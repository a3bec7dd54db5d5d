//! `[log]`: format and level of the log lines.

use serde::Deserialize;

use super::{Config, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Json,
            level: "info".to_string(),
        }
    }
}

impl Log {
    pub(super) fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return Err(c.err(
                "log.level",
                format!("{:?} is not a level or filter directive", self.level),
            ));
        }
        Ok(())
    }
}
