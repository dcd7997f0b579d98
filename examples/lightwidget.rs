//! lightwidget: an Instagram feed widget for small websites, kept alive for months, and one
//! reconnect email when — and only when — a customer's connection really died.
//!
//! Fifty customers connect their Instagram account through the app's own routes (Instagram
//! Login: `/connect` → the provider's consent screen → `/callback`, where the code is exchanged
//! for a 1-hour token and that for a 60-day one the provider renews). The background refresher
//! keeps every grant alive for six simulated months while the widgets are shown now and then.
//! One customer removes the app from their Instagram account. The next time their widget
//! loads, the API refuses the token; the app reports it to the manager, which tries a renewal;
//! the provider refuses that too, with its reason, and only then is the grant dead. The app
//! "emails" the customer exactly once (prints the message and writes it to an outbox folder)
//! with a link to its own `/reconnect` route; following it (→ consent → `/callback`) restores
//! the grant, the widget works again, and later renewals carry on.
//!
//! Everything runs offline against the built-in fake Graph-style server, on a `ManualClock`.
//! It ends with a line starting `ok:` only if all of it went as described (otherwise it exits
//! with an error).
//!
//! Run it:
//!
//! ```sh
//! cargo run --example lightwidget
//! ```

mod web;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use hyper::StatusCode;
use tokenkeeper::testing::{FakeSocialServer, GraphFailure, ManualClock, SocialConfig, UserId};
use tokenkeeper::{
    ClientAuth, ClientSecret, Clock, ConnectError, Connector, Event, EventItem, EventStream,
    GraphTokenExchange, InstagramProvider, InvalidationReason, RefresherConfig, StartOptions,
    TokenKey, TokenManager,
};
use tokio::sync::{mpsc, oneshot};
use web::{Page, Request};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const WIDGETS: usize = 50;
const REVOKED: usize = 17;

// ---- the app's routes (a real app takes the account from the signed-in user's session) ----

/// The app's routes.
async fn app(connector: Connector, request: Request) -> Page {
    match request.path.as_str() {
        "/connect" => connect(&connector, &request).await,
        "/reconnect" => reconnect(&connector, &request).await,
        "/callback" => callback(&connector, &request).await,
        _ => Page::status(StatusCode::NOT_FOUND, "no such page"),
    }
}

