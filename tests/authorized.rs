//! Authorized HTTP: bearer tokens, one refresh-and-retry per rejected token generation,
//! provider-specific rejection styles, and failover across grants.
//!
//! Real HTTP on loopback (the fake authorization server's protected resource, or a wiremock
//! API): real tokio time, simulated provider time through the shared `ManualClock`, no sleeps.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{FakeAuthServer, FakeConfig, IssuedGrant, ManualClock};
use tokenkeeper::{
    AuthorizedClient, Clock, Error, Event, InvalidationReason, Rejection, RequestError, TokenKey,
    TokenManager,
};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// One client to build requests with (building a client per request is slow).
fn plain() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new).clone()
}

/// A protected API on loopback that holds every request carrying `old` until `n` of them have
/// arrived, then rejects them all (RFC 6750 `invalid_token`); any other token is accepted if
/// the fake authorization server says it is valid. This makes "n requests in flight with the
/// same stale token" exact, with no timing involved.
async fn gated_api(server: Arc<FakeAuthServer>, old: String, n: usize) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let (server, old, barrier) = (server.clone(), old.clone(), barrier.clone());
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut token = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(value) = line.strip_prefix("authorization: Bearer ") {
                        token = value.trim().to_owned();
                    }
                    if !line.is_empty() {
                        continue;
                    }
                    let reply = if token == old {
                        barrier.wait().await;
                        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer error=\"invalid_token\"\r\ncontent-length: 0\r\n\r\n"
                    } else if server.is_access_token_valid(&token) {
                        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    token.clear();
                }
            });
        }
    });
    url
}

/// A wiremock API that rejects every GET with 401 and RFC 6750 `invalid_token`.
async fn api_rejecting_every_token() -> MockServer {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(401)
                .insert_header("www-authenticate", r#"Bearer error="invalid_token""#),
        )
        .mount(&api)
        .await;
    api
}

struct World {
    clock: Arc<ManualClock>,
    server: FakeAuthServer,
    manager: TokenManager,
}

async fn world(config: FakeConfig) -> World {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(config, clock.clone()).await;
    let provider: Box<dyn tokenkeeper::Provider> = match server.config().preset() {
        tokenkeeper::testing::Preset::Xoxoday => Box::new(support::XoxodayProvider::new(&server)),
        _ => Box::new(support::oauth2_provider(&server)),
    };
    let manager = TokenManager::builder(BoxProvider(provider))
        .clock(clock.clone())
        .event_capacity(10_000)
        .build();
    World {
        clock,
        server,
        manager,
    }
}

struct BoxProvider(Box<dyn tokenkeeper::Provider>);

#[async_trait::async_trait]
impl tokenkeeper::Provider for BoxProvider {
    async fn refresh(
        &self,
        request: tokenkeeper::RefreshRequest<'_>,
    ) -> Result<tokenkeeper::TokenResponse, tokenkeeper::ProviderError> {
        self.0.refresh(request).await
    }
}

impl World {
    /// A grant whose access token the app believes valid for 30 days, while the server lets it
    /// expire on its own schedule: the API's 401 is the first sign.
    async fn grant_the_api_will_reject(&self, key: &str) -> TokenKey {
        let key = TokenKey::from(key);
        let issued = self.server.issue_grant();
        let tokens = support::tokens(&issued).with_expires_at(self.clock.now() + 30 * DAY);
        self.manager.insert(key.clone(), tokens).await.unwrap();
        key
    }

    /// A grant the server issues, inserted under `key` as issued.
    async fn insert_issued_grant(&self, key: &TokenKey) -> IssuedGrant {
        let issued = self.server.issue_grant();
        self.manager
            .insert(key.clone(), support::tokens(&issued))
            .await
            .unwrap();
        issued
    }

