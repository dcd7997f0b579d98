//! One attempt: its options ([`StartOptions`]), what starting it gives ([`Authorization`]) and
//! what completing it gives ([`Completed`]).

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::token::TokenKey;

/// Options of one authorization attempt; the default uses the connector's settings.
///
/// ```
/// use std::time::Duration;
/// use tokenkeeper::StartOptions;
/// let options = StartOptions::new()
///     .scopes(["offline_access", "contacts", "campaigns"]) // instead of the defaults
///     .param("login_hint", "user@example.com")
///     .ttl(Duration::from_secs(300));
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub(super) scopes: Option<Vec<String>>,
    pub(super) params: Vec<(String, String)>,
    pub(super) redirect_uri: Option<String>,
    pub(super) ttl: Option<Duration>,
}

impl StartOptions {
    /// The connector's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests these scopes instead of the connector's default scopes.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = Some(scopes.into_iter().map(Into::into).collect());
        self
    }

    /// An extra authorization URL parameter for this attempt (after the connector's).
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Another registered redirect URI for this attempt (the exchange repeats it).
    pub fn redirect_uri(mut self, uri: impl Into<String>) -> Self {
        self.redirect_uri = Some(uri.into());
        self
    }

    /// How long this attempt waits for its callback, instead of the connector's
    /// [`attempt_ttl`](crate::ConnectorBuilder::attempt_ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// A started authorization attempt: where to send the user.
///
/// `Debug` shows the URL without its query and redacts the state.
///
/// ```
/// # use tokenkeeper::{provider_fn, AccessToken, Connector, StartOptions, TokenKey,
/// #     TokenManager, TokenResponse};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let manager = TokenManager::builder(provider_fn(|_, _| async {
/// #     Ok(TokenResponse::new(AccessToken::new("a")))
/// # })).build();
/// # let connector = Connector::builder(&manager, "id", "https://auth.example.com/authorize",
/// #     "https://auth.example.com/token", "https://app.example.com/callback").build()?;
/// let authorization = connector.start(TokenKey::from("customer-42"), StartOptions::new()).await?;
/// assert!(authorization.url().starts_with("https://auth.example.com/authorize?"));
/// assert!(authorization.url().contains("code_challenge_method=S256"));
/// // Respond with `302 Found` and `Location: {authorization.url()}`.
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Authorization {
    pub(super) url: String,
    pub(super) state: String,
    pub(super) key: TokenKey,
    pub(super) expires_at: SystemTime,
}

impl Authorization {
    /// The authorization URL to redirect the user's browser to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The attempt's `state` (already in the URL; the callback brings it back). Apps that
    /// also bind the attempt to a browser can keep it in the session and compare it with the
    /// callback's.
    pub fn state(&self) -> &str {
        &self.state
    }

    /// The grant the attempt is for.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// When the attempt expires, on the manager's clock.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoint = self.url.split(['?', '#']).next().unwrap_or_default();
        f.debug_struct("Authorization")
            .field("url", &endpoint)
            .field("state", &"[redacted]")
            .field("key", &self.key)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A completed authorization: the grant is stored in the manager.
///
/// ```
/// # fn show(completed: tokenkeeper::Completed) {
/// if completed.recovered {
///     println!("{} is reconnected", completed.key);
/// }
/// if !completed.has_refresh_token {
///     println!("no refresh token: request the provider's offline scope");
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Completed {
    /// The grant, now stored.
    pub key: TokenKey,
    /// Whether it replaced a grant that needed re-authorization
    /// ([`Event::Recovered`](crate::Event::Recovered) was sent).
    pub recovered: bool,
    /// When the new access token expires, if the provider said.
    pub expires_at: Option<SystemTime>,
    /// The scopes granted, if the provider said (they may be fewer than requested).
    pub scopes: Option<Vec<String>>,
    /// Whether the provider issued a refresh token (without one the grant cannot be renewed).
    pub has_refresh_token: bool,
}
