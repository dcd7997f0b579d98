//! `RedisStore` on a real Redis Cluster: three `redis-server --cluster-enabled yes` on loopback
//! ports, joined by `redis-cli --cluster create`, started and stopped by each test (see
//! `support::redis::RedisCluster`); one test reshards it with `redis-cli --cluster reshard`
//! while listing. Fails, never skips, without `redis-server`.
//!
//! Run with `cargo test --features redis --test redis_cluster`.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{
    Cas, GrantRecord, RedisStore, StoreErrorKind, TokenKey, TokenManager, TokenStore,
};

use support::redis::{query, RedisCluster, CLUSTER_NODES};

async fn store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::cluster(cluster.urls())
        .build()
        .await
        .expect("connecting to the cluster")
}

fn record(access_token: &str) -> GrantRecord {
    GrantRecord::new(tokenkeeper::TokenSet::new(tokenkeeper::AccessToken::new(
        access_token,
    )))
}

/// The names of the keys one node holds under `prefix`, asked of that node alone.
fn names_on(port: u16, prefix: &str) -> BTreeSet<String> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .and_then(|c| c.get_connection())
        .expect("a connection to one node");
    let mut names = BTreeSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(&mut conn)
            .expect("SCAN on one node");
        names.extend(batch);
        if next == 0 {
            return names;
        }
        cursor = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_store_contract_on_a_cluster() {
    let cluster = RedisCluster::start();
    let store = store(&cluster).await;
    tokenkeeper::testing::assert_store_contract(&store).await;
    tokenkeeper::testing::assert_store_has_lock(&store).await;
    tokenkeeper::testing::assert_one_winner_per_version(
        Arc::new(self::store(&cluster).await),
        Arc::new(self::store(&cluster).await),
    )
    .await;
}

#[tokio::test]
async fn grants_on_every_node_are_listed_and_paged() {
    let cluster = RedisCluster::start();
    let store = RedisStore::cluster(cluster.urls())
        .prefix("app:")
        .build()
        .await
        .unwrap();
    let other = RedisStore::cluster(cluster.urls())
        .prefix("other:")
        .build()
        .await
        .unwrap();
    let awkward = ["", "}", "{", "{}", "%", "%7B", "a{b}c", "é/*?[x]"];
    let mut expected: Vec<TokenKey> = (0..600)
        .map(|i| TokenKey::from(format!("tenant:{i}")))
        .chain(awkward.iter().map(|k| TokenKey::from(*k)))
        .collect();
    for key in &expected {
        assert!(matches!(
            store.save(key, &record("a"), None).await.unwrap(),
            Cas::Saved(_)
        ));
    }
    other
        .save(&TokenKey::from("tenant:1"), &record("b"), None)
        .await
        .unwrap();
    expected.sort();

    // Each node holds some of them, and no node holds a key of another node's slots.
    let mut held = 0;
    for port in cluster.ports() {
        let names = names_on(port, "app:");
        assert!(
            names.len() > 50,
            "node {port} holds {} grants of 608",
            names.len()
        );
        held += names.len();
    }
    assert_eq!(held, expected.len(), "every grant on exactly one node");
    assert_eq!(cluster.ports().len(), CLUSTER_NODES);

    // Both keys of a grant share a slot, by the server's own count.
    let port = cluster.ports()[0];
    for key in ["customer-42", "%7D", "%", "%25"] {
        let slot = |name: &str| query(port, &format!("CLUSTER KEYSLOT {name}")).unwrap();
        assert_eq!(
            slot(&format!("app:{{{key}}}:grant")),
            slot(&format!("app:{{{key}}}:lock")),
            "{key}"
        );
    }

    assert_eq!(store.keys().await.unwrap(), expected);
    assert_eq!(
        other.keys().await.unwrap(),
        vec![TokenKey::from("tenant:1")]
    );
    let mut paged = Vec::new();
    let mut after: Option<TokenKey> = None;
    loop {
        let page = store.keys_after(after.as_ref(), 97).await.unwrap();
        assert!(page.len() <= 97);
        match page.last() {
            None => break,
            Some(last) => after = Some(last.clone()),
        }
        paged.extend(page);
    }
    assert_eq!(paged, expected);

    // Each awkward key loads back as itself, and deletes.
    for key in awkward {
        let key = TokenKey::from(key);
        assert!(store.load(&key).await.unwrap().is_some(), "{key:?}");
        assert!(store.delete(&key).await.unwrap(), "{key:?}");
        assert!(store.load(&key).await.unwrap().is_none(), "{key:?}");
    }
    assert_eq!(store.keys().await.unwrap().len(), 600);

    // A cluster that serves no node for a slot fails the listing rather than return it short.
    for port in cluster.ports() {
        assert_eq!(query(port, "CLUSTER DELSLOTS 0").as_deref(), Some("+OK"));
    }
    let err = store.keys().await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Backend);
    let text = std::error::Error::source(&err).unwrap().to_string();
    assert!(text.contains("16383 of its 16384"), "{text}");
}

