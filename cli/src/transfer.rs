//! Moving and copying one grant between stores, without losing a rotation.

use std::time::{Duration, SystemTime};

use tokenkeeper::{Cas, GrantRecord, TokenKey, TokenStore, Version};

use crate::failure::Failure;

/// How long the source's refresh lock is held at most: as long as a manager holds it for a
/// refresh by default (`TokenManagerBuilder::lock_ttl`), far longer than a move takes.
const LOCK_TTL: Duration = Duration::from_secs(60);
/// Rounds of "a peer refreshed meanwhile, copy its newer record" before giving up (only a store
/// without a refresh lock can need more than one).
const ATTEMPTS: usize = 16;

/// The stores and names of one transfer.
pub struct Ends<'a> {
    pub from: &'a dyn TokenStore,
    pub to: &'a dyn TokenStore,
    /// The destination's URL without secrets: recorded in the moved marker.
    pub to_shown: &'a str,
    /// Overwrite a grant the destination already has.
    pub force: bool,
}

/// Moves `key`: under the source's refresh lock (which waits out an in-flight refresh), copies
/// the record to the destination, then marks the source record moved by compare-and-swap at the
/// version copied. If the source changed meanwhile (a store without a lock, refreshed by an
/// instance), copies the newer record again and retries, so the destination always ends with
/// the source's last rotation.
pub async fn move_grant(ends: &Ends<'_>, key: &TokenKey) -> Result<(), Failure> {
    let lock = ends
        .from
        .lock(key, LOCK_TTL)
        .await
        .map_err(|e| Failure::store(format!("cannot lock `{key}` in the source"), e))?;
    let result = move_locked(ends, key).await;
    if let Some(lock) = lock {
        let released = lock.release().await;
        if let (Ok(()), Err(e)) = (&result, released) {
            // The move is done; the lease expires on its own after LOCK_TTL.
            eprintln!("tokenkeeper: warning: could not release the lock on `{key}`: {e}");
        }
    }
    result
}

async fn move_locked(ends: &Ends<'_>, key: &TokenKey) -> Result<(), Failure> {
    let mut source = load(ends.from, key, "source").await?;
    // A mark on the envelope would be invisible to the applications, which read the state
    // inside the ciphertext: they would go on refreshing.
    if crate::keys::is_envelope(&source.1) {
        return Err(Failure::refused(format!(
            "`{key}` is encrypted in the source: give its key (--from-key-env or \
             --from-key-file) so that the move can mark it where applications look; nothing moved"
        )));
    }
    let mut dest_version = destination_version(ends, key).await?;
    for _ in 0..ATTEMPTS {
        dest_version = Some(save_to_destination(ends, key, &source.1, dest_version).await?);
        let marked = source
            .1
            .clone()
            .into_moved(ends.to_shown, SystemTime::now());
        match ends
            .from
            .save(key, &marked, Some(source.0))
            .await
            .map_err(|e| Failure::store(format!("cannot mark `{key}` moved in the source"), e))?
        {
            Cas::Saved(_) => return Ok(()),
            // Refreshed (or changed) in the source since it was read: copy the newer record.
            Cas::Conflict => source = load(ends.from, key, "source").await?,
        }
    }
    Err(Failure::runtime(format!(
        "`{key}` kept changing in the source; the destination holds a copy, the source is not \
         marked moved: run the move again"
    )))
}

/// Copies `key` without marking the source; a grant with a refresh token only with `--force`
/// (and a warning either way).
pub async fn copy_grant(ends: &Ends<'_>, key: &TokenKey) -> Result<(), Failure> {
    let (_, record) = load(ends.from, key, "source").await?;
    if record.tokens().refresh_token().is_some() {
        eprintln!(
            "tokenkeeper: warning: `{key}` has a refresh token: if both stores refresh it, a \
             rotating provider kills the grant at the next rotation (`grants move` hands it \
             over instead)"
        );
        if !ends.force {
            return Err(Failure::refused(format!(
                "copying `{key}`, which has a refresh token, needs --force; nothing copied"
            )));
        }
    }
    let version = destination_version(ends, key).await?;
    save_to_destination(ends, key, &record, version).await?;
    Ok(())
}

/// The source record and its version; refuses a record already marked moved.
async fn load(
    store: &dyn TokenStore,
    key: &TokenKey,
    side: &str,
) -> Result<(Version, GrantRecord), Failure> {
    let loaded = store
        .load(key)
        .await
        .map_err(|e| Failure::store(format!("cannot read `{key}` from the {side}"), e))?
        .ok_or_else(|| Failure::not_found(format!("no grant `{key}` in the {side}")))?;
    if let Some(to) = loaded.value.moved_to() {
        return Err(Failure::refused(format!(
            "`{key}` in the {side} was already moved to {to}; nothing to take from it"
        )));
    }
    Ok((loaded.version, loaded.value))
}

