//! `[teams]`: which agents each team may export.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Config, ConfigError};
use crate::domain::valid_id;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Team {
    /// Agent ids this team may export; `"*"` stands for every agent.
    pub agents: Vec<String>,
}

pub(super) fn validate(teams: &BTreeMap<String, Team>, c: &Config) -> Result<(), ConfigError> {
    for (team, rule) in teams {
        for agent in &rule.agents {
            if agent != "*" && !valid_id(agent) {
                return Err(c.err(
                    format!("teams.{team}.agents"),
                    format!("{agent:?} is neither \"*\" nor a valid agent id"),
                ));
            }
        }
    }
    Ok(())
}
