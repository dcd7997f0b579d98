//! Moving and copying one grant between stores, without losing a rotation: the library's
//! `tokenkeeper::transfer`, with the CLI's messages and exit codes.

use std::time::Duration;

use tokenkeeper::transfer::{self, MoveOptions, TransferError};
use tokenkeeper::{TokenKey, TokenStore};

use crate::failure::Failure;

/// How long the source's refresh lock is held at most: as long as a manager holds it for a
/// refresh by default (`TokenManagerBuilder::lock_ttl`), far longer than a move takes.
const LOCK_TTL: Duration = Duration::from_secs(60);
/// The library's rounds of "the source changed meanwhile" before giving up (for the tests).
#[cfg(test)]
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

/// Moves `key` (see `tokenkeeper::transfer::move_grant`): the destination always ends with the
/// source's last rotation, and the source is marked moved.
pub async fn move_grant(ends: &Ends<'_>, key: &TokenKey) -> Result<(), Failure> {
    // A mark on the envelope would be invisible to the applications, which read the state
    // inside the ciphertext: they would go on refreshing.
    if let Some(loaded) = ends
        .from
        .load(key)
        .await
        .map_err(|e| Failure::store(format!("cannot read `{key}` from the source"), e))?
    {
        if crate::keys::is_envelope(&loaded.value) {
            return Err(Failure::refused(format!(
                "`{key}` is encrypted in the source: give its key (--from-key-env or \
                 --from-key-file) so that the move can mark it where applications look; nothing moved"
            )));
        }
    }
    let options = MoveOptions::new(ends.to_shown)
        .overwrite(ends.force)
        .lock_ttl(LOCK_TTL);
    transfer::move_grant(ends.from, ends.to, key, &options)
        .await
        .map_err(failure)
}

/// Copies `key` without marking the source; a grant with a refresh token only with `--force`
/// (and a warning either way).
pub async fn copy_grant(ends: &Ends<'_>, key: &TokenKey) -> Result<(), Failure> {
    let has_refresh_token = ends
        .from
        .load(key)
        .await
        .map_err(|e| Failure::store(format!("cannot read `{key}` from the source"), e))?
        .is_some_and(|loaded| loaded.value.tokens().refresh_token().is_some());
    if has_refresh_token {
        eprintln!(
            "tokenkeeper: warning: `{key}` has a refresh token: if both stores refresh it, a \
             rotating provider kills the grant at the next rotation (`grants move` hands it \
             over instead)"
        );
    }
    transfer::copy_grant(ends.from, ends.to, key, ends.force, ends.force)
        .await
        .map_err(failure)
}

/// The CLI's message and exit code for a failed transfer.
fn failure(error: TransferError) -> Failure {
    match error {
        TransferError::NotFound { key } => {
            Failure::not_found(format!("no grant `{key}` in the source"))
        }
        TransferError::AlreadyMoved { key, to } => Failure::refused(format!(
            "`{key}` in the source was already moved to {to}; nothing to take from it"
        )),
        TransferError::Exists { key } => Failure::refused(format!(
            "the destination already has `{key}`; --force overwrites it"
        )),
        TransferError::HasRefreshToken { key } => Failure::refused(format!(
            "copying `{key}`, which has a refresh token, needs --force; nothing copied"
        )),
        TransferError::ChangedInDestination { key } => Failure::refused(format!(
            "`{key}` changed in the destination during the transfer (someone else writes it \
             there); nothing was marked in the source"
        )),
        TransferError::KeptChanging { key } => Failure::runtime(format!(
            "`{key}` kept changing in the source; the destination holds a copy, the source is not \
             marked moved: run the move again"
        )),
        TransferError::Store { key, side, source } => {
            Failure::store(format!("cannot transfer `{key}` ({side} store)"), source)
        }
        other => Failure::runtime(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;
    use tokenkeeper::{
        AccessToken, Cas, GrantRecord, MemoryStore, RefreshLock, RefreshToken, StoreError,
        TokenSet, Version, Versioned,
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
