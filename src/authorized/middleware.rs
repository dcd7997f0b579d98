//! The `reqwest-middleware` integration (feature `middleware`).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use super::{authorize, Authorizer, Rejection, RequestError, Verdict};
use crate::error::Error;
use crate::manager::TokenManager;
use crate::token::TokenKey;

/// A [`reqwest_middleware::Middleware`] that authorizes each request with the bearer token of
/// the grant named by a [`TokenKey`] in the request's extensions, and on a rejected token
/// refreshes (once per token generation) and retries once — the same behaviour as
/// [`AuthorizedClient::send`](super::AuthorizedClient::send).
///
/// Errors are [`reqwest_middleware::Error::Middleware`] wrapping a [`RequestError`] (or
/// [`MissingTokenKey`]). Ask them what to do with [`MiddlewareErrorExt`]
/// (`err.is_reauth_required()`, `err.is_retryable()`, `err.tokenkeeper_error()`) or
/// [`Error::from_middleware`].
///
/// ```
/// # async fn run(manager: tokenkeeper::TokenManager) -> Result<(), Box<dyn std::error::Error>> {
/// use reqwest_middleware::ClientBuilder;
/// use tokenkeeper::{TokenKey, TokenMiddleware};
/// let client = ClientBuilder::new(reqwest::Client::new())
///     .with(TokenMiddleware::new(manager))
///     .build();
/// let response = client
///     .get("https://api.example.com/me")
///     .with_extension(TokenKey::from("customer-42"))
///     .send()
///     .await?;
/// # let _ = response; Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenMiddleware {
    auth: Authorizer,
}

impl TokenMiddleware {
    /// A middleware taking tokens from `manager`, using [`Rejection::rfc6750`].
    pub fn new(manager: TokenManager) -> Self {
        Self {
            auth: Authorizer::new(manager, Rejection::default()),
        }
    }

    /// Sets what counts as a rejected token.
    pub fn rejection(mut self, rejection: Rejection) -> Self {
        self.auth = Authorizer::new(self.auth.manager, rejection);
        self
    }
}

impl fmt::Debug for TokenMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenMiddleware")
            .field("rejection", &self.auth.rejection)
            .finish_non_exhaustive()
    }
}

/// A request sent through [`TokenMiddleware`] without a [`TokenKey`] extension: a programming
/// error, found in the error's chain with
/// `err.chain().any(|e| e.is::<MissingTokenKey>())` on the `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
#[error("request has no TokenKey extension; add one with `.with_extension(TokenKey::from(..))`")]
pub struct MissingTokenKey;

fn fail(e: impl std::error::Error + Send + Sync + 'static) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(e)
}

#[async_trait]
impl Middleware for TokenMiddleware {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let Some(key) = extensions.get::<TokenKey>().cloned() else {
            return Err(fail(MissingTokenKey));
        };
        let token = self
            .auth
            .manager
            .access_token(&key)
            .await
            .map_err(|e| fail(RequestError::Token(e)))?;
        let retry = request.try_clone();
        let mut request = request;
        authorize(&mut request, &key, &token).map_err(fail)?;
        let response = next.clone().run(request, extensions).await?;
        let rejected = match self.auth.inspect(response).await? {
            Verdict::Accepted(response) => {
                self.auth.accepted(&key);
                return Ok(response);
            }
            Verdict::Rejected(response) => response,
        };
        let status = rejected.status().as_u16();
        let fresh = match self.auth.after_rejection(&key, &token).await {
            Ok(Some(fresh)) => fresh,
            Ok(None) => return Err(fail(RequestError::Rejected { key, status })),
            Err(e) => return Err(fail(RequestError::Token(e))),
        };
        let Some(mut retry) = retry else {
            return Ok(rejected);
        };
        authorize(&mut retry, &key, &fresh).map_err(fail)?;
        let response = next.run(retry, extensions).await?;
        match self.auth.inspect(response).await? {
            Verdict::Accepted(response) => {
                self.auth.accepted(&key);
                Ok(response)
            }
            Verdict::Rejected(response) => {
                self.auth.rejected_after_refresh(&key, fresh);
                Err(fail(RequestError::Rejected {
                    key,
                    status: response.status().as_u16(),
                }))
            }
        }
    }
}

