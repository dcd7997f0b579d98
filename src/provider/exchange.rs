//! Exchanging a short-lived Graph API user token for a long-lived one (`fb_exchange_token`).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::http::transport_error;
use super::{GraphClassifier, HttpReply, DEFAULT_BODY_LIMIT};
use crate::error::{ConfigProblem, Error, ProviderError};
use crate::token::{AccessToken, ClientSecret, TokenSet};

/// Turns the short-lived user token a Facebook login hands out (an hour or two) into a
/// long-lived one (about 60 days), to [`insert`](crate::TokenManager::insert) as the grant:
/// `GET {token_url}?grant_type=fb_exchange_token&client_id=…&client_secret=…&fb_exchange_token=…`
/// answering `{"access_token","token_type","expires_in"}`.
///
/// This is part of connecting a grant, not of keeping it: Graph has no refresh token for user
/// tokens, and a long-lived token is not renewed by the refresh endpoint of
/// [`InstagramProvider`](crate::InstagramProvider); when it nears its end, the user logs in
/// again and the new short-lived token is exchanged again. Errors are read by a
/// [`GraphClassifier`] (an expired short-lived token is code 190 subcode 463, a dead grant).
///
/// The client secret travels in the query string, as Graph requires: use HTTPS (the default
/// client never follows redirects, which would re-send it).
///
/// ```
/// use tokenkeeper::{ClientSecret, GraphTokenExchange};
/// let exchange = GraphTokenExchange::new(
///     "https://graph.facebook.com/v19.0/oauth/access_token",
///     "my-app-id",
///     ClientSecret::new("my-app-secret"),
/// )?;
/// # let _ = exchange;
/// # Ok::<(), tokenkeeper::Error>(())
/// ```
pub struct GraphTokenExchange {
    http: reqwest::Client,
    url: reqwest::Url,
    client_id: String,
    client_secret: ClientSecret,
    classifier: GraphClassifier,
    timeout: Option<Duration>,
}

impl GraphTokenExchange {
    /// An exchange at `token_url` for the app `client_id` (default HTTP client that never
    /// follows redirects, 30 s timeout).
    ///
    /// # Errors
    ///
    /// [`Error::Misconfigured`] if the URL does not parse or the HTTP client cannot be built.
    pub fn new(
        token_url: impl AsRef<str>,
        client_id: impl Into<String>,
        client_secret: ClientSecret,
    ) -> Result<Self, Error> {
        let misconfigured = |problem, source: crate::error::SharedError| Error::Misconfigured {
            key: None,
            problem,
            status: None,
            source: Some(source),
        };
        let url = reqwest::Url::parse(token_url.as_ref())
            .map_err(|e| misconfigured(ConfigProblem::Endpoint, Arc::new(e)))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| misconfigured(ConfigProblem::HttpClient, Arc::new(e)))?;
        Ok(Self {
            http,
            url,
            client_id: client_id.into(),
            client_secret,
            classifier: GraphClassifier::new(),
            timeout: Some(Duration::from_secs(30)),
        })
    }

    /// The HTTP client to use (disable redirects on it: the request carries the secret).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = client;
        self
    }

    /// Per-request timeout (default 30 s; `None` leaves it to the HTTP client).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Exchanges `short_lived` for a long-lived token, its expiry counted from `now` (read it
    /// from the manager's [`Clock`](crate::Clock)).
    ///
    /// # Errors
    ///
    /// A classified [`ProviderError`]: `Reauthorize` when the short-lived token is dead or
    /// expired (the user must log in again), `Misconfigured` for a wrong app id, `RateLimited`
    /// or `Unavailable` when trying again later can succeed.
    pub async fn exchange(
        &self,
        short_lived: &AccessToken,
        now: SystemTime,
    ) -> Result<TokenSet, ProviderError> {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("grant_type", "fb_exchange_token")
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", self.client_secret.secret())
            .append_pair("fb_exchange_token", short_lived.secret());
        let mut builder = self.http.get(url).header("accept", "application/json");
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        let request = builder.build().map_err(transport_error)?;
        let reply = HttpReply::send(&self.http, request, DEFAULT_BODY_LIMIT).await?;
        let response = reply.interpret(&self.classifier, now)?;
        Ok(TokenSet::new(short_lived.clone()).apply(response, now))
    }
}

impl fmt::Debug for GraphTokenExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphTokenExchange")
            .field("url", &self.url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .finish_non_exhaustive()
    }
}
