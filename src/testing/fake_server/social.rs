//! A fake Graph-style provider: client-credentials tokens, long-lived tokens renewed by access
//! token (Instagram-style), Instagram Login, Graph error bodies and rate limits with usage
//! headers.

mod login;
mod state;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer};

use crate::{AccessToken, Clock, TokenSet};

use login::{AuthorizeEndpoint, CodeExchangeEndpoint};
use state::{
    ApiEndpoint, ClientCredentialsEndpoint, Exchange, ExchangeEndpoint, RefreshEndpoint,
    SocialState,
};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A fake Graph API-style provider on a local port, for tests: the grant shapes and error
/// bodies of social networks, next to the RFC 6749 server of
/// [`FakeAuthServer`](super::FakeAuthServer).
///
/// Endpoints (all reading time from the clock you give it):
///
/// - [`refresh_url`](Self::refresh_url): `GET /refresh_access_token?grant_type=ig_refresh_token&access_token=…`
///   renews a long-lived token (Instagram-style): `200 {"access_token","token_type":"bearer","expires_in"}`
///   with a new token for the same user, valid for
///   [`long_lived_lifetime`](SocialConfig::with_long_lived_lifetime) (default 60 days). The old
///   token stays valid until its own expiry. A token younger than
///   [`min_refresh_age`](SocialConfig::with_min_refresh_age) (default 24 hours) gets `400`
///   `{"error":{"message":"The access token is too new to be refreshed.","type":"OAuthException","code":100,…}}`
///   (a guess: the real body is undocumented) and is counted by
///   [`premature_refreshes`](Self::premature_refreshes). An expired token gets `400` code
///   `190` subcode `463`; a token of a [failed](Self::fail_user) user gets code `190` with the
///   failure's subcode; an unknown one, code `190` without a subcode.
/// - [`token_url`](Self::token_url): `POST /oauth2/token`, an RFC 6749 client-credentials
///   endpoint (form body, client authentication by HTTP Basic or body parameters; `scope` and
///   `audience` are recorded, see [`client_credentials_requests`](Self::client_credentials_requests)):
///   `200 {"access_token","token_type":"Bearer","expires_in"}` valid for
///   [`client_token_lifetime`](SocialConfig::with_client_token_lifetime) (default 1 hour);
///   `401 {"error":"invalid_client",…}` for wrong credentials;
///   `400 {"error":"unsupported_grant_type"}` for another grant.
/// - [`exchange_url`](Self::exchange_url): `GET /oauth/access_token?grant_type=fb_exchange_token&client_id=…&client_secret=…&fb_exchange_token=…`
///   turns a [short-lived token](Self::issue_short_lived_token) (2 hours) into a long-lived one
///   for the same user; a wrong client id or secret gets `400` code `101` (a guess for the
///   secret: Graph's own body for it is undocumented), a dead or expired token the code-190
///   errors above.
/// - Instagram Login: [`authorize_url`](Self::authorize_url) (`GET /oauth/authorize`)
///   consents at once as the [signed-in](Self::sign_in) user (a new user when nobody is) and
///   redirects to `<redirect_uri>?code=…&state=…`; it requires `response_type=code` and an
///   `S256` PKCE challenge (else `error=…`), and consenting authorizes the app again for a
///   user who [removed it](Self::fail_user). The code is single-use, valid for an hour and
///   bound to the redirect URI and the challenge; [`login_token_url`](Self::login_token_url)
///   (`POST /oauth/access_token`, form body with `client_id`, `client_secret`,
///   `grant_type=authorization_code`, `redirect_uri`, `code`, `code_verifier`) exchanges it for
///   a **short-lived** token (1 hour, not renewable) as `200 {"access_token","user_id"}`, or
///   refuses with `400 {"error_type":"OAuthException","code":400,"error_message":…}`
///   (Instagram's shape; the messages are from client threads).
///   [`ig_exchange_url`](Self::ig_exchange_url)
///   (`GET /access_token?grant_type=ig_exchange_token&client_secret=…&access_token=…`) turns
///   a short-lived token into a long-lived one, which the refresh endpoint renews; refusals
///   are the Graph errors of the `fb_exchange_token` endpoint.
/// - [`api_url`](Self::api_url): `/v19.0/me` and anything else under `/v19.0/`, any method,
///   with the token as `Authorization: Bearer …` or an `access_token` query parameter:
///   `200 {"id":…}` for a valid token, else `400` with the same Graph errors as above and
///   `WWW-Authenticate: OAuth "Facebook Platform" "invalid_token" "…"`.
///
/// A [rate limit](Self::set_rate_limit) on the refresh endpoint answers Graph's `400` with a
/// rate-limit code and usage headers. Every reply of the refresh endpoint carries the current
/// usage header while a limit is set.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use tokenkeeper::testing::{FakeSocialServer, ManualClock, SocialConfig};
/// use tokenkeeper::{InstagramProvider, TokenKey, TokenManager};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let clock = Arc::new(ManualClock::fixed());
/// let server = FakeSocialServer::start(SocialConfig::new(), clock.clone()).await;
/// let provider = InstagramProvider::builder(server.refresh_url()).clock(clock.clone()).build()?;
/// let manager = TokenManager::builder(provider).clock(clock.clone()).build();
/// let key = TokenKey::from("creator-1");
/// let user = server.new_user();
/// manager.insert(key.clone(), server.issue_long_lived_token(user).token_set()).await?;
///
/// manager.refresh_now(&key).await?; // too young: served as it is, nothing sent
/// assert_eq!(server.refresh_calls(), 0);
/// clock.advance(Duration::from_secs(2 * 24 * 3600));
/// let renewed = manager.refresh_now(&key).await?; // renewed by presenting the token
/// assert_eq!(server.refresh_calls(), 1);
/// assert!(server.is_access_token_valid(renewed.access_token().secret()));
/// # Ok(()) }
/// ```
///
/// Like [`FakeAuthServer`](super::FakeAuthServer), it is best used on real tokio time with
/// the shared [`ManualClock`](crate::testing::ManualClock) doing the time travel.
pub struct FakeSocialServer {
    server: MockServer,
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<SocialState>>,
}

