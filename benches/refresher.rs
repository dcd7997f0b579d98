//! The background refresher at scale: memory per grant, scheduler CPU while idle, and refresh
//! throughput against the fake authorization server, each with a baseline from the same run.
//!
//! Run with `cargo benches --bench refresher` (the alias for `cargo bench -p
//! tokenkeeper-benches`). It measures, in this order:
//!
//! 1. **Memory per grant**: a counting global allocator reports the live bytes added by
//!    inserting 100,000 grants into a `TokenManager` (memory store) and by the refresher planning
//!    them all, per grant, next to the bytes of the token strings themselves.
//! 2. **Idle CPU**: process CPU time over 2 s of wall time with those grants, all far from due,
//!    with the refresher running on the system clock, against the same 2 s without it.
//! 3. **Refreshes per second at concurrency 64** (criterion group `refresher/refresh_c64`):
//!    `TokenManager::access_token` on expired grants against the fake server, and the baseline,
//!    raw `reqwest` refresh POSTs to the same kind of server. Both on a 2-worker runtime.
//!
//! A final summary prints every figure and the ratio library / raw.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use tokenkeeper::reqwest;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, IssuedGrant, ManualClock};
use tokenkeeper::{
    provider_fn, AccessToken, ClientSecret, GrantRecord, MemoryStore, OAuth2Provider,
    ProviderError, RefreshToken, RefresherConfig, TokenKey, TokenManager, TokenSet, TokenStore,
    UnavailableCause,
};
use tokio::runtime::Runtime;

// ---- counting allocator -------------------------------------------------------------------

/// Bytes currently allocated by this process (requested sizes, not the allocator's rounding).
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; only a counter is updated on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is checked by the caller.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// `after - before` in bytes per grant (signed: a measurement may shrink).
fn per_grant(before: usize, after: usize, grants: usize) -> f64 {
    after.wrapping_sub(before) as isize as f64 / grants as f64
}

// ---- process CPU time ---------------------------------------------------------------------

#[cfg(target_os = "linux")]
mod cpu {
    use std::ffi::{c_int, c_long};
    use std::time::Duration;

    #[repr(C)]
    struct Timeval {
        sec: c_long,
        usec: c_long,
    }

    #[repr(C)]
    struct Rusage {
        utime: Timeval,
        stime: Timeval,
        rest: [c_long; 14],
    }

    extern "C" {
        fn getrusage(who: c_int, usage: *mut Rusage) -> c_int;
    }

    const RUSAGE_SELF: c_int = 0;

    /// User + system CPU time of the whole process so far.
    pub fn process_time() -> Option<Duration> {
        let mut usage = Rusage {
            utime: Timeval { sec: 0, usec: 0 },
            stime: Timeval { sec: 0, usec: 0 },
            rest: [0; 14],
        };
        // SAFETY: `usage` is a valid, writable `struct rusage` for the duration of the call.
        if unsafe { getrusage(RUSAGE_SELF, &mut usage) } != 0 {
            return None;
        }
        let micros = |t: &Timeval| t.sec as u64 * 1_000_000 + t.usec as u64;
        Some(Duration::from_micros(
            micros(&usage.utime) + micros(&usage.stime),
        ))
    }
}

#[cfg(not(target_os = "linux"))]
mod cpu {
    pub fn process_time() -> Option<std::time::Duration> {
        None
    }
}

/// Process CPU milliseconds per wall second over `wall` of doing nothing on this thread.
fn idle_cpu_ms_per_s(wall: Duration) -> Option<f64> {
    let cpu_start = cpu::process_time()?;
    let start = Instant::now();
    std::thread::sleep(wall);
    let cpu = cpu::process_time()? - cpu_start;
    Some(cpu.as_secs_f64() * 1e3 / start.elapsed().as_secs_f64())
}

// ---- 1 and 2: memory per grant and idle CPU -----------------------------------------------

const GRANTS: usize = 100_000;
const IDLE_WALL: Duration = Duration::from_secs(2);
const THIRTY_DAYS: Duration = Duration::from_secs(30 * 24 * 3600);

