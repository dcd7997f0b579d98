//! A PostgreSQL store, against a throwaway PostgreSQL (`initdb` + `pg_ctl` on a loopback port;
//! the test fails, never skips, when PostgreSQL is missing: `apt-get install -y postgresql`).

mod support;

#[path = "../../tests/support/postgres.rs"]
mod postgres_server;

use postgres_server::PostgresServer;
use support::{assert_no_secret, block_on, file_url, grant, load, outputs, seed, tokenkeeper};
use tokenkeeper::{FileStore, PostgresStore};

#[test]
fn grants_move_between_postgres_and_a_file_store() {
    let server = PostgresServer::start();
    let url = block_on(server.create_database());
    let postgres = block_on(
        PostgresStore::builder(url.clone())
            .table_prefix("cli_")
            .build(),
    )
    .expect("the store");
    let record = grant("a", true);
    seed(&postgres, &[("site-a", record.clone())]);
    let store_url = format!("{url}?table_prefix=cli_");

    let out = tokenkeeper()
        .args(["grants", "list", "--store", &store_url])
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("site-a"), "{stdout}");
    assert_no_secret(&(stdout + &stderr));

    let dir = tempfile::tempdir().unwrap();
    let out = tokenkeeper()
        .args(["grants", "move", "site-a", "--from", &store_url, "--to"])
        .arg(file_url(dir.path()))
        .output()
        .unwrap();
    let (stdout, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_no_secret(&(stdout + &stderr));
    assert_eq!(
        load(&FileStore::open(dir.path()).unwrap(), "site-a")
            .unwrap()
            .value,
        record
    );
    assert_eq!(
        load(&postgres, "site-a").unwrap().value.moved_to(),
        Some(file_url(dir.path()).as_str())
    );

    // And back over the marker.
    let out = tokenkeeper()
        .args(["grants", "move", "site-a", "--to", &store_url, "--from"])
        .arg(file_url(dir.path()))
        .output()
        .unwrap();
    let (_, stderr) = outputs(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(load(&postgres, "site-a").unwrap().value, record);
}
