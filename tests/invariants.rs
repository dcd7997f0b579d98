//! The DESIGN.md invariants that hold within one process, each pinned by a test that fails
//! without it. Providers here are in-process closures, so tokio's paused time is safe to use.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    provider_fn, AccessToken, Cas, Error, Event, Expiry, GrantHealth, GrantRecord,
    InvalidationReason, MemoryStore, ProviderError, RefreshLock, RefreshToken, StoreError,
    TokenKey, TokenManager, TokenResponse, TokenSet, TokenStore, UnavailableCause, Version,
    Versioned,
};
use tokio::sync::Notify;

mod support;
use support::store::FaultyStore;

fn key() -> TokenKey {
    TokenKey::from("acct-1")
}

/// A grant whose access token expired an hour ago.
fn expired_grant(clock: &ManualClock, rt: &str) -> TokenSet {
    use tokenkeeper::Clock;
    TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new(rt))
        .with_expires_at(clock.now() - Duration::from_secs(3600))
}

fn drain(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// A rotating provider: refresh token `rt-N` buys `at-(N+1)` and `rt-(N+1)`; a spent one is
/// "reuse detected" (counted) and answered `invalid_grant`, as RFC 9700 servers do.
#[derive(Default)]
struct Rotating {
    generation: Mutex<usize>,
    calls: AtomicUsize,
    reuse: AtomicUsize,
}

impl Rotating {
    fn provider(self: &Arc<Self>) -> impl tokenkeeper::Provider {
        let me = self.clone();
        provider_fn(move |_key, tokens: TokenSet| {
            let me = me.clone();
            async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                // Let every other task run: a racing second refresh would happen now.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut generation = me.generation.lock().unwrap();
                let presented = tokens.refresh_token().map(|t| t.secret().to_owned());
                if presented.as_deref() != Some(&format!("rt-{generation}")) {
                    me.reuse.fetch_add(1, Ordering::SeqCst);
                    return Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant));
                }
                *generation += 1;
                Ok(
                    TokenResponse::new(AccessToken::new(format!("at-{generation}")))
                        .with_refresh_token(RefreshToken::new(format!("rt-{generation}")))
                        .with_expires(Expiry::In(Duration::from_secs(3600))),
                )
            }
        })
    }
}

fn manager(
    provider: impl tokenkeeper::Provider,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
) -> TokenManager {
    TokenManager::builder(provider)
        .store(store)
        .clock(clock)
        .build()
}

#[tokio::test(start_paused = true)]
async fn one_refresh_for_a_thousand_concurrent_callers() {
    let clock = Arc::new(ManualClock::fixed());
    let rotating = Arc::new(Rotating::default());
    // A store without a refresh lock: the manager's own single-flight must do it alone.
    let manager = TokenManager::builder(rotating.provider())
        .store(FaultyStore::without_lock())
        .clock(clock.clone())
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    let callers: Vec<_> = (0..1000)
        .map(|_| {
            let manager = manager.clone();
            tokio::spawn(async move { manager.access_token(&key()).await })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().secret(), "at-1");
    }
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 1);
    assert_eq!(rotating.reuse.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_waiter_still_saves_the_rotated_token() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let (entered, release, calls) = (entered.clone(), release.clone(), calls.clone());
        provider_fn(move |_, _| {
            let (entered, release, calls) = (entered.clone(), release.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                entered.notify_one();
                release.notified().await;
                Ok(TokenResponse::new(AccessToken::new("at-1"))
                    .with_refresh_token(RefreshToken::new("rt-1"))
                    .with_expires(Expiry::In(Duration::from_secs(3600))))
            }
        })
    };
    let manager = manager(provider, store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let manager = manager.clone();
            tokio::spawn(async move { manager.access_token(&key()).await })
        })
        .collect();
    entered.notified().await;
    for waiter in &waiters {
        waiter.abort();
    }
    for waiter in waiters {
        assert!(waiter.await.unwrap_err().is_cancelled());
    }
    // The server has rotated; its answer arrives after every caller went away.
    release.notify_one();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let stored = store.load(&key()).await.unwrap().unwrap().value;
    assert_eq!(stored.tokens().refresh_token().unwrap().secret(), "rt-1");
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A store whose saves can be held, recording the order of what happens.
struct GatedStore {
    inner: MemoryStore,
    gate: tokio::sync::Semaphore,
    log: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl TokenStore for GatedStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        self.inner.load(key).await
    }
    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        let _permit = self.gate.acquire().await.unwrap();
        let saved = self.inner.save(key, record, expected).await?;
        let rt = record
            .tokens()
            .refresh_token()
            .map(|t| t.secret().to_owned());
        self.log
            .lock()
            .unwrap()
            .push(format!("saved {}", rt.unwrap_or_default()));
        Ok(saved)
    }
    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        self.inner.keys().await
    }
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        self.inner.lock(key, ttl).await
    }
}

