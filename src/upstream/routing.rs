//! Which region serves an agent: the static `[routing.agents]` map, then what discovery has
//! learned, then (with `discover = false`) the default region.

use std::collections::HashMap;
use std::time::Duration;

use crate::config::Config;
use crate::upstream::Upstream;

/// How many discovered agents are remembered, and for how long. An agent that moves region
/// is found again after this long at most; each entry is a few dozen bytes.
const LEARNED_CAPACITY: u64 = 100_000;
const LEARNED_TTL: Duration = Duration::from_secs(3600);

pub enum Route {
    /// Ask this region (an index into `Upstream::regions`).
    Region(usize),
    /// Unknown agent: ask [`Router::discovery_order`] in turn until one does not answer 404.
    Discover,
}

pub struct Router {
    agents: HashMap<String, usize>,
    default: usize,
    /// The default region first, then the others in configuration order.
    order: Vec<usize>,
    learned: Option<moka::future::Cache<String, usize>>,
}

impl Router {
    pub fn new(config: &Config, upstream: &Upstream) -> Router {
        let index = |name: &str| upstream.region_index(name).unwrap_or(0);
        let default = index(&config.routing.default_region);
        let mut order = vec![default];
        order.extend((0..upstream.regions.len()).filter(|i| *i != default));
        Router {
            agents: config
                .routing
                .agents
                .iter()
                .map(|(agent, region)| (agent.clone(), index(region)))
                .collect(),
            default,
            order,
            learned: config.routing.discover.then(|| {
                moka::future::Cache::builder()
                    .max_capacity(LEARNED_CAPACITY)
                    .time_to_live(LEARNED_TTL)
                    .build()
            }),
        }
    }

    pub async fn route(&self, agent: &str) -> Route {
        if let Some(region) = self.agents.get(agent) {
            return Route::Region(*region);
        }
        match &self.learned {
            None => Route::Region(self.default),
            Some(learned) => match learned.get(agent).await {
                Some(region) => Route::Region(region),
                None => Route::Discover,
            },
        }
    }

    pub fn discovery_order(&self) -> &[usize] {
        &self.order
    }

    pub fn default_region(&self) -> usize {
        self.default
    }

    /// Remembers the region that served `agent`.
    pub async fn learn(&self, agent: &str, region: usize) {
        if let Some(learned) = &self.learned {
            learned.insert(agent.to_string(), region).await;
        }
    }
}
