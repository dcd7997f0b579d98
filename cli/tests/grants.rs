//! `grants list`, `show`, `delete`, `export`, `import` as a process, on file and SQLite stores;
//! exit codes; no secret printed unless asked.

mod support;

use std::time::SystemTime;

use serde_json::Value;
use support::{assert_no_secret, file_url, grant, load, outputs, seed, sqlite_url, tokenkeeper};
use tokenkeeper::{FileStore, SqliteStore, TokenStore};

#[test]
fn list_show_and_delete_on_a_file_store_without_printing_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let moved = grant("b", true).into_moved("sqlite:///srv/grants.db", SystemTime::now());
    seed(&store, &[("site-a", grant("a", true)), ("site-b", moved)]);
    let url = file_url(dir.path());

    let out = tokenkeeper()
        .args(["grants", "list", "--store", &url])
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_no_secret(&(stdout.clone() + &stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for column in [
        "KEY",
        "HEALTH",
        "ACCESS EXPIRES",
        "REFRESH EXPIRES",
        "LAST REFRESH",
        "LAST ERROR",
    ] {
        assert!(lines[0].contains(column), "{stdout}");
    }
    assert!(lines[1].starts_with("site-a ") && lines[1].contains("active"));
    assert!(
        lines[2].starts_with("site-b ") && lines[2].contains("moved to sqlite:///srv/grants.db")
    );

    // --json: one object per line, timestamps in RFC 3339 UTC.
    let out = tokenkeeper()
        .args(["grants", "list", "--json"])
        .env("TOKENKEEPER_STORE", &url)
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_no_secret(&stdout);
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["key"], "site-a");
    assert_eq!(rows[0]["health"], "active");
    assert_eq!(rows[0]["has_refresh_token"], true);
    let expiry = rows[0]["access_expires_at"].as_str().unwrap();
    assert!(expiry.len() == 20 && expiry.ends_with('Z'), "{expiry}");
    assert_eq!(rows[1]["health"], "reauthorization_required");
    assert_eq!(rows[1]["reason"], "moved");
    assert_eq!(rows[1]["moved_to"], "sqlite:///srv/grants.db");

    let out = tokenkeeper()
        .args(["grants", "show", "site-a", "--store", &url])
        .output()
        .unwrap();
    let (stdout, _) = outputs(&out);
    assert!(out.status.success());
    assert_no_secret(&stdout);
    assert!(
        stdout.contains("site-a") && stdout.contains("refresh token      yes"),
        "{stdout}"
    );
    let out = tokenkeeper()
        .args(["grants", "show", "site-a", "--json", "--store", &url])
        .output()
        .unwrap();
    assert_no_secret(&outputs(&out).0);
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["key"], "site-a");

    // Asked for: the whole record, tokens included.
    let out = tokenkeeper()
        .args([
            "grants",
            "show",
            "site-a",
            "--include-secrets",
            "--store",
            &url,
        ])
        .output()
        .unwrap();
    let (stdout, _) = outputs(&out);
    assert!(stdout.contains("sekrit-access-a") && stdout.contains("sekrit-refresh-a"));

    tokenkeeper()
        .args(["grants", "show", "nobody", "--store", &url])
        .assert()
        .code(3)
        .stderr(predicates::str::contains("no grant `nobody`"));
    tokenkeeper()
        .args(["grants", "delete", "site-a", "--store", &url])
        .assert()
        .success();
    assert!(load(&store, "site-a").is_none());
    tokenkeeper()
        .args(["grants", "delete", "site-a", "--store", &url])
        .assert()
        .code(3);
}

