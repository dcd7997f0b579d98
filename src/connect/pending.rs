//! Where authorization attempts wait for their callback: [`PendingStore`] and the built-in
//! stores.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::StoreError;
use crate::store::{Cas, GrantRecord, TokenStore};
use crate::token::{AccessToken, TokenKey, TokenSet};

/// One authorization attempt waiting for its callback: the grant it is for, the PKCE
/// verifier, the redirect URI it used and when it expires.
///
/// `Debug` redacts the verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct PendingAttempt {
    key: TokenKey,
    verifier: Arc<str>,
    redirect_uri: String,
    expires_at: SystemTime,
}

impl PendingAttempt {
    /// An attempt for grant `key` (for [`PendingStore`] implementations that decode what they
    /// stored).
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use tokenkeeper::{PendingAttempt, TokenKey};
    /// let attempt = PendingAttempt::new(
    ///     TokenKey::from("customer-42"),
    ///     "the-pkce-verifier",
    ///     "https://app.example.com/callback",
    ///     SystemTime::UNIX_EPOCH,
    /// );
    /// assert!(!format!("{attempt:?}").contains("the-pkce-verifier"));
    /// ```
    pub fn new(
        key: TokenKey,
        verifier: impl Into<String>,
        redirect_uri: impl Into<String>,
        expires_at: SystemTime,
    ) -> Self {
        Self {
            key,
            verifier: Arc::from(verifier.into()),
            redirect_uri: redirect_uri.into(),
            expires_at,
        }
    }

    /// The grant the attempt is for.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// The PKCE code verifier (a secret: store it as carefully as a token).
    pub fn verifier(&self) -> &str {
        &self.verifier
    }

    /// The redirect URI the authorization request named (the code exchange must repeat it).
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// When the attempt expires, on the connector's clock.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

impl fmt::Debug for PendingAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingAttempt")
            .field("key", &self.key)
            .field("verifier", &"[redacted]")
            .field("redirect_uri", &self.redirect_uri)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What [`PendingStore::take`] found for a `state`.
///
/// ```
/// use std::time::SystemTime;
/// use tokenkeeper::{MemoryPendingStore, PendingAttempt, PendingStore, Taken, TokenKey};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tokenkeeper::StoreError> {
/// let store = MemoryPendingStore::new();
/// let key = TokenKey::from("customer-42");
/// let attempt = PendingAttempt::new(key.clone(), "verifier", "https://app/cb", SystemTime::now());
/// store.put("state-1", attempt.clone()).await?;
/// assert_eq!(store.take("state-1").await?, Taken::Attempt(attempt));
/// assert_eq!(store.take("state-1").await?, Taken::Used { key });
/// assert_eq!(store.take("state-2").await?, Taken::Unknown);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Taken {
    /// The attempt, now removed (or marked used): no other `take` returns it again.
    Attempt(PendingAttempt),
    /// The attempt was taken before: a replayed callback.
    Used {
        /// The grant it was for.
        key: TokenKey,
    },
    /// No attempt for this state.
    Unknown,
}

