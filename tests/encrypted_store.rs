//! `EncryptedStore`: the store contract over memory and file stores, nothing in clear at rest,
//! typed errors for wrong or missing keys and moved records, key rotation and a rekey that
//! races concurrent saves without losing one, and a manager refreshing through it.
#![cfg(feature = "encryption")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::testing::{assert_store_contract, assert_store_has_lock, ManualClock};
use tokenkeeper::{
    provider_fn, AccessToken, Cas, Clock, EncryptedStore, Expiry, FileStore, GrantRecord, KeyId,
    Keyring, MemoryStore, RefreshLock, RefreshToken, StoreError, StoreErrorKind, TokenKey,
    TokenManager, TokenResponse, TokenSet, TokenStore, Version, Versioned,
};

const HOUR: Duration = Duration::from_secs(3600);
const KEY_1: [u8; 32] = [0x11; 32];
const KEY_2: [u8; 32] = [0x22; 32];

fn keyring() -> Keyring {
    Keyring::new(KeyId::new(1), KEY_1)
}

fn record(access: &str, refresh: &str) -> GrantRecord {
    GrantRecord::new(
        TokenSet::new(AccessToken::new(access)).with_refresh_token(RefreshToken::new(refresh)),
    )
}

fn encrypted(inner: &Arc<MemoryStore>, keyring: Keyring) -> EncryptedStore<Arc<MemoryStore>> {
    EncryptedStore::new(Arc::clone(inner), keyring)
}

async fn raw(inner: &MemoryStore, key: &TokenKey) -> Versioned<GrantRecord> {
    inner.load(key).await.expect("load").expect("stored")
}

async fn refresh_token(store: &impl TokenStore, key: &TokenKey) -> String {
    let loaded = store.load(key).await.expect("load").expect("stored");
    let token = loaded
        .value
        .tokens()
        .refresh_token()
        .expect("refresh token");
    token.secret().to_owned()
}

fn kind<T: std::fmt::Debug>(result: Result<T, StoreError>) -> StoreErrorKind {
    result.expect_err("expected an error").kind()
}

#[tokio::test(start_paused = true)]
async fn keeps_the_store_contract_over_a_memory_store_with_its_lock() {
    let store = EncryptedStore::new(MemoryStore::new(), keyring()).with_namespace("test");
    assert_store_has_lock(&store).await;
}

#[tokio::test(start_paused = true)]
async fn keeps_the_store_contract_over_an_arc_dyn_store_without_a_lock() {
    let inner: Arc<dyn TokenStore> = Arc::new(NoLock(MemoryStore::new()));
    assert_store_contract(&EncryptedStore::new(inner, keyring())).await;
}

#[tokio::test(start_paused = true)]
async fn the_lock_is_the_inner_stores() {
    let inner = Arc::new(MemoryStore::new());
    let store = encrypted(&inner, keyring());
    let key = TokenKey::new("tenant");
    let held = store.lock(&key, HOUR).await.expect("lock").expect("a lock");
    let blocked = tokio::time::timeout(HOUR, inner.lock(&key, HOUR)).await;
    assert!(
        blocked.is_err(),
        "the inner lock was free while held through the wrapper"
    );
    held.release().await.expect("release");
    let again = tokio::time::timeout(HOUR, inner.lock(&key, HOUR)).await;
    assert!(
        matches!(again, Ok(Ok(Some(_)))),
        "the inner lock stayed taken"
    );
}

/// A store without a refresh lock.
struct NoLock(MemoryStore);

#[async_trait]
impl TokenStore for NoLock {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        self.0.load(key).await
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        self.0.save(key, record, expected).await
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        self.0.delete(key).await
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        self.0.keys().await
    }

    async fn lock(
        &self,
        _key: &TokenKey,
        _ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        Ok(None)
    }
}

#[tokio::test(start_paused = true)]
async fn keeps_the_store_contract_over_a_file_store_with_its_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EncryptedStore::new(FileStore::open(dir.path()).expect("open"), keyring());
    assert_store_has_lock(&store).await;
}

