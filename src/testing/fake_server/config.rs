//! What the fake authorization server does: wire format, rotation, lifetimes, rate limits.

use std::fmt;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3_600);
const DAY: Duration = Duration::from_secs(86_400);

/// Which provider's wire format the fake server speaks.
///
/// The preset fixes the token endpoint's path, how the request is encoded, and every reply body.
/// Bodies tagged as facts in the provider notes are reproduced byte for byte; where a provider
/// never documented a reply, the preset's docs say which body is a guess.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Preset {
    /// A plain RFC 6749 server at `POST /oauth2/token`.
    ///
    /// The request is a form body (`grant_type=refresh_token&refresh_token=…`); the client
    /// authenticates with HTTP Basic or with `client_id`/`client_secret` in the body. Errors are
    /// RFC 6749 §5.2 bodies. A rate-limited call gets `429` with a `Retry-After` header and the
    /// body `{"error":"temporarily_unavailable",…}` (RFC 6749 has no code for it).
    Standard,
    /// Constant Contact's Okta-style server at `POST /oauth2/default/v1/token`.
    ///
    /// Like [`Standard`](Preset::Standard), and the parameters may also travel in the query
    /// string of a body-less POST. Any refresh-token failure is `400`
    /// `{"error":"invalid_grant","error_description":"The refresh token is invalid or expired."}`;
    /// a rate-limited call gets `429` `{"error_key":"throttled","error_message":"Too Many Requests"}`
    /// without `Retry-After`. The `401 invalid_client` body is a guess.
    ConstantContact,
    /// Xoxoday's JSON endpoint at `POST /chef/v1/oauth/token/user`.
    ///
    /// The request is a JSON body holding `grant_type`, `refresh_token`, `client_id` and
    /// `client_secret` (no Basic header). Replies:
    ///
    /// - password reset: `401` `{"success":0,"error_message_id":"auth.token_error"}`;
    /// - superseded by another admin: `401`
    ///   `{"error":"invalid_token","error_description":"invalid/expired token"}`;
    /// - too many refreshes: `429` `{"message":"auth.request_limit_exceeded"}`.
    ///
    /// The statuses are guesses (the bodies are not). Also guesses: an expired, unknown, spent or
    /// otherwise revoked refresh token (user revocation, reuse detection, a grant killed by
    /// [`RateLimit::invalidate_after`]) gets the same `401 invalid_token` body as a superseded
    /// one — its wording, "invalid/expired token", suggests it is the generic reply; a bad client
    /// gets `401 {"error":"invalid_client",…}`; a malformed request gets
    /// `400 {"error":"invalid_request",…}`.
    Xoxoday,
}

impl Preset {
    /// The RFC 7009 revocation endpoint's path, where the provider has one (not Xoxoday).
    pub fn revocation_path(self) -> Option<&'static str> {
        match self {
            Preset::Standard => Some("/oauth2/revoke"),
            Preset::ConstantContact => Some("/oauth2/default/v1/revoke"),
            Preset::Xoxoday => None,
        }
    }

    /// The token endpoint's path on the fake server.
    pub fn token_path(self) -> &'static str {
        match self {
            Preset::Standard => "/oauth2/token",
            Preset::ConstantContact => "/oauth2/default/v1/token",
            Preset::Xoxoday => "/chef/v1/oauth/token/user",
        }
    }
}

/// What a successful refresh does to the refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rotation {
    /// The same refresh token comes back every time (Constant Contact's "long-lived" setting).
    Off,
    /// Every refresh issues a new refresh token and spends the one presented, at once.
    On,
    /// Every refresh issues a new refresh token; a spent one keeps working until this much time
    /// has passed on the clock since it was spent.
    ///
    /// Presented inside the window, a spent refresh token gets a fresh access token together
    /// with the grant's *current* refresh token: nothing rotates again, so a client that lost a
    /// reply and retries ends up holding the same refresh token the server holds.
    OnWithGrace(Duration),
}

/// How long refresh tokens live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefreshLifetime {
    /// Each refresh token lives this long from its issue. With [`Rotation::Off`] the same token
    /// is re-issued on every refresh, so its expiry slides forward each time it is used.
    Sliding(Duration),
    /// The grant's refresh tokens all die this long after the grant was issued; rotation keeps
    /// that grant-level expiry (Xoxoday: after it, only a human in a dashboard can help).
    Absolute(Duration),
    /// Refresh tokens never expire.
    Never,
}

