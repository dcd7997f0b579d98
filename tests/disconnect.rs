//! Disconnecting a grant: RFC 7009 revocation at the provider, then deletion.
//!
//! Real HTTP on loopback to the fake authorization server: real tokio time, no sleeps.

mod support;

use std::sync::Arc;

use tokenkeeper::testing::{FakeAuthServer, FakeConfig, GrantState, ManualClock, RevocationReason};
use tokenkeeper::{
    provider_fn, AccessToken, ClientAuth, ClientSecret, ConfigProblem, Error, InvalidationReason,
    OAuth2Provider, ProviderError, TokenKey, TokenManager, TokenSet,
};

/// A manager revoking through the fake server's RFC 7009 endpoint, with `secret` (default: the
/// right one).
async fn setup(
    config: FakeConfig,
    auth: ClientAuth,
    secret: Option<&str>,
) -> (FakeAuthServer, TokenManager) {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(config, clock.clone()).await;
    let secret = secret.unwrap_or(server.client_secret()).to_owned();
    let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
        .client_secret(ClientSecret::new(secret))
        .client_auth(auth)
        .revocation_url(
            server
                .revocation_url()
                .expect("the preset has a revocation endpoint"),
        )
        .build()
        .unwrap();
    let manager = TokenManager::builder(provider).clock(clock).build();
    (server, manager)
}

#[tokio::test]
async fn disconnect_revokes_the_grant_at_the_provider_then_forgets_it() {
    for auth in [ClientAuth::Basic, ClientAuth::RequestBody] {
        let (server, manager) = setup(FakeConfig::constant_contact(), auth, None).await;
        let key = TokenKey::from("site");
        let issued = server.issue_grant();
        manager
            .insert(key.clone(), server.token_set(&issued))
            .await
            .unwrap();

        assert!(manager.disconnect(&key).await.unwrap());
        assert_eq!(server.revocations(), 1, "{auth:?}");
        assert_eq!(
            server.grant_state(&issued.grant),
            GrantState::Revoked(RevocationReason::ClientRevoked)
        );
        assert!(!server.is_access_token_valid(&issued.access_token));
        assert!(matches!(
            manager.access_token(&key).await,
            Err(Error::NotFound { .. })
        ));
        assert_eq!(server.refresh_calls(), 0);
        // Disconnecting again: nothing to do.
        assert!(!manager.disconnect(&key).await.unwrap());
        assert_eq!(server.revocations(), 1);
    }
}

#[tokio::test]
async fn a_refused_revocation_keeps_the_grant() {
    let (server, manager) = setup(
        FakeConfig::standard(),
        ClientAuth::Basic,
        Some("wrong secret"),
    )
    .await;
    let key = TokenKey::from("acct");
    let issued = server.issue_grant();
    manager
        .insert(key.clone(), server.token_set(&issued))
        .await
        .unwrap();

    let err = manager.disconnect(&key).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misconfigured {
                problem: ConfigProblem::InvalidClient,
                status: Some(401),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.grant_state(&issued.grant), GrantState::Active);
    // Still there for a retry, or for `remove` to forget without revoking.
    assert!(manager.status(&key).await.is_ok());
    assert!(manager.remove(&key).await.unwrap());
}

#[tokio::test]
async fn a_provider_without_revocation_just_deletes() {
    let provider = provider_fn(|_, _| async {
        Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant))
    });
    let manager = TokenManager::builder(provider).build();
    let key = TokenKey::from("k");
    manager
        .insert(key.clone(), TokenSet::new(AccessToken::new("at")))
        .await
        .unwrap();
    assert!(manager.disconnect(&key).await.unwrap());
    assert!(matches!(
        manager.status(&key).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_dead_grant_is_deleted_without_asking_the_provider() {
    let (server, manager) = setup(FakeConfig::standard(), ClientAuth::Basic, None).await;
    let key = TokenKey::from("k");
    // No refresh token and an expired access token: dead as soon as it is needed.
    let clock = ManualClock::fixed();
    let grant = TokenSet::new(AccessToken::new("at"))
        .with_expires_at(tokenkeeper::Clock::now(&clock) - std::time::Duration::from_secs(1));
    manager.insert(key.clone(), grant).await.unwrap();
    let err = manager.access_token(&key).await.unwrap_err();
    assert_eq!(
        err.invalidation_reason(),
        Some(&InvalidationReason::NoRefreshToken)
    );
    assert!(manager.disconnect(&key).await.unwrap());
    assert_eq!(server.revocations(), 0);
    assert!(matches!(
        manager.status(&key).await,
        Err(Error::NotFound { .. })
    ));
}
