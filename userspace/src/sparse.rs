//! Tables keyed per connection give their memory back after a burst.
//!
//! A `HashMap` keeps its capacity when entries go: after 10,000 connections came and went,
//! the tables that held one entry each (delivery hints, open inbound connections, kernel
//! figures per socket) would keep room for 16,384 for the proxy's life. `shrink_if_sparse`
//! after a removal shrinks a table once it is less than a quarter full, to twice what it
//! holds: a table must lose half its entries between two shrinks, so the rehash is paid at
//! most once per removed entry, and the room left means the next few inserts do not grow
//! it straight back.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::{BuildHasher, Hash},
};

/// Below this capacity a table is left alone: small tables cost little and churn most.
const MIN_CAPACITY: usize = 64;

/// Shrinking after removals; see the module docs for the policy.
pub trait ShrinkIfSparse {
    fn shrink_if_sparse(&mut self);
}

/// The capacity to shrink to, if a table holding `len` in `capacity` is sparse.
fn target(len: usize, capacity: usize) -> Option<usize> {
    (capacity > MIN_CAPACITY && len.saturating_mul(4) < capacity).then(|| (len * 2).max(MIN_CAPACITY))
}

impl<K: Eq + Hash, V, S: BuildHasher> ShrinkIfSparse for HashMap<K, V, S> {
    fn shrink_if_sparse(&mut self) {
        if let Some(to) = target(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }
}

impl<T: Eq + Hash, S: BuildHasher> ShrinkIfSparse for HashSet<T, S> {
    fn shrink_if_sparse(&mut self) {
        if let Some(to) = target(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }
}

impl<T> ShrinkIfSparse for VecDeque<T> {
    fn shrink_if_sparse(&mut self) {
        if let Some(to) = target(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_emptied_after_a_burst_gives_its_room_back() {
        let mut m: HashMap<u32, u64> = (0..10_000).map(|i| (i, 0)).collect();
        let peak = m.capacity();
        assert!(peak >= 10_000);
        for i in 0..10_000 {
            m.remove(&i);
            m.shrink_if_sparse();
        }
        assert!(m.is_empty());
        assert!(m.capacity() <= 2 * MIN_CAPACITY, "capacity {} after emptying (peak {peak})", m.capacity());
    }

    #[test]
    fn a_table_shrinks_only_when_less_than_a_quarter_full_and_keeps_room() {
        let mut m: HashMap<u32, u64> = (0..4096).map(|i| (i, 0)).collect();
        let peak = m.capacity();
        // Half gone: still more than a quarter full, nothing moves. (Removals alone may
        // lower `capacity()` a little: hashbrown's tombstones.)
        for i in 0..2048 {
            m.remove(&i);
            let before = m.capacity();
            m.shrink_if_sparse();
            assert_eq!(m.capacity(), before, "shrunk with {} entries", m.len());
        }
        // Down to a few hundred: shrunk, with room for as many again.
        for i in 2048..3800 {
            m.remove(&i);
            m.shrink_if_sparse();
        }
        assert!(m.capacity() < peak / 2, "capacity {} of peak {peak}", m.capacity());
        assert!(m.capacity() >= 2 * m.len(), "capacity {} for {} entries", m.capacity(), m.len());
        assert!((3800..4096).all(|i| m.contains_key(&i)), "entries survive the shrink");
    }

    #[test]
    fn small_tables_are_left_alone() {
        let mut s: HashSet<u32> = (0..MIN_CAPACITY as u32 / 2).collect();
        let cap = s.capacity();
        s.clear();
        s.shrink_if_sparse();
        assert_eq!(s.capacity(), cap);
    }

    #[test]
    fn queues_shrink_too() {
        let mut q: VecDeque<u64> = (0..10_000).collect();
        while q.len() > 10 {
            q.pop_front();
            q.shrink_if_sparse();
        }
        assert!(q.capacity() <= 2 * MIN_CAPACITY, "capacity {}", q.capacity());
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), (9990..10_000).collect::<Vec<_>>());
    }
}
