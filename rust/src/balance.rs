//! Load balancing across a route's deployments: who gets the next request attempt, and the state that decides
//! it (outstanding requests, EWMA time to first token and tokens/s, circuit breaker, cooldowns, rpm/tpm).
//!
//! Python decides *when* to retry; this module decides *where*. Per attempt the caller does
//! `pick()` (reserves a slot), `first_token()` when the first token arrives, then exactly one `release()`.
//! `pick()` reads only atomics while it scans and locks just the deployment it reserves, so it allocates
//! nothing and costs tens of nanoseconds for a few deployments. Time is a parameter (`now`, seconds on any
//! monotonic clock) so tests can drive it.

mod deployment;
mod region;
mod select;
mod window;

#[cfg(test)]
mod shared_tests;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use deployment::{Circuit, Deployment, Inner, Refusal};
pub use deployment::{CONCURRENCY_RETRY_S, EWMA_ALPHA, PROBE_RETRY_S};
use region::Region;
pub use region::{monotonic_ns, MAX_WORKERS};
use select::random_below;
pub use select::{IndexSet, MAX_DEPLOYMENTS};

/// How a pool chooses among its eligible deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Power of two random choices: of two random deployments, the one with the lower
    /// `(outstanding + 1) * ewma_ttft / weight`. The default.
    P2c,
    /// Fewest outstanding requests (ties broken at random).
    LeastOutstanding,
    /// Each in turn.
    RoundRobin,
    /// Smooth weighted round robin by `weight` (nginx's algorithm).
    Weighted,
    /// Lowest EWMA time to first token; deployments without a sample are tried first.
    Latency,
    /// Highest EWMA output tokens/s; deployments without a sample are tried first.
    Fastest,
    /// The lowest `tier` number with a pickable deployment (p2c within the tier): a higher tier serves only
    /// while every deployment of the lower tiers is unavailable, busy or excluded.
    Priority,
}

impl Strategy {
    /// Every strategy, in the order of the docs.
    pub const ALL: [Strategy; 7] = [
        Strategy::P2c,
        Strategy::LeastOutstanding,
        Strategy::RoundRobin,
        Strategy::Weighted,
        Strategy::Latency,
        Strategy::Fastest,
        Strategy::Priority,
    ];

    /// Parses the configuration name (`"p2c"`, `"least_outstanding"`, ...).
    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::P2c => "p2c",
            Strategy::LeastOutstanding => "least_outstanding",
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::Latency => "latency",
            Strategy::Fastest => "fastest",
            Strategy::Priority => "priority",
        }
    }
}

/// When a deployment's circuit opens, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many consecutive failures.
    pub failures: u32,
    /// ... or when more than this share of the requests finished in the window failed,
    pub error_rate: f64,
    /// the window being this many seconds,
    pub window_s: f64,
    /// and holding at least this many finished requests.
    pub min_requests: u32,
    /// How long the circuit stays open before one probe may go.
    pub cooldown_s: f64,
    /// Each failed probe doubles the open time, up to this.
    pub max_cooldown_s: f64,
}

impl Default for BreakerConfig {
    fn default() -> BreakerConfig {
        BreakerConfig {
            failures: 3,
            error_rate: 0.5,
            window_s: 30.0,
            min_requests: 10,
            cooldown_s: 10.0,
            max_cooldown_s: 120.0,
        }
    }
}

impl BreakerConfig {
    fn validate(&self) -> Result<(), BalanceError> {
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if self.failures == 0 {
            return Err(BalanceError::config("breaker_failures", "must be >= 1"));
        }
        if !(self.error_rate > 0.0 && self.error_rate <= 1.0) {
            return Err(BalanceError::config(
                "breaker_error_rate",
                "must be in (0, 1]",
            ));
        }
        if !(self.window_s.is_finite() && self.window_s > 0.0) {
            return Err(BalanceError::config(
                "breaker_window_s",
                "must be a finite number > 0",
            ));
        }
        if !finite_nonneg(self.cooldown_s) {
            return Err(BalanceError::config(
                "cooldown_s",
                "must be a finite number >= 0",
            ));
        }
        if !finite_nonneg(self.max_cooldown_s) || self.max_cooldown_s < self.cooldown_s {
            return Err(BalanceError::config(
                "max_cooldown_s",
                "must be finite and >= cooldown_s",
            ));
        }
        Ok(())
    }
}

