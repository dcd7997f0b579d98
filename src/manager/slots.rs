//! The manager's map from keys to per-grant state ([`Slot`]s): lock-free reads, and a slot taken
//! out of the map is never handed out again.
//!
//! The fast path borrows a slot under the map's guard ([`Slots::with`]): no lock, no reference
//! count, no allocation ([`papaya`]'s reads are a thread-local marker and the probe). Everything
//! that keeps a slot beyond the call clones its `Arc` through [`Slots::slot`] (or
//! [`Slots::pending`]), and that is where removal needs care.
//!
//! # Removal
//!
//! A lookup of a key the store does not have creates a slot (the caller needs one to load
//! into) and must take it out again, or lookups of missing keys would grow the map. It may only
//! do so while nobody else holds the slot: a [`GrantHandle`](crate::GrantHandle) keeps its slot
//! for its fast path, and two callers of one grant must share one slot (its single flight). So
//! [`Slots::remove_unused`] checks the slot's reference count (the map's and its caller's
//! only) before taking it out.
//!
//! Behind a lock per shard (`DashMap`), that check and every clone out of the map were
//! serialized by the shard's lock. A lock-free map lends its values without any lock: a caller
//! could look the slot up, the check pass, the slot leave the map, and only then the caller
//! clone it, holding a slot no longer in the map. That caller would then load, cache and
//! refresh in a slot nobody else sees: a second flight for the grant next to the one in the new
//! slot, its `used` mark lost for the refresher, a [`GrantHandle`](crate::GrantHandle) taken
//! meanwhile without a fast path for good.
//!
//! So clones out of the map and removals are ordered by a small lock chosen by the slot's
//! address ([`STRIPES`] of them, shared by all slots: no memory per grant, and only the slow
//! path takes one, for a few instructions):
//!
//! - [`Slots::hold`] (every clone out of the map) takes the slot's lock, refuses a slot marked
//!   `detached`, and clones it under the lock;
//! - a removal takes the same lock, takes the slot out of the map, and marks it `detached`
//!   before releasing it.
//!
//! A clone either comes before the removal's check (which then sees the count it added, and
//! keeps the slot) or after the removal (and sees `detached`, and looks the key up again: the
//! map no longer has that slot, since it was taken out before the lock was released). Clones
//! made from a slot already held (a handle's clone, a refresh task's) cannot race with the
//! check: their holder already counts, so the count is above the threshold while they exist.
//!
//! [`Slots::remove`] (the grant was deleted) takes the slot out whatever holds it, as before:
//! a holder at that moment was serving a call that overlapped the removal. It marks it
//! `detached` under the lock too, so no clone is made from the map's old entry after it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Slot;
use crate::token::TokenKey;

/// How many locks order clones out of the map against removals (see the module docs).
const STRIPES: usize = 16;

/// The slots of a manager's grants, by key.
pub(super) struct Slots {
    map: papaya::HashMap<TokenKey, Arc<Slot>, foldhash::fast::RandomState>,
    /// Orders each slot's clones out of the map against its removal (see the module docs).
    stripes: [Mutex<()>; STRIPES],
}

impl Slots {
    pub(super) fn new() -> Self {
        Slots {
            // Blocking resizes: a resize completes within the write that starts it. With
            // papaya's default (incremental: later writes copy the entries over), reads stay on
            // the old table and the new one until enough writes come, and grants are inserted
            // rarely: reads of a map left mid-resize measured 300 to 500 ns instead of ~20.
            map: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            stripes: Default::default(),
        }
    }

    /// Lends the slot of `key` to `f`: no lock, no clone, no allocation (the fast path).
    ///
    /// `f` runs under the map's guard, which holds back the freeing of removed entries: keep
    /// it short, and never call application code from it.
    #[inline]
    pub(super) fn with<R>(&self, key: &TokenKey, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        self.map.pin().get(key).map(|slot| f(slot))
    }

    /// The slot of `key`, created if there is none; never one taken out of the map.
    pub(super) fn slot(&self, key: &TokenKey) -> Arc<Slot> {
        let map = self.map.pin();
        loop {
            let found = match map.get(key) {
                Some(slot) => slot,
                None => map.get_or_insert_with(key.clone(), Arc::default),
            };
            if let Some(slot) = self.hold(found) {
                return slot;
            }
            // Taken out between the lookup and the lock; the map no longer has it.
        }
    }

    /// A clone of `slot`, found in the map, unless it was taken out since (see the module
    /// docs: the clone and the check are under the lock a removal takes).
    fn hold(&self, slot: &Arc<Slot>) -> Option<Arc<Slot>> {
        let _order = self.lock(slot);
        (!slot.detached.load(Ordering::Relaxed)).then(|| slot.clone())
    }

