//! The memory store: moka, bounded by weighted bytes, evicting least recently used first.
//! moka's own expiry only drops entries once they are too old to serve even stale; freshness
//! is decided by [`super::freshness`]. moka cannot change its capacity or time-to-live in
//! place, so a reload that changes them builds a new store and moves the entries over.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Export, Format};
use crate::upstream::Fetched;

/// Per-entry memory beyond the body, key strings and header values: the `Fetched` in its `Arc`
/// (~320 bytes with its fixed header array), moka's entry, key and deque nodes, and the shared
/// header buffer's control block. Measured by `tests/entry_memory.rs` (718 bytes with
/// jemalloc), rounded up.
const ENTRY_OVERHEAD: usize = 896;

/// foldhash (randomly seeded per process) instead of SipHash: keys are hashed on every
/// lookup, and a seeded hash keeps chosen ids from colliding on purpose.
type Moka = moka::future::Cache<Export, Arc<Fetched>, foldhash::fast::RandomState>;

pub struct Memory {
    moka: Moka,
    max_bytes: u64,
    keep: Duration,
}

impl Memory {
    pub fn new(max_bytes: u64, keep: Duration) -> Memory {
        let moka = moka::future::Cache::builder()
            // LRU, as nginx's proxy_cache: a fresh export is always kept (TinyLFU, moka's
            // default, turns away new keys while the cache is full of older ones).
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(max_bytes)
            .weigher(|key: &Export, entry: &Arc<Fetched>| {
                u32::try_from(weight(key, entry)).unwrap_or(u32::MAX)
            })
            .time_to_live(keep)
            .build_with_hasher(foldhash::fast::RandomState::default());
        Memory {
            moka,
            max_bytes,
            keep,
        }
    }

    /// Whether this store was built for these settings.
    pub fn fits(&self, max_bytes: u64, keep: Duration) -> bool {
        self.max_bytes == max_bytes && self.keep == keep
    }

    /// Exports larger than an eighth of the store are served but not stored.
    pub fn max_entry_bytes(&self) -> usize {
        usize::try_from(self.max_bytes / 8).unwrap_or(usize::MAX)
    }

    pub async fn get(&self, key: &Export) -> Option<Arc<Fetched>> {
        self.moka.get(key).await
    }

    pub async fn insert(&self, key: Export, entry: Arc<Fetched>) {
        self.moka.insert(key, entry).await;
    }

    /// Weighs `entry` again (an encoding was added to it) if it is still the one stored for
    /// `key`: moka weighs an entry only when it is put.
    pub async fn reweigh(&self, key: &Export, entry: &Arc<Fetched>) {
        use moka::ops::compute::Op;
        let _ = self
            .moka
            .entry_by_ref(key)
            .and_compute_with(|current| {
                let op = match current {
                    Some(current) if Arc::ptr_eq(current.value(), entry) => Op::Put(entry.clone()),
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    pub async fn remove(&self, key: &Export) -> bool {
        self.moka.remove(key).await.is_some()
    }

    /// Drops every format of one conversation; returns how many entries there were.
    pub async fn purge(&self, agent: &str, convo: &str) -> usize {
        let mut purged = 0;
        for format in Format::ALL {
            let key = Export {
                agent: agent.to_string(),
                convo: convo.to_string(),
                format,
            };
            if self.remove(&key).await {
                purged += 1;
            }
        }
        purged
    }

    /// Drops the entries `keep` refuses (those of a region a reload removed).
    pub async fn retain(&self, keep: impl Fn(&Fetched) -> bool) {
        let doomed: Vec<Export> = self
            .moka
            .iter()
            .filter(|(_, entry)| !keep(entry))
            .map(|(key, _)| Export::clone(&key))
            .collect();
        for key in doomed {
            self.moka.invalidate(&key).await;
        }
    }

    /// A new store of other settings holding this one's entries that `keep` accepts, oldest
    /// inserted first, so that a smaller store keeps the newest.
    pub async fn rebuilt(
        &self,
        max_bytes: u64,
        keep: Duration,
        accept: impl Fn(&Fetched) -> bool,
    ) -> Memory {
        let next = Memory::new(max_bytes, keep);
        let mut entries: Vec<(Export, Arc<Fetched>)> = self
            .moka
            .iter()
            .filter(|(_, entry)| accept(entry))
            .map(|(key, entry)| (Export::clone(&key), entry))
            .collect();
        entries.sort_by_key(|(_, entry)| entry.received);
        let max_entry = next.max_entry_bytes();
        for (key, entry) in entries {
            if entry.body.len() <= max_entry {
                next.insert(key, entry).await;
            }
        }
        next.moka.run_pending_tasks().await;
        next
    }

    pub async fn maintain(&self) {
        self.moka.run_pending_tasks().await;
    }

    /// Entries and weighted bytes, after moka's pending housekeeping.
    pub async fn usage(&self) -> (u64, u64) {
        self.moka.run_pending_tasks().await;
        (self.moka.entry_count(), self.moka.weighted_size())
    }
}

/// What one entry costs: its body, key and header values as the allocator rounds them, plus
/// the fixed part around them (see [`ENTRY_OVERHEAD`]).
fn weight(key: &Export, entry: &Fetched) -> usize {
    allocated(entry.body.len())
        + allocated(key.agent.len())
        + allocated(key.convo.len())
        + allocated(entry.headers.value_bytes())
        + entry
            .encoded
            .made()
            .map(|(_, bytes)| allocated(bytes.len()))
            .sum::<usize>()
        + match entry.encoded.slots_bytes() {
            0 => 0,
            n => allocated(n),
        }
        + ENTRY_OVERHEAD
}

/// The bytes an allocation of `n` really takes: size classes four to a doubling, 16 bytes
/// at least (jemalloc's, the binary's allocator; glibc's are finer, so this never undercounts).
fn allocated(n: usize) -> usize {
    if n <= 16 {
        return 16;
    }
    let below = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
    let step = (below / 4).max(16);
    n.div_ceil(step).saturating_mul(step)
}

#[cfg(test)]
mod tests {
    use super::allocated;

    #[test]
    fn allocations_round_to_size_classes() {
        let cases = [
            (0, 16),
            (1, 16),
            (16, 16),
            (17, 32),
            (33, 48),
            (129, 160),
            (256, 256),
            (257, 320),
            (2048, 2048),
            (2049, 2560),
            (1 << 20, 1 << 20),
            ((1 << 20) + 1, (1 << 20) + (1 << 18)),
        ];
        for (n, want) in cases {
            assert_eq!(allocated(n), want, "allocated({n})");
        }
    }
}
