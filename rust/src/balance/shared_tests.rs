//! Pools of several workers on one shared file (`Pool::shared`): here in one process, one pool per worker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A fresh path in the temp dir, removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new() -> TempPath {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "tokenrelay-pool-{}-{n}-{}.shm",
            std::process::id(),
            monotonic_ns()
        );
        TempPath(std::env::temp_dir().join(name))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn specs(max_concurrent: Option<u32>, rpm: Option<u32>) -> Vec<DeploymentSpec> {
    let mut d = DeploymentSpec::new("d0");
    d.max_concurrent = max_concurrent;
    d.rpm = rpm;
    vec![d, DeploymentSpec::new("d1")]
}

fn worker(path: &TempPath, specs: Vec<DeploymentSpec>, breaker: BreakerConfig, w: usize) -> Pool {
    Pool::shared(specs, Strategy::Priority, breaker, &path.0, w).unwrap()
}

/// The first deployment alone in play: d1 excluded.
fn only_d0() -> IndexSet {
    let mut set = IndexSet::new();
    set.insert(1);
    set
}

fn now(p: &Pool) -> f64 {
    p.now_at(monotonic_ns())
}

#[test]
fn workers_share_one_clock_and_one_max_concurrent() {
    let path = TempPath::new();
    let a = worker(&path, specs(Some(1), None), BreakerConfig::default(), 0);
    let b = worker(&path, specs(Some(1), None), BreakerConfig::default(), 1);
    assert!(a.is_shared() && b.is_shared());
    assert_eq!(a.now_at(5_000_000_000_000), b.now_at(5_000_000_000_000));
    let t = now(&a);
    assert_eq!(a.pick(&only_d0(), t), Pick::Picked(0));
    assert!(matches!(b.pick(&only_d0(), t), Pick::AllBusy { .. }));
    // Each worker reports its own requests; summed, the daemon's.
    assert_eq!(a.snapshot(t)[0].outstanding, 1);
    assert_eq!(b.snapshot(t)[0].outstanding, 0);
    // b cannot release what a holds.
    assert_eq!(
        b.release(0, Outcome::Success, 0, 0, 0.0, t),
        Err(BalanceError::NotReserved(0))
    );
    a.release(0, Outcome::Success, 0, 0, 0.0, t).unwrap();
    assert_eq!(b.pick(&only_d0(), t), Pick::Picked(0));
    assert_eq!(b.snapshot(t)[0].requests, 1);
    assert_eq!(a.snapshot(t)[0].requests, 1);
}

#[test]
fn rpm_counts_every_workers_requests() {
    let path = TempPath::new();
    let a = worker(&path, specs(None, Some(2)), BreakerConfig::default(), 0);
    let b = worker(&path, specs(None, Some(2)), BreakerConfig::default(), 1);
    let t = now(&a);
    for p in [&a, &b] {
        assert_eq!(p.pick(&only_d0(), t), Pick::Picked(0));
        p.release(0, Outcome::Success, 0, 0, 0.0, t).unwrap();
    }
    assert!(matches!(a.pick(&only_d0(), t), Pick::AllBusy { .. }));
    assert_eq!(a.snapshot(t)[0].rpm_used, 2);
}

#[test]
fn a_cooldown_and_a_tripped_breaker_hold_for_every_worker() {
    let path = TempPath::new();
    let breaker = BreakerConfig::default(); // trips after 3 consecutive failures
    let a = worker(&path, specs(None, None), breaker.clone(), 0);
    let b = worker(&path, specs(None, None), breaker, 1);
    let t = now(&a);
    a.cooldown(0, 30.0, t).unwrap();
    // Priority would take d0 first; it is cooling down for both.
    assert_eq!(b.pick(&IndexSet::new(), t), Pick::Picked(1));
    assert_eq!(b.snapshot(t)[0].state, "cooling_down");
    b.release(1, Outcome::Success, 0, 0, 0.0, t).unwrap();
    // Two failures through one worker and one through the other open d1's circuit for both.
    for p in [&a, &a, &b] {
        assert_eq!(p.pick(&IndexSet::new(), t), Pick::Picked(1));
        p.release(1, Outcome::Failure, 0, 0, 0.0, t).unwrap();
    }
    for p in [&a, &b] {
        assert!(matches!(
            p.pick(&IndexSet::new(), t),
            Pick::Unavailable { .. }
        ));
        assert_eq!(p.snapshot(t)[1].state, "open");
    }
}

