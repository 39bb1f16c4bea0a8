//! Meters: in-memory usage aggregates. Every finished request lands in one bucket per
//! (minute, route, deployment, model, client key, run, tags), drained as deltas to the ledger, and in a
//! cumulative per-(route, deployment) series rendered as Prometheus text.

pub mod histogram;
mod prometheus;
pub mod rate;

use hashbrown::{Equivalent, HashMap};
use histogram::Histogram;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Why a request failed, one counter column each (`errors_<class>`).
pub const ERROR_CLASSES: [&str; 9] = [
    "client_4xx",
    "upstream_4xx",
    "rate_limited",
    "upstream_5xx",
    "timeout",
    "client_disconnect",
    "cancelled_hedge",
    "upstream_error",
    "cancelled",
];

/// Token kinds, each counted twice: as reported by the provider and as estimated locally.
pub const TOKEN_KINDS: [&str; 5] = [
    "input",
    "output",
    "cached_input",
    "cache_write",
    "reasoning",
];

/// The errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// `error_class` is not one of [`ERROR_CLASSES`] (nor empty).
    #[error("unknown error class {0:?}; expected \"\" or one of {ERROR_CLASSES:?}")]
    UnknownErrorClass(String),
    /// A histogram's text form did not parse.
    #[error("bad histogram bucket {0:?}; expected comma-separated index:count pairs")]
    BadHistogram(String),
    /// A row handed back to `restore` has a field of the wrong type or an unknown name.
    #[error("bad meter row field {0:?}")]
    BadField(String),
}

/// Everything about one finished request (success, error, disconnect or cancelled hedge).
#[derive(Debug, Clone, Default)]
pub struct Record<'a> {
    /// Unix time the request ended (picks the minute bucket).
    pub ts: f64,
    /// Bucket key strings.
    pub route: &'a str,
    pub deployment: &'a str,
    pub model: &'a str,
    pub key_id: &'a str,
    pub key_name: &'a str,
    pub run: &'a str,
    pub tags: &'a str,
    /// HTTP status sent to the client (0 if none was).
    pub status: u16,
    /// `""` on success, else one of [`ERROR_CLASSES`].
    pub error_class: &'a str,
    /// Token counts in [`TOKEN_KINDS`] order, and whether each was estimated rather than reported.
    pub tokens: [u64; 5],
    pub estimated: [bool; 5],
    /// Cost in USD; `None` when the price is unknown (never counted as zero).
    pub cost_usd: Option<f64>,
    /// Time to first token (streams) and total duration, in seconds.
    pub ttft_s: Option<f64>,
    pub duration_s: f64,
}

/// Aggregated counters of one bucket (or of everything, for totals). All fields add.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub requests: u64,
    pub successes: u64,
    /// Per [`ERROR_CLASSES`] entry.
    pub errors: [u64; ERROR_CLASSES.len()],
    /// `[kind][0 = reported, 1 = estimated]`, kinds in [`TOKEN_KINDS`] order.
    pub tokens: [[u64; 2]; 5],
    /// Sum of the known costs.
    pub cost_usd: f64,
    /// Requests whose cost was unknown.
    pub cost_unknown_requests: u64,
    pub ttft_count: u64,
    pub ttft_sum_s: f64,
    pub ttft_hist: Histogram,
    pub duration_sum_s: f64,
    pub duration_hist: Histogram,
    /// Output tokens of successful requests and the time spent generating them (duration − ttft): tokens/s.
    pub gen_output_tokens: u64,
    pub gen_time_s: f64,
}

/// One field of a [`Row`] by name, as it crosses to Python and into SQLite.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Int(u64),
    Float(f64),
    /// A histogram in [`Histogram::encode`] form.
    Hist(String),
}

fn error_index(class: &str) -> Result<Option<usize>, MeterError> {
    if class.is_empty() {
        return Ok(None);
    }
    match ERROR_CLASSES.iter().position(|c| *c == class) {
        Some(i) => Ok(Some(i)),
        None => Err(MeterError::UnknownErrorClass(class.to_owned())),
    }
}

fn valid_seconds(v: f64) -> Option<f64> {
    (v.is_finite() && v >= 0.0).then_some(v)
}

