//! The shared state of one schedule: the store's contents and leases, the model of the
//! provider (strict rotation), what every client could know, and the invariant bookkeeping.
//!
//! Everything lives behind one mutex; the store and provider handles of every manager
//! instance lock it for each operation and never hold it across an await.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokenkeeper::{
    AccessToken, Clock, ConfigProblem, Expiry, GrantRecord, InvalidationReason, ProviderError,
    RefreshToken, TokenKey, TokenResponse, TokenSet, UnavailableCause, Version, Versioned,
};
use tokio::time::Instant;

use crate::clock::SimClock;
use crate::faults::Faults;
use crate::Checks;

/// Instance id of the application itself (the OAuth callback that `insert`s a grant).
pub const APP: usize = usize::MAX;

pub type Shared = Arc<Mutex<World>>;

pub fn lock(world: &Shared) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

/// The invariants, numbered as in the brief.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Inv {
    /// 1: at most one provider call per grant in flight.
    OneCall,
    /// 1b: a manager whose lease expired (while it waited on the store) does not call while
    /// the lease's new holder calls.
    CallAfterLeaseExpiry,
    /// 2: no spent refresh token presented that the client could know was spent.
    SpentToken,
    /// 3: no grant declared dead while the model says it is alive and recoverable.
    FalseDeath,
    /// 3b: a death that follows a lost rotation says so (`RotationLost`).
    RotationLostReason,
    /// 4: the heal phase brings every recoverable grant back.
    Heal,
    /// 5: backoff after a failed call, `Retry-After` honoured.
    Backoff,
    /// 5d: a backoff holds every manager sharing the store, not only the one that failed.
    SharedBackoff,
    /// 5b: a refresh token answered `invalid_grant` is never presented again by that manager.
    Hammer,
    /// 5c: a correctly configured manager is never held by another's misconfiguration.
    ForeignMisconfig,
    /// 6: every caller answered in bounded time.
    Answered,
    /// 6b: no provider call outlives the refresh timeout.
    CallTimeout,
    /// 7: the refresher's per-minute cap.
    RateCap,
    /// Sanity: a caller got a token of another grant, or garbage.
    Sanity,
}

