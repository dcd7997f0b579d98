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

    fn sleep_until(&self, deadline: SystemTime) -> Sleep {
        (**self).sleep_until(deadline)
    }
}
