//! The refresh lock: a lease row, released by its owner or expired on the server's clock.

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use super::error::{pg, pool_error};
use super::schema::{key_bytes, Sql};
use crate::error::StoreError;
use crate::store::RefreshLock;
use crate::token::TokenKey;

/// A held refresh lock (a lease row). Dropped without [`release`](RefreshLock::release), it
/// is released in the background when a runtime is at hand, and otherwise expires.
pub(super) struct PostgresLock {
    pool: Pool,
    sql: Arc<Sql>,
    key: TokenKey,
    owner: String,
    released: bool,
}

impl PostgresLock {
    /// The lock `owner` holds on `key` (its lease row is in place).
    pub(super) fn held(pool: Pool, sql: Arc<Sql>, key: TokenKey, owner: String) -> Self {
        Self {
            pool,
            sql,
            key,
            owner,
            released: false,
        }
    }

    /// Deletes the lease if this owner still holds it.
    async fn release_now(
        pool: Pool,
        sql: &Sql,
        key: &TokenKey,
        owner: &str,
    ) -> Result<(), StoreError> {
        let client = pool.get().await.map_err(pool_error)?;
        let statement = client.prepare_cached(&sql.release).await.map_err(pg)?;
        let deleted = client
            .execute(&statement, &[&key_bytes(key), &owner])
            .await
            .map_err(pg)?;
        if deleted == 0 {
            tracing::warn!(
                key = %key,
                "the refresh lock expired before it was released: the refresh outlived the \
                 lock ttl (its save was fenced by version)"
            );
        }
        Ok(())
    }
}

#[async_trait]
impl RefreshLock for PostgresLock {
    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        self.released = true;
        Self::release_now(self.pool.clone(), &self.sql, &self.key, &self.owner).await
    }
}

impl Drop for PostgresLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (pool, sql) = (self.pool.clone(), Arc::clone(&self.sql));
            let key = self.key.clone();
            let owner = std::mem::take(&mut self.owner);
            runtime.spawn(async move {
                let _ = Self::release_now(pool, &sql, &key, &owner).await;
            });
        }
    }
}
