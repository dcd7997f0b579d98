//! The connect flow end to end against the fake authorization server: authorization URL with
//! state and PKCE, callback, code exchange, insert; every way a callback can go wrong; pending
//! attempts shared through a store; reconnecting a dead grant.
//!
//! These tests talk HTTP to the fake server, so they run on real tokio time; every expiry
//! comes from the shared `ManualClock`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{drain, oauth2_provider};
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, GrantState, ManualClock, RevocationReason};
use tokenkeeper::{
    AuthorizeErrorCode, CallbackParams, ClientSecret, Clock, ConfigProblem, ConnectError,
    Connector, Error, Event, MemoryStore, StartOptions, StorePendingStore, TokenKey, TokenManager,
};

const REDIRECT: &str = "http://127.0.0.1:9/callback";

struct Fixture {
    clock: Arc<ManualClock>,
    server: FakeAuthServer,
    manager: TokenManager,
    connector: Connector,
}

async fn fixture() -> Fixture {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    let manager = TokenManager::builder(oauth2_provider(&server))
        .clock(clock.clone())
        .build();
    let connector = connector(&server, &manager).build().unwrap();
    Fixture {
        clock,
        server,
        manager,
        connector,
    }
}

fn connector(server: &FakeAuthServer, manager: &TokenManager) -> tokenkeeper::ConnectorBuilder {
    Connector::builder(
        manager,
        server.client_id(),
        server.authorize_url(),
        server.token_url(),
        REDIRECT,
    )
    .client_secret(ClientSecret::new(server.client_secret()))
    .scopes(["offline_access", "contacts"])
    .auth_param("access_type", "offline")
    .auth_param("prompt", "consent")
}

/// Starts an attempt for `key` and plays the browser: returns the callback URL.
async fn authorize(f: &Fixture, key: &str) -> String {
    let authorization = f
        .connector
        .start(TokenKey::from(key), StartOptions::new())
        .await
        .unwrap();
    f.server
        .follow_authorization(authorization.url())
        .await
        .unwrap()
}

/// `code` and `state` of a callback URL.
fn code_and_state(callback: &str) -> (String, String) {
    let url = reqwest::Url::parse(callback).unwrap();
    let get = |name: &str| {
        url.query_pairs()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    (get("code"), get("state"))
}

#[tokio::test]
async fn happy_path_stores_a_grant_that_calls_the_api_and_refreshes() {
    let f = fixture().await;
    let key = TokenKey::from("customer-42");
    let authorization = f
        .connector
        .start(key.clone(), StartOptions::new())
        .await
        .unwrap();
    let url = reqwest::Url::parse(authorization.url()).unwrap();
    let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let has = |n: &str, v: &str| query.iter().any(|(a, b)| a == n && b == v);
    assert!(has("response_type", "code"));
    assert!(has("client_id", f.server.client_id()));
    assert!(has("redirect_uri", REDIRECT));
    assert!(has("code_challenge_method", "S256"));
    assert!(has("scope", "offline_access contacts"));
    assert!(has("access_type", "offline") && has("prompt", "consent"));
    assert!(has("state", authorization.state()));
    assert_eq!(
        authorization.expires_at(),
        f.clock.now() + Duration::from_secs(600)
    );

    let callback = f
        .server
        .follow_authorization(authorization.url())
        .await
        .unwrap();
    assert!(callback.starts_with(REDIRECT));
    let completed = f.connector.complete(callback.as_str()).await.unwrap();
    assert_eq!(completed.key, key);
    assert!(!completed.recovered);
    assert!(completed.has_refresh_token);
    assert_eq!(
        completed.scopes.as_deref(),
        Some(&["offline_access".to_owned(), "contacts".to_owned()][..])
    );
    assert_eq!(f.server.code_exchanges(), 1);
    assert_eq!(f.server.refresh_calls(), 0);

    let token = f.manager.access_token(&key).await.unwrap();
    assert!(f.server.is_access_token_valid(token.secret()));
    let api = reqwest::Client::new()
        .get(f.server.api_url())
        .bearer_auth(token.secret())
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);

    // The grant is a normal grant: it refreshes once its access token expires.
    f.clock.advance(Duration::from_secs(2 * 3600));
    let refreshed = f.manager.access_token(&key).await.unwrap();
    assert_ne!(refreshed, token);
    assert!(f.server.is_access_token_valid(refreshed.secret()));
    assert_eq!(f.server.refresh_calls(), 1);
}