/// One deployment's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSpec {
    /// Its name, unique within the pool.
    pub name: String,
    /// Relative capacity (`weighted`, and the divisor of p2c's load score); >= 1.
    pub weight: u32,
    /// Preference order for `priority`: lower tiers first.
    pub tier: u32,
    /// Most requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Most requests started in any 60 s.
    pub rpm: Option<u32>,
    /// Most tokens (as reported to `release()`) in any 60 s.
    pub tpm: Option<u64>,
}

impl DeploymentSpec {
    /// A deployment with weight 1, tier 1 and no limits.
    pub fn new(name: impl Into<String>) -> DeploymentSpec {
        DeploymentSpec {
            name: name.into(),
            weight: 1,
            tier: 1,
            max_concurrent: None,
            rpm: None,
            tpm: None,
        }
    }
}

/// How one request attempt ended, as told to [`Pool::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served.
    Success,
    /// Failed on the deployment's side (connect error, 5xx, broken stream): counts toward the breaker.
    Failure,
    /// Refused with 429: counted in the error rate, but not a breaker failure (see [`Pool::cooldown`]).
    RateLimited,
    /// The client went away or the caller gave up: neither success nor failure.
    Cancelled,
}

impl Outcome {
    /// Parses `"success"`, `"failure"`, `"rate_limited"`, `"cancelled"` or `"client_gone"`.
    pub fn from_name(name: &str) -> Option<Outcome> {
        Some(match name {
            "success" => Outcome::Success,
            "failure" => Outcome::Failure,
            "rate_limited" => Outcome::RateLimited,
            "cancelled" | "client_gone" => Outcome::Cancelled,
            _ => return None,
        })
    }
}

/// The answer of [`Pool::pick`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    /// This deployment; a slot is reserved until [`Pool::release`].
    Picked(usize),
    /// Every eligible deployment is at its `max_concurrent`, rpm or tpm limit: queue and retry after about
    /// this many seconds ([`CONCURRENCY_RETRY_S`] when only concurrency is in the way).
    AllBusy {
        /// Seconds until a deployment probably has room.
        retry_after_s: f64,
    },
    /// Every deployment is excluded, down, open-circuited or cooling down.
    Unavailable {
        /// Seconds until the first comes back; `None` if none will on its own (all excluded or down).
        retry_after_s: Option<f64>,
    },
}

/// One deployment's state for `/usage`, `/metrics` and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentSnapshot {
    /// Its configuration.
    pub spec: DeploymentSpec,
    /// `"healthy"`, `"cooling_down"`, `"open"`, `"half_open"` or `"down"`.
    pub state: &'static str,
    /// Seconds until it is pickable again (0 when healthy, half-open or down).
    pub until_s: f64,
    /// Requests in flight.
    pub outstanding: u32,
    /// EWMA time to first token, once sampled.
    pub ewma_ttft_s: Option<f64>,
    /// EWMA output tokens per second, once sampled.
    pub ewma_tokens_per_s: Option<f64>,
    /// Failed plus rate-limited share of the requests finished in the breaker window.
    pub error_rate: f64,
    /// Requests picked since start.
    pub requests: u64,
    /// Failures since start.
    pub failures: u64,
    /// Rate-limited answers since start.
    pub rate_limited: u64,
    /// Requests started in the last 60 s.
    pub rpm_used: u64,
    /// Tokens reported in the last 60 s.
    pub tpm_used: u64,
}

/// What went wrong in a call to the pool.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BalanceError {
    /// A configuration value is out of range.
    #[error("{field}: {reason}")]
    Config {
        /// The offending field, e.g. `deployments[2].weight`.
        field: String,
        /// Why.
        reason: String,
    },
    /// The index names no deployment.
    #[error("no deployment {idx} in a pool of {len}")]
    UnknownDeployment {
        /// The index given.
        idx: usize,
        /// The pool's size.
        len: usize,
    },
    /// `release()` without an outstanding `pick()` for that deployment.
    #[error("release of deployment {0} without a matching pick")]
    NotReserved(usize),
    /// A number that must be finite and non-negative was not.
    #[error("{0} must be a finite number >= 0")]
    InvalidValue(&'static str),
    /// The workers' shared state could not be opened, or was built for another configuration.
    #[error("shared pool state: {0}")]
    Shared(String),
}

