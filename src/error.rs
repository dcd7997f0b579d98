//! Errors, classified by what the caller should do about them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::token::TokenKey;

/// A boxed error, as accepted by [`StoreError::new`] and [`ProviderError::with_source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A cause shared by every waiter that receives one failure.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong keeping a grant alive, by what the caller should do.
///
/// - [`ReauthorizationRequired`](Error::ReauthorizationRequired): only a human can fix it;
///   send the user through the OAuth flow again (or to the provider's dashboard).
/// - [`RateLimited`](Error::RateLimited) and [`Unavailable`](Error::Unavailable): wait and
///   retry; see [`retry_after`](Error::retry_after). The grant is alive.
/// - [`Misconfigured`](Error::Misconfigured): a developer must fix the client configuration.
///   The user's grant is left alone.
///
/// Errors are cheap to clone: one refresh failure reaches every caller waiting on it.
/// No variant ever carries a token or a raw response body.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The grant is dead; only a new grant (a human re-authorizing) can fix it.
    #[error("grant `{key}` needs re-authorization: {reason}")]
    ReauthorizationRequired {
        /// The grant.
        key: TokenKey,
        /// Why the grant died.
        reason: InvalidationReason,
    },
    /// The provider is rate limiting refreshes; wait before trying again.
    #[error("refresh of grant `{key}` is rate limited")]
    RateLimited {
        /// The grant.
        key: TokenKey,
        /// How long to wait: the provider's `Retry-After`, or the backoff chosen here.
        retry_after: Option<Duration>,
    },
    /// A transient failure (network, timeout, 5xx, garbled reply); retrying later can succeed.
    #[error("token endpoint unavailable for grant `{key}`: {cause}")]
    Unavailable {
        /// The grant.
        key: TokenKey,
        /// What failed.
        cause: UnavailableCause,
        /// The HTTP status, when there was a reply.
        status: Option<u16>,
        /// When a retry may succeed, if known.
        retry_after: Option<Duration>,
        /// The underlying error.
        #[source]
        source: Option<SharedError>,
    },
    /// The client is misconfigured; a developer must act. The grant is not marked dead.
    #[error("client misconfigured: {problem}")]
    Misconfigured {
        /// The grant whose refresh revealed the problem, if any.
        key: Option<TokenKey>,
        /// What is wrong.
        problem: ConfigProblem,
        /// The HTTP status, when there was a reply.
        status: Option<u16>,
        /// The underlying error.
        #[source]
        source: Option<SharedError>,
    },
    /// No grant is stored under this key.
    #[error("no grant for key `{key}`")]
    NotFound {
        /// The key.
        key: TokenKey,
    },
    /// The token store failed.
    #[error("token store failed")]
    Store(#[source] StoreError),
}

impl Error {
    /// Whether only a human re-authorizing can fix this.
    pub fn is_reauth_required(&self) -> bool {
        matches!(self, Error::ReauthorizationRequired { .. })
    }

