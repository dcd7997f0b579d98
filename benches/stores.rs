//! Save and load latency of the persistent stores against the raw operation on the same
//! bytes, measured in the same run, and the refresh lock's acquire+release overhead.
//!
//! Run with `cargo benches --bench stores --features stores` (`redis-server` must be installed:
//! the bench starts its own on a free loopback port). It measures one realistic grant record
//! (a 64-byte access token, a 48-byte refresh token, expiries), one operation at a time:
//!
//! 1. **`FileStore`** (criterion group `stores/file`): `save` (compare-and-swap at the current
//!    version) and `load`, against a plain write of the record's JSON to a temporary file,
//!    fsync and rename (`raw_write_fsync_rename`; also with the directory fsync the store does,
//!    `raw_write_fsync_rename_dirsync`) and a plain `std::fs::read` + `serde_json` decode
//!    (`raw_read_decode`), in one temporary directory.
//! 2. **`RedisStore`** (group `stores/redis`): `save` and `load` against a plain `SET` / `GET`
//!    (+ decode) of the same JSON through a `redis::aio::ConnectionManager` on the same server.
//! 3. **`SqliteStore`** (group `stores/sqlite`): `save` and `load` against a single-row
//!    `UPDATE` / `SELECT` (+ decode) of the same JSON on a `rusqlite` connection to another
//!    database file in the same directory, with the store's settings (WAL, `synchronous=FULL`).
//! 4. **`PostgresStore`** (group `stores/postgres`): `save` and `load` against a single-row
//!    `UPDATE` / `SELECT` (+ decode) of the same JSON through one `tokio-postgres` connection (a
//!    prepared statement) to the same server, a throwaway PostgreSQL the bench starts.
//! 5. **`EncryptedStore`** (group `stores/encrypted`): the wrapper over `MemoryStore` against the
//!    bare `MemoryStore` (its added cost per operation: XChaCha20-Poly1305 and the envelope),
//!    and over `FileStore` against the bare `FileStore`.
//! 6. **The refresh lock** (group `stores/lock`): `lock(&key, ttl)` then `release()` for
//!    `FileStore`, `RedisStore`, `SqliteStore`, `PostgresStore` and `MemoryStore`, uncontended.
//!
//! A final summary, timed with plain `Instant` loops in alternating rounds, prints per store
//! the save and load latency with the ratio store / raw, and the lock's acquire+release time
//! as a fraction of that store's save.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokenkeeper::{
    AccessToken, Cas, EncryptedStore, FileStore, GrantRecord, KeyId, Keyring, MemoryStore,
    RedisStore, RefreshToken, SqliteStore, TokenKey, TokenSet, TokenStore,
};
use tokio::runtime::Runtime;

/// The lock ttl passed to `TokenStore::lock` (the manager's default).
const LOCK_TTL: Duration = Duration::from_secs(60);
const SUMMARY_ROUNDS: usize = 7;
/// How long one summary round of one operation lasts, about.
const SUMMARY_ROUND: Duration = Duration::from_millis(150);

// The throwaway redis-server the tests use (fails with the install hint when missing).
#[path = "../tests/support/redis.rs"]
mod redis_server;
use redis_server::RedisServer;
// And their throwaway PostgreSQL.
#[path = "../tests/support/postgres.rs"]
mod postgres_server;
use postgres_server::PostgresServer;
use tokenkeeper::deadpool_postgres::tokio_postgres;
use tokenkeeper::PostgresStore;

// ---- fixture ------------------------------------------------------------------------------

/// A store with the version of its grant, so every save is a successful compare-and-swap.
struct Subject {
    store: Box<dyn TokenStore>,
    version: AtomicU64,
}

