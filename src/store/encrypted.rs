//! Encryption at rest over any store: [`EncryptedStore`], [`Keyring`], [`KeyId`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use chacha20poly1305::aead::rand_core::RngCore as _;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::error::{ConfigProblem, Error, StoreError, StoreErrorKind};
use crate::store::{Cas, GrantRecord, RefreshLock, TokenStore, Version, Versioned};
use crate::token::{AccessToken, TokenKey, TokenSet};

/// Marks an access token field that holds an envelope rather than a token.
const PREFIX: &str = "tkenc1:";
/// The envelope's format version, the first byte of the binary envelope.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Version byte and key id.
const HEADER_LEN: usize = 1 + 4;
/// Domain separation for the associated data.
const AAD_CONTEXT: &[u8] = b"tokenkeeper/encrypted-store/v1\0";
/// Conflicts a rekey of one record tolerates before reporting it as failed (each conflict is
/// a concurrent write, which itself encrypts under the current key).
const REKEY_ATTEMPTS: usize = 16;
/// Keys listed per page by [`EncryptedStore::rekey`].
const REKEY_PAGE: usize = 256;

/// Names one key of a [`Keyring`]; stored in clear in every envelope so that a record names
/// the key that opens it.
///
/// A number, like the key versions of a KMS or of Vault's transit engine: give each new key
/// the next number (1, 2, 3, …) and old records keep naming theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub struct KeyId(u32);

impl KeyId {
    /// The key id `id`.
    pub const fn new(id: u32) -> Self {
        Self(id)
    }

