//! A Xoxoday-style grant: a custom `Provider` for a non-standard JSON refresh endpoint, tokens
//! copied from an admin dashboard, rotation, and out-of-band invalidations.
//!
//! What it shows, on simulated time:
//!
//! 1. A grant inserted by hand, as if copied from the provider's dashboard (no OAuth
//!    redirect), with its non-renewable 30-day refresh-token expiry.
//! 2. A refresh 16 days later through `XoxodayProvider` (defined below): the refresh token
//!    rotates, and the expiries come back as epoch-millisecond strings.
//! 3. The three documented invalidations, each on its own grant, each arriving as a typed
//!    `Error` and an `Event`, with what the application should do: a super admin resets the
//!    password; another admin generates new tokens; too many refresh requests (the manager's
//!    backoff keeps a runaway "refresh on every 4xx" loop from reaching the server, and the
//!    grant's eventual death is reported).
//! 4. The background refresher's `Event::RefreshTokenExpiring` a week before the 30-day
//!    expiry, and the owner regenerating tokens in time.
//!
//! It runs offline against `tokenkeeper::testing::FakeAuthServer`, which speaks Xoxoday's wire
//! format on a loopback port, and exits non-zero if anything does not go as narrated:
//!
//! ```text
//! cargo run --example xoxoday
//! ```
//!
//! Real mode: with `XOXODAY_CLIENT_ID`, `XOXODAY_CLIENT_SECRET` and `XOXODAY_REFRESH_TOKEN`
//! set, it performs one real refresh against `XOXODAY_TOKEN_URL` (default: the staging host,
//! `https://stagingstores.xoxoday.com/chef/v1/oauth/token/user`) and prints the outcome (never
//! a token). Xoxoday rotates refresh tokens, so the one you passed is spent by that refresh:
//! set `XOXODAY_REFRESH_TOKEN_OUT` to a file path to keep the new one (written with owner-only
//! permissions on Unix).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use tokenkeeper::testing::{
    FakeAuthServer, FakeConfig, GrantState, IssuedGrant, ManualClock, RateLimit, RevocationReason,
};
use tokenkeeper::{
    AccessToken, ClientSecret, Clock, ConfigProblem, Error, Event, HttpReply, InvalidationReason,
    Provider, ProviderError, RefreshRequest, RefreshToken, RefresherConfig, TokenKey, TokenManager,
    TokenResponse, TokenSet, XoxodayClassifier, DEFAULT_BODY_LIMIT,
};
use tokio::sync::broadcast::Receiver;

const STAGING_TOKEN_URL: &str = "https://stagingstores.xoxoday.com/chef/v1/oauth/token/user";
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Refreshes at a Xoxoday-style endpoint: a JSON body with the client secret in it (no Basic
/// header), replies with epoch-millisecond expiries and provider-specific error bodies.
struct XoxodayProvider {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: ClientSecret,
}

impl XoxodayProvider {
    fn new(token_url: &str, client_id: &str, client_secret: &str) -> anyhow::Result<Self> {
        Ok(Self {
            // Never follow redirects with a secret in the body.
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()?,
            token_url: token_url.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: ClientSecret::new(client_secret),
        })
    }
}

#[async_trait]
impl Provider for XoxodayProvider {
    async fn refresh(&self, req: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        let Some(refresh_token) = req.tokens.refresh_token() else {
            return Err(ProviderError::reauthorize(
                InvalidationReason::NoRefreshToken,
            ));
        };
        let body = serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.secret(),
            "client_id": self.client_id,
            "client_secret": self.client_secret.secret(),
        });
        let request = self
            .http
            .post(&self.token_url)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body.to_string())
            .build()
            .map_err(|_| ProviderError::misconfigured(ConfigProblem::Endpoint))?;
        let reply = HttpReply::send(&self.http, request, DEFAULT_BODY_LIMIT).await?;
        // The classifier knows Xoxoday's error bodies; successes are parsed leniently
        // (`expires_in` as a number or string, `*_expiry` as epoch ms, string or number).
        reply.interpret(&XoxodayClassifier, req.now)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = |name| std::env::var(name).ok();
    match (
        env("XOXODAY_CLIENT_ID"),
        env("XOXODAY_CLIENT_SECRET"),
        env("XOXODAY_REFRESH_TOKEN"),
    ) {
        (Some(id), Some(secret), Some(refresh)) => {
            let url = env("XOXODAY_TOKEN_URL").unwrap_or_else(|| STAGING_TOKEN_URL.to_owned());
            real_mode(&url, &id, &secret, &refresh).await
        }
        (None, None, None) => offline().await,
        _ => bail!(
            "real mode needs XOXODAY_CLIENT_ID, XOXODAY_CLIENT_SECRET and XOXODAY_REFRESH_TOKEN; \
             unset them all to run offline"
        ),
    }
}