#[test]
fn export_with_secrets_imports_into_another_store_kind_and_without_them_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("grants.db");
    let source = SqliteStore::open(&db).unwrap();
    let records = [("site-a", grant("a", true)), ("site-b", grant("b", false))];
    seed(&source, &records);

    let out = tokenkeeper()
        .args(["grants", "export", "--store", &sqlite_url(&db)])
        .output()
        .unwrap();
    let (listing, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_no_secret(&listing);
    assert_eq!(listing.lines().count(), 2);

    let out = tokenkeeper()
        .args(["grants", "export", "--include-secrets"])
        .args(["--store", &sqlite_url(&db)])
        .output()
        .unwrap();
    let (full, _) = outputs(&out);
    assert!(out.status.success());
    assert!(full.contains("sekrit-access-a") && full.contains("sekrit-refresh-a"));

    let target = dir.path().join("files");
    let target_url = file_url(&target);
    // A listing has no tokens: refused, nothing written (the directory is not even created).
    tokenkeeper()
        .args(["grants", "import", "--store", &target_url])
        .write_stdin(listing)
        .assert()
        .code(4)
        .stderr(predicates::str::contains("without --include-secrets"));
    assert!(!target.exists());

    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, &full).unwrap();
    let out = tokenkeeper()
        .args(["grants", "import", "--store", &target_url, "--input"])
        .arg(&file)
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_no_secret(&(stdout + &stderr));
    let imported = FileStore::open(&target).unwrap();
    for (key, record) in &records {
        assert_eq!(&load(&imported, key).unwrap().value, record);
    }

    // Again: the grants are there already.
    tokenkeeper()
        .args(["grants", "import", "--store", &target_url])
        .write_stdin(full.clone())
        .assert()
        .code(4)
        .stderr(predicates::str::contains("already has `site-a`"));
    tokenkeeper()
        .args(["grants", "import", "--force", "--store", &target_url])
        .write_stdin(full)
        .assert()
        .success();

    // A garbled line is reported by number without quoting it (it may hold tokens).
    let out = tokenkeeper()
        .args(["grants", "import", "--store", &target_url])
        .write_stdin("{\"key\": \"x\", \"record\": {\"tokens\": \"sekrit-garbled\"}}\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let (_, stderr) = outputs(&out);
    assert!(stderr.contains("line 1"), "{stderr}");
    assert_no_secret(&stderr);
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["grants", "list"], "--store"),
        (&["grants", "list", "--store", "ftp://x/y"], "not supported"),
        (
            &["grants", "list", "--store", "sqlite://relative.db"],
            "absolute path",
        ),
        (&["grants", "frobnicate"], "unrecognized subcommand"),
    ];
    for (args, message) in cases {
        let out = tokenkeeper().args(args).output().unwrap();
        let (_, stderr) = outputs(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    // A PostgreSQL server that does not answer (loopback, a closed port) is a store failure,
    // reported without the URL's password.
    let out = tokenkeeper()
        .args([
            "grants",
            "list",
            "--store",
            "postgres://u:hunter2@127.0.0.1:1/x",
        ])
        .output()
        .unwrap();
    let (_, stderr) = outputs(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // A store that is not there is a store failure, not a usage error.
    tokenkeeper()
        .args(["grants", "list", "--store"])
        .arg(file_url(&dir.path().join("missing")))
        .assert()
        .code(1)
        .stderr(predicates::str::contains("does not exist"));
    tokenkeeper()
        .args(["grants", "list", "--store"])
        .arg(sqlite_url(&dir.path().join("typo.db")))
        .assert()
        .code(1)
        .stderr(predicates::str::contains("does not exist"));
    assert!(!dir.path().join("typo.db").exists());
    // The exit codes are documented in --help.
    tokenkeeper()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicates::str::contains("Exit codes:"));
}

#[test]
fn an_unreadable_record_is_reported_and_the_rest_listed() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    seed(
        &store,
        &[("good", grant("g", true)), ("bad", grant("b", true))],
    );
    // Corrupt one record file in place.
    let keys = support::block_on(store.keys()).unwrap();
    assert_eq!(keys.len(), 2);
    let mut corrupted = false;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("sekrit-access-b") {
            std::fs::write(&path, "{ not json").unwrap();
            corrupted = true;
        }
    }
    assert!(corrupted);
    let out = tokenkeeper()
        .args(["grants", "list", "--store", &file_url(dir.path())])
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stdout.contains("good") && !stdout.contains("bad"),
        "{stdout}"
    );
    assert!(
        stderr.contains("cannot read `bad`") && stderr.contains("corrupt"),
        "{stderr}"
    );
}

#[test]
fn a_sqlite_table_prefix_is_a_query_option() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let app = SqliteStore::builder(&db)
        .table_prefix("app_")
        .build()
        .unwrap();
    seed(&app, &[("site-a", grant("a", true))]);
    tokenkeeper()
        .args(["grants", "list", "--json", "--store"])
        .arg(format!("{}?table_prefix=app_", sqlite_url(&db)))
        .assert()
        .success()
        .stdout(predicates::str::contains("\"key\":\"site-a\""));
    // The default prefix's tables are another store in the same file.
    tokenkeeper()
        .args(["grants", "list", "--json", "--store", &sqlite_url(&db)])
        .assert()
        .success()
        .stdout("");
    tokenkeeper()
        .args(["grants", "list", "--store"])
        .arg(format!("{}?prefix=app_", sqlite_url(&db)))
        .assert()
        .code(2);
}
