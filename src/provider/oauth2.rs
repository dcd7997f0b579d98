//! The RFC 6749 refresh-token grant, built on the `oauth2` crate over `reqwest`.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use oauth2::basic::BasicClient;
use oauth2::{AuthType, EndpointNotSet, EndpointSet, Scope, TokenUrl};
use reqwest::header::{HeaderMap, AUTHORIZATION};

use super::http::transport_error;
use super::{Classifier, HttpReply, Provider, RefreshRequest, StandardClassifier};
use crate::error::{ConfigProblem, Error, InvalidationReason, ProviderError, ProviderErrorKind};
use crate::provider::DEFAULT_BODY_LIMIT;
use crate::token::{ClientSecret, RefreshExpiry, TokenResponse};

type Client =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientAuth {
    /// HTTP Basic with the url-encoded client id and secret (the RFC's preferred method).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body.
    RequestBody,
}

/// Which RFC 6749 grant an [`OAuth2Provider`] uses to renew tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Grant {
    /// `grant_type=refresh_token` (§6): renews a user's grant with its refresh token (the
    /// default). A grant without a refresh token cannot be renewed.
    #[default]
    RefreshToken,
    /// `grant_type=client_credentials` (§4.4): machine-to-machine access with the client's
    /// own credentials, for the builder's [`scopes`](OAuth2ProviderBuilder::scopes) and
    /// [`extra_param`](OAuth2ProviderBuilder::extra_param)s (an `audience`, say). No refresh
    /// token is needed: the token is simply obtained again before it expires, so such a grant
    /// never dies for lack of one ([`Provider::can_refresh`] is always `true`). Nor does it die
    /// at all: with no user to re-authorize, a refusal that would kill a user's grant
    /// (`invalid_grant`, `access_denied`, …) is reported as
    /// [`Misconfigured`](crate::Error::Misconfigured) with [`ConfigProblem::OAuth`] and the
    /// code, like `invalid_client`.
    ///
    /// Start one by inserting [`TokenSet::pending`](crate::TokenSet::pending): the first
    /// [`access_token`](crate::TokenManager::access_token) call (or the background refresher)
    /// obtains the first token, with the manager's single-flight, backoff and events.
    ///
    /// ```
    /// use tokenkeeper::{ClientSecret, Grant, OAuth2Provider, TokenKey, TokenManager, TokenSet};
    /// # async fn run() -> Result<(), tokenkeeper::Error> {
    /// let provider = OAuth2Provider::builder("service-a", "https://auth.example.com/oauth2/token")
    ///     .client_secret(ClientSecret::new("service-a-secret"))
    ///     .grant(Grant::ClientCredentials)
    ///     .scopes(["reports:read"])
    ///     .extra_param("audience", "https://api.example.com")
    ///     .build()?;
    /// let manager = TokenManager::builder(provider).build();
    /// let key = TokenKey::from("reports-api");
    /// manager.insert(key.clone(), TokenSet::pending()).await?;
    /// let token = manager.access_token(&key).await?; // obtained now, renewed before expiry
    /// # let _ = token; Ok(()) }
    /// ```
    ClientCredentials,
}

/// A [`Provider`] for standard RFC 6749 token endpoints: `grant_type=refresh_token`, or
/// `client_credentials` (see [`Grant`]).
///
/// The request is built by the [`oauth2`] crate (client authentication, scopes, extra
/// parameters) and sent with a [`reqwest::Client`]. The reply is read here, with a size limit,
/// so that its HTTP status and headers (`Retry-After`) reach the [`Classifier`], and so that
/// common deviations (`expires_in` as a string, epoch expiries) parse; see
/// [`StandardClassifier`] for the rules.
///
/// Redirects are never followed by the default HTTP client: a token endpoint that redirects
/// is a wrong token URL, reported as [`ConfigProblem::Endpoint`], not retried (see
/// [`OAuth2ProviderBuilder::http_client`]).
///
/// ```
/// use tokenkeeper::{ClientAuth, ClientSecret, OAuth2Provider};
/// let provider = OAuth2Provider::builder("my-client-id", "https://auth.example.com/oauth2/token")
///     .client_secret(ClientSecret::new("my-client-secret"))
///     .client_auth(ClientAuth::Basic)
///     .scopes(["offline_access"])
///     .build()?;
/// # Ok::<(), tokenkeeper::Error>(())
/// ```
pub struct OAuth2Provider {
    client: Client,
    /// The renewal request as `oauth2` builds it, made once (see [`Template`]).
    template: Result<Template, ProviderError>,
    http: reqwest::Client,
    grant: Grant,
    scopes: Vec<String>,
    classifier: Arc<dyn Classifier>,
    body_limit: usize,
    timeout: Option<Duration>,
    revocation: Option<Revocation>,
    refresh_expiry: Option<RefreshExpiry>,
}