    /// The number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for KeyId {
    fn from(id: u32) -> Self {
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The keys of an [`EncryptedStore`]: one current key that encrypts every write, and old keys
/// that still decrypt the records written under them.
///
/// Keys are 32 random bytes (XChaCha20-Poly1305 keys), held in memory that is zeroized when
/// the keyring is dropped. `Debug` shows the key ids only.
///
/// # Rotating keys
///
/// 1. Make a new key the current one and keep the old one listed:
///    `Keyring::new(KeyId::new(2), new_key).with_old(KeyId::new(1), old_key)`. Records are
///    readable throughout; every write, including the refreshes applications make, uses key 2.
/// 2. Run [`EncryptedStore::rekey`] (safe while applications refresh) until it reports no
///    failures: every record is then under key 2.
/// 3. Drop key 1 from the keyring. A record still under it would now fail with
///    [`StoreErrorKind::KeyUnavailable`], never be overwritten.
///
/// ```
/// use tokenkeeper::{KeyId, Keyring};
///
/// let keyring = Keyring::new(KeyId::new(2), [7; 32]).with_old(KeyId::new(1), [9; 32]);
/// assert_eq!(keyring.current(), KeyId::new(2));
/// assert!(keyring.contains(KeyId::new(1)));
/// assert_eq!(format!("{keyring:?}"), "Keyring { current: 2, keys: [1, 2] }");
/// ```
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub struct Keyring {
    current: KeyId,
    keys: BTreeMap<KeyId, Zeroizing<[u8; 32]>>,
}

impl Keyring {
    /// A keyring whose current key is `key`, named `current`.
    ///
    /// The array passed in is a copy the caller still owns: zeroize it if it came from a
    /// buffer that lives on (the keyring's own copy is zeroized on drop).
    pub fn new(current: KeyId, key: [u8; 32]) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(current, Zeroizing::new(key));
        Self { current, keys }
    }

    /// Adds an old key that still decrypts the records written under `id`; it never
    /// encrypts. Adding `id` again replaces that old key; the current key cannot be replaced
    /// this way (a call with the current id is ignored).
    pub fn with_old(mut self, id: KeyId, key: [u8; 32]) -> Self {
        if id != self.current {
            self.keys.insert(id, Zeroizing::new(key));
        }
        self
    }

    /// A keyring whose current key is given as base64 text, as kept in a secret manager or an
    /// environment variable (`openssl rand -base64 32` makes one): the standard or URL-safe
    /// alphabet, with or without padding, surrounding whitespace ignored, 32 bytes decoded.
    /// The decoded bytes are zeroized once the key is in the keyring.
    ///
    /// ```
    /// use tokenkeeper::{KeyId, Keyring};
    ///
    /// // Say, from `std::env::var("TOKEN_KEY")`.
    /// let current = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    /// let keyring = Keyring::from_base64(KeyId::new(2), current)?
    ///     .with_old_base64(KeyId::new(1), "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8")?;
    /// assert!(keyring.contains(KeyId::new(1)));
    /// assert!(Keyring::from_base64(KeyId::new(1), "c2hvcnQ=").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Misconfigured`](crate::Error::Misconfigured) with
    /// [`ConfigProblem::Setting`](crate::ConfigProblem::Setting) when the text is not base64
    /// or does not decode to 32 bytes. The error never quotes the text.
    pub fn from_base64(current: KeyId, key: &str) -> Result<Self, Error> {
        let mut keys = BTreeMap::new();
        keys.insert(current, decode_key(current, key)?);
        Ok(Self { current, keys })
    }

    /// [`with_old`](Self::with_old) with the key given as base64 text (as for
    /// [`from_base64`](Self::from_base64)).
    ///
    /// # Errors
    ///
    /// As [`from_base64`](Self::from_base64).
    pub fn with_old_base64(mut self, id: KeyId, key: &str) -> Result<Self, Error> {
        let key = decode_key(id, key)?;
        if id != self.current {
            self.keys.insert(id, key);
        }
        Ok(self)
    }

    /// The id of the key that encrypts every write.
    pub fn current(&self) -> KeyId {
        self.current
    }

    /// Whether the keyring holds a key named `id`.
    pub fn contains(&self, id: KeyId) -> bool {
        self.keys.contains_key(&id)
    }

    fn cipher(&self, id: KeyId) -> Option<XChaCha20Poly1305> {
        // The cipher holds a copy of the key and zeroizes it on drop.
        self.keys
            .get(&id)
            .map(|key| XChaCha20Poly1305::new((&**key).into()))
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Ids<'a>(&'a BTreeMap<KeyId, Zeroizing<[u8; 32]>>);
        impl fmt::Debug for Ids<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.keys().map(|id| id.0))
                    .finish()
            }
        }
        f.debug_struct("Keyring")
            .field("current", &self.current.0)
            .field("keys", &Ids(&self.keys))
            .finish()
    }
}

