//! [`ConnectError`]: why an authorization attempt did not produce a grant.

use std::fmt;
use std::time::Duration;

use crate::error::{ConfigProblem, SharedError, StoreError, UnavailableCause};
use crate::token::TokenKey;

/// Why [`Connector::complete`](crate::Connector::complete) (or starting an attempt) failed.
///
/// Every variant means the same thing for the user: no grant was stored, and they must go
/// through the provider's consent screen again (start a new attempt). What differs is what
/// the application should say and whether a developer must act:
///
/// - [`UnknownState`](Self::UnknownState), [`AlreadyUsed`](Self::AlreadyUsed),
///   [`Expired`](Self::Expired), [`InvalidCallback`](Self::InvalidCallback): the callback
///   cannot be trusted or is stale (a bookmarked or replayed callback URL, a forged request, a
///   user who waited too long). Offer to connect again.
/// - [`Denied`](Self::Denied): the user (or the provider) refused; say so.
/// - [`CodeRejected`](Self::CodeRejected): the token endpoint refused the code (`invalid_grant`:
///   expired, already used, or issued for another client, redirect URI or PKCE challenge).
/// - [`Misconfigured`](Self::Misconfigured): a developer must fix the client configuration.
/// - [`RateLimited`](Self::RateLimited), [`Unavailable`](Self::Unavailable),
///   [`Store`](Self::Store): transient; see [`is_retryable`](Self::is_retryable).
///
/// No variant carries a code, a PKCE verifier, a token or a client secret.
///
/// ```
/// # use tokenkeeper::{provider_fn, AccessToken, TokenManager, TokenResponse};
/// use tokenkeeper::{ConnectError, Connector};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let manager = TokenManager::builder(provider_fn(|_, _| async {
/// #     Ok(TokenResponse::new(AccessToken::new("a")))
/// # })).build();
/// # let connector = Connector::builder(&manager, "id", "https://auth.example.com/authorize",
/// #     "https://auth.example.com/token", "https://app.example.com/callback").build()?;
/// // A callback nobody started (a forgery, or an attempt another instance kept to itself):
/// let page = match connector.complete("code=stolen&state=made-up").await {
///     Ok(done) => format!("{} connected", done.key),
///     Err(ConnectError::Denied { .. }) => "You declined; connect again any time.".to_owned(),
///     Err(e) if e.is_retryable() => "The provider is busy; try again shortly.".to_owned(),
///     Err(ConnectError::Misconfigured { .. }) => "Our fault; we are on it.".to_owned(),
///     Err(_) => "That link did not work; please connect again.".to_owned(),
/// };
/// assert_eq!(page, "That link did not work; please connect again.");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No pending attempt has this `state`: it was never issued here, it was pruned after it
    /// expired, or the callback was forged. Also what a callback for another client's attempt
    /// gets. Nothing is stored.
    #[error("no pending authorization attempt matches the callback's state")]
    UnknownState,
    /// The attempt for this `state` was completed (or refused) already: the callback was
    /// replayed (a reload, a back button, an attacker).
    #[error("authorization attempt for `{key}` was already used")]
    AlreadyUsed {
        /// The grant the attempt was for.
        key: TokenKey,
    },
    /// The attempt expired before the callback arrived (see
    /// [`ConnectorBuilder::attempt_ttl`](crate::ConnectorBuilder::attempt_ttl)).
    #[error("authorization attempt for `{key}` expired")]
    Expired {
        /// The grant the attempt was for.
        key: TokenKey,
    },
    /// The authorization server redirected back with `error=…` (RFC 6749 §4.1.2.1): the user
    /// declined ([`AuthorizeErrorCode::AccessDenied`]) or the request was refused.
    #[error("authorization for `{key}` refused: {error}")]
    Denied {
        /// The grant the attempt was for.
        key: TokenKey,
        /// The `error` code.
        error: AuthorizeErrorCode,
        /// The server's `error_description`, if any (at most 256 characters, control
        /// characters removed: it came in a URL anyone can craft).
        description: Option<String>,
    },
    /// The callback's query is malformed: no `state`, no `code`, or a parameter given twice.
    #[error("malformed authorization callback: {problem}")]
    InvalidCallback {
        /// The grant, when the `state` was valid.
        key: Option<TokenKey>,
        /// What is wrong.
        problem: &'static str,
    },
    /// The token endpoint refused the authorization code (`invalid_grant`): it expired, was
    /// already exchanged, or does not match the client, redirect URI or PKCE verifier. Also
    /// an [after-exchange step](crate::ConnectorBuilder::after_exchange) that found the new
    /// token dead.
    #[error("authorization code for `{key}` was rejected by the token endpoint")]
    CodeRejected {
        /// The grant the attempt was for.
        key: TokenKey,
        /// The HTTP status of the refusal.
        status: Option<u16>,
    },
    /// The client is misconfigured (`invalid_client`, `unauthorized_client`, a wrong URL, …);
    /// a developer must act.
    #[error("client misconfigured: {problem}")]
    Misconfigured {
        /// The grant the attempt was for, if it got that far.
        key: Option<TokenKey>,
        /// What is wrong.
        problem: ConfigProblem,
        /// The HTTP status, when there was a reply.
        status: Option<u16>,
        /// The underlying error.
        #[source]
        source: Option<SharedError>,
    },
    /// The token endpoint rate limited the code exchange.
    #[error("code exchange for `{key}` is rate limited")]
    RateLimited {
        /// The grant the attempt was for.
        key: TokenKey,
        /// How long to wait, when the server said.
        retry_after: Option<Duration>,
    },
    /// The token endpoint could not be reached or answered garbage. The code may or may not
    /// have been spent; the user must start again.
    #[error("token endpoint unavailable for `{key}`: {cause}")]
    Unavailable {
        /// The grant the attempt was for.
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
    /// [`Connector::reconnect_url`](crate::Connector::reconnect_url) for a key with no stored
    /// grant.
    #[error("no grant for key `{key}`")]
    NotFound {
        /// The key.
        key: TokenKey,
    },
    /// The pending-attempt store or the token store failed.
    #[error("store failed")]
    Store(#[source] StoreError),
}

impl ConnectError {
    /// The grant the attempt was for, when the callback got far enough to tell.
    pub fn key(&self) -> Option<&TokenKey> {
        match self {
            Self::UnknownState | Self::Store(_) => None,
            Self::InvalidCallback { key, .. } | Self::Misconfigured { key, .. } => key.as_ref(),
            Self::AlreadyUsed { key }
            | Self::Expired { key }
            | Self::Denied { key, .. }
            | Self::CodeRejected { key, .. }
            | Self::RateLimited { key, .. }
            | Self::Unavailable { key, .. }
            | Self::NotFound { key } => Some(key),
        }
    }

    /// Whether the failure is transient (network, rate limit, store): the same user can start
    /// a new attempt later and expect it to work. Every other failure needs the user (or a
    /// developer) to do something differently.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Unavailable { .. } | Self::Store(_)
        )
    }

    /// How long to wait before a new attempt, when the server said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::Unavailable { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