/// Where and how to revoke tokens (RFC 7009).
struct Revocation {
    url: reqwest::Url,
    client_id: String,
    client_secret: Option<ClientSecret>,
    auth: ClientAuth,
}

impl OAuth2Provider {
    /// Starts building a provider for `client_id` at the token endpoint `token_url`.
    pub fn builder(
        client_id: impl Into<String>,
        token_url: impl Into<String>,
    ) -> OAuth2ProviderBuilder {
        OAuth2ProviderBuilder {
            client_id: client_id.into(),
            token_url: token_url.into(),
            client_secret: None,
            auth: ClientAuth::default(),
            grant: Grant::default(),
            scopes: Vec::new(),
            extra_params: Vec::new(),
            classifier: Arc::new(StandardClassifier),
            http: None,
            body_limit: DEFAULT_BODY_LIMIT,
            timeout: Some(Duration::from_secs(30)),
            revocation_url: None,
            refresh_expiry: None,
        }
    }
}

impl fmt::Debug for OAuth2Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Provider")
            .field("client_id", &self.client.client_id().as_str())
            .field("token_url", &self.client.token_uri().as_str())
            .field("grant", &self.grant)
            .field("scopes", &self.scopes)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Builds an [`OAuth2Provider`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct OAuth2ProviderBuilder {
    client_id: String,
    token_url: String,
    client_secret: Option<ClientSecret>,
    auth: ClientAuth,
    grant: Grant,
    scopes: Vec<String>,
    extra_params: Vec<(String, String)>,
    classifier: Arc<dyn Classifier>,
    http: Option<reqwest::Client>,
    body_limit: usize,
    timeout: Option<Duration>,
    revocation_url: Option<String>,
    refresh_expiry: Option<RefreshExpiry>,
}

impl fmt::Debug for OAuth2ProviderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2ProviderBuilder")
            .field("client_id", &self.client_id)
            .field("token_url", &self.token_url)
            .field("client_secret", &self.client_secret)
            .field("auth", &self.auth)
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl OAuth2ProviderBuilder {
    /// The client secret (omit for public clients, which send `client_id` in the body).
    pub fn client_secret(mut self, secret: ClientSecret) -> Self {
        self.client_secret = Some(secret);
        self
    }

    /// How to authenticate the client (default [`ClientAuth::Basic`]).
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.auth = auth;
        self
    }

    /// The grant used to renew tokens (default [`Grant::RefreshToken`]).
    pub fn grant(mut self, grant: Grant) -> Self {
        self.grant = grant;
        self
    }

    /// Scopes to request on refresh (usually none for [`Grant::RefreshToken`]: the grant keeps
    /// its scopes; the scopes to obtain for [`Grant::ClientCredentials`]).
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// An extra form parameter sent with every refresh (an `audience` or `resource` for
    /// [`Grant::ClientCredentials`], say).
    pub fn extra_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_params.push((name.into(), value.into()));
        self
    }

    /// A classifier for the provider's non-standard replies (default: the RFC rules only).
    pub fn classifier(mut self, classifier: impl Classifier) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// The HTTP client to use (default: a new `reqwest::Client` that never follows
    /// redirects).
    ///
    /// Disable redirects on this client too
    /// (`reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())`): following a
    /// `307`/`308` re-sends the refresh token and client secret to wherever it points, and a
    /// `301`-`303` turns the POST into a GET. A redirect is always classified as
    /// [`ConfigProblem::Endpoint`] (the token URL is wrong), but a client that follows it has
    /// already sent the credentials by the time the reply is seen.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Per-request timeout (default 30 s; `None` leaves it to the HTTP client).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The RFC 7009 revocation endpoint, used by
    /// [`TokenManager::disconnect`](crate::TokenManager::disconnect) (default: none, and
    /// disconnecting only forgets the grant).
    pub fn revocation_url(mut self, url: impl Into<String>) -> Self {
        self.revocation_url = Some(url.into());
        self
    }

    /// How this provider's refresh tokens expire, for every grant whose tokens do not say
    /// (see [`Provider::refresh_expiry`]): say, `RefreshExpiry::Sliding { idle: 180 days }` for
    /// a provider whose refresh tokens die after 180 days unused, which sets keep-alive to
    /// every 45 days.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenkeeper::{OAuth2Provider, RefreshExpiry};
    /// let provider = OAuth2Provider::builder("client-id", "https://auth.example.com/token")
    ///     .refresh_expiry(RefreshExpiry::Sliding { idle: Duration::from_secs(180 * 86_400) })
    ///     .build()?;
    /// # Ok::<(), tokenkeeper::Error>(())
    /// ```
    pub fn refresh_expiry(mut self, expiry: RefreshExpiry) -> Self {
        self.refresh_expiry = Some(expiry);
        self
    }

    /// Largest reply body accepted (default [`DEFAULT_BODY_LIMIT`]).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Builds the provider.
    ///
    /// # Errors
    ///
    /// [`Error::Misconfigured`] if the token URL does not parse or the default HTTP client
    /// cannot be built.
    pub fn build(self) -> Result<OAuth2Provider, Error> {
        let misconfigured =
            |problem, source: Option<crate::error::SharedError>| Error::Misconfigured {
                key: None,
                problem,
                status: None,
                source,
            };
        let token_url = TokenUrl::new(self.token_url)
            .map_err(|e| misconfigured(ConfigProblem::Endpoint, Some(Arc::new(e))))?;
        let revocation = match self.revocation_url {
            None => None,
            Some(url) => Some(Revocation {
                url: reqwest::Url::parse(&url)
                    .map_err(|e| misconfigured(ConfigProblem::Endpoint, Some(Arc::new(e))))?,
                client_id: self.client_id.clone(),
                client_secret: self.client_secret.clone(),
                auth: self.auth,
            }),
        };
        let mut client = BasicClient::new(oauth2::ClientId::new(self.client_id))
            .set_token_uri(token_url)
            .set_auth_type(match self.auth {
                ClientAuth::Basic => AuthType::BasicAuth,
                ClientAuth::RequestBody => AuthType::RequestBody,
            });
        if let Some(secret) = self.client_secret {
            client =
                client.set_client_secret(oauth2::ClientSecret::new(secret.secret().to_owned()));
        }
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| misconfigured(ConfigProblem::HttpClient, Some(Arc::new(e))))?,
        };
        let template = Template::new(&client, self.grant, &self.scopes, &self.extra_params);
        Ok(OAuth2Provider {
            client,
            template,
            http,
            grant: self.grant,
            scopes: self.scopes,
            classifier: self.classifier,
            body_limit: self.body_limit,
            timeout: self.timeout,
            revocation,
            refresh_expiry: self.refresh_expiry,
        })
    }
}

