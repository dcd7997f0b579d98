//! The Redis store: grants shared by every instance of an app (feature `redis`).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, Script};

use crate::error::StoreError;
use crate::store::{Cas, GrantRecord, GrantState, RefreshLock, TokenStore, Version, Versioned};
use crate::token::TokenKey;

mod connection;
mod layout;

use connection::Connection;
use layout::Layout;

const DEFAULT_PREFIX: &str = "tokenkeeper:";
/// Longer than the manager's default lock ttl (60 s), so a peer outwaits a crashed holder.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(75);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Expiries beyond this are not worth a TTL (and would overflow Redis's clock).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Compare-and-swap. KEYS: the grant hash. ARGV: the expected version (`""`: absent), the
/// record, the TTL in milliseconds (`0`: none). Returns the new version, or nil on a conflict.
///
/// The new version is the server's clock in microseconds, or the current version plus one if
/// that is not greater: versions grow with every save, and a grant deleted (or expired, or
/// lost in a failover) and saved again gets a version above every earlier one, with no counter
/// key to share between grants (which a cluster would put in another slot).
static SAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] == '' then
  if current then return false end
elseif current ~= ARGV[1] then
  return false
end
local now = redis.call('TIME')
local stamp = now[1] .. string.format('%06d', tonumber(now[2]))
local version = stamp
if current and tonumber(current) >= tonumber(stamp) then
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  version = redis.call('HGET', KEYS[1], 'version')
end
redis.call('HSET', KEYS[1], 'version', version, 'record', ARGV[2])
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('PERSIST', KEYS[1])
end
return version
",
    )
});

