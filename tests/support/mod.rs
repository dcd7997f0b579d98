//! Helpers shared by the integration tests that run against the fake authorization server.
#![allow(dead_code)]

use async_trait::async_trait;
use tokenkeeper::testing::{FakeAuthServer, IssuedGrant};
use tokenkeeper::{
    AccessToken, ClientSecret, ConfigProblem, HttpReply, InvalidationReason, OAuth2Provider,
    Provider, ProviderError, RefreshRequest, RefreshToken, TokenResponse, TokenSet,
    XoxodayClassifier, DEFAULT_BODY_LIMIT,
};

/// The tokens of a grant the fake server issued, as an app would store them.
pub fn tokens(grant: &IssuedGrant) -> TokenSet {
    let mut set = TokenSet::new(AccessToken::new(grant.access_token.clone()))
        .with_refresh_token(RefreshToken::new(grant.refresh_token.clone()))
        .with_expires_at(grant.access_expires_at);
    if let Some(at) = grant.refresh_expires_at {
        set = set.with_refresh_expires_at(at);
    }
    set
}

/// The RFC 6749 provider for a Standard or Constant Contact-style fake server.
pub fn oauth2_provider(server: &FakeAuthServer) -> OAuth2Provider {
    OAuth2Provider::builder(server.client_id(), server.token_url())
        .client_secret(ClientSecret::new(server.client_secret()))
        .build()
        .expect("valid provider configuration")
}

/// A custom provider for the Xoxoday-style JSON refresh endpoint.
pub struct XoxodayProvider {
    client: reqwest::Client,
    url: String,
    client_id: String,
    client_secret: ClientSecret,
}

impl XoxodayProvider {
    pub fn new(server: &FakeAuthServer) -> Self {
        Self {
            client: reqwest::Client::new(),
            url: server.token_url(),
            client_id: server.client_id().to_owned(),
            client_secret: ClientSecret::new(server.client_secret()),
        }
    }
}

#[async_trait]
impl Provider for XoxodayProvider {
    async fn refresh(&self, req: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        let Some(refresh_token) = req.tokens.refresh_token() else {
            return Err(ProviderError::reauthorize(
                InvalidationReason::NoRefreshToken,
            ));
        };
        let body = serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.secret(),
            "client_id": self.client_id,
            "client_secret": self.client_secret.secret(),
        });
        let request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .build()
            .map_err(|_| ProviderError::misconfigured(ConfigProblem::Endpoint))?;
        let reply = HttpReply::send(&self.client, request, DEFAULT_BODY_LIMIT).await?;
        reply.interpret(&XoxodayClassifier, req.now)
    }
}

/// A throwaway `redis-server` for the `redis` feature's tests.
pub mod redis;
