//! Connecting a user's account, and reconnecting it after it died: a small web app.
//!
//! The app has three routes on a loopback port: `/connect?account=…` sends the browser to the
//! provider's consent screen (authorization-code flow with PKCE and a single-use state),
//! `/callback` completes the attempt and stores the grant, and `/reconnect?account=…` is the
//! link an email or a dashboard button points to when a grant needs re-authorization. The
//! provider is the built-in fake authorization server, which consents at once.
//!
//! The example plays the browser itself (reqwest following the redirects: app `/connect` →
//! provider `/authorize` → app `/callback`), calls the provider's API with the new grant, lets
//! the user decline once, revokes the grant at the provider and reconnects it. It narrates what
//! happens, ends with a line starting `ok:` if everything went as described, and exits non-zero
//! otherwise.
//!
//! The routes are plain `async fn`s; `examples/web/` serves them over HTTP/1.1 with `hyper`.
//! In a real app they are the handlers of its web framework (axum, actix-web, …).
//!
//! Run it (offline):
//!
//! ```sh
//! cargo run --example connect
//! ```

mod web;

use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use hyper::StatusCode;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{
    ClientSecret, ConnectError, Connector, Event, OAuth2Provider, StartOptions, TokenKey,
    TokenManager,
};
use web::{Page, Request};

/// The app's routes.
async fn app(connector: Connector, request: Request) -> Page {
    match request.path.as_str() {
        "/connect" => connect(&connector, &request).await,
        "/reconnect" => reconnect(&connector, &request).await,
        "/callback" => callback(&connector, &request).await,
        _ => Page::status(StatusCode::NOT_FOUND, "no such page"),
    }
}

/// `/connect?account=…`: a new attempt for the account, and off to the provider.
async fn connect(connector: &Connector, request: &Request) -> Page {
    // A real app takes the account from the signed-in user's session.
    let Some(account) = request.param("account") else {
        return Page::status(StatusCode::BAD_REQUEST, "which account?");
    };
    match connector
        .start(TokenKey::from(account), StartOptions::new())
        .await
    {
        Ok(authorization) => Page::redirect(authorization.url()),
        Err(e) => Page::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `/reconnect?account=…`: the link in the "please reconnect" email.
async fn reconnect(connector: &Connector, request: &Request) -> Page {
    let Some(account) = request.param("account") else {
        return Page::status(StatusCode::BAD_REQUEST, "which account?");
    };
    match connector.reconnect_url(&TokenKey::from(account)).await {
        Ok(authorization) => Page::redirect(authorization.url()),
        Err(ConnectError::NotFound { .. }) => {
            Page::status(StatusCode::NOT_FOUND, "nothing to reconnect")
        }
        Err(e) => Page::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `/callback?code=…&state=…` (or `?error=…`): check, exchange, store.
async fn callback(connector: &Connector, request: &Request) -> Page {
    match connector.complete(request.query.as_str()).await {
        Ok(done) if done.recovered => Page::ok(format!("reconnected {}", done.key)),
        Ok(done) => Page::ok(format!("connected {}", done.key)),
        Err(ConnectError::Denied { error, .. }) => {
            Page::status(StatusCode::FORBIDDEN, format!("not connected: {error}"))
        }
        Err(e) if e.is_retryable() => {
            Page::status(StatusCode::SERVICE_UNAVAILABLE, format!("try again: {e}"))
        }
        Err(e) => Page::status(
            StatusCode::BAD_REQUEST,
            format!("please connect again: {e}"),
        ),
    }
}

/// The browser: follows every redirect and returns the final status and page.
async fn visit(browser: &reqwest::Client, url: &str) -> anyhow::Result<(u16, String, String)> {
    let reply = browser.get(url).send().await.context("browser request")?;
    let landed = reply.url().path().to_owned();
    let status = reply.status().as_u16();
    Ok((status, landed, reply.text().await?))
}

/// Calls the provider's API with the grant's access token; returns the HTTP status.
async fn call_api(
    manager: &TokenManager,
    server: &FakeAuthServer,
    key: &TokenKey,
) -> anyhow::Result<u16> {
    let token = manager.access_token(key).await?;
    let reply = reqwest::Client::new()
        .get(server.api_url())
        .bearer_auth(token.secret())
        .send()
        .await?;
    Ok(reply.status().as_u16())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
        .client_secret(ClientSecret::new(server.client_secret()))
        .build()?;
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    let mut events = manager.subscribe();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_url = format!("http://{}", listener.local_addr()?);
    let connector = Connector::builder(
        &manager,
        server.client_id(),
        server.authorize_url(),
        server.token_url(),
        format!("{app_url}/callback"),
    )
    .client_secret(ClientSecret::new(server.client_secret()))
    .scopes(["offline_access"])
    .auth_param("prompt", "consent")
    .build()?;
    tokio::spawn(web::serve(listener, connector, app));
    println!("app listening on {app_url}; provider at {}", server.uri());

    let browser = reqwest::Client::new(); // follows redirects, like a browser
    let key = TokenKey::from("customer-42");

    println!("\n1. The user clicks \"Connect\" and consents.");
    let (status, landed, page) =
        visit(&browser, &format!("{app_url}/connect?account={key}")).await?;
    println!("   browser ends on {landed}: {status} {page:?}");
    ensure!(status == 200 && landed == "/callback" && page == "connected customer-42");
    ensure!(server.authorizations() == 1 && server.code_exchanges() == 1);
    let status = call_api(&manager, &server, &key).await?;
    println!("   the app calls the provider's API with the new grant: {status}");
    ensure!(status == 200, "the API refused the new grant");

    println!("\n2. Another user clicks \"Connect\" and declines.");
    server.deny_next_authorization();
    let (status, landed, page) =
        visit(&browser, &format!("{app_url}/connect?account=customer-7")).await?;
    println!("   browser ends on {landed}: {status} {page:?}");
    ensure!(status == 403 && page == "not connected: access_denied");
    ensure!(
        manager.status(&TokenKey::from("customer-7")).await.is_err(),
        "a declined attempt must store nothing"
    );

    println!("\n3. The first user revokes the app at the provider.");
    let grant = *server
        .authorized_grants()
        .first()
        .context("the fake server issued no grant")?;
    server.revoke(&grant);
    let err = manager
        .refresh_now(&key)
        .await
        .err()
        .context("a refresh of a revoked grant must fail")?;
    println!("   the next refresh fails: {err}");
    let reason = loop {
        match events.try_recv() {
            Ok(Event::ReauthorizationRequired {
                key: dead, reason, ..
            }) if dead == key => break reason,
            Ok(_) => continue,
            Err(e) => bail!("no ReauthorizationRequired event ({e})"),
        }
    };
    let link = format!("{app_url}/reconnect?account={key}");
    println!("   event: {key} needs re-authorization ({reason}); email the user {link}");

    println!("\n4. The user follows the link and consents again.");
    let (status, landed, page) = visit(&browser, &link).await?;
    println!("   browser ends on {landed}: {status} {page:?}");
    ensure!(status == 200 && page == "reconnected customer-42");
    let recovered = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e, Event::Recovered { key: k, .. } if k == key));
    ensure!(recovered, "no Recovered event");
    println!("   event: {key} recovered");
    let status = call_api(&manager, &server, &key).await?;
    println!("   the API works again: {status}");
    ensure!(status == 200, "the API refused the reconnected grant");
    ensure!(server.authorized_grants().len() == 2);

    println!(
        "\nok: connected with PKCE and state through the app's routes, a refusal stored \
         nothing, and a revoked grant was reconnected from its link"
    );
    Ok(())
}
