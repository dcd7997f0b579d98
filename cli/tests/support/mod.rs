//! Seeding stores through the library and running the `tokenkeeper` binary as a process.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use assert_cmd::Command;
use tokenkeeper::{
    AccessToken, GrantRecord, RefreshToken, TokenKey, TokenSet, TokenStore, Versioned,
};

pub const HOUR: Duration = Duration::from_secs(3600);
/// 2030-01-01T00:00:00Z: grants seeded with fixed times compare equal wherever they are made.
pub const BASE: Duration = Duration::from_secs(1_893_456_000);

/// Runs `future` on the tests' runtime (the tests themselves are synchronous: the binary runs
/// as a child process). One runtime for all: a Redis store's connection lives on it.
pub fn block_on<F: Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a tokio runtime")
        })
        .block_on(future)
}

/// The `tokenkeeper` binary of this package, with no store from the environment.
pub fn tokenkeeper() -> Command {
    let mut command = Command::new(assert_cmd::cargo::cargo_bin!("tokenkeeper"));
    command.env_remove("TOKENKEEPER_STORE");
    command
}

/// A grant whose tokens are `sekrit-access-<name>` and (if `refresh`) `sekrit-refresh-<name>`:
/// strings the tests look for in every output.
pub fn grant(name: &str, refresh: bool) -> GrantRecord {
    let mut tokens = TokenSet::new(AccessToken::new(format!("sekrit-access-{name}")))
        .with_expires_at(SystemTime::UNIX_EPOCH + BASE + HOUR);
    if refresh {
        tokens = tokens
            .with_refresh_token(RefreshToken::new(format!("sekrit-refresh-{name}")))
            .with_refresh_expires_at(SystemTime::UNIX_EPOCH + BASE + 24 * HOUR);
    }
    GrantRecord::new(tokens)
}

pub fn seed(store: &dyn TokenStore, grants: &[(&str, GrantRecord)]) {
    block_on(async {
        for (key, record) in grants {
            store
                .save(&TokenKey::from(*key), record, None)
                .await
                .expect("seeding the store");
        }
    });
}

pub fn load(store: &dyn TokenStore, key: &str) -> Option<Versioned<GrantRecord>> {
    block_on(store.load(&TokenKey::from(key))).expect("reading the store")
}

pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// The command's stdout and stderr, as text.
pub fn outputs(output: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Fails if a token of a grant seeded by [`grant`] appears in `text`.
pub fn assert_no_secret(text: &str) {
    assert!(!text.contains("sekrit"), "a secret was printed:\n{text}");
}
