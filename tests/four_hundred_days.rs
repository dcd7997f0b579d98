//! 400 days of provider time over 1,000 grants, 500 of each provider style, with the
//! background refresher, restarts of the whole manager every 50 days (a deploy, on the same
//! store) and a day-long refresher outage every 100 days. Runs in seconds on a `ManualClock`.
//!
//! - **Constant Contact style**: 24 h access tokens, refresh tokens that die after 180 days
//!   unused, declared once on the provider (`RefreshExpiry::Sliding`); a third of the grants
//!   are never called, the others every 20 days. Nothing should ever expire.
//! - **Xoxoday style**: refresh tokens with a hard end 30 days after the grant
//!   (`RefreshExpiry::Fixed`, declared on the provider), which no refresh moves: the app must be
//!   warned at least 7 days ahead, once, and a human then reconnects (within three days of the
//!   warning here). Nothing should expire either: an expiry would mean a missing or late warning.
//!
//! Each test prints its report (run with `--nocapture` to see it): refresh calls per grant per
//! day, avoidable expiries, warnings sent with their lead (minimum and median) and duplicates.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use support::drain;
use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
use tokenkeeper::{
    Clock, Event, MemoryStore, Provider, ProviderError, RefreshExpiry, RefreshRequest,
    RefresherConfig, TokenKey, TokenManager, TokenResponse,
};
use tokio::sync::broadcast::Receiver;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const DAYS: u64 = 400;
const GRANTS: usize = 500;
const STEP: Duration = Duration::from_secs(6 * 3600);
const LEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// A provider with its refresh-token expiry declared, as an app would declare it for a preset.
struct Declared<P> {
    inner: P,
    expiry: RefreshExpiry,
}

#[async_trait]
impl<P: Provider> Provider for Declared<P> {
    async fn refresh(&self, request: RefreshRequest<'_>) -> Result<TokenResponse, ProviderError> {
        self.inner.refresh(request).await
    }

