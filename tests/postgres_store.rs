//! `PostgresStore` against a real PostgreSQL server that the tests start themselves
//! (`initdb` + `pg_ctl` on a free loopback port, one server shared by the tests of this binary
//! while they run, a fresh database per test). Fails, never skips, when PostgreSQL is missing:
//! `apt-get install -y postgresql`.
//!
//! Run with `cargo test --features postgres --test postgres_store`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{
    assert_one_winner_per_version, assert_store_has_lock, FakeAuthServer, FakeConfig, ManualClock,
};
use tokenkeeper::{
    AccessToken, Cas, GrantRecord, PostgresStore, StoreErrorKind, TokenKey, TokenManager, TokenSet,
    TokenStore, Version,
};

use support::postgres::PostgresServer;

fn record(at: &str) -> GrantRecord {
    GrantRecord::new(TokenSet::new(AccessToken::new(at)))
}

fn saved(cas: Cas) -> Version {
    match cas {
        Cas::Saved(v) => v,
        Cas::Conflict => panic!("the save conflicted"),
    }
}

/// The database's name in a URL the test server made.
fn database(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

async fn open(url: &str) -> PostgresStore {
    PostgresStore::builder(url).build().await.unwrap()
}

#[tokio::test]
async fn keeps_the_store_contract_and_never_reuses_a_version() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let store = open(&url).await;
    assert_store_has_lock(&store).await;
    assert!(store.keys().await.unwrap().is_empty());

    // Versions only grow, across deletes and across a new store on the same tables (a
    // restart: nothing is kept in memory).
    let key = TokenKey::from("k");
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(saved(store.save(&key, &record("a"), None).await.unwrap()));
        assert!(store.delete(&key).await.unwrap());
        let reopened = open(&url).await;
        seen.push(saved(
            reopened.save(&key, &record("b"), None).await.unwrap(),
        ));
        assert!(reopened.delete(&key).await.unwrap());
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

/// Two stores are two pools, as two processes would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_racing_compare_and_swap_have_one_winner_per_version() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let (a, b) = (open(&url).await, open(&url).await);
    assert_one_winner_per_version(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test]
async fn a_save_against_a_stale_version_writes_nothing() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let (store, other) = (open(&url).await, open(&url).await);
    let key = TokenKey::from("k");
    let v1 = saved(store.save(&key, &record("a"), None).await.unwrap());
    let v2 = saved(other.save(&key, &record("b"), Some(v1)).await.unwrap());
    for expected in [Some(v1), None, Some(u64::MAX)] {
        assert_eq!(
            store.save(&key, &record("c"), expected).await.unwrap(),
            Cas::Conflict
        );
    }
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.value), (v2, record("b")));
}

