//! The SQLite store: grants in one database file shared by the processes of one machine
//! (feature `sqlite`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use crate::error::{StoreError, StoreErrorKind};
use crate::store::{Cas, GrantRecord, RefreshLock, TokenStore, Version, Versioned};
use crate::token::TokenKey;

const DEFAULT_PREFIX: &str = "tokenkeeper_";
/// Longer than the manager's default lock ttl (60 s), so a peer outwaits a crashed holder.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(75);
/// How long a statement waits for another process's write transaction before failing.
const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest lease: a century is forever enough, and stays far from `i64::MAX` ms.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A [`TokenStore`] in one SQLite database file, for the processes of one machine (a CLI and
/// its cron job, a few workers) that must refresh each grant once between them.
///
/// SQLite is compiled into the crate (`rusqlite` with `bundled`): no system library is needed.
///
/// # Layout
///
/// Three tables, named with a prefix (default `tokenkeeper_`, see
/// [`SqliteStoreBuilder::table_prefix`]), created if missing:
///
/// | table | holds |
/// |---|---|
/// | `{prefix}grants` | one row per grant: `key TEXT PRIMARY KEY`, `version INTEGER`, `record TEXT` (the [`GrantRecord`] as JSON) |
/// | `{prefix}meta` | the counter versions are drawn from (`name = 'version'`) |
/// | `{prefix}leases` | the refresh locks: `key`, a random `owner` token, `expires_at` (Unix ms) |
///
/// Versions come from one counter per prefix that only grows, so a version is never reused,
/// even after a delete and a re-insert. A save is a compare-and-swap in one
/// `BEGIN IMMEDIATE` transaction (read the version, bump the counter, write the row), so two
/// processes never both win against the same version.
///
/// The database runs in WAL mode (readers never wait for a writer) with `synchronous=FULL` (a
/// committed save survives a power loss, not only a crash), and every statement waits up to
/// [`SqliteStoreBuilder::busy_timeout`] (5 s by default) for another process's write before
/// failing with [`StoreErrorKind::Backend`]. On Unix a new database file is created with mode
/// `0600`; SQLite gives its `-wal` and `-shm` files the same mode. WAL needs a local file
/// system: do not put the file on NFS or another network share.
///
/// Each store holds one connection, used by one call at a time. Writes run on tokio's blocking
/// thread pool ([`tokio::task::spawn_blocking`]); a load runs on the caller's task when the
/// connection is free (a one-row read in WAL mode, which never waits for a writer), and on the
/// blocking pool otherwise.
///
/// # The refresh lock
///
/// [`lock`](TokenStore::lock) inserts a lease row with a random owner token and an expiry
/// `ttl` from now, or takes over a lease whose expiry has passed, in one statement. While
/// another live lease holds the key it polls with a bounded backoff for at most
/// [`SqliteStoreBuilder::lock_wait`] (75 s by default, longer than the manager's default 60 s
/// lock ttl, so a peer outwaits a crashed holder), then fails with
/// [`StoreErrorKind::LockTimeout`]. Only its owner releases it (the delete names the owner
/// token); a holder that dies (even by `kill -9`) leaves it to expire after `ttl`
/// ([`TokenManagerBuilder::lock_ttl`](crate::TokenManagerBuilder::lock_ttl)). A lock dropped
/// without [`release`](RefreshLock::release) is released in the background; a `lock` call
/// cancelled while its statement runs may leave a lease that nobody holds, which expires after
/// `ttl` like a crashed holder's.
///
/// Expiries are read on the machine's wall clock ([`SystemTime`]), the one clock every process
/// of the machine shares. Stepping that clock moves every lease: forward by more than a lease's
/// remaining time, and a peer may take a live lease early; backward, and a crashed holder's
/// lease lasts longer. A refresh that outlives its lease is still fenced by version: its
/// compare-and-swap save fails with [`Cas::Conflict`] if a peer saved meanwhile, and its
/// manager adopts the stored record instead of writing over it. Keep `lock_ttl` well above
/// the provider's request timeout.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tokenkeeper::{SqliteStore, TokenManager, provider_fn, TokenResponse, AccessToken};
///
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("grants.db");
/// let store = SqliteStore::builder(&path)
///     .lock_wait(Duration::from_secs(90))
///     .build()?;
/// # let provider = provider_fn(|_, _| async { Ok(TokenResponse::new(AccessToken::new("a"))) });
/// let manager = TokenManager::builder(provider).store(store).build();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    tables: Arc<Tables>,
    lock_wait: Duration,
    busy_timeout: Duration,
}

