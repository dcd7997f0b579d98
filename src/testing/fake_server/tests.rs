use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use serde_json::{json, Value};

use super::*;
use crate::testing::ManualClock;

const HOUR: Duration = Duration::from_secs(3_600);
const DAY: Duration = Duration::from_secs(86_400);

const CC_DEAD: &str =
    r#"{"error":"invalid_grant","error_description":"The refresh token is invalid or expired."}"#;
const XOXODAY_TOKEN_ERROR: &str = r#"{"success":0,"error_message_id":"auth.token_error"}"#;
const XOXODAY_INVALID_TOKEN: &str =
    r#"{"error":"invalid_token","error_description":"invalid/expired token"}"#;

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn field(&self, name: &str) -> String {
        self.json()[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {}", self.body))
            .to_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn error(&self) -> String {
        self.field("error")
    }
}

async fn start(config: FakeConfig) -> (FakeAuthServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::fixed());
    (FakeAuthServer::start(config, clock.clone()).await, clock)
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("the fake server answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

fn form(params: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

async fn post_form(server: &FakeAuthServer, basic: bool, params: &[(&str, &str)]) -> Reply {
    let mut request = reqwest::Client::new()
        .post(server.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(params));
    if basic {
        request = request.basic_auth(server.client_id(), Some(server.client_secret()));
    }
    send(request).await
}

async fn post_json(server: &FakeAuthServer, body: &Value) -> Reply {
    send(
        reqwest::Client::new()
            .post(server.token_url())
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap()),
    )
    .await
}

/// The refresh request a well-behaved client of the server's preset sends.
async fn refresh(server: &FakeAuthServer, refresh_token: &str) -> Reply {
    match server.config().preset() {
        Preset::Xoxoday => {
            post_json(
                server,
                &json!({
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": server.client_id(),
                    "client_secret": server.client_secret(),
                }),
            )
            .await
        }
        _ => {
            let params = [
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ];
            post_form(server, true, &params).await
        }
    }
}

fn millis(at: SystemTime) -> u128 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

// ---- success bodies -------------------------------------------------------------------------

#[tokio::test]
async fn standard_success_body_with_basic_or_body_credentials() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    assert_eq!(grant.expires_in, HOUR);
    assert_eq!(grant.refresh_expires_at, None);

    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let (at, rt) = (reply.field("access_token"), reply.field("refresh_token"));
    assert_eq!(
        reply.body,
        format!(
            r#"{{"access_token":"{at}","token_type":"Bearer","expires_in":3600,"refresh_token":"{rt}"}}"#
        )
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert!(
        at.starts_with("at-g1-") && rt.starts_with("rt-g1-"),
        "{at} {rt}"
    );

    let in_body = post_form(
        &server,
        false,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", server.client_id()),
            ("client_secret", server.client_secret()),
        ],
    )
    .await;
    assert_eq!(in_body.status, 200, "{}", in_body.body);
    assert_eq!(server.refresh_calls(), 2);
}

#[tokio::test]
async fn constant_contact_success_body_and_query_string_request() {
    let (server, _clock) = start(FakeConfig::constant_contact()).await;
    assert!(server.token_url().ends_with("/oauth2/default/v1/token"));
    let grant = server.issue_grant();

    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let (at, rt) = (reply.field("access_token"), reply.field("refresh_token"));
    assert_eq!(
        reply.body,
        format!(
            r#"{{"token_type":"Bearer","expires_in":86400,"access_token":"{at}","scope":"contact_data campaign_data offline_access","refresh_token":"{rt}"}}"#
        )
    );

    let query = send(
        reqwest::Client::new()
            .post(format!(
                "{}?grant_type=refresh_token&refresh_token={rt}",
                server.token_url()
            ))
            .basic_auth(server.client_id(), Some(server.client_secret())),
    )
    .await;
    assert_eq!(query.status, 200, "{}", query.body);
    assert_ne!(query.field("refresh_token"), rt);
}

#[tokio::test]
async fn xoxoday_success_body_keeps_the_absolute_refresh_expiry() {
    let (server, clock) = start(FakeConfig::xoxoday()).await;
    assert!(server.token_url().ends_with("/chef/v1/oauth/token/user"));
    let issued_at = clock.now();
    let grant = server.issue_grant();
    assert_eq!(grant.refresh_expires_at, Some(issued_at + 30 * DAY));

    clock.advance(DAY);
    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let (at, rt) = (reply.field("access_token"), reply.field("refresh_token"));
    let access_expiry = millis(clock.now() + 15 * DAY);
    let refresh_expiry = millis(issued_at + 30 * DAY);
    assert_eq!(
        reply.body,
        format!(
            r#"{{"access_token":"{at}","token_type":"bearer","expires_in":1296000,"refresh_token":"{rt}","access_token_expiry":"{access_expiry}","refresh_token_expiry":"{refresh_expiry}"}}"#
        )
    );

    // Rotation does not buy time: 30 days after the grant, the chain ends.
    clock.advance(29 * DAY);
    let expired = refresh(&server, &rt).await;
    assert_eq!(
        (expired.status, expired.body.as_str()),
        (401, XOXODAY_INVALID_TOKEN)
    );
    assert_eq!(
        server.grant_state(&grant.grant),
        GrantState::RefreshTokenExpired
    );
}

// ---- rotation and reuse detection --------------------------------------------------------------

#[tokio::test]
async fn rotation_on_spends_the_old_token_and_reuse_revokes_the_grant() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    let first = refresh(&server, &grant.refresh_token).await;
    let rt2 = first.field("refresh_token");
    let at2 = first.field("access_token");
    assert_eq!(
        server.current_refresh_token(&grant.grant),
        Some(rt2.clone())
    );

    let replay = refresh(&server, &grant.refresh_token).await;
    assert_eq!(replay.status, 400);
    assert_eq!(replay.error(), "invalid_grant");
    assert_eq!(server.reuse_detections(), 1);
    assert_eq!(
        server.grant_state(&grant.grant),
        GrantState::Revoked(RevocationReason::ReuseDetected)
    );
    assert!(!server.is_access_token_valid(&at2));
    assert!(!server.is_access_token_valid(&grant.access_token));
    assert_eq!(server.current_refresh_token(&grant.grant), None);

    let current = refresh(&server, &rt2).await;
    assert_eq!(current.status, 400);
    assert_eq!(current.error(), "invalid_grant");
    assert_eq!(
        server.reuse_detections(),
        1,
        "a dead grant is not detected twice"
    );
    let outcomes: Vec<_> = server.requests().iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            RefreshOutcome::Refreshed { rotated: true },
            RefreshOutcome::ReuseDetected,
            RefreshOutcome::Revoked(RevocationReason::ReuseDetected),
        ]
    );
}

