//! tokenkeeper next to the alternatives, in one run and one table: the same cached-token read
//! in every library as a ratio to the cheapest read there is (`ArcSwap::load_full` of the same
//! token); then the refresh storm, 10,000 concurrent callers on one expired grant, against a
//! `tokio::sync::OnceCell` doing the same work.
//!
//! Run with `cargo benches --bench alternatives` (the alias for `cargo bench -p
//! tokenkeeper-benches`). It measures:
//!
//! 1. **The cached read** (criterion groups `alternatives/single_thread` and
//!    `alternatives/two_threads`, then a summary of alternating rounds): the floor;
//!    `TokenManager::access_token(&key)` and `GrantHandle::access_token()` (1,000 other grants
//!    in the manager, `MemoryStore`); yup-oauth2's `Authenticator::token(scopes)` with its
//!    built-in storage and with a custom `TokenStorage`; aliri_tokens' `TokenWatcher::token()`.
//!    Every library holds a valid token for an hour: none of them may reach a server, and the
//!    bench asserts that none did (yup-oauth2's HTTP connector counts and refuses every
//!    connection; the token sources and providers count their calls).
//! 2. **The storm**: a grant whose access token has expired, then 10,000 tasks spawned at once
//!    on a 2-worker runtime, all calling `access_token` (and, separately, through one
//!    `GrantHandle`); the provider answers at once and counts its calls. Timed from the first
//!    spawn until every task has its token, in alternating rounds with the floor: 10,000 tasks
//!    on a fresh `OnceCell::get_or_init` whose init builds the same token. Every round is a real
//!    storm (a new expired grant) and must cost exactly one provider call: a hard `assert!`.
//!
//! Under `cargo test --benches` (no `--bench` argument) every part runs, with tiny loops and one
//! storm round each, as a smoke test.

mod support;

use std::future::Future;
use std::hint::black_box;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use criterion::Criterion;
use tokenkeeper::{
    provider_fn, AccessToken, Expiry, GrantHandle, MemoryStore, RefreshToken, TokenKey,
    TokenManager, TokenResponse, TokenSet,
};
use tokio::runtime::Runtime;

use support::{
    current_thread_runtime, fast_path_manager, floor_loop, handle_loop, manager_loop, median,
    ns_per_call, two_threads, THREADS, TOKEN,
};

/// Calls per row and round of the summary's plain `Instant` loops.
const SUMMARY_CALLS: u64 = 1_000_000;
const SUMMARY_ROUNDS: usize = 7;
const SCOPE: &str = "https://www.googleapis.com/auth/drive.readonly";
const HOUR: Duration = Duration::from_secs(3600);

/// Refreshes asked of the cached-read manager's provider: must stay 0.
static PROVIDER_CALLS: AtomicUsize = AtomicUsize::new(0);
/// Connections yup-oauth2 tried to open: must stay 0.
static YUP_CONNECTS: AtomicUsize = AtomicUsize::new(0);
/// Tokens aliri_tokens asked its source for: 1 (the watcher's first token), never more.
static ALIRI_REQUESTS: AtomicUsize = AtomicUsize::new(0);

// ---- tokenkeeper --------------------------------------------------------------------------

// ---- yup-oauth2 ---------------------------------------------------------------------------

/// yup-oauth2's HTTP connector: counts every connection it is asked for and refuses it, so a
/// request fails at once instead of reaching anything (and the count proves there was none).
#[derive(Clone)]
struct RefusingConnector;

impl tower_service::Service<http::Uri> for RefusingConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        YUP_CONNECTS.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "this bench opens no connection",
        )))
    }
}

type YupAuthenticator = yup_oauth2::authenticator::Authenticator<RefusingConnector>;

/// A `TokenStorage` of the bench's own: the tokens of each scope set behind an `RwLock`.
struct YupCustomStorage(RwLock<Vec<(Vec<String>, yup_oauth2::storage::TokenInfo)>>);

