//! The background refresher: one scheduler for all grants of a manager.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::event::Event;
use crate::manager::{later, Inner, Need};
use crate::status::NextRefresh;
use crate::store::{Cas, ExpiryWarning, GrantRecord, Versioned};
use crate::token::TokenKey;

/// When and how fast the background refresher works.
///
/// - A grant **in use** (read through the manager since its last refresh) is refreshed ahead of
///   expiry: `max(lead_time, lifetime × lead_fraction)` before it, plus random jitter, so
///   callers rarely wait for a refresh.
/// - **Every** grant, used or idle, is refreshed at least every `keep_alive` (default 7 days),
///   so refresh tokens that die unused (180 days at some providers) never do.
/// - When a refresh token's expiry is known (providers that say when it dies and never extend
///   it), [`Event::RefreshTokenExpiring`] fires at least `expiry_warning` ahead (default 7
///   days): it is planned `expiry_warning_margin` (default 1 day) earlier still, so a
///   refresher that was down or busy for up to that long still warns in time. The warning is
///   stored with the grant, so it goes out once per expiry across restarts and across every
///   process sharing the store; when it can only arrive late, it goes out at once and says how
///   much time is left ([`Event::time_left`]).
/// - At most `max_concurrency` refreshes run at once and at most `max_per_minute` start in any
///   minute, for all grants together.
#[derive(Debug, Clone)]
#[must_use = "a config does nothing until passed to `TokenManager::start_refresher`"]
pub struct RefresherConfig {
    lead_time: Duration,
    lead_fraction: f64,
    jitter: f64,
    refresh_idle: bool,
    keep_alive: Option<Duration>,
    max_concurrency: usize,
    max_per_minute: usize,
    rescan_interval: Duration,
    expiry_warning: Duration,
    expiry_warning_margin: Duration,
    min_sleep: Duration,
    retry_floor: Duration,
    shutdown_timeout: Duration,
}