async fn offline() -> anyhow::Result<()> {
    // One clock for the fake server and the manager: advancing it moves both.
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::xoxoday(), clock.clone()).await;
    let provider = XoxodayProvider::new(
        &server.token_url(),
        server.client_id(),
        server.client_secret(),
    )?;
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();
    let mut events = manager.subscribe();
    let api = reqwest::Client::new();
    let log = |what: &str| println!("{}  {what}", date(clock.now()));

    println!("== 1. tokens copied from the dashboard");
    let acme = TokenKey::from("acme");
    let acme_grant = server.issue_grant();
    manager
        .insert(acme.clone(), from_dashboard(&acme_grant))
        .await?;
    let dies = acme_grant.refresh_expires_at.context("30-day expiry")?;
    log(&format!(
        "acme inserted by hand: access until {}, refresh token dies {} (not renewable)",
        date(acme_grant.access_expires_at),
        date(dies)
    ));

    println!("\n== 2. a refresh 16 days later");
    clock.advance(16 * DAY);
    let token = manager.access_token(&acme).await?;
    ensure!(server.refresh_calls() == 1, "expected exactly one refresh");
    ensure!(server.is_access_token_valid(token.secret()));
    let stored = manager.token(&acme).await?;
    let rotated = stored.refresh_token().context("refresh token kept")?;
    ensure!(
        rotated.secret() != acme_grant.refresh_token
            && server.current_refresh_token(&acme_grant.grant).as_deref() == Some(rotated.secret()),
        "the rotated refresh token must be the one stored"
    );
    ensure!(stored.expires_at() == Some(clock.now() + 15 * DAY));
    ensure!(
        stored.refresh_expires_at() == Some(dies),
        "rotation must keep the absolute 30-day expiry"
    );
    ensure!(matches!(
        events.try_recv(),
        Ok(Event::Refreshed { rotated: true, .. })
    ));
    log(&format!(
        "API call: access token expired -> 1 refresh, refresh token rotated and saved\n    \
         stored: access until {} (`expires_in`), refresh token still dies {} \
         (`refresh_token_expiry`, epoch ms as a string)",
        date(stored.expires_at().unwrap_or(UNIX_EPOCH)),
        date(dies)
    ));

    println!("\n== 3. the three documented invalidations");
    // (a) A super admin resets the password: every token of the grant dies.
    let globex = TokenKey::from("globex");
    let globex_grant = server.issue_grant();
    manager
        .insert(globex.clone(), from_dashboard(&globex_grant))
        .await?;
    server.reset_password(&globex_grant.grant);
    let error = rejected_api_call(&manager, &api, &server, &globex).await?;
    expect_dead(&error, &InvalidationReason::PasswordChanged)?;
    let event = reauth_event(&mut events, &globex)?;
    log("globex: a super admin reset the password; the API answers 401, the app reports it");
    println!("    error: {error}");
    println!("    event: {event}");
    println!("    -> email the account owner: tokens must be regenerated in the Xoxoday dashboard");

    // (b) Another super admin generates new tokens in the dashboard: ours die.
    let initech = TokenKey::from("initech");
    let initech_grant = server.issue_grant();
    manager
        .insert(initech.clone(), from_dashboard(&initech_grant))
        .await?;
    let _theirs = server.supersede(&initech_grant.grant);
    let error = rejected_api_call(&manager, &api, &server, &initech).await?;
    expect_dead(&error, &InvalidationReason::Superseded)?;
    let event = reauth_event(&mut events, &initech)?;
    log("initech: another admin generated new tokens; the API answers 401, the app reports it");
    println!("    error: {error}");
    println!("    event: {event}");
    println!(
        "    -> ask that admin to paste the new tokens into this app (one token set per account)"
    );

    // (c) Too many refresh requests: 3 per hour, and the grant is revoked after 3 rejections.
    let umbrella = TokenKey::from("umbrella");
    let umbrella_grant = server.issue_grant();
    manager
        .insert(umbrella.clone(), from_dashboard(&umbrella_grant))
        .await?;
    server.set_rate_limit(Some(RateLimit::new(3, HOUR).invalidate_after(3)));
    log("umbrella: a runaway loop forces a refresh every simulated second for 10 minutes");
    let start = clock.now();
    let mut first_limit = None;
    let mut last = None;
    for attempt in 1..=600 {
        let before = server.refresh_calls_for(&umbrella_grant.grant);
        let result = manager.refresh_now(&umbrella).await;
        let calls = server.refresh_calls_for(&umbrella_grant.grant);
        if calls > before {
            let secs = clock.now().duration_since(start)?.as_secs();
            let outcome = match &result {
                Ok(_) => "refreshed".to_owned(),
                Err(e) => format!("{e}{}", retry_hint(e)),
            };
            println!(
                "    +{secs:3} s  attempt {attempt:3} reached the server (call {calls}): {outcome}"
            );
        }
        if first_limit.is_none() && matches!(result, Err(Error::RateLimited { .. })) {
            first_limit = Some(calls);
        }
        last = Some(result);
        clock.advance(Duration::from_secs(1));
    }
    server.set_rate_limit(None);
    let calls = server.refresh_calls_for(&umbrella_grant.grant);
    ensure!(
        first_limit == Some(4),
        "the 4th call must be the first rate-limited one"
    );
    // 3 admitted, 3 rate-limited (the third revokes the grant), 1 answered "invalid token".
    ensure!(
        calls == 7,
        "backoff must keep the server's call count bounded, got {calls}"
    );
    ensure!(
        server.grant_state(&umbrella_grant.grant)
            == GrantState::Revoked(RevocationReason::RateLimitAbuse)
    );
    let error = match last {
        Some(Err(e)) if e.is_reauth_required() => e,
        other => bail!("umbrella should be dead by now, got {other:?}"),
    };
    let seen: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    let rate_limited_events = seen
        .iter()
        .filter(|e| {
            matches!(e, Event::RefreshFailed { key, error: Error::RateLimited { .. }, .. }
                if *key == umbrella)
        })
        .count();
    ensure!(rate_limited_events == 3, "one RefreshFailed per 429");
    let death = seen
        .iter()
        .find(|e| matches!(e, Event::ReauthorizationRequired { key, .. } if *key == umbrella))
        .context("a ReauthorizationRequired event for umbrella")?;
    println!(
        "    600 attempts, {calls} reached the server; 3 x Event::RefreshFailed (rate limited), then"
    );
    println!("    error: {error}");
    println!("    event: {}", describe(death));
    println!(
        "    (Xoxoday answers every dead token with the same `invalid_token` body, so the reason \
         reads as superseded)"
    );
    println!(
        "    -> fix the loop (refresh once per rejected token: `manager.invalidate`), then email \
         the account owner to regenerate tokens in the dashboard"
    );

    println!("\n== 4. the background refresher warns before the 30-day expiry");
    let refresher = manager.start_refresher(RefresherConfig::new());
    let mut warned = false;
    let mut regenerated = None;
    while clock.now() < dies + DAY {
        clock.advance(6 * HOUR);
        refresher.wait_idle().await;
        for event in std::iter::from_fn(|| events.try_recv().ok()) {
            match &event {
                Event::RefreshTokenExpiring {
                    key, expires_at, ..
                } if *key == acme => {
                    ensure!(
                        *expires_at == dies && !warned,
                        "one warning, for the known expiry"
                    );
                    warned = true;
                    log(&format!("acme: {}", describe(&event)));
                    log("  -> email the account owner to regenerate tokens in the dashboard");
                }
                Event::ReauthorizationRequired { .. } => bail!("unexpected: {}", describe(&event)),
                _ => log(&format!("{}: {}", event.key(), describe(&event))),
            }
        }
        // Two days after the warning, the owner regenerates tokens and pastes them in.
        if warned && regenerated.is_none() && clock.now() >= dies - 5 * DAY {
            let fresh = server.supersede(&acme_grant.grant);
            manager.insert(acme.clone(), from_dashboard(&fresh)).await?;
            regenerated = fresh.refresh_expires_at;
            log(&format!(
                "acme: owner regenerated tokens in the dashboard; inserted, new refresh expiry {}",
                regenerated.map_or("?".into(), date)
            ));
        }
    }
    ensure!(warned, "expected Event::RefreshTokenExpiring for acme");
    ensure!(regenerated.is_some());
    let token = manager.access_token(&acme).await?;
    ensure!(server.is_access_token_valid(token.secret()));
    ensure!(server.grant_state(&acme_grant.grant) == GrantState::Active);
    log("acme: past the old expiry, API calls still get a valid token");
    refresher.shutdown().await;

    println!("\nok: everything went as described");
    Ok(())
}

