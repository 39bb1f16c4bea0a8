use super::*;
use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_oneof, proptest, ProptestConfig};
use proptest::strategy::Strategy as Gen;

fn spec(name: &str) -> DeploymentSpec {
    DeploymentSpec::new(name)
}

fn pool(specs: Vec<DeploymentSpec>, strategy: Strategy) -> Pool {
    Pool::new(specs, strategy, BreakerConfig::default()).unwrap()
}

fn named(n: usize) -> Vec<DeploymentSpec> {
    (0..n).map(|i| spec(&format!("d{i}"))).collect()
}

fn none() -> IndexSet {
    IndexSet::new()
}

fn picked(p: &Pool, now: f64) -> usize {
    match p.pick(&none(), now) {
        Pick::Picked(i) => i,
        other => panic!("expected a pick, got {other:?}"),
    }
}

/// Picks and immediately releases `n` times; returns the count per deployment.
fn distribution(p: &Pool, n: usize) -> Vec<usize> {
    let mut counts = vec![0; p.len()];
    for _ in 0..n {
        let i = picked(p, 0.0);
        counts[i] += 1;
        p.release(i, Outcome::Success, 0, 0, 0.0, 0.0).unwrap();
    }
    counts
}

#[test]
fn smooth_weighted_sequence_matches_nginx() {
    let mut specs = named(3);
    specs[0].weight = 5;
    let p = pool(specs, Strategy::Weighted);
    let seq: Vec<usize> = (0..14)
        .map(|_| {
            let i = picked(&p, 0.0);
            p.release(i, Outcome::Success, 0, 0, 0.0, 0.0).unwrap();
            i
        })
        .collect();
    // nginx's documented sequence for weights {a: 5, b: 1, c: 1}: a a b a c a a, repeating.
    assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn weighted_distribution_follows_weights() {
    let mut specs = named(3);
    specs[0].weight = 1;
    specs[1].weight = 3;
    specs[2].weight = 6;
    let counts = distribution(&pool(specs, Strategy::Weighted), 10_000);
    for (count, expected) in counts.iter().zip([1_000, 3_000, 6_000]) {
        assert!(count.abs_diff(expected) <= 10, "{counts:?}");
    }
}

#[test]
fn weighted_skips_excluded_and_keeps_proportions_among_the_rest() {
    let mut specs = named(3);
    specs[0].weight = 2;
    specs[1].weight = 1;
    specs[2].weight = 100;
    let p = pool(specs, Strategy::Weighted);
    let exclude: IndexSet = [2].into_iter().collect();
    let mut counts = [0; 3];
    for _ in 0..3000 {
        let Pick::Picked(i) = p.pick(&exclude, 0.0) else {
            panic!()
        };
        counts[i] += 1;
        p.release(i, Outcome::Success, 0, 0, 0.0, 0.0).unwrap();
    }
    assert_eq!(counts, [2000, 1000, 0]);
}

#[test]
fn round_robin_cycles() {
    let p = pool(named(4), Strategy::RoundRobin);
    let counts = distribution(&p, 10_000);
    assert_eq!(counts, vec![2500; 4]);
}

#[test]
fn p2c_spreads_evenly_over_equal_deployments() {
    let counts = distribution(&pool(named(8), Strategy::P2c), 10_000);
    // 1250 expected each; 5 sigma ~ 165.
    assert!(
        counts.iter().all(|&c| (1050..1450).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn p2c_prefers_the_less_loaded() {
    let p = pool(named(2), Strategy::P2c);
    // Load deployment 0 with 3 outstanding requests (held), aiming with an exclusion.
    let not1: IndexSet = [1].into_iter().collect();
    for _ in 0..3 {
        assert_eq!(p.pick(&not1, 0.0), Pick::Picked(0));
    }
    // With two deployments p2c always compares both: the idle one wins every time.
    let counts = distribution(&p, 1000);
    assert_eq!(counts, vec![0, 1000]);
}

#[test]
fn p2c_prefers_the_faster_and_weighs_load_against_speed() {
    let p = pool(named(2), Strategy::P2c);
    p.first_token(0, 2.2).unwrap();
    p.first_token(1, 0.5).unwrap();
    assert_eq!(distribution(&p, 500), vec![0, 500]);
    // Four requests in flight on the fast one: 5 * 0.5 = 2.5 > 1 * 2.2, so the slow idle one wins.
    let held: Vec<usize> = (0..4).map(|_| picked(&p, 0.0)).collect();
    assert_eq!(held, vec![1, 1, 1, 1]);
    assert_eq!(picked(&p, 0.0), 0);
}

#[test]
fn p2c_weight_scales_capacity() {
    let mut specs = named(2);
    specs[1].weight = 4;
    let p = pool(specs, Strategy::P2c);
    // Hold requests as they come: the weight-4 deployment should carry about four times the load.
    for _ in 0..50 {
        picked(&p, 0.0);
    }
    let snap = p.snapshot(0.0);
    assert_eq!(snap[0].outstanding, 10);
    assert_eq!(snap[1].outstanding, 40);
}

#[test]
fn least_outstanding_picks_the_idlest() {
    let p = pool(named(3), Strategy::LeastOutstanding);
    let first: Vec<usize> = (0..3).map(|_| picked(&p, 0.0)).collect();
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 1, 2], "each gets one before any gets two");
    p.release(first[1], Outcome::Success, 0, 0, 0.0, 0.0)
        .unwrap();
    assert_eq!(picked(&p, 0.0), first[1]);
}

#[test]
fn latency_explores_then_prefers_lowest_ttft() {
    let p = pool(named(3), Strategy::Latency);
    p.first_token(0, 0.3).unwrap();
    p.first_token(1, 0.1).unwrap();
    assert_eq!(picked(&p, 0.0), 2, "the unexplored one first");
    p.release(2, Outcome::Success, 0, 0, 0.0, 0.0).unwrap();
    p.first_token(2, 0.9).unwrap();
    assert_eq!(distribution(&p, 100), vec![0, 100, 0]);
}

#[test]
fn fastest_explores_then_prefers_highest_tokens_per_s() {
    let p = pool(named(2), Strategy::Fastest);
    let i = picked(&p, 0.0);
    p.release(i, Outcome::Success, 100, 150, 1.0, 0.0).unwrap(); // 100 tok/s
    let j = picked(&p, 0.0);
    assert_ne!(i, j, "the unexplored one next");
    p.release(j, Outcome::Success, 100, 150, 0.5, 0.0).unwrap(); // 200 tok/s
    let counts = distribution(&p, 100);
    assert_eq!(counts[j], 100);
}

#[test]
fn ewma_moves_by_alpha() {
    let p = pool(named(1), Strategy::P2c);
    p.first_token(0, 1.0).unwrap();
    p.first_token(0, 2.0).unwrap();
    let ttft = p.snapshot(0.0)[0].ewma_ttft_s.unwrap();
    assert!((ttft - (1.0 + EWMA_ALPHA)).abs() < 1e-12);
}

#[test]
fn priority_uses_lower_tier_until_it_cannot() {
    let mut specs = named(4);
    specs[0].tier = 1;
    specs[1].tier = 1;
    specs[1].max_concurrent = Some(1);
    specs[2].tier = 2;
    specs[3].tier = 3;
    let p = pool(specs, Strategy::Priority);
    let counts = distribution(&p, 1000);
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    assert!(counts[0] > 300 && counts[1] > 300, "{counts:?}");
    // Tier 1 excluded (already tried): tier 2.
    let tier1: IndexSet = [0, 1].into_iter().collect();
    assert_eq!(p.pick(&tier1, 0.0), Pick::Picked(2));
    p.release(2, Outcome::Success, 0, 0, 0.0, 0.0).unwrap();
    // Tier 1 unavailable (cooldown on 0) and busy (1 at max_concurrent): tier 2.
    p.cooldown(0, 5.0, 0.0).unwrap();
    assert_eq!(picked(&p, 0.0), 1);
    assert_eq!(picked(&p, 0.0), 2);
    // Tiers 1 and 2 gone: tier 3.
    p.set_health(2, false, 0.0).unwrap();
    assert_eq!(picked(&p, 0.0), 3);
    // Cooldown over: back to tier 1.
    assert_eq!(picked(&p, 5.0), 0);
}

#[test]
fn breaker_opens_half_opens_and_closes() {
    let p = pool(named(2), Strategy::RoundRobin);
    let only0: IndexSet = [1].into_iter().collect(); // exclude 1 to aim at 0
    for t in 0..3 {
        assert_eq!(p.pick(&only0, f64::from(t)), Pick::Picked(0));
        p.release(0, Outcome::Failure, 0, 0, 0.0, f64::from(t))
            .unwrap();
    }
    // Opened at t=2 for 10 s.
    assert_eq!(p.snapshot(3.0)[0].state, "open");
    assert_eq!(
        p.pick(&only0, 3.0),
        Pick::Unavailable {
            retry_after_s: Some(9.0)
        }
    );
    assert_eq!(distribution(&p, 10), vec![0, 10]);
    // Half-open at t=12: one probe, and only one.
    assert_eq!(p.snapshot(12.0)[0].state, "half_open");
    assert_eq!(p.pick(&only0, 12.0), Pick::Picked(0));
    let Pick::Unavailable {
        retry_after_s: Some(wait),
    } = p.pick(&only0, 12.1)
    else {
        panic!()
    };
    assert!((wait - (PROBE_RETRY_S - 0.1)).abs() < 1e-9, "{wait}");
    // The probe fails: open again for twice as long (20 s).
    p.release(0, Outcome::Failure, 0, 0, 0.0, 13.0).unwrap();
    assert_eq!(p.snapshot(13.0)[0].state, "open");
    assert_eq!(
        p.pick(&only0, 32.5),
        Pick::Unavailable {
            retry_after_s: Some(0.5)
        }
    );
    // The next probe succeeds: closed, and picks flow again.
    assert_eq!(p.pick(&only0, 33.0), Pick::Picked(0));
    p.release(0, Outcome::Success, 0, 0, 0.0, 33.5).unwrap();
    assert_eq!(p.snapshot(33.5)[0].state, "healthy");
    assert_eq!(p.pick(&only0, 33.5), Pick::Picked(0));
    assert_eq!(p.pick(&only0, 33.5), Pick::Picked(0));
}

#[test]
fn breaker_backoff_is_capped() {
    let breaker = BreakerConfig {
        failures: 1,
        cooldown_s: 10.0,
        max_cooldown_s: 25.0,
        ..BreakerConfig::default()
    };
    let p = Pool::new(named(1), Strategy::P2c, breaker).unwrap();
    let mut now = 0.0;
    let mut opens = Vec::new();
    for _ in 0..4 {
        let Pick::Picked(0) = p.pick(&none(), now) else {
            panic!("at {now}")
        };
        p.release(0, Outcome::Failure, 0, 0, 0.0, now).unwrap();
        let Pick::Unavailable {
            retry_after_s: Some(wait),
        } = p.pick(&none(), now)
        else {
            panic!()
        };
        opens.push(wait);
        now += wait;
    }
    assert_eq!(opens, vec![10.0, 20.0, 25.0, 25.0]);
}

#[test]
fn cancelled_probe_lets_the_next_request_probe() {
    let breaker = BreakerConfig {
        failures: 1,
        ..BreakerConfig::default()
    };
    let p = Pool::new(named(1), Strategy::P2c, breaker).unwrap();
    picked(&p, 0.0);
    p.release(0, Outcome::Failure, 0, 0, 0.0, 0.0).unwrap();
    assert_eq!(picked(&p, 10.0), 0);
    p.release(0, Outcome::Cancelled, 0, 0, 0.0, 10.5).unwrap();
    assert_eq!(p.snapshot(10.5)[0].state, "half_open");
    assert_eq!(picked(&p, 10.5), 0);
}

#[test]
fn breaker_trips_on_error_rate() {
    let p = pool(named(1), Strategy::P2c);
    // Alternate failure, success: never 3 in a row, but 50% then 6/11 > 50%.
    let outcomes = [Outcome::Failure, Outcome::Success];
    for k in 0..10 {
        picked(&p, 0.0);
        p.release(0, outcomes[k % 2], 0, 0, 0.0, 0.0).unwrap();
    }
    assert_eq!(p.snapshot(0.0)[0].state, "healthy");
    picked(&p, 0.0);
    p.release(0, Outcome::Failure, 0, 0, 0.0, 0.0).unwrap();
    assert_eq!(p.snapshot(0.0)[0].state, "open");
}

#[test]
fn error_rate_forgets_outside_the_window() {
    let p = pool(named(1), Strategy::P2c);
    for k in 0..10 {
        picked(&p, 0.0);
        let outcome = if k % 2 == 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        p.release(0, outcome, 0, 0, 0.0, 0.0).unwrap();
    }
    assert_eq!(p.snapshot(0.0)[0].error_rate, 0.5);
    assert_eq!(p.snapshot(31.0)[0].error_rate, 0.0);
    picked(&p, 31.0);
    p.release(0, Outcome::Failure, 0, 0, 0.0, 31.0).unwrap();
    assert_eq!(
        p.snapshot(31.0)[0].state,
        "healthy",
        "one failure in a fresh window"
    );
}

#[test]
fn rate_limited_counts_in_error_rate_but_does_not_trip() {
    let p = pool(named(1), Strategy::P2c);
    for _ in 0..12 {
        picked(&p, 0.0);
        p.release(0, Outcome::RateLimited, 0, 0, 0.0, 0.0).unwrap();
    }
    let snap = &p.snapshot(0.0)[0];
    assert_eq!(
        (
            snap.state,
            snap.error_rate,
            snap.rate_limited,
            snap.failures
        ),
        ("healthy", 1.0, 12, 0)
    );
}

#[test]
fn cancelled_is_neither_success_nor_failure() {
    let p = pool(named(1), Strategy::P2c);
    for _ in 0..2 {
        picked(&p, 0.0);
        p.release(0, Outcome::Failure, 0, 0, 0.0, 0.0).unwrap();
    }
    picked(&p, 0.0);
    p.release(0, Outcome::Cancelled, 0, 0, 0.0, 0.0).unwrap();
    picked(&p, 0.0);
    p.release(0, Outcome::Failure, 0, 0, 0.0, 0.0).unwrap();
    assert_eq!(
        p.snapshot(0.0)[0].state,
        "open",
        "the cancel did not reset the failure streak"
    );
    assert_eq!(p.snapshot(0.0)[0].error_rate, 1.0);
}

#[test]
fn cooldown_skips_until_it_ends() {
    let p = pool(named(2), Strategy::RoundRobin);
    p.cooldown(0, 5.0, 0.0).unwrap();
    p.cooldown(0, 1.0, 0.0).unwrap(); // a shorter one does not cut it
    assert_eq!(p.snapshot(1.0)[0].state, "cooling_down");
    assert_eq!(p.snapshot(1.0)[0].until_s, 4.0);
    assert_eq!(distribution(&p, 10), vec![0, 10]);
    p.cooldown(1, 3.0, 0.0).unwrap();
    assert_eq!(
        p.pick(&none(), 1.0),
        Pick::Unavailable {
            retry_after_s: Some(2.0)
        }
    );
    assert_eq!(p.retry_after(&none(), 1.0), Some(2.0));
    assert_eq!(picked(&p, 3.0), 1);
    let mut seen = [false; 2];
    for _ in 0..4 {
        seen[picked(&p, 5.0)] = true;
    }
    assert_eq!(seen, [true, true]);
}

#[test]
fn max_concurrent_makes_all_busy() {
    let mut specs = named(2);
    specs[0].max_concurrent = Some(2);
    specs[1].max_concurrent = Some(1);
    let p = pool(specs, Strategy::P2c);
    for _ in 0..3 {
        picked(&p, 0.0);
    }
    assert_eq!(
        p.pick(&none(), 0.0),
        Pick::AllBusy {
            retry_after_s: CONCURRENCY_RETRY_S
        }
    );
    assert_eq!(p.retry_after(&none(), 0.0), Some(CONCURRENCY_RETRY_S));
    p.release(1, Outcome::Success, 0, 0, 0.0, 0.0).unwrap();
    assert_eq!(picked(&p, 0.0), 1);
}

#[test]
fn busy_wins_over_unavailable() {
    let mut specs = named(2);
    specs[0].max_concurrent = Some(1);
    let p = pool(specs, Strategy::P2c);
    p.set_health(1, false, 0.0).unwrap();
    picked(&p, 0.0);
    assert!(matches!(p.pick(&none(), 0.0), Pick::AllBusy { .. }));
}

#[test]
fn rpm_limit_waits_for_the_window() {
    let mut specs = named(1);
    specs[0].rpm = Some(3);
    let p = pool(specs, Strategy::P2c);
    for t in [0.0, 10.0, 20.0] {
        picked(&p, t);
        p.release(0, Outcome::Success, 0, 0, 0.0, t).unwrap();
    }
    // The request at t=0 leaves the window at t=60.
    assert_eq!(
        p.pick(&none(), 30.0),
        Pick::AllBusy {
            retry_after_s: 30.0
        }
    );
    assert_eq!(p.snapshot(30.0)[0].rpm_used, 3);
    assert_eq!(picked(&p, 60.0), 0);
}

#[test]
fn tpm_limit_counts_released_tokens() {
    let mut specs = named(2);
    specs[0].tpm = Some(1000);
    let p = pool(specs, Strategy::RoundRobin);
    let only0: IndexSet = [1].into_iter().collect();
    assert_eq!(p.pick(&only0, 0.0), Pick::Picked(0));
    p.release(0, Outcome::Success, 500, 1200, 2.0, 5.0).unwrap();
    assert_eq!(p.snapshot(5.0)[0].tpm_used, 1200);
    assert_eq!(
        p.pick(&only0, 6.0),
        Pick::AllBusy {
            retry_after_s: 59.0
        }
    );
    assert_eq!(
        distribution(&p, 4),
        vec![0, 4],
        "the other takes the traffic"
    );
    assert_eq!(p.pick(&only0, 65.0), Pick::Picked(0));
}

#[test]
fn exclude_everything_is_unavailable_forever() {
    let p = pool(named(3), Strategy::P2c);
    let all: IndexSet = (0..3).collect();
    assert_eq!(
        p.pick(&all, 0.0),
        Pick::Unavailable {
            retry_after_s: None
        }
    );
    assert_eq!(p.retry_after(&all, 0.0), None);
    let two: IndexSet = [0, 2].into_iter().collect();
    for _ in 0..50 {
        assert_eq!(p.pick(&two, 0.0), Pick::Picked(1));
    }
}

#[test]
fn health_down_and_up() {
    let p = pool(named(1), Strategy::P2c);
    p.set_health(0, false, 0.0).unwrap();
    assert_eq!(p.snapshot(0.0)[0].state, "down");
    assert_eq!(
        p.pick(&none(), 0.0),
        Pick::Unavailable {
            retry_after_s: None
        }
    );
    p.set_health(0, true, 0.0).unwrap();
    assert_eq!(picked(&p, 0.0), 0);
}

#[test]
fn health_up_lets_an_open_circuit_probe_now() {
    let breaker = BreakerConfig {
        failures: 1,
        ..BreakerConfig::default()
    };
    let p = Pool::new(named(1), Strategy::P2c, breaker).unwrap();
    picked(&p, 0.0);
    p.release(0, Outcome::Failure, 0, 0, 0.0, 0.0).unwrap();
    assert!(matches!(p.pick(&none(), 1.0), Pick::Unavailable { .. }));
    p.set_health(0, true, 1.0).unwrap();
    assert_eq!(picked(&p, 1.0), 0);
    assert_eq!(p.snapshot(1.0)[0].state, "half_open");
}

#[test]
fn misuse_is_an_error_and_changes_nothing() {
    let p = pool(named(2), Strategy::P2c);
    assert_eq!(
        p.release(0, Outcome::Success, 0, 0, 0.0, 0.0),
        Err(BalanceError::NotReserved(0))
    );
    assert_eq!(
        p.release(7, Outcome::Success, 0, 0, 0.0, 0.0),
        Err(BalanceError::UnknownDeployment { idx: 7, len: 2 })
    );
    assert!(p.first_token(0, f64::NAN).is_err());
    assert!(p.cooldown(0, -1.0, 0.0).is_err());
    assert_eq!(p.snapshot(0.0)[0].outstanding, 0);
}

#[test]
fn config_errors_name_the_field() {
    let err = |specs: Vec<DeploymentSpec>, b: BreakerConfig| {
        Pool::new(specs, Strategy::P2c, b).unwrap_err().to_string()
    };
    let mut bad = named(3);
    bad[2].weight = 0;
    assert_eq!(
        err(bad, BreakerConfig::default()),
        "deployments[2].weight: must be >= 1"
    );
    let mut dup = named(2);
    dup[1].name = "d0".into();
    assert!(err(dup, BreakerConfig::default()).starts_with("deployments[1].name: duplicate"));
    assert!(err(vec![], BreakerConfig::default()).starts_with("deployments:"));
    let b = BreakerConfig {
        max_cooldown_s: 1.0,
        ..BreakerConfig::default()
    };
    assert!(err(named(1), b).starts_with("max_cooldown_s:"));
}

#[test]
fn strategy_names_round_trip() {
    for s in Strategy::ALL {
        assert_eq!(Strategy::from_name(s.name()), Some(s));
    }
    assert_eq!(Strategy::from_name("random"), None);
}

#[test]
fn threads_hammering_leave_nothing_outstanding() {
    let mut specs = named(4);
    specs[0].max_concurrent = Some(2);
    let p = std::sync::Arc::new(pool(specs, Strategy::P2c));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut picks = 0;
                for k in 0..20_000 {
                    if let Pick::Picked(i) = p.pick(&IndexSet::new(), 0.0) {
                        picks += 1;
                        assert!(p.snapshot_outstanding(i) >= 1);
                        let outcome = if k % 7 == 0 {
                            Outcome::Cancelled
                        } else {
                            Outcome::Success
                        };
                        p.release(i, outcome, 1, 1, 0.1, 0.0).unwrap();
                    }
                }
                picks
            })
        })
        .collect();
    let picks: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let snap = p.snapshot(0.0);
    assert!(snap.iter().all(|d| d.outstanding == 0), "{snap:?}");
    assert_eq!(snap.iter().map(|d| d.requests).sum::<u64>(), picks);
}