#[async_trait::async_trait]
impl yup_oauth2::storage::TokenStorage for YupCustomStorage {
    async fn set(
        &self,
        scopes: &[&str],
        token: yup_oauth2::storage::TokenInfo,
    ) -> Result<(), yup_oauth2::storage::TokenStorageError> {
        let mut tokens = self.0.write().expect("storage lock");
        tokens.retain(|(s, _)| s.iter().map(String::as_str).ne(scopes.iter().copied()));
        tokens.push((scopes.iter().map(|s| s.to_string()).collect(), token));
        Ok(())
    }

    async fn get(&self, scopes: &[&str]) -> Option<yup_oauth2::storage::TokenInfo> {
        let tokens = self.0.read().expect("storage lock");
        tokens
            .iter()
            .find(|(s, _)| s.iter().map(String::as_str).eq(scopes.iter().copied()))
            .map(|(_, t)| t.clone())
    }
}

fn yup_token_info() -> yup_oauth2::storage::TokenInfo {
    yup_oauth2::storage::TokenInfo {
        access_token: Some(TOKEN.to_owned()),
        refresh_token: Some("1//bench-refresh-token".to_owned()),
        expires_at: Some(time::OffsetDateTime::now_utc() + HOUR),
        id_token: None,
    }
}

/// Where the authenticator keeps its tokens.
enum YupStorage {
    /// The built-in storage, loaded from this token file.
    Builtin(std::path::PathBuf),
    Custom(YupCustomStorage),
}

/// The installed flow (a refresh token, refreshed against `token_uri` when the access token
/// expires), with every endpoint on a loopback port nothing listens on, behind the refusing
/// connector.
async fn yup_authenticator(storage: YupStorage) -> YupAuthenticator {
    let secret = yup_oauth2::ApplicationSecret {
        client_id: "bench-client".to_owned(),
        client_secret: "bench-secret".to_owned(),
        token_uri: "http://127.0.0.1:9/token".to_owned(),
        auth_uri: "http://127.0.0.1:9/auth".to_owned(),
        redirect_uris: vec!["http://127.0.0.1:9/callback".to_owned()],
        ..Default::default()
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, String>(RefusingConnector);
    let builder = yup_oauth2::InstalledFlowAuthenticator::with_client(
        secret,
        yup_oauth2::InstalledFlowReturnMethod::Interactive,
        yup_oauth2::CustomHyperClientBuilder::from(client),
    );
    let builder = match storage {
        YupStorage::Builtin(path) => builder.persist_tokens_to_disk(path),
        YupStorage::Custom(custom) => builder.with_storage(Box::new(custom)),
    };
    builder.build().await.expect("yup-oauth2 authenticator")
}

struct Yup {
    /// The built-in storage, pre-filled: yup-oauth2 fills it only through a flow, so the bench
    /// writes the token file its disk storage loads. A disk storage reads from memory exactly
    /// as the memory storage does (`tokens.lock().await.get(scopes)`); it writes the file only
    /// on `set`, which a cached read never calls.
    builtin: YupAuthenticator,
    /// A `TokenStorage` of the bench's own (`with_storage`), pre-filled.
    custom: YupAuthenticator,
    _dir: tempfile::TempDir,
}

fn yup_fixture(rt: &Runtime) -> Yup {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("yup-tokens.json");
    let file = serde_json::json!([{ "scopes": [SCOPE], "token": yup_token_info() }]);
    std::fs::write(&path, file.to_string()).expect("write yup-oauth2 token file");
    let custom = YupCustomStorage(RwLock::new(vec![(
        vec![SCOPE.to_owned()],
        yup_token_info(),
    )]));
    rt.block_on(async {
        let builtin = yup_authenticator(YupStorage::Builtin(path)).await;
        let custom = yup_authenticator(YupStorage::Custom(custom)).await;
        for auth in [&builtin, &custom] {
            let token = auth.token(&[SCOPE]).await.expect("cached token");
            assert_eq!(token.token(), Some(TOKEN));
        }
        Yup {
            builtin,
            custom,
            _dir: dir,
        }
    })
}

fn yup_loop(rt: &Runtime, auth: &YupAuthenticator, calls: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..calls {
            let token = black_box(auth)
                .token(black_box(&[SCOPE]))
                .await
                .expect("token");
            black_box(token);
        }
        start.elapsed()
    })
}

