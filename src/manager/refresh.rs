//! One refresh of one grant: lock, re-read, call, classify, save.
//!
//! Between "the provider answered with a new refresh token" and "it is saved", every path keeps
//! the new record: saved, or held as the slot's pending record (retried in the background and
//! before anything else happens to the grant), never dropped because the store failed.

use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use tracing::{field, Instrument};

use super::{Cached, Inner, LocalHold, Need, Outcome, Slot};
use crate::error::{Error, InvalidationReason, ProviderError, ProviderErrorKind, UnavailableCause};
use crate::event::Event;
use crate::metrics;
use crate::provider::RefreshRequest;
use crate::store::{Cas, GrantRecord, GrantState, StoredFailure, Version, Versioned};
use crate::token::{TokenKey, TokenResponse, TokenSet};

/// The least wait after a rate limit that came without `Retry-After`.
const RATE_LIMIT_FLOOR: Duration = Duration::from_secs(60);

/// The longest `Retry-After` or penalty honoured.
const MAX_PROVIDER_HINT: Duration = Duration::from_secs(24 * 3600);

/// How many times a lost compare-and-swap is retried before giving up.
const CAS_ATTEMPTS: usize = 8;

/// `t + d`, saturating far in the future instead of overflowing.
pub(crate) fn later(t: SystemTime, d: Duration) -> SystemTime {
    const FAR: Duration = Duration::from_secs(200 * 365 * 24 * 3600);
    t.checked_add(d.min(FAR)).unwrap_or(t)
}

/// How long before a refresh lock is handed over its lease may have started: the round trip of
/// the request that won it.
const LEASE_GRANT_SLACK: Duration = Duration::from_secs(1);

/// When a provider call may no longer start under the refresh lock's lease.
#[derive(Debug, Clone, Copy)]
struct LeaseDeadline {
    wall: SystemTime,
    mono: tokio::time::Instant,
}

