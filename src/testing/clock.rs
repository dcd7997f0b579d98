//! A clock that only moves when told to.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::Clock;

/// A [`Clock`] that stands still until [`advance`](ManualClock::advance)d.
///
/// Share one (behind an `Arc`) between the `TokenManager` under test and the fake
/// authorization server so both agree on what time it is. Pair it with tokio's paused time
/// (`#[tokio::test(start_paused = true)]`) when timers are involved.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        Self { now: Mutex::new(start) }
    }

    /// A clock reading 2026-01-01T00:00:00Z, a fixed and readable starting point.
    pub fn fixed() -> Self {
        Self::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Sets the clock to `to` (which may be in the past).
    pub fn set(&self, to: SystemTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::fixed()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}
