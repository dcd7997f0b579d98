//! The file store: one file per grant in a directory, shared safely between processes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{StoreError, StoreErrorKind};
use crate::store::{json_position, Cas, GrantRecord, RefreshLock, TokenStore, Version, Versioned};
use crate::token::TokenKey;

mod fsio;
mod lock;
mod names;

use self::fsio::{blocking, io_error, replace_file, sync_dir};
use self::lock::{acquire, Attempt, LockedFile};
use self::names::{decode_key, file_name, is_hashed_name, key_in_file};

/// Marks a file as written by this store.
const FORMAT: &str = "tokenkeeper.grant";
/// The newest file layout this version reads and the one it writes.
const FORMAT_VERSION: u32 = 1;
/// How long a lock waits for another holder by default: longer than the manager's default
/// lock ttl (60 s), so a peer outwaits a whole refresh of the holder.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(75);
/// The file holding the highest version of every grant deleted from the directory.
const FLOOR: &str = ".version";
/// Locked while the floor is raised.
const FLOOR_LOCK: &str = ".version.lock";
/// The next floor while it is being written.
const FLOOR_TMP: &str = ".version.tmp";

/// A [`TokenStore`] that keeps each grant in its own file in a directory, for apps whose
/// processes share a machine (a CLI and its cron job, a few workers) and must survive restarts.
///
/// # Layout
///
/// A key becomes a file name by percent-encoding: `a`–`z`, `0`–`9`, `-` and `_` are kept, every
/// other byte of the key's UTF-8 (upper-case letters too, so that case-insensitive file
/// systems cannot merge two keys) becomes `%XX`; the empty key is `%`. So the key
/// `Customer-42` lives in:
///
/// | file | holds |
/// |---|---|
/// | `%43ustomer-42.json` | the grant: `{"format":"tokenkeeper.grant","version":…,"key":…,"record":…}` |
/// | `%43ustomer-42.json.tmp` | the next version while it is being written (left over only by a crash) |
/// | `%43ustomer-42.lock` | locked while a save or delete compares versions and writes; removed after |
/// | `%43ustomer-42.refresh` | the cross-process refresh lock ([`TokenStore::lock`]); removed on release |
/// | `.version` | the highest version of any grant deleted from the directory (one per directory) |
/// | `.version.lock` | locked while a delete raises `.version`; removed after |
///
/// So the directory holds one file per stored grant, plus `.version`, plus a lock file per
/// key being locked right now. A process killed while holding a lock or writing leaves its
/// file behind until the key is next locked, written or deleted.
///
/// A key whose encoded name would exceed 240 bytes (file systems allow 255, suffix included)
/// is named `%%` followed by the SHA-256 of its UTF-8 in lower-case hex instead (66 bytes);
/// the key itself is in the file, which is checked on every read. So every key up to
/// [`TokenKey::MAX_LEN`] bytes works, whatever its characters; a longer one is refused with
/// [`StoreErrorKind::InvalidKey`], as by every built-in store. Every file is created with mode
/// `0600` on Unix; [`FileStore::create`] makes the directory `0700`.
///
/// # Crash safety
///
/// A save writes the temporary file, fsyncs it, renames it over the grant file and fsyncs the
/// directory, so a crash at any point leaves the previous or the new record, never a torn one.
/// Loads take no lock: a rename is atomic.
///
/// # Versions and compare-and-swap
///
/// A save or delete holds an exclusive advisory lock (`flock`, through the `fs4` crate) on the
/// key's `.lock` file while it reads the stored version, compares it and writes, so
/// compare-and-swap holds between threads and processes. Taking it waits at most
/// [`with_lock_wait`](Self::with_lock_wait), like the refresh lock, then fails with
/// [`StoreErrorKind::LockTimeout`], so a hung process cannot block others forever.
///
/// A delete first raises `.version` to the deleted grant's version (under `.version.lock`),
/// then removes the grant file; a save of an absent key starts above `.version`. So a version
/// is never reused for a key, and no *tombstone* is left per deleted key. (Earlier versions of
/// this store left tombstones, files with `"deleted": true`; they are still honoured, and
/// removed by the next delete of their key.) Every process sharing a directory must run a
/// version of this store that keeps `.version`: an older one would start a re-inserted key
/// from version 1.
///
/// # Lock files
///
/// Lock files are removed by their holder on release (on Unix). That is safe with `flock`
/// because a taker, once it holds the `flock`, checks that the path still names the file it
/// locked (same device and inode) and otherwise starts again: a waiter that opened the file
/// before its holder removed it never mistakes that orphan for the lock. Elsewhere lock files
/// are kept.
///
/// # The refresh lock
///
/// [`lock`](TokenStore::lock) takes an exclusive `flock` on the key's `.refresh` file, polling
/// with a short async backoff (it never blocks the runtime or a thread) for at most
/// [`with_lock_wait`](Self::with_lock_wait) (75 s by default), then fails with
/// [`StoreErrorKind::LockTimeout`]. It is released by [`RefreshLock::release`], when the lock
/// is dropped, and by the operating system when the process dies, even by `kill -9`; so the
/// `ttl` argument does not apply. Advisory locks are only as good as the file system's: use a
/// local directory, not a network share.
///
/// # Errors
///
/// - A file that is not a grant written by this store (corrupt, truncated by hand, foreign) is
///   [`StoreErrorKind::Corrupt`] for load, save and delete alike: it is never written over.
///   Move it away by hand to recover the key.
/// - A missing directory is [`StoreErrorKind::NotFound`]; a file or directory this process may
///   not read or write is [`StoreErrorKind::PermissionDenied`].
///
/// # Example
///
/// ```
/// use tokenkeeper::{AccessToken, Cas, FileStore, GrantRecord, TokenKey, TokenSet, TokenStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = std::env::temp_dir().join(format!("tokenkeeper-doc-{}", std::process::id()));
/// # let dir = tmp.join("grants");
/// let store = FileStore::create(&dir)?; // `FileStore::open` if it must already exist
/// let key = TokenKey::from("customer-42");
/// let record = GrantRecord::new(TokenSet::new(AccessToken::new("access-token")));
/// assert!(matches!(store.save(&key, &record, None).await?, Cas::Saved(_)));
/// assert_eq!(store.keys().await?, vec![key]);
/// # std::fs::remove_dir_all(&tmp)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    lock_wait: Duration,
}

