//! A Redis store, against a throwaway `redis-server` on a loopback port (the test fails, never
//! skips, when `redis-server` is missing: `apt-get install -y redis-server`).

mod support;

#[path = "../../tests/support/redis.rs"]
mod redis_server;

use redis_server::RedisServer;
use support::{assert_no_secret, block_on, file_url, grant, load, outputs, seed, tokenkeeper};
use tokenkeeper::{FileStore, RedisStore};

#[test]
fn grants_move_from_redis_to_a_file_store_without_printing_the_password() {
    let server = RedisServer::start_with_password(Some("hunter2-redis"));
    let url = server.url();
    let redis = block_on(RedisStore::builder(url.clone()).build()).unwrap();
    let record = grant("a", true);
    seed(&redis, &[("site-a", record.clone())]);

    let out = tokenkeeper()
        .args(["grants", "list", "--store", &url])
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("site-a"), "{stdout}");
    assert_no_secret(&(stdout + &stderr));

    let dir = tempfile::tempdir().unwrap();
    let out = tokenkeeper()
        .args(["grants", "move", "site-a", "--from", &url, "--to"])
        .arg(file_url(dir.path()))
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    let text = stdout + &stderr;
    assert_no_secret(&text);
    assert!(!text.contains("hunter2"), "{text}");
    assert_eq!(
        load(&FileStore::open(dir.path()).unwrap(), "site-a")
            .unwrap()
            .value,
        record
    );
    assert_eq!(
        load(&redis, "site-a").unwrap().value.moved_to(),
        Some(file_url(dir.path()).as_str())
    );

    // And back: the marker records the Redis URL without its password.
    let out = tokenkeeper()
        .args(["grants", "move", "site-a", "--to", &url, "--from"])
        .arg(file_url(dir.path()))
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!(stdout + &stderr).contains("hunter2"));
    let to = format!("redis://127.0.0.1:{}/", server.port());
    assert_eq!(
        load(&FileStore::open(dir.path()).unwrap(), "site-a")
            .unwrap()
            .value
            .moved_to(),
        Some(to.as_str())
    );
    assert_eq!(load(&redis, "site-a").unwrap().value, record);

    // A server that does not answer: a store error (exit 1) without the password.
    drop(server);
    let out = tokenkeeper()
        .args(["grants", "list", "--store", &url])
        .output()
        .unwrap();
    let (_, stderr) = outputs(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
