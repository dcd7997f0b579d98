//! A Constant Contact-style grant: standard OAuth2, 24-hour access tokens, a rotating refresh
//! token that dies if it goes unused for 180 days.
//!
//! What it shows, on simulated time (200 days pass in well under a second):
//!
//! 1. Inserting the grant handed over by the OAuth authorization callback.
//! 2. Check-before-call: `access_token()` serves the cached token, refreshes once when it has
//!    expired (the rotated refresh token is saved), and concurrent callers share one refresh.
//! 3. The low-traffic problem from the community thread: a site nobody visits for 200 days.
//!    With check-before-call alone its refresh token lapses after 180 quiet days and the next
//!    visitor gets `Error::ReauthorizationRequired`; with the background refresher keeping it
//!    alive every 7 days (the default), the visitor on day 200 gets a valid token.
//!
//! It runs offline against `tokenkeeper::testing::FakeAuthServer`, which speaks Constant
//! Contact's wire format on a loopback port, and exits non-zero if anything does not go as
//! narrated:
//!
//! ```text
//! cargo run --example constant_contact
//! ```
//!
//! Real mode: with `CC_CLIENT_ID`, `CC_CLIENT_SECRET` and `CC_REFRESH_TOKEN` set, it performs
//! one real refresh against `https://authz.constantcontact.com/oauth2/default/v1/token` and
//! prints the outcome (never a token). If the app uses rotating refresh tokens, the token you
//! passed is spent by that refresh: set `CC_REFRESH_TOKEN_OUT` to a file path to keep the new
//! one (written with owner-only permissions on Unix).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, GrantState, IssuedGrant, ManualClock};
use tokenkeeper::{
    AccessToken, ClientSecret, Clock, Error, Event, InvalidationReason, OAuth2Provider,
    RefreshToken, RefresherConfig, TokenKey, TokenManager, TokenSet,
};

const CC_TOKEN_URL: &str = "https://authz.constantcontact.com/oauth2/default/v1/token";
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let vars = ["CC_CLIENT_ID", "CC_CLIENT_SECRET", "CC_REFRESH_TOKEN"];
    let set: Vec<Option<String>> = vars.iter().map(|v| std::env::var(v).ok()).collect();
    match set.as_slice() {
        [Some(id), Some(secret), Some(refresh)] => real_mode(id, secret, refresh).await,
        [None, None, None] => offline().await,
        _ => bail!("real mode needs all of {vars:?}; unset them all to run offline"),
    }
}

