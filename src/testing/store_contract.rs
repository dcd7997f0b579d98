//! A conformance check for [`TokenStore`] implementations.

use std::sync::Arc;
use std::time::Duration;

use crate::error::StoreErrorKind;
use crate::store::{Cas, GrantRecord, TokenStore};
use crate::token::{AccessToken, RefreshToken, TokenKey, TokenSet};

/// Checks that `store` keeps the [`TokenStore`] contract the manager relies on, panicking with
/// a message naming the broken rule. For the tests of a custom store:
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use tokenkeeper::{testing::assert_store_contract, MemoryStore};
/// assert_store_contract(&MemoryStore::new()).await;
/// # });
/// ```
///
/// It checks that an absent key loads as `Ok(None)`; that saves are compare-and-swap (a save
/// expecting absence, or a wrong version, is a [`Cas::Conflict`] that writes nothing); that
/// versions grow and a loaded record is the saved one; that deleting reports whether there was a
/// record, and that a deleted key has no version to match, is not listed by `keys`, and gets a
/// *new* version when saved again (never a reused one). It uses one key of its own,
/// `tokenkeeper-contract-check`, and deletes it at the end.
///
/// It checks that a key of [`TokenKey::MAX_LEN`] bytes, full of characters that are awkward
/// for file names or URLs, is saved, loaded, listed, locked and deleted like any other, and
/// that a longer key is refused by `load`, `save`, `delete` and `lock` with
/// [`StoreErrorKind::InvalidKey`] (`lock` may return
/// `Ok(None)` instead if the store has no lock).
///
/// It then checks the refresh lock, if the store has one ([`TokenStore::lock`] returns
/// `Some`; a store without one passes, see [`assert_store_has_lock`] to require it): while
/// the key `tokenkeeper-contract-lock` is held, a second `lock` of it, polled concurrently,
/// is not granted for 250 ms (it may fail with
/// [`StoreErrorKind::LockTimeout`] instead); the key
/// `tokenkeeper-contract-lock-other` is not blocked by it; after release the waiter gets the
/// lock, and after that release it can be taken again. The 250 ms are real time unless the
/// runtime's clock is paused (`#[tokio::test(start_paused = true)]` makes them instant); a
/// lock that should be free must be granted within 10 s. Do not pause the clock for a store
/// that talks to a server: paused time jumps ahead while the runtime waits on the network, so
/// the 10 s could pass during one slow round trip.
///
/// # Panics
///
/// When the store breaks a rule, or returns an error.
pub async fn assert_store_contract<S: TokenStore + ?Sized>(store: &S) {
    let key = TokenKey::from("tokenkeeper-contract-check");
    let record = |at: &str| {
        GrantRecord::new(
            TokenSet::new(AccessToken::new(at)).with_refresh_token(RefreshToken::new("rt")),
        )
    };

    let _ = store
        .delete(&key)
        .await
        .expect("the store failed to delete");
    assert!(
        store
            .load(&key)
            .await
            .expect("the store failed to load")
            .is_none(),
        "an absent key must load as Ok(None)"
    );
    let Cas::Saved(v1) = store
        .save(&key, &record("a"), None)
        .await
        .expect("the store failed to save")
    else {
        panic!("a first save expecting absence must succeed")
    };
    assert_eq!(
        store
            .save(&key, &record("b"), None)
            .await
            .expect("the store failed to save"),
        Cas::Conflict,
        "a save expecting absence must conflict when the key exists"
    );
    assert_eq!(
        store
            .save(&key, &record("b"), Some(v1.wrapping_add(7)))
            .await
            .expect("the store failed to save"),
        Cas::Conflict,
        "a save expecting the wrong version must conflict"
    );
    let Cas::Saved(v2) = store
        .save(&key, &record("b"), Some(v1))
        .await
        .expect("the store failed to save")
    else {
        panic!("a save expecting the current version must succeed")
    };
    assert!(v2 > v1, "versions must grow ({v1} then {v2})");
    let loaded = store.load(&key).await.expect("the store failed to load");
    let loaded = loaded.expect("a saved record must load");
    assert_eq!(loaded.version, v2, "load must return the saved version");
    assert!(
        loaded.value == record("b"),
        "load must return the saved record"
    );
    assert!(
        store
            .keys()
            .await
            .expect("the store failed to list keys")
            .contains(&key),
        "keys must list a saved key"
    );
    assert_pages_match_keys(store).await;

    assert!(
        store
            .delete(&key)
            .await
            .expect("the store failed to delete"),
        "delete must report a record"
    );
    assert!(
        !store
            .delete(&key)
            .await
            .expect("the store failed to delete"),
        "a second delete must report none"
    );
    assert!(
        store
            .load(&key)
            .await
            .expect("the store failed to load")
            .is_none(),
        "a deleted key must load as Ok(None)"
    );
    assert_eq!(
        store
            .save(&key, &record("c"), Some(v2))
            .await
            .expect("the store failed to save"),
        Cas::Conflict,
        "a deleted record has no version to match"
    );
    assert!(
        !store
            .keys()
            .await
            .expect("the store failed to list keys")
            .contains(&key),
        "keys must not list a deleted key"
    );
    let Cas::Saved(v3) = store
        .save(&key, &record("c"), None)
        .await
        .expect("the store failed to save")
    else {
        panic!("saving a deleted key anew must succeed")
    };
    assert!(
        v3 > v2,
        "a version must never be reused after delete ({v2} then {v3})"
    );
    store
        .delete(&key)
        .await
        .expect("the store failed to delete");

    check_key_lengths(store).await;
    check_lock(store, false).await;
}