#[tokio::test]
async fn unknown_or_missing_state_stores_nothing() {
    let f = fixture().await;
    let callback = authorize(&f, "a").await;
    let (code, _) = code_and_state(&callback);

    let forged = CallbackParams::new().code(code.clone()).state("forged");
    assert!(matches!(
        f.connector.complete(forged).await,
        Err(ConnectError::UnknownState)
    ));
    assert!(matches!(
        f.connector.complete(format!("code={code}").as_str()).await,
        Err(ConnectError::InvalidCallback { key: None, .. })
    ));
    assert_eq!(f.server.code_exchanges(), 0);
    assert!(matches!(
        f.manager.status(&TokenKey::from("a")).await,
        Err(Error::NotFound { .. })
    ));
    // The real callback still works: a forgery does not burn the attempt.
    f.connector.complete(callback.as_str()).await.unwrap();
}

#[tokio::test]
async fn a_repeated_parameter_makes_the_callback_invalid() {
    let f = fixture().await;
    let callback = authorize(&f, "a").await;
    let polluted = format!("{callback}&code=other");
    assert!(matches!(
        f.connector.complete(polluted.as_str()).await,
        Err(ConnectError::InvalidCallback { .. })
    ));
}

#[tokio::test]
async fn a_replayed_callback_is_refused_without_a_second_exchange() {
    let f = fixture().await;
    let callback = authorize(&f, "a").await;
    f.connector.complete(callback.as_str()).await.unwrap();
    let err = f.connector.complete(callback.as_str()).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::AlreadyUsed { key } if key.as_str() == "a"),
        "{err:?}"
    );
    assert_eq!(f.server.code_exchanges(), 1);
    // The grant from the first completion is intact.
    let token = f.manager.access_token(&TokenKey::from("a")).await.unwrap();
    assert!(f.server.is_access_token_valid(token.secret()));
}

#[tokio::test]
async fn an_attempt_expires_on_the_injected_clock() {
    let f = fixture().await;
    let callback = authorize(&f, "a").await;
    f.clock.advance(Duration::from_secs(601));
    let err = f.connector.complete(callback.as_str()).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::Expired { key } if key.as_str() == "a"),
        "{err:?}"
    );
    assert_eq!(f.server.code_exchanges(), 0);
    // Expired attempts are consumed too.
    assert!(matches!(
        f.connector.complete(callback.as_str()).await,
        Err(ConnectError::AlreadyUsed { .. })
    ));
}

#[tokio::test]
async fn an_attempt_completes_just_before_it_expires() {
    let f = fixture().await;
    f.server.set_code_lifetime(Duration::from_secs(3600));
    let callback = authorize(&f, "a").await;
    f.clock.advance(Duration::from_secs(599));
    f.connector.complete(callback.as_str()).await.unwrap();
}

#[tokio::test]
async fn user_denial_is_typed_and_consumes_the_attempt() {
    let f = fixture().await;
    f.server.deny_next_authorization();
    let callback = authorize(&f, "a").await;
    assert!(callback.contains("error=access_denied"));
    match f.connector.complete(callback.as_str()).await {
        Err(ConnectError::Denied {
            key,
            error: AuthorizeErrorCode::AccessDenied,
            description,
        }) => {
            assert_eq!(key.as_str(), "a");
            assert_eq!(description.as_deref(), Some("The user denied access."));
        }
        other => panic!("expected Denied, got {other:?}"),
    }
    assert_eq!(f.server.code_exchanges(), 0);
    assert!(matches!(
        f.connector.complete(callback.as_str()).await,
        Err(ConnectError::AlreadyUsed { .. })
    ));
}

