//! The scenario table of issue 3, run against both presets of the fake authorization server:
//! a Constant Contact-style RFC 6749 endpoint (through `OAuth2Provider`) and a Xoxoday-style
//! JSON endpoint (through the custom `support::XoxodayProvider`).
//!
//! | scenario | test |
//! |---|---|
//! | expiry → exactly one refresh, however many callers | `expiry_is_one_refresh_for_fifty_callers` |
//! | rotation saved | `rotation_is_saved_and_used_next_time` |
//! | reuse detection never triggered by the manager | `two_managers_ten_expiries_never_trigger_reuse_detection` |
//! | each invalidation → its typed error | `revoked`, `password_reset`, `superseded`, `refresh_token_expired`, `refresh_lifetime_runs_out` |
//! | rate limit → backoff, no storm | `rate_limit_backs_off_without_a_storm`, `rate_limit_retry_after_is_honoured` |
//! | lost reply → typed, retryable error; next attempt | `lost_reply_without_grace_ends_in_reuse_detection`, `lost_reply_with_grace_window_recovers` |
//!
//! Each scenario is an `async fn(Preset)`; `for_both_presets!` turns it into one test per
//! preset (`constant_contact::<scenario>` and `xoxoday::<scenario>`).
//!
//! Time: one `Arc<ManualClock>` is shared by the manager and the server, and days pass by
//! advancing it. These tests talk HTTP on loopback, so they run on real tokio time (a paused
//! tokio clock would fire reqwest's timeouts while a socket waits) and never sleep.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use support::{drain, XoxodayProvider};
use tokenkeeper::testing::{
    FakeAuthServer, FakeConfig, GrantId, GrantState as ServerGrantState, IssuedGrant, ManualClock,
    RateLimit, RefreshLifetime, RefreshOutcome, RetryAfter, RevocationReason, Rotation,
};
use tokenkeeper::{
    AccessToken, Clock, Error, Event, GrantHealth, GrantRecord, InvalidationReason, MemoryStore,
    Provider, RefreshToken, TokenKey, TokenManager, TokenSet, TokenStore,
};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

// ---------------------------------------------------------------------------------------------
// The two presets
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Preset {
    /// Standard OAuth2 (form + Basic), 24 h access tokens, 180-day sliding refresh tokens,
    /// rotating; every refresh-token failure is `400 invalid_grant`.
    ConstantContact,
    /// JSON with the secret in the body, 15-day access tokens, refresh tokens dying 30 days
    /// after the grant was issued, rotating without grace; dead-token replies are `401` bodies.
    Xoxoday,
}

impl Preset {
    fn config(self) -> FakeConfig {
        match self {
            Preset::ConstantContact => FakeConfig::constant_contact(),
            Preset::Xoxoday => FakeConfig::xoxoday(),
        }
    }

    /// The preset, with refresh tokens that rotation renews. Xoxoday's default absolute
    /// 30-day deadline would end the grant at the second 15-day expiry; scenarios that need
    /// many expiries use a 30-day lifetime per refresh token instead (the provider's docs allow
    /// either reading). The deadline itself is `refresh_lifetime_runs_out`'s business.
    fn renewing_config(self) -> FakeConfig {
        match self {
            Preset::ConstantContact => self.config(),
            Preset::Xoxoday => self
                .config()
                .with_refresh_lifetime(RefreshLifetime::Sliding(30 * DAY)),
        }
    }

    fn provider(self, server: &FakeAuthServer) -> Arc<dyn Provider> {
        match self {
            Preset::ConstantContact => Arc::new(support::oauth2_provider(server)),
            Preset::Xoxoday => {
                Arc::new(XoxodayProvider::new(server).with_timeout(Duration::from_secs(10)))
            }
        }
    }

