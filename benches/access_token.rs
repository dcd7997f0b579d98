//! The fast path of `TokenManager::access_token` (a cached, valid token) against the cheapest
//! possible baseline measured in the same run: `ArcSwap::load_full()` of the same token.
//!
//! Run with `cargo benches --bench access_token` (the alias for `cargo bench -p
//! tokenkeeper-benches`). Criterion reports per-call times for the groups
//! `access_token/single_thread` and `access_token/two_threads`; a final summary prints the ratio
//! manager / baseline for each, timed with plain `Instant` loops in this process.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::Criterion;
use tokenkeeper::{AccessToken, GrantHandle, TokenKey, TokenManager};
use tokio::runtime::Runtime;

use support::{
    current_thread_runtime, fast_path_manager, floor_loop, handle_loop, manager_loop, median,
    ns_per_call, other_key, other_token, two_threads, OTHER_GRANTS, TOKEN,
};

/// Calls per round of the summary's plain `Instant` loops.
const SUMMARY_CALLS: u64 = 2_000_000;
const SUMMARY_ROUNDS: usize = 5;

/// Counts refreshes; the fast path must never ask the provider.
static PROVIDER_CALLS: AtomicUsize = AtomicUsize::new(0);

// ---- counting allocator: the fast path must not allocate --------------------------------

/// Allocations made by this process so far (every thread).
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; only a counter is updated on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is checked by the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations per call of `work(calls)` (on this thread; nothing else runs): the difference
/// between a run of `2 * calls` and one of `calls`, so what a loop allocates once (the
/// runtime's `block_on`) cancels out.
fn allocations_per_call(calls: u64, mut work: impl FnMut(u64)) -> f64 {
    let mut count = |n| {
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        work(n);
        ALLOCATIONS.load(Ordering::SeqCst) - before
    };
    let (once, twice) = (count(calls), count(2 * calls));
    twice.saturating_sub(once) as f64 / calls as f64
}

struct Fixture {
    manager: TokenManager,
    key: TokenKey,
    /// The baseline: the same access token behind an `ArcSwap`.
    baseline: ArcSwap<AccessToken>,
    /// The 1,000 other grants' keys, and their tokens behind `ArcSwap`s (the baseline for
    /// reading many grants).
    others: Vec<TokenKey>,
    others_baseline: Vec<ArcSwap<AccessToken>>,
}

fn fixture(rt: &Runtime) -> Fixture {
    let (manager, key) = fast_path_manager(rt, &PROVIDER_CALLS);
    Fixture {
        manager,
        key,
        baseline: ArcSwap::from_pointee(AccessToken::new(TOKEN)),
        others: (0..OTHER_GRANTS).map(other_key).collect(),
        others_baseline: (0..OTHER_GRANTS)
            .map(|i| ArcSwap::from_pointee(other_token(i)))
            .collect(),
    }
}

// ---- the measured loops -------------------------------------------------------------------

/// The closure API through a `GrantHandle`: the token is lent, not cloned.
fn closure_loop(rt: &Runtime, grant: &GrantHandle, calls: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..calls {
            let len = black_box(grant)
                .with_access_token(|t| t.secret().len())
                .await
                .expect("with_access_token");
            black_box(len);
        }
        start.elapsed()
    })
}

/// The manager over many grants: call `i` reads key `i % keys.len()`, from `offset`.
fn manager_keys_loop(
    rt: &Runtime,
    manager: &TokenManager,
    keys: &[TokenKey],
    offset: usize,
    calls: u64,
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for (_, key) in (0..calls).zip(keys.iter().cycle().skip(offset)) {
            let token = manager
                .access_token(black_box(key))
                .await
                .expect("access_token");
            black_box(token);
        }
        start.elapsed()
    })
}

/// The same through one `GrantHandle` per grant.
fn handles_loop(rt: &Runtime, grants: &[GrantHandle], offset: usize, calls: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for (_, grant) in (0..calls).zip(grants.iter().cycle().skip(offset)) {
            let token = black_box(grant).access_token().await.expect("access_token");
            black_box(token);
        }
        start.elapsed()
    })
}

/// The baseline over many grants: one `ArcSwap` per grant, read round-robin.
fn baseline_many_loop(shared: &[ArcSwap<AccessToken>], offset: usize, calls: u64) -> Duration {
    let start = Instant::now();
    for (_, one) in (0..calls).zip(shared.iter().cycle().skip(offset)) {
        black_box(black_box(one).load_full());
    }
    start.elapsed()
}

// ---- criterion groups ---------------------------------------------------------------------

fn bench_single_thread(c: &mut Criterion, fx: &Fixture, rt: &Runtime) {
    let mut group = c.benchmark_group("access_token/single_thread");
    group.bench_function("baseline_arc_load_clone", |b| {
        b.iter_custom(|iters| floor_loop(&fx.baseline, iters))
    });
    group.bench_function("manager_access_token", |b| {
        b.iter_custom(|iters| manager_loop(rt, &fx.manager, &fx.key, iters))
    });
    group.finish();
}

