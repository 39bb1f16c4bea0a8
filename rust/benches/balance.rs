//! ns per `Pool::pick()` + `Pool::release()` in Rust, per strategy and pool size (no Python in the loop), and the
//! same for a pool whose state is in a file the workers share (`Pool::shared`) against a private one.
//!
//!     cargo bench -p tokenrelay-core --bench balance
#![allow(clippy::expect_used)] // bench set-up, like a test

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tokenrelay_core::balance::{
    BreakerConfig, DeploymentSpec, IndexSet, Outcome, Pick, Pool, Strategy,
};

fn pool_of(size: usize, strategy: Strategy) -> Pool {
    warm(Pool::new(specs_of(size), strategy, BreakerConfig::default()).expect("valid pool"))
}

fn specs_of(size: usize) -> Vec<DeploymentSpec> {
    (0..size)
        .map(|i| DeploymentSpec {
            weight: 1 + (i % 3) as u32,
            tier: 1 + (i % 2) as u32,
            rpm: Some(1_000_000_000),
            max_concurrent: Some(1_000_000),
            ..DeploymentSpec::new(format!("d{i}"))
        })
        .collect()
}

fn warm(pool: Pool) -> Pool {
    let size = pool.len();
    for i in 0..size {
        // Give every deployment samples so that no strategy is stuck exploring.
        let others: IndexSet = (0..size).filter(|&j| j != i).collect();
        if let Pick::Picked(idx) = pool.pick(&others, 0.0) {
            let _ = pool.first_token(idx, 0.1 + i as f64 / 100.0);
            let _ = pool.release(idx, Outcome::Success, 100, 200, 1.0 + i as f64 / 10.0, 0.0);
        }
    }
    pool
}

fn pick_release(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick_release");
    for strategy in Strategy::ALL {
        for size in [2, 8, 16] {
            let pool = pool_of(size, strategy);
            let none = IndexSet::new();
            let mut now = 0.0;
            group.bench_function(BenchmarkId::new(strategy.name(), size), |b| {
                b.iter(|| {
                    now += 1e-6;
                    if let Pick::Picked(idx) = pool.pick(black_box(&none), now) {
                        let _ = pool.release(idx, Outcome::Success, 0, 0, 0.0, now);
                    }
                })
            });
        }
    }
    group.finish();
}

fn shared_against_private(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick_release_p2c");
    let dir = std::env::temp_dir();
    for size in [2, 8] {
        let path = dir.join(format!(
            "tokenrelay-bench-pool-{}-{size}.shm",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let shared = Pool::shared(
            specs_of(size),
            Strategy::P2c,
            BreakerConfig::default(),
            &path,
            0,
        )
        .expect("shared pool");
        let pools = [
            ("private", pool_of(size, Strategy::P2c)),
            ("shared", warm(shared)),
        ];
        for (name, pool) in &pools {
            let none = IndexSet::new();
            let mut now = pool.now_at(tokenrelay_core::balance::monotonic_ns());
            group.bench_function(BenchmarkId::new(*name, size), |b| {
                b.iter(|| {
                    now += 1e-6;
                    if let Pick::Picked(idx) = pool.pick(black_box(&none), now) {
                        let _ = pool.release(idx, Outcome::Success, 0, 0, 0.0, now);
                    }
                })
            });
        }
        let _ = std::fs::remove_file(&path);
    }
    group.finish();
}

criterion_group!(benches, pick_release, shared_against_private);
criterion_main!(benches);