/// Deletes the lock only if it still holds this owner's token. KEYS: the lock. ARGV: the token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// A [`TokenStore`] in Redis or a Redis Cluster, for apps running several instances
/// (replicas, workers) that must refresh each grant once between them.
///
/// [`RedisStore::builder`] connects to one server, [`RedisStore::cluster`] to a Redis
/// Cluster; both keep the same keys, so a store can move from one to the other.
///
/// # Layout
///
/// Under a prefix (default `tokenkeeper:`, see [`RedisStoreBuilder::prefix`]), for the
/// grant `customer-42`:
///
/// | key | holds |
/// |---|---|
/// | `tokenkeeper:{customer-42}:grant` | a hash: `version`, and `record` (the [`GrantRecord`] as JSON) |
/// | `tokenkeeper:{customer-42}:lock` | the refresh lock: a random owner token, with an expiry |
///
/// The braces are a Redis Cluster *hash tag*: both keys of a grant live in the same hash slot
/// (on the same node), and no command or script of this store touches keys of two grants. In
/// the tag, `%`, `{` and `}` of the grant's key are written `%25`, `%7B` and `%7D`, and the
/// empty key is written `%`, so the tag is never cut short or empty. The prefix therefore may
/// not contain `{` or `}` (it would choose the slot instead).
///
/// A save is compare-and-swap in a Lua script (atomic on the server). Its new version is the
/// server's clock in microseconds, or the previous version plus one if that is not greater: a
/// version grows with every save, and a grant deleted (or expired, or lost in a failover) and
/// saved again gets a version above every earlier one, as long as the server's clock does not
/// go back by more than the time between the two saves. [`keys`](TokenStore::keys) walks
/// `SCAN` (never `KEYS`), on a cluster on every primary (see "Redis Cluster"). Run Redis with
/// persistence if grants must survive its restart.
///
/// # Redis Cluster
///
/// On a cluster, every command goes to the node serving its grant's slot, following
/// redirections while slots move. [`keys`](TokenStore::keys) reads the slot map
/// (`CLUSTER SLOTS`) and scans every primary; while a slot is being migrated (resharding), it
/// scans every primary twice, so that a grant moving between two nodes is seen on one of them.
/// A listing during which the slot map changed is taken again (three times at most, then it
/// fails), and a cluster that does not serve all 16384 slots fails the listing rather than
/// return it short.
///
/// Redis accepts keys of up to 512 MB, but this store, like every built-in store, refuses a
/// [`TokenKey`] longer than [`TokenKey::MAX_LEN`] bytes with
/// [`StoreErrorKind::InvalidKey`](crate::StoreErrorKind::InvalidKey) before sending anything.
///
/// # The refresh lock
///
/// [`lock`](TokenStore::lock) is `SET {prefix}{key}:lock <random token> NX PX <ttl>`, retried
/// with a bounded backoff for at most [`RedisStoreBuilder::lock_wait`] (75 s by default, longer
/// than the manager's default 60 s lock ttl, so a peer outwaits a crashed holder), then
/// [`StoreErrorKind::LockTimeout`](crate::StoreErrorKind::LockTimeout). Only its owner releases it (a compare-and-delete script);
/// a holder that dies (even by `kill -9`) leaves it to expire after `ttl`
/// ([`TokenManagerBuilder::lock_ttl`](crate::TokenManagerBuilder::lock_ttl)).
///
/// # A refresh that outlives its lock
///
/// If a refresh takes longer than the lock's `ttl`, the lock expires and a peer may take it.
/// The store fences by version: the late refresh's compare-and-swap save fails with
/// [`Cas::Conflict`] if the peer saved meanwhile, and its manager then adopts the stored
/// record instead of writing over it, so no rotated refresh token is lost in the store. It
/// cannot stop the provider from seeing two refreshes with the same refresh token, so keep
/// `lock_ttl` well above the provider's request timeout. Releasing a lock that expired is a
/// no-op (with a `tracing` warning).
///
/// # Expiry
///
/// No TTL by default. With [`RedisStoreBuilder::ttl`], each save sets the grant's TTL to the
/// longer of that TTL and the time left until the grant's refresh token expires (its access
/// token, for a grant without a refresh token). A grant whose token lifetime is unknown gets
/// no TTL, so a live grant is never dropped; a dead grant (needing re-authorization) gets the
/// configured TTL.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use tokenkeeper::{RedisStore, TokenManager, provider_fn, TokenResponse, AccessToken};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .prefix("myapp:tokens:")
///     .ttl(Duration::from_secs(30 * 24 * 3600))
///     .build()
///     .await?;
/// // Or on a Redis Cluster, from any of its nodes:
/// let clustered = RedisStore::cluster(["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"])
///     .prefix("myapp:tokens:")
///     .build()
///     .await?;
/// # drop(clustered);
/// # let provider = provider_fn(|_, _| async { Ok(TokenResponse::new(AccessToken::new("a"))) });
/// let manager = TokenManager::builder(provider).store(store).build();
/// # Ok(())
/// # }
/// ```
pub struct RedisStore {
    conn: Connection,
    addr: String,
    layout: Layout,
    ttl: Option<Duration>,
    lock_wait: Duration,
}

/// Configures a [`RedisStore`]; see [`RedisStore::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct RedisStoreBuilder {
    target: Target,
    prefix: String,
    ttl: Option<Duration>,
    lock_wait: Duration,
    response_timeout: Duration,
    connection_timeout: Duration,
}

/// Where a [`RedisStoreBuilder`] connects.
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisStore {
    /// Configures a store on the Redis server at `url` (`redis://[:password@]host[:port][/db]`,
    /// or `rediss://` with a TLS feature of the `redis` crate enabled in your app).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Single(url.into()))
    }

    /// Configures a store on a Redis Cluster, reached first through any of `urls`
    /// (`redis://[[user]:password@]host:port`, one per node you know of; the rest of the
    /// cluster is discovered). See [`RedisStore`]'s "Redis Cluster".
    pub fn cluster<I>(urls: I) -> RedisStoreBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        RedisStoreBuilder::new(Target::Cluster(urls.into_iter().map(Into::into).collect()))
    }

    /// The prefix of every key this store uses.
    pub fn prefix(&self) -> &str {
        self.layout.prefix()
    }

    fn grant_key(&self, key: &TokenKey) -> String {
        self.layout.grant(key)
    }

    fn lock_key(&self, key: &TokenKey) -> String {
        self.layout.lock(key)
    }
}