#[tokio::test]
async fn without_reuse_detection_a_spent_token_only_fails_itself() {
    let (server, _clock) = start(FakeConfig::standard().with_reuse_detection(false)).await;
    let grant = server.issue_grant();
    let rt2 = refresh(&server, &grant.refresh_token)
        .await
        .field("refresh_token");
    let replay = refresh(&server, &grant.refresh_token).await;
    assert_eq!(replay.status, 400);
    assert_eq!(server.reuse_detections(), 0);
    assert_eq!(refresh(&server, &rt2).await.status, 200);
    assert_eq!(server.requests()[1].outcome, RefreshOutcome::Spent);
}

#[tokio::test]
async fn rotation_off_returns_the_same_refresh_token_or_omits_it() {
    let (server, _clock) = start(FakeConfig::standard().with_rotation(Rotation::Off)).await;
    let grant = server.issue_grant();
    for _ in 0..3 {
        let reply = refresh(&server, &grant.refresh_token).await;
        assert_eq!(reply.field("refresh_token"), grant.refresh_token);
    }
    assert_eq!(server.refresh_calls_for(&grant.grant), 3);
    assert_eq!(
        server.requests()[0].outcome,
        RefreshOutcome::Refreshed { rotated: false }
    );

    let (server, _clock) = start(
        FakeConfig::standard()
            .with_rotation(Rotation::Off)
            .with_unchanged_refresh_token_omitted(true),
    )
    .await;
    let grant = server.issue_grant();
    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.json().get("refresh_token").is_none(),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn grace_window_replays_the_current_refresh_token_then_detects_reuse() {
    let config = FakeConfig::xoxoday().with_rotation(Rotation::OnWithGrace(6 * HOUR));
    let (server, clock) = start(config).await;
    let grant = server.issue_grant();
    let first = refresh(&server, &grant.refresh_token).await;
    let rt2 = first.field("refresh_token");

    clock.advance(5 * HOUR);
    let again = refresh(&server, &grant.refresh_token).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.field("refresh_token"), rt2, "no second rotation");
    assert_ne!(again.field("access_token"), first.field("access_token"));
    assert!(server.is_access_token_valid(&again.field("access_token")));
    assert_eq!(server.requests()[1].outcome, RefreshOutcome::GraceReplay);

    clock.advance(HOUR);
    let late = refresh(&server, &grant.refresh_token).await;
    assert_eq!(
        (late.status, late.body.as_str()),
        (401, XOXODAY_INVALID_TOKEN)
    );
    assert_eq!(server.reuse_detections(), 1);
    assert_eq!(
        server.grant_state(&grant.grant),
        GrantState::Revoked(RevocationReason::ReuseDetected)
    );
}

