//! Purge epochs per conversation: a fetch remembers its conversation's epoch when it starts,
//! and does not keep what it fetched if a purge of that conversation came meanwhile. Purges
//! of other conversations do not touch it.
//!
//! Bounded: conversations share a fixed number of counters by a seeded hash, so memory does not
//! grow with the conversations purged; two that share a counter only make a fetch overlapping
//! a purge of the other skip storing (it is still answered).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

const STRIPES: usize = 4096;

pub struct Epochs {
    counters: Box<[AtomicU64]>,
    hasher: foldhash::fast::RandomState,
}

impl Default for Epochs {
    fn default() -> Self {
        Epochs {
            counters: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl Epochs {
    fn counter(&self, agent: &str, convo: &str) -> &AtomicU64 {
        let i = self.hasher.hash_one((agent, convo)) as usize % STRIPES;
        &self.counters[i]
    }

    /// The conversation's epoch now.
    pub fn epoch(&self, agent: &str, convo: &str) -> u64 {
        self.counter(agent, convo).load(Ordering::SeqCst)
    }

    /// A purge of the conversation: fetches that started before it keep nothing.
    pub fn bump(&self, agent: &str, convo: &str) {
        self.counter(agent, convo).fetch_add(1, Ordering::SeqCst);
    }
}
