//! Grants as the fake server sees them: ids, issued token pairs, and their state.

use std::fmt;
use std::time::{Duration, SystemTime};

/// Names one grant on a [`FakeAuthServer`](super::FakeAuthServer): one user's authorization of
/// the app, which lives on across refreshes and rotations.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub(super) u64);

impl fmt::Debug for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GrantId({self})")
    }
}

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A token pair handed out of band, as an OAuth callback or a provider's dashboard would.
///
/// `Debug` redacts both tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedGrant {
    /// The grant the tokens belong to.
    pub grant: GrantId,
    /// The access token.
    pub access_token: String,
    /// The refresh token.
    pub refresh_token: String,
    /// The access token's lifetime, as a token response's `expires_in` would state it.
    pub expires_in: Duration,
    /// When the access token expires, on the server's clock.
    pub access_expires_at: SystemTime,
    /// When the refresh token expires, on the server's clock (`None`: never).
    pub refresh_expires_at: Option<SystemTime>,
}

impl fmt::Debug for IssuedGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedGrant")
            .field("grant", &self.grant)
            .field("access_token", &"[redacted]")
            .field("refresh_token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .finish()
    }
}

/// Where a grant stands, from [`FakeAuthServer::grant_state`](super::FakeAuthServer::grant_state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GrantState {
    /// The grant's current refresh token works.
    Active,
    /// The grant's current refresh token has expired; only a new grant helps.
    RefreshTokenExpired,
    /// The grant was revoked: every token of it is dead.
    Revoked(RevocationReason),
}

/// Why a grant was revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevocationReason {
    /// The user revoked the app ([`FakeAuthServer::revoke`](super::FakeAuthServer::revoke)).
    UserRevoked,
    /// The account's password was reset
    /// ([`FakeAuthServer::reset_password`](super::FakeAuthServer::reset_password)).
    PasswordReset,
    /// A spent refresh token was presented again (RFC 9700 §4.14.2).
    ReuseDetected,
    /// Too many rate-limited refresh calls ([`RateLimit::invalidate_after`](super::RateLimit)).
    RateLimitAbuse,
    /// The client revoked a token of the grant (RFC 7009), as an app does on disconnect.
    ClientRevoked,
}
