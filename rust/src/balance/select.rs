//! The pieces `pick()` is made of: a fixed-size set of deployment indices and a per-thread random source.
//! Neither allocates nor takes a lock.

use std::cell::Cell;

/// Most deployments one pool can hold (the size of [`IndexSet`]).
pub const MAX_DEPLOYMENTS: usize = 256;
const WORDS: usize = MAX_DEPLOYMENTS / 64;

/// A set of deployment indices below [`MAX_DEPLOYMENTS`], kept on the stack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexSet {
    words: [u64; WORDS],
}

impl IndexSet {
    /// The empty set.
    pub fn new() -> IndexSet {
        IndexSet::default()
    }

    /// Adds `i`; indices at or above [`MAX_DEPLOYMENTS`] are ignored (no pool holds them).
    pub fn insert(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    /// Removes `i`.
    pub fn remove(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    /// Whether `i` is in the set.
    pub fn contains(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The members also in `other`.
    pub fn intersect(&self, other: &IndexSet) -> IndexSet {
        let mut out = *self;
        for (a, b) in out.words.iter_mut().zip(other.words) {
            *a &= b;
        }
        out
    }

    /// The `k`-th member in increasing order.
    pub fn nth(&self, mut k: usize) -> Option<usize> {
        for (wi, &w) in self.words.iter().enumerate() {
            let ones = w.count_ones() as usize;
            if k < ones {
                let mut w = w;
                for _ in 0..k {
                    w &= w - 1; // clear the lowest set bit
                }
                return Some(wi * 64 + w.trailing_zeros() as usize);
            }
            k -= ones;
        }
        None
    }

    /// The first member at or after `start`, wrapping around below `n`.
    pub fn next_from(&self, start: usize, n: usize) -> Option<usize> {
        (start..n)
            .chain(0..start.min(n))
            .find(|&i| self.contains(i))
    }

    /// Iterates over the members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
        })
    }
}

impl FromIterator<usize> for IndexSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> IndexSet {
        let mut set = IndexSet::new();
        iter.into_iter().for_each(|i| set.insert(i));
        set
    }
}

thread_local! {
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A uniformly random number below `n` (`n > 0`) from a per-thread wyrand generator: no lock, no atomics.
pub(crate) fn random_below(n: usize) -> usize {
    let r = RNG.with(|cell| {
        let mut s = cell.get();
        if s == 0 {
            s = seed();
        }
        s = s.wrapping_add(0xa076_1d64_78bd_642f);
        cell.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    });
    // Lemire's multiply-shift: unbiased enough for load balancing, no division.
    ((u128::from(r) * n as u128) >> 64) as usize
}

fn seed() -> u64 {
    let local = 0u8;
    let addr = std::ptr::addr_of!(local) as u64; // differs per thread stack
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (addr.rotate_left(32) ^ nanos) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_set_basics() {
        let mut s: IndexSet = [3, 64, 200, 999].into_iter().collect();
        assert_eq!(s.len(), 3);
        assert!(s.contains(64) && !s.contains(999));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 64, 200]);
        assert_eq!(s.nth(1), Some(64));
        assert_eq!(s.nth(3), None);
        assert_eq!(s.next_from(65, 256), Some(200));
        assert_eq!(s.next_from(201, 256), Some(3));
        s.remove(64);
        assert_eq!(s.nth(1), Some(200));
    }

    #[test]
    fn random_below_covers_the_range() {
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[random_below(7)] += 1;
        }
        assert!(seen.iter().all(|&c| (700..1300).contains(&c)), "{seen:?}");
    }
}