impl Row {
    /// Adds one request.
    fn add(&mut self, r: &Record<'_>, error: Option<usize>) {
        self.requests += 1;
        match error {
            None => self.successes += 1,
            Some(i) => self.errors[i] += 1,
        }
        for (kind, (&n, &est)) in r.tokens.iter().zip(r.estimated.iter()).enumerate() {
            self.tokens[kind][usize::from(est)] += n;
        }
        match r.cost_usd.filter(|c| c.is_finite()) {
            Some(c) => self.cost_usd += c,
            None => self.cost_unknown_requests += 1,
        }
        let ttft = r.ttft_s.and_then(valid_seconds);
        if let Some(t) = ttft {
            self.ttft_count += 1;
            self.ttft_sum_s += t;
            self.ttft_hist.observe(t);
        }
        let duration = valid_seconds(r.duration_s).unwrap_or(0.0);
        self.duration_sum_s += duration;
        self.duration_hist.observe(duration);
        let output = r.tokens[1];
        let gen_time = duration - ttft.unwrap_or(0.0);
        if error.is_none() && output > 0 && gen_time > 0.0 {
            self.gen_output_tokens += output;
            self.gen_time_s += gen_time;
        }
    }

    /// Adds another row's counters.
    pub fn merge(&mut self, o: &Row) {
        self.requests += o.requests;
        self.successes += o.successes;
        for (a, b) in self.errors.iter_mut().zip(o.errors.iter()) {
            *a += b;
        }
        for (a, b) in self.tokens.iter_mut().zip(o.tokens.iter()) {
            a[0] += b[0];
            a[1] += b[1];
        }
        self.cost_usd += o.cost_usd;
        self.cost_unknown_requests += o.cost_unknown_requests;
        self.ttft_count += o.ttft_count;
        self.ttft_sum_s += o.ttft_sum_s;
        self.ttft_hist.merge(&o.ttft_hist);
        self.duration_sum_s += o.duration_sum_s;
        self.duration_hist.merge(&o.duration_hist);
        self.gen_output_tokens += o.gen_output_tokens;
        self.gen_time_s += o.gen_time_s;
    }

    /// Every counter with its column name, in a stable order (the ledger's `usage_minute` columns).
    pub fn fields(&self) -> Vec<(String, FieldValue)> {
        use FieldValue::{Float, Hist, Int};
        let mut out = Vec::with_capacity(32);
        out.push(("requests".to_owned(), Int(self.requests)));
        out.push(("successes".to_owned(), Int(self.successes)));
        for (class, n) in ERROR_CLASSES.iter().zip(self.errors.iter()) {
            out.push((format!("errors_{class}"), Int(*n)));
        }
        for (kind, n) in TOKEN_KINDS.iter().zip(self.tokens.iter()) {
            out.push((format!("{kind}_reported"), Int(n[0])));
            out.push((format!("{kind}_estimated"), Int(n[1])));
        }
        out.push(("cost_usd".to_owned(), Float(self.cost_usd)));
        out.push((
            "cost_unknown_requests".to_owned(),
            Int(self.cost_unknown_requests),
        ));
        out.push(("ttft_count".to_owned(), Int(self.ttft_count)));
        out.push(("ttft_sum_s".to_owned(), Float(self.ttft_sum_s)));
        out.push(("ttft_hist".to_owned(), Hist(self.ttft_hist.encode())));
        out.push(("duration_sum_s".to_owned(), Float(self.duration_sum_s)));
        out.push((
            "duration_hist".to_owned(),
            Hist(self.duration_hist.encode()),
        ));
        out.push(("gen_output_tokens".to_owned(), Int(self.gen_output_tokens)));
        out.push(("gen_time_s".to_owned(), Float(self.gen_time_s)));
        out
    }

    /// Adds `value` to the counter named `name` (the inverse of [`Row::fields`]).
    pub fn add_field(&mut self, name: &str, value: &FieldValue) -> Result<(), MeterError> {
        let bad = || MeterError::BadField(name.to_owned());
        let int = || match value {
            FieldValue::Int(n) => Ok(*n),
            _ => Err(bad()),
        };
        let float = || match value {
            FieldValue::Float(f) => Ok(*f),
            FieldValue::Int(n) => Ok(*n as f64),
            _ => Err(bad()),
        };
        let hist = || match value {
            FieldValue::Hist(s) => Histogram::decode(s),
            _ => Err(bad()),
        };
        match name {
            "requests" => self.requests += int()?,
            "successes" => self.successes += int()?,
            "cost_usd" => self.cost_usd += float()?,
            "cost_unknown_requests" => self.cost_unknown_requests += int()?,
            "ttft_count" => self.ttft_count += int()?,
            "ttft_sum_s" => self.ttft_sum_s += float()?,
            "ttft_hist" => self.ttft_hist.merge(&hist()?),
            "duration_sum_s" => self.duration_sum_s += float()?,
            "duration_hist" => self.duration_hist.merge(&hist()?),
            "gen_output_tokens" => self.gen_output_tokens += int()?,
            "gen_time_s" => self.gen_time_s += float()?,
            _ => {
                if let Some(class) = name.strip_prefix("errors_") {
                    let i = ERROR_CLASSES
                        .iter()
                        .position(|c| *c == class)
                        .ok_or_else(bad)?;
                    self.errors[i] += int()?;
                } else {
                    let (kind, source) = name.rsplit_once('_').ok_or_else(bad)?;
                    let k = TOKEN_KINDS
                        .iter()
                        .position(|c| *c == kind)
                        .ok_or_else(bad)?;
                    let s = match source {
                        "reported" => 0,
                        "estimated" => 1,
                        _ => return Err(bad()),
                    };
                    self.tokens[k][s] += int()?;
                }
            }
        }
        Ok(())
    }
}