#[tokio::test]
async fn concurrent_refreshes_with_one_token_trip_reuse_detection() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    let (a, b) = tokio::join!(
        refresh(&server, &grant.refresh_token),
        refresh(&server, &grant.refresh_token)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 400]);
    assert_eq!(server.reuse_detections(), 1);
}

// ---- out-of-band events -----------------------------------------------------------------------

#[tokio::test]
async fn revoke_kills_every_token_of_the_grant_only() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    let other = server.issue_grant();
    server.revoke(&grant.grant);

    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.body,
        r#"{"error":"invalid_grant","error_description":"The grant has been revoked."}"#
    );
    assert!(!server.is_access_token_valid(&grant.access_token));
    assert!(server.is_access_token_valid(&other.access_token));
    assert_eq!(refresh(&server, &other.refresh_token).await.status, 200);
    assert_eq!(
        server.grant_state(&grant.grant),
        GrantState::Revoked(RevocationReason::UserRevoked)
    );
}

#[tokio::test]
async fn xoxoday_password_reset_answers_auth_token_error() {
    let (server, _clock) = start(FakeConfig::xoxoday()).await;
    let grant = server.issue_grant();
    server.reset_password(&grant.grant);
    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (401, XOXODAY_TOKEN_ERROR)
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(!server.is_access_token_valid(&grant.access_token));
    assert_eq!(
        server.requests()[0].outcome,
        RefreshOutcome::Revoked(RevocationReason::PasswordReset)
    );
}

#[tokio::test]
async fn xoxoday_supersede_kills_old_tokens_with_invalid_token() {
    let (server, clock) = start(FakeConfig::xoxoday()).await;
    let grant = server.issue_grant();
    clock.advance(20 * DAY);
    let fresh = server.supersede(&grant.grant);
    assert_eq!(fresh.grant, grant.grant);
    assert_eq!(fresh.refresh_expires_at, Some(clock.now() + 30 * DAY));

    let old = refresh(&server, &grant.refresh_token).await;
    assert_eq!(
        (old.status, old.body.as_str()),
        (401, XOXODAY_INVALID_TOKEN)
    );
    assert_eq!(server.requests()[0].outcome, RefreshOutcome::Superseded);
    assert!(!server.is_access_token_valid(&grant.access_token));
    assert!(server.is_access_token_valid(&fresh.access_token));
    assert_eq!(refresh(&server, &fresh.refresh_token).await.status, 200);
    assert_eq!(server.reuse_detections(), 0);
}

#[tokio::test]
async fn expired_refresh_token_gets_the_presets_body() {
    let (server, _clock) = start(FakeConfig::constant_contact()).await;
    let grant = server.issue_grant();
    server.expire_refresh_token(&grant.grant);
    assert_eq!(
        server.grant_state(&grant.grant),
        GrantState::RefreshTokenExpired
    );
    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!((reply.status, reply.body.as_str()), (400, CC_DEAD));
    assert_eq!(server.requests()[0].outcome, RefreshOutcome::Expired);
}

#[tokio::test]
async fn unknown_refresh_tokens_are_invalid_grant() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let reply = refresh(&server, "rt-made-up").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error(), "invalid_grant");
    let (xoxo, _clock) = start(FakeConfig::xoxoday()).await;
    let reply = refresh(&xoxo, "rt-made-up").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (401, XOXODAY_INVALID_TOKEN)
    );
}

// ---- simulated time ---------------------------------------------------------------------------