/// The renewal request, as the `oauth2` crate builds it, made once when the provider is built.
///
/// Every refresh of every grant sends the same request but for the refresh token: the same
/// URL, headers (client authentication included) and form parameters (grant type, scopes,
/// extra parameters). So `oauth2` builds it once, with a marker where the refresh token goes,
/// and each refresh copies it with the grant's refresh token, form-encoded, in the marker's
/// place: the bytes `oauth2` would build, without building them again on every refresh (client
/// authentication, form encoding, and the URL parsed back from the request's URI).
///
/// Holds the client secret (in the `Authorization` header or the body): no `Debug`.
struct Template {
    method: reqwest::Method,
    url: reqwest::Url,
    version: http::Version,
    headers: HeaderMap,
    /// The form body without the refresh token.
    body: String,
    /// Where in `body` the form-encoded refresh token goes (`None`: client credentials).
    token_at: Option<usize>,
}

impl Template {
    /// Lets `oauth2` build the request once; the error every refresh would get if it cannot.
    fn new(
        client: &Client,
        grant: Grant,
        scopes: &[String],
        extra_params: &[(String, String)],
    ) -> Result<Self, ProviderError> {
        // Form-encodes to itself (unreserved characters only) and occurs nowhere else.
        let marker = format!(
            "tokenkeeper.refresh-token.{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let captured = RefCell::new(None);
        let capture = |request: oauth2::HttpRequest| -> Result<oauth2::HttpResponse, Captured> {
            *captured.borrow_mut() = Some(request);
            Err(Captured)
        };
        match grant {
            Grant::RefreshToken => {
                let token = oauth2::RefreshToken::new(marker.clone());
                let mut request = client.exchange_refresh_token(&token);
                for scope in scopes {
                    request = request.add_scope(Scope::new(scope.clone()));
                }
                for (name, value) in extra_params {
                    request = request.add_extra_param(name.as_str(), value.as_str());
                }
                let _ = request.request(&capture);
            }
            Grant::ClientCredentials => {
                let mut request = client.exchange_client_credentials();
                for scope in scopes {
                    request = request.add_scope(Scope::new(scope.clone()));
                }
                for (name, value) in extra_params {
                    request = request.add_extra_param(name.as_str(), value.as_str());
                }
                let _ = request.request(&capture);
            }
        }
        // `oauth2` could not build the request.
        let unbuildable = || ProviderError::misconfigured(ConfigProblem::HttpClient);
        let request = captured.into_inner().ok_or_else(unbuildable)?;
        // As `reqwest::Request::try_from(request)` would, once.
        let url = reqwest::Url::parse(&request.uri().to_string())
            .map_err(|e| unbuildable().with_source(e))?;
        let (parts, body) = request.into_parts();
        let body = String::from_utf8(body).map_err(|_| unbuildable())?;
        let (body, token_at) = match grant {
            Grant::RefreshToken => {
                let mut found = body.match_indices(marker.as_str()).map(|(at, _)| at);
                let (Some(at), None) = (found.next(), found.next()) else {
                    return Err(unbuildable());
                };
                let mut body = body.clone();
                body.replace_range(at..at + marker.len(), "");
                (body, Some(at))
            }
            Grant::ClientCredentials => (body, None),
        };
        let mut headers = parts.headers;
        if let Some(auth) = headers.get_mut(AUTHORIZATION) {
            auth.set_sensitive(true);
        }
        Ok(Self {
            method: parts.method,
            url,
            version: parts.version,
            headers,
            body,
            token_at,
        })
    }

    /// The request for one renewal, with `refresh_token` in place.
    fn request(&self, refresh_token: Option<&str>, timeout: Option<Duration>) -> reqwest::Request {
        let body = match (self.token_at, refresh_token) {
            (Some(at), Some(token)) => {
                // One allocation: the form around the token, the token encoded in place. `at`
                // is where `Template::new` found the marker: a character boundary.
                let (before, after) = self.body.split_at(at);
                let encoded = form_urlencoded::byte_serialize(token.as_bytes());
                let mut body = String::with_capacity(self.body.len() + token.len() * 3);
                body.push_str(before);
                body.extend(encoded);
                body.push_str(after);
                body
            }
            _ => self.body.clone(),
        };
        let mut request = reqwest::Request::new(self.method.clone(), self.url.clone());
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.body_mut() = Some(body.into());
        if timeout.is_some() {
            *request.timeout_mut() = timeout;
        }
        request
    }
}

/// A client-credentials grant has no user who could re-authorize: a refusal that would kill a
/// user's grant (`invalid_grant`, `access_denied`, …) means the client's own configuration is
/// wrong, and is reported as [`ConfigProblem::OAuth`] with the code (or the reason).
fn no_user_to_reauthorize(e: ProviderError) -> ProviderError {
    let ProviderErrorKind::Reauthorize(reason) = &e.kind else {
        return e;
    };
    let code = match reason {
        InvalidationReason::InvalidGrant => "invalid_grant".to_owned(),
        InvalidationReason::Provider { code } => code.clone(),
        other => other.to_string(),
    };
    ProviderError {
        kind: ProviderErrorKind::Misconfigured(ConfigProblem::OAuth { code }),
        ..e
    }
}

/// Marks a request whose outcome was captured for classification.
#[derive(Debug)]
struct Captured;

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("captured")
    }
}

