//! The fake OAuth authorization server: [`FakeAuthServer`] and its script.

mod api;
mod authorize;
mod config;
mod grant;
mod record;
mod social;
mod state;
mod wire;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::{AccessToken, Clock, RefreshToken, TokenSet};

pub use config::{FakeConfig, Preset, RateLimit, RefreshLifetime, RetryAfter, Rotation};
pub use grant::{GrantId, GrantState, IssuedGrant, RevocationReason};
pub use record::{RecordedRefresh, RefreshOutcome};
pub use social::{
    ClientCredentialsRequest, FakeSocialServer, GraphFailure, GraphRateLimit, LongLivedToken,
    SocialConfig, UsageHeader, UserId,
};

use state::State;

/// A scriptable OAuth authorization server on a local port, for tests.
///
/// Why: the hard parts of keeping grants alive — rotation, reuse detection, a reply lost after
/// the server rotated, a password reset in the middle of the night, a refresh token that dies
/// after 180 quiet days — cannot be tested against a real provider. [`FakeAuthServer`] plays the
/// provider on a local port (it is a [`wiremock::MockServer`] underneath), speaks one of the
/// [`Preset`] wire formats byte for byte, and reads all time from the shared clock you give it,
/// so months pass in a millisecond: advance the same [`ManualClock`](super::ManualClock) your
/// code under test reads.
///
/// How: start a server, [`issue_grant`](FakeAuthServer::issue_grant) as the OAuth callback would,
/// point your client at [`token_url`](FakeAuthServer::token_url) with
/// [`client_id`](FakeAuthServer::client_id)/[`client_secret`](FakeAuthServer::client_secret),
/// then script events ([`revoke`](FakeAuthServer::revoke),
/// [`lose_next_replies`](FakeAuthServer::lose_next_replies), …) and assert on the counters.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let clock = Arc::new(ManualClock::fixed());
/// let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
/// let grant = server.issue_grant();
///
/// clock.advance(Duration::from_secs(2 * 3600)); // the access token has expired
/// assert!(!server.is_access_token_valid(&grant.access_token));
///
/// let reply = reqwest::Client::new()
///     .post(server.token_url())
///     .basic_auth(server.client_id(), Some(server.client_secret()))
///     .header("content-type", "application/x-www-form-urlencoded")
///     .body(
///         form_urlencoded::Serializer::new(String::new())
///             .append_pair("grant_type", "refresh_token")
///             .append_pair("refresh_token", &grant.refresh_token)
///             .finish(),
///     )
///     .send()
///     .await?;
/// assert_eq!(reply.status(), 200);
/// let body: serde_json::Value = serde_json::from_slice(&reply.bytes().await?)?;
/// assert_ne!(body["refresh_token"], grant.refresh_token.as_str()); // rotated
/// assert!(server.is_access_token_valid(body["access_token"].as_str().unwrap()));
/// assert_eq!(server.refresh_calls_for(&grant.grant), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
///
/// # Runtime
///
/// `wiremock` serves every mock server from its own OS thread with its own single-threaded
/// tokio runtime, so the fake works from a current-thread runtime and from
/// `#[tokio::test(start_paused = true)]`. With paused time, though, a pending tokio timer on the
/// client side (a `reqwest` timeout, say) auto-advances while the real socket is still waiting;
/// tests that talk HTTP are best run on real tokio time with the fake's clock doing the time
/// travel. [`set_delay`](FakeAuthServer::set_delay) sleeps on the server thread's real clock.
///
/// # Concurrency
///
/// All of its state sits behind one mutex, and each call to the token endpoint is handled
/// atomically, so concurrent clients see a consistent server. Dropping it retires the server.
pub struct FakeAuthServer {
    server: MockServer,
    config: FakeConfig,
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<State>>,
    codes: Arc<Mutex<authorize::Codes>>,
}

