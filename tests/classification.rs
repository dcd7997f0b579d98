//! How token endpoint replies are classified, through `OAuth2Provider` (and the Xoxoday-style
//! `support::XoxodayProvider`) against a wiremock server, and what the manager does with each
//! class: dead grants are persisted and never retried, configuration faults and transient
//! failures leave the grant alive.

mod support;

use std::time::Duration;

use support::encoding::{base64, form_urlencode};
use support::harness::{json_reply, token_endpoint, Harness};
use support::{drain, XoxodayProvider};
use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    ClientAuth, ClientSecret, Clock, ConfigProblem, Error, Event, GrantHealth, InvalidationReason,
    OAuth2Provider, OAuth2ProviderBuilder, ProviderErrorKind, RefreshToken, TokenManager,
    UnavailableCause,
};
use wiremock::matchers::{body_json, body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const CLIENT_ID: &str = "my client/1";
const CLIENT_SECRET: &str = "s3cr3t/+:&= ü";
const OLD_RT: &str = "rt/old+0001";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn oauth2(url: &str) -> OAuth2ProviderBuilder {
    OAuth2Provider::builder(CLIENT_ID, url).client_secret(ClientSecret::new(CLIENT_SECRET))
}

/// A server answering every POST /token with `reply`, and a harness whose standard provider
/// (Basic client auth) points at it.
async fn standard(reply: ResponseTemplate) -> (MockServer, Harness) {
    let server = token_endpoint(vec![reply]).await;
    let provider = oauth2(&format!("{}/token", server.uri()))
        .build()
        .expect("provider");
    let harness = Harness::new(provider, OLD_RT).await;
    (server, harness)
}

async fn requests(server: &MockServer) -> Vec<wiremock::Request> {
    server.received_requests().await.expect("recording is on")
}

#[test]
fn helpers_encode_like_the_rfcs() {
    assert_eq!(
        base64(b"Aladdin:open sesame"),
        "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(
        form_urlencode("a b/+:&=ü*-._"),
        "a+b%2F%2B%3A%26%3D%C3%BC*-._"
    );
}

// ---------------------------------------------------------------------------------------------
// invalid_grant: the grant is dead, persisted, and never retried
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_grant_marks_the_grant_dead_once() {
    let (server, h) = standard(json_reply(
        400,
        r#"{"error":"invalid_grant","error_description":"The refresh token is invalid or expired."}"#,
    ))
    .await;
    let mut events = h.manager.subscribe();

    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ReauthorizationRequired { key, reason: InvalidationReason::InvalidGrant }
                if *key == h.key
        ),
        "{err:?}"
    );
    assert!(err.is_reauth_required());
    assert!(!err.is_retryable());
    assert_eq!(err.retry_after(), None);
    let failure = h.provider_failure();
    assert_eq!(
        failure.kind(),
        &ProviderErrorKind::Reauthorize(InvalidationReason::InvalidGrant)
    );
    assert_eq!(failure.status(), Some(400));

    // Persisted dead.
    let status = h.manager.status(&h.key).await.expect("status");
    assert!(
        matches!(
            &status.health,
            GrantHealth::ReauthorizationRequired {
                reason: InvalidationReason::InvalidGrant,
                since: Some(t),
            } if *t == h.clock.now()
        ),
        "{status:?}"
    );
    assert!(status.needs_reauthorization());
    assert_eq!(status.next_refresh, None);
    assert_eq!(
        h.manager.reauthorization_required().await.expect("list"),
        vec![(h.key.clone(), InvalidationReason::InvalidGrant)]
    );

    // A second call (even much later) answers from the persisted state without the provider.
    h.clock.advance(Duration::from_secs(3600));
    let again = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(
            &again,
            Error::ReauthorizationRequired {
                reason: InvalidationReason::InvalidGrant,
                ..
            }
        ),
        "{again:?}"
    );
    let forced = h.manager.refresh_now(&h.key).await.unwrap_err();
    assert!(forced.is_reauth_required(), "{forced:?}");
    assert_eq!(requests(&server).await.len(), 1);
    assert_eq!(h.calls(), 1);

    // Exactly one ReauthorizationRequired event, for this key and reason.
    let dead_events: Vec<_> = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::ReauthorizationRequired { .. }))
        .collect();
    assert_eq!(dead_events.len(), 1, "{dead_events:?}");
    assert!(matches!(
        &dead_events[0],
        Event::ReauthorizationRequired { key, reason: InvalidationReason::InvalidGrant, .. }
            if *key == h.key
    ));
}