impl From<StoreError> for ConnectError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// An authorization endpoint's `error` code (RFC 6749 §4.1.2.1, OpenID Connect Core
/// §3.1.2.6), with the codes nobody standardised kept as they came.
///
/// ```
/// use tokenkeeper::AuthorizeErrorCode;
/// assert_eq!(AuthorizeErrorCode::parse("access_denied"), AuthorizeErrorCode::AccessDenied);
/// assert_eq!(AuthorizeErrorCode::parse("org_policy").as_str(), "org_policy");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthorizeErrorCode {
    /// `access_denied`: the user (or the server) declined.
    AccessDenied,
    /// `invalid_request`: the authorization request is malformed (a developer must act).
    InvalidRequest,
    /// `unauthorized_client`: this client may not use the code flow.
    UnauthorizedClient,
    /// `unsupported_response_type`.
    UnsupportedResponseType,
    /// `invalid_scope`: a requested scope is unknown or not allowed.
    InvalidScope,
    /// `server_error`.
    ServerError,
    /// `temporarily_unavailable`.
    TemporarilyUnavailable,
    /// `login_required`, `consent_required`, `interaction_required` (OpenID Connect, after a
    /// `prompt=none` request).
    InteractionRequired(String),
    /// Any other code, as it came (at most 64 characters).
    Other(String),
}

impl AuthorizeErrorCode {
    /// Parses an `error` value.
    pub fn parse(code: &str) -> Self {
        match code {
            "access_denied" => Self::AccessDenied,
            "invalid_request" => Self::InvalidRequest,
            "unauthorized_client" => Self::UnauthorizedClient,
            "unsupported_response_type" => Self::UnsupportedResponseType,
            "invalid_scope" => Self::InvalidScope,
            "server_error" => Self::ServerError,
            "temporarily_unavailable" => Self::TemporarilyUnavailable,
            "login_required" | "consent_required" | "interaction_required" => {
                Self::InteractionRequired(code.to_owned())
            }
            other => Self::Other(sanitize(other, 64)),
        }
    }

    /// The code as sent on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::AccessDenied => "access_denied",
            Self::InvalidRequest => "invalid_request",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedResponseType => "unsupported_response_type",
            Self::InvalidScope => "invalid_scope",
            Self::ServerError => "server_error",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::InteractionRequired(code) | Self::Other(code) => code,
        }
    }
}

impl fmt::Display for AuthorizeErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// At most `max` characters of `text`, without control characters.
pub(super) fn sanitize(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_ones_are_trimmed() {
        for code in [
            "access_denied",
            "invalid_request",
            "unauthorized_client",
            "unsupported_response_type",
            "invalid_scope",
            "server_error",
            "temporarily_unavailable",
            "consent_required",
            "custom_code",
        ] {
            assert_eq!(AuthorizeErrorCode::parse(code).as_str(), code);
        }
        let long = "x".repeat(100) + "\n";
        assert_eq!(AuthorizeErrorCode::parse(&long).as_str(), "x".repeat(64));
    }

    #[test]
    fn retryable_only_when_transient() {
        let key = TokenKey::from("k");
        assert!(ConnectError::RateLimited {
            key: key.clone(),
            retry_after: Some(Duration::from_secs(3)),
        }
        .is_retryable());
        assert!(!ConnectError::Denied {
            key: key.clone(),
            error: AuthorizeErrorCode::AccessDenied,
            description: None,
        }
        .is_retryable());
        assert!(!ConnectError::UnknownState.is_retryable());
        assert_eq!(
            ConnectError::CodeRejected {
                key: key.clone(),
                status: Some(400)
            }
            .key(),
            Some(&key)
        );
    }
}
