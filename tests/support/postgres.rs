//! A throwaway PostgreSQL server (`initdb` + `pg_ctl`) in a temporary directory on a free
//! loopback port, stopped (and its directory removed) on drop.
//!
//! Tests that need PostgreSQL fail (never skip) when its binaries are missing, with the
//! install hint. PostgreSQL refuses to run as root: as root, the server runs as the `postgres`
//! system user (through `runuser`), which owns the temporary directory.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokenkeeper::deadpool_postgres::tokio_postgres::{self, NoTls};

const INSTALL: &str = "install PostgreSQL with: apt-get install -y postgresql";

/// A running PostgreSQL server; stopped on drop.
pub struct PostgresServer {
    port: u16,
    bin: PathBuf,
    /// Run the binaries as the `postgres` user (this process is root).
    as_postgres: bool,
    data: PathBuf,
    dir: tempfile::TempDir,
}

/// The server tests of one binary share while any of them runs.
static SHARED: Mutex<Weak<PostgresServer>> = Mutex::new(Weak::new());
/// Names the databases of this process.
static DATABASES: AtomicUsize = AtomicUsize::new(0);

impl PostgresServer {
    /// The server the running tests of this binary share, started if none is running (it
    /// stops when the last test holding it ends).
    pub fn shared() -> Arc<Self> {
        let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(Self::start());
        *slot = Arc::downgrade(&server);
        server
    }

    /// Initialises a cluster in a temporary directory (trust authentication for the
    /// `postgres` user, no fsync) and starts it on a free port of 127.0.0.1.
    pub fn start() -> Self {
        let bin = bin_dir();
        let as_postgres = running_as_root();
        let dir = tempfile::tempdir().expect("temporary directory");
        if as_postgres {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("give the temporary directory to the postgres user");
        }
        let data = dir.path().join("data");
        let mut server = Self {
            port: 0,
            bin,
            as_postgres,
            data,
            dir,
        };
        let init = server.run(
            "initdb",
            &[
                "-D".as_ref(),
                server.data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        assert!(init.status.success(), "initdb failed: {}", text(&init));

        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            let options = format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
                 -c max_connections=300",
                server.port,
                server.dir.path().display()
            );
            let log = server.dir.path().join("server.log");
            let started = server.run(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    server.data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-o".as_ref(),
                    options.as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "start".as_ref(),
                ],
            );
            if started.status.success() {
                return server;
            }
            // Most likely the port was taken meanwhile: try another.
            last = format!(
                "{}\n{}",
                text(&started),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("PostgreSQL did not start: {last}");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn create_database(&self) -> String {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::SeqCst)
        );
        self.execute("postgres", &format!("CREATE DATABASE {name}"))
            .await;
        self.url(&name)
    }

    /// Runs `sql` (one or more statements) in `database`, as the superuser.
    pub async fn execute(&self, database: &str, sql: &str) {
        let client = self.connect(database).await;
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("`{sql}` failed: {e:?}"));
    }

    /// A plain connection to `database`, as the superuser, for looking behind a store's back.
    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(database), NoTls)
            .await
            .expect("connect to the test server");
        tokio::spawn(connection);
        client
    }

    /// Runs one of PostgreSQL's programs (as the `postgres` user when this process is root).
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} ({INSTALL})", path.display()))
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
    }
}

/// The directory holding `initdb` and `pg_ctl`: from `PATH`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian does not put them on `PATH`).
fn bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = on_path.into_iter().find(|dir| has_both(dir)) {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, dir)) => dir,
        None => panic!("initdb and pg_ctl not found on PATH nor in /usr/lib/postgresql: {INSTALL}"),
    }
}

fn running_as_root() -> bool {
    let id = Command::new("id").arg("-u").output().expect("run `id -u`");
    String::from_utf8_lossy(&id.stdout).trim() == "0"
}

/// The uid and gid of the `postgres` system user.
fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => (uid, gid),
        _ => panic!(
            "running as root, and there is no `postgres` user to run PostgreSQL as (it refuses \
             root): {INSTALL}, which creates it"
        ),
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
