//! Every event carries the instant it happened, by the manager's injected clock.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::drain;
use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    provider_fn, AccessToken, Clock, Event, Expiry, InvalidationReason, ProviderError,
    RefreshToken, TokenKey, TokenManager, TokenResponse, TokenSet, UnavailableCause,
};

#[tokio::test(start_paused = true)]
async fn events_say_when_they_happened_by_the_injected_clock() {
    let clock = Arc::new(ManualClock::fixed());
    let calls = Arc::new(AtomicUsize::new(0));
    let provider =
        {
            let calls = calls.clone();
            provider_fn(move |_, _| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Ok(TokenResponse::new(AccessToken::new("at-1"))
                            .with_refresh_token(RefreshToken::new("rt-1"))
                            .with_expires(Expiry::In(Duration::from_secs(3600)))),
                        1 => Err(ProviderError::unavailable(UnavailableCause::ServerError)
                            .with_status(503)),
                        _ => Err(ProviderError::reauthorize(InvalidationReason::Revoked)),
                    }
                }
            })
        };
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    let mut rx = manager.subscribe();
    let key = TokenKey::from("acct-1");
    let expired = |clock: &ManualClock| {
        TokenSet::new(AccessToken::new("at-0"))
            .with_refresh_token(RefreshToken::new("rt-0"))
            .with_expires_at(clock.now() - Duration::from_secs(1))
    };
    manager.insert(key.clone(), expired(&clock)).await.unwrap();

    let refreshed_at = clock.now();
    manager.refresh_now(&key).await.unwrap();
    clock.advance(Duration::from_secs(7200));
    let failed_at = clock.now();
    assert!(manager.refresh_now(&key).await.is_err());
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let died_at = clock.now();
    assert!(manager.refresh_now(&key).await.is_err());
    clock.advance(Duration::from_secs(60));
    let recovered_at = clock.now();
    manager.insert(key.clone(), expired(&clock)).await.unwrap();

    let events = drain(&mut rx);
    let when = |pick: fn(&Event) -> bool| events.iter().find(|e| pick(e)).map(Event::at);
    assert_eq!(
        when(|e| matches!(e, Event::Refreshed { .. })),
        Some(refreshed_at)
    );
    assert_eq!(
        when(|e| matches!(e, Event::RefreshFailed { .. })),
        Some(failed_at)
    );
    assert_eq!(
        when(|e| matches!(e, Event::ReauthorizationRequired { .. })),
        Some(died_at)
    );
    assert_eq!(
        when(|e| matches!(e, Event::Recovered { .. })),
        Some(recovered_at)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