// ---------------------------------------------------------------------------------------------
// Configuration faults: Misconfigured, the grant stays alive
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_configuration_faults_are_misconfigured_and_keep_the_grant() {
    let cases = [
        (400, "invalid_client", ConfigProblem::InvalidClient),
        (401, "invalid_client", ConfigProblem::InvalidClient),
        (
            400,
            "unauthorized_client",
            ConfigProblem::UnauthorizedClient,
        ),
        (
            400,
            "unsupported_grant_type",
            ConfigProblem::UnsupportedGrantType,
        ),
        (400, "invalid_scope", ConfigProblem::InvalidScope),
    ];
    for (code, error, problem) in cases {
        let body = format!(r#"{{"error":"{error}","error_description":"nope"}}"#);
        let (_server, h) = standard(json_reply(code, &body)).await;
        let mut events = h.manager.subscribe();

        let err = h.manager.access_token(&h.key).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Misconfigured { key: Some(k), problem: p, status: Some(s), .. }
                    if *k == h.key && *p == problem && *s == code
            ),
            "{code} {error}: {err:?}"
        );
        assert!(!err.is_retryable(), "{code} {error}");
        assert!(!err.is_reauth_required(), "{code} {error}");
        let failure = h.provider_failure();
        assert_eq!(
            failure.kind(),
            &ProviderErrorKind::Misconfigured(problem.clone())
        );
        assert_eq!(failure.status(), Some(code));

        h.assert_intact(&format!("{code} {error}")).await;
        assert!(
            !drain(&mut events)
                .iter()
                .any(|e| matches!(e, Event::ReauthorizationRequired { .. })),
            "{code} {error}"
        );
    }
}

/// A redirect is a wrong token URL (http for https, a moved endpoint): a developer must fix
/// it. Retrying it forever never helps, and following it re-sends the refresh token and
/// client secret to wherever it points.
#[tokio::test]
async fn a_redirect_from_the_token_endpoint_is_misconfigured() {
    for status in [301, 302, 303, 307, 308] {
        let moved = ResponseTemplate::new(status).insert_header("location", "/oauth2/v2/token");
        let (server, h) = standard(moved).await;
        let err = h.manager.access_token(&h.key).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Misconfigured { problem: ConfigProblem::Endpoint, status: Some(s), .. }
                    if *s == status
            ),
            "{status}: {err:?}"
        );
        assert!(!err.is_retryable(), "{status}");
        h.assert_intact(&format!("{status}")).await;
        // Not followed: only the one POST to /token.
        assert_eq!(requests(&server).await.len(), 1, "{status}");
    }
}

/// With a caller-supplied HTTP client that follows redirects, the followed reply is still a
/// configuration fault; a refresh token it rotated to travels with the error.
#[tokio::test]
async fn a_followed_redirect_is_misconfigured_and_keeps_the_rotated_refresh_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(307).insert_header("location", "/v2/token"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v2/token"))
        .respond_with(json_reply(
            200,
            r#"{"access_token":"at-new","refresh_token":"rt-new","expires_in":3600}"#,
        ))
        .mount(&server)
        .await;
    let provider = oauth2(&format!("{}/token", server.uri()))
        .http_client(reqwest::Client::new())
        .build()
        .expect("provider");
    let h = Harness::new(provider, OLD_RT).await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Misconfigured {
                problem: ConfigProblem::Endpoint,
                ..
            }
        ),
        "{err:?}"
    );
    let failure = h.provider_failure();
    assert_eq!(
        failure.rotated_refresh_token().map(RefreshToken::secret),
        Some("rt-new")
    );
}

