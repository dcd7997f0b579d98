//! What the fast-path benches share: the runtime, the timed loops over a manager, a handle and
//! the `ArcSwap` floor, the two-thread harness, and the statistics. Each bench uses a part.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokenkeeper::{
    provider_fn, AccessToken, GrantHandle, MemoryStore, ProviderError, RefreshToken, TokenKey,
    TokenManager, TokenSet, UnavailableCause,
};
use tokio::runtime::Runtime;

/// The threads of the two-thread rows.
pub const THREADS: u64 = 2;

/// Other grants in a fast-path bench's manager, so its map is not trivially small.
pub const OTHER_GRANTS: usize = 1_000;

/// The read grant's access token, valid for an hour.
pub const TOKEN: &str = "ya29.a0AfB_byC-bench-access-token-0123456789abcdef";

/// The key of other grant `i`.
pub fn other_key(i: usize) -> TokenKey {
    TokenKey::new(format!("tenant-{i:04}"))
}

/// The access token of other grant `i`.
pub fn other_token(i: usize) -> AccessToken {
    AccessToken::new(format!("at-{i}"))
}

/// A manager (on a `MemoryStore`) holding the [`OTHER_GRANTS`] other grants and `bench-grant`
/// with [`TOKEN`], all valid for an hour, and that key, read once. Its provider counts its calls
/// in `calls` and fails: a cached read must never ask it.
pub fn fast_path_manager(rt: &Runtime, calls: &'static AtomicUsize) -> (TokenManager, TokenKey) {
    let provider = provider_fn(move |_key: TokenKey, _tokens: TokenSet| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(ProviderError::unavailable(UnavailableCause::Internal)))
    });
    let manager = TokenManager::builder(provider)
        .store(MemoryStore::new())
        .build();
    let expires_at = SystemTime::now() + Duration::from_secs(3600);
    let key = TokenKey::new("bench-grant");
    rt.block_on(async {
        for i in 0..OTHER_GRANTS {
            let tokens = TokenSet::new(other_token(i))
                .with_refresh_token(RefreshToken::new(format!("rt-{i}")))
                .with_expires_at(expires_at);
            manager
                .insert(other_key(i), tokens)
                .await
                .expect("insert other grant");
        }
        let tokens = TokenSet::new(AccessToken::new(TOKEN))
            .with_refresh_token(RefreshToken::new("rt-bench"))
            .with_expires_at(expires_at);
        manager
            .insert(key.clone(), tokens)
            .await
            .expect("insert bench grant");
        let got = manager.access_token(&key).await.expect("fast path");
        assert_eq!(got.secret(), TOKEN);
    });
    (manager, key)
}

pub fn current_thread_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `calls` reads of `key`'s access token through the manager; their wall time.
pub fn manager_loop(rt: &Runtime, manager: &TokenManager, key: &TokenKey, calls: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..calls {
            let token = manager
                .access_token(black_box(key))
                .await
                .expect("access_token");
            black_box(token);
        }
        start.elapsed()
    })
}

/// The same through a `GrantHandle` (no key lookup).
pub fn handle_loop(rt: &Runtime, grant: &GrantHandle, calls: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..calls {
            let token = black_box(grant).access_token().await.expect("access_token");
            black_box(token);
        }
        start.elapsed()
    })
}

/// The floor: `calls` `ArcSwap::load_full` of the same token.
pub fn floor_loop(shared: &ArcSwap<AccessToken>, calls: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..calls {
        black_box(black_box(shared).load_full());
    }
    start.elapsed()
}

/// Wall time of `THREADS` threads each running `work(i, calls_i)`, with the calls split
/// between them; thread start-up is excluded (the clock starts when all are ready).
pub fn two_threads<F>(calls: u64, work: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let barrier = Barrier::new(THREADS as usize);
    let spans: Vec<(Instant, Instant)> = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let share = calls / THREADS + u64::from(i < calls % THREADS);
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    work(i as usize, share);
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let start = spans.iter().map(|s| s.0).min().expect("spans");
    let end = spans.iter().map(|s| s.1).max().expect("spans");
    end - start
}

pub fn ns_per_call(d: Duration, calls: u64) -> f64 {
    d.as_secs_f64() * 1e9 / calls as f64
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