impl std::error::Error for Captured {}

/// Sends `oauth2`'s request with reqwest and keeps the whole reply for classification.
struct CapturingClient<'a> {
    provider: &'a OAuth2Provider,
    outcome: &'a Mutex<Option<Result<HttpReply, ProviderError>>>,
}

impl<'c> oauth2::AsyncHttpClient<'c> for CapturingClient<'_> {
    type Error = Captured;
    type Future = Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, Captured>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let provider = self.provider;
            let result = match reqwest::Request::try_from(request) {
                Ok(mut request) => {
                    if let Some(timeout) = provider.timeout {
                        *request.timeout_mut() = Some(timeout);
                    }
                    HttpReply::send(&provider.http, request, provider.body_limit).await
                }
                Err(e) => Err(transport_error(e)),
            };
            *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            Err(Captured)
        })
    }
}

impl OAuth2Provider {
    /// Exchanges an authorization code for tokens (RFC 6749 §4.1.3, with the RFC 7636 PKCE
    /// verifier): the same client authentication, HTTP client, timeout, size limit and
    /// classification as a refresh.
    pub(crate) async fn exchange_code(
        &self,
        code: &str,
        verifier: &str,
        redirect_uri: &oauth2::RedirectUrl,
        now: std::time::SystemTime,
    ) -> Result<TokenResponse, ProviderError> {
        let outcome: Mutex<Option<Result<HttpReply, ProviderError>>> = Mutex::new(None);
        let send = CapturingClient {
            provider: self,
            outcome: &outcome,
        };
        let request = self
            .client
            .exchange_code(oauth2::AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(oauth2::PkceCodeVerifier::new(verifier.to_owned()))
            .set_redirect_uri(std::borrow::Cow::Borrowed(redirect_uri));
        let _ = request.request_async(&send).await;
        self.interpret(outcome, now)
    }

    /// Classifies the reply [`CapturingClient`] kept.
    fn interpret(
        &self,
        outcome: Mutex<Option<Result<HttpReply, ProviderError>>>,
        now: std::time::SystemTime,
    ) -> Result<TokenResponse, ProviderError> {
        match outcome.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(reply)) => reply.interpret(&*self.classifier, now),
            Some(Err(e)) => Err(e),
            // `oauth2` could not build the request.
            None => Err(ProviderError::misconfigured(ConfigProblem::HttpClient)),
        }
    }
}

