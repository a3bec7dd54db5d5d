//! Which region serves an agent: the static `[routing.agents]` map, then what discovery has
//! learned, then (with `discover = false`) the default region.

use std::collections::HashMap;
use std::time::Duration;

use http::HeaderValue;

use super::region::{RegionId, Regions};
use crate::config::Config;

/// How many discovered agents are remembered, and for how long. An agent that moves region
/// is found again after this long at most; each entry is a few dozen bytes.
const LEARNED_CAPACITY: u64 = 100_000;
pub const LEARNED_TTL: Duration = Duration::from_secs(3600);

pub enum Route {
    /// Ask this region.
    Region(RegionId),
    /// Unknown agent: ask [`Router::discovery_order`] in turn until one does not answer 404.
    Discover,
}

/// What discovery learned, by region name: it outlives reloads, and an agent whose region a
/// reload removed is discovered again.
pub struct Learned(moka::future::Cache<String, HeaderValue>);

impl Default for Learned {
    fn default() -> Self {
        Learned(
            moka::future::Cache::builder()
                .max_capacity(LEARNED_CAPACITY)
                .time_to_live(LEARNED_TTL)
                .build(),
        )
    }
}

/// One configuration's routing rules.
pub struct Router {
    agents: HashMap<String, RegionId>,
    default: RegionId,
    /// The default region first, then the others in configuration order.
    order: Vec<RegionId>,
    discover: bool,
}

impl Router {
    /// Region names were checked by the config's validation.
    pub fn new(config: &Config, regions: &Regions) -> Router {
        let first = RegionId::new(0);
        let id = |name: &str| regions.by_name(name.as_bytes()).unwrap_or(first);
        let default = id(&config.routing.default_region);
        let mut order = vec![default];
        order.extend(regions.iter().map(|r| r.id).filter(|r| *r != default));
        Router {
            agents: config
                .routing
                .agents
                .iter()
                .map(|(agent, region)| (agent.clone(), id(region)))
                .collect(),
            default,
            order,
            discover: config.routing.discover,
        }
    }

    pub async fn route(&self, agent: &str, learned: &Learned, regions: &Regions) -> Route {
        if let Some(region) = self.agents.get(agent) {
            return Route::Region(*region);
        }
        if !self.discover {
            return Route::Region(self.default);
        }
        match learned.0.get(agent).await {
            Some(name) => match regions.by_name(name.as_bytes()) {
                Some(region) => Route::Region(region),
                None => Route::Discover,
            },
            None => Route::Discover,
        }
    }

    pub fn discovery_order(&self) -> &[RegionId] {
        &self.order
    }

    pub fn default_region(&self) -> RegionId {
        self.default
    }
}

impl Learned {
    /// Remembers the region that served `agent`.
    pub async fn learn(&self, agent: &str, region: &HeaderValue) {
        self.0.insert(agent.to_string(), region.clone()).await;
    }
}