#[tokio::test]
async fn a_file_at_rest_holds_no_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EncryptedStore::new(FileStore::open(dir.path()).expect("open"), keyring());
    let key = TokenKey::new("tenant");
    let saved = record("access-SECRET-a", "refresh-SECRET-r");
    store.save(&key, &saved, None).await.expect("save");

    let mut files = 0;
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).expect("read");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("SECRET"),
            "{} holds a token",
            entry.display()
        );
        files += 1;
    }
    assert!(files > 0, "the file store wrote no file");
    let loaded = store.load(&key).await.expect("load").expect("stored");
    assert_eq!(loaded.value, saved);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn the_inner_record_is_an_envelope_with_no_token_and_a_fresh_nonce_per_write() {
    let inner = Arc::new(MemoryStore::new());
    let store = encrypted(&inner, keyring());
    let key = TokenKey::new("tenant");
    let saved = record("access-SECRET", "refresh-SECRET");
    let Cas::Saved(v1) = store.save(&key, &saved, None).await.expect("save") else {
        panic!("conflict on a new key");
    };
    let first = raw(&inner, &key).await;
    assert_eq!(first.version, v1, "versions are the inner store's");
    let envelope = first.value.tokens().access_token().secret().to_owned();
    assert!(envelope.starts_with("tkenc1:"), "{envelope}");
    assert!(!envelope.contains("SECRET"));
    assert!(first.value.tokens().refresh_token().is_none());
    assert!(first.value.tokens().expires_at().is_none());

    store.save(&key, &saved, Some(v1)).await.expect("save");
    let second = raw(&inner, &key).await;
    assert_ne!(
        second.value.tokens().access_token().secret(),
        envelope,
        "the same record written twice must differ (a fresh nonce)"
    );
}

#[tokio::test]
async fn a_record_moved_to_another_grant_fails_typed_and_stays_as_it_was() {
    let inner = Arc::new(MemoryStore::new());
    let store = encrypted(&inner, keyring());
    let (alice, mallory) = (TokenKey::new("alice"), TokenKey::new("mallory"));
    store
        .save(&alice, &record("a-at", "a-rt"), None)
        .await
        .expect("save");
    store
        .save(&mallory, &record("m-at", "m-rt"), None)
        .await
        .expect("save");

    // Copy alice's envelope over mallory's record in the inner store.
    let envelope = raw(&inner, &alice).await.value;
    let mallory_version = raw(&inner, &mallory).await.version;
    inner
        .save(&mallory, &envelope, Some(mallory_version))
        .await
        .expect("copy");
    let moved = raw(&inner, &mallory).await;

    assert_eq!(
        kind(store.load(&mallory).await),
        StoreErrorKind::Undecryptable
    );
    assert_eq!(raw(&inner, &mallory).await, moved, "the record was touched");
    // Alice's own record still opens.
    assert_eq!(refresh_token(&store, &alice).await, "a-rt");
}

#[tokio::test]
async fn another_namespace_cannot_open_a_record() {
    let inner = Arc::new(MemoryStore::new());
    let key = TokenKey::new("tenant");
    encrypted(&inner, keyring())
        .with_namespace("staging")
        .save(&key, &record("at", "rt"), None)
        .await
        .expect("save");
    let production = encrypted(&inner, keyring()).with_namespace("production");
    assert_eq!(
        kind(production.load(&key).await),
        StoreErrorKind::Undecryptable
    );
}

#[tokio::test]
async fn a_wrong_key_or_a_missing_key_id_fails_typed_and_writes_nothing() {
    let inner = Arc::new(MemoryStore::new());
    let key = TokenKey::new("tenant");
    encrypted(&inner, keyring())
        .save(&key, &record("at", "rt"), None)
        .await
        .expect("save");
    let before = raw(&inner, &key).await;

    // Same key id, other key material.
    let wrong = encrypted(&inner, Keyring::new(KeyId::new(1), KEY_2));
    let err = wrong.load(&key).await.expect_err("opened with a wrong key");
    assert_eq!(err.kind(), StoreErrorKind::Undecryptable);
    assert_eq!(
        err.to_string(),
        "the record cannot be decrypted with the keyring"
    );

    // The record's key id is not in the keyring.
    let missing = encrypted(&inner, Keyring::new(KeyId::new(2), KEY_2));
    assert_eq!(
        kind(missing.load(&key).await),
        StoreErrorKind::KeyUnavailable
    );
    // Neither a rekey.
    let report = missing.rekey().await.expect("rekey");
    assert_eq!(report.rewritten, 0);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, key);
    assert_eq!(report.failed[0].1.kind(), StoreErrorKind::KeyUnavailable);

    assert_eq!(raw(&inner, &key).await, before, "the record was touched");
}

#[tokio::test(start_paused = true)]
async fn a_manager_can_remove_a_record_it_cannot_open_and_insert_anew() {
    let inner = Arc::new(MemoryStore::new());
    let key = TokenKey::new("tenant");
    encrypted(&inner, Keyring::new(KeyId::new(9), KEY_2))
        .save(&key, &record("at", "rt"), None)
        .await
        .expect("save");
    let provider = provider_fn(|_key, _tokens: TokenSet| async {
        Ok(TokenResponse::new(AccessToken::new("unused")))
    });
    let manager = TokenManager::builder(provider)
        .store(encrypted(&inner, keyring()))
        .build();

    let err = manager.access_token(&key).await.expect_err("opened");
    assert!(!err.is_retryable() && !err.is_reauth_required(), "{err:?}");
    let tokenkeeper::Error::Store(store_error) = err else {
        panic!("not a store error: {err:?}");
    };
    assert_eq!(store_error.kind(), StoreErrorKind::KeyUnavailable);
    let fresh =
        TokenSet::new(AccessToken::new("at-new")).with_refresh_token(RefreshToken::new("rt-new"));
    assert!(manager.insert(key.clone(), fresh.clone()).await.is_err());

    assert!(manager.remove(&key).await.expect("remove"));
    manager.insert(key.clone(), fresh).await.expect("insert");
    assert_eq!(
        manager.access_token(&key).await.expect("token").secret(),
        "at-new"
    );
}

