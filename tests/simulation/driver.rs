//! One schedule: build the world from a seed, drive managers with random steps, check the
//! invariants after each step, then heal and check that nothing was lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokenkeeper::{
    AccessToken, Clock, Error, RefresherConfig, RefresherHandle, TokenKey, TokenManager,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::SimClock;
use crate::faults::{Faults, Menu};
use crate::provider::SimProvider;
use crate::store::SimStore;
use crate::world::{lock, parse_token, record_rt, InstState, Instance, Inv, Params, Shared, World};
use crate::Checks;

/// What a schedule left behind.
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<crate::world::Violation>,
    pub trace: Vec<String>,
    pub hash: u64,
    pub provider_calls: u64,
}

/// Runs schedule `seed` to completion on its own paused current-thread runtime.
pub fn run(seed: u64, checks: Checks, menu: Menu, steps: usize) -> Outcome {
    // The engine draws its backoff jitter from fastrand's thread-local generator.
    fastrand::seed(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut sim = Sim::new(seed, checks, menu);
        sim.run(steps).await;
        sim.finish()
    })
}

struct Refresher {
    handle: RefresherHandle,
    samples: Vec<(SystemTime, u64)>,
}

struct Slot {
    inst: usize,
    manager: TokenManager,
    refresher: Option<Refresher>,
}

struct Op {
    inst: usize,
    desc: String,
    handle: JoinHandle<()>,
    started: Instant,
    cancel_at: Option<Instant>,
    reported: bool,
}

struct Sim {
    rng: fastrand::Rng,
    world: Shared,
    clock: SimClock,
    t0: SystemTime,
    start: Instant,
    /// Clock offset from tokio time, in seconds (clock jumps).
    offset: i64,
    /// The highest offset so far: at heal time the clock goes past every time it showed.
    max_offset: i64,
    keys: Vec<TokenKey>,
    slots: Vec<Slot>,
    next_inst: usize,
    ops: Vec<Op>,
    next_op: u64,
    refresher_config: RefresherConfig,
    bound: Duration,
}