#[tokio::test]
async fn the_lock_excludes_another_instance_expires_and_is_released_by_its_owner_only() {
    let cluster = RedisCluster::start();
    let store = store(&cluster).await;
    let other = RedisStore::cluster(cluster.urls())
        .lock_wait(Duration::from_millis(150))
        .build()
        .await
        .unwrap();
    let patient = RedisStore::cluster(cluster.urls())
        .lock_wait(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    let long = Duration::from_secs(60);
    // Keys whose locks land on different nodes, all held at once.
    let keys: Vec<TokenKey> = (0..12).map(|i| TokenKey::from(format!("k{i}"))).collect();
    let mut held = Vec::new();
    for key in &keys {
        held.push(store.lock(key, long).await.unwrap().unwrap());
    }
    for key in &keys {
        let err = other.lock(key, long).await.err().unwrap();
        assert_eq!(err.kind(), StoreErrorKind::LockTimeout, "{key:?}");
    }
    for lock in held {
        lock.release().await.unwrap();
    }
    for key in &keys {
        other
            .lock(key, long)
            .await
            .unwrap()
            .unwrap()
            .release()
            .await
            .unwrap();
    }

    // A holder that dies: its lock expires after its ttl, and a peer takes it.
    let key = TokenKey::from("k0");
    let dead = store
        .lock(&key, Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    std::mem::forget(dead);
    let started = std::time::Instant::now();
    let peer = patient.lock(&key, long).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));

    // The late release of an expired lock leaves the peer's lock alone.
    let late = store
        .lock(&TokenKey::from("k1"), Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    let peer_of_late = patient
        .lock(&TokenKey::from("k1"), long)
        .await
        .unwrap()
        .unwrap();
    late.release().await.unwrap();
    let err = other.lock(&TokenKey::from("k1"), long).await.err().unwrap();
    assert_eq!(err.kind(), StoreErrorKind::LockTimeout);
    peer_of_late.release().await.unwrap();
    peer.release().await.unwrap();
    other
        .lock(&key, long)
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_sharing_a_cluster_refresh_once_and_keep_the_rotated_token() {
    let cluster = RedisCluster::start();
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    let key = TokenKey::from("customer-42");
    let managers: Vec<TokenManager> = {
        let mut managers = Vec::new();
        for _ in 0..3 {
            managers.push(
                TokenManager::builder(support::oauth2_provider(&server))
                    .store(store(&cluster).await)
                    .clock(clock.clone())
                    .build(),
            );
        }
        managers
    };
    let mut grants = Vec::new();
    // Several grants, so that their keys are spread over the nodes.
    for i in 0..6 {
        let grant = server.issue_grant();
        let key = TokenKey::from(format!("customer-{}", 42 + i));
        managers[i % 3]
            .insert(key.clone(), support::tokens(&grant))
            .await
            .unwrap();
        grants.push((key, grant));
    }
    assert_eq!(grants[0].0, key);

    for round in 1..=3 {
        clock.advance(Duration::from_secs(3600 + 120));
        let calls: Vec<_> = grants
            .iter()
            .flat_map(|(key, _)| {
                managers.iter().map(move |manager| {
                    let (manager, key) = (manager.clone(), key.clone());
                    tokio::spawn(async move { manager.access_token(&key).await })
                })
            })
            .collect();
        let mut seen = BTreeSet::new();
        for call in calls {
            let token = call.await.unwrap().unwrap();
            assert!(server.is_access_token_valid(token.secret()));
            seen.insert(token.secret().to_owned());
        }
        assert_eq!(seen.len(), grants.len(), "one token per grant");
        for (key, grant) in &grants {
            assert_eq!(
                server.refresh_calls_for(&grant.grant),
                round,
                "{key:?}: one refresh per expiry"
            );
        }
        assert_eq!(server.reuse_detections(), 0);
    }

    // A manager that starts now reads the rotated grant from the cluster.
    let fresh = TokenManager::builder(support::oauth2_provider(&server))
        .store(store(&cluster).await)
        .clock(clock.clone())
        .build();
    for (key, _) in &grants {
        let token = fresh.access_token(key).await.unwrap();
        assert!(server.is_access_token_valid(token.secret()));
    }
    assert_eq!(server.refresh_calls(), 3 * grants.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_stay_complete_and_grants_usable_while_slots_move() {
    let cluster = RedisCluster::start();
    let store = Arc::new(store(&cluster).await);
    let mut expected: Vec<TokenKey> = (0..400)
        .map(|i| TokenKey::from(format!("tenant:{i}")))
        .collect();
    let mut versions = Vec::new();
    for key in &expected {
        let Cas::Saved(v) = store.save(key, &record("a"), None).await.unwrap() else {
            panic!("{key:?}")
        };
        versions.push(v);
    }
    expected.sort();
    let ports = cluster.ports();
    let id = |port: u16| query(port, "CLUSTER MYID").expect("CLUSTER MYID");
    let on_first = names_on(ports[0], "tokenkeeper:").len();

    // Move 4000 slots (and their grants) from the first node to the second, while listing.
    let reshard = {
        let (from, to) = (id(ports[0]), id(ports[1]));
        let seed = format!("127.0.0.1:{}", ports[0]);
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("redis-cli")
                .args(["--cluster", "reshard", &seed])
                .args(["--cluster-from", &from, "--cluster-to", &to])
                .args(["--cluster-slots", "4000", "--cluster-yes"])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("redis-cli --cluster reshard")
        })
    };
    let (mut complete, mut failed) = (0, 0);
    while !reshard.is_finished() {
        match store.keys().await {
            Ok(keys) => {
                assert_eq!(
                    keys, expected,
                    "a listing came back short while slots moved"
                );
                complete += 1;
            }
            // A listing may fail (the slot map kept changing), never come back short.
            Err(e) => {
                assert_eq!(e.kind(), StoreErrorKind::Backend, "{e}");
                failed += 1;
            }
        }
    }
    let output = reshard.await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        complete > 0,
        "no listing while slots moved ({failed} failed)"
    );
    let moved = on_first - names_on(ports[0], "tokenkeeper:").len();
    assert!(moved > 50, "only {moved} grants moved");

    // The store follows the grants to their new node: the listing, loads, saves and locks.
    assert_eq!(store.keys().await.unwrap(), expected);
    let keys = (0..400).map(|i| TokenKey::from(format!("tenant:{i}")));
    for (key, version) in keys.zip(versions) {
        let loaded = store
            .load(&key)
            .await
            .unwrap()
            .expect("a moved grant loads");
        assert_eq!(loaded.version, version, "{key:?}");
        assert!(matches!(
            store.save(&key, &record("b"), Some(version)).await.unwrap(),
            Cas::Saved(v) if v > version
        ));
        store
            .lock(&key, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap()
            .release()
            .await
            .unwrap();
    }
}
