//! Instagram Login through a `Connector` against `FakeSocialServer`: the code exchange hands
//! out a short-lived token, the connector's after-exchange step turns it into the long-lived
//! one `InstagramProvider` renews, and a grant whose owner removed the app is reconnected.
//!
//! Time is a shared `ManualClock`; the HTTP runs on real tokio time and nothing sleeps.

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{FakeSocialServer, GraphFailure, ManualClock, SocialConfig};
use tokenkeeper::{
    ClientAuth, ClientSecret, Clock, ConnectError, Connector, Error, Event, GraphTokenExchange,
    InstagramProvider, InvalidationReason, StartOptions, TokenKey, TokenManager,
};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

struct Setup {
    clock: Arc<ManualClock>,
    server: FakeSocialServer,
    manager: TokenManager,
}

async fn setup() -> Setup {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeSocialServer::start(SocialConfig::new(), clock.clone()).await;
    let provider = InstagramProvider::builder(server.refresh_url())
        .clock(clock.clone())
        .build()
        .unwrap();
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    Setup {
        clock,
        server,
        manager,
    }
}

/// A connector for Instagram Login; `exchange_secret` is the secret the after-exchange step
/// presents (`None`: no after-exchange step).
fn connector(s: &Setup, exchange_secret: Option<&str>) -> Connector {
    let mut builder = Connector::builder(
        &s.manager,
        s.server.client_id(),
        s.server.authorize_url(),
        s.server.login_token_url(),
        "http://127.0.0.1:9/callback",
    )
    .client_secret(ClientSecret::new(s.server.client_secret()))
    .client_auth(ClientAuth::RequestBody)
    .scopes(["instagram_business_basic"]);
    if let Some(secret) = exchange_secret {
        builder = builder.after_exchange(
            GraphTokenExchange::instagram(s.server.ig_exchange_url(), ClientSecret::new(secret))
                .unwrap(),
        );
    }
    builder.build().unwrap()
}

async fn connect(s: &Setup, connector: &Connector, key: &TokenKey) -> Result<(), ConnectError> {
    let authorization = connector
        .start(key.clone(), StartOptions::new())
        .await
        .unwrap();
    let callback = s
        .server
        .follow_authorization(authorization.url())
        .await
        .unwrap();
    connector.complete(callback.as_str()).await.map(|_| ())
}

#[tokio::test]
async fn the_connector_stores_the_long_lived_token_which_the_provider_then_renews() {
    let s = setup().await;
    let secret = s.server.client_secret();
    let connector = connector(&s, Some(&secret));
    let key = TokenKey::from("widget-1");
    connect(&s, &connector, &key).await.unwrap();
    assert_eq!((s.server.code_exchanges(), s.server.ig_exchanges()), (1, 1));
    let stored = s.manager.token(&key).await.unwrap();
    let now = s.clock.now();
    assert_eq!(
        stored.expires_at(),
        Some(now + 60 * DAY),
        "the long-lived one"
    );
    assert_eq!(stored.issued_at(), Some(now));

    // Past the short-lived token's hour and the 24-hour rule: renewed by presenting it.
    s.clock.advance(2 * DAY);
    let renewed = s.manager.refresh_now(&key).await.unwrap();
    assert_eq!(s.server.renewals(), 1);
    assert_ne!(renewed.access_token(), stored.access_token());
    assert!(s
        .server
        .is_access_token_valid(renewed.access_token().secret()));
}

#[tokio::test]
async fn without_the_step_the_short_lived_token_is_stored_and_dies_unrenewed() {
    let s = setup().await;
    let connector = connector(&s, None);
    let key = TokenKey::from("widget-1");
    connect(&s, &connector, &key).await.unwrap();
    assert_eq!(s.server.ig_exchanges(), 0);
    let stored = s.manager.token(&key).await.unwrap();
    assert!(s
        .server
        .is_access_token_valid(stored.access_token().secret()));
    // The code exchange does not say how long the token lives; it dies after an hour, and the
    // refresh endpoint never renews a short-lived token.
    s.clock.advance(DAY + HOUR);
    let err = s.manager.refresh_now(&key).await.unwrap_err();
    assert!(err.is_reauth_required(), "{err:?}");
    assert_eq!(s.server.renewals(), 0);
}