/// The [`RequestError`] inside a middleware error, wherever it sits in the error's chain (other
/// middlewares may have added context).
fn request_error(err: &reqwest_middleware::Error) -> Option<&RequestError> {
    match err {
        reqwest_middleware::Error::Middleware(e) => {
            e.chain().find_map(|e| e.downcast_ref::<RequestError>())
        }
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

impl Error {
    /// The `tokenkeeper` error behind a [`TokenMiddleware`] failure: why no usable access token
    /// could be had (the grant is dead, rate limited, the provider is down…). `None` for every
    /// other failure: a network error, a rejection after a refresh, another middleware's error.
    ///
    /// ```
    /// use tokenkeeper::{Error, InvalidationReason, RequestError, TokenKey};
    ///
    /// // What `TokenMiddleware` returns for a dead grant:
    /// let dead = Error::ReauthorizationRequired {
    ///     key: TokenKey::from("customer-42"),
    ///     reason: InvalidationReason::Revoked,
    /// };
    /// let err = reqwest_middleware::Error::middleware(RequestError::Token(dead));
    ///
    /// let cause = Error::from_middleware(&err).expect("a tokenkeeper error");
    /// assert!(cause.is_reauth_required());
    /// ```
    pub fn from_middleware(err: &reqwest_middleware::Error) -> Option<&Error> {
        match err {
            reqwest_middleware::Error::Middleware(e) => e.chain().find_map(|e| {
                e.downcast_ref::<Error>()
                    .or_else(|| match e.downcast_ref() {
                        Some(RequestError::Token(e)) => Some(e),
                        _ => None,
                    })
            }),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for reqwest_middleware::Error {}
}

/// What a [`reqwest_middleware::Error`] from a client with [`TokenMiddleware`] means for the
/// caller, without downcasting.
///
/// Import the trait and ask the error directly:
///
/// ```
/// use tokenkeeper::{Error, InvalidationReason, MiddlewareErrorExt, RequestError, TokenKey};
///
/// let dead = Error::ReauthorizationRequired {
///     key: TokenKey::from("customer-42"),
///     reason: InvalidationReason::PasswordChanged,
/// };
/// let err = reqwest_middleware::Error::middleware(RequestError::Token(dead));
/// if err.is_reauth_required() {
///     // ask the owner of the grant to reconnect
/// }
/// assert!(!err.is_retryable());
/// assert!(matches!(
///     err.tokenkeeper_error(),
///     Some(Error::ReauthorizationRequired { reason: InvalidationReason::PasswordChanged, .. })
/// ));
/// ```
///
/// The trait is sealed: it is implemented for [`reqwest_middleware::Error`] only.
pub trait MiddlewareErrorExt: sealed::Sealed {
    /// The `tokenkeeper` [`Error`] behind the failure, if no usable access token could be had
    /// (see [`Error::from_middleware`]).
    fn tokenkeeper_error(&self) -> Option<&Error>;

    /// The [`RequestError`] [`TokenMiddleware`] failed with, if it did: besides a token error,
    /// a second rejection right after a refresh ([`RequestError::Rejected`]) or a token that
    /// cannot be sent in a header ([`RequestError::InvalidTokenValue`]).
    fn request_error(&self) -> Option<&RequestError>;

    /// Whether only a human re-authorizing the grant can fix this
    /// ([`Error::is_reauth_required`]).
    fn is_reauth_required(&self) -> bool {
        self.tokenkeeper_error()
            .is_some_and(Error::is_reauth_required)
    }

    /// Whether `tokenkeeper` says that retrying later can succeed (rate limited, provider or
    /// store unavailable; [`Error::is_retryable`]). `false` for errors `tokenkeeper` did not
    /// make: a network error of the API call itself is the
    /// [`reqwest_middleware::Error::Reqwest`] variant, to judge with its own `is_timeout`,
    /// `is_connect`….
    fn is_retryable(&self) -> bool {
        self.tokenkeeper_error().is_some_and(Error::is_retryable)
    }

    /// How long to wait before retrying, when `tokenkeeper` knows ([`Error::retry_after`]).
    fn retry_after(&self) -> Option<Duration> {
        self.tokenkeeper_error().and_then(Error::retry_after)
    }
}

impl MiddlewareErrorExt for reqwest_middleware::Error {
    fn tokenkeeper_error(&self) -> Option<&Error> {
        Error::from_middleware(self)
    }

    fn request_error(&self) -> Option<&RequestError> {
        request_error(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::InvalidationReason;

    fn key() -> TokenKey {
        TokenKey::from("customer-42")
    }

    #[test]
    fn token_errors_are_found_through_the_middleware_error() {
        let dead = reqwest_middleware::Error::middleware(RequestError::Token(
            Error::ReauthorizationRequired {
                key: key(),
                reason: InvalidationReason::Revoked,
            },
        ));
        assert!(dead.is_reauth_required() && !dead.is_retryable());
        assert_eq!(dead.tokenkeeper_error().and_then(Error::key), Some(&key()));
        assert!(matches!(dead.request_error(), Some(RequestError::Token(_))));

        let limited =
            reqwest_middleware::Error::middleware(RequestError::Token(Error::RateLimited {
                key: key(),
                retry_after: Some(Duration::from_secs(30)),
            }));
        assert!(limited.is_retryable() && !limited.is_reauth_required());
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(30)));
    }

    #[test]
    fn context_added_by_another_middleware_does_not_hide_the_cause() {
        let inner = anyhow::Error::new(RequestError::Token(Error::ReauthorizationRequired {
            key: key(),
            reason: InvalidationReason::InvalidGrant,
        }))
        .context("outer middleware");
        let err = reqwest_middleware::Error::Middleware(inner);
        assert!(err.is_reauth_required());
        // A bare `Error` from a middleware of the app's own is found too.
        let bare = reqwest_middleware::Error::middleware(Error::NotFound { key: key() });
        assert!(matches!(
            Error::from_middleware(&bare),
            Some(Error::NotFound { .. })
        ));
    }

    #[test]
    fn other_failures_are_not_token_errors() {
        let rejected = reqwest_middleware::Error::middleware(RequestError::Rejected {
            key: key(),
            status: 401,
        });
        assert!(rejected.tokenkeeper_error().is_none());
        assert!(matches!(
            rejected.request_error(),
            Some(RequestError::Rejected { status: 401, .. })
        ));
        assert!(!rejected.is_reauth_required() && !rejected.is_retryable());

        let missing = reqwest_middleware::Error::middleware(MissingTokenKey);
        assert!(missing.tokenkeeper_error().is_none() && missing.request_error().is_none());
        let reqwest_middleware::Error::Middleware(e) = &missing else {
            panic!("a middleware error");
        };
        assert!(e.chain().any(|e| e.is::<MissingTokenKey>()));
    }
}
