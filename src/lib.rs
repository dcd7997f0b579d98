//! Keeps OAuth grants alive for applications that call third-party APIs on their users' behalf.
//!
//! Holding an OAuth grant looks easy until a provider rotates refresh tokens (two racing
//! refreshes can revoke the grant), rate limits refreshes, invalidates grants out of band, or
//! lets an idle grant's refresh token quietly expire. `tokenkeeper` does the refreshing and
//! tells the application, in typed terms, when only a human can help.
//!
//! # Quick start
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use tokenkeeper::{provider_fn, AccessToken, Expiry, RefreshToken, TokenKey, TokenManager,
//!     TokenResponse, TokenSet};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In production: `OAuth2Provider::builder(client_id, token_url)…build()?`.
//! let provider = provider_fn(|_key, _tokens| async {
//!     Ok(TokenResponse::new(AccessToken::new("fresh-access-token"))
//!         .with_refresh_token(RefreshToken::new("rotated-refresh-token"))
//!         .with_expires(Expiry::In(Duration::from_secs(3600))))
//! });
//! let manager = TokenManager::builder(provider).build();
//!
//! // From your OAuth callback (or copied from a provider's dashboard):
//! let key = TokenKey::from("customer-42");
//! let grant = TokenSet::new(AccessToken::new("initial-access-token"))
//!     .with_refresh_token(RefreshToken::new("initial-refresh-token"))
//!     .with_expires_at(SystemTime::now() - Duration::from_secs(1)); // already expired
//! manager.insert(key.clone(), grant).await?;
//!
//! // Before each API call: a valid token, refreshed (once, however many callers) if needed.
//! let token = manager.access_token(&key).await?;
//! assert_eq!(token.secret(), "fresh-access-token");
//! # Ok(())
//! # }
//! ```
//!
//! # Concepts
//!
//! - A [`TokenManager`] serves one provider and many grants, each named by a [`TokenKey`].
//! - A [`Provider`] performs one refresh: [`OAuth2Provider`] for RFC 6749 endpoints (the
//!   refresh-token grant, or [`Grant::ClientCredentials`] for machine-to-machine tokens; with a
//!   pluggable [`Classifier`] for non-standard error bodies, such as [`GraphClassifier`] and
//!   [`XClassifier`]), [`InstagramProvider`] for long-lived tokens renewed by presenting them,
//!   or your own implementation.
//! - A [`TokenStore`] keeps grants with a version for compare-and-swap: [`MemoryStore`] by
//!   default, [`FileStore`] for processes sharing a machine and surviving restarts, and
//!   `SqliteStore` (feature `sqlite`) for processes sharing one database file on a machine,
//!   and `RedisStore` (feature `redis`) or `PostgresStore` (feature `postgres`) for instances
//!   sharing a Redis or a PostgreSQL database. Each also locks each refresh
//!   (the memory store among the managers sharing it; the others across processes). A dead grant is stored as dead, so it stays dead
//!   across restarts.
//! - Every failure is an [`Error`] variant that says what to do: re-authorize, wait, or fix
//!   configuration. [`Event`]s report the same to the application as they happen
//!   ([`TokenManager::events`]), and [`TokenManager::grants`] lists every grant's state.
//! - A [`Clock`] is injected wherever expiry is computed, so tests run days in milliseconds.
//! - The background refresher ([`TokenManager::start_refresher`]) refreshes grants in use
//!   ahead of expiry and keeps idle grants alive, so a quiet app does not lose its grants.
//! - A [`Connector`] obtains grants through the authorization-code flow (PKCE, single-use
//!   state, pending attempts in a [`PendingStore`] that other instances can share) and
//!   re-obtains dead ones from a reconnect URL bound to the grant's key; an [`AfterExchange`]
//!   step turns what the code bought into the grant to keep (Instagram Login's 1-hour token
//!   into the renewable 60-day one, with [`GraphTokenExchange::instagram`]).
//! - [`AuthorizedClient`] (and `TokenMiddleware` for `reqwest-middleware`) sends API requests
//!   with the bearer token, refreshing and retrying once when the API rejects it, and can fail
//!   over across several grants for one resource.
//!
//! # Which type do I need?
//!
//! | I want to… | use |
//! |---|---|
//! | get a valid bearer token before an API call | [`TokenManager::access_token`] |
//! | read the whole grant (scopes, expiries) | [`TokenManager::token`] → [`TokenSet`] |
//! | store the grant from my OAuth callback | [`TokenManager::insert`] with a [`TokenSet`] |
//! | connect (and reconnect) grants through the authorization-code flow | [`Connector`] |
//! | keep Instagram Login's long-lived token, not the 1-hour one the code buys | [`ConnectorBuilder::after_exchange`] with [`GraphTokenExchange::instagram`], renewed by [`InstagramProvider`] |
//! | refresh at a standard RFC 6749 token endpoint | [`OAuth2Provider`] |
//! | read a provider's non-standard error bodies | a [`Classifier`] on the [`OAuth2Provider`] |
//! | refresh at a non-standard JSON endpoint | [`provider_fn`], or implement [`Provider`] |
//! | keep grants across restarts, or share them on one machine | [`FileStore`], or `SqliteStore` (feature `sqlite`) for one database file |
//! | share grants across machines | `RedisStore` (feature `redis`), or `PostgresStore` (feature `postgres`) in a PostgreSQL database |
//! | keep grants in my own database | implement [`TokenStore`] |
//! | encrypt grants at rest, with key rotation | `EncryptedStore` (feature `encryption`) around any store |
//! | keep idle grants alive | [`TokenManager::start_refresher`] with a [`RefresherConfig`] |
//! | send API requests that retry once on a rejected token | [`AuthorizedClient`], or `TokenMiddleware` (feature `middleware`) |
//! | decide what to do about a failure | [`Error`]: [`is_reauth_required`](Error::is_reauth_required), [`is_retryable`](Error::is_retryable), [`retry_after`](Error::retry_after) |
//! | hear about dead and recovered grants | [`TokenManager::subscribe`] → [`Event`] |
//! | list the grants a human must reconnect | [`TokenManager::reauthorization_required`] |
//! | show a grant's health | [`TokenManager::status`] → [`TokenStatus`] |
//! | run days of expiry in a test | `testing::FakeAuthServer`, `testing::ManualClock` (feature `test-util`) |
//! | name the `reqwest` types in my code | [`reqwest`](crate::reqwest), the one this crate uses |
//!
//! # Concurrency and cancel safety
//!
//! One refresh per grant at a time: concurrent callers share it. The refresh re-reads the
//! store first and adopts a peer's fresh token, saves a rotated refresh token before any
//! caller sees the new access token, and runs on a spawned task so dropping the callers'
//! futures never loses it. After a failure, a per-grant backoff (honouring `Retry-After`)
//! holds further attempts while a still-valid token keeps being served. Before a grant is
//! declared dead on `invalid_grant`, the store is re-read in case a peer rotated it.
//!
//! Every provider call is bounded by a timeout and isolated on its own task (a panic is a
//! typed error); a reply possibly lost after the server rotated is retried once at once; a
//! rotated refresh token the store would not take is held, retried and saved before anything
//! else; [`TokenManager::drain`] waits for all of that before a process exits. Across
//! processes, single refresh rests on the store's refresh lock (every built-in store has one);
//! compare-and-swap alone only fences late saves. The README's "Known limits" lists what is not
//! guaranteed.
//!
//! # Security
//!
//! [`AccessToken`], [`RefreshToken`] and [`ClientSecret`] print as `[redacted]` in `Debug` and
//! have no `Display`; errors, events and `tracing` fields never hold a token or a raw response
//! body. Read a secret deliberately with `secret()`. The [`Connector`]'s authorization codes,
//! PKCE verifiers and states are treated the same way.
//!
//! To keep tokens encrypted at rest (in files, a database, Redis), wrap the store in an
//! `EncryptedStore` (feature `encryption`): XChaCha20-Poly1305 with key ids for rotation, each
//! record bound to its grant's key, key material zeroized and never printed.
//!
//! # Features
//!
//! Feature-gated items are marked on docs.rs with the feature they need.
//!
#![cfg_attr(feature = "document-features", doc = document_features::document_features!())]
#![cfg_attr(
    not(feature = "document-features"),
    doc = "The features and what they enable are listed in `Cargo.toml`'s `[features]` (and on docs.rs)."
)]
//!
//! # Metrics
//!
//! With feature `metrics`, the manager reports through the
//! [`metrics`](https://docs.rs/metrics) facade to whatever recorder the application installs.
//! No label ever holds a token; the grant's key is a label (`key`, on the two
//! `tokenkeeper.refresh.*` metrics only) only after `TokenManagerBuilder::metrics_key_label(true)`.
//!
//! | name | kind | labels | counts |
//! |---|---|---|---|
//! | `tokenkeeper.refresh.attempts` | counter | `outcome`, `reason` | refresh runs: `outcome` is `refreshed`, `rotated` (a new refresh token), `adopted` (a peer's token taken from the store), `failed` (`reason`: `rate_limited`, `unavailable`, `misconfigured`, `store`, `not_found`), `dead` (`reason`: the `InvalidationReason` in snake case, such as `invalid_grant`; `provider` for provider codes) or `skipped` (no provider call; `reason`: `backoff`, `not_refreshable`, `refresh_token_expired`, `dead`) |
//! | `tokenkeeper.refresh.duration` | histogram, seconds | `outcome` | one refresh run: lock, re-read, provider call, save |
//! | `tokenkeeper.provider.duration` | histogram, seconds | `result`: `ok`, `error`, `timeout`, `panic` | one provider call |
//! | `tokenkeeper.store.duration` | histogram, seconds | `op`: `load`, `save`, `delete`, `keys`, `keys_after`, `release` | one store call by the manager |
//! | `tokenkeeper.store.errors` | counter | `op` (as above, and `lock`) | store calls that failed |
//! | `tokenkeeper.store.conflicts` | counter | — | compare-and-swap saves that lost to a newer version |
//! | `tokenkeeper.lock.wait` | histogram, seconds | — | waiting for a grant's refresh lock |
//! | `tokenkeeper.access_token.requests` | counter | `cache`: `hit`, `miss` | `access_token` / `token` calls answered from memory, or not |
//! | `tokenkeeper.grants` | gauge | `health`: `active`, `backing_off`, `reauthorization_required` | grants this manager has loaded, by health when it last looked (several managers add up) |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88, the highest `rust-version` among the locked dependencies (all features); CI
//! checks that no dependency needs more.
#![warn(missing_docs)]
// `unsafe` only where a measured gain needs it, each with a `// SAFETY:` proof: two libc calls
// for the coarse clock (`clock.rs`).
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod authorized;
mod clock;
mod connect;
mod error;
mod event;
mod manager;
mod metrics;
mod provider;
mod refresher;
mod status;
mod store;
mod token;
pub mod transfer;

