//! Lock files: a `flock` per lock, on a file its holder removes on release.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use super::fsio::{blocking, io_error};
use crate::error::{StoreError, StoreErrorKind};
use crate::store::RefreshLock;
use crate::token::TokenKey;

/// Takes the `flock` of the lock file `path` (the `what` lock of `key`, for the error),
/// polling with a short async backoff (never blocking the runtime or a thread) for at most
/// `wait`, then fails with [`StoreErrorKind::LockTimeout`].
pub(super) async fn acquire(
    path: PathBuf,
    wait: Duration,
    what: &'static str,
    key: &TokenKey,
) -> Result<LockedFile, StoreError> {
    let deadline = crate::store::lock_deadline(wait);
    let mut pause = Duration::from_millis(2);
    loop {
        let attempt = {
            let path = path.clone();
            blocking(move || LockedFile::try_lock(&path)).await?
        };
        let busy = match attempt {
            Attempt::Locked(held) => return Ok(held),
            // Removed by its holder meanwhile: the new file may well be free.
            Attempt::Stale => false,
            Attempt::Busy => true,
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(StoreError::with_kind(
                StoreErrorKind::LockTimeout,
                format!(
                    "the {what} lock of `{key}` was held by another process for more than {:?}",
                    wait
                ),
            ));
        }
        let sleep = if busy {
            let this = pause + pause.mul_f64(fastrand::f64() * 0.5);
            pause = (pause * 2).min(Duration::from_millis(50));
            this
        } else {
            Duration::from_millis(1) // Try the new file soon, without spinning.
        };
        tokio::time::sleep(sleep.min(deadline - now)).await;
    }
}

/// A held `flock` on a lock file, which is removed when the lock is released or dropped (on
/// Unix; elsewhere it is left in place), so lock files do not pile up.
///
/// Removing a lock file is only safe because every taker checks, once it holds the `flock`,
/// that the path still names the file it locked: a waiter that opened the file before its
/// holder removed it then holds a lock on a file no one else will ever open, sees that, and
/// starts again on the path's new file. Only a checked holder removes the file, while still
/// holding its `flock`.
pub(super) struct LockedFile {
    /// Holds the `flock` until closed.
    _file: File,
    /// `None` once removed.
    path: Option<PathBuf>,
}

pub(super) enum Attempt {
    Locked(LockedFile),
    Busy,
    Stale,
}

impl LockedFile {
    pub(super) fn try_lock(path: &Path) -> Result<Attempt, StoreError> {
        let file = open_lock_file(path)?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => return Ok(Attempt::Busy),
            Err(fs4::TryLockError::Error(e)) => return Err(io_error("lock", path, e)),
        }
        if !names_file(path, &file)? {
            return Ok(Attempt::Stale);
        }
        Ok(Attempt::Locked(Self {
            _file: file,
            path: Some(path.to_path_buf()),
        }))
    }

    /// Removes the file while its `flock` is still held (closing the file releases it).
    fn remove(&mut self) -> Result<(), StoreError> {
        let Some(path) = self.path.take() else {
            return Ok(());
        };
        #[cfg(unix)]
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_error("remove", &path, e));
            }
            _ => {}
        }
        #[cfg(not(unix))]
        let _ = path;
        Ok(())
    }
}

impl Drop for LockedFile {
    fn drop(&mut self) {
        // Then the file is closed, which releases the `flock`.
        let _ = self.remove();
    }
}

/// The refresh lock is a [`LockedFile`]; releasing removes the file and unlocks.
#[async_trait]
impl RefreshLock for LockedFile {
    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        self.remove()
    }
}

/// Whether `path` still names the open `file` (same device and inode).
#[cfg(unix)]
fn names_file(path: &Path, file: &File) -> Result<bool, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let held = file.metadata().map_err(|e| io_error("inspect", path, e))?;
    match fs::metadata(path) {
        Ok(named) => Ok(named.dev() == held.dev() && named.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("inspect", path, e)),
    }
}

/// Lock files are never removed off Unix, so the path always names the file.
#[cfg(not(unix))]
fn names_file(_path: &Path, _file: &File) -> Result<bool, StoreError> {
    Ok(true)
}

pub(super) fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(|e| io_error("open", path, e))
}
