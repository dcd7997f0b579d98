//! Expiry warnings that survive restarts and delays (issue 15, points 3 and 5).
//!
//! The grants are Xoxoday-style: a refresh token that dies 30 days after the grant was made,
//! whatever the refreshes (a fixed expiry), 15-day access tokens. With the defaults the warning
//! is owed 7 days ahead and planned a day earlier still (day 22), so that a refresher down for
//! up to a day around that moment still warns in time.
//!
//! Time is a shared `ManualClock` the scheduler waits on: moving it and calling `wait_idle`
//! runs a month in milliseconds.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use support::drain;
use support::store::FaultyStore;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{
    Clock, Event, MemoryStore, NextRefresh, RefresherConfig, TokenKey, TokenManager, TokenStore,
};
use tokio::sync::broadcast::Receiver;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const LEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// A manager on `store` for the Xoxoday-style fake server.
fn manager(
    server: &FakeAuthServer,
    clock: &Arc<ManualClock>,
    store: impl TokenStore,
) -> TokenManager {
    TokenManager::builder(support::XoxodayProvider::new(server))
        .clock(clock.clone())
        .store(store)
        .event_capacity(100_000)
        .build()
}

/// Moves the clock to `until` in steps of `step`, letting the refresher catch up after each.
async fn run_until(
    clock: &ManualClock,
    refresher: &tokenkeeper::RefresherHandle,
    until: SystemTime,
    step: Duration,
) {
    while clock.now() < until {
        let left = until.duration_since(clock.now()).unwrap();
        clock.advance(step.min(left));
        refresher.wait_idle().await;
    }
}

/// The expiry warnings among `events`: (key, sent at, expires at).
fn warnings(events: &mut Receiver<Event>) -> Vec<(TokenKey, SystemTime, SystemTime)> {
    drain(events)
        .into_iter()
        .filter_map(|event| match event {
            Event::RefreshTokenExpiring {
                at,
                key,
                expires_at,
            } => Some((key, at, expires_at)),
            _ => None,
        })
        .collect()
}

/// The refresher is stopped half a day before the moment the warning is planned for and
/// started again half a day after it: with the default one-day margin, the warning still goes
/// out at least the configured 7 days ahead. Without the margin it can only arrive late, and
/// then it goes out at once, saying how much time is really left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_is_in_time_although_the_refresher_was_down_for_a_day_around_its_moment() {
    async fn outage(margin: Duration) -> (SystemTime, Event) {
        let clock = Arc::new(ManualClock::fixed());
        let server = FakeAuthServer::start(FakeConfig::xoxoday(), clock.clone()).await;
        let manager = manager(&server, &clock, MemoryStore::new());
        let mut events = manager.subscribe();
        let grant = server.issue_grant();
        let dies = grant.refresh_expires_at.unwrap();
        manager
            .insert(TokenKey::from("shop"), support::tokens(&grant))
            .await
            .unwrap();
        let config = RefresherConfig::new().expiry_warning_margin(margin);
        let planned_for = dies - LEAD - margin;

        let refresher = manager.start_refresher(config.clone());
        run_until(&clock, &refresher, planned_for - HOUR * 12, HOUR * 6).await;
        assert!(warnings(&mut events).is_empty(), "not due yet");
        refresher.shutdown().await;

        clock.advance(DAY);
        let restarted_at = clock.now();
        let refresher = manager.start_refresher(config);
        refresher.wait_idle().await;
        let sent: Vec<Event> = drain(&mut events)
            .into_iter()
            .filter(|e| matches!(e, Event::RefreshTokenExpiring { .. }))
            .collect();
        assert_eq!(sent.len(), 1, "{sent:?}");
        refresher.shutdown().await;
        assert_eq!(server.reuse_detections(), 0);
        (restarted_at, sent[0].clone())
    }

    let (restarted_at, warning) = outage(DAY).await;
    assert_eq!(
        warning.at(),
        restarted_at,
        "sent as soon as the refresher ran"
    );
    assert_eq!(warning.time_left(), Some(LEAD + DAY / 2));
    assert!(warning.time_left().unwrap() >= LEAD);

    // Planned exactly 7 days ahead, the same outage makes it late: it goes out at once, with
    // the real time left.
    let (restarted_at, warning) = outage(Duration::ZERO).await;
    assert_eq!(warning.at(), restarted_at);
    assert_eq!(warning.time_left(), Some(LEAD - DAY / 2));
}