/// Configures a [`SqliteStore`]; see [`SqliteStore::builder`].
#[must_use = "a builder does nothing until `build` is called"]
#[derive(Debug)]
pub struct SqliteStoreBuilder {
    path: PathBuf,
    prefix: String,
    lock_wait: Duration,
    busy_timeout: Duration,
}

/// The SQL of every statement, with the table names filled in.
struct Tables {
    prefix: String,
    load: String,
    version_of: String,
    bump: String,
    upsert: String,
    delete: String,
    keys: String,
    keys_after: String,
    keys_first: String,
    acquire: String,
    release: String,
}

impl Tables {
    fn new(prefix: &str) -> Self {
        let grants = format!("{prefix}grants");
        let meta = format!("{prefix}meta");
        let leases = format!("{prefix}leases");
        Self {
            prefix: prefix.to_owned(),
            load: format!("SELECT version, record FROM {grants} WHERE key = ?1"),
            version_of: format!("SELECT version FROM {grants} WHERE key = ?1"),
            bump: format!(
                "INSERT INTO {meta} (name, value) VALUES ('version', 1) \
                 ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
            ),
            upsert: format!(
                "INSERT INTO {grants} (key, version, record) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET version = excluded.version, \
                 record = excluded.record"
            ),
            delete: format!("DELETE FROM {grants} WHERE key = ?1"),
            keys: format!("SELECT key FROM {grants}"),
            keys_after: format!("SELECT key FROM {grants} WHERE key > ?1 ORDER BY key LIMIT ?2"),
            keys_first: format!("SELECT key FROM {grants} ORDER BY key LIMIT ?1"),
            acquire: format!(
                "INSERT INTO {leases} (key, owner, expires_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, \
                 expires_at = excluded.expires_at WHERE {leases}.expires_at <= ?4"
            ),
            release: format!("DELETE FROM {leases} WHERE key = ?1 AND owner = ?2"),
        }
    }

