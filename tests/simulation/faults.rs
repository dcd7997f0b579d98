//! The fault menu: every class of fault the simulation can inject, each one switchable.
//!
//! [`Menu`] says which classes may appear at all (a class the engine cannot survive yet is
//! switched off there, see `main.rs`); [`Faults`] is what one schedule actually injects, drawn
//! from the menu "swarm" style: each allowed class is on in about half the schedules, with its
//! own intensity, so rare combinations get their turn. A fault that needs an engine feature
//! not yet present is added as a new field of both, off in the menu until the feature lands.

use std::time::Duration;

/// Which fault classes may be drawn. `true` = allowed.
#[derive(Debug, Clone, Copy)]
pub struct Menu {
    /// `TokenStore::load` fails.
    pub load_fails: bool,
    /// `save` fails before writing.
    pub save_fails_before_write: bool,
    /// `save` writes, then reports an error.
    pub save_fails_after_write: bool,
    /// `keys` fails (the refresher's rescan).
    pub keys_fails: bool,
    /// `lock` fails.
    pub lock_fails: bool,
    /// Store calls take time (up to seconds) before they act: other tasks run meanwhile.
    pub store_latency: bool,
    /// A peer re-saves the same record just before a save: a conflict on metadata only.
    pub extra_conflict: bool,
    /// The provider never answers (it may or may not have rotated).
    pub hang_forever: bool,
    /// The provider answers after minutes.
    pub hang_long: bool,
    /// The provider answers after seconds.
    pub slow: bool,
    /// The provider rotates, then the reply is lost (a network error reaches the client).
    pub lost_reply: bool,
    /// The reply is garbled: an unreadable `expires_in` beside the tokens, or no usable
    /// access token beside a rotated refresh token (an error that carries it).
    pub malformed_reply: bool,
    /// 503.
    pub server_error: bool,
    /// 429 with `Retry-After`.
    pub rate_limited: bool,
    /// A real out-of-band revocation: `invalid_grant`, and the grant is dead at the provider.
    pub revoked: bool,
    /// `Provider::refresh` panics.
    pub panic: bool,
    /// The provider accepts the previous refresh token again for a short window.
    pub reuse_window: bool,
    /// A manager instance starts with a wrong client configuration (`invalid_client`).
    pub misconfigured_instance: bool,
    /// The clock is set back or forward by hours.
    pub clock_jumps: bool,
    /// A manager is dropped and rebuilt on the same store (its tasks run on).
    pub restarts: bool,
    /// A manager's process dies: its store and provider connections fail from then on.
    pub crashes: bool,
    /// Callers are aborted or time out mid-flight.
    pub cancellations: bool,
    /// Background refreshers are started and stopped.
    pub refresher: bool,
    /// A human re-authorizes a grant (`insert` of a new grant).
    pub reauthorize: bool,
    /// Store faults may hit the load that follows a lost compare-and-swap.
    pub load_fails_after_conflict: bool,
    /// Store faults and extra conflicts may hit the save of a backoff (a record with
    /// `retry_not_before`).
    pub faults_on_backoff_saves: bool,
    /// Store faults may hit the save of a dead record (and the reload after its conflict).
    pub faults_on_dead_saves: bool,
    /// Every save attempt of a rotated record may fail, so the engine keeps it unsaved in
    /// memory (otherwise the third attempt in a row succeeds).
    pub unsaved_rotations: bool,
}

impl Menu {
    /// Everything on.
    pub fn all() -> Self {
        Self {
            load_fails: true,
            save_fails_before_write: true,
            save_fails_after_write: true,
            keys_fails: true,
            lock_fails: true,
            store_latency: true,
            extra_conflict: true,
            hang_forever: true,
            hang_long: true,
            slow: true,
            lost_reply: true,
            malformed_reply: true,
            server_error: true,
            rate_limited: true,
            revoked: true,
            panic: true,
            reuse_window: true,
            misconfigured_instance: true,
            clock_jumps: true,
            restarts: true,
            crashes: true,
            cancellations: true,
            refresher: true,
            reauthorize: true,
            load_fails_after_conflict: true,
            faults_on_backoff_saves: true,
            faults_on_dead_saves: true,
            unsaved_rotations: true,
        }
    }
}

/// The faults one schedule injects: probabilities per call, or per step for driver actions.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub load_fails: f64,
    pub save_fails_before_write: f64,
    pub save_fails_after_write: f64,
    pub keys_fails: f64,
    pub lock_fails: f64,
    pub store_latency: f64,
    pub extra_conflict: f64,
    pub hang_forever: f64,
    pub hang_long: f64,
    pub slow: f64,
    pub lost_reply: f64,
    pub malformed_reply: f64,
    pub server_error: f64,
    pub rate_limited: f64,
    pub revoked: f64,
    pub panic: f64,
    pub reuse_window: Option<Duration>,
    pub misconfigured_instance: f64,
    pub clock_jumps: f64,
    pub restarts: f64,
    pub crashes: f64,
    pub cancellations: f64,
    pub refresher: f64,
    pub reauthorize: f64,
    pub load_fails_after_conflict: bool,
    pub faults_on_backoff_saves: bool,
    pub faults_on_dead_saves: bool,
    pub unsaved_rotations: bool,
}

impl Faults {
    /// No faults at all (the heal phase).
    pub fn none() -> Self {
        Self::default()
    }

    /// One schedule's faults: each class allowed by `menu` is on with probability 1/2, at an
    /// intensity up to `max`.
    pub fn draw(menu: &Menu, rng: &mut fastrand::Rng) -> Self {
        let mut pick = |allowed: bool, max: f64| -> f64 {
            if allowed && rng.bool() {
                max * (0.2 + 0.8 * rng.f64())
            } else {
                0.0
            }
        };
        let mut f = Self {
            load_fails: pick(menu.load_fails, 0.15),
            save_fails_before_write: pick(menu.save_fails_before_write, 0.2),
            save_fails_after_write: pick(menu.save_fails_after_write, 0.2),
            keys_fails: pick(menu.keys_fails, 0.3),
            lock_fails: pick(menu.lock_fails, 0.1),
            store_latency: pick(menu.store_latency, 0.3),
            extra_conflict: pick(menu.extra_conflict, 0.3),
            hang_forever: pick(menu.hang_forever, 0.05),
            hang_long: pick(menu.hang_long, 0.08),
            slow: pick(menu.slow, 0.3),
            lost_reply: pick(menu.lost_reply, 0.1),
            malformed_reply: pick(menu.malformed_reply, 0.15),
            server_error: pick(menu.server_error, 0.2),
            rate_limited: pick(menu.rate_limited, 0.15),
            revoked: pick(menu.revoked, 0.03),
            panic: pick(menu.panic, 0.08),
            reuse_window: None,
            misconfigured_instance: pick(menu.misconfigured_instance, 0.3),
            clock_jumps: pick(menu.clock_jumps, 0.03),
            restarts: pick(menu.restarts, 0.04),
            crashes: pick(menu.crashes, 0.03),
            cancellations: pick(menu.cancellations, 0.4),
            refresher: pick(menu.refresher, 0.08),
            reauthorize: pick(menu.reauthorize, 0.02),
            ..Self::none()
        };
        f.load_fails_after_conflict = menu.load_fails_after_conflict;
        f.faults_on_backoff_saves = menu.faults_on_backoff_saves;
        f.faults_on_dead_saves = menu.faults_on_dead_saves;
        f.unsaved_rotations = menu.unsaved_rotations;
        if menu.reuse_window && rng.bool() {
            f.reuse_window = Some(Duration::from_secs(rng.u64(5..=120)));
        }
        f
    }
}