    /// The reason the manager must give when the server answers a dead refresh token other
    /// than after a password reset (revoked, superseded, expired on the server, reused).
    ///
    /// Constant Contact answers all of them with `400 invalid_grant` → `InvalidGrant`. The
    /// Xoxoday-style server answers all of them with
    /// `401 {"error":"invalid_token","error_description":"invalid/expired token"}` (see
    /// `src/testing/fake_server/wire.rs`), the documented body for "another super admin
    /// generated a new token", which `XoxodayClassifier` maps to `Superseded`: the wire gives
    /// the client no way to tell these apart.
    fn dead_token_reason(self) -> InvalidationReason {
        match self {
            Preset::ConstantContact => InvalidationReason::InvalidGrant,
            Preset::Xoxoday => InvalidationReason::Superseded,
        }
    }
}

/// One scenario per preset, as `constant_contact::<name>` and `xoxoday::<name>`.
macro_rules! for_both_presets {
    ($($scenario:ident),* $(,)?) => {
        mod constant_contact {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Preset::ConstantContact).await;
                }
            )*
        }
        mod xoxoday {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Preset::Xoxoday).await;
                }
            )*
        }
    };
}

for_both_presets!(
    expiry_is_one_refresh_for_fifty_callers,
    rotation_is_saved_and_used_next_time,
    two_managers_ten_expiries_never_trigger_reuse_detection,
    revoked,
    password_reset,
    superseded,
    refresh_token_expired,
    refresh_lifetime_runs_out,
    rate_limit_backs_off_without_a_storm,
    rate_limit_retry_after_is_honoured,
    lost_reply_without_grace_ends_in_reuse_detection,
    lost_reply_with_grace_window_recovers,
);

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// A fake server, a manager on a shared memory store, one clock for both, and one grant
/// issued by the server and inserted into the manager.
struct Fixture {
    preset: Preset,
    clock: Arc<ManualClock>,
    server: FakeAuthServer,
    store: Arc<MemoryStore>,
    manager: TokenManager,
    grant: GrantId,
    first: IssuedGrant,
    key: TokenKey,
}

impl Fixture {
    async fn new(preset: Preset) -> Self {
        Self::with_config(preset, preset.config()).await
    }

    async fn with_config(preset: Preset, config: FakeConfig) -> Self {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(config, clock.clone()).await;
        let store = Arc::new(MemoryStore::new());
        let manager = TokenManager::builder(preset.provider(&server))
            .store(store.clone())
            .clock(clock.clone())
            .build();
        let first = server.issue_grant();
        let fixture = Self {
            preset,
            clock,
            store,
            manager,
            grant: first.grant,
            key: TokenKey::from("customer-42"),
            server,
            first,
        };
        fixture
            .manager
            .insert(fixture.key.clone(), fixture.token_set(&fixture.first))
            .await
            .expect("insert");
        fixture
    }

    /// The grant as the application receives it: from Constant Contact's callback (a token
    /// response, which states no refresh-token expiry), or copied from Xoxoday's dashboard
    /// (which shows both expiries).
    fn token_set(&self, issued: &IssuedGrant) -> TokenSet {
        let tokens = TokenSet::new(AccessToken::new(issued.access_token.clone()))
            .with_refresh_token(RefreshToken::new(issued.refresh_token.clone()))
            .with_expires_at(issued.access_expires_at);
        match (self.preset, issued.refresh_expires_at) {
            (Preset::Xoxoday, Some(at)) => tokens.with_refresh_expires_at(at),
            _ => tokens,
        }
    }

