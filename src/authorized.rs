//! Authorized HTTP: bearer tokens on requests, one refresh-and-retry on a rejected token, and
//! failover across grants for one resource.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http_auth::parser::ChallengeParser;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Request, Response};

use crate::error::Error;
use crate::event::Event;
use crate::manager::TokenManager;
use crate::token::{AccessToken, TokenKey};

#[cfg(feature = "middleware")]
mod middleware;
#[cfg(feature = "middleware")]
pub use middleware::{MiddlewareErrorExt, MissingTokenKey, TokenMiddleware};

/// Which API replies mean "this access token is no longer good" (refresh and retry once).
///
/// Whatever the policy, `429` never counts, and `403` with
/// `WWW-Authenticate: Bearer error="insufficient_scope"` never counts: that needs new
/// consent, not a refresh (RFC 6750 §3.1).
#[derive(Clone)]
pub struct Rejection(Kind);

#[derive(Clone)]
enum Kind {
    Rfc6750,
    Any401,
    ConstantContact,
    Any4xx,
    Custom(Arc<RejectionFn>),
}

/// A custom rejection test: status, headers, body.
type RejectionFn = dyn Fn(u16, &HeaderMap, &[u8]) -> bool + Send + Sync;

impl Rejection {
    /// RFC 6750 §3: `401` with `WWW-Authenticate: Bearer error="invalid_token"` (the default).
    pub fn rfc6750() -> Self {
        Self(Kind::Rfc6750)
    }

    /// Any `401`.
    pub fn any_401() -> Self {
        Self(Kind::Any401)
    }

    /// The Constant Contact style: `401` with the body `{"error_key":"unauthorized",…}`, or an
    /// RFC 6750 `invalid_token` challenge.
    pub fn constant_contact() -> Self {
        Self(Kind::ConstantContact)
    }

    /// Any `4xx` (as the Xoxoday docs advise: "on every 4xx, refresh"). The once-per-token
    /// guard keeps this from becoming a refresh storm.
    pub fn any_4xx() -> Self {
        Self(Kind::Any4xx)
    }

    /// A custom test on status, headers and body (the body is read only for `4xx` replies).
    pub fn custom(f: impl Fn(u16, &HeaderMap, &[u8]) -> bool + Send + Sync + 'static) -> Self {
        Self(Kind::Custom(Arc::new(f)))
    }

    fn needs_body(&self, status: u16) -> bool {
        match self.0 {
            Kind::ConstantContact => status == 401,
            Kind::Custom(_) => (400..500).contains(&status),
            _ => false,
        }
    }

    fn rejects(&self, status: u16, headers: &HeaderMap, body: &[u8]) -> bool {
        let bearer_error = bearer_error(headers);
        let bearer_error = bearer_error.as_deref();
        if status == 429 || (status == 403 && bearer_error == Some("insufficient_scope")) {
            return false;
        }
        match &self.0 {
            Kind::Rfc6750 => status == 401 && bearer_error == Some("invalid_token"),
            Kind::Any401 => status == 401,
            Kind::ConstantContact => {
                status == 401
                    && (bearer_error == Some("invalid_token")
                        || serde_json::from_slice::<serde_json::Value>(body)
                            .is_ok_and(|v| v["error_key"] == "unauthorized"))
            }
            Kind::Any4xx => (400..500).contains(&status),
            Kind::Custom(f) => f(status, headers, body),
        }
    }
}

impl Default for Rejection {
    fn default() -> Self {
        Self::rfc6750()
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Kind::Rfc6750 => "Rejection::rfc6750",
            Kind::Any401 => "Rejection::any_401",
            Kind::ConstantContact => "Rejection::constant_contact",
            Kind::Any4xx => "Rejection::any_4xx",
            Kind::Custom(_) => "Rejection::custom",
        })
    }
}

