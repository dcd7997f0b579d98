//! What the application can ask about one grant.

use std::time::{Duration, SystemTime};

use crate::error::InvalidationReason;
use crate::store::{ExpiryWarning, GrantRecord};
use crate::token::TokenKey;

/// Which part of a grant listing to read, for
/// [`TokenManager::grants`](crate::TokenManager::grants): at most [`limit`](Self::limit)
/// grants, in key order, after a cursor.
///
/// Start with [`Page::first`] and go on with [`GrantPage::next`]; to resume from a key (say, a
/// query parameter of an admin page), use [`Page::after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    after: Option<TokenKey>,
    limit: usize,
}

impl Page {
    /// The most grants one page holds: 1000. Larger limits are lowered to it.
    pub const MAX_LIMIT: usize = 1000;

    /// The first `limit` grants (at least 1, at most [`MAX_LIMIT`](Self::MAX_LIMIT)).
    pub fn first(limit: usize) -> Self {
        Self {
            after: None,
            limit: limit.clamp(1, Self::MAX_LIMIT),
        }
    }

    /// The `limit` grants whose keys come after `key` (which need not exist any more).
    pub fn after(key: TokenKey, limit: usize) -> Self {
        Self {
            after: Some(key),
            ..Self::first(limit)
        }
    }

    /// The key this page starts after, if any.
    pub fn cursor(&self) -> Option<&TokenKey> {
        self.after.as_ref()
    }

    /// The most grants this page holds.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// The first 100 grants.
impl Default for Page {
    fn default() -> Self {
        Self::first(100)
    }
}

/// One page of a grant listing, from [`TokenManager::grants`](crate::TokenManager::grants).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrantPage {
    /// The grants, in key order.
    pub grants: Vec<TokenStatus>,
    /// The page after this one, or `None` if this is the last.
    pub next: Option<Page>,
}

/// A snapshot of one grant, from [`TokenManager::status`](crate::TokenManager::status).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TokenStatus {
    /// The grant.
    pub key: TokenKey,
    /// Alive, backing off, or dead.
    pub health: GrantHealth,
    /// When the access token expires, if known.
    pub access_expires_at: Option<SystemTime>,
    /// When the refresh token expires, if known.
    pub refresh_expires_at: Option<SystemTime>,
    /// Whether that expiry is fixed or moves with each refresh, if declared
    /// ([`TokenSet::with_refresh_expiry`](crate::TokenSet::with_refresh_expiry)).
    pub refresh_expiry: Option<crate::token::RefreshExpiry>,
    /// Whether the grant has a refresh token.
    pub has_refresh_token: bool,
    /// The last successful refresh.
    pub last_refresh: Option<SystemTime>,
    /// When the grant is next looked at: with a background refresher running, its next planned
    /// check (a refresh if one is due then); otherwise when a call would refresh it (the access
    /// expiry less the refresh margin, or the end of a backoff). `None` for a dead grant or one
    /// that never expires.
    pub next_refresh: Option<SystemTime>,
    /// What happens at [`next_refresh`](Self::next_refresh): a refresh ahead of expiry, a
    /// keep-alive, a retry after a backoff, or only a look at the grant.
    pub next_refresh_kind: Option<NextRefresh>,
    /// The expiry warning already sent for the grant's current expiry (its refresh token's, or
    /// the access token's of a grant nothing can renew), from any process sharing the store.
    pub expiry_warning_sent: Option<ExpiryWarning>,
    /// With a background refresher running: when it plans to send the expiry warning, if one
    /// is to come.
    pub next_expiry_warning: Option<SystemTime>,
    /// Consecutive failed refreshes.
    pub failures: u32,
    /// The last refresh error, as text.
    pub last_error: Option<String>,
    /// A refresh of this grant is in flight in this process right now.
    pub refreshing: bool,
}

/// What the next planned look at a grant is for ([`TokenStatus::next_refresh_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NextRefresh {
    /// A refresh ahead of the access token's expiry (a grant in use; with
    /// [`refresh_idle`](crate::RefresherConfig::refresh_idle), every grant). Without a
    /// background refresher, the first call from then on refreshes.
    BeforeExpiry,
    /// A keep-alive refresh, so that a refresh token that dies unused does not
    /// ([`keep_alive`](crate::RefresherConfig::keep_alive)).
    KeepAlive,
    /// A refresh once a backoff after failures ends.
    AfterBackoff,
    /// A refresh that is due, waiting for the refresher's per-minute cap or a free slot.
    Queued,
    /// A look at the grant, not necessarily a refresh: whether an idle grant was used
    /// meanwhile, when a token too young to renew becomes renewable, when a grant nothing can
    /// renew runs out, or a retry after the store failed.
    Check,
}

/// The lifecycle state of a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrantHealth {
    /// Refreshable.
    Active,
    /// Refreshable, but no refresh is sent before `until` after failures.
    BackingOff {
        /// End of the backoff.
        until: SystemTime,
    },
    /// Dead until a new grant is inserted.
    ReauthorizationRequired {
        /// Why.
        reason: InvalidationReason,
        /// When it was found dead.
        since: Option<SystemTime>,
    },
}

impl TokenStatus {
    pub(crate) fn from_record(
        key: TokenKey,
        record: &GrantRecord,
        now: SystemTime,
        margin: Duration,
    ) -> Self {
        let health = GrantHealth::of(record, now);
        let tokens = record.tokens();
        let (next_refresh, next_refresh_kind) = match &health {
            GrantHealth::ReauthorizationRequired { .. } => (None, None),
            GrantHealth::BackingOff { until } => (Some(*until), Some(NextRefresh::AfterBackoff)),
            GrantHealth::Active => match tokens.expires_at() {
                Some(at) => (
                    Some(at.checked_sub(tokens.scaled_margin(margin)).unwrap_or(at)),
                    Some(NextRefresh::BeforeExpiry),
                ),
                None => (None, None),
            },
        };
        let current_expiries = [tokens.refresh_expires_at(), tokens.expires_at()];
        let expiry_warning_sent = record
            .expiry_warning()
            .filter(|w| current_expiries.contains(&Some(w.expires_at())))
            .copied();
        Self {
            key,
            health,
            access_expires_at: tokens.expires_at(),
            refresh_expires_at: tokens.refresh_expires_at(),
            refresh_expiry: tokens.refresh_expiry(),
            has_refresh_token: tokens.refresh_token().is_some(),
            last_refresh: record.last_refresh(),
            next_refresh,
            next_refresh_kind,
            expiry_warning_sent,
            next_expiry_warning: None,
            failures: record.failures(),
            last_error: record.last_error().map(str::to_owned),
            refreshing: false,
        }
    }

    /// Whether only a human can revive this grant.
    pub fn needs_reauthorization(&self) -> bool {
        matches!(self.health, GrantHealth::ReauthorizationRequired { .. })
    }
}