    /// Another manager (another worker or process) on the same store and clock.
    fn peer(&self) -> TokenManager {
        TokenManager::builder(self.preset.provider(&self.server))
            .store(self.store.clone())
            .clock(self.clock.clone())
            .build()
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Lets the access token the server issues expire.
    fn pass_access_lifetime(&self) {
        self.clock.advance(self.server.config().access_lifetime());
    }

    fn calls(&self) -> usize {
        self.server.refresh_calls()
    }

    async fn stored(&self) -> GrantRecord {
        self.store
            .load(&self.key)
            .await
            .expect("load")
            .expect("the grant is stored")
            .value
    }

    async fn stored_refresh_token(&self) -> String {
        self.stored()
            .await
            .tokens()
            .refresh_token()
            .expect("a refresh token is stored")
            .secret()
            .to_owned()
    }

    fn server_refresh_token(&self) -> String {
        self.server
            .current_refresh_token(&self.grant)
            .expect("the grant is alive on the server")
    }

    fn outcomes(&self) -> Vec<RefreshOutcome> {
        self.server.requests().iter().map(|r| r.outcome).collect()
    }

    /// `n` concurrent `access_token` callers on `manager`.
    async fn access_tokens(&self, manager: &TokenManager, n: usize) -> Vec<Result<String, Error>> {
        concurrently(n, || {
            let (manager, key) = (manager.clone(), self.key.clone());
            async move {
                manager
                    .access_token(&key)
                    .await
                    .map(|t| t.secret().to_owned())
            }
        })
        .await
    }

    /// Asserts the grant is dead for `reason` in the manager's eyes, and that asking again
    /// (check-before-call, forced refresh, a 401 report, a restarted manager) sends nothing.
    async fn assert_dead_without_further_calls(&self, reason: &InvalidationReason) {
        let calls = self.calls();
        let restarted = self.peer();
        for result in [
            self.manager.access_token(&self.key).await.map(|_| ()),
            self.manager.refresh_now(&self.key).await.map(|_| ()),
            self.manager
                .invalidate(
                    &self.key,
                    &AccessToken::new(self.first.access_token.clone()),
                )
                .await
                .map(|_| ()),
            restarted.access_token(&self.key).await.map(|_| ()),
        ] {
            assert_reauth(result, &self.key, reason);
        }
        assert_eq!(self.calls(), calls, "a dead grant is never sent again");
        assert_eq!(
            self.manager.reauthorization_required().await.unwrap(),
            vec![(self.key.clone(), reason.clone())]
        );
        let status = self.manager.status(&self.key).await.unwrap();
        assert!(
            matches!(&status.health, GrantHealth::ReauthorizationRequired { reason: r, .. } if r == reason),
            "{status:?}"
        );
    }
}

async fn concurrently<T, F, Fut>(n: usize, make: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(make())).collect();
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.expect("caller panicked"));
    }
    results
}

fn assert_reauth<T: std::fmt::Debug>(
    result: Result<T, Error>,
    key: &TokenKey,
    reason: &InvalidationReason,
) {
    match result {
        Err(Error::ReauthorizationRequired { key: k, reason: r }) => {
            assert_eq!(&k, key);
            assert_eq!(&r, reason);
        }
        other => panic!("expected ReauthorizationRequired({reason:?}), got {other:?}"),
    }
}

fn rotated() -> RefreshOutcome {
    RefreshOutcome::Refreshed { rotated: true }
}

// ---------------------------------------------------------------------------------------------
// 1. Expiry → exactly one refresh
// ---------------------------------------------------------------------------------------------