/// Keeps authorization attempts between [`Connector::start`](crate::Connector::start) and the
/// callback.
///
/// # Concurrency
///
/// [`take`](Self::take) is the single-use guard: of any number of concurrent calls for one
/// state, across every instance sharing the store, exactly one gets
/// [`Taken::Attempt`]. Replays should get [`Taken::Used`] for as long as the store remembers
/// the attempt (at least until it expires); [`Taken::Unknown`] is acceptable after that.
///
/// # Errors
///
/// A [`StoreError`] makes the callback fail with
/// [`ConnectError::Store`](crate::ConnectError::Store); the user starts again.
///
/// # Implementing
///
/// Two stores come with the crate: [`MemoryPendingStore`] (one process) and
/// [`StorePendingStore`] (any [`TokenStore`], so that an instance other than the one that
/// started the attempt can complete it). A custom one:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use async_trait::async_trait;
/// use tokenkeeper::{PendingAttempt, PendingStore, StoreError, Taken, TokenKey};
///
/// /// state -> the attempt, or once taken, the key it was for (to tell replays apart).
/// #[derive(Default)]
/// struct MyPending(Mutex<HashMap<String, Result<PendingAttempt, TokenKey>>>);
///
/// #[async_trait]
/// impl PendingStore for MyPending {
///     async fn put(&self, state: &str, attempt: PendingAttempt) -> Result<(), StoreError> {
///         self.0.lock().unwrap().insert(state.to_owned(), Ok(attempt));
///         Ok(())
///     }
///     async fn take(&self, state: &str) -> Result<Taken, StoreError> {
///         let mut map = self.0.lock().unwrap();
///         let Some(slot) = map.get_mut(state) else { return Ok(Taken::Unknown) };
///         let key = match slot { Ok(attempt) => attempt.key().clone(), Err(key) => key.clone() };
///         Ok(match std::mem::replace(slot, Err(key.clone())) {
///             Ok(attempt) => Taken::Attempt(attempt),
///             Err(_) => Taken::Used { key },
///         })
///     }
/// }
/// # let _ = MyPending::default();
/// ```
#[async_trait]
pub trait PendingStore: Send + Sync + 'static {
    /// Remembers `attempt` under `state` (a fresh random value, never reused).
    async fn put(&self, state: &str, attempt: PendingAttempt) -> Result<(), StoreError>;

    /// Takes the attempt for `state`, once (see the trait's concurrency contract).
    async fn take(&self, state: &str) -> Result<Taken, StoreError>;

    /// Forgets attempts (and used markers) that expired before `now`; returns how many. The
    /// default does nothing, for stores that expire entries themselves.
    async fn prune(&self, now: SystemTime) -> Result<usize, StoreError> {
        let _ = now;
        Ok(0)
    }
}

#[async_trait]
impl<T: PendingStore + ?Sized> PendingStore for Arc<T> {
    async fn put(&self, state: &str, attempt: PendingAttempt) -> Result<(), StoreError> {
        (**self).put(state, attempt).await
    }

    async fn take(&self, state: &str) -> Result<Taken, StoreError> {
        (**self).take(state).await
    }

    async fn prune(&self, now: SystemTime) -> Result<usize, StoreError> {
        (**self).prune(now).await
    }
}

/// Attempts kept in this process's memory (the default): a callback must reach the instance
/// that started the attempt. The [`Connector`](crate::Connector) prunes expired entries now
/// and then.
///
/// ```
/// use tokenkeeper::MemoryPendingStore;
/// let pending = MemoryPendingStore::new();
/// # let _ = pending;
/// ```
#[derive(Debug, Default)]
pub struct MemoryPendingStore {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
enum Entry {
    Waiting(PendingAttempt),
    Used {
        key: TokenKey,
        expires_at: SystemTime,
    },
}

impl Entry {
    fn expires_at(&self) -> SystemTime {
        match self {
            Entry::Waiting(attempt) => attempt.expires_at,
            Entry::Used { expires_at, .. } => *expires_at,
        }
    }
}

impl MemoryPendingStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl PendingStore for MemoryPendingStore {
    async fn put(&self, state: &str, attempt: PendingAttempt) -> Result<(), StoreError> {
        let mut entries = self.entries();
        entries.insert(state.to_owned(), Entry::Waiting(attempt));
        Ok(())
    }

    async fn take(&self, state: &str) -> Result<Taken, StoreError> {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(state) else {
            return Ok(Taken::Unknown);
        };
        let used = Entry::Used {
            key: match &*entry {
                Entry::Waiting(a) => a.key.clone(),
                Entry::Used { key, .. } => key.clone(),
            },
            expires_at: entry.expires_at(),
        };
        Ok(match std::mem::replace(entry, used) {
            Entry::Waiting(attempt) => Taken::Attempt(attempt),
            Entry::Used { key, .. } => Taken::Used { key },
        })
    }