// ---------------------------------------------------------------------------------------------
// Only a human can help: interaction, login, consent, access denied
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn codes_that_need_the_user_mark_the_grant_dead() {
    for code in [
        "interaction_required",
        "login_required",
        "consent_required",
        "access_denied",
    ] {
        let body = format!(r#"{{"error":"{code}","error_description":"ask the user"}}"#);
        let (server, h) = standard(json_reply(400, &body)).await;
        let err = h.manager.access_token(&h.key).await.unwrap_err();
        let want = InvalidationReason::Provider {
            code: code.to_owned(),
        };
        assert!(
            matches!(&err, Error::ReauthorizationRequired { reason, .. } if *reason == want),
            "{code}: {err:?}"
        );
        assert_eq!(
            h.provider_failure().kind(),
            &ProviderErrorKind::Reauthorize(want.clone())
        );
        // Persisted as dead: never sent again.
        h.clock.advance(Duration::from_secs(3600));
        assert!(h
            .manager
            .access_token(&h.key)
            .await
            .unwrap_err()
            .is_reauth_required());
        assert_eq!(requests(&server).await.len(), 1, "{code}");
        assert_eq!(
            h.manager.reauthorization_required().await.expect("list"),
            vec![(h.key.clone(), want)]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rate_limit_with_retry_after_seconds() {
    let (_server, h) = standard(
        json_reply(
            429,
            r#"{"error_key":"throttled","error_message":"Too Many Requests"}"#,
        )
        .insert_header("retry-after", "120"),
    )
    .await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(&err, Error::RateLimited { key, retry_after: Some(d) }
            if *key == h.key && *d == Duration::from_secs(120)),
        "{err:?}"
    );
    assert!(err.is_retryable() && !err.is_reauth_required());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
    assert_eq!(
        h.provider_failure().kind(),
        &ProviderErrorKind::RateLimited {
            retry_after: Some(Duration::from_secs(120))
        }
    );
    let status = h.manager.status(&h.key).await.expect("status");
    assert_eq!(
        status.health,
        GrantHealth::BackingOff {
            until: h.clock.now() + Duration::from_secs(120)
        }
    );
    h.assert_intact("429 with Retry-After seconds").await;
}

#[tokio::test]
async fn rate_limit_with_retry_after_http_date() {
    let clock_now = ManualClock::fixed().now();
    let date = httpdate::fmt_http_date(clock_now + Duration::from_secs(300));
    assert_eq!(date, "Thu, 01 Jan 2026 00:05:00 GMT");
    let (_server, h) =
        standard(json_reply(429, "{}").insert_header("retry-after", date.as_str())).await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(&err, Error::RateLimited { retry_after: Some(d), .. } if *d == Duration::from_secs(300)),
        "{err:?}"
    );
    assert_eq!(
        h.provider_failure().kind(),
        &ProviderErrorKind::RateLimited {
            retry_after: Some(Duration::from_secs(300))
        }
    );
    h.assert_intact("429 with Retry-After date").await;
}

#[tokio::test]
async fn rate_limit_without_retry_after_gets_the_managers_backoff() {
    let (_server, h) = standard(json_reply(
        429,
        r#"{"error_key":"quota_exceeded","error_message":"Limit Exceeded"}"#,
    ))
    .await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(&err, Error::RateLimited { retry_after: Some(d), .. } if *d > Duration::ZERO),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        h.provider_failure().kind(),
        &ProviderErrorKind::RateLimited { retry_after: None }
    );
    // The backoff holds: no second request while it lasts.
    let again = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(matches!(&again, Error::RateLimited { .. }), "{again:?}");
    assert_eq!(h.calls(), 1);
    h.assert_intact("429 without Retry-After").await;
}

// ---------------------------------------------------------------------------------------------
// Transient failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_errors_are_unavailable() {
    let cases = [
        (500, ResponseTemplate::new(500), None),
        (
            502,
            ResponseTemplate::new(502).set_body_raw(
                b"<html><body>502 Bad Gateway</body></html>".to_vec(),
                "text/html",
            ),
            None,
        ),
        (
            503,
            json_reply(503, r#"{"error":"temporarily_unavailable"}"#)
                .insert_header("retry-after", "30"),
            Some(Duration::from_secs(30)),
        ),
    ];
    for (code, reply, hint) in cases {
        let (_server, h) = standard(reply).await;
        let err = h.manager.access_token(&h.key).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Unavailable { key, cause: UnavailableCause::ServerError, status: Some(s), .. }
                    if *key == h.key && *s == code
            ),
            "{code}: {err:?}"
        );
        assert!(err.is_retryable() && !err.is_reauth_required(), "{code}");
        let after = err.retry_after().expect("the backoff is reported");
        assert!(after > Duration::ZERO, "{code}");
        if let Some(hint) = hint {
            assert!(after >= hint, "{code}: {after:?}");
        }
        let failure = h.provider_failure();
        assert_eq!(
            failure.kind(),
            &ProviderErrorKind::Unavailable {
                cause: UnavailableCause::ServerError,
                retry_after: hint
            },
            "{code}"
        );
        assert_eq!(failure.status(), Some(code));
        h.assert_intact(&code.to_string()).await;
    }
}