impl RedisStoreBuilder {
    fn new(target: Target) -> Self {
        Self {
            target,
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: None,
            lock_wait: DEFAULT_LOCK_WAIT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
        }
    }

    /// The prefix of every key the store uses (default `tokenkeeper:`). Give each app (or
    /// each provider sharing one Redis) its own. It may not contain `{` or `}`, which would
    /// choose the Redis Cluster hash slot of every key (see [`RedisStore`]'s "Layout").
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Expire grants not saved for this long, but never before their refresh token (see
    /// [`RedisStore`]'s "Expiry"). Default: no expiry.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long [`lock`](TokenStore::lock) waits for another holder before failing with
    /// [`StoreErrorKind::LockTimeout`](crate::StoreErrorKind::LockTimeout) (default 75 s).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// How long one command may take (default 2 s). On a cluster, how long each node may take
    /// to answer; a command redirected or retried (a slot moving, a failover) may take three
    /// times as long in all.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Connects. The connection is re-established automatically if it drops; a cluster's
    /// connection follows its slot map as it changes.
    ///
    /// # Errors
    ///
    /// A [`StoreError`] if a URL is invalid or the server (or no node of the cluster) can be
    /// reached; of kind [`StoreErrorKind::InvalidKey`](crate::StoreErrorKind::InvalidKey) if
    /// the prefix holds `{` or `}`.
    pub async fn build(self) -> Result<RedisStore, StoreError> {
        let layout = Layout::new(&self.prefix)?;
        let (conn, addr) = match &self.target {
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(backend)?;
                let addr = client.get_connection_info().addr().to_string();
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(self.response_timeout))
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_number_of_retries(2);
                let conn = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(backend)?;
                (Connection::Single(conn), addr)
            }
            Target::Cluster(urls) => {
                let mut addrs = Vec::with_capacity(urls.len());
                for url in urls {
                    let info = url.as_str().into_connection_info().map_err(backend)?;
                    addrs.push(info.addr().to_string());
                }
                let client =
                    redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
                        .connection_timeout(self.connection_timeout)
                        .response_timeout(self.response_timeout)
                        .overall_response_timeout(Some(self.response_timeout.saturating_mul(3)))
                        .retries(2)
                        .build()
                        .map_err(backend)?;
                let conn = client.get_async_connection().await.map_err(backend)?;
                (Connection::Cluster(conn), addrs.join(","))
            }
        };
        Ok(RedisStore {
            conn,
            addr,
            layout,
            ttl: self.ttl,
            lock_wait: self.lock_wait,
        })
    }
}

// The URL may hold a password: it is never printed.
impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.addr)
            .field("prefix", &self.layout.prefix())
            .field("ttl", &self.ttl)
            .field("lock_wait", &self.lock_wait)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field(
                match self.target {
                    Target::Single(_) => "url",
                    Target::Cluster(_) => "urls",
                },
                &"[redacted]",
            )
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("lock_wait", &self.lock_wait)
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .finish()
    }
}

fn backend(e: RedisError) -> StoreError {
    StoreError::new(e)
}

