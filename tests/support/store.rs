//! A scripted store for the engine's tests: loads and saves that fail, conflict or stall on
//! demand, versions that can be rolled back, and a refresh lock that is a lease on tokio's
//! clock (or no lock at all).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    Cas, GrantRecord, RefreshLock, StoreError, TokenKey, TokenStore, Version, Versioned,
};

/// A store with scripted faults and versions it can be made to forget (a restore from backup).
/// Its refresh lock is a lease on tokio's clock, unless made [`without_lock`](Self::without_lock).
#[derive(Default)]
pub struct FaultyStore {
    /// No refresh lock: only the manager's own single-flight applies.
    no_lock: bool,
    /// Loads so far, failed ones included.
    pub loads: AtomicUsize,
    records: Mutex<HashMap<TokenKey, Versioned<GrantRecord>>>,
    next_version: Mutex<Version>,
    /// Loads fail ("connection refused") while set.
    pub fail_loads: AtomicBool,
    /// Saves fail ("disk full") while set.
    pub fail_saves: AtomicBool,
    /// The next saves answer `Conflict` without writing.
    pub conflicts: AtomicUsize,
    /// The next saves fail with an error, without writing.
    pub save_failures: AtomicUsize,
    /// A peer's write that lands just before the next save that fails (by `save_failures`).
    pub peer_write_before_failure: Mutex<Option<(TokenKey, GrantRecord)>>,
    leases: Arc<Mutex<HashMap<TokenKey, (u64, tokio::time::Instant)>>>,
    lease_ids: AtomicUsize,
    /// The next load moves this clock by this much (a store that stalls).
    pub stall_next_load: Mutex<Option<(Arc<ManualClock>, Duration)>>,
    /// The next load sets this clock to this time (a clock jump while the store answers).
    pub clock_at_next_load: Mutex<Option<(Arc<ManualClock>, std::time::SystemTime)>>,
}

impl FaultyStore {
    /// A store without a refresh lock.
    pub fn without_lock() -> Self {
        Self {
            no_lock: true,
            ..Self::default()
        }
    }

    pub fn snapshot(&self) -> HashMap<TokenKey, Versioned<GrantRecord>> {
        self.records.lock().unwrap().clone()
    }

    /// Puts back an old snapshot, versions and all.
    pub fn restore(&self, snapshot: HashMap<TokenKey, Versioned<GrantRecord>>) {
        *self.records.lock().unwrap() = snapshot;
        let max = self
            .records
            .lock()
            .unwrap()
            .values()
            .map(|v| v.version)
            .max()
            .unwrap_or(0);
        *self.next_version.lock().unwrap() = max;
    }

    pub fn stored(&self, key: &TokenKey) -> GrantRecord {
        self.records.lock().unwrap()[key].value.clone()
    }

    pub fn stored_refresh_token(&self, key: &TokenKey) -> String {
        self.stored(key)
            .tokens()
            .refresh_token()
            .unwrap()
            .secret()
            .to_owned()
    }
}

#[async_trait]
impl TokenStore for FaultyStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.fail_loads.load(Ordering::SeqCst) {
            return Err(StoreError::new("connection refused"));
        }
        if let Some((clock, by)) = self.stall_next_load.lock().unwrap().take() {
            clock.advance(by);
        }
        if let Some((clock, at)) = self.clock_at_next_load.lock().unwrap().take() {
            clock.set(at);
        }
        Ok(self.records.lock().unwrap().get(key).cloned())
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        let scripted_failure = self
            .save_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if scripted_failure {
            if let Some((key, record)) = self.peer_write_before_failure.lock().unwrap().take() {
                let mut next = self.next_version.lock().unwrap();
                *next += 1;
                let version = *next;
                let value = record;
                self.records
                    .lock()
                    .unwrap()
                    .insert(key, Versioned { version, value });
            }
        }
        if scripted_failure || self.fail_saves.load(Ordering::SeqCst) {
            return Err(StoreError::new("disk full"));
        }
        if self
            .conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Ok(Cas::Conflict);
        }
        let mut records = self.records.lock().unwrap();
        if records.get(key).map(|r| r.version) != expected {
            return Ok(Cas::Conflict);
        }
        let mut next = self.next_version.lock().unwrap();
        *next += 1;
        records.insert(
            key.clone(),
            Versioned {
                version: *next,
                value: record.clone(),
            },
        );
        Ok(Cas::Saved(*next))
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        Ok(self.records.lock().unwrap().remove(key).is_some())
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        Ok(self.records.lock().unwrap().keys().cloned().collect())
    }

    /// A lease: granted when free or when the holder's ttl ran out (the holder is not told).
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        if self.no_lock {
            return Ok(None);
        }
        loop {
            {
                let now = tokio::time::Instant::now();
                let mut leases = self.leases.lock().unwrap();
                let free = leases.get(key).is_none_or(|(_, until)| *until <= now);
                if free {
                    let id = self.lease_ids.fetch_add(1, Ordering::SeqCst) as u64;
                    leases.insert(key.clone(), (id, now + ttl));
                    return Ok(Some(Box::new(LeaseGuard {
                        leases: self.leases.clone(),
                        key: key.clone(),
                        id,
                    })));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Releases the lease if it still holds it (a lease that ran out may belong to another).
pub struct LeaseGuard {
    leases: Arc<Mutex<HashMap<TokenKey, (u64, tokio::time::Instant)>>>,
    key: TokenKey,
    id: u64,
}

#[async_trait]
impl RefreshLock for LeaseGuard {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        let mut leases = self.leases.lock().unwrap();
        if leases
            .get(&self.key)
            .is_some_and(|(held, _)| *held == self.id)
        {
            leases.remove(&self.key);
        }
        Ok(())
    }
}