#[tokio::test]
async fn an_unencrypted_record_fails_typed_unless_migration_is_on() {
    let inner = Arc::new(MemoryStore::new());
    let key = TokenKey::new("legacy");
    inner
        .save(&key, &record("plain-at", "plain-rt"), None)
        .await
        .expect("save");
    let store = encrypted(&inner, keyring());
    assert_eq!(kind(store.load(&key).await), StoreErrorKind::Unencrypted);
    let report = store.rekey().await.expect("rekey");
    assert_eq!(report.failed[0].1.kind(), StoreErrorKind::Unencrypted);
    assert_eq!(
        raw(&inner, &key)
            .await
            .value
            .tokens()
            .access_token()
            .secret(),
        "plain-at"
    );

    let migrating = encrypted(&inner, keyring()).accept_unencrypted(true);
    assert_eq!(refresh_token(&migrating, &key).await, "plain-rt");
    let report = migrating.rekey().await.expect("rekey");
    assert_eq!((report.rewritten, report.failed.len()), (1, 0));
    let at_rest = raw(&inner, &key).await.value;
    assert!(at_rest
        .tokens()
        .access_token()
        .secret()
        .starts_with("tkenc1:"));
    // Now readable without the migration option.
    assert_eq!(refresh_token(&store, &key).await, "plain-rt");
}

#[tokio::test]
async fn old_keys_read_and_rekey_moves_every_record_to_the_current_key() {
    let inner = Arc::new(MemoryStore::new());
    let old = encrypted(&inner, keyring());
    let keys: Vec<TokenKey> = (0..5).map(|i| TokenKey::new(format!("t{i}"))).collect();
    for (i, key) in keys.iter().enumerate() {
        old.save(key, &record("at", &format!("rt{i}")), None)
            .await
            .expect("save");
    }

    let rotated = encrypted(
        &inner,
        Keyring::new(KeyId::new(2), KEY_2).with_old(KeyId::new(1), KEY_1),
    );
    assert_eq!(refresh_token(&rotated, &keys[0]).await, "rt0");
    // A write under the rotated keyring uses key 2 already.
    let v = raw(&inner, &keys[4]).await.version;
    rotated
        .save(&keys[4], &record("at", "rt4-new"), Some(v))
        .await
        .expect("save");

    let report = rotated.rekey().await.expect("rekey");
    assert_eq!((report.rewritten, report.current), (4, 1));
    assert!(report.failed.is_empty(), "{:?}", report.failed);

    // Key 1 can go: everything opens with key 2 alone.
    let only_new = encrypted(&inner, Keyring::new(KeyId::new(2), KEY_2));
    for (i, key) in keys.iter().enumerate() {
        let expected = if i == 4 {
            "rt4-new".to_owned()
        } else {
            format!("rt{i}")
        };
        assert_eq!(refresh_token(&only_new, key).await, expected);
    }
    // And the old keyring alone no longer can.
    assert_eq!(
        kind(old.load(&keys[0]).await),
        StoreErrorKind::KeyUnavailable
    );

    let again = rotated.rekey().await.expect("rekey");
    assert_eq!((again.rewritten, again.current), (0, 5));
}

/// A memory store that, just before the first compare-and-swap save of `racing`, lets a
/// "concurrent" writer save a rotated refresh token first.
struct Racing {
    inner: Arc<MemoryStore>,
    writer: EncryptedStore<Arc<MemoryStore>>,
    racing: TokenKey,
    fired: AtomicUsize,
}

#[async_trait]
impl TokenStore for Racing {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        self.inner.load(key).await
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        if key == &self.racing && self.fired.fetch_add(1, Ordering::SeqCst) == 0 {
            let current = self.inner.load(key).await?.map(|v| v.version);
            let cas = self.writer.save(key, &record_rotated(), current).await?;
            assert!(matches!(cas, Cas::Saved(_)));
        }
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
        self.inner.lock(key, ttl).await
    }
}

fn record_rotated() -> GrantRecord {
    record("at-new", "rt-rotated")
}