// ---- aliri_tokens -------------------------------------------------------------------------

/// The simplest token source: the same token, valid for an hour, every time it is asked.
struct AliriSource;

#[async_trait::async_trait]
impl aliri_tokens::sources::AsyncTokenSource for AliriSource {
    type Error = std::convert::Infallible;

    async fn request_token(&mut self) -> Result<aliri_tokens::TokenWithLifetime, Self::Error> {
        ALIRI_REQUESTS.fetch_add(1, Ordering::SeqCst);
        Ok(aliri_tokens::TokenLifetimeConfig::default().create_token(
            aliri_tokens::AccessToken::from(TOKEN),
            None::<aliri_tokens::IdToken>,
            aliri_clock::DurationSecs(HOUR.as_secs()),
        ))
    }
}

/// The watcher's refresh task lives on `rt` (it sleeps until the token is stale, in 45
/// minutes); its reads are plain function calls from any thread.
fn aliri_fixture(rt: &Runtime) -> aliri_tokens::TokenWatcher {
    rt.block_on(async {
        let watcher = aliri_tokens::TokenWatcher::spawn_from_token_source(
            AliriSource,
            aliri_tokens::jitter::NullJitter,
            aliri_tokens::backoff::ErrorBackoffConfig::default(),
        )
        .await
        .expect("aliri_tokens watcher");
        assert_eq!(watcher.token().access_token().as_str(), TOKEN);
        watcher
    })
}

/// `TokenWatcher::token()`: a read guard on the current token, its string borrowed.
fn aliri_borrow_loop(watcher: &aliri_tokens::TokenWatcher, calls: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..calls {
        let token = black_box(watcher).token();
        black_box(token.access_token().as_str().len());
    }
    start.elapsed()
}

/// The same, with the token copied out (a caller that holds it across an `await`, such as the
/// HTTP request it authorizes, must: the guard blocks the watcher's next token).
fn aliri_owned_loop(watcher: &aliri_tokens::TokenWatcher, calls: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..calls {
        let token = black_box(watcher).token().access_token().to_owned();
        black_box(token);
    }
    start.elapsed()
}

// ---- rows ---------------------------------------------------------------------------------

/// One measured read: its name, and a loop of `calls` reads returning their wall time.
struct Row<'a> {
    name: &'static str,
    run: Box<dyn FnMut(u64) -> Duration + 'a>,
}

impl<'a> Row<'a> {
    fn new(name: &'static str, run: impl FnMut(u64) -> Duration + 'a) -> Self {
        Self {
            name,
            run: Box::new(run),
        }
    }
}

/// Everything the rows read, set up once.
struct Fixtures {
    /// One current-thread runtime per bench thread (the first also serves one-thread rows).
    rts: [Runtime; THREADS as usize],
    floor: ArcSwap<AccessToken>,
    manager: TokenManager,
    key: TokenKey,
    grant: GrantHandle,
    yup: Yup,
    aliri: aliri_tokens::TokenWatcher,
}

const FLOOR: &str = "floor: ArcSwap::load_full";
const TK_MANAGER: &str = "tokenkeeper TokenManager::access_token";
const TK_HANDLE: &str = "tokenkeeper GrantHandle::access_token";
const YUP_BUILTIN: &str = "yup-oauth2 Authenticator::token (built-in storage)";
const YUP_CUSTOM: &str = "yup-oauth2 Authenticator::token (custom TokenStorage)";
const ALIRI_BORROW: &str = "aliri_tokens TokenWatcher::token (borrowed)";
const ALIRI_OWNED: &str = "aliri_tokens TokenWatcher::token (copied out)";

