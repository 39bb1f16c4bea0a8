//! One deployment's balancing state: the authoritative copy behind a mutex held for nanoseconds, and the few
//! figures `pick()` scans published in atomics so the scan takes no lock.

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::region::{Guard, State, MAX_WORKERS};
use super::window::Window;
use super::{BreakerConfig, DeploymentSpec, Outcome};

/// Weight of a new sample in the moving averages (TTFT, tokens/s): a sample's influence halves after
/// ln(0.5)/ln(1-0.2) ≈ 3.1 newer samples, quick enough to notice a deployment that slows down.
pub const EWMA_ALPHA: f64 = 0.2;
/// How long to tell callers to wait while a deployment is full on `max_concurrent` (no clock says when a
/// stream ends; a caller can also wake on `release()`).
pub const CONCURRENCY_RETRY_S: f64 = 0.05;
/// How long to tell callers to wait while a half-open deployment's single probe is in flight.
pub const PROBE_RETRY_S: f64 = 1.0;
/// Buckets of the breaker's outcome window (its resolution is `window_s / 30`).
const OUTCOME_BUCKETS: usize = 30;

// Columns of the usage window (per second, over a minute) and of the outcome window.
pub(crate) const REQS: usize = 0;
pub(crate) const TOKENS: usize = 1;
pub(crate) const ERRORS: usize = 2;

/// An `f64` in an `AtomicU64`.
#[derive(Debug)]
pub(crate) struct AtomicF64(AtomicU64);

impl AtomicF64 {
    pub(crate) fn new(v: f64) -> AtomicF64 {
        AtomicF64(AtomicU64::new(v.to_bits()))
    }
    pub(crate) fn load(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
    pub(crate) fn store(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed);
    }
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Circuit {
    /// Requests flow.
    Closed,
    /// No requests until `open_until`; after it, one probe may go (the state then reads "half_open").
    Open,
    /// The probe is in flight: its outcome closes or re-opens the circuit.
    Probing,
}

/// What one worker (by index) holds and has counted on a deployment.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct Part {
    pub(crate) outstanding: u32,
    pub(crate) requests: u64,
    pub(crate) failures: u64,
    pub(crate) rate_limited: u64,
}

/// The locked state: plain data of a fixed size (it may live in memory the workers share, `region.rs`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct Inner {
    pub(crate) circuit: Circuit,
    pub(crate) open_until: f64,
    /// How long the next opening lasts: `cooldown_s`, doubled by each failed probe up to `max_cooldown_s`.
    backoff_s: f64,
    pub(crate) cooldown_until: f64,
    pub(crate) down: bool,
    consecutive_failures: u32,
    /// 1 + the index of the worker whose probe is in flight (0: none), so that a restarted worker's lost
    /// probe does not hold the circuit half-open for ever.
    probe_by: u32,
    /// Every worker's requests in flight; mirrored in `State::outstanding`, which may only change under the
    /// lock.
    outstanding: u32,
    /// Columns: requests, tokens (per second over the last minute).
    usage: Window<60>,
    /// Columns: finished requests, failures, failures + rate limited (over the breaker window).
    outcomes: Window<OUTCOME_BUCKETS>,
    /// Each worker's own part, by worker index.
    parts: [Part; MAX_WORKERS],
}

impl Inner {
    pub(crate) fn new(breaker: &BreakerConfig) -> Inner {
        Inner {
            circuit: Circuit::Closed,
            open_until: f64::NEG_INFINITY,
            backoff_s: breaker.cooldown_s,
            cooldown_until: f64::NEG_INFINITY,
            down: false,
            consecutive_failures: 0,
            probe_by: 0,
            outstanding: 0,
            usage: Window::new(1.0),
            outcomes: Window::new(breaker.window_s / OUTCOME_BUCKETS as f64),
            parts: [Part::default(); MAX_WORKERS],
        }
    }

    /// Worker `worker`'s part.
    pub(crate) fn part(&self, worker: usize) -> &Part {
        &self.parts[worker % MAX_WORKERS]
    }
}

/// Why a deployment refused a reservation it looked eligible for in the lock-free scan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Refusal {
    /// At a limit; retry in the given seconds.
    Busy(f64),
    /// Excluded by health, breaker or cooldown; available again in the given seconds (infinite if down).
    Unavailable(f64),
}

/// A deployment: its configuration, and its state in the pool's region (as this process's worker).
#[derive(Debug)]
pub(crate) struct Deployment {
    pub(crate) spec: DeploymentSpec,
    state: NonNull<State>,
    worker: usize,
}