async fn expiry_is_one_refresh_for_fifty_callers(preset: Preset) {
    let f = Fixture::new(preset).await;
    // Before expiry: served from memory, no call.
    assert_eq!(
        f.manager.access_token(&f.key).await.unwrap().secret(),
        f.first.access_token
    );
    assert_eq!(f.calls(), 0);

    f.pass_access_lifetime();
    assert!(!f.server.is_access_token_valid(&f.first.access_token));
    let results = f.access_tokens(&f.manager, 50).await;

    assert_eq!(f.calls(), 1, "one refresh for 50 concurrent callers");
    assert_eq!(f.outcomes(), vec![rotated()]);
    let token = results[0].as_ref().expect("refreshed").clone();
    assert_ne!(token, f.first.access_token);
    for result in &results {
        assert_eq!(
            result.as_ref().expect("every caller gets the token"),
            &token
        );
    }
    assert!(f.server.is_access_token_valid(&token));
    // The expiry is the server's (`expires_in` for Constant Contact, epoch milliseconds for
    // Xoxoday), counted from the response.
    let status = f.manager.status(&f.key).await.unwrap();
    assert_eq!(
        status.access_expires_at,
        Some(f.now() + f.server.config().access_lifetime())
    );
    assert_eq!(status.health, GrantHealth::Active);
    // And it is cached: more callers, no more calls.
    for result in f.access_tokens(&f.manager, 50).await {
        assert_eq!(result.unwrap(), token);
    }
    assert_eq!(f.calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// 2. Rotation saved
// ---------------------------------------------------------------------------------------------

async fn rotation_is_saved_and_used_next_time(preset: Preset) {
    let f = Fixture::with_config(preset, preset.renewing_config()).await;
    assert_eq!(f.stored_refresh_token().await, f.first.refresh_token);

    f.pass_access_lifetime();
    let first = f.manager.access_token(&f.key).await.unwrap();
    let rotated_once = f.stored_refresh_token().await;
    assert_ne!(rotated_once, f.first.refresh_token, "the server rotated");
    assert_eq!(rotated_once, f.server_refresh_token(), "and it was saved");
    assert_eq!(f.stored().await.last_refresh(), Some(f.now()));
    // Saved, not just cached: a restarted manager on the store serves it without a call.
    assert_eq!(
        f.peer().access_token(&f.key).await.unwrap().secret(),
        first.secret()
    );
    assert_eq!(f.calls(), 1);

    f.pass_access_lifetime();
    let second = f.manager.access_token(&f.key).await.unwrap();
    assert_ne!(second.secret(), first.secret());
    assert!(f.server.is_access_token_valid(second.secret()));
    assert_eq!(f.outcomes(), vec![rotated(), rotated()]);
    let requests = f.server.requests();
    assert!(requests.iter().all(|r| r.grant == Some(f.grant)));
    let rotated_twice = f.stored_refresh_token().await;
    assert_ne!(rotated_twice, rotated_once);
    assert_eq!(rotated_twice, f.server_refresh_token());
    assert_eq!(f.server.reuse_detections(), 0);
}

// ---------------------------------------------------------------------------------------------
// 3. Reuse detection is never triggered by the manager
// ---------------------------------------------------------------------------------------------

async fn two_managers_ten_expiries_never_trigger_reuse_detection(preset: Preset) {
    let f = Fixture::with_config(preset, preset.renewing_config()).await;
    let managers = [f.manager.clone(), f.peer()];
    let mut previous = f.first.access_token.clone();

    for round in 1..=10 {
        f.pass_access_lifetime();
        // On each manager: 20 check-before-call callers and 5 reporting a 401 with the
        // previous generation's token, all at once.
        let mut tasks = Vec::new();
        for manager in &managers {
            for i in 0..25 {
                let (manager, key) = (manager.clone(), f.key.clone());
                let failed = AccessToken::new(previous.clone());
                tasks.push(tokio::spawn(async move {
                    let token = if i % 5 == 0 {
                        manager.invalidate(&key, &failed).await
                    } else {
                        manager.access_token(&key).await
                    };
                    token.map(|t| t.secret().to_owned())
                }));
            }
        }
        let mut tokens = Vec::new();
        for task in tasks {
            tokens.push(task.await.unwrap().expect("refreshed"));
        }
        assert_eq!(
            f.calls(),
            round,
            "round {round}: one refresh for 50 callers"
        );
        let token = tokens[0].clone();
        assert!(tokens.iter().all(|t| *t == token), "round {round}");
        assert_ne!(token, previous);
        assert!(f.server.is_access_token_valid(&token));
        previous = token;
    }

    assert_eq!(f.server.reuse_detections(), 0);
    assert_eq!(f.calls(), 10);
    assert_eq!(f.outcomes(), vec![rotated(); 10]);
    assert_eq!(f.server.grant_state(&f.grant), ServerGrantState::Active);
    assert_eq!(f.stored_refresh_token().await, f.server_refresh_token());
}

// ---------------------------------------------------------------------------------------------
// 4. Each invalidation → its typed error
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Invalidation {
    Revoke,
    ResetPassword,
    Supersede,
    ExpireRefreshToken,
    /// Not an event: the refresh token's lifetime simply runs out while nobody calls.
    RefreshLifetimeRunsOut,
}

async fn revoked(preset: Preset) {
    invalidation(preset, Invalidation::Revoke).await;
}

async fn password_reset(preset: Preset) {
    invalidation(preset, Invalidation::ResetPassword).await;
}

async fn superseded(preset: Preset) {
    invalidation(preset, Invalidation::Supersede).await;
}

async fn refresh_token_expired(preset: Preset) {
    invalidation(preset, Invalidation::ExpireRefreshToken).await;
}

async fn refresh_lifetime_runs_out(preset: Preset) {
    invalidation(preset, Invalidation::RefreshLifetimeRunsOut).await;
}

async fn invalidation(preset: Preset, what: Invalidation) {
    let f = Fixture::new(preset).await;
    let mut events = f.manager.subscribe();

    // What the server does, what the manager must conclude, and whether it takes a call.
    let (reason, calls, server_state) = match what {
        Invalidation::Revoke => {
            f.server.revoke(&f.grant);
            f.pass_access_lifetime();
            (
                preset.dead_token_reason(),
                1,
                ServerGrantState::Revoked(RevocationReason::UserRevoked),
            )
        }
        Invalidation::ResetPassword => {
            f.server.reset_password(&f.grant);
            f.pass_access_lifetime();
            let reason = match preset {
                Preset::ConstantContact => InvalidationReason::InvalidGrant,
                // `401 {"success":0,"error_message_id":"auth.token_error"}`
                Preset::Xoxoday => InvalidationReason::PasswordChanged,
            };
            (
                reason,
                1,
                ServerGrantState::Revoked(RevocationReason::PasswordReset),
            )
        }
        Invalidation::Supersede => {
            // Another admin's new pair: this app never sees it.
            let _theirs = f.server.supersede(&f.grant);
            f.pass_access_lifetime();
            (
                preset.dead_token_reason(),
                1,
                ServerGrantState::Active, // for the other admin
            )
        }
        Invalidation::ExpireRefreshToken => {
            f.server.expire_refresh_token(&f.grant);
            f.pass_access_lifetime();
            (
                preset.dead_token_reason(),
                1,
                ServerGrantState::RefreshTokenExpired,
            )
        }
        Invalidation::RefreshLifetimeRunsOut => match preset {
            // 180 days unused. The callback stated no refresh expiry, so only the server can
            // tell: one call, `invalid_grant`.
            Preset::ConstantContact => {
                f.clock.advance(181 * DAY);
                (
                    InvalidationReason::InvalidGrant,
                    1,
                    ServerGrantState::RefreshTokenExpired,
                )
            }
            // 30 days after the grant was issued. The dashboard stated the refresh expiry;
            // the manager still lets the server confirm it (one call), so a clock running
            // ahead never kills a live grant, and reports the stated expiry as the reason.
            Preset::Xoxoday => {
                f.clock.advance(31 * DAY);
                (
                    InvalidationReason::RefreshTokenExpired,
                    1,
                    ServerGrantState::RefreshTokenExpired,
                )
            }
        },
    };

    assert_reauth(f.manager.access_token(&f.key).await, &f.key, &reason);
    assert_eq!(f.calls(), calls, "{what:?}");
    assert_eq!(f.server.grant_state(&f.grant), server_state);
    assert_eq!(f.server.reuse_detections(), 0);
    let died: Vec<_> = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::ReauthorizationRequired { .. }))
        .collect();
    assert!(
        matches!(died.as_slice(), [Event::ReauthorizationRequired { key, reason: r, .. }] if *key == f.key && *r == reason),
        "exactly one event: {died:?}"
    );
    assert_eq!(
        f.manager.status(&f.key).await.unwrap().health,
        GrantHealth::ReauthorizationRequired {
            reason: reason.clone(),
            since: Some(f.now())
        }
    );

    f.assert_dead_without_further_calls(&reason).await;
    assert!(
        !drain(&mut events)
            .iter()
            .any(|e| matches!(e, Event::ReauthorizationRequired { .. })),
        "the death is announced once"
    );

    // A human re-authorizes (a new pair from the dashboard or the OAuth flow): alive again,
    // served without a call.
    let calls = f.calls();
    let fresh = f.server.supersede(&f.grant);
    f.manager
        .insert(f.key.clone(), f.token_set(&fresh))
        .await
        .unwrap();
    assert!(drain(&mut events)
        .iter()
        .any(|e| matches!(e, Event::Recovered { key, .. } if *key == f.key)));
    assert_eq!(
        f.manager.access_token(&f.key).await.unwrap().secret(),
        fresh.access_token
    );
    assert!(f.server.is_access_token_valid(&fresh.access_token));
    assert!(f
        .manager
        .reauthorization_required()
        .await
        .unwrap()
        .is_empty());
    assert_eq!(f.calls(), calls);
}

