//! Social-network grant shapes through HTTP, against `FakeSocialServer`: client credentials,
//! Instagram-style renewal by access token (24 h rule, expiry, Graph errors) and Graph rate
//! limits with usage headers.
//!
//! Time is a shared `ManualClock`; the HTTP runs on real tokio time and nothing sleeps.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::drain;
use tokenkeeper::testing::{
    FakeSocialServer, GraphFailure, GraphRateLimit, ManualClock, SocialConfig, UsageHeader,
};
use tokenkeeper::{
    AccessToken, ClientSecret, Clock, ConfigProblem, Error, Event, Grant, GraphTokenExchange,
    InstagramProvider, InvalidationReason, OAuth2Provider, ProviderErrorKind, RefresherConfig,
    TokenKey, TokenManager, TokenSet,
};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

async fn social() -> (Arc<ManualClock>, FakeSocialServer) {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeSocialServer::start(SocialConfig::new(), clock.clone()).await;
    (clock, server)
}

fn client_credentials(server: &FakeSocialServer, secret: &str) -> OAuth2Provider {
    OAuth2Provider::builder(server.client_id(), server.token_url())
        .client_secret(ClientSecret::new(secret))
        .grant(Grant::ClientCredentials)
        .scopes(["insights:read"])
        .extra_param("audience", "https://graph.example.com")
        .build()
        .unwrap()
}

fn instagram(server: &FakeSocialServer, clock: &Arc<ManualClock>) -> TokenManager {
    let provider = InstagramProvider::builder(server.refresh_url())
        .clock(clock.clone())
        .build()
        .unwrap();
    TokenManager::builder(provider).clock(clock.clone()).build()
}

fn is_dead(events: &[Event], key: &TokenKey) -> Vec<InvalidationReason> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ReauthorizationRequired { key: k, reason, .. } if k == key => {
                Some(reason.clone())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn client_credentials_are_obtained_on_first_use_with_scope_and_audience() {
    let (_clock, server) = social().await;
    let secret = server.client_secret();
    let manager = TokenManager::builder(client_credentials(&server, &secret)).build();
    let key = TokenKey::from("insights");
    manager
        .insert(key.clone(), TokenSet::pending())
        .await
        .unwrap();
    assert_eq!(server.client_credentials_calls(), 0, "insert sends nothing");

    let token = manager.access_token(&key).await.unwrap();
    assert!(server.is_access_token_valid(token.secret()));
    let again = manager.access_token(&key).await.unwrap();
    assert_eq!(again, token, "served from the cache");
    let requests = server.client_credentials_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].scope.as_deref(), Some("insights:read"));
    assert_eq!(
        requests[0].audience.as_deref(),
        Some("https://graph.example.com")
    );
    assert_eq!(requests[0].status, 200);
}

#[tokio::test]
async fn client_credentials_are_reobtained_before_expiry_and_never_die_for_lack_of_a_refresh_token()
{
    let (clock, server) = social().await;
    let secret = server.client_secret();
    let manager = TokenManager::builder(client_credentials(&server, &secret))
        .clock(clock.clone())
        .build();
    let mut events = manager.subscribe();
    let key = TokenKey::from("insights");
    manager
        .insert(key.clone(), TokenSet::pending())
        .await
        .unwrap();
    let refresher = manager.start_refresher(RefresherConfig::new().refresh_idle(true));
    refresher.wait_idle().await;
    assert_eq!(
        server.client_credentials_calls(),
        1,
        "the refresher obtains the first token"
    );

    // Two days in 10-minute steps: the token is always valid when the app asks for it.
    for _ in 0..(2 * 24 * 6) {
        clock.advance(10 * MINUTE);
        refresher.wait_idle().await;
        let token = manager.access_token(&key).await.unwrap();
        assert!(server.is_access_token_valid(token.secret()));
    }
    let calls = server.client_credentials_calls();
    // One-hour tokens, obtained again ahead of expiry: about one per hour, never a storm.
    assert!((48..=100).contains(&calls), "{calls} token requests");
    let events = drain(&mut events);
    assert!(is_dead(&events, &key).is_empty());
    assert!(manager.reauthorization_required().await.unwrap().is_empty());
    refresher.shutdown().await;
}