    /// Takes `slot` out of the map if it is still `key`'s, caches nothing, and nobody holds it
    /// but the map and the caller (a lookup of a key the store does not have).
    pub(super) fn remove_unused(&self, key: &TokenKey, slot: &Arc<Slot>) {
        let _order = self.lock(slot);
        // Under the lock, no clone out of the map can add to the count after this check.
        if slot.cached.load().is_none() && Arc::strong_count(slot) <= 2 {
            let map = self.map.pin();
            if let Ok(Some(_)) = map.remove_if(key, |_, s| Arc::ptr_eq(s, slot)) {
                slot.detached.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Takes `key`'s slot out of the map, whoever holds it (the grant was deleted), and marks
    /// it `detached`: a [`GrantHandle`](crate::GrantHandle) holding it then reads through the
    /// manager.
    pub(super) fn remove(&self, key: &TokenKey) -> Option<Arc<Slot>> {
        let map = self.map.pin();
        // A clone of an entry already out of the map: `hold`'s check does not apply.
        let slot = map.remove(key)?.clone();
        {
            let _order = self.lock(&slot);
            slot.detached.store(true, Ordering::Relaxed);
        }
        Some(slot)
    }

    /// The slots holding a record still to save, with their keys (for `drain`).
    pub(super) fn pending(&self) -> Vec<(TokenKey, Arc<Slot>)> {
        let map = self.map.pin();
        map.iter()
            .filter(|(_, slot)| {
                slot.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some()
            })
            .filter_map(|(key, slot)| Some((key.clone(), self.hold(slot)?)))
            .collect()
    }

    /// How many slots the map holds.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The lock that orders `slot`'s clones out of the map against its removal.
    fn lock(&self, slot: &Arc<Slot>) -> MutexGuard<'_, ()> {
        // Slots are allocated at least `size_of::<Slot>()` bytes apart.
        let index = Arc::as_ptr(slot).addr() / std::mem::size_of::<Slot>() % STRIPES;
        self.stripes[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the map holds `slot` under `key`.
    fn maps(slots: &Slots, key: &TokenKey, slot: &Arc<Slot>) -> bool {
        slots
            .with(key, |found| std::ptr::eq(found, &**slot))
            .unwrap_or(false)
    }

    /// A caller finds a slot in the map; before it clones it, a lookup of the missing key takes
    /// the slot out. The caller must not be handed that slot (nobody would share its flight):
    /// it gets the one now in the map.
    #[test]
    fn a_slot_found_before_its_removal_is_not_handed_out_after_it() {
        let slots = Slots::new();
        let key = TokenKey::from("ghost");
        let loader = slots.slot(&key);
        let map = slots.map.pin();
        let found = map.get(&key).expect("just inserted");
        slots.remove_unused(&key, &loader);
        assert!(loader.detached.load(Ordering::Relaxed));
        assert!(slots.with(&key, |_| ()).is_none());

        assert!(slots.hold(found).is_none(), "a removed slot was handed out");
        let second = slots.slot(&key);
        assert!(!Arc::ptr_eq(&second, &loader));
        assert!(maps(&slots, &key, &second));
        assert!(!second.detached.load(Ordering::Relaxed));
    }

    /// A slot someone else holds (a handle, another caller) stays in the map; one that caches
    /// tokens too; `remove` takes it out whatever holds it, and marks it.
    #[test]
    fn only_an_unused_slot_is_taken_out_by_a_lookup() {
        let slots = Slots::new();
        let key = TokenKey::from("tenant");
        let loader = slots.slot(&key);
        let handle = slots.slot(&key);
        assert!(Arc::ptr_eq(&loader, &handle));
        slots.remove_unused(&key, &loader);
        assert!(maps(&slots, &key, &handle));
        assert!(!handle.detached.load(Ordering::Relaxed));
        assert_eq!(slots.len(), 1);

        let removed = slots.remove(&key).expect("in the map");
        assert!(Arc::ptr_eq(&removed, &handle));
        assert!(handle.detached.load(Ordering::Relaxed));
        assert_eq!(slots.len(), 0);
        // A lookup after the removal starts afresh; the old slot's removal does nothing to it.
        let fresh = slots.slot(&key);
        slots.remove_unused(&key, &loader);
        assert!(maps(&slots, &key, &fresh));
    }

    /// The race a lock-free map opens (see the module docs): a clone out of the map made between
    /// a removal's check of the count and the removal. One thread keeps looking up a missing
    /// key (creating and removing its slot); the other keeps taking the slot and checks that,
    /// while it holds it, the slot is in the map and not detached. With the clone and the
    /// removal not ordered by the stripe lock, this fails within a few thousand rounds.
    #[test]
    fn a_held_slot_is_never_taken_out_by_a_concurrent_lookup() {
        const ROUNDS: usize = 200_000;
        let slots = Slots::new();
        let key = TokenKey::from("contended");
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    let mine = slots.slot(&key);
                    slots.remove_unused(&key, &mine);
                }
            });
            s.spawn(|| {
                for round in 0..ROUNDS {
                    let held = slots.slot(&key);
                    assert!(
                        !held.detached.load(Ordering::Relaxed) && maps(&slots, &key, &held),
                        "round {round}: a slot held was taken out of the map"
                    );
                }
            });
        });
    }
}
