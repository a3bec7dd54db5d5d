//! Purges that reach every replica. A purge deletes the conversation's entries from Redis,
//! bumps its purge epoch there (`{prefix}p:{agent}:{convo}`) and publishes it on
//! `{prefix}purge`; every replica's subscriber drops its memory entries and bumps its local
//! epoch on receipt. A fetch reads the Redis epoch when it starts and writes its entry to
//! Redis only if the epoch is still the same (one script), so a fetch that began before a
//! purge stores on no replica: not in Redis by the script, not in memory by the local epoch
//! or by the broadcast that follows.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;

use super::entries::{encode, redis_key};
use super::lease::Held;
use super::{Op, Redis};
use crate::domain::{Export, Format};
use crate::upstream::Fetched;

/// How long a purge epoch is kept: far longer than any fetch can run.
const EPOCH_TTL_MS: u64 = 3_600_000;

/// Deletes, bumps the epoch, tells the others; returns the number of entries deleted.
static PURGE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(PURGE_LUA));
const PURGE_LUA: &str = r"
local n = 0
for i = 2, #KEYS do n = n + redis.call('DEL', KEYS[i]) end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return n
";

/// Sets the entry only if the conversation's purge epoch is still the one the fetch began
/// with (missing counts as 0).
static SET_IF_EPOCH: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(SET_IF_EPOCH_LUA));
const SET_IF_EPOCH_LUA: &str = r"
local e = redis.call('GET', KEYS[1]) or '0'
if e ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
";

impl Redis {
    fn epoch_key(&self, agent: &str, convo: &str) -> String {
        self.key(&format!("p:{agent}:{convo}"))
    }

    pub fn purge_channel(&self) -> String {
        self.key("purge")
    }

    /// Purges a conversation fleet-wide; `None` when Redis could not be reached.
    pub async fn purge(self: &Arc<Self>, agent: &str, convo: &str) -> Option<usize> {
        let mut script = PURGE.prepare_invoke();
        script.key(self.epoch_key(agent, convo));
        for format in Format::ALL {
            script.key(redis_key(
                self,
                &Export {
                    agent: agent.to_string(),
                    convo: convo.to_string(),
                    format,
                },
            ));
        }
        script
            .arg(EPOCH_TTL_MS)
            .arg(self.purge_channel())
            .arg(format!("{agent}:{convo}"));
        let n: Option<i64> = self.run_script(Op::Purge, &script).await;
        n.map(|n| usize::try_from(n).unwrap_or(0))
    }

    /// The conversation's purge epoch now; `None` when Redis could not be reached.
    pub async fn epoch(self: &Arc<Self>, agent: &str, convo: &str) -> Option<u64> {
        let value: Option<Option<u64>> = self
            .run(Op::Get, redis::cmd("GET").arg(self.epoch_key(agent, convo)))
            .await;
        value.map(|v| v.unwrap_or(0))
    }

    /// Writes `entry` in the background if no purge came since `epoch` was read, then lets
    /// `lease` go (the replicas waiting on it find the entry).
    pub fn put_entry(
        self: &Arc<Self>,
        key: &Export,
        entry: Arc<Fetched>,
        keep: Duration,
        epoch: u64,
        lease: Option<Held>,
    ) {
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            if let Some(lease) = lease {
                lease.release();
            }
            return;
        };
        let me = self.clone();
        let rkey = redis_key(self, key);
        let ekey = self.epoch_key(&key.agent, &key.convo);
        tokio::spawn(async move {
            let _permit = permit;
            let keys = me.keys.get();
            // Sealing a large export takes a while: off the request path, as is the write.
            let sealed = tokio::task::spawn_blocking(move || {
                keys.seal(rkey.as_bytes(), &encode(&entry))
                    .map(|s| (rkey, s))
            })
            .await
            .ok()
            .flatten();
            if let Some((rkey, sealed)) = sealed {
                let ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
                let mut script = SET_IF_EPOCH.prepare_invoke();
                script.key(ekey).key(rkey).arg(epoch).arg(sealed).arg(ms);
                let _: Option<i64> = me.run_script(Op::Set, &script).await;
            }
            if let Some(lease) = lease {
                lease.release();
            }
        });
    }

    /// Listens for purges until the connection fails; calls `purged` for each.
    pub async fn listen_for_purges(&self, purged: impl Fn(&str, &str)) {
        let client = self.client();
        let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub()).await
        else {
            return;
        };
        if pubsub.subscribe(self.purge_channel()).await.is_err() {
            return;
        }
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let payload = msg.get_payload_bytes();
            let Ok(text) = std::str::from_utf8(payload) else {
                continue;
            };
            if let Some((agent, convo)) = text.split_once(':') {
                if crate::domain::valid_id(agent) && crate::domain::valid_id(convo) {
                    purged(agent, convo);
                }
            }
        }
    }
}
