//! socialhub: a scheduling app that posts to social pages, each connected by several admins.
//!
//! Three pages are connected by five admins; every admin's connection is an Instagram-style
//! long-lived token (60 days, no refresh token, renewed by presenting it once it is a day
//! old), kept alive by the background refresher against the built-in fake Graph-style server.
//! The story:
//!
//! 1. Three weeks pass with a few posts a day: the refresher renews every token on its
//!    keep-alive schedule, never sooner than the provider allows.
//! 2. Alice, admin of two pages, changes her password; Graph kills her tokens (code 190,
//!    subcode 460). Posts keep going out through another admin of each page
//!    (`AuthorizedClient::send_any`), and the app is told once per dead connection, with the
//!    reason `PasswordChanged` and the key it needs for a reconnect link.
//! 3. The provider rate-limits the renewal endpoint (Graph code 80002 with
//!    `x-business-use-case-usage`). The refresher waits as long as the header says instead of
//!    retrying: the fake server counts the calls.
//!
//! It prints what happens and ends with a line starting `ok:` only if all of it went as
//! described (otherwise it exits with an error).
//!
//! Run it (offline, simulated time):
//!
//! ```sh
//! cargo run --example socialhub
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use tokenkeeper::testing::{
    FakeSocialServer, GraphFailure, GraphRateLimit, ManualClock, SocialConfig, UsageHeader,
};
use tokenkeeper::{
    AuthorizedClient, Event, InstagramProvider, InvalidationReason, RefresherConfig, Rejection,
    TokenKey, TokenManager,
};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Graph's "this token is no good": code 190, whatever the status.
fn graph_rejection() -> Rejection {
    Rejection::custom(|status, _headers, body| {
        (400..500).contains(&status)
            && serde_json::from_slice::<serde_json::Value>(body)
                .is_ok_and(|v| v["error"]["code"] == 190)
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeSocialServer::start(SocialConfig::new(), clock.clone()).await;
    let provider = InstagramProvider::builder(server.refresh_url())
        .clock(clock.clone())
        .build()?;
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();

    // What the app is told: one notice per connection that died, with the reason.
    let notices = Arc::new(Mutex::new(Vec::<(TokenKey, InvalidationReason)>::new()));
    let mut events = manager.subscribe();
    let listener = {
        let notices = notices.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                if let Event::ReauthorizationRequired { key, reason, .. } = event {
                    println!("  notice  {key}: reconnect needed ({reason})");
                    notices.lock().unwrap().push((key, reason));
                }
            }
        })
    };

    // Three pages, five admins; each (page, admin) connection is a grant of its own.
    let admins: HashMap<&str, _> = ["alice", "bob", "carol", "dave", "erin"]
        .into_iter()
        .map(|name| (name, server.new_user()))
        .collect();
    let pages: [(&str, &[&str]); 3] = [
        ("aurora-bakery", &["alice", "bob"]),
        ("north-cafe", &["alice", "carol"]),
        ("sea-books", &["dave", "erin"]),
    ];
    let mut groups: Vec<(&str, Vec<TokenKey>)> = Vec::new();
    for (page, page_admins) in pages {
        let mut keys = Vec::new();
        for admin in page_admins {
            let key = TokenKey::from(format!("{page}/{admin}"));
            let token = server.issue_long_lived_token(admins[admin]);
            manager.insert(key.clone(), token.token_set()).await?;
            keys.push(key);
        }
        groups.push((page, keys));
    }
    let refresher = manager.start_refresher(RefresherConfig::new());
    let client =
        AuthorizedClient::new(reqwest::Client::new(), manager.clone()).rejection(graph_rejection());
    let http = reqwest::Client::new();
    let posts_served = Arc::new(Mutex::new(HashMap::<TokenKey, usize>::new()));

    // Posts once to every page; returns how many posts went out.
    let post_everywhere = || async {
        let mut sent = 0;
        for (page, group) in &groups {
            let request = http
                .post(format!("{}/v19.0/{page}/feed", server.uri()))
                .body("fresh bread at 7")
                .build()?;
            let (key, response) = client
                .send_any(group, request)
                .await
                .with_context(|| format!("posting to {page}"))?;
            ensure!(response.status() == 200, "post to {page} failed");
            *posts_served.lock().unwrap().entry(key).or_default() += 1;
            sent += 1;
        }
        anyhow::Ok(sent)
    };

    // 1. Three weeks and two days, a post per page every six hours.
    let mut posts = 0;
    for _ in 0..(23 * 4) {
        clock.advance(6 * HOUR);
        refresher.wait_idle().await;
        posts += post_everywhere().await?;
    }
    let renewals = server.renewals();
    println!("day 23  {posts} posts; the refresher renewed {renewals} tokens, none too early");
    ensure!(
        renewals >= 6 * 3,
        "expected weekly renewals, got {renewals}"
    );
    ensure!(
        server.premature_refreshes() == 0,
        "a token was sent too young"
    );
    ensure!(server.refresh_calls() == renewals, "a renewal failed");

    // 2. Alice changes her password: her tokens for both pages die.
    server.fail_user(admins["alice"], GraphFailure::PasswordChanged);
    println!("day 23  alice changes her password");
    let mut after = 0;
    for _ in 0..20 {
        clock.advance(MINUTE);
        after += post_everywhere().await?;
    }
    println!("day 23  {after} more posts, all delivered");
    let served = posts_served.lock().unwrap().clone();
    for key in ["aurora-bakery/bob", "north-cafe/carol"] {
        let n = served.get(&TokenKey::from(key)).copied().unwrap_or(0);
        println!("        {key} took over: {n} posts");
        ensure!(
            n >= 20,
            "{key} should have served the posts after the failure"
        );
    }
    let dead = manager.reauthorization_required().await?;
    ensure!(
        dead.len() == 2,
        "expected alice's 2 grants dead, got {dead:?}"
    );
    ensure!(
        dead.iter()
            .all(|(key, reason)| key.as_str().ends_with("/alice")
                && *reason == InvalidationReason::PasswordChanged),
        "unexpected dead grants: {dead:?}"
    );

    // 3. The renewal endpoint is rate limited just as the next keep-alive round is due.
    server.set_rate_limit(Some(
        GraphRateLimit::new(2, HOUR)
            .code(80002)
            .usage_header(UsageHeader::BusinessUseCase),
    ));
    let before = server.refresh_calls();
    for _ in 0..(5 * 4) {
        clock.advance(6 * HOUR);
        refresher.wait_idle().await;
    }
    let limited = server.rate_limited_calls();
    println!("day 28  renewal rate limited: {limited} calls refused; the refresher waits");
    ensure!(limited >= 1, "the rate limit was never hit");
    // Within the hour the header announced, nothing is retried however much the app posts.
    let during = server.refresh_calls();
    for _ in 0..11 {
        clock.advance(5 * MINUTE);
        refresher.wait_idle().await;
        post_everywhere().await?;
    }
    ensure!(
        server.refresh_calls() == during,
        "{} refresh calls while rate limited",
        server.refresh_calls() - during
    );
    for _ in 0..12 {
        clock.advance(10 * MINUTE);
        refresher.wait_idle().await;
    }
    let calls = server.refresh_calls() - before;
    let live = 4;
    println!(
        "day 28  {calls} renewal calls for {live} live grants, {} refused",
        server.rate_limited_calls()
    );
    ensure!(
        calls <= live + server.rate_limited_calls() && server.rate_limited_calls() <= live,
        "a retry storm: {calls} calls"
    );
    for (_, group) in &groups {
        for key in group.iter().filter(|k| !k.as_str().ends_with("/alice")) {
            let token = manager.access_token(key).await?;
            ensure!(
                server.is_access_token_valid(token.secret()),
                "{key} is not alive"
            );
        }
    }

    refresher.shutdown().await;
    drop(client);
    drop(manager);
    listener.await?;
    let notices = notices.lock().unwrap();
    ensure!(
        notices.len() == 2,
        "expected one notice per dead grant, got {notices:?}"
    );
    ensure!(notices
        .iter()
        .all(|(key, reason)| key.as_str().ends_with("/alice")
            && *reason == InvalidationReason::PasswordChanged));
    println!(
        "ok: {} posts delivered, alice's 2 connections reported once each (password changed), \
         the rate limit honoured with {calls} renewal calls",
        posts + after
    );
    Ok(())
}