    fn refresh_expiry(&self) -> Option<RefreshExpiry> {
        Some(self.expiry)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Style {
    ConstantContact,
    Xoxoday,
}

/// What one run measured.
#[derive(Debug, Default)]
struct Report {
    refresh_calls: usize,
    avoidable_expiries: usize,
    warning_leads: Vec<Duration>,
    duplicate_warnings: usize,
    reconnects: usize,
}

impl Report {
    fn calls_per_grant_per_day(&self) -> f64 {
        self.refresh_calls as f64 / GRANTS as f64 / DAYS as f64
    }

    fn lead(&self, pick: impl Fn(&[Duration]) -> Duration) -> String {
        if self.warning_leads.is_empty() {
            return "-".to_owned();
        }
        let mut leads = self.warning_leads.clone();
        leads.sort();
        let lead = pick(&leads);
        format!("{:.2} d", lead.as_secs_f64() / DAY.as_secs_f64())
    }

    fn print(&self, style: &str) {
        println!(
            "{style}: {:.4} refresh calls per grant per day; {} avoidable expiries; {} warnings \
             (lead min {}, median {}), {} duplicates; {} reconnects",
            self.calls_per_grant_per_day(),
            self.avoidable_expiries,
            self.warning_leads.len(),
            self.lead(|l| l[0]),
            self.lead(|l| l[l.len() / 2]),
            self.duplicate_warnings,
            self.reconnects,
        );
    }
}

fn key(i: usize) -> TokenKey {
    TokenKey::from(format!("grant-{i:04}"))
}

/// Hours a human takes to reconnect after a warning: 0 to 71, fixed per grant and expiry.
fn human_delay(key: &TokenKey, expires: SystemTime) -> Duration {
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    expires.hash(&mut hasher);
    HOUR * (hasher.finish() % 72) as u32
}

async fn four_hundred_days(style: Style) -> Report {
    let clock = Arc::new(ManualClock::fixed());
    let (config, expiry) = match style {
        Style::ConstantContact => (
            FakeConfig::constant_contact(),
            RefreshExpiry::Sliding { idle: 180 * DAY },
        ),
        Style::Xoxoday => (FakeConfig::xoxoday(), RefreshExpiry::Fixed),
    };
    let server = FakeAuthServer::start(config, clock.clone()).await;
    let store = Arc::new(MemoryStore::new());
    let start = |clock: &Arc<ManualClock>| {
        let provider: Arc<dyn Provider> = match style {
            Style::ConstantContact => Arc::new(Declared {
                inner: support::oauth2_provider(&server),
                expiry,
            }),
            Style::Xoxoday => Arc::new(Declared {
                inner: support::XoxodayProvider::new(&server),
                expiry,
            }),
        };
        let manager = TokenManager::builder(provider)
            .clock(clock.clone())
            .store(store.clone())
            .event_capacity(1_000_000)
            .build();
        let events = manager.subscribe();
        (manager, events)
    };
    let (mut manager, mut events) = start(&clock);
    for i in 0..GRANTS {
        manager
            .insert(key(i), support::tokens(&server.issue_grant()))
            .await
            .unwrap();
    }
    let mut refresher = Some(manager.start_refresher(RefresherConfig::new()));
    let begin = clock.now();
    let called = |i: usize| !i.is_multiple_of(3);

    let mut report = Report::default();
    let mut warned: HashMap<(TokenKey, SystemTime), usize> = HashMap::new();
    let mut reconnects: BTreeMap<SystemTime, Vec<TokenKey>> = BTreeMap::new();
    let mut outage_ends = None;
    let steps = DAYS * DAY.as_secs() / STEP.as_secs();
    for _ in 0..steps {
        clock.advance(STEP);
        let now = clock.now();
        let day = now.duration_since(begin).unwrap().as_secs() / DAY.as_secs();
        let on_the_day = now
            .duration_since(begin)
            .unwrap()
            .as_secs()
            .is_multiple_of(DAY.as_secs());

        // A deploy every 50 days: the whole manager restarts on the same store.
        if on_the_day && day.is_multiple_of(50) && refresher.is_some() {
            refresher.take().unwrap().shutdown().await;
            collect(
                &mut events,
                &mut report,
                &mut warned,
                &mut reconnects,
                style,
            );
            (manager, events) = start(&clock);
            refresher = Some(manager.start_refresher(RefresherConfig::new()));
        }
        // A refresher outage of a day every 100 days, from day 75 on.
        if on_the_day && day % 100 == 75 {
            if let Some(r) = refresher.take() {
                r.shutdown().await;
            }
            outage_ends = Some(now + DAY);
        }
        if outage_ends.is_some_and(|end| now >= end) {
            outage_ends = None;
            refresher = Some(manager.start_refresher(RefresherConfig::new()));
        }
        if let Some(r) = &refresher {
            r.wait_idle().await;
        }
        // The app's calls: two thirds of the grants, every 20 days.
        if on_the_day && day.is_multiple_of(20) {
            for i in (0..GRANTS).filter(|i| called(*i)) {
                if let Err(e) = manager.access_token(&key(i)).await {
                    assert!(e.is_reauth_required(), "day {day}: {e}");
                }
            }
        }
        collect(
            &mut events,
            &mut report,
            &mut warned,
            &mut reconnects,
            style,
        );
        // Humans reconnect the grants they were warned about.
        let due: Vec<SystemTime> = reconnects.range(..=now).map(|(at, _)| *at).collect();
        for at in due {
            for key in reconnects.remove(&at).unwrap() {
                manager
                    .insert(key, support::tokens(&server.issue_grant()))
                    .await
                    .unwrap();
                report.reconnects += 1;
            }
        }
    }
    if let Some(r) = refresher.take() {
        r.shutdown().await;
    }
    collect(
        &mut events,
        &mut report,
        &mut warned,
        &mut reconnects,
        style,
    );
    for i in 0..GRANTS {
        if let Err(e) = manager.access_token(&key(i)).await {
            assert!(e.is_reauth_required(), "{e}");
            report.avoidable_expiries += 1;
        }
    }
    report.refresh_calls = server.refresh_calls();
    report.duplicate_warnings = warned.values().map(|n| n - 1).sum();
    assert_eq!(server.reuse_detections(), 0);
    report
}

/// Reads the events so far into the report; plans the reconnect a warning asks for.
fn collect(
    events: &mut Receiver<Event>,
    report: &mut Report,
    warned: &mut HashMap<(TokenKey, SystemTime), usize>,
    reconnects: &mut BTreeMap<SystemTime, Vec<TokenKey>>,
    style: Style,
) {
    for event in drain(events) {
        match &event {
            Event::RefreshTokenExpiring {
                at,
                key,
                expires_at,
            } => {
                report.warning_leads.push(event.time_left().unwrap());
                *warned.entry((key.clone(), *expires_at)).or_default() += 1;
                if style == Style::Xoxoday {
                    reconnects
                        .entry(*at + human_delay(key, *expires_at))
                        .or_default()
                        .push(key.clone());
                }
            }
            Event::ReauthorizationRequired { .. } => report.avoidable_expiries += 1,
            Event::Refreshed { .. } | Event::RefreshFailed { .. } => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_contact_style_grants_live_400_days_on_a_refresh_every_45_days() {
    let report = four_hundred_days(Style::ConstantContact).await;
    report.print("constant contact style (sliding 180-day idle expiry)");
    assert_eq!(report.avoidable_expiries, 0);
    assert_eq!(
        report.warning_leads.len(),
        0,
        "a sliding expiry kept moving"
    );
    // The called two thirds refresh every 20 days (24 h access tokens, expired at each
    // call); the idle third every 45 days (a quarter of 180): about 0.04 per grant per day.
    let per_day = report.calls_per_grant_per_day();
    assert!((0.03..0.06).contains(&per_day), "{per_day}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xoxoday_style_grants_are_warned_once_in_time_and_reconnected_for_400_days() {
    let report = four_hundred_days(Style::Xoxoday).await;
    report.print("xoxoday style (fixed 30-day expiry)");
    assert_eq!(report.avoidable_expiries, 0);
    assert_eq!(report.duplicate_warnings, 0);
    // Every 30-day chain is warned about once: from 13 (reconnected within 3 days of a
    // warning sent 8 days ahead) to 19 per grant in 400 days.
    let per_grant = report.warning_leads.len() as f64 / GRANTS as f64;
    assert!((13.0..=19.0).contains(&per_grant), "{per_grant}");
    assert!(report.reconnects <= report.warning_leads.len());
    let min = *report.warning_leads.iter().min().unwrap();
    assert!(
        min >= LEAD,
        "a warning came {min:?} ahead, under the 7-day lead"
    );
}