// ---------------------------------------------------------------------------------------------
// 5. Rate limit → backoff, no storm
// ---------------------------------------------------------------------------------------------

/// The manager's default backoff after the `k`-th consecutive failure is 5 s doubling per
/// failure, capped at 15 min, with equal jitter (between half and all of it). With callers
/// arriving once a simulated minute, the next call comes at least this many minutes later.
fn min_gap_minutes(k: u32) -> u64 {
    let full_ms = (5_000u64 << (k - 1).min(20)).min(15 * 60 * 1000);
    (full_ms / 2).div_ceil(60_000).max(1)
}

/// The most failed calls one run of consecutive failures fits in `span` minutes (first at 0).
fn max_failures_within(span: u64) -> usize {
    let (mut at, mut failures, mut k) = (0, 0, 1);
    while at <= span {
        failures += 1;
        at += min_gap_minutes(k);
        k += 1;
    }
    failures
}

/// The upper bound on token-endpoint calls in `rate_limit_backs_off_without_a_storm`:
///
/// - Access tokens live 90 s, so with the 60 s refresh margin every minute's first caller
///   needs a refresh. The server admits 2 refreshes per grant per sliding hour: minutes 0 and
///   1 succeed, the next admitted call is at minute ≥ 60, the one after at ≥ 61 (and each
///   success needs the next minute's refresh too), and none after that before minute 120.
///   So exactly 4 successes, at 0, 1, m and m + 1 with m ≥ 60.
/// - A success resets the backoff. The first run of 429s spans minutes 2..=59 (57 minutes),
///   the second starts at ≥ 62 and ends by 99 (37 minutes); neither preset sends
///   `Retry-After`, so only the backoff spaces them: gaps of 1,1,1,1,1,2,3,6,8,8… minutes
///   (`min_gap_minutes`), i.e. at most 14 and 11 calls.
fn rate_limit_call_bound() -> usize {
    4 + max_failures_within(57) + max_failures_within(37)
}