    fn get(&self, url: &str) -> reqwest::Request {
        plain().get(url).build().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_requests_rejected_with_one_token_cause_one_refresh() {
    let w = world(FakeConfig::standard()).await;
    let key = w.grant_the_api_will_reject("acct").await;
    let old = w.manager.access_token(&key).await.unwrap();
    let server = Arc::new(w.server);
    let api = gated_api(server.clone(), old.secret().to_owned(), 100).await;
    let client = AuthorizedClient::new(plain(), w.manager.clone());
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (client, key) = (client.clone(), key.clone());
            let request = plain().get(&api).build().unwrap();
            tokio::spawn(async move { client.send(&key, request).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(
        server.refresh_calls(),
        1,
        "100 rejections of one token: one refresh"
    );
}

#[tokio::test]
async fn a_rejection_on_the_retry_is_a_typed_error_and_no_loop() {
    let w = world(FakeConfig::standard()).await;
    let key = w.grant_the_api_will_reject("acct").await;
    let api = api_rejecting_every_token().await;
    let client = AuthorizedClient::new(plain(), w.manager.clone());
    let err = client.send(&key, w.get(&api.uri())).await.unwrap_err();
    assert!(
        matches!(err, RequestError::Rejected { status: 401, .. }),
        "{err:?}"
    );
    assert_eq!(api.received_requests().await.unwrap().len(), 2);
    assert_eq!(w.server.refresh_calls(), 1);
    // The next request with the same (refreshed, still rejected) token does not refresh again.
    let err = client.send(&key, w.get(&api.uri())).await.unwrap_err();
    assert!(matches!(err, RequestError::Rejected { .. }));
    assert_eq!(api.received_requests().await.unwrap().len(), 3);
    assert_eq!(w.server.refresh_calls(), 1);
}

/// A wiremock API that rejects (RFC 6750 `invalid_token`) the next `blips` requests whatever
/// their token, then accepts exactly the tokens the fake authorization server says are valid.
async fn api_with_blips(server: Arc<FakeAuthServer>, blips: usize) -> MockServer {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let blips = AtomicUsize::new(blips);
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(move |request: &wiremock::Request| {
            let token = request
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            let blip = blips
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if !blip && server.is_access_token_valid(token) {
                ResponseTemplate::new(200)
            } else {
                ResponseTemplate::new(401)
                    .insert_header("www-authenticate", r#"Bearer error="invalid_token""#)
            }
        })
        .mount(&api)
        .await;
    api
}

#[tokio::test]
async fn a_transient_rejection_after_a_refresh_does_not_disable_later_refreshes() {
    let w = world(FakeConfig::standard()).await;
    let key = TokenKey::from("acct");
    let issued = w.insert_issued_grant(&key).await;
    let (manager, server) = (w.manager, Arc::new(w.server));
    // The API blips twice: the first token and the freshly refreshed one are both rejected.
    let api = api_with_blips(server.clone(), 2).await;
    let client = AuthorizedClient::new(plain(), manager.clone());
    let get = || plain().get(api.uri()).build().unwrap();
    let err = client.send(&key, get()).await.unwrap_err();
    assert!(matches!(err, RequestError::Rejected { .. }), "{err:?}");
    assert_eq!(server.refresh_calls(), 1);
    // The blip is over: the refreshed token works.
    assert_eq!(client.send(&key, get()).await.unwrap().status(), 200);
    // Then the user really revokes the app. The rejection must lead to a refresh, which finds
    // the grant dead, instead of "rejected again" until the token expires weeks later.
    server.revoke(&issued.grant);
    let err = client.send(&key, get()).await.unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::Token(Error::ReauthorizationRequired {
                reason: InvalidationReason::InvalidGrant,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(server.refresh_calls(), 2);
}

#[tokio::test]
async fn a_new_token_generation_is_refreshed_on_rejection_even_after_a_stuck_one() {
    let w = world(FakeConfig::standard()).await;
    let key = TokenKey::from("acct");
    w.insert_issued_grant(&key).await;
    let (manager, server) = (w.manager, Arc::new(w.server));
    let api = api_with_blips(server.clone(), 2).await;
    let client = AuthorizedClient::new(plain(), manager.clone());
    let get = || plain().get(api.uri()).build().unwrap();
    client.send(&key, get()).await.unwrap_err();
    assert_eq!(server.refresh_calls(), 1);
    // Another generation comes along (the refresher, another process…); the API rejects it
    // once: that generation gets its own refresh and retry.
    manager.refresh_now(&key).await.unwrap();
    assert_eq!(server.refresh_calls(), 2);
    let api = api_with_blips(server.clone(), 1).await;
    let response = client
        .send(&key, plain().get(api.uri()).build().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(server.refresh_calls(), 3);
}

#[tokio::test]
async fn constant_contact_style_401_body_needs_its_policy() {
    let w = world(FakeConfig::constant_contact()).await;
    let key = w.grant_the_api_will_reject("site").await;
    w.clock.advance(2 * DAY);
    // Its 401 carries `WWW-Authenticate: Bearer realm=…` without an error code: strict RFC 6750
    // does not treat it as a rejected token.
    let strict = AuthorizedClient::new(plain(), w.manager.clone());
    let response = strict.send(&key, w.get(&w.server.api_url())).await.unwrap();
    assert_eq!(response.status(), 401);
    let body = response.text().await.unwrap();
    assert_eq!(
        body,
        r#"{"error_key":"unauthorized","error_message":"Unauthorized"}"#
    );
    assert_eq!(w.server.refresh_calls(), 0);

    let cc = strict.clone().rejection(Rejection::constant_contact());
    assert_eq!(
        cc.send(&key, w.get(&w.server.api_url()))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(w.server.refresh_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xoxoday_style_any_4xx_refreshes_once_per_token_generation() {
    let w = world(FakeConfig::xoxoday()).await;
    let key = w.grant_the_api_will_reject("shop").await;
    w.clock.advance(16 * DAY);
    let client = AuthorizedClient::new(plain(), w.manager.clone()).rejection(Rejection::any_4xx());
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (client, key, request) = (client.clone(), key.clone(), w.get(&w.server.api_url()));
            tokio::spawn(async move { client.send(&key, request).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(w.server.refresh_calls(), 1);
}

#[tokio::test]
async fn insufficient_scope_and_rate_limits_are_not_refresh_cases() {
    let w = world(FakeConfig::standard()).await;
    let key = w.grant_the_api_will_reject("acct").await;
    let api = MockServer::start().await;
    Mock::given(path("/scope"))
        .respond_with(ResponseTemplate::new(403).insert_header(
            "www-authenticate",
            r#"Bearer error="insufficient_scope", scope="contacts:write""#,
        ))
        .mount(&api)
        .await;
    Mock::given(path("/busy"))
        .respond_with(ResponseTemplate::new(429))
        .mount(&api)
        .await;
    let client = AuthorizedClient::new(plain(), w.manager.clone()).rejection(Rejection::any_4xx());
    for (route, status) in [("/scope", 403), ("/busy", 429)] {
        let url = format!("{}{route}", api.uri());
        assert_eq!(
            client.send(&key, w.get(&url)).await.unwrap().status(),
            status
        );
    }
    assert_eq!(w.server.refresh_calls(), 0);
    assert_eq!(api.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_request_that_cannot_be_cloned_is_not_retried_but_the_grant_is_refreshed() {
    let w = world(FakeConfig::standard()).await;
    let key = w.grant_the_api_will_reject("acct").await;
    let old = w.manager.access_token(&key).await.unwrap();
    w.clock.advance(2 * DAY);
    let body = reqwest::Body::wrap(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
    let request = plain().post(w.server.api_url()).body(body).build().unwrap();
    assert!(request.try_clone().is_none());
    let client = AuthorizedClient::new(plain(), w.manager.clone());
    let response = client.send(&key, request).await.unwrap();
    assert_eq!(response.status(), 401, "the caller gets the rejection");
    assert_eq!(w.server.api_calls(), 1);
    assert_eq!(w.server.refresh_calls(), 1);
    let new = w.manager.access_token(&key).await.unwrap();
    assert_ne!(new, old);
    assert!(w.server.is_access_token_valid(new.secret()));
}

#[tokio::test]
async fn a_dead_grant_is_a_typed_error() {
    let w = world(FakeConfig::standard()).await;
    let key = TokenKey::from("acct");
    let issued = w.insert_issued_grant(&key).await;
    // The user revokes the app: the API rejects the token, and the refresh finds the grant dead.
    w.server.revoke(&issued.grant);
    let client = AuthorizedClient::new(plain(), w.manager.clone());
    let err = client
        .send(&key, w.get(&w.server.api_url()))
        .await
        .unwrap_err();
    assert!(err.is_reauth_required(), "{err:?}");
    assert!(matches!(
        err,
        RequestError::Token(Error::ReauthorizationRequired {
            reason: InvalidationReason::InvalidGrant,
            ..
        })
    ));
    assert_eq!(w.server.refresh_calls(), 1);
}

#[tokio::test]
async fn failover_skips_a_revoked_grant_and_reports_it() {
    let w = world(FakeConfig::standard()).await;
    let mut events = w.manager.subscribe();
    let (first, second) = (TokenKey::from("admin-alice"), TokenKey::from("admin-bob"));
    let alice = w.insert_issued_grant(&first).await;
    let bob = w.insert_issued_grant(&second).await;
    w.server.revoke(&alice.grant);

    let client = AuthorizedClient::new(plain(), w.manager.clone());
    let group = [first.clone(), second.clone()];
    let (used, response) = client
        .send_any(&group, w.get(&w.server.api_url()))
        .await
        .unwrap();
    assert_eq!((used, response.status().as_u16()), (second.clone(), 200));

    let events: Vec<Event> = support::drain(&mut events);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::ReauthorizationRequired { key, .. } if *key == first
    )));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::GrantSkipped { key, error, .. } if *key == first && error.is_reauth_required()
    )));
    // Next time the dead grant is skipped without touching the API or the provider.
    let (api_calls, refreshes) = (w.server.api_calls(), w.server.refresh_calls());
    let (used, _) = client
        .send_any(&group, w.get(&w.server.api_url()))
        .await
        .unwrap();
    assert_eq!(used, second);
    assert_eq!(w.server.api_calls(), api_calls + 1);
    assert_eq!(w.server.refresh_calls(), refreshes);

    // With every grant dead, the error lists each one.
    w.server.revoke(&bob.grant);
    let err = client
        .send_any(&group, w.get(&w.server.api_url()))
        .await
        .unwrap_err();
    let RequestError::NoUsableGrant { skipped } = err else {
        panic!("{err:?}")
    };
    assert_eq!(skipped.len(), 2);
}

#[tokio::test]
async fn bearer_header_is_sent_and_never_leaks_into_errors() {
    let w = world(FakeConfig::standard()).await;
    let key = TokenKey::from("acct");
    let issued = w.insert_issued_grant(&key).await;
    let api = api_rejecting_every_token().await;
    let client = AuthorizedClient::new(plain(), w.manager.clone());
    let err = client.send(&key, w.get(&api.uri())).await.unwrap_err();
    let received = api.received_requests().await.unwrap();
    let sent = received[0].headers.get("authorization").unwrap();
    assert_eq!(sent, format!("Bearer {}", issued.access_token).as_str());
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(&issued.access_token));
    assert!(!shown.contains(&issued.refresh_token));
}

/// A wiremock API that accepts every request, with or without a token.
async fn api_accepting_everything() -> MockServer {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&api)
        .await;
    api
}

/// A grant whose access token cannot be an HTTP header value.
async fn grant_with_unsendable_token(w: &World) -> TokenKey {
    let key = TokenKey::from("acct");
    let tokens = tokenkeeper::TokenSet::new(tokenkeeper::AccessToken::new("at-1\r\nX-Evil: 1"))
        .with_expires_at(w.clock.now() + DAY);
    w.manager.insert(key.clone(), tokens).await.unwrap();
    key
}

#[tokio::test]
async fn a_token_that_is_no_header_value_is_a_typed_error_not_an_anonymous_request() {
    let w = world(FakeConfig::standard()).await;
    let key = grant_with_unsendable_token(&w).await;
    let api = api_accepting_everything().await;
    let client = AuthorizedClient::new(plain(), w.manager.clone());
    let outcome = client.send(&key, w.get(&api.uri())).await;
    assert_eq!(
        api.received_requests().await.unwrap().len(),
        0,
        "no request without its token"
    );
    let err = outcome.unwrap_err();
    assert!(
        matches!(&err, RequestError::InvalidTokenValue { key: k } if *k == key),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains("at-1"), "{err:?}");
    assert_eq!(w.server.refresh_calls(), 0);

    // In a failover group, the grant is skipped for the next one.
    let good = TokenKey::from("acct-2");
    w.insert_issued_grant(&good).await;
    let (used, response) = client
        .send_any(&[key.clone(), good.clone()], w.get(&api.uri()))
        .await
        .unwrap();
    assert_eq!((used, response.status().as_u16()), (good, 200));
    let received = api.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    assert!(received[0].headers.contains_key("authorization"));
}

#[cfg(feature = "middleware")]
mod middleware {
    use super::*;
    use reqwest_middleware::ClientBuilder;
    use tokenkeeper::TokenMiddleware;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_middleware_refreshes_once_and_retries() {
        let w = world(FakeConfig::standard()).await;
        let key = w.grant_the_api_will_reject("acct").await;
        let old = w.manager.access_token(&key).await.unwrap();
        let server = Arc::new(w.server);
        let api = gated_api(server.clone(), old.secret().to_owned(), 100).await;
        let client = ClientBuilder::new(plain())
            .with(TokenMiddleware::new(w.manager.clone()))
            .build();
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let request = client.get(&api).with_extension(key.clone());
                tokio::spawn(async move { request.send().await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().status(), 200);
        }
        assert_eq!(server.refresh_calls(), 1);
    }

    #[tokio::test]
    async fn the_middleware_never_sends_a_request_without_its_token() {
        let w = world(FakeConfig::standard()).await;
        let key = grant_with_unsendable_token(&w).await;
        let api = api_accepting_everything().await;
        let client = ClientBuilder::new(plain())
            .with(TokenMiddleware::new(w.manager.clone()))
            .build();
        let err = client
            .get(api.uri())
            .with_extension(key.clone())
            .send()
            .await
            .unwrap_err();
        assert_eq!(api.received_requests().await.unwrap().len(), 0);
        let reqwest_middleware::Error::Middleware(inner) = err else {
            panic!("expected a middleware error")
        };
        assert!(matches!(
            inner.downcast_ref::<RequestError>(),
            Some(RequestError::InvalidTokenValue { key: k }) if *k == key
        ));
    }

    #[tokio::test]
    async fn middleware_errors_carry_the_typed_error() {
        let w = world(FakeConfig::standard()).await;
        let client = ClientBuilder::new(plain())
            .with(TokenMiddleware::new(w.manager.clone()))
            .build();
        let err = client
            .get(w.server.api_url())
            .with_extension(TokenKey::from("nobody"))
            .send()
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(inner) = err else {
            panic!("expected a middleware error")
        };
        let typed = inner
            .downcast_ref::<RequestError>()
            .expect("a RequestError");
        assert!(matches!(typed, RequestError::Token(Error::NotFound { .. })));
        let err = client.get(w.server.api_url()).send().await.unwrap_err();
        assert!(err.to_string().contains("TokenKey"));
    }

    #[tokio::test]
    async fn a_dead_grant_is_told_apart_from_a_network_error_without_downcasting() {
        use tokenkeeper::MiddlewareErrorExt;

        let w = world(FakeConfig::standard()).await;
        let client = ClientBuilder::new(plain())
            .with(TokenMiddleware::new(w.manager.clone()))
            .build();
        let dead = TokenKey::from("acct-dead");
        let issued = w.insert_issued_grant(&dead).await;
        w.server.revoke(&issued.grant);
        let err = client
            .get(w.server.api_url())
            .with_extension(dead)
            .send()
            .await
            .unwrap_err();
        assert!(err.is_reauth_required() && !err.is_retryable(), "{err:?}");
        assert!(matches!(
            Error::from_middleware(&err),
            Some(Error::ReauthorizationRequired {
                reason: InvalidationReason::InvalidGrant,
                ..
            })
        ));

        // A good grant, an API that cannot be reached: the network's error, not a token's.
        let alive = TokenKey::from("acct-alive");
        w.insert_issued_grant(&alive).await;
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let err = client
            .get(format!("http://{closed}/v1/me"))
            .with_extension(alive)
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(err, reqwest_middleware::Error::Reqwest(_)),
            "{err:?}"
        );
        assert!(err.tokenkeeper_error().is_none() && err.request_error().is_none());
        assert!(!err.is_reauth_required() && !err.is_retryable());
    }
}
