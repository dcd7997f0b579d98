//! Encrypted stores: keys from the environment or a file, `rekey`, moving between keys.

mod support;

use std::sync::Arc;

use predicates::prelude::*;

use support::{assert_no_secret, file_url, grant, load, outputs, seed, tokenkeeper};
use tokenkeeper::{EncryptedStore, FileStore, KeyId, Keyring, TokenStore};

const KEY_1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8";

fn encrypted(dir: &std::path::Path, id: u32, key: &str) -> EncryptedStore<Arc<dyn TokenStore>> {
    let inner: Arc<dyn TokenStore> = Arc::new(FileStore::open(dir).unwrap());
    EncryptedStore::new(inner, Keyring::from_base64(KeyId::new(id), key).unwrap())
}

#[test]
fn an_encrypted_store_is_read_with_its_key_and_rekeyed_under_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let record = grant("a", true);
    seed(
        &encrypted(dir.path(), 1, KEY_1),
        &[("site-a", record.clone())],
    );
    let url = file_url(dir.path());

    // Without the key: listed as encrypted, and a move (whose mark the applications could not
    // see) is refused.
    tokenkeeper()
        .args(["grants", "list", "--store", &url])
        .assert()
        .success()
        .stdout(predicates::str::contains("encrypted (give --key-env"));
    let elsewhere = file_url(&dir.path().join("elsewhere"));
    tokenkeeper()
        .args([
            "grants", "move", "site-a", "--from", &url, "--to", &elsewhere,
        ])
        .assert()
        .code(4)
        .stderr(predicates::str::contains("--from-key-env"));
    let kept = load(&encrypted(dir.path(), 1, KEY_1), "site-a")
        .unwrap()
        .value;
    assert_eq!(kept, record);

    let out = tokenkeeper()
        .args([
            "grants",
            "list",
            "--json",
            "--store",
            &url,
            "--key-env",
            "TK_KEY",
        ])
        .env("TK_KEY", KEY_1)
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("\"health\":\"active\""), "{stdout}");
    assert_no_secret(&(stdout + &stderr));

    // The wrong key: a store error naming the problem, never the key.
    let out = tokenkeeper()
        .args([
            "grants",
            "show",
            "site-a",
            "--store",
            &url,
            "--key-env",
            "TK_KEY",
        ])
        .env("TK_KEY", KEY_2)
        .output()
        .unwrap();
    let (_, stderr) = outputs(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be decrypted"), "{stderr}");
    assert!(!stderr.contains(KEY_1) && !stderr.contains(KEY_2));
    // A variable that is not set, or not a key: usage errors that never quote the value.
    tokenkeeper()
        .args([
            "grants",
            "list",
            "--store",
            &url,
            "--key-env",
            "TK_UNSET_KEY",
        ])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("TK_UNSET_KEY"));
    tokenkeeper()
        .args(["grants", "list", "--store", &url, "--key-env", "TK_KEY"])
        .env("TK_KEY", "c2hvcnQ=")
        .assert()
        .code(2)
        .stderr(predicates::str::contains("c2hvcnQ").not());

    // Rekey under key 2 (from a file), key 1 still listed as old.
    let key_file = dir.path().join("key-2.b64");
    std::fs::write(&key_file, format!("{KEY_2}\n")).unwrap();
    let out = tokenkeeper()
        .args(["rekey", "--store", &url, "--key-id", "2", "--key-file"])
        .arg(&key_file)
        .args(["--old-key-env", "1=TK_OLD"])
        .env("TK_OLD", KEY_1)
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "rewritten 1, already current 0, failed 0\n");
    assert_eq!(
        load(&encrypted(dir.path(), 2, KEY_2), "site-a")
            .unwrap()
            .value,
        record
    );
    // Key 1 alone no longer opens it.
    tokenkeeper()
        .args([
            "grants",
            "show",
            "site-a",
            "--store",
            &url,
            "--key-env",
            "TK_KEY",
        ])
        .env("TK_KEY", KEY_1)
        .assert()
        .code(1)
        .stderr(predicates::str::contains("not in the keyring"));

    // Moving to a plain store with the source's key: the destination holds the clear record.
    let plain = dir.path().join("plain");
    tokenkeeper()
        .args([
            "grants",
            "move",
            "site-a",
            "--from",
            &url,
            "--from-key-id",
            "2",
        ])
        .args(["--from-key-env", "TK_KEY", "--to"])
        .arg(file_url(&plain))
        .env("TK_KEY", KEY_2)
        .assert()
        .success();
    assert_eq!(
        load(&FileStore::open(&plain).unwrap(), "site-a")
            .unwrap()
            .value,
        record
    );
    assert!(load(&encrypted(dir.path(), 2, KEY_2), "site-a")
        .unwrap()
        .value
        .moved_to()
        .is_some());
}

#[test]
fn rekey_encrypts_a_store_written_without_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    seed(&store, &[("a", grant("a", true)), ("b", grant("b", false))]);
    let url = file_url(dir.path());
    // Without --accept-unencrypted, the clear records are refused, each reported.
    let out = tokenkeeper()
        .args(["rekey", "--store", &url, "--key-env", "TK_KEY"])
        .env("TK_KEY", KEY_1)
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, "rewritten 0, already current 0, failed 2\n");
    assert!(stderr.contains("not encrypted"), "{stderr}");

    tokenkeeper()
        .args([
            "rekey",
            "--accept-unencrypted",
            "--store",
            &url,
            "--key-env",
            "TK_KEY",
        ])
        .env("TK_KEY", KEY_1)
        .assert()
        .success()
        .stdout("rewritten 2, already current 0, failed 0\n");
    assert_eq!(
        load(&encrypted(dir.path(), 1, KEY_1), "a").unwrap().value,
        grant("a", true)
    );
    // The files no longer hold the tokens in clear.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        assert_no_secret(&text);
    }
}

#[test]
fn a_namespaced_store_is_read_with_its_namespace_and_moved_into_another() {
    let dir = tempfile::tempdir().unwrap();
    let (prod, staging) = (dir.path().join("prod"), dir.path().join("staging"));
    std::fs::create_dir(&prod).unwrap();
    let record = grant("a", true);
    seed(
        &encrypted(&prod, 1, KEY_1).with_namespace("prod"),
        &[("site-a", record.clone())],
    );
    let url = file_url(&prod);
    tokenkeeper()
        .args(["grants", "list", "--store", &url, "--key-env", "TK_KEY"])
        .env("TK_KEY", KEY_1)
        .assert()
        .code(1)
        .stderr(predicates::str::contains("cannot be decrypted"));
    tokenkeeper()
        .args(["grants", "list", "--store", &url, "--key-env", "TK_KEY"])
        .args(["--namespace", "prod"])
        .env("TK_KEY", KEY_1)
        .assert()
        .success()
        .stdout(predicates::str::contains("site-a"));

    // Re-encrypted on the way: another key, another namespace.
    tokenkeeper()
        .args([
            "grants",
            "move",
            "site-a",
            "--from",
            &url,
            "--from-key-env",
            "TK_KEY",
        ])
        .args(["--from-namespace", "prod", "--to"])
        .arg(file_url(&staging))
        .args(["--to-key-env", "TK_STAGING", "--to-key-id", "7"])
        .args(["--to-namespace", "staging"])
        .env("TK_KEY", KEY_1)
        .env("TK_STAGING", KEY_2)
        .assert()
        .success();
    let moved = encrypted(&staging, 7, KEY_2).with_namespace("staging");
    assert_eq!(load(&moved, "site-a").unwrap().value, record);
}