impl Inner {
    /// Runs on a spawned task; the single refresh of `key` in this process.
    pub(super) async fn run_refresh(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: &Arc<Slot>,
        need: Need,
    ) -> Outcome {
        let span = tracing::info_span!(
            "tokenkeeper.refresh",
            key = %key,
            outcome = field::Empty,
            status = field::Empty,
            rotated = field::Empty,
            attempt = field::Empty,
            duration_ms = field::Empty,
        );
        let run = async {
            let started = Instant::now();
            // The lease counts from before the winning request (see `lease_deadline`).
            let asked = (self.clock.now(), tokio::time::Instant::now());
            let lock = match self.store.lock(key, self.config.lock_ttl).await {
                Ok(lock) => lock,
                // Without the lock no provider call is made; a pending death still stands.
                Err(e) => return self.unreachable(key, slot, e.into()),
            };
            if lock.is_none() && !self.warned_no_lock.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the token store has no cross-process refresh lock: processes sharing it \
                     are kept apart by compare-and-swap only, which cannot stop two of them \
                     from presenting the same refresh token at once"
                );
            }
            let got = (self.clock.now(), tokio::time::Instant::now());
            let lease = lock.as_ref().map(|_| self.lease_deadline(asked, got));
            let outcome = self.refresh_locked(key, slot, need, lease).await;
            if let Some(lock) = lock {
                if let Err(e) = lock.release().await {
                    tracing::warn!(error = %e, "releasing the refresh lock failed; it will expire");
                }
            }
            let span = tracing::Span::current();
            span.record("duration_ms", started.elapsed().as_millis() as u64);
            match &outcome {
                Ok(_) => tracing::debug!("refresh finished"),
                Err(e) => tracing::warn!(error = %e, "refresh failed"),
            }
            self.metrics.refresh(key, &outcome, started.elapsed());
            self.observe_health(key, slot);
            outcome
        };
        crate::metrics::scope(run.instrument(span)).await
    }

    /// The store could not be reached: a death this process knows of stands, anything else is
    /// the store's error.
    fn unreachable(&self, key: &TokenKey, slot: &Slot, error: Error) -> Outcome {
        let pending = slot.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.as_ref().and_then(|p| p.record.dead_reason()) {
            Some(reason) => Err(dead(key, reason)),
            None => Err(error),
        }
    }

    /// The last instant a provider call may start under a lease asked for at `asked` and
    /// granted by `got`: the call (bounded by the refresh timeout) must end before the lease can
    /// run out, or another process could be let in while it runs and both present the same
    /// refresh token.
    ///
    /// The lease starts when the store takes the winning request: after `asked`, and no earlier
    /// than [`LEASE_GRANT_SLACK`] before `got` (a store answers the request that won at once;
    /// waiting for a busy lock, a holder that crashed say, happens before it). Counting from
    /// `asked` alone would spend the budget on that wait and refuse every waiter.
    fn lease_deadline(
        &self,
        asked: (SystemTime, tokio::time::Instant),
        got: (SystemTime, tokio::time::Instant),
    ) -> LeaseDeadline {
        let (ttl, timeout) = (self.config.lock_ttl, self.config.refresh_timeout);
        let budget = if ttl > timeout {
            ttl - timeout
        } else {
            ttl / 2
        };
        let wall = got
            .0
            .checked_sub(LEASE_GRANT_SLACK)
            .map_or(asked.0, |t| t.max(asked.0));
        let mono = got
            .1
            .checked_sub(LEASE_GRANT_SLACK)
            .map_or(asked.1, |t| t.max(asked.1));
        LeaseDeadline {
            wall: later(wall, budget),
            mono: mono.checked_add(budget).unwrap_or(mono),
        }
    }

    /// Refuses a provider call the lease may not cover (the store or the clock was slow).
    ///
    /// The store measures the lease on its own clock, so the budget is spent when either the
    /// injected clock or the monotonic clock says so: a wall clock set back must not stretch it.
    fn lease_covers(&self, key: &TokenKey, lease: Option<LeaseDeadline>) -> Result<(), Error> {
        match lease {
            Some(deadline)
                if self.clock.now() > deadline.wall
                    || tokio::time::Instant::now() > deadline.mono =>
            {
                tracing::warn!(
                    "the refresh lock's lease may run out before the provider answers; not calling"
                );
                Err(Error::Unavailable {
                    key: key.clone(),
                    cause: UnavailableCause::LockExpired,
                    status: None,
                    retry_after: None,
                    source: None,
                })
            }
            _ => Ok(()),
        }
    }

    async fn refresh_locked(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: &Arc<Slot>,
        need: Need,
        lease: Option<LeaseDeadline>,
    ) -> Outcome {
        let span = tracing::Span::current();
        let loaded = match self.reconcile(key, slot).await {
            Ok(loaded) => loaded,
            Err(e) => return self.unreachable(key, slot, e),
        };
        let Some(Versioned {
            version,
            value: record,
        }) = loaded
        else {
            slot.cached.store(None);
            return Err(Error::NotFound { key: key.clone() });
        };
        // Read under the lock: this is the store's current state, even if it went back in time.
        let cached = self.cache(slot, &record, version, None, true);
        let local_failures = slot.rare(|r| r.local.as_ref().map_or(0, |l| l.failures));
        // Which attempt since the grant's last success this is (1: none failed since).
        span.record(
            "attempt",
            record.failures().max(local_failures).saturating_add(1),
        );
        if let Some(reason) = record.dead_reason() {
            metrics::outcome_as(&span, "dead", "already_dead");
            return Err(dead(key, reason));
        }
        let refused = slot.rare(|r| r.refused.clone());
        if let Some((_, reason)) =
            refused.filter(|(token, _)| record.tokens.refresh_token() == Some(token))
        {
            // The provider already refused this very refresh token: record the death now.
            metrics::outcome(&span, "dead");
            return self.mark_dead(key, slot, record, version, reason).await;
        }
        let now = self.clock.now();
        // Invariant 2: a peer may have refreshed while this task waited.
        if need.satisfied_by(&record.tokens, now, self.config.refresh_margin) {
            metrics::outcome(&span, "adopted");
            return Ok(cached.tokens.clone());
        }
        if !self.provider.can_refresh(&record.tokens) {
            // Nothing can renew this grant: serve it until it really expires (or the API
            // rejects it), then it is dead.
            if !record.tokens.is_expired(now) && !matches!(need, Need::Rejected(_)) {
                metrics::outcome(&span, "not_refreshable");
                return Ok(cached.tokens.clone());
            }
            metrics::outcome(&span, "dead");
            return self
                .mark_dead(
                    key,
                    slot,
                    record,
                    version,
                    InvalidationReason::NoRefreshToken,
                )
                .await;
        }
        if let Some(held) = cached.held_by_backoff(key, &need, now) {
            metrics::outcome(&span, "backoff");
            return held;
        }
        let refresh_expired = record.tokens.is_refresh_token_expired(now);
        if refresh_expired && !record.tokens.is_expired(now) && !matches!(need, Need::Rejected(_)) {
            // No refresh is expected to succeed, but the access token works until it expires.
            metrics::outcome(&span, "refresh_token_expired");
            return Ok(cached.tokens.clone());
        }

        self.lease_covers(key, lease)?;
        let mut result = self.call_provider(key, &record.tokens, now).await;
        let mut record = record;
        if let Err(failure) = &result {
            // Remembered with the grant (for every process): a later refusal of this refresh
            // token means the rotation was lost, not that the user revoked.
            let lost = reply_may_be_lost(failure);
            if lost {
                record.rare_mut().reply_lost = true;
            }
            if lost {
                slot.rare_mut(|r| r.lost_reply = record.tokens.refresh_token().cloned());
            }
            if lost
                && self.lease_covers(key, lease).is_ok()
                && self.still_current(key, slot, &record).await
                && self.lease_covers(key, lease).is_ok()
            {
                // The provider may have rotated and the reply been lost. Providers with a reuse
                // window accept the same refresh token again: ask once more, promptly.
                tracing::info!("reply lost; retrying once with the same refresh token");
                let again = self
                    .call_provider(key, &record.tokens, self.clock.now())
                    .await;
                result = match again {
                    // "This refresh token is not current" right after a possibly lost
                    // rotation: the rotation was lost.
                    Err(e) if is_stale_token(&e) => {
                        let lost = ProviderError::reauthorize(InvalidationReason::RotationLost);
                        Err(match e.status() {
                            Some(status) => lost.with_status(status),
                            None => lost,
                        })
                    }
                    other => other,
                };
            }
        }
        match result {
            Ok(response) => {
                // Invariant 7: relative lifetimes count from the response.
                let now = self.clock.now();
                let malformed_fields = response.malformed_fields().to_vec();
                let tokens = self.apply_response(&record.tokens, response, now);
                let rotated = tokens.refresh_token() != record.tokens.refresh_token();
                let expires_at = tokens.expires_at();
                let mut fresh = GrantRecord::new(tokens);
                fresh.last_refresh = Some(now);
                fresh.origin = record.origin;
                fresh.rare_mut().warned = record.rare().warned;
                fresh.shrink();

                metrics::rotated(&span, rotated);
                let outcome = self
                    .save_refreshed(key, slot, fresh, &record, version)
                    .await;
                if outcome.is_ok() {
                    metrics::outcome(&span, "refreshed");
                    slot.rare_clear(|r| r.local = None);
                    self.emit(Event::Refreshed {
                        at: self.clock.now(),
                        key: key.clone(),
                        rotated,
                        expires_at,
                        malformed_fields,
                    });
                }
                outcome
            }
            Err(failure) => {
                if let Some(status) = failure.status() {
                    span.record("status", status);
                }
                // Past the refresh token's stated expiry, the provider's refusal (whatever code
                // it uses for it) is that expiry.
                let failure = if refresh_expired
                    && matches!(failure.kind(), ProviderErrorKind::Reauthorize(_))
                {
                    ProviderError::reauthorize(InvalidationReason::RefreshTokenExpired)
                } else {
                    failure
                };
                self.handle_failure(key, slot, record, version, failure, need)
                    .await
            }
        }
    }

    /// Whether the store still holds `record`'s refresh token (no new grant was inserted and no
    /// peer refreshed meanwhile), so presenting it again is still this grant's business.
    async fn still_current(&self, key: &TokenKey, slot: &Slot, record: &GrantRecord) -> bool {
        match self.store.load(key).await {
            Ok(Some(current)) => {
                if current.value.tokens.refresh_token() != record.tokens.refresh_token()
                    || current.value.dead_reason().is_some()
                {
                    return false;
                }
                // A backoff the store holds binds the retry too, by the rules every call
                // follows (a clock set back may have put a peer's rate limit back in force).
                let current = self.cache(slot, &current.value, current.version, None, true);
                current
                    .held_by_backoff(key, &Need::Forced, self.clock.now())
                    .is_none()
            }
            _ => false,
        }
    }

    /// One provider call, bounded by the refresh timeout; a panic becomes a typed error
    /// instead of a hang.
    ///
    /// The call runs on this (already spawned) refresh task rather than a task of its own: a
    /// spawn per refresh cost more than the reply's parsing, and dropping the call on timeout
    /// ends it as an abort did.
    async fn call_provider(
        &self,
        key: &TokenKey,
        tokens: &TokenSet,
        now: SystemTime,
    ) -> Result<TokenResponse, ProviderError> {
        let call = CatchPanic(self.provider.refresh(RefreshRequest::new(key, tokens, now)));
        // The deadline is on the injected clock, like every other time the engine keeps.
        // `SystemClock` sleeps on the monotonic clock, for the timeout from now: the same
        // timer as the one below, so it is not set twice.
        let on_clock = (!self.system_clock).then(|| {
            let deadline = later(self.clock.now(), self.config.refresh_timeout);
            self.clock.sleep_until(deadline)
        });
        let on_clock = async {
            match on_clock {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        // It ends at whichever comes first of the deadline on the injected clock and the
        // timeout on the monotonic clock: a wall clock set back cannot stretch it.
        let started = Instant::now();
        let joined = tokio::select! {
            biased;
            joined = call => Ok(joined),
            () = on_clock => Err(()),
            () = tokio::time::sleep(self.config.refresh_timeout) => Err(()),
        };
        let (result, end) = match joined {
            Ok(Ok(result)) => (result, metrics::ProviderEnd::Returned),
            Ok(Err(Panicked)) => {
                // The panic's message is not kept: it could quote a token.
                tracing::error!(panicked = true, "the provider's refresh did not finish");
                let error = ProviderError::unavailable(UnavailableCause::Internal)
                    .with_source("the provider panicked");
                (Err(error), metrics::ProviderEnd::Panic)
            }
            Err(()) => {
                let error = ProviderError::unavailable(UnavailableCause::Timeout)
                    .with_source("no reply within the refresh timeout");
                (Err(error), metrics::ProviderEnd::Timeout)
            }
        };
        metrics::provider_call(started.elapsed(), &result, end);
        result
    }

    /// Folds a reply into the current tokens; an expiry the reply stated unreadably gets the
    /// configured fallback lifetime.
    fn apply_response(
        &self,
        current: &TokenSet,
        response: TokenResponse,
        now: SystemTime,
    ) -> TokenSet {
        let unreadable_expiry = response.expires().is_none()
            && response
                .malformed_fields()
                .iter()
                .any(|f| is_access_expiry_field(f));
        let tokens = match (current.refresh_expiry(), self.provider.refresh_expiry()) {
            // A grant stored before its provider declared how its refresh tokens expire.
            (None, Some(declared)) => current
                .clone()
                .with_refresh_expiry(declared)
                .apply(response, now),
            _ => current.apply(response, now),
        };
        if unreadable_expiry {
            tokens.with_expires_at(later(now, self.config.fallback_lifetime))
        } else {
            tokens
        }
    }

    /// Loads the record; first saves this process's pending record (rotated tokens or a death
    /// the store refused earlier), so the store never keeps a spent refresh token that this
    /// process already replaced.
    ///
    /// The pending record is saved over whatever the store holds as long as the store still
    /// holds the refresh token it replaces (a peer may have changed metadata meanwhile). If the
    /// store holds another refresh token (a new grant was inserted, or a peer refreshed), the
    /// store wins and the pending record is dropped.
    pub(super) async fn reconcile(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: &Arc<Slot>,
    ) -> Result<Option<Versioned<GrantRecord>>, Error> {
        for _ in 0..CAS_ATTEMPTS {
            let pending = slot
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_deref()
                .cloned();
            let loaded = match self.store.load(key).await {
                Ok(loaded) => loaded,
                Err(e) => return self.pending_death_or(pending, e),
            };
            let Some(p) = pending else {
                return Ok(loaded);
            };
            let Some(current) = loaded else {
                self.clear_pending(slot, Some(p.id));
                return Ok(None);
            };
            if current.value.tokens.refresh_token() != p.spent.as_ref()
                || current.value.dead_reason().is_some()
            {
                self.clear_pending(slot, Some(p.id));
                return Ok(Some(current));
            }
            let mut record = p.record.clone();
            keep_backoff(&mut record, &current.value);
            keep_warning(&mut record, &current.value);
            if current.value.reply_lost() {
                // A peer recorded meanwhile that a reply for this refresh token was lost: a
                // refusal of it means the rotation was lost, whoever saw the refusal.
                let rare = record.rare_mut();
                rare.reply_lost = true;
                if let GrantState::ReauthorizationRequired { reason, .. } = &mut rare.state {
                    if matches!(
                        reason,
                        InvalidationReason::InvalidGrant | InvalidationReason::Superseded
                    ) {
                        *reason = InvalidationReason::RotationLost;
                        rare.last_error = Some(dead(key, reason).to_string().into());
                    }
                }
            }
            match self.store.save(key, &record, Some(current.version)).await {
                Ok(Cas::Saved(version)) => {
                    self.clear_pending(slot, Some(p.id));
                    tracing::info!("a record held since a failed save is now saved");
                    return Ok(Some(Versioned {
                        version,
                        value: record,
                    }));
                }
                Ok(Cas::Conflict) => continue,
                Err(e) => {
                    self.emit(Event::PersistFailed {
                        at: self.clock.now(),
                        key: key.clone(),
                        error: e.clone(),
                    });
                    // Before answering with the held record, see whether the store moved on
                    // meanwhile (a new grant inserted, a peer's refresh): then it is obsolete.
                    match self.store.load(key).await {
                        Ok(None) => {
                            self.clear_pending(slot, Some(p.id));
                            return Ok(None);
                        }
                        Ok(Some(current))
                            if current.value.tokens.refresh_token() != p.spent.as_ref()
                                || current.value.dead_reason().is_some() =>
                        {
                            self.clear_pending(slot, Some(p.id));
                            return Ok(Some(current));
                        }
                        _ => return self.pending_death_or(Some(p), e),
                    }
                }
            }
        }
        Err(Error::Store(crate::error::StoreError::new(
            "the record kept changing while a pending save was retried",
        )))
    }

    /// A pending death is the truth while the store is unreachable; otherwise the error.
    fn pending_death_or(
        &self,
        pending: Option<super::Pending>,
        error: crate::error::StoreError,
    ) -> Result<Option<Versioned<GrantRecord>>, Error> {
        match pending {
            Some(p) if p.record.dead_reason().is_some() => Ok(Some(Versioned {
                version: p.base,
                value: p.record,
            })),
            _ => Err(error.into()),
        }
    }

    /// The store holds a record this refresh did not write (a new grant, a peer's refresh or
    /// death): it wins, and is what the callers get.
    fn adopt(&self, key: &TokenKey, slot: &Slot, stored: &Versioned<GrantRecord>) -> Outcome {
        let cached = self.cache(slot, &stored.value, stored.version, None, true);
        match cached.dead() {
            Some(reason) => Err(dead(key, reason)),
            None => Ok(cached.tokens.clone()),
        }
    }

    /// Invariant 3: saves the refreshed record (compare-and-swap) before anyone sees it.
    async fn save_refreshed(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: &Arc<Slot>,
        mut fresh: GrantRecord,
        base: &GrantRecord,
        mut expected: Version,
    ) -> Outcome {
        let spent = base.tokens.refresh_token().cloned();
        let mut last_error = None;
        let mut store_failures = 0;
        for _ in 0..CAS_ATTEMPTS {
            match self.store.save(key, &fresh, Some(expected)).await {
                Ok(Cas::Saved(version)) => {
                    slot.used.store(false, Ordering::Relaxed);
                    return Ok(self.cache(slot, &fresh, version, None, true).tokens.clone());
                }
                Ok(Cas::Conflict) => {
                    let current = match self.store.load(key).await {
                        Ok(current) => current,
                        Err(e) => {
                            last_error = Some(e);
                            break;
                        }
                    };
                    match current {
                        // Only metadata changed (a peer recorded a failure): keep our tokens.
                        Some(c)
                            if c.value.tokens.refresh_token() == spent.as_ref()
                                && c.value.dead_reason().is_none() =>
                        {
                            expected = c.version;
                            keep_backoff(&mut fresh, &c.value);
                            keep_warning(&mut fresh, &c.value);
                        }
                        // A new grant was inserted, or a peer refreshed too: the store wins.
                        Some(c) => {
                            return self.adopt(key, slot, &c);
                        }
                        None => return Err(Error::NotFound { key: key.clone() }),
                    }
                }
                Err(e) => {
                    self.emit(Event::PersistFailed {
                        at: self.clock.now(),
                        key: key.clone(),
                        error: e.clone(),
                    });
                    last_error = Some(e);
                    store_failures += 1;
                    if store_failures >= self.config.save_attempts {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50) * store_failures).await;
                }
            }
        }
        // Keep the new tokens (the old refresh token may be spent) and save them before the
        // next refresh attempt; no caller sees them until they are saved.
        self.set_pending(key, slot, fresh, expected, spent);
        Err(match last_error {
            Some(e) => e.into(),
            None => Error::Store(crate::error::StoreError::new(
                "the record kept changing while the refreshed grant was saved",
            )),
        })
    }

    async fn handle_failure(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: &Arc<Slot>,
        mut record: GrantRecord,
        mut version: Version,
        failure: ProviderError,
        need: Need,
    ) -> Outcome {
        let span = tracing::Span::current();
        // A garbled reply that still carried a rotated refresh token: the old one is spent,
        // so the new one is kept (saved, or held pending) before anything else.
        if let Some(rotated) = failure.rotated_refresh_token().cloned() {
            let mut salvaged = record.clone();
            salvaged.tokens = Arc::new((*salvaged.tokens).clone().with_refresh_token(rotated));
            // If the store refuses it, it is held pending (and reported); the failure still
            // backs the grant off below.
            let saved = self
                .save_refreshed(key, slot, salvaged.clone(), &record, version)
                .await;
            if let Ok(tokens) = saved {
                match slot.cached.load_full() {
                    // Saved: the failure below applies to the salvaged record.
                    Some(c) if c.tokens.refresh_token() == salvaged.tokens.refresh_token() => {
                        version = c.version;
                        record = salvaged;
                    }
                    // The store had moved on (a new grant, a peer's refresh): it wins, and this
                    // failure concerns tokens that are gone.
                    _ => return Ok(tokens),
                }
            }
        }
        let error = failure.into_error(key);
        if let Error::ReauthorizationRequired { reason, .. } = &error {
            metrics::outcome(&span, "dead");
            return self
                .mark_dead(key, slot, record, version, reason.clone())
                .await;
        }
        let rate_limited = matches!(error, Error::RateLimited { .. });
        metrics::failure(&error);
        metrics::outcome(
            &span,
            if rate_limited {
                "rate_limited"
            } else {
                "failed"
            },
        );
        let now = self.clock.now();
        let shared = is_fact_about_the_grant(&error);
        let local_failures = slot.rare_mut(|r| {
            r.failure_mono = Some((now, tokio::time::Instant::now()));
            r.local.as_ref().map_or(0, |l| l.failures)
        });
        let failures = if shared {
            record.failures()
        } else {
            local_failures
        }
        .saturating_add(1);
        let delay = self.backoff(failures, error.retry_after(), rate_limited);
        let retry_at = later(now, delay);
        let error = error.with_retry_after(delay);
        let hold_here = |until: SystemTime| {
            slot.rare_mut(|r| {
                r.local = Some(LocalHold {
                    until,
                    since: now,
                    mono: tokio::time::Instant::now(),
                    failures,
                    error: error.clone(),
                });
            });
        };
        let cached: Arc<Cached> = if shared {
            let mut held = record.clone();
            let rare = held.rare_mut();
            rare.failures = failures;
            rare.retry_not_before = Some(retry_at);
            rare.failed_at = Some(now);
            rare.last_error = Some(error.to_string().into());
            rare.last_failure = StoredFailure::of(&error);
            let saved = match self.store.save(key, &held, Some(version)).await {
                Ok(Cas::Saved(v)) => Some(v),
                Ok(Cas::Conflict) => None,
                Err(e) => {
                    self.emit(Event::PersistFailed {
                        at: self.clock.now(),
                        key: key.clone(),
                        error: e,
                    });
                    None
                }
            };
            // The backoff also holds in this process, whatever the store does with it: if the
            // store did not take it (a peer wrote first, or it failed) the next call would
            // retry at once, and a peer's later failure adopted from the store must not replace
            // this one's length when the clock is set back.
            hold_here(retry_at);
            let version = saved.unwrap_or(version);
            self.cache(slot, &held, version, Some(error.clone()), true)
        } else {
            // This process's own problem (its configuration, its network, its provider code):
            // the backoff stays here and peers keep refreshing normally.
            hold_here(retry_at);
            let mut version = version;
            if record.reply_lost() {
                // Only the fact that a reply was lost is shared, not the backoff.
                if let Ok(Cas::Saved(v)) = self.store.save(key, &record, Some(version)).await {
                    version = v;
                }
            }
            self.cache(slot, &record, version, Some(error.clone()), true)
        };
        self.emit(Event::RefreshFailed {
            at: self.clock.now(),
            key: key.clone(),
            error: error.clone(),
            retry_at: Some(retry_at),
        });
        // Invariant 5: a still-valid access token keeps being served.
        match cached.held_by_backoff(key, &need, now) {
            Some(Ok(tokens)) => Ok(tokens),
            _ => Err(error),
        }
    }

    /// Invariant 6, then 5: before declaring the grant dead, check whether a peer rotated it;
    /// if not, persist it as dead (once) so nobody sends it to the provider again. If the
    /// store cannot take the death, it is held in this process (no further provider call,
    /// callers get `ReauthorizationRequired`) and saved in the background.
    async fn mark_dead(
        self: &Arc<Self>,
        key: &TokenKey,
        slot: &Arc<Slot>,
        record: GrantRecord,
        mut version: Version,
        reason: InvalidationReason,
    ) -> Outcome {
        // A refusal of a refresh token whose reply was lost earlier (by anyone, or by this
        // process even if the store never took the fact): the rotation was lost.
        let lost_here = slot.rare(|r| {
            r.lost_reply.is_some() && r.lost_reply.as_ref() == record.tokens.refresh_token()
        });
        let mut reason = match reason {
            InvalidationReason::InvalidGrant | InvalidationReason::Superseded
                if record.reply_lost() || lost_here =>
            {
                InvalidationReason::RotationLost
            }
            other => other,
        };
        let failed_refresh = record.tokens.refresh_token().cloned();
        let mut current = record;
        let mut dead_record = current.clone();
        for _ in 0..CAS_ATTEMPTS {
            dead_record = current.clone();
            let rare = dead_record.rare_mut();
            rare.state = GrantState::ReauthorizationRequired {
                reason: reason.clone(),
                since: Some(self.clock.now()),
            };
            rare.retry_not_before = None;
            rare.last_error = Some(dead(key, &reason).to_string().into());
            let saved = match self.store.save(key, &dead_record, Some(version)).await {
                Ok(saved) => saved,
                Err(e) => {
                    self.emit(Event::PersistFailed {
                        at: self.clock.now(),
                        key: key.clone(),
                        error: e,
                    });
                    // Before holding the death in memory, see whether the store moved on (a
                    // new grant inserted meanwhile must not be answered as dead).
                    if let Ok(Some(loaded)) = self.store.load(key).await {
                        if loaded.value.tokens.refresh_token() != failed_refresh.as_ref()
                            || loaded.value.dead_reason().is_some()
                        {
                            return self.adopt(key, slot, &loaded);
                        }
                    }
                    break;
                }
            };
            match saved {
                Cas::Saved(v) => {
                    self.cache(slot, &dead_record, v, None, true);
                    self.emit(Event::ReauthorizationRequired {
                        at: self.clock.now(),
                        key: key.clone(),
                        reason: reason.clone(),
                    });
                    return Err(dead(key, &reason));
                }
                Cas::Conflict => {
                    let loaded = match self.store.load(key).await {
                        Ok(Some(loaded)) => loaded,
                        Ok(None) => return Err(Error::NotFound { key: key.clone() }),
                        // The store changed (a peer's rotation? a new grant?) and cannot say
                        // how: not a death yet. The refused token is remembered here, so it is
                        // never presented again; the next refresh decides once the store reads.
                        Err(e) => {
                            if let Some(token) = failed_refresh.clone() {
                                slot.rare_mut(|r| r.refused = Some((token, reason.clone())));
                            }
                            return Err(e.into());
                        }
                    };
                    let cached = self.cache(slot, &loaded.value, loaded.version, None, true);
                    if let Some(reason) = cached.dead() {
                        // A peer already recorded the death (and sent the event).
                        return Err(dead(key, reason));
                    }
                    if loaded.value.tokens.refresh_token() != failed_refresh.as_ref() {
                        // A peer rotated (or a new grant arrived): adopt it.
                        return Ok(cached.tokens.clone());
                    }
                    version = loaded.version;
                    if loaded.value.reply_lost() {
                        if let InvalidationReason::InvalidGrant | InvalidationReason::Superseded =
                            reason
                        {
                            reason = InvalidationReason::RotationLost;
                        }
                    }
                    current = loaded.value;
                }
            }
        }
        // The store would not take it: the grant is dead here all the same.
        self.cache(slot, &dead_record, version, None, true);
        self.set_pending(key, slot, dead_record, version, failed_refresh);
        self.emit(Event::ReauthorizationRequired {
            at: self.clock.now(),
            key: key.clone(),
            reason: reason.clone(),
        });
        Err(dead(key, &reason))
    }

    /// The delay before the next attempt after `failures` consecutive failures.
    fn backoff(
        &self,
        failures: u32,
        provider_hint: Option<Duration>,
        rate_limited: bool,
    ) -> Duration {
        let base = self.config.backoff_base;
        let exp = base
            .checked_mul(1u32 << failures.saturating_sub(1).min(20))
            .unwrap_or(self.config.backoff_max)
            .min(self.config.backoff_max);
        // Equal jitter: between half and all of the exponential delay.
        let half = exp / 2;
        let jittered = half + half.mul_f64(fastrand::f64());
        match provider_hint {
            // A hint beyond a day is a malformed header, not advice to follow.
            Some(hint) => jittered.max(hint.min(MAX_PROVIDER_HINT)),
            // A rate limit without a hint: probing it quickly is what gets grants revoked at
            // some providers ("an unusual number of refresh requests").
            None if rate_limited => jittered.max(RATE_LIMIT_FLOOR),
            None => jittered.max(Duration::from_millis(100)),
        }
    }
}