/// Lease rows as the store wrote them: (owner, milliseconds left on the server's clock).
async fn leases(server: &PostgresServer, url: &str, key: &str) -> Vec<(String, f64)> {
    let client = server.connect(database(url)).await;
    client
        .query(
            "SELECT owner, EXTRACT(EPOCH FROM expires_at - clock_timestamp())::float8 * 1000 \
             FROM public.tokenkeeper_leases WHERE key = $1",
            &[&key.as_bytes()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// What a crashed holder leaves once its ttl has passed, without waiting for it.
async fn expire(server: &PostgresServer, url: &str, key: &str) {
    let client = server.connect(database(url)).await;
    let changed = client
        .execute(
            "UPDATE public.tokenkeeper_leases SET expires_at = clock_timestamp() - \
             interval '1 millisecond' WHERE key = $1",
            &[&key.as_bytes()],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
}

#[tokio::test]
async fn a_lease_excludes_other_instances_expires_with_a_dead_holder_and_is_released_only_by_its_owner(
) {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let open = || async {
        PostgresStore::builder(&url)
            .lock_wait(Duration::from_millis(300))
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (open().await, open().await);
    let key = TokenKey::from("k");
    let ttl = Duration::from_secs(60);

    let first = a.lock(&key, ttl).await.unwrap().unwrap();
    let mut held = leases(&server, &url, "k").await;
    assert_eq!(held.len(), 1, "one lease");
    let (owner_a, left) = held.remove(0);
    assert!(
        (55_000.0..=60_000.0).contains(&left),
        "the lease ends ttl from now on the server's clock: {left} ms left"
    );
    // Held by `a`: `b` waits, then times out.
    let err = b.lock(&key, ttl).await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::LockTimeout);

    // `a` dies holding it (no release, not even the one a drop sends); once its ttl has
    // passed, `b` takes the lease over.
    std::mem::forget(first);
    let err = b.lock(&key, ttl).await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::LockTimeout, "still live");
    expire(&server, &url, "k").await;
    let second = b.lock(&key, ttl).await.unwrap().unwrap();
    let held = leases(&server, &url, "k").await;
    assert_eq!(held.len(), 1, "one lease");
    assert_ne!(held[0].0, owner_a);

    // A late holder's release (another lock of `a`, taken and expired) does not free `b`'s.
    let other = TokenKey::from("other");
    let late = a.lock(&other, ttl).await.unwrap().unwrap();
    expire(&server, &url, "other").await;
    let taker = b.lock(&other, ttl).await.unwrap().unwrap();
    late.release().await.unwrap();
    assert_eq!(
        leases(&server, &url, "other").await.len(),
        1,
        "only the owner releases"
    );
    let err = a.lock(&other, ttl).await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::LockTimeout);
    taker.release().await.unwrap();

    second.release().await.unwrap();
    assert!(leases(&server, &url, "k").await.is_empty());
    a.lock(&key, ttl)
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dropped_lock_is_released_in_the_background() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let store = PostgresStore::builder(&url)
        .lock_wait(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    let key = TokenKey::from("k");
    drop(store.lock(&key, Duration::from_secs(60)).await.unwrap());
    let again = store.lock(&key, Duration::from_secs(60)).await.unwrap();
    assert!(again.is_some());
    assert_eq!(leases(&server, &url, "k").await.len(), 1);
}

#[tokio::test]
async fn schemas_and_table_prefixes_keep_stores_apart() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let build = |schema: &str, prefix: &str| {
        PostgresStore::builder(&url)
            .schema(schema)
            .table_prefix(prefix)
            .lock_wait(Duration::from_millis(200))
            .build()
    };
    let a = build("App_A", "tk_").await.unwrap();
    let b = build("app_b", "tk_").await.unwrap();
    let c = build("App_A", "").await.unwrap();
    assert_eq!((a.schema(), a.table_prefix()), ("App_A", "tk_"));
    let key = TokenKey::from("k");
    a.save(&key, &record("a"), None).await.unwrap();
    for other in [&b, &c] {
        assert_eq!(other.load(&key).await.unwrap(), None);
        assert!(other.keys().await.unwrap().is_empty());
        // The save expecting absence succeeds: its own row.
        saved(other.save(&key, &record("x"), None).await.unwrap());
    }
    assert_eq!(a.load(&key).await.unwrap().unwrap().value, record("a"));
    let _held = a
        .lock(&key, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    for other in [&b, &c] {
        assert!(other
            .lock(&key, Duration::from_secs(60))
            .await
            .unwrap()
            .is_some());
    }
    // Names are quoted: case is kept, the tables are where the store says.
    let client = server.connect(database(&url)).await;
    let tables: Vec<String> = client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_tables \
             WHERE schemaname IN ('App_A', 'app_b') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "App_A.grants",
            "App_A.leases",
            "App_A.schema_version",
            "App_A.tk_grants",
            "App_A.tk_leases",
            "App_A.tk_schema_version",
            "app_b.tk_grants",
            "app_b.tk_leases",
            "app_b.tk_schema_version",
        ]
    );

    for (schema, prefix) in [
        ("", "tk_"),
        ("a b", "tk_"),
        ("x\"; DROP TABLE y; --", "tk_"),
        ("app", "1x"),
        ("app", "tk;"),
        ("app", &"p".repeat(50)),
    ] {
        let err = build(schema, prefix).await.err().unwrap();
        assert_eq!(
            err.kind(),
            StoreErrorKind::InvalidKey,
            "{schema:?} {prefix:?}"
        );
    }
}

#[tokio::test]
async fn a_corrupt_row_is_a_typed_error_and_is_never_written_over() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let store = open(&url).await;
    let client = server.connect(database(&url)).await;
    let insert = "INSERT INTO public.tokenkeeper_grants (key, version, record) VALUES ($1, $2, $3)";
    for (key, version, record) in [
        ("json", 7_i64, "{not json"),
        ("negative", -3, "{}"),
        ("zero", 0, "{}"),
        ("shape", 8, "{\"tokens\": 42}"),
    ] {
        client
            .execute(insert, &[&key.as_bytes(), &version, &record])
            .await
            .unwrap();
    }
    for key in ["json", "negative", "zero", "shape"] {
        let key = TokenKey::from(key);
        let err = store.load(&key).await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{key}");
        // A save expecting absence, or a version the row does not have (no load handed one
        // out), writes nothing; a version that is not positive matches no save.
        for expected in [None, Some(0), Some(1), Some(2), Some(u64::MAX)] {
            assert_eq!(
                store.save(&key, &record("new"), expected).await.unwrap(),
                Cas::Conflict,
                "{key} {expected:?}"
            );
        }
    }
    let rows: Vec<(Vec<u8>, i64, String)> = client
        .query(
            "SELECT key, version, record FROM public.tokenkeeper_grants ORDER BY key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            (b"json".to_vec(), 7, "{not json".to_owned()),
            (b"negative".to_vec(), -3, "{}".to_owned()),
            (b"shape".to_vec(), 8, "{\"tokens\": 42}".to_owned()),
            (b"zero".to_vec(), 0, "{}".to_owned()),
        ],
        "left as they were"
    );
    // A key that is not UTF-8 is not listed as some other key.
    client
        .execute(insert, &[&vec![0xff_u8, 0], &3_i64, &"{}"])
        .await
        .unwrap();
    let err = store.keys().await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt);
    let err = store.keys_after(None, 10).await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt);
}

