//! The background refresher: keep-alive, expiry warnings, caps, jitter, failure handling.
//!
//! Time is a shared `ManualClock`: the scheduler waits on it, so moving it and calling
//! `wait_idle` runs days of schedule in milliseconds. Tests against the fake server use real
//! tokio time (their HTTP needs it) but never sleep.

mod support;

use support::store::FaultyStore;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use support::drain;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{
    provider_fn, AccessToken, Clock, Event, Expiry, GrantHealth, InvalidationReason, MemoryStore,
    ProviderError, RefreshToken, RefresherConfig, TokenKey, TokenManager, TokenResponse, TokenSet,
    TokenStore, UnavailableCause,
};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// 1,000 grants on the Constant Contact-style preset (24 h access tokens, refresh tokens that
/// die after 180 days unused), a third of them never called by anyone, for 400 days. The other
/// two thirds are called every 20 days. Returns how many grants are dead on day 400.
async fn four_hundred_days(keep_alive: Option<Duration>) -> (usize, usize) {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
    let manager = TokenManager::builder(support::oauth2_provider(&server))
        .clock(clock.clone())
        .build();
    let keys: Vec<TokenKey> = (0..1000)
        .map(|i| TokenKey::from(format!("site-{i}")))
        .collect();
    for key in &keys {
        manager
            .insert(key.clone(), support::tokens(&server.issue_grant()))
            .await
            .unwrap();
    }
    let refresher = manager.start_refresher(RefresherConfig::new().keep_alive(keep_alive));
    let called = |i: usize| !i.is_multiple_of(3);

    for half_day in 1..=800 {
        clock.advance(HOUR * 12);
        refresher.wait_idle().await;
        if half_day % 40 == 0 {
            let calls: Vec<_> = keys
                .iter()
                .enumerate()
                .filter(|(i, _)| called(*i))
                .map(|(_, key)| {
                    let (manager, key) = (manager.clone(), key.clone());
                    tokio::spawn(async move { manager.access_token(&key).await })
                })
                .collect();
            for call in calls {
                call.await.unwrap().expect("a grant in use stays alive");
            }
        }
    }
    assert!(refresher.is_running());
    assert_eq!(server.reuse_detections(), 0);

    let (mut dead_idle, mut dead_called) = (0, 0);
    for (i, key) in keys.iter().enumerate() {
        match manager.access_token(key).await {
            Ok(_) => {}
            Err(e) if e.is_reauth_required() => {
                if called(i) {
                    dead_called += 1
                } else {
                    dead_idle += 1
                }
            }
            Err(e) => panic!("unexpected error for {key}: {e}"),
        }
    }
    refresher.shutdown().await;
    (dead_idle, dead_called)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_saves_idle_grants_over_400_days() {
    let (dead_idle, dead_called) = four_hundred_days(Some(30 * DAY)).await;
    assert_eq!((dead_idle, dead_called), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keep_alive_idle_grants_die() {
    let (dead_idle, dead_called) = four_hundred_days(None).await;
    assert_eq!(
        (dead_idle, dead_called),
        (334, 0),
        "every never-called grant dies"
    );
}

/// Xoxoday-style grants have a refresh token that dies 30 days after the grant was made, and
/// no refresh extends it: the app must hear about it ahead of time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_soon_fires_once_for_every_non_renewable_grant_ahead_of_time() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::xoxoday(), clock.clone()).await;
    let manager = TokenManager::builder(support::XoxodayProvider::new(&server))
        .clock(clock.clone())
        .event_capacity(100_000)
        .build();
    let mut events = manager.subscribe();
    let mut dies = None;
    for i in 0..1000 {
        let grant = server.issue_grant();
        dies = grant.refresh_expires_at;
        manager
            .insert(TokenKey::from(format!("shop-{i}")), support::tokens(&grant))
            .await
            .unwrap();
    }
    let dies = dies.expect("the preset states the refresh token's expiry");
    let refresher = manager.start_refresher(RefresherConfig::new());

    let mut warned = HashSet::new();
    let (mut refreshed, mut died) = (0, 0);
    while clock.now() < dies {
        clock.advance(HOUR * 6);
        refresher.wait_idle().await;
        for event in drain(&mut events) {
            match event {
                Event::RefreshTokenExpiring {
                    key, expires_at, ..
                } => {
                    assert_eq!(expires_at, dies);
                    assert!(clock.now() <= dies - 7 * DAY + HOUR * 6, "warned late");
                    assert!(warned.insert(key), "warned twice");
                }
                Event::Refreshed { .. } => refreshed += 1,
                // On the day itself the grants die, without a call to the provider.
                Event::ReauthorizationRequired {
                    reason: InvalidationReason::RefreshTokenExpired,
                    ..
                } if clock.now() >= dies => died += 1,
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
    assert_eq!(warned.len(), 1000);
    assert!(died <= 1000);
    // Once the last access token (15 days) has run out too, every grant is dead and says why.
    clock.advance(16 * DAY);
    refresher.wait_idle().await;
    for i in 0..1000 {
        let err = manager
            .access_token(&TokenKey::from(format!("shop-{i}")))
            .await
            .unwrap_err();
        assert_eq!(
            err.invalidation_reason(),
            Some(&InvalidationReason::RefreshTokenExpired)
        );
    }
    // Keep-alive (7 days by default) refreshed every grant meanwhile; none of it moved the
    // non-renewable expiry, and none of it warned again.
    assert!(refreshed >= 3000, "{refreshed}");
    assert_eq!(server.reuse_detections(), 0);
    refresher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_minute_cap_holds_and_jitter_spreads_grants_issued_together() {
    async fn run(cap: usize) -> Vec<SystemTime> {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
        let manager = TokenManager::builder(support::oauth2_provider(&server))
            .clock(clock.clone())
            .build();
        for i in 0..300 {
            let key = TokenKey::from(format!("k{i}"));
            manager
                .insert(key, support::tokens(&server.issue_grant()))
                .await
                .unwrap();
        }
        let refresher = manager.start_refresher(
            RefresherConfig::new()
                .refresh_idle(true)
                .keep_alive(None)
                .max_per_minute(cap),
        );
        clock.advance(HOUR * 20);
        refresher.wait_idle().await;
        assert_eq!(
            server.refresh_calls(),
            0,
            "nothing is due 20 h into a 24 h token"
        );
        while server.refresh_calls() < 300 {
            assert!(
                clock.now() < SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600) + DAY
            );
            clock.advance(Duration::from_secs(10));
            refresher.wait_idle().await;
        }
        refresher.shutdown().await;
        server.requests().iter().map(|r| r.at).collect()
    }

    let capped = run(20).await;
    for (i, start) in capped.iter().enumerate() {
        let in_window = capped[i..]
            .iter()
            .take_while(|t| **t < *start + Duration::from_secs(60))
            .count();
        assert!(
            in_window <= 20,
            "{in_window} refreshes in the minute from request {i}"
        );
    }

    let uncapped = run(10_000).await;
    let distinct: BTreeSet<_> = uncapped.iter().collect();
    let span = uncapped
        .last()
        .unwrap()
        .duration_since(uncapped[0])
        .unwrap();
    assert!(
        distinct.len() >= 50,
        "only {} distinct refresh times",
        distinct.len()
    );
    assert!(
        span >= Duration::from_secs(20 * 60),
        "spread over only {span:?}"
    );
}

/// A provider that fails with 503 while `failing` is set and panics while `panicking` is.
struct Flaky {
    failing: AtomicBool,
    panicking: AtomicBool,
    ok: AtomicUsize,
    failed: AtomicUsize,
}

impl Flaky {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            failing: AtomicBool::new(false),
            panicking: AtomicBool::new(false),
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl tokenkeeper::Provider for Flaky {
    async fn refresh(
        &self,
        _: tokenkeeper::RefreshRequest<'_>,
    ) -> Result<TokenResponse, ProviderError> {
        if self.panicking.load(Ordering::SeqCst) {
            panic!("provider bug");
        }
        if self.failing.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(ProviderError::unavailable(UnavailableCause::ServerError).with_status(503));
        }
        let n = self.ok.fetch_add(1, Ordering::SeqCst);
        Ok(TokenResponse::new(AccessToken::new(format!("at-{n}")))
            .with_refresh_token(RefreshToken::new(format!("rt-{n}")))
            .with_expires(Expiry::In(DAY)))
    }
}

async fn insert_grants(manager: &TokenManager, clock: &ManualClock, n: usize) -> Vec<TokenKey> {
    let mut keys = Vec::new();
    for i in 0..n {
        let key = TokenKey::from(format!("g{i}"));
        let tokens = TokenSet::new(AccessToken::new("at-initial"))
            .with_refresh_token(RefreshToken::new("rt-initial"))
            .with_expires_at(clock.now() + DAY);
        manager.insert(key.clone(), tokens).await.unwrap();
        keys.push(key);
    }
    keys
}

#[tokio::test]
async fn a_day_of_5xx_then_health_refreshes_everything_and_loses_no_event() {
    let clock = Arc::new(ManualClock::fixed());
    let provider = Flaky::new();
    let manager = TokenManager::builder(provider.clone())
        .clock(clock.clone())
        .event_capacity(1_000_000)
        .build();
    let mut events = manager.subscribe();
    let keys = insert_grants(&manager, &clock, 100).await;
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));

    provider.failing.store(true, Ordering::SeqCst);
    let (mut refreshed, mut failed) = (0, 0);
    let mut count = |events: Vec<Event>| {
        for e in events {
            match e {
                Event::Refreshed { .. } => refreshed += 1,
                Event::RefreshFailed { retry_at, .. } => {
                    assert!(retry_at.is_some());
                    failed += 1
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    // From hour 20 (refreshes become due) through hour 44: a day of outage.
    clock.advance(HOUR * 20);
    for _ in 0..(24 * 6) {
        clock.advance(Duration::from_secs(600));
        refresher.wait_idle().await;
        count(drain(&mut events));
    }
    assert!(provider.failed.load(Ordering::SeqCst) >= 100);
    assert_eq!(provider.ok.load(Ordering::SeqCst), 0);
    provider.failing.store(false, Ordering::SeqCst);
    for _ in 0..(24 * 6) {
        clock.advance(Duration::from_secs(600));
        refresher.wait_idle().await;
        count(drain(&mut events));
    }
    assert!(refresher.is_running(), "the scheduler survived the outage");
    assert_eq!(
        failed,
        provider.failed.load(Ordering::SeqCst),
        "a failure event was lost"
    );
    assert_eq!(
        refreshed,
        provider.ok.load(Ordering::SeqCst),
        "a refresh event was lost"
    );
    for key in &keys {
        let status = manager.status(key).await.unwrap();
        assert_eq!(status.health, GrantHealth::Active, "{key}");
        assert!(status.access_expires_at.unwrap() > clock.now(), "{key}");
        assert_eq!(status.failures, 0);
    }
    refresher.shutdown().await;
}

#[tokio::test]
async fn a_panicking_provider_does_not_kill_the_scheduler() {
    let clock = Arc::new(ManualClock::fixed());
    let provider = Flaky::new();
    let manager = TokenManager::builder(provider.clone())
        .clock(clock.clone())
        .build();
    let keys = insert_grants(&manager, &clock, 10).await;
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    provider.panicking.store(true, Ordering::SeqCst);
    clock.advance(HOUR * 23);
    refresher.wait_idle().await;
    assert!(refresher.is_running());
    provider.panicking.store(false, Ordering::SeqCst);
    // Attempts after a panic are spaced by the retry floor, not repeated in a loop.
    clock.advance(Duration::from_secs(60));
    refresher.wait_idle().await;
    assert_eq!(provider.ok.load(Ordering::SeqCst), 10);
    for key in &keys {
        assert!(
            manager
                .status(key)
                .await
                .unwrap()
                .access_expires_at
                .unwrap()
                > clock.now() + HOUR * 20
        );
    }
    refresher.shutdown().await;
}

#[tokio::test]
async fn dead_grants_are_skipped() {
    let clock = Arc::new(ManualClock::fixed());
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let calls = calls.clone();
        provider_fn(move |_, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(ProviderError::reauthorize(InvalidationReason::Revoked)) }
        })
    };
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    insert_grants(&manager, &clock, 5).await;
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    for _ in 0..30 {
        clock.advance(DAY);
        refresher.wait_idle().await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "one attempt per grant, then never again"
    );
    assert_eq!(manager.reauthorization_required().await.unwrap().len(), 5);
    assert_eq!(refresher.progress().scheduled, 0);
    refresher.shutdown().await;
}

#[tokio::test]
async fn grants_added_by_another_process_are_picked_up_by_the_rescan() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    let provider = Flaky::new();
    let ours = TokenManager::builder(provider.clone())
        .store(store.clone())
        .clock(clock.clone())
        .build();
    let theirs = TokenManager::builder(provider.clone())
        .store(store.clone())
        .clock(clock.clone())
        .build();
    let refresher = ours.start_refresher(
        RefresherConfig::new()
            .refresh_idle(true)
            .rescan_interval(Duration::from_secs(600)),
    );
    refresher.wait_idle().await;
    insert_grants(&theirs, &clock, 3).await;
    clock.advance(Duration::from_secs(601));
    refresher.wait_idle().await;
    assert_eq!(refresher.progress().scheduled, 3);
    clock.advance(HOUR * 23);
    refresher.wait_idle().await;
    assert_eq!(provider.ok.load(Ordering::SeqCst), 3);
    refresher.shutdown().await;
}

#[tokio::test]
async fn an_idle_scheduler_sleeps_instead_of_polling_grants() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::without_lock());
    let manager = TokenManager::builder(Flaky::new())
        .store(store.clone())
        .clock(clock.clone())
        .build();
    insert_grants(&manager, &clock, 10_000).await;
    let refresher = manager.start_refresher(RefresherConfig::new());
    refresher.wait_idle().await;
    assert_eq!(refresher.progress().scheduled, 10_000);
    let after_scan = store.loads.load(Ordering::SeqCst);
    // Nine minutes pass with nothing due (and no rescan): no store access at all.
    for _ in 0..9 {
        clock.advance(Duration::from_secs(60));
        refresher.wait_idle().await;
    }
    assert_eq!(store.loads.load(Ordering::SeqCst), after_scan);
    refresher.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_the_scheduler_but_a_refresh_already_sent_is_saved() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(tokio::sync::Notify::new());
    let provider = {
        let (release, entered) = (release.clone(), entered.clone());
        provider_fn(move |_, _| {
            let (release, entered) = (release.clone(), entered.clone());
            async move {
                entered.notify_one();
                release.notified().await;
                Ok(TokenResponse::new(AccessToken::new("at-new"))
                    .with_refresh_token(RefreshToken::new("rt-new"))
                    .with_expires(Expiry::In(DAY)))
            }
        })
    };
    let manager = TokenManager::builder(provider)
        .store(store.clone())
        .clock(clock.clone())
        .build();
    let keys = insert_grants(&manager, &clock, 1).await;
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    clock.advance(HOUR * 23);
    entered.notified().await;
    // Shutdown stops the scheduler, then waits for the refresh in flight to be saved.
    let shutdown = tokio::spawn(refresher.shutdown());
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!shutdown.is_finished(), "returned with a refresh in flight");
    release.notify_one();
    assert!(shutdown.await.unwrap(), "drained");
    let stored = store.load(&keys[0]).await.unwrap().unwrap().value;
    assert_eq!(stored.tokens().refresh_token().unwrap().secret(), "rt-new");
    assert_eq!(stored.tokens().access_token().secret(), "at-new");
}