    /// Whether trying again later can succeed without anyone changing anything.
    ///
    /// Store errors count only when transient (a backend or lock-wait failure); a corrupt
    /// record, a missing store or a permission problem needs someone to fix it first.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. } | Error::Unavailable { .. } => true,
            Error::Store(e) => matches!(
                e.kind(),
                StoreErrorKind::Backend | StoreErrorKind::LockTimeout
            ),
            _ => false,
        }
    }

    /// How long to wait before trying again, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } | Error::Unavailable { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The grant this error concerns, if any.
    pub fn key(&self) -> Option<&TokenKey> {
        match self {
            Error::ReauthorizationRequired { key, .. }
            | Error::RateLimited { key, .. }
            | Error::Unavailable { key, .. }
            | Error::NotFound { key } => Some(key),
            Error::Misconfigured { key, .. } => key.as_ref(),
            Error::Store(_) => None,
        }
    }

    /// The reason the grant died, for [`ReauthorizationRequired`](Error::ReauthorizationRequired).
    pub fn invalidation_reason(&self) -> Option<&InvalidationReason> {
        match self {
            Error::ReauthorizationRequired { reason, .. } => Some(reason),
            _ => None,
        }
    }

    pub(crate) fn with_retry_after(mut self, after: Duration) -> Self {
        match &mut self {
            Error::RateLimited { retry_after, .. } | Error::Unavailable { retry_after, .. } => {
                *retry_after = Some(after);
            }
            _ => {}
        }
        self
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

/// Why a grant needs re-authorization.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum InvalidationReason {
    /// The provider answered `invalid_grant`: the refresh token is invalid, expired or revoked
    /// (or the provider's equivalent, such as Graph API subcode 467 "invalid access token" from
    /// an endpoint that renews by access token).
    InvalidGrant,
    /// The refresh token's known expiry has passed; it cannot be renewed.
    RefreshTokenExpired,
    /// The user's password was changed or reset, which killed the grant.
    PasswordChanged,
    /// Another party minted new tokens for this grant, which killed these.
    Superseded,
    /// The user or an administrator revoked the app's access.
    Revoked,
    /// The grant has no refresh token and its access token expired (or the API rejected it).
    NoRefreshToken,
    /// A refresh reply was lost after the provider had rotated the refresh token (a timeout or
    /// a connection dropped mid-reply), and the provider refused the old refresh token on the
    /// prompt retry: the new one never arrived. Not the user's doing; a human must still
    /// reconnect.
    RotationLost,
    /// The provider locked the account behind a security checkpoint (Graph API subcode 459):
    /// the user must log in on the provider's site and pass it, then reconnect.
    SecurityCheckpoint,
    /// The access token expired and this provider cannot renew an expired one (Graph API
    /// subcode 463; Instagram-style long-lived tokens, which are renewed only while valid).
    AccessTokenExpired,
    /// A provider-specific code.
    Provider {
        /// The provider's code.
        code: String,
    },
    /// An operator moved the grant to another store (`tokenkeeper grants move`), and marked
    /// the record left here with this reason
    /// ([`GrantRecord::into_moved`](crate::GrantRecord::into_moved)).
    ///
    /// The grant is alive where it went: no user needs to reconnect, but this instance must
    /// stop using it, so that it does not race the new environment with the same refresh token
    /// (for a rotating provider, two stores refreshing one grant kill it at the next
    /// rotation). Point this instance at the new store, or insert a grant again here (moving it
    /// back does) to revive it, as with any dead grant.
    Moved {
        /// Where the grant went: a store URL without user, password or query, never a secret.
        to: String,
    },
}

impl InvalidationReason {
    /// A stable snake-case word for the reason, for scripts, logs and metric labels
    /// (`invalid_grant`, `rotation_lost`, `moved`, …). Never free text: a provider's own code
    /// is `provider`, a move's destination is not included.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidGrant => "invalid_grant",
            Self::RefreshTokenExpired => "refresh_token_expired",
            Self::PasswordChanged => "password_changed",
            Self::Superseded => "superseded",
            Self::Revoked => "revoked",
            Self::NoRefreshToken => "no_refresh_token",
            Self::RotationLost => "rotation_lost",
            Self::SecurityCheckpoint => "security_checkpoint",
            Self::AccessTokenExpired => "access_token_expired",
            Self::Provider { .. } => "provider",
            Self::Moved { .. } => "moved",
        }
    }
}

impl fmt::Display for InvalidationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidGrant => f.write_str("the provider rejected the refresh token"),
            Self::RefreshTokenExpired => f.write_str("the refresh token expired"),
            Self::PasswordChanged => f.write_str("the user's password changed"),
            Self::Superseded => f.write_str("new tokens were issued elsewhere"),
            Self::Revoked => f.write_str("access was revoked"),
            Self::NoRefreshToken => {
                f.write_str("the access token expired and there is no refresh token")
            }
            Self::RotationLost => {
                f.write_str("the reply carrying the rotated refresh token was lost")
            }
            Self::SecurityCheckpoint => {
                f.write_str("the account is held at the provider's security checkpoint")
            }
            Self::AccessTokenExpired => {
                f.write_str("the access token expired and cannot be renewed once expired")
            }
            Self::Provider { code } => write!(f, "provider code `{code}`"),
            Self::Moved { to } => write!(f, "the grant was moved to another store ({to})"),
        }
    }
}

