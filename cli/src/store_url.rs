//! Store URLs: `file:///dir`, `sqlite:///file`, `redis://…`, optionally encrypted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenkeeper::{FileStore, TokenStore};
use url::Url;

use crate::failure::Failure;
use crate::keys::KeyArgs;

/// What a command does with a store: only reads it, or may put grants into it (then a missing
/// file-store directory is created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A parsed store URL, before anything is opened.
#[derive(Debug)]
pub struct StoreUrl {
    url: Url,
}

impl StoreUrl {
    /// Parses `text`; an unknown scheme or a relative path is a usage error.
    pub fn parse(text: &str) -> Result<Self, Failure> {
        let url = Url::parse(text).map_err(|e| {
            Failure::usage(format!(
                "store URL `{}` is not a URL ({e}); expected file:///DIR, sqlite:///FILE, \
                 redis://HOST[:PORT][/DB] or postgres://…",
                redact_text(text)
            ))
        })?;
        match url.scheme() {
            "file" | "sqlite" | "redis" | "rediss" | "postgres" | "postgresql" => {}
            other => {
                return Err(Failure::usage(format!(
                    "store URL scheme `{other}:` is not supported; expected file, sqlite, \
                     redis, rediss or postgres"
                )))
            }
        }
        Ok(Self { url })
    }

    /// The URL without user, password, query or fragment: safe to print and to record as the
    /// place a grant was moved to.
    pub fn redacted(&self) -> String {
        redact(&self.url)
    }

    /// Whether `self` and `other` name the same store (same URL, or the same file or
    /// directory).
    pub fn same_store(&self, other: &StoreUrl) -> bool {
        if self.url == other.url {
            return true;
        }
        match (self.local_path(), other.local_path()) {
            (Some(a), Some(b)) if self.url.scheme() == other.url.scheme() => {
                match (a.canonicalize(), b.canonicalize()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => a == b,
                }
            }
            _ => false,
        }
    }

    fn local_path(&self) -> Option<PathBuf> {
        match self.url.scheme() {
            "file" | "sqlite" => Some(PathBuf::from(self.url.path())),
            _ => None,
        }
    }

    /// Opens the store, wrapped in `EncryptedStore` when `keys` name a key.
    pub async fn open(
        &self,
        keys: &KeyArgs,
        access: Access,
    ) -> Result<Arc<dyn TokenStore>, Failure> {
        let store = self.open_plain(access).await?;
        keys.wrap(store)
    }

    async fn open_plain(&self, access: Access) -> Result<Arc<dyn TokenStore>, Failure> {
        let shown = self.redacted();
        match self.url.scheme() {
            "file" => {
                let dir = self.absolute_path()?;
                let store = match access {
                    Access::Read => FileStore::open(&dir),
                    Access::Write => FileStore::create(&dir),
                };
                let store = store.map_err(|e| Failure::store(format!("cannot open {shown}"), e))?;
                Ok(Arc::new(store))
            }
            "sqlite" => self.open_sqlite(&shown, access),
            "redis" | "rediss" => self.open_redis(&shown).await,
            _ => self.open_postgres(&shown).await,
        }
    }

    fn absolute_path(&self) -> Result<PathBuf, Failure> {
        let host = self.url.host_str().unwrap_or("");
        let path = Path::new(self.url.path());
        if !(host.is_empty() || host == "localhost")
            || !path.is_absolute()
            || path == Path::new("/")
        {
            return Err(Failure::usage(format!(
                "store URL {} must name an absolute path: {}:///absolute/path",
                self.redacted(),
                self.url.scheme()
            )));
        }
        // Percent-decoded, as `Url::to_file_path` would (it only accepts `file:` URLs).
        let decoded = percent_encoding::percent_decode_str(self.url.path())
            .decode_utf8()
            .map_err(|_| {
                Failure::usage(format!(
                    "store URL {} is not UTF-8 once decoded",
                    self.redacted()
                ))
            })?;
        Ok(PathBuf::from(decoded.into_owned()))
    }