    async fn prune(&self, now: SystemTime) -> Result<usize, StoreError> {
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|_, entry| entry.expires_at() > now);
        Ok(before - entries.len())
    }
}

/// Attempts kept in a [`TokenStore`], so that any instance sharing the store can complete an
/// attempt another one started (several replicas behind a load balancer, a restart between
/// redirect and callback).
///
/// Each attempt is one record under the key `tokenkeeper-pending:` + the SHA-256 of its state
/// (the state itself is never a key); the verifier sits where a record keeps its access token,
/// so an encrypting store encrypts it. [`take`](PendingStore::take) is single-use by
/// compare-and-swap: it replaces the record with a used marker (no verifier) at the version it
/// read, and only one writer can win. [`prune`](PendingStore::prune) deletes expired records.
///
/// Give it a store of its own — a second [`FileStore`](crate::FileStore) directory, a
/// `RedisStore` with its own prefix — not the store of a
/// [`TokenManager`](crate::TokenManager): the manager and its refresher take every record in
/// their store for a grant.
///
/// ```
/// use std::sync::Arc;
/// use tokenkeeper::{MemoryStore, StorePendingStore};
/// // In production, a store every instance reaches (Redis, a shared directory…).
/// let shared = Arc::new(MemoryStore::new());
/// let pending = StorePendingStore::new(shared.clone());
/// # let _ = pending;
/// ```
pub struct StorePendingStore {
    store: Arc<dyn TokenStore>,
}

/// The prefix of every key a [`StorePendingStore`] writes.
const KEY_PREFIX: &str = "tokenkeeper-pending:";
/// Where a record's [`TokenSet::extra`] keeps the attempt's fields.
const FIELD: &str = "tokenkeeper_pending";

impl StorePendingStore {
    /// Keeps attempts in `store`.
    pub fn new(store: impl TokenStore) -> Self {
        Self {
            store: Arc::new(store),
        }
    }

    /// Keeps attempts in a store already shared as an `Arc`.
    pub fn from_arc(store: Arc<dyn TokenStore>) -> Self {
        Self { store }
    }

    fn key(state: &str) -> TokenKey {
        TokenKey::new(format!(
            "{KEY_PREFIX}{:x}",
            Sha256::digest(state.as_bytes())
        ))
    }

    fn record(attempt: &PendingAttempt, used: bool) -> GrantRecord {
        let mut fields = Map::new();
        fields.insert("key".into(), Value::from(attempt.key.as_str()));
        fields.insert(
            "redirect_uri".into(),
            Value::from(attempt.redirect_uri.as_str()),
        );
        if used {
            fields.insert("used".into(), Value::Bool(true));
        }
        let mut extra = Map::new();
        extra.insert(FIELD.into(), Value::Object(fields));
        let verifier = if used { "" } else { attempt.verifier() };
        GrantRecord::new(
            TokenSet::new(AccessToken::new(verifier))
                .with_expires_at(attempt.expires_at)
                .with_extra(extra),
        )
    }

    /// The attempt a record holds, and whether it is a used marker.
    fn decode(record: &GrantRecord) -> Result<(PendingAttempt, bool), StoreError> {
        let tokens = record.tokens();
        let fields = tokens
            .extra()
            .get(FIELD)
            .and_then(Value::as_object)
            .ok_or_else(|| StoreError::corrupt("not a pending authorization record"))?;
        let text = |name: &str| {
            fields
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| StoreError::corrupt("pending authorization record lacks a field"))
        };
        let expires_at = tokens
            .expires_at()
            .ok_or_else(|| StoreError::corrupt("pending authorization record lacks an expiry"))?;
        let attempt = PendingAttempt::new(
            TokenKey::new(text("key")?),
            tokens.access_token().secret(),
            text("redirect_uri")?,
            expires_at,
        );
        let used = fields.get("used").and_then(Value::as_bool) == Some(true);
        Ok((attempt, used))
    }
}

impl fmt::Debug for StorePendingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorePendingStore").finish_non_exhaustive()
    }
}