/// What transient failure made the token endpoint unavailable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UnavailableCause {
    /// The connection could not be made.
    Connect,
    /// No reply in time.
    Timeout,
    /// The connection failed mid-request.
    Network,
    /// The server answered 5xx.
    ServerError,
    /// The server answered a status that means nothing certain about the grant.
    UnexpectedStatus,
    /// The reply could not be understood (not JSON, missing fields, too large…).
    InvalidResponse,
    /// The refresh task ended without an answer (for example, a provider panicked).
    Internal,
    /// The grant is in backoff after earlier failures; no request was sent.
    Backoff,
    /// The cross-process refresh lock's lease might run out before the provider could
    /// answer (the store or the clock was slow); no request was sent, so no other process can
    /// present the same refresh token at the same time. Retrying can succeed at once.
    LockExpired,
}

impl fmt::Display for UnavailableCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connection failed",
            Self::Timeout => "timed out",
            Self::Network => "network error",
            Self::ServerError => "server error",
            Self::UnexpectedStatus => "unexpected status",
            Self::InvalidResponse => "invalid response",
            Self::Internal => "refresh ended without an answer",
            Self::Backoff => "backing off after earlier failures",
            Self::LockExpired => "the refresh lock's lease ran short before the provider call",
        })
    }
}

/// What is wrong with the client configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConfigProblem {
    /// `invalid_client`: client authentication failed (wrong id or secret, wrong auth method).
    InvalidClient,
    /// `unauthorized_client`: the client may not use this grant type.
    UnauthorizedClient,
    /// `unsupported_grant_type`.
    UnsupportedGrantType,
    /// `invalid_scope`.
    InvalidScope,
    /// `invalid_request`: the request was malformed (usually a client bug).
    InvalidRequest,
    /// The token endpoint URL is wrong (404, 405, unparsable).
    Endpoint,
    /// The HTTP client could not be built or used.
    HttpClient,
    /// Another OAuth error code that means the configuration is at fault.
    OAuth {
        /// The code.
        code: String,
    },
    /// A setting of this crate is out of range or contradicts another
    /// (from [`TokenManagerBuilder::try_build`](crate::TokenManagerBuilder::try_build)).
    Setting {
        /// The setting.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidClient => f.write_str("invalid_client"),
            Self::UnauthorizedClient => f.write_str("unauthorized_client"),
            Self::UnsupportedGrantType => f.write_str("unsupported_grant_type"),
            Self::InvalidScope => f.write_str("invalid_scope"),
            Self::InvalidRequest => f.write_str("invalid_request"),
            Self::Endpoint => f.write_str("bad token endpoint"),
            Self::HttpClient => f.write_str("http client error"),
            Self::OAuth { code } => write!(f, "oauth error `{code}`"),
            Self::Setting { setting, reason } => write!(f, "setting `{setting}` {reason}"),
        }
    }
}

/// A failure of a [`TokenStore`](crate::TokenStore).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}")]
pub struct StoreError {
    kind: StoreErrorKind,
    #[source]
    source: Option<SharedError>,
}

/// The kind of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The backend failed (I/O, connection, timeout).
    Backend,
    /// A stored record could not be read (corrupt, or written by something else). It is left
    /// as it is for a human to inspect; nothing is written over it.
    Corrupt,
    /// The store's location (a directory, a database) does not exist. Absent *records* are
    /// `Ok(None)`, never this.
    NotFound,
    /// The process may not read or write the store.
    PermissionDenied,
    /// Waiting for a cross-process refresh lock took longer than the store allows.
    LockTimeout,
    /// The key cannot be used with the store: longer than
    /// [`TokenKey::MAX_LEN`](crate::TokenKey::MAX_LEN) bytes (every built-in store refuses
    /// those), or otherwise unusable by this backend. The caller's input is at fault: the same
    /// key fails again, so this is not [retryable](Error::is_retryable).
    InvalidKey,
    /// An encrypted record names a key id that the store's keyring does not hold (a key
    /// retired too early, or a keyring missing an old key). The record is left as it is: add
    /// the key to the keyring and it reads again.
    KeyUnavailable,
    /// An encrypted record failed authentication: the key under its key id is not the one it
    /// was written with, or it was written for another grant or namespace (moved or copied),
    /// or it was altered. It is never overwritten with guesses; a human decides.
    Undecryptable,
    /// An encrypting store found a record written without encryption, and was not told to
    /// accept those (a migration option). The record is left as it is.
    Unencrypted,
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Backend => "store backend error",
            Self::Corrupt => "stored record is corrupt",
            Self::NotFound => "store location not found",
            Self::PermissionDenied => "permission denied by the store",
            Self::LockTimeout => "timed out waiting for the refresh lock",
            Self::InvalidKey => "the key cannot be used with this store",
            Self::KeyUnavailable => "the record's encryption key is not in the keyring",
            Self::Undecryptable => "the record cannot be decrypted with the keyring",
            Self::Unencrypted => "the record is not encrypted",
        })
    }
}

