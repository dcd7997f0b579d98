//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! Every hook the engine calls is a one-line call into this module; without the feature each
//! one is an empty inline function and the per-manager state is zero-sized.
//!
//! The names, kinds and labels are listed in one table in the crate docs ("Metrics") and in
//! the README; keep both in step with this module.

use std::future::Future;
use std::time::Duration;

#[cfg(feature = "metrics")]
use std::cell::RefCell;
#[cfg(feature = "metrics")]
use std::sync::Arc;

#[cfg(feature = "metrics")]
use crate::error::StoreError;
use crate::error::{Error, Result};
use crate::store::TokenStore;
use crate::token::TokenKey;

/// A grant's health as counted by the `tokenkeeper.grants` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Active,
    BackingOff,
    Dead,
}

/// Per-manager metric state (zero-sized without the feature).
#[derive(Default)]
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    key_label: bool,
    /// Each grant's health as last counted, so the gauge moves by transitions and sums
    /// correctly over several managers. Changed on loads and refreshes only (never on the fast
    /// path), so a plain lock.
    #[cfg(feature = "metrics")]
    health: std::sync::Mutex<std::collections::HashMap<TokenKey, Health>>,
}

impl Metrics {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(key_label: bool) -> Self {
        Self {
            #[cfg(feature = "metrics")]
            key_label,
            #[cfg(feature = "metrics")]
            health: Default::default(),
        }
    }

    /// Access served from memory (`hit`) or not.
    #[inline(always)]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn cache(&self, hit: bool) {
        #[cfg(feature = "metrics")]
        metrics::counter!(
            "tokenkeeper.access_token.requests",
            "cache" => if hit { "hit" } else { "miss" }
        )
        .increment(1);
    }

    /// One refresh run ended with `outcome` after `elapsed` (the run's notes say how).
    #[inline(always)]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn refresh<T>(&self, key: &TokenKey, outcome: &Result<T>, elapsed: Duration) {
        #[cfg(feature = "metrics")]
        {
            let note = NOTE.try_with(|n| n.borrow().clone()).unwrap_or_default();
            let (outcome, reason) = classify(&note, outcome);
            let mut labels = vec![metrics::Label::new("outcome", outcome)];
            if let Some(reason) = reason {
                labels.push(metrics::Label::new("reason", reason));
            }
            let mut timing = vec![metrics::Label::new("outcome", outcome)];
            if self.key_label {
                labels.push(metrics::Label::new("key", key.as_str().to_owned()));
                timing.push(metrics::Label::new("key", key.as_str().to_owned()));
            }
            metrics::counter!("tokenkeeper.refresh.attempts", labels).increment(1);
            metrics::histogram!("tokenkeeper.refresh.duration", timing)
                .record(elapsed.as_secs_f64());
        }
    }

    /// `key` is now `health()` (`None`: forgotten). `health` is only called with the feature.
    #[inline(always)]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn health(&self, key: &TokenKey, health: impl FnOnce() -> Option<Health>) {
        #[cfg(feature = "metrics")]
        {
            let health = health();
            let before = {
                let mut known = self.health.lock().unwrap_or_else(|e| e.into_inner());
                match (health, known.get_mut(key)) {
                    (Some(h), Some(known)) => Some(std::mem::replace(known, h)),
                    (Some(h), None) => known.insert(key.clone(), h),
                    (None, _) => known.remove(key),
                }
            };
            if before != health {
                if let Some(before) = before {
                    metrics::gauge!("tokenkeeper.grants", "health" => health_label(before))
                        .decrement(1.0);
                }
                if let Some(now) = health {
                    metrics::gauge!("tokenkeeper.grants", "health" => health_label(now))
                        .increment(1.0);
                }
            }
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for Metrics {
    /// A manager that goes away takes its grants out of the gauge.
    fn drop(&mut self) {
        let known = self.health.get_mut().unwrap_or_else(|e| e.into_inner());
        for health in known.values() {
            metrics::gauge!("tokenkeeper.grants", "health" => health_label(*health)).decrement(1.0);
        }
    }
}

#[cfg(feature = "metrics")]
fn health_label(health: Health) -> &'static str {
    match health {
        Health::Active => "active",
        Health::BackingOff => "backing_off",
        Health::Dead => "reauthorization_required",
    }
}