/// The `error` parameter of a `Bearer` challenge (RFC 6750 §3) in the `WWW-Authenticate`
/// headers, which hold RFC 9110 §11.6.1 challenge lists: one header may carry several
/// challenges, a quoted value may hold commas and escapes, and scheme and parameter names are
/// case-insensitive. A header that stops parsing counts up to the challenge before the error.
fn bearer_error(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| ChallengeParser::new(value).map_while(Result::ok))
        .filter(|challenge| challenge.scheme.eq_ignore_ascii_case("Bearer"))
        .find_map(|challenge| {
            let (_, error) = challenge
                .params
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("error"))?;
            Some(error.to_unescaped())
        })
}

/// Why an authorized request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No usable access token: the grant is dead, rate limited, unavailable… (see [`Error`]).
    #[error("no usable access token")]
    Token(#[source] Error),
    /// The HTTP request itself failed.
    #[error("request failed")]
    Http(#[source] reqwest::Error),
    /// The API rejected the token again right after a refresh; not retried further.
    #[error("access token for grant `{key}` rejected again after a refresh (http {status})")]
    Rejected {
        /// The grant.
        key: TokenKey,
        /// The status of the second rejection.
        status: u16,
    },
    /// The grant's access token cannot be sent: it is not a valid HTTP header value (it holds
    /// a line break or another control character). Nothing was sent, rather than sending the
    /// request without authorization.
    ///
    /// The token came from the provider (or from [`TokenManager::insert`]) as it is; it is
    /// not refreshed on this account (that would refresh on every request), and it stays
    /// unusable until the grant gets a new token (its expiry,
    /// [`TokenManager::refresh_now`], or a new grant). [`AuthorizedClient::send_any`] skips
    /// such a grant.
    #[error("access token for grant `{key}` cannot be sent in an http header")]
    InvalidTokenValue {
        /// The grant.
        key: TokenKey,
    },
    /// Every grant of a failover group was unusable.
    #[error("no grant in the group is usable")]
    NoUsableGrant {
        /// Each grant tried, with why it was skipped.
        skipped: Vec<(TokenKey, Error)>,
    },
}

impl RequestError {
    /// Whether only a human re-authorizing can fix this.
    pub fn is_reauth_required(&self) -> bool {
        matches!(self, RequestError::Token(e) if e.is_reauth_required())
    }
}

impl From<Error> for RequestError {
    fn from(e: Error) -> Self {
        RequestError::Token(e)
    }
}

/// The logic shared by [`AuthorizedClient`] and the middleware.
#[derive(Clone)]
struct Authorizer {
    manager: TokenManager,
    rejection: Rejection,
    /// Per grant, the one token generation the API rejected even right after a refresh:
    /// rejections of that token do not refresh again (no refresh per request against an API
    /// that rejects everything). See [`Stuck`].
    stuck: Arc<Stuck>,
}

/// The "stuck" markers of an [`Authorizer`]: at most one access token per grant.
///
/// A marker belongs to one token generation and is cleared as soon as it no longer describes
/// the grant: when a request with the marked token is accepted (the rejection was transient),
/// or when the grant's token changes (a new generation, whoever refreshed it). A later
/// rejection, such as a real revocation, then refreshes again.
#[derive(Default)]
struct Stuck {
    tokens: Mutex<HashMap<TokenKey, AccessToken>>,
    /// Whether `tokens` may be non-empty, so that accepted requests skip the lock when no
    /// grant is stuck (the usual case).
    any: AtomicBool,
}

impl Stuck {
    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<TokenKey, AccessToken>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `token` is the stuck generation of `key`. A marker for another token is an
    /// older generation's and is cleared.
    fn is_stuck(&self, key: &TokenKey, token: &AccessToken) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut tokens = self.tokens();
        match tokens.get(key) {
            Some(stuck) if stuck == token => true,
            Some(_) => {
                tokens.remove(key);
                self.any.store(!tokens.is_empty(), Ordering::Release);
                false
            }
            None => false,
        }
    }

    fn mark(&self, key: &TokenKey, token: AccessToken) {
        let mut tokens = self.tokens();
        tokens.insert(key.clone(), token);
        self.any.store(true, Ordering::Release);
    }

    /// The API accepted a token of `key`: whatever marker the grant had is out of date.
    fn clear(&self, key: &TokenKey) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut tokens = self.tokens();
        if tokens.remove(key).is_some() {
            self.any.store(!tokens.is_empty(), Ordering::Release);
        }
    }
}