impl StoreError {
    /// A backend failure caused by `source`.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            kind: StoreErrorKind::Backend,
            source: Some(Arc::from(source.into())),
        }
    }

    /// A record that cannot be decoded.
    pub fn corrupt(source: impl Into<BoxError>) -> Self {
        Self {
            kind: StoreErrorKind::Corrupt,
            source: Some(Arc::from(source.into())),
        }
    }

    /// A failure of the given kind caused by `source`.
    pub fn with_kind(kind: StoreErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(Arc::from(source.into())),
        }
    }

    /// `Ok` if `key` is at most [`TokenKey::MAX_LEN`] bytes long, else
    /// [`StoreErrorKind::InvalidKey`] (quoting only the key's start). The built-in stores call
    /// it first in every method taking a key; a custom store can do the same:
    /// `StoreError::check_key(key)?;`.
    pub fn check_key(key: &TokenKey) -> Result<(), StoreError> {
        let len = key.as_str().len();
        if len <= TokenKey::MAX_LEN {
            return Ok(());
        }
        let start: String = key.as_str().chars().take(32).collect();
        Err(Self::with_kind(
            StoreErrorKind::InvalidKey,
            format!(
                "a key of {len} bytes (`{start}…`) is longer than the {} bytes stores accept",
                TokenKey::MAX_LEN
            ),
        ))
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

/// A classified refresh failure, returned by a [`Provider`](crate::Provider).
///
/// The [`TokenManager`](crate::TokenManager) turns it into an [`Error`] for the grant and acts
/// on it: a dead grant is persisted as such, a rate limit or outage starts a backoff.
///
/// A failure can still carry a refresh token the server rotated (see
/// [`rotated_refresh_token`](Self::rotated_refresh_token)); `Debug` shows it redacted and
/// `Display` never mentions it.
#[derive(Debug, Clone)]
pub struct ProviderError {
    pub(crate) kind: ProviderErrorKind,
    pub(crate) status: Option<u16>,
    pub(crate) source: Option<SharedError>,
    pub(crate) rotated_refresh_token: Option<crate::token::RefreshToken>,
}

/// What a [`ProviderError`] means.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// The grant is dead.
    Reauthorize(InvalidationReason),
    /// Too many requests.
    RateLimited {
        /// The provider's `Retry-After` or penalty, if it gave one.
        retry_after: Option<Duration>,
    },
    /// A transient failure.
    Unavailable {
        /// What failed.
        cause: UnavailableCause,
        /// The provider's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
    },
    /// The client configuration is at fault.
    Misconfigured(ConfigProblem),
}

impl ProviderError {
    /// A failure of the given kind.
    pub fn new(kind: ProviderErrorKind) -> Self {
        Self {
            kind,
            status: None,
            source: None,
            rotated_refresh_token: None,
        }
    }

    /// The grant is dead for `reason`.
    pub fn reauthorize(reason: InvalidationReason) -> Self {
        Self::new(ProviderErrorKind::Reauthorize(reason))
    }

    /// The provider is rate limiting.
    pub fn rate_limited(retry_after: Option<Duration>) -> Self {
        Self::new(ProviderErrorKind::RateLimited { retry_after })
    }

    /// A transient failure.
    pub fn unavailable(cause: UnavailableCause) -> Self {
        Self::new(ProviderErrorKind::Unavailable {
            cause,
            retry_after: None,
        })
    }