pub use authorized::{AuthorizedClient, Rejection, RequestError};
#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
pub use authorized::{MiddlewareErrorExt, MissingTokenKey, TokenMiddleware};
pub use clock::{Clock, Sleep, SystemClock};
pub use connect::{
    AfterExchange, Authorization, AuthorizeErrorCode, CallbackParams, Completed, ConnectError,
    Connector, ConnectorBuilder, MemoryPendingStore, PendingAttempt, PendingStore, StartOptions,
    StorePendingStore, Taken, DEFAULT_ATTEMPT_TTL,
};
pub use error::{
    BoxError, ConfigProblem, Error, InvalidationReason, ProviderError, ProviderErrorKind, Result,
    SharedError, StoreError, StoreErrorKind, UnavailableCause,
};
pub use event::{Event, EventItem, EventStream};
pub use manager::{GrantHandle, TokenManager, TokenManagerBuilder};
pub use provider::{
    provider_fn, Classifier, ClientAuth, FnProvider, Grant, GraphClassifier, GraphTokenExchange,
    HttpReply, InstagramProvider, InstagramProviderBuilder, OAuth2Provider, OAuth2ProviderBuilder,
    Provider, RefreshRequest, StandardClassifier, XClassifier, XoxodayClassifier,
    DEFAULT_BODY_LIMIT, INSTAGRAM_EXCHANGE_URL, INSTAGRAM_REFRESH_URL,
};
pub use refresher::{Progress, RefresherConfig, RefresherHandle};
pub use status::{GrantHealth, GrantPage, NextRefresh, Page, TokenStatus};
pub use store::{
    Cas, ExpiryWarning, FileStore, GrantRecord, GrantState, MemoryStore, RefreshLock, TokenStore,
    Version, Versioned,
};
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub use store::{EncryptedStore, KeyId, Keyring, RekeyReport};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::{RedisStore, RedisStoreBuilder};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use store::{SqliteStore, SqliteStoreBuilder};
pub use token::{
    epoch, AccessToken, ClientSecret, Expiry, ParseError, RefreshExpiry, RefreshToken, TokenKey,
    TokenResponse, TokenSet,
};

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

