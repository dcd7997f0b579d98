//! An application's view of `tokenkeeper`: its own `reqwest` 0.13 and `reqwest-middleware` 0.5
//! types go straight into tokenkeeper's API, with no conversion and no second `reqwest`.
//!
//! Run with `cargo test -p tokenkeeper-downstream`. It fails to compile if tokenkeeper's public
//! API moves to another major of either crate than the one an application names.

use tokenkeeper::{AuthorizedClient, OAuth2Provider, TokenManager, TokenMiddleware};

/// The application's own HTTP client, from its own `reqwest` dependency.
pub fn app_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client without TLS configuration errors")
}

/// A provider sending refreshes with the application's client.
pub fn provider(
    client_id: &str,
    token_url: &str,
    http: reqwest::Client,
) -> tokenkeeper::Result<OAuth2Provider> {
    OAuth2Provider::builder(client_id, token_url)
        .http_client(http)
        .build()
}

/// The application's middleware stack with tokenkeeper's middleware in it.
pub fn middleware_client(
    http: reqwest::Client,
    manager: TokenManager,
) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(http)
        .with(TokenMiddleware::new(manager))
        .build()
}

/// tokenkeeper's own client over the application's.
pub fn authorized_client(http: reqwest::Client, manager: TokenManager) -> AuthorizedClient {
    AuthorizedClient::new(http, manager)
}

/// The re-exports are the very crates the application depends on.
pub fn same_crates(client: reqwest::Client) -> tokenkeeper::reqwest::Client {
    client
}

/// As [`same_crates`], for `reqwest-middleware`.
pub fn same_middleware_crate(
    client: reqwest_middleware::ClientWithMiddleware,
) -> tokenkeeper::reqwest_middleware::ClientWithMiddleware {
    client
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
    use tokenkeeper::{ClientSecret, TokenKey, TokenManager};

    use super::*;

    #[tokio::test]
    async fn an_app_client_authorizes_requests_through_the_middleware() {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
        let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
            .client_secret(ClientSecret::new(server.client_secret()))
            .http_client(app_client())
            .build()
            .unwrap();
        let manager = TokenManager::builder(provider).clock(clock).build();
        let key = TokenKey::from("customer-42");
        let grant = server.issue_grant();
        manager
            .insert(key.clone(), server.token_set(&grant))
            .await
            .unwrap();

        let client = same_middleware_crate(middleware_client(
            same_crates(app_client()),
            manager.clone(),
        ));
        let response: reqwest::Response = client
            .get(server.api_url())
            .with_extension(key.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);

        let request: reqwest::Request = app_client().get(server.api_url()).build().unwrap();
        let response = authorized_client(app_client(), manager)
            .send(&key, request)
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(server.api_calls(), 2);
    }
}