#[tokio::test(start_paused = true)]
async fn rotated_refresh_token_is_saved_before_the_caller_sees_the_new_token() {
    let clock = Arc::new(ManualClock::fixed());
    let log = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(GatedStore {
        inner: MemoryStore::new(),
        gate: tokio::sync::Semaphore::new(1),
        log: log.clone(),
    });
    let rotating = Arc::new(Rotating::default());
    let manager = TokenManager::builder(rotating.provider())
        .store(store.clone())
        .clock(clock.clone())
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    // Hold every save: the caller must not get the new token while the save is pending.
    let held = store.gate.acquire().await.unwrap();
    let caller = {
        let manager = manager.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let token = manager.access_token(&key()).await;
            log.lock().unwrap().push("returned".into());
            token
        })
    };
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        !caller.is_finished(),
        "the caller got a token whose save had not happened"
    );
    // Nor does anyone else, through the cache.
    let late = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.access_token(&key()).await })
    };
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!late.is_finished(), "a late caller saw the unsaved token");
    drop(held);
    assert_eq!(caller.await.unwrap().unwrap().secret(), "at-1");
    assert_eq!(late.await.unwrap().unwrap().secret(), "at-1");
    assert_eq!(
        log.lock().unwrap().as_slice(),
        ["saved rt-0", "saved rt-1", "returned"]
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_holds_a_failing_grant_and_serves_the_still_valid_token() {
    use tokenkeeper::Clock;
    let clock = Arc::new(ManualClock::fixed());
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let calls = calls.clone();
        provider_fn(move |_, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(ProviderError::unavailable(UnavailableCause::ServerError).with_status(503))
            }
        })
    };
    let manager = TokenManager::builder(provider)
        .clock(clock.clone())
        .backoff(Duration::from_secs(60), Duration::from_secs(600))
        .build();
    let mut events = manager.subscribe();
    // An hour-long token valid for 20 more seconds: inside the 60 s margin, so a refresh is
    // due. (The first backoff is 60 s with equal jitter: between 30 and 60 s.)
    let grant = TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new("rt-0"))
        .with_issued_at(clock.now() - Duration::from_secs(3580))
        .with_expires_at(clock.now() + Duration::from_secs(20));
    manager.insert(key(), grant).await.unwrap();

    for _ in 0..50 {
        assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-0");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "backoff must hold further attempts"
    );
    let failed: Vec<_> = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::RefreshFailed { .. }))
        .collect();
    assert_eq!(failed.len(), 1);
    let status = manager.status(&key()).await.unwrap();
    assert!(matches!(status.health, GrantHealth::BackingOff { .. }));
    assert_eq!(status.failures, 1);

    // The token expires while the backoff still holds: a typed, retryable error, no call.
    clock.advance(Duration::from_secs(21));
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                cause: UnavailableCause::ServerError,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable() && err.retry_after().unwrap() > Duration::ZERO);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // After the backoff, one more attempt; the next backoff is longer.
    clock.advance(Duration::from_secs(60));
    assert!(manager.access_token(&key()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(manager.status(&key()).await.unwrap().failures, 2);
}

#[tokio::test(start_paused = true)]
async fn a_dead_grant_is_never_sent_again_until_a_new_grant_is_inserted() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let calls = calls.clone();
        provider_fn(move |_, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant).with_status(400))
            }
        })
    };
    let manager = manager(provider, store.clone(), clock.clone());
    let mut events = manager.subscribe();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    for _ in 0..10 {
        let err = manager.access_token(&key()).await.unwrap_err();
        assert!(matches!(
            err,
            Error::ReauthorizationRequired {
                reason: InvalidationReason::InvalidGrant,
                ..
            }
        ));
        assert!(manager
            .refresh_now(&key())
            .await
            .unwrap_err()
            .is_reauth_required());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let dead: Vec<_> = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::ReauthorizationRequired { .. }))
        .collect();
    assert_eq!(dead.len(), 1, "one event per transition");
    assert_eq!(
        manager.reauthorization_required().await.unwrap(),
        vec![(key(), InvalidationReason::InvalidGrant)]
    );

    // It stays dead for a fresh manager on the same store (a restart).
    let restarted = manager_with_counter(store.clone(), clock.clone(), calls.clone());
    assert!(restarted
        .access_token(&key())
        .await
        .unwrap_err()
        .is_reauth_required());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A human re-authorizes: a new grant revives the key.
    use tokenkeeper::Clock;
    let fresh = TokenSet::new(AccessToken::new("at-new"))
        .with_refresh_token(RefreshToken::new("rt-new"))
        .with_expires_at(clock.now() + Duration::from_secs(3600));
    manager.insert(key(), fresh).await.unwrap();
    assert!(drain(&mut events)
        .iter()
        .any(|e| matches!(e, Event::Recovered { .. })));
    assert_eq!(
        manager.access_token(&key()).await.unwrap().secret(),
        "at-new"
    );
    assert_eq!(
        restarted.access_token(&key()).await.unwrap().secret(),
        "at-new"
    );
    assert!(manager.reauthorization_required().await.unwrap().is_empty());
}