impl BalanceError {
    fn config(field: impl Into<String>, reason: impl Into<String>) -> BalanceError {
        BalanceError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A route's deployments and the state that balances requests across them. `Sync`: share it freely.
///
/// The state lives in this process ([`Pool::new`]) or in a file the workers of one daemon share
/// ([`Pool::shared`]): then limits, breaker, cooldowns and averages are the daemon's, while each worker's
/// snapshot reports its own requests (in flight and counted), so that summing the workers' snapshots gives the
/// daemon's. Round-robin and weighted turns stay each process's own.
#[derive(Debug)]
pub struct Pool {
    /// (Declared before `region`, so dropped before the states they point into.)
    deployments: Box<[Deployment]>,
    strategy: Strategy,
    breaker: BreakerConfig,
    round_robin: AtomicUsize,
    /// Smooth weighted round robin's current weights (only `Strategy::Weighted` touches it).
    swrr: Mutex<Box<[i64]>>,
    /// Deployment sets by ascending tier number.
    tiers: Box<[IndexSet]>,
    region: Region,
}

impl Pool {
    /// Builds a pool; fails on an empty or oversized list, a bad spec or a bad breaker config.
    pub fn new(
        specs: Vec<DeploymentSpec>,
        strategy: Strategy,
        breaker: BreakerConfig,
    ) -> Result<Pool, BalanceError> {
        Self::validate(&specs, &breaker)?;
        let region = Region::private(specs.len(), |_| Inner::new(&breaker))
            .map_err(|e| BalanceError::Shared(e.to_string()))?;
        Ok(Self::build(specs, strategy, breaker, region))
    }

    /// Builds a pool whose state is in the file at `path`, shared with every other pool (in any process)
    /// built on that file with the same configuration, as worker `worker` (taken modulo [`MAX_WORKERS`]): the
    /// first builds the file, the others attach. What an earlier pool of the same worker index held there
    /// (requests in flight, a circuit probe) is dropped. A file built for another configuration is an error.
    pub fn shared(
        specs: Vec<DeploymentSpec>,
        strategy: Strategy,
        breaker: BreakerConfig,
        path: &Path,
        worker: usize,
    ) -> Result<Pool, BalanceError> {
        Self::validate(&specs, &breaker)?;
        let print = fingerprint(&specs, strategy, &breaker);
        let region = Region::shared(path, specs.len(), print, worker, |_| Inner::new(&breaker))
            .map_err(|e| BalanceError::Shared(format!("{}: {e}", path.display())))?;
        let pool = Self::build(specs, strategy, breaker, region);
        let now = pool.now_at(monotonic_ns());
        for d in pool.deployments.iter() {
            d.forget_worker(now);
        }
        Ok(pool)
    }

    fn validate(specs: &[DeploymentSpec], breaker: &BreakerConfig) -> Result<(), BalanceError> {
        breaker.validate()?;
        if specs.is_empty() {
            return Err(BalanceError::config(
                "deployments",
                "at least one deployment is needed",
            ));
        }
        if specs.len() > MAX_DEPLOYMENTS {
            return Err(BalanceError::config(
                "deployments",
                format!("at most {MAX_DEPLOYMENTS} per pool"),
            ));
        }
        for (i, spec) in specs.iter().enumerate() {
            let field = |name: &str| format!("deployments[{i}].{name}");
            if spec.name.is_empty() {
                return Err(BalanceError::config(field("name"), "must not be empty"));
            }
            if specs[..i].iter().any(|other| other.name == spec.name) {
                return Err(BalanceError::config(
                    field("name"),
                    format!("duplicate name {:?}", spec.name),
                ));
            }
            if spec.weight == 0 {
                return Err(BalanceError::config(field("weight"), "must be >= 1"));
            }
            if spec.max_concurrent == Some(0) {
                return Err(BalanceError::config(
                    field("max_concurrent"),
                    "must be >= 1",
                ));
            }
            if spec.rpm == Some(0) {
                return Err(BalanceError::config(field("rpm"), "must be >= 1"));
            }
            if spec.tpm == Some(0) {
                return Err(BalanceError::config(field("tpm"), "must be >= 1"));
            }
        }
        Ok(())
    }

    /// Whether the state is shared with other processes ([`Pool::shared`]).
    pub fn is_shared(&self) -> bool {
        self.region.is_shared()
    }

    /// This pool's time (the `now` its methods take) at `monotonic_ns` (CLOCK_MONOTONIC, ns): seconds since the
    /// pool's epoch, which every worker of a shared pool has in common.
    pub fn now_at(&self, monotonic_ns: u64) -> f64 {
        monotonic_ns.saturating_sub(self.region.epoch_ns()) as f64 / 1e9
    }

    /// This process's worker index (0 unless shared).
    pub fn worker(&self) -> usize {
        self.region.worker()
    }

    /// Tells the other workers of a shared pool whether this one has requests waiting for room (queued at a
    /// limit), so that one that frees room can wake it ([`Pool::others_waiting`]). A no-op unless shared.
    pub fn set_waiting(&self, waiting: bool) {
        self.region.set_waiting(waiting);
    }

    /// The other workers with requests waiting for room, as a bit set by worker index (0 unless shared).
    pub fn others_waiting(&self) -> u32 {
        self.region.others_waiting()
    }

    fn build(
        specs: Vec<DeploymentSpec>,
        strategy: Strategy,
        breaker: BreakerConfig,
        region: Region,
    ) -> Pool {
        let mut tier_numbers: Vec<u32> = specs.iter().map(|s| s.tier).collect();
        tier_numbers.sort_unstable();
        tier_numbers.dedup();
        let tiers = tier_numbers
            .iter()
            .map(|&t| {
                specs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.tier == t)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let n = specs.len();
        let worker = region.worker();
        let deployments = specs
            .into_iter()
            .zip(region.states())
            .map(|(s, state)| Deployment::new(s, state, worker))
            .collect();
        Pool {
            deployments,
            strategy,
            breaker,
            round_robin: AtomicUsize::new(0),
            swrr: Mutex::new(vec![0; n].into_boxed_slice()),
            tiers,
            region,
        }
    }

    /// Number of deployments.
    pub fn len(&self) -> usize {
        self.deployments.len()
    }

    /// Always false: a pool holds at least one deployment.
    pub fn is_empty(&self) -> bool {
        self.deployments.is_empty()
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The breaker configuration.
    pub fn breaker(&self) -> &BreakerConfig {
        &self.breaker
    }

    fn get(&self, idx: usize) -> Result<&Deployment, BalanceError> {
        self.deployments
            .get(idx)
            .ok_or(BalanceError::UnknownDeployment {
                idx,
                len: self.deployments.len(),
            })
    }

    /// Picks a deployment for one request attempt, skipping those in `exclude` (already tried), and reserves
    /// a slot on it (an outstanding request, one toward rpm). Every `Picked` needs exactly one `release()`.
    pub fn pick(&self, exclude: &IndexSet, now: f64) -> Pick {
        let mut scan = self.scan(exclude, now);
        loop {
            let Some(idx) = self.choose(&scan.candidates) else {
                return scan.verdict();
            };
            match self.deployments[idx].try_reserve(now) {
                Ok(()) => return Pick::Picked(idx),
                Err(refusal) => {
                    scan.candidates.remove(idx);
                    scan.note(refusal);
                }
            }
        }
    }

    /// Seconds until a `pick()` may succeed: 0 if one would now, `None` if no deployment comes back on its own.
    /// Reserves nothing.
    pub fn retry_after(&self, exclude: &IndexSet, now: f64) -> Option<f64> {
        let scan = self.scan(exclude, now);
        if !scan.candidates.is_empty() {
            return Some(0.0);
        }
        match scan.verdict() {
            Pick::AllBusy { retry_after_s } => Some(retry_after_s),
            Pick::Unavailable { retry_after_s } => retry_after_s,
            Pick::Picked(_) => Some(0.0),
        }
    }

    /// The lock-free pass: which deployments look pickable, and when the others might be.
    fn scan(&self, exclude: &IndexSet, now: f64) -> Scan {
        let mut scan = Scan {
            candidates: IndexSet::new(),
            any_busy: false,
            wait: f64::INFINITY,
        };
        for (i, d) in self.deployments.iter().enumerate() {
            if exclude.contains(i) {
                continue;
            }
            match d.check(now) {
                Ok(()) => scan.candidates.insert(i),
                Err(refusal) => scan.note(refusal),
            }
        }
        scan
    }

    fn choose(&self, candidates: &IndexSet) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        match self.strategy {
            Strategy::P2c => self.p2c(candidates),
            Strategy::LeastOutstanding => {
                self.argmin(candidates, |d| f64::from(d.outstanding.load(Relaxed)))
            }
            Strategy::RoundRobin => {
                let n = self.deployments.len();
                let start = self.round_robin.fetch_add(1, Relaxed) % n;
                candidates.next_from(start, n)
            }
            Strategy::Weighted => self.smooth_weighted(candidates),
            Strategy::Latency => self.argmin(candidates, |d| d.ewma_ttft.load()),
            Strategy::Fastest => self.argmin(candidates, |d| -d.ewma_tps.load()),
            Strategy::Priority => self
                .tiers
                .iter()
                .map(|tier| tier.intersect(candidates))
                .find(|set| !set.is_empty())
                .and_then(|set| self.p2c(&set)),
        }
    }

    fn p2c(&self, candidates: &IndexSet) -> Option<usize> {
        let k = candidates.len();
        if k < 2 {
            return candidates.nth(0);
        }
        let a = random_below(k);
        let mut b = random_below(k - 1);
        if b >= a {
            b += 1;
        }
        let (i, j) = (candidates.nth(a)?, candidates.nth(b)?);
        let (di, dj) = (&self.deployments[i], &self.deployments[j]);
        let (ti, tj) = (di.ewma_ttft.load(), dj.ewma_ttft.load());
        // A deployment without a TTFT sample is scored as if as fast as the other: load alone decides.
        let (ti, tj) = match (ti.is_nan(), tj.is_nan()) {
            (false, false) => (ti, tj),
            (true, false) => (tj, tj),
            (false, true) => (ti, ti),
            (true, true) => (1.0, 1.0),
        };
        let score = |d: &Deployment, ttft: f64| {
            f64::from(d.outstanding.load(Relaxed) + 1) * ttft.max(1e-3) / f64::from(d.spec.weight)
        };
        Some(if score(dj, tj) < score(di, ti) { j } else { i })
    }

    /// The candidate with the lowest key; NaN keys (no sample yet) come first; ties go to a random one.
    fn argmin(&self, candidates: &IndexSet, key: impl Fn(&Deployment) -> f64) -> Option<usize> {
        let mut best = None;
        let mut best_key = f64::INFINITY;
        let mut ties = 0;
        for i in candidates.iter() {
            let k = key(&self.deployments[i]);
            let k = if k.is_nan() { f64::NEG_INFINITY } else { k };
            if best.is_none() || k < best_key {
                (best, best_key, ties) = (Some(i), k, 1);
            } else if k == best_key {
                ties += 1;
                if random_below(ties) == 0 {
                    best = Some(i);
                }
            }
        }
        best
    }

    fn smooth_weighted(&self, candidates: &IndexSet) -> Option<usize> {
        let mut current = self
            .swrr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in candidates.iter() {
            let w = i64::from(self.deployments[i].spec.weight);
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
        }
        best
    }

    /// Records the time to first token of a request on `idx`.
    pub fn first_token(&self, idx: usize, ttft_s: f64) -> Result<(), BalanceError> {
        if !(ttft_s.is_finite() && ttft_s >= 0.0) {
            return Err(BalanceError::InvalidValue("ttft_s"));
        }
        self.get(idx)?.first_token(ttft_s);
        Ok(())
    }

    /// Ends the reservation `pick()` made on `idx`. `output_tokens / duration_s` (of a success) feeds the
    /// tokens/s average, so `duration_s` is best the generation time; `total_tokens` counts toward tpm.
    pub fn release(
        &self,
        idx: usize,
        outcome: Outcome,
        output_tokens: u64,
        total_tokens: u64,
        duration_s: f64,
        now: f64,
    ) -> Result<(), BalanceError> {
        if !(duration_s.is_finite() && duration_s >= 0.0) {
            return Err(BalanceError::InvalidValue("duration_s"));
        }
        self.get(idx)?
            .release(
                &self.breaker,
                outcome,
                output_tokens,
                total_tokens,
                duration_s,
                now,
            )
            .map_err(|()| BalanceError::NotReserved(idx))
    }

    /// Keeps `idx` out of picks for `seconds` from `now` (a 429's Retry-After, an overload signal). A later
    /// end time wins over an earlier one.
    pub fn cooldown(&self, idx: usize, seconds: f64, now: f64) -> Result<(), BalanceError> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(BalanceError::InvalidValue("seconds"));
        }
        self.get(idx)?.cooldown(seconds, now);
        Ok(())
    }

    /// An active health check's verdict: a deployment marked down is never picked; marking it up again also
    /// lets an open circuit send its probe now.
    pub fn set_health(&self, idx: usize, up: bool, now: f64) -> Result<(), BalanceError> {
        self.get(idx)?.set_health(up, now);
        Ok(())
    }

    /// Every deployment's state at `now`.
    pub fn snapshot(&self, now: f64) -> Vec<DeploymentSnapshot> {
        self.deployments
            .iter()
            .map(|d| snapshot_one(d, now))
            .collect()
    }
}

fn snapshot_one(d: &Deployment, now: f64) -> DeploymentSnapshot {
    let (inner, usage, outcomes) = d.observe(now);
    let open = inner.circuit == Circuit::Open && now < inner.open_until;
    let (state, until) = if inner.down {
        ("down", now)
    } else if open {
        ("open", inner.open_until.max(inner.cooldown_until))
    } else if now < inner.cooldown_until {
        ("cooling_down", inner.cooldown_until)
    } else if inner.circuit != Circuit::Closed {
        ("half_open", now)
    } else {
        ("healthy", now)
    };
    let finished = outcomes[deployment::REQS];
    let some = |v: f64| (!v.is_nan()).then_some(v);
    DeploymentSnapshot {
        spec: d.spec.clone(),
        state,
        until_s: (until - now).max(0.0),
        outstanding: inner.part(d.worker()).outstanding,
        ewma_ttft_s: some(d.ewma_ttft.load()),
        ewma_tokens_per_s: some(d.ewma_tps.load()),
        error_rate: if finished == 0 {
            0.0
        } else {
            outcomes[deployment::ERRORS] as f64 / finished as f64
        },
        requests: inner.part(d.worker()).requests,
        failures: inner.part(d.worker()).failures,
        rate_limited: inner.part(d.worker()).rate_limited,
        rpm_used: usage[deployment::REQS],
        tpm_used: usage[deployment::TOKENS],
    }
}

/// The scan's findings, updated as reservations are refused.
struct Scan {
    candidates: IndexSet,
    any_busy: bool,
    /// Soonest time (from now) a non-candidate might become pickable.
    wait: f64,
}

impl Scan {
    fn note(&mut self, refusal: Refusal) {
        let wait = match refusal {
            Refusal::Busy(w) => {
                self.any_busy = true;
                w
            }
            Refusal::Unavailable(w) => w,
        };
        self.wait = self.wait.min(wait);
    }