fn one_thread_rows(fx: &Fixtures) -> Vec<Row<'_>> {
    let rt = &fx.rts[0];
    vec![
        Row::new(FLOOR, |n| floor_loop(&fx.floor, n)),
        Row::new(TK_MANAGER, move |n| {
            manager_loop(rt, &fx.manager, &fx.key, n)
        }),
        Row::new(TK_HANDLE, move |n| handle_loop(rt, &fx.grant, n)),
        Row::new(YUP_BUILTIN, move |n| yup_loop(rt, &fx.yup.builtin, n)),
        Row::new(YUP_CUSTOM, move |n| yup_loop(rt, &fx.yup.custom, n)),
        Row::new(ALIRI_BORROW, |n| aliri_borrow_loop(&fx.aliri, n)),
        Row::new(ALIRI_OWNED, |n| aliri_owned_loop(&fx.aliri, n)),
    ]
}

/// Both threads read the same token.
fn two_thread_rows(fx: &Fixtures) -> Vec<Row<'_>> {
    let rts = &fx.rts;
    vec![
        Row::new(FLOOR, |n| {
            two_threads(n, |_, k| {
                floor_loop(&fx.floor, k);
            })
        }),
        Row::new(TK_MANAGER, move |n| {
            two_threads(n, |i, k| {
                manager_loop(&rts[i], &fx.manager, &fx.key, k);
            })
        }),
        Row::new(TK_HANDLE, move |n| {
            two_threads(n, |i, k| {
                handle_loop(&rts[i], &fx.grant, k);
            })
        }),
        Row::new(YUP_BUILTIN, move |n| {
            two_threads(n, |i, k| {
                yup_loop(&rts[i], &fx.yup.builtin, k);
            })
        }),
        Row::new(YUP_CUSTOM, move |n| {
            two_threads(n, |i, k| {
                yup_loop(&rts[i], &fx.yup.custom, k);
            })
        }),
        Row::new(ALIRI_BORROW, |n| {
            two_threads(n, |_, k| {
                aliri_borrow_loop(&fx.aliri, k);
            })
        }),
        Row::new(ALIRI_OWNED, |n| {
            two_threads(n, |_, k| {
                aliri_owned_loop(&fx.aliri, k);
            })
        }),
    ]
}

fn criterion_group(c: &mut Criterion, group: &str, rows: &mut [Row<'_>]) {
    let mut group = c.benchmark_group(group);
    for row in rows {
        group.bench_function(row.name, |b| b.iter_custom(|iters| (row.run)(iters)));
    }
    group.finish();
}

// ---- summary of the cached reads ----------------------------------------------------------

/// A row's median time per call, and the median of the floor rounds run next to it.
struct Measured {
    name: &'static str,
    ns: f64,
    floor_ns: f64,
}

/// Alternating rounds (after a warm-up round of everything): in each round, every row runs
/// right after a run of the floor, and is compared with the floor runs next to it.
fn measure(calls: u64, rounds: usize, rows: &mut [Row<'_>]) -> Vec<Measured> {
    let (floor, rest) = rows.split_first_mut().expect("the floor row first");
    (floor.run)(calls);
    for row in rest.iter_mut() {
        (row.run)(calls);
    }
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); rest.len()];
    for _ in 0..rounds {
        for (row, (times, floors)) in rest.iter_mut().zip(&mut samples) {
            floors.push(ns_per_call((floor.run)(calls), calls));
            times.push(ns_per_call((row.run)(calls), calls));
        }
    }
    rest.iter()
        .zip(samples)
        .map(|(row, (times, floors))| Measured {
            name: row.name,
            ns: median(times),
            floor_ns: median(floors),
        })
        .collect()
}

fn print_table(title: &str, measured: &[Measured]) {
    println!("\n{title}:");
    for m in measured {
        println!(
            "ratio {}: {:.2} ({:.1} ns / floor {:.1} ns)",
            m.name,
            m.ns / m.floor_ns,
            m.ns,
            m.floor_ns
        );
    }
}

