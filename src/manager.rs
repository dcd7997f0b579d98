//! [`TokenManager`]: the cache, single-flight refresh and save-before-return.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use tokio::sync::{broadcast, mpsc, watch};

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, InvalidationReason, Result, UnavailableCause};
use crate::event::Event;
use crate::provider::Provider;
use crate::refresher::{self, Control, RefresherConfig, RefresherHandle};
use crate::status::{GrantHealth, TokenStatus};
use crate::store::{GrantRecord, GrantState, MemoryStore, TokenStore, Version};
use crate::token::{AccessToken, TokenKey, TokenSet};

mod refresh;

/// Keeps the grants of one provider alive.
///
/// One manager serves many grants, each named by a [`TokenKey`]. Cloning is cheap and clones
/// share everything. Methods must be called inside a tokio runtime: refreshes run on spawned
/// tasks so that a caller going away never loses a rotated token.
///
/// # Concurrency and cancel safety
///
/// - [`access_token`](Self::access_token) answers from memory while the cached token is valid
///   for longer than the refresh margin: no store I/O, no lock shared between callers.
/// - When a refresh is needed, exactly one runs per grant in this process; every caller that
///   arrives meanwhile waits for it and gets its result. Across processes, the store's lock
///   (if it has one) and compare-and-swap give the same guarantee.
/// - The refresh re-reads the store first and adopts a token a peer already refreshed.
/// - The refresh and the save run on a spawned task: dropping every waiting future does not
///   stop it, and a rotated refresh token is saved before any caller sees the new access token.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: Config,
    grants: DashMap<TokenKey, Arc<Slot>>,
    events: broadcast::Sender<Event>,
    scheduler: Mutex<Option<mpsc::UnboundedSender<Control>>>,
    /// The background refresher's next check per grant, when one runs.
    planned: Mutex<Option<Arc<DashMap<TokenKey, SystemTime>>>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) refresh_margin: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) lock_ttl: Duration,
    pub(crate) save_attempts: u32,
}

/// Per-grant state in this process.
#[derive(Default)]
pub(crate) struct Slot {
    cached: ArcSwapOption<Cached>,
    /// Read by a caller since its last refresh (the refresher refreshes such grants ahead).
    used: AtomicBool,
    flight: Mutex<Option<watch::Receiver<Option<Outcome>>>>,
    /// A refreshed record whose save failed: (record, version it replaces).
    unsaved: Mutex<Option<(GrantRecord, Version)>>,
}

/// What this process knows of a grant.
pub(crate) struct Cached {
    pub(crate) tokens: Arc<TokenSet>,
    pub(crate) version: Version,
    pub(crate) dead: Option<InvalidationReason>,
    pub(crate) retry_not_before: Option<SystemTime>,
    pub(crate) last_error: Option<Error>,
    pub(crate) last_failure: Option<crate::store::StoredFailure>,
}

pub(crate) type Outcome = Result<Arc<TokenSet>>;

/// Why a refresh is wanted; decides whether a peer's token can be adopted instead.
#[derive(Debug, Clone)]
pub(crate) enum Need {
    /// The token is expired or within the margin.
    Expiring,
    /// The API rejected this access token.
    Rejected(AccessToken),
    /// The application asked for a refresh.
    Forced,
    /// The background refresher planned one after seeing tokens issued at this time.
    Scheduled { seen_issued_at: Option<SystemTime> },
}

impl TokenManager {
    /// Starts building a manager that refreshes through `provider`.
    pub fn builder(provider: impl Provider) -> TokenManagerBuilder {
        TokenManagerBuilder {
            provider: Arc::new(provider),
            store: None,
            clock: None,
            config: Config {
                refresh_margin: Duration::from_secs(60),
                backoff_base: Duration::from_secs(5),
                backoff_max: Duration::from_secs(15 * 60),
                lock_ttl: Duration::from_secs(60),
                save_attempts: 3,
            },
            event_capacity: 1024,
        }
    }