// SAFETY: `State` is `Sync`; the pointer is valid for as long as the pool that owns both (see `Pool`).
unsafe impl Send for Deployment {}
// SAFETY: as above.
unsafe impl Sync for Deployment {}

impl Deref for Deployment {
    type Target = State;
    fn deref(&self) -> &State {
        // SAFETY: the pool drops its deployments before the region that holds their states.
        unsafe { self.state.as_ref() }
    }
}

fn ewma(old: f64, sample: f64) -> f64 {
    if old.is_nan() {
        sample
    } else {
        old + EWMA_ALPHA * (sample - old)
    }
}

impl Deployment {
    pub(crate) fn new(spec: DeploymentSpec, state: &State, worker: usize) -> Deployment {
        Deployment {
            spec,
            state: NonNull::from(state),
            worker: worker % MAX_WORKERS,
        }
    }

    /// Drops what an earlier worker of this index held (its requests in flight, its probe) and restarts its
    /// counts: that worker is gone, and its requests with it.
    pub(crate) fn forget_worker(&self, now: f64) {
        let mut inner = self.lock();
        let w = self.worker;
        let held = inner.parts[w].outstanding;
        inner.outstanding = inner.outstanding.saturating_sub(held);
        self.outstanding.store(inner.outstanding, Relaxed);
        inner.parts[w] = Part::default();
        if inner.circuit == Circuit::Probing && inner.probe_by == w as u32 + 1 {
            inner.circuit = Circuit::Open; // no verdict: the next request probes again
            inner.probe_by = 0;
        }
        self.publish(&inner, now);
    }

    /// Lock-free pre-check for the scan: `Ok` if it looks pickable, else why not.
    #[inline]
    pub(crate) fn check(&self, now: f64) -> Result<(), Refusal> {
        let avail_at = self.avail_at.load();
        if now < avail_at {
            return Err(Refusal::Unavailable(avail_at - now));
        }
        if let Some(max) = self.spec.max_concurrent {
            if self.outstanding.load(Relaxed) >= max {
                return Err(Refusal::Busy(CONCURRENCY_RETRY_S));
            }
        }
        let busy_until = self.busy_until.load();
        if now < busy_until {
            return Err(Refusal::Busy(busy_until - now));
        }
        Ok(())
    }

    /// Reserves a slot if the deployment is really pickable at `now` (the scan saw published figures only).
    pub(crate) fn try_reserve(&self, now: f64) -> Result<(), Refusal> {
        let mut inner = self.lock();
        if inner.down {
            return Err(Refusal::Unavailable(f64::INFINITY));
        }
        if now < inner.cooldown_until {
            return Err(Refusal::Unavailable(inner.cooldown_until - now));
        }
        match inner.circuit {
            Circuit::Closed => {}
            Circuit::Open if now < inner.open_until => {
                return Err(Refusal::Unavailable(inner.open_until - now))
            }
            Circuit::Open => {}
            Circuit::Probing => {
                self.avail_at.store(now + PROBE_RETRY_S);
                return Err(Refusal::Unavailable(PROBE_RETRY_S));
            }
        }
        if self
            .spec
            .max_concurrent
            .is_some_and(|max| inner.outstanding >= max)
        {
            return Err(Refusal::Busy(CONCURRENCY_RETRY_S));
        }
        inner.usage.advance(now);
        let wait = self.limit_wait(&inner, now);
        if wait > 0.0 {
            self.busy_until.store(now + wait);
            return Err(Refusal::Busy(wait));
        }
        if inner.circuit == Circuit::Open {
            inner.circuit = Circuit::Probing;
            inner.probe_by = self.worker as u32 + 1;
        }
        inner.outstanding += 1;
        self.outstanding.store(inner.outstanding, Relaxed);
        let part = &mut inner.parts[self.worker];
        part.outstanding += 1;
        part.requests += 1;
        inner.usage.add(now, [1, 0, 0]);
        self.publish(&inner, now);
        Ok(())
    }

    /// Seconds until the rpm and tpm limits both have room (0 if they do now).
    fn limit_wait(&self, inner: &Inner, now: f64) -> f64 {
        let rpm = self.spec.rpm.map_or(0.0, |l| {
            inner.usage.time_until_below(now, REQS, u64::from(l))
        });
        let tpm = self
            .spec
            .tpm
            .map_or(0.0, |l| inner.usage.time_until_below(now, TOKENS, l));
        rpm.max(tpm)
    }