#[tokio::test]
async fn missing_tables_are_not_found_and_a_refused_privilege_is_permission_denied() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let db = database(&url).to_owned();
    let store = open(&url).await;
    let key = TokenKey::from("k");
    store.save(&key, &record("a"), None).await.unwrap();

    // An application role that may only read: it uses the migrated tables (no DDL runs)
    // and cannot write.
    server
        .execute(
            &db,
            "CREATE ROLE reader LOGIN; \
             GRANT USAGE ON SCHEMA public TO reader; \
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader",
        )
        .await;
    let reader = open(&url.replace("postgres@", "reader@")).await;
    assert_eq!(reader.load(&key).await.unwrap().unwrap().value, record("a"));
    let err = reader.save(&key, &record("b"), None).await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::PermissionDenied, "{err:?}");

    server
        .execute(&db, "DROP TABLE public.tokenkeeper_grants")
        .await;
    let err = store.load(&key).await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_at_once_migrate_an_empty_database_once() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                PostgresStore::builder(url)
                    .schema("fresh")
                    .max_connections(1)
                    .build()
                    .await
            })
        })
        .collect();
    let mut stores = Vec::new();
    for start in starts {
        stores.push(start.await.unwrap().expect("every instance starts"));
    }
    let key = TokenKey::from("k");
    let v = saved(stores[0].save(&key, &record("a"), None).await.unwrap());
    assert_eq!(stores[7].load(&key).await.unwrap().unwrap().version, v);
    let client = server.connect(database(&url)).await;
    let version: i32 = client
        .query_one("SELECT version FROM fresh.tokenkeeper_schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 1);
}

#[tokio::test]
async fn a_newer_layout_is_refused() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    open(&url).await;
    server
        .execute(
            database(&url),
            "UPDATE public.tokenkeeper_schema_version SET version = 99",
        )
        .await;
    let err = PostgresStore::builder(&url).build().await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::Backend);
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("upgrade tokenkeeper"),
        "{err:?}"
    );
}

#[tokio::test]
async fn keys_are_paged_in_byte_order() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let store = open(&url).await;
    for key in ["b", "a", "é", "Z", "a0", "a\0"] {
        store
            .save(&TokenKey::from(key), &record("x"), None)
            .await
            .unwrap();
    }
    let page = store.keys_after(None, 2).await.unwrap();
    assert_eq!(page, [TokenKey::from("Z"), TokenKey::from("a")]);
    let page = store
        .keys_after(Some(&TokenKey::from("a")), 10)
        .await
        .unwrap();
    let expected = ["a\0", "a0", "b", "é"].map(TokenKey::from);
    assert_eq!(page, expected);
    let mut all = store.keys().await.unwrap();
    all.sort();
    assert_eq!(all.len(), 6);
}

