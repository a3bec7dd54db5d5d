//! One fetch for the fleet: a replica about to go upstream for a key first takes a lease on it
//! in Redis (`SET {prefix}l:{key} <token> NX PX <lease>`). Holding it, it fetches; its entry
//! reaches Redis through the usual write, which also lets the lease go. Not holding it, it
//! waits for the holder's entry, polling with a growing pause (10 ms to 100 ms), for at most
//! `request_timeout`, and fetches itself if none comes (or the lease went without one: the
//! holder failed, got an answer that is not stored, or died and the lease expired). Redis
//! failing: fetch at once. The in-process single flight stays in front, so a replica sends at
//! most one waiter per key to Redis.

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::time::Instant;

use super::{Op, Redis};
use crate::domain::Export;
use crate::upstream::{Failed, Fetched};

/// The lease durations of one configuration.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    /// How long a lease lives if its holder never lets it go.
    pub hold: Duration,
    /// How long a replica waits for another's entry.
    pub wait: Duration,
}

/// Lets a lease go if it is still this holder's.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    )
});

/// A lease this replica holds; let go when the entry is written (or not to be).
pub struct Held {
    redis: Arc<Redis>,
    key: String,
    token: String,
}

impl Held {
    pub fn release(self) {
        let Held { redis, key, token } = self;
        tokio::spawn(async move {
            let mut script = RELEASE.prepare_invoke();
            script.key(key).arg(token);
            let _: Option<i64> = redis.run_script(Op::Lock, &script).await;
        });
    }
}

impl Redis {
    fn lease_key(&self, key: &Export) -> String {
        self.key(&format!(
            "l:{}:{}:{}",
            key.agent,
            key.convo,
            key.format.as_str()
        ))
    }

    /// Runs `fetch` if this replica gets the lease (or Redis cannot say), else waits for the
    /// holder's entry (stored after `newer_than`, when this replica refreshes an entry of that
    /// time: the stale entry itself is still in Redis). Returns the result, and the lease when
    /// this replica holds it.
    pub async fn one_fetch<Fut>(
        self: &Arc<Self>,
        key: &Export,
        lease: Lease,
        newer_than: Option<crate::clock::UnixMillis>,
        fetch: Fut,
    ) -> (Result<Fetched, Failed>, Option<Held>)
    where
        Fut: Future<Output = Result<Fetched, Failed>>,
    {
        let lkey = self.lease_key(key);
        let token = token();
        let hold_ms = u64::try_from(lease.hold.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let taken: Option<Option<String>> = self
            .run(
                Op::Lock,
                redis::cmd("SET")
                    .arg(&lkey)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(hold_ms),
            )
            .await;
        match taken {
            // Redis could not say: as if alone.
            None => return (fetch.await, None),
            Some(Some(_)) => {
                let held = Held {
                    redis: self.clone(),
                    key: lkey,
                    token,
                };
                return (fetch.await, Some(held));
            }
            Some(None) => {}
        }
        // Another replica is fetching: wait for its entry.
        let deadline = crate::clock::deadline(lease.wait);
        let mut pause = Duration::from_millis(10);
        while Instant::now() + pause < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            let fresh = |e: &Fetched| newer_than.is_none_or(|t| e.received > t);
            if let Some(mut entry) = self.get_entry(key).await.filter(fresh) {
                entry.from_shared = true;
                return (Ok(entry), None);
            }
            let lease_left: Option<i64> = self.run(Op::Lock, redis::cmd("EXISTS").arg(&lkey)).await;
            if lease_left != Some(1) {
                // Gone without an entry (or Redis failing): one last look, then fetch.
                if let Some(mut entry) = self.get_entry(key).await.filter(fresh) {
                    entry.from_shared = true;
                    return (Ok(entry), None);
                }
                break;
            }
        }
        (fetch.await, None)
    }
}

/// A random lease token, so only its holder lets it go.
fn token() -> String {
    let mut bytes = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
