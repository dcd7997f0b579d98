//! Where grants live: the [`TokenStore`] trait and the stored record.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigProblem, Error, InvalidationReason, StoreError, UnavailableCause};
use crate::token::{epoch_ms_opt, TokenKey, TokenSet};

#[cfg(feature = "encryption")]
mod encrypted;
mod file;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "encryption")]
pub use encrypted::{EncryptedStore, KeyId, Keyring, RekeyReport};
pub use file::FileStore;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
pub use redis::{RedisStore, RedisStoreBuilder};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteStore, SqliteStoreBuilder};

/// A record version for compare-and-swap. Stores must never reuse a version for a key, even
/// across delete and re-insert.
pub type Version = u64;

/// A value with the version it was loaded at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The version to pass back to [`TokenStore::save`].
    pub version: Version,
    /// The value.
    pub value: T,
}

/// The outcome of a compare-and-swap [`TokenStore::save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// Saved; this is the new version.
    Saved(Version),
    /// The stored version was not the expected one; nothing was written.
    Conflict,
}

/// Everything stored for one grant: its tokens and its state.
///
/// A grant that needs re-authorization is persisted as such, so it stays dead across restarts
/// and across every manager that shares the store, until a new grant is inserted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(from = "RecordWire", into = "RecordWire")]
pub struct GrantRecord {
    pub(crate) tokens: Arc<TokenSet>,
    pub(crate) last_refresh: Option<SystemTime>,
    /// A digest of the tokens the grant was inserted with, kept across refreshes: a second
    /// insert of the same tokens is recognised as a retry.
    pub(crate) origin: Option<NonZeroU64>,
    /// Everything else, which a healthy grant does not have: `None` for most records, so a
    /// store holding 100,000 of them keeps a pointer each rather than the whole state (it
    /// took the record from 160 to 48 bytes). Read it through [`rare`](Self::rare).
    rare: Option<Box<RareRecord>>,
}

/// The parts of a [`GrantRecord`] that a healthy grant does not have.
#[derive(Clone, PartialEq)]
pub(crate) struct RareRecord {
    pub(crate) state: GrantState,
    pub(crate) failures: u32,
    pub(crate) retry_not_before: Option<SystemTime>,
    pub(crate) last_error: Option<Box<str>>,
    pub(crate) last_failure: Option<StoredFailure>,
    /// When the current backoff started.
    pub(crate) failed_at: Option<SystemTime>,
    /// A refresh with this record's refresh token may have been executed by the provider
    /// and its reply lost (a timeout, a dropped connection, a 502/504).
    pub(crate) reply_lost: bool,
    /// The expiry warning already sent for this grant, kept with it so that a restart, or
    /// another process's refresher, neither repeats nor misses it.
    pub(crate) warned: Option<ExpiryWarning>,
}

impl RareRecord {
    /// A healthy grant's: active, no failure, no warning.
    const NONE: RareRecord = RareRecord {
        state: GrantState::Active,
        failures: 0,
        retry_not_before: None,
        last_error: None,
        last_failure: None,
        failed_at: None,
        reply_lost: false,
        warned: None,
    };
}

impl Default for RareRecord {
    fn default() -> Self {
        Self::NONE
    }
}

/// The stored form of a [`GrantRecord`]: every field flat, as records were always written.
#[derive(Serialize, Deserialize)]
struct RecordWire {
    tokens: Arc<TokenSet>,
    #[serde(default)]
    state: GrantState,
    #[serde(default)]
    failures: u32,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "epoch_ms_opt"
    )]
    retry_not_before: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<Box<str>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "epoch_ms_opt"
    )]
    last_refresh: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_failure: Option<StoredFailure>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "epoch_ms_opt"
    )]
    failed_at: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    reply_lost: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warned: Option<ExpiryWarning>,
}

