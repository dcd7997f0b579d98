//! One refresh of one grant: lock, re-read, call, classify, save.

use std::time::{Duration, Instant};

use tracing::{field, Instrument};

use super::{Inner, Need, Outcome, Slot};
use crate::error::{Error, InvalidationReason, ProviderError};
use crate::event::Event;
use crate::provider::RefreshRequest;
use crate::store::{Cas, GrantRecord, GrantState, StoredFailure, Version, Versioned};
use crate::token::TokenKey;

/// The least wait after a rate limit that came without `Retry-After`.
const RATE_LIMIT_FLOOR: Duration = Duration::from_secs(60);

/// The longest `Retry-After` or penalty honoured.
const MAX_PROVIDER_HINT: Duration = Duration::from_secs(24 * 3600);

/// How many times a lost compare-and-swap is retried before giving up.
const CAS_ATTEMPTS: usize = 8;

impl Inner {
    /// Runs on a spawned task; the single refresh of `key` in this process.
    pub(super) async fn run_refresh(&self, key: &TokenKey, slot: &Slot, need: Need) -> Outcome {
        let span = tracing::info_span!(
            "tokenkeeper.refresh",
            key = %key,
            outcome = field::Empty,
            status = field::Empty,
            rotated = field::Empty,
            duration_ms = field::Empty,
        );
        async {
            let started = Instant::now();
            let lock = self.store.lock(key, self.config.lock_ttl).await?;
            let outcome = self.refresh_locked(key, slot, need).await;
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
            outcome
        }
        .instrument(span)
        .await
    }

    async fn refresh_locked(&self, key: &TokenKey, slot: &Slot, need: Need) -> Outcome {
        let span = tracing::Span::current();
        let Some(Versioned {
            version,
            value: record,
        }) = self.load_persisting_unsaved(key, slot).await?
        else {
            slot.cached.store(None);
            return Err(Error::NotFound { key: key.clone() });
        };
        let cached = self.cache(slot, &record, version, None);
        if let Some(reason) = record.dead_reason() {
            span.record("outcome", "dead");
            return Err(dead(key, reason));
        }
        let now = self.clock.now();
        // Invariant 2: a peer may have refreshed while this task waited.
        if need.satisfied_by(&record.tokens, now, self.config.refresh_margin) {
            span.record("outcome", "adopted");
            return Ok(cached.tokens.clone());
        }
        if let Some(held) = cached.held_by_backoff(key, &need, now) {
            span.record("outcome", "backoff");
            return held;
        }
        if record.tokens.is_refresh_token_expired(now) {
            // No refresh can succeed, but the access token works until it expires (unless the
            // API already rejected it): the grant dies then, not before.
            if !record.tokens.is_expired(now) && !matches!(need, Need::Rejected(_)) {
                span.record("outcome", "refresh_token_expired");
                return Ok(cached.tokens.clone());
            }
            span.record("outcome", "dead");
            return self
                .mark_dead(
                    key,
                    slot,
                    record,
                    version,
                    InvalidationReason::RefreshTokenExpired,
                )
                .await;
        }

        let result = self
            .provider
            .refresh(RefreshRequest {
                key,
                tokens: &record.tokens,
                now,
            })
            .await;
        match result {
            Ok(response) => {
                // Invariant 7: relative lifetimes count from the response.
                let now = self.clock.now();
                let tokens = record.tokens.apply(response, now);
                let rotated = tokens.refresh_token() != record.tokens.refresh_token();
                let expires_at = tokens.expires_at();
                let mut fresh = GrantRecord::new(tokens);
                fresh.last_refresh = Some(now);
                span.record("rotated", rotated);
                let outcome = self
                    .save_refreshed(key, slot, fresh, &record, version)
                    .await;
                if outcome.is_ok() {
                    span.record("outcome", "refreshed");
                    self.emit(Event::Refreshed {
                        key: key.clone(),
                        rotated,
                        expires_at,
                    });
                }
                outcome
            }
            Err(failure) => {
                if let Some(status) = failure.status() {
                    span.record("status", status);
                }
                self.handle_failure(key, slot, record, version, failure, need)
                    .await
            }
        }
    }

    /// Loads the record; first saves a refreshed record whose earlier save failed, so a
    /// rotated refresh token is never replaced by the spent one still in the store.
    async fn load_persisting_unsaved(
        &self,
        key: &TokenKey,
        slot: &Slot,
    ) -> Result<Option<Versioned<GrantRecord>>, Error> {
        let loaded = self.store.load(key).await?;
        let unsaved = slot
            .unsaved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (Some((record, base)), Some(current)) = (unsaved, &loaded) else {
            return Ok(loaded);
        };
        if current.version != base {
            // The store moved on without us (a new grant was inserted); its state wins.
            *slot.unsaved.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(loaded);
        }
        match self.store.save(key, &record, Some(base)).await {
            Ok(Cas::Saved(version)) => {
                *slot.unsaved.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(Some(Versioned {
                    version,
                    value: record,
                }))
            }
            Ok(Cas::Conflict) => Ok(self.store.load(key).await?),
            Err(e) => {
                self.emit(Event::PersistFailed {
                    key: key.clone(),
                    error: e.clone(),
                });
                Err(e.into())
            }
        }
    }

