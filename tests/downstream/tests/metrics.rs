//! The `metrics` feature, as an application sees it: a scripted scenario, counted by `metrics-util`'s `DebuggingRecorder`
//! installed for this thread only (`metrics::with_local_recorder`), on a current-thread runtime
//! so every spawned refresh runs where the recorder is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::CompositeKey;
use tokenkeeper::testing::ManualClock;
use tokenkeeper::{
    provider_fn, AccessToken, Clock, InvalidationReason, MemoryStore, ProviderError, RefreshToken,
    TokenKey, TokenManager, TokenManagerBuilder, TokenResponse, TokenSet, UnavailableCause,
};

const HOUR: Duration = Duration::from_secs(3600);
const SECRETS: [&str; 6] = [
    "at-old",
    "rt-plain",
    "rt-rot",
    "rt-rot-2",
    "rt-flaky",
    "rt-doomed",
];

/// Refresh tokens say what the provider does: refresh, rotate, fail, or refuse.
fn builder(clock: &Arc<ManualClock>, store: &Arc<MemoryStore>) -> TokenManagerBuilder {
    let provider = provider_fn(|_key, tokens: TokenSet| async move {
        let fresh = TokenResponse::new(AccessToken::new("at-new"));
        match tokens.refresh_token().map(RefreshToken::secret) {
            Some("rt-rot") => Ok(fresh.with_refresh_token(RefreshToken::new("rt-rot-2"))),
            Some("rt-flaky") => Err(ProviderError::unavailable(UnavailableCause::ServerError)),
            Some("rt-doomed") => Err(ProviderError::reauthorize(InvalidationReason::InvalidGrant)),
            _ => Ok(fresh.with_expires(tokenkeeper::Expiry::In(HOUR * 24))),
        }
    });
    TokenManager::builder(provider)
        .clock(clock.clone())
        .store(store.clone())
}

/// Runs `scenario` on a paused current-thread runtime with a recorder for this thread, and
/// returns what was recorded (while what the scenario returns, its managers, is still alive).
fn recorded<T, F: std::future::Future<Output = T>>(
    scenario: impl FnOnce() -> F,
) -> HashMap<CompositeKey, DebugValue> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let _alive = metrics::with_local_recorder(&recorder, || runtime.block_on(scenario()));
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key, value))
        .collect()
}

fn labels_of(key: &CompositeKey) -> Vec<(String, String)> {
    let mut labels: Vec<_> = key
        .key()
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    labels
}

