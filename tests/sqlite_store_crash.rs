//! Crash test for `SqliteStore` (feature `sqlite`): a child process saves in a tight loop and
//! is killed with SIGKILL at random moments, many times (in the middle of a write transaction,
//! often); after each kill the database, reopened as after a restart, must load and hold
//! either the last acknowledged record or the one being saved, never a torn or lost one, and
//! must take the next compare-and-swap save (no lock left behind by the dead writer).
//!
//! Runs with `harness = false`: `main` re-executes this binary with `--child <file>` to get
//! the process that is killed. Run it alone with
//! `cargo test --features sqlite --test sqlite_store_crash`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokenkeeper::{AccessToken, Cas, GrantRecord, RefreshToken, SqliteStore, TokenKey, TokenSet};
use tokenkeeper::{TokenStore, Version};

const NAME: &str = "sqlite_store_crash";
const KILLS: usize = 50;
/// The whole run must finish well within this.
const BUDGET: Duration = Duration::from_secs(45);
/// A record of a few kilobytes, so a torn write would show.
const PAD: usize = 8 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let Some(dir) = args.get(i + 1) else {
            eprintln!("--child needs a database file");
            return ExitCode::FAILURE;
        };
        child(Path::new(dir));
    }
    // Behave like libtest with a name filter (`cargo test some_other_test` runs every test
    // binary with that filter).
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        println!("{NAME}: filtered out");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(report) => {
            println!("{NAME}: {report}");
            println!("{KILLS} passed, 0 failed");
            ExitCode::SUCCESS
        }
        Err((passed, why)) => {
            eprintln!("{NAME}: FAILED: {why}");
            println!("{passed} passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

/// A record whose every part names `n`, so that any mix of two records is detected.
fn record(n: u64) -> GrantRecord {
    let mut extra = serde_json::Map::new();
    let pad = format!("{n};").repeat(PAD / (n.to_string().len() + 1));
    extra.insert("pad".into(), pad.into());
    GrantRecord::new(
        TokenSet::new(AccessToken::new(format!("access-{n}")))
            .with_refresh_token(RefreshToken::new(format!("refresh-{n}")))
            .with_extra(extra),
    )
}

/// The `n` a loaded record was made from, if it is whole.
fn generation(record: &GrantRecord) -> Result<u64, String> {
    let tokens = record.tokens();
    let n: u64 = tokens
        .access_token()
        .secret()
        .strip_prefix("access-")
        .and_then(|n| n.parse().ok())
        .ok_or("access token is not ours")?;
    if *record != self::record(n) {
        return Err(format!("record {n} is not whole"));
    }
    Ok(n)
}

/// The child: saves generation after generation, printing `version n` after each save.
fn child(file: &Path) -> ! {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(file).expect("store");
        let key = TokenKey::from("grant");
        let (mut version, mut n) = match store.load(&key).await.expect("load") {
            Some(loaded) => (
                Some(loaded.version),
                generation(&loaded.value).expect("a whole record"),
            ),
            None => (None, 0),
        };
        loop {
            n += 1;
            match store.save(&key, &record(n), version).await.expect("save") {
                Cas::Saved(v) => {
                    println!("{v} {n}");
                    version = Some(v);
                }
                Cas::Conflict => panic!("nobody else writes this grant"),
            }
        }
    })
}

fn spawn_child(file: &Path) -> Result<(Child, mpsc::Receiver<(Version, u64)>), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("--child")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the child: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split(' ').map(str::parse::<u64>);
            if let (Some(Ok(v)), Some(Ok(n))) = (parts.next(), parts.next()) {
                if tx.send((v, n)).is_err() {
                    break;
                }
            }
        }
    });
    Ok((child, rx))
}

fn run() -> Result<String, (usize, String)> {
    let started = Instant::now();
    let tmp = tempfile::tempdir().map_err(|e| (0, e.to_string()))?;
    let file: PathBuf = tmp.path().join("grants.db");
    SqliteStore::open(&file).map_err(|e| (0, e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (0, e.to_string()))?;
    let key = TokenKey::from("grant");
    // The last state the parent knows to be durable: (version, generation).
    let mut known: Option<(Version, u64)> = None;
    let mut acked_total = 0u64;
    let mut caught_in_flight = 0usize;
    for round in 0..KILLS {
        let fail = |why: String| (round, format!("kill {}: {why}", round + 1));
        if started.elapsed() > BUDGET {
            return Err(fail(format!("over the time budget of {BUDGET:?}")));
        }
        let (mut child, acks) = spawn_child(&file).map_err(fail)?;
        // Let it get into its loop (one acknowledged save), then kill it at a random moment.
        let first = acks.recv_timeout(Duration::from_secs(10));
        if first.is_ok() {
            std::thread::sleep(Duration::from_micros(fastrand::u64(0..15_000)));
        }
        child
            .kill()
            .map_err(|e| fail(format!("cannot kill the child: {e}")))?;
        let status = child.wait().map_err(|e| fail(e.to_string()))?;
        let first = first.map_err(|_| fail(format!("the child never saved ({status})")))?;
        let mut last = first;
        acked_total += 1;
        // Every line it wrote before dying.
        while let Ok(ack) = acks.recv_timeout(Duration::from_secs(5)) {
            last = ack;
            acked_total += 1;
        }
        if let Some((v, n)) = known {
            if first.1 != n + 1 || first.0 <= v {
                return Err(fail(format!(
                    "the child resumed at {first:?} after {known:?}"
                )));
            }
        }

        // A restart: a new connection recovers what the dead writer left.
        let store = SqliteStore::open(&file).map_err(|e| fail(format!("reopen failed: {e}")))?;
        let loaded = runtime
            .block_on(store.load(&key))
            .map_err(|e| fail(format!("load failed: {e}")))?
            .ok_or_else(|| fail("the record is gone".into()))?;
        let n = generation(&loaded.value).map_err(fail)?;
        let state = (loaded.version, n);
        if state == last {
            // The acknowledged record.
        } else if n == last.1 + 1 && loaded.version > last.0 {
            caught_in_flight += 1; // Saved, killed before it could say so.
        } else {
            return Err(fail(format!(
                "loaded {state:?}; the last acknowledged save was {last:?}"
            )));
        }

        // The database is whole: one grant, and it takes the next save against its version
        // (the dead writer's transaction left no lock behind).
        let keys = runtime
            .block_on(store.keys())
            .map_err(|e| fail(format!("keys failed: {e}")))?;
        if keys != [key.clone()] {
            return Err(fail(format!("listed {keys:?}")));
        }
        let probe = runtime
            .block_on(store.save(&key, &record(n), Some(loaded.version)))
            .map_err(|e| fail(format!("save after the kill failed: {e}")))?;
        let Cas::Saved(v) = probe else {
            return Err(fail("save after the kill conflicted".into()));
        };
        if v <= loaded.version {
            return Err(fail(format!("version {v} after {}", loaded.version)));
        }
        known = Some((v, n));
        // Only the database and its WAL files.
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .map_err(|e| fail(e.to_string()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.retain(|n| !["grants.db", "grants.db-wal", "grants.db-shm"].contains(&n.as_str()));
        if !names.is_empty() {
            return Err(fail(format!("unexpected files: {names:?}")));
        }
    }
    Ok(format!(
        "{KILLS} SIGKILLs, {acked_total} acknowledged saves, {caught_in_flight} kills after a \
         save completed but before it was acknowledged, all loads consistent, {:.1} s",
        started.elapsed().as_secs_f64()
    ))
}
