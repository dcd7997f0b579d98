//! Renewing a long-lived access token by presenting it (Instagram-style).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::http::transport_error;
use super::{Classifier, GraphClassifier, HttpReply, Provider, RefreshRequest, DEFAULT_BODY_LIMIT};
use crate::clock::{Clock, SystemClock};
use crate::error::{ConfigProblem, Error, InvalidationReason, ProviderError};
use crate::token::{TokenResponse, TokenSet};

/// Instagram's refresh endpoint for long-lived tokens.
pub const INSTAGRAM_REFRESH_URL: &str = "https://graph.instagram.com/refresh_access_token";

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A [`Provider`] for long-lived access tokens that are renewed by presenting the access token
/// itself, with no refresh token (Instagram-style:
/// `GET {url}?grant_type=ig_refresh_token&access_token=…` answering
/// `{"access_token","token_type","expires_in"}`).
///
/// The provider's rules, and how this provider keeps them:
///
/// - **Only a token at least 24 hours old can be renewed.** The token's age comes from
///   [`TokenSet::issued_at`]: [`TokenManager::insert`](crate::TokenManager::insert) sets it to
///   the insertion time when the grant does not say, and every renewal sets it to the time of
///   the reply. While the token is younger than [`min_age`](InstagramProviderBuilder::min_age),
///   [`can_refresh`](Provider::can_refresh) is `false`: the manager keeps serving the token and
///   the background refresher leaves it alone, so no request is ever sent too early (a grant
///   inserted without `issued_at` may wait one day longer than needed; it is never renewed
///   early). [`refresh_not_before`](Provider::refresh_not_before) tells the refresher when the
///   token comes of age; from then on it renews it like any grant: ahead of expiry and at
///   least every `keep_alive` (default 7 days), well inside the 60 days.
/// - **An expired token can never be renewed.** The grant then dies with
///   [`InvalidationReason::AccessTokenExpired`], without a request.
/// - **The provider's word is final**: its Graph-style errors are read by a
///   [`GraphClassifier`] (code 190 is a dead grant with the subcode's reason; rate limits wait
///   as long as the usage headers say).
///
/// A token younger than the minimum age that an API rejects (with
/// [`TokenManager::invalidate`](crate::TokenManager::invalidate)) cannot be renewed either: the
/// manager declares the grant dead at once, with the generic
/// [`NoRefreshToken`](InvalidationReason::NoRefreshToken) reason (the API's own reply says
/// why). Once the token is a day old, the renewal request is sent and the provider's answer
/// gives the reason.
///
/// Only a long-lived token can be renewed. Instagram Login's code exchange hands out a
/// short-lived one (1 hour): connect grants with a [`Connector`](crate::Connector) whose
/// [after-exchange step](crate::ConnectorBuilder::after_exchange) is
/// [`GraphTokenExchange::instagram`](crate::GraphTokenExchange::instagram), so that what is
/// stored is the long-lived token.
///
/// The age check reads this provider's [`clock`](InstagramProviderBuilder::clock): give it the
/// same clock as the manager (in tests, the same `ManualClock`).
///
/// ```
/// use tokenkeeper::{InstagramProvider, TokenManager, INSTAGRAM_REFRESH_URL};
/// let provider = InstagramProvider::builder(INSTAGRAM_REFRESH_URL).build()?;
/// let manager = TokenManager::builder(provider).build();
/// # let _ = manager;
/// # Ok::<(), tokenkeeper::Error>(())
/// ```
pub struct InstagramProvider {
    http: reqwest::Client,
    url: reqwest::Url,
    grant_type: String,
    min_age: Duration,
    clock: Arc<dyn Clock>,
    classifier: Arc<dyn Classifier>,
    body_limit: usize,
    timeout: Option<Duration>,
}

impl InstagramProvider {
    /// Starts building a provider renewing tokens at `refresh_url` (for Instagram,
    /// [`INSTAGRAM_REFRESH_URL`]).
    pub fn builder(refresh_url: impl Into<String>) -> InstagramProviderBuilder {
        InstagramProviderBuilder {
            url: refresh_url.into(),
            grant_type: "ig_refresh_token".to_owned(),
            min_age: DAY,
            clock: Arc::new(SystemClock),
            classifier: Arc::new(GraphClassifier::new()),
            http: None,
            body_limit: DEFAULT_BODY_LIMIT,
            timeout: Some(Duration::from_secs(30)),
        }
    }

    /// Whether `tokens` are old enough to be renewed now (see the type's docs).
    fn old_enough(&self, tokens: &TokenSet) -> bool {
        match tokens.issued_at() {
            Some(issued) => issued
                .checked_add(self.min_age)
                .is_some_and(|due| due <= self.clock.now()),
            None => true,
        }
    }
}

impl fmt::Debug for InstagramProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstagramProvider")
            .field("url", &self.url.as_str())
            .field("grant_type", &self.grant_type)
            .field("min_age", &self.min_age)
            .finish_non_exhaustive()
    }
}

