//! Moving, copying, exporting and importing grants between stores: what the `tokenkeeper` CLI
//! does, for applications that embed it (an admin endpoint that hands a tenant's grants to
//! another environment, a migration job from one store to another).
//!
//! A grant **copied** while its source keeps refreshing it dies at the next rotation: both
//! environments hold the same refresh token, and the first refresh spends it for the other.
//! [`move_grant`] hands it over instead: under the source's refresh lock (which waits out a
//! refresh in flight) it copies the record, then marks the source record
//! [`Moved`](crate::InvalidationReason::Moved) by compare-and-swap, so every instance reading
//! the source stops refreshing it and reports the move instead of racing the destination.
//!
//! ```
//! # async fn run() -> Result<(), tokenkeeper::transfer::TransferError> {
//! use tokenkeeper::transfer::{move_grant, MoveOptions};
//! use tokenkeeper::{MemoryStore, TokenKey};
//!
//! let (production, staging) = (MemoryStore::new(), MemoryStore::new());
//! # use tokenkeeper::{AccessToken, GrantRecord, TokenSet, TokenStore};
//! # production.save(&TokenKey::from("tenant-7"), &GrantRecord::new(TokenSet::new(AccessToken::new("at"))), None).await.unwrap();
//! move_grant(
//!     &production,
//!     &staging,
//!     &TokenKey::from("tenant-7"),
//!     &MoveOptions::new("redis://staging.internal"),
//! )
//! .await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::store::{Cas, GrantRecord, TokenStore, Version};
use crate::token::TokenKey;

/// Rounds of "the source changed meanwhile, copy its newer record" before giving up (only a
/// store without a refresh lock can need more than one).
const ATTEMPTS: usize = 16;

/// How [`move_grant`] moves a grant.
#[derive(Debug, Clone)]
#[must_use = "options do nothing until passed to `move_grant`"]
pub struct MoveOptions {
    destination: String,
    overwrite: bool,
    lock_ttl: Duration,
    at: Option<SystemTime>,
}

impl MoveOptions {
    /// Moves to a destination described as `destination` in the source's marker (a store URL,
    /// say: never put a password in it, applications show it).
    pub fn new(destination: impl Into<String>) -> Self {
        Self {
            destination: destination.into(),
            overwrite: false,
            lock_ttl: Duration::from_secs(60),
            at: None,
        }
    }

    /// Overwrite a grant the destination already has (default: refuse with
    /// [`TransferError::Exists`]). A destination record that is only the marker of an earlier
    /// move out of it (moving back) is overwritten either way.
    pub fn overwrite(mut self, yes: bool) -> Self {
        self.overwrite = yes;
        self
    }

    /// How long the source's refresh lock is held at most (default 60 s, as a manager holds it
    /// for a refresh).
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// The time recorded in the marker (default: the system clock).
    pub fn at(mut self, at: SystemTime) -> Self {
        self.at = Some(at);
        self
    }
}