/// The warning is stored with the grant: a manager restarted on the same store (a deploy)
/// neither repeats it nor needs to, even across the keep-alive refreshes (rotations) that
/// follow, and the grant's status says when it went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_goes_out_exactly_once_across_a_restart_on_the_same_store() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::xoxoday(), clock.clone()).await;
    let store = Arc::new(MemoryStore::new());
    let key = TokenKey::from("shop");
    let grant = server.issue_grant();
    let dies = grant.refresh_expires_at.unwrap();

    let first = manager(&server, &clock, store.clone());
    let mut first_events = first.subscribe();
    first
        .insert(key.clone(), support::tokens(&grant))
        .await
        .unwrap();
    let refresher = first.start_refresher(RefresherConfig::new());
    refresher.wait_idle().await;
    let status = first.status(&key).await.unwrap();
    assert_eq!(status.refresh_expires_at, Some(dies));
    assert_eq!(status.next_expiry_warning, Some(dies - LEAD - DAY));
    assert_eq!(status.next_refresh_kind, Some(NextRefresh::KeepAlive));
    assert_eq!(status.expiry_warning_sent, None);

    run_until(&clock, &refresher, dies - LEAD, HOUR * 6).await;
    let sent = warnings(&mut first_events);
    assert_eq!(sent.len(), 1);
    let (_, sent_at, expires_at) = sent[0].clone();
    assert_eq!(expires_at, dies);
    assert!(dies.duration_since(sent_at).unwrap() >= LEAD + DAY - HOUR * 6);
    let status = first.status(&key).await.unwrap();
    let recorded = status.expiry_warning_sent.expect("the warning is recorded");
    assert_eq!((recorded.sent_at(), recorded.expires_at()), (sent_at, dies));
    assert_eq!(status.next_expiry_warning, None);
    refresher.shutdown().await;
    drop(first);

    // A new process on the same store, running until the grant is gone.
    let second = manager(&server, &clock, store.clone());
    let mut second_events = second.subscribe();
    let refresher = second.start_refresher(RefresherConfig::new());
    let refreshed_before = server.refresh_calls();
    run_until(&clock, &refresher, dies + HOUR, HOUR * 6).await;
    assert!(
        server.refresh_calls() > refreshed_before,
        "keep-alive refreshed (rotated) the grant meanwhile"
    );
    assert!(warnings(&mut second_events).is_empty(), "warned again");
    assert_eq!(server.reuse_detections(), 0);
    refresher.shutdown().await;
}

/// Two processes' refreshers on one store: one warning between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshers_sharing_a_store_warn_once_between_them() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::xoxoday(), clock.clone()).await;
    let store = Arc::new(MemoryStore::new());
    let (a, b) = (
        manager(&server, &clock, store.clone()),
        manager(&server, &clock, store.clone()),
    );
    let (mut a_events, mut b_events) = (a.subscribe(), b.subscribe());
    let mut dies = None;
    for i in 0..20 {
        let grant = server.issue_grant();
        dies = grant.refresh_expires_at;
        a.insert(TokenKey::from(format!("shop-{i}")), support::tokens(&grant))
            .await
            .unwrap();
    }
    let dies = dies.unwrap();
    let (ra, rb) = (
        a.start_refresher(RefresherConfig::new()),
        b.start_refresher(RefresherConfig::new()),
    );
    while clock.now() < dies - DAY {
        clock.advance(HOUR * 6);
        ra.wait_idle().await;
        rb.wait_idle().await;
    }
    let mut sent = warnings(&mut a_events);
    sent.extend(warnings(&mut b_events));
    let mut keys: Vec<_> = sent.iter().map(|(key, ..)| key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((sent.len(), keys.len()), (20, 20), "{sent:?}");
    ra.shutdown().await;
    rb.shutdown().await;
}