    /// The client configuration is at fault.
    pub fn misconfigured(problem: ConfigProblem) -> Self {
        Self::new(ProviderErrorKind::Misconfigured(problem))
    }

    /// Records the HTTP status of the reply.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Records the underlying error. It must not contain a token or a raw response body.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(Arc::from(source.into()));
        self
    }

    /// Records a refresh token the server issued in a reply that is otherwise a failure
    /// (say, a 2xx carrying a new `refresh_token` but no usable `access_token`).
    ///
    /// A server that rotates refresh tokens has already spent the old one when it answers, so
    /// this token is the only way the grant can be refreshed again: whoever handles the failure
    /// should persist it in place of the old one. It does not change what the failure means.
    /// [`HttpReply::interpret`](crate::HttpReply::interpret) sets it; custom providers should
    /// too.
    pub fn with_rotated_refresh_token(mut self, refresh_token: crate::token::RefreshToken) -> Self {
        self.rotated_refresh_token = Some(refresh_token);
        self
    }

    /// The refresh token the server rotated to in the failed reply, if it sent a usable one
    /// (see [`with_rotated_refresh_token`](Self::with_rotated_refresh_token)).
    pub fn rotated_refresh_token(&self) -> Option<&crate::token::RefreshToken> {
        self.rotated_refresh_token.as_ref()
    }

    /// What the failure means.
    pub fn kind(&self) -> &ProviderErrorKind {
        &self.kind
    }

    /// The HTTP status, if there was a reply.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    pub(crate) fn into_error(self, key: &TokenKey) -> Error {
        let key = key.clone();
        match self.kind {
            ProviderErrorKind::Reauthorize(reason) => {
                Error::ReauthorizationRequired { key, reason }
            }
            ProviderErrorKind::RateLimited { retry_after } => {
                Error::RateLimited { key, retry_after }
            }
            ProviderErrorKind::Unavailable { cause, retry_after } => Error::Unavailable {
                key,
                cause,
                status: self.status,
                retry_after,
                source: self.source,
            },
            ProviderErrorKind::Misconfigured(problem) => Error::Misconfigured {
                key: Some(key),
                problem,
                status: self.status,
                source: self.source,
            },
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ProviderErrorKind::Reauthorize(reason) => write!(f, "grant is dead: {reason}"),
            ProviderErrorKind::RateLimited { .. } => f.write_str("rate limited"),
            ProviderErrorKind::Unavailable { cause, .. } => write!(f, "unavailable: {cause}"),
            ProviderErrorKind::Misconfigured(p) => write!(f, "misconfigured: {p}"),
        }?;
        if let Some(status) = self.status {
            write!(f, " (http {status})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProviderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_follow_the_variant() {
        let key = TokenKey::from("k");
        let dead = Error::ReauthorizationRequired {
            key: key.clone(),
            reason: InvalidationReason::InvalidGrant,
        };
        assert!(dead.is_reauth_required() && !dead.is_retryable());
        let limited = Error::RateLimited {
            key: key.clone(),
            retry_after: Some(Duration::from_secs(120)),
        };
        assert!(limited.is_retryable() && !limited.is_reauth_required());
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(120)));
        let misconfigured = Error::Misconfigured {
            key: Some(key),
            problem: ConfigProblem::InvalidClient,
            status: Some(401),
            source: None,
        };
        assert!(!misconfigured.is_retryable() && !misconfigured.is_reauth_required());
        assert!(Error::Store(StoreError::new("connection reset")).is_retryable());
        assert!(!Error::Store(StoreError::corrupt("bad json")).is_retryable());
        let invalid_key = StoreError::with_kind(StoreErrorKind::InvalidKey, "too long");
        assert!(!Error::Store(invalid_key).is_retryable());
    }

    #[test]
    fn display_is_lowercase_without_trailing_period() {
        let e = Error::ReauthorizationRequired {
            key: TokenKey::from("acct-1"),
            reason: InvalidationReason::PasswordChanged,
        };
        let s = e.to_string();
        assert_eq!(
            s,
            "grant `acct-1` needs re-authorization: the user's password changed"
        );
        assert!(!s.ends_with('.'));
    }
}