/// Refreshes through `provider`, which gets no HTTP reply, and checks the transient failure:
/// `cause`, no status, the grant kept.
async fn assert_unavailable_without_reply(provider: OAuth2Provider, cause: UnavailableCause) {
    let h = Harness::new(provider, OLD_RT).await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Unavailable {
                cause: c,
                status: None,
                ..
            } if *c == cause
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        h.provider_failure().kind(),
        &ProviderErrorKind::Unavailable {
            cause: cause.clone(),
            retry_after: None
        }
    );
    h.assert_intact(&format!("{cause:?}")).await;
}

#[tokio::test]
async fn timeout_is_unavailable_timeout() {
    let server = token_endpoint(vec![json_reply(
        200,
        r#"{"access_token":"late","expires_in":3600}"#,
    )
    .set_delay(Duration::from_secs(5))])
    .await;
    let provider = oauth2(&format!("{}/token", server.uri()))
        .timeout(Some(Duration::from_millis(200)))
        .build()
        .expect("provider");
    assert_unavailable_without_reply(provider, UnavailableCause::Timeout).await;
}

#[tokio::test]
async fn connection_refused_is_unavailable_connect() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let provider = oauth2(&format!("http://127.0.0.1:{port}/token"))
        .timeout(Some(Duration::from_secs(5)))
        .build()
        .expect("provider");
    assert_unavailable_without_reply(provider, UnavailableCause::Connect).await;
}

// ---------------------------------------------------------------------------------------------
// The request: client authentication, scopes, extra parameters
// ---------------------------------------------------------------------------------------------

const SUCCESS: &str = r#"{"token_type":"Bearer","expires_in":86400,"access_token":"at-new-0002","scope":"offline_access contacts","refresh_token":"rt-new-0002"}"#;

#[tokio::test]
async fn basic_client_auth_sends_urlencoded_credentials_in_the_header() {
    let credentials = format!(
        "{}:{}",
        form_urlencode(CLIENT_ID),
        form_urlencode(CLIENT_SECRET)
    );
    let authorization = format!("Basic {}", base64(credentials.as_bytes()));
    let expected_body = format!(
        "grant_type=refresh_token&refresh_token={}&scope=offline_access+contacts&audience=api%3A%2F%2Fcc",
        form_urlencode(OLD_RT)
    );
    let server = MockServer::start().await;
    // Only a request with exactly this header and body gets a token; anything else is a 404,
    // which would fail the refresh.
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(header("authorization", authorization.as_str()))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string_contains(
            "grant_type=refresh_token&refresh_token=",
        ))
        .respond_with(json_reply(200, SUCCESS))
        .expect(1)
        .mount(&server)
        .await;
    let provider = oauth2(&format!("{}/token", server.uri()))
        .client_auth(ClientAuth::Basic)
        .scopes(["offline_access", "contacts"])
        .extra_param("audience", "api://cc")
        .build()
        .expect("provider");
    let h = Harness::new(provider, OLD_RT).await;
    let token = h.manager.access_token(&h.key).await.expect("refreshed");
    assert_eq!(token.secret(), "at-new-0002");

    let received = requests(&server).await;
    assert_eq!(received.len(), 1);
    let body = String::from_utf8(received[0].body.clone()).expect("utf-8 body");
    assert_eq!(body, expected_body);
    assert!(
        !body.contains("client_secret") && !body.contains("client_id"),
        "{body}"
    );
}

#[tokio::test]
async fn request_body_client_auth_sends_credentials_in_the_form() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains(format!(
            "client_id={}",
            form_urlencode(CLIENT_ID)
        )))
        .and(body_string_contains(format!(
            "client_secret={}",
            form_urlencode(CLIENT_SECRET)
        )))
        .respond_with(json_reply(200, SUCCESS))
        .expect(1)
        .mount(&server)
        .await;
    let provider = oauth2(&format!("{}/token", server.uri()))
        .client_auth(ClientAuth::RequestBody)
        .scopes(["offline_access"])
        .extra_param("resource", "contacts")
        .build()
        .expect("provider");
    let h = Harness::new(provider, OLD_RT).await;
    let token = h.manager.access_token(&h.key).await.expect("refreshed");
    assert_eq!(token.secret(), "at-new-0002");

    let received = requests(&server).await;
    assert_eq!(received.len(), 1);
    assert!(received[0].headers.get("authorization").is_none());
    let body = String::from_utf8(received[0].body.clone()).expect("utf-8 body");
    let mut pairs: Vec<&str> = body.split('&').collect();
    pairs.sort_unstable();
    let rt = format!("refresh_token={}", form_urlencode(OLD_RT));
    let id = format!("client_id={}", form_urlencode(CLIENT_ID));
    let secret = format!("client_secret={}", form_urlencode(CLIENT_SECRET));
    let mut want = vec![
        "grant_type=refresh_token",
        rt.as_str(),
        "scope=offline_access",
        id.as_str(),
        secret.as_str(),
        "resource=contacts",
    ];
    want.sort_unstable();
    assert_eq!(pairs, want);
}