#[async_trait]
impl Provider for OAuth2Provider {
    async fn refresh(&self, req: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        // `oauth2` built the request once (see `Template`); the reply is read here, because
        // `oauth2`'s own handling drops the status and headers the classification needs and
        // rejects deviations (such as `expires_in` as a string) that real providers send.
        let refresh_token = match self.grant {
            Grant::RefreshToken => match req.tokens.refresh_token() {
                Some(token) => Some(token.secret()),
                None => {
                    return Err(ProviderError::reauthorize(
                        InvalidationReason::NoRefreshToken,
                    ))
                }
            },
            Grant::ClientCredentials => None,
        };
        let template = self.template.as_ref().map_err(Clone::clone)?;
        let request = template.request(refresh_token, self.timeout);
        let result = HttpReply::send(&self.http, request, self.body_limit)
            .await
            .and_then(|reply| reply.interpret(&*self.classifier, req.now));
        match self.grant {
            Grant::RefreshToken => result,
            Grant::ClientCredentials => result.map_err(no_user_to_reauthorize),
        }
    }

    /// With [`Grant::ClientCredentials`], always: the client's own credentials obtain a new
    /// token. Otherwise only with a refresh token.
    fn can_refresh(&self, tokens: &crate::token::TokenSet) -> bool {
        match self.grant {
            Grant::ClientCredentials => true,
            Grant::RefreshToken => tokens.refresh_token().is_some(),
        }
    }

    /// RFC 7009: revokes the refresh token (or, without one, the access token), which ends
    /// the grant at servers that follow §2.1. A `200` is success, whatever the token's state.
    fn refresh_expiry(&self) -> Option<RefreshExpiry> {
        self.refresh_expiry
    }

