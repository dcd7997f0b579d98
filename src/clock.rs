//! Time source injected wherever expiry is computed.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

/// The future returned by [`Clock::sleep_until`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of wall-clock time.
///
/// Every expiry the crate computes goes through a `Clock`, so tests can move time forward by
/// days in a millisecond (see `testing::ManualClock` behind the `test-util` feature).
///
/// # Implementing
///
/// `now` is called on the hot path of [`TokenManager::access_token`](crate::TokenManager), so it
/// must be cheap and must not block.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// A cheaper reading for the fast path's freshness test: never earlier than
    /// [`now`](Self::now) would return, and at most a few milliseconds later. A token is then
    /// never served from memory past its deadline; near the deadline, a call may take the slow
    /// path (which reads `now`) a few milliseconds early, and still serve the token if it is
    /// fresh.
    ///
    /// The default returns `now()`. [`SystemClock`] reads the kernel's coarse clock on Linux
    /// (`CLOCK_REALTIME_COARSE`, its last tick) plus the tick's length.
    fn now_coarse(&self) -> SystemTime {
        self.now()
    }

    /// Completes at or after `deadline` on this clock. The background refresher waits with it,
    /// so a test clock can wake it by moving time instead of anyone sleeping.
    ///
    /// The default sleeps on tokio's timer for the time left at the call; callers re-check
    /// `now()` on waking, so a wall-clock jump only makes a wait shorter or longer.
    fn sleep_until(&self, deadline: SystemTime) -> Sleep {
        let left = deadline.duration_since(self.now()).unwrap_or_default();
        Box::pin(tokio::time::sleep(left))
    }
}

/// The real clock: [`SystemTime::now`].
#[derive(Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    #[inline]
    fn now_coarse(&self) -> SystemTime {
        coarse::now_rounded_up()
    }
}

/// The kernel's coarse wall clock: a read of the time at its last tick (a few nanoseconds
/// through the vDSO, against tens for `CLOCK_REALTIME`, which `SystemTime::now` reads), plus
/// two ticks, so the result is never earlier than the precise time.
// The fast path's clock read was most of its time: measured 23 ns against 130-200 ns for
// `SystemTime::now` on the CI machine (2 vCPU, clocksource tsc), under load.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod coarse {
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Two ticks of the coarse clock, or `None` if it cannot be read (then `SystemTime::now`).
    fn slack() -> Option<Duration> {
        static SLACK: OnceLock<Option<Duration>> = OnceLock::new();
        *SLACK.get_or_init(|| {
            let mut res = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `res` is a valid, writable `timespec` for the duration of the call.
            let ok = unsafe { libc::clock_getres(libc::CLOCK_REALTIME_COARSE, &mut res) } == 0;
            let tick = Duration::new(
                u64::try_from(res.tv_sec).ok()?,
                u32::try_from(res.tv_nsec).ok()?,
            );
            // A tick longer than 100 ms is not a coarse clock worth trusting.
            (ok && tick <= Duration::from_millis(100) && read().is_some()).then(|| tick * 2)
        })
    }

    fn read() -> Option<SystemTime> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable `timespec` for the duration of the call.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } != 0 {
            return None;
        }
        let since_epoch = Duration::new(
            u64::try_from(ts.tv_sec).ok()?,
            u32::try_from(ts.tv_nsec).ok()?,
        );
        UNIX_EPOCH.checked_add(since_epoch)
    }

    #[inline]
    pub(super) fn now_rounded_up() -> SystemTime {
        slack()
            .and_then(|slack| read()?.checked_add(slack))
            .unwrap_or_else(SystemTime::now)
    }
}

#[cfg(not(target_os = "linux"))]
mod coarse {
    #[inline]
    pub(super) fn now_rounded_up() -> std::time::SystemTime {
        std::time::SystemTime::now()
    }
}

impl fmt::Debug for SystemClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SystemClock")
    }
}

impl<T: Clock + ?Sized> Clock for std::sync::Arc<T> {
    fn now(&self) -> SystemTime {
        (**self).now()
    }

    fn now_coarse(&self) -> SystemTime {
        (**self).now_coarse()
    }

    fn sleep_until(&self, deadline: SystemTime) -> Sleep {
        (**self).sleep_until(deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The fast path relies on this: a coarse reading is never before the precise time (a
    /// token is never served past its deadline), and never far after it.
    #[test]
    fn the_coarse_reading_is_never_before_the_precise_one() {
        for _ in 0..100_000 {
            let before = SystemTime::now();
            let coarse = SystemClock.now_coarse();
            let after = SystemTime::now();
            assert!(coarse >= before, "coarse reading before the precise time");
            assert!(
                coarse <= after + Duration::from_millis(200),
                "coarse reading {:?} ahead",
                coarse.duration_since(after)
            );
        }
    }
}