enum Verdict {
    Accepted(Response),
    /// Rejected; the response (body intact) for a caller who cannot retry.
    Rejected(Response),
}

impl Authorizer {
    fn new(manager: TokenManager, rejection: Rejection) -> Self {
        Self {
            manager,
            rejection,
            stuck: Arc::default(),
        }
    }

    async fn inspect(&self, response: Response) -> Result<Verdict, reqwest::Error> {
        let status = response.status().as_u16();
        if !self.rejection.needs_body(status) {
            let rejected = self.rejection.rejects(status, response.headers(), &[]);
            return Ok(verdict(response, rejected));
        }
        let (status_code, version) = (response.status(), response.version());
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        let rejected = self.rejection.rejects(status, &headers, &body);
        // The body was read to decide; hand the caller an equivalent response.
        let mut rebuilt = http::Response::new(body);
        *rebuilt.status_mut() = status_code;
        *rebuilt.version_mut() = version;
        *rebuilt.headers_mut() = headers;
        let rebuilt = Response::from(rebuilt);
        Ok(verdict(rebuilt, rejected))
    }

    /// After a rejection of `token`: the token to retry with, or `None` not to retry.
    async fn after_rejection(
        &self,
        key: &TokenKey,
        token: &AccessToken,
    ) -> Result<Option<AccessToken>, Error> {
        if self.stuck.is_stuck(key, token) {
            return Ok(None);
        }
        // One refresh per token generation, however many requests failed with it.
        self.manager.invalidate(key, token).await.map(Some)
    }

    fn rejected_after_refresh(&self, key: &TokenKey, token: AccessToken) {
        self.stuck.mark(key, token);
    }

    /// The API accepted a token of `key`: a rejection of it was transient.
    fn accepted(&self, key: &TokenKey) {
        self.stuck.clear(key);
    }
}

fn verdict(response: Response, rejected: bool) -> Verdict {
    if rejected {
        Verdict::Rejected(response)
    } else {
        Verdict::Accepted(response)
    }
}

/// Puts `token` in `request`'s `Authorization` header (marked sensitive), or fails with
/// [`RequestError::InvalidTokenValue`] if it cannot be a header value.
fn authorize(
    request: &mut Request,
    key: &TokenKey,
    token: &AccessToken,
) -> Result<(), RequestError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.secret()))
        .map_err(|_| RequestError::InvalidTokenValue { key: key.clone() })?;
    value.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, value);
    Ok(())
}

/// Sends requests with a grant's bearer token, for apps that do not use `reqwest-middleware`.
///
/// On a reply the [`Rejection`] policy says means "token no longer good", it refreshes (once
/// per token generation, coalesced with any refresh in flight) and retries the request once.
/// A request whose body cannot be cloned (a stream) is not retried: the caller gets the
/// rejected response, and the grant is still refreshed for the next call.
///
/// If the API rejects even the freshly refreshed token, that token is marked "stuck": further
/// rejections of it fail with [`RequestError::Rejected`] without refreshing again, so an API
/// that rejects everything cannot cause a refresh per request. The mark belongs to that one
/// token: it is cleared as soon as the API accepts a request of the grant (the rejection was
/// transient) or the grant's token changes (a new generation), after which a rejection
/// refreshes again, so a later real revocation is still detected.
///
/// ```
/// # async fn run(manager: tokenkeeper::TokenManager) -> Result<(), tokenkeeper::RequestError> {
/// use tokenkeeper::{AuthorizedClient, Rejection, TokenKey};
/// let client = AuthorizedClient::new(reqwest::Client::new(), manager)
///     .rejection(Rejection::constant_contact());
/// let request = reqwest::Client::new().get("https://api.example.com/v3/contacts").build()
///     .map_err(tokenkeeper::RequestError::Http)?;
/// let response = client.send(&TokenKey::from("customer-42"), request).await?;
/// # let _ = response; Ok(()) }
/// ```
#[derive(Clone)]
pub struct AuthorizedClient {
    http: reqwest::Client,
    auth: Authorizer,
}

