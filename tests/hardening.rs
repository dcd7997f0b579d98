//! Regression tests for the refresh engine's hardening (issue 10): each test failed on the
//! engine before its fix. Time is simulated: a `ManualClock` and tokio's paused clock.

mod support;

use support::counting;
use support::store::FaultyStore;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock, Rotation};
use tokenkeeper::{
    provider_fn, AccessToken, Cas, Clock, ConfigProblem, Error, Event, Expiry, InvalidationReason,
    Provider, ProviderError, RefreshRequest, RefreshToken, RefresherConfig, TokenKey, TokenManager,
    TokenResponse, TokenSet, TokenStore, UnavailableCause,
};

fn key() -> TokenKey {
    TokenKey::from("acct-1")
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// An hour-long grant that expired an hour ago.
fn expired_grant(clock: &ManualClock, rt: &str) -> TokenSet {
    TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new(rt))
        .with_issued_at(clock.now() - 2 * HOUR)
        .with_expires_at(clock.now() - HOUR)
}

fn events(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// A strict-rotation provider: `rt-N` buys `at-(N+1)` / `rt-(N+1)` and is spent; a spent one is
/// reuse (counted) and answered `invalid_grant`, unless it is the one just spent and a reuse
/// window is on, which replays the current pair. Faults are scripted per call.
#[derive(Default)]
struct Strict {
    state: Mutex<StrictState>,
    calls: AtomicUsize,
    reuse: AtomicUsize,
    reuse_window: AtomicBool,
    /// Replies lost after the rotation happened, from the next call on.
    lose: AtomicUsize,
    lifetime_secs: Mutex<Option<u64>>,
}

#[derive(Default)]
struct StrictState {
    generation: usize,
}

impl Strict {
    fn provider(self: &Arc<Self>) -> impl Provider {
        let me = self.clone();
        provider_fn(move |_key, tokens: TokenSet| {
            let me = me.clone();
            async move { me.refresh(&tokens) }
        })
    }

    fn refresh(&self, tokens: &TokenSet) -> Result<TokenResponse, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        let presented = tokens.refresh_token().map(|t| t.secret().to_owned());
        let current = format!("rt-{}", state.generation);
        let previous = state.generation.checked_sub(1).map(|g| format!("rt-{g}"));
        let replay =
            self.reuse_window.load(Ordering::SeqCst) && previous.is_some() && presented == previous;
        if presented.as_deref() != Some(&current) && !replay {
            self.reuse.fetch_add(1, Ordering::SeqCst);
            return Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant));
        }
        if !replay {
            state.generation += 1;
        }
        let generation = state.generation;
        if self
            .lose
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            // The server rotated; the connection dropped before the reply arrived.
            return Err(ProviderError::unavailable(UnavailableCause::Network));
        }
        let lifetime = self.lifetime_secs.lock().unwrap().unwrap_or(3600);
        Ok(
            TokenResponse::new(AccessToken::new(format!("at-{generation}")))
                .with_refresh_token(RefreshToken::new(format!("rt-{generation}")))
                .with_expires(Expiry::In(Duration::from_secs(lifetime))),
        )
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn manager(
    provider: impl Provider,
    store: Arc<FaultyStore>,
    clock: Arc<ManualClock>,
) -> TokenManager {
    TokenManager::builder(provider)
        .store(store)
        .clock(clock)
        .build()
}

// ---- A1: access-only grants ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_access_only_grant_is_served_until_it_expires_and_never_kept_alive() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, provider) = counting(|| async {
        Err(ProviderError::reauthorize(
            InvalidationReason::NoRefreshToken,
        ))
    });
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    let mut rx = manager.subscribe();
    // A dashboard-minted token that lives 30 days, with no refresh token.
    let expires = clock.now() + 30 * DAY;
    manager
        .insert(
            key(),
            TokenSet::new(AccessToken::new("long-lived")).with_expires_at(expires),
        )
        .await
        .unwrap();
    let refresher = manager.start_refresher(RefresherConfig::new());
    // Past the 7-day keep-alive, several times over.
    for _ in 0..22 {
        clock.advance(DAY);
        refresher.wait_idle().await;
        assert_eq!(
            manager.access_token(&key()).await.unwrap().secret(),
            "long-lived"
        );
    }
    // Inside the refresh margin: still served, still no call.
    clock.set(expires - Duration::from_secs(30));
    refresher.wait_idle().await;
    assert_eq!(
        manager.access_token(&key()).await.unwrap().secret(),
        "long-lived"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing can renew it");
    let seen = events(&mut rx);
    let warned: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            Event::AccessTokenExpiring { expires_at, .. } => Some(*expires_at),
            _ => None,
        })
        .collect();
    assert_eq!(warned, [expires], "one warning ahead of the expiry");
    assert!(!seen
        .iter()
        .any(|e| matches!(e, Event::ReauthorizationRequired { .. })));

    // At real expiry it dies, with the reason, once.
    clock.set(expires + Duration::from_secs(1));
    refresher.wait_idle().await;
    let err = manager.access_token(&key()).await.unwrap_err();
    assert_eq!(
        err.invalidation_reason(),
        Some(&InvalidationReason::NoRefreshToken)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let dead: Vec<_> = events(&mut rx)
        .into_iter()
        .filter(|e| matches!(e, Event::ReauthorizationRequired { .. }))
        .collect();
    assert_eq!(dead.len(), 1);
    refresher.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_access_only_grant_rejected_by_the_api_dies_at_once() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, provider) =
        counting(|| async { Ok(TokenResponse::new(AccessToken::new("never"))) });
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    let token = AccessToken::new("long-lived");
    manager
        .insert(
            key(),
            TokenSet::new(token.clone()).with_expires_at(clock.now() + 30 * DAY),
        )
        .await
        .unwrap();
    let err = manager.invalidate(&key(), &token).await.unwrap_err();
    assert_eq!(
        err.invalidation_reason(),
        Some(&InvalidationReason::NoRefreshToken)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

// ---- A2: a bad field beside a rotated refresh token --------------------------------------

#[tokio::test(start_paused = true)]
async fn an_unreadable_expiry_beside_a_rotated_refresh_token_keeps_the_rotation() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let provider = provider_fn(|_, _| async {
        Ok(TokenResponse::new(AccessToken::new("at-1"))
            .with_refresh_token(RefreshToken::new("rt-1"))
            .with_malformed_field("expires_in"))
    });
    let manager = TokenManager::builder(provider)
        .store(store.clone())
        .clock(clock.clone())
        .fallback_lifetime(Duration::from_secs(600))
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let mut rx = manager.subscribe();
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
    assert_eq!(store.stored_refresh_token(&key()), "rt-1");
    let reported: Vec<_> = events(&mut rx)
        .into_iter()
        .filter_map(|e| match e {
            Event::Refreshed {
                malformed_fields, ..
            } => Some(malformed_fields),
            _ => None,
        })
        .collect();
    assert_eq!(reported, [vec!["expires_in".to_owned()]]);
    // The documented conservative policy: the fallback lifetime.
    assert_eq!(
        store.stored(&key()).tokens().expires_at(),
        Some(clock.now() + Duration::from_secs(600))
    );
}