/// How a rate-limited reply tells the client when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryAfter {
    /// `Retry-After: <seconds>` (rounded up).
    Seconds,
    /// `Retry-After: <HTTP-date>`, computed from the server's clock.
    HttpDate,
    /// No `Retry-After` header.
    Omitted,
}

/// A per-grant limit on refresh calls, set with
/// [`FakeAuthServer::set_rate_limit`](super::FakeAuthServer::set_rate_limit).
///
/// At most [`max`](RateLimit::max) calls per grant are admitted in any sliding
/// [`window`](RateLimit::window); further calls get the preset's rate-limit reply and change
/// nothing. A call counts once it names a live grant, whatever its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// Calls admitted per grant per window.
    pub max: usize,
    /// The sliding window.
    pub window: Duration,
    /// After this many rejected calls, the grant is revoked
    /// ([`RevocationReason::RateLimitAbuse`](super::RevocationReason::RateLimitAbuse)): the call
    /// that reaches the count still gets the rate-limit reply, later ones get the preset's
    /// dead-grant reply (`invalid_grant`; Xoxoday: `401 invalid_token`).
    pub invalidate_after: Option<usize>,
    /// How the reply states when to retry; `None` means the preset's habit
    /// ([`RetryAfter::Seconds`] for [`Preset::Standard`], [`RetryAfter::Omitted`] for the others).
    pub retry_after: Option<RetryAfter>,
}

impl RateLimit {
    /// `max` calls per grant per sliding `window`, never invalidating, with the preset's
    /// `Retry-After` habit.
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            invalidate_after: None,
            retry_after: None,
        }
    }

    /// Revokes the grant after `rejected` rate-limited calls.
    pub fn invalidate_after(mut self, rejected: usize) -> Self {
        self.invalidate_after = Some(rejected);
        self
    }

    /// Overrides the preset's `Retry-After` habit.
    pub fn retry_after(mut self, retry_after: RetryAfter) -> Self {
        self.retry_after = Some(retry_after);
        self
    }
}

/// How a [`FakeAuthServer`](super::FakeAuthServer) behaves.
///
/// Start from a preset's constructor, which carries that provider's defaults, then adjust:
///
/// ```
/// use std::time::Duration;
/// use tokenkeeper::testing::{FakeConfig, Rotation};
///
/// let config = FakeConfig::xoxoday()
///     .with_rotation(Rotation::OnWithGrace(Duration::from_secs(6 * 3600)))
///     .with_reuse_detection(false);
/// ```
#[derive(Clone)]
pub struct FakeConfig {
    pub(super) preset: Preset,
    pub(super) rotation: Rotation,
    pub(super) access_lifetime: Duration,
    pub(super) refresh_lifetime: RefreshLifetime,
    pub(super) reuse_detection: bool,
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) scope: Option<String>,
    pub(super) omit_unchanged_refresh_token: bool,
    pub(super) numeric_expiries: bool,
    pub(super) public_client: bool,
    pub(super) refresh_expiry_at_issue_only: bool,
    pub(super) seed: u64,
}

impl FakeConfig {
    fn new(preset: Preset, access_lifetime: Duration, refresh_lifetime: RefreshLifetime) -> Self {
        Self {
            preset,
            rotation: Rotation::On,
            access_lifetime,
            refresh_lifetime,
            reuse_detection: true,
            client_id: "tokenkeeper-test-client".to_owned(),
            client_secret: "tokenkeeper-test-secret".to_owned(),
            scope: None,
            omit_unchanged_refresh_token: false,
            numeric_expiries: false,
            public_client: false,
            refresh_expiry_at_issue_only: false,
            seed: 0x746f_6b65_6e6b_6565,
        }
    }

    /// [`Preset::Standard`]: access tokens live 1 hour, refresh tokens never expire, rotation
    /// on, reuse detection on.
    pub fn standard() -> Self {
        Self::new(Preset::Standard, HOUR, RefreshLifetime::Never)
    }

    /// [`Preset::ConstantContact`]: access tokens live 24 hours, each refresh token must be used
    /// within 180 days ([`RefreshLifetime::Sliding`]), rotation on ("rotating"; use
    /// [`Rotation::Off`] for "long-lived"), reuse detection on, scope
    /// `contact_data campaign_data offline_access`.
    pub fn constant_contact() -> Self {
        Self::new(
            Preset::ConstantContact,
            24 * HOUR,
            RefreshLifetime::Sliding(180 * DAY),
        )
        .with_scope(Some("contact_data campaign_data offline_access"))
    }