#[async_trait]
impl TokenStore for RedisStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        StoreError::check_key(key)?;
        let (version, record): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.grant_key(key))
            .arg("version")
            .arg("record")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| {
                if e.code() == Some("WRONGTYPE") {
                    StoreError::corrupt(format!(
                        "`{}` is not a grant written by this store",
                        self.grant_key(key)
                    ))
                } else {
                    backend(e)
                }
            })?;
        match (version, record) {
            (None, None) => Ok(None),
            (Some(version), Some(record)) => {
                let version = version.parse().map_err(|_| {
                    StoreError::corrupt(format!("`{}` has an invalid version", self.grant_key(key)))
                })?;
                Ok(Some(Versioned {
                    version,
                    value: GrantRecord::from_json(&record)?,
                }))
            }
            _ => Err(StoreError::corrupt(format!(
                "`{}` is not a grant written by this store",
                self.grant_key(key)
            ))),
        }
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        StoreError::check_key(key)?;
        let bytes = record.to_json()?;
        let expected = expected.map(|v| v.to_string()).unwrap_or_default();
        let saved: Option<String> = SAVE
            .key(self.grant_key(key))
            .arg(expected)
            .arg(bytes)
            .arg(ttl_ms(self.ttl, record, SystemTime::now()))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| {
                if e.code() == Some("WRONGTYPE") {
                    StoreError::corrupt(format!(
                        "`{}` was not written by this store",
                        self.grant_key(key)
                    ))
                } else {
                    backend(e)
                }
            })?;
        match saved {
            None => Ok(Cas::Conflict),
            Some(v) => v.parse().map(Cas::Saved).map_err(|_| {
                StoreError::corrupt(format!("`{}` has an invalid version", self.grant_key(key)))
            }),
        }
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        StoreError::check_key(key)?;
        let removed: u64 = redis::cmd("DEL")
            .arg(self.grant_key(key))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(removed > 0)
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        let names = self.conn.scan(&self.layout.grants_pattern()).await?;
        let keys: BTreeSet<TokenKey> = names
            .iter()
            .filter_map(|n| self.layout.grant_of(n))
            .collect();
        Ok(keys.into_iter().collect())
    }

    /// `SET … NX PX ttl` with a random owner token, retried until [`RedisStoreBuilder::lock_wait`].
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        StoreError::check_key(key)?;
        let lock_key = self.lock_key(key);
        let token = format!(
            "{}-{:016x}{:016x}",
            std::process::id(),
            fastrand::u64(..),
            fastrand::u64(..)
        );
        // Redis refuses an expiry past its clock's range: a century is forever enough.
        let ttl_ms = u64::try_from(ttl.min(MAX_TTL).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut conn = self.conn.clone();
        let mut wait = crate::store::LockWait::new(self.lock_wait);
        loop {
            let set: Option<String> = redis::cmd("SET")
                .arg(&lock_key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            if set.is_some() {
                return Ok(Some(Box::new(RedisLock {
                    conn,
                    key: lock_key,
                    token,
                    released: false,
                })));
            }
            wait.pause(key, "instance").await?;
        }
    }
}

/// A held refresh lock. Dropped without [`release`](RefreshLock::release), it is released in
/// the background when a runtime is at hand, and otherwise expires.
struct RedisLock {
    conn: Connection,
    key: String,
    token: String,
    released: bool,
}

impl RedisLock {
    async fn release_now(mut conn: Connection, key: &str, token: &str) -> Result<(), StoreError> {
        let deleted: u64 = RELEASE
            .key(key)
            .arg(token)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        if deleted == 0 {
            tracing::warn!(
                lock = key,
                "the refresh lock expired before it was released: the refresh outlived the \
                 lock ttl (its save was fenced by version)"
            );
        }
        Ok(())
    }
}

#[async_trait]
impl RefreshLock for RedisLock {
    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        self.released = true;
        Self::release_now(self.conn.clone(), &self.key, &self.token).await
    }
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let conn = self.conn.clone();
            let key = std::mem::take(&mut self.key);
            let token = std::mem::take(&mut self.token);
            runtime.spawn(async move {
                let _ = Self::release_now(conn, &key, &token).await;
            });
        }
    }
}

/// The TTL a save gives the grant (see [`RedisStore`]'s "Expiry"), in milliseconds; 0 for none.
fn ttl_ms(ttl: Option<Duration>, record: &GrantRecord, now: SystemTime) -> u64 {
    let Some(ttl) = ttl else { return 0 };
    let ttl = if matches!(record.state(), GrantState::Active) {
        let tokens = record.tokens();
        let end = match tokens.refresh_token() {
            Some(_) => tokens.refresh_expires_at(),
            None => tokens.expires_at(),
        };
        match end {
            // Unknown life: never cut it short.
            None => return 0,
            Some(end) => ttl.max(end.duration_since(now).unwrap_or_default()),
        }
    } else {
        ttl
    };
    if ttl >= MAX_TTL {
        return 0;
    }
    u64::try_from(ttl.as_millis()).unwrap_or(0).max(1)
}

