//! Wiring events to a notifier: "email me when my widget's token dies".
//!
//! Five connected accounts are kept alive by the background refresher against the built-in
//! fake authorization server. Two of them die out of band (one user revokes the app, one
//! account's refresh token expires). A notifier task listens to the manager's events and sends
//! exactly one message per dead grant, with the key the app needs to build its reconnect link —
//! however many times the app or the refresher touch the dead grant afterwards. When the user
//! reconnects, the grant recovers.
//!
//! Run it (offline, simulated time):
//!
//! ```sh
//! cargo run --example reauth_notifier
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, IssuedGrant, ManualClock};
use tokenkeeper::{
    AccessToken, ClientSecret, Event, EventItem, OAuth2Provider, RefreshExpiry, RefreshToken,
    RefresherConfig, TokenKey, TokenManager, TokenSet,
};

const HOUR: Duration = Duration::from_secs(3600);

fn tokens(grant: &IssuedGrant) -> TokenSet {
    TokenSet::new(AccessToken::new(grant.access_token.clone()))
        .with_refresh_token(RefreshToken::new(grant.refresh_token.clone()))
        .with_expires_at(grant.access_expires_at)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
    // Constant Contact-style refresh tokens die after 180 days unused: declared once here, the
    // refresher keeps idle grants alive every 45 days (README, "Keeping idle grants alive").
    let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
        .client_secret(ClientSecret::new(server.client_secret()))
        .refresh_expiry(RefreshExpiry::Sliding {
            idle: 180 * 24 * HOUR,
        })
        .build()?;
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();

    // The notifier: one message per transition to dead, and one when a grant recovers.
    let outbox = Arc::new(Mutex::new(Vec::<String>::new()));
    // `events()` reports lag as an item instead of ending the loop.
    let mut events = manager.events();
    let notifier = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            while let Some(item) = events.next().await {
                let event = match item {
                    EventItem::Event(event) => event,
                    EventItem::Lagged(missed) => {
                        // A real notifier would re-read `reauthorization_required()` here.
                        println!("  missed {missed} events; re-reading the grants");
                        continue;
                    }
                    _ => continue,
                };
                let message = match event {
                    Event::ReauthorizationRequired { key, reason, .. } => format!(
                        "to owner of {key}: your connection stopped working ({reason}); \
                         reconnect at https://app.example.com/connect?account={key}"
                    ),
                    Event::Recovered { key, .. } => {
                        format!("to owner of {key}: reconnected, thanks")
                    }
                    _ => continue,
                };
                println!("  notify  {message}");
                outbox.lock().unwrap().push(message);
            }
        })
    };

    let mut grants = Vec::new();
    for i in 1..=5 {
        let key = TokenKey::from(format!("widget-{i}"));
        let grant = server.issue_grant();
        manager.insert(key.clone(), tokens(&grant)).await?;
        grants.push((key, grant.grant));
    }
    // The defaults: grants in use are refreshed ahead of expiry, idle ones kept alive.
    let refresher = manager.start_refresher(RefresherConfig::new());
    println!("day 0   5 widgets connected; the refresher keeps them alive");

    server.revoke(&grants[1].1);
    server.expire_refresh_token(&grants[3].1);
    println!("day 0   widget-2's user revokes the app; widget-4's refresh token expires");

    // Three days pass; the app also calls the dead widgets' APIs now and then.
    for _ in 0..(3 * 24) {
        clock.advance(HOUR);
        refresher.wait_idle().await;
        for (key, _) in &grants {
            let _ = manager.access_token(key).await;
        }
    }
    let dead = manager.reauthorization_required().await?;
    println!("day 3   grants needing a human: {}", dead.len());
    ensure!(
        dead.len() == 2,
        "expected 2 dead grants, found {}",
        dead.len()
    );

    // widget-2's owner clicks the reconnect link.
    let fresh = server.issue_grant();
    manager.insert(grants[1].0.clone(), tokens(&fresh)).await?;
    manager
        .access_token(&grants[1].0)
        .await
        .context("widget-2 works again")?;
    println!("day 3   widget-2 reconnected");

    refresher.shutdown().await;
    drop(manager);
    notifier.await?;
    let outbox = outbox.lock().unwrap();
    ensure!(
        outbox.len() == 3,
        "expected 3 messages, sent {}",
        outbox.len()
    );
    ensure!(outbox.iter().filter(|m| m.contains("widget-2")).count() == 2);
    ensure!(outbox.iter().filter(|m| m.contains("widget-4")).count() == 1);
    println!("ok      3 messages: one per dead grant, one on recovery");
    Ok(())
}