/// Which store an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The store the grant comes from.
    Source,
    /// The store the grant goes to.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Why a transfer did not happen. Each says what was left where; none carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The source has no such grant.
    #[error("no grant `{key}` in the source")]
    NotFound {
        /// The grant.
        key: TokenKey,
    },
    /// The source's grant was already moved away: there is nothing to take from it.
    #[error("`{key}` in the source was already moved to {to}")]
    AlreadyMoved {
        /// The grant.
        key: TokenKey,
        /// Where it went.
        to: String,
    },
    /// The destination already has the grant (see [`MoveOptions::overwrite`]); nothing was
    /// written.
    #[error("the destination already has `{key}`")]
    Exists {
        /// The grant.
        key: TokenKey,
    },
    /// The grant has a refresh token, so a copy refreshed from both stores dies at the next
    /// rotation of a rotating provider; [`copy_grant`] copies it only when told to.
    #[error(
        "`{key}` has a refresh token: a copy refreshed from both stores dies at the next rotation"
    )]
    HasRefreshToken {
        /// The grant.
        key: TokenKey,
    },
    /// Someone else wrote the grant in the destination during the transfer; the source was not
    /// marked.
    #[error("`{key}` changed in the destination during the transfer")]
    ChangedInDestination {
        /// The grant.
        key: TokenKey,
    },
    /// The source's grant kept changing: the destination holds a copy, the source is not
    /// marked moved. Running the move again is safe.
    #[error("`{key}` kept changing in the source; the destination holds a copy, the source is not marked moved")]
    KeptChanging {
        /// The grant.
        key: TokenKey,
    },
    /// A store failed.
    #[error("the {side} store failed for `{key}`")]
    Store {
        /// The grant.
        key: TokenKey,
        /// Which store.
        side: Side,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A store failed while listing its grants; nothing was exported.
    #[error("the store failed while listing its grants")]
    Listing(#[source] StoreError),
}

fn store_error(key: &TokenKey, side: Side) -> impl FnOnce(StoreError) -> TransferError + '_ {
    move |source| TransferError::Store {
        key: key.clone(),
        side,
        source,
    }
}

/// Moves `key` from `from` to `to`: under the source's refresh lock, copies the record to the
/// destination, then marks the source record moved by compare-and-swap at the version copied.
/// If the source changed meanwhile (a store without a refresh lock, refreshed by an
/// instance), copies the newer record again and retries, so the destination always ends with
/// the source's last rotation.
///
/// # Errors
///
/// See [`TransferError`]; on an error the source is never marked moved.
pub async fn move_grant(
    from: &dyn TokenStore,
    to: &dyn TokenStore,
    key: &TokenKey,
    options: &MoveOptions,
) -> Result<(), TransferError> {
    let lock = from
        .lock(key, options.lock_ttl)
        .await
        .map_err(store_error(key, Side::Source))?;
    let result = move_locked(from, to, key, options).await;
    if let Some(lock) = lock {
        if let Err(e) = lock.release().await {
            // The lease expires on its own after the ttl.
            tracing::warn!(key = %key, error = %e, "could not release the source's lock after a move");
        }
    }
    result
}

async fn move_locked(
    from: &dyn TokenStore,
    to: &dyn TokenStore,
    key: &TokenKey,
    options: &MoveOptions,
) -> Result<(), TransferError> {
    let mut source = load_source(from, key).await?;
    let mut dest_version = destination_version(to, key, options.overwrite).await?;
    for _ in 0..ATTEMPTS {
        dest_version = Some(save_to_destination(to, key, &source.1, dest_version).await?);
        let at = options.at.unwrap_or_else(SystemTime::now);
        let marked = source.1.clone().into_moved(&options.destination, at);
        match from
            .save(key, &marked, Some(source.0))
            .await
            .map_err(store_error(key, Side::Source))?
        {
            Cas::Saved(_) => return Ok(()),
            // Refreshed (or changed) in the source since it was read: copy the newer record.
            Cas::Conflict => source = load_source(from, key).await?,
        }
    }
    Err(TransferError::KeptChanging { key: key.clone() })
}

/// Copies `key` from `from` to `to` without marking the source. A grant with a refresh token
/// is copied only with `allow_refresh_token` (see [`TransferError::HasRefreshToken`]); a grant
/// the destination already has, only with `overwrite`.
///
/// # Errors
///
/// See [`TransferError`].
pub async fn copy_grant(
    from: &dyn TokenStore,
    to: &dyn TokenStore,
    key: &TokenKey,
    overwrite: bool,
    allow_refresh_token: bool,
) -> Result<(), TransferError> {
    let (_, record) = load_source(from, key).await?;
    if record.tokens().refresh_token().is_some() && !allow_refresh_token {
        return Err(TransferError::HasRefreshToken { key: key.clone() });
    }
    let version = destination_version(to, key, overwrite).await?;
    save_to_destination(to, key, &record, version).await?;
    Ok(())
}