fn bench_two_threads(c: &mut Criterion, fx: &Fixture, rts: &[Runtime]) {
    let mut group = c.benchmark_group("access_token/two_threads");
    group.bench_function("baseline_arc_load_clone", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |_, n| {
                floor_loop(&fx.baseline, n);
            })
        })
    });
    group.bench_function("manager_access_token", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |i, n| {
                manager_loop(&rts[i], &fx.manager, &fx.key, n);
            })
        })
    });
    group.finish();
}

// ---- summary ------------------------------------------------------------------------------

/// Times manager and baseline in alternating rounds (after one warm-up round each) and
/// prints the median per-call figures and their ratio.
fn summarize(
    name: &str,
    calls: u64,
    rounds: usize,
    mut manager: impl FnMut(u64) -> Duration,
    mut baseline: impl FnMut(u64) -> Duration,
) {
    manager(calls);
    baseline(calls);
    let (mut m, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        m.push(ns_per_call(manager(calls), calls));
        b.push(ns_per_call(baseline(calls), calls));
    }
    let (m, b) = (median(m), median(b));
    println!(
        "ratio {name}: {:.2} (manager {m:.1} ns / baseline {b:.1} ns)",
        m / b
    );
}

fn main() {
    let rt = current_thread_runtime();
    let rts = [current_thread_runtime(), current_thread_runtime()];
    let fx = fixture(&rt);

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        // Plot rendering costs more than the measurements; keep the run short.
        .without_plots()
        .configure_from_args();
    bench_single_thread(&mut c, &fx, &rt);
    bench_two_threads(&mut c, &fx, &rts);
    c.final_summary();

    // `cargo bench` passes `--bench`; under `cargo test --benches` only smoke-test the summary.
    let full = std::env::args().any(|a| a == "--bench");
    let (calls, rounds) = if full {
        (SUMMARY_CALLS, SUMMARY_ROUNDS)
    } else {
        (10_000, 1)
    };
    println!("\nsummary ({rounds} rounds of {calls} calls, median per call):");
    summarize(
        "single_thread",
        calls,
        rounds,
        |n| manager_loop(&rt, &fx.manager, &fx.key, n),
        |n| floor_loop(&fx.baseline, n),
    );
    let grant = fx.manager.grant(&fx.key);
    summarize(
        "single_thread handle",
        calls,
        rounds,
        |n| handle_loop(&rt, &grant, n),
        |n| floor_loop(&fx.baseline, n),
    );
    summarize(
        "single_thread handle closure",
        calls,
        rounds,
        |n| closure_loop(&rt, &grant, n),
        |n| floor_loop(&fx.baseline, n),
    );
    summarize(
        "two_threads handle",
        calls,
        rounds,
        |n| {
            two_threads(n, |i, k| {
                handle_loop(&rts[i], &grant, k);
            })
        },
        |n| {
            two_threads(n, |_, k| {
                floor_loop(&fx.baseline, k);
            })
        },
    );
    summarize(
        "two_threads",
        calls,
        rounds,
        |n| {
            two_threads(n, |i, k| {
                manager_loop(&rts[i], &fx.manager, &fx.key, k);
            })
        },
        |n| {
            two_threads(n, |_, k| {
                floor_loop(&fx.baseline, k);
            })
        },
    );

    // Two threads over the 1,000 other grants, each thread starting half-way round from the
    // other (the keys differ between the threads at every moment).
    let half = fx.others.len() / 2;
    summarize(
        "two_threads 1000 keys",
        calls,
        rounds,
        |n| {
            two_threads(n, |i, k| {
                manager_keys_loop(&rts[i], &fx.manager, &fx.others, i * half, k);
            })
        },
        |n| {
            two_threads(n, |i, k| {
                baseline_many_loop(&fx.others_baseline, i * half, k);
            })
        },
    );
    let handles: Vec<GrantHandle> = fx.others.iter().map(|k| fx.manager.grant(k)).collect();
    summarize(
        "two_threads 1000 keys handles",
        calls,
        rounds,
        |n| {
            two_threads(n, |i, k| {
                handles_loop(&rts[i], &handles, i * half, k);
            })
        },
        |n| {
            two_threads(n, |i, k| {
                baseline_many_loop(&fx.others_baseline, i * half, k);
            })
        },
    );

    // Allocations per call on the fast path (after the runs above warmed everything up).
    let count = 100_000;
    let per_call = [
        (
            "manager access_token",
            allocations_per_call(count, |n| {
                manager_loop(&rt, &fx.manager, &fx.key, n);
            }),
        ),
        (
            "handle access_token",
            allocations_per_call(count, |n| {
                handle_loop(&rt, &grant, n);
            }),
        ),
        (
            "handle with_access_token",
            allocations_per_call(count, |n| {
                closure_loop(&rt, &grant, n);
            }),
        ),
        (
            "manager, 1000 keys",
            allocations_per_call(count, |n| {
                manager_keys_loop(&rt, &fx.manager, &fx.others, 0, n);
            }),
        ),
    ];
    for (name, per_call) in per_call {
        println!("allocations per call, {name}: {per_call}");
        // A hard check, not a timing: the fast path must not allocate.
        assert!(per_call == 0.0, "{name} allocates: {per_call} per call");
    }

    let calls = PROVIDER_CALLS.load(Ordering::SeqCst);
    assert_eq!(calls, 0, "the fast path called the provider {calls} times");
}