#[tokio::test]
async fn a_refused_after_exchange_stores_nothing() {
    let s = setup().await;
    let connector = connector(&s, Some("wrong-secret"));
    let key = TokenKey::from("widget-1");
    let err = connect(&s, &connector, &key).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::Misconfigured { key: Some(k), .. } if *k == key),
        "{err:?}"
    );
    assert!(matches!(
        s.manager.status(&key).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(s.server.ig_exchanges(), 1);
}

#[tokio::test]
async fn a_grant_whose_owner_removed_the_app_is_reconnected_and_the_old_token_stays_dead() {
    let s = setup().await;
    let secret = s.server.client_secret();
    let connector = connector(&s, Some(&secret));
    let mut events = s.manager.subscribe();
    let owner = s.server.new_user();
    s.server.sign_in(owner);
    let key = TokenKey::from("widget-1");
    connect(&s, &connector, &key).await.unwrap();
    let old = s.manager.token(&key).await.unwrap();

    s.clock.advance(2 * DAY);
    s.server.fail_user(owner, GraphFailure::AppRemoved);
    let err = s.manager.refresh_now(&key).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ReauthorizationRequired {
                reason: InvalidationReason::Revoked,
                ..
            }
        ),
        "{err:?}"
    );

    let link = connector.reconnect_url(&key).await.unwrap();
    let callback = s.server.follow_authorization(link.url()).await.unwrap();
    let done = connector.complete(callback.as_str()).await.unwrap();
    assert!(done.recovered);
    let recovered = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e, Event::Recovered { key: k, .. } if k == key));
    assert!(recovered, "no Recovered event");
    let new = s.manager.access_token(&key).await.unwrap();
    assert!(s.server.is_access_token_valid(new.secret()));
    assert!(!s.server.is_access_token_valid(old.access_token().secret()));
}

#[tokio::test]
async fn codes_are_single_use_and_bound_to_the_pkce_verifier() {
    let s = setup().await;
    let server = &s.server;
    let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"; // RFC 7636 appendix B
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let redirect = "http://app.example/cb";
    let authorize = format!(
        "{}?response_type=code&client_id={}&redirect_uri={redirect}&state=st\
         &code_challenge={challenge}&code_challenge_method=S256",
        server.authorize_url(),
        server.client_id(),
    );
    let code = |location: String| {
        let url = reqwest::Url::parse(&location).unwrap();
        let code = url.query_pairs().find(|(n, _)| n == "code").unwrap().1;
        code.into_owned()
    };
    let exchange = |code: String, verifier: &'static str| {
        let form = [
            ("client_id", server.client_id()),
            ("client_secret", server.client_secret()),
            ("grant_type", "authorization_code".to_owned()),
            ("redirect_uri", redirect.to_owned()),
            ("code", code),
            ("code_verifier", verifier.to_owned()),
        ];
        let url = server.login_token_url();
        async move {
            let reply = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(
                    form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(&form)
                        .finish(),
                )
                .send()
                .await
                .unwrap();
            let status = reply.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
            (status, body)
        }
    };

    let first = code(server.follow_authorization(&authorize).await.unwrap());
    let (status, body) = exchange(first.clone(), verifier).await;
    assert_eq!(status, 200, "{body}");
    let short = body["access_token"].as_str().unwrap().to_owned();
    assert!(server.is_access_token_valid(&short));
    assert!(body.get("expires_in").is_none(), "Instagram does not say");
    let (status, body) = exchange(first, verifier).await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (400, Some("OAuthException"))
    );

    let second = code(server.follow_authorization(&authorize).await.unwrap());
    let wrong = "x-wrong-verifier-x-wrong-verifier-x-wrong-verifier";
    let (status, _) = exchange(second.clone(), wrong).await;
    assert_eq!(status, 400);
    let (status, _) = exchange(second, verifier).await;
    assert_eq!(status, 400, "a refused code is spent");

    let plain = authorize.replace("method=S256", "method=plain");
    let location = server.follow_authorization(&plain).await.unwrap();
    assert!(location.starts_with(&format!("{redirect}?error=invalid_request")));
    assert_eq!((server.authorizations(), server.code_exchanges()), (3, 4));

    // The short-lived token lives an hour and is never renewed by the refresh endpoint.
    s.clock.advance(HOUR);
    assert!(!server.is_access_token_valid(&short));
}
