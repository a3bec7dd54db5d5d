//! `[routing]`: the static agent map, the default region, discovery.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Config, ConfigError};
use crate::domain::valid_id;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub default_region: String,
    pub discover: bool,
    pub agents: BTreeMap<String, String>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            default_region: "eu".to_string(),
            discover: true,
            agents: BTreeMap::new(),
        }
    }
}

impl Routing {
    pub(super) fn validate(&self, c: &Config) -> Result<(), ConfigError> {
        if !c.regions.contains_key(&self.default_region) {
            return Err(c.err(
                "routing.default_region",
                format!("no region named {:?}", self.default_region),
            ));
        }
        for (agent, region) in &self.agents {
            if !valid_id(agent) {
                return Err(c.err(
                    format!("routing.agents.{agent}"),
                    "agent ids are 1 to 128 characters of A-Z a-z 0-9 _ -",
                ));
            }
            if !c.regions.contains_key(region) {
                return Err(c.err(
                    format!("routing.agents.{agent}"),
                    format!("no region named {region:?}"),
                ));
            }
        }
        Ok(())
    }
}