impl FileStore {
    /// A store in the existing directory `dir`.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::NotFound`] if `dir` does not exist or is not a directory,
    /// [`StoreErrorKind::PermissionDenied`] if it cannot be read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => Ok(Self {
                dir: dir.to_path_buf(),
                lock_wait: DEFAULT_LOCK_WAIT,
            }),
            Ok(_) => Err(StoreError::with_kind(
                StoreErrorKind::NotFound,
                format!("`{}` is not a directory", dir.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::with_kind(
                StoreErrorKind::NotFound,
                format!(
                    "directory `{}` does not exist (FileStore::create makes it)",
                    dir.display()
                ),
            )),
            Err(e) => Err(io_error("open the directory", dir, e)),
        }
    }

    /// A store in `dir`, creating it (and its parents) with mode `0700` on Unix if missing.
    /// An existing directory is used as it is.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open), and when the directory cannot be created.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|e| io_error("create the directory", dir, e))?;
        Self::open(dir)
    }

    /// How long taking a lock waits for another holder before failing with
    /// [`StoreErrorKind::LockTimeout`]: the refresh lock ([`lock`](TokenStore::lock)) and the
    /// write lock of a save or delete.
    ///
    /// Default 75 s: longer than the manager's default
    /// [`lock_ttl`](crate::TokenManagerBuilder::lock_ttl) of 60 s, so a process outwaits a
    /// peer's whole refresh rather than failing while it completes. Keep it above the longest
    /// refresh (the provider's request timeout) if you shorten it.
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// The directory holding the grants.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn paths(&self, key: &TokenKey) -> Result<Paths, StoreError> {
        StoreError::check_key(key)?;
        let name = file_name(key.as_str());
        let file = |suffix: &str| self.dir.join(format!("{name}.{suffix}"));
        Ok(Paths {
            dir: self.dir.clone(),
            key: key.clone(),
            record: file("json"),
            tmp: file("json.tmp"),
            cas_lock: file("lock"),
            refresh_lock: file("refresh"),
        })
    }
}