struct Fixture {
    rt: Runtime,
    key: TokenKey,
    record: GrantRecord,
    /// `record` as JSON: what the raw baselines write and read.
    json: Vec<u8>,
    file: Subject,
    memory: Subject,
    redis: Subject,
    sqlite: Subject,
    postgres: Subject,
    /// The raw PostgreSQL baseline's connection, on its own table in the same database.
    raw_postgres: tokio_postgres::Client,
    encrypted_memory: Subject,
    encrypted_file: Subject,
    /// The raw SQLite baseline's connection (another database file, the store's settings).
    raw_sqlite: std::sync::Mutex<rusqlite::Connection>,
    /// The raw file baseline's directory, next to the store's (same file system).
    raw_dir: PathBuf,
    /// The raw Redis baseline's connection and key.
    raw_redis: ConnectionManager,
    raw_redis_key: String,
    /// The size of the file the store writes (the record in an envelope).
    file_store_bytes: usize,
    _tmp: tempfile::TempDir,
    _server: RedisServer,
    _postgres: PostgresServer,
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A token of `len` bytes shaped like a provider's opaque token.
fn opaque(prefix: &str, len: usize) -> String {
    let mut s = format!(
        "{prefix}-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );
    s.extend(std::iter::repeat_n('x', len.saturating_sub(s.len())));
    s.truncate(len);
    s
}

fn grant_record() -> GrantRecord {
    // Whole seconds: stored instants are epoch milliseconds, so the record round-trips.
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs());
    GrantRecord::new(
        TokenSet::new(AccessToken::new(opaque("ya29.a0AfB", 64)))
            .with_refresh_token(RefreshToken::new(opaque("1//0g", 48)))
            .with_issued_at(now)
            .with_expires_at(now + Duration::from_secs(3600))
            .with_refresh_expires_at(now + Duration::from_secs(30 * 24 * 3600)),
    )
}

impl Subject {
    fn new(rt: &Runtime, store: impl TokenStore, key: &TokenKey, record: &GrantRecord) -> Self {
        let store: Box<dyn TokenStore> = Box::new(store);
        let Cas::Saved(version) = rt
            .block_on(store.save(key, record, None))
            .expect("first save")
        else {
            panic!("the first save conflicted")
        };
        Self {
            store,
            version: AtomicU64::new(version),
        }
    }
}

fn fixture(server: RedisServer, pg: PostgresServer) -> Fixture {
    let rt = runtime();
    let key = TokenKey::new("tenant-0042");
    let record = grant_record();
    let json = record.to_json().expect("encode record");

    let tmp = tempfile::tempdir().expect("temporary directory");
    let file_store = FileStore::create(tmp.path().join("grants")).expect("file store");
    let raw_dir = tmp.path().join("raw");
    fs::create_dir(&raw_dir).expect("raw directory");
    let file = Subject::new(&rt, file_store.clone(), &key, &record);
    let file_store_bytes = fs::read_dir(file_store.dir())
        .expect("list the store")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .and_then(|p| fs::metadata(p).ok())
        .map_or(0, |m| m.len() as usize);

    let url = server.url();
    let (redis, raw_redis) = rt.block_on(async {
        let store = RedisStore::builder(&url)
            .prefix("bench:")
            .build()
            .await
            .expect("redis store");
        // The same kind of connection with the store's settings.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let client = redis::Client::open(url.as_str()).expect("redis url");
        let raw = ConnectionManager::new_with_config(client, config)
            .await
            .expect("raw redis connection");
        (store, raw)
    });
    let redis = Subject::new(&rt, redis, &key, &record);
    let memory = Subject::new(&rt, MemoryStore::new(), &key, &record);
    let sqlite = SqliteStore::open(tmp.path().join("grants.sqlite")).expect("sqlite store");
    let sqlite = Subject::new(&rt, sqlite, &key, &record);
    let raw_sqlite = rusqlite::Connection::open(tmp.path().join("raw.sqlite")).expect("raw db");
    let mode: String = raw_sqlite
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .expect("WAL");
    assert_eq!(mode, "wal");
    raw_sqlite
        .pragma_update(None, "synchronous", "FULL")
        .expect("synchronous=FULL");
    raw_sqlite
        .execute_batch(
            "CREATE TABLE grants (key TEXT PRIMARY KEY, version INTEGER NOT NULL, record BLOB NOT NULL)",
        )
        .expect("raw table");
    raw_sqlite
        .execute(
            "INSERT INTO grants (key, version, record) VALUES (?1, 1, ?2)",
            rusqlite::params![key.as_str(), json],
        )
        .expect("raw row");
    let (postgres, raw_postgres) = rt.block_on(async {
        let url = pg.create_database().await;
        let store = PostgresStore::builder(url.clone())
            .build()
            .await
            .expect("postgres store");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("raw postgres connection");
        tokio::spawn(connection);
        client
            .batch_execute(
                "CREATE TABLE raw_grants (key text PRIMARY KEY, version bigint NOT NULL, \
                 record text NOT NULL)",
            )
            .await
            .expect("raw table");
        client
            .execute(
                "INSERT INTO raw_grants (key, version, record) VALUES ($1, 1, $2)",
                &[
                    &key.as_str(),
                    &String::from_utf8(json.clone()).expect("utf-8 JSON"),
                ],
            )
            .await
            .expect("raw row");
        (store, client)
    });
    let postgres = Subject::new(&rt, postgres, &key, &record);
    let keyring = Keyring::new(KeyId::new(1), [7; 32]);
    let encrypted_memory = Subject::new(
        &rt,
        EncryptedStore::new(MemoryStore::new(), keyring.clone()),
        &key,
        &record,
    );
    let encrypted_file = Subject::new(
        &rt,
        EncryptedStore::new(
            FileStore::create(tmp.path().join("encrypted")).expect("file store"),
            keyring,
        ),
        &key,
        &record,
    );

    let fx = Fixture {
        rt,
        key,
        record,
        json,
        file,
        memory,
        redis,
        sqlite,
        postgres,
        raw_postgres,
        encrypted_memory,
        encrypted_file,
        raw_sqlite: std::sync::Mutex::new(raw_sqlite),
        raw_dir,
        raw_redis,
        raw_redis_key: "raw:tenant-0042".to_owned(),
        file_store_bytes,
        _tmp: tmp,
        _server: server,
        _postgres: pg,
    };
    // Seed the raw baselines, so their reads find the record.
    raw_file_save(&fx, false, 1);
    raw_redis_set(&fx, 1);
    fx
}

// ---- the measured loops -------------------------------------------------------------------

fn store_save(fx: &Fixture, s: &Subject, iters: u64) -> Duration {
    fx.rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let expected = Some(s.version.load(Ordering::Relaxed));
            match s.store.save(&fx.key, &fx.record, expected).await {
                Ok(Cas::Saved(v)) => s.version.store(v, Ordering::Relaxed),
                Ok(Cas::Conflict) => panic!("unexpected conflict"),
                Err(e) => panic!("save: {e}"),
            }
        }
        start.elapsed()
    })
}

