//! The simulated store: one versioned map shared by every manager instance, each through
//! its own handle (its "connection"), with injected faults and a lease lock on the clock.

use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::{
    Cas, GrantRecord, RefreshLock, StoreError, TokenKey, TokenStore, Version, Versioned,
};

use crate::world::{lock, InstState, Shared};

/// One instance's connection to the shared store.
pub struct SimStore {
    pub world: Shared,
    pub inst: usize,
}

impl SimStore {
    /// A slow store call: waits before acting (the operation itself stays atomic).
    async fn latency(&self) {
        let delay = {
            let mut w = lock(&self.world);
            let p = w.faults.store_latency;
            w.chance(p)
                .then(|| Duration::from_millis(w.rng.u64(1..=3_000)))
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
    }

    fn down(&self) -> Result<(), StoreError> {
        if lock(&self.world).inst_state(self.inst) == InstState::Crashed {
            return Err(StoreError::new("sim: process crashed"));
        }
        Ok(())
    }
}

#[async_trait]
impl TokenStore for SimStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        self.latency().await;
        self.down()?;
        let mut w = lock(&self.world);
        let after_conflict = w.conflicted.contains(&(self.inst, key.clone()));
        let mut p = w.faults.load_fails;
        if after_conflict && !w.faults.load_fails_after_conflict {
            p = 0.0;
        }
        if w.chance(p) {
            w.log(format!("store m{}: load {key} FAILS", self.inst));
            w.load_failed
                .insert((self.inst, key.clone()), tokio::time::Instant::now());
            return Err(StoreError::new("sim: load failed"));
        }
        w.load_ok
            .insert((self.inst, key.clone()), tokio::time::Instant::now());
        Ok(w.records.get(key).cloned())
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        let dead = !matches!(record.state(), tokenkeeper::GrantState::Active);
        let backoff = !dead && record.retry_not_before().is_some();
        let spare_latency = {
            let w = lock(&self.world);
            (dead && !w.faults.faults_on_dead_saves)
                || (backoff && !w.faults.faults_on_backoff_saves)
        };
        if !spare_latency {
            self.latency().await;
        }
        self.down()?;
        let mut w = lock(&self.world);
        let inst = self.inst;
        w.conflicted.remove(&(inst, key.clone()));
        let rt = crate::world::record_rt(record);
        // Faults switched off for saves a known defect cannot survive (see main.rs).
        let rotation = !dead
            && rt.is_some_and(|(inc, idx)| {
                w.stored_max
                    .get(&(key.clone(), inc))
                    .is_none_or(|max| idx > *max)
            });
        let failed_before = if rotation {
            w.rotation_save_failures
                .get(&(inst, key.clone()))
                .copied()
                .unwrap_or(0)
        } else {
            0
        };
        let spared = (dead && !w.faults.faults_on_dead_saves)
            || (backoff && !w.faults.faults_on_backoff_saves)
            || (failed_before >= 2 && !w.faults.unsaved_rotations);
        let p = if spared {
            0.0
        } else {
            w.faults.save_fails_before_write
        };
        if w.chance(p) {
            if rotation {
                *w.rotation_save_failures
                    .entry((inst, key.clone()))
                    .or_insert(0) += 1;
            }
            w.log(format!("store m{inst}: save {key} FAILS before writing"));
            return Err(StoreError::new("sim: save failed"));
        }
        let p = if spared { 0.0 } else { w.faults.extra_conflict };
        if w.chance(p) && w.records.get(key).map(|r| r.version) == expected {
            w.peer_bump(key);
        }
        let Some(version) = w.store_save(key, record, expected) else {
            if rotation {
                *w.rotation_save_failures
                    .entry((inst, key.clone()))
                    .or_insert(0) += 1;
            }
            w.log(format!("store m{inst}: save {key} conflict"));
            let spare_reload = dead && !w.faults.faults_on_dead_saves;
            if !spare_reload {
                w.conflicted.insert((inst, key.clone()));
            }
            return Ok(Cas::Conflict);
        };
        w.rotation_save_failures.remove(&(inst, key.clone()));
        let shown = rt.map_or("none".to_owned(), |(a, b)| format!("{a}.{b}"));
        let p = if spared {
            0.0
        } else {
            w.faults.save_fails_after_write
        };
        let after = w.chance(p);
        w.log(format!(
            "store m{inst}: saved {key} v{version} rt={shown}{}{}",
            if dead { " DEAD" } else { "" },
            if after { ", then FAILS" } else { "" }
        ));
        if after {
            return Err(StoreError::new("sim: save reply lost"));
        }
        Ok(Cas::Saved(version))
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        self.latency().await;
        self.down()?;
        Ok(lock(&self.world).records.remove(key).is_some())
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        self.latency().await;
        self.down()?;
        let mut w = lock(&self.world);
        let p = w.faults.keys_fails;
        if w.chance(p) {
            w.log(format!("store m{}: keys FAILS", self.inst));
            return Err(StoreError::new("sim: keys failed"));
        }
        Ok(w.records.keys().cloned().collect())
    }

    /// A lease: held until released or until `ttl` has passed on the store's own clock,
    /// whichever is first. After expiry a second holder gets in even if the first still runs.
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        self.latency().await;
        self.down()?;
        {
            let mut w = lock(&self.world);
            let p = w.faults.lock_fails;
            if w.chance(p) {
                w.log(format!("store m{}: lock {key} FAILS", self.inst));
                return Err(StoreError::new("sim: lock failed"));
            }
        }
        loop {
            let changed = {
                let mut w = lock(&self.world);
                if w.inst_state(self.inst) == InstState::Crashed {
                    return Err(StoreError::new("sim: process crashed"));
                }
                match w.try_lease(key, self.inst, ttl) {
                    Ok(id) => {
                        w.log(format!("store m{}: lease {key} #{id}", self.inst));
                        return Ok(Some(Box::new(SimLease {
                            world: self.world.clone(),
                            inst: self.inst,
                            key: key.clone(),
                            id,
                        })));
                    }
                    // Woken when a lease is released or runs out.
                    Err(expires) => (w.clock.changed.clone(), expires),
                }
            };
            let (changed, expires) = changed;
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep_until(expires) => {}
            }
        }
    }
}

pub struct SimLease {
    world: Shared,
    inst: usize,
    key: TokenKey,
    id: u64,
}

/// With session locks (Postgres advisory locks, file locks), a lock dropped without release —
/// a refresh task that panicked — is released at once; a lease waits for its ttl.
impl Drop for SimLease {
    fn drop(&mut self) {
        let mut w = lock(&self.world);
        if w.session_locks && w.inst_state(self.inst) != InstState::Crashed {
            w.release_lease(&self.key, self.id);
        }
    }
}

#[async_trait]
impl RefreshLock for SimLease {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        let mut w = lock(&self.world);
        if w.inst_state(self.inst) == InstState::Crashed {
            return Err(StoreError::new("sim: process crashed"));
        }
        w.release_lease(&self.key, self.id);
        Ok(())
    }
}
