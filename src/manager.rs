//! [`TokenManager`]: the cache, single-flight refresh and save-before-return.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::{broadcast, mpsc, watch};

use crate::clock::{epoch_nanos, Clock, SystemClock};
use crate::error::{ConfigProblem, Error, InvalidationReason, Result, UnavailableCause};
use crate::event::{Event, EventStream};
use crate::provider::Provider;
use crate::refresher::{self, Control, RefresherConfig, RefresherHandle};
use crate::status::{GrantHealth, GrantPage, Page, TokenStatus};
use crate::store::{GrantRecord, GrantState, MemoryStore, TokenStore, Version};
use crate::token::{AccessToken, TokenKey, TokenSet};

mod refresh;
mod slots;

pub(crate) use refresh::later;

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
///   arrives meanwhile waits for it and gets its result. Across processes, the store's refresh
///   lock gives the same guarantee. Compare-and-swap alone (a store without a lock) only keeps
///   a late save from overwriting a newer record: it cannot stop two processes from presenting
///   the same refresh token, which a provider with strict rotation may punish by revoking the
///   grant.
/// - Every provider call is bounded by the [refresh timeout](TokenManagerBuilder::refresh_timeout)
///   and runs on its own task, so a hanging or panicking provider answers every waiter with a
///   typed error and backs the grant off.
/// - A rotated refresh token is never dropped: if the store will not take it, it is held in
///   memory, retried in the background, and saved before anything else happens to the grant.
///   [`drain`](Self::drain) waits for that (and for refreshes in flight) before an exit.
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
    /// `clock` is the default [`SystemClock`]: the fast path reads the coarse clock straight
    /// as nanoseconds, without the `SystemTime` arithmetic (a third of its time).
    system_clock: bool,
    pub(crate) config: Config,
    /// This process's state of each grant it has seen, by key (lock-free reads).
    grants: slots::Slots,
    events: broadcast::Sender<Event>,
    scheduler: Mutex<Option<mpsc::UnboundedSender<Control>>>,
    /// The background refresher's next check per grant, when one runs.
    planned: Mutex<Option<Arc<crate::refresher::Plans>>>,
    /// Refreshes in flight plus records held unsaved; [`TokenManager::drain`] waits for zero.
    /// Changed through `busy_add` and `busy_done`, which wake the waiters only when it
    /// reaches zero (a wake-up of every waiter shard per change cost two per refresh).
    busy: watch::Sender<usize>,
    /// Whether the missing cross-process lock was already reported.
    warned_no_lock: AtomicBool,
    /// Identifies pending records, so a stale reconcile never clears a newer one.
    pending_ids: AtomicU64,
    /// Metric state (zero-sized without the `metrics` feature).
    pub(crate) metrics: crate::metrics::Metrics,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) refresh_margin: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) lock_ttl: Duration,
    pub(crate) save_attempts: u32,
    pub(crate) refresh_timeout: Duration,
    pub(crate) fallback_lifetime: Duration,
}

/// Per-grant state in this process.
#[derive(Default)]
pub(crate) struct Slot {
    cached: ArcSwapOption<Cached>,
    /// Read by a caller since its last refresh (the refresher refreshes such grants ahead).
    used: AtomicBool,
    /// Removed from the manager's map (the grant was removed): a `GrantHandle` holding it
    /// reads through the manager instead.
    detached: AtomicBool,
    /// The refresh in flight, if any (boxed: a receiver is 16 bytes, a slot without a refresh
    /// keeps a pointer).
    flight: Mutex<Option<Box<watch::Receiver<Option<Outcome>>>>>,
    /// A record this process must still save: rotated tokens or a death the store refused.
    /// (This and the other rare states below are boxed: a slot stays small.)
    pending: Mutex<Option<Box<Pending>>>,
    /// A background task is retrying the save of `pending`.
    persisting: AtomicBool,
    /// What this process alone knows of the grant's failures (see [`Rare`]); `None` while
    /// there is nothing, as for most grants.
    rare: Mutex<Option<Box<Rare>>>,
}

/// The rare per-grant state of a [`Slot`], behind one lock and one allocation.
#[derive(Default)]
pub(crate) struct Rare {
    /// Backoff caused by this process alone (its configuration, its network): never shared
    /// through the store, so it cannot hold back correctly configured peers.
    pub(crate) local: Option<LocalHold>,
    /// A refresh token the provider refused whose death the store could not be asked to
    /// record (it changed, then failed): never presented again.
    pub(crate) refused: Option<(crate::token::RefreshToken, InvalidationReason)>,
    /// A refresh token whose reply this process may have lost (a timeout, a dropped
    /// connection): if the provider later refuses it, the rotation was lost, even when the store
    /// never took the fact (a conflict or an error when it was saved).
    pub(crate) lost_reply: Option<crate::token::RefreshToken>,
    /// The last failure handled here: its clock time and its monotonic instant, so a wall
    /// clock set back cannot end (or stretch) the backoff it started.
    pub(crate) failure_mono: Option<(SystemTime, tokio::time::Instant)>,
}

impl Rare {
    const NONE: Rare = Rare {
        local: None,
        refused: None,
        lost_reply: None,
        failure_mono: None,
    };

    fn is_empty(&self) -> bool {
        self.local.is_none()
            && self.refused.is_none()
            && self.lost_reply.is_none()
            && self.failure_mono.is_none()
    }
}

impl Slot {
    /// Reads the rare state (no allocation when there is none).
    pub(crate) fn rare<R>(&self, f: impl FnOnce(&Rare) -> R) -> R {
        static NONE: Rare = Rare::NONE;
        let guard = self.rare.lock().unwrap_or_else(|e| e.into_inner());
        f(guard.as_deref().unwrap_or(&NONE))
    }