/// One grant as exported: its key and whole record, secrets included. Serialized as one JSON
/// object (`{"key": …, "record": …}`), a line of an export file; its `Debug` shows no secret.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExportedGrant {
    /// The grant's key.
    pub key: TokenKey,
    /// The stored record.
    pub record: GrantRecord,
}

impl ExportedGrant {
    /// A grant to import.
    pub fn new(key: TokenKey, record: GrantRecord) -> Self {
        Self { key, record }
    }
}

impl fmt::Debug for ExportedGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportedGrant")
            .field("key", &self.key)
            .field("record", &self.record)
            .finish()
    }
}

/// Every grant of `store`, in key order: all or nothing (an export missing a grant it could not
/// read would look complete).
///
/// # Errors
///
/// The first store error, as [`TransferError::Listing`] or [`TransferError::Store`].
pub async fn export_grants(store: &dyn TokenStore) -> Result<Vec<ExportedGrant>, TransferError> {
    let mut keys = store.keys().await.map_err(TransferError::Listing)?;
    keys.sort();
    let mut grants = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(loaded) = store
            .load(&key)
            .await
            .map_err(store_error(&key, Side::Source))?
        {
            grants.push(ExportedGrant::new(key, loaded.value));
        }
    }
    Ok(grants)
}

/// Writes `grants` into `store`. Every key is checked first: a grant the store already has is
/// refused (nothing written) unless `overwrite`. Returns how many were written.
///
/// # Errors
///
/// [`TransferError::Exists`] before anything is written; [`TransferError::Store`], or
/// [`TransferError::ChangedInDestination`] if a grant changed in the store during the import
/// (it and the ones after it are not written).
pub async fn import_grants(
    store: &dyn TokenStore,
    grants: &[ExportedGrant],
    overwrite: bool,
) -> Result<usize, TransferError> {
    let mut versions = Vec::with_capacity(grants.len());
    for grant in grants {
        versions.push(destination_version(store, &grant.key, overwrite).await?);
    }
    for (grant, version) in grants.iter().zip(versions) {
        save_to_destination(store, &grant.key, &grant.record, version).await?;
    }
    Ok(grants.len())
}

/// The source record and its version; refuses a record already marked moved.
async fn load_source(
    store: &dyn TokenStore,
    key: &TokenKey,
) -> Result<(Version, GrantRecord), TransferError> {
    let loaded = store
        .load(key)
        .await
        .map_err(store_error(key, Side::Source))?
        .ok_or_else(|| TransferError::NotFound { key: key.clone() })?;
    if let Some(to) = loaded.value.moved_to() {
        return Err(TransferError::AlreadyMoved {
            key: key.clone(),
            to: to.to_owned(),
        });
    }
    Ok((loaded.version, loaded.value))
}

/// The destination's version of `key`, if it has one: refused unless `overwrite`, or the
/// destination's record is only the marker of an earlier move out of it.
async fn destination_version(
    to: &dyn TokenStore,
    key: &TokenKey,
    overwrite: bool,
) -> Result<Option<Version>, TransferError> {
    match to
        .load(key)
        .await
        .map_err(store_error(key, Side::Destination))?
    {
        Some(existing) if existing.value.moved_to().is_some() || overwrite => {
            Ok(Some(existing.version))
        }
        Some(_) => Err(TransferError::Exists { key: key.clone() }),
        None => Ok(None),
    }
}

async fn save_to_destination(
    to: &dyn TokenStore,
    key: &TokenKey,
    record: &GrantRecord,
    expected: Option<Version>,
) -> Result<Version, TransferError> {
    match to
        .save(key, record, expected)
        .await
        .map_err(store_error(key, Side::Destination))?
    {
        Cas::Saved(version) => Ok(version),
        Cas::Conflict => Err(TransferError::ChangedInDestination { key: key.clone() }),
    }
}