#[tokio::test]
async fn a_rekey_racing_a_concurrent_save_loses_nothing() {
    let inner = Arc::new(MemoryStore::new());
    let key = TokenKey::new("tenant");
    encrypted(&inner, keyring())
        .save(&key, &record("at-old", "rt-old"), None)
        .await
        .expect("save");

    let rotated = || Keyring::new(KeyId::new(2), KEY_2).with_old(KeyId::new(1), KEY_1);
    let racing = Racing {
        inner: Arc::clone(&inner),
        writer: encrypted(&inner, rotated()),
        racing: key.clone(),
        fired: AtomicUsize::new(0),
    };
    let store = EncryptedStore::new(racing, rotated());
    let report = store.rekey().await.expect("rekey");

    assert_eq!(store.inner().fired.load(Ordering::SeqCst), 1, "no race ran");
    // The rekey's save lost, it re-read and found the concurrent write under key 2.
    assert_eq!((report.rewritten, report.current), (0, 1));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(refresh_token(&store, &key).await, "rt-rotated");
    let only_new = encrypted(&inner, Keyring::new(KeyId::new(2), KEY_2));
    assert_eq!(refresh_token(&only_new, &key).await, "rt-rotated");
}

#[tokio::test]
async fn a_rekey_racing_a_save_under_the_old_key_retries_from_the_new_contents() {
    let inner = Arc::new(MemoryStore::new());
    let key = TokenKey::new("tenant");
    encrypted(&inner, keyring())
        .save(&key, &record("at-old", "rt-old"), None)
        .await
        .expect("save");

    // The concurrent writer still runs with the old keyring (a replica not yet rotated).
    let racing = Racing {
        inner: Arc::clone(&inner),
        writer: encrypted(&inner, keyring()),
        racing: key.clone(),
        fired: AtomicUsize::new(0),
    };
    let rotated = Keyring::new(KeyId::new(2), KEY_2).with_old(KeyId::new(1), KEY_1);
    let store = EncryptedStore::new(racing, rotated);
    let report = store.rekey().await.expect("rekey");

    assert_eq!((report.rewritten, report.current), (1, 0));
    let only_new = encrypted(&inner, Keyring::new(KeyId::new(2), KEY_2));
    assert_eq!(refresh_token(&only_new, &key).await, "rt-rotated");
}

#[tokio::test(start_paused = true)]
async fn a_manager_refreshes_and_rotates_through_an_encrypted_store() {
    let clock = Arc::new(ManualClock::fixed());
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let provider = {
        let (calls, seen) = (Arc::clone(&calls), Arc::clone(&seen));
        provider_fn(move |_key, tokens: TokenSet| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let old = tokens.refresh_token().map(|t| t.secret().to_owned());
            seen.lock().expect("lock").push(old);
            async move {
                Ok(TokenResponse::new(AccessToken::new(format!("at{n}")))
                    .with_refresh_token(RefreshToken::new(format!("rt{n}")))
                    .with_expires(Expiry::In(HOUR)))
            }
        })
    };
    let inner = Arc::new(MemoryStore::new());
    let manager = TokenManager::builder(provider)
        .clock(clock.clone())
        .store(encrypted(&inner, keyring()))
        .build();
    let key = TokenKey::new("tenant");
    manager
        .insert(
            key.clone(),
            TokenSet::new(AccessToken::new("at0"))
                .with_refresh_token(RefreshToken::new("rt0"))
                .with_expires_at(clock.now() + HOUR),
        )
        .await
        .expect("insert");
    assert_eq!(
        manager.access_token(&key).await.expect("token").secret(),
        "at0"
    );

    for n in 1..=2 {
        clock.advance(2 * HOUR);
        let token = manager.access_token(&key).await.expect("refresh");
        assert_eq!(token.secret(), format!("at{n}"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![Some("rt0".to_owned()), Some("rt1".to_owned())],
        "each refresh used the rotated token"
    );

    // Persisted rotated, encrypted at rest.
    let at_rest = raw(&inner, &key).await.value;
    let envelope = at_rest.tokens().access_token().secret();
    assert!(envelope.starts_with("tkenc1:") && !envelope.contains("rt2"));
    assert_eq!(
        refresh_token(&encrypted(&inner, keyring()), &key).await,
        "rt2"
    );
}

#[test]
fn debug_shows_key_ids_only() {
    let keyring = Keyring::new(KeyId::new(2), [0xAB; 32]).with_old(KeyId::new(1), [0xCD; 32]);
    let store = EncryptedStore::new(MemoryStore::new(), keyring.clone()).with_namespace("ns");
    for text in [
        format!("{keyring:?}"),
        format!("{store:?}"),
        format!("{store:#?}"),
    ] {
        for needle in ["171", "205", "ab", "AB", "cd", "CD", "0x"] {
            assert!(!text.contains(needle), "{needle} in {text}");
        }
    }
    assert_eq!(
        format!("{keyring:?}"),
        "Keyring { current: 2, keys: [1, 2] }"
    );
    assert!(format!("{store:?}").contains("namespace: \"ns\""));
}
