//! The prefix cache: KV caches of recent prompts, shared by every sequence of a replica, so a
//! prompt re-uses the positions it shares with an earlier one instead of evaluating them
//! again (the muse's primes; the majordomo's critique prompts, which share their
//! instructions).
//!
//! A conversation's next turn is the previous prompt, the reply and the new message, and a
//! retried attempt primes the very same prompt: both start with a prompt primed before. Each
//! entry holds a prompt's token ids and a KV cache of exactly their positions; a checkout finds
//! the entry sharing the longest prefix with a new prompt. Entries are kept least recently used
//! first out within a byte budget of their own, beside the sessions' `kv_memory_mb`.
//!
//! A prompt that extends a stored one whole takes that entry out and grows it in place: storing
//! the longer prompt would replace the entry anyway, and a long conversation's KV (45 MB at a
//! thousand positions of SmolLM2) is then never copied, where a copy per prime took longer than
//! the new tokens' forward. A prompt sharing only part of an entry (another conversation with
//! the same instructions) copies that part and leaves the entry in place. Either way no lock
//! is held across a copy or a forward. The caller stores its cache back, by move, when it is
//! done with it (see [`PrefixCache::insert`]).

use crate::cache::KvCache;
use std::sync::{Arc, Mutex};

/// A prompt and the KV cache holding exactly its positions.
struct Entry {
    ids: Vec<u32>,
    cache: KvCache,
}

impl Entry {
    /// Bytes the entry keeps alive.
    fn bytes(&self) -> usize {
        self.cache.memory_bytes() + std::mem::size_of_val(self.ids.as_slice())
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

    /// A cache holding the first positions of `ids` that a stored prompt shares with it, at
    /// most `limit`, with room for `capacity` positions in all (the rest of the prompt, a
    /// reply; at most the model's context) so that the appends which follow do not grow it,
    /// copying it again; `None` when no entry shares a token. An entry
    /// that `ids` extends whole is taken out and reused without a copy (unless another caller
    /// is copying from it at that moment); one shared in part is copied, and stays.
    pub fn checkout(
        &self,
        ids: &[u32],
        limit: usize,
        capacity: usize,
    ) -> crate::Result<Option<(KvCache, usize)>> {
        let (entry, shared, taken) = {
            let mut e = self.lock();
            let Some((i, shared)) = e
                .lru
                .iter()
                .map(|entry| common_prefix(&entry.ids, ids))
                .enumerate()
                .max_by_key(|&(i, shared)| (shared, i))
                .filter(|&(_, shared)| shared.min(limit) > 0)
            else {
                return Ok(None);
            };
            let entry = e.lru.remove(i);
            let taken = shared == entry.ids.len();
            if taken {
                e.bytes -= entry.bytes();
            } else {
                e.lru.push(entry.clone());
            }
            (entry, shared, taken)
        };
        let n = shared.min(limit);
        let cache = match Arc::try_unwrap(entry) {
            Ok(Entry { mut cache, .. }) if taken => {
                cache.truncate(n);
                cache.reserve(capacity.min(cache.max_len()).saturating_sub(n))?;
                cache
            }
            Ok(entry) => entry
                .cache
                .fork_prefix_with_room(n, capacity.saturating_sub(n))?,
            Err(entry) => entry
                .cache
                .fork_prefix_with_room(n, capacity.saturating_sub(n))?,
        };
        Ok(Some((cache, n)))
    }

    /// Stores `cache`'s first `ids.len()` positions, which hold `ids` (positions past them,
    /// a reply's, are forgotten), replacing the entries whose prompts are prefixes of `ids`:
    /// their sessions have moved on, and this entry serves every prompt they would. The least
    /// recently used entries make room; an entry larger than the whole budget is not kept.
    pub fn insert(&self, ids: Vec<u32>, mut cache: KvCache) {
        debug_assert!(cache.len() >= ids.len(), "the cache holds the prompt");
        cache.truncate(ids.len());
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
