//! A sliding window of counters in fixed-width buckets: requests and tokens per minute, outcomes over the
//! breaker window. O(1) to add and read; allocation only when built.

/// Number of counters kept per bucket.
pub(crate) const COLS: usize = 3;

/// Counters over the last `N * width` seconds, to the resolution of one bucket. Plain data of a fixed size, so
/// that it can live in memory shared by worker processes (`region.rs`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct Window<const N: usize> {
    width: f64,
    buckets: [[u64; COLS]; N],
    /// Absolute number (`floor(now / width)`) of the newest bucket.
    head: i64,
    sums: [u64; COLS],
}

impl<const N: usize> Window<N> {
    /// A window of `N` buckets of `width` seconds each.
    pub(crate) fn new(width: f64) -> Self {
        let width = if width.is_finite() && width > 0.0 {
            width
        } else {
            1.0
        };
        Window {
            width,
            buckets: [[0; COLS]; N],
            head: i64::MIN,
            sums: [0; COLS],
        }
    }

    fn bucket_of(&self, now: f64) -> i64 {
        // Saturating float-to-int conversion; times are finite seconds from the pool's epoch.
        (now / self.width).floor() as i64
    }

    fn slot(&self, bucket: i64) -> usize {
        bucket.rem_euclid(self.buckets.len() as i64) as usize
    }

    /// Drops the buckets that fell out of the window at `now`. Time never runs backwards here: an earlier
    /// `now` than already seen counts into the newest bucket.
    pub(crate) fn advance(&mut self, now: f64) {
        let bucket = self.bucket_of(now);
        if bucket <= self.head {
            return;
        }
        let len = self.buckets.len() as i64;
        if self.head == i64::MIN || bucket - self.head >= len {
            self.buckets.iter_mut().for_each(|b| *b = [0; COLS]);
            self.sums = [0; COLS];
        } else {
            for b in self.head + 1..=bucket {
                let slot = self.slot(b);
                for (sum, v) in self.sums.iter_mut().zip(self.buckets[slot].iter_mut()) {
                    *sum = sum.saturating_sub(*v);
                    *v = 0;
                }
            }
        }
        self.head = bucket;
    }

    /// Adds `values` at `now`.
    pub(crate) fn add(&mut self, now: f64, values: [u64; COLS]) {
        self.advance(now);
        let slot = self.slot(self.head);
        for ((sum, b), v) in self
            .sums
            .iter_mut()
            .zip(self.buckets[slot].iter_mut())
            .zip(values)
        {
            *b = b.saturating_add(v);
            *sum = sum.saturating_add(v);
        }
    }

    /// The totals in the window as of the last `advance`/`add`.
    pub(crate) fn sums(&self) -> [u64; COLS] {
        self.sums
    }

    /// Seconds from `now` until column `col` drops below `limit` as old buckets expire (0 if it already is).
    pub(crate) fn time_until_below(&self, now: f64, col: usize, limit: u64) -> f64 {
        let Some(&total) = self.sums.get(col) else {
            return 0.0;
        };
        if total < limit {
            return 0.0;
        }
        let len = self.buckets.len() as i64;
        let mut left = total;
        // Bucket `b` leaves the window when the head reaches `b + len`, i.e. at time (b + len) * width.
        for b in self.head - len + 1..=self.head {
            left = left.saturating_sub(self.buckets[self.slot(b)][col]);
            if left < limit {
                return ((b + len) as f64 * self.width - now).max(0.0);
            }
        }
        // Unreachable while `limit > 0`: every bucket has expired by then.
        ((self.head + len) as f64 * self.width - now).max(0.0)
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = [0; COLS]);
        self.sums = [0; COLS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_after_the_window() {
        let mut w = Window::<60>::new(1.0);
        w.add(0.5, [1, 100, 0]);
        w.add(30.2, [2, 10, 0]);
        assert_eq!(w.sums(), [3, 110, 0]);
        w.advance(59.9);
        assert_eq!(w.sums(), [3, 110, 0]);
        w.advance(60.0);
        assert_eq!(w.sums(), [2, 10, 0]);
        w.advance(1000.0);
        assert_eq!(w.sums(), [0, 0, 0]);
    }

    #[test]
    fn time_until_below_finds_the_expiring_bucket() {
        let mut w = Window::<60>::new(1.0);
        w.add(10.0, [2, 0, 0]);
        w.add(20.5, [3, 0, 0]);
        assert_eq!(w.time_until_below(25.0, 0, 6), 0.0);
        // 5 >= 5: after the bucket at t=10 expires (t=70) 3 remain < 5.
        assert!((w.time_until_below(25.0, 0, 5) - 45.0).abs() < 1e-9);
        // Under 3 only once the t=20 bucket expires too (t=80).
        assert!((w.time_until_below(25.0, 0, 3) - 55.0).abs() < 1e-9);
    }

    #[test]
    fn earlier_time_counts_into_newest_bucket() {
        let mut w = Window::<10>::new(1.0);
        w.add(5.0, [1, 0, 0]);
        w.add(4.0, [1, 0, 0]);
        assert_eq!(w.sums()[0], 2);
    }
}