#[async_trait]
impl TokenStore for FileStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        // One small file of a local directory, read on the caller's task: a few microseconds
        // from the page cache, where a trip through the blocking pool costs several times that.
        // (Writes, with their fsyncs and locks, go to the blocking pool.)
        let paths = self.paths(key)?;
        Ok(paths.read()?.and_then(|entry| {
            entry.record.map(|value| Versioned {
                version: entry.version,
                value,
            })
        }))
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        let paths = self.paths(key)?;
        let record = record.clone();
        let guard = acquire(paths.cas_lock.clone(), self.lock_wait, "write", key).await?;
        blocking(move || {
            let _guard = guard;
            let stored = paths.read()?;
            let current = stored
                .as_ref()
                .filter(|e| e.record.is_some())
                .map(|e| e.version);
            if current != expected {
                return Ok(Cas::Conflict);
            }
            // A deleted grant raised the floor (or, written by an older version, left a
            // tombstone with its last version), so versions are never reused.
            let last = match stored {
                Some(entry) => entry.version,
                None => read_floor(&paths.dir)?,
            };
            let version = last
                .checked_add(1)
                .ok_or_else(|| StoreError::new("version counter exhausted"))?;
            paths.write(version, &record)?;
            Ok(Cas::Saved(version))
        })
        .await
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        let paths = self.paths(key)?;
        let guard = acquire(paths.cas_lock.clone(), self.lock_wait, "write", key).await?;
        let floor_lock = self.dir.join(FLOOR_LOCK);
        let floor_guard = acquire(floor_lock, self.lock_wait, "version floor", key).await?;
        blocking(move || {
            let _guards = (guard, floor_guard);
            let entry = paths.read()?;
            paths.remove_leftovers();
            let Some(entry) = entry else {
                return Ok(false);
            };
            // Raised first: a crash before the removal leaves the grant, never a lower floor.
            raise_floor(&paths.dir, entry.version)?;
            match fs::remove_file(&paths.record) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_error("remove", &paths.record, e));
                }
                _ => {}
            }
            sync_dir(&paths.dir)?;
            // A tombstone (from an older version) is removed too, but was no record.
            Ok(entry.record.is_some())
        })
        .await
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        let store = self.clone();
        blocking(move || {
            let entries = fs::read_dir(&store.dir).map_err(|e| io_error("list", &store.dir, e))?;
            let mut keys = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_error("list", &store.dir, e))?;
                let name = entry.file_name();
                let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue; // Not a grant file (a lock, a temporary file, something else).
                };
                let key = match decode_key(stem) {
                    Some(key) => key,
                    // A long key: the file says which.
                    None if is_hashed_name(stem) => match key_in_file(&entry.path(), stem) {
                        Some(key) => key,
                        None => continue,
                    },
                    None => continue,
                };
                let key = TokenKey::from(key);
                let Ok(paths) = store.paths(&key) else {
                    continue;
                };
                match paths.read() {
                    // Deleted (a tombstone), or deleted since the listing.
                    Ok(None) | Ok(Some(Entry { record: None, .. })) => {}
                    Ok(Some(_)) => keys.push(key),
                    // Listed, so that loading it reports the problem.
                    Err(e) if e.kind() == StoreErrorKind::Corrupt => keys.push(key),
                    Err(e) => return Err(e),
                }
            }
            keys.sort();
            Ok(keys)
        })
        .await
    }

    /// An exclusive `flock` on the key's `.refresh` file. The `ttl` does not apply: the
    /// operating system releases the lock when its holder exits or is killed.
    async fn lock(
        &self,
        key: &TokenKey,
        _ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        let paths = self.paths(key)?;
        let held = acquire(paths.refresh_lock, self.lock_wait, "refresh", key).await?;
        Ok(Some(Box::new(held)))
    }
}

