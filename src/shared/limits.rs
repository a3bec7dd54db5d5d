//! Fleet-wide limits. A team's bucket is one GCRA decision in Redis per request (one Lua
//! script, on Redis's own clock, so replicas' clocks do not matter), the same arithmetic as
//! the local bucket. Replicas announce themselves every few seconds in a sorted set; when
//! Redis fails, each replica enforces its share of a limit (the rate divided by the replicas
//! last seen), so the token is never over-spent. An upstream `429`'s pause is published to
//! every replica.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;

use super::{Op, Redis};
use crate::config::Rate;
use crate::traffic::bucket::{Limit, Verdict};

/// How often a replica announces itself, and how long an announcement counts.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
const SEEN_FOR_MS: u64 = 15_000;

static GCRA: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local window = interval * burst
local ahead = new_tat - now
if ahead > window then
  return {0, ahead - window, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor(ahead / 1000) + 1)
return {1, math.floor((window - ahead) / interval), ahead}
",
    )
});

/// Reserves the next start of a region's exchange at its fleet-wide `rate`: the microseconds
/// to wait before sending.
static RESERVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local at = tonumber(redis.call('GET', KEYS[1]) or now)
if at < now then at = now end
redis.call('SET', KEYS[1], at + interval, 'PX', math.floor((at + interval - now) / 1000) + 1)
return at - now
",
    )
});

static HEARTBEAT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
",
    )
});

impl Limit {
    /// This replica's share of the limit when `replicas` share it without Redis.
    pub fn share(self, replicas: u32) -> Limit {
        // A fleet of more than a thousand replicas would make each share a crawl anyway.
        let n = replicas.clamp(1, 1000);
        Limit {
            rate: Rate {
                count: self.rate.count,
                per: self.rate.per * n,
            },
            burst: (self.burst / n).max(1),
        }
    }
}

impl Redis {
    /// One request of `team` against its fleet-wide bucket; `None` when Redis cannot say.
    pub async fn take(self: &Arc<Self>, team: &str, limit: Limit) -> Option<Verdict> {
        let interval = u64::try_from(limit.rate.interval().as_micros()).unwrap_or(u64::MAX);
        let mut script = GCRA.prepare_invoke();
        script
            .key(self.key(&format!("t:{team}")))
            .arg(interval.max(1))
            .arg(limit.burst);
        let (allowed, a, b): (i64, i64, i64) = self.run_script(Op::Limit, &script).await?;
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Some(if allowed == 1 {
            Verdict::Allowed {
                remaining: u32::try_from(a).unwrap_or(0),
                full_in: us(b),
            }
        } else {
            Verdict::Limited {
                retry_after: us(a),
                full_in: us(b),
            }
        })
    }

    /// When this replica may start its next exchange with `region` under the fleet's `rate`
    /// (a wait from now); `None` when Redis cannot say.
    pub async fn reserve_start(self: &Arc<Self>, region: &str, rate: Rate) -> Option<Duration> {
        let interval = u64::try_from(rate.interval().as_micros()).unwrap_or(u64::MAX);
        let mut script = RESERVE.prepare_invoke();
        script
            .key(self.key(&format!("r:{region}")))
            .arg(interval.max(1));
        let wait: i64 = self.run_script(Op::Limit, &script).await?;
        Some(Duration::from_micros(u64::try_from(wait).unwrap_or(0)))
    }

    /// The replicas last seen in Redis (this one included; 1 before any heartbeat).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Announces this replica and learns how many there are; false when Redis failed.
    pub async fn heartbeat(self: &Arc<Self>) -> bool {
        let mut script = HEARTBEAT_SCRIPT.prepare_invoke();
        script
            .key(self.key("replicas"))
            .arg(&self.instance)
            .arg(SEEN_FOR_MS);
        match self.run_script::<u32>(Op::Limit, &script).await {
            Some(n) => {
                self.replicas.store(n.max(1), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// The region another replica discovered for `agent`, if Redis knows one.
    pub async fn agent_region(self: &Arc<Self>, agent: &str) -> Option<String> {
        self.run::<Option<String>>(
            Op::Get,
            redis::cmd("GET").arg(self.key(&format!("a:{agent}"))),
        )
        .await
        .flatten()
    }

    /// Tells the fleet which region has `agent` (kept as long as a replica's own memory of it).
    pub async fn learn_agent_region(self: &Arc<Self>, agent: &str, region: &str) {
        let ms =
            u64::try_from(crate::upstream::routing::LEARNED_TTL.as_millis()).unwrap_or(u64::MAX);
        let _: Option<()> = self
            .run(
                Op::Set,
                redis::cmd("SET")
                    .arg(self.key(&format!("a:{agent}")))
                    .arg(region)
                    .arg("PX")
                    .arg(ms),
            )
            .await;
    }

    fn pause_channel(&self) -> String {
        self.key("pause")
    }

    /// Tells every replica that Convocore paused `region` for `pause`.
    pub async fn publish_pause(self: &Arc<Self>, region: &str, pause: Duration) {
        let ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        let _: Option<i64> = self
            .run(
                Op::Limit,
                redis::cmd("PUBLISH")
                    .arg(self.pause_channel())
                    .arg(format!("{region}:{ms}:{}", self.instance)),
            )
            .await;
    }

    /// Listens for the pauses other replicas publish until the connection fails.
    pub async fn listen_for_pauses(&self, paused: impl Fn(&str, Duration)) {
        let client = self.client();
        let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub()).await
        else {
            return;
        };
        if pubsub.subscribe(self.pause_channel()).await.is_err() {
            return;
        }
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = std::str::from_utf8(msg.get_payload_bytes()) else {
                continue;
            };
            let mut parts = text.splitn(3, ':');
            let (Some(region), Some(ms), Some(from)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if from == self.instance {
                continue;
            }
            if let Ok(ms) = ms.parse::<u64>() {
                paused(region, Duration::from_millis(ms));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_takes_its_share_of_a_limit() {
        let limit = Limit {
            rate: Rate::parse("60/s").unwrap(),
            burst: 100,
        };
        let share = limit.share(3);
        assert_eq!(share.burst, 33);
        assert_eq!(share.rate.interval(), Duration::from_millis(50), "20/s");
        assert_eq!(limit.share(0), limit.share(1));
        assert_eq!(limit.share(1), limit);
        assert_eq!(limit.share(1000).burst, 1);
    }
}
