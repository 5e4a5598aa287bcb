//! The prefix cache: KV caches of recent prompts, shared by every sequence of a replica, so a
//! prompt re-uses the positions it shares with an earlier one instead of evaluating them
//! again (the muse's primes; the majordomo's critique prompts, which share their
//! instructions).
//!
//! A conversation's next turn is the previous prompt, the reply and the new message, and a
//! retried attempt primes the very same prompt: both start with a prompt primed before. Each
//! entry holds a prompt's token ids and a fork of the KV cache right after them; a lookup finds
//! the entry sharing the longest prefix with a new prompt. Entries are kept least recently used
//! first out within a byte budget of their own, beside the sessions' `kv_memory_mb`.
//!
//! Entries are immutable once stored: a hit hands out the entry and the caller forks its cache
//! outside the lock, so no lock is held across a copy or a forward.

use crate::cache::KvCache;
use std::sync::{Arc, Mutex};

/// A prompt and the KV cache holding exactly its positions.
pub struct Entry {
    ids: Vec<u32>,
    cache: KvCache,
}

impl Entry {
    /// Bytes the entry keeps alive.
    fn bytes(&self) -> usize {
        self.cache.memory_bytes() + std::mem::size_of_val(self.ids.as_slice())
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
}

/// The longest prefix shared with a stored prompt.
pub struct Hit {
    pub entry: Arc<Entry>,
    /// Leading token ids the prompt shares with `entry`.
    pub shared: usize,
}

impl Hit {
    /// The entry holds exactly `ids` (the same prompt primed again).
    pub fn is_exact(&self, ids: &[u32]) -> bool {
        self.shared == ids.len() && self.entry.ids.len() == ids.len()
    }
}

#[derive(Default)]
struct Entries {
    /// Least recently used first.
    lru: Vec<Arc<Entry>>,
    bytes: usize,
}

pub struct PrefixCache {
    budget: usize,
    entries: Mutex<Entries>,
}

impl PrefixCache {
    /// A cache keeping at most `budget` bytes of entries; 0 keeps none.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: Mutex::default(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes held by the entries.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().expect("prefix cache lock")
    }

    /// The entry sharing the longest prefix with `ids` (at least one token), now the most
    /// recently used.
    pub fn lookup(&self, ids: &[u32]) -> Option<Hit> {
        let mut e = self.lock();
        let (i, shared) = e
            .lru
            .iter()
            .map(|entry| common_prefix(&entry.ids, ids))
            .enumerate()
            .max_by_key(|&(i, shared)| (shared, i))
            .filter(|&(_, shared)| shared > 0)?;
        let entry = e.lru.remove(i);
        e.lru.push(entry.clone());
        Some(Hit { entry, shared })
    }

    /// Stores `cache` (its positions are exactly `ids`), replacing the entries whose prompts
    /// are prefixes of `ids`: their sessions have moved on, and this entry serves every prompt
    /// they would. The least recently used entries make room; an entry larger than the whole
    /// budget is not kept.
    pub fn insert(&self, ids: Vec<u32>, cache: KvCache) {
        let entry = Entry { ids, cache };
        let bytes = entry.bytes();
        if bytes > self.budget {
            return;
        }
        let mut e = self.lock();
        let mut freed = 0;
        e.lru.retain(|old| {
            let superseded = entry.ids.starts_with(&old.ids);
            if superseded {
                freed += old.bytes();
            }
            !superseded
        });
        e.bytes -= freed;
        while e.bytes + bytes > self.budget {
            let old = e.lru.remove(0);
            e.bytes -= old.bytes();
        }
        e.bytes += bytes;
        e.lru.push(Arc::new(entry));
    }
}

/// Leading elements `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