// ---------------------------------------------------------------------------------------------
// Success: Constant Contact-style rotation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn constant_contact_success_rotates_and_persists() {
    let (server, h) = standard(json_reply(200, SUCCESS)).await;
    let mut events = h.manager.subscribe();
    let now = h.clock.now();

    let token = h.manager.access_token(&h.key).await.expect("refreshed");
    assert_eq!(token.secret(), "at-new-0002");
    let set = h.manager.token(&h.key).await.expect("token set");
    assert_eq!(set.access_token().secret(), "at-new-0002");
    assert_eq!(
        set.refresh_token().map(RefreshToken::secret),
        Some("rt-new-0002")
    );
    assert_eq!(set.expires_at(), Some(now + Duration::from_secs(86400)));
    assert_eq!(set.token_type(), "Bearer");
    assert_eq!(
        set.scopes(),
        Some(&["offline_access".to_owned(), "contacts".to_owned()][..])
    );

    // Saved: the store holds the rotated refresh token.
    let record = h.stored().await;
    assert_eq!(
        record.tokens().refresh_token().map(RefreshToken::secret),
        Some("rt-new-0002")
    );
    assert_eq!(record.tokens().access_token().secret(), "at-new-0002");
    let status = h.manager.status(&h.key).await.expect("status");
    assert_eq!(status.health, GrantHealth::Active);
    assert_eq!(
        status.access_expires_at,
        Some(now + Duration::from_secs(86400))
    );
    assert_eq!(status.last_refresh, Some(now));
    assert_eq!(status.failures, 0);

    // A second manager on the same store serves the new token without calling anyone.
    let peer = TokenManager::builder(
        oauth2("http://127.0.0.1:9/never")
            .build()
            .expect("provider"),
    )
    .clock(h.clock.clone())
    .store(h.store.clone())
    .build();
    assert_eq!(
        peer.access_token(&h.key).await.expect("peer").secret(),
        "at-new-0002"
    );
    assert_eq!(requests(&server).await.len(), 1);

    let events = drain(&mut events);
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Refreshed { key, rotated: true, expires_at: Some(at), .. }
                if *key == h.key && *at == now + Duration::from_secs(86400)
        )),
        "{events:?}"
    );

    // The next refresh sends the rotated refresh token.
    h.clock.advance(Duration::from_secs(86400));
    h.manager
        .access_token(&h.key)
        .await
        .expect("second refresh");
    let received = requests(&server).await;
    assert_eq!(received.len(), 2);
    let body = String::from_utf8(received[1].body.clone()).expect("utf-8");
    assert!(body.contains("refresh_token=rt-new-0002"), "{body}");
}

#[tokio::test]
async fn success_without_refresh_token_keeps_the_old_one() {
    let (_server, h) = standard(json_reply(
        200,
        r#"{"token_type":"Bearer","expires_in":86400,"access_token":"at-new-0003"}"#,
    ))
    .await;
    let mut events = h.manager.subscribe();
    let token = h.manager.access_token(&h.key).await.expect("refreshed");
    assert_eq!(token.secret(), "at-new-0003");
    let record = h.stored().await;
    assert_eq!(record.tokens().access_token().secret(), "at-new-0003");
    assert_eq!(
        record.tokens().refresh_token().map(RefreshToken::secret),
        Some(OLD_RT)
    );
    assert!(drain(&mut events)
        .iter()
        .any(|e| matches!(e, Event::Refreshed { rotated: false, .. })));
}

// ---------------------------------------------------------------------------------------------
// Xoxoday-style: the custom JSON provider (`support::XoxodayProvider`), Xoxoday classifier
// ---------------------------------------------------------------------------------------------

async fn xoxoday(reply: ResponseTemplate) -> (MockServer, Harness) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/chef/v1/oauth/token/user"))
        .and(header("content-type", "application/json"))
        .and(body_json(serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": OLD_RT,
            "client_id": "xoxo-client",
            "client_secret": "xoxo-secret",
        })))
        .respond_with(reply)
        .mount(&server)
        .await;
    let provider = XoxodayProvider::with_endpoint(
        format!("{}/chef/v1/oauth/token/user", server.uri()),
        "xoxo-client",
        "xoxo-secret",
    )
    .with_timeout(Duration::from_secs(10));
    let harness = Harness::new(provider, OLD_RT).await;
    (server, harness)
}

