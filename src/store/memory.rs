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
    locks: LockMap,
}

/// The per-key refresh locks. An entry exists only while someone holds or waits for its lock:
/// the map never grows with the number of keys ever locked.
type LockMap = Arc<Mutex<HashMap<TokenKey, Arc<tokio::sync::Mutex<()>>, Hasher>>>;

/// The tables' hasher: a refresh looks its key up five times (lock, load, save, unlock), and
/// SipHash cost about a thousand instructions of it. Seeded per process, as the manager's map.
type Hasher = foldhash::fast::RandomState;

/// A claim on one key's lock, taken (under the map's mutex) before waiting for it and kept
/// until it is released. The last claim to go removes the entry.
///
/// Why this cannot let two holders in: every holder and waiter owns a claim, so each holds a
/// clone of the entry's `Arc`. A claim removes the entry only if, under the map's mutex, the
/// `Arc` has no other clone than the map's and its own; a newcomer clones it under that same
/// mutex, so it either comes first (and the entry stays) or after the removal (and makes a
/// fresh lock that no one else holds or waits for).
struct Claim {
    map: LockMap,
    key: TokenKey,
    mutex: Arc<tokio::sync::Mutex<()>>,
}

impl Claim {
    fn new(map: &LockMap, key: &TokenKey) -> Self {
        let mutex = map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        Self {
            map: Arc::clone(map),
            key: key.clone(),
            mutex,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let last = Arc::strong_count(&self.mutex) == 2
            && map
                .get(&self.key)
                .is_some_and(|m| Arc::ptr_eq(m, &self.mutex));
        if last {
            map.remove(&self.key);
        }
    }
}

/// A held lock. The fields drop in order: the guard (unlocking) before the claim.
struct MemoryLock {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    _claim: Claim,
}

#[async_trait]
impl RefreshLock for MemoryLock {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_version: Version,
    /// Boxed: the table's spare capacity (a quarter to a half of it) then costs a pointer per
    /// slot, not a whole record.
    records: HashMap<TokenKey, Box<Versioned<GrantRecord>>, Hasher>,
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
        Ok(self.state().records.get(key).map(|r| Versioned::clone(r)))
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
            Box::new(Versioned {
                version,
                value: record.clone(),
            }),
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

    async fn keys_after(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<TokenKey>, StoreError> {
        // Filters before cloning: a page of a large store does not copy every key.
        let state = self.state();
        let keys = state
            .records
            .keys()
            .filter(|k| after.is_none_or(|after| *k > after))
            .cloned();
        Ok(super::page_of(keys, None, limit))
    }

    /// A per-key lock shared by every manager on this store. The `ttl` does not apply: a
    /// holder cannot crash without taking the store with it. A key's lock takes memory only
    /// while someone holds or waits for it.
    async fn lock(
        &self,
        key: &TokenKey,
        _ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        StoreError::check_key(key)?;
        // Dropped (say, cancelled) while waiting, the claim still removes an unused entry.
        let claim = Claim::new(&self.locks, key);
        let guard = Arc::clone(&claim.mutex).lock_owned().await;
        Ok(Some(Box::new(MemoryLock {
            _guard: guard,
            _claim: claim,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_entries(store: &MemoryStore) -> usize {
        store.locks.lock().unwrap().len()
    }

    #[tokio::test(start_paused = true)]
    async fn the_lock_map_stays_bounded() {
        let store = Arc::new(MemoryStore::new());
        let ttl = Duration::from_secs(60);
        let record = GrantRecord::new(crate::TokenSet::new(crate::AccessToken::new("a")));
        for i in 0..1000 {
            let key = TokenKey::from(format!("k{i}"));
            store.save(&key, &record, None).await.unwrap();
            let lock = store.lock(&key, ttl).await.unwrap().unwrap();
            if i % 2 == 0 {
                lock.release().await.unwrap();
            } else {
                drop(lock);
            }
            store.delete(&key).await.unwrap();
        }
        assert_eq!(lock_entries(&store), 0);

        // A holder and waiters: the entry lives while anyone holds or waits, then goes.
        let key = TokenKey::from("k");
        let held = store.lock(&key, ttl).await.unwrap().unwrap();
        let waiter = {
            let (store, key) = (Arc::clone(&store), key.clone());
            tokio::spawn(async move { store.lock(&key, ttl).await.unwrap().unwrap() })
        };
        let cancelled = {
            let (store, key) = (Arc::clone(&store), key.clone());
            tokio::spawn(async move { store.lock(&key, ttl).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        assert_eq!(lock_entries(&store), 1);
        held.release().await.unwrap();
        let held = waiter.await.unwrap();
        assert_eq!(lock_entries(&store), 1, "still held by the waiter");
        // Still exclusive after the others left.
        let blocked = tokio::time::timeout(Duration::from_secs(1), store.lock(&key, ttl)).await;
        assert!(blocked.is_err(), "granted while held");
        drop(held);
        assert_eq!(lock_entries(&store), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_store_contract() {
        crate::testing::assert_store_has_lock(&MemoryStore::new()).await;
    }
}
