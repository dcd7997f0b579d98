//! The two kinds of connection a `RedisStore` runs on (one server, or a Redis Cluster), and
//! listing keys across every primary of a cluster.

use std::collections::BTreeSet;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, RedisFuture, Value};

use crate::error::StoreError;

/// Hash slots of a Redis Cluster (`0..=16383`).
const SLOTS: u32 = 16384;
/// Listings tried while the cluster's slot map keeps changing under them.
const LISTING_ATTEMPTS: usize = 3;
/// Keys asked for per `SCAN` round trip.
const SCAN_COUNT: u32 = 500;

/// A connection to one server (reconnecting) or to a cluster (following its slot map).
/// Commands with keys go where their key's slot lives; the scripts name all their keys.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl Connection {
    /// The names of every key matching the glob `pattern`, by `SCAN` (never `KEYS`): on the
    /// server, or on every primary of the cluster.
    ///
    /// On a cluster, the slot map is read (`CLUSTER SLOTS`) before and after scanning each
    /// primary; a listing during which it changed (a slot moved, a failover) is taken again,
    /// and one on a cluster that does not serve every slot fails rather than come back short.
    pub(super) async fn scan(&self, pattern: &str) -> Result<BTreeSet<Vec<u8>>, StoreError> {
        match self {
            Self::Single(conn) => {
                scan_node(pattern, |cmd| {
                    let mut conn = conn.clone();
                    async move { cmd.query_async::<Value>(&mut conn).await }
                })
                .await
            }
            Self::Cluster(conn) => {
                for _ in 0..LISTING_ATTEMPTS {
                    let before = slot_map(conn).await?;
                    let mut names = BTreeSet::new();
                    for (host, port) in before.primaries() {
                        let node = SingleNodeRoutingInfo::ByAddress { host, port };
                        let routing = RoutingInfo::SingleNode(node);
                        names.append(
                            &mut scan_node(pattern, |cmd| {
                                let mut conn = conn.clone();
                                let routing = routing.clone();
                                async move { conn.route_command(cmd, routing).await }
                            })
                            .await?,
                        );
                    }
                    if slot_map(conn).await? == before {
                        return Ok(names);
                    }
                }
                Err(StoreError::new(format!(
                    "the cluster's slot map changed during each of {LISTING_ATTEMPTS} listings"
                )))
            }
        }
    }
}

/// Runs one `SCAN` iteration to its end through `send` (one node).
async fn scan_node<F, Fut>(pattern: &str, send: F) -> Result<BTreeSet<Vec<u8>>, StoreError>
where
    F: Fn(Cmd) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<Value>>,
{
    let mut names = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let reply = send(cmd).await.map_err(StoreError::new)?;
        let (next, batch): (u64, Vec<Vec<u8>>) =
            redis::from_redis_value(reply).map_err(StoreError::new)?;
        names.extend(batch);
        if next == 0 {
            return Ok(names);
        }
        cursor = next;
    }
}

/// Which primary serves which slots, as one node answers `CLUSTER SLOTS`.
#[derive(Debug, PartialEq, Eq)]
struct SlotMap {
    /// `(first slot, last slot, primary host, primary port)`, sorted.
    ranges: Vec<(u16, u16, String, u16)>,
}

impl SlotMap {
    /// Every primary once.
    fn primaries(&self) -> BTreeSet<(String, u16)> {
        self.ranges
            .iter()
            .map(|(_, _, host, port)| (host.clone(), *port))
            .collect()
    }
}

async fn slot_map(conn: &ClusterConnection) -> Result<SlotMap, StoreError> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let reply = conn
        .clone()
        .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
        .await
        .map_err(StoreError::new)?;
    let map = parse_slots(reply)?;
    let served: u32 = map
        .ranges
        .iter()
        .map(|(first, last, _, _)| u32::from(*last) - u32::from(*first) + 1)
        .sum();
    if served != SLOTS {
        return Err(StoreError::new(format!(
            "the cluster serves {served} of its {SLOTS} hash slots: a listing would miss keys"
        )));
    }
    Ok(map)
}

/// Reads a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id, …], replicas…], …]`.
fn parse_slots(reply: Value) -> Result<SlotMap, StoreError> {
    let unexpected = || StoreError::new("unexpected reply to CLUSTER SLOTS");
    let entries: Vec<Vec<Value>> = redis::from_redis_value(reply).map_err(StoreError::new)?;
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut fields = entry.into_iter();
        let (Some(first), Some(last), Some(primary)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(unexpected());
        };
        let first: u16 = redis::from_redis_value(first).map_err(StoreError::new)?;
        let last: u16 = redis::from_redis_value(last).map_err(StoreError::new)?;
        let node: Vec<Value> = redis::from_redis_value(primary).map_err(StoreError::new)?;
        let mut node = node.into_iter();
        let (Some(host), Some(port)) = (node.next(), node.next()) else {
            return Err(unexpected());
        };
        let host: String = redis::from_redis_value(host).map_err(StoreError::new)?;
        let port: u16 = redis::from_redis_value(port).map_err(StoreError::new)?;
        if last < first || u32::from(last) >= SLOTS {
            return Err(unexpected());
        }
        ranges.push((first, last, host, port));
    }
    ranges.sort();
    Ok(SlotMap { ranges })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn slot_maps_are_read_and_malformed_ones_refused() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7001), bulk("id-b")]),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id-a")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7002), bulk("id-c")]),
            ]),
        ]);
        let map = parse_slots(reply).unwrap();
        assert_eq!(
            map.ranges,
            vec![
                (0, 5460, "127.0.0.1".to_owned(), 7000),
                (5461, 16383, "127.0.0.1".to_owned(), 7001)
            ]
        );
        assert_eq!(map.primaries().len(), 2);

        for bad in [
            Value::Int(3),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(1)])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(9),
                Value::Int(1),
                Value::Array(vec![bulk("h"), Value::Int(1)]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(16384),
                Value::Array(vec![bulk("h"), Value::Int(1)]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(1),
                Value::Array(vec![bulk("h")]),
            ])]),
        ] {
            assert!(parse_slots(bad).is_err());
        }
    }
}
