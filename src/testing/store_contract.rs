//! A conformance check for [`TokenStore`] implementations.

use std::sync::Arc;

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