/// The key of one aggregated bucket. `minute` is the Unix time (seconds) the minute starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub minute: i64,
    pub route: Box<str>,
    pub deployment: Box<str>,
    pub model: Box<str>,
    pub key_id: Box<str>,
    pub key_name: Box<str>,
    pub run: Box<str>,
    pub tags: Box<str>,
}

/// A borrowed [`BucketKey`]: hashes identically (same field order, `&str` and `Box<str>` hash alike), so
/// `record()` finds an existing bucket without allocating.
#[derive(Hash)]
struct BucketRef<'a> {
    minute: i64,
    route: &'a str,
    deployment: &'a str,
    model: &'a str,
    key_id: &'a str,
    key_name: &'a str,
    run: &'a str,
    tags: &'a str,
}

impl Equivalent<BucketKey> for BucketRef<'_> {
    fn equivalent(&self, k: &BucketKey) -> bool {
        self.minute == k.minute
            && self.route == &*k.route
            && self.deployment == &*k.deployment
            && self.model == &*k.model
            && self.key_id == &*k.key_id
            && self.key_name == &*k.key_name
            && self.run == &*k.run
            && self.tags == &*k.tags
    }
}

impl BucketRef<'_> {
    fn to_owned_key(&self) -> BucketKey {
        BucketKey {
            minute: self.minute,
            route: self.route.into(),
            deployment: self.deployment.into(),
            model: self.model.into(),
            key_id: self.key_id.into(),
            key_name: self.key_name.into(),
            run: self.run.into(),
            tags: self.tags.into(),
        }
    }
}

/// Start of the minute containing `ts` (Unix seconds); non-finite times land in minute 0.
pub fn minute_of(ts: f64) -> i64 {
    if ts.is_finite() {
        ((ts / 60.0).floor() as i64) * 60
    } else {
        0
    }
}

#[derive(Default)]
struct Inner {
    pending: HashMap<BucketKey, Row>,
    series: HashMap<prometheus::SeriesKey, prometheus::Series>,
    totals: Row,
}

/// The meters of one process: pending deltas for the ledger, cumulative series for Prometheus, totals.
#[derive(Default)]
pub struct Meters {
    inner: Mutex<Inner>,
}