fn manager_with_counter(
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    calls: Arc<AtomicUsize>,
) -> TokenManager {
    manager(
        provider_fn(move |_, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant)) }
        }),
        store,
        clock,
    )
}

#[tokio::test(start_paused = true)]
async fn two_managers_on_one_store_never_reuse_a_spent_refresh_token() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    let rotating = Arc::new(Rotating::default());
    let a = manager(rotating.provider(), store.clone(), clock.clone());
    let b = manager(rotating.provider(), store.clone(), clock.clone());
    a.insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    for expiry in 1..=20 {
        let callers: Vec<_> = (0..50)
            .map(|i| {
                let m = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move { m.access_token(&key()).await })
            })
            .collect();
        for caller in callers {
            assert_eq!(
                caller.await.unwrap().unwrap().secret(),
                format!("at-{expiry}")
            );
        }
        clock.advance(Duration::from_secs(3600));
    }
    assert_eq!(rotating.reuse.load(Ordering::SeqCst), 0);
    assert_eq!(
        rotating.calls.load(Ordering::SeqCst),
        20,
        "one refresh per expiry"
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_grant_after_a_peer_rotated_adopts_the_peers_token() {
    use tokenkeeper::Clock;
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    // While this process refreshes with rt-0, a peer (which did not share the lock) rotates
    // to rt-1 and saves; the server then rejects rt-0 with invalid_grant.
    let provider = {
        let (store, clock) = (store.clone(), clock.clone());
        provider_fn(move |key, _| {
            let (store, clock) = (store.clone(), clock.clone());
            async move {
                let current = store.load(&key).await.unwrap().unwrap();
                let peer = GrantRecord::new(
                    TokenSet::new(AccessToken::new("at-peer"))
                        .with_refresh_token(RefreshToken::new("rt-1"))
                        .with_expires_at(clock.now() + Duration::from_secs(3600)),
                );
                store
                    .save(&key, &peer, Some(current.version))
                    .await
                    .unwrap();
                Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant))
            }
        })
    };
    let manager = manager(provider, store.clone(), clock.clone());
    let mut events = manager.subscribe();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    assert_eq!(
        manager.access_token(&key()).await.unwrap().secret(),
        "at-peer"
    );
    let stored = store.load(&key()).await.unwrap().unwrap().value;
    assert_eq!(stored.tokens().refresh_token().unwrap().secret(), "rt-1");
    assert!(!manager
        .status(&key())
        .await
        .unwrap()
        .needs_reauthorization());
    assert!(!drain(&mut events)
        .iter()
        .any(|e| matches!(e, Event::ReauthorizationRequired { .. })));
}

