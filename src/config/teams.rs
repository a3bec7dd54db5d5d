//! `[teams]`: which agents each team may export.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::limits::{check_burst, Rate};
use super::{Config, ConfigError};

/// The largest share weight of a team.
const MAX_WEIGHT: u32 = 1000;
use crate::domain::valid_id;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Team {
    /// Agent ids this team may export; `"*"` stands for every agent.
    pub agents: Vec<String>,
    /// The team's own request rate at the gateway (else `[limits] team_rate`).
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
    /// The team's share of each region's upstream slots, against the others' (default 1).
    pub weight: Option<u32>,
}

pub(super) fn validate(teams: &BTreeMap<String, Team>, c: &Config) -> Result<(), ConfigError> {
    for (team, rule) in teams {
        check_burst(rule.burst, &format!("teams.{team}.burst"), c)?;
        if rule.burst.is_some() && rule.rate.is_none() && c.limits.team_rate.is_none() {
            return Err(c.err(
                format!("teams.{team}.burst"),
                "needs a rate (the team's own, or limits.team_rate)",
            ));
        }
        if rule.weight.is_some_and(|w| w == 0 || w > MAX_WEIGHT) {
            return Err(c.err(
                format!("teams.{team}.weight"),
                format!("must be 1 to {MAX_WEIGHT}"),
            ));
        }
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