/// Names one user (an admin, a creator) on a [`FakeSocialServer`]; every token issued to them
/// dies with them (see [`FakeSocialServer::fail_user`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub(super) u64);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "u{}", self.0)
    }
}

/// A long-lived token handed out by [`FakeSocialServer::issue_long_lived_token`].
///
/// `Debug` redacts the token.
#[derive(Clone, PartialEq, Eq)]
pub struct LongLivedToken {
    /// Whose token it is.
    pub user: UserId,
    /// The access token.
    pub access_token: String,
    /// When it was issued, on the server's clock.
    pub issued_at: SystemTime,
    /// When it expires, on the server's clock.
    pub expires_at: SystemTime,
}

impl LongLivedToken {
    /// The token as an app would store it: access token, issue time and expiry, no refresh
    /// token.
    pub fn token_set(&self) -> TokenSet {
        TokenSet::new(AccessToken::new(self.access_token.clone()))
            .with_issued_at(self.issued_at)
            .with_expires_at(self.expires_at)
    }
}

impl fmt::Debug for LongLivedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LongLivedToken")
            .field("user", &self.user)
            .field("access_token", &"[redacted]")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why the Graph-style server rejects a user's tokens: each is code `190` with its subcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GraphFailure {
    /// Subcode 458: the user removed the app.
    AppRemoved,
    /// Subcode 459: the account is held at a security checkpoint.
    SecurityCheckpoint,
    /// Subcode 460: the user changed their password.
    PasswordChanged,
    /// Subcode 463: the session expired.
    Expired,
    /// Subcode 467: the token is invalid.
    InvalidToken,
}

impl GraphFailure {
    /// The Graph `error_subcode`.
    pub fn subcode(self) -> u32 {
        match self {
            Self::AppRemoved => 458,
            Self::SecurityCheckpoint => 459,
            Self::PasswordChanged => 460,
            Self::Expired => 463,
            Self::InvalidToken => 467,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::AppRemoved => "Error validating access token: User has not authorized application.",
            Self::SecurityCheckpoint => {
                "Error validating access token: You cannot access the app till you log in to www.facebook.com and follow the instructions given."
            }
            Self::PasswordChanged => {
                "Error validating access token: The session has been invalidated because the user changed their password or Facebook has changed the session for security reasons."
            }
            Self::Expired => "Error validating access token: Session has expired.",
            Self::InvalidToken => "Invalid OAuth access token.",
        }
    }
}