#[tokio::test]
async fn constant_contact_refresh_tokens_die_after_180_unused_days() {
    let (server, clock) = start(FakeConfig::constant_contact()).await;
    let grant = server.issue_grant();
    assert_eq!(grant.refresh_expires_at, Some(clock.now() + 180 * DAY));

    // Used every 179 days, a rotating chain lives on.
    let mut rt = grant.refresh_token.clone();
    for _ in 0..3 {
        clock.advance(179 * DAY);
        let reply = refresh(&server, &rt).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        rt = reply.field("refresh_token");
    }
    clock.advance(180 * DAY);
    assert_eq!(
        server.grant_state(&grant.grant),
        GrantState::RefreshTokenExpired
    );
    let reply = refresh(&server, &rt).await;
    assert_eq!((reply.status, reply.body.as_str()), (400, CC_DEAD));
}

#[tokio::test]
async fn long_lived_refresh_tokens_slide_on_each_use() {
    let config = FakeConfig::constant_contact().with_rotation(Rotation::Off);
    let (server, clock) = start(config).await;
    let grant = server.issue_grant();
    clock.advance(170 * DAY);
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
    clock.advance(170 * DAY);
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
    clock.advance(180 * DAY);
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 400);
}

#[tokio::test]
async fn access_tokens_expire_on_the_clock() {
    let (server, clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    assert!(server.is_access_token_valid(&grant.access_token));
    clock.advance(HOUR - Duration::from_secs(1));
    assert!(server.is_access_token_valid(&grant.access_token));
    clock.advance(Duration::from_secs(1));
    assert!(!server.is_access_token_valid(&grant.access_token));
    assert!(!server.is_access_token_valid(&grant.refresh_token));
    assert!(!server.is_access_token_valid("nonsense"));
}

// ---- rate limits ------------------------------------------------------------------------------

#[tokio::test]
async fn standard_rate_limit_sends_retry_after_seconds() {
    let (server, clock) = start(FakeConfig::standard().with_rotation(Rotation::Off)).await;
    let grant = server.issue_grant();
    server.set_rate_limit(Some(RateLimit::new(2, Duration::from_secs(60))));
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
    clock.advance(Duration::from_millis(10_500));
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);

    let limited = refresh(&server, &grant.refresh_token).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error(), "temporarily_unavailable");
    assert_eq!(
        limited.header("retry-after"),
        Some("50"),
        "49.5 s, rounded up"
    );
    assert_eq!(server.requests()[2].outcome, RefreshOutcome::RateLimited);

    clock.advance(Duration::from_secs(50));
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);

    // Limits are per grant.
    let other = server.issue_grant();
    assert_eq!(refresh(&server, &other.refresh_token).await.status, 200);

    server.set_rate_limit(Some(
        RateLimit::new(0, Duration::from_secs(60)).retry_after(RetryAfter::Omitted),
    ));
    let bare = refresh(&server, &grant.refresh_token).await;
    assert_eq!(bare.status, 429);
    assert_eq!(bare.header("retry-after"), None);

    server.set_rate_limit(Some(
        RateLimit::new(0, Duration::from_secs(60)).retry_after(RetryAfter::HttpDate),
    ));
    let dated = refresh(&server, &grant.refresh_token).await;
    let expected = httpdate::fmt_http_date(clock.now() + Duration::from_secs(60));
    assert_eq!(dated.header("retry-after"), Some(expected.as_str()));

    server.set_rate_limit(None);
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
}

#[tokio::test]
async fn constant_contact_rate_limit_has_no_retry_after() {
    let (server, _clock) = start(FakeConfig::constant_contact()).await;
    let grant = server.issue_grant();
    server.set_rate_limit(Some(RateLimit::new(0, HOUR)));
    let reply = refresh(&server, &grant.refresh_token).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (
            429,
            r#"{"error_key":"throttled","error_message":"Too Many Requests"}"#
        )
    );
    assert_eq!(reply.header("retry-after"), None);
    assert_eq!(server.grant_state(&grant.grant), GrantState::Active);
}

