//! Helpers shared by the integration tests: tokens and providers for the fake authorization
//! server, a Xoxoday-style JSON provider, event draining, and (in submodules) encoders, a
//! recording harness for classification tests against wiremock, and a tracing capture.
#![allow(dead_code)]

pub mod encoding;
pub mod harness;
pub mod store;
pub mod trace;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::testing::{FakeAuthServer, IssuedGrant};
use tokenkeeper::{
    provider_fn, AccessToken, ClientSecret, ConfigProblem, Event, HttpReply, InvalidationReason,
    OAuth2Provider, Provider, ProviderError, RefreshRequest, RefreshToken, TokenResponse, TokenSet,
    XoxodayClassifier, DEFAULT_BODY_LIMIT,
};
use tokio::sync::broadcast::Receiver;

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

/// A provider that counts its calls and answers each with `answer()`; the count is shared.
pub fn counting<F, Fut>(answer: F) -> (Arc<AtomicUsize>, impl Provider + Clone)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<TokenResponse, ProviderError>> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let provider = provider_fn(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        answer()
    });
    (calls, provider)
}

/// Every event received so far, without waiting.
pub fn drain(rx: &mut Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// A custom provider for the Xoxoday-style refresh endpoint, which is not RFC 6749: a JSON
/// body holding the client secret, replies read by the `XoxodayClassifier`.
pub struct XoxodayProvider {
    client: reqwest::Client,
    url: String,
    client_id: String,
    client_secret: ClientSecret,
    timeout: Option<Duration>,
}

impl XoxodayProvider {
    /// The provider for a Xoxoday-style fake server.
    pub fn new(server: &FakeAuthServer) -> Self {
        Self::with_endpoint(
            server.token_url(),
            server.client_id(),
            server.client_secret(),
        )
    }

    /// The provider for any endpoint (a wiremock server, say).
    pub fn with_endpoint(
        url: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: &str,
    ) -> Self {
        Self {
            client: reqwest::Client::new(),
            url: url.into(),
            client_id: client_id.into(),
            client_secret: ClientSecret::new(client_secret),
            timeout: None,
        }
    }

    /// Gives every refresh request this timeout (none by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
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
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json");
        if let Some(timeout) = self.timeout {
            request = request.timeout(timeout);
        }
        let request = request
            .body(body.to_string())
            .build()
            .map_err(|_| ProviderError::misconfigured(ConfigProblem::Endpoint))?;
        let reply = HttpReply::send(&self.client, request, DEFAULT_BODY_LIMIT).await?;
        reply.interpret(&XoxodayClassifier, req.now)
    }
}

/// A throwaway `redis-server` for the `redis` feature's tests.
pub mod redis;

/// A throwaway PostgreSQL server for the `postgres` feature's tests.
#[cfg(feature = "postgres")]
pub mod postgres;