struct Scale {
    grants: usize,
    token_bytes: usize,
    key_bytes: usize,
    manager_store: f64,
    /// Of `manager_store`: the `MemoryStore`'s own copy of the records (measured apart).
    store_copy: f64,
    planning: f64,
    /// The refresher's start-up: listing, loading and planning every grant.
    startup: Duration,
    idle_without: Option<f64>,
    idle_with: Option<f64>,
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A token of `len` bytes, distinct per grant, shaped like a provider's opaque token.
fn opaque(prefix: &str, i: usize, len: usize) -> String {
    let mut s = format!("{prefix}-{i:06}-{:016x}", fastrand::u64(..));
    s.extend(std::iter::repeat_n('x', len.saturating_sub(s.len())));
    s.truncate(len);
    s
}

fn scale(rt: &Runtime, grants: usize, idle_wall: Duration) -> Scale {
    // The provider is never called: every grant is valid for 30 days.
    let provider = provider_fn(|_key: TokenKey, _tokens: TokenSet| {
        std::future::ready(Err(ProviderError::unavailable(UnavailableCause::Internal)))
    });
    let manager = TokenManager::builder(provider)
        .store(MemoryStore::new())
        .build();
    let expires_at = SystemTime::now() + THIRTY_DAYS;

    let empty = live_bytes();
    let (mut token_bytes, mut key_bytes) = (0, 0);
    rt.block_on(async {
        for i in 0..grants {
            let (access, refresh) = (opaque("at", i, 64), opaque("rt", i, 48));
            token_bytes += access.len() + refresh.len();
            let key = format!("tenant-{i:06}");
            key_bytes += key.len();
            let tokens = TokenSet::new(AccessToken::new(access))
                .with_refresh_token(RefreshToken::new(refresh))
                .with_expires_at(expires_at);
            manager
                .insert(TokenKey::new(key), tokens)
                .await
                .expect("insert");
        }
        // Read every grant once, as an application would: whatever the first read caches
        // counts too.
        for i in 0..grants {
            let key = TokenKey::new(format!("tenant-{i:06}"));
            black_box(manager.access_token(&key).await.expect("cached token"));
        }
    });
    let inserted = live_bytes();

    let idle_without = idle_cpu_ms_per_s(idle_wall);

    let config = RefresherConfig::new().keep_alive(None);
    let started = Instant::now();
    let handle = rt.block_on(async {
        let handle = manager.start_refresher(config);
        handle.wait_idle().await;
        handle
    });
    let startup = started.elapsed();
    let progress = handle.progress();
    assert_eq!(progress.scheduled, grants, "every grant planned");
    assert_eq!(progress.started, 0, "nothing was due");
    let planned = live_bytes();

    let idle_with = idle_cpu_ms_per_s(idle_wall);
    assert_eq!(handle.progress().started, 0, "nothing became due");
    assert!(handle.is_running(), "the refresher is alive");

    rt.block_on(handle.shutdown());
    drop(manager);
    Scale {
        grants,
        token_bytes,
        key_bytes,
        manager_store: per_grant(empty, inserted, grants),
        store_copy: store_copy(rt, grants, expires_at),
        startup,
        planning: per_grant(inserted, planned, grants),
        idle_without,
        idle_with,
    }
}

/// The refresher's start-up time with `grants` grants (far from due).
fn scale_startup_only(rt: &Runtime, grants: usize) -> Duration {
    let provider = provider_fn(|_key: TokenKey, _tokens: TokenSet| {
        std::future::ready(Err(ProviderError::unavailable(UnavailableCause::Internal)))
    });
    let manager = TokenManager::builder(provider)
        .store(MemoryStore::new())
        .build();
    let expires_at = SystemTime::now() + THIRTY_DAYS;
    rt.block_on(async {
        for i in 0..grants {
            let tokens = TokenSet::new(AccessToken::new(opaque("at", i, 64)))
                .with_refresh_token(RefreshToken::new(opaque("rt", i, 48)))
                .with_expires_at(expires_at);
            let key = TokenKey::new(format!("tenant-{i:06}"));
            manager.insert(key, tokens).await.expect("insert");
        }
        let started = Instant::now();
        let handle = manager.start_refresher(RefresherConfig::new().keep_alive(None));
        handle.wait_idle().await;
        let startup = started.elapsed();
        assert_eq!(handle.progress().scheduled, grants, "every grant planned");
        handle.shutdown().await;
        startup
    })
}

/// The bytes per grant a `MemoryStore` adds to hold records whose keys and tokens already
/// exist (as they do in a manager, which shares them with its cache): the part of the memory
/// figure that a store outside the process (Redis, PostgreSQL) does not cost.
fn store_copy(rt: &Runtime, grants: usize, expires_at: SystemTime) -> f64 {
    let records: Vec<(TokenKey, GrantRecord)> = (0..grants)
        .map(|i| {
            let tokens = TokenSet::new(AccessToken::new(opaque("at", i, 64)))
                .with_refresh_token(RefreshToken::new(opaque("rt", i, 48)))
                .with_expires_at(expires_at);
            (
                TokenKey::new(format!("tenant-{i:06}")),
                GrantRecord::new(tokens),
            )
        })
        .collect();
    let store = MemoryStore::new();
    let before = live_bytes();
    rt.block_on(async {
        for (key, record) in &records {
            store.save(key, record, None).await.expect("save");
        }
    });
    let after = live_bytes();
    drop(store);
    per_grant(before, after, grants)
}

// ---- 3: refreshes per second at concurrency 64 --------------------------------------------

const CONCURRENCY: usize = 64;
/// Grants per fixture; each is refreshed at most once per pass.
const REFRESH_GRANTS: usize = 2_000;
/// Moved between passes so every access token has expired (the Standard preset's live 1 h).
const PASS_ADVANCE: Duration = Duration::from_secs(2 * 3600);
const SUMMARY_ROUNDS: usize = 9;

/// The library path: a manager whose grants' access tokens are all expired.
struct LibraryFixture {
    clock: Arc<ManualClock>,
    server: FakeAuthServer,
    manager: TokenManager,
    keys: Arc<[TokenKey]>,
    refreshes: AtomicUsize,
}

/// The baseline: the fake server alone, driven by plain `reqwest` refresh POSTs.
struct RawFixture {
    server: FakeAuthServer,
    raw: Arc<RawClient>,
    refreshes: AtomicUsize,
}

struct RawClient {
    http: reqwest::Client,
    url: String,
    client_id: String,
    client_secret: String,
    /// Each grant's current tokens, replaced by those of every reply.
    grants: Vec<Mutex<RawGrant>>,
}

/// A grant as a hand-rolled client keeps it.
struct RawGrant {
    access_token: String,
    refresh_token: String,
    expires_at: Option<SystemTime>,
}

/// What a hand-rolled client reads from a token reply (RFC 6749 §5.1).
#[derive(serde::Deserialize)]
struct TokenReply {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
    #[allow(dead_code)]
    token_type: Option<String>,
    #[allow(dead_code)]
    scope: Option<String>,
}

/// The tokens of a grant the fake server issued, as an app would store them.
fn tokens(grant: &IssuedGrant) -> TokenSet {
    let mut set = TokenSet::new(AccessToken::new(grant.access_token.clone()))
        .with_refresh_token(RefreshToken::new(grant.refresh_token.clone()))
        .with_expires_at(grant.access_expires_at);
    if let Some(at) = grant.refresh_expires_at {
        set = set.with_refresh_expires_at(at);
    }
    set
}

/// The RFC 6749 provider for a Standard or Constant Contact-style fake server.
fn oauth2_provider(server: &FakeAuthServer) -> OAuth2Provider {
    OAuth2Provider::builder(server.client_id(), server.token_url())
        .client_secret(ClientSecret::new(server.client_secret()))
        .build()
        .expect("valid provider configuration")
}

fn library_fixture(rt: &Runtime, grants: usize) -> LibraryFixture {
    rt.block_on(async {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
        let manager = TokenManager::builder(oauth2_provider(&server))
            .store(MemoryStore::new())
            .clock(clock.clone())
            .build();
        let mut keys = Vec::with_capacity(grants);
        for i in 0..grants {
            let key = TokenKey::new(format!("tenant-{i:05}"));
            manager
                .insert(key.clone(), tokens(&server.issue_grant()))
                .await
                .expect("insert");
            keys.push(key);
        }
        LibraryFixture {
            clock,
            server,
            manager,
            keys: keys.into(),
            refreshes: AtomicUsize::new(0),
        }
    })
}

fn raw_fixture(rt: &Runtime, grants: usize) -> RawFixture {
    rt.block_on(async {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(FakeConfig::standard(), clock).await;
        let grants = (0..grants)
            .map(|_| {
                let grant = server.issue_grant();
                Mutex::new(RawGrant {
                    access_token: grant.access_token,
                    refresh_token: grant.refresh_token,
                    expires_at: Some(grant.access_expires_at),
                })
            })
            .collect();
        let raw = Arc::new(RawClient {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("reqwest client"),
            url: server.token_url(),
            client_id: server.client_id().to_owned(),
            client_secret: server.client_secret().to_owned(),
            grants,
        });
        RawFixture {
            server,
            raw,
            refreshes: AtomicUsize::new(0),
        }
    })
}

impl RawClient {
    /// One refresh of grant `i`, as a hand-rolled client does it: POST the form with client
    /// authentication, check the status, parse the JSON reply into a token struct, and keep
    /// the new tokens (the rotated refresh token, the access token and its expiry).
    async fn refresh(&self, i: usize) {
        let current = self.grants[i]
            .lock()
            .expect("grant lock")
            .refresh_token
            .clone();
        let reply = self
            .http
            .post(&self.url)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("grant_type=refresh_token&refresh_token={current}"))
            .send()
            .await
            .expect("refresh POST");
        assert_eq!(reply.status(), 200, "raw refresh");
        let body = reply.bytes().await.expect("reply body");
        let reply: TokenReply = serde_json::from_slice(&body).expect("JSON token reply");
        let expires_at = reply
            .expires_in
            .map(|secs| SystemTime::now() + Duration::from_secs(secs));
        let mut grant = self.grants[i].lock().expect("grant lock");
        grant.access_token = reply.access_token;
        grant.refresh_token = reply.refresh_token.expect("rotated refresh token");
        grant.expires_at = expires_at;
        std::hint::black_box(&*grant);
    }
}