/// What a refresh run noted about itself on the way (read when it ends).
#[cfg(feature = "metrics")]
#[derive(Debug, Clone, Default)]
struct Note {
    /// As recorded on the span, unless [`outcome_as`] said otherwise.
    outcome: Option<&'static str>,
    rotated: bool,
    /// The class of the failure handled, if one was.
    failure: Option<&'static str>,
}

#[cfg(feature = "metrics")]
tokio::task_local! {
    static NOTE: RefCell<Note>;
}

/// Runs one refresh with room for its notes.
#[cfg(feature = "metrics")]
pub(crate) async fn scope<F: Future>(run: F) -> F::Output {
    NOTE.scope(RefCell::new(Note::default()), run).await
}

/// Runs one refresh (nothing to note without the feature).
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn scope<F: Future>(run: F) -> F {
    run
}

/// Records the run's outcome on the refresh span, and notes it for the metrics.
#[inline(always)]
pub(crate) fn outcome(span: &tracing::Span, outcome: &'static str) {
    span.record("outcome", outcome);
    #[cfg(feature = "metrics")]
    let _ = NOTE.try_with(|n| n.borrow_mut().outcome = Some(outcome));
}

/// Records `outcome` on the refresh span, but notes `noted` for the metrics (the span's words
/// are coarser: "dead" for a grant found dead as well as one declared dead).
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn outcome_as(span: &tracing::Span, outcome: &'static str, noted: &'static str) {
    span.record("outcome", outcome);
    #[cfg(feature = "metrics")]
    let _ = NOTE.try_with(|n| n.borrow_mut().outcome = Some(noted));
}

/// Notes the class of the failure a refresh handled.
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn failure(error: &Error) {
    #[cfg(feature = "metrics")]
    let _ = NOTE.try_with(|n| n.borrow_mut().failure = Some(error_class(error)));
}

/// Records whether the refresh rotated on the span, and notes it for the metrics.
#[inline(always)]
pub(crate) fn rotated(span: &tracing::Span, rotated: bool) {
    span.record("rotated", rotated);
    #[cfg(feature = "metrics")]
    let _ = NOTE.try_with(|n| n.borrow_mut().rotated = rotated);
}

/// One provider call took `elapsed`; `timed_out` / `panicked` say how it ended if not by itself.
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn provider_call<T, E>(
    elapsed: Duration,
    result: &std::result::Result<T, E>,
    how: ProviderEnd,
) {
    #[cfg(feature = "metrics")]
    {
        let label = match (how, result.is_ok()) {
            (ProviderEnd::Timeout, _) => "timeout",
            (ProviderEnd::Panic, _) => "panic",
            (ProviderEnd::Returned, true) => "ok",
            (ProviderEnd::Returned, false) => "error",
        };
        metrics::histogram!("tokenkeeper.provider.duration", "result" => label)
            .record(elapsed.as_secs_f64());
    }
}

/// How a provider call ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ProviderEnd {
    Returned,
    Timeout,
    Panic,
}

/// The store the manager calls: with the feature, wrapped to time each call and count errors
/// and lost compare-and-swaps (every method forwarded, [`TokenStore::lock`] included).
pub(crate) fn instrument(store: std::sync::Arc<dyn TokenStore>) -> std::sync::Arc<dyn TokenStore> {
    #[cfg(feature = "metrics")]
    {
        Arc::new(Metered(store))
    }
    #[cfg(not(feature = "metrics"))]
    {
        store
    }
}

#[cfg(feature = "metrics")]
fn classify<T>(note: &Note, outcome: &Result<T>) -> (&'static str, Option<&'static str>) {
    const SKIPS: [&str; 4] = [
        "backoff",
        "not_refreshable",
        "refresh_token_expired",
        "already_dead",
    ];
    let skipped = |noted: &'static str| match noted {
        "already_dead" => ("skipped", Some("dead")),
        other => ("skipped", Some(other)),
    };
    match (note.outcome, outcome) {
        (Some(noted), _) if SKIPS.contains(&noted) => skipped(noted),
        // Declared dead by this run.
        (Some("dead"), Err(Error::ReauthorizationRequired { reason, .. })) => {
            ("dead", Some(reason.label()))
        }
        // A death held in memory, answered while the store is unreachable.
        (_, Err(Error::ReauthorizationRequired { .. })) => skipped("already_dead"),
        // About to be declared dead, a peer's rotation was found in the store.
        (Some("dead" | "adopted"), Ok(_)) => ("adopted", None),
        (Some("rate_limited"), _) => ("failed", Some("rate_limited")),
        // A failure while a still-valid token is served.
        (Some("failed"), Ok(_)) => ("failed", Some(note.failure.unwrap_or("unavailable"))),
        (_, Err(e)) => ("failed", Some(error_class(e))),
        (_, Ok(_)) if note.rotated => ("rotated", None),
        (_, Ok(_)) => ("refreshed", None),
    }
}