/// `/connect?account=…`: a new attempt for the account, and off to Instagram.
async fn connect(connector: &Connector, request: &Request) -> Page {
    let Some(account) = request.param("account") else {
        return Page::status(StatusCode::BAD_REQUEST, "which account?");
    };
    match connector
        .start(TokenKey::from(account), StartOptions::new())
        .await
    {
        Ok(authorization) => Page::redirect(authorization.url()),
        Err(e) => Page::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `/reconnect?account=…`: the link in the email. A fresh attempt each time it is followed,
/// so the link never expires the way an authorization URL does.
async fn reconnect(connector: &Connector, request: &Request) -> Page {
    let Some(account) = request.param("account") else {
        return Page::status(StatusCode::BAD_REQUEST, "which account?");
    };
    match connector.reconnect_url(&TokenKey::from(account)).await {
        Ok(authorization) => Page::redirect(authorization.url()),
        Err(ConnectError::NotFound { .. }) => {
            Page::status(StatusCode::NOT_FOUND, "nothing to reconnect")
        }
        Err(e) => Page::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `/callback?code=…&state=…`: state check, code exchange, long-lived exchange, store.
async fn callback(connector: &Connector, request: &Request) -> Page {
    match connector.complete(request.query.as_str()).await {
        Ok(done) if done.recovered => Page::ok(format!("reconnected {}", done.key)),
        Ok(done) => Page::ok(format!("connected {}", done.key)),
        Err(e) => Page::status(
            StatusCode::BAD_REQUEST,
            format!("please connect again: {e}"),
        ),
    }
}

// ---- the mailer ----

/// What the mailer tells the rest of the app.
#[derive(Debug)]
enum Mail {
    /// An email went out for this grant, to this file.
    Sent(TokenKey, PathBuf),
    /// The grant recovered.
    Recovered(TokenKey),
}

/// Emails each customer once per death of their grant: one file per email in `outbox`.
async fn mailer(
    mut events: EventStream,
    manager: TokenManager,
    app_url: String,
    outbox: PathBuf,
    tell: mpsc::UnboundedSender<Mail>,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let mut emailed = HashSet::new();
    loop {
        let item = tokio::select! {
            biased; // every event already sent is handled before stopping
            item = events.next() => item,
            _ = &mut stop => return Ok(()),
        };
        let dead = match item {
            Some(EventItem::Event(Event::ReauthorizationRequired { key, reason, .. })) => {
                vec![(key, reason)]
            }
            Some(EventItem::Event(Event::Recovered { key, .. })) => {
                emailed.remove(&key);
                println!("  mailer  {key} recovered");
                let _ = tell.send(Mail::Recovered(key));
                continue;
            }
            // Events were dropped: one of them may have been a death; ask the store.
            Some(EventItem::Lagged(_)) => manager.reauthorization_required().await?,
            Some(_) => continue,
            None => return Ok(()),
        };
        for (key, reason) in dead {
            if !emailed.insert(key.clone()) {
                continue; // already told for this death
            }
            let path = outbox.join(format!("{key}-{}.eml", emailed.len()));
            let body = format!(
                "To: owner of {key}\n\
                 Subject: Your Instagram widget needs you\n\
                 \n\
                 Instagram stopped accepting the widget's connection ({reason}), so your\n\
                 website shows no new posts. Reconnect it here:\n\
                 \n\
                 {app_url}/reconnect?account={key}\n"
            );
            std::fs::write(&path, &body).with_context(|| format!("writing {}", path.display()))?;
            println!("  mailer  emailed the owner of {key}: {}", path.display());
            for line in body.lines() {
                println!("          | {line}");
            }
            let _ = tell.send(Mail::Sent(key, path));
        }
    }
}

// ---- the widget ----

/// What a widget shows.
#[derive(Debug, PartialEq)]
enum Shown {
    /// The customer's posts.
    Posts,
    /// "Reconnect needed", with why.
    Dead(InvalidationReason),
}

/// Renders a widget: calls the API with the grant's token; a refusal is reported to the
/// manager (which renews once per token, or says the grant is dead).
async fn render(
    manager: &TokenManager,
    server: &FakeSocialServer,
    http: &reqwest::Client,
    key: &TokenKey,
) -> anyhow::Result<Shown> {
    let dead = |e: tokenkeeper::Error| match e {
        tokenkeeper::Error::ReauthorizationRequired { reason, .. } => Ok(Shown::Dead(reason)),
        other => Err(anyhow::Error::new(other)),
    };
    let mut token = match manager.access_token(key).await {
        Ok(token) => token,
        Err(e) => return dead(e),
    };
    for _ in 0..2 {
        let reply = http
            .get(server.api_url())
            .bearer_auth(token.secret())
            .send()
            .await?;
        if reply.status().is_success() {
            return Ok(Shown::Posts);
        }
        token = match manager.invalidate(key, &token).await {
            Ok(token) => token,
            Err(e) => return dead(e),
        };
    }
    bail!("the API refused {key}'s renewed token too")
}

/// The browser: follows every redirect; the final path, status and page.
async fn visit(browser: &reqwest::Client, url: &str) -> anyhow::Result<(String, u16, String)> {
    let reply = browser.get(url).send().await.context("browser request")?;
    let landed = reply.url().path().to_owned();
    let status = reply.status().as_u16();
    Ok((landed, status, reply.text().await?))
}

fn files_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        files.push(entry?.path());
    }
    Ok(files)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clock = Arc::new(ManualClock::fixed());
    let start = clock.now();
    let day = |clock: &ManualClock| {
        clock
            .now()
            .duration_since(start)
            .unwrap_or_default()
            .as_secs()
            / DAY.as_secs()
    };
    let server = FakeSocialServer::start(SocialConfig::new(), clock.clone()).await;
    let provider = InstagramProvider::builder(server.refresh_url())
        .clock(clock.clone())
        .build()?;
    let manager = TokenManager::builder(provider).clock(clock.clone()).build();

    // The app: Instagram Login through a Connector whose after-exchange step turns the
    // 1-hour token into the 60-day one the provider renews.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_url = format!("http://{}", listener.local_addr()?);
    let connector = Connector::builder(
        &manager,
        server.client_id(),
        server.authorize_url(),
        server.login_token_url(),
        format!("{app_url}/callback"),
    )
    .client_secret(ClientSecret::new(server.client_secret()))
    .client_auth(ClientAuth::RequestBody)
    .scopes(["instagram_business_basic"])
    .after_exchange(GraphTokenExchange::instagram(
        server.ig_exchange_url(),
        ClientSecret::new(server.client_secret()),
    )?)
    .build()?;
    let web_app = tokio::spawn(web::serve(listener, connector, app));

    let outbox = std::env::temp_dir().join(format!(
        "tokenkeeper-lightwidget-outbox-{}",
        std::process::id()
    ));
    if outbox.exists() {
        std::fs::remove_dir_all(&outbox)?;
    }
    std::fs::create_dir_all(&outbox)?;
    let (tell, mut mail) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel();
    let mailer = tokio::spawn(mailer(
        manager.events(),
        manager.clone(),
        app_url.clone(),
        outbox.clone(),
        tell,
        stopped,
    ));
    println!("app on {app_url}, fake Instagram on {}", server.uri());
    println!("outbox: {}", outbox.display());

    let refresher = manager.start_refresher(RefresherConfig::new());
    let browser = reqwest::Client::new(); // follows redirects, like a browser
    let http = reqwest::Client::new();

    // 1. Fifty customers connect, a few hours apart.
    let mut widgets: Vec<(TokenKey, UserId)> = Vec::new();
    for i in 1..=WIDGETS {
        let key = TokenKey::from(format!("widget-{i}"));
        let owner = server.new_user();
        server.sign_in(owner); // the customer's browser, logged in to Instagram
        let (landed, status, page) =
            visit(&browser, &format!("{app_url}/connect?account={key}")).await?;
        ensure!(
            (landed.as_str(), status, page.as_str())
                == ("/callback", 200, &*format!("connected {key}")),
            "{key} did not connect: {status} {page}"
        );
        widgets.push((key, owner));
        clock.advance(3 * HOUR);
        refresher.wait_idle().await;
    }
    ensure!(server.code_exchanges() == WIDGETS && server.ig_exchanges() == WIDGETS);
    println!(
        "day {:>3}  {WIDGETS} widgets connected (each code exchanged for a 1-hour token, \
         that for a 60-day one)",
        day(&clock)
    );

    // 2. Six months, in half-day steps; five widgets are shown each step.
    let (revoked_key, revoked_owner) = widgets[REVOKED - 1].clone();
    let mut calls_at_revocation = None;
    let mut died_at = None;
    let mut reconnect_token = None;
    let mut step = 0usize;
    while day(&clock) < 182 {
        clock.advance(12 * HOUR);
        refresher.wait_idle().await;
        step += 1;

        // Around three months in, the owner of widget-17 removes the app from their account
        // (once their token is a day old, so that a renewal can be tried).
        let due = calls_at_revocation.is_none() && day(&clock) >= 90 && {
            let token = manager.token(&revoked_key).await?;
            let issued = token.issued_at().unwrap_or(start);
            clock
                .now()
                .duration_since(issued)
                .is_ok_and(|age| age >= DAY)
        };
        if due {
            ensure!(mail.try_recv().is_err(), "an email before anything died");
            server.fail_user(revoked_owner, GraphFailure::AppRemoved);
            calls_at_revocation = Some(server.refresh_calls());
            println!(
                "day {:>3}  the owner of {revoked_key} removes the app on Instagram",
                day(&clock)
            );
            // Their site is visited right away.
            match render(&manager, &server, &http, &revoked_key).await? {
                Shown::Dead(reason) => {
                    let tried = server.refresh_calls() - calls_at_revocation.unwrap_or(0);
                    println!(
                        "day {:>3}  {revoked_key}: the API refused the token; the renewal the \
                         manager then tried was refused too ({reason}): dead",
                        day(&clock)
                    );
                    ensure!(tried >= 1, "declared dead without trying a renewal");
                    ensure!(reason == InvalidationReason::Revoked, "reason {reason}");
                    died_at = Some(day(&clock));
                }
                Shown::Posts => bail!("{revoked_key} still shows posts after the app was removed"),
            }
            let sent = tokio::time::timeout(Duration::from_secs(10), mail.recv())
                .await
                .context("no email within 10 s")?;
            ensure!(
                matches!(&sent, Some(Mail::Sent(key, path)) if *key == revoked_key && path.exists()),
                "unexpected {sent:?}"
            );
        }

        // Ten days after the email, the owner follows its link.
        if died_at.is_some_and(|d| day(&clock) >= d + 10) && reconnect_token.is_none() {
            let emails = files_in(&outbox)?;
            ensure!(emails.len() == 1, "{} emails in the outbox", emails.len());
            let email = std::fs::read_to_string(&emails[0])?;
            let link = email
                .lines()
                .find(|line| line.starts_with(&app_url))
                .context("no link in the email")?;
            println!(
                "day {:>3}  the owner opens the email and follows {link}",
                day(&clock)
            );
            server.sign_in(revoked_owner);
            let (landed, status, page) = visit(&browser, link).await?;
            println!("          browser ends on {landed}: {status} {page:?}");
            ensure!(status == 200 && page == format!("reconnected {revoked_key}"));
            let recovered = tokio::time::timeout(Duration::from_secs(10), mail.recv())
                .await
                .context("no Recovered within 10 s")?;
            ensure!(
                matches!(&recovered, Some(Mail::Recovered(key)) if *key == revoked_key),
                "unexpected {recovered:?}"
            );
            ensure!(
                render(&manager, &server, &http, &revoked_key).await? == Shown::Posts,
                "the reconnected widget shows no posts"
            );
            println!("day {:>3}  {revoked_key} shows posts again", day(&clock));
            reconnect_token = Some(manager.token(&revoked_key).await?.access_token().clone());
        }

        for (key, _) in widgets.iter().cycle().skip(step * 5).take(5) {
            let shown = render(&manager, &server, &http, key).await?;
            let dead_now = *key == revoked_key && died_at.is_some() && reconnect_token.is_none();
            ensure!(
                dead_now || shown == Shown::Posts,
                "{key} at day {}: {shown:?}",
                day(&clock)
            );
        }
        if step.is_multiple_of(60) {
            println!(
                "day {:>3}  {} renewals so far, none too early",
                day(&clock),
                server.renewals()
            );
        }
    }

    // 3. The checks.
    refresher.shutdown().await;
    let _ = stop.send(());
    mailer.await??;
    web_app.abort();
    let emails = files_in(&outbox)?;
    ensure!(emails.len() == 1, "{} emails in the outbox", emails.len());
    ensure!(mail.try_recv().is_err(), "more mail than expected");
    ensure!(
        server.premature_refreshes() == 0,
        "a renewal was tried too early"
    );
    let renewals = server.renewals();
    // Keep-alive renews each token about weekly: ~25 per widget over the half year.
    ensure!(renewals >= WIDGETS * 20, "only {renewals} renewals");
    for (key, _) in &widgets {
        let token = manager.token(key).await?;
        ensure!(
            server.is_access_token_valid(token.access_token().secret()),
            "{key} died"
        );
    }
    let dead = manager.reauthorization_required().await?;
    ensure!(dead.is_empty(), "grants still dead: {dead:?}");
    let reconnected = reconnect_token.context("widget-17 was never reconnected")?;
    let now = manager.token(&revoked_key).await?;
    ensure!(
        *now.access_token() != reconnected,
        "{revoked_key} was not renewed after it was reconnected"
    );
    println!(
        "\nok: {WIDGETS} Instagram widgets kept alive for six months ({renewals} renewals, none \
         too early); the one whose owner removed the app died only after a refused renewal, got \
         exactly one reconnect email ({}), and its link restored it",
        emails[0].display()
    );
    Ok(())
}