/// Runs `work(i)` for every `i` in `0..n` on `CONCURRENCY` tasks; returns the wall time.
async fn concurrently<F, Fut>(n: usize, work: F) -> Duration
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let work = Arc::new(work);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (work, next) = (work.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    work(i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("refresh task");
    }
    start.elapsed()
}

/// `refreshes` library refreshes, in passes over distinct grants; the clock moves before each
/// pass so every grant's access token has expired. Only the passes are timed.
fn library_refreshes(rt: &Runtime, fx: &LibraryFixture, refreshes: u64) -> Duration {
    let mut left = refreshes as usize;
    let mut total = Duration::ZERO;
    while left > 0 {
        let n = left.min(fx.keys.len());
        fx.clock.advance(PASS_ADVANCE);
        let (manager, keys) = (fx.manager.clone(), fx.keys.clone());
        total += rt.block_on(concurrently(n, move |i| {
            let (manager, keys) = (manager.clone(), keys.clone());
            async move {
                let token = manager.access_token(&keys[i]).await.expect("refresh");
                std::hint::black_box(token);
            }
        }));
        fx.refreshes.fetch_add(n, Ordering::Relaxed);
        left -= n;
    }
    total
}

/// `refreshes` raw refresh POSTs, in passes over distinct grants.
fn raw_refreshes(rt: &Runtime, fx: &RawFixture, refreshes: u64) -> Duration {
    let mut left = refreshes as usize;
    let mut total = Duration::ZERO;
    while left > 0 {
        let n = left.min(fx.raw.grants.len());
        let raw = fx.raw.clone();
        total += rt.block_on(concurrently(n, move |i| {
            let raw = raw.clone();
            async move { raw.refresh(i).await }
        }));
        fx.refreshes.fetch_add(n, Ordering::Relaxed);
        left -= n;
    }
    total
}