    /// Updates the rare state: allocated when first needed, freed when it is empty again.
    pub(crate) fn rare_mut<R>(&self, f: impl FnOnce(&mut Rare) -> R) -> R {
        let mut guard = self.rare.lock().unwrap_or_else(|e| e.into_inner());
        let rare = guard.get_or_insert_with(Box::default);
        let result = f(rare);
        if rare.is_empty() {
            *guard = None;
        }
        result
    }

    /// Updates the rare state only if there is some: a healthy grant (no rare state) costs
    /// neither an allocation nor a free. For updates that only clear.
    pub(crate) fn rare_clear(&self, f: impl FnOnce(&mut Rare)) {
        let mut guard = self.rare.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rare) = guard.as_mut() {
            f(rare);
            if rare.is_empty() {
                *guard = None;
            }
        }
    }
}

/// A record that must reach the store before anything else happens to the grant.
#[derive(Clone)]
pub(crate) struct Pending {
    pub(crate) id: u64,
    pub(crate) record: GrantRecord,
    /// The version it was computed from.
    pub(crate) base: Version,
    /// The refresh token it replaces: while the store still holds this one, the pending record
    /// is newer than the store's.
    pub(crate) spent: Option<crate::token::RefreshToken>,
}

/// A backoff kept in this process only.
#[derive(Clone)]
pub(crate) struct LocalHold {
    pub(crate) until: SystemTime,
    pub(crate) since: SystemTime,
    pub(crate) mono: tokio::time::Instant,
    pub(crate) failures: u32,
    pub(crate) error: Error,
}

/// What this process knows of a grant.
pub(crate) struct Cached {
    pub(crate) tokens: Arc<TokenSet>,
    /// `tokens`' access token, one pointer hop closer for the fast path.
    pub(crate) access: AccessToken,
    /// The fast path's whole test, computed once: the tokens are served from memory while the
    /// clock reads less than this (nanoseconds since the epoch; the access expiry less the
    /// refresh margin; 0 for a dead grant, `u64::MAX` for tokens that never expire).
    pub(crate) fresh_before: u64,
    pub(crate) version: Version,
    /// Death, backoff and the last failure: rare, so boxed (`None` for a healthy grant keeps
    /// the entry of each of 100,000 grants small).
    trouble: Option<Box<Trouble>>,
}

/// The rare part of a [`Cached`].
#[derive(Default)]
struct Trouble {
    dead: Option<InvalidationReason>,
    retry_not_before: Option<SystemTime>,
    /// When the backoff started (to keep a clock set back from stretching it).
    failed_at: Option<SystemTime>,
    /// The monotonic instant of that failure, when it was handled in this process.
    failed_mono: Option<tokio::time::Instant>,
    /// A backoff kept in this process only (see [`LocalHold`]).
    local: Option<LocalHold>,
    last_error: Option<Error>,
    last_failure: Option<crate::store::StoredFailure>,
}

impl Trouble {
    const NONE: Trouble = Trouble {
        dead: None,
        retry_not_before: None,
        failed_at: None,
        failed_mono: None,
        local: None,
        last_error: None,
        last_failure: None,
    };