#[tokio::test(start_paused = true)]
async fn a_garbled_reply_that_carries_a_rotated_refresh_token_keeps_it() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    let first = Arc::new(AtomicBool::new(true));
    let provider = {
        let (strict, first) = (strict.clone(), first.clone());
        provider_fn(move |_, tokens: TokenSet| {
            let (strict, first) = (strict.clone(), first.clone());
            async move {
                let reply = strict.refresh(&tokens)?;
                if first.swap(false, Ordering::SeqCst) {
                    // No usable access token, but the refresh token rotated.
                    return Err(
                        ProviderError::unavailable(UnavailableCause::InvalidResponse)
                            .with_status(200)
                            .with_rotated_refresh_token(reply.refresh_token().unwrap().clone()),
                    );
                }
                Ok(reply)
            }
        })
    };
    let manager = TokenManager::builder(provider)
        .store(store.clone())
        .clock(clock.clone())
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(store.stored_refresh_token(&key()), "rt-1");
    clock.advance(HOUR);
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-2");
    assert_eq!(strict.reuse.load(Ordering::SeqCst), 0);
}

// ---- A3: conflict, then a failing re-load ------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_conflict_then_a_failing_reload_keeps_the_rotated_token() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    let provider = {
        let (strict, store) = (strict.clone(), store.clone());
        provider_fn(move |_, tokens: TokenSet| {
            let (strict, store) = (strict.clone(), store.clone());
            async move {
                let reply = strict.refresh(&tokens);
                if strict.calls() == 1 {
                    // The save right after this reply conflicts, and the re-load fails.
                    store.conflicts.store(1, Ordering::SeqCst);
                    store.fail_loads.store(true, Ordering::SeqCst);
                }
                reply
            }
        })
    };
    let manager = manager(provider, store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    assert!(manager.access_token(&key()).await.is_err());
    // The store heals; the next refresh presents rt-1, never the spent rt-0.
    store.fail_loads.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let token = manager.access_token(&key()).await.unwrap();
    assert_eq!(
        strict.reuse.load(Ordering::SeqCst),
        0,
        "spent token presented"
    );
    assert_eq!(token.secret(), "at-1");
    assert_eq!(store.stored_refresh_token(&key()), "rt-1");
}

#[tokio::test(start_paused = true)]
async fn a_peers_metadata_change_does_not_discard_an_unsaved_rotation() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    let manager = TokenManager::builder(strict.provider())
        .store(store.clone())
        .clock(clock.clone())
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    store.fail_saves.store(true, Ordering::SeqCst);
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    // Meanwhile a peer changes only metadata (it records a failure of its own).
    let current = store.snapshot()[&key()].clone();
    store.fail_saves.store(false, Ordering::SeqCst);
    let resaved = store
        .save(&key(), &current.value, Some(current.version))
        .await
        .unwrap();
    assert!(matches!(resaved, Cas::Saved(_)));
    // The next call saves the rotation over the peer's change and never presents rt-0 again.
    let token = manager.access_token(&key()).await.unwrap();
    assert_eq!(token.secret(), "at-1");
    assert_eq!(store.stored_refresh_token(&key()), "rt-1");
    assert_eq!(strict.reuse.load(Ordering::SeqCst), 0);
    assert_eq!(strict.calls(), 1);
}

// ---- A4: a store outage while marking a grant dead ----------------------------------------