/// Which usage header a rate-limited reply carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum UsageHeader {
    /// None.
    None,
    /// `x-app-usage` `{"call_count":…,"total_cputime":…,"total_time":…}` (percentages of the
    /// limit over the window).
    #[default]
    App,
    /// `x-business-use-case-usage` `{"<id>":[{"type":"instagram","call_count":…,"total_cputime":…,"total_time":…,"estimated_time_to_regain_access":…}]}`,
    /// the estimate being the whole minutes until a call is allowed again.
    BusinessUseCase,
}

/// A Graph-style rate limit on the refresh endpoint: at most `max_calls` calls in any rolling
/// `window`; every call counts, rejected ones too (as on Graph, so a client that keeps calling
/// stays limited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphRateLimit {
    pub(super) max_calls: usize,
    pub(super) window: Duration,
    pub(super) code: u32,
    pub(super) usage: UsageHeader,
}

impl GraphRateLimit {
    /// At most `max_calls` (at least 1) per rolling `window`, answered with code `4`
    /// ("Application request limit reached") and `x-app-usage`.
    pub fn new(max_calls: usize, window: Duration) -> Self {
        Self {
            max_calls: max_calls.max(1),
            window,
            code: 4,
            usage: UsageHeader::App,
        }
    }

    /// The Graph error code of a limited reply (4, 17, 32, 613, 80000–80014).
    pub fn code(mut self, code: u32) -> Self {
        self.code = code;
        self
    }

    /// The usage header of every reply.
    pub fn usage_header(mut self, usage: UsageHeader) -> Self {
        self.usage = usage;
        self
    }
}

/// How a [`FakeSocialServer`] behaves.
#[derive(Clone, PartialEq, Eq)]
pub struct SocialConfig {
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) client_token_lifetime: Duration,
    pub(super) long_lived_lifetime: Duration,
    pub(super) min_refresh_age: Duration,
}

impl SocialConfig {
    /// Client `social-client` / `social-secret`; client-credentials tokens live 1 hour,
    /// long-lived tokens 60 days and may be renewed once 24 hours old.
    pub fn new() -> Self {
        Self {
            client_id: "social-client".to_owned(),
            client_secret: "social-secret".to_owned(),
            client_token_lifetime: HOUR,
            long_lived_lifetime: 60 * DAY,
            min_refresh_age: DAY,
        }
    }

    /// The client credentials the server accepts.
    pub fn with_client(mut self, id: impl Into<String>, secret: impl Into<String>) -> Self {
        self.client_id = id.into();
        self.client_secret = secret.into();
        self
    }

    /// The lifetime of client-credentials tokens.
    pub fn with_client_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.client_token_lifetime = lifetime;
        self
    }

    /// The lifetime of long-lived tokens.
    pub fn with_long_lived_lifetime(mut self, lifetime: Duration) -> Self {
        self.long_lived_lifetime = lifetime;
        self
    }

    /// How old a long-lived token must be before it can be renewed.
    pub fn with_min_refresh_age(mut self, age: Duration) -> Self {
        self.min_refresh_age = age;
        self
    }
}

impl Default for SocialConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SocialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocialConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("client_token_lifetime", &self.client_token_lifetime)
            .field("long_lived_lifetime", &self.long_lived_lifetime)
            .field("min_refresh_age", &self.min_refresh_age)
            .finish()
    }
}

/// One call to the client-credentials endpoint, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientCredentialsRequest {
    /// When it came, on the server's clock.
    pub at: SystemTime,
    /// The `scope` parameter.
    pub scope: Option<String>,
    /// The `audience` parameter.
    pub audience: Option<String>,
    /// The reply's status.
    pub status: u16,
}

