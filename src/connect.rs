//! Getting a grant: the authorization-code flow with PKCE and state, and reconnect links.
//!
//! A [`Connector`] sends the user to the provider's consent screen
//! ([`start`](Connector::start)), completes the callback ([`complete`](Connector::complete):
//! state check, code exchange with the PKCE verifier, classification of the token endpoint's
//! reply) and stores the new grant with [`TokenManager::insert`]. A grant that died gets a
//! fresh authorization URL bound to its key from [`reconnect_url`](Connector::reconnect_url);
//! completing it replaces the dead grant and emits [`Event::Recovered`](crate::Event::Recovered).
//! An [`AfterExchange`] step turns what the code exchange returned into the grant to keep
//! (Instagram Login's short-lived token into a renewable long-lived one).

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use oauth2::basic::BasicClient;
use oauth2::{CsrfToken, EndpointNotSet, EndpointSet, PkceCodeChallenge, RedirectUrl};

use crate::error::{ConfigProblem, Error, StoreError, UnavailableCause};
use crate::manager::TokenManager;
use crate::provider::{ClientAuth, OAuth2Provider};
use crate::token::{AccessToken, TokenKey, TokenSet};

mod after_exchange;
mod attempt;
mod builder;
mod callback;
mod error;
mod pending;

pub use self::after_exchange::AfterExchange;
pub use self::attempt::{Authorization, Completed, StartOptions};
pub use self::builder::ConnectorBuilder;
pub use self::callback::CallbackParams;
pub use self::error::{AuthorizeErrorCode, ConnectError};
pub use self::pending::{
    MemoryPendingStore, PendingAttempt, PendingStore, StorePendingStore, Taken,
};

/// Parameters the connector sets itself; an extra parameter may not repeat them.
const RESERVED_PARAMS: [&str; 7] = [
    "response_type",
    "client_id",
    "state",
    "code_challenge",
    "code_challenge_method",
    "redirect_uri",
    "scope",
];

/// The problem with extra parameters that repeat a reserved one, if any.
fn reserved_param(params: &[(String, String)]) -> Option<ConfigProblem> {
    let (name, _) = params
        .iter()
        .find(|(name, _)| RESERVED_PARAMS.contains(&name.as_str()))?;
    Some(ConfigProblem::Setting {
        setting: "auth_param".to_owned(),
        reason: format!("`{name}` is set by the connector"),
    })
}

type AuthClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet>;

/// How long an authorization attempt waits for its callback by default: 10 minutes.
///
/// ```
/// assert_eq!(tokenkeeper::DEFAULT_ATTEMPT_TTL.as_secs(), 600);
/// ```
pub const DEFAULT_ATTEMPT_TTL: Duration = Duration::from_secs(600);