    fn is_none(&self) -> bool {
        self.dead.is_none()
            && self.retry_not_before.is_none()
            && self.failed_at.is_none()
            && self.failed_mono.is_none()
            && self.local.is_none()
            && self.last_error.is_none()
            && self.last_failure.is_none()
    }
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
    /// Only save a pending record (no provider call).
    Persist,
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
                refresh_timeout: Duration::from_secs(20),
                fallback_lifetime: Duration::from_secs(3600),
            },
            problems: Vec::new(),
            event_capacity: 1024,
            metrics_key_label: false,
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
        if let Some(token) = self.inner.fresh(key, |c| c.access.clone()) {
            self.inner.metrics.cache(true);
            return Ok(token);
        }
        self.inner.metrics.cache(false);
        // Boxed: the slow path's future is kilobytes, and every caller's future would carry it
        // (10,000 tasks waiting on one refresh copied 25 MB into their task cells).
        Ok(Box::pin(self.token_slow(key, Need::Expiring))
            .await?
            .access_token()
            .clone())
    }

    /// Lends the access token to `f` instead of returning a clone of it: on the fast path (a
    /// cached, valid token) nothing is cloned or allocated. Otherwise as
    /// [`access_token`](Self::access_token), then `f` on the result.
    ///
    /// ```
    /// # async fn run(manager: tokenkeeper::TokenManager, key: tokenkeeper::TokenKey) -> tokenkeeper::Result<()> {
    /// let header = manager
    ///     .with_access_token(&key, |token| format!("Bearer {}", token.secret()))
    ///     .await?;
    /// # let _ = header; Ok(()) }
    /// ```
    pub async fn with_access_token<R>(
        &self,
        key: &TokenKey,
        f: impl FnOnce(&AccessToken) -> R,
    ) -> Result<R> {
        // The cache entry is lent (not cloned) by its guard, which outlives the map's: `f`
        // runs outside the map's guard, and may call the manager.
        let fresh = self
            .inner
            .grants
            .with(key, |slot| self.inner.fresh_guard(slot))
            .flatten();
        if let Some(cached) = fresh.as_ref().and_then(|guard| guard.as_ref()) {
            self.inner.metrics.cache(true);
            return Ok(f(&cached.access));
        }
        self.inner.metrics.cache(false);
        let tokens = Box::pin(self.token_slow(key, Need::Expiring)).await?;
        Ok(f(tokens.access_token()))
    }

    /// A handle on one grant, cheap to clone and to keep: its calls skip the lookup of `key`
    /// that every [`access_token`](Self::access_token) does (the fastest way to read a grant an
    /// application uses often: one per tenant, say).
    ///
    /// The grant need not exist yet; the handle answers as the manager would
    /// ([`Error::NotFound`] until it is inserted). A handle taken before the grant was
    /// [removed](Self::remove) still answers correctly, through the manager's lookup: take a
    /// new one to get the fast path back.
    ///
    /// ```
    /// # async fn run(manager: tokenkeeper::TokenManager) -> tokenkeeper::Result<()> {
    /// let grant = manager.grant(&tokenkeeper::TokenKey::from("tenant-42"));
    /// let token = grant.access_token().await?;
    /// # let _ = token; Ok(()) }
    /// ```
    pub fn grant(&self, key: &TokenKey) -> GrantHandle {
        GrantHandle {
            manager: self.clone(),
            slot: self.inner.slot(key),
            key: key.clone(),
        }
    }

    /// Like [`access_token`](Self::access_token), with the whole [`TokenSet`].
    pub async fn token(&self, key: &TokenKey) -> Result<Arc<TokenSet>> {
        if let Some(tokens) = self.inner.fresh(key, |c| c.tokens.clone()) {
            self.inner.metrics.cache(true);
            return Ok(tokens);
        }
        self.inner.metrics.cache(false);
        Box::pin(self.token_slow(key, Need::Expiring)).await
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
            (c.dead().is_none() && c.tokens.access_token() != failed && !c.tokens.is_expired(now))
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
    ///
    /// Idempotent: inserting the same tokens again (a retry after a timeout, say) while the
    /// grant they started is alive changes nothing, even if it was refreshed since, so a
    /// retried insert never puts back a refresh token the provider has spent.
    pub async fn insert(&self, key: TokenKey, mut tokens: TokenSet) -> Result<()> {
        if tokens.issued_at().is_none() {
            tokens = tokens.with_issued_at(self.inner.clock.now());
        }
        if tokens.refresh_expiry().is_none() {
            if let Some(declared) = self.inner.provider.refresh_expiry() {
                tokens = tokens.with_refresh_expiry(declared);
            }
        }
        let mut record = GrantRecord::new(tokens);
        record.origin = Some(record.tokens.origin());
        loop {
            let current = self.inner.store.load(&key).await?;
            if let Some(current) = current
                .as_ref()
                .filter(|c| c.value.origin == record.origin && c.value.dead_reason().is_none())
            {
                // This very grant was inserted already (a retry after an ambiguous failure)
                // and may have been refreshed since: writing it again would put back a
                // refresh token the provider has spent.
                let slot = self.inner.slot(&key);
                self.inner
                    .cache(&slot, &current.value, current.version, None, false);
                self.inner.observe_health(&key, &slot);
                return Ok(());
            }
            let was_dead = current
                .as_ref()
                .is_some_and(|c| c.value.dead_reason().is_some());
            let expected = current.map(|c| c.version);
            if let crate::store::Cas::Saved(version) =
                self.inner.store.save(&key, &record, expected).await?
            {
                let slot = self.inner.slot(&key);
                self.inner.clear_pending(&slot, None);
                slot.rare_clear(|r| r.local = None);
                self.inner.cache(&slot, &record, version, None, true);
                self.inner.observe_health(&key, &slot);
                self.inner.notify_scheduler(&key);
                if was_dead {
                    self.inner.emit(Event::Recovered {
                        key,
                        at: self.inner.clock.now(),
                    });
                }
                return Ok(());
            }
        }
    }

    /// Deletes the grant for `key`. Returns whether there was one.
    pub async fn remove(&self, key: &TokenKey) -> Result<bool> {
        let removed = self.inner.store.delete(key).await?;
        self.inner.forget(key);
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
            inner.forget(key);
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
        Ok(self.status_of(key, &loaded.value))
    }

    /// [`status`](Self::status) of a record just loaded.
    fn status_of(&self, key: &TokenKey, record: &GrantRecord) -> TokenStatus {
        let mut status = TokenStatus::from_record(
            key.clone(),
            record,
            self.inner.clock.now(),
            self.inner.config.refresh_margin,
        );
        let planned = self
            .inner
            .planned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let plan = planned.and_then(|p| {
            p.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .copied()
        });
        if let Some(plan) = plan {
            if !status.needs_reauthorization() {
                status.next_refresh = Some(plan.at);
                status.next_refresh_kind = Some(plan.kind);
                status.next_expiry_warning = plan.warning;
            }
        }
        // A backoff this process keeps to itself (see `TokenManagerBuilder::refresh_timeout`
        // and the misconfiguration rules) shows here too.
        self.inner.grants.with(key, |slot| {
            let local = slot.rare(|r| r.local.clone());
            let now = self.inner.clock.now();
            if let Some(local) = local.filter(|l| l.until > now) {
                if matches!(status.health, GrantHealth::Active)
                    || matches!(status.health, GrantHealth::BackingOff { until } if until < local.until)
                {
                    status.health = GrantHealth::BackingOff { until: local.until };
                    status.next_refresh = Some(local.until);
                    status.next_refresh_kind = Some(crate::status::NextRefresh::AfterBackoff);
                    status.last_error = Some(local.error.to_string());
                }
            }
            // A death held in memory while the store is down.
            if let Some(pending) = &*slot.pending.lock().unwrap_or_else(|e| e.into_inner()) {
                if let GrantState::ReauthorizationRequired { reason, since } =
                    pending.record.state()
                {
                    status.health = GrantHealth::ReauthorizationRequired {
                        reason: reason.clone(),
                        since: *since,
                    };
                    status.next_refresh = None;
                    status.next_refresh_kind = None;
                    status.next_expiry_warning = None;
                }
            }
            status.refreshing = slot
                .flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
        });
        status
    }

    /// One page of every stored grant with its [`status`](Self::status), in key order: for an
    /// admin page or a health check. Read page after page with [`GrantPage::next`]; the store
    /// lists keys a page at a time ([`TokenStore::keys_after`]), so a store with many grants
    /// is never read whole.
    ///
    /// Grants inserted or removed meanwhile may be missed or seen; none is listed twice.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenkeeper::{provider_fn, AccessToken, GrantHealth, Page, TokenKey, TokenManager,
    ///     TokenResponse, TokenSet};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let provider = provider_fn(|_key, _tokens| async {
    /// #     Ok(TokenResponse::new(AccessToken::new("fresh")))
    /// # });
    /// let manager = TokenManager::builder(provider).build();
    /// for name in ["a", "b", "c"] {
    ///     let tokens = TokenSet::new(AccessToken::new(name))
    ///         .with_expires_at(SystemTime::now() + Duration::from_secs(3600));
    ///     manager.insert(TokenKey::from(name), tokens).await?;
    /// }
    ///
    /// let mut page = Some(Page::first(2));
    /// let mut seen = Vec::new();
    /// while let Some(this) = page {
    ///     let listing = manager.grants(this).await?;
    ///     for status in &listing.grants {
    ///         match &status.health {
    ///             GrantHealth::ReauthorizationRequired { reason, .. } => {
    ///                 println!("{:<12} dead: {reason}", status.key)
    ///             }
    ///             GrantHealth::BackingOff { until } => {
    ///                 println!("{:<12} backing off until {until:?}", status.key)
    ///             }
    ///             _ => println!("{:<12} healthy", status.key),
    ///         }
    ///         seen.push(status.key.to_string());
    ///     }
    ///     page = listing.next;
    /// }
    /// assert_eq!(seen, ["a", "b", "c"]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the store cannot list or load (a record it cannot decode included:
    /// a health check should see that).
    pub async fn grants(&self, page: Page) -> Result<GrantPage> {
        let limit = page.limit();
        // One more than asked: whether a next page exists, without an empty last page.
        let mut keys = self
            .inner
            .store
            .keys_after(page.cursor(), limit.saturating_add(1))
            .await?;
        let more = keys.len() > limit;
        keys.truncate(limit);
        let mut grants = Vec::with_capacity(keys.len());
        for key in &keys {
            // Deleted since it was listed: not a grant any more.
            if let Some(loaded) = self.inner.store.load(key).await? {
                grants.push(self.status_of(key, &loaded.value));
            }
        }
        let next = match keys.pop() {
            Some(last) if more => Some(Page::after(last, limit)),
            _ => None,
        };
        Ok(GrantPage { grants, next })
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
    ///
    /// A loop `while let Ok(event) = rx.recv().await` stops at the first lag; prefer
    /// [`events`](Self::events), which reports lag as an item and goes on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// [`Event`]s from now on, as a stream that reports lag
    /// ([`EventItem::Lagged`](crate::EventItem::Lagged)) and goes on. It ends when every clone
    /// of the manager, and its background refresher, are gone. See [`EventStream`].
    pub fn events(&self) -> EventStream {
        EventStream::new(self.inner.events.subscribe())
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

    /// Waits until no refresh of this manager is in flight and every refreshed grant is saved,
    /// for at most `timeout`. Returns whether everything finished.
    ///
    /// Call it before the process exits: a refresh the provider already executed is then
    /// saved, instead of being cancelled with the runtime (which would leave the store holding
    /// a spent refresh token). Records whose save failed earlier are tried once more first.
    /// [`RefresherHandle::shutdown`] calls it after stopping the scheduler.
    pub async fn drain(&self, timeout: Duration) -> bool {
        drain(&self.inner, timeout).await
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
            Some(c) if c.dead().is_none() => c,
            // Unknown here, or dead: read the store (a new grant may have been inserted by
            // another process).
            _ => match inner.load(key, &slot).await {
                Ok(c) => c,
                // (A death the store has not taken yet comes back from `load` even while the
                // store is unreachable; a stored one is the store's to confirm.)
                Err(e) => return Err(e),
            },
        };
        if let Some(reason) = cached.dead() {
            return Err(Error::ReauthorizationRequired {
                key: key.clone(),
                reason: reason.clone(),
            });
        }
        let now = inner.clock.now();
        if need.satisfied_by(&cached.tokens, now, inner.config.refresh_margin) {
            return Ok(cached.tokens.clone());
        }
        // A grant its provider cannot refresh is served until it really expires.
        if !inner.provider.can_refresh(&cached.tokens)
            && !cached.tokens.is_expired(now)
            && !matches!(need, Need::Rejected(_))
        {
            return Ok(cached.tokens.clone());
        }
        if let Some(held) = cached.held_by_backoff(key, &need, now) {
            if held.is_err() {
                // Before failing, look whether a peer (one not in backoff) refreshed meanwhile.
                if let Ok(stored) = inner.load(key, &slot).await {
                    if stored.dead().is_none()
                        && need.satisfied_by(&stored.tokens, now, inner.config.refresh_margin)
                    {
                        return Ok(stored.tokens.clone());
                    }
                }
            }
            return held;
        }
        inner.refresh_shared(key, slot, need).await
    }
}

impl Need {
    fn satisfied_by(&self, tokens: &TokenSet, now: SystemTime, margin: Duration) -> bool {
        match self {
            Need::Expiring => tokens.is_fresh(now, tokens.scaled_margin(margin)),
            Need::Rejected(failed) => tokens.access_token() != failed && !tokens.is_expired(now),
            Need::Forced => false,
            // A peer refreshed since the refresher looked.
            Need::Scheduled { seen_issued_at } => match (tokens.issued_at(), seen_issued_at) {
                (Some(now_issued), Some(seen)) => now_issued > *seen,
                (Some(_), None) => true,
                (None, _) => false,
            },
            Need::Persist => true,
        }
    }
}

impl Cached {
    fn trouble(&self) -> &Trouble {
        static NONE: Trouble = Trouble::NONE;
        self.trouble.as_deref().unwrap_or(&NONE)
    }

    /// Why the grant is dead, if it is.
    pub(crate) fn dead(&self) -> Option<&InvalidationReason> {
        self.trouble().dead.as_ref()
    }

    /// The end of the backoff the store records, if any.
    pub(crate) fn retry_not_before(&self) -> Option<SystemTime> {
        self.trouble().retry_not_before
    }

    /// During backoff no refresh is sent: serve a still-valid token, or the last error.
    pub(crate) fn held_by_backoff(
        &self,
        key: &TokenKey,
        need: &Need,
        now: SystemTime,
    ) -> Option<Result<Arc<TokenSet>>> {
        let trouble = self.trouble();
        let shared = trouble
            .retry_not_before
            .and_then(|until| hold_until(until, trouble.failed_at, trouble.failed_mono, now));
        let local = trouble
            .local
            .as_ref()
            .and_then(|l| hold_until(l.until, Some(l.since), Some(l.mono), now).map(|u| (u, l)));
        let (until, local_error) = match (shared, local) {
            (None, None) => return None,
            (Some(s), Some((l, hold))) if l >= s => (l, Some(&hold.error)),
            (Some(s), _) => (s, None),
            (None, Some((l, hold))) => (l, Some(&hold.error)),
        };
        let usable = match need {
            Need::Expiring => !self.tokens.is_expired(now),
            Need::Rejected(_) | Need::Forced | Need::Scheduled { .. } | Need::Persist => false,
        };
        if usable {
            return Some(Ok(self.tokens.clone()));
        }
        let wait = until.duration_since(now).unwrap_or_default();
        if let Some(error) = local_error {
            return Some(Err(error.clone().with_retry_after(wait)));
        }
        let error = match (&trouble.last_error, &trouble.last_failure) {
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

/// When a backoff from `since` to `until` ends, seen at `now`, or `None` if it is over.
///
/// A clock set back before the failure must not stretch the backoff by the jump: its length
/// then runs on the monotonic clock, from `mono` (the failure, if it happened here, or when
/// this process first saw it); without `mono` the backoff counts as over.
fn hold_until(
    until: SystemTime,
    since: Option<SystemTime>,
    mono: Option<tokio::time::Instant>,
    now: SystemTime,
) -> Option<SystemTime> {
    match since.filter(|since| *since > now) {
        Some(since) => {
            let length = until.duration_since(since).unwrap_or_default();
            let elapsed = mono?.elapsed();
            (elapsed < length).then(|| later(now, length - elapsed))
        }
        None => (until > now).then_some(until),
    }
}

impl Inner {
    /// The fast path: a cached, live token valid beyond the margin.
    fn fresh<T>(&self, key: &TokenKey, f: impl FnOnce(&Cached) -> T) -> Option<T> {
        self.grants.with(key, |slot| self.fresh_in(slot, f))?
    }

    /// The fast path: the cached tokens if they are fresh, read from memory only.
    #[inline]
    pub(crate) fn fresh_in<T>(&self, slot: &Slot, f: impl FnOnce(&Cached) -> T) -> Option<T> {
        let guard = self.fresh_guard(slot)?;
        guard.as_ref().map(|cached| f(cached))
    }

    /// The fast path, lending the cache entry: `Some` (holding a `Some`) if it is fresh.
    #[inline]
    pub(crate) fn fresh_guard(&self, slot: &Slot) -> Option<arc_swap::Guard<Option<Arc<Cached>>>> {
        if !slot.used.load(Ordering::Relaxed) {
            slot.used.store(true, Ordering::Relaxed);
        }
        let guard = slot.cached.load();
        // Rounded up, so never a token past its deadline; cheaper than `now()`.
        let now = if self.system_clock {
            crate::clock::coarse_nanos()
        } else {
            epoch_nanos(self.clock.now_coarse())
        };
        guard
            .as_ref()
            .is_some_and(|cached| now < cached.fresh_before)
            .then_some(guard)
    }

    fn cached(&self, key: &TokenKey) -> Option<Arc<Cached>> {
        self.grants.with(key, |slot| slot.cached.load_full())?
    }

    /// The slot of `key`, created if there is none (never one its grant was removed from).
    pub(crate) fn slot(&self, key: &TokenKey) -> Arc<Slot> {
        self.grants.slot(key)
    }

    /// Loads the grant from the store into the cache (saving a pending record first).
    async fn load(self: &Arc<Self>, key: &TokenKey, slot: &Arc<Slot>) -> Result<Arc<Cached>> {
        match self.reconcile(key, slot).await? {
            None => {
                slot.cached.store(None);
                // Lookups of keys that do not exist must not grow the map.
                // A slot a `GrantHandle` holds stays, so the handle keeps its fast path
                // (held by the map and by this call only: no handle, no other caller).
                // (See `slots` for how this stays safe against lock-free readers.)
                self.grants.remove_unused(key, slot);
                self.metrics.health(key, || None);
                Err(Error::NotFound { key: key.clone() })
            }
            Some(loaded) => {
                let cached = self.cache(slot, &loaded.value, loaded.version, None, false);
                self.observe_health(key, slot);
                Ok(cached)
            }
        }
    }

    /// Forgets everything this process knows of `key` (the grant was deleted).
    fn forget(&self, key: &TokenKey) {
        if let Some(slot) = self.grants.remove(key) {
            // A `GrantHandle` may still hold the slot: it must not serve the removed grant
            // (`remove` marked it `detached`).
            slot.cached.store(None);
            self.clear_pending(&slot, None);
        }
        self.metrics.health(key, || None);
    }

    /// Counts the grant under its health as this process now sees it (`tokenkeeper.grants`).
    pub(crate) fn observe_health(&self, key: &TokenKey, slot: &Slot) {
        self.metrics.health(key, || {
            let cached = slot.cached.load();
            let cached = cached.as_ref()?;
            let now = self.clock.now();
            let local_until = slot.rare(|r| r.local.as_ref().map(|l| l.until));
            Some(if cached.dead().is_some() {
                crate::metrics::Health::Dead
            } else if cached.retry_not_before().is_some_and(|until| until > now)
                || local_until.is_some_and(|until| until > now)
            {
                crate::metrics::Health::BackingOff
            } else {
                crate::metrics::Health::Active
            })
        });
    }

    /// Holds `record` until it is saved; counted by [`TokenManager::drain`].
    pub(crate) fn set_pending(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: &Arc<Slot>,
        record: GrantRecord,
        base: Version,
        spent: Option<crate::token::RefreshToken>,
    ) {
        let id = self.pending_ids.fetch_add(1, Ordering::Relaxed);
        let previous = slot
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Box::new(Pending {
                id,
                record,
                base,
                spent,
            }));
        if previous.is_none() {
            busy_add(&self.busy);
        }
        self.spawn_persist_retry(key, slot);
    }

    /// Drops the pending record (`id`: only if it is still that one).
    pub(crate) fn clear_pending(&self, slot: &Slot, id: Option<u64>) {
        let mut pending = slot.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending
            .as_ref()
            .is_some_and(|p| id.is_none_or(|id| p.id == id))
        {
            *pending = None;
            busy_done(&self.busy);
        }
    }

    /// Retries saving the pending record in the background until it is saved or superseded.
    fn spawn_persist_retry(self: &Arc<Self>, key: &TokenKey, slot: &Arc<Slot>) {
        if slot.persisting.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        let key = key.clone();
        let slot = slot.clone();
        let has_pending = |slot: &Slot| {
            slot.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        };
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            loop {
                tokio::time::sleep(delay).await;
                let Some(inner) = weak.upgrade() else { break };
                if has_pending(&slot) {
                    let _ = inner
                        .refresh_shared(&key, slot.clone(), Need::Persist)
                        .await;
                }
                if !has_pending(&slot) {
                    slot.persisting.store(false, Ordering::SeqCst);
                    // A record made pending between the check and the store above.
                    if !has_pending(&slot) || slot.persisting.swap(true, Ordering::SeqCst) {
                        break;
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        });
    }

    /// Replaces the cached view of a grant with `record` at `version`, unless the cache
    /// already holds a newer version.
    ///
    /// `authoritative`: `record` was just read under the refresh lock or just written, so it is
    /// the store's current state even if its version is lower than the cached one (the store
    /// went back in time: restored from a backup, or re-imported). The cached tokens may then
    /// be spent, so they are replaced.
    pub(crate) fn cache(
        &self,
        slot: &Slot,
        record: &GrantRecord,
        version: Version,
        last_error: Option<Error>,
        authoritative: bool,
    ) -> Arc<Cached> {
        let last_error = last_error.or_else(|| {
            slot.cached
                .load()
                .as_ref()
                .filter(|c| c.version == version)
                .and_then(|c| c.trouble().last_error.clone())
        });
        let retry_not_before = record.retry_not_before();
        let failed_at = record.rare().failed_at;
        // A peer's failure first seen here is placed on the monotonic clock now: how long
        // ago it really happened is unknown (the injected clock may have jumped since), so
        // if the clock is later set back before it, its backoff runs its whole length from
        // here rather than from a guess that could end it early.
        let (local, mono) = match failed_at {
            Some(at) => slot.rare_mut(|r| {
                if r.failure_mono.is_none_or(|(seen, _)| seen != at) {
                    r.failure_mono = Some((at, tokio::time::Instant::now()));
                }
                (r.local.clone(), r.failure_mono)
            }),
            None => slot.rare(|r| (r.local.clone(), r.failure_mono)),
        };
        let fresh_before = match (record.dead_reason(), record.tokens.expires_at()) {
            (Some(_), _) => 0,
            (None, None) => u64::MAX,
            (None, Some(at)) => at
                .checked_sub(record.tokens.scaled_margin(self.config.refresh_margin))
                .map_or(0, epoch_nanos),
        };
        let trouble = Trouble {
            dead: record.dead_reason().cloned(),
            retry_not_before,
            failed_at,
            failed_mono: mono
                .filter(|(at, _)| Some(*at) == failed_at)
                .map(|(_, instant)| instant),
            local,
            last_error,
            last_failure: record.rare().last_failure.clone(),
        };
        let fresh = Arc::new(Cached {
            tokens: Arc::clone(&record.tokens),
            access: record.tokens.access_token().clone(),
            fresh_before,
            version,
            trouble: (!trouble.is_none()).then(|| Box::new(trouble)),
        });
        if authoritative {
            if let Some(c) = slot.cached.load().as_ref().filter(|c| c.version > version) {
                tracing::warn!(
                    cached = c.version,
                    stored = version,
                    "the store went back in time (restored or re-imported); adopting its record"
                );
            }
            slot.cached.store(Some(fresh.clone()));
            return fresh;
        }
        let previous = slot.cached.rcu(|current| match current {
            Some(c) if c.version > version => Some(c.clone()),
            _ => Some(fresh.clone()),
        });
        match previous {
            Some(c) if c.version > version => c,
            _ => fresh,
        }
    }

    /// The refresher read `version` of `key` from the store: if this process caches a newer
    /// version, the store went back in time (restored from a backup, re-imported), and the
    /// cached tokens may be spent. Drop them; the next call reloads and adopts the store's.
    pub(crate) fn note_stored_version(&self, key: &TokenKey, version: Version) {
        self.grants.with(key, |slot| {
            let regressed = slot
                .cached
                .load()
                .as_ref()
                .is_some_and(|c| c.version > version);
            let in_flight = slot
                .flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            if regressed && !in_flight {
                tracing::warn!(
                    key = %key,
                    "the store went back in time (restored or re-imported); reloading the grant"
                );
                slot.cached.store(None);
            }
        });
    }

    /// Whether a caller read this grant since its last refresh.
    pub(crate) fn was_used(&self, key: &TokenKey) -> bool {
        self.grants
            .with(key, |slot| slot.used.load(Ordering::Relaxed))
            .unwrap_or(false)
    }

    pub(crate) fn set_scheduler(
        &self,
        control: mpsc::UnboundedSender<Control>,
        planned: Arc<crate::refresher::Plans>,
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
                Some(rx) => (**rx).clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *flight = Some(Box::new(rx.clone()));
                    let inner = self.clone();
                    let key = key.clone();
                    let slot = slot.clone();
                    busy_add(&self.busy);
                    tokio::spawn(async move {
                        // Clears the flight even if the refresh panics, so the grant is not
                        // stuck; waiters then see the channel close.
                        let mut guard = FlightGuard {
                            inner: &inner,
                            slot: &slot,
                            landed: false,
                        };
                        // Boxed: the refresh's state is large, and the task (moved a few
                        // times while it is spawned) then holds only a pointer to it.
                        let outcome = Box::pin(inner.run_refresh(&key, &slot, need)).await;
                        // The flight ends before its outcome is published: a caller arriving
                        // later must not be handed this (by then possibly stale) outcome.
                        guard.land();
                        let _ = tx.send(Some(outcome));
                        drop(guard);
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

/// Ends a flight: clears it (so the next caller starts a new one) and, once its outcome is
/// published, stops counting it as busy. Runs on panic too.
struct FlightGuard<'a> {
    inner: &'a Inner,
    slot: &'a Slot,
    landed: bool,
}

impl FlightGuard<'_> {
    /// Clears this flight, once: after that the slot may already hold the next one.
    fn land(&mut self) {
        if !self.landed {
            self.landed = true;
            *self.slot.flight.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.land();
        busy_done(&self.inner.busy);
    }
}

/// Counts one more piece of work in `busy`; nobody waits for a count above zero.
fn busy_add(busy: &watch::Sender<usize>) {
    busy.send_if_modified(|n| {
        *n += 1;
        false
    });
}

/// Counts one piece of work done in `busy`, waking `drain` if none is left.
fn busy_done(busy: &watch::Sender<usize>) {
    busy.send_if_modified(|n| {
        *n = n.saturating_sub(1);
        *n == 0
    });
}

pub(crate) async fn drain(inner: &Arc<Inner>, timeout: Duration) -> bool {
    let work = async {
        // Records whose save failed get one more prompt try.
        for (key, slot) in inner.grants.pending() {
            let _ = inner.refresh_shared(&key, slot, Need::Persist).await;
        }
        let mut busy = inner.busy.subscribe();
        let _ = busy.wait_for(|n| *n == 0).await;
    };
    let deadline = later(inner.clock.now(), timeout);
    tokio::select! {
        biased;
        () = work => true,
        () = inner.clock.sleep_until(deadline) => false,
        () = tokio::time::sleep(timeout) => false,
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

/// One grant of a [`TokenManager`], from [`TokenManager::grant`]: the same answers as the
/// manager's methods for its key, without looking the key up on each call.
#[derive(Clone)]
pub struct GrantHandle {
    manager: TokenManager,
    slot: Arc<Slot>,
    key: TokenKey,
}

impl fmt::Debug for GrantHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantHandle")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl GrantHandle {
    /// The grant's key.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// The manager the handle reads through.
    pub fn manager(&self) -> &TokenManager {
        &self.manager
    }

    /// The slot, unless its grant was removed since the handle was taken.
    #[inline]
    fn live(&self) -> Option<&Slot> {
        (!self.slot.detached.load(Ordering::Relaxed)).then_some(&*self.slot)
    }

    /// [`TokenManager::access_token`] for this grant.
    pub async fn access_token(&self) -> Result<AccessToken> {
        let inner = &self.manager.inner;
        if let Some(token) = self
            .live()
            .and_then(|slot| inner.fresh_in(slot, |c| c.access.clone()))
        {
            inner.metrics.cache(true);
            return Ok(token);
        }
        self.manager.access_token(&self.key).await
    }

    /// [`TokenManager::with_access_token`] for this grant: lends the token to `f`, without
    /// cloning it on the fast path.
    pub async fn with_access_token<R>(&self, f: impl FnOnce(&AccessToken) -> R) -> Result<R> {
        let inner = &self.manager.inner;
        if let Some(guard) = self.live().and_then(|slot| inner.fresh_guard(slot)) {
            if let Some(cached) = guard.as_ref() {
                inner.metrics.cache(true);
                return Ok(f(&cached.access));
            }
        }
        self.manager.with_access_token(&self.key, f).await
    }

    /// [`TokenManager::token`] for this grant.
    pub async fn token(&self) -> Result<Arc<TokenSet>> {
        let inner = &self.manager.inner;
        if let Some(tokens) = self
            .live()
            .and_then(|slot| inner.fresh_in(slot, |c| c.tokens.clone()))
        {
            inner.metrics.cache(true);
            return Ok(tokens);
        }
        self.manager.token(&self.key).await
    }

    /// [`TokenManager::invalidate`] for this grant.
    pub async fn invalidate(&self, failed: &AccessToken) -> Result<AccessToken> {
        self.manager.invalidate(&self.key, failed).await
    }

    /// [`TokenManager::status`] for this grant.
    pub async fn status(&self) -> Result<TokenStatus> {
        self.manager.status(&self.key).await
    }
}

/// Builds a [`TokenManager`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct TokenManagerBuilder {
    provider: Arc<dyn Provider>,
    store: Option<Arc<dyn TokenStore>>,
    clock: Option<Arc<dyn Clock>>,
    config: Config,
    event_capacity: usize,
    metrics_key_label: bool,
    /// Settings that were nonsense and were clamped; [`TokenManagerBuilder::try_build`]
    /// reports the first.
    problems: Vec<ConfigProblem>,
}

/// The most any backoff, margin or lifetime setting is taken to mean: 30 days. Longer values
/// are clamped (and rejected by [`TokenManagerBuilder::try_build`]).
const MAX_SETTING: Duration = Duration::from_secs(30 * 24 * 3600);

/// The largest event channel (events are small; a bigger buffer only hides a stuck consumer).
const MAX_EVENT_CAPACITY: usize = 1 << 16;

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
    ///
    /// For short-lived tokens the margin shrinks to half the token's lifetime, so a token that
    /// lives 60 s or less is refreshed about once per half lifetime, never on every call.
    /// Values over 30 days are clamped.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.config.refresh_margin = self.clamp("refresh_margin", margin, Duration::ZERO);
        self
    }

    /// Backoff after a failed refresh: `base` doubling per consecutive failure up to `max`,
    /// with jitter; a provider's `Retry-After` wins when longer (defaults 5 s and 15 min).
    /// Values over 30 days are clamped; `max` is at least `base`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        let base = self.clamp("backoff base", base, Duration::ZERO);
        let max = self.clamp("backoff max", max, Duration::ZERO);
        if max < base {
            self.problems
                .push(problem("backoff max", "is shorter than the base"));
        }
        self.config.backoff_base = base;
        self.config.backoff_max = max.max(base);
        self
    }

    /// How long a crashed process can hold a store's cross-process refresh lock (default 60 s).
    ///
    /// A refresh can take two provider calls (a prompt retry after a lost reply), so keep it
    /// above twice the [`refresh_timeout`](Self::refresh_timeout); a refresh that outlives the
    /// lease still never overwrites a peer's newer record (saves are compare-and-swap on the
    /// version read under the lock).
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.config.lock_ttl = self.clamp("lock_ttl", ttl, Duration::from_secs(1));
        self
    }

    /// The longest one provider call may take before it counts as
    /// [`Unavailable`](crate::Error::Unavailable) with cause
    /// [`Timeout`](crate::UnavailableCause::Timeout) and the grant backs off (default 20 s).
    /// A provider that never answers then holds neither its callers nor, through the store's
    /// lock, other processes. Clamped to at least 1 ms.
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.config.refresh_timeout =
            self.clamp("refresh_timeout", timeout, Duration::from_millis(1));
        self
    }

    /// The lifetime assumed for an access token whose reply stated its expiry in a form that
    /// could not be read (a null, negative, huge or non-numeric `expires_in`): default 1 hour,
    /// so the grant is refreshed early rather than kept past its real expiry. A reply that
    /// states no expiry at all keeps an unknown expiry (valid until the API rejects it, then
    /// [`invalidate`](TokenManager::invalidate) refreshes).
    pub fn fallback_lifetime(mut self, lifetime: Duration) -> Self {
        self.config.fallback_lifetime =
            self.clamp("fallback_lifetime", lifetime, Duration::from_secs(1));
        self
    }

    /// How many events a slow subscriber may fall behind before losing the oldest
    /// (default 1024, at most 65 536).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        if capacity == 0 || capacity > MAX_EVENT_CAPACITY {
            self.problems
                .push(problem("event_capacity", "must be between 1 and 65536"));
        }
        self.event_capacity = capacity.clamp(1, MAX_EVENT_CAPACITY);
        self
    }

    /// Whether the refresh metrics (`tokenkeeper.refresh.attempts` and
    /// `tokenkeeper.refresh.duration`) carry the grant's key as label `key` (default: no).
    ///
    /// Off by default: keys may name customers, and a series per grant costs the metrics
    /// backend. Turn it on for a few grants worth watching one by one. Tokens are never labels.
    #[cfg(feature = "metrics")]
    pub fn metrics_key_label(mut self, on: bool) -> Self {
        self.metrics_key_label = on;
        self
    }

    fn clamp(&mut self, name: &'static str, value: Duration, least: Duration) -> Duration {
        if value > MAX_SETTING {
            self.problems.push(problem(name, "is longer than 30 days"));
        } else if value < least {
            self.problems.push(problem(name, "is too short"));
        }
        value.clamp(least, MAX_SETTING)
    }

    /// Builds the manager. Settings out of range were clamped as each setter documents; use
    /// [`try_build`](Self::try_build) to have them rejected instead.
    pub fn build(self) -> TokenManager {
        let (events, _) = broadcast::channel(self.event_capacity);
        TokenManager {
            inner: Arc::new(Inner {
                provider: self.provider,
                store: crate::metrics::instrument(
                    self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                ),
                system_clock: self.clock.is_none(),
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
                config: self.config,
                grants: slots::Slots::new(),
                events,
                scheduler: Mutex::new(None),
                planned: Mutex::new(None),
                busy: watch::Sender::new(0),
                warned_no_lock: AtomicBool::new(false),
                pending_ids: AtomicU64::new(0),
                metrics: crate::metrics::Metrics::new(self.metrics_key_label),
            }),
        }
    }

    /// Builds the manager, or says which setting is nonsense.
    ///
    /// # Errors
    ///
    /// [`Error::Misconfigured`] with [`ConfigProblem::Setting`] for a value a setter had to
    /// clamp (a duration over 30 days, a zero event capacity…), or a lock ttl not above twice
    /// the refresh timeout.
    pub fn try_build(mut self) -> Result<TokenManager> {
        if self.config.lock_ttl <= self.config.refresh_timeout * 2 {
            self.problems.push(problem(
                "lock_ttl",
                "must be longer than twice the refresh timeout",
            ));
        }
        if let Some(problem) = self.problems.first().cloned() {
            return Err(Error::Misconfigured {
                key: None,
                problem,
                status: None,
                source: None,
            });
        }
        Ok(self.build())
    }
}

fn problem(setting: &str, reason: &str) -> ConfigProblem {
    ConfigProblem::Setting {
        setting: setting.to_owned(),
        reason: reason.to_owned(),
    }
}

impl GrantHealth {
    /// The health of a stored record at `now`, as [`TokenManager::status`] reports it (without
    /// what only a running manager knows): dead if its state says so, backing off while
    /// [`retry_not_before`](GrantRecord::retry_not_before) is after `now`, else active. For
    /// tools that read a store directly, such as the `tokenkeeper` CLI.
    pub fn of(record: &GrantRecord, now: SystemTime) -> Self {
        match record.state() {
            GrantState::ReauthorizationRequired { reason, since } => {
                GrantHealth::ReauthorizationRequired {
                    reason: reason.clone(),
                    since: *since,
                }
            }
            GrantState::Active => match record.retry_not_before() {
                Some(until) if until > now => GrantHealth::BackingOff { until },
                _ => GrantHealth::Active,
            },
        }
    }
}
