//! How a grant is refreshed: the [`Provider`] trait and the built-in providers.

use std::future::Future;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::ProviderError;
use crate::token::{TokenKey, TokenResponse, TokenSet};

mod classify;
mod exchange;
mod graph;
mod http;
mod instagram;
mod oauth2;

pub use self::classify::{Classifier, StandardClassifier, XoxodayClassifier};
pub use self::exchange::{GraphTokenExchange, INSTAGRAM_EXCHANGE_URL};
pub use self::graph::{GraphClassifier, XClassifier};
pub use self::http::{HttpReply, DEFAULT_BODY_LIMIT};
pub use self::instagram::{InstagramProvider, InstagramProviderBuilder, INSTAGRAM_REFRESH_URL};
pub use self::oauth2::{ClientAuth, Grant, OAuth2Provider, OAuth2ProviderBuilder};

/// One refresh to perform.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RefreshRequest<'a> {
    /// The grant being refreshed.
    pub key: &'a TokenKey,
    /// Its current tokens (the refresh token, or for providers without one, the access token).
    pub tokens: &'a TokenSet,
    /// The time of the request, from the manager's [`Clock`](crate::Clock). Use it to turn an
    /// HTTP-date `Retry-After` into a delay.
    pub now: SystemTime,
}

impl<'a> RefreshRequest<'a> {
    /// A request to refresh `tokens` of grant `key` at `now` (for calling a provider directly,
    /// as in a provider's own tests).
    pub fn new(key: &'a TokenKey, tokens: &'a TokenSet, now: SystemTime) -> Self {
        Self { key, tokens, now }
    }
}

/// Performs one refresh of one grant.
///
/// The [`TokenManager`](crate::TokenManager) decides *when* to refresh and guarantees that at
/// most one refresh of a grant is in flight per process (and per store, when the store has a
/// lock). A provider only talks to the authorization server and classifies the answer.
///
/// # Errors
///
/// Return a classified [`ProviderError`]: [`ProviderError::reauthorize`] only when the grant
/// is certainly dead (the manager persists that and stops refreshing it), `rate_limited` or
/// `unavailable` for anything retrying may fix, `misconfigured` for client configuration
/// faults. Never put a token or a raw response body in an error.
///
/// # Implementing
///
/// For an RFC 6749 endpoint use [`OAuth2Provider`]. For anything else, implement this trait;
/// [`HttpReply`] and the [`Classifier`]s do the reading and classification:
///
/// ```
/// use async_trait::async_trait;
/// use tokenkeeper::{HttpReply, Provider, ProviderError, RefreshRequest, StandardClassifier,
///     TokenResponse, ConfigProblem};
///
/// struct JsonEndpoint { client: reqwest::Client, url: String }
///
/// #[async_trait]
/// impl Provider for JsonEndpoint {
///     async fn refresh(&self, req: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
///         let Some(refresh_token) = req.tokens.refresh_token() else {
///             return Err(ProviderError::reauthorize(tokenkeeper::InvalidationReason::NoRefreshToken));
///         };
///         let body = serde_json::json!({ "refresh_token": refresh_token.secret() });
///         let request = self.client.post(&self.url)
///             .header("content-type", "application/json")
///             .body(body.to_string())
///             .build()
///             .map_err(|_| ProviderError::misconfigured(ConfigProblem::Endpoint))?;
///         let reply = HttpReply::send(&self.client, request, tokenkeeper::DEFAULT_BODY_LIMIT).await?;
///         reply.interpret(&StandardClassifier, req.now)
///     }
/// }
/// ```
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Refreshes the grant once.
    async fn refresh(&self, request: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError>;

    /// Whether this provider can renew `tokens` at all. The default: only with a refresh token.
    ///
    /// A grant it cannot renew (an access token minted in a provider's dashboard, say) is
    /// served until its access token expires, is never touched by keep-alive, gets an
    /// [`Event::AccessTokenExpiring`](crate::Event::AccessTokenExpiring) warning ahead of that,
    /// and only then becomes
    /// [`ReauthorizationRequired`](crate::Error::ReauthorizationRequired) with
    /// [`NoRefreshToken`](crate::InvalidationReason::NoRefreshToken) (or earlier, if the API
    /// rejects the token). Providers that renew another way (by presenting the access token,
    /// say) return `true`.
    fn can_refresh(&self, tokens: &TokenSet) -> bool {
        tokens.refresh_token().is_some()
    }

    /// For `tokens` that [`can_refresh`](Self::can_refresh) refuses now, when they may become
    /// renewable (an Instagram-style token renewable only once a day old, say): the background
    /// refresher looks at the grant again then. The default, `None`: only a new grant changes
    /// the answer.
    fn refresh_not_before(&self, tokens: &TokenSet) -> Option<SystemTime> {
        let _ = tokens;
        None
    }

    /// How this provider's refresh tokens expire, for grants whose tokens do not declare it
    /// ([`TokenSet::with_refresh_expiry`]): a declaration made once for every grant of a
    /// provider. [`RefreshExpiry::Sliding`](crate::RefreshExpiry::Sliding) sets the background
    /// refresher's keep-alive from the idle lifetime, and moves the known expiry on each
    /// refresh; [`RefreshExpiry::Fixed`](crate::RefreshExpiry::Fixed) keeps a known end across
    /// rotations. The default, `None`: nothing declared.
    ///
    /// [`TokenManager::insert`](crate::TokenManager::insert) writes the declaration into the
    /// tokens it stores, so that status listings show it.
    fn refresh_expiry(&self) -> Option<crate::token::RefreshExpiry> {
        None
    }

    /// Revokes the grant at the provider (RFC 7009), as an app should when a user disconnects
    /// it; called by [`TokenManager::disconnect`](crate::TokenManager::disconnect) with the
    /// grant's current tokens.
    ///
    /// The default does nothing, for providers without a revocation endpoint.
    async fn revoke(&self, request: RefreshRequest<'_>) -> Result<(), ProviderError> {
        let _ = request;
        Ok(())
    }
}