impl fmt::Debug for AuthorizedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizedClient")
            .field("rejection", &self.auth.rejection)
            .finish_non_exhaustive()
    }
}

impl AuthorizedClient {
    /// A client sending through `http` with tokens from `manager`, using [`Rejection::rfc6750`].
    pub fn new(http: reqwest::Client, manager: TokenManager) -> Self {
        Self {
            http,
            auth: Authorizer::new(manager, Rejection::default()),
        }
    }

    /// Sets what counts as a rejected token.
    pub fn rejection(mut self, rejection: Rejection) -> Self {
        self.auth = Authorizer::new(self.auth.manager, rejection);
        self
    }

    /// Sends `request` with the bearer token of `key`.
    ///
    /// # Errors
    ///
    /// [`RequestError::Token`] when no token can be had (the grant is dead, rate limited,
    /// unavailable…), [`RequestError::InvalidTokenValue`] when the token cannot be put in a
    /// header (nothing is sent), [`RequestError::Http`] when the request fails, and
    /// [`RequestError::Rejected`] when the API rejects the token again right after a refresh.
    pub async fn send(&self, key: &TokenKey, request: Request) -> Result<Response, RequestError> {
        let token = self.auth.manager.access_token(key).await?;
        let retry = request.try_clone();
        let mut request = request;
        authorize(&mut request, key, &token)?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(RequestError::Http)?;
        let rejected = match self
            .auth
            .inspect(response)
            .await
            .map_err(RequestError::Http)?
        {
            Verdict::Accepted(response) => {
                self.auth.accepted(key);
                return Ok(response);
            }
            Verdict::Rejected(response) => response,
        };
        let status = rejected.status().as_u16();
        let Some(fresh) = self.auth.after_rejection(key, &token).await? else {
            return Err(RequestError::Rejected {
                key: key.clone(),
                status,
            });
        };
        let Some(mut retry) = retry else {
            return Ok(rejected);
        };
        authorize(&mut retry, key, &fresh)?;
        let response = self.http.execute(retry).await.map_err(RequestError::Http)?;
        match self
            .auth
            .inspect(response)
            .await
            .map_err(RequestError::Http)?
        {
            Verdict::Accepted(response) => {
                self.auth.accepted(key);
                Ok(response)
            }
            Verdict::Rejected(response) => {
                self.auth.rejected_after_refresh(key, fresh);
                Err(RequestError::Rejected {
                    key: key.clone(),
                    status: response.status().as_u16(),
                })
            }
        }
    }