/// The highest version of any grant deleted from `dir` (0 if none).
fn read_floor(dir: &Path) -> Result<Version, StoreError> {
    let path = dir.join(FLOOR);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            StoreError::corrupt(format!(
                "`{}` does not hold a version; nothing was written over it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error("read", &path, e)),
    }
}

/// Raises the floor to `version` (atomically, durably). Call with the floor lock held.
fn raise_floor(dir: &Path, version: Version) -> Result<(), StoreError> {
    if read_floor(dir)? >= version {
        return Ok(());
    }
    let (path, tmp) = (dir.join(FLOOR), dir.join(FLOOR_TMP));
    replace_file(&tmp, version.to_string().as_bytes())?;
    fs::rename(&tmp, &path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error("rename into place", &path, e)
    })?;
    sync_dir(dir)
}

/// The paths of one key's files.
struct Paths {
    dir: PathBuf,
    key: TokenKey,
    record: PathBuf,
    tmp: PathBuf,
    cas_lock: PathBuf,
    refresh_lock: PathBuf,
}

/// What a grant file holds: a record, or a tombstone (`record: None`) keeping the version.
struct Entry {
    version: Version,
    record: Option<GrantRecord>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    format: &'static str,
    format_version: u32,
    key: &'a str,
    version: Version,
    record: &'a GrantRecord,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    format: String,
    format_version: u32,
    key: String,
    version: Version,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    record: Option<GrantRecord>,
}

impl Paths {
    /// Removes what a killed process may have left of the key: its temporary file (written
    /// only under the write lock, which the caller holds) and its refresh lock file if no one
    /// holds it. Best effort: a failure leaves the file for next time.
    fn remove_leftovers(&self) {
        let _ = fs::remove_file(&self.tmp);
        if self.refresh_lock.exists() {
            if let Ok(Attempt::Locked(orphan)) = LockedFile::try_lock(&self.refresh_lock) {
                drop(orphan); // Removes it.
            }
        }
    }