#[tokio::test]
async fn xoxoday_rate_limit_abuse_invalidates_the_grant() {
    let (server, _clock) = start(FakeConfig::xoxoday()).await;
    let grant = server.issue_grant();
    server.set_rate_limit(Some(RateLimit::new(1, HOUR).invalidate_after(2)));
    let ok = refresh(&server, &grant.refresh_token).await;
    assert_eq!(ok.status, 200);
    let rt = ok.field("refresh_token");

    let limit = r#"{"message":"auth.request_limit_exceeded"}"#;
    for _ in 0..2 {
        let reply = refresh(&server, &rt).await;
        assert_eq!((reply.status, reply.body.as_str()), (429, limit));
        assert_eq!(reply.header("retry-after"), None);
    }
    assert_eq!(
        server.grant_state(&grant.grant),
        GrantState::Revoked(RevocationReason::RateLimitAbuse)
    );
    let dead = refresh(&server, &rt).await;
    assert_eq!(
        (dead.status, dead.body.as_str()),
        (401, XOXODAY_INVALID_TOKEN)
    );
}

// ---- scripted failures ------------------------------------------------------------------------

#[tokio::test]
async fn fail_next_answers_html_and_changes_nothing() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    server.fail_next(2, 503);
    server.fail_next(1, 502);
    for expected in [503, 503, 502] {
        let reply = refresh(&server, &grant.refresh_token).await;
        assert_eq!(reply.status, expected);
        assert_eq!(reply.header("content-type"), Some("text/html"));
        assert!(
            reply.body.contains(&format!("<h1>{expected} ")),
            "{}",
            reply.body
        );
    }
    assert_eq!(
        server.current_refresh_token(&grant.grant),
        Some(grant.refresh_token.clone())
    );
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
    assert_eq!(server.refresh_calls(), 4);
    assert_eq!(server.refresh_calls_for(&grant.grant), 4);
    assert!(server.requests()[..3]
        .iter()
        .all(|r| r.outcome == RefreshOutcome::InjectedFailure && !r.reply_lost));
}

#[tokio::test]
async fn lost_reply_then_retry_trips_reuse_detection_under_strict_rotation() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    server.lose_next_replies(1);

    let lost = refresh(&server, &grant.refresh_token).await;
    assert_eq!(lost.status, 504);
    assert_eq!(lost.header("content-type"), Some("text/html"));
    assert!(lost.body.contains("504 Gateway Time-out"), "{}", lost.body);
    let committed = server.requests()[0].clone();
    assert_eq!(
        committed.outcome,
        RefreshOutcome::Refreshed { rotated: true }
    );
    assert!(committed.reply_lost);
    assert_eq!(committed.status, 504);
    assert_ne!(
        server.current_refresh_token(&grant.grant),
        Some(grant.refresh_token.clone())
    );

    let retry = refresh(&server, &grant.refresh_token).await;
    assert_eq!(retry.status, 400);
    assert_eq!(retry.error(), "invalid_grant");
    assert_eq!(server.reuse_detections(), 1);
    assert_eq!(server.refresh_calls_for(&grant.grant), 2);
}

#[tokio::test]
async fn lost_reply_then_retry_succeeds_inside_a_grace_window() {
    let config =
        FakeConfig::standard().with_rotation(Rotation::OnWithGrace(Duration::from_secs(60)));
    let (server, clock) = start(config).await;
    let grant = server.issue_grant();
    server.lose_next_replies(1);
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 504);

    clock.advance(Duration::from_secs(5));
    let retry = refresh(&server, &grant.refresh_token).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(
        Some(retry.field("refresh_token")),
        server.current_refresh_token(&grant.grant),
        "the client now holds the token the server holds"
    );
    assert_eq!(server.reuse_detections(), 0);
}

#[tokio::test]
async fn set_delay_slows_replies_but_the_server_still_commits() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    server.set_delay(Some(Duration::from_millis(500)));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let timed_out = client
        .post(server.token_url())
        .basic_auth(server.client_id(), Some(server.client_secret()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &grant.refresh_token),
        ]))
        .send()
        .await;
    assert!(timed_out.is_err_and(|e| e.is_timeout()));
    assert_eq!(server.refresh_calls(), 1);
    assert_ne!(
        server.current_refresh_token(&grant.grant),
        Some(grant.refresh_token.clone())
    );

    server.set_delay(None);
    let current = server.current_refresh_token(&grant.grant).unwrap();
    assert_eq!(refresh(&server, &current).await.status, 200);
}

// ---- malformed requests -----------------------------------------------------------------------

