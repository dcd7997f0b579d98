//! [`AfterExchange`]: turning what the code exchange returned into the grant to keep.

use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::ProviderError;
use crate::provider::GraphTokenExchange;
use crate::token::{TokenKey, TokenSet};

/// A step between the code exchange and [`insert`](crate::TokenManager::insert): it receives
/// the tokens the token endpoint returned and gives back the tokens to keep.
///
/// Why: some providers hand out, for an authorization code, a token that is not the grant an
/// app wants to keep. Instagram Login returns a short-lived token (1 hour) that cannot be
/// renewed; only the long-lived token it is exchanged for (60 days) is renewed by
/// [`InstagramProvider`](crate::InstagramProvider). A connector configured with
/// [`ConnectorBuilder::after_exchange`](crate::ConnectorBuilder::after_exchange) runs the step
/// inside [`Connector::complete`](crate::Connector::complete), so that what is stored — and
/// what a reconnect restores — is always the renewable grant.
/// [`GraphTokenExchange`] implements it ([`GraphTokenExchange::instagram`] for Instagram Login).
///
/// # Errors
///
/// A classified [`ProviderError`], which `complete` reports like a refusal of the code (a
/// dead token: [`ConnectError::CodeRejected`](crate::ConnectError::CodeRejected); a wrong
/// secret: [`Misconfigured`](crate::ConnectError::Misconfigured); rate limits and outages:
/// [`RateLimited`](crate::ConnectError::RateLimited),
/// [`Unavailable`](crate::ConnectError::Unavailable)). Nothing is stored then.
///
/// # Implementing
///
/// The step runs once per completed attempt, after the code was spent: it cannot be retried
/// with the same code, so a failure means the user starts over. Never log the tokens.
///
/// ```
/// use std::time::SystemTime;
/// use tokenkeeper::{AccessToken, AfterExchange, ProviderError, TokenKey, TokenSet};
///
/// /// Keeps only the scopes the app uses (an illustration; any async work fits here).
/// struct NarrowScopes;
///
/// #[async_trait::async_trait]
/// impl AfterExchange for NarrowScopes {
///     async fn after_exchange(
///         &self,
///         _key: &TokenKey,
///         tokens: TokenSet,
///         _now: SystemTime,
///     ) -> Result<TokenSet, ProviderError> {
///         Ok(tokens.with_scopes(vec!["read".to_owned()]))
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tokens = TokenSet::new(AccessToken::new("t"));
/// let kept = NarrowScopes
///     .after_exchange(&TokenKey::from("k"), tokens, SystemTime::now())
///     .await?;
/// assert_eq!(kept.scopes(), Some(&["read".to_owned()][..]));
/// # Ok(()) }
/// ```
#[async_trait]
pub trait AfterExchange: Send + Sync + 'static {
    /// Turns `tokens`, just obtained for grant `key` by the code exchange at `now` (the
    /// manager's clock), into the tokens to store.
    async fn after_exchange(
        &self,
        key: &TokenKey,
        tokens: TokenSet,
        now: SystemTime,
    ) -> Result<TokenSet, ProviderError>;
}

/// Exchanges the code exchange's (short-lived) access token for a long-lived one.
#[async_trait]
impl AfterExchange for GraphTokenExchange {
    async fn after_exchange(
        &self,
        _key: &TokenKey,
        tokens: TokenSet,
        now: SystemTime,
    ) -> Result<TokenSet, ProviderError> {
        self.exchange(tokens.access_token(), now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::AccessToken;
    use std::time::Duration;
    use wiremock::matchers::{method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    #[tokio::test]
    async fn instagram_exchange_presents_the_short_token_and_keeps_the_long_one() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/access_token"))
            .and(query_param("grant_type", "ig_exchange_token"))
            .and(query_param("client_secret", "s3cret"))
            .and(query_param("access_token", "short"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(
                r#"{"access_token":"long","token_type":"bearer","expires_in":5184000}"#,
                "application/json",
            ))
            .expect(1)
            .mount(&server)
            .await;
        let exchange = GraphTokenExchange::instagram(
            format!("{}/access_token", server.uri()),
            crate::token::ClientSecret::new("s3cret"),
        )
        .unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let short = TokenSet::new(AccessToken::new("short"))
            .with_expires_at(now + Duration::from_secs(3600));
        let kept = exchange
            .after_exchange(&TokenKey::from("k"), short, now)
            .await
            .unwrap();
        assert_eq!(kept.access_token().secret(), "long");
        assert_eq!(kept.issued_at(), Some(now));
        assert_eq!(
            kept.expires_at(),
            Some(now + Duration::from_secs(60 * 24 * 3600))
        );
        // No client id goes to Instagram's exchange.
        let requests = server.received_requests().await.unwrap();
        assert!(!requests[0].url.as_str().contains("client_id"));
    }

    #[tokio::test]
    async fn a_dead_short_token_is_a_reauthorization() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(400).set_body_raw(
                r#"{"error":{"message":"Session has expired.","type":"OAuthException","code":190,"error_subcode":463}}"#,
                "application/json",
            ))
            .mount(&server)
            .await;
        let exchange =
            GraphTokenExchange::instagram(server.uri(), crate::token::ClientSecret::new("s"))
                .unwrap();
        let err = exchange
            .after_exchange(
                &TokenKey::from("k"),
                TokenSet::new(AccessToken::new("short")),
                SystemTime::now(),
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err.into_error(&TokenKey::from("k")),
            crate::Error::ReauthorizationRequired { .. }
        ),);
    }
}
