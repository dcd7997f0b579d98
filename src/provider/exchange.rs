//! Exchanging a short-lived Graph API user token for a long-lived one (`fb_exchange_token`,
//! `ig_exchange_token`).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::http::transport_error;
use super::{GraphClassifier, HttpReply, DEFAULT_BODY_LIMIT};
use crate::error::{ConfigProblem, Error, ProviderError};
use crate::token::{AccessToken, ClientSecret, TokenSet};

/// Turns the short-lived user token a login hands out (an hour or two) into a long-lived one
/// (about 60 days), to [`insert`](crate::TokenManager::insert) as the grant. Two shapes:
///
/// - **Facebook** ([`new`](Self::new)):
///   `GET {token_url}?grant_type=fb_exchange_token&client_id=…&client_secret=…&fb_exchange_token=…`.
///   Graph has no refresh token for user tokens, and this long-lived token is not renewed by
///   the refresh endpoint of [`InstagramProvider`](crate::InstagramProvider): when it nears
///   its end, the user logs in again and the new short-lived token is exchanged again.
/// - **Instagram Login** ([`instagram`](Self::instagram)):
///   `GET {exchange_url}?grant_type=ig_exchange_token&client_secret=…&access_token=…` (no
///   client id). The long-lived token it returns is the one
///   [`InstagramProvider`](crate::InstagramProvider) renews; the short-lived token from the
///   code exchange (1 hour) cannot be renewed at all.
///
/// Both answer `{"access_token","token_type","expires_in"}`. Errors are read by a
/// [`GraphClassifier`] (an expired short-lived token is code 190 subcode 463, a dead grant).
///
/// In a [`Connector`](crate::Connector), give it to
/// [`ConnectorBuilder::after_exchange`](crate::ConnectorBuilder::after_exchange): the
/// connector then stores the long-lived token, not the short-lived one.
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
/// let instagram = GraphTokenExchange::instagram(
///     tokenkeeper::INSTAGRAM_EXCHANGE_URL,
///     ClientSecret::new("my-app-secret"),
/// )?;
/// # let _ = (exchange, instagram);
/// # Ok::<(), tokenkeeper::Error>(())
/// ```
pub struct GraphTokenExchange {
    http: reqwest::Client,
    url: reqwest::Url,
    grant_type: &'static str,
    /// The parameter the short-lived token travels in.
    token_param: &'static str,
    /// Sent as `client_id` when set (Facebook); Instagram's exchange takes none.
    client_id: Option<String>,
    client_secret: ClientSecret,
    classifier: GraphClassifier,
    timeout: Option<Duration>,
}

/// Instagram's endpoint exchanging a short-lived Instagram Login token for a long-lived one
/// (see [`GraphTokenExchange::instagram`]).
pub const INSTAGRAM_EXCHANGE_URL: &str = "https://graph.instagram.com/access_token";

impl GraphTokenExchange {
    /// A Facebook exchange (`fb_exchange_token`) at `token_url` for the app `client_id`
    /// (default HTTP client that never follows redirects, 30 s timeout).
    ///
    /// # Errors
    ///
    /// [`Error::Misconfigured`] if the URL does not parse or the HTTP client cannot be built.
    pub fn new(
        token_url: impl AsRef<str>,
        client_id: impl Into<String>,
        client_secret: ClientSecret,
    ) -> Result<Self, Error> {
        let mut exchange = Self::build(token_url.as_ref(), client_secret)?;
        exchange.client_id = Some(client_id.into());
        Ok(exchange)
    }

    /// An Instagram Login exchange (`ig_exchange_token`) at `exchange_url` (for Instagram,
    /// [`INSTAGRAM_EXCHANGE_URL`]), with the same defaults as [`new`](Self::new).
    ///
    /// # Errors
    ///
    /// [`Error::Misconfigured`] if the URL does not parse or the HTTP client cannot be built.
    pub fn instagram(
        exchange_url: impl AsRef<str>,
        client_secret: ClientSecret,
    ) -> Result<Self, Error> {
        let mut exchange = Self::build(exchange_url.as_ref(), client_secret)?;
        exchange.grant_type = "ig_exchange_token";
        exchange.token_param = "access_token";
        Ok(exchange)
    }

    fn build(token_url: &str, client_secret: ClientSecret) -> Result<Self, Error> {
        let misconfigured = |problem, source: crate::error::SharedError| Error::Misconfigured {
            key: None,
            problem,
            status: None,
            source: Some(source),
        };
        let url = reqwest::Url::parse(token_url)
            .map_err(|e| misconfigured(ConfigProblem::Endpoint, Arc::new(e)))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| misconfigured(ConfigProblem::HttpClient, Arc::new(e)))?;
        Ok(Self {
            http,
            url,
            grant_type: "fb_exchange_token",
            token_param: "fb_exchange_token",
            client_id: None,
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
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("grant_type", self.grant_type);
            if let Some(client_id) = &self.client_id {
                query.append_pair("client_id", client_id);
            }
            query
                .append_pair("client_secret", self.client_secret.secret())
                .append_pair(self.token_param, short_lived.secret());
        }
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
            .field("grant_type", &self.grant_type)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .finish_non_exhaustive()
    }
}
