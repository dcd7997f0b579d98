//! Time source injected wherever expiry is computed.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// (`CLOCK_REALTIME_COARSE`, its last tick) plus two ticks.
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
        UNIX_EPOCH + Duration::from_nanos(coarse_nanos())
    }
}

/// [`SystemClock::now_coarse`] as nanoseconds since the Unix epoch (0 before it), without
/// the `SystemTime` arithmetic.
#[inline]
pub(crate) fn coarse_nanos() -> u64 {
    coarse::nanos_rounded_up()
}

/// The kernel's coarse wall clock: a read of the time at its last tick (a few nanoseconds
/// through the vDSO, against tens for `CLOCK_REALTIME`, which `SystemTime::now` reads), plus
/// two ticks, so the result is never earlier than the precise time.
// The fast path's clock read was most of its time: measured 23 ns against 130-200 ns for
// `SystemTime::now` on the CI machine (2 vCPU, clocksource tsc), under load.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod coarse {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::SystemTime;

    /// Two ticks of the coarse clock in nanoseconds; 0: not known yet; `u64::MAX`: the coarse
    /// clock cannot be used (then `SystemTime::now`).
    static SLACK: AtomicU64 = AtomicU64::new(0);

    /// The coarse clock's time, in nanoseconds since the epoch (0 before it).
    fn read(clock: libc::clockid_t) -> Option<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable `timespec` for the duration of the call.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec).ok()?;
        secs.checked_mul(1_000_000_000)?.checked_add(nanos)
    }

    #[cold]
    fn slack() -> u64 {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `res` is a valid, writable `timespec` for the duration of the call.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_REALTIME_COARSE, &mut res) } == 0;
        let tick = (
            u64::try_from(res.tv_sec).ok(),
            u64::try_from(res.tv_nsec).ok(),
        );
        let slack = match tick {
            // A tick longer than 100 ms is not a coarse clock worth trusting.
            (Some(0), Some(nanos))
                if ok
                    && nanos > 0
                    && nanos <= 100_000_000
                    && read(libc::CLOCK_REALTIME_COARSE).is_some() =>
            {
                2 * nanos
            }
            _ => u64::MAX,
        };
        SLACK.store(slack, Ordering::Relaxed);
        slack
    }

    #[inline]
    pub(super) fn nanos_rounded_up() -> u64 {
        let slack = match SLACK.load(Ordering::Relaxed) {
            0 => slack(),
            known => known,
        };
        if slack != u64::MAX {
            if let Some(now) = read(libc::CLOCK_REALTIME_COARSE) {
                return now.saturating_add(slack);
            }
        }
        super::epoch_nanos(SystemTime::now())
    }
}

#[cfg(not(target_os = "linux"))]
mod coarse {
    #[inline]
    pub(super) fn nanos_rounded_up() -> u64 {
        super::epoch_nanos(std::time::SystemTime::now())
    }
}

/// Nanoseconds since the Unix epoch (0 before it, `u64::MAX` past 2554).
pub(crate) fn epoch_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
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
            let nanos = coarse_nanos();
            let after = SystemTime::now();
            assert!(
                nanos >= epoch_nanos(before),
                "coarse nanoseconds before the precise time"
            );
            assert!(nanos <= epoch_nanos(after + Duration::from_millis(200)));
            assert!(coarse >= before, "coarse reading before the precise time");
            assert!(
                coarse <= after + Duration::from_millis(200),
                "coarse reading {:?} ahead",
                coarse.duration_since(after)
            );
        }
    }
}