impl Pool {
    fn snapshot_outstanding(&self, idx: usize) -> u32 {
        self.deployments[idx].outstanding.load(Relaxed)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Pick(Vec<usize>),
    Release(usize, u8),
    Cooldown(usize, u8),
    Health(usize, bool),
    Tick(u8),
}

fn op() -> impl Gen<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(0usize..6, 0..4).prop_map(Op::Pick),
        4 => (0usize..64, 0u8..4).prop_map(|(i, o)| Op::Release(i, o)),
        1 => (0usize..6, 0u8..20).prop_map(|(i, s)| Op::Cooldown(i, s)),
        1 => (0usize..6, any::<bool>()).prop_map(|(i, up)| Op::Health(i, up)),
        2 => (0u8..30).prop_map(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn outstanding_is_exact_and_picks_respect_exclusions(
        strategy_idx in 0usize..7,
        limits in proptest::collection::vec((proptest::option::of(1u32..4), 1u32..3), 6),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let specs: Vec<DeploymentSpec> = limits
            .iter()
            .enumerate()
            .map(|(i, &(max, tier))| DeploymentSpec { max_concurrent: max, tier, ..spec(&format!("d{i}")) })
            .collect();
        let p = Pool::new(specs, Strategy::ALL[strategy_idx], BreakerConfig::default()).unwrap();
        let mut now = 0.0;
        let mut held: Vec<usize> = Vec::new();
        let mut down = [false; 6];
        let mut cool_until = [f64::NEG_INFINITY; 6];
        for op in ops {
            match op {
                Op::Pick(exclude) => {
                    let states: Vec<&str> = p.snapshot(now).iter().map(|d| d.state).collect();
                    let set: IndexSet = exclude.iter().copied().collect();
                    if let Pick::Picked(i) = p.pick(&set, now) {
                        prop_assert!(!exclude.contains(&i));
                        prop_assert!(!down[i] && now >= cool_until[i]);
                        prop_assert!(states[i] == "healthy" || states[i] == "half_open", "{}", states[i]);
                        if let Some(max) = limits[i].0 {
                            prop_assert!(held.iter().filter(|&&h| h == i).count() < max as usize);
                        }
                        held.push(i);
                    }
                }
                Op::Release(k, o) => {
                    if !held.is_empty() {
                        let i = held.swap_remove(k % held.len());
                        let outcome = [Outcome::Success, Outcome::Failure, Outcome::RateLimited, Outcome::Cancelled][o as usize];
                        p.release(i, outcome, 10, 20, 0.5, now).unwrap();
                    }
                }
                Op::Cooldown(i, s) => {
                    p.cooldown(i, f64::from(s), now).unwrap();
                    cool_until[i] = cool_until[i].max(now + f64::from(s));
                }
                Op::Health(i, up) => {
                    p.set_health(i, up, now).unwrap();
                    down[i] = !up;
                }
                Op::Tick(dt) => now += f64::from(dt) / 10.0,
            }
            let snap = p.snapshot(now);
            for (i, d) in snap.iter().enumerate() {
                prop_assert_eq!(d.outstanding as usize, held.iter().filter(|&&h| h == i).count());
            }
        }
        for i in held.drain(..) {
            p.release(i, Outcome::Cancelled, 0, 0, 0.0, now).unwrap();
        }
        prop_assert!(p.snapshot(now).iter().all(|d| d.outstanding == 0));
        prop_assert!(p.release(0, Outcome::Success, 0, 0, 0.0, now).is_err());
    }
}