#[test]
fn a_restarted_worker_drops_what_its_predecessor_held() {
    let path = TempPath::new();
    let a = worker(&path, specs(Some(1), None), BreakerConfig::default(), 0);
    let b = worker(&path, specs(Some(1), None), BreakerConfig::default(), 1);
    let t = now(&a);
    assert_eq!(a.pick(&only_d0(), t), Pick::Picked(0));
    drop(a); // (dies with the request in flight: nothing is released)
    assert!(matches!(b.pick(&only_d0(), t), Pick::AllBusy { .. }));
    let a = worker(&path, specs(Some(1), None), BreakerConfig::default(), 0);
    assert_eq!(a.snapshot(t)[0].outstanding, 0);
    assert_eq!(a.snapshot(t)[0].requests, 0);
    assert_eq!(b.pick(&only_d0(), t), Pick::Picked(0));
}

#[test]
fn a_probe_lost_with_its_worker_is_sent_again() {
    let path = TempPath::new();
    let breaker = BreakerConfig {
        failures: 1,
        cooldown_s: 1.0,
        ..BreakerConfig::default()
    };
    let a = worker(&path, specs(None, None), breaker.clone(), 0);
    let b = worker(&path, specs(None, None), breaker.clone(), 1);
    let t = now(&a);
    assert_eq!(a.pick(&only_d0(), t), Pick::Picked(0));
    a.release(0, Outcome::Failure, 0, 0, 0.0, t).unwrap();
    assert!(matches!(
        b.pick(&only_d0(), t + 0.5),
        Pick::Unavailable { .. }
    ));
    // After the backoff a takes the one probe; while it is out, b may not send another.
    assert_eq!(a.pick(&only_d0(), t + 2.0), Pick::Picked(0));
    assert!(matches!(
        b.pick(&only_d0(), t + 2.0),
        Pick::Unavailable { .. }
    ));
    drop(a);
    let _a = worker(&path, specs(None, None), breaker, 0);
    assert_eq!(b.pick(&only_d0(), t + 2.0), Pick::Picked(0));
    b.release(0, Outcome::Success, 0, 0, 0.0, t + 2.1).unwrap();
    assert_eq!(b.snapshot(t + 2.1)[0].state, "healthy");
}

#[test]
fn a_file_built_for_another_configuration_is_refused() {
    let path = TempPath::new();
    let _a = worker(&path, specs(Some(1), None), BreakerConfig::default(), 0);
    let err = Pool::shared(
        specs(Some(2), None),
        Strategy::Priority,
        BreakerConfig::default(),
        &path.0,
        1,
    )
    .unwrap_err();
    assert!(
        matches!(&err, BalanceError::Shared(why) if why.contains("another configuration")),
        "{err}"
    );
    let err = Pool::shared(
        specs(Some(1), None),
        Strategy::P2c,
        BreakerConfig::default(),
        &path.0,
        1,
    )
    .unwrap_err();
    assert!(matches!(err, BalanceError::Shared(_)));
}

#[test]
fn a_lock_whose_holder_died_is_taken_over() {
    for p in [pool_private(), pool_shared().1] {
        let pool = std::sync::Arc::new(p);
        let holder = std::sync::Arc::clone(&pool);
        // A thread that ends while holding the lock (as a worker killed inside the critical section would).
        std::thread::spawn(move || std::mem::forget(holder.deployments[0].lock()))
            .join()
            .unwrap();
        let t = 1.0;
        assert_eq!(pool.pick(&only_d0(), t), Pick::Picked(0));
        pool.release(0, Outcome::Success, 0, 0, 0.0, t).unwrap();
        assert_eq!(pool.snapshot(t)[0].requests, 1);
    }
}

fn pool_private() -> Pool {
    Pool::new(
        specs(None, None),
        Strategy::Priority,
        BreakerConfig::default(),
    )
    .unwrap()
}

fn pool_shared() -> (TempPath, Pool) {
    let path = TempPath::new();
    let p = worker(&path, specs(None, None), BreakerConfig::default(), 3);
    (path, p)
}

#[test]
fn workers_see_who_else_is_waiting() {
    let path = TempPath::new();
    let a = worker(&path, specs(None, None), BreakerConfig::default(), 0);
    let b = worker(&path, specs(None, None), BreakerConfig::default(), 5);
    assert_eq!((a.others_waiting(), b.others_waiting()), (0, 0));
    b.set_waiting(true);
    a.set_waiting(true);
    assert_eq!(a.others_waiting(), 1 << 5);
    assert_eq!(b.others_waiting(), 1);
    b.set_waiting(false);
    assert_eq!(a.others_waiting(), 0);
    // A worker that died waiting: its successor starts not waiting.
    b.set_waiting(true);
    drop(b);
    let _b = worker(&path, specs(None, None), BreakerConfig::default(), 5);
    assert_eq!(a.others_waiting(), 0);
    // Without sharing there is no one else.
    let private = pool_private();
    private.set_waiting(true);
    assert_eq!(private.others_waiting(), 0);
}
