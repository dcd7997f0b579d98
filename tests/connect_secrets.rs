//! The connect flow never shows a secret: no authorization code, state, client secret or
//! token in tracing output (at TRACE), nor in `Debug` or `Display` of the connector, its
//! builder, an authorization, callback parameters, a completion or an error.
//!
//! This file holds a single test because it installs a global tracing subscriber (a scoped
//! one races with callsites other tests register first).

mod support;

use std::sync::Arc;

use support::oauth2_provider;
use support::trace::Capture;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{CallbackParams, ClientSecret, Connector, StartOptions, TokenKey, TokenManager};

fn builder(server: &FakeAuthServer, manager: &TokenManager) -> tokenkeeper::ConnectorBuilder {
    Connector::builder(
        manager,
        server.client_id(),
        server.authorize_url(),
        server.token_url(),
        "http://127.0.0.1:9/callback",
    )
    .client_secret(ClientSecret::new(server.client_secret()))
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
async fn no_secret_in_debug_display_or_traces() {
    let capture = Capture::install_global();

    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    let manager = TokenManager::builder(oauth2_provider(&server))
        .clock(clock.clone())
        .build();
    let connector = builder(&server, &manager).build().unwrap();
    let authorization = connector
        .start(TokenKey::from("a"), StartOptions::new())
        .await
        .unwrap();
    let callback = server
        .follow_authorization(authorization.url())
        .await
        .unwrap();
    let (code, state) = code_and_state(&callback);
    let params = CallbackParams::from(callback.as_str());
    let completed = connector.complete(params.clone()).await.unwrap();
    let replay = connector.complete(params.clone()).await.unwrap_err();
    let token = manager.access_token(&completed.key).await.unwrap();

    let secrets = [
        code,
        state,
        server.client_secret().to_owned(),
        token.secret().to_owned(),
    ];
    let trace = capture.text();
    assert!(
        trace.contains("authorization completed"),
        "the capture works"
    );
    let shown = [
        format!("{connector:?}"),
        format!("{:?}", builder(&server, &manager)),
        format!("{authorization:?}"),
        format!("{params:?}"),
        format!("{completed:?}"),
        format!("{replay:?} {replay}"),
        trace,
    ];
    for text in &shown {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{secret:?} leaks in {text}"
            );
        }
    }
}