#[tokio::test(start_paused = true)]
async fn a_dead_grant_the_store_cannot_record_is_not_hammered() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let (calls, provider) =
        counting(|| async { Err(ProviderError::reauthorize(InvalidationReason::Revoked)) });
    let manager = manager(provider, store.clone(), clock.clone());
    let mut rx = manager.subscribe();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    store.fail_saves.store(true, Ordering::SeqCst);
    for _ in 0..20 {
        let err = manager.access_token(&key()).await.unwrap_err();
        assert_eq!(
            err.invalidation_reason(),
            Some(&InvalidationReason::Revoked),
            "{err:?}"
        );
    }
    // The status says so, though the store still holds the grant as alive.
    assert!(manager
        .status(&key())
        .await
        .unwrap()
        .needs_reauthorization());
    // Loads failing too: still dead, still no call.
    store.fail_loads.store(true, Ordering::SeqCst);
    assert!(manager
        .access_token(&key())
        .await
        .unwrap_err()
        .is_reauth_required());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the dead token was sent again"
    );
    let dead = events(&mut rx)
        .into_iter()
        .filter(|e| matches!(e, Event::ReauthorizationRequired { .. }))
        .count();
    assert_eq!(dead, 1);
    // The store heals; the death is saved in the background, so every process sees it.
    store.fail_loads.store(false, Ordering::SeqCst);
    store.fail_saves.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(store.stored(&key()).state() != &tokenkeeper::GrantState::Active);
    assert!(manager.drain(Duration::from_secs(1)).await);
}

// ---- A5: a hanging provider, and fencing by version ----------------------------------------

#[tokio::test(start_paused = true)]
async fn a_hanging_provider_times_out_and_backs_off() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, provider) = counting(std::future::pending::<Result<TokenResponse, ProviderError>>);
    let manager = TokenManager::builder(provider)
        .clock(clock.clone())
        .refresh_timeout(Duration::from_secs(10))
        .backoff(Duration::from_secs(60), Duration::from_secs(600))
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let call = tokio::spawn({
        let manager = manager.clone();
        async move { manager.access_token(&key()).await }
    });
    // The timeout runs on the manager's clock: move it 5 s at a time.
    let mut waited = Duration::ZERO;
    while !call.is_finished() {
        assert!(
            waited < Duration::from_secs(600),
            "every waiter is answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        clock.advance(Duration::from_secs(5));
        waited += Duration::from_secs(5);
    }
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                cause: UnavailableCause::Timeout,
                ..
            }
        ),
        "{err:?}"
    );
    // One call and one prompt retry (the reply may have been lost), each bounded.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(waited <= Duration::from_secs(25), "{waited:?}");
    // Backoff: no third call right away.
    assert!(manager.access_token(&key()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_outlives_its_lease_never_overwrites_a_peers_newer_record() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let slow = provider_fn(|_, _| async {
        tokio::time::sleep(Duration::from_secs(90)).await;
        Ok(TokenResponse::new(AccessToken::new("at-slow"))
            .with_refresh_token(RefreshToken::new("rt-slow"))
            .with_expires(Expiry::In(HOUR)))
    });
    let fast = provider_fn(|_, _| async {
        Ok(TokenResponse::new(AccessToken::new("at-fast"))
            .with_refresh_token(RefreshToken::new("rt-fast"))
            .with_expires(Expiry::In(HOUR)))
    });
    // A misconfigured pair: a timeout longer than the lease (try_build would refuse it).
    let a = TokenManager::builder(slow)
        .store(store.clone())
        .clock(clock.clone())
        .lock_ttl(Duration::from_secs(60))
        .refresh_timeout(Duration::from_secs(120))
        .build();
    let b = manager(fast, store.clone(), clock.clone());
    a.insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let slow_call = tokio::spawn({
        let a = a.clone();
        async move { a.access_token(&key()).await }
    });
    tokio::time::sleep(Duration::from_secs(61)).await;
    // The lease ran out: B gets the lock and refreshes.
    assert_eq!(b.access_token(&key()).await.unwrap().secret(), "at-fast");
    // A's reply arrives later; its save is fenced by the version it read.
    assert_eq!(slow_call.await.unwrap().unwrap().secret(), "at-fast");
    assert_eq!(store.stored_refresh_token(&key()), "rt-fast");
}

// ---- A6: a lost reply after the server rotated ----------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_lost_reply_is_retried_once_within_the_providers_reuse_window() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    strict.reuse_window.store(true, Ordering::SeqCst);
    strict.lose.store(1, Ordering::SeqCst);
    let manager = manager(strict.provider(), store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
    assert_eq!(strict.calls(), 2);
    assert_eq!(store.stored_refresh_token(&key()), "rt-1");
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_without_a_reuse_window_is_reported_as_rotation_lost() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    strict.lose.store(1, Ordering::SeqCst);
    let manager = manager(strict.provider(), store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let err = manager.access_token(&key()).await.unwrap_err();
    assert_eq!(
        err.invalidation_reason(),
        Some(&InvalidationReason::RotationLost),
        "{err:?}"
    );
    assert_eq!(strict.calls(), 2);
}

// Real HTTP to the fake server: tokio's clock runs (a paused one would fire the HTTP
// client's own timeout while the reply is on its way); the provider's clock is manual.
#[tokio::test]
async fn a_lost_reply_from_a_real_server_with_a_grace_window_keeps_the_grant() {
    let clock = Arc::new(ManualClock::fixed());
    let config =
        FakeConfig::standard().with_rotation(Rotation::OnWithGrace(Duration::from_secs(30)));
    let server = FakeAuthServer::start(config, clock.clone()).await;
    let grant = server.issue_grant();
    let manager = TokenManager::builder(support::oauth2_provider(&server))
        .clock(clock.clone())
        .build();
    manager
        .insert(key(), support::tokens(&grant))
        .await
        .unwrap();
    server.lose_next_replies(1);
    manager.refresh_now(&key()).await.unwrap();
    let token = manager.access_token(&key()).await.unwrap();
    assert!(server.is_access_token_valid(token.secret()));
    assert_eq!(server.reuse_detections(), 0);
}

// ---- A7: the store goes back in time -----------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_store_restored_from_a_backup_is_adopted_not_ignored() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let refreshes = Arc::new(AtomicUsize::new(0));
    let provider = {
        let refreshes = refreshes.clone();
        provider_fn(move |_, _| {
            let n = refreshes.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok(TokenResponse::new(AccessToken::new(format!("at-{n}")))
                    .with_refresh_token(RefreshToken::new(format!("rt-{n}")))
                    .with_expires(Expiry::In(HOUR)))
            }
        })
    };
    let manager = manager(provider, store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let backup = store.snapshot();
    for n in 1..=4 {
        let token = manager.refresh_now(&key()).await.unwrap();
        assert_eq!(token.access_token().secret(), format!("at-{n}"));
    }
    // The store is restored from the backup (version 1; this process cached version 5).
    store.restore(backup);
    clock.advance(2 * HOUR);
    let token = manager.access_token(&key()).await.unwrap();
    assert_eq!(token.secret(), "at-5", "served the stale cache");
    assert_eq!(store.stored_refresh_token(&key()), "rt-5");
    // And the next generation too.
    clock.advance(2 * HOUR);
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-6");
}

// ---- B8: short-lived tokens -------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn short_lived_tokens_refresh_about_once_per_half_lifetime() {
    let clock = Arc::new(ManualClock::fixed());
    let strict = Arc::new(Strict::default());
    *strict.lifetime_secs.lock().unwrap() = Some(30);
    let manager = TokenManager::builder(strict.provider())
        .clock(clock.clone())
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    for _ in 0..50 {
        manager.access_token(&key()).await.unwrap();
        clock.advance(Duration::from_secs(1));
    }
    // 50 s of calls on 30 s tokens refreshed at half life: about 4 refreshes, not 50.
    assert!(strict.calls() <= 5, "{} refreshes", strict.calls());
    assert!(strict.calls() >= 3, "{} refreshes", strict.calls());
}

