//! `tokenkeeper::transfer`: moving, copying, exporting and importing grants from an
//! application, without the CLI.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::transfer::{
    copy_grant, export_grants, import_grants, move_grant, MoveOptions, TransferError,
};
use tokenkeeper::{
    AccessToken, Clock, GrantRecord, InvalidationReason, MemoryStore, TokenKey, TokenManager,
    TokenSet, TokenStore,
};

/// A move hands the grant over: the destination's manager refreshes it, the source's reports
/// `Moved` without calling the provider, and no refresh token is ever reused.
#[tokio::test]
async fn a_moved_grant_lives_on_in_the_destination_only() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
    let (production, staging) = (Arc::new(MemoryStore::new()), Arc::new(MemoryStore::new()));
    let manager = |store: &Arc<MemoryStore>| {
        TokenManager::builder(support::oauth2_provider(&server))
            .clock(clock.clone())
            .store(store.clone())
            .build()
    };
    let (source, destination) = (manager(&production), manager(&staging));
    let key = TokenKey::from("tenant-7");
    source
        .insert(key.clone(), support::tokens(&server.issue_grant()))
        .await
        .unwrap();
    source.access_token(&key).await.unwrap();

    move_grant(
        &*production,
        &*staging,
        &key,
        &MoveOptions::new("memory://staging").at(clock.now()),
    )
    .await
    .unwrap();
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    destination.access_token(&key).await.unwrap();
    let calls = server.refresh_calls();
    let error = source.refresh_now(&key).await.unwrap_err();
    assert_eq!(
        error.invalidation_reason(),
        Some(&InvalidationReason::Moved {
            to: "memory://staging".to_owned()
        })
    );
    assert_eq!(
        server.refresh_calls(),
        calls,
        "the source never refreshes it"
    );
    assert_eq!(server.reuse_detections(), 0);

    // Twice is refused; moving back over the marker is not.
    assert!(matches!(
        move_grant(&*production, &*staging, &key, &MoveOptions::new("x")).await,
        Err(TransferError::AlreadyMoved { .. })
    ));
    move_grant(
        &*staging,
        &*production,
        &key,
        &MoveOptions::new("memory://production"),
    )
    .await
    .unwrap();
    source.access_token(&key).await.unwrap();
}

/// A copy of a grant with a refresh token needs saying so; a destination grant needs
/// `overwrite`; a missing grant is `NotFound`.
#[tokio::test]
async fn copies_are_refused_unless_asked_for() {
    let (from, to) = (MemoryStore::new(), MemoryStore::new());
    let key = TokenKey::from("k");
    let record = GrantRecord::new(
        TokenSet::new(AccessToken::new("at"))
            .with_refresh_token(tokenkeeper::RefreshToken::new("rt")),
    );
    from.save(&key, &record, None).await.unwrap();
    assert!(matches!(
        copy_grant(&from, &to, &key, false, false).await,
        Err(TransferError::HasRefreshToken { .. })
    ));
    copy_grant(&from, &to, &key, false, true).await.unwrap();
    assert!(matches!(
        copy_grant(&from, &to, &key, false, true).await,
        Err(TransferError::Exists { .. })
    ));
    copy_grant(&from, &to, &key, true, true).await.unwrap();
    assert!(matches!(
        copy_grant(&from, &to, &TokenKey::from("nobody"), false, true).await,
        Err(TransferError::NotFound { .. })
    ));
    assert_eq!(to.load(&key).await.unwrap().unwrap().value, record);
}

/// Export then import: every grant, as JSON lines, refused over existing grants before anything
/// is written; the `Debug` of an exported grant shows no token.
#[tokio::test]
async fn export_and_import_round_trip_all_or_nothing() {
    let (from, to) = (MemoryStore::new(), MemoryStore::new());
    for i in 0..5 {
        let record = GrantRecord::new(TokenSet::new(AccessToken::new(format!("secret-at-{i}"))));
        from.save(&TokenKey::from(format!("k{i}")), &record, None)
            .await
            .unwrap();
    }
    let exported = export_grants(&from).await.unwrap();
    assert_eq!(exported.len(), 5);
    assert!(!format!("{exported:?}").contains("secret-at"));
    let lines: Vec<String> = exported
        .iter()
        .map(|g| serde_json::to_string(g).unwrap())
        .collect();
    let parsed: Vec<_> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    to.save(&TokenKey::from("k3"), &exported[0].record, None)
        .await
        .unwrap();
    assert!(matches!(
        import_grants(&to, &parsed, false).await,
        Err(TransferError::Exists { .. })
    ));
    assert_eq!(to.keys().await.unwrap().len(), 1, "nothing written");
    assert_eq!(import_grants(&to, &parsed, true).await.unwrap(), 5);
    assert_eq!(export_grants(&to).await.unwrap(), exported);
}
