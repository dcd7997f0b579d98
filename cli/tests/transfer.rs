//! `grants move` and `grants copy` as a process, between a file store and a SQLite store.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::{
    assert_no_secret, block_on, file_url, grant, load, outputs, seed, sqlite_url, tokenkeeper,
};
use tokenkeeper::{
    provider_fn, AccessToken, FileStore, InvalidationReason, SqliteStore, TokenKey, TokenManager,
    TokenResponse,
};

#[test]
fn move_copies_the_grant_and_marks_the_source_so_its_instances_report_moved() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileStore::open(dir.path()).unwrap();
    let db = dir.path().join("staging.db");
    let record = grant("a", true);
    seed(
        &files,
        &[("site-a", record.clone()), ("site-b", grant("b", true))],
    );
    let (from, to) = (file_url(dir.path()), sqlite_url(&db));

    let out = tokenkeeper()
        .args(["grants", "move", "site-a", "--from", &from, "--to", &to])
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_no_secret(&(stdout + &stderr));

    let staging = SqliteStore::open(&db).unwrap();
    assert_eq!(load(&staging, "site-a").unwrap().value, record);
    assert!(load(&staging, "site-b").is_none());
    let marked = load(&files, "site-a").unwrap().value;
    assert_eq!(marked.moved_to(), Some(to.as_str()));
    assert_eq!(marked.tokens(), record.tokens());
    assert_eq!(load(&files, "site-b").unwrap().value.moved_to(), None);

    // An application instance still reading the old store: typed "moved", no provider call.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let manager = TokenManager::builder(provider_fn(move |_key, _tokens| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok(TokenResponse::new(AccessToken::new("fresh"))) }
    }))
    .store(FileStore::open(dir.path()).unwrap())
    .build();
    let error = block_on(manager.refresh_now(&TokenKey::from("site-a"))).unwrap_err();
    assert_eq!(
        error.invalidation_reason(),
        Some(&InvalidationReason::Moved { to: to.clone() }),
        "{error:?}"
    );
    let error = block_on(manager.access_token(&TokenKey::from("site-a"))).unwrap_err();
    assert!(error.is_reauth_required());
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The listing says where it went.
    tokenkeeper()
        .args(["grants", "list", "--store", &from])
        .assert()
        .success()
        .stdout(predicates::str::contains(format!("moved to {to}")));

    // Moving it again from the old store is refused; so is a destination that has the grant.
    tokenkeeper()
        .args(["grants", "move", "site-a", "--from", &from, "--to", &to])
        .assert()
        .code(4)
        .stderr(predicates::str::contains("already moved"));
    seed(&staging, &[("site-b", grant("other-b", true))]);
    tokenkeeper()
        .args(["grants", "move", "site-b", "--from", &from, "--to", &to])
        .assert()
        .code(4)
        .stderr(predicates::str::contains("--force"));
    assert_eq!(load(&files, "site-b").unwrap().value.moved_to(), None);
    tokenkeeper()
        .args([
            "grants", "move", "site-b", "--force", "--from", &from, "--to", &to,
        ])
        .assert()
        .success();
    assert_eq!(
        load(&staging, "site-b").unwrap().value.tokens(),
        grant("b", true).tokens()
    );

    // Moving back over the marker needs no --force, and revives the grant there.
    tokenkeeper()
        .args(["grants", "move", "site-a", "--from", &to, "--to", &from])
        .assert()
        .success();
    assert_eq!(load(&files, "site-a").unwrap().value, record);
    assert!(load(&staging, "site-a").unwrap().value.moved_to().is_some());
    block_on(manager.access_token(&TokenKey::from("site-a"))).unwrap();

    // Errors a script can tell apart.
    tokenkeeper()
        .args(["grants", "move", "nobody", "--from", &from, "--to", &to])
        .assert()
        .code(3);
    tokenkeeper()
        .args(["grants", "move", "site-a", "--from", &from, "--to"])
        .arg(format!("{from}/"))
        .assert()
        .code(2)
        .stderr(predicates::str::contains("same store"));
}

#[test]
fn move_all_skips_grants_already_moved() {
    let dir = tempfile::tempdir().unwrap();
    let prod = dir.path().join("prod");
    let staging = dir.path().join("staging");
    let files = FileStore::create(&prod).unwrap();
    seed(
        &files,
        &[
            ("a", grant("a", true)),
            ("b", grant("b", false)),
            (
                "c",
                grant("c", true).into_moved("file:///elsewhere", std::time::SystemTime::now()),
            ),
        ],
    );
    let out = tokenkeeper()
        .args(["grants", "move", "--all", "--from"])
        .arg(file_url(&prod))
        .arg("--to")
        .arg(file_url(&staging))
        .output()
        .unwrap();
    let (_, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("skipped `c`"), "{stderr}");
    let moved = FileStore::open(&staging).unwrap();
    assert!(load(&moved, "a").is_some() && load(&moved, "b").is_some());
    assert!(load(&moved, "c").is_none());
    for key in ["a", "b"] {
        assert!(load(&files, key).unwrap().value.moved_to().is_some());
    }
}

#[test]
fn copy_of_a_grant_with_a_refresh_token_warns_and_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("copy.db");
    let store = SqliteStore::open(&db).unwrap();
    seed(
        &store,
        &[("rotating", grant("r", true)), ("plain", grant("p", false))],
    );
    let (from, to) = (sqlite_url(&db), file_url(&dir.path().join("copies")));

    let out = tokenkeeper()
        .args(["grants", "copy", "rotating", "--from", &from, "--to", &to])
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("rotation"),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert_no_secret(&(stdout + &stderr));
    let copies = FileStore::open(dir.path().join("copies")).unwrap();
    assert!(load(&copies, "rotating").is_none());

    // No refresh token, no rotation to lose: no --force needed.
    tokenkeeper()
        .args(["grants", "copy", "plain", "--from", &from, "--to", &to])
        .assert()
        .success();
    tokenkeeper()
        .args([
            "grants", "copy", "rotating", "--force", "--from", &from, "--to", &to,
        ])
        .assert()
        .success()
        .stderr(predicates::str::contains("warning"));
    for key in ["rotating", "plain"] {
        assert_eq!(
            load(&copies, key).unwrap().value,
            load(&store, key).unwrap().value
        );
        // A copy leaves the source as it was.
        assert_eq!(load(&store, key).unwrap().value.moved_to(), None);
    }
}