fn store_load(fx: &Fixture, s: &Subject, iters: u64) -> Duration {
    fx.rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let loaded = s.store.load(&fx.key).await.expect("load").expect("stored");
            std::hint::black_box(loaded);
        }
        start.elapsed()
    })
}

fn store_lock(fx: &Fixture, s: &Subject, iters: u64) -> Duration {
    fx.rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let lock = s
                .store
                .lock(&fx.key, LOCK_TTL)
                .await
                .expect("lock")
                .expect("the store has a refresh lock");
            lock.release().await.expect("release");
        }
        start.elapsed()
    })
}

/// Temporary file, write, fsync, rename (and, with `dir_sync`, fsync of the directory).
fn raw_file_save(fx: &Fixture, dir_sync: bool, iters: u64) -> Duration {
    let (tmp, path) = (
        fx.raw_dir.join("grant.json.tmp"),
        fx.raw_dir.join("grant.json"),
    );
    let start = Instant::now();
    for _ in 0..iters {
        let mut file = File::create(&tmp).expect("create");
        file.write_all(&fx.json).expect("write");
        file.sync_all().expect("fsync");
        drop(file);
        fs::rename(&tmp, &path).expect("rename");
        if dir_sync {
            sync_dir(&fx.raw_dir);
        }
    }
    start.elapsed()
}

fn sync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .expect("fsync directory");
}

fn raw_file_load(fx: &Fixture, iters: u64) -> Duration {
    let path = fx.raw_dir.join("grant.json");
    let start = Instant::now();
    for _ in 0..iters {
        let bytes = fs::read(&path).expect("read");
        let record: GrantRecord = serde_json::from_slice(&bytes).expect("decode");
        std::hint::black_box(record);
    }
    start.elapsed()
}

