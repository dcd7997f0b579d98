//! The cross-process proof: several real OS processes share one store (a `FileStore`
//! directory; with the `sqlite` feature a `SqliteStore` database file; with the `redis`
//! feature a `RedisStore` on one server, and one on a three-node Redis Cluster; with the
//! `postgres` feature a `PostgresStore` on a PostgreSQL server this test starts) and one fake
//! authorization server
//! with strict rotation and reuse detection. Each process runs many tasks calling
//! `access_token` while simulated expiries pass. Each expiry must be refreshed exactly once,
//! reuse detection must never fire, and every process must end with a valid token. Then one
//! process is killed with SIGKILL in the middle of its refresh (holding the refresh lock) and
//! the others must recover (the OS drops a dead process's `flock`; a SQLite or PostgreSQL
//! lease and a Redis lock expire)
//! without a reuse.
//!
//! Runs with `harness = false`: `main` re-executes this binary with `--worker …` for each
//! process. Run it alone with `cargo test --all-features --test cross_process`.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use async_trait::async_trait;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{
    ClientSecret, FileStore, GrantRecord, OAuth2Provider, Provider, ProviderError, RefreshRequest,
    TokenKey, TokenManager, TokenResponse, TokenStore,
};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

const NAME: &str = "cross_process";
/// Processes sharing the grant (plus one more that is killed).
const WORKERS: usize = 3;
/// Tasks per process, each calling `access_token` `CALLS` times per expiry.
const TASKS: usize = 8;
const CALLS: usize = 10;
/// Simulated expiries before the kill.
const EXPIRIES: u64 = 5;
/// A step of simulated time: past the fake's 1 h access-token life and the 60 s margin.
const STEP: Duration = Duration::from_secs(3600 + 120);
/// The workers' refresh-lock ttl (real time): how long a SQLite or PostgreSQL lease or a Redis
/// lock outlives a killed holder.
const LOCK_TTL: Duration = Duration::from_secs(5);
/// The peers' refresh timeout: a provider call may start only while the lease can still cover
/// it (ttl − timeout = 4 s of real time after asking for the lock, on a loaded machine too).
/// The victim keeps the default, so its hanging call holds the lock until it is killed.
const PEER_REFRESH_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest wait for any one reply from a worker.
const REPLY: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        return match runtime.block_on(worker(&args[1..])) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("ERROR {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        println!("{NAME}: filtered out");
        return ExitCode::SUCCESS;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let scenarios: Vec<(&str, StoreKind)> = vec![
        ("file store", StoreKind::File),
        #[cfg(feature = "sqlite")]
        ("sqlite store", StoreKind::Sqlite),
        #[cfg(feature = "redis")]
        ("redis store", StoreKind::Redis),
        #[cfg(feature = "redis")]
        ("redis cluster store", StoreKind::RedisCluster),
        #[cfg(feature = "postgres")]
        ("postgres store", StoreKind::Postgres),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, kind) in scenarios {
        match runtime.block_on(scenario(kind)) {
            Ok(report) => {
                println!("{NAME}: {name}: ok: {report}");
                passed += 1;
            }
            Err(e) => {
                println!("{NAME}: {name}: FAILED: {e:#}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Clone, Copy)]
enum StoreKind {
    File,
    #[cfg(feature = "sqlite")]
    Sqlite,
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "redis")]
    RedisCluster,
    #[cfg(feature = "postgres")]
    Postgres,
}

impl StoreKind {
    fn arg(self) -> &'static str {
        match self {
            StoreKind::File => "file",
            #[cfg(feature = "sqlite")]
            StoreKind::Sqlite => "sqlite",
            #[cfg(feature = "redis")]
            StoreKind::Redis => "redis",
            #[cfg(feature = "redis")]
            StoreKind::RedisCluster => "redis-cluster",
            #[cfg(feature = "postgres")]
            StoreKind::Postgres => "postgres",
        }
    }
}

async fn open_store(kind: &str, location: &str) -> anyhow::Result<Arc<dyn TokenStore>> {
    match kind {
        "file" => Ok(Arc::new(FileStore::open(location)?)),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(tokenkeeper::SqliteStore::open(location)?)),
        #[cfg(feature = "redis")]
        "redis" => Ok(Arc::new(
            tokenkeeper::RedisStore::builder(location)
                .prefix("cross-process:")
                .build()
                .await?,
        )),
        // `location`: the nodes' URLs, comma-separated.
        #[cfg(feature = "redis")]
        "redis-cluster" => Ok(Arc::new(
            tokenkeeper::RedisStore::cluster(location.split(','))
                .prefix("cross-process:")
                .build()
                .await?,
        )),
        #[cfg(feature = "postgres")]
        "postgres" => Ok(Arc::new(
            tokenkeeper::PostgresStore::builder(location)
                .table_prefix("cross_process_")
                .build()
                .await?,
        )),
        other => bail!("unknown store `{other}`"),
    }
}

fn key() -> TokenKey {
    TokenKey::from("grant-1")
}

// ---- the worker process ----------------------------------------------------------------

/// Wraps the real provider; in the victim process, the first refresh announces itself and
/// hangs (holding the refresh lock) until the process is killed.
struct Hooked {
    inner: OAuth2Provider,
    victim: bool,
}

#[async_trait]
impl Provider for Hooked {
    async fn refresh(&self, request: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        if self.victim {
            println!("IN_REFRESH");
            std::future::pending::<()>().await;
        }
        self.inner.refresh(request).await
    }
}

/// Args: store kind, store location, token URL, client id, client secret, `victim`|`peer`.
/// Reads commands on stdin: `advance SECS`, `go PHASE`, `exit`.
async fn worker(args: &[String]) -> anyhow::Result<()> {
    let [kind, location, token_url, client_id, client_secret, role] = args else {
        bail!("worker arguments: {args:?}");
    };
    let clock = Arc::new(ManualClock::fixed());
    let store = open_store(kind, location).await?;
    let provider = Hooked {
        inner: OAuth2Provider::builder(client_id.as_str(), token_url.as_str())
            .client_secret(ClientSecret::new(client_secret.as_str()))
            .build()?,
        victim: role == "victim",
    };
    let mut builder = TokenManager::builder(provider)
        .store(store)
        .clock(clock.clone())
        .lock_ttl(LOCK_TTL);
    if role != "victim" {
        builder = builder.refresh_timeout(PEER_REFRESH_TIMEOUT);
    }
    let manager = builder.build();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("advance"), Some(secs)) => {
                clock.advance(Duration::from_secs(secs.parse()?));
                println!("ADVANCED");
            }
            (Some("go"), Some(phase)) => match run_tasks(&manager).await {
                Ok((token, distinct)) => println!("DONE {phase} {distinct} {token}"),
                Err(e) => println!("ERROR {e:#}"),
            },
            (Some("exit"), None) => return Ok(()),
            _ => bail!("unknown command `{line}`"),
        }
    }
    Ok(())
}

