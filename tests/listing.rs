//! `TokenManager::grants`: every grant with its status, a page at a time.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    provider_fn, AccessToken, Cas, Clock, GrantHealth, GrantRecord, InvalidationReason,
    MemoryStore, Page, ProviderError, RefreshLock, RefreshToken, StoreError, TokenKey,
    TokenManager, TokenResponse, TokenSet, TokenStore, Version, Versioned,
};
use tokio::sync::Notify;

const HOUR: Duration = Duration::from_secs(3600);

/// Grants whose refresh token names what the provider does with it.
fn provider(gate: Arc<Notify>) -> impl tokenkeeper::Provider {
    provider_fn(move |_key, tokens: TokenSet| {
        let gate = gate.clone();
        async move {
            match tokens.refresh_token().map(RefreshToken::secret) {
                Some("dies") => Err(ProviderError::reauthorize(InvalidationReason::Revoked)),
                Some("limited") => Err(ProviderError::rate_limited(Some(HOUR))),
                Some("slow") => {
                    gate.notified().await;
                    Ok(TokenResponse::new(AccessToken::new("fresh")))
                }
                _ => Ok(TokenResponse::new(AccessToken::new("fresh"))),
            }
        }
    })
}

fn grant(clock: &ManualClock, refresh: &str) -> TokenSet {
    TokenSet::new(AccessToken::new("at"))
        .with_refresh_token(RefreshToken::new(refresh))
        .with_expires_at(clock.now() + HOUR)
}

#[tokio::test(start_paused = true)]
async fn every_grant_is_listed_once_with_its_health_page_by_page() {
    let clock = Arc::new(ManualClock::fixed());
    let gate = Arc::new(Notify::new());
    let manager = TokenManager::builder(provider(gate.clone()))
        .clock(clock.clone())
        .build();
    let refresh_expiry = clock.now() + 30 * 24 * HOUR;
    manager
        .insert(
            TokenKey::from("healthy"),
            grant(&clock, "ok").with_refresh_expires_at(refresh_expiry),
        )
        .await
        .unwrap();
    for (key, refresh) in [("dead", "dies"), ("limited", "limited"), ("slow", "slow")] {
        manager
            .insert(TokenKey::from(key), grant(&clock, refresh))
            .await
            .unwrap();
    }
    for i in 0..5 {
        manager
            .insert(TokenKey::from(format!("zz-{i}")), grant(&clock, "ok"))
            .await
            .unwrap();
    }
    assert!(manager
        .refresh_now(&TokenKey::from("dead"))
        .await
        .unwrap_err()
        .is_reauth_required());
    // Rate limited: the still-valid token is served, and the grant backs off.
    manager
        .refresh_now(&TokenKey::from("limited"))
        .await
        .unwrap_err();
    // A refresh held in flight by the provider.
    let slow = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.refresh_now(&TokenKey::from("slow")).await })
    };
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;

    let mut statuses = Vec::new();
    let mut page = Some(Page::first(3));
    let mut pages = 0;
    while let Some(this) = page {
        let listing = manager.grants(this).await.unwrap();
        assert!(listing.grants.len() <= 3);
        pages += 1;
        statuses.extend(listing.grants);
        page = listing.next;
    }
    assert_eq!(pages, 3, "9 grants, 3 a page, and no empty last page");
    let keys: Vec<&str> = statuses.iter().map(|s| s.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "in key order");
    assert_eq!(
        keys.iter().collect::<HashSet<_>>().len(),
        9,
        "each grant once"
    );

    let status = |key: &str| statuses.iter().find(|s| s.key.as_str() == key).unwrap();
    assert_eq!(status("healthy").health, GrantHealth::Active);
    assert_eq!(status("healthy").refresh_expires_at, Some(refresh_expiry));
    assert!(!status("healthy").refreshing);
    assert!(matches!(
        status("dead").health,
        GrantHealth::ReauthorizationRequired {
            reason: InvalidationReason::Revoked,
            ..
        }
    ));
    match status("limited").health {
        GrantHealth::BackingOff { until } => assert!(until >= clock.now() + HOUR),
        ref other => panic!("expected a backoff, got {other:?}"),
    }
    assert!(status("slow").refreshing, "a refresh in flight is shown");

    // The filtered view agrees.
    let dead = manager.reauthorization_required().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0.as_str(), "dead");

    gate.notify_one();
    slow.await.unwrap().unwrap();
    let after = manager
        .grants(Page::after(TokenKey::from("limited"), 1))
        .await
        .unwrap();
    assert_eq!(after.grants[0].key.as_str(), "slow");
    assert!(!after.grants[0].refreshing);
}

#[tokio::test(start_paused = true)]
async fn an_empty_store_is_one_empty_page_and_limits_are_clamped() {
    let manager = TokenManager::builder(provider(Arc::new(Notify::new()))).build();
    let listing = manager.grants(Page::default()).await.unwrap();
    assert!(listing.grants.is_empty() && listing.next.is_none());
    assert_eq!(Page::first(0).limit(), 1);
    assert_eq!(Page::first(usize::MAX).limit(), Page::MAX_LIMIT);
}

/// A store that implements only the required methods: `keys_after` is the trait's default.
struct KeysOnly(MemoryStore);

#[async_trait::async_trait]
impl TokenStore for KeysOnly {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        self.0.load(key).await
    }
    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        self.0.save(key, record, expected).await
    }
    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        self.0.delete(key).await
    }
    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        self.0.keys().await
    }
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        self.0.lock(key, ttl).await
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_key_pages_match_the_memory_stores_own() {
    let (own, default) = (
        Arc::new(MemoryStore::new()),
        Arc::new(KeysOnly(MemoryStore::new())),
    );
    let clock = ManualClock::fixed();
    for key in ["b", "a", "d", "c", "", "aa"] {
        for store in [&*own as &dyn TokenStore, &*default] {
            let record = GrantRecord::new(grant(&clock, "ok"));
            store
                .save(&TokenKey::from(key), &record, None)
                .await
                .unwrap();
        }
    }
    for after in [None, Some(""), Some("a"), Some("ab"), Some("d"), Some("zz")] {
        let after = after.map(TokenKey::from);
        for limit in [1, 2, 10] {
            let ours = own.keys_after(after.as_ref(), limit).await.unwrap();
            let theirs = default.keys_after(after.as_ref(), limit).await.unwrap();
            assert_eq!(ours, theirs, "after {after:?}, limit {limit}");
        }
    }
    let page = default
        .keys_after(Some(&TokenKey::from("a")), 2)
        .await
        .unwrap();
    assert_eq!(page, [TokenKey::from("aa"), TokenKey::from("b")]);
    tokenkeeper::testing::assert_store_contract(&*default).await;
    tokenkeeper::testing::assert_store_contract(&*own).await;
}