#[tokio::test]
async fn client_credentials_with_a_wrong_secret_are_misconfigured_not_dead() {
    let (_clock, server) = social().await;
    let manager = TokenManager::builder(client_credentials(&server, "wrong")).build();
    let key = TokenKey::from("insights");
    manager
        .insert(key.clone(), TokenSet::pending())
        .await
        .unwrap();
    let err = manager.access_token(&key).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misconfigured {
                problem: ConfigProblem::InvalidClient,
                status: Some(401),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_reauth_required());
    assert!(manager.reauthorization_required().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_pending_grant_with_a_refresh_token_provider_is_dead_for_lack_of_one() {
    let (_clock, server) = social().await;
    let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
        .client_secret(ClientSecret::new(server.client_secret()))
        .build()
        .unwrap();
    let manager = TokenManager::builder(provider).build();
    let key = TokenKey::from("insights");
    manager
        .insert(key.clone(), TokenSet::pending())
        .await
        .unwrap();
    let err = manager.access_token(&key).await.unwrap_err();
    assert!(matches!(
        err,
        Error::ReauthorizationRequired {
            reason: InvalidationReason::NoRefreshToken,
            ..
        }
    ));
    assert_eq!(server.client_credentials_calls(), 0);
}

#[tokio::test]
async fn a_long_lived_token_is_never_sent_for_renewal_before_it_is_a_day_old() {
    let (clock, server) = social().await;
    let manager = instagram(&server, &clock);
    let key = TokenKey::from("creator");
    let user = server.new_user();
    let issued = server.issue_long_lived_token(user);
    manager
        .insert(key.clone(), issued.token_set())
        .await
        .unwrap();
    // An eager refresher: keep-alive every minute.
    let refresher = manager.start_refresher(
        RefresherConfig::new()
            .refresh_idle(true)
            .keep_alive(Some(MINUTE)),
    );
    for _ in 0..(23 * 4) {
        clock.advance(15 * MINUTE);
        refresher.wait_idle().await;
        manager.refresh_now(&key).await.unwrap();
        let token = manager.access_token(&key).await.unwrap();
        assert_eq!(token.secret(), issued.access_token);
    }
    assert_eq!(server.refresh_calls(), 0);

    clock.advance(HOUR + MINUTE);
    refresher.wait_idle().await;
    let token = manager.access_token(&key).await.unwrap();
    assert_ne!(
        token.secret(),
        issued.access_token,
        "renewed once a day old"
    );
    assert!(server.is_access_token_valid(token.secret()));
    assert_eq!(server.renewals(), 1);
    assert_eq!(server.premature_refreshes(), 0);
    refresher.shutdown().await;
}

#[tokio::test]
async fn the_refresher_keeps_a_long_lived_token_alive_for_months_without_traffic() {
    let (clock, server) = social().await;
    let manager = instagram(&server, &clock);
    let mut events = manager.subscribe();
    let key = TokenKey::from("creator");
    let user = server.new_user();
    manager
        .insert(key.clone(), server.issue_long_lived_token(user).token_set())
        .await
        .unwrap();
    let refresher = manager.start_refresher(RefresherConfig::new());
    // Half a year, nobody calling: the default keep-alive renews every 7 days.
    for _ in 0..(180 * 2) {
        clock.advance(12 * HOUR);
        refresher.wait_idle().await;
    }
    let token = manager.token(&key).await.unwrap();
    assert!(server.is_access_token_valid(token.access_token().secret()));
    let renewals = server.renewals();
    assert!((20..=30).contains(&renewals), "{renewals} renewals");
    assert_eq!(server.premature_refreshes(), 0);
    assert_eq!(server.refresh_calls(), renewals, "no failed attempt");
    assert!(is_dead(&drain(&mut events), &key).is_empty());
    refresher.shutdown().await;
}

#[tokio::test]
async fn an_expired_long_lived_token_is_dead_without_a_request() {
    let (clock, server) = social().await;
    let manager = instagram(&server, &clock);
    let mut events = manager.subscribe();
    let key = TokenKey::from("creator");
    let user = server.new_user();
    manager
        .insert(key.clone(), server.issue_long_lived_token(user).token_set())
        .await
        .unwrap();
    clock.advance(61 * DAY);
    for _ in 0..3 {
        let err = manager.access_token(&key).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::ReauthorizationRequired {
                    reason: InvalidationReason::AccessTokenExpired,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(server.refresh_calls(), 0);
    assert_eq!(
        is_dead(&drain(&mut events), &key),
        [InvalidationReason::AccessTokenExpired]
    );
}

#[tokio::test]
async fn the_providers_code_190_kills_the_grant_with_the_subcodes_reason_once() {
    let (clock, server) = social().await;
    let manager = instagram(&server, &clock);
    let mut events = manager.subscribe();
    let cases = [
        (
            GraphFailure::PasswordChanged,
            InvalidationReason::PasswordChanged,
        ),
        (
            GraphFailure::SecurityCheckpoint,
            InvalidationReason::SecurityCheckpoint,
        ),
        (GraphFailure::AppRemoved, InvalidationReason::Revoked),
        (GraphFailure::InvalidToken, InvalidationReason::InvalidGrant),
        (
            GraphFailure::Expired,
            InvalidationReason::AccessTokenExpired,
        ),
    ];
    let mut keys = Vec::new();
    for (i, (failure, _)) in cases.iter().enumerate() {
        let key = TokenKey::from(format!("creator-{i}"));
        let user = server.new_user();
        manager
            .insert(key.clone(), server.issue_long_lived_token(user).token_set())
            .await
            .unwrap();
        keys.push((key, user, *failure));
    }
    clock.advance(2 * DAY);
    for (key, user, failure) in &keys {
        server.fail_user(*user, *failure);
        for _ in 0..3 {
            let _ = manager.refresh_now(key).await;
        }
    }
    assert_eq!(server.refresh_calls(), cases.len(), "one call per grant");
    let events = drain(&mut events);
    for ((key, _, _), (_, reason)) in keys.iter().zip(&cases) {
        assert_eq!(is_dead(&events, key), std::slice::from_ref(reason), "{key}");
        let err = manager.access_token(key).await.unwrap_err();
        assert!(
            matches!(&err, Error::ReauthorizationRequired { reason: r, .. } if r == reason),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn a_token_the_api_rejects_before_it_can_be_renewed_is_dead_without_a_request() {
    // Documented limit: a token too young to renew that the API rejects cannot be renewed;
    // the engine's generic reason applies (the API's own reply says why).
    let (clock, server) = social().await;
    let manager = instagram(&server, &clock);
    let key = TokenKey::from("creator");
    let user = server.new_user();
    manager
        .insert(key.clone(), server.issue_long_lived_token(user).token_set())
        .await
        .unwrap();
    clock.advance(HOUR);
    server.fail_user(user, GraphFailure::PasswordChanged);
    let token = manager.access_token(&key).await.unwrap();
    let err = manager.invalidate(&key, &token).await.unwrap_err();
    assert!(err.is_reauth_required(), "{err:?}");
    assert_eq!(server.refresh_calls(), 0);
}

async fn rate_limited_wait(usage: UsageHeader) -> (Duration, usize) {
    let (clock, server) = social().await;
    let manager = instagram(&server, &clock);
    server.set_rate_limit(Some(
        GraphRateLimit::new(1, HOUR).code(80002).usage_header(usage),
    ));
    let keys: Vec<TokenKey> = (0..2).map(|i| TokenKey::from(format!("c-{i}"))).collect();
    for key in &keys {
        let user = server.new_user();
        manager
            .insert(key.clone(), server.issue_long_lived_token(user).token_set())
            .await
            .unwrap();
    }
    clock.advance(2 * DAY);
    manager.refresh_now(&keys[0]).await.unwrap();
    clock.advance(MINUTE);
    let err = manager.refresh_now(&keys[1]).await.unwrap_err();
    let Error::RateLimited {
        retry_after: Some(wait),
        ..
    } = err
    else {
        panic!("expected a rate limit, got {err:?}");
    };
    // The limited grant is held: no more calls while the estimate runs.
    for _ in 0..5 {
        let _ = manager.refresh_now(&keys[1]).await;
        let _ = manager.access_token(&keys[1]).await.unwrap();
    }
    (wait, server.refresh_calls())
}

#[tokio::test]
async fn a_graph_rate_limit_waits_as_long_as_the_business_use_case_header_says() {
    let (wait, calls) = rate_limited_wait(UsageHeader::BusinessUseCase).await;
    // One call a rolling hour, and the refused call counts too (as on Graph): an hour.
    assert_eq!(wait, 60 * MINUTE);
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn a_graph_rate_limit_waits_as_the_app_usage_header_suggests() {
    let (wait, calls) = rate_limited_wait(UsageHeader::App).await;
    // 200 % of the hour's allowance: half an hour.
    assert_eq!(wait, 30 * MINUTE);
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn a_graph_rate_limit_without_usage_headers_waits_the_fallback() {
    let (wait, calls) = rate_limited_wait(UsageHeader::None).await;
    assert_eq!(wait, 5 * MINUTE);
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn a_short_lived_token_is_exchanged_for_a_long_lived_one() {
    let (clock, server) = social().await;
    let exchange = GraphTokenExchange::new(
        server.exchange_url(),
        server.client_id(),
        ClientSecret::new(server.client_secret()),
    )
    .unwrap();
    let user = server.new_user();
    let (short, _) = server.issue_short_lived_token(user);
    let now = clock.now();
    let long = exchange
        .exchange(&AccessToken::new(short.clone()), now)
        .await
        .unwrap();
    assert_ne!(long.access_token().secret(), short);
    assert!(server.is_access_token_valid(long.access_token().secret()));
    assert_eq!(long.issued_at(), Some(now));
    assert_eq!(long.expires_at(), Some(now + 60 * DAY));
    assert!(long.refresh_token().is_none());

    // The long-lived token is then kept alive by the Instagram-style provider.
    let manager = instagram(&server, &clock);
    let key = TokenKey::from("page");
    manager.insert(key.clone(), long).await.unwrap();
    clock.advance(2 * DAY);
    manager.refresh_now(&key).await.unwrap();
    assert_eq!(server.renewals(), 1);
}

#[tokio::test]
async fn exchange_failures_are_classified() {
    let (clock, server) = social().await;
    let user = server.new_user();
    let (short, _) = server.issue_short_lived_token(user);
    let wrong = GraphTokenExchange::new(
        server.exchange_url(),
        server.client_id(),
        ClientSecret::new("wrong"),
    )
    .unwrap();
    let err = wrong
        .exchange(&AccessToken::new(short.clone()), clock.now())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        &ProviderErrorKind::Misconfigured(ConfigProblem::InvalidClient)
    );

    let exchange = GraphTokenExchange::new(
        server.exchange_url(),
        server.client_id(),
        ClientSecret::new(server.client_secret()),
    )
    .unwrap();
    clock.advance(3 * HOUR);
    let err = exchange
        .exchange(&AccessToken::new(short), clock.now())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        &ProviderErrorKind::Reauthorize(InvalidationReason::AccessTokenExpired)
    );
    assert_eq!(server.exchanges(), 2);
}

/// Every message of an error and its causes, and its `Debug`.
fn everything(err: &dyn std::error::Error) -> String {
    let mut text = format!("{err:?}");
    let mut cause = Some(err);
    while let Some(e) = cause {
        text.push_str(&format!(" | {e}"));
        cause = e.source();
    }
    text
}

#[tokio::test]
async fn tokens_and_secrets_in_query_strings_never_reach_errors() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let clock = Arc::new(ManualClock::fixed());
    let provider = InstagramProvider::builder(format!("{base}/refresh_access_token"))
        .clock(clock.clone())
        .build()
        .unwrap();
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    let key = TokenKey::from("creator");
    let tokens = TokenSet::new(AccessToken::new("IGQV-secret-access-token"))
        .with_issued_at(clock.now())
        .with_expires_at(clock.now() + 60 * DAY);
    manager.insert(key.clone(), tokens).await.unwrap();
    clock.advance(2 * DAY);
    let err = manager.refresh_now(&key).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let text = everything(&err);
    assert!(!text.contains("IGQV-secret-access-token"), "{text}");

    let exchange = GraphTokenExchange::new(
        format!("{base}/oauth/access_token"),
        "app",
        ClientSecret::new("the-app-secret"),
    )
    .unwrap();
    let err = exchange
        .exchange(&AccessToken::new("EAAs-short-token"), clock.now())
        .await
        .unwrap_err();
    let text = everything(&err) + &format!("{exchange:?}");
    assert!(
        !text.contains("the-app-secret") && !text.contains("EAAs-short-token"),
        "{text}"
    );
}

/// The Instagram-widget case (a site embedding creators' feeds, nobody logged in for months):
/// widgets connected at different times, one connected with a token already near its end, one
/// with a token that had already expired. For a year, with only the refresher at work, every
/// live widget stays alive with about one renewal a week, none sent too early, and the expired
/// one is reported once.
#[tokio::test]
async fn instagram_widgets_stay_alive_for_a_year_on_the_refresher_alone() {
    let (clock, server) = social().await;
    let provider = InstagramProvider::builder(server.refresh_url())
        .clock(clock.clone())
        .build()
        .unwrap();
    // Room for every event of the year and a half (about 1,500 `Refreshed`).
    let manager = TokenManager::builder(provider)
        .clock(clock.clone())
        .event_capacity(1 << 14)
        .build();
    let mut events = manager.subscribe();
    let refresher = manager.start_refresher(RefresherConfig::new());
    let mut live = Vec::new();
    for i in 0..20 {
        let key = TokenKey::from(format!("widget-{i}"));
        let user = server.new_user();
        manager
            .insert(key.clone(), server.issue_long_lived_token(user).token_set())
            .await
            .unwrap();
        live.push(key);
        clock.advance(7 * HOUR);
        refresher.wait_idle().await;
    }
    // Connected 59 days after its token was issued: one day left.
    let late = TokenKey::from("widget-late");
    let user = server.new_user();
    let old = server.issue_long_lived_token(user);
    for _ in 0..(59 * 2) {
        clock.advance(12 * HOUR);
        refresher.wait_idle().await;
    }
    manager.insert(late.clone(), old.token_set()).await.unwrap();
    live.push(late.clone());
    // Connected with a token that had expired already.
    let expired = TokenKey::from("widget-expired");
    let user = server.new_user();
    let gone = server.issue_long_lived_token(user);
    for _ in 0..(61 * 2) {
        clock.advance(12 * HOUR);
        refresher.wait_idle().await;
    }
    manager
        .insert(expired.clone(), gone.token_set())
        .await
        .unwrap();
    refresher.wait_idle().await;

    for _ in 0..(365 * 2) {
        clock.advance(12 * HOUR);
        refresher.wait_idle().await;
    }
    for key in &live {
        let token = manager.token(key).await.unwrap();
        assert!(
            server.is_access_token_valid(token.access_token().secret()),
            "{key} died"
        );
    }
    assert_eq!(server.premature_refreshes(), 0);
    let renewals = server.renewals();
    // About 55 weeks for each of 21 widgets (the first ones also over the 120 days before).
    assert!(
        (21 * 50..=21 * 80).contains(&renewals),
        "{renewals} renewals"
    );
    let events = drain(&mut events);
    assert!(events.len() > 1000, "every event kept: {}", events.len());
    assert_eq!(
        is_dead(&events, &expired),
        [InvalidationReason::AccessTokenExpired]
    );
    for key in &live {
        assert!(is_dead(&events, key).is_empty(), "{key}");
    }
    refresher.shutdown().await;
}

#[tokio::test]
async fn the_fakes_handouts_redact_their_secrets_in_debug() {
    let (_clock, server) = social().await;
    let user = server.new_user();
    let token = server.issue_long_lived_token(user);
    let shown = format!("{token:?}");
    assert!(shown.contains("[redacted]") && !shown.contains(&token.access_token));
    let config = SocialConfig::new().with_client("id", "very-secret");
    assert!(!format!("{config:?}").contains("very-secret"));
    let provider = InstagramProvider::builder(server.refresh_url())
        .build()
        .unwrap();
    assert!(format!("{provider:?}").contains("refresh_access_token"));
}

#[tokio::test]
async fn a_client_credentials_refusal_that_would_kill_a_users_grant_is_misconfigured() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    for (body, code) in [
        (r#"{"error":"invalid_grant"}"#, "invalid_grant"),
        (r#"{"error":"access_denied"}"#, "access_denied"),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(400).set_body_raw(body, "application/json"))
            .mount(&server)
            .await;
        let provider = OAuth2Provider::builder("id", format!("{}/token", server.uri()))
            .client_secret(ClientSecret::new("secret"))
            .grant(Grant::ClientCredentials)
            .build()
            .unwrap();
        let manager = TokenManager::builder(provider).build();
        let key = TokenKey::from("m2m");
        manager
            .insert(key.clone(), TokenSet::pending())
            .await
            .unwrap();
        let err = manager.access_token(&key).await.unwrap_err();
        assert!(
            matches!(&err, Error::Misconfigured { problem: ConfigProblem::OAuth { code: c }, status: Some(400), .. } if c == code),
            "{err:?}"
        );
        assert!(manager.reauthorization_required().await.unwrap().is_empty());
    }
}

/// A provider that can never renew yet, claiming the grant became renewable long ago (as one
/// reading another clock might), counting how often it is asked.
struct Confused(Arc<std::sync::atomic::AtomicUsize>);

#[async_trait::async_trait]
impl tokenkeeper::Provider for Confused {
    async fn refresh(
        &self,
        _req: tokenkeeper::RefreshRequest<'_>,
    ) -> Result<tokenkeeper::TokenResponse, tokenkeeper::ProviderError> {
        panic!("never called: can_refresh is false");
    }

    fn can_refresh(&self, _tokens: &TokenSet) -> bool {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        false
    }

    fn refresh_not_before(&self, _tokens: &TokenSet) -> Option<std::time::SystemTime> {
        Some(std::time::UNIX_EPOCH)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewable_time_already_past_does_not_spin_the_refresher() {
    let clock = Arc::new(ManualClock::fixed());
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let manager = TokenManager::builder(Confused(asked.clone()))
        .clock(clock.clone())
        .build();
    for (i, expiry) in [Some(30 * DAY), None].into_iter().enumerate() {
        let mut tokens = TokenSet::new(AccessToken::new(format!("t{i}")));
        if let Some(life) = expiry {
            tokens = tokens.with_expires_at(clock.now() + life);
        }
        manager
            .insert(TokenKey::from(format!("k{i}")), tokens)
            .await
            .unwrap();
    }
    let refresher = manager.start_refresher(RefresherConfig::new());
    // A spinning scheduler never goes idle: the timeout turns that hang into a failure.
    let idle = async {
        for _ in 0..6 {
            clock.advance(10 * MINUTE);
            refresher.wait_idle().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), idle)
        .await
        .expect("the refresher went idle");
    let asked = asked.load(std::sync::atomic::Ordering::SeqCst);
    // About one look per grant per rescan interval (10 minutes) over an hour.
    assert!(asked <= 40, "asked {asked} times");
    refresher.shutdown().await;
}