    /// A valid access token for `key`, refreshing first if it expires within the margin.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if no grant is stored under `key`;
    /// [`Error::ReauthorizationRequired`] if the grant is dead; [`Error::RateLimited`] or
    /// [`Error::Unavailable`] if a refresh was needed and failed and the current token has
    /// expired (a still-valid token is served during backoff); [`Error::Misconfigured`];
    /// [`Error::Store`].
    pub async fn access_token(&self, key: &TokenKey) -> Result<AccessToken> {
        if let Some(token) = self.inner.fresh(key, |t| t.access_token().clone()) {
            return Ok(token);
        }
        Ok(self
            .token_slow(key, Need::Expiring)
            .await?
            .access_token()
            .clone())
    }

    /// Like [`access_token`](Self::access_token), with the whole [`TokenSet`].
    pub async fn token(&self, key: &TokenKey) -> Result<Arc<TokenSet>> {
        if let Some(tokens) = self.inner.fresh(key, Arc::clone) {
            return Ok(tokens);
        }
        self.token_slow(key, Need::Expiring).await
    }

    /// Refreshes now, unless the grant is in backoff or dead. Joins a refresh already in
    /// flight instead of starting a second one.
    pub async fn refresh_now(&self, key: &TokenKey) -> Result<Arc<TokenSet>> {
        self.token_slow(key, Need::Forced).await
    }

    /// Reports that the API rejected `failed` (for example with `401 invalid_token`) and returns
    /// a token to retry with.
    ///
    /// Refreshes once per token generation: however many requests failed with `failed`, one
    /// refresh runs, and callers that report an already-replaced token get the current one.
    pub async fn invalidate(&self, key: &TokenKey, failed: &AccessToken) -> Result<AccessToken> {
        let now = self.inner.clock.now();
        if let Some(token) = self.inner.cached(key).and_then(|c| {
            (c.dead.is_none() && c.tokens.access_token() != failed && !c.tokens.is_expired(now))
                .then(|| c.tokens.access_token().clone())
        }) {
            return Ok(token);
        }
        Ok(self
            .token_slow(key, Need::Rejected(failed.clone()))
            .await?
            .access_token()
            .clone())
    }

    /// Stores a new grant for `key` (from an OAuth callback, or copied from a dashboard),
    /// replacing any previous one, dead or alive.
    pub async fn insert(&self, key: TokenKey, mut tokens: TokenSet) -> Result<()> {
        if tokens.issued_at().is_none() {
            tokens = tokens.with_issued_at(self.inner.clock.now());
        }
        let record = GrantRecord::new(tokens);
        loop {
            let current = self.inner.store.load(&key).await?;
            let was_dead = current
                .as_ref()
                .is_some_and(|c| c.value.dead_reason().is_some());
            let expected = current.map(|c| c.version);
            if let crate::store::Cas::Saved(version) =
                self.inner.store.save(&key, &record, expected).await?
            {
                let slot = self.inner.slot(&key);
                *slot.unsaved.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.inner.cache(&slot, &record, version, None);
                self.inner.notify_scheduler(&key);
                if was_dead {
                    self.inner.emit(Event::Recovered { key });
                }
                return Ok(());
            }
        }
    }

    /// Deletes the grant for `key`. Returns whether there was one.
    pub async fn remove(&self, key: &TokenKey) -> Result<bool> {
        let removed = self.inner.store.delete(key).await?;
        self.inner.grants.remove(key);
        self.inner.notify_scheduler(key);
        Ok(removed)
    }

    /// Disconnects the grant: revokes it at the provider (RFC 7009, through
    /// [`Provider::revoke`]), then deletes it. Returns whether there was a grant.
    ///
    /// Runs under the store's refresh lock, so no refresh of the grant races the revocation.
    /// A dead grant is deleted without a provider call.
    ///
    /// # Errors
    ///
    /// If the provider refuses or cannot be reached, the grant is kept and the classified
    /// error is returned, so the app can retry (or call [`remove`](Self::remove) to forget the
    /// grant without revoking it).
    pub async fn disconnect(&self, key: &TokenKey) -> Result<bool> {
        let inner = &self.inner;
        let lock = inner.store.lock(key, inner.config.lock_ttl).await?;
        let result = async {
            let Some(loaded) = inner.store.load(key).await? else {
                return Ok(false);
            };
            if loaded.value.dead_reason().is_none() {
                let request = crate::provider::RefreshRequest::new(
                    key,
                    &loaded.value.tokens,
                    inner.clock.now(),
                );
                inner
                    .provider
                    .revoke(request)
                    .await
                    .map_err(|e| e.into_error(key))?;
            }
            let removed = inner.store.delete(key).await?;
            inner.grants.remove(key);
            inner.notify_scheduler(key);
            Ok(removed)
        }
        .await;
        if let Some(lock) = lock {
            let _ = lock.release().await;
        }
        result
    }