/// A 32-byte key from base64 text, standard or URL-safe, padded or not.
fn decode_key(id: KeyId, text: &str) -> Result<Zeroizing<[u8; 32]>, Error> {
    use base64::alphabet;
    use base64::engine::general_purpose::GeneralPurpose;
    use base64::engine::{DecodePaddingMode, GeneralPurposeConfig};
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);

    let bad = |reason: String| Error::Misconfigured {
        key: None,
        problem: ConfigProblem::Setting {
            setting: format!("encryption key {id}"),
            reason,
        },
        status: None,
        source: None,
    };
    let text = text.trim();
    let bytes = Zeroizing::new(
        STANDARD
            .decode(text)
            .or_else(|_| URL_SAFE.decode(text))
            .map_err(|_| bad("is not base64".to_owned()))?,
    );
    if bytes.len() != 32 {
        return Err(bad(format!("decodes to {} bytes, not 32", bytes.len())));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// A [`TokenStore`] that encrypts every grant before it reaches an inner store, and decrypts
/// it on the way back: tokens at rest in a file, a database or Redis are useless without the
/// [`Keyring`].
///
/// # What is stored
///
/// The whole [`GrantRecord`] (tokens, expiry, state, failure history) is serialized as JSON
/// and sealed with XChaCha20-Poly1305 under the keyring's current key and a fresh random
/// 192-bit nonce. The inner store receives an *envelope record*: a `GrantRecord` whose access
/// token is `tkenc1:` followed by the unpadded base64url of
/// `[format version 1][key id, u32 big-endian][nonce, 24 bytes][ciphertext and 16-byte tag]`,
/// with no refresh token, no expiry and an active state. Nothing of the grant is in clear
/// besides its key (the inner store's key) and its size.
///
/// Why an envelope record rather than a byte-level store trait: every [`TokenStore`],
/// including ones written by applications, keeps working as the inner store unchanged, with
/// its own versions, compare-and-swap and refresh lock. The cost is that the inner store sees
/// an opaque grant: listings of the inner store show no expiry, and an expiry-based TTL (as
/// [`RedisStore`](crate::RedisStore) can set) treats the grant as of unknown life, so it never
/// expires early.
///
/// Why XChaCha20-Poly1305: its 192-bit nonces can be drawn at random for every write, by any
/// number of processes sharing one key, with no risk of reuse worth counting (AES-256-GCM's
/// 96-bit nonces would need a counter or a limit on writes per key); it is fast and constant
/// time in software on every platform (no dependence on AES instructions); and RustCrypto's
/// implementation is pure Rust, as this crate is.
///
/// # Associated data
///
/// Every envelope is bound, as associated data, to its format version and key id, to the
/// store's namespace ([`with_namespace`](Self::with_namespace), empty by default) and to the
/// grant's [`TokenKey`]. An envelope copied to another grant, or to a store with another
/// namespace (say, from staging to production), fails with
/// [`StoreErrorKind::Undecryptable`] instead of serving someone else's tokens.
///
/// # Errors
///
/// Reading a record fails, without anything being written over it, with
/// [`StoreErrorKind::KeyUnavailable`] when its key id is not in the keyring,
/// [`StoreErrorKind::Undecryptable`] when it fails authentication (wrong key under that id,
/// moved, altered), [`StoreErrorKind::Unencrypted`] when it was written without encryption
/// (unless [`accept_unencrypted`](Self::accept_unencrypted) is on), and
/// [`StoreErrorKind::Corrupt`] when it is a malformed envelope. None of these is
/// [retryable](crate::Error::is_retryable). The inner store's errors pass through as they are.
///
/// Deleting never reads the record: [`TokenManager::remove`](crate::TokenManager::remove)
/// gets rid of a record that cannot be opened, after which a new grant can be inserted
/// (an insert over it fails, as it must read what it replaces).
///
/// # Concurrency
///
/// Versions, compare-and-swap and the refresh lock are the inner store's, passed through
/// unchanged: managers sharing the inner store (in one process or many, each with the same
/// keyring) refresh each grant once between them, as without encryption.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use tokenkeeper::{
///     AccessToken, EncryptedStore, KeyId, Keyring, MemoryStore, TokenKey, TokenSet, TokenStore,
/// };
///
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// // In production, the key comes from a secret manager or the environment.
/// let keyring = Keyring::new(KeyId::new(1), [42; 32]);
/// let inner = Arc::new(MemoryStore::new());
/// let store = EncryptedStore::new(Arc::clone(&inner), keyring).with_namespace("production");
///
/// let key = TokenKey::new("tenant-7");
/// let record = tokenkeeper::GrantRecord::new(TokenSet::new(AccessToken::new("at-secret")));
/// store.save(&key, &record, None).await?;
///
/// // The inner store holds an envelope; the store gives the grant back.
/// let at_rest = inner.load(&key).await?.expect("saved");
/// assert!(at_rest.value.tokens().access_token().secret().starts_with("tkenc1:"));
/// let loaded = store.load(&key).await?.expect("saved");
/// assert_eq!(loaded.value.tokens().access_token().secret(), "at-secret");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub struct EncryptedStore<S> {
    inner: S,
    keyring: Keyring,
    namespace: String,
    accept_unencrypted: bool,
}