impl Inv {
    pub fn label(self) -> &'static str {
        match self {
            Inv::OneCall => "1 one provider call per grant in flight",
            Inv::CallAfterLeaseExpiry => "1b no call after the own lease expired",
            Inv::SpentToken => "2 no knowably spent refresh token presented",
            Inv::FalseDeath => "3 no false death",
            Inv::RotationLostReason => "3b death after a lost rotation says RotationLost",
            Inv::Heal => "4 heal brings every recoverable grant back",
            Inv::Backoff => "5 backoff after a failed call",
            Inv::SharedBackoff => "5d backoff shared through the store",
            Inv::Hammer => "5b no refresh token re-presented after invalid_grant",
            Inv::ForeignMisconfig => "5c no misconfiguration backoff shared with healthy managers",
            Inv::Answered => "6 every caller answered in bounded time",
            Inv::CallTimeout => "6b no provider call outlives the refresh timeout",
            Inv::RateCap => "7 refresher per-minute cap",
            Inv::Sanity => "sanity",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub inv: Inv,
    pub msg: String,
}

/// The parameters of one schedule.
#[derive(Debug, Clone)]
pub struct Params {
    pub lifetime: Duration,
    pub margin: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub lock_ttl: Duration,
    /// The engine's refresh timeout (30 s by default on main once it lands).
    pub refresh_timeout: Duration,
    /// The refresher's per-minute cap.
    pub per_minute: usize,
}

/// The provider's view of one grant.
#[derive(Debug, Clone)]
pub struct ModelGrant {
    /// Incarnation: bumped by each re-authorization.
    pub inc: u32,
    /// Index of the latest refresh token issued.
    pub latest: u32,
    pub alive: bool,
    pub death: Option<Death>,
    /// The previous refresh token is accepted again until then (reuse window).
    pub window_until: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// Out-of-band revocation.
    Revoked,
    /// A spent token was presented whose successor no client ever received.
    ReuseAfterLostReply,
    /// A spent token was presented whose successor some client did receive.
    ReuseDetected,
}

/// A provider call in flight.
#[derive(Debug, Clone)]
pub struct Call {
    pub inst: usize,
    pub key: TokenKey,
    pub lease: Option<u64>,
    pub started: Instant,
    pub replied: bool,
    /// The token index the reply would deliver, if the server rotated.
    pub delivers: Option<(u32, u32)>,
    /// The incarnation of the refresh token presented.
    pub presented_inc: Option<u32>,
    /// The refresh token presented.
    pub presented: Option<(u32, u32)>,
    /// This call is the one prompt retry allowed after a possibly lost reply.
    pub retry: bool,
    pub overdue_reported: bool,
}

/// A manager's obligation to wait after a failed call.
#[derive(Debug, Clone)]
pub struct Hold {
    pub since: SystemTime,
    /// The same instant in tokio (monotonic) time: a wait counts if it is long enough on
    /// either clock, so clock jumps neither excuse nor fake a violation.
    pub since_mono: Instant,
    pub min: Duration,
    pub why: &'static str,
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub id: u64,
    pub owner: usize,
    /// On the store's own clock (a remote Redis or database): clock jumps on the
    /// application's host, either way, neither end nor stretch it.
    pub expires: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstState {
    Alive,
    /// Handle dropped; its tasks run on with a working store.
    Dropped,
    /// Process died: its store and provider connections fail.
    Crashed,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub state: InstState,
    pub misconfigured: bool,
}

/// What the server does with one call.
pub enum Delay {
    Now,
    For(Duration),
    Forever,
}

pub enum Reply {
    Tokens { inc: u32, idx: u32 },
    Fail(ProviderError, Fail),
    Lost,
    Panic,
}

/// A failure as the backoff check sees it.
#[derive(Debug, Clone, Copy)]
pub enum Fail {
    Transient(&'static str),
    RateLimited(Duration),
    InvalidGrant(Option<(u32, u32)>),
    Misconfigured,
}

pub struct Plan {
    pub id: u64,
    pub delay: Delay,
    pub reply: Reply,
}

pub struct World {
    pub seed: u64,
    pub checks: Checks,
    pub params: Params,
    pub faults: Faults,
    pub rng: fastrand::Rng,
    pub clock: SimClock,
    pub t0: Instant,
    // The store.
    pub records: BTreeMap<TokenKey, Versioned<GrantRecord>>,
    next_version: Version,
    pub leases: BTreeMap<TokenKey, Lease>,
    /// Locks are released when dropped (a session lock), not only by `release` or expiry.
    pub session_locks: bool,
    /// (Instance, grant) whose last store operation was a save that lost its compare-and-swap.
    pub conflicted: std::collections::BTreeSet<(usize, TokenKey)>,
    /// Failed or conflicting saves in a row of a rotated record, per (instance, grant).
    pub rotation_save_failures: BTreeMap<(usize, TokenKey), u32>,
    next_lease: u64,
    /// Highest refresh-token index ever written to the store, per (grant, incarnation).
    pub stored_max: BTreeMap<(TokenKey, u32), u32>,
    // The provider.
    pub grants: BTreeMap<TokenKey, ModelGrant>,
    pub calls: BTreeMap<u64, Call>,
    next_call: u64,
    /// Highest token index delivered to each instance, per (instance, grant, incarnation).
    pub delivered: BTreeMap<(usize, TokenKey, u32), u32>,
    /// Replies lost, by the token index they carried, with the instance that sent the call.
    pub lost: BTreeMap<(TokenKey, u32, u32), usize>,
    /// When the store last took a record with a backoff, per grant.
    pub backoff_saved: BTreeMap<TokenKey, Instant>,
    /// Refresh tokens the store recorded a possibly lost reply for (`GrantRecord::reply_lost`).
    pub lost_marked: std::collections::BTreeSet<(TokenKey, u32, u32)>,
    /// Who presented the spent token that killed an incarnation.
    pub killed_by: BTreeMap<(TokenKey, u32), usize>,
    pub holds: BTreeMap<(usize, TokenKey), Hold>,
    /// When each grant was last authorized by a human (a new incarnation).
    pub authorized_at: BTreeMap<TokenKey, Instant>,
    /// Each instance's last failed and last successful store read of each grant.
    pub load_failed: BTreeMap<(usize, TokenKey), Instant>,
    pub load_ok: BTreeMap<(usize, TokenKey), Instant>,
    /// After a possibly lost reply (network error, timeout), one prompt retry with the same
    /// refresh token is allowed (providers with a reuse window answer it with the lost pair).
    pub retry_allowed: BTreeMap<(usize, TokenKey), ((u32, u32), Instant)>,
    /// The last backoff of a grant from a correctly configured instance, binding every
    /// instance (it is persisted in the shared record).
    pub shared_holds: BTreeMap<TokenKey, (usize, Hold)>,
    /// The last token each instance got `invalid_grant` for.
    pub refused: BTreeMap<(usize, TokenKey), (u32, u32)>,
    pub instances: BTreeMap<usize, Instance>,
    // Results.
    pub violations: Vec<Violation>,
    pub trace: Vec<String>,
    hasher: std::collections::hash_map::DefaultHasher,
    pub provider_calls: u64,
    /// The last access token each instance handed to a caller.
    pub last_seen: BTreeMap<(usize, TokenKey), String>,
    /// Caller completions not yet in the trace: waiters woken by one `watch` send run in an
    /// order tokio randomizes, so their lines are put in op order before anything else.
    pending: Vec<(u64, Vec<String>, Vec<Violation>)>,
}

/// `rt.k0.3.7`: grant k0, incarnation 3, index 7.
pub fn token_name(kind: &str, key: &TokenKey, inc: u32, idx: u32) -> String {
    format!("{kind}.{key}.{inc}.{idx}")
}

/// The (key, incarnation, index) of a token name.
pub fn parse_token(s: &str) -> Option<(String, u32, u32)> {
    let mut it = s.split('.');
    let _kind = it.next()?;
    let key = it.next()?.to_owned();
    let inc = it.next()?.parse().ok()?;
    let idx = it.next()?.parse().ok()?;
    Some((key, inc, idx))
}

pub fn record_rt(record: &GrantRecord) -> Option<(u32, u32)> {
    let rt = record.tokens().refresh_token()?;
    parse_token(rt.secret()).map(|(_, inc, idx)| (inc, idx))
}

impl World {
    pub fn new(seed: u64, checks: Checks, params: Params, faults: Faults, clock: SimClock) -> Self {
        Self {
            seed,
            checks,
            params,
            faults,
            rng: fastrand::Rng::with_seed(seed ^ 0x5eed_fa17),
            clock,
            t0: Instant::now(),
            records: BTreeMap::new(),
            next_version: 0,
            leases: BTreeMap::new(),
            session_locks: false,
            conflicted: Default::default(),
            rotation_save_failures: BTreeMap::new(),
            next_lease: 0,
            stored_max: BTreeMap::new(),
            grants: BTreeMap::new(),
            calls: BTreeMap::new(),
            next_call: 0,
            delivered: BTreeMap::new(),
            lost: BTreeMap::new(),
            killed_by: BTreeMap::new(),
            lost_marked: Default::default(),
            backoff_saved: BTreeMap::new(),
            holds: BTreeMap::new(),
            authorized_at: BTreeMap::new(),
            load_failed: BTreeMap::new(),
            load_ok: BTreeMap::new(),
            retry_allowed: BTreeMap::new(),
            shared_holds: BTreeMap::new(),
            refused: BTreeMap::new(),
            instances: BTreeMap::new(),
            violations: Vec::new(),
            trace: Vec::new(),
            hasher: Default::default(),
            provider_calls: 0,
            last_seen: BTreeMap::new(),
            pending: Vec::new(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Tokio time since the schedule started, in ms.
    pub fn elapsed_ms(&self) -> u128 {
        (Instant::now() - self.t0).as_millis()
    }

    pub fn log(&mut self, line: impl Into<String>) {
        self.flush();
        self.append(line.into());
    }

    /// Writes the pending caller completions, in op order.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|p| p.0);
        for (_, lines, violations) in pending {
            for line in lines {
                self.append_stamped(line);
            }
            self.violations.extend(violations);
        }
    }

    /// The time prefix of a trace line: tokio time since the start, clock seconds.
    fn stamp(&self) -> String {
        let clock = self
            .now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("[t+{}ms c={}]", self.elapsed_ms(), clock)
    }

    fn append(&mut self, line: String) {
        let line = format!("{} {line}", self.stamp());
        self.append_stamped(line);
    }

    fn append_stamped(&mut self, line: String) {
        line.hash(&mut self.hasher);
        self.trace.push(line);
    }

    pub fn trace_hash(&self) -> u64 {
        self.hasher.finish()
    }

    pub fn violate(&mut self, inv: Inv, msg: impl Into<String>) {
        if !self.checks.enabled(inv) {
            return;
        }
        let msg = msg.into();
        self.log(format!("VIOLATION [{}] {msg}", inv.label()));
        self.violations.push(Violation { inv, msg });
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.f64() < p
    }

    pub fn inst_state(&self, inst: usize) -> InstState {
        self.instances
            .get(&inst)
            .map_or(InstState::Alive, |i| i.state)
    }

    // ----- the store -------------------------------------------------------------------

    pub fn store_save(
        &mut self,
        key: &TokenKey,
        record: &GrantRecord,
        expected: Option<Version>,
    ) -> Option<Version> {
        if self.records.get(key).map(|r| r.version) != expected {
            return None;
        }
        let before = self
            .records
            .get(key)
            .and_then(|r| r.value.retry_not_before());
        match record.retry_not_before() {
            // A new backoff (a peer re-saving the same record does not make an old one new).
            Some(until) if before != Some(until) => {
                self.backoff_saved.insert(key.clone(), Instant::now());
            }
            Some(_) => {}
            None => {
                self.backoff_saved.remove(key);
            }
        }
        self.next_version += 1;
        let version = self.next_version;
        self.records.insert(
            key.clone(),
            Versioned {
                version,
                value: record.clone(),
            },
        );
        if let Some((inc, idx)) = record_rt(record) {
            if record.reply_lost() {
                self.lost_marked.insert((key.clone(), inc, idx));
            }
            let max = self.stored_max.entry((key.clone(), inc)).or_insert(idx);
            *max = (*max).max(idx);
        }
        Some(version)
    }

    /// A peer re-saves the record as it is: only the version moves.
    pub fn peer_bump(&mut self, key: &TokenKey) {
        if let Some(current) = self.records.get(key).cloned() {
            self.store_save(key, &current.value, Some(current.version));
            self.log(format!("peer re-saved {key} (version bump)"));
        }
    }

    /// Takes the lease if free or expired.
    pub fn try_lease(
        &mut self,
        key: &TokenKey,
        owner: usize,
        ttl: Duration,
    ) -> Result<u64, Instant> {
        let now = Instant::now();
        if let Some(lease) = self.leases.get(key) {
            if lease.expires > now {
                return Err(lease.expires);
            }
        }
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            key.clone(),
            Lease {
                id,
                owner,
                expires: now + ttl,
            },
        );
        Ok(id)
    }

    pub fn release_lease(&mut self, key: &TokenKey, id: u64) {
        if self.leases.get(key).is_some_and(|l| l.id == id) {
            self.leases.remove(key);
            self.clock.changed.notify_waiters();
        }
    }

    fn lease_valid(&self, key: &TokenKey, id: Option<u64>) -> bool {
        let now = Instant::now();
        match (self.leases.get(key), id) {
            (Some(lease), Some(id)) => lease.id == id && lease.expires > now,
            _ => false,
        }
    }

    // ----- the provider model ----------------------------------------------------------

    /// A human authorizes the app again: a new incarnation of the grant, idx 0.
    pub fn reauthorize(&mut self, key: &TokenKey) -> TokenSet {
        let now = self.now();
        let inc = self.grants.get(key).map_or(0, |g| g.inc + 1);
        self.grants.insert(
            key.clone(),
            ModelGrant {
                inc,
                latest: 0,
                alive: true,
                death: None,
                window_until: None,
            },
        );
        self.holds.retain(|(_, k), _| k != key);
        self.shared_holds.remove(key);
        self.delivered.insert((APP, key.clone(), inc), 0);
        self.authorized_at.insert(key.clone(), Instant::now());
        self.log(format!("authorized {key} incarnation {inc}"));
        TokenSet::new(AccessToken::new(token_name("at", key, inc, 0)))
            .with_refresh_token(RefreshToken::new(token_name("rt", key, inc, 0)))
            .with_expires_at(now + self.params.lifetime)
            .with_issued_at(now)
    }

    /// An `insert` wrote (or may have written) a fresh record: no backoff binds any more.
    pub fn reset_holds(&mut self, key: &TokenKey) {
        self.holds.retain(|(_, k), _| k != key);
        self.shared_holds.remove(key);
    }

    fn knows(&self, inst: usize, key: &TokenKey, inc: u32) -> Option<u32> {
        let stored = self.stored_max.get(&(key.clone(), inc)).copied();
        let delivered = self.delivered.get(&(inst, key.clone(), inc)).copied();
        stored.max(delivered)
    }

    /// Whether a client that is still running (or the store) holds a token that the
    /// provider would accept for the grant's live incarnation.
    pub fn recoverable(&self, key: &TokenKey, with_window: bool) -> bool {
        let Some(g) = self.grants.get(key) else {
            return false;
        };
        if !g.alive {
            return false;
        }
        let known = |idx: u32| {
            self.stored_max
                .get(&(key.clone(), g.inc))
                .is_some_and(|m| *m >= idx)
                || self.delivered.iter().any(|((inst, k, inc), m)| {
                    k == key
                        && *inc == g.inc
                        && *m >= idx
                        && (*inst == APP || self.inst_state(*inst) == InstState::Alive)
                })
        };
        if known(g.latest) {
            return true;
        }
        with_window
            && g.latest > 0
            && g.window_until.is_some_and(|t| t > self.now())
            && known(g.latest - 1)
    }

    /// A call arrives: check invariants 1, 2, 5, 5b; decide the server's behaviour.
    pub fn provider_enter(&mut self, inst: usize, key: &TokenKey, presented: Option<&str>) -> Plan {
        let now = self.now();
        self.next_call += 1;
        let id = self.next_call;
        self.provider_calls += 1;
        let presented = presented
            .and_then(parse_token)
            .map(|(_, inc, idx)| (inc, idx));
        let state = self.inst_state(inst);
        if state == InstState::Crashed {
            // A dead process sends nothing.
            self.log(format!(
                "call#{id} m{inst} {key}: from a crashed instance, not sent"
            ));
            return Plan {
                id,
                delay: Delay::Now,
                reply: Reply::Fail(
                    ProviderError::unavailable(UnavailableCause::Connect),
                    Fail::Transient("crashed"),
                ),
            };
        }

        // Invariant 1.
        let lease = self
            .leases
            .get(key)
            .filter(|l| l.owner == inst && l.expires > Instant::now())
            .map(|l| l.id);
        if lease.is_none() {
            // Its lease expired while it waited (a slow store, a clock jump): lease semantics,
            // not a violation by itself; a concurrent call is checked below.
            self.log(format!("m{inst} calls for {key} with its lease expired"));
        }
        let others: Vec<(u64, Call)> = self
            .calls
            .iter()
            .filter(|(_, c)| &c.key == key && !c.replied)
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        for (other, call) in others {
            if call.inst == inst {
                self.violate(
                    Inv::OneCall,
                    format!("m{inst}: second call for {key} while its call#{other} is in flight"),
                );
            } else if self.lease_valid(key, call.lease) {
                let (inv, what) = if lease.is_none() {
                    (Inv::CallAfterLeaseExpiry, "with its own lease expired")
                } else {
                    (Inv::OneCall, "holding a lease too")
                };
                self.violate(
                    inv,
                    format!(
                        "m{inst} calls for {key} {what} while m{} holds the lease and call#{other} is in flight",
                        call.inst
                    ),
                );
            }
        }

        // Invariants 5 and 5b.
        // "Prompt": within 5 s of monotonic time of the failure (a store read may come first,
        // and the store can be slow); an allowance the
        // engine did not use then (its lease could not cover another call) expires.
        let prompt_retry = presented.is_some()
            && self
                .retry_allowed
                .get(&(inst, key.clone()))
                .is_some_and(|(token, at)| {
                    Some(*token) == presented && Instant::now() <= *at + Duration::from_secs(5)
                })
            // A call after the backoff is an ordinary one (it may earn its own prompt retry);
            // the backoff is over once either clock says so (as for invariant 5 below).
            && self
                .holds
                .get(&(inst, key.clone()))
                .is_some_and(|h| now < h.since + h.min && Instant::now() < h.since_mono + h.min);
        self.retry_allowed.remove(&(inst, key.clone()));
        if let Some(hold) = self.holds.get(&(inst, key.clone())).cloned() {
            if now < hold.since + hold.min
                && Instant::now() < hold.since_mono + hold.min
                && !prompt_retry
            {
                let waited = match now.duration_since(hold.since) {
                    Ok(d) => format!("{d:?}"),
                    Err(e) => format!("-{:?} (clock set back)", e.duration()),
                };
                self.violate(
                    Inv::Backoff,
                    format!(
                        "m{inst} called for {key} {} after a failure ({}) that needs at least {:?}",
                        waited, hold.why, hold.min
                    ),
                );
            }
        }
        // A peer's backoff binds this manager once the store holds it (the engine shares a
        // rate limit or a provider's 5xx; a failure whose backoff the store did not take, or
        // one caused by the failing instance itself, stays with that instance).
        let stored_backoff = self
            .records
            .get(key)
            .and_then(|r| r.value.retry_not_before())
            .is_some_and(|until| until > now);
        if let Some((by, hold)) = self.shared_holds.get(key).cloned() {
            // …and it is this failure's backoff the store took, not an older one that a
            // clock set back makes look current.
            let stored_this = self
                .backoff_saved
                .get(key)
                .is_some_and(|at| *at >= hold.since_mono);
            if by != inst
                && stored_backoff
                && stored_this
                && now < hold.since + hold.min
                && Instant::now() < hold.since_mono + hold.min
            {
                let waited = match now.duration_since(hold.since) {
                    Ok(d) => format!("{d:?}"),
                    Err(e) => format!("-{:?} (clock set back)", e.duration()),
                };
                self.violate(
                    Inv::SharedBackoff,
                    format!(
                        "m{inst} called for {key} {} after m{by}'s failure ({}) that needs at least {:?}",
                        waited, hold.why, hold.min
                    ),
                );
            }
        }
        if let (Some(p), Some(refused)) = (presented, self.refused.get(&(inst, key.clone()))) {
            if p.0 == refused.0 && p.1 <= refused.1 {
                self.violate(
                    Inv::Hammer,
                    format!(
                        "m{inst} presented rt {}.{} of {key} again after invalid_grant for {}.{}",
                        p.0, p.1, refused.0, refused.1
                    ),
                );
            }
        }

        // Invariant 2.
        let model = self.grants.get(key).cloned();
        if let (Some(g), Some((inc, idx))) = (&model, presented) {
            if inc == g.inc && idx < g.latest {
                if let Some(known) = self.knows(inst, key, inc).filter(|k| *k > idx) {
                    self.violate(
                        Inv::SpentToken,
                        format!("m{inst} presented spent rt {inc}.{idx} of {key}; it could know {inc}.{known}"),
                    );
                }
            } else if inc < g.inc && self.stored_max.contains_key(&(key.clone(), g.inc)) {
                self.violate(
                    Inv::SpentToken,
                    format!("m{inst} presented rt of incarnation {inc} of {key}; the store holds incarnation {}", g.inc),
                );
            }
        }

        self.calls.insert(
            id,
            Call {
                inst,
                key: key.clone(),
                lease,
                started: Instant::now(),
                replied: false,
                delivers: None,
                presented_inc: presented.map(|p| p.0),
                presented,
                retry: false,
                overdue_reported: false,
            },
        );

        if prompt_retry {
            if let Some(call) = self.calls.get_mut(&id) {
                call.retry = true;
            }
        }
        let misconfigured = self.instances.get(&inst).is_some_and(|i| i.misconfigured);
        let (delay, reply, what) = if misconfigured {
            (
                Delay::Now,
                Reply::Fail(
                    ProviderError::misconfigured(ConfigProblem::InvalidClient).with_status(401),
                    Fail::Misconfigured,
                ),
                "invalid_client (misconfigured instance)".to_owned(),
            )
        } else {
            self.serve(id, key, presented, now)
        };
        let shown = presented.map_or("none".to_owned(), |(a, b)| format!("{a}.{b}"));
        self.log(format!("call#{id} m{inst} {key} rt={shown}: {what}"));
        Plan { id, delay, reply }
    }

    fn serve(
        &mut self,
        id: u64,
        key: &TokenKey,
        presented: Option<(u32, u32)>,
        now: SystemTime,
    ) -> (Delay, Reply, String) {
        let f = self.faults.clone();
        let r = self.rng.f64();
        let mut acc = 0.0;
        let mut hit = |p: f64| {
            acc += p;
            r < acc
        };
        #[derive(PartialEq)]
        enum F {
            None,
            Revoke,
            E5xx,
            E429,
            Panic,
            Lost,
            Forever,
            Long,
            Slow,
        }
        let fault = if hit(f.revoked) {
            F::Revoke
        } else if hit(f.server_error) {
            F::E5xx
        } else if hit(f.rate_limited) {
            F::E429
        } else if hit(f.panic) {
            F::Panic
        } else if hit(f.lost_reply) {
            F::Lost
        } else if hit(f.hang_forever) {
            F::Forever
        } else if hit(f.hang_long) {
            F::Long
        } else if hit(f.slow) {
            F::Slow
        } else {
            F::None
        };
        match fault {
            F::Revoke => {
                if let Some(g) = self.grants.get_mut(key) {
                    if g.alive {
                        g.alive = false;
                        g.death = Some(Death::Revoked);
                    }
                }
                return (
                    Delay::Now,
                    Reply::Fail(
                        ProviderError::reauthorize(InvalidationReason::InvalidGrant)
                            .with_status(400),
                        Fail::InvalidGrant(presented),
                    ),
                    "REVOKED out of band: invalid_grant".into(),
                );
            }
            F::E5xx => {
                return (
                    Delay::Now,
                    Reply::Fail(
                        ProviderError::unavailable(UnavailableCause::ServerError).with_status(503),
                        Fail::Transient("503"),
                    ),
                    "503".into(),
                )
            }
            F::E429 => {
                let after = Duration::from_secs(self.rng.u64(1..=120));
                return (
                    Delay::Now,
                    Reply::Fail(
                        ProviderError::rate_limited(Some(after)).with_status(429),
                        Fail::RateLimited(after),
                    ),
                    format!("429 retry-after {after:?}"),
                );
            }
            F::Panic => return (Delay::Now, Reply::Panic, "PANIC".into()),
            _ => {}
        }
        // The server processes the request now; the reply may be delayed or lost.
        let inst = self.calls[&id].inst;
        let (reply, what) = self.process(key, presented, now, inst);
        if let Reply::Tokens { inc, idx } = reply {
            if let Some(call) = self.calls.get_mut(&id) {
                call.delivers = Some((inc, idx));
            }
        }
        match fault {
            F::Lost => {
                if let Reply::Tokens { inc, idx } = reply {
                    self.lost
                        .insert((key.clone(), inc, idx), self.calls[&id].inst);
                }
                (Delay::Now, Reply::Lost, format!("{what}, REPLY LOST"))
            }
            F::Forever => {
                // Half the time the request never reached the server.
                (Delay::Forever, reply, format!("{what}, HANGS FOREVER"))
            }
            F::Long => {
                let d = Duration::from_secs(self.rng.u64(90..=600));
                (Delay::For(d), reply, format!("{what}, answers after {d:?}"))
            }
            F::Slow => {
                let d = Duration::from_millis(self.rng.u64(500..=20_000));
                (Delay::For(d), reply, format!("{what}, slow {d:?}"))
            }
            _ => (Delay::Now, reply, what),
        }
    }

    /// Strict rotation with reuse detection and an optional reuse window.
    fn process(
        &mut self,
        key: &TokenKey,
        presented: Option<(u32, u32)>,
        now: SystemTime,
        inst: usize,
    ) -> (Reply, String) {
        let invalid = |presented| {
            Reply::Fail(
                ProviderError::reauthorize(InvalidationReason::InvalidGrant).with_status(400),
                Fail::InvalidGrant(presented),
            )
        };
        let Some((inc, idx)) = presented else {
            return (invalid(None), "no refresh token: invalid_grant".into());
        };
        let window = self.faults.reuse_window;
        let Some(g) = self.grants.get_mut(key) else {
            return (invalid(presented), "unknown grant: invalid_grant".into());
        };
        if inc != g.inc {
            return (invalid(presented), "old incarnation: invalid_grant".into());
        }
        if !g.alive {
            return (invalid(presented), "grant dead: invalid_grant".into());
        }
        if idx == g.latest {
            g.latest += 1;
            g.window_until = window.map(|w| now + w);
            return (
                Reply::Tokens { inc, idx: g.latest },
                format!("rotated to {inc}.{}", g.latest),
            );
        }
        if idx + 1 == g.latest && g.window_until.is_some_and(|t| now < t) {
            return (
                Reply::Tokens { inc, idx: g.latest },
                format!("reuse window: same pair {inc}.{}", g.latest),
            );
        }
        // Reuse detected: the whole grant is revoked (RFC 9700).
        let successor_delivered = self
            .delivered
            .iter()
            .any(|((_, k, i), m)| k == key && *i == inc && *m > idx);
        self.killed_by.insert((key.clone(), inc), inst);
        let g = self.grants.get_mut(key).expect("checked above");
        g.alive = false;
        g.death = Some(if successor_delivered {
            Death::ReuseDetected
        } else {
            Death::ReuseAfterLostReply
        });
        (
            invalid(presented),
            format!("REUSE DETECTED (latest {inc}.{}): grant revoked", g.latest),
        )
    }

    /// The reply reaches the client (or not, if its process died meanwhile).
    pub fn provider_reply(
        &mut self,
        id: u64,
        reply: &Reply,
    ) -> Result<TokenResponse, ProviderError> {
        let now = self.now();
        let Some(call) = self.calls.get_mut(&id) else {
            return Err(ProviderError::unavailable(UnavailableCause::Network));
        };
        call.replied = true;
        let (inst, key, presented_inc) = (call.inst, call.key.clone(), call.presented_inc);
        let (presented, retry) = (call.presented, call.retry);
        let crashed = self.inst_state(inst) == InstState::Crashed;
        match reply {
            Reply::Tokens { inc, idx } if !crashed => {
                let (inc, idx) = (*inc, *idx);
                let seen = self
                    .delivered
                    .entry((inst, key.clone(), inc))
                    .or_insert(idx);
                *seen = (*seen).max(idx);
                self.holds.retain(|(_, k), _| k != &key);
                self.retry_allowed.retain(|(_, k), _| k != &key);
                self.shared_holds.remove(&key);
                let garble = self.chance(self.faults.malformed_reply);
                let rt = RefreshToken::new(token_name("rt", &key, inc, idx));
                let at = AccessToken::new(token_name("at", &key, inc, idx));
                if garble && self.rng.bool() {
                    // No usable access token, but the rotated refresh token rides in the error.
                    self.log(format!(
                        "call#{id} m{inst} {key}: delivered {inc}.{idx} in a GARBLED reply (no access token)"
                    ));
                    self.hold(
                        inst,
                        &key,
                        presented_inc,
                        now,
                        Fail::Transient("garbled reply"),
                    );
                    return Err(
                        ProviderError::unavailable(UnavailableCause::InvalidResponse)
                            .with_status(200)
                            .with_rotated_refresh_token(rt),
                    );
                }
                if garble {
                    self.log(format!(
                        "call#{id} m{inst} {key}: delivered {inc}.{idx} with an UNREADABLE expires_in"
                    ));
                    return Ok(TokenResponse::new(at)
                        .with_refresh_token(rt)
                        .with_malformed_field("expires_in"));
                }
                self.log(format!("call#{id} m{inst} {key}: delivered {inc}.{idx}"));
                Ok(TokenResponse::new(at)
                    .with_refresh_token(rt)
                    .with_expires(Expiry::In(self.params.lifetime)))
            }
            Reply::Tokens { inc, idx } => {
                self.lost.insert((key.clone(), *inc, *idx), inst);
                self.log(format!(
                    "call#{id} m{inst} {key}: reply to a crashed instance, lost"
                ));
                Err(ProviderError::unavailable(UnavailableCause::Network))
            }
            Reply::Lost => {
                if let (Some(token), false) = (presented, retry) {
                    self.retry_allowed
                        .insert((inst, key.clone()), (token, Instant::now()));
                }
                self.hold(
                    inst,
                    &key,
                    presented_inc,
                    now,
                    Fail::Transient("lost reply"),
                );
                self.log(format!(
                    "call#{id} m{inst} {key}: network error (reply lost)"
                ));
                Err(ProviderError::unavailable(UnavailableCause::Network))
            }
            Reply::Fail(e, fail) => {
                self.hold(inst, &key, presented_inc, now, *fail);
                self.log(format!("call#{id} m{inst} {key}: answered {e}"));
                Err(e.clone())
            }
            Reply::Panic => {
                self.hold(inst, &key, presented_inc, now, Fail::Transient("panic"));
                Err(ProviderError::unavailable(UnavailableCause::Internal))
            }
        }
    }

    fn hold(
        &mut self,
        inst: usize,
        key: &TokenKey,
        presented_inc: Option<u32>,
        now: SystemTime,
        fail: Fail,
    ) {
        let half = self.params.backoff_base / 2;
        let (min, why) = match fail {
            Fail::Transient(why) => (half, why),
            Fail::RateLimited(after) => (half.max(after), "429"),
            Fail::Misconfigured => (half, "invalid_client"),
            Fail::InvalidGrant(token) => {
                if let Some(token) = token {
                    self.refused.insert((inst, key.clone()), token);
                }
                return;
            }
        };
        let hold = Hold {
            since: now,
            since_mono: Instant::now(),
            min,
            why,
        };
        // A misconfigured instance's backoff must not bind others (5c); a crashed one cannot
        // persist its backoff; a failure of a superseded grant does not bind its successor.
        let misconfigured = self.instances.get(&inst).is_some_and(|i| i.misconfigured);
        let current = self.grants.get(key).map(|g| g.inc) == presented_inc;
        // The engine shares facts about the grant (a rate limit, the provider's 5xx); a
        // timeout, a lost or garbled reply or a panic is the failing process's own.
        let about_the_grant = matches!(fail, Fail::RateLimited(_) | Fail::Transient("503"));
        if !misconfigured
            && about_the_grant
            && current
            && self.inst_state(inst) != InstState::Crashed
        {
            self.shared_holds.insert(key.clone(), (inst, hold.clone()));
        }
        if current {
            self.holds.insert((inst, key.clone()), hold);
        }
    }

    /// The call's future is gone (answered, or dropped by the client).
    pub fn provider_gone(&mut self, id: u64) {
        let now = self.now();
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        if !call.replied {
            // The client gave up (a timeout): whatever the server did is lost to it.
            if let Some((inc, idx)) = call.delivers {
                self.lost.insert((call.key.clone(), inc, idx), call.inst);
            }
            if let (Some(token), false) = (call.presented, call.retry) {
                self.retry_allowed
                    .insert((call.inst, call.key.clone()), (token, Instant::now()));
            }
            self.hold(
                call.inst,
                &call.key,
                call.presented_inc,
                now,
                Fail::Transient("timeout"),
            );
            self.log(format!(
                "call#{id} m{} {}: dropped by the client",
                call.inst, call.key
            ));
        }
    }

    // ----- checks after every step -----------------------------------------------------

    /// A caller's operation `op_id` finished on instance `inst`.
    pub fn caller_result(
        &mut self,
        op_id: u64,
        inst: usize,
        key: &TokenKey,
        op: &str,
        inc_at_start: Option<u32>,
        result: &Result<String, tokenkeeper::Error>,
    ) {
        let mut lines = Vec::new();
        let mut found: Vec<(Inv, String)> = Vec::new();
        match result {
            Ok(at) => {
                let ok = parse_token(at).is_some_and(|(k, _, _)| k == key.as_str());
                if !ok {
                    found.push((
                        Inv::Sanity,
                        format!("m{inst} {op} {key} got a foreign token"),
                    ));
                }
                self.last_seen.insert((inst, key.clone()), at.clone());
                lines.push(format!(
                    "op m{inst} {op} {key} -> ok {}",
                    at.split_once('.').map_or("", |s| s.1)
                ));
            }
            Err(e) => {
                lines.push(format!("op m{inst} {op} {key} -> err {e}"));
                match e {
                    tokenkeeper::Error::ReauthorizationRequired { .. } => {
                        let g = self.grants.get(key).cloned();
                        // A death held in memory (the store would not take it) is answered while
                        // the store cannot be read: an instance that has not read the store since
                        // the new incarnation was authorized cannot know of it (issue 10, A4).
                        let blind = self.authorized_at.get(key).is_some_and(|auth| {
                            self.load_failed
                                .get(&(inst, key.clone()))
                                .is_some_and(|failed| failed >= auth)
                                && self
                                    .load_ok
                                    .get(&(inst, key.clone()))
                                    .is_none_or(|ok| ok < auth)
                        });
                        if let Some(g) = g {
                            if Some(g.inc) == inc_at_start && self.recoverable(key, true) && !blind
                            {
                                found.push((
                                    Inv::FalseDeath,
                                    format!("m{inst} {op} {key}: caller told {e} but incarnation {} is alive at the provider and its token {}.{} is known", g.inc, g.inc, g.latest),
                                ));
                            }
                        }
                    }
                    tokenkeeper::Error::Misconfigured { .. } => {
                        let mine = self.instances.get(&inst).is_some_and(|i| i.misconfigured);
                        if !mine {
                            found.push((
                                Inv::ForeignMisconfig,
                                format!("m{inst} (correctly configured) {op} {key}: got {e}"),
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut violations = Vec::new();
        for (inv, msg) in found {
            if self.checks.enabled(inv) {
                lines.push(format!("VIOLATION [{}] {msg}", inv.label()));
                violations.push(Violation { inv, msg });
            }
        }
        // Stamped now: the lines reach the trace at the next flush.
        let stamp = self.stamp();
        let lines = lines.into_iter().map(|l| format!("{stamp} {l}")).collect();
        self.pending.push((op_id, lines, violations));
    }

    /// The store's dead records against the model (3, 3b) and calls that outlive the refresh
    /// timeout (6b).
    pub fn check_step(&mut self) {
        let dead: Vec<(TokenKey, GrantRecord)> = self
            .records
            .iter()
            .filter(|(_, r)| {
                matches!(
                    r.value.state(),
                    tokenkeeper::GrantState::ReauthorizationRequired { .. }
                )
            })
            .map(|(k, r)| (k.clone(), r.value.clone()))
            .collect();
        for (key, record) in dead {
            let Some(g) = self.grants.get(&key).cloned() else {
                continue;
            };
            let Some((inc, _)) = record_rt(&record) else {
                continue;
            };
            if inc != g.inc {
                continue;
            }
            let reason = match record.state() {
                tokenkeeper::GrantState::ReauthorizationRequired { reason, .. } => {
                    format!("{reason:?}")
                }
                _ => String::new(),
            };
            if self.recoverable(&key, true) {
                self.violate(
                    Inv::FalseDeath,
                    format!("store holds {key} dead ({reason}) but incarnation {inc} is alive and {inc}.{} is known", g.latest),
                );
            }
            if g.death == Some(Death::ReuseAfterLostReply) && reason != "RotationLost" {
                // Only when the manager that lost the reply is the one that found out, and the
                // store took its note of the lost reply (a store that refused it leaves the
                // finder nothing to tell a lost rotation from a revocation).
                let lost_by = self.lost.get(&(key.clone(), inc, g.latest)).copied();
                let killer = self.killed_by.get(&(key.clone(), inc)).copied();
                let marked =
                    g.latest > 0 && self.lost_marked.contains(&(key.clone(), inc, g.latest - 1));
                if lost_by.is_some() && lost_by == killer && marked {
                    self.violate(
                        Inv::RotationLostReason,
                        format!("{key} died after m{} lost the reply carrying {inc}.{}, but the store says {reason}", lost_by.unwrap_or(0), g.latest),
                    );
                    // Report once per incarnation.
                    self.killed_by.remove(&(key.clone(), inc));
                }
            }
        }
        let limit = self.params.refresh_timeout + Duration::from_secs(5);
        let now = Instant::now();
        let overdue: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| !c.replied && !c.overdue_reported && now - c.started > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            let call = self.calls.get_mut(&id).expect("listed");
            call.overdue_reported = true;
            let (inst, key) = (call.inst, call.key.clone());
            let age = now - call.started;
            self.violate(
                Inv::CallTimeout,
                format!(
                    "call#{id} m{inst} {key} in flight for {age:?}, beyond the refresh timeout"
                ),
            );
        }
    }
}
