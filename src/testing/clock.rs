//! A clock that only moves when told to.

use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::clock::{Clock, Sleep};

/// A [`Clock`] that stands still until [`advance`](ManualClock::advance)d.
///
/// Share one (behind an `Arc`) between the `TokenManager` under test and the fake
/// authorization server so both agree on what time it is. Waits on this clock
/// ([`Clock::sleep_until`], used by the background refresher) complete when the clock is
/// moved past their deadline, so days of provider time pass in milliseconds and nothing
/// sleeps for real.
#[derive(Debug)]
pub struct ManualClock {
    now: watch::Sender<SystemTime>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: watch::Sender::new(start),
        }
    }

    /// A clock reading 2026-01-01T00:00:00Z, a fixed and readable starting point.
    pub fn fixed() -> Self {
        Self::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    }

    /// Moves the clock forward by `by`, waking the waits it passes.
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|now| *now += by);
    }

    /// Sets the clock to `to` (which may be in the past).
    pub fn set(&self, to: SystemTime) {
        self.now.send_replace(to);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::fixed()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: SystemTime) -> Sleep {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            // The sender lives as long as the clock; if the clock is gone, so is the wait.
            let _ = rx.wait_for(|now| *now >= deadline).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sleeps_end_when_the_clock_passes_their_deadline() {
        let clock = std::sync::Arc::new(ManualClock::fixed());
        let deadline = clock.now() + Duration::from_secs(3600);
        let sleep = tokio::spawn(clock.sleep_until(deadline));
        clock.advance(Duration::from_secs(1800));
        tokio::task::yield_now().await;
        assert!(!sleep.is_finished());
        clock.advance(Duration::from_secs(1800));
        sleep.await.unwrap();
        // A deadline already passed completes at once.
        clock.sleep_until(deadline).await;
    }
}