/// The destination's version of `key`, if it has one: refused without `--force`, unless the
/// destination's record is only the marker of an earlier move out of it.
async fn destination_version(ends: &Ends<'_>, key: &TokenKey) -> Result<Option<Version>, Failure> {
    let existing = ends
        .to
        .load(key)
        .await
        .map_err(|e| Failure::store(format!("cannot read `{key}` from the destination"), e))?;
    match existing {
        // A grant moved away from the destination earlier (now moving back): only a marker.
        Some(existing) if existing.value.moved_to().is_some() => Ok(Some(existing.version)),
        Some(_) if !ends.force => Err(Failure::refused(format!(
            "the destination already has `{key}`; --force overwrites it"
        ))),
        Some(existing) => Ok(Some(existing.version)),
        None => Ok(None),
    }
}

async fn save_to_destination(
    ends: &Ends<'_>,
    key: &TokenKey,
    record: &GrantRecord,
    expected: Option<Version>,
) -> Result<Version, Failure> {
    match ends
        .to
        .save(key, record, expected)
        .await
        .map_err(|e| Failure::store(format!("cannot write `{key}` to the destination"), e))?
    {
        Cas::Saved(version) => Ok(version),
        Cas::Conflict => Err(Failure::refused(format!(
            "`{key}` changed in the destination during the transfer (someone else writes it \
             there); nothing was marked in the source"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;
    use tokenkeeper::{
        AccessToken, MemoryStore, RefreshLock, RefreshToken, StoreError, TokenSet, Versioned,
    };

    use super::*;

    fn record(refresh: &str) -> GrantRecord {
        GrantRecord::new(
            TokenSet::new(AccessToken::new(format!("at-{refresh}")))
                .with_refresh_token(RefreshToken::new(refresh)),
        )
    }

    /// A store without a refresh lock whose grant an instance refreshes (rotating the refresh
    /// token) just before each of the first `rotations` saves of the move's marker.
    struct RefreshedMeanwhile {
        inner: MemoryStore,
        rotations: AtomicUsize,
    }

    #[async_trait]
    impl TokenStore for RefreshedMeanwhile {
        async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
            self.inner.load(key).await
        }

        async fn save(
            &self,
            key: &TokenKey,
            record: &GrantRecord,
            expected: Option<Version>,
        ) -> Result<Cas, StoreError> {
            if record.moved_to().is_some() {
                let left = self.rotations.load(Ordering::SeqCst);
                if left > 0 {
                    self.rotations.store(left - 1, Ordering::SeqCst);
                    let current = self.inner.load(key).await?.expect("the grant");
                    let rotated = record_for(left);
                    self.inner
                        .save(key, &rotated, Some(current.version))
                        .await?;
                }
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
            _key: &TokenKey,
            _ttl: Duration,
        ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
            Ok(None)
        }
    }

    fn record_for(rotation: usize) -> GrantRecord {
        record(&format!("rt-rotated-{rotation}"))
    }

    #[tokio::test]
    async fn a_refresh_in_the_source_during_a_move_is_carried_to_the_destination() {
        let key = TokenKey::from("k");
        let from = Arc::new(RefreshedMeanwhile {
            inner: MemoryStore::new(),
            rotations: AtomicUsize::new(2),
        });
        from.inner.save(&key, &record("rt-0"), None).await.unwrap();
        let to = MemoryStore::new();
        let ends = Ends {
            from: &*from,
            to: &to,
            to_shown: "memory://staging",
            force: false,
        };
        move_grant(&ends, &key).await.unwrap();

        // Two rotations happened in the source during the move: the destination holds the
        // last one, and the source is marked moved over it.
        let moved = to.load(&key).await.unwrap().unwrap().value;
        assert_eq!(moved, record_for(1));
        let source = from.load(&key).await.unwrap().unwrap().value;
        assert_eq!(source.moved_to(), Some("memory://staging"));
        assert_eq!(source.tokens(), record_for(1).tokens());
    }

    #[tokio::test]
    async fn a_source_that_never_settles_is_left_unmarked() {
        let key = TokenKey::from("k");
        let from = RefreshedMeanwhile {
            inner: MemoryStore::new(),
            rotations: AtomicUsize::new(ATTEMPTS + 1),
        };
        from.inner.save(&key, &record("rt-0"), None).await.unwrap();
        let to = MemoryStore::new();
        let ends = Ends {
            from: &from,
            to: &to,
            to_shown: "memory://staging",
            force: false,
        };
        let failure = move_grant(&ends, &key).await.unwrap_err();
        assert!(
            failure.to_string().contains("run the move again"),
            "{failure}"
        );
        assert_eq!(
            from.load(&key).await.unwrap().unwrap().value.moved_to(),
            None
        );
    }
}