    /// [`Preset::Xoxoday`]: access tokens live 15 days, refresh tokens die 30 days after the
    /// grant was issued ([`RefreshLifetime::Absolute`]), rotation on without grace, reuse
    /// detection on.
    pub fn xoxoday() -> Self {
        Self::new(
            Preset::Xoxoday,
            15 * DAY,
            RefreshLifetime::Absolute(30 * DAY),
        )
    }

    /// Sets what a refresh does to the refresh token.
    pub fn with_rotation(mut self, rotation: Rotation) -> Self {
        self.rotation = rotation;
        self
    }

    /// Sets how long access tokens live (whole seconds are sent as `expires_in`).
    pub fn with_access_lifetime(mut self, lifetime: Duration) -> Self {
        self.access_lifetime = lifetime;
        self
    }

    /// Sets how long refresh tokens live.
    pub fn with_refresh_lifetime(mut self, lifetime: RefreshLifetime) -> Self {
        self.refresh_lifetime = lifetime;
        self
    }

    /// Turns RFC 9700 §4.14.2 reuse detection on or off: a spent refresh token presented again
    /// (outside any grace window) revokes the whole grant.
    pub fn with_reuse_detection(mut self, on: bool) -> Self {
        self.reuse_detection = on;
        self
    }

    /// Sets the client credentials the server accepts.
    pub fn with_client(mut self, id: impl Into<String>, secret: impl Into<String>) -> Self {
        self.client_id = id.into();
        self.client_secret = secret.into();
        self
    }

    /// Sets the `scope` sent in successful replies (`None` omits the field; the Xoxoday preset
    /// never sends one).
    pub fn with_scope(mut self, scope: Option<&str>) -> Self {
        self.scope = scope.map(str::to_owned);
        self
    }

    /// With [`Rotation::Off`], leaves `refresh_token` out of successful replies instead of
    /// repeating it, as RFC 6749 §6 allows (the client must keep the one it has). The Xoxoday
    /// preset always sends it.
    pub fn with_unchanged_refresh_token_omitted(mut self, omit: bool) -> Self {
        self.omit_unchanged_refresh_token = omit;
        self
    }

    /// Xoxoday preset: sends `access_token_expiry` and `refresh_token_expiry` as JSON numbers
    /// (`1718000000000`) instead of strings (`"1718000000000"`); the provider's specs disagree.
    pub fn with_numeric_expiries(mut self, numeric: bool) -> Self {
        self.numeric_expiries = numeric;
        self
    }

    /// Xoxoday preset: states the refresh token's expiry only when the grant is issued, never
    /// in a refresh reply (the grant keeps the same deadline; a client must remember it).
    pub fn with_refresh_expiry_at_issue_only(mut self, yes: bool) -> Self {
        self.refresh_expiry_at_issue_only = yes;
        self
    }

    /// Accepts a public (PKCE) client: `client_id` in the request without a secret. A secret
    /// that is sent must still match.
    pub fn with_public_client(mut self, public: bool) -> Self {
        self.public_client = public;
        self
    }

    /// Seeds the generator behind token values; the same seed, clock and calls give the same
    /// tokens.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The wire format.
    pub fn preset(&self) -> Preset {
        self.preset
    }

    /// What a refresh does to the refresh token.
    pub fn rotation(&self) -> Rotation {
        self.rotation
    }

    /// How long access tokens live.
    pub fn access_lifetime(&self) -> Duration {
        self.access_lifetime
    }

    /// How long refresh tokens live.
    pub fn refresh_lifetime(&self) -> RefreshLifetime {
        self.refresh_lifetime
    }

    /// Whether reuse detection is on.
    pub fn reuse_detection(&self) -> bool {
        self.reuse_detection
    }
}

impl fmt::Debug for FakeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConfig")
            .field("preset", &self.preset)
            .field("rotation", &self.rotation)
            .field("access_lifetime", &self.access_lifetime)
            .field("refresh_lifetime", &self.refresh_lifetime)
            .field("reuse_detection", &self.reuse_detection)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("scope", &self.scope)
            .field(
                "omit_unchanged_refresh_token",
                &self.omit_unchanged_refresh_token,
            )
            .field("numeric_expiries", &self.numeric_expiries)
            .field("public_client", &self.public_client)
            .field("seed", &self.seed)
            .finish()
    }
}