/// `TASKS` tasks call `access_token` `CALLS` times each; returns the token and how many
/// distinct tokens were seen.
async fn run_tasks(manager: &TokenManager) -> anyhow::Result<(String, usize)> {
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let manager = manager.clone();
            tokio::spawn(async move {
                let mut seen = BTreeSet::new();
                for _ in 0..CALLS {
                    let token = manager.access_token(&key()).await?;
                    seen.insert(token.secret().to_owned());
                    tokio::task::yield_now().await;
                }
                Ok::<_, tokenkeeper::Error>(seen)
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for task in tasks {
        seen.extend(task.await??);
    }
    let token = manager.access_token(&key()).await?;
    seen.insert(token.secret().to_owned());
    Ok((token.secret().to_owned(), seen.len()))
}

// ---- the test process --------------------------------------------------------------------

/// A worker process, killed when dropped. Plain `std::process` (tokio's `process` feature
/// would compile two more packages): its stdout is read on a thread of its own, and the
/// few blocking calls are short.
struct Worker {
    name: String,
    child: Child,
    stdin: ChildStdin,
    /// The worker's stdout, line by line.
    lines: mpsc::UnboundedReceiver<std::io::Result<String>>,
}

impl Worker {
    fn spawn(name: String, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--worker")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name,
            child,
            stdin,
            lines,
        })
    }

    /// Writes one command line (a few bytes into the pipe: does not block for long).
    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("{}: sending `{line}`", self.name))
    }

    /// Waits for the process to end.
    fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let name = &self.name;
        tokio::task::block_in_place(|| self.child.wait())
            .with_context(|| format!("{name}: waiting for the process"))
    }

    /// The next line, which must start with `word`; returns the rest.
    async fn expect(&mut self, word: &str) -> anyhow::Result<String> {
        let line = tokio::time::timeout(REPLY, self.lines.recv())
            .await
            .map_err(|_| anyhow!("{}: no `{word}` within {REPLY:?}", self.name))?
            .ok_or_else(|| anyhow!("{}: exited before `{word}`", self.name))??;
        match line.strip_prefix(word) {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => bail!("{}: expected `{word}`, got `{line}`", self.name),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Already ended or killed: nothing to do, and nothing to report from a drop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn broadcast_advance(clock: &ManualClock, workers: &mut [&mut Worker]) -> anyhow::Result<()> {
    clock.advance(STEP);
    for w in workers.iter_mut() {
        w.send(&format!("advance {}", STEP.as_secs())).await?;
    }
    for w in workers.iter_mut() {
        w.expect("ADVANCED").await?;
    }
    Ok(())
}

/// Lets `workers` run one phase; checks they all got the one valid new token.
async fn collect_phase(
    server: &FakeAuthServer,
    workers: &mut [Worker],
    phase: u64,
) -> anyhow::Result<String> {
    let mut tokens = BTreeSet::new();
    for w in workers.iter_mut() {
        let done = w.expect(&format!("DONE {phase}")).await?;
        let (distinct, token) = done
            .split_once(' ')
            .ok_or_else(|| anyhow!("{}: bad reply `{done}`", w.name))?;
        ensure!(
            distinct == "1",
            "{}: saw {distinct} different access tokens after expiry {phase}",
            w.name
        );
        ensure!(
            server.is_access_token_valid(token),
            "{}: ended expiry {phase} with a token the server rejects",
            w.name
        );
        tokens.insert(token.to_owned());
    }
    ensure!(
        tokens.len() == 1,
        "processes hold {} different tokens after expiry {phase}",
        tokens.len()
    );
    Ok(tokens.into_iter().next().unwrap_or_default())
}

async fn scenario(kind: StoreKind) -> anyhow::Result<String> {
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    #[cfg(feature = "redis")]
    let mut redis_server = None;
    #[cfg(feature = "redis")]
    let mut redis_cluster = None;
    #[cfg(feature = "postgres")]
    let mut postgres_server = None;
    let location = match kind {
        StoreKind::File => {
            let dir = tmp.path().join("grants");
            FileStore::create(&dir)?;
            dir.to_str().context("utf-8 temp path")?.to_owned()
        }
        #[cfg(feature = "sqlite")]
        StoreKind::Sqlite => {
            let file = tmp.path().join("grants.db");
            tokenkeeper::SqliteStore::open(&file)?;
            file.to_str().context("utf-8 temp path")?.to_owned()
        }
        #[cfg(feature = "redis")]
        StoreKind::Redis => {
            let server = support::redis::RedisServer::start();
            let url = server.url();
            redis_server = Some(server);
            url
        }
        #[cfg(feature = "redis")]
        StoreKind::RedisCluster => {
            let cluster = support::redis::RedisCluster::start();
            let urls = cluster.urls().join(",");
            redis_cluster = Some(cluster);
            urls
        }
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            let server = support::postgres::PostgresServer::start();
            let url = server.create_database().await;
            postgres_server = Some(server);
            url
        }
    };

    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::standard(), clock.clone()).await;
    let grant = server.issue_grant();
    let store = open_store(kind.arg(), &location).await?;
    store
        .save(&key(), &GrantRecord::new(support::tokens(&grant)), None)
        .await?;

    let args = |role: &str| {
        vec![
            kind.arg().to_owned(),
            location.clone(),
            server.token_url(),
            server.client_id().to_owned(),
            server.client_secret().to_owned(),
            role.to_owned(),
        ]
    };
    let mut peers = (0..WORKERS)
        .map(|i| Worker::spawn(format!("process {}", i + 1), &args("peer")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut victim = Worker::spawn("the killed process".into(), &args("victim"))?;

    let check_server = |refreshes: u64| -> anyhow::Result<()> {
        let calls = server.refresh_calls_for(&grant.grant) as u64;
        ensure!(
            calls == refreshes,
            "{calls} refreshes reached the server for {refreshes} expiries"
        );
        ensure!(
            server.reuse_detections() == 0,
            "reuse detection fired: the grant was revoked"
        );
        Ok(())
    };

    // Expiries shared by all processes.
    for phase in 1..=EXPIRIES {
        let mut all: Vec<&mut Worker> = peers.iter_mut().chain([&mut victim]).collect();
        broadcast_advance(&clock, &mut all).await?;
        for w in peers.iter_mut() {
            w.send(&format!("go {phase}")).await?;
        }
        collect_phase(&server, &mut peers, phase).await?;
        check_server(phase)?;
    }

    // One process dies (SIGKILL) in the middle of its refresh, holding the refresh lock.
    let phase = EXPIRIES + 1;
    let mut all: Vec<&mut Worker> = peers.iter_mut().chain([&mut victim]).collect();
    broadcast_advance(&clock, &mut all).await?;
    victim.send(&format!("go {phase}")).await?;
    victim.expect("IN_REFRESH").await?;
    for w in peers.iter_mut() {
        w.send(&format!("go {phase}")).await?;
    }
    // The others are now waiting for the lock: none of them may refresh meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_server(EXPIRIES)?;
    let killed_at = Instant::now();
    victim.child.kill()?;
    victim.wait()?;
    collect_phase(&server, &mut peers, phase).await?;
    let recovery = killed_at.elapsed();
    check_server(phase)?;

    // And life goes on for the survivors.
    let phase = phase + 1;
    let mut survivors: Vec<&mut Worker> = peers.iter_mut().collect();
    broadcast_advance(&clock, &mut survivors).await?;
    for w in peers.iter_mut() {
        w.send(&format!("go {phase}")).await?;
    }
    collect_phase(&server, &mut peers, phase).await?;
    check_server(phase)?;

    for w in peers.iter_mut() {
        w.send("exit").await?;
    }
    for w in peers.iter_mut() {
        let status = w.wait()?;
        ensure!(status.success(), "{} exited with {status}", w.name);
    }
    #[cfg(feature = "redis")]
    drop((redis_server, redis_cluster));
    #[cfg(feature = "postgres")]
    drop(postgres_server);
    Ok(format!(
        "{WORKERS} processes x {TASKS} tasks, {phase} expiries, {phase} refreshes, 0 reuse \
         detections, recovered {:.2} s after the SIGKILL, {:.1} s in all",
        recovery.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ))
}