async fn offline() -> anyhow::Result<()> {
    // One clock for the fake server and every manager: advancing it moves them all.
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
    // Basic client authentication, as Constant Contact expects. The provider is shared (in an
    // `Arc`) by the two managers below.
    let provider = Arc::new(
        OAuth2Provider::builder(server.client_id(), server.token_url())
            .client_secret(ClientSecret::new(server.client_secret()))
            .build()?,
    );
    // Two managers, one per deployment style. Site A's app only checks before each call;
    // site B's app also runs the background refresher. (A refresher serves every grant of its
    // manager, so putting both sites on one manager would keep A alive too and hide the
    // problem.) Both use the default in-memory store.
    let check_only = TokenManager::builder(provider.clone())
        .clock(clock.clone())
        .build();
    let with_refresher = TokenManager::builder(provider).clock(clock.clone()).build();
    let mut events = check_only.subscribe();
    let log = |what: &str| println!("{}  {what}", date(clock.now()));

    println!("== 1. the OAuth callback hands over a grant");
    let site_a = TokenKey::from("site-a");
    let grant_a = server.issue_grant();
    check_only
        .insert(site_a.clone(), from_callback(&grant_a))
        .await?;
    log("site-a connected: access token for 24 h, refresh token good for 180 days unused");

    println!("\n== 2. check-before-call");
    check_only.access_token(&site_a).await?;
    ensure!(
        server.refresh_calls() == 0,
        "a fresh token must not be refreshed"
    );
    log("API call: cached access token used, 0 refreshes");

    clock.advance(25 * HOUR);
    check_only.access_token(&site_a).await?;
    ensure!(server.refresh_calls() == 1, "expected exactly one refresh");
    let stored = check_only.token(&site_a).await?;
    let stored_refresh = stored.refresh_token().context("refresh token kept")?;
    ensure!(
        stored_refresh.secret() != grant_a.refresh_token
            && server.current_refresh_token(&grant_a.grant).as_deref()
                == Some(stored_refresh.secret()),
        "the rotated refresh token must be the one stored"
    );
    match events.try_recv() {
        Ok(Event::Refreshed { rotated: true, .. }) => {}
        other => bail!("expected a rotated Refreshed event, got {other:?}"),
    }
    let status = check_only.status(&site_a).await?;
    ensure!(status.last_refresh == Some(clock.now()));
    log(&format!(
        "API call: token expired -> 1 refresh; rotated refresh token saved; next refresh due {}",
        status.next_refresh.map_or("never".into(), date)
    ));

    let tokens = concurrent_calls(&check_only, &site_a, 10).await?;
    ensure!(
        server.refresh_calls() == 1,
        "cached token: no further refresh"
    );
    ensure!(tokens.iter().all(|t| t == stored.access_token()));
    log("10 concurrent API calls: all served from the cache, still 1 refresh");

    clock.advance(24 * HOUR);
    let tokens = concurrent_calls(&check_only, &site_a, 10).await?;
    ensure!(
        server.refresh_calls() == 2,
        "10 callers must share one refresh"
    );
    ensure!(tokens.windows(2).all(|w| w[0] == w[1]));
    log("10 concurrent API calls on an expired token: they share 1 refresh (2 in total)");

    println!("\n== 3. the low-traffic problem: nobody visits for 200 days");
    let site_b = TokenKey::from("site-b");
    let grant_b = server.issue_grant();
    with_refresher
        .insert(site_b.clone(), from_callback(&grant_b))
        .await?;
    log("site-b connected; its manager runs the refresher with the default 7-day keep-alive");
    let refresher = with_refresher.start_refresher(RefresherConfig::new());
    // Let simulated time pass in 6-hour steps; after each, wait until the refresher has done
    // whatever fell due. Nothing sleeps for real.
    let quiet_start = clock.now();
    for step in 1..=(200 * 4) {
        clock.advance(6 * HOUR);
        refresher.wait_idle().await;
        if step % (50 * 4) == 0 {
            log(&format!(
                "day {:3}: site-a refreshes so far {}, site-b keep-alive refreshes {}",
                step / 4,
                server.refresh_calls_for(&grant_a.grant),
                server.refresh_calls_for(&grant_b.grant)
            ));
        }
    }
    ensure!(clock.now() == quiet_start + 200 * DAY);
    let keep_alives = server.refresh_calls_for(&grant_b.grant);
    ensure!(
        keep_alives == 200 / 7,
        "expected a keep-alive every 7 days, got {keep_alives}"
    );
    ensure!(server.refresh_calls_for(&grant_a.grant) == 2);
    ensure!(server.grant_state(&grant_a.grant) == GrantState::RefreshTokenExpired);
    ensure!(server.grant_state(&grant_b.grant) == GrantState::Active);

    // Site A: the first visitor in 200 days.
    let error = match check_only.access_token(&site_a).await {
        Err(
            e @ Error::ReauthorizationRequired {
                reason: InvalidationReason::InvalidGrant,
                ..
            },
        ) => e,
        other => bail!("site-a should need re-authorization, got {other:?}"),
    };
    ensure!(server.refresh_calls_for(&grant_a.grant) == 3);
    let dead = check_only.reauthorization_required().await?;
    ensure!(dead == [(site_a.clone(), InvalidationReason::InvalidGrant)]);
    ensure!(reauth_event(&mut events, &site_a));
    log(&format!(
        "site-a visitor: Error::ReauthorizationRequired: {error}"
    ));
    log("  (the refresh token went unused for more than 180 days; the server said invalid_grant)");
    log("  -> the app should ask the site admin to reconnect Constant Contact");

    // Site B: the same quiet 200 days, kept alive.
    let before = server.refresh_calls_for(&grant_b.grant);
    let token = with_refresher.access_token(&site_b).await?;
    ensure!(server.is_access_token_valid(token.secret()));
    let at_visit = server.refresh_calls_for(&grant_b.grant) - before;
    // The 24 h access token may have lapsed since the last weekly keep-alive: one refresh, no
    // more, and the grant is alive either way.
    ensure!(at_visit <= 1);
    log(&format!(
        "site-b visitor: valid access token ({keep_alives} keep-alive refreshes kept the grant alive; {at_visit} refresh at the visit)"
    ));
    refresher.shutdown().await;
    println!("\nok: everything went as described");
    Ok(())
}