fn raw_redis_set(fx: &Fixture, iters: u64) -> Duration {
    let mut conn = fx.raw_redis.clone();
    fx.rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let () = redis::cmd("SET")
                .arg(&fx.raw_redis_key)
                .arg(&fx.json)
                .query_async(&mut conn)
                .await
                .expect("SET");
        }
        start.elapsed()
    })
}

fn raw_redis_get(fx: &Fixture, iters: u64) -> Duration {
    let mut conn = fx.raw_redis.clone();
    fx.rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let bytes: Vec<u8> = redis::cmd("GET")
                .arg(&fx.raw_redis_key)
                .query_async(&mut conn)
                .await
                .expect("GET");
            let record: GrantRecord = serde_json::from_slice(&bytes).expect("decode");
            std::hint::black_box(record);
        }
        start.elapsed()
    })
}

/// A single-row `UPDATE` of the record (autocommit), as a plain application would write it.
fn raw_sqlite_update(fx: &Fixture, iters: u64) -> Duration {
    let conn = fx.raw_sqlite.lock().expect("raw connection");
    let mut update = conn
        .prepare_cached("UPDATE grants SET record = ?1, version = version + 1 WHERE key = ?2")
        .expect("prepare");
    let start = Instant::now();
    for _ in 0..iters {
        let changed = update
            .execute(rusqlite::params![fx.json, fx.key.as_str()])
            .expect("UPDATE");
        assert_eq!(changed, 1);
    }
    start.elapsed()
}