fn counter(
    metrics: &HashMap<CompositeKey, DebugValue>,
    name: &str,
    labels: &[(&str, &str)],
) -> u64 {
    metrics
        .iter()
        .filter(|(k, _)| k.key().name() == name)
        .filter(|(k, _)| {
            let have = labels_of(k);
            labels
                .iter()
                .all(|(n, v)| have.iter().any(|(hn, hv)| hn == n && hv == v))
        })
        .map(|(_, v)| match v {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn gauge(metrics: &HashMap<CompositeKey, DebugValue>, health: &str) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| k.key().name() == "tokenkeeper.grants")
        .filter(|(k, _)| labels_of(k) == [("health".to_owned(), health.to_owned())])
        .map(|(_, v)| match v {
            DebugValue::Gauge(g) => g.into_inner(),
            other => panic!("not a gauge: {other:?}"),
        })
        .sum()
}

fn samples(metrics: &HashMap<CompositeKey, DebugValue>, name: &str, label: (&str, &str)) -> usize {
    metrics
        .iter()
        .filter(|(k, _)| k.key().name() == name)
        .filter(|(k, _)| {
            labels_of(k)
                .iter()
                .any(|(n, v)| n == label.0 && v == label.1)
        })
        .map(|(_, v)| match v {
            DebugValue::Histogram(h) => h.len(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .sum()
}

fn grant(clock: &ManualClock, refresh: &str) -> TokenSet {
    TokenSet::new(AccessToken::new("at-old"))
        .with_refresh_token(RefreshToken::new(refresh))
        .with_expires_at(clock.now() + 2 * HOUR)
}

#[test]
fn a_scripted_scenario_is_counted_by_outcome_and_reason() {
    let metrics = recorded(|| async {
        let clock = Arc::new(ManualClock::fixed());
        let store = Arc::new(MemoryStore::new());
        let a = builder(&clock, &store).build();
        let peer = builder(&clock, &store).build();
        let key = |k: &str| TokenKey::from(k);
        for (k, rt) in [
            ("plain", "rt-plain"),
            ("rot", "rt-rot"),
            ("flaky", "rt-flaky"),
            ("doomed", "rt-doomed"),
        ] {
            a.insert(key(k), grant(&clock, rt)).await.unwrap();
        }
        // The peer reads "plain" while it is fresh (a miss: it has not seen it), `a` from its
        // cache (a hit).
        peer.access_token(&key("plain")).await.unwrap();
        a.access_token(&key("plain")).await.unwrap();

        clock.advance(3 * HOUR);
        // One refresh; the peer, holding the old token, adopts it from the store.
        a.access_token(&key("plain")).await.unwrap();
        let adopted = peer.access_token(&key("plain")).await.unwrap();
        assert_eq!(adopted.secret(), "at-new");
        // One rotation, one failure, one death.
        a.access_token(&key("rot")).await.unwrap();
        assert!(a
            .access_token(&key("flaky"))
            .await
            .unwrap_err()
            .is_retryable());
        assert!(a
            .access_token(&key("doomed"))
            .await
            .unwrap_err()
            .is_reauth_required());
        a.access_token(&key("plain")).await.unwrap(); // a hit
        drop(peer); // takes its one grant out of the gauge
        a
    });

    let attempts =
        |labels: &[(&str, &str)]| counter(&metrics, "tokenkeeper.refresh.attempts", labels);
    assert_eq!(attempts(&[("outcome", "refreshed")]), 1);
    assert_eq!(attempts(&[("outcome", "rotated")]), 1);
    assert_eq!(attempts(&[("outcome", "adopted")]), 1);
    assert_eq!(
        attempts(&[("outcome", "failed"), ("reason", "unavailable")]),
        1
    );
    assert_eq!(
        attempts(&[("outcome", "dead"), ("reason", "invalid_grant")]),
        1
    );
    assert_eq!(attempts(&[]), 5, "nothing else was counted");

    let requests = |cache| {
        counter(
            &metrics,
            "tokenkeeper.access_token.requests",
            &[("cache", cache)],
        )
    };
    assert_eq!(requests("hit"), 2);
    assert_eq!(requests("miss"), 6);

    // Four provider calls (the adoption made none): two answers, two refusals.
    assert_eq!(
        samples(&metrics, "tokenkeeper.provider.duration", ("result", "ok")),
        2
    );
    assert_eq!(
        samples(
            &metrics,
            "tokenkeeper.provider.duration",
            ("result", "error")
        ),
        2
    );
    assert_eq!(
        samples(
            &metrics,
            "tokenkeeper.refresh.duration",
            ("outcome", "adopted")
        ),
        1
    );
    assert!(samples(&metrics, "tokenkeeper.store.duration", ("op", "load")) > 0);
    assert!(samples(&metrics, "tokenkeeper.store.duration", ("op", "save")) >= 4);
    let lock_waits: usize = metrics
        .iter()
        .filter(|(k, _)| k.key().name() == "tokenkeeper.lock.wait")
        .map(|(_, v)| match v {
            DebugValue::Histogram(h) => h.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(lock_waits, 5, "one refresh lock per refresh run");
    assert_eq!(counter(&metrics, "tokenkeeper.store.errors", &[]), 0);

    // `a` knows four grants; the dropped peer's count is gone.
    assert_eq!(gauge(&metrics, "active"), 2.0);
    assert_eq!(gauge(&metrics, "backing_off"), 1.0);
    assert_eq!(gauge(&metrics, "reauthorization_required"), 1.0);

    // No key, no token in any label, unless asked for.
    for key in metrics.keys() {
        for (name, value) in labels_of(key) {
            assert_ne!(name, "key");
            for secret in SECRETS {
                assert!(!value.contains(secret), "{name}={value}");
            }
        }
    }
}

#[test]
fn the_key_is_a_label_only_when_asked_for() {
    let metrics = recorded(|| async {
        let clock = Arc::new(ManualClock::fixed());
        let store = Arc::new(MemoryStore::new());
        let manager = builder(&clock, &store).metrics_key_label(true).build();
        let key = TokenKey::from("customer-42");
        manager
            .insert(key.clone(), grant(&clock, "rt-rot"))
            .await
            .unwrap();
        clock.advance(3 * HOUR);
        manager.access_token(&key).await.unwrap();
        manager
    });
    assert_eq!(
        counter(
            &metrics,
            "tokenkeeper.refresh.attempts",
            &[("outcome", "rotated"), ("key", "customer-42")]
        ),
        1
    );
    // Only the refresh metrics carry it.
    for key in metrics.keys() {
        let has_key = labels_of(key).iter().any(|(n, _)| n == "key");
        assert_eq!(
            has_key,
            key.key().name().starts_with("tokenkeeper.refresh."),
            "{key:?}"
        );
    }
}