impl FakeSocialServer {
    /// Starts a server with `config`, reading time from `clock` (share it with the code under
    /// test).
    pub async fn start(config: SocialConfig, clock: Arc<dyn Clock>) -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(SocialState::new(config)));
        Mock::given(method("GET"))
            .and(path(state::REFRESH_PATH))
            .respond_with(RefreshEndpoint {
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(state::TOKEN_PATH))
            .respond_with(ClientCredentialsEndpoint {
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(state::EXCHANGE_PATH))
            .respond_with(ExchangeEndpoint {
                flavour: Exchange::Facebook,
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(login::IG_EXCHANGE_PATH))
            .respond_with(ExchangeEndpoint {
                flavour: Exchange::Instagram,
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(login::AUTHORIZE_PATH))
            .respond_with(AuthorizeEndpoint {
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(login::LOGIN_TOKEN_PATH))
            .respond_with(CodeExchangeEndpoint {
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Mock::given(path_regex(state::API_PATH_PATTERN))
            .respond_with(ApiEndpoint {
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Self {
            server,
            clock,
            state,
        }
    }

    /// The long-lived token refresh endpoint's full URL.
    pub fn refresh_url(&self) -> String {
        format!("{}{}", self.server.uri(), state::REFRESH_PATH)
    }

    /// The client-credentials token endpoint's full URL.
    pub fn token_url(&self) -> String {
        format!("{}{}", self.server.uri(), state::TOKEN_PATH)
    }

    /// The `fb_exchange_token` endpoint's full URL.
    pub fn exchange_url(&self) -> String {
        format!("{}{}", self.server.uri(), state::EXCHANGE_PATH)
    }

    /// Instagram Login's authorization endpoint's full URL (see the type's docs).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tokenkeeper::testing::{FakeSocialServer, ManualClock, SocialConfig};
    /// use tokenkeeper::{ClientAuth, ClientSecret, Connector, GraphTokenExchange,
    ///     InstagramProvider, StartOptions, TokenKey, TokenManager};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let clock = Arc::new(ManualClock::fixed());
    /// let server = FakeSocialServer::start(SocialConfig::new(), clock.clone()).await;
    /// let provider = InstagramProvider::builder(server.refresh_url()).clock(clock.clone()).build()?;
    /// let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    /// let connector = Connector::builder(&manager, server.client_id(), server.authorize_url(),
    ///         server.login_token_url(), "http://127.0.0.1:3000/callback")
    ///     .client_secret(ClientSecret::new(server.client_secret()))
    ///     .client_auth(ClientAuth::RequestBody)
    ///     .after_exchange(GraphTokenExchange::instagram(
    ///         server.ig_exchange_url(),
    ///         ClientSecret::new(server.client_secret()),
    ///     )?)
    ///     .build()?;
    ///
    /// let owner = server.new_user();
    /// server.sign_in(owner); // the browser consents as this user
    /// let key = TokenKey::from("creator-1");
    /// let authorization = connector.start(key.clone(), StartOptions::new()).await?;
    /// let callback = server.follow_authorization(authorization.url()).await?;
    /// connector.complete(callback.as_str()).await?;
    /// assert_eq!((server.authorizations(), server.code_exchanges(), server.ig_exchanges()), (1, 1, 1));
    /// assert!(server.is_access_token_valid(manager.access_token(&key).await?.secret()));
    /// # Ok(()) }
    /// ```
    pub fn authorize_url(&self) -> String {
        format!("{}{}", self.server.uri(), login::AUTHORIZE_PATH)
    }

    /// Instagram Login's code exchange endpoint's full URL (`POST`; client authentication in
    /// the form body, so use [`ClientAuth::RequestBody`](crate::ClientAuth::RequestBody)).
    pub fn login_token_url(&self) -> String {
        format!("{}{}", self.server.uri(), login::LOGIN_TOKEN_PATH)
    }

    /// The `ig_exchange_token` endpoint's full URL (for
    /// [`GraphTokenExchange::instagram`](crate::GraphTokenExchange::instagram)).
    pub fn ig_exchange_url(&self) -> String {
        format!("{}{}", self.server.uri(), login::IG_EXCHANGE_PATH)
    }

    /// A protected resource's full URL (`/v19.0/me`).
    pub fn api_url(&self) -> String {
        format!("{}/v19.0/me", self.server.uri())
    }

    /// The client id the server accepts.
    pub fn client_id(&self) -> String {
        self.state().config.client_id.clone()
    }

    /// The client secret the server accepts.
    pub fn client_secret(&self) -> String {
        self.state().config.client_secret.clone()
    }

    /// A new user.
    pub fn new_user(&self) -> UserId {
        self.state().new_user()
    }

    /// Issues a long-lived token to `user`, as the app's login flow would have obtained it.
    ///
    /// # Panics
    ///
    /// If `user` was not created by this server.
    pub fn issue_long_lived_token(&self, user: UserId) -> LongLivedToken {
        let now = self.clock.now();
        self.state().issue_long_lived(user, now)
    }

    /// Issues a short-lived (2-hour) token to `user`, as a login hands out, with its expiry.
    ///
    /// # Panics
    ///
    /// If `user` was not created by this server.
    pub fn issue_short_lived_token(&self, user: UserId) -> (String, SystemTime) {
        let now = self.clock.now();
        self.state().issue_short_lived(user, now)
    }

    /// From now on, every token of `user` (and every token issued to them later) gets code
    /// `190` with `failure`'s subcode, at the refresh endpoint and the API — until `user`
    /// consents again at the [authorization endpoint](Self::authorize_url): tokens issued
    /// after that work, the ones before stay dead. [`GraphFailure::AppRemoved`] is the owner
    /// revoking the app.
    ///
    /// # Panics
    ///
    /// If `user` was not created by this server.
    pub fn fail_user(&self, user: UserId, failure: GraphFailure) {
        self.state().fail_user(user, failure);
    }

    /// From now on, `access_token` alone gets code `190` with `failure`'s subcode.
    pub fn fail_token(&self, access_token: &str, failure: GraphFailure) {
        self.state().fail_token(access_token, failure);
    }

    /// Limits the refresh endpoint (`None` lifts the limit and forgets the calls counted).
    pub fn set_rate_limit(&self, limit: Option<GraphRateLimit>) {
        self.state().set_rate_limit(limit);
    }

    /// Calls to the refresh endpoint so far, whatever their outcome.
    pub fn refresh_calls(&self) -> usize {
        self.state().refresh_calls
    }

    /// Refresh calls answered with a rate-limit error.
    pub fn rate_limited_calls(&self) -> usize {
        self.state().rate_limited_calls
    }

    /// Refresh calls with a token younger than the minimum age.
    pub fn premature_refreshes(&self) -> usize {
        self.state().premature_refreshes
    }

    /// Refresh calls that renewed a token.
    pub fn renewals(&self) -> usize {
        self.state().renewals
    }

    /// Calls to the client-credentials endpoint so far.
    pub fn client_credentials_calls(&self) -> usize {
        self.state().client_credentials.len()
    }

    /// Every call to the client-credentials endpoint so far, oldest first.
    pub fn client_credentials_requests(&self) -> Vec<ClientCredentialsRequest> {
        self.state().client_credentials.clone()
    }

    /// The browser is signed in as `user`: the authorization endpoint consents as them (until
    /// another `sign_in`).
    ///
    /// # Panics
    ///
    /// If `user` was not created by this server.
    pub fn sign_in(&self, user: UserId) {
        let mut state = self.state();
        state.assert_known(user);
        state.logins.signed_in = Some(user);
    }

    /// Plays the browser's part of an authorization: `GET url` (an authorization URL of this
    /// server) without following the redirect, and returns where it points (the callback URL,
    /// with `code` and `state`, or `error`).
    ///
    /// # Errors
    ///
    /// If the request fails or the answer is not a redirect.
    pub async fn follow_authorization(&self, url: &str) -> std::io::Result<String> {
        super::authorize::follow_authorization(url).await
    }

    /// Requests to the authorization endpoint so far, whatever their outcome.
    pub fn authorizations(&self) -> usize {
        self.state().logins.authorizations
    }

    /// Calls to the code exchange endpoint so far, whatever their outcome.
    pub fn code_exchanges(&self) -> usize {
        self.state().logins.code_exchanges
    }

    /// Calls to the `ig_exchange_token` endpoint so far, whatever their outcome.
    pub fn ig_exchanges(&self) -> usize {
        self.state().ig_exchanges
    }

    /// Calls to the `fb_exchange_token` endpoint so far.
    pub fn exchanges(&self) -> usize {
        self.state().exchanges
    }

    /// Calls to the API so far, accepted or not.
    pub fn api_calls(&self) -> usize {
        self.state().api_calls
    }

    /// Whether the API would accept `access_token` now.
    pub fn is_access_token_valid(&self, access_token: &str) -> bool {
        let now = self.clock.now();
        self.state().check(access_token, now).is_ok()
    }

    /// The server's base URL.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    fn state(&self) -> MutexGuard<'_, SocialState> {
        state::lock(&self.state)
    }
}

impl fmt::Debug for FakeSocialServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeSocialServer")
            .field("uri", &self.server.uri())
            .finish_non_exhaustive()
    }
}