impl FakeAuthServer {
    /// Starts a server speaking `config`'s preset, reading time from `clock`.
    ///
    /// Pass the same clock (an `Arc<ManualClock>` coerces) to the code under test.
    pub async fn start(config: FakeConfig, clock: Arc<dyn Clock>) -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::new(config.clone())));
        let codes = Arc::new(Mutex::new(authorize::Codes::new(&config)));
        Mock::given(method("POST"))
            .and(path(config.preset.token_path()))
            .respond_with(TokenEndpoint {
                preset: config.preset,
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
                codes: Arc::clone(&codes),
            })
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(authorize::path(config.preset)))
            .respond_with(authorize::AuthorizeEndpoint {
                clock: Arc::clone(&clock),
                codes: Arc::clone(&codes),
            })
            .mount(&server)
            .await;
        if let Some(revocation) = config.preset.revocation_path() {
            Mock::given(method("POST"))
                .and(path(revocation))
                .respond_with(RevocationEndpoint {
                    state: Arc::clone(&state),
                })
                .mount(&server)
                .await;
        }
        Mock::given(path(api::PATH))
            .respond_with(api::ResourceEndpoint {
                preset: config.preset,
                clock: Arc::clone(&clock),
                state: Arc::clone(&state),
            })
            .mount(&server)
            .await;
        Self {
            server,
            config,
            clock,
            state,
            codes,
        }
    }

    /// The token endpoint's full URL.
    pub fn token_url(&self) -> String {
        format!("{}{}", self.server.uri(), self.config.preset.token_path())
    }

    /// The server's base URL, e.g. `http://127.0.0.1:41234`.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// The full URL of a protected resource on the server, for code that calls an API with the
    /// access token: any method with `Authorization: Bearer <valid token>` gets
    /// `200 {"grant":"g1"}`; anything else gets the preset's `401` — Standard: RFC 6750
    /// `WWW-Authenticate: Bearer error="invalid_token"`; Constant Contact:
    /// `WWW-Authenticate: Bearer realm=api.cc.email` with
    /// `{"error_key":"unauthorized","error_message":"Unauthorized"}`; Xoxoday (a guess):
    /// `{"error":"invalid_token","error_description":"invalid/expired token"}`.
    pub fn api_url(&self) -> String {
        format!("{}{}", self.server.uri(), api::PATH)
    }

    /// The RFC 7009 revocation endpoint's full URL, where the preset has one (Standard and
    /// Constant Contact-style; not Xoxoday-style). Revoking any token of a grant revokes the
    /// grant ([`GrantState::Revoked`] with [`RevocationReason::ClientRevoked`]); unknown tokens
    /// get `200` too, as RFC 7009 §2.2 requires.
    pub fn revocation_url(&self) -> Option<String> {
        let path = self.config.preset.revocation_path()?;
        Some(format!("{}{}", self.server.uri(), path))
    }

    /// Revocation requests accepted so far.
    pub fn revocations(&self) -> usize {
        self.state().revocations
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &FakeConfig {
        &self.config
    }

    /// The client id the server accepts.
    pub fn client_id(&self) -> &str {
        &self.config.client_id
    }

    /// The client secret the server accepts.
    pub fn client_secret(&self) -> &str {
        &self.config.client_secret
    }

    /// Creates a grant and returns its first token pair, as an OAuth callback or a provider's
    /// dashboard would hand it out.
    pub fn issue_grant(&self) -> IssuedGrant {
        let now = self.clock.now();
        self.state().issue_grant(now)
    }

    /// The tokens of `grant` as an app would store them from this server's replies: access
    /// token, refresh token and access expiry, plus the refresh token's expiry where the
    /// preset's wire format states it (Xoxoday-style; a Constant Contact-style app never
    /// learns it).
    pub fn token_set(&self, grant: &IssuedGrant) -> TokenSet {
        let mut tokens = TokenSet::new(AccessToken::new(grant.access_token.clone()))
            .with_refresh_token(RefreshToken::new(grant.refresh_token.clone()))
            .with_expires_at(grant.access_expires_at);
        if let (Preset::Xoxoday, Some(at)) = (self.config().preset(), grant.refresh_expires_at) {
            tokens = tokens.with_refresh_expires_at(at);
        }
        tokens
    }

    /// The user revokes the app: every token of the grant dies; refreshes get the preset's
    /// `invalid_grant` reply (Xoxoday: `401 invalid_token`).
    ///
    /// # Panics
    ///
    /// If `grant` was not issued by this server.
    pub fn revoke(&self, grant: &GrantId) {
        self.kill(grant, RevocationReason::UserRevoked);
    }

    /// The account's password is reset: every token of the grant dies; refreshes get the
    /// preset's `invalid_grant` reply (Xoxoday: `401 {"success":0,"error_message_id":"auth.token_error"}`).
    ///
    /// # Panics
    ///
    /// If `grant` was not issued by this server.
    pub fn reset_password(&self, grant: &GrantId) {
        self.kill(grant, RevocationReason::PasswordReset);
    }

    /// Another admin mints new tokens for the grant in a dashboard: every earlier token dies
    /// (refreshes with them get `invalid_grant`; Xoxoday:
    /// `401 {"error":"invalid_token","error_description":"invalid/expired token"}`), and the new
    /// pair is returned. The grant is active again, even if it had been revoked, and an
    /// [`Absolute`](RefreshLifetime::Absolute) refresh lifetime starts over.
    ///
    /// # Panics
    ///
    /// If `grant` was not issued by this server.
    pub fn supersede(&self, grant: &GrantId) -> IssuedGrant {
        let now = self.clock.now();
        let mut state = self.state();
        state.assert_known(*grant);
        state.supersede(*grant, now)
    }

    /// Expires every refresh token of the grant now, as if its lifetime had run out.
    ///
    /// # Panics
    ///
    /// If `grant` was not issued by this server.
    pub fn expire_refresh_token(&self, grant: &GrantId) {
        let now = self.clock.now();
        let mut state = self.state();
        state.assert_known(*grant);
        state.expire_refresh_tokens(*grant, now);
    }

    /// Limits refresh calls per grant (`None` lifts the limit). Setting it starts every grant's
    /// window afresh.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        self.state().set_rate_limit(limit);
    }

    /// The next `n` calls to the token endpoint get `status` with a proxy's HTML error page and
    /// change nothing. Calls queue up: `fail_next(1, 502)` then `fail_next(1, 503)` fails the
    /// next call with 502 and the one after with 503.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state().fail_next(n, status);
    }

    /// The next `n` calls are processed in full — whatever their outcome, a refresh rotates and
    /// is counted — but the client gets `504 Gateway Time-out` with an HTML body, as a load
    /// balancer sends when the upstream's answer was lost. Adds to any lost replies pending.
    pub fn lose_next_replies(&self, n: usize) {
        self.state().lose_next_replies(n);
    }

    /// Delays every reply from the token endpoint by `delay` of real time (`None`: no delay).
    pub fn set_delay(&self, delay: Option<Duration>) {
        self.state().delay = delay;
    }

    /// Calls to the token endpoint so far, whatever their outcome.
    pub fn refresh_calls(&self) -> usize {
        self.state().log.len()
    }

    /// Calls to the token endpoint that presented one of `grant`'s refresh tokens.
    pub fn refresh_calls_for(&self, grant: &GrantId) -> usize {
        self.state()
            .log
            .iter()
            .filter(|call| call.grant == Some(*grant))
            .count()
    }

    /// Calls to [`api_url`](Self::api_url) so far, accepted or not.
    pub fn api_calls(&self) -> usize {
        self.state().api_calls
    }

    /// How many times reuse detection revoked a grant.
    pub fn reuse_detections(&self) -> usize {
        self.state().reuse_detections
    }

    /// Every call to the token endpoint so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRefresh> {
        self.state().log.clone()
    }

    /// Whether a resource server would accept `access_token` now: issued here, not expired on
    /// the clock, not superseded, and its grant not revoked.
    pub fn is_access_token_valid(&self, access_token: &str) -> bool {
        let now = self.clock.now();
        self.state().is_access_token_valid(access_token, now)
    }

    /// The refresh token the server considers current for `grant`; `None` if the grant was
    /// revoked or not issued here. It may have expired: see [`grant_state`](Self::grant_state).
    pub fn current_refresh_token(&self, grant: &GrantId) -> Option<String> {
        self.state().current_refresh_token(*grant)
    }

    /// Where `grant` stands now.
    ///
    /// # Panics
    ///
    /// If `grant` was not issued by this server.
    pub fn grant_state(&self, grant: &GrantId) -> GrantState {
        let now = self.clock.now();
        let state = self.state();
        state.assert_known(*grant);
        state.grant_state(*grant, now)
    }

    fn kill(&self, grant: &GrantId, reason: RevocationReason) {
        let mut state = self.state();
        state.assert_known(*grant);
        state.revoke(*grant, reason);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl std::fmt::Debug for FakeAuthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAuthServer")
            .field("uri", &self.server.uri())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A panic in one test thread must not wedge the server for the rest of the test.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The wiremock responder behind the token endpoint.
struct TokenEndpoint {
    preset: Preset,
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<State>>,
    codes: Arc<Mutex<authorize::Codes>>,
}

impl Respond for TokenEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if let Some(reply) = authorize::exchange(&self.codes, &self.state, &*self.clock, request) {
            return reply;
        }
        let parsed = wire::parse(self.preset, request);
        let mut state = lock(&self.state);
        let now = self.clock.now();
        let handled = state.handle(parsed, now);
        let reply = handled.reply.render(self.preset, now);
        state.log.push(RecordedRefresh {
            at: now,
            grant: handled.grant,
            outcome: handled.outcome,
            status: handled.reply.status(self.preset),
            reply_lost: handled.reply_lost,
        });
        match state.delay {
            Some(delay) => reply.set_delay(delay),
            None => reply,
        }
    }
}

#[cfg(test)]
mod tests;

/// The RFC 7009 revocation endpoint.
struct RevocationEndpoint {
    state: Arc<Mutex<State>>,
}

impl Respond for RevocationEndpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let (token, client) = match wire::parse_revocation(request) {
            Ok(parsed) => parsed,
            Err(_) => return wire::json(400, r#"{"error":"invalid_request"}"#),
        };
        match lock(&self.state).revoke_token(token, &client) {
            200 => ResponseTemplate::new(200),
            401 => wire::json(401, r#"{"error":"invalid_client"}"#),
            status => wire::json(status, r#"{"error":"invalid_request"}"#),
        }
    }
}
