//! The store's layout: the names of its tables, the SQL of its statements, and the embedded
//! migration that creates them.

use deadpool_postgres::tokio_postgres;
use deadpool_postgres::Pool;

use super::error::{pg, pool_error};
use crate::error::{StoreError, StoreErrorKind};
use crate::token::TokenKey;

/// PostgreSQL's longest identifier, in bytes (longer ones are cut silently).
pub(super) const MAX_IDENTIFIER: usize = 63;
/// The longest table name the store makes: `{prefix}schema_version`.
pub(super) const LONGEST_TABLE: &str = "schema_version";

/// The schema this version of the crate writes; [`MIGRATIONS`]`[n]` moves version `n` to
/// `n + 1`.
const SCHEMA_VERSION: i32 = 1;

/// The migrations, in order, with `{g}`, `{l}` and `{v}` standing for the grants table, the
/// leases table and the version sequence (qualified and quoted).
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = ["\
    CREATE TABLE IF NOT EXISTS {g} (\
      key bytea PRIMARY KEY, version bigint NOT NULL, record text NOT NULL);\
    CREATE SEQUENCE IF NOT EXISTS {v} AS bigint NO CYCLE;\
    CREATE TABLE IF NOT EXISTS {l} (\
      key bytea PRIMARY KEY, owner text NOT NULL, expires_at timestamptz NOT NULL);"];

/// The names and the SQL of every statement, with the names filled in.
pub(super) struct Sql {
    pub(super) schema: String,
    pub(super) prefix: String,
    pub(super) load: String,
    pub(super) insert: String,
    pub(super) update: String,
    pub(super) delete: String,
    pub(super) keys: String,
    pub(super) keys_after: String,
    pub(super) keys_first: String,
    pub(super) acquire: String,
    pub(super) release: String,
}

impl Sql {
    pub(super) fn new(schema: &str, prefix: &str) -> Self {
        let grants = table(schema, prefix, "grants");
        let leases = table(schema, prefix, "leases");
        let versions = table(schema, prefix, "versions");
        Self {
            schema: schema.to_owned(),
            prefix: prefix.to_owned(),
            load: format!("SELECT version, record FROM {grants} WHERE key = $1"),
            insert: format!(
                "INSERT INTO {grants} (key, version, record) \
                 VALUES ($1, nextval('{versions}'), $2) \
                 ON CONFLICT (key) DO NOTHING RETURNING version"
            ),
            update: format!(
                "UPDATE {grants} SET version = nextval('{versions}'), record = $3 \
                 WHERE key = $1 AND version = $2 AND version > 0 RETURNING version"
            ),
            delete: format!("DELETE FROM {grants} WHERE key = $1"),
            keys: format!("SELECT key FROM {grants} ORDER BY key"),
            keys_after: format!("SELECT key FROM {grants} WHERE key > $1 ORDER BY key LIMIT $2"),
            keys_first: format!("SELECT key FROM {grants} ORDER BY key LIMIT $1"),
            acquire: format!(
                "INSERT INTO {leases} AS l (key, owner, expires_at) \
                 VALUES ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, \
                 expires_at = excluded.expires_at WHERE l.expires_at <= clock_timestamp()"
            ),
            release: format!("DELETE FROM {leases} WHERE key = $1 AND owner = $2"),
        }
    }

    /// The qualified, quoted name of one of the store's objects.
    fn table(&self, name: &str) -> String {
        table(&self.schema, &self.prefix, name)
    }

    /// Migration `step` with the names filled in.
    fn migration(&self, step: usize) -> String {
        MIGRATIONS[step]
            .replace("{g}", &self.table("grants"))
            .replace("{l}", &self.table("leases"))
            .replace("{v}", &self.table("versions"))
    }

    /// The advisory-lock id the migrations of this namespace take.
    fn migration_lock(&self) -> i64 {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!(
            "tokenkeeper migration {}.{}",
            self.schema, self.prefix
        ));
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(id)
    }
}

/// `"schema"."{prefix}{name}"`; both parts are checked identifiers (no quote inside).
fn table(schema: &str, prefix: &str, name: &str) -> String {
    format!("\"{schema}\".\"{prefix}{name}\"")
}

