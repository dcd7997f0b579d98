//! The PostgreSQL store: grants shared by every instance of an app through one database
//! (feature `postgres`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::tokio_postgres::{self, NoTls, Row};
use deadpool_postgres::{Manager, Pool, Runtime};

use crate::error::StoreError;
use crate::store::{Cas, GrantRecord, LockWait, RefreshLock, TokenStore, Version, Versioned};
use crate::token::TokenKey;

mod error;
mod lock;
mod schema;

use error::{pg, pool_error};
use lock::PostgresLock;
use schema::{key_bytes, migrate, Sql};

const DEFAULT_SCHEMA: &str = "public";
const DEFAULT_PREFIX: &str = "tokenkeeper_";
/// Longer than the manager's default lock ttl (60 s), so a peer outwaits a crashed holder.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(75);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_CONNECTIONS: usize = 8;
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest lease: a century is forever enough.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A [`TokenStore`] in a PostgreSQL database, for apps running several instances (replicas,
/// workers, machines) that already have PostgreSQL and must refresh each grant once between
/// them.
///
/// Built on `tokio-postgres` with a `deadpool-postgres` connection pool (re-exported as
/// [`tokenkeeper::deadpool_postgres`](crate::deadpool_postgres)). Queries are plain SQL
/// checked at run time: building needs no database.
///
/// # Layout
///
/// Four objects in a schema (default `public`, see [`PostgresStoreBuilder::schema`]), named
/// with a prefix (default `tokenkeeper_`, see [`PostgresStoreBuilder::table_prefix`]):
///
/// | object | holds |
/// |---|---|
/// | `{prefix}grants` | one row per grant: `key bytea PRIMARY KEY`, `version bigint`, `record text` (the [`GrantRecord`] as JSON) |
/// | `{prefix}versions` | the sequence versions are drawn from |
/// | `{prefix}leases` | the refresh locks: `key`, a random `owner` token, `expires_at` (`timestamptz`) |
/// | `{prefix}schema_version` | one row: the version of this layout |
///
/// Keys are stored as bytes, so any [`TokenKey`] fits (a NUL byte included) and keys sort by
/// bytes, as [`TokenKey`]'s order does ([`keys_after`](TokenStore::keys_after) is a range
/// query on the primary key).
///
/// [`build`](PostgresStoreBuilder::build) creates what is missing in one transaction under a
/// transaction-scoped advisory lock (`pg_advisory_xact_lock`), so several processes starting
/// at once on an empty database do not trip over each other. Once the schema-version row says
/// the layout is current, it runs no DDL at all: an application role without `CREATE`
/// privileges can use tables a migration role created (it needs `SELECT`, `INSERT`, `UPDATE`
/// and `DELETE` on the tables and `USAGE` on the sequence).
///
/// Versions come from one sequence per namespace, which never goes back, so a version is never
/// reused, even after a delete and a re-insert. A save is one statement: an
/// `INSERT … ON CONFLICT DO NOTHING` when the key must be absent, else
/// `UPDATE … WHERE key = $1 AND version = $2`; of two processes saving against the same
/// version, one updates the row and the other, re-checking the row it waited for, finds
/// another version and writes nothing ([`Cas::Conflict`]).
///
/// A row this store cannot read (a version that is not positive, a record that is not a
/// grant's JSON, a key that is not UTF-8) is
/// [`StoreErrorKind::Corrupt`](crate::StoreErrorKind::Corrupt) and is left for a human: a
/// save expecting absence, or any version but the row's own (which no load hands out, since
/// the load fails), conflicts with it, and a row whose version is not positive matches no
/// save at all. Missing tables are [`StoreErrorKind::NotFound`](crate::StoreErrorKind::NotFound),
/// a refused privilege or login is
/// [`StoreErrorKind::PermissionDenied`](crate::StoreErrorKind::PermissionDenied), and the
/// rest (connections, timeouts) is [`StoreErrorKind::Backend`](crate::StoreErrorKind::Backend).
/// Each statement runs for at most [`PostgresStoreBuilder::statement_timeout`] (5 s by
/// default), so a row another session keeps locked makes a call fail, not hang. Errors quote
/// PostgreSQL's code and message, never its detail (which can quote a row) nor the
/// connection string.
///
/// # The refresh lock
///
/// [`lock`](TokenStore::lock) inserts a lease row with a random owner token and an expiry
/// `ttl` from now, or takes over a lease whose expiry has passed, in one statement. Expiries
/// are measured on the database server's clock (`clock_timestamp()`), the one clock every
/// instance shares, so clocks that differ between machines do not matter. While another live
/// lease holds the key it polls with a bounded backoff for at most
/// [`PostgresStoreBuilder::lock_wait`] (75 s by default, longer than the manager's default
/// 60 s lock ttl, so a peer outwaits a crashed holder), then fails with
/// [`StoreErrorKind::LockTimeout`](crate::StoreErrorKind::LockTimeout). Only its owner
/// releases it (the delete names the owner token); a holder that dies (even by `kill -9`)
/// leaves it to expire after `ttl`
/// ([`TokenManagerBuilder::lock_ttl`](crate::TokenManagerBuilder::lock_ttl)). A lock dropped
/// without [`release`](RefreshLock::release) is released in the background.
///
/// The lease is a row, not a session advisory lock: it holds no connection while it is held,
/// so it survives a connection pool handing each statement to another connection. A refresh
/// that outlives its lease is fenced by version: its compare-and-swap save fails with
/// [`Cas::Conflict`] if a peer saved meanwhile, and its manager adopts the stored record
/// instead of writing over it. Keep `lock_ttl` well above the provider's request timeout.
///
/// # TLS
///
/// [`PostgresStore::builder`] connects without TLS (a connection string asking for
/// `sslmode=require` fails). For TLS, build a [`deadpool_postgres::Pool`] with the
/// `MakeTlsConnect` of your choice (`tokio-postgres-rustls`, `postgres-native-tls`) and pass
/// it to [`PostgresStore::builder_with_pool`].
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use tokenkeeper::{PostgresStore, TokenManager, provider_fn, TokenResponse, AccessToken};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::builder("postgres://app@db.internal/app")
///     .schema("tokens")
///     .lock_wait(Duration::from_secs(90))
///     .build()
///     .await?;
/// # let provider = provider_fn(|_, _| async { Ok(TokenResponse::new(AccessToken::new("a"))) });
/// let manager = TokenManager::builder(provider).store(store).build();
/// # Ok(())
/// # }
/// ```
pub struct PostgresStore {
    pool: Pool,
    target: String,
    sql: Arc<Sql>,
    lock_wait: Duration,
}

/// Configures a [`PostgresStore`]; see [`PostgresStore::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct PostgresStoreBuilder {
    source: Source,
    schema: String,
    prefix: String,
    lock_wait: Duration,
    connect_timeout: Duration,
    statement_timeout: Duration,
    max_connections: usize,
}