#[tokio::test]
async fn dropping_the_handle_stops_the_scheduler() {
    let clock = Arc::new(ManualClock::fixed());
    let provider = Flaky::new();
    let manager = TokenManager::builder(provider.clone())
        .clock(clock.clone())
        .build();
    insert_grants(&manager, &clock, 3).await;
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    refresher.wait_idle().await;
    drop(refresher);
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    clock.advance(HOUR * 23);
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(provider.ok.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn status_shows_the_refreshers_plan() {
    let clock = Arc::new(ManualClock::fixed());
    let provider = Flaky::new();
    let manager = TokenManager::builder(provider.clone())
        .clock(clock.clone())
        .build();
    let keys = insert_grants(&manager, &clock, 1).await;
    let before = manager
        .status(&keys[0])
        .await
        .unwrap()
        .next_refresh
        .unwrap();
    assert_eq!(
        before,
        clock.now() + DAY - Duration::from_secs(60),
        "call-driven: expiry less margin"
    );
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    refresher.wait_idle().await;
    let planned = manager
        .status(&keys[0])
        .await
        .unwrap()
        .next_refresh
        .unwrap();
    // Lead: 10 % of the 24 h lifetime, plus up to 25 % jitter.
    assert!(
        planned <= clock.now() + DAY - HOUR * 2 - Duration::from_secs(24 * 36),
        "{planned:?}"
    );
    assert!(planned >= clock.now() + DAY - HOUR * 3 - Duration::from_secs(36 * 60));
    clock.advance(planned.duration_since(clock.now()).unwrap());
    refresher.wait_idle().await;
    assert_eq!(provider.ok.load(Ordering::SeqCst), 1);
    let status = manager.status(&keys[0]).await.unwrap();
    assert_eq!(status.last_refresh, Some(clock.now()));
    assert!(status.next_refresh.unwrap() > clock.now() + HOUR * 20);
    refresher.shutdown().await;
}

#[tokio::test]
async fn a_failing_store_becomes_events_and_the_scheduler_carries_on() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::without_lock());
    let provider = Flaky::new();
    let manager = TokenManager::builder(provider.clone())
        .store(store.clone())
        .clock(clock.clone())
        .build();
    let mut events = manager.subscribe();
    insert_grants(&manager, &clock, 2).await;
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    refresher.wait_idle().await;
    store.fail_loads.store(true, Ordering::SeqCst);
    clock.advance(HOUR * 23);
    refresher.wait_idle().await;
    let failures = support::drain(&mut events)
        .into_iter()
        .filter(|e| {
            matches!(e, Event::RefreshFailed { error, retry_at: Some(_), .. }
                if matches!(error, tokenkeeper::Error::Store(_)))
        })
        .count();
    assert_eq!(
        failures, 2,
        "one event per grant the scheduler could not load"
    );
    assert!(refresher.is_running());
    store.fail_loads.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(60));
    refresher.wait_idle().await;
    assert_eq!(provider.ok.load(Ordering::SeqCst), 2);
    refresher.shutdown().await;
}