/// Panics saying the store failed to `what` a key of the maximum length.
fn failed<T>(what: &'static str) -> impl FnOnce(crate::StoreError) -> T {
    move |e| panic!("the store failed to {what} a key of TokenKey::MAX_LEN bytes: {e:?}")
}

/// Keys up to [`TokenKey::MAX_LEN`] bytes work, whatever their characters; longer ones are
/// refused with [`StoreErrorKind::InvalidKey`].
async fn check_key_lengths<S: TokenStore + ?Sized>(store: &S) {
    let mut longest = String::from("tokenkeeper-contract-long:Ключ/../Aa %2F*?[]\\\0\n.json ");
    while longest.len() < TokenKey::MAX_LEN {
        longest.push(if longest.len() + 2 <= TokenKey::MAX_LEN {
            'é'
        } else {
            'x'
        });
    }
    assert_eq!(longest.len(), TokenKey::MAX_LEN);
    let longest = TokenKey::from(longest);
    let record = GrantRecord::new(TokenSet::new(AccessToken::new("long")));
    let _ = store
        .delete(&longest)
        .await
        .unwrap_or_else(failed("delete"));
    let Cas::Saved(v) = store
        .save(&longest, &record, None)
        .await
        .unwrap_or_else(failed("save"))
    else {
        panic!("a key of TokenKey::MAX_LEN bytes must be saved")
    };
    let loaded = store.load(&longest).await.unwrap_or_else(failed("load"));
    assert!(
        loaded.is_some_and(|l| l.version == v && l.value == record),
        "a key of TokenKey::MAX_LEN bytes must load as saved"
    );
    assert!(
        store
            .keys()
            .await
            .unwrap_or_else(failed("list"))
            .contains(&longest),
        "keys must list a key of TokenKey::MAX_LEN bytes"
    );
    let lock = store
        .lock(&longest, Duration::from_secs(60))
        .await
        .unwrap_or_else(failed("lock"));
    let has_lock = lock.is_some();
    if let Some(lock) = lock {
        lock.release()
            .await
            .unwrap_or_else(failed("release the lock of"));
    }
    assert!(
        store
            .delete(&longest)
            .await
            .unwrap_or_else(failed("delete")),
        "a key of TokenKey::MAX_LEN bytes must be deleted"
    );

    let too_long = TokenKey::from("x".repeat(TokenKey::MAX_LEN + 1));
    let refused = |what: &str, kind: Option<StoreErrorKind>| {
        assert_eq!(
            kind,
            Some(StoreErrorKind::InvalidKey),
            "{what} of a key longer than TokenKey::MAX_LEN must fail with InvalidKey"
        );
    };
    refused("load", store.load(&too_long).await.err().map(|e| e.kind()));
    refused(
        "save",
        store
            .save(&too_long, &record, None)
            .await
            .err()
            .map(|e| e.kind()),
    );
    refused(
        "delete",
        store.delete(&too_long).await.err().map(|e| e.kind()),
    );
    // A store without a lock may say so (`Ok(None)`) for any key.
    match store.lock(&too_long, Duration::from_secs(60)).await {
        Ok(None) if !has_lock => {}
        locked => refused("lock", locked.err().map(|e| e.kind())),
    }
}

/// As [`assert_store_contract`], and also checks that `store` *provides* a cross-process refresh
/// lock: [`TokenStore::lock`] must not return `Ok(None)`. Use it for a store meant to be shared
/// by several processes, and above all for a wrapper around one (for metrics, caching,
/// encryption): a wrapper that does not forward `lock` to the inner store would silently
/// refresh without the lock.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use tokenkeeper::{testing::assert_store_has_lock, MemoryStore};
/// assert_store_has_lock(&MemoryStore::new()).await;
/// # });
/// ```
///
/// # Panics
///
/// As [`assert_store_contract`], and when `lock` returns `Ok(None)`.
pub async fn assert_store_has_lock<S: TokenStore + ?Sized>(store: &S) {
    assert_store_contract(store).await;
    check_lock(store, true).await;
}