impl Default for RefresherConfig {
    fn default() -> Self {
        Self {
            lead_time: Duration::from_secs(5 * 60),
            lead_fraction: 0.1,
            jitter: 0.25,
            refresh_idle: false,
            keep_alive: Some(Duration::from_secs(7 * 24 * 3600)),
            max_concurrency: 8,
            max_per_minute: 120,
            rescan_interval: Duration::from_secs(10 * 60),
            expiry_warning: Duration::from_secs(7 * 24 * 3600),
            expiry_warning_margin: Duration::from_secs(24 * 3600),
            min_sleep: Duration::from_secs(1),
            retry_floor: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl RefresherConfig {
    /// The default configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refresh grants in use at least this long before expiry (default 5 min). The lead never
    /// exceeds half the token's lifetime, so short-lived tokens are refreshed about once per
    /// half lifetime, not continuously.
    pub fn lead_time(mut self, lead: Duration) -> Self {
        self.lead_time = lead.min(MAX_SETTING);
        self
    }

    /// Or this fraction of the token's lifetime before expiry, when longer (default 0.1;
    /// clamped to 0–0.9; NaN keeps the default).
    pub fn lead_fraction(mut self, fraction: f64) -> Self {
        if fraction.is_finite() {
            self.lead_fraction = fraction.clamp(0.0, 0.9);
        }
        self
    }

    /// Random extra lead, as a fraction of the lead (default 0.25; clamped to 0–1; NaN keeps
    /// the default), so grants issued together are not refreshed together.
    pub fn jitter(mut self, fraction: f64) -> Self {
        if fraction.is_finite() {
            self.jitter = fraction.clamp(0.0, 1.0);
        }
        self
    }

    /// Also refresh idle grants ahead of expiry, not only grants in use (default false: idle
    /// grants are refreshed by keep-alive only, which spares the provider's rate limits).
    pub fn refresh_idle(mut self, yes: bool) -> Self {
        self.refresh_idle = yes;
        self
    }

    /// Refresh every grant that can be refreshed at least this often, used or not; `None`
    /// turns keep-alive off (default 7 days; at least 1 minute). Grants their provider cannot
    /// renew (no refresh token) are never touched by keep-alive.
    ///
    /// A grant that declares a sliding refresh-token expiry
    /// ([`RefreshExpiry::Sliding`](crate::RefreshExpiry::Sliding)) is kept alive from its idle
    /// lifetime instead: every quarter of it (at least an hour), which leaves three more
    /// chances, backoffs included, before the token would die unused. A 180-day idle lifetime
    /// then costs a refresh every 45 days instead of every 7; a 2-day one, every 12 hours.
    /// A grant that declares a fixed expiry ([`RefreshExpiry::Fixed`](crate::RefreshExpiry::Fixed):
    /// a hard end no refresh moves, and no idle lifetime) is not kept alive at all: it is
    /// refreshed when used, and warned about ahead of its end. A declaration on the provider
    /// ([`Provider::refresh_expiry`](crate::Provider::refresh_expiry)) counts for every grant
    /// whose tokens do not declare their own.
    pub fn keep_alive(mut self, every: Option<Duration>) -> Self {
        self.keep_alive = every.map(|d| d.max(MINUTE));
        self
    }

    /// Refreshes running at once (default 8; 1 to 4096).
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n.clamp(1, 4096);
        self
    }

    /// Refreshes started in any one minute of clock time, all grants together (default 120;
    /// at least 1). Every refresh the refresher starts counts: planned ones, the start-up
    /// scan and newly inserted grants alike.
    pub fn max_per_minute(mut self, n: usize) -> Self {
        self.max_per_minute = n.max(1);
        self
    }

    /// How often to look for grants added by other processes (default 10 min; 1 s to 30
    /// days).
    pub fn rescan_interval(mut self, every: Duration) -> Self {
        self.rescan_interval = every.clamp(Duration::from_secs(1), MAX_SETTING);
        self
    }

    /// How far ahead of a known refresh-token expiry (or of the expiry of a grant that cannot
    /// be renewed) to warn (default 7 days).
    pub fn expiry_warning(mut self, ahead: Duration) -> Self {
        self.expiry_warning = ahead.min(MAX_SETTING);
        self
    }

    /// How much earlier than [`expiry_warning`](Self::expiry_warning) the warning is planned
    /// (default 1 day; at most 30 days), so that a refresher stopped, restarted or busy for up
    /// to this long around that moment still warns at least `expiry_warning` ahead. Zero plans
    /// it exactly `expiry_warning` ahead.
    pub fn expiry_warning_margin(mut self, margin: Duration) -> Self {
        self.expiry_warning_margin = margin.min(MAX_SETTING);
        self
    }

    /// How long [`RefresherHandle::shutdown`] waits for refreshes in flight (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Least time between two attempts for one grant when the last one left no backoff
    /// (default 30 s).
    pub fn retry_floor(mut self, floor: Duration) -> Self {
        self.retry_floor = floor.clamp(Duration::from_millis(1), MAX_SETTING);
        self
    }
}

/// The longest any duration setting is taken to mean (30 days).
const MAX_SETTING: Duration = Duration::from_secs(30 * 24 * 3600);

/// A running background refresher. Stop it with [`shutdown`](Self::shutdown), which also waits
/// for the manager's refreshes in flight to be saved, or by dropping the handle (refreshes in
/// flight then go on, on their own tasks, as long as the runtime runs).
#[must_use = "dropping the handle stops the refresher"]
pub struct RefresherHandle {
    inner: Arc<Inner>,
    shutdown_timeout: Duration,
    shutdown: watch::Sender<bool>,
    control: mpsc::UnboundedSender<Control>,
    progress: watch::Receiver<Progress>,
    clock: Arc<dyn crate::Clock>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for RefresherHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefresherHandle")
            .field("progress", &*self.progress.borrow())
            .finish_non_exhaustive()
    }
}

impl RefresherHandle {
    /// Stops the scheduler, then waits (at most the configured
    /// [`shutdown_timeout`](RefresherConfig::shutdown_timeout), default 30 s) until no refresh
    /// of the manager is in flight and every refreshed grant is saved, as
    /// [`TokenManager::drain`](crate::TokenManager::drain) does. Returns whether everything
    /// finished in time; if not, the refreshes left go on on their own tasks while the runtime
    /// runs.
    ///
    /// Guaranteed once this returns `true`: every refresh the provider answered before the
    /// call is saved (or the store refused it and the grant is reported through
    /// [`Event::PersistFailed`]). Exiting the process is then safe.
    pub async fn shutdown(mut self) -> bool {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        crate::manager::drain(&self.inner, self.shutdown_timeout).await
    }

