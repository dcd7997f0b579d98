//! [`ConnectorBuilder`]: a [`Connector`]'s configuration.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{AuthUrl, RedirectUrl};

use super::{reserved_param, AfterExchange, Connector, Inner, MemoryPendingStore, PendingStore};
use crate::error::{ConfigProblem, Error, SharedError};
use crate::manager::TokenManager;
use crate::provider::{ClientAuth, OAuth2Provider};
use crate::token::ClientSecret;

/// Builds a [`Connector`]; see [`Connector::builder`].
///
/// ```
/// use std::time::Duration;
/// use tokenkeeper::{provider_fn, AccessToken, ClientSecret, Connector, MemoryStore,
///     StorePendingStore, TokenManager, TokenResponse};
/// # let manager = TokenManager::builder(provider_fn(|_, _| async {
/// #     Ok(TokenResponse::new(AccessToken::new("a")))
/// # })).build();
/// let connector = Connector::builder(
///         &manager,
///         "my-client-id",
///         "https://auth.example.com/oauth2/authorize",
///         "https://auth.example.com/oauth2/token",
///         "https://app.example.com/oauth/callback",
///     )
///     .client_secret(ClientSecret::new("my-client-secret"))
///     .scopes(["offline_access", "contacts"])
///     .auth_param("access_type", "offline") // Google-style servers
///     .auth_param("prompt", "consent")
///     .pending_store(StorePendingStore::new(MemoryStore::new())) // shared by your instances
///     .attempt_ttl(Duration::from_secs(600))
///     .build()?;
/// # let _ = connector;
/// # Ok::<(), tokenkeeper::Error>(())
/// ```
pub struct ConnectorBuilder {
    pub(super) manager: TokenManager,
    pub(super) client_id: String,
    pub(super) auth_url: String,
    pub(super) token_url: String,
    pub(super) redirect_uri: String,
    pub(super) client_secret: Option<ClientSecret>,
    pub(super) auth: ClientAuth,
    pub(super) scopes: Vec<String>,
    pub(super) params: Vec<(String, String)>,
    pub(super) pending: Option<Arc<dyn PendingStore>>,
    pub(super) after_exchange: Option<Arc<dyn AfterExchange>>,
    pub(super) ttl: Duration,
    pub(super) http: Option<reqwest::Client>,
    pub(super) timeout: Option<Duration>,
}