impl Sim {
    fn new(seed: u64, checks: Checks, menu: Menu) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let clock = SimClock::new();
        let lifetime = Duration::from_secs(rng.u64(60..=600));
        let backoff_base = Duration::from_millis(rng.u64(1_000..=10_000));
        let params = Params {
            lifetime,
            margin: lifetime / 6,
            backoff_base,
            backoff_max: backoff_base * rng.u32(2..=16),
            lock_ttl: Duration::from_secs(60),
            refresh_timeout: Duration::from_secs(30),
            per_minute: rng.usize(1..=4),
        };
        let faults = Faults::draw(&menu, &mut rng);
        let managers = rng.usize(2..=4);
        let keys: Vec<TokenKey> = (0..rng.usize(1..=3))
            .map(|i| TokenKey::from(format!("k{i}")))
            .collect();
        let refresher_config = RefresherConfig::new()
            .lead_time(lifetime / 4)
            .max_per_minute(params.per_minute)
            .max_concurrency(rng.usize(1..=3))
            .refresh_idle(rng.bool())
            .keep_alive(Some(lifetime * 3))
            .rescan_interval(Duration::from_secs(rng.u64(30..=300)))
            .retry_floor(Duration::from_secs(rng.u64(1..=30)));
        let bound = params.lock_ttl * (managers as u32 + 2);
        let mut world = World::new(seed, checks, params, faults, clock.clone());
        world.session_locks = rng.bool();
        world.log(format!(
            "seed {seed}: {managers} managers, {} grants, {} locks, {:?}, faults {:?}",
            keys.len(),
            if world.session_locks {
                "session"
            } else {
                "lease"
            },
            world.params,
            world.faults
        ));
        let mut sim = Self {
            rng,
            world: Arc::new(Mutex::new(world)),
            t0: clock.now(),
            clock,
            start: Instant::now(),
            offset: 0,
            max_offset: 0,
            keys,
            slots: Vec::new(),
            next_inst: 0,
            ops: Vec::new(),
            next_op: 0,
            refresher_config,
            bound,
        };
        for _ in 0..managers {
            let slot = sim.build(sim.slots.is_empty());
            sim.slots.push(slot);
        }
        sim
    }

    fn params(&self) -> Params {
        lock(&self.world).params.clone()
    }

    /// A new manager instance on the shared store. `healthy` forbids a misconfiguration.
    fn build(&mut self, healthy: bool) -> Slot {
        let inst = self.next_inst;
        self.next_inst += 1;
        let p = self.params();
        let misconfigured = {
            let mut w = lock(&self.world);
            let chance = w.faults.misconfigured_instance;
            let misconfigured = !healthy && w.chance(chance);
            w.instances.insert(
                inst,
                Instance {
                    state: InstState::Alive,
                    misconfigured,
                },
            );
            w.log(format!(
                "start m{inst}{}",
                if misconfigured {
                    " (MISCONFIGURED)"
                } else {
                    ""
                }
            ));
            misconfigured
        };
        let _ = misconfigured;
        let manager = TokenManager::builder(SimProvider {
            world: self.world.clone(),
            inst,
        })
        .store(SimStore {
            world: self.world.clone(),
            inst,
        })
        .clock(self.clock.clone())
        .refresh_margin(p.margin)
        .backoff(p.backoff_base, p.backoff_max)
        .lock_ttl(p.lock_ttl)
        .refresh_timeout(p.refresh_timeout)
        // An unreadable expiry: assume half the model's lifetime (the default is an hour).
        .fallback_lifetime(p.lifetime / 2)
        .build();
        Slot {
            inst,
            manager,
            refresher: None,
        }
    }

    fn sync_clock(&self) {
        let elapsed = (Instant::now() - self.start).as_secs_f64() as i64 + self.offset;
        let now = if elapsed >= 0 {
            self.t0 + Duration::from_secs(elapsed as u64)
        } else {
            self.t0 - Duration::from_secs((-elapsed) as u64)
        };
        let sub = (Instant::now() - self.start).subsec_millis();
        self.clock.set(now + Duration::from_millis(sub as u64));
    }

    /// Lets `by` of tokio time pass, moving the clock along in steps of at most a second.
    async fn advance(&self, by: Duration) {
        let mut left = by;
        loop {
            let d = left.min(Duration::from_secs(1));
            if d.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(d).await;
            }
            self.sync_clock();
            left -= d;
            if left.is_zero() {
                break;
            }
        }
    }

    async fn run(&mut self, steps: usize) {
        // Initial grants, inserted without faults.
        let faults = std::mem::replace(&mut lock(&self.world).faults, Faults::none());
        for key in self.keys.clone() {
            self.reauthorize(&key).await;
        }
        lock(&self.world).faults = faults;
        for step in 0..steps {
            self.step(step).await;
            self.check_step();
        }
        self.heal().await;
    }

    async fn reauthorize(&mut self, key: &TokenKey) {
        let tokens = lock(&self.world).reauthorize(key);
        for attempt in 0.. {
            let i = self.rng.usize(..self.slots.len());
            let manager = self.slots[i].manager.clone();
            if attempt == 20 {
                // Let the human's insert through at last.
                let faults = std::mem::replace(&mut lock(&self.world).faults, Faults::none());
                let result = manager.insert(key.clone(), tokens.clone()).await;
                lock(&self.world).faults = faults;
                lock(&self.world).reset_holds(key);
                result.expect("insert without faults");
                return;
            }
            let result = manager.insert(key.clone(), tokens.clone()).await;
            // A retried insert of the same grant replaces the record, backoff included.
            lock(&self.world).reset_holds(key);
            match result {
                Ok(()) => return,
                Err(e) => lock(&self.world).log(format!("insert {key} failed: {e}")),
            }
        }
    }

    async fn step(&mut self, step: usize) {
        let f = lock(&self.world).faults.clone();
        let roll = |sim: &mut Self, p: f64| p > 0.0 && sim.rng.f64() < p;
        if roll(self, f.clock_jumps) {
            let hours = self.rng.i64(1..=6);
            let back = self.rng.bool();
            let secs = hours * 3600;
            self.offset += if back { -secs } else { secs };
            self.max_offset = self.max_offset.max(self.offset);
            self.sync_clock();
            // (The store measures lease time on its own clock: the jump does not touch it.)
            let mut w = lock(&self.world);
            w.clock.changed.notify_waiters();
            w.log(format!(
                "step {step}: CLOCK JUMP {} {hours} h",
                if back { "back" } else { "forward" }
            ));
            drop(w);
            for slot in &mut self.slots {
                if let Some(r) = &mut slot.refresher {
                    r.samples.clear();
                }
            }
        }
        if roll(self, f.refresher) {
            let i = self.rng.usize(..self.slots.len());
            let inst = self.slots[i].inst;
            let config = self.refresher_config.clone();
            let slot = &mut self.slots[i];
            match slot.refresher.take() {
                Some(r) => {
                    lock(&self.world).log(format!("step {step}: m{inst} refresher off"));
                    drop(r);
                }
                None => {
                    lock(&self.world).log(format!("step {step}: m{inst} refresher on"));
                    slot.refresher = Some(Refresher {
                        handle: slot.manager.start_refresher(config),
                        samples: Vec::new(),
                    });
                }
            }
        }
        if roll(self, f.restarts) || roll(self, f.crashes) {
            let crash = f.crashes > 0.0 && (f.restarts == 0.0 || self.rng.bool());
            let i = self.rng.usize(..self.slots.len());
            self.restart(i, crash, i == 0);
            lock(&self.world).log(format!(
                "step {step}: slot {i} {}",
                if crash {
                    "CRASHED and restarted"
                } else {
                    "restarted"
                }
            ));
        }
        if roll(self, f.reauthorize) {
            let key = self.keys[self.rng.usize(..self.keys.len())].clone();
            lock(&self.world).log(format!("step {step}: human re-authorizes {key}"));
            self.reauthorize(&key).await;
        }
        if roll(self, f.extra_conflict * 0.2) {
            let key = self.keys[self.rng.usize(..self.keys.len())].clone();
            lock(&self.world).peer_bump(&key);
        }
        for _ in 0..self.rng.usize(0..=3) {
            self.spawn_op(f.cancellations);
        }
        let dt = match self.rng.u32(0..100) {
            0..=24 => Duration::ZERO,
            25..=64 => Duration::from_millis(self.rng.u64(100..=2_000)),
            65..=94 => Duration::from_millis(self.rng.u64(2_000..=30_000)),
            _ => Duration::from_secs(self.rng.u64(30..=300)),
        };
        self.advance(dt).await;
    }

    /// Replaces slot `i`'s instance. A graceful restart drops the handle and lets its tasks
    /// finish (once `TokenManager::drain` lands, call it first); a crash makes the old
    /// instance's store and provider connections fail from now on.
    fn restart(&mut self, i: usize, crash: bool, healthy: bool) {
        let old = self.slots[i].inst;
        {
            let mut w = lock(&self.world);
            if let Some(inst) = w.instances.get_mut(&old) {
                inst.state = if crash {
                    InstState::Crashed
                } else {
                    InstState::Dropped
                };
            }
        }
        // The process's callers go with it.
        for op in &self.ops {
            if op.inst == old {
                op.handle.abort();
            }
        }
        let slot = self.build(healthy);
        self.slots[i] = slot;
    }

    fn spawn_op(&mut self, cancellations: f64) {
        let i = self.rng.usize(..self.slots.len());
        let key = self.keys[self.rng.usize(..self.keys.len())].clone();
        let (inst, manager) = (self.slots[i].inst, self.slots[i].manager.clone());
        let kind = self.rng.u32(0..100);
        let world = self.world.clone();
        let (inc, failed) = {
            let w = lock(&world);
            let inc = w.grants.get(&key).map(|g| g.inc);
            let failed = w
                .last_seen
                .get(&(inst, key.clone()))
                .cloned()
                .or_else(|| {
                    w.records
                        .get(&key)
                        .map(|r| r.value.tokens().access_token().secret().to_owned())
                })
                .unwrap_or_default();
            (inc, failed)
        };
        let name = match kind {
            0..=49 => "access_token",
            50..=64 => "token",
            65..=79 => "refresh_now",
            _ => "invalidate",
        };
        let cancel = cancellations > 0.0 && self.rng.f64() < cancellations;
        let timeout = cancel && self.rng.bool();
        let after = Duration::from_millis(self.rng.u64(0..=20_000));
        let desc = format!("m{inst} {name} {key}");
        self.next_op += 1;
        let op_id = self.next_op;
        let task = {
            let key = key.clone();
            let world = world.clone();
            async move {
                let call = async {
                    match name {
                        "access_token" => manager
                            .access_token(&key)
                            .await
                            .map(|t| t.secret().to_owned()),
                        "token" => manager
                            .token(&key)
                            .await
                            .map(|t| t.access_token().secret().to_owned()),
                        "refresh_now" => manager
                            .refresh_now(&key)
                            .await
                            .map(|t| t.access_token().secret().to_owned()),
                        _ => manager
                            .invalidate(&key, &AccessToken::new(failed))
                            .await
                            .map(|t| t.secret().to_owned()),
                    }
                };
                let result: Result<String, Error> = if timeout {
                    match tokio::time::timeout(after, call).await {
                        Ok(r) => r,
                        Err(_) => {
                            lock(&world)
                                .log(format!("op m{inst} {name} {key} timed out (dropped)"));
                            return;
                        }
                    }
                } else {
                    call.await
                };
                lock(&world).caller_result(op_id, inst, &key, name, inc, &result);
            }
        };
        lock(&world).log(format!(
            "op {desc} starts{}",
            if cancel {
                if timeout {
                    " (timeout)"
                } else {
                    " (will abort)"
                }
            } else {
                ""
            }
        ));
        let handle = tokio::spawn(task);
        self.ops.push(Op {
            inst,
            desc,
            handle,
            started: Instant::now(),
            cancel_at: (cancel && !timeout).then(|| Instant::now() + after),
            reported: false,
        });
    }

    fn check_step(&mut self) {
        let now = Instant::now();
        let bound = self.bound;
        let mut w = lock(&self.world);
        w.flush();
        w.check_step();
        for op in &mut self.ops {
            if op.cancel_at.is_some_and(|t| t <= now) && !op.handle.is_finished() {
                op.handle.abort();
                op.cancel_at = None;
                w.log(format!("op {} aborted", op.desc));
            }
            if !op.handle.is_finished() && !op.reported && now - op.started > bound {
                op.reported = true;
                let msg = format!("op {} unanswered after {:?}", op.desc, now - op.started);
                w.violate(Inv::Answered, msg);
            }
        }
        self.ops
            .retain(|op| !op.handle.is_finished() || op.reported);
        // Invariant 7: starts in any window shorter than a minute stay within the cap.
        let cap = w.params.per_minute as u64;
        let clock_now = w.now();
        for slot in &mut self.slots {
            let Some(r) = &mut slot.refresher else {
                continue;
            };
            if !r.handle.is_running() {
                let msg = format!("m{} refresher stopped by itself", slot.inst);
                w.violate(Inv::Sanity, msg);
            }
            let started = r.handle.progress().started;
            let over = r.samples.iter().find_map(|(at, count)| {
                let span = clock_now.duration_since(*at).unwrap_or_default();
                (span < Duration::from_secs(60) && started - count > cap)
                    .then(|| (span, started - count))
            });
            if let Some((span, n)) = over {
                let msg = format!(
                    "m{} refresher started {n} refreshes within {span:?} (cap {cap}/min)",
                    slot.inst
                );
                w.violate(Inv::RateCap, msg);
                // Once per excess.
                r.samples.clear();
            }
            r.samples.retain(|(at, _)| {
                clock_now.duration_since(*at).unwrap_or_default() < Duration::from_secs(60)
            });
            r.samples.push((clock_now, started));
        }
    }

    /// Faults off, time forward, managers retry: every recoverable grant must come back.
    async fn heal(&mut self) {
        let p = self.params();
        {
            let mut w = lock(&self.world);
            w.faults = Faults::none();
            w.log("HEAL: faults off");
        }
        for i in 0..self.slots.len() {
            let misconfigured = {
                let w = lock(&self.world);
                w.instances
                    .get(&self.slots[i].inst)
                    .is_some_and(|x| x.misconfigured)
            };
            if misconfigured {
                self.restart(i, false, true);
            }
        }
        // Time passes: the clock goes past every time it showed before (jumps back included),
        // so no token cached earlier still looks fresh.
        if self.offset < self.max_offset {
            self.offset = self.max_offset;
            self.sync_clock();
        }
        let wait = p.lifetime + p.backoff_max * 2 + Duration::from_secs(130);
        self.advance(wait).await;
        self.check_step();
        let targets: Vec<TokenKey> = {
            let w = lock(&self.world);
            self.keys
                .iter()
                .filter(|k| w.recoverable(k, false))
                .cloned()
                .collect()
        };
        let mut healed: BTreeMap<(usize, TokenKey), bool> = BTreeMap::new();
        let mut last_error: BTreeMap<(usize, TokenKey), String> = BTreeMap::new();
        for _round in 0..6 {
            for key in &targets {
                for slot in &self.slots {
                    if healed
                        .get(&(slot.inst, key.clone()))
                        .copied()
                        .unwrap_or(false)
                    {
                        continue;
                    }
                    let result =
                        tokio::time::timeout(self.bound, slot.manager.access_token(key)).await;
                    let mut w = lock(&self.world);
                    let good = match &result {
                        Ok(Ok(at)) => {
                            let current = w.grants.get(key).map(|g| (g.inc, g.alive));
                            let got = parse_token(at.secret()).map(|(_, inc, _)| inc);
                            w.log(format!("heal m{} {key}: {}", slot.inst, at.secret()));
                            matches!((current, got), (Some((inc, true)), Some(g)) if inc == g)
                        }
                        Ok(Err(e)) => {
                            w.log(format!("heal m{} {key}: {e}", slot.inst));
                            last_error.insert((slot.inst, key.clone()), e.to_string());
                            false
                        }
                        Err(_) => {
                            last_error.insert((slot.inst, key.clone()), "no answer".into());
                            w.log(format!("heal m{} {key}: NO ANSWER", slot.inst));
                            false
                        }
                    };
                    healed.insert((slot.inst, key.clone()), good);
                }
            }
            if healed.values().all(|h| *h) {
                break;
            }
            self.advance(p.backoff_max + Duration::from_secs(130)).await;
        }
        self.check_step();
        let mut w = lock(&self.world);
        for key in &targets {
            let Some(g) = w.grants.get(key).cloned() else {
                continue;
            };
            let stored = w
                .records
                .get(key)
                .map(|r| (record_rt(&r.value), r.value.state().clone()));
            let stuck: Vec<String> = self
                .slots
                .iter()
                .filter(|s| !healed.get(&(s.inst, key.clone())).copied().unwrap_or(false))
                .map(|s| {
                    format!(
                        "m{}: {}",
                        s.inst,
                        last_error
                            .get(&(s.inst, key.clone()))
                            .cloned()
                            .unwrap_or_default()
                    )
                })
                .collect();
            let store_ok = matches!(&stored, Some((Some((inc, idx)), tokenkeeper::GrantState::Active)) if *inc == g.inc && *idx == g.latest);
            if !g.alive {
                let msg = format!(
                    "{key} was recoverable at heal start, then died ({:?})",
                    g.death
                );
                w.violate(Inv::Heal, msg);
            } else if !stuck.is_empty() || !store_ok {
                let msg = format!(
                    "{key} (latest {}.{}) not healed: store {:?}; stuck {:?}",
                    g.inc, g.latest, stored, stuck
                );
                w.violate(Inv::Heal, msg);
            }
        }
    }

    fn finish(self) -> Outcome {
        let mut w = lock(&self.world);
        w.flush();
        Outcome {
            seed: w.seed,
            violations: w.violations.clone(),
            trace: w.trace.clone(),
            hash: w.trace_hash(),
            provider_calls: w.provider_calls,
        }
    }
}
