//! Test harness (feature `test-util`).
mod clock;
pub use clock::ManualClock;
