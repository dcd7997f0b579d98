//! Invariant 8: no access token, refresh token or client secret appears in tracing output
//! (at TRACE: every span name and every span and event field as recorded, including span
//! fields recorded after the span's last event, and each error field's source chain), in `Debug` or `Display` of errors, events,
//! token sets, statuses, grant listings, records, or the provider and its builder.
//!
//! This file holds a single test because it installs a global tracing subscriber (refreshes
//! run on spawned tasks, possibly on other threads, so a thread-local default would miss them).

mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use support::drain;
use support::encoding::base64;
use support::trace::Capture;
use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    AccessToken, ClientAuth, ClientSecret, Clock, ConfigProblem, Error, Event, EventItem,
    InvalidationReason, MemoryStore, OAuth2Provider, Page, RefreshToken, TokenKey, TokenManager,
    TokenSet, TokenStore, UnavailableCause,
};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const CLIENT_ID: &str = "leak-test-client";
const CLIENT_SECRET: &str = "CLIENTSECRET-q7Zp4mW9";

/// A grant key, the refresh token it starts with, and what the server answers to it.
struct Scenario {
    key: &'static str,
    old_at: &'static str,
    old_rt: &'static str,
    status: u16,
    body: String,
    retry_after: Option<&'static str>,
}

fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} leaks the secret {secret:?}:\n{text}"
        );
    }
}

/// Display and Debug of an error and of every error in its source chain.
fn error_texts(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut texts = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        texts.push(e.to_string());
        texts.push(format!("{e:?}"));
        next = e.source();
    }
    texts
}

#[test]
fn no_secret_reaches_traces_errors_events_or_debug_output() {
    let capture = Capture::install_global();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut secrets: Vec<String> = vec![CLIENT_SECRET.to_owned()];
    let mut texts: Vec<(String, String)> = Vec::new();
    let keys = runtime.block_on(run(&mut secrets, &mut texts));

    let trace = capture.text();
    assert!(!trace.is_empty(), "nothing was traced");
    assert!(trace.contains("tokenkeeper.refresh"), "{trace}");
    for key in &keys {
        assert!(
            trace.contains(key.as_str()),
            "the trace never names {key}:\n{trace}"
        );
    }
    assert!(secrets.len() > 10);
    assert_clean("the trace", &trace, &secrets);
    for (what, text) in &texts {
        assert_clean(what, text, &secrets);
    }

    // The fields themselves, span by span: one refresh span per refresh, with the key, the
    // outcome, the attempt number and the duration, and no secret in any field.
    let log = capture.log();
    let refreshes: Vec<&Vec<String>> = log
        .spans
        .iter()
        .filter(|span| span.name == "tokenkeeper.refresh")
        .map(|span| &span.fields)
        .collect();
    assert!(refreshes.len() >= keys.len(), "{}", refreshes.len());
    for key in &keys {
        assert!(
            refreshes.iter().any(|f| f.contains(&format!("key={key}"))),
            "no refresh span names {key}"
        );
    }
    for field in ["outcome=", "attempt=", "duration_ms="] {
        assert!(
            refreshes
                .iter()
                .all(|f| f.iter().any(|v| v.starts_with(field))),
            "a refresh span without {field}: {refreshes:?}"
        );
    }
    assert!(refreshes
        .iter()
        .any(|f| f.contains(&"attempt=2".to_owned())));
    for span in &log.spans {
        for field in &span.fields {
            assert_clean(&format!("a field of span {}", span.name), field, &secrets);
        }
    }
    for event in &log.events {
        for field in &event.fields {
            assert_clean(
                &format!("a field of an event of {}", event.target),
                field,
                &secrets,
            );
        }
    }
}