#[tokio::test]
async fn malformed_form_requests_get_400_invalid_request() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    let rt = grant.refresh_token.as_str();
    let client = reqwest::Client::new();
    let bodies: [(&str, Vec<u8>); 6] = [
        ("application/x-www-form-urlencoded", b"%zz=1".to_vec()),
        (
            "application/x-www-form-urlencoded",
            vec![0xff, 0xfe, b'=', 0x80],
        ),
        (
            "application/json",
            br#"{"grant_type":"refresh_token"}"#.to_vec(),
        ),
        (
            "application/x-www-form-urlencoded",
            b"grant_type=refresh_token".to_vec(),
        ),
        (
            "application/x-www-form-urlencoded",
            b"refresh_token=x".to_vec(),
        ),
        (
            "application/x-www-form-urlencoded",
            format!("grant_type=refresh_token&refresh_token={rt}&refresh_token={rt}").into_bytes(),
        ),
    ];
    for (content_type, body) in bodies {
        let reply = send(
            client
                .post(server.token_url())
                .basic_auth(server.client_id(), Some(server.client_secret()))
                .header("content-type", content_type)
                .body(body),
        )
        .await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert_eq!(reply.error(), "invalid_request");
    }
    let empty = send(
        client
            .post(server.token_url())
            .basic_auth(server.client_id(), Some(server.client_secret())),
    )
    .await;
    assert_eq!(
        (empty.status, empty.error()),
        (400, "invalid_request".to_owned())
    );

    let wrong_grant = post_form(&server, true, &[("grant_type", "password")]).await;
    assert_eq!(
        (wrong_grant.status, wrong_grant.error()),
        (400, "unsupported_grant_type".to_owned())
    );
    assert_eq!(
        refresh(&server, rt).await.status,
        200,
        "the grant is untouched"
    );
}

#[tokio::test]
async fn bad_client_credentials_get_401_invalid_client() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    let params = form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", &grant.refresh_token),
    ]);
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(server.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(params.clone())
    };

    let wrong = send(post().basic_auth(server.client_id(), Some("wrong"))).await;
    assert_eq!(
        (wrong.status, wrong.error()),
        (401, "invalid_client".to_owned())
    );
    assert_eq!(
        wrong.header("www-authenticate"),
        Some(r#"Basic realm="token""#)
    );
    let garbage = send(post().header("authorization", "Basic !!!")).await;
    assert_eq!(garbage.status, 401);
    let missing = send(post()).await;
    assert_eq!(
        (missing.status, missing.header("www-authenticate")),
        (401, None)
    );
    assert_eq!(server.requests()[0].outcome, RefreshOutcome::InvalidClient);
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
}

#[tokio::test]
async fn malformed_xoxoday_requests_get_400_invalid_request() {
    let (server, _clock) = start(FakeConfig::xoxoday()).await;
    let grant = server.issue_grant();
    let client = reqwest::Client::new();
    for body in [&b"{not json"[..], b"[1,2]", br#"{"grant_type":7}"#, b""] {
        let reply = send(
            client
                .post(server.token_url())
                .header("content-type", "application/json")
                .body(body.to_vec()),
        )
        .await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert_eq!(reply.error(), "invalid_request");
    }
    let form_body = post_form(&server, true, &[("grant_type", "refresh_token")]).await;
    assert_eq!(form_body.status, 400);

    let no_secret = post_json(
        &server,
        &json!({
            "grant_type": "refresh_token",
            "refresh_token": grant.refresh_token,
            "client_id": server.client_id(),
        }),
    )
    .await;
    assert_eq!(
        (no_secret.status, no_secret.error()),
        (401, "invalid_client".to_owned())
    );
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
}

#[tokio::test]
async fn other_paths_and_methods_are_not_the_token_endpoint() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let get = send(reqwest::Client::new().get(server.token_url())).await;
    assert_eq!(get.status, 404);
    let elsewhere = send(reqwest::Client::new().post(format!("{}/token", server.uri()))).await;
    assert_eq!(elsewhere.status, 404);
    assert_eq!(server.refresh_calls(), 0);
}

// ---- odds and ends ----------------------------------------------------------------------------