    /// Invariant 3: saves the refreshed record (compare-and-swap) before anyone sees it.
    async fn save_refreshed(
        &self,
        key: &TokenKey,
        slot: &Slot,
        fresh: GrantRecord,
        base: &GrantRecord,
        mut expected: Version,
    ) -> Outcome {
        let mut last_error = None;
        let mut store_failures = 0;
        for _ in 0..CAS_ATTEMPTS {
            match self.store.save(key, &fresh, Some(expected)).await {
                Ok(Cas::Saved(version)) => {
                    slot.used.store(false, std::sync::atomic::Ordering::Relaxed);
                    return Ok(self.cache(slot, &fresh, version, None).tokens.clone());
                }
                Ok(Cas::Conflict) => {
                    let current = self.store.load(key).await?;
                    match current {
                        // Only metadata changed (a peer recorded a failure): keep our tokens.
                        Some(c)
                            if c.value.tokens.refresh_token() == base.tokens.refresh_token()
                                && c.value.dead_reason().is_none() =>
                        {
                            expected = c.version;
                        }
                        // A new grant was inserted, or a peer refreshed too: the store wins.
                        Some(c) => {
                            let cached = self.cache(slot, &c.value, c.version, None);
                            return match &cached.dead {
                                Some(reason) => Err(dead(key, reason)),
                                None => Ok(cached.tokens.clone()),
                            };
                        }
                        None => return Err(Error::NotFound { key: key.clone() }),
                    }
                }
                Err(e) => {
                    self.emit(Event::PersistFailed {
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
        *slot.unsaved.lock().unwrap_or_else(|e| e.into_inner()) = Some((fresh, expected));
        Err(match last_error {
            Some(e) => e.into(),
            None => Error::Unavailable {
                key: key.clone(),
                cause: crate::error::UnavailableCause::Internal,
                status: None,
                retry_after: None,
                source: None,
            },
        })
    }

    async fn handle_failure(
        &self,
        key: &TokenKey,
        slot: &Slot,
        record: GrantRecord,
        version: Version,
        failure: ProviderError,
        need: Need,
    ) -> Outcome {
        let span = tracing::Span::current();
        let error = failure.into_error(key);
        if let Error::ReauthorizationRequired { reason, .. } = &error {
            span.record("outcome", "dead");
            return self
                .mark_dead(key, slot, record, version, reason.clone())
                .await;
        }
        span.record(
            "outcome",
            if matches!(error, Error::RateLimited { .. }) {
                "rate_limited"
            } else {
                "failed"
            },
        );
        let now = self.clock.now();
        let failures = record.failures.saturating_add(1);
        let rate_limited = matches!(error, Error::RateLimited { .. });
        let delay = self.backoff(failures, error.retry_after(), rate_limited);
        let retry_at = now.checked_add(delay).unwrap_or(now);
        let error = error.with_retry_after(delay);
        let mut held = record.clone();
        held.failures = failures;
        held.retry_not_before = Some(retry_at);
        held.last_error = Some(error.to_string());
        held.last_failure = StoredFailure::of(&error);
        let version = match self.store.save(key, &held, Some(version)).await {
            Ok(Cas::Saved(v)) => v,
            // A peer changed the record; our backoff still holds in this process.
            Ok(Cas::Conflict) => version,
            Err(e) => {
                self.emit(Event::PersistFailed {
                    key: key.clone(),
                    error: e,
                });
                version
            }
        };
        let cached = self.cache(slot, &held, version, Some(error.clone()));
        self.emit(Event::RefreshFailed {
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
    /// if not, persist it as dead (once) so nobody sends it to the provider again.
    async fn mark_dead(
        &self,
        key: &TokenKey,
        slot: &Slot,
        record: GrantRecord,
        mut version: Version,
        reason: InvalidationReason,
    ) -> Outcome {
        let failed_refresh = record.tokens.refresh_token().cloned();
        let mut current = record;
        for _ in 0..CAS_ATTEMPTS {
            let mut dead_record = current.clone();
            dead_record.state = GrantState::ReauthorizationRequired {
                reason: reason.clone(),
                since: Some(self.clock.now()),
            };
            dead_record.retry_not_before = None;
            dead_record.last_error = Some(dead(key, &reason).to_string());
            match self.store.save(key, &dead_record, Some(version)).await? {
                Cas::Saved(v) => {
                    self.cache(slot, &dead_record, v, None);
                    self.emit(Event::ReauthorizationRequired {
                        key: key.clone(),
                        reason: reason.clone(),
                    });
                    return Err(dead(key, &reason));
                }
                Cas::Conflict => {
                    let Some(loaded) = self.store.load(key).await? else {
                        return Err(Error::NotFound { key: key.clone() });
                    };
                    let cached = self.cache(slot, &loaded.value, loaded.version, None);
                    if let Some(reason) = &cached.dead {
                        // A peer already recorded the death (and sent the event).
                        return Err(dead(key, reason));
                    }
                    if loaded.value.tokens.refresh_token() != failed_refresh.as_ref() {
                        // A peer rotated (or a new grant arrived): adopt it.
                        return Ok(cached.tokens.clone());
                    }
                    version = loaded.version;
                    current = loaded.value;
                }
            }
        }
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

fn dead(key: &TokenKey, reason: &InvalidationReason) -> Error {
    Error::ReauthorizationRequired {
        key: key.clone(),
        reason: reason.clone(),
    }
}