    /// The URL's `name=value` query option, and the URL without it.
    #[cfg(any(feature = "sqlite", feature = "redis", feature = "postgres", test))]
    fn take_option(&self, name: &str) -> (Option<String>, Url) {
        let mut url = self.url.clone();
        let mut value = None;
        let rest: Vec<(String, String)> = self
            .url
            .query_pairs()
            .filter_map(|(k, v)| {
                if k == name {
                    value = Some(v.into_owned());
                    None
                } else {
                    Some((k.into_owned(), v.into_owned()))
                }
            })
            .collect();
        if rest.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(rest);
        }
        (value, url)
    }

    /// `sqlite:///FILE[?table_prefix=NAME]`.
    #[cfg(feature = "sqlite")]
    fn open_sqlite(&self, shown: &str, access: Access) -> Result<Arc<dyn TokenStore>, Failure> {
        let (prefix, rest) = self.take_option("table_prefix");
        if rest.query().is_some() {
            return Err(Failure::usage(format!(
                "{shown}: the only query option of a sqlite:// URL is table_prefix"
            )));
        }
        let path = self.absolute_path()?;
        // Reading a database that is not there would create an empty one (a typo would then
        // list nothing and exit 0).
        if access == Access::Read && !path.exists() {
            return Err(Failure::runtime(format!(
                "cannot open {shown}: the database file does not exist"
            )));
        }
        let mut builder = tokenkeeper::SqliteStore::builder(&path);
        if let Some(prefix) = prefix {
            builder = builder.table_prefix(prefix);
        }
        let store = builder
            .build()
            .map_err(|e| Failure::store(format!("cannot open {shown}"), e))?;
        Ok(Arc::new(store))
    }

    #[cfg(not(feature = "sqlite"))]
    fn open_sqlite(&self, shown: &str, _access: Access) -> Result<Arc<dyn TokenStore>, Failure> {
        Err(Failure::usage(format!(
            "cannot open {shown}: this tokenkeeper was built without the `sqlite` feature"
        )))
    }

    /// `redis://…[?prefix=PREFIX]`; other query options go to the Redis client.
    #[cfg(feature = "redis")]
    async fn open_redis(&self, shown: &str) -> Result<Arc<dyn TokenStore>, Failure> {
        let (prefix, rest) = self.take_option("prefix");
        let mut builder = tokenkeeper::RedisStore::builder(rest.as_str());
        if let Some(prefix) = prefix {
            builder = builder.prefix(prefix);
        }
        let store = builder
            .build()
            .await
            .map_err(|e| Failure::store(format!("cannot open {shown}"), e))?;
        Ok(Arc::new(store))
    }

    /// `postgres://…[?schema=NAME&table_prefix=PREFIX]`; other query options go to the
    /// PostgreSQL client.
    #[cfg(feature = "postgres")]
    async fn open_postgres(&self, shown: &str) -> Result<Arc<dyn TokenStore>, Failure> {
        let (schema, rest) = self.take_option("schema");
        let (prefix, rest) = StoreUrl { url: rest }.take_option("table_prefix");
        let mut builder = tokenkeeper::PostgresStore::builder(rest.as_str());
        if let Some(schema) = schema {
            builder = builder.schema(schema);
        }
        if let Some(prefix) = prefix {
            builder = builder.table_prefix(prefix);
        }
        let store = builder
            .build()
            .await
            .map_err(|e| Failure::store(format!("cannot open {shown}"), e))?;
        Ok(Arc::new(store))
    }

    #[cfg(not(feature = "postgres"))]
    async fn open_postgres(&self, shown: &str) -> Result<Arc<dyn TokenStore>, Failure> {
        Err(Failure::usage(format!(
            "cannot open {shown}: this tokenkeeper was built without the `postgres` feature"
        )))
    }

    #[cfg(not(feature = "redis"))]
    async fn open_redis(&self, shown: &str) -> Result<Arc<dyn TokenStore>, Failure> {
        Err(Failure::usage(format!(
            "cannot open {shown}: this tokenkeeper was built without the `redis` feature"
        )))
    }
}

fn redact(url: &Url) -> String {
    let mut url = url.clone();
    // Cannot fail for the schemes accepted above (they have a host or are `file`).
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// `text` with anything between `://` and `@` removed, for messages about an unparsable URL.
fn redact_text(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}://…@{}", &text[..start], &text[at + 1..])
        }
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_user_password_and_query() {
        let url = StoreUrl::parse("redis://user:hunter2@127.0.0.1:6379/2?password=x#f").unwrap();
        assert_eq!(url.redacted(), "redis://127.0.0.1:6379/2");
        assert_eq!(
            redact_text("redis://:hunter2@host:1/x"),
            "redis://…@host:1/x"
        );
        assert_eq!(
            StoreUrl::parse("postgres://u:pw@db/grants")
                .unwrap()
                .redacted(),
            "postgres://db/grants"
        );
    }

    #[test]
    fn query_options_are_taken_out_of_the_url() {
        let url = StoreUrl::parse("redis://:pw@h:1/2?prefix=app%3A&protocol=resp3").unwrap();
        let (prefix, rest) = url.take_option("prefix");
        assert_eq!(prefix.as_deref(), Some("app:"));
        assert_eq!(rest.as_str(), "redis://:pw@h:1/2?protocol=resp3");
        let (none, rest) = StoreUrl::parse("sqlite:///x.db")
            .unwrap()
            .take_option("table_prefix");
        assert_eq!((none, rest.as_str()), (None, "sqlite:///x.db"));
    }

    #[test]
    fn paths_are_percent_decoded_and_must_be_absolute() {
        let url = StoreUrl::parse("file:///tmp/a%20b").unwrap();
        assert_eq!(url.absolute_path().unwrap(), PathBuf::from("/tmp/a b"));
        assert!(StoreUrl::parse("sqlite://relative.db")
            .unwrap()
            .absolute_path()
            .is_err());
        assert!(StoreUrl::parse("file:///")
            .unwrap()
            .absolute_path()
            .is_err());
        assert!(StoreUrl::parse("ftp://x/y").is_err());
        assert!(StoreUrl::parse("not a url").is_err());
    }
}