    fn schema(&self) -> String {
        let p = &self.prefix;
        format!(
            "CREATE TABLE IF NOT EXISTS {p}grants (\
               key TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL, record TEXT NOT NULL);\
             CREATE TABLE IF NOT EXISTS {p}meta (\
               name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);\
             CREATE TABLE IF NOT EXISTS {p}leases (\
               key TEXT PRIMARY KEY NOT NULL, owner TEXT NOT NULL, expires_at INTEGER NOT NULL);"
        )
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` with the default settings; see
    /// [`builder`](Self::builder).
    ///
    /// # Errors
    ///
    /// As [`SqliteStoreBuilder::build`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).build()
    }

    /// Configures a store in the database file at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: path.as_ref().to_owned(),
            prefix: DEFAULT_PREFIX.to_owned(),
            lock_wait: DEFAULT_LOCK_WAIT,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The prefix of the store's table names.
    pub fn table_prefix(&self) -> &str {
        &self.tables.prefix
    }

    /// Runs `f` on the connection on the blocking thread pool.
    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Tables) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let tables = Arc::clone(&self.tables);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn, &tables)
        })
        .await
        .map_err(StoreError::new)?
    }
}

impl SqliteStoreBuilder {
    /// The prefix of the store's table names (default `tokenkeeper_`): ASCII letters, digits
    /// and `_`, not starting with a digit. Give each app (or each provider) sharing one
    /// database its own.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long [`lock`](TokenStore::lock) waits for another holder before failing with
    /// [`StoreErrorKind::LockTimeout`] (default 75 s).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// How long one statement waits for another process's write transaction before failing
    /// (SQLite's `busy_timeout`, default 5 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Opens the database, creating the file (mode `0600` on Unix) and the tables if missing,
    /// and switches it to WAL mode. It blocks the calling thread while it does (briefly, or up
    /// to the busy timeout if another process is writing).
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::InvalidKey`] for a table prefix that is not a plain SQL identifier;
    /// [`StoreErrorKind::Corrupt`] if the file is not a SQLite database; otherwise
    /// [`StoreErrorKind::Backend`] if the file cannot be created or opened.
    pub fn build(self) -> Result<SqliteStore, StoreError> {
        let valid_prefix = !self.prefix.starts_with(|c: char| c.is_ascii_digit())
            && self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_prefix {
            return Err(StoreError::with_kind(
                StoreErrorKind::InvalidKey,
                "a table prefix must be ASCII letters, digits and `_`, not starting with a digit",
            ));
        }
        create_private(&self.path)?;
        let conn = Connection::open(&self.path).map_err(sql)?;
        conn.busy_timeout(self.busy_timeout).map_err(sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::new(format!(
                "SQLite refused WAL mode for `{}` (journal mode `{mode}`)",
                self.path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        let tables = Tables::new(&self.prefix);
        conn.execute_batch(&tables.schema()).map_err(sql)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: self.path,
            tables: Arc::new(tables),
            lock_wait: self.lock_wait,
            busy_timeout: self.busy_timeout,
        })
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("table_prefix", &self.tables.prefix)
            .field("lock_wait", &self.lock_wait)
            .finish_non_exhaustive()
    }
}

/// Creates the database file with mode `0600` if it is missing; an existing file is left as
/// it is.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop).map_err(|e| {
        StoreError::new(std::io::Error::new(
            e.kind(),
            format!("cannot create `{}`: {e}", path.display()),
        ))
    })
}

/// A SQLite failure: a file that is not a database (or is damaged), or a value of the wrong
/// type where the store wrote its own, is corrupt; the rest is a backend failure.
/// The version and record of `key`'s row, as stored.
type Row = (Option<i64>, Option<Vec<u8>>);

fn query_row(conn: &Connection, tables: &Tables, key: &TokenKey) -> rusqlite::Result<Option<Row>> {
    conn.prepare_cached(&tables.load)?
        .query_row([key.as_str()], |row| {
            let version = row.get_ref(0)?.as_i64().ok();
            let record = row.get_ref(1)?.as_bytes().ok().map(<[u8]>::to_vec);
            Ok((version, record))
        })
        .optional()
}

fn decode_row(
    row: Option<Row>,
    key: &TokenKey,
) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
    let Some((version, record)) = row else {
        return Ok(None);
    };
    let version = version
        .ok_or_else(|| StoreError::corrupt(format!("the row of `{key}` has an invalid version")))?;
    let record = record
        .ok_or_else(|| StoreError::corrupt(format!("the row of `{key}` has no JSON record")))?;
    Ok(Some(Versioned {
        version: version_from(version, key)?,
        value: GrantRecord::from_json(&record)?,
    }))
}

fn sql(e: rusqlite::Error) -> StoreError {
    let corrupt = matches!(
        e,
        rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::FromSqlConversionFailure(..)
    ) || matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    );
    if corrupt {
        StoreError::corrupt(e)
    } else {
        StoreError::new(e)
    }
}

/// A stored version, which must be a positive integer.
fn version_from(value: i64, key: &TokenKey) -> Result<Version, StoreError> {
    Version::try_from(value)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| StoreError::corrupt(format!("the row of `{key}` has an invalid version")))
}

/// The stored version of `key`, read in the caller's transaction.
fn stored_version(
    tx: &Connection,
    tables: &Tables,
    key: &TokenKey,
) -> Result<Option<Version>, StoreError> {
    let version: Option<rusqlite::types::Value> = tx
        .prepare_cached(&tables.version_of)
        .map_err(sql)?
        .query_row([key.as_str()], |row| row.get(0))
        .optional()
        .map_err(sql)?;
    match version {
        None => Ok(None),
        Some(rusqlite::types::Value::Integer(v)) => version_from(v, key).map(Some),
        Some(_) => Err(StoreError::corrupt(format!(
            "the row of `{key}` has an invalid version"
        ))),
    }
}