    /// The grant's state, expiries, last refresh, next refresh and last error.
    pub async fn status(&self, key: &TokenKey) -> Result<TokenStatus> {
        let Some(loaded) = self.inner.store.load(key).await? else {
            return Err(Error::NotFound { key: key.clone() });
        };
        let mut status = TokenStatus::from_record(
            key.clone(),
            &loaded.value,
            self.inner.clock.now(),
            self.inner.config.refresh_margin,
        );
        let planned = self
            .inner
            .planned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(at) = planned.and_then(|p| p.get(key).map(|at| *at)) {
            if !status.needs_reauthorization() {
                status.next_refresh = Some(at);
            }
        }
        Ok(status)
    }

    /// Every stored grant that needs a human to re-authorize, with the reason.
    pub async fn reauthorization_required(&self) -> Result<Vec<(TokenKey, InvalidationReason)>> {
        let mut dead = Vec::new();
        for key in self.inner.store.keys().await? {
            if let Some(loaded) = self.inner.store.load(&key).await? {
                if let Some(reason) = loaded.value.dead_reason() {
                    dead.push((key, reason.clone()));
                }
            }
        }
        dead.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(dead)
    }

    /// Receives [`Event`]s from now on. A receiver that falls more than the channel capacity
    /// behind loses the oldest events (and is told so by `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Starts the background refresher: one task that refreshes every grant of this manager
    /// ahead of expiry and keeps idle grants alive (see [`RefresherConfig`]). Start one per
    /// manager; it runs until [`RefresherHandle::shutdown`] or until the handle is dropped.
    pub fn start_refresher(&self, config: RefresherConfig) -> RefresherHandle {
        refresher::start(self.inner.clone(), config)
    }

    pub(crate) fn emit(&self, event: Event) {
        self.inner.emit(event);
    }

    /// The clock this manager computes expiries with.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    async fn token_slow(&self, key: &TokenKey, need: Need) -> Result<Arc<TokenSet>> {
        let inner = &self.inner;
        let slot = inner.slot(key);
        if !matches!(need, Need::Scheduled { .. }) {
            slot.used.store(true, Ordering::Relaxed);
        }
        let cached = match slot.cached.load_full() {
            Some(c) if c.dead.is_none() => c,
            // Unknown here, or dead: read the store (a new grant may have been inserted by
            // another process).
            _ => inner.load(key, &slot).await?,
        };
        if let Some(reason) = &cached.dead {
            return Err(Error::ReauthorizationRequired {
                key: key.clone(),
                reason: reason.clone(),
            });
        }
        let now = inner.clock.now();
        if need.satisfied_by(&cached.tokens, now, inner.config.refresh_margin) {
            return Ok(cached.tokens.clone());
        }
        if let Some(held) = cached.held_by_backoff(key, &need, now) {
            return held;
        }
        inner.refresh_shared(key, slot, need).await
    }
}

impl Need {
    fn satisfied_by(&self, tokens: &TokenSet, now: SystemTime, margin: Duration) -> bool {
        match self {
            Need::Expiring => tokens.is_fresh(now, margin),
            Need::Rejected(failed) => tokens.access_token() != failed && !tokens.is_expired(now),
            Need::Forced => false,
            // A peer refreshed since the refresher looked.
            Need::Scheduled { seen_issued_at } => match (tokens.issued_at(), seen_issued_at) {
                (Some(now_issued), Some(seen)) => now_issued > *seen,
                (Some(_), None) => true,
                (None, _) => false,
            },
        }
    }
}