/// The token set an admin copies from the dashboard, expiries included.
fn from_dashboard(grant: &IssuedGrant) -> TokenSet {
    let tokens = TokenSet::new(AccessToken::new(grant.access_token.clone()))
        .with_refresh_token(RefreshToken::new(grant.refresh_token.clone()))
        .with_expires_at(grant.access_expires_at);
    match grant.refresh_expires_at {
        Some(at) => tokens.with_refresh_expires_at(at),
        None => tokens,
    }
}

/// An API call that the server rejects with 401; the app reports the rejected token (Xoxoday's
/// advice: refresh on a 4xx) and returns the error that refresh ends with.
async fn rejected_api_call(
    manager: &TokenManager,
    api: &reqwest::Client,
    server: &FakeAuthServer,
    key: &TokenKey,
) -> anyhow::Result<Error> {
    let token = manager.access_token(key).await?;
    let status = api
        .get(server.api_url())
        .bearer_auth(token.secret())
        .send()
        .await?
        .status();
    ensure!(
        status == 401,
        "the API should reject the token, got {status}"
    );
    match manager.invalidate(key, &token).await {
        Ok(_) => bail!("the refresh after the 401 should fail"),
        Err(e) => Ok(e),
    }
}

fn expect_dead(error: &Error, want: &InvalidationReason) -> anyhow::Result<()> {
    match error {
        Error::ReauthorizationRequired { reason, .. } if reason == want => Ok(()),
        other => bail!("expected ReauthorizationRequired({want:?}), got {other:?}"),
    }
}