// ---- B9: a misconfigured instance does not block correct ones --------------------------------

#[tokio::test(start_paused = true)]
async fn a_misconfigured_instance_keeps_its_backoff_to_itself() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let wrong_secret = provider_fn(|_, _| async {
        Err(ProviderError::misconfigured(ConfigProblem::InvalidClient).with_status(401))
    });
    let strict = Arc::new(Strict::default());
    let broken = manager(wrong_secret, store.clone(), clock.clone());
    let healthy = manager(strict.provider(), store.clone(), clock.clone());
    broken
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let err = broken.access_token(&key()).await.unwrap_err();
    assert!(matches!(err, Error::Misconfigured { .. }), "{err:?}");
    assert_eq!(healthy.access_token(&key()).await.unwrap().secret(), "at-1");
    assert_eq!(strict.calls(), 1);
    // The broken instance still holds its own backoff (no hammering with a wrong secret)…
    let again = broken.access_token(&key()).await;
    // …but it adopts the healthy peer's token, which it can serve without refreshing.
    assert_eq!(again.unwrap().secret(), "at-1");
}

#[tokio::test(start_paused = true)]
async fn a_misconfigured_instance_does_not_retry_before_its_backoff() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, wrong_secret) =
        counting(|| async { Err(ProviderError::misconfigured(ConfigProblem::InvalidClient)) });
    let manager = manager(wrong_secret, Arc::default(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    for _ in 0..10 {
        assert!(manager.access_token(&key()).await.is_err());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Its status shows the backoff it keeps to itself.
    let status = manager.status(&key()).await.unwrap();
    assert!(
        matches!(status.health, tokenkeeper::GrantHealth::BackingOff { .. }),
        "{status:?}"
    );
}

// ---- B10: the per-minute cap on every path -----------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_per_minute_cap_holds_for_the_startup_scan_and_for_inserts() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let (calls, provider) = counting(|| async {
        Ok(TokenResponse::new(AccessToken::new("at"))
            .with_refresh_token(RefreshToken::new("rt"))
            .with_expires(Expiry::In(DAY)))
    });
    let manager = manager(provider, store.clone(), clock.clone());
    for n in 0..20 {
        manager
            .insert(
                TokenKey::new(format!("old-{n}")),
                expired_grant(&clock, "rt-0"),
            )
            .await
            .unwrap();
    }
    let config = RefresherConfig::new().max_per_minute(5).refresh_idle(true);
    // The start-up scan finds 20 grants due.
    let refresher = manager.start_refresher(config);
    refresher.wait_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    // Grants inserted while it runs: still within the cap.
    clock.advance(Duration::from_secs(61));
    refresher.wait_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    for n in 0..20 {
        manager
            .insert(
                TokenKey::new(format!("new-{n}")),
                expired_grant(&clock, "rt-0"),
            )
            .await
            .unwrap();
    }
    refresher.wait_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    refresher.shutdown().await;
}