/// Builds an [`InstagramProvider`].
pub struct InstagramProviderBuilder {
    url: String,
    grant_type: String,
    min_age: Duration,
    clock: Arc<dyn Clock>,
    classifier: Arc<dyn Classifier>,
    http: Option<reqwest::Client>,
    body_limit: usize,
    timeout: Option<Duration>,
}

impl fmt::Debug for InstagramProviderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstagramProviderBuilder")
            .field("url", &self.url)
            .field("grant_type", &self.grant_type)
            .field("min_age", &self.min_age)
            .finish_non_exhaustive()
    }
}

impl InstagramProviderBuilder {
    /// How old a token must be before it may be renewed (default 24 hours).
    pub fn min_age(mut self, age: Duration) -> Self {
        self.min_age = age;
        self
    }

    /// The `grant_type` parameter (default `ig_refresh_token`).
    pub fn grant_type(mut self, grant_type: impl Into<String>) -> Self {
        self.grant_type = grant_type.into();
        self
    }

    /// The clock the token's age is read from (default [`SystemClock`]); use the manager's.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The classifier for error replies (default [`GraphClassifier::new`]).
    pub fn classifier(mut self, classifier: impl Classifier) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// The HTTP client (default: a new `reqwest::Client` that never follows redirects, as for
    /// [`OAuth2ProviderBuilder::http_client`](crate::OAuth2ProviderBuilder::http_client): the
    /// request carries the access token).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Per-request timeout (default 30 s; `None` leaves it to the HTTP client).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
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
    /// [`Error::Misconfigured`] if the URL does not parse or the default HTTP client cannot be
    /// built.
    pub fn build(self) -> Result<InstagramProvider, Error> {
        let misconfigured = |problem, source: crate::error::SharedError| Error::Misconfigured {
            key: None,
            problem,
            status: None,
            source: Some(source),
        };
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| misconfigured(ConfigProblem::Endpoint, Arc::new(e)))?;
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| misconfigured(ConfigProblem::HttpClient, Arc::new(e)))?,
        };
        Ok(InstagramProvider {
            http,
            url,
            grant_type: self.grant_type,
            min_age: self.min_age,
            clock: self.clock,
            classifier: self.classifier,
            body_limit: self.body_limit,
            timeout: self.timeout,
        })
    }
}

#[async_trait]
impl Provider for InstagramProvider {
    async fn refresh(&self, req: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        if req.tokens.is_expired(req.now) {
            return Err(ProviderError::reauthorize(
                InvalidationReason::AccessTokenExpired,
            ));
        }
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("grant_type", &self.grant_type)
            .append_pair("access_token", req.tokens.access_token().secret());
        let mut builder = self.http.get(url).header("accept", "application/json");
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        let request = builder.build().map_err(transport_error)?;
        let reply = HttpReply::send(&self.http, request, self.body_limit).await?;
        reply.interpret(&*self.classifier, req.now)
    }

    /// `true` once the token is [old enough](InstagramProviderBuilder::min_age), and for an
    /// expired token (whose refresh then fails with
    /// [`AccessTokenExpired`](InvalidationReason::AccessTokenExpired) without a request, the
    /// reason a human needs).
    fn can_refresh(&self, tokens: &TokenSet) -> bool {
        tokens.is_expired(self.clock.now()) || self.old_enough(tokens)
    }

    /// The token's issue time plus the [minimum age](InstagramProviderBuilder::min_age).
    fn refresh_not_before(&self, tokens: &TokenSet) -> Option<std::time::SystemTime> {
        tokens.issued_at()?.checked_add(self.min_age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::AccessToken;
    use std::time::SystemTime;

    struct Fixed(SystemTime);
    impl Clock for Fixed {
        fn now(&self) -> SystemTime {
            self.0
        }
    }

    #[test]
    fn age_and_expiry_decide_can_refresh() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let at = |secs: u64| {
            InstagramProvider::builder("http://127.0.0.1:9/refresh_access_token")
                .clock(Fixed(t0 + Duration::from_secs(secs)))
                .build()
                .unwrap()
        };
        let tokens = TokenSet::new(AccessToken::new("t"))
            .with_issued_at(t0)
            .with_expires_at(t0 + 60 * DAY);
        assert!(!at(0).can_refresh(&tokens));
        assert!(!at(DAY.as_secs() - 1).can_refresh(&tokens));
        assert!(at(DAY.as_secs()).can_refresh(&tokens));
        // Expired: "refreshable", so that the refresh reports why the grant died.
        assert!(at(61 * DAY.as_secs()).can_refresh(&tokens));
        // No issue time: old enough.
        let unknown = TokenSet::new(AccessToken::new("t")).with_expires_at(t0 + DAY);
        assert!(at(0).can_refresh(&unknown));
    }

    #[test]
    fn debug_shows_no_token() {
        let p = InstagramProvider::builder(INSTAGRAM_REFRESH_URL)
            .build()
            .unwrap();
        let s = format!("{p:?}");
        assert!(s.contains("graph.instagram.com") && s.contains("ig_refresh_token"));
    }
}
