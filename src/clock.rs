//! Time source injected wherever expiry is computed.

use std::fmt;
use std::time::SystemTime;

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
}