    /// Whether the scheduler task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until the scheduler has caught up with the clock's current time: nothing due is
    /// left waiting and no refresh is in flight. For tests: move a manual clock, then call this.
    pub async fn wait_idle(&self) {
        let target = self.clock.now();
        let mut progress = self.progress.clone();
        let _ = self.control.send(Control::Poke);
        let _ = progress
            .wait_for(|p| (p.idle && p.as_of.is_some_and(|t| t >= target)) || p.stopped)
            .await;
    }

    /// What the scheduler last reported.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }
}

impl Drop for RefresherHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// A snapshot of the scheduler, from [`RefresherHandle::progress`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// The clock time of the snapshot.
    pub as_of: Option<SystemTime>,
    /// Grants with a scheduled check.
    pub scheduled: usize,
    /// Refreshes in flight.
    pub in_flight: usize,
    /// Refreshes started since the scheduler started.
    pub started: u64,
    /// Nothing due is waiting and nothing is in flight.
    pub idle: bool,
    /// The scheduler has stopped.
    pub stopped: bool,
}

/// Messages to the scheduler.
#[derive(Debug)]
pub(crate) enum Control {
    /// A grant was inserted or removed: re-plan it now.
    Changed(TokenKey),
    /// A refresh the scheduler started has finished.
    Done(TokenKey),
    /// Publish progress now.
    Poke,
}

pub(crate) fn start(inner: Arc<Inner>, config: RefresherConfig) -> RefresherHandle {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (control, control_rx) = mpsc::unbounded_channel();
    let (progress_tx, progress) = watch::channel(Progress::default());
    let planned = Arc::new(Plans::default());
    inner.set_scheduler(control.clone(), planned.clone());
    let clock = inner.clock.clone();
    let shutdown_timeout = config.shutdown_timeout;
    let handle_inner = inner.clone();
    let scheduler = Scheduler {
        semaphore: Arc::new(Semaphore::new(config.max_concurrency)),
        config,
        queue: BTreeSet::new(),
        warn_queue: BTreeSet::new(),
        warn_planned: HashMap::new(),
        planned: planned.clone(),
        warned: HashMap::new(),
        last_attempt: HashMap::new(),
        in_flight: HashSet::new(),
        starts: VecDeque::new(),
        started: 0,
        control: control.clone(),
        progress: progress_tx,
        inner,
    };
    let task = tokio::spawn(scheduler.run(shutdown_rx, control_rx));
    RefresherHandle {
        inner: handle_inner,
        shutdown_timeout,
        shutdown,
        control,
        progress,
        clock,
        task: Some(task),
    }
}

struct Scheduler {
    inner: Arc<Inner>,
    config: RefresherConfig,
    /// Next check per grant, ordered by time.
    queue: BTreeSet<(SystemTime, TokenKey)>,
    /// Next expiry warning per grant, ordered by time. Not held back by the rate or
    /// concurrency caps, which apply to refreshes.
    warn_queue: BTreeSet<(SystemTime, TokenKey)>,
    warn_planned: HashMap<TokenKey, SystemTime>,
    /// Shared with the manager, for `status().next_refresh` and `next_expiry_warning`.
    planned: Arc<Plans>,
    /// The expiry warned about by this process, per grant: the stored record says so too,
    /// unless the store failed when the warning went out (it is then saved at a later check).
    warned: HashMap<TokenKey, SystemTime>,
    last_attempt: HashMap<TokenKey, SystemTime>,
    in_flight: HashSet<TokenKey>,
    /// Start times of refreshes in the last minute.
    starts: VecDeque<SystemTime>,
    started: u64,
    semaphore: Arc<Semaphore>,
    control: mpsc::UnboundedSender<Control>,
    progress: watch::Sender<Progress>,
}

