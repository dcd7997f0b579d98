//! Fixed and sliding refresh-token expiries across refreshes, through the fake server. Real
//! HTTP, so tokio's clock runs; the providers' and the manager's clock is manual.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{oauth2_provider, tokens, XoxodayProvider};
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{Clock, MemoryStore, RefreshExpiry, TokenKey, TokenManager};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn key() -> TokenKey {
    TokenKey::from("acct-1")
}

/// A rewards API whose grant-level deadline (30 days) is stated when the grant is issued and
/// never again: declared `Fixed`, it survives ten rotations; undeclared, the first rotation
/// drops it (nothing is known of the new refresh token), and its warning with it.
#[tokio::test]
async fn a_fixed_refresh_expiry_is_kept_across_ten_rotations() {
    for declared in [true, false] {
        let clock = Arc::new(ManualClock::fixed());
        let config = FakeConfig::xoxoday().with_refresh_expiry_at_issue_only(true);
        let server = FakeAuthServer::start(config, clock.clone()).await;
        let manager = TokenManager::builder(XoxodayProvider::new(&server))
            .clock(clock.clone())
            .build();
        let grant = server.issue_grant();
        let end = grant
            .refresh_expires_at
            .expect("the preset states a deadline");
        let mut set = tokens(&grant);
        if declared {
            set = set.with_refresh_expiry(RefreshExpiry::Fixed);
        }
        manager.insert(key(), set).await.unwrap();
        for _ in 0..10 {
            clock.advance(DAY);
            let before = manager.token(&key()).await.unwrap();
            let after = manager.refresh_now(&key()).await.unwrap();
            assert_ne!(after.refresh_token(), before.refresh_token(), "rotated");
            if declared {
                assert_eq!(after.refresh_expires_at(), Some(end));
            } else {
                assert_eq!(after.refresh_expires_at(), None);
            }
        }
        assert_eq!(server.refresh_calls(), 10);
    }
}

/// An email-marketing API whose refresh tokens die after 180 days unused, never stated in a
/// reply: declared `Sliding`, each refresh moves the known end to 180 days after it, as the
/// server does.
#[tokio::test]
async fn a_sliding_refresh_expiry_moves_with_each_refresh() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
    let store = Arc::new(MemoryStore::new());
    let manager = TokenManager::builder(oauth2_provider(&server))
        .clock(clock.clone())
        .store(store.clone())
        .build();
    let grant = server.issue_grant();
    let idle = 180 * DAY;
    assert_eq!(grant.refresh_expires_at, Some(clock.now() + idle));
    let set = tokens(&grant).with_refresh_expiry(RefreshExpiry::Sliding { idle });
    manager.insert(key(), set).await.unwrap();
    for n in 1..=10 {
        clock.advance(3 * DAY);
        let refreshed = manager.refresh_now(&key()).await.unwrap();
        assert_eq!(
            refreshed.refresh_expires_at(),
            Some(clock.now() + idle),
            "refresh {n}"
        );
        assert_eq!(
            refreshed.refresh_expiry(),
            Some(RefreshExpiry::Sliding { idle })
        );
    }
    // Kept with the grant in the store: a manager started afresh knows it too.
    let restarted = TokenManager::builder(oauth2_provider(&server))
        .clock(clock.clone())
        .store(store)
        .build();
    let stored = restarted.token(&key()).await.unwrap();
    assert_eq!(
        stored.refresh_expiry(),
        Some(RefreshExpiry::Sliding { idle })
    );
    assert_eq!(stored.refresh_expires_at(), Some(clock.now() + idle));
    let status = restarted.status(&key()).await.unwrap();
    assert_eq!(status.refresh_expiry, Some(RefreshExpiry::Sliding { idle }));
    assert_eq!(status.refresh_expires_at, Some(clock.now() + idle));
}

/// A declaration made once on the provider counts for every grant whose tokens do not declare
/// their own: stored with the grant at insert (so status shows it), it sets keep-alive from
/// the idle lifetime (sliding) or turns it off (fixed: a refresh would not move the end).
#[tokio::test]
async fn a_declaration_on_the_provider_counts_for_every_grant() {
    use tokenkeeper::{OAuth2Provider, RefresherConfig};

    let mut plans = Vec::new();
    for declared in [
        None,
        Some(RefreshExpiry::Sliding { idle: 180 * DAY }),
        Some(RefreshExpiry::Fixed),
    ] {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
        let mut provider = OAuth2Provider::builder(server.client_id(), server.token_url())
            .client_secret(tokenkeeper::ClientSecret::new(server.client_secret()));
        if let Some(expiry) = declared {
            provider = provider.refresh_expiry(expiry);
        }
        let manager = TokenManager::builder(provider.build().unwrap())
            .clock(clock.clone())
            .build();
        manager
            .insert(key(), tokens(&server.issue_grant()))
            .await
            .unwrap();
        let status = manager.status(&key()).await.unwrap();
        assert_eq!(status.refresh_expiry, declared);
        // 60 days unused.
        let refresher = manager.start_refresher(RefresherConfig::new());
        let end = clock.now() + 60 * DAY;
        while clock.now() < end {
            clock.advance(DAY / 4);
            refresher.wait_idle().await;
        }
        plans.push(server.refresh_calls());
        refresher.shutdown().await;
    }
    // Every 7 days by default; every 45 (a quarter of 180); never for a fixed end.
    assert_eq!(plans, [8, 1, 0]);
}