    /// Recomputes the published `avail_at` and `busy_until` from the locked state.
    fn publish(&self, inner: &Inner, now: f64) {
        let circuit_until = match inner.circuit {
            Circuit::Closed => f64::NEG_INFINITY,
            Circuit::Open => inner.open_until,
            Circuit::Probing => now + PROBE_RETRY_S,
        };
        let avail_at = if inner.down {
            f64::INFINITY
        } else {
            inner.cooldown_until.max(circuit_until)
        };
        self.avail_at.store(avail_at);
        let wait = self.limit_wait(inner, now);
        self.busy_until.store(if wait > 0.0 {
            now + wait
        } else {
            f64::NEG_INFINITY
        });
    }

    /// Ends a reservation. `Err(())` if none is outstanding (state left untouched).
    pub(crate) fn release(
        &self,
        breaker: &BreakerConfig,
        outcome: Outcome,
        output_tokens: u64,
        total_tokens: u64,
        duration_s: f64,
        now: f64,
    ) -> Result<(), ()> {
        let mut inner = self.lock();
        let w = self.worker;
        if inner.parts[w].outstanding == 0 {
            return Err(());
        }
        inner.parts[w].outstanding -= 1;
        inner.outstanding = inner.outstanding.saturating_sub(1);
        self.outstanding.store(inner.outstanding, Relaxed);
        inner.usage.add(now, [0, total_tokens, 0]);
        let probing = inner.circuit == Circuit::Probing;
        if probing {
            inner.probe_by = 0;
        }
        match outcome {
            Outcome::Success => {
                inner.outcomes.add(now, [1, 0, 0]);
                inner.consecutive_failures = 0;
                if probing {
                    inner.circuit = Circuit::Closed;
                    inner.backoff_s = breaker.cooldown_s;
                    inner.outcomes.clear(); // a recovered deployment starts with a clean record
                }
                if output_tokens > 0 && duration_s > 0.0 && duration_s.is_finite() {
                    let tps = output_tokens as f64 / duration_s;
                    self.ewma_tps.store(ewma(self.ewma_tps.load(), tps));
                }
            }
            Outcome::Failure => {
                inner.outcomes.add(now, [1, 1, 1]);
                inner.parts[w].failures += 1;
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                if probing {
                    inner.backoff_s = (inner.backoff_s * 2.0).min(breaker.max_cooldown_s);
                    inner.circuit = Circuit::Open;
                    inner.open_until = now + inner.backoff_s;
                } else if inner.circuit == Circuit::Closed && self.should_trip(&inner, breaker) {
                    inner.circuit = Circuit::Open;
                    inner.backoff_s = breaker.cooldown_s;
                    inner.open_until = now + inner.backoff_s;
                }
            }
            Outcome::RateLimited | Outcome::Cancelled => {
                if outcome == Outcome::RateLimited {
                    inner.outcomes.add(now, [1, 0, 1]);
                    inner.parts[w].rate_limited += 1;
                }
                // No verdict on the probe: let the next request probe again.
                if probing {
                    inner.circuit = Circuit::Open;
                }
            }
        }
        self.publish(&inner, now);
        Ok(())
    }

    fn should_trip(&self, inner: &Inner, breaker: &BreakerConfig) -> bool {
        if inner.consecutive_failures >= breaker.failures {
            return true;
        }
        let [finished, failed, _] = inner.outcomes.sums();
        finished >= u64::from(breaker.min_requests)
            && failed as f64 > breaker.error_rate * finished as f64
    }

    /// This process's worker index (its row in each state).
    pub(crate) fn worker(&self) -> usize {
        self.worker
    }

    pub(crate) fn first_token(&self, ttft_s: f64) {
        // Lock so that concurrent samples never overwrite each other (a lost update is harmless, but cheap to avoid).
        let _guard = self.lock();
        self.ewma_ttft.store(ewma(self.ewma_ttft.load(), ttft_s));
    }

    pub(crate) fn cooldown(&self, seconds: f64, now: f64) {
        let mut inner = self.lock();
        inner.cooldown_until = inner.cooldown_until.max(now + seconds);
        self.publish(&inner, now);
    }

    pub(crate) fn set_health(&self, up: bool, now: f64) {
        let mut inner = self.lock();
        inner.down = !up;
        // A passing health check lets an open circuit probe now rather than at the end of its backoff.
        if up && inner.circuit == Circuit::Open {
            inner.open_until = inner.open_until.min(now);
        }
        self.publish(&inner, now);
    }

    /// Advances the windows to `now` and returns the locked state for a snapshot.
    pub(crate) fn observe(&self, now: f64) -> (Guard<'_>, [u64; 3], [u64; 3]) {
        let mut inner = self.lock();
        inner.usage.advance(now);
        inner.outcomes.advance(now);
        let usage = inner.usage.sums();
        let outcomes = inner.outcomes.sums();
        (inner, usage, outcomes)
    }
}