fn ns_of(measured: &[Measured], name: &str) -> f64 {
    measured
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.ns)
        .expect("measured row")
}

/// The goal: tokenkeeper at least 4× faster than yup-oauth2 (its faster storage).
fn print_headline(threads: &str, measured: &[Measured]) {
    let yup = ns_of(measured, YUP_BUILTIN).min(ns_of(measured, YUP_CUSTOM));
    for (name, ours) in [("handle", TK_HANDLE), ("manager", TK_MANAGER)] {
        let ours = ns_of(measured, ours);
        println!(
            "headline {threads}: yup-oauth2 / tokenkeeper-{name}: {:.2} ({yup:.1} ns / {ours:.1} ns; goal >= 4)",
            yup / ours
        );
    }
}

// ---- the storm ----------------------------------------------------------------------------

const STORM_TASKS: usize = 10_000;
const STORM_ROUNDS: usize = 15;
const STORM_WORKERS: usize = 2;

/// Refreshes asked of the storm manager's provider.
static STORM_PROVIDER_CALLS: AtomicUsize = AtomicUsize::new(0);

fn storm_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(STORM_WORKERS)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The tokens a refresh yields; the same work for the provider and for the floor's init.
fn fresh_tokens(n: usize) -> TokenSet {
    TokenSet::new(AccessToken::new(format!("fresh-access-token-{n:06}")))
        .with_refresh_token(RefreshToken::new(format!("fresh-refresh-token-{n:06}")))
        .with_expires_at(SystemTime::now() + HOUR)
}

fn storm_manager() -> TokenManager {
    let provider = provider_fn(|_key: TokenKey, _tokens: TokenSet| {
        let n = STORM_PROVIDER_CALLS.fetch_add(1, Ordering::SeqCst);
        let fresh = fresh_tokens(n);
        let mut response =
            TokenResponse::new(fresh.access_token().clone()).with_expires(Expiry::In(HOUR));
        if let Some(refresh) = fresh.refresh_token() {
            response = response.with_refresh_token(refresh.clone());
        }
        std::future::ready(Ok(response))
    });
    TokenManager::builder(provider)
        .store(MemoryStore::new())
        .build()
}

/// Spawns `tasks` tasks running `call()` from a task on the runtime (as a server's handler
/// would), and waits for every one: the time from the first spawn to the last result.
fn storm<C, Fut>(rt: &Runtime, tasks: usize, call: C) -> (Duration, Vec<AccessToken>)
where
    C: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = AccessToken> + Send + 'static,
{
    let driver = async move {
        let mut handles = Vec::with_capacity(tasks);
        let mut tokens = Vec::with_capacity(tasks);
        let start = Instant::now();
        for _ in 0..tasks {
            handles.push(tokio::spawn(call()));
        }
        for handle in handles {
            tokens.push(handle.await.expect("storm task"));
        }
        (start.elapsed(), tokens)
    };
    rt.block_on(async { tokio::spawn(driver).await.expect("storm driver") })
}

/// Every caller got the same token, and it is `expected` when given.
fn all_served(tokens: &[AccessToken], tasks: usize, expected: Option<&str>) {
    assert_eq!(tokens.len(), tasks, "every caller served");
    let first = tokens[0].secret();
    assert!(
        tokens.iter().all(|t| t.secret() == first),
        "every caller got the same token"
    );
    if let Some(expected) = expected {
        assert_eq!(first, expected, "the refreshed token");
    }
}

/// The floor: a fresh `OnceCell` whose init builds the token, under the same storm.
fn storm_once_cell(rt: &Runtime, tasks: usize, round: usize) -> Duration {
    let inits = Arc::new(AtomicUsize::new(0));
    let cell = Arc::new(tokio::sync::OnceCell::<AccessToken>::new());
    let counter = inits.clone();
    let (elapsed, tokens) = storm(rt, tasks, move || {
        let (cell, inits) = (cell.clone(), counter.clone());
        async move {
            cell.get_or_init(|| async {
                inits.fetch_add(1, Ordering::SeqCst);
                fresh_tokens(round).access_token().clone()
            })
            .await
            .clone()
        }
    });
    assert_eq!(inits.load(Ordering::SeqCst), 1, "one init per storm");
    all_served(&tokens, tasks, None);
    elapsed
}