/// Milliseconds since the Unix epoch on the machine's wall clock, the lease clock.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        StoreError::check_key(key)?;
        // A one-row read in WAL mode never waits for a writer: when the connection is free it
        // runs on the caller's task, without the blocking pool's round trip (several times the
        // read). Should SQLite still answer busy (a WAL recovery), or the connection be in use,
        // the read goes to the blocking pool, which waits up to the busy timeout.
        if let Ok(conn) = self.conn.try_lock() {
            if conn.busy_timeout(Duration::ZERO).is_ok() {
                let read = query_row(&conn, &self.tables, key);
                let restored = conn.busy_timeout(self.busy_timeout);
                let busy = matches!(
                    read.as_ref()
                        .err()
                        .and_then(rusqlite::Error::sqlite_error_code),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                );
                if !busy {
                    restored.map_err(sql)?;
                    return decode_row(read.map_err(sql)?, key);
                }
            }
        }
        let key = key.clone();
        self.with_conn(move |conn, tables| {
            decode_row(query_row(conn, tables, &key).map_err(sql)?, &key)
        })
        .await
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        StoreError::check_key(key)?;
        let json = String::from_utf8(record.to_json()?).map_err(StoreError::new)?;
        let key = key.clone();
        self.with_conn(move |conn, tables| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            if stored_version(&tx, tables, &key)? != expected {
                // Dropping the transaction rolls it back: nothing was written.
                return Ok(Cas::Conflict);
            }
            let next: i64 = tx
                .prepare_cached(&tables.bump)
                .map_err(sql)?
                .query_row([], |row| row.get(0))
                .map_err(sql)?;
            let version = Version::try_from(next).map_err(|_| {
                StoreError::corrupt(format!(
                    "the version counter in `{}meta` is negative",
                    tables.prefix
                ))
            })?;
            tx.prepare_cached(&tables.upsert)
                .map_err(sql)?
                .execute(params![key.as_str(), next, json])
                .map_err(sql)?;
            tx.commit().map_err(sql)?;
            Ok(Cas::Saved(version))
        })
        .await
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        StoreError::check_key(key)?;
        let key = key.clone();
        self.with_conn(move |conn, tables| {
            let removed = conn.execute(&tables.delete, [key.as_str()]).map_err(sql)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        self.with_conn(|conn, tables| {
            let mut statement = conn.prepare_cached(&tables.keys).map_err(sql)?;
            let keys = statement
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(sql)?
                .map(|key| key.map(TokenKey::from).map_err(sql))
                .collect();
            keys
        })
        .await
    }

    /// A range query on the primary key (SQLite compares text by bytes, as [`TokenKey`]'s
    /// order does).
    async fn keys_after(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<TokenKey>, StoreError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |conn, tables| {
            let mut statement = match after {
                Some(_) => conn.prepare_cached(&tables.keys_after),
                None => conn.prepare_cached(&tables.keys_first),
            }
            .map_err(sql)?;
            let rows = match &after {
                Some(after) => statement.query(params![after.as_str(), limit]),
                None => statement.query(params![limit]),
            }
            .map_err(sql)?;
            rows.mapped(|row| row.get::<_, String>(0))
                .map(|key| key.map(TokenKey::from).map_err(sql))
                .collect()
        })
        .await
    }

    /// A lease row with a random owner token, retried until [`SqliteStoreBuilder::lock_wait`].
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        StoreError::check_key(key)?;
        let owner = format!(
            "{}-{:016x}{:016x}",
            std::process::id(),
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let ttl_ms = i64::try_from(ttl.min(MAX_TTL).as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut wait = crate::store::LockWait::new(self.lock_wait);
        loop {
            let (key_, owner_) = (key.clone(), owner.clone());
            let taken = self
                .with_conn(move |conn, tables| {
                    let now = now_ms();
                    let changed = conn
                        .execute(
                            &tables.acquire,
                            params![key_.as_str(), owner_, now.saturating_add(ttl_ms), now],
                        )
                        .map_err(sql)?;
                    Ok(changed > 0)
                })
                .await?;
            if taken {
                return Ok(Some(Box::new(SqliteLock {
                    conn: Arc::clone(&self.conn),
                    tables: Arc::clone(&self.tables),
                    key: key.clone(),
                    owner,
                    released: false,
                })));
            }
            wait.pause(key, "process").await?;
        }
    }
}