/// A provider's call that panicked (its state is dropped with it).
struct Panicked;

/// Polls a provider's call, turning a panic into [`Panicked`].
struct CatchPanic<F>(F);

impl<F: Future + Unpin> Future for CatchPanic<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let call = &mut self.0;
        // Unwind safety: after a panic the call is never polled again, only dropped.
        match panic::catch_unwind(AssertUnwindSafe(|| Pin::new(call).poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(Panicked)),
        }
    }
}

/// A timeout, a connection dropped mid-reply, or a gateway saying the upstream's answer was
/// lost (502, 504): the provider may have executed the refresh and rotated.
fn reply_may_be_lost(failure: &ProviderError) -> bool {
    matches!(
        (failure.kind(), failure.status()),
        (
            ProviderErrorKind::Unavailable {
                cause: UnavailableCause::Timeout | UnavailableCause::Network,
                ..
            },
            None,
        ) | (ProviderErrorKind::Unavailable { .. }, Some(502 | 504))
    )
}

fn is_stale_token(failure: &ProviderError) -> bool {
    matches!(
        failure.kind(),
        ProviderErrorKind::Reauthorize(
            InvalidationReason::InvalidGrant | InvalidationReason::Superseded
        )
    )
}

/// Whether a failure says something about the grant (shared with every process through the
/// store) rather than about this process (kept local): a provider's rate limit, or a reply
/// from the provider saying it is in trouble. A misconfiguration, a network failure, a timeout
/// or a panicking provider are this process's own.
fn is_fact_about_the_grant(error: &Error) -> bool {
    match error {
        Error::RateLimited { .. } => true,
        Error::Unavailable { cause, status, .. } => {
            status.is_some()
                && matches!(
                    cause,
                    UnavailableCause::ServerError | UnavailableCause::UnexpectedStatus
                )
        }
        _ => false,
    }
}