#[tokio::test(start_paused = true)]
async fn invalidate_refreshes_once_per_token_generation() {
    let clock = Arc::new(ManualClock::fixed());
    let rotating = Arc::new(Rotating::default());
    let manager = manager(rotating.provider(), Arc::default(), clock.clone());
    use tokenkeeper::Clock;
    let grant = TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new("rt-0"))
        .with_expires_at(clock.now() + Duration::from_secs(3600));
    manager.insert(key(), grant).await.unwrap();
    let old = manager.access_token(&key()).await.unwrap();
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 0);

    let callers: Vec<_> = (0..100)
        .map(|_| {
            let (manager, old) = (manager.clone(), old.clone());
            tokio::spawn(async move { manager.invalidate(&key(), &old).await })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().secret(), "at-1");
    }
    // Late reports of the same dead token do not refresh again.
    assert_eq!(
        manager.invalidate(&key(), &old).await.unwrap().secret(),
        "at-1"
    );
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 1);
    // A report about the new token is a new generation.
    let new = manager.access_token(&key()).await.unwrap();
    assert_eq!(
        manager.invalidate(&key(), &new).await.unwrap().secret(),
        "at-2"
    );
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn known_refresh_token_expiry_is_confirmed_by_the_provider_before_the_grant_dies() {
    use tokenkeeper::Clock;
    let clock = Arc::new(ManualClock::fixed());
    let rotating = Arc::new(Rotating::default());
    let manager = manager(rotating.provider(), Arc::default(), clock.clone());
    // The provider refuses this refresh token, which our clock says expired a second ago:
    // one call confirms it, and the grant dies with the reason the expiry gives.
    let grant = expired_grant(&clock, "rt-expired")
        .with_refresh_expires_at(clock.now() - Duration::from_secs(1));
    manager.insert(key(), grant).await.unwrap();
    let err = manager.access_token(&key()).await.unwrap_err();
    assert_eq!(
        err.invalidation_reason(),
        Some(&InvalidationReason::RefreshTokenExpired)
    );
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 1);
    assert!(manager.access_token(&key()).await.is_err());
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 1, "dead is dead");

    // A clock that runs ahead makes a live refresh token look expired: the provider still
    // takes it, and the grant lives on instead of being killed on our clock's word.
    let other = TokenKey::from("acct-2");
    let grant =
        expired_grant(&clock, "rt-0").with_refresh_expires_at(clock.now() - Duration::from_secs(1));
    manager.insert(other.clone(), grant).await.unwrap();
    assert_eq!(manager.access_token(&other).await.unwrap().secret(), "at-1");
}