/// A held refresh lock (a lease row). Dropped without [`release`](RefreshLock::release), it
/// is released in the background when a runtime is at hand, and otherwise expires.
struct SqliteLock {
    conn: Arc<Mutex<Connection>>,
    tables: Arc<Tables>,
    key: TokenKey,
    owner: String,
    released: bool,
}

impl SqliteLock {
    /// Deletes the lease if this owner still holds it.
    fn release_now(
        conn: &Mutex<Connection>,
        tables: &Tables,
        key: &TokenKey,
        owner: &str,
    ) -> Result<(), StoreError> {
        let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
        let deleted = conn
            .execute(&tables.release, params![key.as_str(), owner])
            .map_err(sql)?;
        if deleted == 0 {
            tracing::warn!(
                key = %key,
                "the refresh lock expired before it was released: the refresh outlived the \
                 lock ttl (its save was fenced by version)"
            );
        }
        Ok(())
    }

    fn release_in_background(&mut self) -> Option<tokio::task::JoinHandle<Result<(), StoreError>>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let conn = Arc::clone(&self.conn);
        let tables = Arc::clone(&self.tables);
        let key = self.key.clone();
        let owner = std::mem::take(&mut self.owner);
        Some(runtime.spawn_blocking(move || Self::release_now(&conn, &tables, &key, &owner)))
    }
}

#[async_trait]
impl RefreshLock for SqliteLock {
    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        self.released = true;
        match self.release_in_background() {
            Some(task) => task.await.map_err(StoreError::new)?,
            None => Self::release_now(&self.conn, &self.tables, &self.key, &self.owner),
        }
    }
}