impl fmt::Debug for ConnectorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectorBuilder")
            .field("client_id", &self.client_id)
            .field("auth_url", &self.auth_url)
            .field("token_url", &self.token_url)
            .field("redirect_uri", &self.redirect_uri)
            .field("client_secret", &self.client_secret)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl ConnectorBuilder {
    /// The client secret (omit for public clients, which authenticate with PKCE alone).
    pub fn client_secret(mut self, secret: ClientSecret) -> Self {
        self.client_secret = Some(secret);
        self
    }

    /// How the client authenticates to the token endpoint (default [`ClientAuth::Basic`]).
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.auth = auth;
        self
    }

    /// The scopes requested by default (include the provider's scope for a refresh token,
    /// `offline_access` on many servers).
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// An extra parameter on every authorization URL, such as `access_type=offline` and
    /// `prompt=consent` (Google-style servers only issue a refresh token with them).
    pub fn auth_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Where pending attempts are kept (default: a [`MemoryPendingStore`], which only the
    /// instance that started an attempt can complete; use a [`StorePendingStore`](crate::StorePendingStore) when
    /// callbacks may reach another instance).
    pub fn pending_store(mut self, store: impl PendingStore) -> Self {
        self.pending = Some(Arc::new(store));
        self
    }

    /// A step run after every successful code exchange, turning the tokens it returned into
    /// the tokens to store (default: none, the exchange's tokens are stored as they came).
    ///
    /// For Instagram Login, whose code exchange returns a short-lived token that cannot be
    /// renewed, give it [`GraphTokenExchange::instagram`](crate::GraphTokenExchange::instagram):
    /// the connector then stores the long-lived token that
    /// [`InstagramProvider`](crate::InstagramProvider) renews.
    ///
    /// ```
    /// use tokenkeeper::{ClientAuth, ClientSecret, Connector, GraphTokenExchange,
    ///     InstagramProvider, TokenManager, INSTAGRAM_EXCHANGE_URL, INSTAGRAM_REFRESH_URL};
    /// let manager = TokenManager::builder(InstagramProvider::builder(INSTAGRAM_REFRESH_URL).build()?)
    ///     .build();
    /// let connector = Connector::builder(
    ///         &manager,
    ///         "my-instagram-app-id",
    ///         "https://www.instagram.com/oauth/authorize",
    ///         "https://api.instagram.com/oauth/access_token",
    ///         "https://app.example.com/oauth/callback",
    ///     )
    ///     .client_secret(ClientSecret::new("my-app-secret"))
    ///     .client_auth(ClientAuth::RequestBody)
    ///     .scopes(["instagram_business_basic"])
    ///     .after_exchange(GraphTokenExchange::instagram(
    ///         INSTAGRAM_EXCHANGE_URL,
    ///         ClientSecret::new("my-app-secret"),
    ///     )?)
    ///     .build()?;
    /// # let _ = connector;
    /// # Ok::<(), tokenkeeper::Error>(())
    /// ```
    pub fn after_exchange(mut self, step: impl AfterExchange) -> Self {
        self.after_exchange = Some(Arc::new(step));
        self
    }

    /// How long an attempt waits for its callback (default [`DEFAULT_ATTEMPT_TTL`](crate::DEFAULT_ATTEMPT_TTL), 10
    /// minutes), measured on the manager's [`Clock`](crate::Clock).
    pub fn attempt_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The HTTP client for the code exchange (default: one that never follows redirects;
    /// see [`OAuth2ProviderBuilder::http_client`](crate::OAuth2ProviderBuilder::http_client)).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Timeout of the code exchange request (default 30 s; `None` leaves it to the client).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Builds the connector.
    ///
    /// # Errors
    ///
    /// [`Error::Misconfigured`] if a URL does not parse, the default HTTP client cannot be
    /// built, the attempt lifetime is zero, or an extra parameter repeats one the connector
    /// sets (`state`, `code_challenge`, `redirect_uri`, `scope`, …).
    pub fn build(self) -> Result<Connector, Error> {
        let setting = |problem| Error::Misconfigured {
            key: None,
            problem,
            status: None,
            source: None,
        };
        if let Some(problem) = reserved_param(&self.params) {
            return Err(setting(problem));
        }
        if self.ttl.is_zero() {
            return Err(setting(ConfigProblem::Setting {
                setting: "attempt_ttl".to_owned(),
                reason: "must be more than zero".to_owned(),
            }));
        }
        let misconfigured = |e: SharedError| Error::Misconfigured {
            key: None,
            problem: ConfigProblem::Endpoint,
            status: None,
            source: Some(e),
        };
        let auth_url = AuthUrl::new(self.auth_url).map_err(|e| misconfigured(Arc::new(e)))?;
        let redirect =
            RedirectUrl::new(self.redirect_uri).map_err(|e| misconfigured(Arc::new(e)))?;
        let mut exchange = OAuth2Provider::builder(self.client_id.clone(), self.token_url)
            .client_auth(self.auth)
            .timeout(self.timeout);
        if let Some(secret) = self.client_secret {
            exchange = exchange.client_secret(secret);
        }
        if let Some(http) = self.http {
            exchange = exchange.http_client(http);
        }
        let client = BasicClient::new(oauth2::ClientId::new(self.client_id)).set_auth_uri(auth_url);
        Ok(Connector {
            inner: Arc::new(Inner {
                manager: self.manager,
                client,
                redirect,
                exchange: exchange.build()?,
                after_exchange: self.after_exchange,
                scopes: self.scopes,
                params: self.params,
                pending: self
                    .pending
                    .unwrap_or_else(|| Arc::new(MemoryPendingStore::new())),
                ttl: self.ttl,
                pruned_at: Mutex::new(None),
            }),
        })
    }
}
