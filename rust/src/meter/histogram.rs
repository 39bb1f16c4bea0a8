//! Log-spaced latency histogram: fixed R10 bounds (10 per decade, 1 ms … 630 s) so any two histograms add
//! bucket by bucket, in memory, in SQLite rows and across worker processes.

use super::MeterError;
use std::fmt::Write;

/// Upper bounds (seconds, inclusive) of the finite buckets: the Renard R10 series from 1 ms to 630 s.
pub const BOUNDS: [f64; 59] = [
    0.001, 0.00125, 0.0016, 0.002, 0.0025, 0.00315, 0.004, 0.005, 0.0063, 0.008, 0.01, 0.0125,
    0.016, 0.02, 0.025, 0.0315, 0.04, 0.05, 0.063, 0.08, 0.1, 0.125, 0.16, 0.2, 0.25, 0.315, 0.4,
    0.5, 0.63, 0.8, 1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0, 10.0, 12.5, 16.0, 20.0,
    25.0, 31.5, 40.0, 50.0, 63.0, 80.0, 100.0, 125.0, 160.0, 200.0, 250.0, 315.0, 400.0, 500.0,
    630.0,
];

/// Number of buckets: one per bound plus the overflow bucket (> 630 s).
pub const BUCKETS: usize = BOUNDS.len() + 1;

/// Bucket counts; bucket `i` holds values in `(BOUNDS[i-1], BOUNDS[i]]`, bucket 0 everything ≤ 1 ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
        }
    }
}

/// The bucket a value (seconds) falls in. NaN and negatives land in bucket 0.
pub fn bucket_index(value: f64) -> usize {
    BOUNDS.partition_point(|bound| *bound < value)
}

impl Histogram {
    /// Counts one observation.
    pub fn observe(&mut self, value: f64) {
        self.counts[bucket_index(value)] += 1;
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
    }

    /// Total number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The raw bucket counts.
    pub fn counts(&self) -> &[u64; BUCKETS] {
        &self.counts
    }

    /// Observations ≤ `BOUNDS[bound]` (a Prometheus cumulative `le` bucket).
    pub fn cumulative(&self, bound: usize) -> u64 {
        self.counts.iter().take(bound + 1).sum()
    }

    /// True when nothing was observed.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| *c == 0)
    }

    /// The compact text form: `index:count` pairs of the non-empty buckets, comma separated (`""` if empty).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{i}:{c}");
        }
        out
    }

    /// Parses [`Histogram::encode`]'s form; repeated indexes add up.
    pub fn decode(text: &str) -> Result<Histogram, MeterError> {
        let mut hist = Histogram::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || MeterError::BadHistogram(pair.to_owned());
            let (index, count) = pair.split_once(':').ok_or_else(bad)?;
            let index: usize = index.trim().parse().map_err(|_| bad())?;
            let count: u64 = count.trim().parse().map_err(|_| bad())?;
            let slot = hist.counts.get_mut(index).ok_or_else(bad)?;
            *slot += count;
        }
        Ok(hist)
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) interpolated log-linearly inside its bucket; `None` if empty.
    /// Values past the last bound read as 630 s (the histogram cannot say more).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 || q.is_nan() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            if (below + count) as f64 >= rank {
                let frac = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
                return Some(match i {
                    0 => BOUNDS[0] * frac,
                    _ if i == BOUNDS.len() => BOUNDS[BOUNDS.len() - 1],
                    _ => {
                        let (lo, hi) = (BOUNDS[i - 1], BOUNDS[i]);
                        lo * (hi / lo).powf(frac)
                    }
                });
            }
            below += count;
        }
        Some(BOUNDS[BOUNDS.len() - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_increasing_and_buckets_inclusive() {
        assert!(BOUNDS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(bucket_index(0.0), 0);
        assert_eq!(bucket_index(0.001), 0);
        assert_eq!(bucket_index(0.0011), 1);
        assert_eq!(bucket_index(1.0), 30);
        assert_eq!(bucket_index(630.0), 58);
        assert_eq!(bucket_index(631.0), 59);
        assert_eq!(bucket_index(f64::NAN), 0);
        assert_eq!(bucket_index(-1.0), 0);
    }

    #[test]
    fn encode_decode_round_trip_and_merge() {
        let mut a = Histogram::default();
        for v in [0.0005, 0.2, 0.2, 3.0, 1000.0] {
            a.observe(v);
        }
        assert_eq!(a.encode(), "0:1,23:2,35:1,59:1");
        assert_eq!(Histogram::decode(&a.encode()).unwrap(), a);
        assert_eq!(Histogram::decode("").unwrap(), Histogram::default());
        let mut b = a.clone();
        b.merge(&a);
        assert_eq!(b.count(), 10);
        assert_eq!(Histogram::decode("23:2,23:3").unwrap().counts()[23], 5);
        assert!(Histogram::decode("60:1").is_err());
        assert!(Histogram::decode("x").is_err());
        assert!(Histogram::decode("1:-2").is_err());
    }

    #[test]
    fn quantiles_stay_within_one_bucket_of_the_truth() {
        // 1000 values spread log-uniformly over 10 ms .. 10 s: the true q-quantile is 10^(-2 + 3q).
        let mut h = Histogram::default();
        let n = 1000;
        for i in 0..n {
            h.observe(10f64.powf(-2.0 + 3.0 * (i as f64 + 0.5) / n as f64));
        }
        for q in [0.1, 0.5, 0.9, 0.99] {
            let truth = 10f64.powf(-2.0 + 3.0 * q);
            let got = h.quantile(q).unwrap();
            let ratio = got / truth;
            assert!(
                (0.8..1.25).contains(&ratio),
                "q={q} got {got} truth {truth}"
            );
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
        let mut over = Histogram::default();
        over.observe(5000.0);
        assert_eq!(over.quantile(0.99), Some(630.0));
    }

    #[test]
    fn single_value_quantile_lies_in_its_bucket() {
        let mut h = Histogram::default();
        h.observe(0.3);
        let p50 = h.quantile(0.5).unwrap();
        assert!((0.25..=0.315).contains(&p50), "{p50}");
    }
}