/// Brings the namespace's layout to [`SCHEMA_VERSION`]: nothing when the schema-version row
/// says it is there; else every missing step in one transaction, under an advisory lock.
pub(super) async fn migrate(pool: &Pool, sql: &Sql) -> Result<(), StoreError> {
    let version_table = sql.table("schema_version");
    let mut client = pool.get().await.map_err(pool_error)?;
    if stored_schema_version(&**client, &version_table).await? == Some(SCHEMA_VERSION) {
        return Ok(());
    }
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&sql.migration_lock()])
        .await
        .map_err(pg)?;
    // Another process may have migrated while this one waited for the lock.
    let schema_exists = tx
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&sql.schema],
        )
        .await
        .map_err(pg)?
        .is_some();
    if !schema_exists {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", sql.schema))
            .await
            .map_err(pg)?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {version_table} (\
           id boolean PRIMARY KEY DEFAULT true CHECK (id), version integer NOT NULL)"
    ))
    .await
    .map_err(pg)?;
    let from = stored_schema_version(&*tx, &version_table)
        .await?
        .unwrap_or(0);
    let from = usize::try_from(from).map_err(|_| {
        StoreError::corrupt(format!("{version_table} holds a negative schema version"))
    })?;
    for step in from..MIGRATIONS.len() {
        tx.batch_execute(&sql.migration(step)).await.map_err(pg)?;
    }
    tx.execute(
        &format!(
            "INSERT INTO {version_table} (id, version) VALUES (true, $1) \
             ON CONFLICT (id) DO UPDATE SET version = excluded.version"
        ),
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(pg)?;
    tx.commit().await.map_err(pg)
}

/// The schema version the namespace's layout is at, if it has one; an error for a layout
/// newer than this crate knows.
async fn stored_schema_version(
    client: &impl tokio_postgres::GenericClient,
    version_table: &str,
) -> Result<Option<i32>, StoreError> {
    let exists = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&version_table])
        .await
        .map_err(pg)?;
    if !exists.try_get::<_, bool>(0).map_err(StoreError::corrupt)? {
        return Ok(None);
    }
    let row = client
        .query_opt(&format!("SELECT version FROM {version_table}"), &[])
        .await
        .map_err(pg)?;
    let Some(row) = row else { return Ok(None) };
    let version: i32 = row.try_get(0).map_err(StoreError::corrupt)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::new(format!(
            "{version_table} is at schema version {version}, newer than this tokenkeeper's \
             ({SCHEMA_VERSION}): upgrade tokenkeeper"
        )));
    }
    Ok(Some(version))
}

/// Checks a schema and a table prefix: plain SQL identifiers, short enough for every name the
/// store makes from them.
pub(super) fn check_names(schema: &str, prefix: &str) -> Result<(), StoreError> {
    check_identifier("schema", schema, false)?;
    check_identifier("table prefix", prefix, true)?;
    if prefix.len() + LONGEST_TABLE.len() > MAX_IDENTIFIER {
        return Err(StoreError::with_kind(
            StoreErrorKind::InvalidKey,
            format!(
                "a table prefix must be at most {} bytes long",
                MAX_IDENTIFIER - LONGEST_TABLE.len()
            ),
        ));
    }
    Ok(())
}

/// ASCII letters, digits and `_`, not starting with a digit (empty only if `may_be_empty`).
fn check_identifier(what: &str, name: &str, may_be_empty: bool) -> Result<(), StoreError> {
    let valid = (may_be_empty || !name.is_empty())
        && name.len() <= MAX_IDENTIFIER
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(StoreError::with_kind(
            StoreErrorKind::InvalidKey,
            format!(
                "a {what} must be ASCII letters, digits and `_`, not starting with a digit, at \
                 most {MAX_IDENTIFIER} bytes{}",
                if may_be_empty { "" } else { ", not empty" }
            ),
        ))
    }
}

/// A key as the store holds it: its bytes (`bytea` holds a NUL, and sorts as [`TokenKey`]
/// does).
pub(super) fn key_bytes(key: &TokenKey) -> &[u8] {
    key.as_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain_sql_names() {
        for good in ["public", "Tokens_2", "_x"] {
            assert!(check_identifier("schema", good, false).is_ok(), "{good}");
        }
        for bad in ["", "1x", "a b", "x\"y", "x;", "naïve", &"s".repeat(64)] {
            let err = check_identifier("schema", bad, false).err().unwrap();
            assert_eq!(err.kind(), StoreErrorKind::InvalidKey, "{bad:?}");
        }
        assert!(check_identifier("table prefix", "", true).is_ok());
    }

    #[test]
    fn names_are_qualified_and_quoted() {
        let sql = Sql::new("Tokens", "app_");
        assert_eq!(sql.table("grants"), "\"Tokens\".\"app_grants\"");
        assert!(sql.migration(0).contains("\"Tokens\".\"app_leases\""));
        assert!(!sql.migration(0).contains('{'));
        assert_ne!(
            sql.migration_lock(),
            Sql::new("Tokens", "b_").migration_lock()
        );
    }

    #[test]
    fn a_prefix_too_long_for_the_longest_name_is_refused() {
        let longest = "p".repeat(MAX_IDENTIFIER - LONGEST_TABLE.len());
        assert!(check_names("s", &longest).is_ok());
        let err = check_names("s", &format!("{longest}p")).err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::InvalidKey);
    }
}