#[tokio::test]
async fn other_authorization_errors_are_denials_with_their_code() {
    let f = fixture().await;
    f.server
        .refuse_next_authorization("invalid_scope", "Scope contacts is unknown.");
    let callback = authorize(&f, "a").await;
    let err = f.connector.complete(callback.as_str()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ConnectError::Denied { error: AuthorizeErrorCode::InvalidScope, description, .. }
                if description.as_deref() == Some("Scope contacts is unknown.")
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_code_injected_into_another_attempt_fails_pkce() {
    // An attacker's code (bound to the attacker's PKCE challenge) pasted into a victim's
    // callback: the victim's verifier does not match, the server refuses.
    let f = fixture().await;
    let attacker = authorize(&f, "attacker").await;
    let victim = authorize(&f, "victim").await;
    let (attacker_code, _) = code_and_state(&attacker);
    let (_, victim_state) = code_and_state(&victim);
    let injected = CallbackParams::new()
        .code(attacker_code)
        .state(victim_state);
    let err = f.connector.complete(injected).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::CodeRejected { key, status: Some(400) } if key.as_str() == "victim"),
        "{err:?}"
    );
    assert_eq!(f.server.code_exchanges(), 1);
    assert!(f.server.authorized_grants().is_empty());
    assert!(matches!(
        f.manager.status(&TokenKey::from("victim")).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_replayed_code_is_rejected_and_revokes_its_grant() {
    let f = fixture().await;
    let first = authorize(&f, "a").await;
    f.connector.complete(first.as_str()).await.unwrap();
    let grant = f.server.authorized_grants()[0];

    let second = authorize(&f, "b").await;
    let (spent_code, _) = code_and_state(&first);
    let (_, state) = code_and_state(&second);
    let err = f
        .connector
        .complete(CallbackParams::new().code(spent_code).state(state))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::CodeRejected { .. }), "{err:?}");
    assert_eq!(
        f.server.grant_state(&grant),
        GrantState::Revoked(RevocationReason::ReuseDetected)
    );
}

#[tokio::test]
async fn an_expired_code_is_rejected() {
    let f = fixture().await;
    let callback = authorize(&f, "a").await;
    f.clock.advance(Duration::from_secs(301)); // the fake's codes live 5 minutes
    let err = f.connector.complete(callback.as_str()).await.unwrap_err();
    assert!(matches!(err, ConnectError::CodeRejected { .. }), "{err:?}");
}

#[tokio::test]
async fn a_wrong_client_secret_is_a_misconfiguration() {
    let f = fixture().await;
    let wrong = connector(&f.server, &f.manager)
        .client_secret(ClientSecret::new("wrong-secret"))
        .build()
        .unwrap();
    let authorization = wrong
        .start(TokenKey::from("a"), StartOptions::new())
        .await
        .unwrap();
    let callback = f
        .server
        .follow_authorization(authorization.url())
        .await
        .unwrap();
    let err = wrong.complete(callback.as_str()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Misconfigured {
                problem: ConfigProblem::InvalidClient,
                status: Some(401),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_store_backed_pending_store_lets_another_instance_complete() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    let grants = Arc::new(MemoryStore::new());
    let pending = Arc::new(MemoryStore::new());
    let instance = || {
        let manager = TokenManager::builder(oauth2_provider(&server))
            .clock(clock.clone())
            .store(grants.clone())
            .build();
        let connector = connector(&server, &manager)
            .pending_store(StorePendingStore::new(pending.clone()))
            .build()
            .unwrap();
        (manager, connector)
    };
    let (manager_a, connector_a) = instance();
    let (_manager_b, connector_b) = instance();

    let key = TokenKey::from("customer-7");
    let authorization = connector_a
        .start(key.clone(), StartOptions::new())
        .await
        .unwrap();
    let callback = server
        .follow_authorization(authorization.url())
        .await
        .unwrap();
    let completed = connector_b.complete(callback.as_str()).await.unwrap();
    assert_eq!(completed.key, key);
    // Single use across instances.
    assert!(matches!(
        connector_a.complete(callback.as_str()).await,
        Err(ConnectError::AlreadyUsed { .. })
    ));
    let token = manager_a.access_token(&key).await.unwrap();
    assert!(server.is_access_token_valid(token.secret()));

    // Without a shared pending store, the other instance cannot know the attempt.
    let manager_c = TokenManager::builder(oauth2_provider(&server))
        .clock(clock.clone())
        .build();
    let alone = connector(&server, &manager_c).build().unwrap();
    let authorization = connector_a
        .start(TokenKey::from("x"), StartOptions::new())
        .await
        .unwrap();
    let callback = server
        .follow_authorization(authorization.url())
        .await
        .unwrap();
    assert!(matches!(
        alone.complete(callback.as_str()).await,
        Err(ConnectError::UnknownState)
    ));
}

#[tokio::test]
async fn reconnecting_a_dead_grant_recovers_it() {
    let f = fixture().await;
    let key = TokenKey::from("customer-42");
    let callback = authorize(&f, key.as_str()).await;
    f.connector.complete(callback.as_str()).await.unwrap();
    let first_grant = f.server.authorized_grants()[0];

    let mut events = f.manager.subscribe();
    f.server.revoke(&first_grant);
    let err = f.manager.refresh_now(&key).await.unwrap_err();
    assert!(err.is_reauth_required(), "{err:?}");
    let dead_key = drain(&mut events)
        .into_iter()
        .find_map(|e| match e {
            Event::ReauthorizationRequired { key, .. } => Some(key),
            _ => None,
        })
        .expect("a ReauthorizationRequired event");

    // The event's key is all the app needs for the link.
    let link = f.connector.reconnect_url(&dead_key).await.unwrap();
    assert_eq!(link.key(), &key);
    let callback = f.server.follow_authorization(link.url()).await.unwrap();
    let completed = f.connector.complete(callback.as_str()).await.unwrap();
    assert!(completed.recovered);
    assert!(drain(&mut events)
        .iter()
        .any(|e| matches!(e, Event::Recovered { key: k, .. } if *k == key)));

    let token = f.manager.access_token(&key).await.unwrap();
    assert!(f.server.is_access_token_valid(token.secret()));
    assert_eq!(f.server.authorized_grants().len(), 2);
    assert!(!f
        .manager
        .status(&key)
        .await
        .unwrap()
        .needs_reauthorization());
}

#[tokio::test]
async fn reconnect_needs_a_stored_grant() {
    let f = fixture().await;
    let err = f
        .connector
        .reconnect_url(&TokenKey::from("nobody"))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn start_options_override_scopes_params_redirect_and_ttl() {
    let f = fixture().await;
    let options = StartOptions::new()
        .scopes(["read"])
        .param("login_hint", "u@example.com")
        .redirect_uri("http://127.0.0.1:9/other")
        .ttl(Duration::from_secs(60));
    let authorization = f
        .connector
        .start(TokenKey::from("a"), options)
        .await
        .unwrap();
    let url = authorization.url();
    assert!(
        url.contains("scope=read&") || url.ends_with("scope=read"),
        "{url}"
    );
    assert!(url.contains("login_hint=u%40example.com"), "{url}");
    let callback = f.server.follow_authorization(url).await.unwrap();
    assert!(callback.starts_with("http://127.0.0.1:9/other?"));
    // The exchange repeats the attempt's own redirect URI, or the server would refuse.
    let completed = f.connector.complete(callback.as_str()).await.unwrap();
    assert_eq!(completed.scopes.as_deref(), Some(&["read".to_owned()][..]));

    let short = f
        .connector
        .start(
            TokenKey::from("b"),
            StartOptions::new().ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let callback = f.server.follow_authorization(short.url()).await.unwrap();
    f.clock.advance(Duration::from_secs(61));
    assert!(matches!(
        f.connector.complete(callback.as_str()).await,
        Err(ConnectError::Expired { .. })
    ));
}

#[tokio::test]
async fn token_endpoint_outages_and_rate_limits_are_retryable() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let f = fixture().await;
    let token_endpoint = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_string("<html>down</html>"))
        .up_to_n_times(1)
        .mount(&token_endpoint)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "30")
                .set_body_string(r#"{"error":"slow_down"}"#),
        )
        .mount(&token_endpoint)
        .await;
    let connector = Connector::builder(
        &f.manager,
        f.server.client_id(),
        f.server.authorize_url(),
        token_endpoint.uri(),
        REDIRECT,
    )
    .client_secret(ClientSecret::new(f.server.client_secret()))
    .build()
    .unwrap();

    let mut errors = Vec::new();
    for _ in 0..2 {
        let authorization = connector
            .start(TokenKey::from("a"), StartOptions::new())
            .await
            .unwrap();
        let callback = f
            .server
            .follow_authorization(authorization.url())
            .await
            .unwrap();
        errors.push(connector.complete(callback.as_str()).await.unwrap_err());
    }
    assert!(
        matches!(
            &errors[0],
            ConnectError::Unavailable {
                status: Some(503),
                ..
            }
        ),
        "{:?}",
        errors[0]
    );
    assert!(
        matches!(&errors[1], ConnectError::RateLimited { .. }),
        "{:?}",
        errors[1]
    );
    assert_eq!(errors[1].retry_after(), Some(Duration::from_secs(30)));
    assert!(errors.iter().all(ConnectError::is_retryable));
    assert!(matches!(
        f.manager.status(&TokenKey::from("a")).await,
        Err(Error::NotFound { .. })
    ));
}