impl Drop for SqliteLock {
    fn drop(&mut self) {
        if !self.released {
            drop(self.release_in_background());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{AccessToken, TokenSet};

    fn record(at: &str) -> GrantRecord {
        GrantRecord::new(TokenSet::new(AccessToken::new(at)))
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(tmp.path().join("grants.db")).unwrap();
        (tmp, store)
    }

    /// A second connection for looking (and writing) behind the store's back.
    fn raw(store: &SqliteStore) -> Connection {
        Connection::open(store.path()).unwrap()
    }

    fn saved(cas: Cas) -> Version {
        match cas {
            Cas::Saved(v) => v,
            Cas::Conflict => panic!("the save conflicted"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_store_contract() {
        let (_tmp, store) = store();
        crate::testing::assert_store_has_lock(&store).await;
        assert!(store.keys().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn versions_are_never_reused_after_delete_even_across_reopen() {
        let (_tmp, store) = store();
        let key = TokenKey::from("k");
        let mut seen = Vec::new();
        for round in 0..3 {
            seen.push(saved(store.save(&key, &record("a"), None).await.unwrap()));
            assert!(store.delete(&key).await.unwrap());
            if round == 1 {
                // A restart: nothing is kept in memory.
                let reopened = SqliteStore::open(store.path()).unwrap();
                seen.push(saved(
                    reopened.save(&key, &record("b"), None).await.unwrap(),
                ));
                assert!(reopened.delete(&key).await.unwrap());
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    /// Two handles on one file are two connections, as two processes would have.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_handles_racing_compare_and_swap_have_one_winner_per_version() {
        let (_tmp, store) = store();
        let second = SqliteStore::open(store.path()).unwrap();
        crate::testing::assert_one_winner_per_version(Arc::new(store), Arc::new(second)).await;
    }

    #[tokio::test]
    async fn a_save_against_a_stale_version_writes_nothing() {
        let (_tmp, store) = store();
        let other = SqliteStore::open(store.path()).unwrap();
        let key = TokenKey::from("k");
        let v1 = saved(store.save(&key, &record("a"), None).await.unwrap());
        let v2 = saved(other.save(&key, &record("b"), Some(v1)).await.unwrap());
        assert_eq!(
            store.save(&key, &record("c"), Some(v1)).await.unwrap(),
            Cas::Conflict
        );
        assert_eq!(
            store.save(&key, &record("c"), None).await.unwrap(),
            Cas::Conflict
        );
        let loaded = store.load(&key).await.unwrap().unwrap();
        assert_eq!((loaded.version, loaded.value), (v2, record("b")));
    }

    /// Lease rows as the store wrote them: (owner, expires_at).
    fn leases(store: &SqliteStore, key: &str) -> Vec<(String, i64)> {
        let conn = raw(store);
        let mut statement = conn
            .prepare("SELECT owner, expires_at FROM tokenkeeper_leases WHERE key = ?1")
            .unwrap();
        statement
            .query_map([key], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// What a crashed holder leaves once its ttl has passed, without waiting for it.
    fn expire(store: &SqliteStore, key: &str) {
        let changed = raw(store)
            .execute(
                "UPDATE tokenkeeper_leases SET expires_at = ?1 WHERE key = ?2",
                params![now_ms() - 1, key],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_exclusive_expires_and_is_released_only_by_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("grants.db");
        let open = || {
            SqliteStore::builder(&path)
                .lock_wait(Duration::from_secs(2))
                .build()
                .unwrap()
        };
        let (a, b) = (open(), open());
        let key = TokenKey::from("k");
        let ttl = Duration::from_secs(60);

        let first = a.lock(&key, ttl).await.unwrap().unwrap();
        let mut held = leases(&a, "k");
        assert_eq!(held.len(), 1, "one lease");
        let (owner_a, expires) = held.remove(0);
        let now = now_ms();
        assert!(
            (now + 59_000..=now + 60_000).contains(&expires),
            "the lease ends ttl from now on the wall clock"
        );
        // Held by `a`: `b` waits, then times out.
        let err = b.lock(&key, ttl).await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::LockTimeout);

        // `a` crashed (its ttl passed): `b` takes the lease over.
        expire(&a, "k");
        let second = b.lock(&key, ttl).await.unwrap().unwrap();
        let held = leases(&b, "k");
        assert_eq!(held.len(), 1, "one lease");
        assert_ne!(held[0].0, owner_a);

        // The late first holder's release does not free `b`'s lease.
        first.release().await.unwrap();
        assert_eq!(leases(&b, "k").len(), 1, "only the owner releases");
        let err = a.lock(&key, ttl).await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::LockTimeout);

        second.release().await.unwrap();
        assert!(leases(&b, "k").is_empty());
        a.lock(&key, ttl)
            .await
            .unwrap()
            .unwrap()
            .release()
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_lock_is_released_in_the_background() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SqliteStore::builder(tmp.path().join("grants.db"))
            .lock_wait(Duration::from_secs(5))
            .build()
            .unwrap();
        let key = TokenKey::from("k");
        drop(store.lock(&key, Duration::from_secs(60)).await.unwrap());
        // The background release queued on the blocking pool runs before (or while) this
        // lock waits.
        let again = store.lock(&key, Duration::from_secs(60)).await.unwrap();
        assert!(again.is_some());
        assert_eq!(leases(&store, "k").len(), 1);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_database_and_its_wal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (tmp, store) = store();
        store
            .save(&TokenKey::from("k"), &record("a"), None)
            .await
            .unwrap();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(tmp.path()).unwrap() {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{:?}", entry.path());
            names.push(entry.file_name().into_string().unwrap());
        }
        names.sort();
        assert_eq!(names, ["grants.db", "grants.db-shm", "grants.db-wal"]);
    }

    #[tokio::test]
    async fn the_journal_is_wal_and_writes_are_fully_synced() {
        let (_tmp, store) = store();
        let conn = raw(&store);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .with_conn(|conn, _| {
                conn.query_row("PRAGMA synchronous", [], |row| row.get(0))
                    .map_err(sql)
            })
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
    }

    #[tokio::test]
    async fn corrupt_rows_are_corrupt_errors() {
        let (_tmp, store) = store();
        let conn = raw(&store);
        let insert = "INSERT INTO tokenkeeper_grants (key, version, record) VALUES (?1, ?2, ?3)";
        conn.execute(insert, params!["json", 1, "{not json"])
            .unwrap();
        conn.execute(insert, params!["version", "x", "{}"]).unwrap();
        conn.execute(insert, params!["negative", -3, "{}"]).unwrap();
        conn.execute(insert, params!["record", 2, 42]).unwrap();
        for key in ["json", "version", "negative", "record"] {
            let err = store.load(&TokenKey::from(key)).await.err().unwrap();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{key}");
        }
        // A key that is not text is not listed as some other key.
        conn.execute(insert, params![vec![0xffu8, 0], 3, "{}"])
            .unwrap();
        let err = store.keys().await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        // A save against a corrupt version neither panics nor overwrites it.
        let err = store
            .save(&TokenKey::from("version"), &record("a"), None)
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
    }

    /// Another process holding a write transaction past the busy timeout makes a save fail
    /// as a retryable backend error, not hang. (The 50 ms are SQLite's own wait.)
    #[tokio::test]
    async fn a_writer_holding_the_database_past_the_busy_timeout_is_a_backend_error() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SqliteStore::builder(tmp.path().join("grants.db"))
            .busy_timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let key = TokenKey::from("k");
        let v = saved(store.save(&key, &record("a"), None).await.unwrap());
        let mut other = raw(&store);
        let tx = other
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let err = store.save(&key, &record("b"), Some(v)).await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::Backend);
        // Readers are not blocked by the writer (WAL).
        assert_eq!(store.load(&key).await.unwrap().unwrap().version, v);
        drop(tx);
        saved(store.save(&key, &record("b"), Some(v)).await.unwrap());
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("grants.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = SqliteStore::open(&path).err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
    }

    #[tokio::test]
    async fn table_prefixes_separate_stores_in_one_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("grants.db");
        let a = SqliteStore::builder(&path)
            .table_prefix("app_a_")
            .build()
            .unwrap();
        let b = SqliteStore::builder(&path)
            .table_prefix("app_b_")
            .build()
            .unwrap();
        assert_eq!(a.table_prefix(), "app_a_");
        a.save(&TokenKey::from("k"), &record("a"), None)
            .await
            .unwrap();
        assert_eq!(b.load(&TokenKey::from("k")).await.unwrap(), None);
        assert!(b.keys().await.unwrap().is_empty());
        let _lock = a
            .lock(&TokenKey::from("k"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(b
            .lock(&TokenKey::from("k"), Duration::from_secs(60))
            .await
            .unwrap()
            .is_some());
        for bad in ["", "x;", "1x_", "a b", "naïve_"] {
            let err = SqliteStore::builder(&path).table_prefix(bad).build().err();
            if bad.is_empty() {
                assert!(err.is_none(), "an empty prefix is a plain name");
            } else {
                assert_eq!(err.unwrap().kind(), StoreErrorKind::InvalidKey, "{bad:?}");
            }
        }
    }

    #[tokio::test]
    async fn keys_are_paged_in_byte_order() {
        let (_tmp, store) = store();
        for key in ["b", "a", "é", "Z", "a0"] {
            store
                .save(&TokenKey::from(key), &record("x"), None)
                .await
                .unwrap();
        }
        let page = store.keys_after(None, 2).await.unwrap();
        assert_eq!(page, [TokenKey::from("Z"), TokenKey::from("a")]);
        let page = store
            .keys_after(Some(&TokenKey::from("a")), 10)
            .await
            .unwrap();
        assert_eq!(
            page,
            [
                TokenKey::from("a0"),
                TokenKey::from("b"),
                TokenKey::from("é")
            ]
        );
    }

    #[test]
    fn debug_shows_the_settings() {
        let (_tmp, store) = store();
        let debug = format!("{store:?}");
        assert!(
            debug.contains("grants.db") && debug.contains("tokenkeeper_"),
            "{debug}"
        );
    }
}