/// A [`Provider`] from an async closure; handy in tests and doctests.
///
/// ```
/// use tokenkeeper::{provider_fn, AccessToken, TokenResponse};
/// let provider = provider_fn(|_key, _tokens| async {
///     Ok(TokenResponse::new(AccessToken::new("fresh")))
/// });
/// # let _ = provider;
/// ```
pub fn provider_fn<F, Fut>(f: F) -> FnProvider<F>
where
    F: Fn(TokenKey, TokenSet) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TokenResponse, ProviderError>> + Send + 'static,
{
    FnProvider(f)
}

/// The [`Provider`] made by [`provider_fn`].
#[derive(Clone)]
pub struct FnProvider<F>(F);

impl<F> std::fmt::Debug for FnProvider<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnProvider")
    }
}

#[async_trait]
impl<F, Fut> Provider for FnProvider<F>
where
    F: Fn(TokenKey, TokenSet) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TokenResponse, ProviderError>> + Send + 'static,
{
    async fn refresh(&self, request: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        (self.0)(request.key.clone(), request.tokens.clone()).await
    }
}

#[async_trait]
impl<T: Provider + ?Sized> Provider for std::sync::Arc<T> {
    async fn refresh(&self, request: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        (**self).refresh(request).await
    }

    fn can_refresh(&self, tokens: &TokenSet) -> bool {
        (**self).can_refresh(tokens)
    }

    fn refresh_not_before(&self, tokens: &TokenSet) -> Option<SystemTime> {
        (**self).refresh_not_before(tokens)
    }

    fn refresh_expiry(&self) -> Option<crate::token::RefreshExpiry> {
        (**self).refresh_expiry()
    }

    async fn revoke(&self, request: RefreshRequest<'_>) -> Result<(), ProviderError> {
        (**self).revoke(request).await
    }
}