/// Obtains grants for a [`TokenManager`] through the OAuth 2.0 authorization-code flow
/// (RFC 6749 §4.1) with PKCE (RFC 7636, `S256`) and a single-use `state`.
///
/// Why: a grant has to come from somewhere, and it has to come again when it dies (a revoked
/// app, a password reset, a refresh token that expired). The flow is easy to get subtly
/// wrong — a state not checked, or checked but reusable; a verifier kept in a cookie; a
/// pending attempt only the instance that started it can finish; a token endpoint's
/// `invalid_client` shown to the user as "try again" — so it lives here, next to the grants.
///
/// How: [`start`](Self::start) returns the URL to send the user to and remembers the attempt
/// (state → PKCE verifier, key, redirect URI, expiry) in a [`PendingStore`];
/// [`complete`](Self::complete) takes the callback's query string, checks and consumes the
/// state, exchanges the code and [inserts](TokenManager::insert) the grant.
/// [`reconnect_url`](Self::reconnect_url) is `start` for a grant that needs re-authorization.
///
/// ```
/// use std::sync::Arc;
/// use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
/// use tokenkeeper::{ClientSecret, Connector, OAuth2Provider, StartOptions, TokenKey, TokenManager};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let clock = Arc::new(ManualClock::fixed());
/// let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
/// let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
///     .client_secret(ClientSecret::new(server.client_secret()))
///     .build()?;
/// let manager = TokenManager::builder(provider).clock(clock.clone()).build();
/// let connector = Connector::builder(&manager, server.client_id(), server.authorize_url(),
///         server.token_url(), "http://127.0.0.1:3000/callback")
///     .client_secret(ClientSecret::new(server.client_secret()))
///     .scopes(["offline_access"])
///     .build()?;
///
/// // Your `/connect` route redirects the browser to this URL…
/// let key = TokenKey::from("customer-42");
/// let authorization = connector.start(key.clone(), StartOptions::new()).await?;
/// // …the user consents, and the provider redirects to your `/callback` route:
/// let callback = server.follow_authorization(authorization.url()).await?;
/// let completed = connector.complete(callback.as_str()).await?;
/// assert_eq!(completed.key, key);
/// assert!(server.is_access_token_valid(manager.access_token(&key).await?.secret()));
/// # Ok(()) }
/// ```
///
/// # Security
///
/// The state is 128 random bits, the verifier 256; the challenge method is always `S256`.
/// An attempt completes at most once, within its lifetime
/// ([`attempt_ttl`](ConnectorBuilder::attempt_ttl), 10 minutes by default, on the manager's
/// [`Clock`](crate::Clock)); replays, forgeries and late callbacks get typed errors and store
/// nothing. The code and the verifier are never logged or put in an error, and `Debug` of
/// every type here redacts them.
///
/// The state ties a callback to an attempt, not to a browser. If your app has user sessions,
/// check that [`Completed::key`] belongs to the user whose session the callback arrived in
/// before telling them "connected", and only serve [`start`](Self::start) and
/// [`reconnect_url`](Self::reconnect_url) to signed-in users allowed to act for that key.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    manager: TokenManager,
    client: AuthClient,
    redirect: RedirectUrl,
    exchange: OAuth2Provider,
    after_exchange: Option<Arc<dyn AfterExchange>>,
    scopes: Vec<String>,
    params: Vec<(String, String)>,
    pending: Arc<dyn PendingStore>,
    ttl: Duration,
    /// When expired attempts were last pruned.
    pruned_at: Mutex<Option<SystemTime>>,
}