#[async_trait]
impl PendingStore for StorePendingStore {
    async fn put(&self, state: &str, attempt: PendingAttempt) -> Result<(), StoreError> {
        let key = Self::key(state);
        match self
            .store
            .save(&key, &Self::record(&attempt, false), None)
            .await?
        {
            Cas::Saved(_) => Ok(()),
            // A state is random and never reused: a record there already is a collision.
            Cas::Conflict => Err(StoreError::new(
                "a pending authorization attempt with this state exists",
            )),
        }
    }

    async fn take(&self, state: &str) -> Result<Taken, StoreError> {
        let key = Self::key(state);
        loop {
            let Some(loaded) = self.store.load(&key).await? else {
                return Ok(Taken::Unknown);
            };
            let (attempt, used) = Self::decode(&loaded.value)?;
            if used {
                return Ok(Taken::Used { key: attempt.key });
            }
            let marker = Self::record(&attempt, true);
            match self.store.save(&key, &marker, Some(loaded.version)).await? {
                Cas::Saved(_) => return Ok(Taken::Attempt(attempt)),
                // Someone else changed it (took it, most likely): look again.
                Cas::Conflict => continue,
            }
        }
    }

    async fn prune(&self, now: SystemTime) -> Result<usize, StoreError> {
        let mut pruned = 0;
        for key in self.store.keys().await? {
            if !key.as_str().starts_with(KEY_PREFIX) {
                continue;
            }
            let Some(loaded) = self.store.load(&key).await? else {
                continue;
            };
            let expired = loaded
                .value
                .tokens()
                .expires_at()
                .is_none_or(|at| at <= now);
            if expired && self.store.delete(&key).await? {
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::time::Duration;

    fn attempt(expires_at: SystemTime) -> PendingAttempt {
        PendingAttempt::new(
            TokenKey::from("k"),
            "verifier-secret",
            "https://app/cb",
            expires_at,
        )
    }

    async fn single_use(store: &dyn PendingStore) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        store.put("s1", attempt(at)).await.unwrap();
        assert_eq!(store.take("nope").await.unwrap(), Taken::Unknown);
        assert_eq!(store.take("s1").await.unwrap(), Taken::Attempt(attempt(at)));
        assert_eq!(
            store.take("s1").await.unwrap(),
            Taken::Used {
                key: TokenKey::from("k")
            }
        );
        store
            .put("s2", attempt(at + Duration::from_secs(1)))
            .await
            .unwrap();
        assert_eq!(store.prune(at).await.unwrap(), 1, "only the expired one");
        assert_eq!(store.take("s1").await.unwrap(), Taken::Unknown);
        assert!(matches!(store.take("s2").await.unwrap(), Taken::Attempt(_)));
    }

    #[tokio::test]
    async fn memory_store_is_single_use() {
        single_use(&MemoryPendingStore::new()).await;
    }

    #[tokio::test]
    async fn token_store_is_single_use_and_hides_the_state() {
        let backing = Arc::new(MemoryStore::new());
        let store = StorePendingStore::new(backing.clone());
        single_use(&store).await;
        for key in backing.keys().await.unwrap() {
            assert!(key.as_str().starts_with(KEY_PREFIX));
            assert!(!key.as_str().contains("s2"));
        }
    }

    #[tokio::test]
    async fn file_store_is_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = StorePendingStore::new(crate::store::FileStore::open(dir.path()).unwrap());
        single_use(&store).await;
    }

    #[tokio::test]
    async fn concurrent_takes_have_one_winner() {
        let store = Arc::new(StorePendingStore::new(MemoryStore::new()));
        store
            .put(
                "s",
                attempt(SystemTime::UNIX_EPOCH + Duration::from_secs(9)),
            )
            .await
            .unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.take("s").await.unwrap() })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if matches!(task.await.unwrap(), Taken::Attempt(_)) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
    }

    #[test]
    fn debug_redacts_the_verifier() {
        let shown = format!("{:?}", attempt(SystemTime::UNIX_EPOCH));
        assert!(!shown.contains("verifier-secret"), "{shown}");
    }
}
