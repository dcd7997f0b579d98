//! The engine's clock: a `ManualClock`'s time with deterministic wake-ups.
//!
//! `ManualClock::sleep_until` waits on a `tokio::sync::watch` channel, whose waiters tokio
//! spreads over several notifiers at random: tasks woken by one clock move would run in a
//! different order in each run. Here every wait is on one `Notify`, woken in registration
//! order, so a seed replays exactly.

use std::sync::Arc;
use std::time::SystemTime;

use tokenkeeper::testing::ManualClock;
use tokenkeeper::{Clock, Sleep};
use tokio::sync::Notify;

#[derive(Clone)]
pub struct SimClock {
    pub manual: Arc<ManualClock>,
    /// Woken whenever the clock moves (and whenever a lease is released).
    pub changed: Arc<Notify>,
}

impl SimClock {
    pub fn new() -> Self {
        Self {
            manual: Arc::new(ManualClock::fixed()),
            changed: Arc::new(Notify::new()),
        }
    }

    pub fn set(&self, to: SystemTime) {
        self.manual.set(to);
        self.changed.notify_waiters();
    }
}

impl Clock for SimClock {
    fn now(&self) -> SystemTime {
        self.manual.now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> Sleep {
        let clock = self.clone();
        Box::pin(async move {
            // Single-threaded: nothing moves the clock between the check and the wait.
            while clock.now() < deadline {
                clock.changed.notified().await;
            }
        })
    }
}