/// Idle grants on a provider whose refresh tokens die after `idle` unused, for `days`: returns
/// (dead grants, refresh calls per grant). Declared `Sliding { idle }`, keep-alive follows the
/// idle lifetime; undeclared, it runs every 7 days (the default).
async fn idle_grants(idle: Duration, declared: bool, days: u32) -> (usize, f64) {
    use tokenkeeper::testing::RefreshLifetime;
    use tokenkeeper::RefreshExpiry;
    let clock = Arc::new(ManualClock::fixed());
    let config =
        FakeConfig::constant_contact().with_refresh_lifetime(RefreshLifetime::Sliding(idle));
    let server = FakeAuthServer::start(config, clock.clone()).await;
    let manager = TokenManager::builder(support::oauth2_provider(&server))
        .clock(clock.clone())
        .build();
    let keys: Vec<TokenKey> = (0..20)
        .map(|i| TokenKey::from(format!("idle-{i}")))
        .collect();
    for key in &keys {
        let mut tokens = support::tokens(&server.issue_grant());
        if declared {
            tokens = tokens.with_refresh_expiry(RefreshExpiry::Sliding { idle });
        }
        manager.insert(key.clone(), tokens).await.unwrap();
    }
    let refresher = manager.start_refresher(RefresherConfig::new());
    for _ in 0..days * 2 {
        clock.advance(HOUR * 12);
        refresher.wait_idle().await;
    }
    refresher.shutdown().await;
    assert_eq!(server.reuse_detections(), 0);
    let mut dead = 0;
    for key in &keys {
        if let Err(e) = manager.access_token(key).await {
            assert!(e.is_reauth_required(), "{e}");
            dead += 1;
        }
    }
    (dead, server.refresh_calls() as f64 / keys.len() as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_follows_a_declared_idle_lifetime() {
    // Refresh tokens that die after 2 idle days: the 7-day default loses every grant; declared,
    // keep-alive runs every 12 hours and loses none.
    let (dead, _) = idle_grants(2 * DAY, false, 30).await;
    assert_eq!(dead, 20);
    let (dead, per_grant) = idle_grants(2 * DAY, true, 30).await;
    assert_eq!(dead, 0);
    assert!(
        (55.0..=62.0).contains(&per_grant),
        "{per_grant} refreshes per grant in 30 days"
    );
    // 180 idle days: every 45 days instead of every 7, and still none lost over 400 days.
    let (dead, per_grant) = idle_grants(180 * DAY, true, 400).await;
    assert_eq!(dead, 0);
    assert!(
        per_grant <= 10.0,
        "{per_grant} refreshes per grant in 400 days"
    );
    let (dead, per_grant_default) = idle_grants(180 * DAY, false, 400).await;
    assert_eq!(dead, 0);
    assert!(per_grant_default >= 50.0, "{per_grant_default}");
}