impl From<RecordWire> for GrantRecord {
    fn from(w: RecordWire) -> Self {
        let mut record = GrantRecord {
            tokens: w.tokens,
            last_refresh: w.last_refresh,
            // Stored digests are never zero (`TokenSet::origin`); a zero would name no grant.
            origin: w.origin.and_then(NonZeroU64::new),
            rare: Some(Box::new(RareRecord {
                state: w.state,
                failures: w.failures,
                retry_not_before: w.retry_not_before,
                last_error: w.last_error,
                last_failure: w.last_failure,
                failed_at: w.failed_at,
                reply_lost: w.reply_lost,
                warned: w.warned,
            })),
        };
        record.shrink();
        record
    }
}

impl From<GrantRecord> for RecordWire {
    fn from(r: GrantRecord) -> Self {
        let rare = r.rare.map_or(RareRecord::NONE, |rare| *rare);
        RecordWire {
            tokens: r.tokens,
            state: rare.state,
            failures: rare.failures,
            retry_not_before: rare.retry_not_before,
            last_error: rare.last_error,
            last_refresh: r.last_refresh,
            last_failure: rare.last_failure,
            failed_at: rare.failed_at,
            reply_lost: rare.reply_lost,
            origin: r.origin.map(NonZeroU64::get),
            warned: rare.warned,
        }
    }
}

impl PartialEq for GrantRecord {
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens
            && self.last_refresh == other.last_refresh
            && self.origin == other.origin
            && self.rare() == other.rare()
    }
}

/// An expiry warning sent for a grant ([`Event::RefreshTokenExpiring`] or
/// [`Event::AccessTokenExpiring`]), stored with the grant: which expiry it was about and when it
/// went out. See [`GrantRecord::expiry_warning`].
///
/// [`Event::RefreshTokenExpiring`]: crate::Event::RefreshTokenExpiring
/// [`Event::AccessTokenExpiring`]: crate::Event::AccessTokenExpiring
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExpiryWarning {
    /// The expiry the warning was about (a refresh token's, or the access token's of a grant
    /// nothing can renew).
    #[serde(with = "epoch_ms_opt")]
    expires_at: Option<SystemTime>,
    /// When it was sent, by the manager's [`Clock`](crate::Clock).
    #[serde(with = "epoch_ms_opt")]
    sent_at: Option<SystemTime>,
}

impl ExpiryWarning {
    pub(crate) fn new(expires_at: SystemTime, sent_at: SystemTime) -> Self {
        Self {
            expires_at: Some(expires_at),
            sent_at: Some(sent_at),
        }
    }

    /// The expiry the warning was about.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at.unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// When the warning was sent.
    pub fn sent_at(&self) -> SystemTime {
        self.sent_at.unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// How long before the expiry the warning went out (zero if after it).
    pub fn lead(&self) -> Duration {
        self.expires_at()
            .duration_since(self.sent_at())
            .unwrap_or_default()
    }
}

/// The class of the last refresh failure, kept so that every manager sharing the store (and
/// this one after a restart) answers with the same typed error during a backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum StoredFailure {
    RateLimited,
    Unavailable {
        cause: UnavailableCause,
        #[serde(default)]
        status: Option<u16>,
    },
    Misconfigured {
        problem: ConfigProblem,
        #[serde(default)]
        status: Option<u16>,
    },
}

impl StoredFailure {
    pub(crate) fn of(error: &Error) -> Option<Self> {
        match error {
            Error::RateLimited { .. } => Some(Self::RateLimited),
            Error::Unavailable { cause, status, .. } => Some(Self::Unavailable {
                cause: cause.clone(),
                status: *status,
            }),
            Error::Misconfigured {
                problem, status, ..
            } => Some(Self::Misconfigured {
                problem: problem.clone(),
                status: *status,
            }),
            _ => None,
        }
    }

    pub(crate) fn to_error(&self, key: &TokenKey) -> Error {
        let key = key.clone();
        match self.clone() {
            Self::RateLimited => Error::RateLimited {
                key,
                retry_after: None,
            },
            Self::Unavailable { cause, status } => Error::Unavailable {
                key,
                cause,
                status,
                retry_after: None,
                source: None,
            },
            Self::Misconfigured { problem, status } => Error::Misconfigured {
                key: Some(key),
                problem,
                status,
                source: None,
            },
        }
    }
}

