//! `TokenManager::grant` handles and the closure API: the same answers as the manager's own
//! methods, the fast path's boundary exact to the nanosecond, and handles that outlive their
//! grant.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    AccessToken, Clock, Error, Expiry, RefreshToken, TokenKey, TokenManager, TokenResponse,
    TokenSet,
};

const HOUR: Duration = Duration::from_secs(3600);
/// The manager's default refresh margin.
const MARGIN: Duration = Duration::from_secs(60);

fn manager(clock: &Arc<ManualClock>) -> (Arc<std::sync::atomic::AtomicUsize>, TokenManager) {
    let (calls, provider) = support::counting(|| async {
        Ok(TokenResponse::new(AccessToken::new("at-refreshed"))
            .with_refresh_token(RefreshToken::new("rt-2"))
            .with_expires(Expiry::In(HOUR)))
    });
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    (calls, manager)
}

fn tokens(clock: &ManualClock) -> TokenSet {
    TokenSet::new(AccessToken::new("at-1"))
        .with_refresh_token(RefreshToken::new("rt-1"))
        .with_issued_at(clock.now())
        .with_expires_at(clock.now() + HOUR)
}

/// Up to one nanosecond before the access expiry less the margin the cached token is served;
/// from that instant on, it is refreshed, whichever way the grant is read.
#[tokio::test]
async fn the_fast_path_serves_until_exactly_the_margin_before_expiry() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, manager) = manager(&clock);
    let key = TokenKey::from("tenant-1");
    let refresh_at = clock.now() + HOUR - MARGIN;
    manager.insert(key.clone(), tokens(&clock)).await.unwrap();
    let grant = manager.grant(&key);

    clock.set(refresh_at - Duration::from_nanos(1));
    assert_eq!(grant.access_token().await.unwrap().secret(), "at-1");
    assert_eq!(manager.access_token(&key).await.unwrap().secret(), "at-1");
    assert_eq!(
        grant.with_access_token(|t| t.secret().len()).await.unwrap(),
        4
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    clock.set(refresh_at);
    assert_eq!(grant.access_token().await.unwrap().secret(), "at-refreshed");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The handle's next read is the new token from memory.
    assert_eq!(
        grant
            .with_access_token(|t| t.secret().to_owned())
            .await
            .unwrap(),
        "at-refreshed"
    );
    assert_eq!(
        manager
            .with_access_token(&key, |t| t.secret().to_owned())
            .await
            .unwrap(),
        "at-refreshed"
    );
    assert_eq!(
        grant.token().await.unwrap().access_token().secret(),
        "at-refreshed"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A handle taken before its grant exists answers `NotFound`, then the grant once inserted; a
/// handle whose grant was deleted answers as the manager does, including after a new insert.
#[tokio::test]
async fn handles_outlive_their_grant_and_answer_as_the_manager_does() {
    let clock = Arc::new(ManualClock::fixed());
    let (calls, manager) = manager(&clock);
    let key = TokenKey::from("tenant-2");
    let early = manager.grant(&key);
    assert!(matches!(
        early.access_token().await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        manager.with_access_token(&key, |_| ()).await,
        Err(Error::NotFound { .. })
    ));
    manager.insert(key.clone(), tokens(&clock)).await.unwrap();
    assert_eq!(early.access_token().await.unwrap().secret(), "at-1");

    assert!(manager.remove(&key).await.unwrap());
    assert!(matches!(
        early.access_token().await,
        Err(Error::NotFound { .. })
    ));
    let replacement = TokenSet::new(AccessToken::new("at-new"))
        .with_refresh_token(RefreshToken::new("rt-new"))
        .with_issued_at(clock.now())
        .with_expires_at(clock.now() + HOUR);
    manager.insert(key.clone(), replacement).await.unwrap();
    assert_eq!(early.access_token().await.unwrap().secret(), "at-new");
    assert_eq!(
        manager.grant(&key).access_token().await.unwrap().secret(),
        "at-new"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(early.key(), &key);
    assert!(!format!("{early:?}").contains("at-new"));
}

/// The closure runs outside the manager's locks: it may use the manager (here it adds 64 new
/// keys to the manager's map, so some share the lock of the grant being read).
#[tokio::test]
async fn the_closure_may_use_the_manager() {
    let clock = Arc::new(ManualClock::fixed());
    let (_, manager) = manager(&clock);
    let key = TokenKey::from("tenant-3");
    manager.insert(key.clone(), tokens(&clock)).await.unwrap();
    let other = manager.clone();
    let nested = manager
        .with_access_token(&key, |_| {
            (0..64)
                .map(|i| other.grant(&TokenKey::from(format!("tenant-x{i}"))))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
    assert_eq!(nested.len(), 64);
}

/// The futures of the reads stay small: the slow path (kilobytes of state) is boxed, so the
/// many callers a refresh storm parks do not each carry it (10,000 tasks copied 25 MB when
/// it was inline).
#[tokio::test]
async fn the_read_futures_do_not_carry_the_slow_path() {
    let clock = Arc::new(ManualClock::fixed());
    let (_, manager) = manager(&clock);
    let key = TokenKey::from("k");
    let grant = manager.grant(&key);
    let sizes = [
        (
            "TokenManager::access_token",
            size_of_val(&manager.access_token(&key)),
        ),
        ("TokenManager::token", size_of_val(&manager.token(&key))),
        (
            "TokenManager::with_access_token",
            size_of_val(&manager.with_access_token(&key, |t| t.secret().len())),
        ),
        (
            "GrantHandle::access_token",
            size_of_val(&grant.access_token()),
        ),
        ("GrantHandle::token", size_of_val(&grant.token())),
        (
            "GrantHandle::with_access_token",
            size_of_val(&grant.with_access_token(|t| t.secret().len())),
        ),
    ];
    for (name, size) in sizes {
        assert!(size <= 512, "{name}'s future is {size} bytes");
    }
}
