//! Notifications for the application.

use std::time::SystemTime;

use crate::error::{Error, InvalidationReason, StoreError};
use crate::token::TokenKey;

/// Something that happened to a grant, for the application to act on (notify a user, page an
/// operator, update a dashboard). Receive them with
/// [`TokenManager::subscribe`](crate::TokenManager::subscribe).
///
/// Events never carry a token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The grant was refreshed and the result saved.
    Refreshed {
        /// The grant.
        key: TokenKey,
        /// Whether the provider issued a new refresh token.
        rotated: bool,
        /// When the new access token expires, if known.
        expires_at: Option<SystemTime>,
        /// Fields of the provider's reply that were present but unusable and were ignored
        /// (names only; see [`TokenResponse::malformed_fields`](crate::TokenResponse::malformed_fields)).
        /// An unreadable expiry was replaced by the manager's fallback lifetime.
        malformed_fields: Vec<String>,
    },
    /// A refresh failed; the grant is alive and will be retried.
    RefreshFailed {
        /// The grant.
        key: TokenKey,
        /// What went wrong.
        error: Error,
        /// No refresh is attempted before this instant.
        retry_at: Option<SystemTime>,
    },
    /// The grant died; only a human can fix it. Sent once per transition to dead.
    ///
    /// The key is all it takes to ask the user to reconnect:
    /// [`Connector::reconnect_url`](crate::Connector::reconnect_url) gives an authorization URL
    /// bound to it, and completing that replaces the grant and sends [`Event::Recovered`].
    /// Email the user a link to a route of your app that calls it (attempts expire after
    /// minutes), and use the reason to say why.
    ReauthorizationRequired {
        /// The grant.
        key: TokenKey,
        /// Why.
        reason: InvalidationReason,
    },
    /// A new grant was inserted for a key that needed re-authorization (by
    /// [`TokenManager::insert`](crate::TokenManager::insert) or a completed
    /// [`Connector`](crate::Connector) attempt).
    Recovered {
        /// The grant.
        key: TokenKey,
    },
    /// The refresh token cannot be renewed and expires soon; a human must act before then.
    RefreshTokenExpiring {
        /// The grant.
        key: TokenKey,
        /// When the refresh token expires.
        expires_at: SystemTime,
    },
    /// A grant that nothing can renew (no refresh token) has an access token that expires
    /// soon; a human must reconnect it before then. Sent once per access token, `expiry_warning`
    /// ahead (see [`RefresherConfig`](crate::RefresherConfig)).
    AccessTokenExpiring {
        /// The grant.
        key: TokenKey,
        /// When the access token expires.
        expires_at: SystemTime,
    },
    /// A grant of a failover group was skipped (see
    /// [`AuthorizedClient::send_any`](crate::AuthorizedClient::send_any)).
    GrantSkipped {
        /// The grant skipped.
        key: TokenKey,
        /// Why.
        error: Error,
    },
    /// Saving a refreshed grant failed. The new tokens are kept in memory and the save is
    /// retried before any further refresh.
    PersistFailed {
        /// The grant.
        key: TokenKey,
        /// The store's error.
        error: StoreError,
    },
}

impl Event {
    /// The grant the event is about.
    pub fn key(&self) -> &TokenKey {
        match self {
            Event::Refreshed { key, .. }
            | Event::RefreshFailed { key, .. }
            | Event::ReauthorizationRequired { key, .. }
            | Event::Recovered { key }
            | Event::RefreshTokenExpiring { key, .. }
            | Event::AccessTokenExpiring { key, .. }
            | Event::PersistFailed { key, .. }
            | Event::GrantSkipped { key, .. } => key,
        }
    }
}