/// A single-row `SELECT` of the record, then the decode.
fn raw_sqlite_select(fx: &Fixture, iters: u64) -> Duration {
    let conn = fx.raw_sqlite.lock().expect("raw connection");
    let mut select = conn
        .prepare_cached("SELECT version, record FROM grants WHERE key = ?1")
        .expect("prepare");
    let start = Instant::now();
    for _ in 0..iters {
        let (version, bytes): (i64, Vec<u8>) = select
            .query_row([fx.key.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("SELECT");
        let record: GrantRecord = serde_json::from_slice(&bytes).expect("decode");
        std::hint::black_box((version, record));
    }
    start.elapsed()
}

/// A single-row `UPDATE` of the record through a prepared statement.
fn raw_postgres_update(fx: &Fixture, iters: u64) -> Duration {
    let json = std::str::from_utf8(&fx.json).expect("utf-8 JSON");
    fx.rt.block_on(async {
        let update = fx
            .raw_postgres
            .prepare("UPDATE raw_grants SET record = $1, version = version + 1 WHERE key = $2")
            .await
            .expect("prepare");
        let start = Instant::now();
        for _ in 0..iters {
            let changed = fx
                .raw_postgres
                .execute(&update, &[&json, &fx.key.as_str()])
                .await
                .expect("UPDATE");
            assert_eq!(changed, 1);
        }
        start.elapsed()
    })
}

/// A single-row `SELECT` of the record through a prepared statement, then the decode.
fn raw_postgres_select(fx: &Fixture, iters: u64) -> Duration {
    fx.rt.block_on(async {
        let select = fx
            .raw_postgres
            .prepare("SELECT version, record FROM raw_grants WHERE key = $1")
            .await
            .expect("prepare");
        let start = Instant::now();
        for _ in 0..iters {
            let row = fx
                .raw_postgres
                .query_one(&select, &[&fx.key.as_str()])
                .await
                .expect("SELECT");
            let (version, text): (i64, &str) = (row.get(0), row.get(1));
            let record: GrantRecord = serde_json::from_str(text).expect("decode");
            std::hint::black_box((version, record));
        }
        start.elapsed()
    })
}

// ---- criterion groups ---------------------------------------------------------------------

fn bench_file(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("stores/file");
    group.bench_function("raw_write_fsync_rename", |b| {
        b.iter_custom(|n| raw_file_save(fx, false, n))
    });
    group.bench_function("raw_write_fsync_rename_dirsync", |b| {
        b.iter_custom(|n| raw_file_save(fx, true, n))
    });
    group.bench_function("store_save", |b| {
        b.iter_custom(|n| store_save(fx, &fx.file, n))
    });
    group.bench_function("raw_read_decode", |b| {
        b.iter_custom(|n| raw_file_load(fx, n))
    });
    group.bench_function("store_load", |b| {
        b.iter_custom(|n| store_load(fx, &fx.file, n))
    });
    group.finish();
}

fn bench_redis(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("stores/redis");
    group.bench_function("raw_set", |b| b.iter_custom(|n| raw_redis_set(fx, n)));
    group.bench_function("store_save", |b| {
        b.iter_custom(|n| store_save(fx, &fx.redis, n))
    });
    group.bench_function("raw_get_decode", |b| {
        b.iter_custom(|n| raw_redis_get(fx, n))
    });
    group.bench_function("store_load", |b| {
        b.iter_custom(|n| store_load(fx, &fx.redis, n))
    });
    group.finish();
}

fn bench_sqlite(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("stores/sqlite");
    group.bench_function("raw_update", |b| {
        b.iter_custom(|n| raw_sqlite_update(fx, n))
    });
    group.bench_function("store_save", |b| {
        b.iter_custom(|n| store_save(fx, &fx.sqlite, n))
    });
    group.bench_function("raw_select_decode", |b| {
        b.iter_custom(|n| raw_sqlite_select(fx, n))
    });
    group.bench_function("store_load", |b| {
        b.iter_custom(|n| store_load(fx, &fx.sqlite, n))
    });
    group.finish();
}

fn bench_postgres(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("stores/postgres");
    group.bench_function("raw_update", |b| {
        b.iter_custom(|n| raw_postgres_update(fx, n))
    });
    group.bench_function("store_save", |b| {
        b.iter_custom(|n| store_save(fx, &fx.postgres, n))
    });
    group.bench_function("raw_select_decode", |b| {
        b.iter_custom(|n| raw_postgres_select(fx, n))
    });
    group.bench_function("store_load", |b| {
        b.iter_custom(|n| store_load(fx, &fx.postgres, n))
    });
    group.finish();
}

fn bench_encrypted(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("stores/encrypted");
    for (name, subject) in [
        ("memory_save", &fx.memory),
        ("encrypted_memory_save", &fx.encrypted_memory),
    ] {
        group.bench_function(name, |b| b.iter_custom(|n| store_save(fx, subject, n)));
    }
    for (name, subject) in [
        ("memory_load", &fx.memory),
        ("encrypted_memory_load", &fx.encrypted_memory),
    ] {
        group.bench_function(name, |b| b.iter_custom(|n| store_load(fx, subject, n)));
    }
    group.finish();
}

fn bench_lock(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("stores/lock");
    for (name, subject) in [
        ("file_lock_release", &fx.file),
        ("redis_lock_release", &fx.redis),
        ("sqlite_lock_release", &fx.sqlite),
        ("postgres_lock_release", &fx.postgres),
        ("memory_lock_release", &fx.memory),
    ] {
        group.bench_function(name, |b| b.iter_custom(|n| store_lock(fx, subject, n)));
    }
    group.bench_function("memory_save", |b| {
        b.iter_custom(|n| store_save(fx, &fx.memory, n))
    });
    group.finish();
}

// ---- summary ------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Calls per round so that one round of `op` lasts about `round`.
fn calls_per_round(op: &mut dyn FnMut(u64) -> Duration, round: Duration) -> u64 {
    let mut calls = 1;
    loop {
        let took = op(calls);
        if took >= Duration::from_millis(20) || calls >= 1 << 24 {
            let scale = round.as_secs_f64() / took.as_secs_f64().max(1e-9);
            return ((calls as f64 * scale) as u64).max(1);
        }
        calls *= 4;
    }
}

/// Median µs per call of each op, timed in alternating rounds after a calibration (which
/// doubles as warm-up).
fn timed<const N: usize>(
    rounds: usize,
    round: Duration,
    mut ops: [&mut dyn FnMut(u64) -> Duration; N],
) -> [f64; N] {
    let calls = ops.each_mut().map(|op| calls_per_round(*op, round));
    let mut samples: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..rounds {
        for i in 0..N {
            let took = ops[i](calls[i]);
            samples[i].push(took.as_secs_f64() * 1e6 / calls[i] as f64);
        }
    }
    samples.map(median)
}

fn main() {
    // Before anything is measured: fails with the install hint if redis-server is missing.
    let server = RedisServer::start();
    let fx = fixture(server, PostgresServer::start());

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        // Plot rendering costs more than the measurements; keep the run short.
        .without_plots()
        .configure_from_args();
    bench_file(&mut c, &fx);
    bench_redis(&mut c, &fx);
    bench_sqlite(&mut c, &fx);
    bench_postgres(&mut c, &fx);
    bench_encrypted(&mut c, &fx);
    bench_lock(&mut c, &fx);
    c.final_summary();

    // `cargo bench` passes `--bench`; under `cargo test --benches` only smoke-test the summary.
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, round) = if full {
        (SUMMARY_ROUNDS, SUMMARY_ROUND)
    } else {
        (1, Duration::from_millis(5))
    };
    let [file_save, file_raw_save, file_raw_save_dirsync, file_lock] = timed(
        rounds,
        round,
        [
            &mut |n| store_save(&fx, &fx.file, n),
            &mut |n| raw_file_save(&fx, false, n),
            &mut |n| raw_file_save(&fx, true, n),
            &mut |n| store_lock(&fx, &fx.file, n),
        ],
    );
    let [file_load, file_raw_load] = timed(
        rounds,
        round,
        [&mut |n| store_load(&fx, &fx.file, n), &mut |n| {
            raw_file_load(&fx, n)
        }],
    );
    let [redis_save, redis_raw_save, redis_lock] = timed(
        rounds,
        round,
        [
            &mut |n| store_save(&fx, &fx.redis, n),
            &mut |n| raw_redis_set(&fx, n),
            &mut |n| store_lock(&fx, &fx.redis, n),
        ],
    );
    let [redis_load, redis_raw_load] = timed(
        rounds,
        round,
        [&mut |n| store_load(&fx, &fx.redis, n), &mut |n| {
            raw_redis_get(&fx, n)
        }],
    );
    let [sqlite_save, sqlite_raw_save, sqlite_lock] = timed(
        rounds,
        round,
        [
            &mut |n| store_save(&fx, &fx.sqlite, n),
            &mut |n| raw_sqlite_update(&fx, n),
            &mut |n| store_lock(&fx, &fx.sqlite, n),
        ],
    );
    let [sqlite_load, sqlite_raw_load] = timed(
        rounds,
        round,
        [&mut |n| store_load(&fx, &fx.sqlite, n), &mut |n| {
            raw_sqlite_select(&fx, n)
        }],
    );
    let [pg_save, pg_raw_save, pg_lock] = timed(
        rounds,
        round,
        [
            &mut |n| store_save(&fx, &fx.postgres, n),
            &mut |n| raw_postgres_update(&fx, n),
            &mut |n| store_lock(&fx, &fx.postgres, n),
        ],
    );
    let [pg_load, pg_raw_load] = timed(
        rounds,
        round,
        [&mut |n| store_load(&fx, &fx.postgres, n), &mut |n| {
            raw_postgres_select(&fx, n)
        }],
    );
    let [enc_mem_save, plain_mem_save, enc_mem_load, plain_mem_load] = timed(
        rounds,
        round,
        [
            &mut |n| store_save(&fx, &fx.encrypted_memory, n),
            &mut |n| store_save(&fx, &fx.memory, n),
            &mut |n| store_load(&fx, &fx.encrypted_memory, n),
            &mut |n| store_load(&fx, &fx.memory, n),
        ],
    );
    let [enc_file_save, plain_file_save, enc_file_load, plain_file_load] = timed(
        rounds,
        round,
        [
            &mut |n| store_save(&fx, &fx.encrypted_file, n),
            &mut |n| store_save(&fx, &fx.file, n),
            &mut |n| store_load(&fx, &fx.encrypted_file, n),
            &mut |n| store_load(&fx, &fx.file, n),
        ],
    );
    let [memory_save, memory_lock] = timed(
        rounds,
        round,
        [&mut |n| store_save(&fx, &fx.memory, n), &mut |n| {
            store_lock(&fx, &fx.memory, n)
        }],
    );

    // Every store still holds the record at the version of its last save.
    for (name, s) in [
        ("file", &fx.file),
        ("redis", &fx.redis),
        ("sqlite", &fx.sqlite),
        ("postgres", &fx.postgres),
        ("memory", &fx.memory),
        ("encrypted memory", &fx.encrypted_memory),
        ("encrypted file", &fx.encrypted_file),
    ] {
        let loaded = fx
            .rt
            .block_on(s.store.load(&fx.key))
            .expect("load")
            .expect("stored");
        assert_eq!(loaded.version, s.version.load(Ordering::Relaxed), "{name}");
        assert!(loaded.value == fx.record, "{name}: the record round-trips");
    }

    println!(
        "\nsummary (median of {rounds} alternating rounds of ~{} ms each; record JSON {} B, \
         file store's file {} B; ratio = store / raw):",
        round.as_millis(),
        fx.json.len(),
        fx.file_store_bytes,
    );
    println!(
        "FileStore:   save {file_save:.1} µs vs raw write+fsync+rename {file_raw_save:.1} µs, \
         ratio {:.2} (raw + directory fsync {file_raw_save_dirsync:.1} µs, ratio {:.2})",
        file_save / file_raw_save,
        file_save / file_raw_save_dirsync,
    );
    println!(
        "             load {file_load:.1} µs vs raw read+decode {file_raw_load:.1} µs, \
         ratio {:.2}",
        file_load / file_raw_load,
    );
    println!(
        "             lock+release {file_lock:.1} µs = {:.3} of a save",
        file_lock / file_save,
    );
    println!(
        "RedisStore:  save {redis_save:.1} µs vs raw SET {redis_raw_save:.1} µs, ratio {:.2}",
        redis_save / redis_raw_save,
    );
    println!(
        "             load {redis_load:.1} µs vs raw GET+decode {redis_raw_load:.1} µs, \
         ratio {:.2}",
        redis_load / redis_raw_load,
    );
    println!(
        "             lock+release {redis_lock:.1} µs = {:.3} of a save",
        redis_lock / redis_save,
    );
    println!(
        "SqliteStore: save {sqlite_save:.1} µs vs raw UPDATE {sqlite_raw_save:.1} µs, ratio {:.2}",
        sqlite_save / sqlite_raw_save,
    );
    println!(
        "             load {sqlite_load:.1} µs vs raw SELECT+decode {sqlite_raw_load:.1} µs, \
         ratio {:.2}",
        sqlite_load / sqlite_raw_load,
    );
    println!(
        "             lock+release {sqlite_lock:.1} µs = {:.3} of a save",
        sqlite_lock / sqlite_save,
    );
    println!(
        "PostgresStore: save {pg_save:.1} µs vs raw UPDATE {pg_raw_save:.1} µs, ratio {:.2}",
        pg_save / pg_raw_save,
    );
    println!(
        "             load {pg_load:.1} µs vs raw SELECT+decode {pg_raw_load:.1} µs, ratio {:.2}",
        pg_load / pg_raw_load,
    );
    println!(
        "             lock+release {pg_lock:.1} µs = {:.3} of a save",
        pg_lock / pg_save,
    );
    println!(
        "EncryptedStore: over MemoryStore save +{:.2} µs ({enc_mem_save:.2} vs {plain_mem_save:.2}), \
         load +{:.2} µs ({enc_mem_load:.2} vs {plain_mem_load:.2}); over FileStore save ratio {:.3}, \
         load ratio {:.2}",
        enc_mem_save - plain_mem_save,
        enc_mem_load - plain_mem_load,
        enc_file_save / plain_file_save,
        enc_file_load / plain_file_load,
    );
    println!(
        "MemoryStore: save {memory_save:.3} µs; lock+release {memory_lock:.3} µs = {:.3} of a save",
        memory_lock / memory_save,
    );
}
