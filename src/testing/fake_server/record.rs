//! The fake server's log of token-endpoint calls, for assertions.

use std::time::SystemTime;

use super::{GrantId, RevocationReason};

/// One call to the token endpoint, from [`FakeAuthServer::requests`](super::FakeAuthServer::requests).
///
/// Holds no token values.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedRefresh {
    /// When the call arrived, on the server's clock.
    pub at: SystemTime,
    /// The grant the presented refresh token belongs to, if the server knew the token.
    pub grant: Option<GrantId>,
    /// What the server did.
    pub outcome: RefreshOutcome,
    /// The HTTP status the client received.
    pub status: u16,
    /// The server committed `outcome`, but the client got a `504` instead of the reply
    /// ([`FakeAuthServer::lose_next_replies`](super::FakeAuthServer::lose_next_replies)).
    pub reply_lost: bool,
}

/// What the fake server did with one call to its token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefreshOutcome {
    /// New tokens were issued; `rotated` says whether the refresh token changed.
    Refreshed {
        /// Whether a new refresh token replaced the presented one.
        rotated: bool,
    },
    /// A spent refresh token inside its grace window got a new access token and the grant's
    /// current refresh token.
    GraceReplay,
    /// An error scripted with [`FakeAuthServer::fail_next`](super::FakeAuthServer::fail_next);
    /// nothing changed.
    InjectedFailure,
    /// Rejected by the rate limit; nothing changed (unless the grant was revoked for it).
    RateLimited,
    /// Malformed or incomplete request (`invalid_request`).
    InvalidRequest,
    /// Wrong or missing client credentials (`invalid_client`).
    InvalidClient,
    /// A `grant_type` other than `refresh_token`.
    UnsupportedGrantType,
    /// A refresh token this server never issued.
    UnknownToken,
    /// An expired refresh token.
    Expired,
    /// A spent refresh token, with reuse detection off.
    Spent,
    /// A spent refresh token, with reuse detection on: the grant was revoked by this call.
    ReuseDetected,
    /// A refresh token killed by [`FakeAuthServer::supersede`](super::FakeAuthServer::supersede).
    Superseded,
    /// A refresh token of a grant revoked earlier.
    Revoked(RevocationReason),
}