/// A fixture whose server issues 90 s access tokens and admits 2 refreshes per grant per
/// sliding hour, answering the rest with `retry_after`; returns it with the issued access token
/// expired, and the time the scenario starts.
async fn rate_limited(preset: Preset, retry_after: RetryAfter) -> (Fixture, SystemTime) {
    let config = preset
        .config()
        .with_access_lifetime(Duration::from_secs(90));
    let f = Fixture::with_config(preset, config).await;
    f.server
        .set_rate_limit(Some(RateLimit::new(2, HOUR).retry_after(retry_after)));
    f.clock.advance(2 * MINUTE); // the issued access token has expired
    let start = f.now();
    (f, start)
}

async fn rate_limit_backs_off_without_a_storm(preset: Preset) {
    // Neither preset sends `Retry-After` by default; the bound rests on the backoff alone.
    let (f, start) = rate_limited(preset, RetryAfter::Omitted).await;

    let (mut served, mut limited) = (0, 0);
    for minute in 0..100 {
        if minute > 0 {
            f.clock.advance(MINUTE);
        }
        // Even minutes: one caller. Odd minutes: ten at once.
        let results = if minute % 2 == 0 {
            vec![f
                .manager
                .access_token(&f.key)
                .await
                .map(|t| t.secret().to_owned())]
        } else {
            f.access_tokens(&f.manager, 10).await
        };
        for result in results {
            match result {
                Ok(token) => {
                    assert!(f.server.is_access_token_valid(&token), "minute {minute}");
                    served += 1;
                }
                Err(Error::RateLimited {
                    key,
                    retry_after: Some(wait),
                }) => {
                    assert_eq!(key, f.key);
                    assert!(
                        wait > Duration::ZERO && wait <= 15 * MINUTE,
                        "minute {minute}: {wait:?}"
                    );
                    limited += 1;
                }
                Err(e) => panic!("minute {minute}: expected RateLimited, got {e:?}"),
            }
        }
    }

    let requests = f.server.requests();
    let bound = rate_limit_call_bound();
    assert_eq!(bound, 29);
    assert!(
        requests.len() <= bound,
        "{} calls to the token endpoint, bound {bound}",
        requests.len()
    );
    let refreshed = requests.iter().filter(|r| r.outcome == rotated()).count();
    let throttled = requests
        .iter()
        .filter(|r| r.outcome == RefreshOutcome::RateLimited && r.status == 429)
        .count();
    assert_eq!(refreshed, 4, "{requests:?}");
    assert_eq!(refreshed + throttled, requests.len(), "{requests:?}");
    assert!(throttled >= 2, "the limit was hit in both hours");
    // Never two calls in one simulated minute, whatever the number of callers.
    for pair in requests.windows(2) {
        assert!(pair[1].at >= pair[0].at + MINUTE, "{requests:?}");
    }
    assert!(requests.iter().all(|r| r.at >= start));
    assert!(limited > 0 && served > 0);
    assert_eq!(served + limited, 50 + 50 * 10);
    eprintln!(
        "{preset:?}: {} token-endpoint calls in 100 minutes (bound {bound}); {served} callers \
         served, {limited} rate limited",
        requests.len()
    );

    // Never a reuse, never dead.
    assert_eq!(f.server.reuse_detections(), 0);
    assert_eq!(f.server.grant_state(&f.grant), ServerGrantState::Active);
    assert!(f
        .manager
        .reauthorization_required()
        .await
        .unwrap()
        .is_empty());
    assert!(!f
        .manager
        .status(&f.key)
        .await
        .unwrap()
        .needs_reauthorization());
    // Once the limit lifts and the backoff ends, the grant refreshes again.
    f.server.set_rate_limit(None);
    f.clock.advance(15 * MINUTE);
    let token = f.manager.access_token(&f.key).await.unwrap();
    assert!(f.server.is_access_token_valid(token.secret()));
}