/// How long a second `lock` of a held key is watched to see that it keeps waiting.
const STILL_WAITING: Duration = Duration::from_millis(250);
/// How long a lock that should be free may take to be granted.
const GRANTED_WITHIN: Duration = Duration::from_secs(10);

/// The lock checks of [`assert_store_contract`] (see there); `required`: `Ok(None)` fails.
async fn check_lock<S: TokenStore + ?Sized>(store: &S, required: bool) {
    let key = TokenKey::from("tokenkeeper-contract-lock");
    let other = TokenKey::from("tokenkeeper-contract-lock-other");
    let ttl = Duration::from_secs(60);
    let first = store
        .lock(&key, ttl)
        .await
        .expect("the store failed to lock");
    let Some(first) = first else {
        assert!(
            !required,
            "the store must provide a cross-process refresh lock, but `lock` returned Ok(None) \
             (a wrapper store must forward `lock` to the store it wraps)"
        );
        return;
    };

    // A second holder of the same key waits (or gives up with LockTimeout).
    let mut second = std::pin::pin!(store.lock(&key, ttl));
    let waited = match tokio::time::timeout(STILL_WAITING, &mut second).await {
        Err(_) => true,
        Ok(Err(e)) if e.kind() == StoreErrorKind::LockTimeout => false,
        Ok(Err(e)) => panic!("the store failed to lock: {e}"),
        Ok(Ok(Some(_))) => panic!("a lock was granted while another holder has it"),
        Ok(Ok(None)) => panic!("`lock` must not return Ok(None) after granting a lock"),
    };

    // Another key is independent.
    let unrelated = tokio::time::timeout(GRANTED_WITHIN, store.lock(&other, ttl))
        .await
        .expect("a lock must not wait for the lock of another key")
        .expect("the store failed to lock")
        .expect("`lock` must not return Ok(None) after granting a lock");
    unrelated
        .release()
        .await
        .expect("the store failed to release a lock");

    first
        .release()
        .await
        .expect("the store failed to release a lock");
    let after_release = |what: &str| format!("the lock must be granted {what} after release");
    let again = if waited {
        tokio::time::timeout(GRANTED_WITHIN, second)
            .await
            .unwrap_or_else(|_| panic!("{}", after_release("to its waiter")))
    } else {
        tokio::time::timeout(GRANTED_WITHIN, store.lock(&key, ttl))
            .await
            .unwrap_or_else(|_| panic!("{}", after_release("again")))
    };
    let again = again
        .expect("the store failed to lock")
        .expect("`lock` must not return Ok(None) after granting a lock");
    again
        .release()
        .await
        .expect("the store failed to release a lock");
    let last = tokio::time::timeout(GRANTED_WITHIN, store.lock(&key, ttl))
        .await
        .unwrap_or_else(|_| panic!("{}", after_release("again")))
        .expect("the store failed to lock")
        .expect("`lock` must not return Ok(None) after granting a lock");
    last.release()
        .await
        .expect("the store failed to release a lock");
}

/// Checks that concurrent compare-and-swap saves through two handles on one backing store (as
/// two processes would hold) have exactly one winner per version, and that the winner's record
/// is the one stored. Ten rounds of sixteen racing saves; uses the key
/// `tokenkeeper-contract-race` and deletes it at the end. Needs a multi-threaded runtime to race
/// for real.
///
/// # Panics
///
/// When two saves win the same version, none wins, the stored record is not the winner's, or
/// the store returns an error.
pub async fn assert_one_winner_per_version(
    first: Arc<dyn TokenStore>,
    second: Arc<dyn TokenStore>,
) {
    let key = TokenKey::from("tokenkeeper-contract-race");
    let record = |label: &str| GrantRecord::new(TokenSet::new(AccessToken::new(label)));
    let _ = first
        .delete(&key)
        .await
        .expect("the store failed to delete");
    let stores = [first, second];
    let mut expected = None;
    for round in 0..10 {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (store, key) = (Arc::clone(&stores[i % 2]), key.clone());
                let record = record(&format!("{round}-{i}"));
                tokio::spawn(async move { store.save(&key, &record, expected).await })
            })
            .collect();
        let mut winners = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            let saved = task.await.expect("a save panicked");
            if let Cas::Saved(v) = saved.expect("the store failed to save") {
                winners.push((i, v));
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: one save must win, got {winners:?}"
        );
        let (i, v) = winners[0];
        let loaded = stores[1]
            .load(&key)
            .await
            .expect("the store failed to load");
        let loaded = loaded.expect("the winner's record must load");
        assert_eq!(
            loaded.version, v,
            "round {round}: the winner's version must be stored"
        );
        assert!(
            loaded.value == record(&format!("{round}-{i}")),
            "round {round}: the winner's record must be stored"
        );
        expected = Some(v);
    }
    stores[0]
        .delete(&key)
        .await
        .expect("the store failed to delete");
}

