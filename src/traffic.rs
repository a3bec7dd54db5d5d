//! Traffic control: one Convocore token, shared fairly (the contract's "Traffic control").
//!
//! - [`bucket`]: each team's request rate at the gateway (GCRA), taken by every request.
//! - [`queue`]: each region's upstream slots and its fair queue across teams.
//! - [`gate`]: a region paused by a `429`, or its breaker open; one probe after either.
//! - [`retry`]: which failed exchanges are tried again, and the budget that bounds retries.
//!
//! What one configuration says (rates, weights, sizes) lives in its policy; the state here
//! (buckets, queues, pauses, breakers, budgets) outlives reloads, per team and per region
//! name. The buckets and the pause are the two pieces a shared store makes fleet-wide.

pub mod bucket;
pub mod gate;
pub mod queue;
pub mod retry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;
use tokio::time::Instant;

use self::bucket::{Limit, TeamBuckets, Verdict};
use crate::config::{Breaker, Config};
use crate::metrics::Metrics;

/// One region's traffic state.
pub struct RegionTraffic {
    pub queue: queue::Queue,
    pub gate: gate::Gate,
    pub budget: retry::Budget,
    pub retries: IntCounter,
}

/// The durable traffic state of the process.
pub struct Traffic {
    regions: Mutex<HashMap<String, Arc<RegionTraffic>>>,
    teams: TeamBuckets,
    metrics: TrafficMetrics,
}

/// The metric families the per-region state takes its children from.
struct TrafficMetrics {
    depth: prometheus::IntGaugeVec,
    wait: prometheus::HistogramVec,
    retries: prometheus::IntCounterVec,
    paused: prometheus::IntGaugeVec,
}

impl Traffic {
    pub fn new(metrics: &Metrics) -> Traffic {
        Traffic {
            regions: Mutex::new(HashMap::new()),
            teams: TeamBuckets::default(),
            metrics: TrafficMetrics {
                depth: metrics.upstream_queue_depth.clone(),
                wait: metrics.upstream_queue_wait.clone(),
                retries: metrics.upstream_retries.clone(),
                paused: metrics.upstream_paused.clone(),
            },
        }
    }

    /// The traffic state of region `name`, made on first use and set to `settings`.
    pub fn region(
        &self,
        name: &str,
        settings: queue::Settings,
        breaker: &Breaker,
    ) -> Arc<RegionTraffic> {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(region) = regions.get(name) {
            region.queue.configure(settings);
            region.gate.configure(breaker.clone());
            return region.clone();
        }
        let m = &self.metrics;
        let region = Arc::new(RegionTraffic {
            queue: queue::Queue::new(
                settings,
                m.depth.with_label_values(&[name]),
                m.wait.with_label_values(&[name]),
            ),
            gate: gate::Gate::new(
                breaker.clone(),
                m.paused.with_label_values(&[name, "rate_limited"]),
                m.paused.with_label_values(&[name, "breaker"]),
            ),
            budget: retry::Budget::default(),
            retries: m.retries.with_label_values(&[name]),
        });
        regions.insert(name.to_string(), region.clone());
        region
    }

    /// Forgets the regions a new configuration no longer has (their series go too), and
    /// team buckets that are full again.
    pub fn retain(&self, config: &Config) {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        regions.retain(|name, _| {
            let keep = config.regions.contains_key(name);
            if !keep {
                let m = &self.metrics;
                let _ = m.depth.remove_label_values(&[name]);
                let _ = m.wait.remove_label_values(&[name]);
                let _ = m.retries.remove_label_values(&[name]);
                let _ = m.paused.remove_label_values(&[name, "rate_limited"]);
                let _ = m.paused.remove_label_values(&[name, "breaker"]);
            }
            keep
        });
        drop(regions);
        let listed = |team: &str| config.teams.as_ref().is_some_and(|t| t.contains_key(team));
        self.teams.sweep(Instant::now(), listed);
    }

    /// Takes one request of `team` from its bucket.
    pub fn take(&self, team: &str, listed: bool, limit: Limit) -> Verdict {
        self.teams.take(team, listed, limit, Instant::now())
    }

    /// Drops the team buckets that are full again (the maintenance timer calls this).
    pub fn sweep(&self, listed: impl Fn(&str) -> bool) {
        self.teams.sweep(Instant::now(), listed);
    }
}

/// One configuration's team limits and shares.
#[derive(Debug, Default)]
pub struct TeamRules {
    /// `[limits]`: every team's bucket unless its own entry says otherwise.
    default: Option<Limit>,
    /// `[teams]` entries: their bucket (if any) and weight.
    teams: HashMap<String, (Option<Limit>, u32)>,
}

impl TeamRules {
    pub fn from_config(config: &Config) -> TeamRules {
        let limits = &config.limits;
        let default = limits.team_rate.map(|rate| {
            let (rate, burst) = crate::config::limits::bucket(rate, limits.team_burst);
            Limit { rate, burst }
        });
        let teams = config
            .teams
            .iter()
            .flatten()
            .map(|(name, team)| {
                // The team's own rate and burst win; its own rate without a burst gets one
                // second's worth of that rate, the shared rate keeps the shared burst.
                let limit = match team.rate {
                    Some(rate) => {
                        let (rate, burst) = crate::config::limits::bucket(rate, team.burst);
                        Some(Limit { rate, burst })
                    }
                    None => default.map(|d| Limit {
                        burst: team.burst.unwrap_or(d.burst),
                        ..d
                    }),
                };
                (name.clone(), (limit, team.weight.unwrap_or(1)))
            })
            .collect();
        TeamRules { default, teams }
    }

    /// The team's bucket, if it has one, and whether `[teams]` names the team.
    pub fn limit(&self, team: &str) -> Option<(Limit, bool)> {
        match self.teams.get(team) {
            Some((limit, _)) => limit.map(|l| (l, true)),
            None => self.default.map(|l| (l, false)),
        }
    }

    /// The team's weight in the regions' fair queues.
    pub fn weight(&self, team: &str) -> u32 {
        self.teams.get(team).map_or(1, |(_, w)| *w)
    }
}