async fn run(secrets: &mut Vec<String>, texts: &mut Vec<(String, String)>) -> Vec<TokenKey> {
    let ok = |at: &str, rt: Option<&str>| -> String {
        match rt {
            Some(rt) => format!(
                r#"{{"token_type":"Bearer","expires_in":86400,"access_token":"{at}","scope":"offline_access","refresh_token":"{rt}","id_token":"IDTOKEN-{at}"}}"#
            ),
            None => {
                format!(r#"{{"token_type":"Bearer","expires_in":86400,"access_token":"{at}"}}"#)
            }
        }
    };
    let scenarios = vec![
        Scenario {
            key: "acct-rotates",
            old_at: "ACCESS-old-rot-3kF9",
            old_rt: "REFRESH-old-rot-8sQ2",
            status: 200,
            body: ok("ACCESS-new-rot-1aB7", Some("REFRESH-new-rot-5tY6")),
            retry_after: None,
        },
        Scenario {
            key: "acct-keeps",
            old_at: "ACCESS-old-keep-9dL4",
            old_rt: "REFRESH-old-keep-2wE8",
            status: 200,
            body: ok("ACCESS-new-keep-7hN3", None),
            retry_after: None,
        },
        Scenario {
            key: "acct-dead",
            old_at: "ACCESS-old-dead-4pR1",
            old_rt: "REFRESH-old-dead-6uT5",
            // A server that echoes the token in its description must not make it leak.
            body: r#"{"error":"invalid_grant","error_description":"refresh token REFRESH-old-dead-6uT5 is spent"}"#.into(),
            status: 400,
            retry_after: None,
        },
        Scenario {
            key: "acct-limited",
            old_at: "ACCESS-old-lim-0zX3",
            old_rt: "REFRESH-old-lim-1cV9",
            status: 429,
            body: r#"{"error_key":"throttled","error_message":"Too Many Requests"}"#.into(),
            retry_after: Some("120"),
        },
        Scenario {
            key: "acct-down",
            old_at: "ACCESS-old-down-5mK2",
            old_rt: "REFRESH-old-down-8jH7",
            status: 500,
            body: "<html>500 Internal Server Error</html>".into(),
            retry_after: None,
        },
        Scenario {
            key: "acct-misconfigured",
            old_at: "ACCESS-old-mis-3gD6",
            old_rt: "REFRESH-old-mis-4fS0",
            status: 401,
            body: r#"{"error":"invalid_client","error_description":"bad secret CLIENTSECRET-q7Zp4mW9"}"#
                .into(),
            retry_after: None,
        },
        Scenario {
            key: "acct-garbled",
            old_at: "ACCESS-old-garb-2bN8",
            old_rt: "REFRESH-old-garb-7yU1",
            status: 200,
            // Tokens in a reply that cannot be used (the access token is not a string); the
            // rotated refresh token travels in the provider's error, redacted.
            body: r#"{"access_token":["ACCESS-garbled-6rT4"],"refresh_token":"REFRESH-garbled-rot-8kL2","expires_in":"whenever"}"#.into(),
            retry_after: None,
        },
    ];
    for s in &scenarios {
        secrets.push(s.old_at.into());
        secrets.push(s.old_rt.into());
    }
    secrets.extend(
        [
            "ACCESS-new-rot-1aB7",
            "REFRESH-new-rot-5tY6",
            "IDTOKEN-ACCESS-new-rot-1aB7",
            "ACCESS-new-keep-7hN3",
            "ACCESS-garbled-6rT4",
            "REFRESH-garbled-rot-8kL2",
        ]
        .map(String::from),
    );
    secrets.push(base64(format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes()));

    let server = MockServer::start().await;
    for s in &scenarios {
        let mut reply = ResponseTemplate::new(s.status)
            .set_body_raw(s.body.as_bytes().to_vec(), "application/json");
        if let Some(after) = s.retry_after {
            reply = reply.insert_header("retry-after", after);
        }
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(body_string_contains(format!("refresh_token={}", s.old_rt)))
            .respond_with(reply)
            .mount(&server)
            .await;
    }
    // The rotated token refreshes again (to the same reply shape, new values).
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("refresh_token=REFRESH-new-rot-5tY6"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            r#"{"access_token":"ACCESS-third-rot-9qW2","refresh_token":"REFRESH-third-rot-3eR5","expires_in":86400}"#
                .as_bytes()
                .to_vec(),
            "application/json",
        ))
        .mount(&server)
        .await;
    secrets.push("ACCESS-third-rot-9qW2".into());
    secrets.push("REFRESH-third-rot-3eR5".into());

    let url = format!("{}/token", server.uri());
    let basic_builder = OAuth2Provider::builder(CLIENT_ID, url.as_str())
        .client_secret(ClientSecret::new(CLIENT_SECRET))
        .client_auth(ClientAuth::Basic)
        .scopes(["offline_access"]);
    texts.push(("OAuth2ProviderBuilder".into(), format!("{basic_builder:?}")));
    let basic = basic_builder.build().expect("provider");
    texts.push(("OAuth2Provider".into(), format!("{basic:?}")));
    let body_auth = OAuth2Provider::builder(CLIENT_ID, url.as_str())
        .client_secret(ClientSecret::new(CLIENT_SECRET))
        .client_auth(ClientAuth::RequestBody)
        .build()
        .expect("provider");
    texts.push((
        "OAuth2Provider (body auth)".into(),
        format!("{body_auth:?}"),
    ));
    texts.push((
        "ClientSecret".into(),
        format!("{:?}", ClientSecret::new(CLIENT_SECRET)),
    ));

    let clock = Arc::new(ManualClock::fixed());
    let store = Arc::new(MemoryStore::new());
    let manager = TokenManager::builder(basic)
        .clock(clock.clone())
        .store(store.clone())
        .build();
    // The same grants through a manager whose provider puts the secret in the body.
    let body_manager = TokenManager::builder(body_auth)
        .clock(clock.clone())
        .store(store.clone())
        .build();
    let mut events = manager.subscribe();
    let mut body_events = body_manager.subscribe();
    let mut stream = manager.events();

    let expired = clock.now() - Duration::from_secs(1);
    let mut keys = Vec::new();
    for s in &scenarios {
        let key = TokenKey::from(s.key);
        let set = TokenSet::new(AccessToken::new(s.old_at))
            .with_refresh_token(RefreshToken::new(s.old_rt))
            .with_expires_at(expired);
        texts.push((format!("inserted TokenSet {}", s.key), format!("{set:?}")));
        manager.insert(key.clone(), set).await.expect("insert");
        keys.push(key);
    }

    let mut errors: Vec<Error> = Vec::new();
    for key in &keys {
        match manager.access_token(key).await {
            Ok(token) => texts.push((format!("AccessToken {key}"), format!("{token:?}"))),
            Err(e) => errors.push(e),
        }
    }
    // Rotate once more, through the body-auth manager.
    clock.advance(Duration::from_secs(86400));
    let third = body_manager
        .access_token(&TokenKey::from("acct-rotates"))
        .await
        .expect("second rotation");
    assert_eq!(third.secret(), "ACCESS-third-rot-9qW2");
    // The dead grant answers from the store; the others hit the server again (backoff is over).
    for key in &keys[2..] {
        if let Err(e) = body_manager.access_token(key).await {
            errors.push(e);
        }
    }
    if let Err(e) = manager
        .invalidate(&keys[1], &AccessToken::new("ACCESS-new-keep-7hN3"))
        .await
    {
        errors.push(e);
    }

    // Every failure class was produced.
    let has = |f: &dyn Fn(&Error) -> bool| errors.iter().any(f);
    assert!(has(&|e| matches!(
        e,
        Error::ReauthorizationRequired {
            reason: InvalidationReason::InvalidGrant,
            ..
        }
    )));
    assert!(has(&|e| matches!(e, Error::RateLimited { .. })));
    assert!(has(&|e| matches!(
        e,
        Error::Unavailable {
            cause: UnavailableCause::ServerError,
            ..
        }
    )));
    assert!(has(&|e| matches!(
        e,
        Error::Unavailable {
            cause: UnavailableCause::InvalidResponse,
            ..
        }
    )));
    assert!(has(&|e| matches!(
        e,
        Error::Misconfigured {
            problem: ConfigProblem::InvalidClient,
            ..
        }
    )));
    for e in &errors {
        for text in error_texts(e) {
            texts.push((format!("Error {e:?}"), text));
        }
    }

    let mut all_events = Vec::new();
    for rx in [&mut events, &mut body_events] {
        all_events.extend(drain(rx));
    }
    assert!(all_events
        .iter()
        .any(|e| matches!(e, Event::Refreshed { rotated: true, .. })));
    assert!(all_events
        .iter()
        .any(|e| matches!(e, Event::ReauthorizationRequired { .. })));
    assert!(all_events
        .iter()
        .any(|e| matches!(e, Event::RefreshFailed { .. })));
    // Whatever the stream holds now, without waiting.
    let before = texts.len();
    while let Some(item) = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match Pin::new(&mut stream).poll_next(cx) {
            std::task::Poll::Ready(item) => item,
            std::task::Poll::Pending => None,
        })
    })
    .await
    {
        assert!(matches!(item, EventItem::Event(_)));
        texts.push(("EventItem".into(), format!("{item:?}")));
    }
    assert!(texts.len() > before, "the event stream saw the events");
    for event in &all_events {
        texts.push(("Event".into(), format!("{event:?}")));
        if let Event::RefreshFailed { error, .. } = event {
            for text in error_texts(error) {
                texts.push(("Event error".into(), text));
            }
        }
    }

    for key in &keys {
        match manager.token(key).await {
            Ok(set) => texts.push((format!("TokenSet {key}"), format!("{set:?}"))),
            Err(e) => {
                for text in error_texts(&e) {
                    texts.push((format!("Error from token({key})"), text));
                }
            }
        }
        let status = manager.status(key).await.expect("status");
        texts.push((format!("TokenStatus {key}"), format!("{status:?}")));
        if let Some(error) = &status.last_error {
            texts.push((format!("TokenStatus.last_error {key}"), error.clone()));
        }
        let record = store.load(key).await.expect("load").expect("stored");
        texts.push((format!("GrantRecord {key}"), format!("{record:?}")));
    }
    texts.push(("TokenManager".into(), format!("{manager:?}")));
    let listing = manager.grants(Page::default()).await.expect("listing");
    assert_eq!(listing.grants.len(), keys.len());
    texts.push(("GrantPage".into(), format!("{listing:?}")));

    // The secrets really went over the wire, in the header and in the body, so a leak was
    // possible.
    let received = server.received_requests().await.expect("recording");
    assert!(received.len() >= 10, "{}", received.len());
    let basic = format!(
        "Basic {}",
        base64(format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes())
    );
    assert!(received.iter().any(|r| r
        .headers
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == basic.as_bytes())));
    assert!(received
        .iter()
        .any(|r| String::from_utf8_lossy(&r.body)
            .contains(&format!("client_secret={CLIENT_SECRET}"))));
    keys
}