// ---- B11: a panicking provider ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_panicking_provider_answers_every_waiter_with_a_typed_error_and_backs_off() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, provider) = counting(|| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        panic!("provider bug")
    });
    let manager = manager(provider, Arc::default(), clock.clone());
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
    for waiter in waiters {
        let err = tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .expect("answered")
            .unwrap()
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
    }
    for _ in 0..10 {
        assert!(manager.access_token(&key()).await.is_err());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// ---- B12: extreme configuration -----------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn extreme_settings_saturate_instead_of_panicking_or_inverting() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, provider) = counting(|| async {
        Err(ProviderError::unavailable(UnavailableCause::ServerError).with_status(503))
    });
    let builder = || {
        TokenManager::builder(provider.clone())
            .clock(clock.clone())
            .backoff(Duration::MAX, Duration::MAX)
            .refresh_margin(Duration::MAX)
            .event_capacity(usize::MAX)
    };
    let err = builder().try_build().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misconfigured {
                problem: ConfigProblem::Setting { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let manager = builder().build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(err.retry_after().unwrap() >= DAY, "{err:?}");
    // A huge backoff is a long backoff, not none.
    clock.advance(HOUR);
    assert!(manager.access_token(&key()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let refresher = manager.start_refresher(
        RefresherConfig::new()
            .rescan_interval(Duration::MAX)
            .keep_alive(Some(Duration::MAX))
            .retry_floor(Duration::MAX)
            .lead_time(Duration::MAX)
            .lead_fraction(f64::NAN)
            .jitter(f64::NAN)
            .expiry_warning(Duration::MAX)
            .max_concurrency(usize::MAX)
            .max_per_minute(usize::MAX),
    );
    refresher.wait_idle().await;
    clock.advance(400 * DAY);
    refresher.wait_idle().await;
    assert!(refresher.is_running(), "the refresher died");
    refresher.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn zero_settings_do_not_spin_or_panic() {
    let clock = Arc::new(ManualClock::fixed());
    let strict = Arc::new(Strict::default());
    let manager = TokenManager::builder(strict.provider())
        .clock(clock.clone())
        .backoff(Duration::ZERO, Duration::ZERO)
        .refresh_margin(Duration::ZERO)
        .lock_ttl(Duration::ZERO)
        .refresh_timeout(Duration::ZERO)
        .event_capacity(0)
        .build();
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let refresher = manager.start_refresher(
        RefresherConfig::new()
            .rescan_interval(Duration::ZERO)
            .keep_alive(Some(Duration::ZERO))
            .retry_floor(Duration::ZERO)
            .lead_time(Duration::ZERO)
            .max_concurrency(0)
            .max_per_minute(0),
    );
    for _ in 0..10 {
        clock.advance(Duration::from_secs(30));
        refresher.wait_idle().await;
    }
    assert!(refresher.is_running());
    assert!(
        strict.calls() <= 10,
        "{} refreshes in 5 minutes",
        strict.calls()
    );
    refresher.shutdown().await;
}

// ---- B13: clock jumps --------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn clock_jumps_neither_kill_grants_nor_stretch_backoffs() {
    let clock = Arc::new(ManualClock::fixed());
    let start = clock.now();
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    let failing = Arc::new(AtomicBool::new(true));
    let provider = {
        let (strict, failing) = (strict.clone(), failing.clone());
        provider_fn(move |_, tokens: TokenSet| {
            let (strict, failing) = (strict.clone(), failing.clone());
            async move {
                if failing.swap(false, Ordering::SeqCst) {
                    return Err(
                        ProviderError::unavailable(UnavailableCause::ServerError).with_status(503)
                    );
                }
                strict.refresh(&tokens)
            }
        })
    };
    let manager = manager(provider, store.clone(), clock.clone());
    // Expired long ago, whatever the clock does below.
    let grant = TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new("rt-0"))
        .with_issued_at(start - 20 * HOUR)
        .with_expires_at(start - 10 * HOUR);
    manager.insert(key(), grant).await.unwrap();
    let refresher = manager.start_refresher(RefresherConfig::new());
    assert!(manager.access_token(&key()).await.is_err());
    // The wall clock is set back five hours: the backoff (seconds long) must not grow by five
    // hours.
    // Nor does the jump end it: it runs its length in real (monotonic) time.
    clock.set(start - 5 * HOUR);
    assert!(manager.access_token(&key()).await.is_err());
    assert_eq!(strict.calls(), 0);
    clock.advance(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
    // Forward again by a day: one refresh, no storm, nothing dead.
    clock.set(start + DAY);
    for _ in 0..20 {
        manager.access_token(&key()).await.unwrap();
    }
    refresher.wait_idle().await;
    assert!(strict.calls() <= 3, "{} refreshes", strict.calls());
    assert_eq!(strict.reuse.load(Ordering::SeqCst), 0);
    assert!(!manager
        .status(&key())
        .await
        .unwrap()
        .needs_reauthorization());
    assert!(refresher.is_running());
    refresher.shutdown().await;
}

// ---- C14: shutdown drains --------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_refresh_whose_callers_went_away() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let provider = provider_fn(|_, _| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(TokenResponse::new(AccessToken::new("at-1"))
            .with_refresh_token(RefreshToken::new("rt-1"))
            .with_expires(Expiry::In(HOUR)))
    });
    let manager = manager(provider, store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let caller = tokio::spawn({
        let manager = manager.clone();
        async move { manager.access_token(&key()).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    caller.abort();
    assert!(manager.drain(Duration::from_secs(60)).await);
    assert_eq!(store.stored_refresh_token(&key()), "rt-1");
}

#[tokio::test(start_paused = true)]
async fn refresher_shutdown_returns_only_after_in_flight_refreshes_are_saved() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let entered = Arc::new(tokio::sync::Notify::new());
    let provider = {
        let entered = entered.clone();
        provider_fn(move |_, _| {
            let entered = entered.clone();
            async move {
                entered.notify_one();
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(TokenResponse::new(AccessToken::new("at-1"))
                    .with_refresh_token(RefreshToken::new("rt-1"))
                    .with_expires(Expiry::In(HOUR)))
            }
        })
    };
    let manager = manager(provider, store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    entered.notified().await;
    assert!(refresher.shutdown().await);
    assert_eq!(store.stored_refresh_token(&key()), "rt-1");
}

// ---- a provider that can renew without a refresh token ----------------------------------------

/// Renews by presenting the access token (Instagram-style).
struct ByAccessToken(AtomicUsize);

#[async_trait]
impl Provider for ByAccessToken {
    async fn refresh(&self, _req: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(TokenResponse::new(AccessToken::new(format!("ig-{n}")))
            .with_expires(Expiry::In(60 * DAY)))
    }

    fn can_refresh(&self, _tokens: &TokenSet) -> bool {
        true
    }
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_renews_without_a_refresh_token_is_kept_alive() {
    let clock = Arc::new(ManualClock::fixed());
    let provider = Arc::new(ByAccessToken(AtomicUsize::new(0)));
    let manager = TokenManager::builder(provider.clone())
        .clock(clock.clone())
        .build();
    manager
        .insert(
            key(),
            TokenSet::new(AccessToken::new("ig-0")).with_expires_at(clock.now() + 60 * DAY),
        )
        .await
        .unwrap();
    let refresher = manager.start_refresher(RefresherConfig::new());
    clock.advance(8 * DAY);
    refresher.wait_idle().await;
    assert_eq!(provider.0.load(Ordering::SeqCst), 1, "keep-alive renews it");
    refresher.shutdown().await;
}

// ---- the lease and the provider call --------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn no_provider_call_starts_that_the_lease_may_not_cover() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    let manager = manager(strict.provider(), store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    // The re-read under the lock stalls 45 s: with a 60 s lease and a 20 s refresh timeout,
    // a call started now could outlive the lease, letting a peer in to present the same token.
    *store.stall_next_load.lock().unwrap() = Some((clock.clone(), Duration::from_secs(45)));
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                cause: UnavailableCause::LockExpired,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(strict.calls(), 0);
    // Nothing was sent, so nothing backs off: the next call refreshes.
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
}

#[tokio::test(start_paused = true)]
async fn a_backoff_the_store_would_not_take_still_holds() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let (calls, provider) = counting(|| async {
        Err(ProviderError::rate_limited(Some(Duration::from_secs(600))).with_status(429))
    });
    let manager = manager(provider, store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    store.fail_saves.store(true, Ordering::SeqCst);
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    store.fail_saves.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(300));
    for _ in 0..5 {
        assert!(manager.access_token(&key()).await.is_err());
    }
    // The refresher re-reads the store, which knows nothing of the backoff: still held.
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    refresher.wait_idle().await;
    assert!(manager.refresh_now(&key()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "Retry-After ignored");
    refresher.shutdown().await;
}

// ---- Found by the simulation ---------------------------------------------------------------

fn manager_with(
    provider: impl Provider,
    store: Arc<FaultyStore>,
    clock: Arc<ManualClock>,
    configure: impl FnOnce(tokenkeeper::TokenManagerBuilder) -> tokenkeeper::TokenManagerBuilder,
) -> TokenManager {
    configure(TokenManager::builder(provider).store(store).clock(clock)).build()
}

// Seed 118468: a peer's later, shorter failure adopted from the store replaced this manager's
// own Retry-After, and a clock set back then measured the peer's length instead.
#[tokio::test(start_paused = true)]
async fn a_peers_later_failure_does_not_cut_this_managers_own_retry_after_short() {
    let clock = Arc::new(ManualClock::fixed());
    let start = clock.now();
    let store = Arc::new(FaultyStore::default());
    let short = |b: tokenkeeper::TokenManagerBuilder| {
        b.backoff(Duration::from_secs(1), Duration::from_secs(2))
    };
    let (limited, rate_limited) = counting(|| async {
        Err(ProviderError::rate_limited(Some(Duration::from_secs(46))).with_status(429))
    });
    let (failing, unavailable) = counting(|| async {
        Err(ProviderError::unavailable(UnavailableCause::ServerError).with_status(503))
    });
    let m0 = manager_with(rate_limited, store.clone(), clock.clone(), short);
    let m1 = manager_with(unavailable, store.clone(), clock.clone(), short);
    m0.insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    assert!(matches!(
        m0.refresh_now(&key()).await,
        Err(Error::RateLimited { .. })
    ));
    // The clock leaps three hours ahead: by it, m0's 46 s are long over, and m1 fails too.
    clock.set(start + 3 * HOUR);
    assert!(m1.refresh_now(&key()).await.is_err());
    assert_eq!(failing.load(Ordering::SeqCst), 1);
    // m0 reads m1's failure (a backoff of a second or two) from the store.
    assert!(m0.refresh_now(&key()).await.is_err());
    // Then the clock is set back before both failures; five real seconds pass.
    clock.set(start - HOUR);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(m0.refresh_now(&key()).await.is_err());
    assert_eq!(
        limited.load(Ordering::SeqCst),
        1,
        "m0 called 5 s after being told to wait 46 s"
    );
    // Its own 46 s still end, in real time.
    tokio::time::sleep(Duration::from_secs(42)).await;
    assert!(m0.refresh_now(&key()).await.is_err());
    assert_eq!(limited.load(Ordering::SeqCst), 2);
}

/// A `Strict` provider whose first call takes `first` of tokio time (and of `clock`'s, if
/// given; else the clock stands still, as if set back by as much during the call).
fn slow_first(
    strict: &Arc<Strict>,
    first: Duration,
    clock: Option<Arc<ManualClock>>,
) -> impl Provider {
    let strict = strict.clone();
    let slow = Arc::new(AtomicBool::new(true));
    provider_fn(move |_, tokens: TokenSet| {
        let (strict, slow, clock) = (strict.clone(), slow.clone(), clock.clone());
        async move {
            if slow.swap(false, Ordering::SeqCst) {
                tokio::time::sleep(first).await;
                if let Some(clock) = clock {
                    clock.advance(first);
                }
            }
            strict.refresh(&tokens)
        }
    })
}

// Seed 513821: the lease's budget was measured on the injected clock only; set back (here:
// standing still) while a call ran, it let a prompt retry start after the store's lease had
// run out, beside a peer holding the next lease.
#[tokio::test(start_paused = true)]
async fn a_lease_is_spent_by_real_time_even_when_the_clock_stands_still() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    strict.reuse_window.store(true, Ordering::SeqCst);
    strict.lose.store(1, Ordering::SeqCst);
    // A 40 s lease and a 30 s timeout leave 10 s in which a call may start.
    let manager = manager_with(
        slow_first(&strict, Duration::from_secs(20), None),
        store.clone(),
        clock.clone(),
        |b| {
            b.lock_ttl(Duration::from_secs(40))
                .refresh_timeout(Duration::from_secs(30))
        },
    );
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    // The first call's reply is lost 20 s into the lease: no retry may start under it.
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                cause: UnavailableCause::Network,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(strict.calls(), 1, "a call started after the lease's budget");
}

// Seed 102892: the fact that a reply was lost never reached the store (a conflict), so the
// provider's later refusal of that token was reported as a plain `InvalidGrant`.
#[tokio::test(start_paused = true)]
async fn a_lost_reply_the_store_did_not_record_still_makes_the_death_rotation_lost() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    strict.lose.store(1, Ordering::SeqCst);
    let manager = manager_with(
        slow_first(&strict, Duration::from_secs(20), Some(clock.clone())),
        store.clone(),
        clock.clone(),
        |b| {
            b.lock_ttl(Duration::from_secs(40))
                .refresh_timeout(Duration::from_secs(30))
        },
    );
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    // The first reply is lost too late in the lease for a prompt retry, and the save
    // recording the loss conflicts.
    store.conflicts.store(1, Ordering::SeqCst);
    assert!(manager.access_token(&key()).await.is_err());
    assert!(!store.stored(&key()).reply_lost());
    clock.advance(HOUR);
    tokio::time::sleep(HOUR).await;
    let err = manager.access_token(&key()).await.unwrap_err();
    assert_eq!(
        err.invalidation_reason(),
        Some(&InvalidationReason::RotationLost),
        "{err:?}"
    );
    assert_eq!(strict.calls(), 2);
}

// Seed 200322: a manager that first read a peer's backoff while the clock ran hours ahead
// dated it hours back on the monotonic clock, so when the clock was then set back before the
// failure, it took the backoff for long over and called.
#[tokio::test(start_paused = true)]
async fn a_peers_backoff_first_seen_after_a_clock_leap_still_holds_when_the_clock_goes_back() {
    let clock = Arc::new(ManualClock::fixed());
    let start = clock.now();
    let store = Arc::new(FaultyStore::default());
    let (calls, provider) = counting(|| async {
        Err(ProviderError::rate_limited(Some(Duration::from_secs(120))).with_status(429))
    });
    let m0 = manager(provider.clone(), store.clone(), clock.clone());
    let m1 = manager(provider, store.clone(), clock.clone());
    let grant = TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new("rt-0"))
        .with_expires_at(start + DAY);
    m0.insert(key(), grant).await.unwrap();
    assert!(m0.refresh_now(&key()).await.is_err());
    // Two hours ahead, m1 reads the grant (and the backoff, over by this clock).
    clock.set(start + 2 * HOUR);
    assert_eq!(m1.access_token(&key()).await.unwrap().secret(), "at-0");
    // Ten real seconds later the clock is set back before the failure.
    tokio::time::sleep(Duration::from_secs(10)).await;
    clock.set(start - 2 * HOUR);
    assert!(m1.refresh_now(&key()).await.is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "called 10 s into a 120 s Retry-After"
    );
    // The backoff ends after its length, counted from when m1 first saw it.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(m1.refresh_now(&key()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// Seed 606348: a death held in memory (the store refused it) was answered to a caller even
// though, by the time its save failed again, a new grant had been inserted.
#[tokio::test(start_paused = true)]
async fn a_held_death_gives_way_to_a_grant_inserted_while_its_save_failed() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let (calls, provider) =
        counting(|| async { Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant)) });
    let manager = manager(provider, store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    store.save_failures.store(1, Ordering::SeqCst);
    let err = manager.access_token(&key()).await.unwrap_err();
    assert!(err.is_reauth_required(), "{err:?}");
    // The user reconnects through another instance just as this one retries saving the death.
    let fresh = TokenSet::new(AccessToken::new("at-new"))
        .with_refresh_token(RefreshToken::new("rt-new"))
        .with_expires_at(clock.now() + HOUR);
    *store.peer_write_before_failure.lock().unwrap() =
        Some((key(), tokenkeeper::GrantRecord::new(fresh)));
    store.save_failures.store(1, Ordering::SeqCst);
    assert_eq!(
        manager.access_token(&key()).await.unwrap().secret(),
        "at-new"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.stored_refresh_token(&key()), "rt-new");
}