/// The `ReauthorizationRequired` event for `key`, skipping others.
fn reauth_event(events: &mut Receiver<Event>, key: &TokenKey) -> anyhow::Result<String> {
    std::iter::from_fn(|| events.try_recv().ok())
        .find(|e| matches!(e, Event::ReauthorizationRequired { key: k, .. } if k == key))
        .map(|e| describe(&e))
        .context("expected an Event::ReauthorizationRequired")
}

fn describe(event: &Event) -> String {
    match event {
        Event::Refreshed {
            rotated,
            expires_at,
            ..
        } => format!(
            "Event::Refreshed (rotated: {rotated}), access valid until {}",
            expires_at.map_or("?".into(), date)
        ),
        Event::RefreshFailed { error, .. } => format!("Event::RefreshFailed: {error}"),
        Event::ReauthorizationRequired { reason, .. } => {
            format!("Event::ReauthorizationRequired {{ reason: {reason:?} }} ({reason})")
        }
        Event::RefreshTokenExpiring { expires_at, .. } => format!(
            "Event::RefreshTokenExpiring: the refresh token dies {}",
            date(*expires_at)
        ),
        other => format!("{other:?}"),
    }
}

fn retry_hint(error: &Error) -> String {
    error.retry_after().map_or(String::new(), |d| {
        format!(" (retry after {:.1} s)", d.as_secs_f64())
    })
}

/// One real refresh against a Xoxoday token endpoint, on the system clock.
async fn real_mode(url: &str, client_id: &str, secret: &str, refresh: &str) -> anyhow::Result<()> {
    let manager = TokenManager::builder(XoxodayProvider::new(url, client_id, secret)?).build();
    let key = TokenKey::from("xoxoday");
    // Only the refresh token is known: start from an access token that has already expired.
    let grant = TokenSet::new(AccessToken::new("unknown"))
        .with_refresh_token(RefreshToken::new(refresh))
        .with_expires_at(UNIX_EPOCH);
    manager.insert(key.clone(), grant).await?;
    println!("{}  refreshing against {url}", date(SystemTime::now()));
    let tokens = match manager.refresh_now(&key).await {
        Ok(tokens) => tokens,
        Err(e) => {
            println!("refresh failed: {e}");
            if e.is_reauth_required() {
                println!("  -> regenerate tokens in the Xoxoday dashboard");
            } else if e.is_retryable() {
                println!("  -> transient; try again later{}", retry_hint(&e));
            } else {
                println!(
                    "  -> check XOXODAY_CLIENT_ID / XOXODAY_CLIENT_SECRET / XOXODAY_TOKEN_URL"
                );
            }
            return Err(e.into());
        }
    };
    let when = |at: Option<SystemTime>| at.map_or("(not stated)".into(), date);
    println!(
        "refreshed: access token until {}, refresh token until {}",
        when(tokens.expires_at()),
        when(tokens.refresh_expires_at())
    );
    let new_refresh = tokens.refresh_token().context("refresh token kept")?;
    if new_refresh.secret() == refresh {
        println!("refresh token unchanged");
        return Ok(());
    }
    println!("refresh token rotated: the one in XOXODAY_REFRESH_TOKEN is now spent");
    match std::env::var("XOXODAY_REFRESH_TOKEN_OUT") {
        Ok(path) => {
            write_private(&path, new_refresh.secret())?;
            println!("the new refresh token was written to {path}");
        }
        Err(_) => println!("set XOXODAY_REFRESH_TOKEN_OUT next time to keep the new one"),
    }
    Ok(())
}

/// Writes a secret to `path`, readable by the owner only where the platform allows.
fn write_private(path: &str, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(secret.as_bytes())
}

/// `Thu, 01 Jan 2026 00:00:00 GMT` (RFC 9110's HTTP-date, by `httpdate`).
fn date(at: SystemTime) -> String {
    httpdate::fmt_http_date(at)
}