/// Two managers (two instances of an app) on two stores over one database, against a fake
/// server with strict rotation: an expiry is refreshed once between them, the rotated
/// refresh token is in the database, and both serve the one new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_on_two_instances_refresh_a_grant_once_through_postgres() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let clock = Arc::new(ManualClock::fixed());
    let auth = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    let grant = auth.issue_grant();
    let key = TokenKey::from("tenant-1");
    let managers: Vec<TokenManager> = {
        let mut managers = Vec::new();
        for _ in 0..2 {
            managers.push(
                TokenManager::builder(support::oauth2_provider(&auth))
                    .store(open(&url).await)
                    .clock(clock.clone())
                    .build(),
            );
        }
        managers
    };
    managers[0]
        .insert(key.clone(), support::tokens(&grant))
        .await
        .unwrap();
    assert_eq!(
        managers[1].access_token(&key).await.unwrap().secret(),
        grant.access_token
    );

    for expiry in 1..=3 {
        clock.advance(Duration::from_secs(3600 + 120));
        let calls: Vec<_> = (0..16)
            .map(|i| {
                let (manager, key) = (managers[i % 2].clone(), key.clone());
                tokio::spawn(async move { manager.access_token(&key).await })
            })
            .collect();
        let mut tokens = std::collections::BTreeSet::new();
        for call in calls {
            tokens.insert(call.await.unwrap().unwrap().secret().to_owned());
        }
        assert_eq!(tokens.len(), 1, "expiry {expiry}: one token for everyone");
        let token = tokens.into_iter().next().unwrap();
        assert!(auth.is_access_token_valid(&token));
        assert_eq!(auth.refresh_calls_for(&grant.grant), expiry, "one refresh");
        assert_eq!(auth.reuse_detections(), 0);
        let stored = open(&url).await.load(&key).await.unwrap().unwrap();
        assert_eq!(stored.value.tokens().access_token().secret(), token);
    }
}

#[tokio::test]
async fn no_password_in_debug_or_errors() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    // Trust authentication ignores the password; the store must still never show it.
    let with_password = url.replace("postgres@", "postgres:hunter2-pw@");
    let builder = PostgresStore::builder(&with_password);
    let shown = format!("{builder:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    let store = builder.build().await.unwrap();
    let shown = format!("{store:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains(&format!("127.0.0.1:{}/{}", server.port(), database(&url))),
        "{shown}"
    );

    // Nobody listens there: a backend error that names no password.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let err = PostgresStore::builder(format!("postgres://app:hunter2-pw@127.0.0.1:{closed}/db"))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), StoreErrorKind::Backend);
    let mut shown = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        shown.push_str(&format!(" {cause}"));
        source = cause.source();
    }
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// A server-side error quotes PostgreSQL's code and message, never its detail (which can
/// quote a whole row, tokens included).
#[tokio::test]
async fn a_server_error_does_not_quote_the_row() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let store = open(&url).await;
    // A constraint a DBA added, which the record breaks.
    server
        .execute(
            database(&url),
            "ALTER TABLE public.tokenkeeper_grants ADD CONSTRAINT short \
             CHECK (length(record) < 10)",
        )
        .await;
    let err = store
        .save(&TokenKey::from("k"), &record("secret-access-token"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), StoreErrorKind::Backend);
    let shown = format!("{err} {err:?} {}", std::error::Error::source(&err).unwrap());
    assert!(shown.contains("23514"), "the code: {shown}");
    assert!(!shown.contains("secret-access-token"), "{shown}");
}

/// Another session holding the grant's row locked past the statement timeout makes a save
/// fail as a retryable backend error, not hang. (The 200 ms are PostgreSQL's own wait.)
#[tokio::test]
async fn a_row_locked_past_the_statement_timeout_is_a_backend_error() {
    let server = PostgresServer::shared();
    let url = server.create_database().await;
    let store = PostgresStore::builder(&url)
        .statement_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let key = TokenKey::from("k");
    let v = saved(store.save(&key, &record("a"), None).await.unwrap());
    let mut other = server.connect(database(&url)).await;
    let tx = other.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM public.tokenkeeper_grants WHERE key = $1 FOR UPDATE",
        &[&b"k".as_slice()],
    )
    .await
    .unwrap();
    let b = record("b");
    let save = store.save(&key, &b, Some(v));
    let err = tokio::time::timeout(Duration::from_secs(10), save)
        .await
        .expect("the save must give up, not wait for the row")
        .err()
        .unwrap();
    assert_eq!(err.kind(), StoreErrorKind::Backend);
    assert!(
        tokenkeeper::Error::Store(err.clone()).is_retryable(),
        "{err:?}"
    );
    // Readers are not blocked by the row lock.
    assert_eq!(store.load(&key).await.unwrap().unwrap().version, v);
    tx.rollback().await.unwrap();
    saved(store.save(&key, &record("b"), Some(v)).await.unwrap());
}