/// The `reqwest` this crate is built on (0.13), whose types appear in its API
/// ([`reqwest::Client`], [`reqwest::Request`], [`reqwest::Error`], …).
///
/// Use it, or depend on the same major, so that one `reqwest` is in your tree: a `Client` from
/// another major is another type. A major bump of `reqwest` here is a major bump of
/// `tokenkeeper`.
pub use reqwest;

/// The `reqwest-middleware` this crate's [`TokenMiddleware`] plugs into (0.5).
///
/// As with [`reqwest`], use this one or the same major.
#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
pub use reqwest_middleware;

/// The `deadpool-postgres` (0.14) whose [`Pool`](deadpool_postgres::Pool)
/// [`PostgresStore::builder_with_pool`] takes, with its `tokio_postgres`
/// ([`deadpool_postgres::tokio_postgres`]).
///
/// Build the pool with these, or depend on the same majors: a pool from another major is
/// another type.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use deadpool_postgres;

// The traits must stay dyn-compatible and the handles shareable across threads.
const _: () = {
    fn _object_safe(
        _: &dyn TokenStore,
        _: &dyn Provider,
        _: &dyn Clock,
        _: &dyn Classifier,
        _: &dyn PendingStore,
        _: &dyn AfterExchange,
    ) {
    }
    fn _assert_send_sync<T: Send + Sync + 'static>() {}
    fn _assert_send_unpin<T: Send + Unpin + 'static>() {}
    fn _assert_impls() {
        _assert_send_unpin::<EventStream>();
        _assert_send_sync::<TokenManager>();
        _assert_send_sync::<Error>();
        _assert_send_sync::<Event>();
        _assert_send_sync::<Connector>();
        _assert_send_sync::<ConnectError>();
        _assert_send_sync::<OAuth2Provider>();
        _assert_send_sync::<MemoryStore>();
        _assert_send_sync::<FileStore>();
        #[cfg(feature = "postgres")]
        _assert_send_sync::<PostgresStore>();
        #[cfg(feature = "redis")]
        _assert_send_sync::<RedisStore>();
        #[cfg(feature = "sqlite")]
        _assert_send_sync::<SqliteStore>();
        #[cfg(feature = "encryption")]
        _assert_send_sync::<EncryptedStore<MemoryStore>>();
        #[cfg(feature = "encryption")]
        _assert_send_sync::<Keyring>();
    }
};

/// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
