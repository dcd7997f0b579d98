//! The in-memory store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::store::{Cas, GrantRecord, RefreshLock, TokenStore, Version, Versioned};
use crate::token::TokenKey;

/// A [`TokenStore`] in this process's memory. Grants are lost when the process ends.
///
/// Share one `Arc<MemoryStore>` between managers (say, one per worker) and they refresh each
/// grant once between them: the store's refresh lock is a per-key async mutex.
///
/// Like every built-in store, it refuses keys longer than [`TokenKey::MAX_LEN`] bytes with
/// [`StoreErrorKind::InvalidKey`](crate::StoreErrorKind::InvalidKey), so that a grant kept
/// here can move to any other store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    locks: Mutex<HashMap<TokenKey, Arc<tokio::sync::Mutex<()>>>>,
}

struct MemoryLock(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

#[async_trait]
impl RefreshLock for MemoryLock {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_version: Version,
    records: HashMap<TokenKey, Versioned<GrantRecord>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave a record half-written (each update is
        // a single insert), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        StoreError::check_key(key)?;
        Ok(self.state().records.get(key).cloned())
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        StoreError::check_key(key)?;
        let mut inner = self.state();
        if inner.records.get(key).map(|r| r.version) != expected {
            return Ok(Cas::Conflict);
        }
        inner.next_version += 1;
        let version = inner.next_version;
        inner.records.insert(
            key.clone(),
            Versioned {
                version,
                value: record.clone(),
            },
        );
        Ok(Cas::Saved(version))
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        StoreError::check_key(key)?;
        Ok(self.state().records.remove(key).is_some())
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        Ok(self.state().records.keys().cloned().collect())
    }

    /// A per-key lock shared by every manager on this store. The `ttl` does not apply: a
    /// holder cannot crash without taking the store with it.
    async fn lock(
        &self,
        key: &TokenKey,
        _ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        StoreError::check_key(key)?;
        let mutex = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        Ok(Some(Box::new(MemoryLock(mutex.lock_owned().await))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_store_contract() {
        crate::testing::assert_store_has_lock(&MemoryStore::new()).await;
    }
}