#[tokio::test]
async fn xoxoday_success_parses_epoch_millisecond_expiries() {
    let now = ManualClock::fixed().now();
    let secs =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let access_at = now + Duration::from_secs(15 * 86400);
    let refresh_at = now + Duration::from_secs(30 * 86400);
    // Expiries as epoch-millisecond strings, no `expires_in`: the absolute expiry is used.
    let body = format!(
        r#"{{"access_token":"xo-at-1","token_type":"bearer","refresh_token":"xo-rt-1","access_token_expiry":"{}000","refresh_token_expiry":"{}000"}}"#,
        secs(access_at),
        secs(refresh_at)
    );
    let (server, h) = xoxoday(json_reply(200, &body)).await;
    let token = h.manager.access_token(&h.key).await.expect("refreshed");
    assert_eq!(token.secret(), "xo-at-1");
    let set = h.manager.token(&h.key).await.expect("set");
    assert_eq!(set.expires_at(), Some(access_at));
    assert_eq!(set.refresh_expires_at(), Some(refresh_at));
    assert_eq!(
        set.refresh_token().map(RefreshToken::secret),
        Some("xo-rt-1")
    );
    let record = h.stored().await;
    assert_eq!(
        record.tokens().refresh_token().map(RefreshToken::secret),
        Some("xo-rt-1")
    );
    assert_eq!(record.tokens().refresh_expires_at(), Some(refresh_at));
    assert_eq!(requests(&server).await.len(), 1);
}

#[tokio::test]
async fn xoxoday_documented_success_body() {
    // The documented shape: `expires_in` (relative) and epoch-ms strings together.
    let (_server, h) = xoxoday(json_reply(
        200,
        r#"{"access_token":"xo-at-2","token_type":"bearer","expires_in":1296000,"refresh_token":"xo-rt-2","access_token_expiry":"1718000000000","refresh_token_expiry":"1790000000000"}"#,
    ))
    .await;
    let now = h.clock.now();
    h.manager.access_token(&h.key).await.expect("refreshed");
    let set = h.manager.token(&h.key).await.expect("set");
    assert_eq!(set.expires_at(), Some(now + Duration::from_secs(1_296_000)));
    assert_eq!(
        set.refresh_expires_at(),
        Some(std::time::UNIX_EPOCH + Duration::from_secs(1_790_000_000))
    );
}

#[tokio::test]
async fn xoxoday_password_reset_needs_reauthorization() {
    let (server, h) = xoxoday(json_reply(
        401,
        r#"{"success":0,"error_message_id":"auth.token_error"}"#,
    ))
    .await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ReauthorizationRequired {
                reason: InvalidationReason::PasswordChanged,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        h.manager.reauthorization_required().await.expect("list"),
        vec![(h.key.clone(), InvalidationReason::PasswordChanged)]
    );
    let again = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(again.is_reauth_required());
    assert_eq!(requests(&server).await.len(), 1);
}

#[tokio::test]
async fn xoxoday_new_token_elsewhere_is_superseded() {
    let (_server, h) = xoxoday(json_reply(
        401,
        r#"{"error":"invalid_token","error_description":"invalid/expired token"}"#,
    ))
    .await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ReauthorizationRequired {
                reason: InvalidationReason::Superseded,
                ..
            }
        ),
        "{err:?}"
    );
    let status = h.manager.status(&h.key).await.expect("status");
    assert!(matches!(
        status.health,
        GrantHealth::ReauthorizationRequired {
            reason: InvalidationReason::Superseded,
            ..
        }
    ));
}

#[tokio::test]
async fn xoxoday_unusual_refresh_volume_is_rate_limited() {
    let (_server, h) = xoxoday(json_reply(
        429,
        r#"{"message":"auth.request_limit_exceeded"}"#,
    ))
    .await;
    let err = h.manager.access_token(&h.key).await.unwrap_err();
    assert!(
        matches!(&err, Error::RateLimited { retry_after: Some(d), .. } if *d > Duration::ZERO),
        "{err:?}"
    );
    assert_eq!(
        h.provider_failure().kind(),
        &ProviderErrorKind::RateLimited { retry_after: None }
    );
    h.assert_intact("Xoxoday 429").await;
}