/// What to do with a grant at a check.
#[derive(Clone, Copy)]
enum Plan {
    Refresh,
    CheckAt(SystemTime, NextRefresh),
    Forget,
}

/// What a check found about a grant's expiry warning.
#[derive(Default)]
struct WarnPlan {
    /// A warning to send (or, already sent by this process, to record) now.
    now: Option<Warning>,
    /// When one will be due.
    at: Option<SystemTime>,
}

#[derive(Clone, Copy)]
struct Warning {
    expires: SystemTime,
    /// About the access token of a grant nothing can renew (else the refresh token).
    access: bool,
    /// Already sent by this process while the store could not record it: record it only.
    record_only: bool,
}

/// How sending an expiry warning went.
enum Claim {
    /// Recorded with the grant (and sent, unless it had been already).
    Recorded,
    /// Sent (or had been), but the store failed: record it later.
    Unrecorded,
    /// The record changed meanwhile: nothing sent, look again.
    Changed,
}

/// The scheduler's plan per grant, shared with the manager for `TokenManager::status`: written
/// by the scheduler's one task, read by `status`, neither of them hot, so a plain lock.
pub(crate) type Plans = Mutex<HashMap<TokenKey, Planned>>;

/// The scheduler's plan for one grant, as `TokenManager::status` shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planned {
    pub(crate) at: SystemTime,
    pub(crate) kind: NextRefresh,
    pub(crate) warning: Option<SystemTime>,
}

const MINUTE: Duration = Duration::from_secs(60);
/// Looks at a grant whose record keeps changing under a warning being recorded.
const CAS_ATTEMPTS: usize = 4;

impl Scheduler {
    /// The plan shared with the manager (never held across an `await`).
    fn plans(&self) -> MutexGuard<'_, HashMap<TokenKey, Planned>> {
        self.planned.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let clock = self.inner.clock.clone();
        let mut next_rescan = clock.now();
        loop {
            let now = clock.now();
            if now >= next_rescan {
                self.rescan(now).await;
                next_rescan = later(now, self.config.rescan_interval);
            }
            let blocked_until = self.start_due(now).await;
            let _ = self.progress.send(Progress {
                as_of: Some(now),
                scheduled: self.plans().len(),
                in_flight: self.in_flight.len(),
                started: self.started,
                // Due checks left over wait for the rate window (clock time) or for a refresh
                // in flight: either way nothing more can happen until one of those moves.
                idle: self.in_flight.is_empty(),
                stopped: false,
            });
            // Wake for the next check, the end of a rate-limit window or the next rescan —
            // never sooner than the floor, so no state can make this loop spin.
            let mut wake = next_rescan;
            match blocked_until {
                Blocked::No => {}
                Blocked::Until(t) => wake = wake.min(t),
                Blocked::Concurrency => {}
            }
            if !matches!(blocked_until, Blocked::Concurrency) {
                if let Some((t, _)) = self.queue.first() {
                    wake = wake.min(*t);
                }
            }
            if let Some((t, _)) = self.warn_queue.first() {
                wake = wake.min(*t);
            }
            let wake = wake.max(later(now, self.config.min_sleep));
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                message = control.recv() => match message {
                    Some(message) => self.handle(message, clock.now()).await,
                    None => break,
                },
                _ = clock.sleep_until(wake) => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
        self.progress.send_modify(|p| p.stopped = true);
        tracing::debug!("background refresher stopped");
    }