/// Paging through `keys_after` (two keys a page) yields what `keys` lists, sorted, once each.
async fn assert_pages_match_keys<S: TokenStore + ?Sized>(store: &S) {
    let mut all = store.keys().await.expect("the store failed to list keys");
    all.sort();
    let mut paged: Vec<TokenKey> = Vec::new();
    loop {
        let page = store
            .keys_after(paged.last(), 2)
            .await
            .expect("the store failed to list a page of keys");
        assert!(
            page.len() <= 2,
            "keys_after must return at most `limit` keys"
        );
        if page.is_empty() {
            break;
        }
        paged.extend(page);
        assert!(paged.len() <= all.len(), "keys_after returns keys twice");
    }
    assert_eq!(
        paged, all,
        "keys_after, page by page, must list the keys `keys` lists, in ascending order"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::error::StoreError;
    use crate::store::{RefreshLock, Version, Versioned};
    use crate::MemoryStore;

    /// How a test store's lock is broken.
    #[derive(Clone, Copy)]
    enum Lock {
        /// Forwarded to the inner store: correct.
        Forwarded,
        /// Not forwarded: the wrapper says it has no lock.
        Forgotten,
        /// Granted to everyone at once.
        Shared,
        /// One lock for every key.
        Global,
        /// `release` does not release.
        Sticky,
    }

    /// A wrapper around a `MemoryStore`, as an app would write for metrics.
    struct Wrapper {
        inner: MemoryStore,
        lock: Lock,
        global: Arc<tokio::sync::Mutex<()>>,
    }

    impl Wrapper {
        fn new(lock: Lock) -> Self {
            Self {
                inner: MemoryStore::new(),
                lock,
                global: Arc::default(),
            }
        }
    }

    struct Guard(
        #[allow(dead_code)] Option<tokio::sync::OwnedMutexGuard<()>>,
        bool,
    );

    #[async_trait]
    impl RefreshLock for Guard {
        async fn release(self: Box<Self>) -> Result<(), StoreError> {
            if self.1 {
                std::mem::forget(self);
            }
            Ok(())
        }
    }

    #[async_trait]
    impl TokenStore for Wrapper {
        async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
            self.inner.load(key).await
        }
        async fn save(
            &self,
            key: &TokenKey,
            record: &GrantRecord,
            expected: Option<Version>,
        ) -> Result<Cas, StoreError> {
            self.inner.save(key, record, expected).await
        }
        async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
            self.inner.delete(key).await
        }
        async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
            self.inner.keys().await
        }
        async fn lock(
            &self,
            key: &TokenKey,
            ttl: Duration,
        ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
            StoreError::check_key(key)?;
            match self.lock {
                Lock::Forwarded => self.inner.lock(key, ttl).await,
                Lock::Forgotten => Ok(None),
                Lock::Shared => Ok(Some(Box::new(Guard(None, false)))),
                Lock::Global => {
                    let guard = Arc::clone(&self.global).lock_owned().await;
                    Ok(Some(Box::new(Guard(Some(guard), false))))
                }
                Lock::Sticky => {
                    let guard = self.inner.lock(key, ttl).await?;
                    std::mem::forget(guard);
                    Ok(Some(Box::new(Guard(None, true))))
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_forwarded_lock_passes_both_checks() {
        let store = Wrapper::new(Lock::Forwarded);
        assert_store_contract(&store).await;
        assert_store_has_lock(&store).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_without_a_lock_keeps_the_contract() {
        assert_store_contract(&Wrapper::new(Lock::Forgotten)).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "must provide a cross-process refresh lock")]
    async fn a_wrapper_that_forgets_to_forward_the_lock_is_caught() {
        assert_store_has_lock(&Wrapper::new(Lock::Forgotten)).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "granted while another holder has it")]
    async fn a_lock_granted_twice_is_caught() {
        assert_store_contract(&Wrapper::new(Lock::Shared)).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "must not wait for the lock of another key")]
    async fn a_lock_that_blocks_other_keys_is_caught() {
        assert_store_contract(&Wrapper::new(Lock::Global)).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "after release")]
    async fn a_lock_that_release_does_not_release_is_caught() {
        assert_store_contract(&Wrapper::new(Lock::Sticky)).await;
    }
}