    fn read(&self) -> Result<Option<Entry>, StoreError> {
        let bytes = match fs::read(&self.record) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Tell a missing key from a missing directory.
                return match fs::metadata(&self.dir) {
                    Ok(_) => Ok(None),
                    Err(e) => Err(io_error("open the directory", &self.dir, e)),
                };
            }
            Err(e) => return Err(io_error("read", &self.record, e)),
        };
        let corrupt = |why: String| {
            StoreError::corrupt(format!(
                "`{}` is not a grant file of this store: {why}; nothing was written over it",
                self.record.display()
            ))
        };
        let envelope: EnvelopeIn =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(json_position(&e)))?;
        if envelope.format != FORMAT {
            return Err(corrupt("unknown format".into()));
        }
        if envelope.format_version > FORMAT_VERSION {
            return Err(corrupt(format!(
                "written by a newer version (format {})",
                envelope.format_version
            )));
        }
        if envelope.key != self.key.as_str() {
            return Err(corrupt(format!("it holds the key `{}`", envelope.key)));
        }
        if envelope.deleted == envelope.record.is_some() {
            return Err(corrupt("neither a record nor a tombstone".into()));
        }
        Ok(Some(Entry {
            version: envelope.version,
            record: envelope.record,
        }))
    }

    /// Replaces the grant file atomically: temporary file, fsync, rename, fsync of the
    /// directory. Call with the write lock held (the temporary file's name is per key).
    fn write(&self, version: Version, record: &GrantRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(&EnvelopeOut {
            format: FORMAT,
            format_version: FORMAT_VERSION,
            key: self.key.as_str(),
            version,
            record,
        })
        .map_err(|e| StoreError::new(format!("cannot encode the record: {e}")))?;
        let result = self.write_tmp(&bytes).and_then(|()| {
            fs::rename(&self.tmp, &self.record)
                .map_err(|e| io_error("rename into place", &self.record, e))
        });
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result?;
        sync_dir(&self.dir)
    }

    fn write_tmp(&self, bytes: &[u8]) -> Result<(), StoreError> {
        replace_file(&self.tmp, bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::lock::open_lock_file;
    use super::names::{encode_key, keeps};
    use super::*;
    use crate::token::{AccessToken, TokenSet};

    fn record(at: &str) -> GrantRecord {
        GrantRecord::new(TokenSet::new(AccessToken::new(at)))
    }

    fn store() -> (tempfile::TempDir, FileStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::create(tmp.path().join("grants")).unwrap();
        (tmp, store)
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_store_contract() {
        let (_tmp, store) = store();
        crate::testing::assert_store_has_lock(&store).await;
        assert!(
            store.keys().await.unwrap().is_empty(),
            "tombstones are not listed"
        );
    }

    #[tokio::test]
    async fn versions_are_never_reused_after_delete_even_across_reopen() {
        let (_tmp, store) = store();
        let key = TokenKey::from("k");
        let mut seen = Vec::new();
        for round in 0..3 {
            let Cas::Saved(v) = store.save(&key, &record("a"), None).await.unwrap() else {
                panic!()
            };
            seen.push(v);
            assert!(store.delete(&key).await.unwrap());
            if round == 1 {
                // A restart: nothing is kept in memory.
                let reopened = FileStore::open(store.dir()).unwrap();
                let Cas::Saved(v) = reopened.save(&key, &record("b"), None).await.unwrap() else {
                    panic!()
                };
                seen.push(v);
                assert!(reopened.delete(&key).await.unwrap());
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, store) = store();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        let key = TokenKey::from("k");
        store.save(&key, &record("a"), None).await.unwrap();
        let gone = TokenKey::from("j");
        store.save(&gone, &record("a"), None).await.unwrap();
        store.delete(&gone).await.unwrap();
        let lock = store.lock(&key, Duration::from_secs(1)).await.unwrap();
        let mut names = Vec::new();
        for entry in fs::read_dir(store.dir()).unwrap() {
            let entry = entry.unwrap();
            names.push(entry.file_name().into_string().unwrap());
            assert_eq!(mode(&entry.path()), 0o600, "{:?}", entry.path());
        }
        names.sort();
        assert_eq!(
            names,
            [".version", "k.json", "k.refresh"],
            "the write lock files are gone"
        );
        drop(lock);
    }

    #[tokio::test]
    async fn a_corrupt_or_foreign_file_is_an_error_and_never_overwritten() {
        let (_tmp, store) = store();
        let key = TokenKey::from("k");
        let path = store.dir().join("k.json");
        let foreign = [
            &b"{\"access_token\": \"sec"[..],          // torn
            b"",                                       // empty
            b"\x00\xff not json",                      // binary
            br#"{"access_token":"a","version":1}"#,    // someone else's JSON
            br#"{"format":"tokenkeeper.grant","format_version":1,"key":"other","version":1,"record":null,"deleted":true}"#,
        ];
        for contents in foreign {
            fs::write(&path, contents).unwrap();
            let err = store.load(&key).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt);
            for expected in [None, Some(1), Some(2)] {
                let err = store
                    .save(&key, &record("new"), expected)
                    .await
                    .unwrap_err();
                assert_eq!(err.kind(), StoreErrorKind::Corrupt);
            }
            let err = store.delete(&key).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt);
            assert_eq!(fs::read(&path).unwrap(), contents, "never written over");
            // Listed, so that loading it reports the problem.
            assert_eq!(store.keys().await.unwrap(), vec![key.clone()]);
        }
    }

    #[tokio::test]
    async fn corrupt_errors_do_not_quote_the_file() {
        let (_tmp, store) = store();
        let key = TokenKey::from("k");
        let mut record = serde_json::to_value(EnvelopeOut {
            format: FORMAT,
            format_version: FORMAT_VERSION,
            key: "k",
            version: 1,
            record: &record("a"),
        })
        .unwrap();
        // A value in the wrong place: serde_json would quote it in its message.
        record["version"] = serde_json::json!("super-secret-value");
        let quoted = serde_json::from_value::<EnvelopeIn>(record.clone())
            .err()
            .unwrap();
        assert!(quoted.to_string().contains("super-secret-value"));
        fs::write(store.dir().join("k.json"), record.to_string()).unwrap();
        let err = store.load(&key).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        let mut text = format!("{err} {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(text.contains("k.json"), "{text}");
        assert!(!text.contains("super-secret-value"), "{text}");
    }

    #[tokio::test]
    async fn a_missing_directory_is_a_typed_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nope");
        let err = FileStore::open(&dir).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::NotFound);
        assert!(std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("does not exist"),);
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        assert_eq!(
            FileStore::open(&file).unwrap_err().kind(),
            StoreErrorKind::NotFound
        );

        // Removed under a running store: an error, not an empty store.
        let store = FileStore::create(&dir).unwrap();
        fs::remove_dir(&dir).unwrap();
        let key = TokenKey::from("k");
        assert_eq!(
            store.load(&key).await.unwrap_err().kind(),
            StoreErrorKind::NotFound
        );
        assert_eq!(
            store
                .save(&key, &record("a"), None)
                .await
                .unwrap_err()
                .kind(),
            StoreErrorKind::NotFound
        );
        assert_eq!(
            store.keys().await.unwrap_err().kind(),
            StoreErrorKind::NotFound
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn permission_problems_are_typed() {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            io_error(
                "read",
                Path::new("x"),
                io::ErrorKind::PermissionDenied.into()
            )
            .kind(),
            StoreErrorKind::PermissionDenied
        );
        let (_tmp, store) = store();
        let key = TokenKey::from("k");
        store.save(&key, &record("a"), None).await.unwrap();
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o500)).unwrap();
        let denied = fs::write(store.dir().join("probe"), b"").is_err();
        let result = store.save(&key, &record("b"), Some(1)).await;
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o700)).unwrap();
        // Root ignores file modes; the check only means something for other users.
        if denied {
            assert_eq!(result.unwrap_err().kind(), StoreErrorKind::PermissionDenied);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_compare_and_swap_has_one_winner_per_version() {
        let (_tmp, store) = store();
        // Two instances on one directory behave like two processes.
        let other = FileStore::open(store.dir()).unwrap();
        crate::testing::assert_one_winner_per_version(Arc::new(store), Arc::new(other)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_lock_is_exclusive_until_released_or_dropped() {
        let (_tmp, store) = store();
        let other = FileStore::open(store.dir())
            .unwrap()
            .with_lock_wait(Duration::from_secs(5));
        let key = TokenKey::from("k");
        let ttl = Duration::from_secs(60);
        let held = store.lock(&key, ttl).await.unwrap().unwrap();
        let err = other.lock(&key, ttl).await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::LockTimeout);
        // Another key is independent.
        other
            .lock(&TokenKey::from("j"), ttl)
            .await
            .unwrap()
            .unwrap();

        let waiter = tokio::spawn(async move { other.lock(&key, ttl).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        held.release().await.unwrap();
        let held = waiter.await.unwrap().unwrap().unwrap();
        drop(held);
        let again = store.lock(&TokenKey::from("k"), ttl).await.unwrap();
        assert!(again.is_some(), "dropping the lock releases it");
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[tokio::test(start_paused = true)]
    async fn the_directory_stays_bounded() {
        let (_tmp, store) = store();
        let ttl = Duration::from_secs(60);
        for i in 0..200 {
            let key = TokenKey::from(format!("k{i}"));
            let lock = store.lock(&key, ttl).await.unwrap().unwrap();
            let Cas::Saved(v) = store.save(&key, &record("a"), None).await.unwrap() else {
                panic!()
            };
            store.save(&key, &record("b"), Some(v)).await.unwrap();
            if i % 2 == 0 {
                lock.release().await.unwrap();
            } else {
                drop(lock);
            }
            assert!(store.delete(&key).await.unwrap());
            // A deleted key's next version is above every version it had.
            let Cas::Saved(again) = store.save(&key, &record("c"), None).await.unwrap() else {
                panic!()
            };
            assert!(again > v + 1, "{v} then {again}");
            assert!(store.delete(&key).await.unwrap());
        }
        let names = file_names(store.dir());
        assert!(names.len() <= 1, "{names:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn delete_removes_what_a_crash_left_of_the_key() {
        let (_tmp, store) = store();
        let key = TokenKey::from("k");
        store.save(&key, &record("a"), None).await.unwrap();
        // A process killed mid-write and mid-refresh.
        fs::write(store.dir().join("k.json.tmp"), b"{\"torn").unwrap();
        fs::write(store.dir().join("k.refresh"), b"").unwrap();
        assert!(store.delete(&key).await.unwrap());
        assert_eq!(file_names(store.dir()), [".version"]);

        // A refresh lock in use is left alone.
        store.save(&key, &record("a"), None).await.unwrap();
        let held = store.lock(&key, Duration::from_secs(60)).await.unwrap();
        assert!(store.delete(&key).await.unwrap());
        assert_eq!(file_names(store.dir()), [".version", "k.refresh"]);
        drop(held);
        assert_eq!(file_names(store.dir()), [".version"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_legacy_tombstone_still_keeps_its_version() {
        let (_tmp, store) = store();
        let key = TokenKey::from("k");
        let tombstone = br#"{"format":"tokenkeeper.grant","format_version":1,"key":"k","version":7,"deleted":true}"#;
        fs::write(store.dir().join("k.json"), tombstone).unwrap();
        assert!(store.load(&key).await.unwrap().is_none());
        assert!(!store.delete(&key).await.unwrap());
        let Cas::Saved(v) = store.save(&key, &record("a"), None).await.unwrap() else {
            panic!()
        };
        assert!(v > 7, "{v}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unbounded_lock_wait_does_not_panic() {
        let (_tmp, store) = store();
        let store = store.with_lock_wait(Duration::MAX);
        let key = TokenKey::from("k");
        store.save(&key, &record("a"), None).await.unwrap();
        let lock = store.lock(&key, Duration::MAX).await.unwrap().unwrap();
        lock.release().await.unwrap();
    }

    #[test]
    fn default_lock_wait_outlasts_the_managers_lock_ttl() {
        let (_tmp, store) = store();
        assert!(store.lock_wait > Duration::from_secs(60), "{store:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_wait_for_the_write_lock_at_most_lock_wait() {
        let (_tmp, store) = store();
        let store = store.with_lock_wait(Duration::from_secs(5));
        let key = TokenKey::from("k");
        let Cas::Saved(v) = store.save(&key, &record("a"), None).await.unwrap() else {
            panic!()
        };
        // Another process holds the write lock (and hangs).
        let held = open_lock_file(&store.dir().join("k.lock")).unwrap();
        fs4::FileExt::lock(&held).unwrap();
        let err = store.save(&key, &record("b"), Some(v)).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::LockTimeout);
        let err = store.delete(&key).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::LockTimeout);
        drop(held);
        assert!(matches!(
            store.save(&key, &record("b"), Some(v)).await.unwrap(),
            Cas::Saved(_)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removing_lock_files_keeps_locks_exclusive() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (_tmp, store) = store();
        let stores = [store.clone(), FileStore::open(store.dir()).unwrap()];
        let inside = Arc::new(AtomicUsize::new(0));
        let entered = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = stores[i % 2].clone();
                let (inside, entered) = (Arc::clone(&inside), Arc::clone(&entered));
                tokio::spawn(async move {
                    let key = TokenKey::from("k");
                    for _ in 0..50 {
                        let lock = store.lock(&key, Duration::from_secs(60)).await.unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        entered.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        lock.unwrap().release().await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(entered.load(Ordering::SeqCst), 400);
        assert!(file_names(store.dir()).is_empty());
    }

    #[tokio::test]
    async fn keys_map_to_safe_file_names_and_back() {
        let (_tmp, store) = store();
        let keys = [
            "",
            "customer-42",
            "Customer-42",
            "a.b",
            "../../etc/passwd",
            "a/b\\c",
            "%41",
            "%",
            "user@example.com",
            "ключ",
            "tab\there\n",
            ".json",
        ];
        for (i, k) in keys.iter().enumerate() {
            let name = encode_key(k);
            assert!(
                name.bytes()
                    .all(|b| keeps(b) || b == b'%' || b.is_ascii_hexdigit()),
                "{name}"
            );
            assert!(!name.contains('.') && !name.contains('/'), "{name}");
            assert_eq!(decode_key(&name).as_deref(), Some(*k), "{name}");
            store
                .save(&TokenKey::from(*k), &record(&i.to_string()), None)
                .await
                .unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            let loaded = store.load(&TokenKey::from(*k)).await.unwrap().unwrap();
            assert_eq!(loaded.value, record(&i.to_string()), "{k:?}");
        }
        // Files that are not canonical names of a key are not ours.
        for foreign in [
            "README", "%61.json", "%4a.json", "A.json", "x.y.json", "%.tmp",
        ] {
            fs::write(store.dir().join(foreign), b"{}").unwrap();
        }
        let mut listed = store.keys().await.unwrap();
        let mut expected: Vec<TokenKey> = keys.iter().map(|k| TokenKey::from(*k)).collect();
        listed.sort();
        expected.sort();
        assert_eq!(listed, expected);

        // Long keys get a hashed file name; every name stays within 255 bytes.
        let longest = [
            TokenKey::from("x".repeat(TokenKey::MAX_LEN)),
            TokenKey::from("/".repeat(TokenKey::MAX_LEN)),
            TokenKey::from("é".repeat(TokenKey::MAX_LEN / 2)),
            TokenKey::from("x".repeat(241)),
        ];
        for (i, key) in longest.iter().enumerate() {
            store
                .save(key, &record(&i.to_string()), None)
                .await
                .unwrap();
        }
        for (i, key) in longest.iter().enumerate() {
            let loaded = store.load(key).await.unwrap().unwrap();
            assert_eq!(loaded.value, record(&i.to_string()));
        }
        let listed = store.keys().await.unwrap();
        assert!(longest.iter().all(|k| listed.contains(k)));
        for entry in fs::read_dir(store.dir()).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(name.len() <= 255, "{name:?}");
        }
        let too_long = TokenKey::from("x".repeat(TokenKey::MAX_LEN + 1));
        let err = store.load(&too_long).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::InvalidKey);
        assert!(
            !format!("{err} {err:?}").contains(&"x".repeat(100)),
            "the error does not quote the whole key"
        );
    }

    #[test]
    fn debug_shows_the_directory() {
        let (_tmp, store) = store();
        let text = format!("{store:?}");
        assert!(
            text.contains("FileStore") && text.contains("grants"),
            "{text}"
        );
    }
}