    async fn revoke(&self, req: RefreshRequest<'_>) -> Result<(), ProviderError> {
        let Some(revocation) = &self.revocation else {
            return Ok(());
        };
        let (token, hint) = match req.tokens.refresh_token() {
            Some(rt) => (rt.secret(), "refresh_token"),
            None => (req.tokens.access_token().secret(), "access_token"),
        };
        let encode =
            |s: &str| -> String { form_urlencoded::byte_serialize(s.as_bytes()).collect() };
        let basic = match (&revocation.auth, &revocation.client_secret) {
            (ClientAuth::Basic, Some(secret)) => Some(secret),
            _ => None,
        };
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("token", token);
            form.append_pair("token_type_hint", hint);
            if basic.is_none() {
                form.append_pair("client_id", &revocation.client_id);
                if let Some(secret) = &revocation.client_secret {
                    form.append_pair("client_secret", secret.secret());
                }
            }
            form.finish()
        };
        let mut builder = self
            .http
            .post(revocation.url.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body);
        if let Some(secret) = basic {
            // RFC 6749 §2.3.1: the id and secret are form-encoded before Basic encoding.
            builder =
                builder.basic_auth(encode(&revocation.client_id), Some(encode(secret.secret())));
        }
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        let request = builder.build().map_err(transport_error)?;
        let reply = HttpReply::send(&self.http, request, self.body_limit).await?;
        if let Some(err) = self.classifier.classify(&reply, req.now) {
            return Err(err.with_status(reply.status()));
        }
        match super::classify::standard(&reply, req.now) {
            Some(err) => Err(err.with_status(reply.status())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request `oauth2` builds for one renewal, converted as `reqwest` converts it.
    fn built_by_oauth2(provider: &OAuth2Provider, refresh_token: &str) -> reqwest::Request {
        let captured = RefCell::new(None);
        let capture = |request: oauth2::HttpRequest| -> Result<oauth2::HttpResponse, Captured> {
            *captured.borrow_mut() = Some(request);
            Err(Captured)
        };
        let token = oauth2::RefreshToken::new(refresh_token.to_owned());
        let scopes = provider.scopes.iter().map(|s| Scope::new(s.clone()));
        let extra = [("audience", "https://api.example.com/a b"), ("x", "1&2=3")];
        match provider.grant {
            Grant::RefreshToken => {
                let mut request = provider.client.exchange_refresh_token(&token);
                for scope in scopes {
                    request = request.add_scope(scope);
                }
                for (name, value) in extra {
                    request = request.add_extra_param(name, value);
                }
                let _ = request.request(&capture);
            }
            Grant::ClientCredentials => {
                let mut request = provider.client.exchange_client_credentials();
                for scope in scopes {
                    request = request.add_scope(scope);
                }
                for (name, value) in extra {
                    request = request.add_extra_param(name, value);
                }
                let _ = request.request(&capture);
            }
        }
        reqwest::Request::try_from(captured.into_inner().expect("a request")).expect("converts")
    }

    fn provider(auth: ClientAuth, grant: Grant, scopes: &[&str]) -> OAuth2Provider {
        OAuth2Provider::builder(
            "client id+1",
            "https://auth.example.com:8443/oauth2/token?x=1",
        )
        .client_secret(ClientSecret::new("s3cr:et/ä&="))
        .client_auth(auth)
        .grant(grant)
        .scopes(scopes.iter().copied())
        .extra_param("audience", "https://api.example.com/a b")
        .extra_param("x", "1&2=3")
        .build()
        .expect("valid configuration")
    }

    #[test]
    fn the_template_sends_what_oauth2_builds() {
        let tokens = ["rt-plain", "r t+/=&?%é", ""];
        for auth in [ClientAuth::Basic, ClientAuth::RequestBody] {
            for grant in [Grant::RefreshToken, Grant::ClientCredentials] {
                for scopes in [&[][..], &["read", "write"][..]] {
                    let provider = provider(auth, grant, scopes);
                    let template = provider.template.as_ref().expect("a template");
                    for token in tokens {
                        let sent = template.request(Some(token), None);
                        let want = built_by_oauth2(&provider, token);
                        let case = format!("{auth:?} {grant:?} {scopes:?} {token:?}");
                        assert_eq!(sent.method(), want.method(), "{case}");
                        assert_eq!(sent.url(), want.url(), "{case}");
                        assert_eq!(sent.version(), want.version(), "{case}");
                        assert_eq!(sent.headers(), want.headers(), "{case}");
                        let body = |r: &reqwest::Request| {
                            r.body().and_then(|b| b.as_bytes()).map(<[u8]>::to_vec)
                        };
                        assert_eq!(body(&sent), body(&want), "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_template_keeps_the_client_secret_out_of_debug() {
        let provider = provider(ClientAuth::Basic, Grant::RefreshToken, &[]);
        let template = provider.template.as_ref().expect("a template");
        let sent = template.request(Some("rt"), Some(Duration::from_secs(5)));
        assert_eq!(sent.timeout(), Some(&Duration::from_secs(5)));
        let auth = &sent.headers()[AUTHORIZATION];
        assert!(auth.is_sensitive());
        assert!(!format!("{:?}", sent.headers()).contains("Basic"));
    }
}
