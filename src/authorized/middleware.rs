//! The `reqwest-middleware` integration (feature `middleware`).

use std::fmt;

use async_trait::async_trait;
use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use super::{authorize, Authorizer, Rejection, RequestError, Verdict};
use crate::manager::TokenManager;
use crate::token::TokenKey;

/// A [`reqwest_middleware::Middleware`] that authorizes each request with the bearer token of
/// the grant named by a [`TokenKey`] in the request's extensions, and on a rejected token
/// refreshes (once per token generation) and retries once — the same behaviour as
/// [`AuthorizedClient::send`](super::AuthorizedClient::send).
///
/// Errors are [`reqwest_middleware::Error::Middleware`] wrapping a [`RequestError`]
/// (downcast it to act on [`Error::ReauthorizationRequired`](crate::Error) and friends).
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

/// A request sent through [`TokenMiddleware`] without a [`TokenKey`] extension.
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
