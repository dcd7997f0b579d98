//! A scripted store: a `MemoryStore` whose loads are counted and whose loads or saves fail on
//! demand. It has no refresh lock, so only the manager's own single-flight applies.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::{
    Cas, GrantRecord, MemoryStore, RefreshLock, StoreError, TokenKey, TokenStore, Version,
    Versioned,
};

#[derive(Default)]
pub struct ScriptedStore {
    inner: MemoryStore,
    /// Loads fail ("connection refused") while set.
    pub fail_loads: AtomicBool,
    /// Saves fail ("disk full") while set.
    pub fail_saves: AtomicBool,
    /// Loads so far, failed ones included.
    pub loads: AtomicUsize,
}

#[async_trait]
impl TokenStore for ScriptedStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.fail_loads.load(Ordering::SeqCst) {
            return Err(StoreError::new("connection refused"));
        }
        self.inner.load(key).await
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        if self.fail_saves.load(Ordering::SeqCst) {
            return Err(StoreError::new("disk full"));
        }
        self.inner.save(key, record, expected).await
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        self.inner.keys().await
    }

    /// No refresh lock, on purpose (see the module docs).
    async fn lock(
        &self,
        _key: &TokenKey,
        _ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        Ok(None)
    }
}
