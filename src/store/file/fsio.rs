//! File-system helpers: blocking work off the runtime, durable writes, typed I/O errors.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::{StoreError, StoreErrorKind};

/// Runs blocking file-system work off the async runtime.
pub(super) async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::new(format!("file store task failed: {e}")))?
}

/// Creates `path` anew (mode `0600`) with `bytes`, fsynced.
pub(super) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    // A leftover from a crash (or a file someone else created) is replaced by a new file,
    // so the mode below always applies.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_error("remove", path, e));
        }
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| io_error("create", path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", path, e))
}

/// Makes a rename in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync the directory", dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// An I/O failure on a path, as the source of a [`StoreError`].
#[derive(Debug, thiserror::Error)]
#[error("cannot {action}{}", path.as_ref().map(|p| format!(" `{}`", p.display())).unwrap_or_default())]
struct IoError {
    action: &'static str,
    path: Option<PathBuf>,
    #[source]
    source: io::Error,
}

pub(super) fn io_error(action: &'static str, path: &Path, source: io::Error) -> StoreError {
    let kind = match source.kind() {
        io::ErrorKind::NotFound => StoreErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => StoreErrorKind::PermissionDenied,
        _ => StoreErrorKind::Backend,
    };
    StoreError::with_kind(
        kind,
        IoError {
            action,
            path: Some(path.to_path_buf()),
            source,
        },
    )
}