/// The lifecycle state of a stored grant.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum GrantState {
    /// The grant can be refreshed.
    #[default]
    Active,
    /// The grant is dead until a new one is inserted.
    ReauthorizationRequired {
        /// Why.
        reason: InvalidationReason,
        /// When this was found, as epoch milliseconds.
        #[serde(default, with = "epoch_ms_opt")]
        since: Option<SystemTime>,
    },
}

impl GrantRecord {
    /// A fresh, active record for `tokens`.
    pub fn new(tokens: TokenSet) -> Self {
        Self {
            tokens: Arc::new(tokens),
            last_refresh: None,
            origin: None,
            rare: None,
        }
    }

    /// The state a healthy grant does not have (failures, backoff, death, warnings).
    pub(crate) fn rare(&self) -> &RareRecord {
        self.rare.as_deref().unwrap_or(&RareRecord::NONE)
    }

    /// Changes that state (allocating it when the record had none).
    pub(crate) fn rare_mut(&mut self) -> &mut RareRecord {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Frees the rare state if it holds nothing.
    pub(crate) fn shrink(&mut self) {
        if self.rare.as_deref() == Some(&RareRecord::NONE) {
            self.rare = None;
        }
    }

    /// The grant's tokens.
    pub fn tokens(&self) -> &TokenSet {
        &self.tokens
    }

    /// The grant's state.
    pub fn state(&self) -> &GrantState {
        &self.rare().state
    }

    /// Consecutive failed refreshes.
    pub fn failures(&self) -> u32 {
        self.rare().failures
    }

    /// No refresh is sent before this instant (backoff after failures).
    pub fn retry_not_before(&self) -> Option<SystemTime> {
        self.rare().retry_not_before
    }

    /// The last refresh error, as text (never holds a secret).
    pub fn last_error(&self) -> Option<&str> {
        self.rare().last_error.as_deref()
    }

    /// The expiry warning already sent for this grant, if any: a grant whose refresh token
    /// cannot be renewed is warned about once per expiry, across restarts and processes. A
    /// refresh that moves the expiry (a sliding one) makes this refer to an older expiry.
    pub fn expiry_warning(&self) -> Option<&ExpiryWarning> {
        self.rare().warned.as_ref()
    }

    /// When the grant was last refreshed successfully.
    pub fn last_refresh(&self) -> Option<SystemTime> {
        self.last_refresh
    }

    /// Whether a refresh with the current refresh token may have been executed by the
    /// provider and its reply lost (a timeout, a dropped connection, a 502/504). A later
    /// refusal of that refresh token is then reported as
    /// [`RotationLost`](crate::InvalidationReason::RotationLost).
    pub fn reply_lost(&self) -> bool {
        self.rare().reply_lost
    }

    /// This record marked as moved to `to`: what an operator leaves in a store a grant was
    /// moved out of (`tokenkeeper grants move`), so that instances still reading this store
    /// stop refreshing it and answer
    /// [`Error::ReauthorizationRequired`] with [`InvalidationReason::Moved`] instead of racing
    /// the new environment with the same refresh token.
    ///
    /// The tokens are kept (the record still shows what was moved); the state becomes
    /// [`GrantState::ReauthorizationRequired`] since `at`, the backoff is cleared and
    /// [`last_error`](Self::last_error) says where the grant went. `to` names the destination
    /// and is shown in errors, so it must not hold a secret: give a store URL without its
    /// user, password or query. Inserting a grant under the key again (moving it back does)
    /// revives it, as with any dead grant.
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use tokenkeeper::{AccessToken, GrantRecord, GrantState, InvalidationReason, TokenSet};
    ///
    /// let record = GrantRecord::new(TokenSet::new(AccessToken::new("at")));
    /// let moved = record.into_moved("sqlite:///srv/grants.db", SystemTime::now());
    /// assert!(matches!(
    ///     moved.state(),
    ///     GrantState::ReauthorizationRequired { reason: InvalidationReason::Moved { to }, .. }
    ///         if to == "sqlite:///srv/grants.db"
    /// ));
    /// ```
    pub fn into_moved(mut self, to: impl Into<String>, at: SystemTime) -> GrantRecord {
        let reason = InvalidationReason::Moved { to: to.into() };
        let rare = self.rare_mut();
        rare.last_error = Some(reason.to_string().into());
        rare.state = GrantState::ReauthorizationRequired {
            reason,
            since: Some(at),
        };
        rare.retry_not_before = None;
        self
    }

    /// Where the grant was moved, if this record was marked moved
    /// ([`into_moved`](Self::into_moved)).
    pub fn moved_to(&self) -> Option<&str> {
        match self.dead_reason() {
            Some(InvalidationReason::Moved { to }) => Some(to),
            _ => None,
        }
    }

    pub(crate) fn dead_reason(&self) -> Option<&InvalidationReason> {
        match &self.rare().state {
            GrantState::ReauthorizationRequired { reason, .. } => Some(reason),
            GrantState::Active => None,
        }
    }

    /// Encodes the record as JSON, the form the built-in persistent stores write.
    pub fn to_json(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(self).map_err(StoreError::corrupt)
    }

    /// Decodes a record written by [`to_json`](Self::to_json).
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Corrupt`](crate::StoreErrorKind::Corrupt), saying where decoding
    /// failed but never quoting the stored bytes (they may hold a token).
    pub fn from_json(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| {
            StoreError::corrupt(format!("invalid grant record: {}", json_position(&e)))
        })
    }
}

/// Where and how JSON decoding failed, without serde_json's message: it can quote the
/// offending value, which may be a token.
pub(crate) fn json_position(e: &serde_json::Error) -> String {
    let category = match e.classify() {
        serde_json::error::Category::Io => "i/o",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Eof => "unexpected end",
    };
    format!(
        "{category} error at line {}, column {}",
        e.line(),
        e.column()
    )
}

impl fmt::Debug for GrantRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantRecord")
            .field("tokens", &self.tokens)
            .field("state", self.state())
            .field("failures", &self.failures())
            .field("retry_not_before", &self.retry_not_before())
            .field("last_error", &self.last_error())
            .field("last_refresh", &self.last_refresh)
            .finish()
    }
}

/// Persistence for grants, shared by every [`TokenManager`](crate::TokenManager) (and every
/// process) that manages the same grants.
///
/// # Contract
///
/// - [`load`](Self::load) of an absent key is `Ok(None)`, never an error.
/// - [`save`](Self::save) is a compare-and-swap: it writes only if the stored version equals
///   `expected` (`None`: only if the key is absent) and returns the new version; otherwise it
///   writes nothing and returns [`Cas::Conflict`]. Versions only grow.
///
/// # Concurrency
///
/// Methods are called concurrently from many tasks. Each call must be atomic on its own. The
/// manager serialises refreshes of one grant within a process; across processes it relies on
/// [`lock`](Self::lock) when the store provides one, and on compare-and-swap always. A lock,
/// once granted for a key, is granted to no one else (in any process) for that key until it
/// is released (or, for a crashed holder, its `ttl` ends); locks of different keys are
/// independent.
///
/// # Errors
///
/// Return [`StoreError::new`] for backend failures and [`StoreError::corrupt`] for records
/// that cannot be decoded. A key longer than [`TokenKey::MAX_LEN`] bytes is refused with
/// [`StoreErrorKind::InvalidKey`](crate::StoreErrorKind::InvalidKey) (start each method with
/// [`StoreError::check_key`]), and so is a shorter key the backend cannot hold: it is the
/// caller's bad input, not a transient failure. The manager never discards a rotated token because of a store error:
/// it keeps it in memory, reports [`Event::PersistFailed`](crate::Event::PersistFailed), and
/// retries the save.
///
/// # Implementing
///
/// Five required methods. [`lock`](Self::lock) has no default: a store without a
/// cross-process lock returns `Ok(None)` explicitly, as below, and a store meant to be shared
/// by several processes should provide one. Check an implementation with
/// `testing::assert_store_contract` (and `testing::assert_store_has_lock` if it must lock),
/// feature `test-util`.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use tokenkeeper::{
///     Cas, GrantRecord, RefreshLock, StoreError, TokenKey, TokenStore, Version, Versioned,
/// };
///
/// #[derive(Default)]
/// struct MyStore {
///     next: Mutex<Version>,
///     map: Mutex<HashMap<TokenKey, (Version, Vec<u8>)>>,
/// }
///
/// #[async_trait]
/// impl TokenStore for MyStore {
///     async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
///         let map = self.map.lock().unwrap();
///         match map.get(key) {
///             None => Ok(None),
///             Some((version, bytes)) => Ok(Some(Versioned {
///                 version: *version,
///                 value: GrantRecord::from_json(bytes)?,
///             })),
///         }
///     }
///
///     async fn save(
///         &self,
///         key: &TokenKey,
///         record: &GrantRecord,
///         expected: Option<Version>,
///     ) -> Result<Cas, StoreError> {
///         let bytes = record.to_json()?;
///         let mut map = self.map.lock().unwrap();
///         if map.get(key).map(|(v, _)| *v) != expected {
///             return Ok(Cas::Conflict);
///         }
///         let mut next = self.next.lock().unwrap();
///         *next += 1;
///         map.insert(key.clone(), (*next, bytes));
///         Ok(Cas::Saved(*next))
///     }
///
///     async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
///         Ok(self.map.lock().unwrap().remove(key).is_some())
///     }
///
///     async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
///         Ok(self.map.lock().unwrap().keys().cloned().collect())
///     }
///
///     /// One process only: no cross-process lock. The manager's own single-flight and the
///     /// compare-and-swap above are enough.
///     async fn lock(
///         &self,
///         _key: &TokenKey,
///         _ttl: Duration,
///     ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
///         Ok(None)
///     }
/// }
/// ```
///
/// A *wrapper* (metrics, caching, encryption around another store) forwards every method,
/// [`lock`](Self::lock) included: returning `Ok(None)` there would make every process refresh
/// without the inner store's lock.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use tokenkeeper::{
///     Cas, GrantRecord, RefreshLock, StoreError, TokenKey, TokenStore, Version, Versioned,
/// };
///
/// struct Metered<S> {
///     inner: S,
///     saves: AtomicU64,
/// }
///
/// #[async_trait]
/// impl<S: TokenStore> TokenStore for Metered<S> {
///     async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
///         self.inner.load(key).await
///     }
///     async fn save(
///         &self,
///         key: &TokenKey,
///         record: &GrantRecord,
///         expected: Option<Version>,
///     ) -> Result<Cas, StoreError> {
///         self.saves.fetch_add(1, Ordering::Relaxed);
///         self.inner.save(key, record, expected).await
///     }
///     async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
///         self.inner.delete(key).await
///     }
///     async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
///         self.inner.keys().await
///     }
///     async fn lock(
///         &self,
///         key: &TokenKey,
///         ttl: Duration,
///     ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
///         self.inner.lock(key, ttl).await // Forwarded: the inner store's lock still holds.
///     }
/// }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = Metered { inner: tokenkeeper::MemoryStore::new(), saves: AtomicU64::new(0) };
/// tokenkeeper::testing::assert_store_has_lock(&store).await;
/// # });
/// ```
///
/// A wrapper that forgets [`lock`](Self::lock) does not compile:
///
/// ```compile_fail,E0046
/// use async_trait::async_trait;
/// use tokenkeeper::{Cas, GrantRecord, StoreError, TokenKey, TokenStore, Version, Versioned};
///
/// struct Metered<S>(S);
///
/// #[async_trait]
/// impl<S: TokenStore> TokenStore for Metered<S> {
///     async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
///         self.0.load(key).await
///     }
///     async fn save(
///         &self,
///         key: &TokenKey,
///         record: &GrantRecord,
///         expected: Option<Version>,
///     ) -> Result<Cas, StoreError> {
///         self.0.save(key, record, expected).await
///     }
///     async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
///         self.0.delete(key).await
///     }
///     async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
///         self.0.keys().await
///     }
/// }
/// ```
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Loads the record for `key` with its version; `Ok(None)` if absent.
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError>;

    /// Saves `record` if the stored version is `expected` (`None`: if absent).
    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError>;

    /// Deletes the record; `Ok(false)` if there was none.
    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError>;

    /// Every stored key.
    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError>;

    /// One page of stored keys, for listings of stores with many grants: the `limit` smallest
    /// keys (in [`TokenKey`]'s order, by bytes) strictly greater than `after` (every key when
    /// `after` is `None`), in ascending order.
    ///
    /// Keys added or removed while pages are read may be missed or seen, but a listing that
    /// goes page by page never returns a key twice.
    ///
    /// # Implementing
    ///
    /// The default lists every key with [`keys`](Self::keys), then sorts and cuts; a store with
    /// an ordered index (SQL, a sorted set) should override it with a range query. A wrapper
    /// forwards it.
    async fn keys_after(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<TokenKey>, StoreError> {
        Ok(page_of(self.keys().await?, after, limit))
    }

    /// Takes the cross-process refresh lock for `key`, waiting for it, or `Ok(None)` if this
    /// store has no cross-process lock (in-process single-flight and compare-and-swap still
    /// hold, but two processes may refresh the same grant at once).
    ///
    /// `ttl` bounds how long a crashed holder can keep the lock.
    ///
    /// This method is required, on purpose, even for a store without a lock: such a store
    /// says so by returning `Ok(None)`, and a wrapper must forward it to the store it wraps
    /// (see "Implementing" above), so that no store loses its lock by omission.
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError>;
}

/// The page [`TokenStore::keys_after`] describes, cut from a list of keys in any order.
pub(crate) fn page_of(
    keys: impl IntoIterator<Item = TokenKey>,
    after: Option<&TokenKey>,
    limit: usize,
) -> Vec<TokenKey> {
    let mut keys: Vec<TokenKey> = keys
        .into_iter()
        .filter(|k| after.is_none_or(|after| k > after))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys.truncate(limit);
    keys
}

/// When a lock wait of `wait` from now ends; a wait too long to represent (say
/// `Duration::MAX`) ends in about a century instead of overflowing.
pub(crate) fn lock_deadline(wait: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// The wait between attempts to take a lease lock held by someone else: jittered exponential
/// pauses (5 ms up to 200 ms), ending in a typed [`StoreErrorKind::LockTimeout`] after `wait`.
#[cfg(any(feature = "postgres", feature = "redis", feature = "sqlite"))]
pub(crate) struct LockWait {
    wait: Duration,
    deadline: tokio::time::Instant,
    pause: Duration,
}

#[cfg(any(feature = "postgres", feature = "redis", feature = "sqlite"))]
impl LockWait {
    pub(crate) fn new(wait: Duration) -> Self {
        Self {
            wait,
            deadline: lock_deadline(wait),
            pause: Duration::from_millis(5),
        }
    }

    /// Sleeps before the next attempt, or fails once the wait is over; `holder` names who
    /// may hold the lock (for the message).
    pub(crate) async fn pause(&mut self, key: &TokenKey, holder: &str) -> Result<(), StoreError> {
        let now = tokio::time::Instant::now();
        if now >= self.deadline {
            return Err(StoreError::with_kind(
                crate::error::StoreErrorKind::LockTimeout,
                format!(
                    "the refresh lock of `{key}` was held by another {holder} for more than {:?}",
                    self.wait
                ),
            ));
        }
        let jitter = self.pause.mul_f64(fastrand::f64() * 0.5);
        tokio::time::sleep((self.pause + jitter).min(self.deadline - now)).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(200));
        Ok(())
    }
}

/// A held cross-process refresh lock (see [`TokenStore::lock`]).
#[async_trait]
pub trait RefreshLock: Send + Sync {
    /// Releases the lock. Dropping without releasing leaves it to expire.
    async fn release(self: Box<Self>) -> Result<(), StoreError>;
}

#[async_trait]
impl<T: TokenStore + ?Sized> TokenStore for std::sync::Arc<T> {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        (**self).load(key).await
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        (**self).save(key, record, expected).await
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        (**self).delete(key).await
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        (**self).keys().await
    }

    async fn keys_after(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<TokenKey>, StoreError> {
        (**self).keys_after(after, limit).await
    }

    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        (**self).lock(key, ttl).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::token::{AccessToken, RefreshToken};

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn tokens() -> TokenSet {
        TokenSet::new(AccessToken::new("at"))
            .with_refresh_token(RefreshToken::new("rt"))
            .with_expires_at(at(2_000))
    }

    /// Every field set, as a grant that failed, died and was warned about is stored.
    fn troubled() -> GrantRecord {
        let mut record = GrantRecord::new(tokens());
        record.last_refresh = Some(at(1_000));
        record.origin = NonZeroU64::new(7);
        let rare = record.rare_mut();
        rare.state = GrantState::ReauthorizationRequired {
            reason: InvalidationReason::InvalidGrant,
            since: Some(at(3_000)),
        };
        rare.failures = 2;
        rare.retry_not_before = Some(at(4_000));
        rare.last_error = Some("refused".into());
        rare.last_failure = Some(StoredFailure::RateLimited);
        rare.failed_at = Some(at(5_000));
        rare.reply_lost = true;
        rare.warned = Some(ExpiryWarning::new(at(6_000), at(7_000)));
        record
    }

    /// The stored form is the one every release wrote (fields flat, in this order), whatever
    /// the record's layout in memory: stores written before keep loading, and vice versa.
    #[test]
    fn a_record_is_stored_in_its_established_form() {
        let json = r#"{"tokens":{"access_token":"at","refresh_token":"rt","token_type":"Bearer","expires_at":2000},"state":{"state":"reauthorization_required","reason":"InvalidGrant","since":3000},"failures":2,"retry_not_before":4000,"last_error":"refused","last_refresh":1000,"last_failure":{"kind":"rate_limited"},"failed_at":5000,"reply_lost":true,"origin":7,"warned":{"expires_at":6000,"sent_at":7000}}"#;
        let record = troubled();
        assert_eq!(String::from_utf8(record.to_json().unwrap()).unwrap(), json);
        assert_eq!(GrantRecord::from_json(json.as_bytes()).unwrap(), record);

        let healthy = r#"{"tokens":{"access_token":"at","refresh_token":"rt","token_type":"Bearer","expires_at":2000},"state":{"state":"active"},"failures":0}"#;
        let record = GrantRecord::new(tokens());
        assert_eq!(
            String::from_utf8(record.to_json().unwrap()).unwrap(),
            healthy
        );
        assert_eq!(GrantRecord::from_json(healthy.as_bytes()).unwrap(), record);
    }

    /// A healthy record, however it was made (new, decoded, or recovered from a failure),
    /// holds no rare state: 100,000 of them in a `MemoryStore` cost a pointer each for it.
    #[test]
    fn a_healthy_record_holds_no_rare_state() {
        assert!(GrantRecord::new(tokens()).rare.is_none());
        let decoded = GrantRecord::from_json(&GrantRecord::new(tokens()).to_json().unwrap());
        assert!(decoded.unwrap().rare.is_none());

        let mut recovered = troubled();
        *recovered.rare_mut() = RareRecord::default();
        assert_eq!(recovered, {
            let mut r = GrantRecord::new(tokens());
            r.last_refresh = Some(at(1_000));
            r.origin = NonZeroU64::new(7);
            r
        });
        recovered.shrink();
        assert!(recovered.rare.is_none());
        assert!(troubled().rare.is_some());
    }
}