/// Warnings cost the provider nothing: a backlog of refreshes held by the per-minute cap does
/// not hold them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_minute_cap_does_not_delay_warnings() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::xoxoday(), clock.clone()).await;
    let manager = manager(&server, &clock, MemoryStore::new());
    let mut events = manager.subscribe();
    let mut dies = None;
    for i in 0..50 {
        let grant = server.issue_grant();
        dies = grant.refresh_expires_at;
        manager
            .insert(TokenKey::from(format!("shop-{i}")), support::tokens(&grant))
            .await
            .unwrap();
    }
    let dies = dies.unwrap();
    // Keep-alive every 7 days and a warning 9 days ahead: on day 21 fifty refreshes and fifty
    // warnings fall due together, and the cap lets one refresh start per minute.
    let config = RefresherConfig::new()
        .max_per_minute(1)
        .expiry_warning(LEAD + 2 * DAY)
        .expiry_warning_margin(Duration::ZERO);
    let refresher = manager.start_refresher(config);
    run_until(&clock, &refresher, dies - 9 * DAY - HOUR, HOUR * 6).await;
    assert!(warnings(&mut events).is_empty());
    clock.advance(HOUR);
    refresher.wait_idle().await;
    let sent = warnings(&mut events);
    assert_eq!(sent.len(), 50, "every warning on time, whatever the cap");
    assert!(sent.iter().all(|(_, at, _)| *at == dies - 9 * DAY));
    assert!(
        refresher.progress().started < 50 + 3 * 50,
        "the refreshes are still held by the cap"
    );
    refresher.shutdown().await;
}

/// The store refuses the write that records the warning: the warning goes out anyway (better
/// twice than never), and is recorded at a later look once the store works again, so a
/// restart after that does not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_the_store_could_not_record_is_sent_and_recorded_later() {
    let clock = Arc::new(ManualClock::fixed());
    let server = FakeAuthServer::start(FakeConfig::xoxoday(), clock.clone()).await;
    let store = Arc::new(FaultyStore::default());
    let key = TokenKey::from("shop");
    let grant = server.issue_grant();
    let dies = grant.refresh_expires_at.unwrap();
    let first = manager(&server, &clock, store.clone());
    let mut events = first.subscribe();
    first
        .insert(key.clone(), support::tokens(&grant))
        .await
        .unwrap();
    // A keep-alive retry floor that keeps looking at the grant every 30 s of clock time while
    // the store fails; the warning is due on day 22.
    let refresher = first.start_refresher(RefresherConfig::new());
    run_until(&clock, &refresher, dies - LEAD - DAY - HOUR, HOUR * 6).await;
    store.fail_saves.store(true, Ordering::SeqCst);
    clock.advance(HOUR);
    refresher.wait_idle().await;
    assert_eq!(warnings(&mut events).len(), 1, "sent although not recorded");
    assert!(store.stored(&key).expiry_warning().is_none());

    store.fail_saves.store(false, Ordering::SeqCst);
    run_until(&clock, &refresher, dies - LEAD, HOUR * 6).await;
    assert!(
        warnings(&mut events).is_empty(),
        "not sent twice by one process"
    );
    assert_eq!(
        store.stored(&key).expiry_warning().map(|w| w.expires_at()),
        Some(dies),
        "recorded once the store took writes again"
    );
    refresher.shutdown().await;
    drop(first);

    let second = manager(&server, &clock, store.clone());
    let mut events = second.subscribe();
    let refresher = second.start_refresher(RefresherConfig::new());
    run_until(&clock, &refresher, dies - DAY, HOUR * 6).await;
    assert!(
        warnings(&mut events).is_empty(),
        "a restart does not repeat it"
    );
    refresher.shutdown().await;
}
