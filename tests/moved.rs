//! A record an operator marked moved (`GrantRecord::into_moved`, what `tokenkeeper grants
//! move` leaves behind): instances reading the old store stop refreshing the grant and report
//! `InvalidationReason::Moved`, and never race the new environment at the provider.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{
    Clock, Error, GrantHealth, GrantRecord, InvalidationReason, MemoryStore, RefresherConfig,
    TokenKey, TokenManager, TokenStore,
};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const TO: &str = "sqlite:///srv/staging/grants.db";

fn moved(error: &Error) -> Option<&str> {
    match error.invalidation_reason() {
        Some(InvalidationReason::Moved { to }) => Some(to),
        _ => None,
    }
}

#[tokio::test]
async fn a_record_marked_moved_is_reported_moved_and_never_refreshed() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
    let store = Arc::new(MemoryStore::new());
    let key = TokenKey::from("site-1");
    let record = GrantRecord::new(support::tokens(&server.issue_grant()));
    store
        .save(&key, &record.into_moved(TO, clock.now()), None)
        .await
        .unwrap();
    let manager = TokenManager::builder(support::oauth2_provider(&server))
        .store(store.clone())
        .clock(clock.clone())
        .build();

    // Still valid, expired, forced: always the typed "moved" state, never a provider call.
    let error = manager.access_token(&key).await.unwrap_err();
    assert!(error.is_reauth_required(), "{error:?}");
    assert_eq!(moved(&error), Some(TO), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!(
            "grant `site-1` needs re-authorization: the grant was moved to another store ({TO})"
        )
    );
    clock.advance(2 * DAY);
    let error = manager.access_token(&key).await.unwrap_err();
    assert_eq!(moved(&error), Some(TO), "{error:?}");
    let error = manager.refresh_now(&key).await.unwrap_err();
    assert_eq!(moved(&error), Some(TO), "{error:?}");
    assert!(matches!(
        manager.status(&key).await.unwrap().health,
        GrantHealth::ReauthorizationRequired {
            reason: InvalidationReason::Moved { .. },
            ..
        }
    ));

    // Nor does the background refresher touch it, however long it runs.
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    for _ in 0..40 {
        clock.advance(12 * HOUR);
        refresher.wait_idle().await;
    }
    refresher.shutdown().await;
    assert_eq!(server.refresh_calls(), 0);

    // Inserting a grant again (moving it back) revives it.
    let back = server.issue_grant();
    manager
        .insert(key.clone(), support::tokens(&back))
        .await
        .unwrap();
    manager.access_token(&key).await.unwrap();
}

#[tokio::test]
async fn an_instance_holding_the_grant_stops_at_its_next_refresh_after_the_move() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
    let store = Arc::new(MemoryStore::new());
    let key = TokenKey::from("site-1");
    let manager = TokenManager::builder(support::oauth2_provider(&server))
        .store(store.clone())
        .clock(clock.clone())
        .build();
    manager
        .insert(key.clone(), support::tokens(&server.issue_grant()))
        .await
        .unwrap();
    manager.access_token(&key).await.unwrap();

    // An operator moves the grant away while this instance holds it in its cache.
    let stored = store.load(&key).await.unwrap().unwrap();
    let marked = stored.value.into_moved(TO, clock.now());
    store
        .save(&key, &marked, Some(stored.version))
        .await
        .unwrap();

    // When the access token falls due, the re-read before refreshing finds the mark.
    clock.advance(2 * DAY);
    let error = manager.access_token(&key).await.unwrap_err();
    assert_eq!(moved(&error), Some(TO), "{error:?}");
    assert_eq!(server.refresh_calls(), 0);
}