// Seed 319060: the prompt retry after a lost reply ignored a peer's rate limit that the
// clock, set back during the call, had put back in force.
#[tokio::test(start_paused = true)]
async fn the_prompt_retry_after_a_lost_reply_respects_a_backoff_in_force() {
    let clock = Arc::new(ManualClock::fixed());
    let start = clock.now();
    let store = Arc::new(FaultyStore::default());
    let (_, rate_limited) = counting(|| async {
        Err(ProviderError::rate_limited(Some(Duration::from_secs(120))).with_status(429))
    });
    let strict = Arc::new(Strict::default());
    strict.reuse_window.store(true, Ordering::SeqCst);
    strict.lose.store(1, Ordering::SeqCst);
    let setback = {
        let (strict, clock) = (strict.clone(), clock.clone());
        provider_fn(move |_, tokens: TokenSet| {
            let (strict, clock) = (strict.clone(), clock.clone());
            async move {
                // During the first call the clock is set back before the peer's failure.
                if strict.calls() == 0 {
                    clock.set(start - 2 * HOUR);
                }
                strict.refresh(&tokens)
            }
        })
    };
    let peer = manager(rate_limited, store.clone(), clock.clone());
    let this = manager(setback, store.clone(), clock.clone());
    // Expired long before anything the clock does below.
    let grant = TokenSet::new(AccessToken::new("at-0"))
        .with_refresh_token(RefreshToken::new("rt-0"))
        .with_expires_at(start - 10 * HOUR);
    peer.insert(key(), grant).await.unwrap();
    assert!(peer.refresh_now(&key()).await.is_err());
    // Two hours on, the peer's 120 s are over by the clock: this manager calls.
    clock.set(start + 2 * HOUR);
    let answer = this.access_token(&key()).await;
    assert_eq!(strict.calls(), 1, "retried into a rate limit in force");
    assert!(answer.is_err(), "{answer:?}");
}