impl Connector {
    /// Starts building a connector for `manager`: the client id, the provider's authorization
    /// and token endpoints, and the redirect URI registered for your callback route.
    pub fn builder(
        manager: &TokenManager,
        client_id: impl Into<String>,
        auth_url: impl Into<String>,
        token_url: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> ConnectorBuilder {
        ConnectorBuilder {
            manager: manager.clone(),
            client_id: client_id.into(),
            auth_url: auth_url.into(),
            token_url: token_url.into(),
            redirect_uri: redirect_uri.into(),
            client_secret: None,
            auth: ClientAuth::default(),
            scopes: Vec::new(),
            params: Vec::new(),
            pending: None,
            after_exchange: None,
            ttl: DEFAULT_ATTEMPT_TTL,
            http: None,
            timeout: Some(Duration::from_secs(30)),
        }
    }

    /// The manager new grants go to.
    pub fn manager(&self) -> &TokenManager {
        &self.inner.manager
    }

    /// Starts an authorization attempt for grant `key`: returns the URL to send the user's
    /// browser to, and remembers the attempt until its callback (or its expiry).
    ///
    /// The URL carries `response_type=code`, the client id, the redirect URI, the scopes, a
    /// fresh `state`, an `S256` PKCE challenge, and the extra parameters of the builder and
    /// of `options`.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Store`] if the pending store fails;
    /// [`ConnectError::Misconfigured`] for a redirect URI in `options` that does not parse, or
    /// an extra parameter that repeats one the connector sets (`state`, `scope`, …).
    pub async fn start(
        &self,
        key: TokenKey,
        options: StartOptions,
    ) -> Result<Authorization, ConnectError> {
        let inner = &self.inner;
        if let Some(problem) = reserved_param(&options.params) {
            return Err(ConnectError::Misconfigured {
                key: Some(key),
                problem,
                status: None,
                source: None,
            });
        }
        let now = inner.manager.clock().now();
        self.prune_now_and_then(now).await;
        let redirect = match options.redirect_uri {
            None => inner.redirect.clone(),
            Some(uri) => RedirectUrl::new(uri).map_err(|e| ConnectError::Misconfigured {
                key: Some(key.clone()),
                problem: ConfigProblem::Endpoint,
                status: None,
                source: Some(Arc::new(e)),
            })?,
        };
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = inner
            .client
            .authorize_url(CsrfToken::new_random)
            .set_pkce_challenge(challenge)
            .set_redirect_uri(Cow::Borrowed(&redirect));
        for scope in options.scopes.as_ref().unwrap_or(&inner.scopes) {
            request = request.add_scope(oauth2::Scope::new(scope.clone()));
        }
        for (name, value) in inner.params.iter().chain(&options.params) {
            request = request.add_extra_param(name.as_str(), value.as_str());
        }
        let (url, state) = request.url();
        let expires_at = now + options.ttl.unwrap_or(inner.ttl);
        let attempt = PendingAttempt::new(
            key.clone(),
            verifier.secret().as_str(),
            redirect.as_str(),
            expires_at,
        );
        inner.pending.put(state.secret(), attempt).await?;
        tracing::debug!(key = %key, "authorization attempt started");
        Ok(Authorization {
            url: url.into(),
            state: state.secret().clone(),
            key,
            expires_at,
        })
    }

    /// An authorization URL that reconnects the grant `key` (one that needs
    /// re-authorization, typically after
    /// [`Event::ReauthorizationRequired`](crate::Event::ReauthorizationRequired)): completing
    /// it replaces the grant and emits [`Event::Recovered`](crate::Event::Recovered).
    ///
    /// It is [`start`](Self::start) with the connector's defaults, for a key that has a grant.
    /// Like any attempt it expires after [`attempt_ttl`](ConnectorBuilder::attempt_ttl), so an
    /// email or a dashboard button should link to a route of your app that calls this and
    /// redirects, not to the URL itself (which would also let whoever holds the email connect
    /// their own account in the user's place).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
    /// # use tokenkeeper::{ClientSecret, Connector, Event, OAuth2Provider, TokenManager};
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let clock = Arc::new(ManualClock::fixed());
    /// # let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    /// # let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
    /// #     .client_secret(ClientSecret::new(server.client_secret())).build()?;
    /// # let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    /// # let connector = Connector::builder(&manager, server.client_id(), server.authorize_url(),
    /// #     server.token_url(), "http://127.0.0.1:3000/callback")
    /// #     .client_secret(ClientSecret::new(server.client_secret())).build()?;
    /// # let issued = server.issue_grant();
    /// # let key = tokenkeeper::TokenKey::from("customer-42");
    /// # manager.insert(key.clone(), server.token_set(&issued)).await?;
    /// # server.revoke(&issued.grant);
    /// let mut events = manager.subscribe();
    /// # let _ = manager.refresh_now(&key).await; // the grant turns out to be dead
    /// if let Ok(Event::ReauthorizationRequired { key, reason, .. }) = events.recv().await {
    ///     let link = connector.reconnect_url(&key).await?;
    ///     // Email the user a link to your app's `/reconnect` route, which redirects to
    ///     // `link.url()`; after consent the callback completes it as usual:
    /// #   let callback = server.follow_authorization(link.url()).await?;
    /// #   connector.complete(callback.as_str()).await?;
    /// #   let _ = reason;
    /// }
    /// assert!(manager.access_token(&key).await.is_ok());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConnectError::NotFound`] if no grant is stored under `key` (use
    /// [`start`](Self::start) for a first connection); [`ConnectError::Store`].
    pub async fn reconnect_url(&self, key: &TokenKey) -> Result<Authorization, ConnectError> {
        match self.inner.manager.status(key).await {
            Ok(_) => {}
            Err(Error::NotFound { key }) => return Err(ConnectError::NotFound { key }),
            Err(Error::Store(e)) => return Err(ConnectError::Store(e)),
            Err(other) => return Err(ConnectError::Store(StoreError::new(other))),
        }
        self.start(key.clone(), StartOptions::new()).await
    }

    /// Completes an attempt from its callback: the query string the provider redirected the
    /// browser with (`code=…&state=…`, or `error=…&state=…`), with or without the leading
    /// `?`, or the whole callback URL, or [`CallbackParams`] your web framework parsed.
    ///
    /// In order: the state must name a pending attempt (else
    /// [`UnknownState`](ConnectError::UnknownState)); the attempt is consumed, once (a replay
    /// gets [`AlreadyUsed`](ConnectError::AlreadyUsed)); it must not have expired
    /// ([`Expired`](ConnectError::Expired)); an `error=` callback becomes
    /// [`Denied`](ConnectError::Denied); the code is exchanged with the attempt's verifier and
    /// redirect URI, and the token endpoint's refusal is classified like a refresh's
    /// (`invalid_grant` → [`CodeRejected`](ConnectError::CodeRejected), `invalid_client` →
    /// [`Misconfigured`](ConnectError::Misconfigured), …); the
    /// [after-exchange step](ConnectorBuilder::after_exchange), if any, turns the tokens into
    /// the ones to keep (its refusals are classified the same way); the grant is then
    /// [inserted](TokenManager::insert), replacing any previous grant for the key.
    ///
    /// # Errors
    ///
    /// See [`ConnectError`]. Whatever the error, nothing was stored and the attempt cannot be
    /// completed again: the user starts over.
    pub async fn complete(
        &self,
        callback: impl Into<CallbackParams>,
    ) -> Result<Completed, ConnectError> {
        let inner = &self.inner;
        let params: CallbackParams = callback.into();
        if let Some(problem) = params.problem {
            return Err(ConnectError::InvalidCallback { key: None, problem });
        }
        let Some(state) = params.state.as_deref() else {
            return Err(ConnectError::InvalidCallback {
                key: None,
                problem: "the callback has no state",
            });
        };
        let attempt = match inner.pending.take(state).await? {
            Taken::Attempt(attempt) => attempt,
            Taken::Used { key } => return Err(ConnectError::AlreadyUsed { key }),
            Taken::Unknown => return Err(ConnectError::UnknownState),
        };
        let key = attempt.key().clone();
        let now = inner.manager.clock().now();
        if now >= attempt.expires_at() {
            return Err(ConnectError::Expired { key });
        }
        if let Some(error) = params.error.as_deref() {
            let error = AuthorizeErrorCode::parse(error);
            tracing::debug!(key = %key, error = %error, "authorization refused");
            return Err(ConnectError::Denied {
                key,
                error,
                description: params
                    .error_description
                    .as_deref()
                    .map(|d| error::sanitize(d, 256)),
            });
        }
        let Some(code) = params.code.as_ref() else {
            return Err(ConnectError::InvalidCallback {
                key: Some(key),
                problem: "the callback has neither a code nor an error",
            });
        };
        let redirect = RedirectUrl::new(attempt.redirect_uri().to_owned()).map_err(|e| {
            ConnectError::Misconfigured {
                key: Some(key.clone()),
                problem: ConfigProblem::Endpoint,
                status: None,
                source: Some(Arc::new(e)),
            }
        })?;
        let response = inner
            .exchange
            .exchange_code(code, attempt.verifier(), &redirect, now)
            .await
            .map_err(|e| {
                let status = e.status();
                exchange_error(e.into_error(&key), status)
            })?;
        let mut tokens = TokenSet::new(AccessToken::new("")).apply(response, now);
        if let Some(step) = &inner.after_exchange {
            tokens = step.after_exchange(&key, tokens, now).await.map_err(|e| {
                let status = e.status();
                exchange_error(e.into_error(&key), status)
            })?;
        }
        let recovered = matches!(
            inner.manager.status(&key).await,
            Ok(status) if status.needs_reauthorization()
        );
        let completed = Completed {
            key: key.clone(),
            recovered,
            expires_at: tokens.expires_at(),
            scopes: tokens.scopes().map(<[String]>::to_vec),
            has_refresh_token: tokens.refresh_token().is_some(),
        };
        inner
            .manager
            .insert(key.clone(), tokens)
            .await
            .map_err(|e| match e {
                Error::Store(e) => ConnectError::Store(e),
                other => ConnectError::Store(StoreError::new(other)),
            })?;
        tracing::debug!(key = %key, recovered, "authorization completed");
        Ok(completed)
    }

    /// Prunes expired attempts at most once per attempt lifetime; a failure only delays it.
    async fn prune_now_and_then(&self, now: SystemTime) {
        let inner = &self.inner;
        let due = {
            let mut pruned_at = inner.pruned_at.lock().unwrap_or_else(|e| e.into_inner());
            let due = pruned_at.is_none_or(|at| now < at || now >= at + inner.ttl);
            if due {
                *pruned_at = Some(now);
            }
            due
        };
        if due {
            if let Err(e) = inner.pending.prune(now).await {
                tracing::warn!(error = %e, "pruning expired authorization attempts failed");
            }
        }
    }
}

/// A token endpoint's refusal of a code, as the caller should act on it.
fn exchange_error(error: Error, status: Option<u16>) -> ConnectError {
    match error {
        Error::ReauthorizationRequired { key, .. } => ConnectError::CodeRejected { key, status },
        Error::RateLimited { key, retry_after } => ConnectError::RateLimited { key, retry_after },
        Error::Unavailable {
            key,
            cause,
            status,
            retry_after,
            source,
        } => ConnectError::Unavailable {
            key,
            cause,
            status,
            retry_after,
            source,
        },
        Error::Misconfigured {
            key,
            problem,
            status,
            source,
        } => ConnectError::Misconfigured {
            key,
            problem,
            status,
            source,
        },
        Error::NotFound { key } => ConnectError::Unavailable {
            key,
            cause: UnavailableCause::Internal,
            status,
            retry_after: None,
            source: None,
        },
        Error::Store(e) => ConnectError::Store(e),
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("client_id", &self.inner.client.client_id().as_str())
            .field("auth_url", &self.inner.client.auth_uri().as_str())
            .field("redirect_uri", &self.inner.redirect.as_str())
            .field("scopes", &self.inner.scopes)
            .field("attempt_ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::provider_fn;
    use crate::token::TokenResponse;

    fn manager() -> TokenManager {
        TokenManager::builder(provider_fn(|_, _| async {
            Ok(TokenResponse::new(AccessToken::new("a")))
        }))
        .build()
    }

    fn builder(manager: &TokenManager) -> ConnectorBuilder {
        Connector::builder(
            manager,
            "id",
            "https://auth.example.com/authorize",
            "https://auth.example.com/token",
            "https://app.example.com/callback",
        )
    }

    #[test]
    fn settings_are_checked_when_built() {
        let m = manager();
        assert!(builder(&m).build().is_ok());
        for bad in [
            builder(&m).auth_param("state", "fixed"),
            builder(&m).auth_param("code_challenge_method", "plain"),
            builder(&m).attempt_ttl(Duration::ZERO),
            Connector::builder(&m, "id", "not a url", "https://a/token", "https://a/cb"),
            Connector::builder(&m, "id", "https://a/auth", "https://a/token", "relative/cb"),
        ] {
            assert!(
                matches!(bad.build(), Err(Error::Misconfigured { .. })),
                "accepted a bad setting"
            );
        }
    }

    #[tokio::test]
    async fn each_attempt_has_its_own_state_and_challenge() {
        let m = manager();
        let connector = builder(&m).build().unwrap();
        let key = TokenKey::from("k");
        let a = connector
            .start(key.clone(), StartOptions::new())
            .await
            .unwrap();
        let b = connector
            .start(key.clone(), StartOptions::new())
            .await
            .unwrap();
        assert_ne!(a.state(), b.state());
        let challenge = |url: &str| {
            reqwest::Url::parse(url)
                .unwrap()
                .query_pairs()
                .find(|(n, _)| n == "code_challenge")
                .map(|(_, v)| v.into_owned())
                .unwrap()
        };
        assert_ne!(challenge(a.url()), challenge(b.url()));
        assert!(a.state().len() >= 22, "at least 128 bits");
        let err = connector
            .start(
                key,
                StartOptions::new().param("redirect_uri", "https://evil/cb"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Misconfigured { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_later_start_prunes_expired_attempts() {
        let clock = Arc::new(crate::testing::ManualClock::fixed());
        let m = TokenManager::builder(provider_fn(|_, _| async {
            Ok(TokenResponse::new(AccessToken::new("a")))
        }))
        .clock(clock.clone())
        .build();
        let pending = Arc::new(MemoryPendingStore::new());
        let connector = builder(&m).pending_store(pending.clone()).build().unwrap();
        let key = TokenKey::from("k");
        let old = connector
            .start(key.clone(), StartOptions::new())
            .await
            .unwrap();
        clock.advance(DEFAULT_ATTEMPT_TTL + Duration::from_secs(1));
        // This start prunes the expired attempt: its callback is unknown now.
        connector.start(key, StartOptions::new()).await.unwrap();
        assert_eq!(pending.take(old.state()).await.unwrap(), Taken::Unknown);
    }
}