/// How the storm's callers reach the grant.
#[derive(Clone, Copy)]
enum Via {
    Manager,
    Handle,
    /// A diagnostic: `TokenManager::access_token` with its future boxed by the caller, so the
    /// spawned task carries a pointer instead of the whole future (see `future_sizes`).
    ManagerBoxed,
}

/// A new grant whose access token expired a minute ago (untimed), then the storm on it; the
/// grant is removed afterwards (untimed) so the map stays the same size round after round.
fn storm_tokenkeeper(
    rt: &Runtime,
    manager: &TokenManager,
    via: Via,
    tasks: usize,
    round: usize,
) -> Duration {
    let key = TokenKey::new(format!("storm-{round:04}"));
    let expired = TokenSet::new(AccessToken::new(format!("expired-{round}")))
        .with_refresh_token(RefreshToken::new(format!("rt-{round}")))
        .with_expires_at(SystemTime::now() - Duration::from_secs(60));
    rt.block_on(manager.insert(key.clone(), expired))
        .expect("insert the expired grant");
    let calls_before = STORM_PROVIDER_CALLS.load(Ordering::SeqCst);

    let (elapsed, tokens) = match via {
        Via::Manager => {
            let shared = Arc::new((manager.clone(), key.clone()));
            storm(rt, tasks, move || {
                let shared = shared.clone();
                async move { shared.0.access_token(&shared.1).await.expect("storm token") }
            })
        }
        Via::Handle => {
            let grant = Arc::new(manager.grant(&key));
            storm(rt, tasks, move || {
                let grant = grant.clone();
                async move { grant.access_token().await.expect("storm token") }
            })
        }
        Via::ManagerBoxed => {
            let shared = Arc::new((manager.clone(), key.clone()));
            storm(rt, tasks, move || {
                let shared = shared.clone();
                async move {
                    Box::pin(shared.0.access_token(&shared.1))
                        .await
                        .expect("storm token")
                }
            })
        }
    };

    let calls = STORM_PROVIDER_CALLS.load(Ordering::SeqCst) - calls_before;
    assert!(
        calls == 1,
        "a storm of {tasks} callers cost {calls} provider calls, not 1"
    );
    let expected = fresh_tokens(calls_before);
    all_served(&tokens, tasks, Some(expected.access_token().secret()));
    assert!(
        rt.block_on(manager.remove(&key)).expect("remove"),
        "the storm grant was there"
    );
    elapsed
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The sizes of the futures a storm's tasks hold while they wait: every spawned task carries
/// one, copied into its heap cell at spawn.
fn future_sizes(manager: &TokenManager) -> [(&'static str, usize); 3] {
    let key = TokenKey::new("size-probe");
    let grant = manager.grant(&key);
    let cell = tokio::sync::OnceCell::<AccessToken>::new();
    let manager_future = std::mem::size_of_val(&manager.access_token(&key));
    let handle_future = std::mem::size_of_val(&grant.access_token());
    let cell_future = std::mem::size_of_val(
        &cell.get_or_init(|| async { fresh_tokens(0).access_token().clone() }),
    );
    [
        ("TokenManager::access_token", manager_future),
        ("GrantHandle::access_token", handle_future),
        ("OnceCell::get_or_init", cell_future),
    ]
}

fn run_storms(tasks: usize, rounds: usize) {
    let rt = storm_runtime();
    let manager = storm_manager();
    let vias = [
        ("TokenManager::access_token", Via::Manager),
        ("GrantHandle::access_token", Via::Handle),
        (
            "TokenManager::access_token, future boxed by the caller (diagnostic)",
            Via::ManagerBoxed,
        ),
    ];
    // Warm-up: one storm of each (the runtime's workers, the map, the allocator).
    let mut round = 0;
    storm_once_cell(&rt, tasks, round);
    for (_, via) in vias {
        round += 1;
        storm_tokenkeeper(&rt, &manager, via, tasks, round);
    }
    // Each tokenkeeper storm right after a floor storm.
    let mut floor = Vec::new();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); vias.len()];
    for _ in 0..rounds {
        for ((_, via), times) in vias.iter().zip(&mut times) {
            round += 1;
            floor.push(ms(storm_once_cell(&rt, tasks, round)));
            times.push(ms(storm_tokenkeeper(&rt, &manager, *via, tasks, round)));
        }
    }
    let spread = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("{min:.2}..{max:.2} ms")
    };
    println!(
        "\nstorm: {tasks} tasks on one expired grant, {STORM_WORKERS} workers, median of \
         {rounds} rounds (floor: {} rounds), exactly 1 provider call each:",
        floor.len()
    );
    let floor_spread = spread(&floor);
    let floor_ms = median(floor);
    for ((name, _), times) in vias.iter().zip(times) {
        let range = spread(&times);
        let t = median(times);
        println!(
            "ratio storm {name}: {:.2} ({t:.2} ms / floor {floor_ms:.2} ms; range {range}; goal <= 1.2)",
            t / floor_ms
        );
    }
    println!("  floor OnceCell::get_or_init: range {floor_spread}");
    let sizes = future_sizes(&manager)
        .iter()
        .map(|(name, size)| format!("{name} {size} B"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("  futures each task holds: {sizes}");
    rt.block_on(manager.drain(Duration::from_secs(5)));
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --benches` only smoke-test the summary.
    let full = std::env::args().any(|a| a == "--bench");

    let rts = [current_thread_runtime(), current_thread_runtime()];
    let (manager, key) = fast_path_manager(&rts[0], &PROVIDER_CALLS);
    let grant = manager.grant(&key);
    let fx = Fixtures {
        floor: ArcSwap::from_pointee(AccessToken::new(TOKEN)),
        yup: yup_fixture(&rts[0]),
        aliri: aliri_fixture(&rts[0]),
        manager,
        key,
        grant,
        rts,
    };

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        // Plot rendering costs more than the measurements; keep the run short.
        .without_plots()
        .configure_from_args();
    criterion_group(
        &mut c,
        "alternatives/single_thread",
        &mut one_thread_rows(&fx),
    );
    criterion_group(
        &mut c,
        "alternatives/two_threads",
        &mut two_thread_rows(&fx),
    );
    c.final_summary();

    let (calls, rounds) = if full {
        (SUMMARY_CALLS, SUMMARY_ROUNDS)
    } else {
        (10_000, 1)
    };
    println!("\nsummary ({rounds} rounds of {calls} calls per row, median per call):");
    let one = measure(calls, rounds, &mut one_thread_rows(&fx));
    print_table("one thread", &one);
    let two = measure(calls, rounds, &mut two_thread_rows(&fx));
    print_table("two threads, same token", &two);
    println!();
    print_headline("one thread", &one);
    print_headline("two threads", &two);

    let (tasks, storm_rounds) = if full {
        (STORM_TASKS, STORM_ROUNDS)
    } else {
        (STORM_TASKS, 1)
    };
    run_storms(tasks, storm_rounds);

    // No library reached a server or a token source for a cached read.
    let calls = PROVIDER_CALLS.load(Ordering::SeqCst);
    assert_eq!(calls, 0, "tokenkeeper called its provider {calls} times");
    let connects = YUP_CONNECTS.load(Ordering::SeqCst);
    assert_eq!(connects, 0, "yup-oauth2 opened {connects} connections");
    let requests = ALIRI_REQUESTS.load(Ordering::SeqCst);
    assert_eq!(
        requests, 1,
        "aliri_tokens asked its source {requests} times"
    );
}