/// What [`EncryptedStore::rekey`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub struct RekeyReport {
    /// Records rewritten under the current key.
    pub rewritten: usize,
    /// Records already under the current key (including ones a concurrent write put there).
    pub current: usize,
    /// Records left as they were, with why: an unavailable key, a record that fails
    /// authentication or is not encrypted (see [`EncryptedStore`]'s errors), or one that kept
    /// changing under the rekey. Run the rekey again once they are dealt with.
    pub failed: Vec<(TokenKey, StoreError)>,
}

impl<S> EncryptedStore<S> {
    /// Encrypts the grants kept in `inner` with `keyring`.
    pub fn new(inner: S, keyring: Keyring) -> Self {
        Self {
            inner,
            keyring,
            namespace: String::new(),
            accept_unencrypted: false,
        }
    }

    /// Binds every envelope to `namespace` too (see "Associated data"): records written with
    /// one namespace do not decrypt with another. Use it to tell apart environments or
    /// applications that could share a key. Changing it makes existing records undecryptable.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Migration from an unencrypted store: when on, a record written without encryption
    /// is read as it is instead of failing with [`StoreErrorKind::Unencrypted`]. Writes are
    /// always encrypted, so each grant is encrypted at its next save, and
    /// [`rekey`](Self::rekey) encrypts them all at once. Off by default: turn it off again
    /// once the rekey reports no failures.
    pub fn accept_unencrypted(mut self, accept: bool) -> Self {
        self.accept_unencrypted = accept;
        self
    }

    /// The inner store, which holds envelopes.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The inner store, giving up the keyring.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn aad(&self, header: &[u8], key: &TokenKey) -> Vec<u8> {
        let namespace = self.namespace.as_bytes();
        let mut aad = Vec::with_capacity(AAD_CONTEXT.len() + header.len() + 8 + namespace.len());
        aad.extend_from_slice(AAD_CONTEXT);
        aad.extend_from_slice(header);
        // Length-prefixed, so that no namespace/key split reads as another.
        aad.extend_from_slice(&(namespace.len() as u64).to_be_bytes());
        aad.extend_from_slice(namespace);
        aad.extend_from_slice(key.as_str().as_bytes());
        aad
    }

    /// The envelope record for `record` under the current key.
    fn seal(&self, key: &TokenKey, record: &GrantRecord) -> Result<GrantRecord, StoreError> {
        let id = self.keyring.current;
        let cipher = self.keyring.cipher(id).ok_or_else(|| {
            StoreError::with_kind(StoreErrorKind::KeyUnavailable, "no current key")
        })?;
        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| StoreError::new(format!("no randomness for a nonce: {e}")))?;
        let mut header = [0u8; HEADER_LEN];
        header[0] = FORMAT;
        header[1..].copy_from_slice(&id.0.to_be_bytes());
        let plaintext = Zeroizing::new(record.to_json()?);
        let aad = self.aad(&header, key);
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::new("encryption failed"))?;
        let mut envelope = Vec::with_capacity(HEADER_LEN + NONCE_LEN + ciphertext.len());
        envelope.extend_from_slice(&header);
        envelope.extend_from_slice(&nonce);
        envelope.extend_from_slice(&ciphertext);
        let mut text = String::with_capacity(PREFIX.len() + envelope.len() * 4 / 3 + 4);
        text.push_str(PREFIX);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&envelope, &mut text);
        Ok(GrantRecord::new(TokenSet::new(AccessToken::new(text))))
    }

    /// The grant in `stored`, with the id of the key that sealed it (`None`: not encrypted,
    /// accepted for migration).
    fn open(
        &self,
        key: &TokenKey,
        stored: GrantRecord,
    ) -> Result<(GrantRecord, Option<KeyId>), StoreError> {
        let Some(text) = stored.tokens.access_token().secret().strip_prefix(PREFIX) else {
            if self.accept_unencrypted {
                return Ok((stored, None));
            }
            return Err(StoreError::with_kind(
                StoreErrorKind::Unencrypted,
                "a record written without encryption (see `EncryptedStore::accept_unencrypted`)",
            ));
        };
        let envelope = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| StoreError::corrupt("an envelope that is not base64url"))?;
        if envelope.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(StoreError::corrupt("a truncated envelope"));
        }
        let (header, rest) = envelope.split_at(HEADER_LEN);
        if header[0] != FORMAT {
            return Err(StoreError::corrupt(format!(
                "an envelope of unknown format {} (written by a newer version?)",
                header[0]
            )));
        }
        let id = KeyId(u32::from_be_bytes([
            header[1], header[2], header[3], header[4],
        ]));
        let cipher = self.keyring.cipher(id).ok_or_else(|| {
            StoreError::with_kind(
                StoreErrorKind::KeyUnavailable,
                format!("the record is encrypted with key id {id}, which the keyring lacks"),
            )
        })?;
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = self.aad(header, key);
        let plaintext = Zeroizing::new(
            cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    StoreError::with_kind(
                        StoreErrorKind::Undecryptable,
                        format!(
                            "the record fails authentication with key id {id}: another key \
                             under that id, or a record of another grant or namespace, or altered"
                        ),
                    )
                })?,
        );
        Ok((GrantRecord::from_json(&plaintext)?, Some(id)))
    }
}