/// Where connections come from.
enum Source {
    /// A connection string, which may hold a password: never printed.
    Url(String),
    /// A pool the application built (with its TLS).
    Pool(Pool),
}

impl PostgresStore {
    /// Configures a store on the database at `url`, a libpq connection string
    /// (`postgres://user[:password]@host[:port]/dbname?…` or `host=… user=… dbname=…`),
    /// connected without TLS; see [`builder_with_pool`](Self::builder_with_pool) for TLS.
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(Source::Url(url.into()))
    }

    /// Configures a store on connections from `pool`, which the application built (with the
    /// TLS connector of its choice, its own pool size and timeouts). The store's
    /// [`max_connections`](PostgresStoreBuilder::max_connections),
    /// [`connect_timeout`](PostgresStoreBuilder::connect_timeout) and
    /// [`statement_timeout`](PostgresStoreBuilder::statement_timeout) do not apply to it.
    pub fn builder_with_pool(pool: Pool) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(Source::Pool(pool))
    }

    /// The schema the store's tables are in.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// The prefix of the store's table names.
    pub fn table_prefix(&self) -> &str {
        &self.sql.prefix
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }
}

impl PostgresStoreBuilder {
    fn new(source: Source) -> Self {
        Self {
            source,
            schema: DEFAULT_SCHEMA.to_owned(),
            prefix: DEFAULT_PREFIX.to_owned(),
            lock_wait: DEFAULT_LOCK_WAIT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// The schema of the store's tables (default `public`), created if missing: ASCII
    /// letters, digits and `_`, not starting with a digit. Names are quoted, so case is kept.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The prefix of the store's table names (default `tokenkeeper_`): ASCII letters, digits
    /// and `_`, not starting with a digit, or empty. Give each app (or each provider) sharing
    /// one schema its own.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long [`lock`](TokenStore::lock) waits for another holder before failing with
    /// [`StoreErrorKind::LockTimeout`](crate::StoreErrorKind::LockTimeout) (default 75 s).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// How long opening a connection, or waiting for a free one in the pool, may take before
    /// a call fails with [`StoreErrorKind::Backend`](crate::StoreErrorKind::Backend) (default
    /// 5 s). A `connect_timeout` in the connection string takes precedence for opening.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one statement may run on the server before it is cancelled and the call fails
    /// with [`StoreErrorKind::Backend`](crate::StoreErrorKind::Backend) (PostgreSQL's
    /// `statement_timeout`, default 5 s): a save waiting for a row another session keeps
    /// locked fails instead of hanging. A `statement_timeout` in the connection string's
    /// `options` takes precedence.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The most connections the store's pool opens (default 8, at least 1).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Connects, and creates the schema, the tables and the sequence if missing (see
    /// [`PostgresStore`]'s "Layout").
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::InvalidKey`](crate::StoreErrorKind::InvalidKey) for a schema or table
    /// prefix that is not a plain SQL identifier (or makes a name longer than 63 bytes);
    /// [`StoreErrorKind::PermissionDenied`](crate::StoreErrorKind::PermissionDenied) if the
    /// server refuses the login or the migration;
    /// [`StoreErrorKind::Backend`](crate::StoreErrorKind::Backend) for an invalid connection
    /// string (never quoted: it may hold a password), a server that cannot be reached, or
    /// tables migrated by a newer version of this crate.
    pub async fn build(self) -> Result<PostgresStore, StoreError> {
        schema::check_names(&self.schema, &self.prefix)?;
        let (pool, target) = match self.source {
            Source::Pool(pool) => (pool, "a pool built by the application".to_owned()),
            Source::Url(url) => {
                let mut config = tokio_postgres::Config::from_str(&url).map_err(|_| {
                    StoreError::new(
                        "the PostgreSQL connection string is invalid (not shown: it may hold a \
                         password)",
                    )
                })?;
                if config.get_connect_timeout().is_none() {
                    config.connect_timeout(self.connect_timeout);
                }
                if config.get_application_name().is_none() {
                    config.application_name("tokenkeeper");
                }
                let options = config.get_options().unwrap_or("");
                if !options.contains("statement_timeout") {
                    // In milliseconds; 0 would mean none, so at least 1.
                    let ms = self
                        .statement_timeout
                        .as_millis()
                        .clamp(1, i32::MAX as u128);
                    let options = format!("{options} -c statement_timeout={ms}");
                    config.options(options.trim_start());
                }
                let target = describe(&config);
                let pool = Pool::builder(Manager::new(config, NoTls))
                    .max_size(self.max_connections)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(Some(self.connect_timeout))
                    .create_timeout(Some(self.connect_timeout))
                    .recycle_timeout(Some(self.connect_timeout))
                    .build()
                    .map_err(StoreError::new)?;
                (pool, target)
            }
        };
        let store = PostgresStore {
            pool,
            target,
            sql: Arc::new(Sql::new(&self.schema, &self.prefix)),
            lock_wait: self.lock_wait,
        };
        migrate(&store.pool, &store.sql).await?;
        Ok(store)
    }
}

/// Hosts, ports, database and user of `config`: everything but the password.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "{}/{} as {}",
        hosts.join(","),
        config.get_dbname().unwrap_or(""),
        config.get_user().unwrap_or("")
    )
}

// The connection string may hold a password: it is never printed.
impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("schema", &self.sql.schema)
            .field("table_prefix", &self.sql.prefix)
            .field("lock_wait", &self.lock_wait)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match self.source {
            Source::Url(_) => "[redacted]",
            Source::Pool(_) => "a pool built by the application",
        };
        f.debug_struct("PostgresStoreBuilder")
            .field("url", &source)
            .field("schema", &self.schema)
            .field("table_prefix", &self.prefix)
            .field("lock_wait", &self.lock_wait)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// The key of a `key` column.
fn key_of(row: &Row) -> Result<TokenKey, StoreError> {
    let bytes: Vec<u8> = row.try_get(0).map_err(StoreError::corrupt)?;
    String::from_utf8(bytes)
        .map(TokenKey::from)
        .map_err(|_| StoreError::corrupt("a stored key is not UTF-8"))
}

/// A stored version, which must be a positive integer.
fn version_of(row: &Row, key: &TokenKey) -> Result<Version, StoreError> {
    let corrupt = || StoreError::corrupt(format!("the row of `{key}` has an invalid version"));
    let version: i64 = row.try_get(0).map_err(|_| corrupt())?;
    Version::try_from(version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(corrupt)
}

#[async_trait]
impl TokenStore for PostgresStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        StoreError::check_key(key)?;
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.load).await.map_err(pg)?;
        let row = client
            .query_opt(&statement, &[&key_bytes(key)])
            .await
            .map_err(pg)?;
        let Some(row) = row else { return Ok(None) };
        let version = version_of(&row, key)?;
        let record: String = row
            .try_get(1)
            .map_err(|_| StoreError::corrupt(format!("the row of `{key}` has no JSON record")))?;
        Ok(Some(Versioned {
            version,
            value: GrantRecord::from_json(record.as_bytes())?,
        }))
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        StoreError::check_key(key)?;
        let json = String::from_utf8(record.to_json()?).map_err(StoreError::new)?;
        let client = self.client().await?;
        let row = match expected {
            None => {
                let statement = client.prepare_cached(&self.sql.insert).await.map_err(pg)?;
                client
                    .query_opt(&statement, &[&key_bytes(key), &json])
                    .await
            }
            Some(expected) => {
                // No stored version is above i64::MAX: nothing can match.
                let Ok(expected) = i64::try_from(expected) else {
                    return Ok(Cas::Conflict);
                };
                let statement = client.prepare_cached(&self.sql.update).await.map_err(pg)?;
                client
                    .query_opt(&statement, &[&key_bytes(key), &expected, &json])
                    .await
            }
        }
        .map_err(pg)?;
        match row {
            None => Ok(Cas::Conflict),
            Some(row) => version_of(&row, key).map(Cas::Saved),
        }
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        StoreError::check_key(key)?;
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.delete).await.map_err(pg)?;
        let removed = client
            .execute(&statement, &[&key_bytes(key)])
            .await
            .map_err(pg)?;
        Ok(removed > 0)
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(&self.sql.keys).await.map_err(pg)?;
        let rows = client.query(&statement, &[]).await.map_err(pg)?;
        rows.iter().map(key_of).collect()
    }

    /// A range query on the primary key (`bytea` compares by bytes, as [`TokenKey`]'s order
    /// does).
    async fn keys_after(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<TokenKey>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = match after {
            Some(after) => {
                let statement = client
                    .prepare_cached(&self.sql.keys_after)
                    .await
                    .map_err(pg)?;
                client.query(&statement, &[&key_bytes(after), &limit]).await
            }
            None => {
                let statement = client
                    .prepare_cached(&self.sql.keys_first)
                    .await
                    .map_err(pg)?;
                client.query(&statement, &[&limit]).await
            }
        }
        .map_err(pg)?;
        rows.iter().map(key_of).collect()
    }

    /// A lease row with a random owner token, retried until [`PostgresStoreBuilder::lock_wait`].
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
        let mut wait = LockWait::new(self.lock_wait);
        loop {
            let taken = {
                let client = self.client().await?;
                let statement = client.prepare_cached(&self.sql.acquire).await.map_err(pg)?;
                client
                    .execute(&statement, &[&key_bytes(key), &owner, &ttl_ms])
                    .await
                    .map_err(pg)?
                    > 0
            };
            if taken {
                return Ok(Some(Box::new(PostgresLock::held(
                    self.pool.clone(),
                    Arc::clone(&self.sql),
                    key.clone(),
                    owner,
                ))));
            }
            wait.pause(key, "instance").await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StoreErrorKind;

    #[test]
    fn the_description_of_a_connection_string_has_no_password() {
        let config = tokio_postgres::Config::from_str(
            "postgres://app:hunter2-secret@db.internal:6432/grants",
        )
        .unwrap();
        let described = describe(&config);
        assert_eq!(described, "db.internal:6432/grants as app");
    }

    #[tokio::test]
    async fn an_invalid_connection_string_is_not_quoted() {
        let err = PostgresStore::builder("postgres://app:hunter2@host:notaport/db")
            .build()
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), StoreErrorKind::Backend);
        let shown = format!("{err} {err:?} {}", std::error::Error::source(&err).unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