/// With a `Retry-After` header (not either preset's habit, so set explicitly), the manager
/// waits exactly as long as the server says: six calls in 100 minutes.
async fn rate_limit_retry_after_is_honoured(preset: Preset) {
    let (f, start) = rate_limited(preset, RetryAfter::Seconds).await;

    for minute in 0..100u64 {
        if minute > 0 {
            f.clock.advance(MINUTE);
        }
        let results = if minute % 2 == 0 {
            vec![f.manager.access_token(&f.key).await.map(|_| ())]
        } else {
            concurrently(10, || {
                let (manager, key) = (f.manager.clone(), f.key.clone());
                async move { manager.access_token(&key).await.map(|_| ()) }
            })
            .await
        };
        // 429 at minute 2 says "58 minutes" (until the first admitted call leaves the
        // window); 429 at minute 62 says the same. In between, the previous token has expired
        // and callers are told how long is left.
        let retry_at: Option<u64> = match minute {
            3..=59 => Some(60),
            63..=99 => Some(120),
            _ => None,
        };
        for result in results {
            match retry_at {
                None => assert!(result.is_ok(), "minute {minute}: {result:?}"),
                Some(at) => match result {
                    Err(Error::RateLimited {
                        retry_after: Some(wait),
                        ..
                    }) => assert_eq!(
                        wait,
                        Duration::from_secs((at - minute) * 60),
                        "minute {minute}"
                    ),
                    other => panic!("minute {minute}: expected RateLimited, got {other:?}"),
                },
            }
        }
    }

    let minutes: Vec<u64> = f
        .server
        .requests()
        .iter()
        .map(|r| r.at.duration_since(start).unwrap().as_secs() / 60)
        .collect();
    assert_eq!(minutes, vec![0, 1, 2, 60, 61, 62]);
    assert_eq!(f.server.reuse_detections(), 0);
    assert_eq!(f.server.grant_state(&f.grant), ServerGrantState::Active);
}