    fn verdict(&self) -> Pick {
        if self.any_busy {
            Pick::AllBusy {
                retry_after_s: self.wait,
            }
        } else {
            Pick::Unavailable {
                retry_after_s: self.wait.is_finite().then_some(self.wait),
            }
        }
    }
}

/// What must match for two pools to share one file: the strategy, the breaker and every deployment's spec.
fn fingerprint(specs: &[DeploymentSpec], strategy: Strategy, breaker: &BreakerConfig) -> u64 {
    let mut h = region::fnv1a(strategy.name().bytes(), region::FNV_START);
    let b = breaker;
    for v in [b.error_rate, b.window_s, b.cooldown_s, b.max_cooldown_s] {
        h = region::fnv1a(v.to_bits().to_le_bytes(), h);
    }
    for v in [b.failures, b.min_requests] {
        h = region::fnv1a(v.to_le_bytes(), h);
    }
    for s in specs {
        h = region::fnv1a(s.name.bytes().chain([0]), h);
        for v in [
            u64::from(s.weight),
            u64::from(s.tier),
            s.max_concurrent.map_or(u64::MAX, u64::from),
            s.rpm.map_or(u64::MAX, u64::from),
            s.tpm.unwrap_or(u64::MAX),
        ] {
            h = region::fnv1a(v.to_le_bytes(), h);
        }
    }
    h
}