    /// Sends `request` with the first usable grant of `group`, in order of preference: for
    /// apps that hold several grants for one resource (say, several admins connected the same
    /// page) so that one dead grant does not break them.
    ///
    /// A grant that needs re-authorization, is missing, whose token the API keeps rejecting, or
    /// whose token cannot be sent ([`RequestError::InvalidTokenValue`], reported as
    /// [`Error::Unavailable`] with [`UnavailableCause::InvalidResponse`](crate::UnavailableCause::InvalidResponse))
    /// is skipped and reported with [`Event::GrantSkipped`]; the next one is used. Returns the
    /// key that served the request. A request whose body cannot be cloned is tried with the
    /// first grant that yields a token only.
    pub async fn send_any(
        &self,
        group: &[TokenKey],
        request: Request,
    ) -> Result<(TokenKey, Response), RequestError> {
        let mut skipped = Vec::new();
        let mut request = Some(request);
        for (i, key) in group.iter().enumerate() {
            let Some(current) = request.take() else { break };
            let last = i + 1 == group.len();
            let spare = if last { None } else { current.try_clone() };
            let outcome = self.send(key, current).await;
            let error = match outcome {
                Ok(response) => return Ok((key.clone(), response)),
                Err(RequestError::Token(e)) if !matches!(e, Error::Misconfigured { .. }) => e,
                Err(RequestError::Rejected { key, status }) => Error::ReauthorizationRequired {
                    key,
                    reason: crate::error::InvalidationReason::Provider {
                        code: format!("api rejected a fresh token (http {status})"),
                    },
                },
                // The provider issued a token this grant cannot use; another grant may serve.
                Err(RequestError::InvalidTokenValue { key }) => Error::Unavailable {
                    key,
                    cause: crate::error::UnavailableCause::InvalidResponse,
                    status: None,
                    retry_after: None,
                    source: None,
                },
                Err(other) => return Err(other),
            };
            self.auth.manager.emit(Event::GrantSkipped {
                at: self.auth.manager.clock().now(),
                key: key.clone(),
                error: error.clone(),
            });
            skipped.push((key.clone(), error));
            request = spare;
        }
        Err(RequestError::NoUsableGrant { skipped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(values: &[&str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(WWW_AUTHENTICATE, HeaderValue::from_str(value).unwrap());
        }
        bearer_error(&headers)
    }

    #[test]
    fn reads_the_error_of_a_bearer_challenge() {
        let e = error_of(&[r#"Bearer realm="api", error="invalid_token""#]);
        assert_eq!(e.as_deref(), Some("invalid_token"));
        let e = error_of(&["Bearer error=invalid_token"]);
        assert_eq!(e.as_deref(), Some("invalid_token"));
        assert_eq!(error_of(&[r#"Bearer realm="api""#]), None);
        assert_eq!(error_of(&[]), None);
    }

    #[test]
    fn names_are_case_insensitive() {
        let e = error_of(&[r#"BEARER ERROR="invalid_token""#]);
        assert_eq!(e.as_deref(), Some("invalid_token"));
    }

    #[test]
    fn a_comma_inside_a_quoted_value_does_not_end_it() {
        let e = error_of(&[
            r#"Bearer error_description="bad, error=\"invalid_token\"", error="insufficient_scope""#,
        ]);
        assert_eq!(e.as_deref(), Some("insufficient_scope"));
    }

    #[test]
    fn escapes_in_quoted_values_are_undone() {
        let e = error_of(&[r#"Bearer error="invalid\_token""#]);
        assert_eq!(e.as_deref(), Some("invalid_token"));
    }

    #[test]
    fn finds_the_bearer_challenge_among_several() {
        let e = error_of(&[r#"Basic realm="a, b", Bearer error="invalid_token""#]);
        assert_eq!(e.as_deref(), Some("invalid_token"));
        let e = error_of(&[r#"Basic realm="x""#, r#"Bearer error="invalid_token""#]);
        assert_eq!(e.as_deref(), Some("invalid_token"));
        // Another scheme's `error` is not the bearer error.
        assert_eq!(error_of(&[r#"Other error="invalid_token""#]), None);
        // Nor is a scheme that merely starts with "Bearer".
        assert_eq!(error_of(&[r#"Bearerish error="invalid_token""#]), None);
    }

    #[test]
    fn a_malformed_header_counts_up_to_the_error() {
        assert_eq!(error_of(&[r#"Bearer error="invalid_token"#]), None);
        let e = error_of(&[r#"Bearer error="invalid_token", Basic realm="#]);
        assert_eq!(e.as_deref(), Some("invalid_token"));
    }
}