impl Cached {
    /// During backoff no refresh is sent: serve a still-valid token, or the last error.
    pub(crate) fn held_by_backoff(
        &self,
        key: &TokenKey,
        need: &Need,
        now: SystemTime,
    ) -> Option<Result<Arc<TokenSet>>> {
        let until = self.retry_not_before.filter(|t| *t > now)?;
        let usable = match need {
            Need::Expiring => !self.tokens.is_expired(now),
            Need::Rejected(_) | Need::Forced | Need::Scheduled { .. } => false,
        };
        if usable {
            return Some(Ok(self.tokens.clone()));
        }
        let wait = until.duration_since(now).unwrap_or_default();
        let error = match (&self.last_error, &self.last_failure) {
            (Some(e), _) => e.clone().with_retry_after(wait),
            (None, Some(failure)) => failure.to_error(key).with_retry_after(wait),
            (None, None) => Error::Unavailable {
                key: key.clone(),
                cause: UnavailableCause::Backoff,
                status: None,
                retry_after: Some(wait),
                source: None,
            },
        };
        Some(Err(error))
    }
}

impl Inner {
    /// The fast path: a cached, live token valid beyond the margin.
    fn fresh<T>(&self, key: &TokenKey, f: impl FnOnce(&Arc<TokenSet>) -> T) -> Option<T> {
        let slot = self.grants.get(key)?;
        if !slot.used.load(Ordering::Relaxed) {
            slot.used.store(true, Ordering::Relaxed);
        }
        let cached = slot.cached.load();
        let cached = cached.as_ref()?;
        (cached.dead.is_none()
            && cached
                .tokens
                .is_fresh(self.clock.now(), self.config.refresh_margin))
        .then(|| f(&cached.tokens))
    }

    fn cached(&self, key: &TokenKey) -> Option<Arc<Cached>> {
        self.grants.get(key)?.cached.load_full()
    }

    pub(crate) fn slot(&self, key: &TokenKey) -> Arc<Slot> {
        if let Some(slot) = self.grants.get(key) {
            return slot.clone();
        }
        self.grants.entry(key.clone()).or_default().clone()
    }

    /// Loads the grant from the store into the cache.
    async fn load(&self, key: &TokenKey, slot: &Slot) -> Result<Arc<Cached>> {
        match self.store.load(key).await? {
            None => {
                slot.cached.store(None);
                // Lookups of keys that do not exist must not grow the map.
                self.grants.remove_if(key, |_, s| s.cached.load().is_none());
                Err(Error::NotFound { key: key.clone() })
            }
            Some(loaded) => Ok(self.cache(slot, &loaded.value, loaded.version, None)),
        }
    }

    /// Replaces the cached view of a grant with `record` at `version`, unless the cache
    /// already holds a newer version.
    pub(crate) fn cache(
        &self,
        slot: &Slot,
        record: &GrantRecord,
        version: Version,
        last_error: Option<Error>,
    ) -> Arc<Cached> {
        let last_error = last_error.or_else(|| {
            slot.cached
                .load()
                .as_ref()
                .filter(|c| c.version == version)
                .and_then(|c| c.last_error.clone())
        });
        let fresh = Arc::new(Cached {
            tokens: Arc::new(record.tokens.clone()),
            version,
            dead: record.dead_reason().cloned(),
            retry_not_before: record.retry_not_before,
            last_error,
            last_failure: record.last_failure.clone(),
        });
        let previous = slot.cached.rcu(|current| match current {
            Some(c) if c.version > version => Some(c.clone()),
            _ => Some(fresh.clone()),
        });
        match previous {
            Some(c) if c.version > version => c,
            _ => fresh,
        }
    }

    /// Whether a caller read this grant since its last refresh.
    pub(crate) fn was_used(&self, key: &TokenKey) -> bool {
        self.grants
            .get(key)
            .is_some_and(|slot| slot.used.load(Ordering::Relaxed))
    }

