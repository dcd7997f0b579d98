//! Notifications for the application.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use futures_core::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::error::{Error, InvalidationReason, StoreError};
use crate::token::TokenKey;

/// Something that happened to a grant, for the application to act on (notify a user, page an
/// operator, update a dashboard). Receive them with
/// [`TokenManager::subscribe`](crate::TokenManager::subscribe).
///
/// Events never carry a token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The grant was refreshed and the result saved.
    Refreshed {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant.
        key: TokenKey,
        /// Whether the provider issued a new refresh token.
        rotated: bool,
        /// When the new access token expires, if known.
        expires_at: Option<SystemTime>,
        /// Fields of the provider's reply that were present but unusable and were ignored
        /// (names only; see [`TokenResponse::malformed_fields`](crate::TokenResponse::malformed_fields)).
        /// An unreadable expiry was replaced by the manager's fallback lifetime.
        malformed_fields: Vec<String>,
    },
    /// A refresh failed; the grant is alive and will be retried.
    RefreshFailed {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant.
        key: TokenKey,
        /// What went wrong.
        error: Error,
        /// No refresh is attempted before this instant.
        retry_at: Option<SystemTime>,
    },
    /// The grant died; only a human can fix it. Sent once per transition to dead.
    ///
    /// The key is all it takes to ask the user to reconnect:
    /// [`Connector::reconnect_url`](crate::Connector::reconnect_url) gives an authorization URL
    /// bound to it, and completing that replaces the grant and sends [`Event::Recovered`].
    /// Email the user a link to a route of your app that calls it (attempts expire after
    /// minutes), and use the reason to say why.
    ReauthorizationRequired {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant.
        key: TokenKey,
        /// Why.
        reason: InvalidationReason,
    },
    /// A new grant was inserted for a key that needed re-authorization (by
    /// [`TokenManager::insert`](crate::TokenManager::insert) or a completed
    /// [`Connector`](crate::Connector) attempt).
    Recovered {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant.
        key: TokenKey,
    },
    /// The refresh token cannot be renewed and expires soon; a human must act before then.
    RefreshTokenExpiring {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant.
        key: TokenKey,
        /// When the refresh token expires.
        expires_at: SystemTime,
    },
    /// A grant that nothing can renew (no refresh token) has an access token that expires
    /// soon; a human must reconnect it before then. Sent once per access token, `expiry_warning`
    /// ahead (see [`RefresherConfig`](crate::RefresherConfig)).
    AccessTokenExpiring {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant.
        key: TokenKey,
        /// When the access token expires.
        expires_at: SystemTime,
    },
    /// A grant of a failover group was skipped (see
    /// [`AuthorizedClient::send_any`](crate::AuthorizedClient::send_any)).
    GrantSkipped {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant skipped.
        key: TokenKey,
        /// Why.
        error: Error,
    },
    /// Saving a refreshed grant failed. The new tokens are kept in memory and the save is
    /// retried before any further refresh.
    PersistFailed {
        /// When it happened, by the manager's [`Clock`](crate::Clock).
        at: SystemTime,
        /// The grant.
        key: TokenKey,
        /// The store's error.
        error: StoreError,
    },
}

impl Event {
    /// When it happened, by the manager's [`Clock`](crate::Clock): sort, log and measure delays
    /// with it.
    pub fn at(&self) -> SystemTime {
        match self {
            Event::Refreshed { at, .. }
            | Event::RefreshFailed { at, .. }
            | Event::ReauthorizationRequired { at, .. }
            | Event::Recovered { at, .. }
            | Event::RefreshTokenExpiring { at, .. }
            | Event::AccessTokenExpiring { at, .. }
            | Event::GrantSkipped { at, .. }
            | Event::PersistFailed { at, .. } => *at,
        }
    }

    /// For an expiry warning ([`RefreshTokenExpiring`](Self::RefreshTokenExpiring),
    /// [`AccessTokenExpiring`](Self::AccessTokenExpiring)): the time left between the warning
    /// and the expiry (zero if none). A warning is planned ahead of the configured lead, so
    /// this is usually at least that; after a long outage it can be less, and says how much.
    pub fn time_left(&self) -> Option<Duration> {
        match self {
            Event::RefreshTokenExpiring { at, expires_at, .. }
            | Event::AccessTokenExpiring { at, expires_at, .. } => {
                Some(expires_at.duration_since(*at).unwrap_or_default())
            }
            _ => None,
        }
    }

    /// The grant the event is about.
    pub fn key(&self) -> &TokenKey {
        match self {
            Event::Refreshed { key, .. }
            | Event::RefreshFailed { key, .. }
            | Event::ReauthorizationRequired { key, .. }
            | Event::Recovered { key, .. }
            | Event::RefreshTokenExpiring { key, .. }
            | Event::AccessTokenExpiring { key, .. }
            | Event::PersistFailed { key, .. }
            | Event::GrantSkipped { key, .. } => key,
        }
    }
}