// ---------------------------------------------------------------------------------------------
// 6. Lost reply
// ---------------------------------------------------------------------------------------------
//
// What happens: the server receives the refresh, rotates (spends the presented refresh token,
// mints a new one) and answers, but the answer never reaches the client (a load balancer
// answers `504 Gateway Time-out` instead). From the client's side a 504 (or a timeout, or a
// connection dropped mid-reply) may mean the server already rotated, so the manager asks again
// at once with the same refresh token, the only one it has:
//
// - Rotation with a grace window (`Rotation::OnWithGrace(6h)`, Okta's and Auth0's "reuse
//   interval"): the spent token still works inside the window, the server answers with a new
//   access token and the grant's current refresh token, the manager saves it, and the caller
//   never sees the lost reply.
// - Rotation without grace (`Rotation::On`): the token was spent, so the server sees a replay
//   and, per RFC 9700 §4.14.2 reuse detection, revokes the whole grant. The manager reports
//   `ReauthorizationRequired` with `RotationLost`, so the application knows a lost reply (not
//   the user) killed it. No client can avoid this: not retrying leaves the grant just as dead.

/// Loses the reply to the first refresh; returns what the first caller got.
async fn lose_the_first_refresh_reply(f: &Fixture) -> Result<AccessToken, Error> {
    f.server.lose_next_replies(1);
    f.pass_access_lifetime();
    let result = f.manager.access_token(&f.key).await;
    let requests = f.server.requests();
    assert_eq!(requests.len(), 2, "one call and one prompt retry");
    assert_eq!(requests[0].outcome, rotated());
    assert!(requests[0].reply_lost);
    assert_eq!(requests[0].status, 504);
    assert!(!requests[1].reply_lost);
    result
}

async fn lost_reply_without_grace_ends_in_reuse_detection(preset: Preset) {
    let f = Fixture::with_config(preset, preset.config().with_rotation(Rotation::On)).await;
    let result = lose_the_first_refresh_reply(&f).await;

    // The retry presents the spent refresh token: reuse detected, grant revoked, and the
    // reason says a reply was lost.
    let reason = InvalidationReason::RotationLost;
    assert_reauth(result, &f.key, &reason);
    assert_eq!(f.calls(), 2);
    assert_eq!(f.outcomes(), vec![rotated(), RefreshOutcome::ReuseDetected]);
    assert_eq!(f.server.reuse_detections(), 1);
    assert_eq!(
        f.server.grant_state(&f.grant),
        ServerGrantState::Revoked(RevocationReason::ReuseDetected)
    );
    f.assert_dead_without_further_calls(&reason).await;
}

async fn lost_reply_with_grace_window_recovers(preset: Preset) {
    let config = preset
        .config()
        .with_rotation(Rotation::OnWithGrace(6 * HOUR));
    let f = Fixture::with_config(preset, config).await;

    // Inside the grace window the spent token gets a new access token and the current
    // refresh token: the caller is served at once.
    let token = lose_the_first_refresh_reply(&f).await.unwrap();
    assert!(f.server.is_access_token_valid(token.secret()));
    assert_eq!(f.calls(), 2);
    assert_eq!(f.outcomes(), vec![rotated(), RefreshOutcome::GraceReplay]);
    assert_eq!(f.stored_refresh_token().await, f.server_refresh_token());
    let status = f.manager.status(&f.key).await.unwrap();
    assert_eq!(status.health, GrantHealth::Active);
    assert_eq!(status.failures, 0);

    // The grant lives on: the refresh token now held rotates normally.
    let next = f.manager.refresh_now(&f.key).await.unwrap();
    assert_ne!(next.access_token().secret(), token.secret());
    assert!(f.server.is_access_token_valid(next.access_token().secret()));
    assert_eq!(
        f.outcomes(),
        vec![rotated(), RefreshOutcome::GraceReplay, rotated()]
    );
    assert_eq!(f.stored_refresh_token().await, f.server_refresh_token());
    assert_eq!(f.server.reuse_detections(), 0);
    assert_eq!(f.server.grant_state(&f.grant), ServerGrantState::Active);
    assert!(f
        .manager
        .reauthorization_required()
        .await
        .unwrap()
        .is_empty());
}