fn bench_refresh(c: &mut Criterion, rt: &Runtime, lib: &LibraryFixture, raw: &RawFixture) {
    let mut group = c.benchmark_group("refresher/refresh_c64");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline_raw_reqwest", |b| {
        b.iter_custom(|iters| raw_refreshes(rt, raw, iters))
    });
    group.bench_function("manager_access_token", |b| {
        b.iter_custom(|iters| library_refreshes(rt, lib, iters))
    });
    group.finish();
}

// ---- summary ------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_scale(s: &Scale, idle_wall: Duration) {
    let n = s.grants as f64;
    let total = s.manager_store + s.planning;
    let tokens = s.token_bytes as f64 / n;
    println!(
        "memory, {} grants (token strings {tokens:.0} B/grant, keys {:.0} B/grant):",
        s.grants,
        s.key_bytes as f64 / n
    );
    println!(
        "  manager + store {:.0} B/grant, refresher planning {:.0} B/grant",
        s.manager_store, s.planning
    );
    println!(
        "  total {total:.0} B/grant = token strings {tokens:.0} + beyond the token strings {:.0}",
        total - tokens
    );
    println!(
        "  beyond the token strings after inserting and reading every grant once: {:.0} B/grant \
         = the manager's own {:.0} + the MemoryStore's copy of the records {:.0}",
        s.manager_store - tokens,
        s.manager_store - tokens - s.store_copy,
        s.store_copy
    );
    println!(
        "refresher start-up (list, load and plan every grant): {:.0} ms for {} grants, \
         {:.2} µs per grant",
        s.startup.as_secs_f64() * 1e3,
        s.grants,
        s.startup.as_secs_f64() * 1e6 / n
    );
    let ms = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
    println!(
        "idle CPU, {} grants, nothing due, {:.1} s wall each: without refresher {} ms/s, \
         with refresher {} ms/s, difference {} ms/s",
        s.grants,
        idle_wall.as_secs_f64(),
        ms(s.idle_without),
        ms(s.idle_with),
        ms(s.idle_with.zip(s.idle_without).map(|(w, o)| w - o)),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --benches` only smoke-test the figures.
    let full = std::env::args().any(|a| a == "--bench");
    // `TK_BENCH_ONLY=throughput`: only the refresh throughput (for profiling and iterating on
    // it); memory, start-up and idle CPU are skipped.
    let profile = std::env::var("TK_BENCH_PROFILE").ok();
    let only_throughput =
        profile.is_some() || std::env::var("TK_BENCH_ONLY").is_ok_and(|v| v == "throughput");
    let rt = runtime();

    // Before anything else runs in this process, so the allocator counts only the grants.
    let (grants, idle_wall) = if full {
        (GRANTS, IDLE_WALL)
    } else {
        (1_000, Duration::from_millis(100))
    };
    let scale = (!only_throughput).then(|| {
        let scale = scale(&rt, grants, idle_wall);
        // The start-up again at a tenth of the grants: per grant it should be about the same
        // (O(n log n): a sorted plan), not ten times less.
        let tenth = scale_startup_only(&rt, grants / 10);
        (scale, tenth)
    });

    let lib = library_fixture(&rt, REFRESH_GRANTS);
    let raw = raw_fixture(&rt, REFRESH_GRANTS);
    // `TK_BENCH_PROFILE=raw` or `=manager` (with `--bench`): only that side, 40,000 refreshes
    // (or `TK_BENCH_PROFILE_N`) after a warm-up pass, nothing else; for `perf record` or
    // `valgrind --tool=callgrind` of one side at a time.
    if let Some(side) = profile {
        let n = match std::env::var("TK_BENCH_PROFILE_N") {
            Ok(n) => n
                .parse()
                .expect("TK_BENCH_PROFILE_N: a number of refreshes"),
            Err(_) if full => 40_000,
            Err(_) => 200,
        };
        let run = |n| match side.as_str() {
            "raw" => raw_refreshes(&rt, &raw, n),
            "manager" => library_refreshes(&rt, &lib, n),
            other => panic!("TK_BENCH_PROFILE: `raw` or `manager`, not {other:?}"),
        };
        run(REFRESH_GRANTS as u64);
        let took = run(n);
        println!(
            "{side} only: {n} refreshes, {:.0}/s",
            n as f64 / took.as_secs_f64()
        );
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        // Plot rendering costs more than the measurements; keep the run short.
        .without_plots()
        .configure_from_args();
    bench_refresh(&mut c, &rt, &lib, &raw);
    c.final_summary();

    // Alternating rounds of one full pass each, after a warm-up pass each.
    let (rounds, per_round) = if full {
        (SUMMARY_ROUNDS, REFRESH_GRANTS as u64)
    } else {
        (1, 200)
    };
    raw_refreshes(&rt, &raw, per_round);
    library_refreshes(&rt, &lib, per_round);
    let (mut l, mut r) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        r.push(per_round as f64 / raw_refreshes(&rt, &raw, per_round).as_secs_f64());
        l.push(per_round as f64 / library_refreshes(&rt, &lib, per_round).as_secs_f64());
    }
    let (l, r) = (median(l), median(r));

    // Every library call was a real refresh, every one succeeded, none tripped reuse detection.
    for (server, done, what) in [
        (&lib.server, &lib.refreshes, "library"),
        (&raw.server, &raw.refreshes, "raw"),
    ] {
        let done = done.load(Ordering::Relaxed);
        assert_eq!(server.refresh_calls(), done, "{what}: one call per refresh");
        assert_eq!(server.reuse_detections(), 0, "{what}: no reuse detected");
    }

    println!("\nsummary:");
    if let Some((scale, tenth)) = &scale {
        print_scale(scale, idle_wall);
        println!(
            "refresher start-up at {} grants: {:.2} µs per grant (at {}: {:.2}; ratio {:.2})",
            grants / 10,
            tenth.as_secs_f64() * 1e6 / (grants / 10) as f64,
            grants,
            scale.startup.as_secs_f64() * 1e6 / grants as f64,
            (scale.startup.as_secs_f64() / grants as f64)
                / (tenth.as_secs_f64() / (grants / 10) as f64)
        );
    }
    println!(
        "refreshes/s at concurrency {CONCURRENCY}, {REFRESH_GRANTS} grants, median of {rounds} \
         rounds of {per_round}: raw reqwest {r:.0}/s, manager {l:.0}/s, \
         ratio manager/raw {:.2}",
        l / r
    );
}