/// One item of an [`EventStream`]: an event, or word that some were missed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum EventItem {
    /// The next event.
    Event(Event),
    /// The consumer fell more than the manager's
    /// [`event_capacity`](crate::TokenManagerBuilder::event_capacity) behind and this many
    /// events (the oldest) were dropped; the stream goes on with the oldest still kept.
    ///
    /// A dropped event may have been a [`Event::ReauthorizationRequired`]: reconcile with
    /// [`TokenManager::reauthorization_required`](crate::TokenManager::reauthorization_required)
    /// (or [`TokenManager::grants`](crate::TokenManager::grants)) when this arrives.
    Lagged(u64),
}

/// The manager's [`Event`]s as a stream that reports lag instead of ending on it, from
/// [`TokenManager::events`](crate::TokenManager::events).
///
/// A `broadcast::Receiver` loop written as `while let Ok(event) = rx.recv().await` stops at
/// the first lag, and the application then never hears about a dead grant. This stream yields
/// [`EventItem::Lagged`] and goes on; it ends only when the manager (every clone) is dropped.
///
/// Read it with [`next`](Self::next), or as a [`futures_core::Stream`] (with
/// `futures::StreamExt` or `tokio_stream::StreamExt`).
///
/// ```
/// use tokenkeeper::{provider_fn, AccessToken, Event, EventItem, TokenManager, TokenResponse};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let provider = provider_fn(|_key, _tokens| async {
/// #     Ok(TokenResponse::new(AccessToken::new("fresh")))
/// # });
/// let manager = TokenManager::builder(provider).build();
/// let mut events = manager.events();
/// drop(manager); // here, so that the loop below ends
/// while let Some(item) = events.next().await {
///     match item {
///         EventItem::Event(Event::ReauthorizationRequired { key, reason, .. }) => {
///             // email the owner of `key` a reconnect link
///             let _ = (key, reason);
///         }
///         EventItem::Event(_) => {}
///         // Events were missed: look at the grants' state instead.
///         EventItem::Lagged(_missed) => { /* manager.reauthorization_required().await */ }
///         _ => {}
///     }
/// }
/// # }
/// ```
pub struct EventStream {
    next: Option<Recv>,
}

type Recv =
    Pin<Box<dyn Future<Output = (Result<Event, RecvError>, broadcast::Receiver<Event>)> + Send>>;

fn recv(mut rx: broadcast::Receiver<Event>) -> Recv {
    Box::pin(async move {
        let result = rx.recv().await;
        (result, rx)
    })
}

impl EventStream {
    pub(crate) fn new(rx: broadcast::Receiver<Event>) -> Self {
        Self {
            next: Some(recv(rx)),
        }
    }

    /// The next item; `None` once the manager is gone.
    ///
    /// Cancel safe: dropping the returned future loses no event.
    pub async fn next(&mut self) -> Option<EventItem> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for EventStream {
    type Item = EventItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventItem>> {
        let Some(next) = self.next.as_mut() else {
            return Poll::Ready(None);
        };
        let (result, rx) = ready!(next.as_mut().poll(cx));
        match result {
            Ok(event) => {
                self.next = Some(recv(rx));
                Poll::Ready(Some(EventItem::Event(event)))
            }
            Err(RecvError::Lagged(missed)) => {
                self.next = Some(recv(rx));
                Poll::Ready(Some(EventItem::Lagged(missed)))
            }
            Err(RecvError::Closed) => {
                self.next = None;
                Poll::Ready(None)
            }
        }
    }
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream")
            .field("ended", &self.next.is_none())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenKey;

    fn recovered(key: &str) -> Event {
        Event::Recovered {
            at: std::time::UNIX_EPOCH,
            key: TokenKey::from(key),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lag_is_an_item_and_the_stream_goes_on() {
        let (tx, rx) = broadcast::channel(2);
        let mut events = EventStream::new(rx);
        for key in ["a", "b", "c", "d"] {
            tx.send(recovered(key)).unwrap();
        }
        assert!(matches!(events.next().await, Some(EventItem::Lagged(2))));
        for want in ["c", "d"] {
            match events.next().await {
                Some(EventItem::Event(e)) => assert_eq!(e.key().as_str(), want),
                other => panic!("expected event {want}, got {other:?}"),
            }
        }
        tx.send(recovered("e")).unwrap();
        drop(tx);
        assert!(matches!(events.next().await, Some(EventItem::Event(_))));
        assert!(events.next().await.is_none());
        assert!(events.next().await.is_none(), "stays ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_next_loses_nothing() {
        let (tx, rx) = broadcast::channel(4);
        let mut events = EventStream::new(rx);
        // Polled once (pending), then dropped.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(1), events.next());
        assert!(pending.await.is_err());
        tx.send(recovered("a")).unwrap();
        assert!(matches!(events.next().await, Some(EventItem::Event(_))));
    }
}