impl<S: TokenStore> EncryptedStore<S> {
    /// Rewrites every record that is not under the current key (an old key, or no encryption
    /// when [`accept_unencrypted`](Self::accept_unencrypted) is on) under the current key.
    ///
    /// Safe to run while applications refresh: each record is rewritten by compare-and-swap
    /// against the version it was read at. When a concurrent write wins, the record is read
    /// again and the rekey goes on from what is now stored; stale contents are never written
    /// back, so no rotated refresh token is lost.
    ///
    /// # Errors
    ///
    /// A record that cannot be opened (see [`EncryptedStore`]'s errors) is left as it is and
    /// listed in [`RekeyReport::failed`]; the rekey goes on with the others. A failure of the
    /// inner store stops it with that error; running it again resumes, as records already
    /// rewritten count as current.
    pub async fn rekey(&self) -> Result<RekeyReport, StoreError> {
        let mut report = RekeyReport::default();
        let mut after: Option<TokenKey> = None;
        loop {
            let page = self.inner.keys_after(after.as_ref(), REKEY_PAGE).await?;
            for key in &page {
                self.rekey_one(key, &mut report).await?;
            }
            if page.len() < REKEY_PAGE {
                return Ok(report);
            }
            after = page.last().cloned();
        }
    }

    async fn rekey_one(&self, key: &TokenKey, report: &mut RekeyReport) -> Result<(), StoreError> {
        for _ in 0..REKEY_ATTEMPTS {
            // Deleted since it was listed: nothing to rekey.
            let Some(stored) = self.inner.load(key).await? else {
                return Ok(());
            };
            let record = match self.open(key, stored.value) {
                Ok((_, Some(id))) if id == self.keyring.current => {
                    report.current += 1;
                    return Ok(());
                }
                Ok((record, _)) => record,
                Err(e) if is_open_failure(e.kind()) => {
                    report.failed.push((key.clone(), e));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let sealed = self.seal(key, &record)?;
            match self.inner.save(key, &sealed, Some(stored.version)).await? {
                Cas::Saved(_) => {
                    report.rewritten += 1;
                    return Ok(());
                }
                // Someone wrote meanwhile: read what they wrote.
                Cas::Conflict => continue,
            }
        }
        report.failed.push((
            key.clone(),
            StoreError::new(format!(
                "the record changed under the rekey {REKEY_ATTEMPTS} times in a row"
            )),
        ));
        Ok(())
    }
}

/// Failures of one record that a rekey reports and skips.
fn is_open_failure(kind: StoreErrorKind) -> bool {
    matches!(
        kind,
        StoreErrorKind::KeyUnavailable
            | StoreErrorKind::Undecryptable
            | StoreErrorKind::Unencrypted
            | StoreErrorKind::Corrupt
    )
}

impl<S: fmt::Debug> fmt::Debug for EncryptedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedStore")
            .field("inner", &self.inner)
            .field("keyring", &self.keyring)
            .field("namespace", &self.namespace)
            .field("accept_unencrypted", &self.accept_unencrypted)
            .finish()
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for EncryptedStore<S> {
    async fn load(&self, key: &TokenKey) -> Result<Option<Versioned<GrantRecord>>, StoreError> {
        let Some(stored) = self.inner.load(key).await? else {
            return Ok(None);
        };
        let (value, _) = self.open(key, stored.value)?;
        Ok(Some(Versioned {
            version: stored.version,
            value,
        }))
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Result<Cas, StoreError> {
        // The inner store refuses a bad key too, but only after the sealing work.
        StoreError::check_key(key)?;
        let sealed = self.seal(key, record)?;
        self.inner.save(key, &sealed, expected).await
    }

    async fn delete(&self, key: &TokenKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }

    async fn keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        self.inner.keys().await
    }

    async fn keys_after(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<TokenKey>, StoreError> {
        self.inner.keys_after(after, limit).await
    }

    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        self.inner.lock(key, ttl).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::token::RefreshToken;

    fn store(keyring: Keyring) -> EncryptedStore<MemoryStore> {
        EncryptedStore::new(MemoryStore::new(), keyring)
    }

    fn grant() -> GrantRecord {
        GrantRecord::new(
            TokenSet::new(AccessToken::new("at")).with_refresh_token(RefreshToken::new("rt")),
        )
    }

    fn envelope_bytes(sealed: &GrantRecord) -> Vec<u8> {
        let text = sealed.tokens.access_token().secret();
        let body = text.strip_prefix(PREFIX).expect("prefix");
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .expect("base64url")
    }

    fn with_envelope(bytes: &[u8]) -> GrantRecord {
        let text = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        GrantRecord::new(TokenSet::new(AccessToken::new(text)))
    }

    #[test]
    fn the_envelope_is_version_key_id_nonce_and_sealed_json() {
        let store = store(Keyring::new(KeyId::new(0x0102_0304), [1; 32]));
        let key = TokenKey::new("k");
        let sealed = store.seal(&key, &grant()).expect("seal");
        let bytes = envelope_bytes(&sealed);
        assert_eq!(bytes[..HEADER_LEN], [1, 1, 2, 3, 4]);
        let json_len = grant().to_json().expect("json").len();
        assert_eq!(bytes.len(), HEADER_LEN + NONCE_LEN + json_len + TAG_LEN);
        let (opened, id) = store.open(&key, sealed).expect("open");
        assert_eq!((opened, id), (grant(), Some(KeyId::new(0x0102_0304))));
    }

    #[test]
    fn an_altered_envelope_is_undecryptable_and_a_malformed_one_corrupt() {
        let store = store(Keyring::new(KeyId::new(1), [1; 32]));
        let key = TokenKey::new("k");
        let bytes = envelope_bytes(&store.seal(&key, &grant()).expect("seal"));
        let open = |bytes: &[u8]| {
            store
                .open(&key, with_envelope(bytes))
                .expect_err("opened")
                .kind()
        };

        let mut flipped = bytes.clone();
        *flipped.last_mut().expect("tag") ^= 1;
        assert_eq!(open(&flipped), StoreErrorKind::Undecryptable);
        let mut nonce = bytes.clone();
        nonce[HEADER_LEN] ^= 1;
        assert_eq!(open(&nonce), StoreErrorKind::Undecryptable);
        // The key id is authenticated: relabelled, it names a key that is not there...
        let mut relabelled = bytes.clone();
        relabelled[4] = 2;
        assert_eq!(open(&relabelled), StoreErrorKind::KeyUnavailable);
        // ...or, if that key is there, it still fails authentication.
        let two = EncryptedStore::new(
            MemoryStore::new(),
            Keyring::new(KeyId::new(1), [1; 32]).with_old(KeyId::new(2), [1; 32]),
        );
        let err = two
            .open(&key, with_envelope(&relabelled))
            .expect_err("opened");
        assert_eq!(err.kind(), StoreErrorKind::Undecryptable);

        let mut future = bytes.clone();
        future[0] = 2;
        assert_eq!(open(&future), StoreErrorKind::Corrupt);
        assert_eq!(
            open(&bytes[..HEADER_LEN + NONCE_LEN + TAG_LEN - 1]),
            StoreErrorKind::Corrupt
        );
        let not_base64 = GrantRecord::new(TokenSet::new(AccessToken::new("tkenc1:***")));
        let err = store.open(&key, not_base64).expect_err("opened");
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
    }

    #[test]
    fn namespace_and_key_cannot_trade_bytes() {
        let header = [FORMAT, 0, 0, 0, 1];
        let a = store(Keyring::new(KeyId::new(1), [1; 32])).with_namespace("a");
        let ab = store(Keyring::new(KeyId::new(1), [1; 32])).with_namespace("ab");
        assert_ne!(
            a.aad(&header, &TokenKey::new("bc")),
            ab.aad(&header, &TokenKey::new("c"))
        );
        let sealed = a.seal(&TokenKey::new("bc"), &grant()).expect("seal");
        let err = ab.open(&TokenKey::new("c"), sealed).expect_err("opened");
        assert_eq!(err.kind(), StoreErrorKind::Undecryptable);
    }

    #[test]
    fn errors_quote_no_secret_and_are_not_retryable() {
        let key = TokenKey::new("k");
        let sealed = store(Keyring::new(KeyId::new(1), [1; 32]))
            .seal(&key, &grant())
            .expect("seal");
        for keyring in [
            Keyring::new(KeyId::new(1), [2; 32]),
            Keyring::new(KeyId::new(3), [1; 32]),
        ] {
            let err = store(keyring)
                .open(&key, sealed.clone())
                .expect_err("opened");
            let text = format!("{err} {err:?}");
            assert!(
                !text.contains(sealed.tokens.access_token().secret()),
                "{text}"
            );
            assert!(!crate::Error::Store(err).is_retryable());
        }
    }

    #[test]
    fn base64_keys_decode_in_either_alphabet_and_errors_quote_nothing() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let id = KeyId::new(7);
        let padded = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert_eq!(*decode_key(id, padded).expect("padded"), key);
        let unpadded = format!(" {}\n", padded.trim_end_matches('='));
        assert_eq!(*decode_key(id, &unpadded).expect("unpadded"), key);
        let url_safe = base64::engine::general_purpose::URL_SAFE.encode([0xfb; 32]);
        assert!(url_safe.contains('-') || url_safe.contains('_'));
        assert_eq!(*decode_key(id, &url_safe).expect("url-safe"), [0xfb; 32]);

        // "secret-short": 12 bytes.
        for (text, reason) in [
            ("c2VjcmV0LXNob3J0", "decodes to 12 bytes, not 32"),
            ("c2VjcmV0 not base64!", "is not base64"),
        ] {
            let err = decode_key(id, text).expect_err("decoded");
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("c2VjcmV0"), "{shown}");
            assert!(shown.contains(reason), "{shown}");
            assert!(shown.contains("encryption key 7"), "{shown}");
        }
    }

    #[test]
    fn with_old_never_replaces_the_current_key() {
        let key = TokenKey::new("k");
        let sealed = store(Keyring::new(KeyId::new(1), [1; 32]))
            .seal(&key, &grant())
            .expect("seal");
        let keyring = Keyring::new(KeyId::new(1), [1; 32]).with_old(KeyId::new(1), [9; 32]);
        assert!(store(keyring).open(&key, sealed).is_ok());
    }
}
