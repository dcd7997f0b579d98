//! A throwaway `redis-server` on a free loopback port, or a throwaway three-node Redis
//! Cluster, killed on drop.
//!
//! Tests that need Redis fail (never skip) when a binary is missing, with the install hint.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to answer `PING`.
const STARTUP: Duration = Duration::from_secs(15);

/// A running `redis-server`; killed (and its directory removed) on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    password: Option<String>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server without persistence on a free port of 127.0.0.1.
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    /// As [`start`](Self::start), requiring `password` when given.
    pub fn start_with_password(password: Option<&str>) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temporary directory");
            let port = free_port();
            let mut args = Vec::new();
            if let Some(password) = password {
                args.extend(["--requirepass".to_owned(), password.to_owned()]);
            }
            let child = spawn_server(port, &dir, &args);
            let mut server = RedisServer {
                child,
                port,
                password: password.map(str::to_owned),
                _dir: dir,
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(e) => last = e, // Most likely the port was taken meanwhile: try another.
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/` (with the password, if any).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("redis-server exited: {status}"));
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("no answer to PING within {STARTUP:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let request = match &self.password {
            Some(p) => format!("AUTH {p}\r\nPING\r\n"),
            None => "PING\r\n".to_owned(),
        };
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut reply = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&reply).contains("+PONG") {
                return true;
            }
        }
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `redis-server` without persistence on `port` of 127.0.0.1, in `dir`, with `args`.
fn spawn_server(port: u16, dir: &tempfile::TempDir, args: &[String]) -> Child {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("redis-server not found: install it with: apt-get install -y redis-server")
        }
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}

/// Nodes of a [`RedisCluster`].
pub const CLUSTER_NODES: usize = 3;

/// A running three-node Redis Cluster (three primaries, no replicas, every slot served) on
/// free ports of 127.0.0.1; every node killed (and its directory removed) on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `redis-server --cluster-enabled yes`, joins them with
    /// `redis-cli --cluster create … --cluster-yes`, and waits until every node reports
    /// `cluster_state:ok`.
    pub fn start() -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                // Most likely a port was taken meanwhile: try others.
                Err(e) => last = e,
            }
        }
        panic!("the Redis Cluster did not start: {last}");
    }

    fn try_start() -> Result<Self, String> {
        let mut nodes = Vec::with_capacity(CLUSTER_NODES);
        for _ in 0..CLUSTER_NODES {
            let dir = tempfile::tempdir().expect("temporary directory");
            let port = free_port();
            // The cluster bus port is chosen too: the default (port + 10000) may be taken, or
            // past 65535.
            let bus = free_port();
            let config = dir.path().join(format!("nodes-{port}.conf"));
            let args = [
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                config.to_str().expect("utf-8 temporary path").to_owned(),
                "--cluster-port".to_owned(),
                bus.to_string(),
                "--cluster-node-timeout".to_owned(),
                "5000".to_owned(),
            ];
            let child = spawn_server(port, &dir, &args);
            let mut node = RedisServer {
                child,
                port,
                password: None,
                _dir: dir,
            };
            node.wait_ready()?;
            nodes.push(node);
        }
        let cluster = RedisCluster { nodes };
        let mut create = Command::new("redis-cli");
        create
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port)),
            )
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null());
        let output = match create.output() {
            Ok(output) => output,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("redis-cli not found: install it with: apt-get install -y redis-server")
            }
            Err(e) => panic!("cannot run redis-cli: {e}"),
        };
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        cluster.wait_ok()?;
        Ok(cluster)
    }

    /// Waits until every node says `cluster_state:ok` and knows all three primaries.
    fn wait_ok(&self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let ok = self.nodes.iter().all(|n| {
                let info = query(n.port, "CLUSTER INFO").unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{CLUSTER_NODES}"))
                    && info.contains("cluster_slots_assigned:16384")
            });
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("the cluster was not ok within {STARTUP:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:PORT/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The ports of the nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }
}

/// Sends one inline command to 127.0.0.1:`port` and returns its reply (a simple string, an
/// error, an integer or a bulk string), or `None` if there is no complete reply within 1 s.
pub fn query(port: u16, command: &str) -> Option<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        let Some((head, body)) = text.split_once("\r\n") else {
            continue;
        };
        if let Some(len) = head.strip_prefix('$') {
            let len: usize = len.parse().ok()?;
            if body.len() >= len {
                return Some(body[..len].to_owned());
            }
        } else {
            return Some(head.to_owned());
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
