//! Encryption keys from the environment or files: the `EncryptedStore` wrapping of a store.

use std::path::PathBuf;
use std::sync::Arc;

use tokenkeeper::{GrantRecord, TokenStore};

use crate::failure::Failure;

/// How `EncryptedStore` marks the access-token field of the envelope record it hands its inner
/// store (the library's stored format, version 1; `tests/encrypted.rs` pins it through the
/// library).
const ENVELOPE_PREFIX: &str = "tkenc1:";

/// Whether `record` is an `EncryptedStore` envelope read without the key: its real state,
/// tokens and expiry are inside the ciphertext.
pub fn is_envelope(record: &GrantRecord) -> bool {
    record
        .tokens()
        .access_token()
        .secret()
        .starts_with(ENVELOPE_PREFIX)
}

/// Where one base64 key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// An environment variable's value.
    Env(String),
    /// A file's contents.
    File(PathBuf),
}

impl KeySource {
    /// `--key-env` or `--key-file` (clap makes them exclusive).
    pub fn of(env: Option<String>, file: Option<PathBuf>) -> Option<Self> {
        env.map(KeySource::Env).or(file.map(KeySource::File))
    }

    /// `ID=VAR` or `ID=PATH`.
    pub fn parse_old(text: &str, file: bool) -> Result<(u32, Self), Failure> {
        let (id, what) = text.split_once('=').ok_or_else(|| {
            Failure::usage(format!(
                "`{text}`: expected ID=VALUE, such as 1=OLD_TOKEN_KEY"
            ))
        })?;
        let id = id
            .trim()
            .parse::<u32>()
            .map_err(|_| Failure::usage(format!("`{text}`: the key id must be a number")))?;
        let source = if file {
            KeySource::File(PathBuf::from(what))
        } else {
            KeySource::Env(what.to_owned())
        };
        Ok((id, source))
    }

    #[cfg(feature = "encryption")]
    fn read(&self) -> Result<zeroize::Zeroizing<String>, Failure> {
        match self {
            KeySource::Env(var) => std::env::var(var)
                .map(zeroize::Zeroizing::new)
                .map_err(|_| {
                    Failure::usage(format!(
                        "environment variable `{var}` (an encryption key) is not set or not UTF-8"
                    ))
                }),
            KeySource::File(path) => std::fs::read_to_string(path)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| {
                    Failure::usage(format!(
                        "cannot read the key file `{}`: {e}",
                        path.display()
                    ))
                }),
        }
    }

    fn describe(&self) -> String {
        match self {
            KeySource::Env(var) => format!("the key in `{var}`"),
            KeySource::File(path) => format!("the key in `{}`", path.display()),
        }
    }
}

/// The keys a store is opened with; none means the store is not encrypted.
#[derive(Debug, Clone, Default)]
pub struct KeyArgs {
    /// The key that encrypts writes, and its id.
    pub current: Option<(u32, KeySource)>,
    /// Old keys that still decrypt records written under their ids.
    pub old: Vec<(u32, KeySource)>,
    /// The encrypted store's namespace, if any.
    pub namespace: Option<String>,
    /// Read records written without encryption (a migration, with `rekey`).
    pub accept_unencrypted: bool,
}

impl KeyArgs {
    /// `store` as given, or wrapped in `EncryptedStore` when a key is named.
    pub fn wrap(&self, store: Arc<dyn TokenStore>) -> Result<Arc<dyn TokenStore>, Failure> {
        if self.current.is_none() {
            if let Some((_, source)) = self.old.first() {
                return Err(Failure::usage(format!(
                    "{} is an old key, but no current key is given (--key-env or --key-file)",
                    source.describe()
                )));
            }
            if self.accept_unencrypted || self.namespace.is_some() {
                return Err(Failure::usage(
                    "--accept-unencrypted and --namespace need a key (--key-env or --key-file)",
                ));
            }
            return Ok(store);
        }
        self.wrap_encrypted(store)
    }

    #[cfg(feature = "encryption")]
    fn wrap_encrypted(&self, store: Arc<dyn TokenStore>) -> Result<Arc<dyn TokenStore>, Failure> {
        match self.encrypted(store)? {
            Some(store) => Ok(Arc::new(store)),
            None => Err(Failure::usage("no encryption key given")),
        }
    }

    #[cfg(not(feature = "encryption"))]
    fn wrap_encrypted(&self, _store: Arc<dyn TokenStore>) -> Result<Arc<dyn TokenStore>, Failure> {
        Err(Failure::usage(
            "an encryption key was given, but this tokenkeeper was built without the \
             `encryption` feature",
        ))
    }

    /// `store` wrapped in `EncryptedStore` with these keys, or `None` without a current key.
    #[cfg(feature = "encryption")]
    pub fn encrypted(
        &self,
        store: Arc<dyn TokenStore>,
    ) -> Result<Option<tokenkeeper::EncryptedStore<Arc<dyn TokenStore>>>, Failure> {
        use tokenkeeper::{EncryptedStore, KeyId, Keyring};

        let Some((id, source)) = &self.current else {
            return Ok(None);
        };
        let bad = |source: &KeySource, e: tokenkeeper::Error| {
            Failure::usage(format!("{} is not a usable key: {e}", source.describe()))
        };
        let mut keyring = Keyring::from_base64(KeyId::new(*id), source.read()?.trim())
            .map_err(|e| bad(source, e))?;
        for (old_id, old) in &self.old {
            keyring = keyring
                .with_old_base64(KeyId::new(*old_id), old.read()?.trim())
                .map_err(|e| bad(old, e))?;
        }
        let mut store =
            EncryptedStore::new(store, keyring).accept_unencrypted(self.accept_unencrypted);
        if let Some(namespace) = &self.namespace {
            store = store.with_namespace(namespace.clone());
        }
        Ok(Some(store))
    }
}
