//! tokenkeeper (skeleton)
mod clock;
pub use clock::{Clock, SystemClock};
#[cfg(feature = "test-util")]
pub mod testing;