// Seed 1114822: the refresher counted a start at the time its pass began, not at the start:
// with the clock set back meanwhile, that start looked hours ahead, was dropped from the
// window, and the next grant started at once, over the cap.
#[tokio::test(start_paused = true)]
async fn the_per_minute_cap_counts_a_start_at_the_clocks_reading_then() {
    let clock = Arc::new(ManualClock::fixed());
    let start = clock.now();
    let store = Arc::new(FaultyStore::default());
    let (calls, provider) = counting(|| async {
        Ok(TokenResponse::new(AccessToken::new("at"))
            .with_refresh_token(RefreshToken::new("rt"))
            .with_expires(Expiry::In(DAY)))
    });
    let manager = manager(provider, store.clone(), clock.clone());
    for n in 0..2 {
        manager
            .insert(
                TokenKey::from(format!("acct-{n}")),
                expired_grant(&clock, "rt-0"),
            )
            .await
            .unwrap();
    }
    // The clock runs four hours ahead when the refresher's pass begins, and is set back three
    // hours while the store answers.
    clock.set(start + 4 * HOUR);
    *store.clock_at_next_load.lock().unwrap() = Some((clock.clone(), start + HOUR));
    let refresher =
        manager.start_refresher(RefresherConfig::new().refresh_idle(true).max_per_minute(1));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        clock.advance(Duration::from_secs(1));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "two starts within ten seconds"
    );
    clock.advance(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(1)).await;
    refresher.wait_idle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    refresher.shutdown().await;
}