impl Meters {
    /// Empty meters.
    pub fn new() -> Meters {
        Meters::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters consistent enough to keep counting.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one finished request.
    pub fn record(&self, r: &Record<'_>) -> Result<(), MeterError> {
        let error = error_index(r.error_class)?;
        let key = BucketRef {
            minute: minute_of(r.ts),
            route: r.route,
            deployment: r.deployment,
            model: r.model,
            key_id: r.key_id,
            key_name: r.key_name,
            run: r.run,
            tags: r.tags,
        };
        let mut inner = self.lock();
        match inner.pending.get_mut(&key) {
            Some(row) => row.add(r, error),
            None => {
                let mut row = Row::default();
                row.add(r, error);
                inner.pending.insert(key.to_owned_key(), row);
            }
        }
        inner.totals.add(r, error);
        prometheus::observe(&mut inner.series, r, error);
        Ok(())
    }

    /// Takes the deltas recorded since the last drain, sorted by key.
    pub fn drain(&self) -> Vec<(BucketKey, Row)> {
        let pending = std::mem::take(&mut self.lock().pending);
        let mut rows: Vec<(BucketKey, Row)> = pending.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// Puts drained rows back (their write failed), adding to whatever was recorded since.
    /// Totals and Prometheus series are untouched: they already counted these requests.
    pub fn restore(&self, rows: Vec<(BucketKey, Row)>) {
        let mut inner = self.lock();
        for (key, row) in rows {
            inner.pending.entry(key).or_default().merge(&row);
        }
    }

    /// Number of buckets waiting for the next drain.
    pub fn pending_buckets(&self) -> usize {
        self.lock().pending.len()
    }

    /// Cumulative counters since start as Prometheus text exposition (format 0.0.4).
    pub fn prometheus(&self) -> String {
        prometheus::render(&self.lock().series)
    }

    /// Cumulative totals since start.
    pub fn totals(&self) -> Row {
        self.lock().totals.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(route: &'a str, run: &'a str, error_class: &'a str) -> Record<'a> {
        Record {
            ts: 1_700_000_000.5,
            route,
            deployment: "d1",
            model: "gpt-4o",
            key_id: "k1",
            key_name: "team-a",
            run,
            tags: "",
            status: if error_class.is_empty() { 200 } else { 502 },
            error_class,
            tokens: [100, 20, 50, 0, 5],
            estimated: [false, true, false, false, false],
            cost_usd: Some(0.01),
            ttft_s: Some(0.25),
            duration_s: 1.25,
        }
    }

    #[test]
    fn aggregates_per_bucket() {
        let m = Meters::new();
        m.record(&rec("r", "run1", "")).unwrap();
        m.record(&rec("r", "run1", "")).unwrap();
        m.record(&rec("r", "run1", "upstream_5xx")).unwrap();
        m.record(&rec("r", "run2", "")).unwrap();
        let mut late = rec("r", "run1", "");
        late.ts += 60.0;
        late.cost_usd = None;
        m.record(&late).unwrap();

        let rows = m.drain();
        assert_eq!(rows.len(), 3);
        let (k, row) = &rows[0];
        assert_eq!(k.minute, 1_699_999_980);
        assert_eq!(&*k.run, "run1");
        assert_eq!(row.requests, 3);
        assert_eq!(row.successes, 2);
        assert_eq!(row.errors[3], 1);
        assert_eq!(row.tokens[0], [300, 0]);
        assert_eq!(row.tokens[1], [0, 60]);
        assert!((row.cost_usd - 0.03).abs() < 1e-12);
        assert_eq!(row.cost_unknown_requests, 0);
        assert_eq!(row.ttft_count, 3);
        assert_eq!(row.duration_hist.count(), 3);
        // Only the two successes count toward tokens/s: 2 × 20 tokens over 2 × 1.0 s.
        assert_eq!(row.gen_output_tokens, 40);
        assert!((row.gen_time_s - 2.0).abs() < 1e-12);
        assert_eq!(rows[2].0.minute, 1_700_000_040);
        assert_eq!(rows[2].1.cost_unknown_requests, 1);
        assert_eq!(rows[2].1.cost_usd, 0.0);

        let t = m.totals();
        assert_eq!(t.requests, 5);
        assert_eq!(t.tokens[0][0], 500);
    }

    #[test]
    fn unknown_error_class_is_an_error() {
        let m = Meters::new();
        assert!(matches!(
            m.record(&rec("r", "x", "boom")),
            Err(MeterError::UnknownErrorClass(_))
        ));
        assert_eq!(m.totals().requests, 0);
    }

    #[test]
    fn drain_returns_deltas_and_restore_does_not_double_count() {
        let m = Meters::new();
        for _ in 0..4 {
            m.record(&rec("r", "a", "")).unwrap();
        }
        let first = m.drain();
        assert_eq!(first[0].1.requests, 4);
        assert!(m.drain().is_empty());

        m.record(&rec("r", "a", "")).unwrap();
        m.restore(first.clone());
        let again = m.drain();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1.requests, 5);
        assert_eq!(again[0].1.duration_hist.count(), 5);
        assert!(m.drain().is_empty());
        // Cumulative views saw each request once.
        assert_eq!(m.totals().requests, 5);
        assert!(m.prometheus().contains(
            "tokenrelay_requests_total{route=\"r\",deployment=\"d1\",status_class=\"2xx\"} 5\n"
        ));
    }

    #[test]
    fn fields_round_trip_through_add_field() {
        let m = Meters::new();
        m.record(&rec("r", "a", "timeout")).unwrap();
        m.record(&rec("r", "a", "")).unwrap();
        let (_, row) = m.drain().remove(0);
        let fields = row.fields();
        let mut names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), fields.len());
        let mut back = Row::default();
        for (name, value) in &fields {
            back.add_field(name, value).unwrap();
        }
        assert_eq!(back, row);
        assert!(back.add_field("nope", &FieldValue::Int(1)).is_err());
        assert!(back.add_field("requests", &FieldValue::Float(1.0)).is_err());
        assert!(back
            .add_field("input_sideways", &FieldValue::Int(1))
            .is_err());
    }

    #[test]
    fn bad_times_do_not_poison_sums() {
        let m = Meters::new();
        let mut r = rec("r", "a", "");
        r.ts = f64::NAN;
        r.ttft_s = Some(f64::NAN);
        r.duration_s = f64::INFINITY;
        r.cost_usd = Some(f64::NAN);
        m.record(&r).unwrap();
        let (k, row) = m.drain().remove(0);
        assert_eq!(k.minute, 0);
        assert_eq!(row.ttft_count, 0);
        assert_eq!(row.duration_sum_s, 0.0);
        assert_eq!(row.cost_unknown_requests, 1);
        assert!(!m.prometheus().contains("NaN"));
    }
}