#[tokio::test]
async fn debug_output_redacts_secrets() {
    let (server, _clock) = start(FakeConfig::standard()).await;
    let grant = server.issue_grant();
    let printed = format!("{grant:?} {server:?}");
    assert!(!printed.contains(&grant.access_token), "{printed}");
    assert!(!printed.contains(&grant.refresh_token), "{printed}");
    assert!(!printed.contains(server.client_secret()), "{printed}");
    assert!(
        printed.contains(r#"access_token: "[redacted]""#),
        "{printed}"
    );
    assert!(printed.contains("grant: GrantId(g1)"), "{printed}");
}

#[tokio::test]
async fn token_values_are_unique_and_seeded() {
    let (a, _clock) = start(FakeConfig::standard()).await;
    let (b, _clock) = start(FakeConfig::standard()).await;
    let (c, _clock) = start(FakeConfig::standard().with_seed(7)).await;
    let (ga, gb, gc) = (a.issue_grant(), b.issue_grant(), c.issue_grant());
    assert_eq!(ga.access_token, gb.access_token, "same seed, same tokens");
    assert_ne!(ga.access_token, gc.access_token);
    let second = a.issue_grant();
    let all = [
        &ga.access_token,
        &ga.refresh_token,
        &second.access_token,
        &second.refresh_token,
    ];
    for (i, x) in all.iter().enumerate() {
        for y in &all[i + 1..] {
            assert_ne!(x, y);
        }
    }
}

#[test]
#[should_panic(expected = "was not issued by this FakeAuthServer")]
fn foreign_grants_panic() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (server, _clock) = start(FakeConfig::standard()).await;
        server.revoke(&GrantId(9));
    });
}

/// wiremock serves from its own thread and runtime, so paused tokio time on the test's side
/// does not stop it (the client here sets no timer that could auto-advance).
#[tokio::test(start_paused = true)]
async fn works_under_paused_tokio_time() {
    let (server, _clock) = start(FakeConfig::constant_contact()).await;
    let grant = server.issue_grant();
    assert_eq!(refresh(&server, &grant.refresh_token).await.status, 200);
}

#[tokio::test]
async fn xoxoday_expiries_can_be_numbers() {
    let (server, clock) = start(FakeConfig::xoxoday().with_numeric_expiries(true)).await;
    let grant = server.issue_grant();
    let reply = refresh(&server, &grant.refresh_token).await;
    let body = reply.json();
    assert_eq!(
        body["access_token_expiry"].as_u64().map(u128::from),
        Some(millis(clock.now() + 15 * DAY))
    );
    assert!(body["refresh_token_expiry"].is_u64(), "{}", reply.body);
}

#[tokio::test]
async fn public_clients_send_only_their_id() {
    let params = |server: &FakeAuthServer, rt: &str| {
        form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_id", server.client_id()),
        ])
    };
    for (config, expected) in [
        (FakeConfig::standard(), 401),
        (FakeConfig::standard().with_public_client(true), 200),
    ] {
        let (server, _clock) = start(config).await;
        let grant = server.issue_grant();
        let reply = send(
            reqwest::Client::new()
                .post(server.token_url())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(params(&server, &grant.refresh_token)),
        )
        .await;
        assert_eq!(reply.status, expected, "{}", reply.body);
    }
}

#[tokio::test]
async fn the_protected_resource_answers_in_the_presets_words() {
    let (server, clock) = start(FakeConfig::constant_contact()).await;
    let grant = server.issue_grant();
    let call = |token: &str| {
        reqwest::Client::new()
            .get(server.api_url())
            .header("authorization", format!("Bearer {token}"))
    };
    let ok = send(call(&grant.access_token)).await;
    assert_eq!((ok.status, ok.body.as_str()), (200, r#"{"grant":"g1"}"#));

    clock.advance(DAY);
    let expired = send(call(&grant.access_token)).await;
    assert_eq!(
        (expired.status, expired.body.as_str()),
        (
            401,
            r#"{"error_key":"unauthorized","error_message":"Unauthorized"}"#
        )
    );
    assert_eq!(
        expired.header("www-authenticate"),
        Some("Bearer realm=api.cc.email")
    );
    let anonymous = send(reqwest::Client::new().get(server.api_url())).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(server.api_calls(), 3);
    assert_eq!(server.refresh_calls(), 0);

    let (standard, _clock) = start(FakeConfig::standard()).await;
    let grant = standard.issue_grant();
    standard.revoke(&grant.grant);
    let revoked = send(
        reqwest::Client::new()
            .post(standard.api_url())
            .header("authorization", format!("Bearer {}", grant.access_token)),
    )
    .await;
    assert_eq!(revoked.status, 401);
    assert!(revoked
        .header("www-authenticate")
        .is_some_and(|challenge| challenge.starts_with(r#"Bearer error="invalid_token""#)));
}