/// The token set an authorization callback yields. Constant Contact does not say when the
/// refresh token expires (180 days unused), so no refresh expiry is set.
fn from_callback(grant: &IssuedGrant) -> TokenSet {
    TokenSet::new(AccessToken::new(grant.access_token.clone()))
        .with_refresh_token(RefreshToken::new(grant.refresh_token.clone()))
        .with_expires_at(grant.access_expires_at)
}

/// `n` API calls at once, each asking for a token first; returns the tokens they got.
async fn concurrent_calls(
    manager: &TokenManager,
    key: &TokenKey,
    n: usize,
) -> anyhow::Result<Vec<AccessToken>> {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (manager, key) = (manager.clone(), key.clone());
        calls.spawn(async move { manager.access_token(&key).await });
    }
    let mut tokens = Vec::with_capacity(n);
    while let Some(token) = calls.join_next().await {
        tokens.push(token??);
    }
    Ok(tokens)
}

/// Whether a `ReauthorizationRequired` event for `key` is waiting in `events`.
fn reauth_event(events: &mut tokio::sync::broadcast::Receiver<Event>, key: &TokenKey) -> bool {
    std::iter::from_fn(|| events.try_recv().ok())
        .any(|event| matches!(&event, Event::ReauthorizationRequired { key: k, .. } if k == key))
}

/// One real refresh against Constant Contact, on the system clock.
async fn real_mode(client_id: &str, secret: &str, refresh_token: &str) -> anyhow::Result<()> {
    let provider = OAuth2Provider::builder(client_id, CC_TOKEN_URL)
        .client_secret(ClientSecret::new(secret))
        .build()?;
    let manager = TokenManager::builder(provider).build();
    let key = TokenKey::from("constant-contact");
    // Only the refresh token is known: start from an access token that has already expired.
    let grant = TokenSet::new(AccessToken::new("unknown"))
        .with_refresh_token(RefreshToken::new(refresh_token))
        .with_expires_at(UNIX_EPOCH);
    manager.insert(key.clone(), grant).await?;
    println!(
        "{}  refreshing against {CC_TOKEN_URL}",
        date(SystemTime::now())
    );
    match manager.access_token(&key).await {
        Ok(_) => {}
        Err(e) => {
            println!("refresh failed: {e}");
            if e.is_reauth_required() {
                println!("  -> reconnect the app: the refresh token is spent, revoked or expired");
            } else if e.is_retryable() {
                println!("  -> transient; try again later");
            } else {
                println!("  -> check CC_CLIENT_ID / CC_CLIENT_SECRET");
            }
            return Err(e.into());
        }
    }
    let tokens = manager.token(&key).await?;
    println!(
        "refreshed: new access token expires {}",
        tokens.expires_at().map_or("(not stated)".into(), date)
    );
    let new_refresh = tokens.refresh_token().context("refresh token kept")?;
    if new_refresh.secret() == refresh_token {
        println!("refresh token unchanged (long-lived setting)");
        return Ok(());
    }
    println!("refresh token rotated: the one in CC_REFRESH_TOKEN is now spent");
    match std::env::var("CC_REFRESH_TOKEN_OUT") {
        Ok(path) => {
            write_private(&path, new_refresh.secret())?;
            println!("the new refresh token was written to {path}");
        }
        Err(_) => println!("set CC_REFRESH_TOKEN_OUT next time to keep the new one"),
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
