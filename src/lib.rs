//! tokenkeeper (in progress)
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod clock;
mod error;
mod event;
mod manager;
mod provider;
mod status;
mod store;
mod token;

pub use clock::{Clock, SystemClock};
pub use error::{
    BoxError, ConfigProblem, Error, InvalidationReason, ProviderError, ProviderErrorKind, Result,
    SharedError, StoreError, StoreErrorKind, UnavailableCause,
};
pub use event::Event;
pub use manager::{TokenManager, TokenManagerBuilder};
pub use provider::{
    provider_fn, Classifier, ClientAuth, FnProvider, HttpReply, OAuth2Provider,
    OAuth2ProviderBuilder, Provider, RefreshRequest, StandardClassifier, XoxodayClassifier,
    DEFAULT_BODY_LIMIT,
};
pub use status::{GrantHealth, TokenStatus};
pub use store::{
    Cas, GrantRecord, GrantState, MemoryStore, RefreshLock, TokenStore, Version, Versioned,
};
pub use token::{
    epoch, AccessToken, ClientSecret, Expiry, ParseError, RefreshToken, TokenKey, TokenResponse,
    TokenSet,
};

#[cfg(feature = "test-util")]
pub mod testing;