#[tokio::test(start_paused = true)]
async fn expiry_counts_from_the_response_not_the_request() {
    use tokenkeeper::Clock;
    let clock = Arc::new(ManualClock::fixed());
    let start = clock.now();
    let provider = {
        let clock = clock.clone();
        provider_fn(move |_, _| {
            // The provider takes 10 s to answer.
            clock.advance(Duration::from_secs(10));
            async {
                TokenResponse::from_json(br#"{"access_token":"at-1","expires_in":"3600"}"#)
                    .map_err(|_| ProviderError::unavailable(UnavailableCause::InvalidResponse))
            }
        })
    };
    let manager = manager(provider, Arc::default(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let tokens = manager.token(&key()).await.unwrap();
    assert_eq!(tokens.expires_at(), Some(start + Duration::from_secs(3610)));
    // No refresh token in the response: the old one is kept.
    assert_eq!(tokens.refresh_token().unwrap().secret(), "rt-0");
}

#[tokio::test(start_paused = true)]
async fn a_failed_save_keeps_the_rotated_token_and_saves_it_before_refreshing_again() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::without_lock());
    let rotating = Arc::new(Rotating::default());
    let manager = TokenManager::builder(rotating.provider())
        .store(store.clone())
        .clock(clock.clone())
        .build();
    let mut events = manager.subscribe();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    store.fail_saves.store(true, Ordering::SeqCst);
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(drain(&mut events)
        .iter()
        .any(|e| matches!(e, Event::PersistFailed { .. })));
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 1);

    // The store heals: the kept rt-1 is saved and served without another refresh (which
    // would have sent the spent rt-0).
    store.fail_saves.store(false, Ordering::SeqCst);
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 1);
    assert_eq!(rotating.reuse.load(Ordering::SeqCst), 0);
    let stored = store.load(&key()).await.unwrap().unwrap().value;
    assert_eq!(stored.tokens().refresh_token().unwrap().secret(), "rt-1");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_provider_fails_the_waiters_and_does_not_wedge_the_grant() {
    let clock = Arc::new(ManualClock::fixed());
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let calls = calls.clone();
        provider_fn(move |_, _| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("provider bug");
                }
                Ok(TokenResponse::new(AccessToken::new("at-1")))
            }
        })
    };
    let manager = manager(provider, Arc::default(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                cause: UnavailableCause::Internal,
                ..
            }
        ),
        "{err:?}"
    );
    // The panic is a failure like any other: the grant backs off (no second call at once)…
    let again = manager.access_token(&key()).await.unwrap_err();
    assert!(again.retry_after().is_some(), "{again:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // …and is not wedged: after the backoff it refreshes.
    clock.advance(Duration::from_secs(6));
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
}

#[tokio::test(start_paused = true)]
async fn unknown_keys_are_not_found() {
    let manager = TokenManager::builder(Rotating::default().into_provider()).build();
    let err = manager
        .access_token(&TokenKey::from("nobody"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
    assert!(matches!(
        manager.status(&TokenKey::from("nobody")).await,
        Err(Error::NotFound { .. })
    ));
    assert!(!manager.remove(&TokenKey::from("nobody")).await.unwrap());
    // Looking up keys that do not exist leaves nothing behind.
    for i in 0..1000 {
        let _ = manager
            .access_token(&TokenKey::from(format!("ghost-{i}")))
            .await;
    }
    assert!(
        format!("{manager:?}").contains("grants_cached: 0"),
        "{manager:?}"
    );
}

impl Rotating {
    fn into_provider(self) -> impl tokenkeeper::Provider {
        Arc::new(self).provider()
    }
}

#[tokio::test(start_paused = true)]
async fn a_peer_in_backoff_answers_with_the_same_typed_error_and_does_not_call() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let limited = |calls: Arc<AtomicUsize>| {
        provider_fn(move |_, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(ProviderError::rate_limited(Some(Duration::from_secs(600))).with_status(429))
            }
        })
    };
    let a = manager(limited(calls.clone()), store.clone(), clock.clone());
    let b = manager(limited(calls.clone()), store.clone(), clock.clone());
    a.insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();

    let err = a.access_token(&key()).await.unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { retry_after: Some(d), .. } if d >= Duration::from_secs(600))
    );
    clock.advance(Duration::from_secs(60));
    let err = b.access_token(&key()).await.unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { retry_after: Some(d), .. } if d >= Duration::from_secs(500)),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_refresh_token_leaves_a_valid_access_token_usable_until_it_expires() {
    use tokenkeeper::Clock;
    let clock = Arc::new(ManualClock::fixed());
    let rotating = Arc::new(Rotating::default());
    let manager = manager(rotating.provider(), Arc::default(), clock.clone());
    // The refresh token died a second ago; the access token has 30 s left (inside the margin).
    let grant = TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new("rt-0"))
        .with_expires_at(clock.now() + Duration::from_secs(30))
        .with_refresh_expires_at(clock.now() - Duration::from_secs(1));
    manager.insert(key(), grant).await.unwrap();
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-0");
    assert!(!manager
        .status(&key())
        .await
        .unwrap()
        .needs_reauthorization());
    assert_eq!(rotating.calls.load(Ordering::SeqCst), 0);
}