/// The Redis test harness, shared with the integration tests.
#[cfg(test)]
#[path = "../../tests/support/redis.rs"]
mod test_server;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::error::InvalidationReason;
    use crate::error::StoreErrorKind;
    use crate::token::{AccessToken, RefreshToken, TokenSet};

    use super::test_server::RedisServer;

    fn record(at: &str) -> GrantRecord {
        GrantRecord::new(TokenSet::new(AccessToken::new(at)))
    }

    async fn store(server: &RedisServer) -> RedisStore {
        RedisStore::builder(server.url()).build().await.unwrap()
    }

    /// A plain connection for looking behind the store's back.
    fn raw(server: &RedisServer) -> redis::Connection {
        redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    #[tokio::test]
    async fn keeps_the_store_contract() {
        let server = RedisServer::start();
        let store = store(&server).await;
        crate::testing::assert_store_has_lock(&store).await;
        // Versions are never reused after delete and re-insert, even by a new connection.
        let key = TokenKey::from("k");
        let Cas::Saved(v1) = store.save(&key, &record("a"), None).await.unwrap() else {
            panic!()
        };
        assert!(store.delete(&key).await.unwrap());
        let again = self::store(&server).await;
        let Cas::Saved(v2) = again.save(&key, &record("c"), None).await.unwrap() else {
            panic!()
        };
        assert!(v2 > v1);
        assert_eq!(store.keys().await.unwrap(), vec![key]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_compare_and_swap_has_one_winner_per_version() {
        let server = RedisServer::start();
        crate::testing::assert_one_winner_per_version(
            Arc::new(store(&server).await),
            Arc::new(store(&server).await),
        )
        .await;
    }

    #[tokio::test]
    async fn prefixes_separate_apps_and_keys_are_scanned() {
        let server = RedisServer::start();
        let a = RedisStore::builder(server.url())
            .prefix("app*[a]:")
            .build()
            .await
            .unwrap();
        let b = RedisStore::builder(server.url())
            .prefix("appX[a]:")
            .build()
            .await
            .unwrap();
        let mut expected = Vec::new();
        // More than one SCAN batch.
        for i in 0..1200 {
            let key = TokenKey::from(format!("tenant:{i}"));
            a.save(&key, &record("a"), None).await.unwrap();
            expected.push(key);
        }
        b.save(&TokenKey::from("other"), &record("b"), None)
            .await
            .unwrap();
        expected.sort();
        assert_eq!(a.keys().await.unwrap(), expected);
        assert_eq!(b.keys().await.unwrap(), vec![TokenKey::from("other")]);
        assert!(a.load(&TokenKey::from("other")).await.unwrap().is_none());
        let mut raw = raw(&server);
        let exists: bool = redis::cmd("EXISTS")
            .arg("app*[a]:{tenant:7}:grant")
            .query(&mut raw)
            .unwrap();
        assert!(exists);
    }

    #[tokio::test]
    async fn foreign_values_are_corrupt_and_not_overwritten() {
        let server = RedisServer::start();
        let store = store(&server).await;
        let mut raw = raw(&server);
        let key = TokenKey::from("k");
        let () = redis::cmd("SET")
            .arg("tokenkeeper:{k}:grant")
            .arg("someone else's")
            .query(&mut raw)
            .unwrap();
        assert_eq!(
            store.load(&key).await.unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
        assert_eq!(
            store
                .save(&key, &record("a"), None)
                .await
                .unwrap_err()
                .kind(),
            StoreErrorKind::Corrupt
        );
        let value: String = redis::cmd("GET")
            .arg("tokenkeeper:{k}:grant")
            .query(&mut raw)
            .unwrap();
        assert_eq!(value, "someone else's");

        let () = redis::cmd("HSET")
            .arg("tokenkeeper:{j}:grant")
            .arg("version")
            .arg("3")
            .arg("record")
            .arg(r#"{"tokens": {"access_token": 12345678}}"#)
            .query(&mut raw)
            .unwrap();
        let err = store.load(&TokenKey::from("j")).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        let text = format!("{err:?} {}", std::error::Error::source(&err).unwrap());
        assert!(!text.contains("12345678"), "{text}");
        // A save with the stale version cannot replace it either.
        assert_eq!(
            store
                .save(&TokenKey::from("j"), &record("a"), Some(2))
                .await
                .unwrap(),
            Cas::Conflict
        );
    }

    #[tokio::test]
    async fn refresh_lock_is_exclusive_expires_and_is_released_only_by_its_owner() {
        let server = RedisServer::start();
        let store = store(&server).await;
        let other = RedisStore::builder(server.url())
            .lock_wait(Duration::from_millis(150))
            .build()
            .await
            .unwrap();
        let key = TokenKey::from("k");
        let long = Duration::from_secs(60);
        let held = store.lock(&key, long).await.unwrap().unwrap();
        let err = other.lock(&key, long).await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::LockTimeout);
        other
            .lock(&TokenKey::from("j"), long)
            .await
            .unwrap()
            .unwrap();
        held.release().await.unwrap();
        let held = other.lock(&key, long).await.unwrap().unwrap();

        // Dropped without release: released in the background.
        drop(held);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let held = loop {
            match other.lock(&key, long).await {
                Ok(lock) => break lock.unwrap(),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    assert_eq!(e.kind(), StoreErrorKind::LockTimeout)
                }
                Err(e) => panic!("{e}"),
            }
        };
        // A holder that outlives its ttl: the lock expires, a peer takes it, and the late
        // release leaves the peer's lock alone.
        std::mem::forget(held);
        let short = Duration::from_millis(100);
        let mut raw = raw(&server);
        let () = redis::cmd("PEXPIRE")
            .arg("tokenkeeper:{k}:lock")
            .arg(1)
            .query(&mut raw)
            .unwrap();
        let late = loop {
            match store.lock(&key, short).await {
                Ok(lock) => break lock.unwrap(),
                Err(e) => assert_eq!(e.kind(), StoreErrorKind::LockTimeout),
            }
        };
        let () = redis::cmd("PEXPIRE")
            .arg("tokenkeeper:{k}:lock")
            .arg(1)
            .query(&mut raw)
            .unwrap();
        let peer = other.lock(&key, long).await.unwrap().unwrap();
        late.release().await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg("tokenkeeper:{k}:lock")
            .query(&mut raw)
            .unwrap();
        assert!(
            ttl > 1000,
            "the peer's lock survived the late release: {ttl}"
        );
        peer.release().await.unwrap();
        let exists: bool = redis::cmd("EXISTS")
            .arg("tokenkeeper:{k}:lock")
            .query(&mut raw)
            .unwrap();
        assert!(!exists);
    }

    #[tokio::test]
    async fn an_unbounded_lock_wait_does_not_panic() {
        let server = RedisServer::start();
        let store = RedisStore::builder(server.url())
            .lock_wait(Duration::MAX)
            .build()
            .await
            .unwrap();
        let lock = store.lock(&TokenKey::from("k"), Duration::MAX).await;
        lock.unwrap().unwrap().release().await.unwrap();
    }

    #[tokio::test]
    async fn ttl_is_applied_on_save() {
        let server = RedisServer::start();
        let day = Duration::from_secs(24 * 3600);
        let store = RedisStore::builder(server.url())
            .ttl(Duration::from_secs(3600))
            .build()
            .await
            .unwrap();
        let plain = self::store(&server).await;
        let key = TokenKey::from("k");
        let grant = GrantRecord::new(
            TokenSet::new(AccessToken::new("a"))
                .with_refresh_token(RefreshToken::new("r"))
                .with_refresh_expires_at(SystemTime::now() + 30 * day),
        );
        let mut raw = raw(&server);
        let pttl = |raw: &mut redis::Connection| -> i64 {
            redis::cmd("PTTL")
                .arg("tokenkeeper:{k}:grant")
                .query(raw)
                .unwrap()
        };
        let Cas::Saved(v) = plain.save(&key, &grant, None).await.unwrap() else {
            panic!()
        };
        assert_eq!(pttl(&mut raw), -1, "no TTL by default");
        let Cas::Saved(v) = store.save(&key, &grant, Some(v)).await.unwrap() else {
            panic!()
        };
        let ms = pttl(&mut raw);
        assert!(ms > (29 * day).as_millis() as i64, "{ms}");
        plain.save(&key, &grant, Some(v)).await.unwrap();
        assert_eq!(pttl(&mut raw), -1, "a store without TTL clears it");
    }

    #[tokio::test]
    async fn the_password_never_shows() {
        let server = RedisServer::start_with_password(Some("hunter2-secret"));
        let store = store(&server).await;
        store
            .save(&TokenKey::from("k"), &record("a"), None)
            .await
            .unwrap();
        let builder = RedisStore::builder(server.url());
        let wrong = server.url().replace("hunter2-secret", "wrong-secret");
        let err = RedisStore::builder(wrong).build().await.unwrap_err();
        let mut text = format!("{store:?} {builder:?} {err} {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(text.contains("127.0.0.1"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("wrong-secret"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_prefix_with_braces_is_refused_before_connecting() {
        for prefix in ["{app}:", "app{", "app}", "a{}"] {
            for builder in [
                RedisStore::builder("redis://127.0.0.1:1/"),
                RedisStore::cluster(["redis://127.0.0.1:1/"]),
            ] {
                let err = builder.prefix(prefix).build().await.unwrap_err();
                assert_eq!(err.kind(), StoreErrorKind::InvalidKey, "{prefix}");
            }
        }
    }

    #[tokio::test]
    async fn the_password_never_shows_for_a_cluster() {
        let server = RedisServer::start_with_password(Some("hunter2-secret"));
        let wrong = server.url().replace("hunter2-secret", "wrong-secret");
        let mut text = String::new();
        // A wrong password, and a right one on a server that is no cluster.
        for url in [wrong, server.url()] {
            let builder = RedisStore::cluster([url.clone(), url]);
            text.push_str(&format!(" {builder:?}"));
            let err = builder.build().await.unwrap_err();
            text.push_str(&format!(" {err} {err:?}"));
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                text.push_str(&format!(" {s} {s:?}"));
                source = s.source();
            }
        }
        assert!(text.contains("urls"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("wrong-secret"),
            "{text}"
        );
    }

    #[test]
    fn ttl_is_never_shorter_than_the_refresh_token_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let day = Duration::from_secs(24 * 3600);
        let ttl = Duration::from_secs(3600);
        let ms = |d: Duration| d.as_millis() as u64;
        let refreshable = |life: Option<Duration>| {
            let mut tokens = TokenSet::new(AccessToken::new("a"))
                .with_refresh_token(RefreshToken::new("r"))
                .with_expires_at(now + Duration::from_secs(60));
            if let Some(life) = life {
                tokens = tokens.with_refresh_expires_at(now + life);
            }
            GrantRecord::new(tokens)
        };
        let ttl_of = |ttl: Option<Duration>, record: &GrantRecord| ttl_ms(ttl, record, now);
        assert_eq!(
            ttl_of(None, &refreshable(Some(day))),
            0,
            "no TTL by default"
        );
        assert_eq!(
            ttl_of(Some(ttl), &refreshable(Some(30 * day))),
            ms(30 * day)
        );
        assert_eq!(
            ttl_of(Some(ttl), &refreshable(Some(Duration::from_secs(10)))),
            ms(ttl)
        );
        assert_eq!(
            ttl_of(Some(ttl), &refreshable(None)),
            0,
            "unknown life: no TTL"
        );
        let access_only =
            GrantRecord::new(TokenSet::new(AccessToken::new("a")).with_expires_at(now + 60 * day));
        assert_eq!(ttl_of(Some(ttl), &access_only), ms(60 * day));
        let mut dead = refreshable(None);
        dead.rare_mut().state = GrantState::ReauthorizationRequired {
            reason: InvalidationReason::InvalidGrant,
            since: Some(now),
        };
        assert_eq!(ttl_of(Some(ttl), &dead), ms(ttl));
        assert_eq!(ttl_of(Some(Duration::from_secs(u64::MAX)), &dead), 0);
    }
}