/// Writing `ours` over `theirs` (a metadata-only change by a peer) must not erase a backoff
/// the peer recorded meanwhile (a provider's rate limit applies to the new tokens too).
fn keep_backoff(ours: &mut GrantRecord, theirs: &GrantRecord) {
    if theirs.retry_not_before() > ours.retry_not_before() {
        let (ours, theirs) = (ours.rare_mut(), theirs.rare());
        ours.retry_not_before = theirs.retry_not_before;
        ours.failed_at = theirs.failed_at;
        ours.failures = theirs.failures;
        ours.last_failure = theirs.last_failure.clone();
        ours.last_error = theirs.last_error.clone();
    }
}

/// Writing `ours` over `theirs` must not erase an expiry warning a refresher recorded
/// meanwhile: it would be sent again.
fn keep_warning(ours: &mut GrantRecord, theirs: &GrantRecord) {
    let (o, t) = (ours.rare().warned, theirs.rare().warned);
    if t.is_some() && o != t {
        let newer = match (o, t) {
            (Some(o), Some(t)) => t.sent_at() > o.sent_at(),
            _ => true,
        };
        if newer {
            ours.rare_mut().warned = t;
        }
    }
}

fn is_access_expiry_field(name: &str) -> bool {
    matches!(name, "expires_in" | "expires_at" | "access_token_expiry")
}

fn dead(key: &TokenKey, reason: &InvalidationReason) -> Error {
    Error::ReauthorizationRequired {
        key: key.clone(),
        reason: reason.clone(),
    }
}
