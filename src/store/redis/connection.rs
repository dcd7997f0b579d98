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
    /// server, or on every primary of the cluster (see [`scan_cluster`]).
    pub(super) async fn scan(&self, pattern: &str) -> Result<BTreeSet<Vec<u8>>, StoreError> {
        match self {
            Self::Single(conn) => {
                scan_node(pattern, |cmd| {
                    let mut conn = conn.clone();
                    async move { cmd.query_async::<Value>(&mut conn).await }
                })
                .await
            }
            Self::Cluster(conn) => scan_cluster(conn, pattern).await,
        }
    }
}

/// Scans every primary of the cluster, so that no key is missed even while slots move.
///
/// The slot map (`CLUSTER SLOTS`) names the primaries; a cluster that does not serve every
/// slot fails the listing rather than return it short. Each primary is asked whether it is
/// migrating or importing a slot (`CLUSTER NODES`). When none is, one scan of each primary is
/// complete if, afterwards, still none is and the slot map is the same. While one is, keys move
/// between nodes during the listing, so every primary is scanned twice, in the same order: a
/// key moving from X to Y is on X during a scan of X that precedes a scan of Y, or on Y by
/// then; that listing is complete if the primaries are still the same afterwards. A listing
/// that is not complete is taken again (scanning twice), [`LISTING_ATTEMPTS`] times at most,
/// then fails.
async fn scan_cluster(
    conn: &ClusterConnection,
    pattern: &str,
) -> Result<BTreeSet<Vec<u8>>, StoreError> {
    for attempt in 0..LISTING_ATTEMPTS {
        let before = slot_map(conn).await?;
        let primaries = before.primaries();
        // After a listing that slots moved under, assume they still move.
        let moving = attempt > 0 || any_slot_moving(conn, &primaries).await?;
        let mut names = BTreeSet::new();
        for _ in 0..if moving { 2 } else { 1 } {
            for node in &primaries {
                let routing = route_to(node);
                names.append(
                    &mut scan_node(pattern, |cmd| {
                        let mut conn = conn.clone();
                        let routing = routing.clone();
                        async move { conn.route_command(cmd, routing).await }
                    })
                    .await?,
                );
            }
        }
        let after = slot_map(conn).await?;
        let complete = if moving {
            after.primaries() == primaries
        } else {
            after == before && !any_slot_moving(conn, &primaries).await?
        };
        if complete {
            return Ok(names);
        }
    }
    Err(StoreError::new(format!(
        "the cluster's primaries changed during each of {LISTING_ATTEMPTS} listings"
    )))
}

fn route_to((host, port): &(String, u16)) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.clone(),
        port: *port,
    })
}

/// Whether any of `primaries` is migrating a slot out or importing one.
async fn any_slot_moving(
    conn: &ClusterConnection,
    primaries: &BTreeSet<(String, u16)>,
) -> Result<bool, StoreError> {
    for node in primaries {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("NODES");
        let reply = conn
            .clone()
            .route_command(cmd, route_to(node))
            .await
            .map_err(StoreError::new)?;
        let nodes: String = redis::from_redis_value(reply).map_err(StoreError::new)?;
        if moving_slots(&nodes)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether the node answering `CLUSTER NODES` with `nodes` says it is migrating or importing a
/// slot: its own line (flag `myself`) lists it as `[slot->-node]` or `[slot-<-node]`.
fn moving_slots(nodes: &str) -> Result<bool, StoreError> {
    let own = nodes
        .lines()
        .find(|line| {
            line.split(' ')
                .nth(2)
                .is_some_and(|flags| flags.split(',').any(|f| f == "myself"))
        })
        .ok_or_else(|| StoreError::new("a CLUSTER NODES reply without the node's own line"))?;
    Ok(own.split(' ').skip(8).any(|slots| slots.starts_with('[')))
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
    fn slots_on_the_move_are_seen_on_the_nodes_own_line() {
        let stable = "\
07c3 127.0.0.1:30004@31004 master - 0 1426238317239 4 connected 10923-16383
67ed 127.0.0.1:30002@31002 myself,master - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@31001 master - 0 1426238316232 1 connected 0-5460 [93-<-292f]
";
        assert!(!moving_slots(stable).unwrap());
        let importing = stable.replace("5461-10922", "5461-10922 [93-<-292f]");
        assert!(moving_slots(&importing).unwrap());
        let migrating = stable.replace("5461-10922", "5461-10922 [5461->-e7d1]");
        assert!(moving_slots(&migrating).unwrap());
        let migrating_only = stable.replace("5461-10922", "[5461->-e7d1]");
        assert!(moving_slots(&migrating_only).unwrap());
        assert!(moving_slots("").is_err());
        assert!(moving_slots(&stable.replace("myself,", "")).is_err());
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
        assert!(parse_slots(Value::Array(vec![])).unwrap().ranges.is_empty());

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