#[cfg(feature = "metrics")]
fn error_class(error: &Error) -> &'static str {
    match error {
        Error::RateLimited { .. } => "rate_limited",
        Error::Misconfigured { .. } => "misconfigured",
        Error::Store(_) => "store",
        Error::NotFound { .. } => "not_found",
        Error::ReauthorizationRequired { .. } => "dead",
        _ => "unavailable",
    }
}

/// Times the manager's store calls (feature `metrics`).
#[cfg(feature = "metrics")]
struct Metered(Arc<dyn TokenStore>);

#[cfg(feature = "metrics")]
fn timed<T>(
    op: &'static str,
    started: std::time::Instant,
    result: std::result::Result<T, StoreError>,
) -> std::result::Result<T, StoreError> {
    metrics::histogram!("tokenkeeper.store.duration", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("tokenkeeper.store.errors", "op" => op).increment(1);
    }
    result
}

#[cfg(feature = "metrics")]
#[async_trait::async_trait]
impl TokenStore for Metered {
    async fn load(
        &self,
        key: &TokenKey,
    ) -> std::result::Result<Option<crate::store::Versioned<crate::store::GrantRecord>>, StoreError>
    {
        let started = std::time::Instant::now();
        timed("load", started, self.0.load(key).await)
    }

    async fn save(
        &self,
        key: &TokenKey,
        record: &crate::store::GrantRecord,
        expected: Option<crate::store::Version>,
    ) -> std::result::Result<crate::store::Cas, StoreError> {
        let started = std::time::Instant::now();
        let saved = timed("save", started, self.0.save(key, record, expected).await);
        if let Ok(crate::store::Cas::Conflict) = saved {
            metrics::counter!("tokenkeeper.store.conflicts").increment(1);
        }
        saved
    }

    async fn delete(&self, key: &TokenKey) -> std::result::Result<bool, StoreError> {
        let started = std::time::Instant::now();
        timed("delete", started, self.0.delete(key).await)
    }

    async fn keys(&self) -> std::result::Result<Vec<TokenKey>, StoreError> {
        let started = std::time::Instant::now();
        timed("keys", started, self.0.keys().await)
    }

    async fn keys_after(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> std::result::Result<Vec<TokenKey>, StoreError> {
        let started = std::time::Instant::now();
        timed("keys_after", started, self.0.keys_after(after, limit).await)
    }

    /// Forwarded (the inner store's lock holds); its wait is `tokenkeeper.lock.wait`.
    async fn lock(
        &self,
        key: &TokenKey,
        ttl: Duration,
    ) -> std::result::Result<Option<Box<dyn crate::store::RefreshLock>>, StoreError> {
        let started = std::time::Instant::now();
        let lock = self.0.lock(key, ttl).await;
        metrics::histogram!("tokenkeeper.lock.wait").record(started.elapsed().as_secs_f64());
        match lock {
            Ok(Some(lock)) => Ok(Some(Box::new(MeteredLock(lock)))),
            Ok(None) => Ok(None),
            Err(e) => {
                metrics::counter!("tokenkeeper.store.errors", "op" => "lock").increment(1);
                Err(e)
            }
        }
    }
}

#[cfg(feature = "metrics")]
struct MeteredLock(Box<dyn crate::store::RefreshLock>);

#[cfg(feature = "metrics")]
#[async_trait::async_trait]
impl crate::store::RefreshLock for MeteredLock {
    async fn release(self: Box<Self>) -> std::result::Result<(), StoreError> {
        let started = std::time::Instant::now();
        timed("release", started, self.0.release().await)
    }
}