// Seed 1110101: a death held in memory (its save failed) was saved later over a record on
// which a peer had meanwhile recorded a lost reply for the same refresh token, as a plain
// `InvalidGrant`.
#[tokio::test(start_paused = true)]
async fn a_held_death_saved_over_a_peers_lost_reply_says_rotation_lost() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let (_, refusing) =
        counting(|| async { Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant)) });
    let (_, losing) =
        counting(|| async { Err(ProviderError::unavailable(UnavailableCause::Network)) });
    let held = manager(refusing, store.clone(), clock.clone());
    let peer = manager(losing, store.clone(), clock.clone());
    held.insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    store.save_failures.store(1, Ordering::SeqCst);
    assert!(held
        .access_token(&key())
        .await
        .unwrap_err()
        .is_reauth_required());
    // The peer's call with the same refresh token loses its reply, and the store records that.
    assert!(peer.refresh_now(&key()).await.is_err());
    assert!(store.stored(&key()).reply_lost());
    let err = held.access_token(&key()).await.unwrap_err();
    match store.stored(&key()).state() {
        tokenkeeper::GrantState::ReauthorizationRequired { reason, .. } => {
            assert_eq!(reason, &InvalidationReason::RotationLost, "{err:?}")
        }
        other => panic!("not dead: {other:?} ({err:?})"),
    }
}

// Found by the cross-process test on Redis: the lease's budget counted from asking for the
// lock, so waiting out a crashed holder's lease spent it, and every waiter then refused to call.
#[tokio::test(start_paused = true)]
async fn waiting_out_a_crashed_holders_lease_does_not_spend_the_next_lease() {
    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(FaultyStore::default());
    let strict = Arc::new(Strict::default());
    let manager = manager(strict.provider(), store.clone(), clock.clone());
    manager
        .insert(key(), expired_grant(&clock, "rt-0"))
        .await
        .unwrap();
    // A process took the lock and died: its lease runs out after the default 60 s ttl.
    let crashed = store.lock(&key(), Duration::from_secs(60)).await.unwrap();
    std::mem::forget(crashed);
    assert_eq!(manager.access_token(&key()).await.unwrap().secret(), "at-1");
    assert_eq!(strict.calls(), 1);
}