    async fn handle(&mut self, message: Control, now: SystemTime) {
        match message {
            Control::Changed(key) => {
                self.unplan(&key);
                self.unplan_warning(&key);
                if !self.in_flight.contains(&key) {
                    self.check(key, now).await;
                }
            }
            Control::Done(key) => {
                self.in_flight.remove(&key);
                self.check(key, now).await;
            }
            Control::Poke => {}
        }
    }

    /// Loads every key the scheduler does not know yet (grants added by other processes, or
    /// revived after being dead) and plans it.
    async fn rescan(&mut self, now: SystemTime) {
        let keys = match self.inner.store.keys().await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "refresher could not list grants; will rescan later");
                return;
            }
        };
        for key in keys {
            let planned = self.plans().contains_key(&key);
            if !planned && !self.in_flight.contains(&key) {
                self.check(key, now).await;
            }
        }
    }

    /// Starts the refreshes that are due, within the concurrency and rate caps.
    async fn start_due(&mut self, now: SystemTime) -> Blocked {
        // Warnings first, whatever the caps: they cost the provider nothing.
        while let Some((at, _)) = self.warn_queue.first() {
            if *at > now {
                break;
            }
            let Some((_, key)) = self.warn_queue.pop_first() else {
                break;
            };
            self.warn_planned.remove(&key);
            // A refresh in flight re-checks the grant (warning included) when it ends.
            if !self.in_flight.contains(&key) {
                self.check(key, now).await;
            }
        }
        while let Some((at, _)) = self.queue.first() {
            if *at > now {
                break;
            }
            if let Some(until) = self.rate_blocked() {
                return Blocked::Until(until);
            }
            if self.semaphore.available_permits() == 0 {
                return Blocked::Concurrency;
            }
            let Some((_, key)) = self.queue.pop_first() else {
                break;
            };
            self.plans().remove(&key);
            self.check(key, now).await;
        }
        Blocked::No
    }

    /// Decides what a grant needs now and does it: refresh, or plan the next check.
    async fn check(&mut self, key: TokenKey, now: SystemTime) {
        // A warning is recorded with the grant by compare-and-swap: when the record changed
        // meanwhile (a refresh, a peer's warning), look again.
        for _ in 0..CAS_ATTEMPTS {
            let loaded = match self.inner.store.load(&key).await {
                Ok(Some(loaded)) => {
                    // A store gone back in time must not leave this process on its newer cache.
                    self.inner.note_stored_version(&key, loaded.version);
                    loaded
                }
                Ok(None) => {
                    self.forget(&key);
                    return;
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "refresher could not load a grant");
                    let retry_at = later(now, self.config.retry_floor);
                    self.inner.emit(Event::RefreshFailed {
                        at: self.inner.clock.now(),
                        key: key.clone(),
                        error: e.into(),
                        retry_at: Some(retry_at),
                    });
                    self.plan(key, retry_at, NextRefresh::Check);
                    return;
                }
            };
            let (plan, warning) = self.decide(&key, &loaded.value, now);
            let mut warn_at = warning.at;
            if let Some(due) = warning.now {
                match self.warn(&key, &loaded, due).await {
                    Claim::Changed => continue,
                    Claim::Recorded => {}
                    // Record it when the store takes writes again.
                    Claim::Unrecorded => warn_at = Some(later(now, self.config.retry_floor)),
                }
            }
            self.apply(key, loaded.value, plan, warn_at);
            return;
        }
        let retry_at = later(now, self.config.retry_floor);
        self.plan(key, retry_at, NextRefresh::Check);
    }

    /// Sends (or only records) an expiry warning.
    async fn warn(
        &mut self,
        key: &TokenKey,
        loaded: &Versioned<GrantRecord>,
        due: Warning,
    ) -> Claim {
        let sent_at = self.inner.clock.now();
        let mut record = loaded.value.clone();
        record.rare_mut().warned = Some(ExpiryWarning::new(due.expires, sent_at));
        let saved = match self
            .inner
            .store
            .save(key, &record, Some(loaded.version))
            .await
        {
            Ok(Cas::Saved(_)) => true,
            Ok(Cas::Conflict) => return Claim::Changed,
            Err(e) => {
                // Better twice (after a restart) than never: send it, and record it later.
                tracing::warn!(key = %key, error = %e, "refresher could not record an expiry warning");
                false
            }
        };
        if !due.record_only {
            self.warned.insert(key.clone(), due.expires);
            let (at, key, expires_at) = (sent_at, key.clone(), due.expires);
            self.inner.emit(if due.access {
                Event::AccessTokenExpiring {
                    at,
                    key,
                    expires_at,
                }
            } else {
                Event::RefreshTokenExpiring {
                    at,
                    key,
                    expires_at,
                }
            });
        }
        if saved {
            Claim::Recorded
        } else {
            Claim::Unrecorded
        }
    }

    fn apply(
        &mut self,
        key: TokenKey,
        record: GrantRecord,
        plan: Plan,
        warn_at: Option<SystemTime>,
    ) {
        match (plan, warn_at) {
            (Plan::Forget, None) => return self.forget(&key),
            // Nothing else to plan: look again when the warning is due.
            (Plan::Forget, Some(at)) => self.plan(key.clone(), at, NextRefresh::Check),
            (Plan::CheckAt(at, kind), _) => self.plan(key.clone(), at, kind),
            (Plan::Refresh, _) => {}
        }
        self.plan_warning(&key, warn_at);
        if let Plan::Refresh = plan {
            let now = self.inner.clock.now();
            if let Some(last) = self.last_attempt.get(&key) {
                let floor = later(*last, self.config.retry_floor);
                if floor > now {
                    self.plan(key, floor, NextRefresh::AfterBackoff);
                    return;
                }
            }
            self.spawn_refresh(key, record);
        }
    }

    fn decide(
        &mut self,
        key: &TokenKey,
        record: &GrantRecord,
        now: SystemTime,
    ) -> (Plan, WarnPlan) {
        let mut warning = WarnPlan::default();
        if record.dead_reason().is_some() {
            return (Plan::Forget, warning);
        }
        let tokens = record.tokens();
        let mut next: Option<(SystemTime, NextRefresh)> = None;
        let mut earliest = |t: SystemTime, kind: NextRefresh| {
            if next.is_none_or(|(n, _)| t < n) {
                next = Some((t, kind));
            }
        };

        // Warn once per known, approaching refresh-token expiry.
        if let Some(dies) = tokens.refresh_expires_at() {
            warning = self.warning(key, record, dies, false, now);
        }

        // Nothing can renew this grant: warn ahead of its expiry, look again then (when it
        // dies), and leave it alone meanwhile (no keep-alive).
        if !self.inner.provider.can_refresh(tokens) {
            // A grant the provider can renew later (a token too young to renew): look again
            // then. A time already past (the provider reads another clock) would only spin:
            // look again after a rescan interval instead.
            let renewable_at = self.inner.provider.refresh_not_before(tokens).map(|at| {
                if at > now {
                    at
                } else {
                    later(now, self.config.rescan_interval)
                }
            });
            let Some(expires) = tokens.expires_at() else {
                let plan =
                    renewable_at.map_or(Plan::Forget, |at| Plan::CheckAt(at, NextRefresh::Check));
                return (plan, warning);
            };
            if let Some(at) = renewable_at {
                earliest(at, NextRefresh::Check);
            }
            if expires <= now {
                return (Plan::Refresh, warning);
            }
            let access = self.warning(key, record, expires, true, now);
            warning.now = access.now.or(warning.now);
            warning.at = match (warning.at, access.at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            earliest(expires, NextRefresh::Check);
            let (at, kind) = next.unwrap_or((expires, NextRefresh::Check));
            return (Plan::CheckAt(at, kind), warning);
        }

        // Past a known refresh-token expiry no refresh is expected to succeed: look again when
        // the access token runs out, which is when the grant dies.
        if tokens.is_refresh_token_expired(now) {
            let plan = match tokens.expires_at() {
                Some(expires) if expires > now => Plan::CheckAt(expires, NextRefresh::Check),
                _ => Plan::Refresh,
            };
            return (plan, warning);
        }

        let used = self.inner.was_used(key);
        let mut refresh_at: Option<(SystemTime, NextRefresh)> = None;
        if let Some(expires) = tokens.expires_at() {
            let lifetime = tokens
                .issued_at()
                .and_then(|issued| expires.duration_since(issued).ok())
                .unwrap_or_default();
            let lead = self
                .config
                .lead_time
                .max(lifetime.mul_f64(self.config.lead_fraction));
            let lead = lead + lead.mul_f64(self.config.jitter * jitter_fraction(key, expires));
            // Short-lived tokens: never lead by more than half the lifetime, or every refresh
            // would be due again at once.
            let lead = if lifetime.is_zero() {
                lead
            } else {
                lead.min(lifetime / 2)
            };
            let ahead = expires.checked_sub(lead).unwrap_or(expires);
            if used || self.config.refresh_idle {
                refresh_at = Some((ahead, NextRefresh::BeforeExpiry));
            } else if ahead > now {
                // Idle now; look again then, in case it is used meanwhile.
                earliest(ahead, NextRefresh::Check);
            }
        }
        let declared = tokens
            .refresh_expiry()
            .or_else(|| self.inner.provider.refresh_expiry());
        if let Some(every) = keep_alive_for(declared, self.config.keep_alive) {
            let since = record.last_refresh().or(tokens.issued_at()).unwrap_or(now);
            let due = later(since, every);
            if refresh_at.is_none_or(|(r, _)| due < r) {
                refresh_at = Some((due, NextRefresh::KeepAlive));
            }
        }
        if let Some((mut at, mut kind)) = refresh_at {
            if let Some(not_before) = record.retry_not_before() {
                if not_before > at {
                    at = not_before;
                    kind = NextRefresh::AfterBackoff;
                }
            }
            if at <= now {
                return (Plan::Refresh, warning);
            }
            earliest(at, kind);
        }
        let plan = match next {
            Some((at, kind)) => Plan::CheckAt(at, kind),
            // Nothing will ever be due (no expiry, no keep-alive): rescans will look again.
            None => Plan::Forget,
        };
        (plan, warning)
    }

    /// Whether a warning about `expires` is due now, or when it will be: planned
    /// `expiry_warning + expiry_warning_margin` ahead, sent once per expiry (the stored record
    /// says whether it went out, from this process or another), never after the expiry itself
    /// (the grant's death is reported then).
    fn warning(
        &self,
        key: &TokenKey,
        record: &GrantRecord,
        expires: SystemTime,
        access: bool,
        now: SystemTime,
    ) -> WarnPlan {
        let mut plan = WarnPlan::default();
        if record
            .expiry_warning()
            .is_some_and(|w| w.expires_at() == expires)
            || expires <= now
        {
            return plan;
        }
        let due = Warning {
            expires,
            access,
            record_only: false,
        };
        if self.warned.get(key) == Some(&expires) {
            plan.now = Some(Warning {
                record_only: true,
                ..due
            });
            return plan;
        }
        let ahead = self.config.expiry_warning + self.config.expiry_warning_margin;
        let warn_at = expires.checked_sub(ahead).unwrap_or(SystemTime::UNIX_EPOCH);
        if warn_at <= now {
            plan.now = Some(due);
        } else {
            plan.at = Some(warn_at);
        }
        plan
    }

    /// When the per-minute cap is reached: the instant a start is allowed again.
    ///
    /// Read at the clock's current reading, not at a time a caller read earlier: a jump since
    /// (either way) must neither stretch nor skip the window.
    fn rate_blocked(&mut self) -> Option<SystemTime> {
        let now = self.inner.clock.now();
        while self
            .starts
            .front()
            .is_some_and(|t| later(*t, MINUTE) <= now || *t > later(now, MINUTE))
        {
            // Starts older than a minute leave the window; starts "in the future" mean the
            // clock was set back, and must not block the refresher for that long.
            self.starts.pop_front();
        }
        (self.starts.len() >= self.config.max_per_minute).then(|| later(self.starts[0], MINUTE))
    }

    fn spawn_refresh(&mut self, key: TokenKey, record: GrantRecord) {
        // The time the start really happens (store reads may have taken a while, and the clock
        // may have jumped since the caller read it, either way): the cap counts starts then.
        let now = self.inner.clock.now();
        // Every start respects the per-minute cap, whichever path asked for it.
        if let Some(until) = self.rate_blocked() {
            self.plan(key, until, NextRefresh::Queued);
            return;
        }
        let Ok(permit) = self.semaphore.clone().try_acquire_owned() else {
            self.plan(key, now, NextRefresh::Queued);
            return;
        };
        self.starts.push_back(now);
        self.started += 1;
        // Published at once: a start must never look later than it was.
        let started = self.started;
        self.progress.send_modify(|p| p.started = started);
        self.last_attempt.insert(key.clone(), now);
        self.in_flight.insert(key.clone());
        let inner = self.inner.clone();
        let control = self.control.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let need = Need::Scheduled {
                seen_issued_at: record.tokens().issued_at(),
            };
            // Failures are already events (and backoff) inside the refresh.
            let _ = inner.refresh_scheduled(&key, need).await;
            let _ = control.send(Control::Done(key));
        });
    }

    fn plan(&mut self, key: TokenKey, at: SystemTime, kind: NextRefresh) {
        self.unplan(&key);
        self.queue.insert((at, key.clone()));
        let warning = self.warn_planned.get(&key).copied();
        self.plans().insert(key, Planned { at, kind, warning });
    }

    fn unplan(&mut self, key: &TokenKey) {
        let planned = self.plans().remove(key);
        if let Some(planned) = planned {
            self.queue.remove(&(planned.at, key.clone()));
        }
    }

    fn plan_warning(&mut self, key: &TokenKey, at: Option<SystemTime>) {
        self.unplan_warning(key);
        if let Some(at) = at {
            self.warn_queue.insert((at, key.clone()));
            self.warn_planned.insert(key.clone(), at);
        }
        if let Some(planned) = self.plans().get_mut(key) {
            planned.warning = at;
        }
    }

    fn unplan_warning(&mut self, key: &TokenKey) {
        if let Some(at) = self.warn_planned.remove(key) {
            self.warn_queue.remove(&(at, key.clone()));
        }
    }

    fn forget(&mut self, key: &TokenKey) {
        self.unplan(key);
        self.unplan_warning(key);
        self.warned.remove(key);
        self.last_attempt.remove(key);
    }
}

/// A fraction in [0, 1) fixed for a grant's token generation: the plan made for it does not
/// move each time it is looked at, while grants issued together still spread out.
fn jitter_fraction(key: &TokenKey, expires: SystemTime) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    expires.hash(&mut hasher);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

enum Blocked {
    No,
    Until(SystemTime),
    Concurrency,
}

/// How often keep-alive refreshes a grant: from its declared idle lifetime if it has one (a
/// quarter of it, at least an hour), never for a declared fixed end, else the configured
/// interval (`None`: off).
fn keep_alive_for(
    declared: Option<crate::token::RefreshExpiry>,
    configured: Option<Duration>,
) -> Option<Duration> {
    match declared {
        Some(crate::token::RefreshExpiry::Sliding { idle }) if configured.is_some() => {
            Some((idle / 4).max(Duration::from_secs(3600)))
        }
        // A hard end no refresh moves, and no idle lifetime: nothing to keep alive.
        Some(crate::token::RefreshExpiry::Fixed) => None,
        _ => configured,
    }
}