    pub(crate) fn set_scheduler(
        &self,
        control: mpsc::UnboundedSender<Control>,
        planned: Arc<DashMap<TokenKey, SystemTime>>,
    ) {
        *self.scheduler.lock().unwrap_or_else(|e| e.into_inner()) = Some(control);
        *self.planned.lock().unwrap_or_else(|e| e.into_inner()) = Some(planned);
    }

    fn notify_scheduler(&self, key: &TokenKey) {
        if let Some(control) = &*self.scheduler.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = control.send(Control::Changed(key.clone()));
        }
    }

    /// A refresh planned by the background refresher.
    pub(crate) async fn refresh_scheduled(self: &Arc<Self>, key: &TokenKey, need: Need) -> Outcome {
        let slot = self.slot(key);
        self.refresh_shared(key, slot, need).await
    }

    pub(crate) fn emit(&self, event: Event) {
        // No receiver is not an error: events are optional.
        let _ = self.events.send(event);
    }

    /// Joins the refresh in flight for `key`, or starts one on a spawned task.
    async fn refresh_shared(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: Arc<Slot>,
        need: Need,
    ) -> Outcome {
        let mut rx = {
            let mut flight = slot.flight.lock().unwrap_or_else(|e| e.into_inner());
            match &*flight {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *flight = Some(rx.clone());
                    let inner = self.clone();
                    let key = key.clone();
                    let slot = slot.clone();
                    tokio::spawn(async move {
                        // Clears the flight even if the provider panics, so the grant is not
                        // stuck; waiters then see the channel close.
                        let guard = FlightGuard(&slot);
                        let outcome = inner.run_refresh(&key, &slot, need).await;
                        drop(guard);
                        let _ = tx.send(Some(outcome));
                    });
                    rx
                }
            }
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        result.unwrap_or_else(|| {
            Err(Error::Unavailable {
                key: key.clone(),
                cause: UnavailableCause::Internal,
                status: None,
                retry_after: None,
                source: None,
            })
        })
    }
}

struct FlightGuard<'a>(&'a Slot);

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        *self.0.flight.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenManager")
            .field("grants_cached", &self.inner.grants.len())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`TokenManager`].
pub struct TokenManagerBuilder {
    provider: Arc<dyn Provider>,
    store: Option<Arc<dyn TokenStore>>,
    clock: Option<Arc<dyn Clock>>,
    config: Config,
    event_capacity: usize,
}

impl fmt::Debug for TokenManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenManagerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenManagerBuilder {
    /// Where grants are kept (default: a new [`MemoryStore`]). Pass an `Arc` to share a store.
    pub fn store(mut self, store: impl TokenStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The clock for expiry math (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Refresh when the access token has less than this left (default 60 s).
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.config.refresh_margin = margin;
        self
    }

    /// Backoff after a failed refresh: `base` doubling per consecutive failure up to `max`,
    /// with jitter; a provider's `Retry-After` wins when longer (defaults 5 s and 15 min).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base;
        self.config.backoff_max = max.max(base);
        self
    }

    /// How long a crashed process can hold a store's cross-process refresh lock (default 60 s).
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.config.lock_ttl = ttl;
        self
    }

    /// How many events a slow subscriber may fall behind before losing the oldest
    /// (default 1024).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Builds the manager.
    pub fn build(self) -> TokenManager {
        let (events, _) = broadcast::channel(self.event_capacity);
        TokenManager {
            inner: Arc::new(Inner {
                provider: self.provider,
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
                config: self.config,
                grants: DashMap::new(),
                events,
                scheduler: Mutex::new(None),
                planned: Mutex::new(None),
            }),
        }
    }
}

impl GrantHealth {
    pub(crate) fn of(record: &GrantRecord, now: SystemTime) -> Self {
        match &record.state {
            GrantState::ReauthorizationRequired { reason, since } => {
                GrantHealth::ReauthorizationRequired {
                    reason: reason.clone(),
                    since: *since,
                }
            }
            GrantState::Active => match record.retry_not_before {
                Some(until) if until > now => GrantHealth::BackingOff { until },
                _ => GrantHealth::Active,
            },
        }
    }
}
