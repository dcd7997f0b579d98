//! Token values, secret newtypes and expiry math.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::{Zeroize, Zeroizing};

mod fields;
mod from_oauth2;

macro_rules! secret_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// The value is never printed: `Debug` shows a redacted placeholder and there is no
        /// `Display`. Read it deliberately with [`secret`](Self::secret).
        ///
        /// The value is overwritten with zeros when the last clone is dropped
        /// ([`ZeroizeOnDrop`](zeroize::ZeroizeOnDrop)); clones share one copy.
        #[derive(Clone)]
        pub struct $name(Arc<Zeroizing<Box<str>>>);

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.secret() == other.secret()
            }
        }

        impl Eq for $name {}

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.secret().hash(state);
            }
        }

        impl $name {
            /// Wraps a secret value (taking ownership of the string, so no copy is left
            /// behind).
            pub fn new(value: impl Into<String>) -> Self {
                Self(Arc::new(Zeroizing::new(exact(value.into()))))
            }

            /// The secret value. Call this only where the value must leave the program.
            pub fn secret(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }

        // The shared `Zeroizing<Box<str>>` wipes the value when its last owner drops.
        impl zeroize::ZeroizeOnDrop for $name {}

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.secret())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map(Self::new)
            }
        }
    };
}

/// `value` in an allocation of exactly its length (a `String` can carry spare capacity, a
/// quarter of a token's size and more), without leaving a copy behind: shrinking in place
/// could move the bytes and free the old ones unwiped, so a string with spare capacity is
/// copied and then wiped.
fn exact(mut value: String) -> Box<str> {
    if value.len() == value.capacity() {
        return value.into_boxed_str();
    }
    let exact = Box::from(value.as_str());
    value.zeroize();
    exact
}

secret_type!(
    /// A bearer access token.
    ///
    /// Cloning is cheap (a reference count), so the fast path of
    /// [`TokenManager::access_token`](crate::TokenManager::access_token) never copies the string.
    AccessToken
);
secret_type!(
    /// A refresh token.
    RefreshToken
);
secret_type!(
    /// An OAuth client secret.
    ClientSecret
);

/// Names one grant inside a [`TokenManager`](crate::TokenManager): a user, a tenant, a
/// connected account. Not a secret; it appears in errors, events and traces.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenKey(Arc<str>);

impl TokenKey {
    /// The longest key, in bytes of UTF-8, that stores accept: 1024. Every built-in store
    /// accepts any key up to this length (any characters) and refuses a longer one with
    /// [`StoreErrorKind::InvalidKey`](crate::StoreErrorKind::InvalidKey); custom stores are
    /// expected to do the same (`testing::assert_store_contract` checks it). Creating a
    /// longer key is not an error by itself.
    pub const MAX_LEN: usize = 1024;

    /// A key from any string.
    pub fn new(key: impl Into<String>) -> Self {
        Self(Arc::from(key.into()))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The key itself; honours width, fill, alignment and precision (`{:<20}`), for tables.
impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl From<&str> for TokenKey {
    fn from(key: &str) -> Self {
        Self::new(key)
    }
}

impl From<String> for TokenKey {
    fn from(key: String) -> Self {
        Self::new(key)
    }
}

/// The tokens of one grant, with absolute expiries.
///
/// Built from an initial grant with [`TokenSet::new`] and the `with_*` methods, or by the
/// [`TokenManager`](crate::TokenManager) from a provider's [`TokenResponse`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenSet {
    access_token: AccessToken,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<RefreshToken>,
    #[serde(default)]
    token_type: TokenType,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "epoch_ms_opt"
    )]
    expires_at: Option<SystemTime>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "epoch_ms_opt"
    )]
    refresh_expires_at: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_expiry: Option<RefreshExpiry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scopes: Option<Box<[String]>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "epoch_ms_opt"
    )]
    issued_at: Option<SystemTime>,
    /// Boxed, and `None` when empty (as it is for most grants): a pointer, not a map.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "extra_field"
    )]
    extra: Option<Box<Map<String, Value>>>,
}

/// A token type, without an allocation for the usual `Bearer` (`None`).
#[derive(Clone, Default, PartialEq, Eq)]
struct TokenType(Option<Box<str>>);

impl TokenType {
    const BEARER: &'static str = "Bearer";

    fn new(token_type: String) -> Self {
        Self((token_type != Self::BEARER).then(|| token_type.into_boxed_str()))
    }

    fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or(Self::BEARER)
    }
}

impl fmt::Debug for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for TokenType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TokenType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

/// Provider-specific fields as a [`TokenSet`] keeps them: `None` when there are none.
fn boxed_extra(extra: Map<String, Value>) -> Option<Box<Map<String, Value>>> {
    (!extra.is_empty()).then(|| Box::new(extra))
}

fn extra_field<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Box<Map<String, Value>>>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.and_then(boxed_extra))
}

impl TokenSet {
    /// A token set holding only an access token (no refresh token, unknown expiry).
    pub fn new(access_token: AccessToken) -> Self {
        Self {
            access_token,
            refresh_token: None,
            token_type: TokenType::default(),
            expires_at: None,
            refresh_expires_at: None,
            refresh_expiry: None,
            scopes: None,
            issued_at: None,
            extra: None,
        }
    }

    /// A grant whose first access token is still to be obtained: an empty access token that
    /// expired at the Unix epoch, so it is never served.
    ///
    /// For providers that obtain tokens without a refresh token, such as the
    /// [client-credentials grant](crate::Grant::ClientCredentials): insert it, and the first
    /// [`access_token`](crate::TokenManager::access_token) call (or the background refresher)
    /// obtains a real token through the manager. With a provider that needs a refresh token,
    /// such a grant is dead at first use ([`NoRefreshToken`](crate::InvalidationReason::NoRefreshToken)).
    ///
    /// ```
    /// use tokenkeeper::TokenSet;
    /// let pending = TokenSet::pending();
    /// assert!(pending.is_expired(std::time::SystemTime::now()));
    /// assert!(pending.refresh_token().is_none());
    /// ```
    pub fn pending() -> Self {
        Self::new(AccessToken::new(String::new())).with_expires_at(std::time::UNIX_EPOCH)
    }

    /// Sets the refresh token.
    pub fn with_refresh_token(mut self, refresh_token: RefreshToken) -> Self {
        self.refresh_token = Some(refresh_token);
        self
    }

    /// Sets the absolute expiry of the access token.
    pub fn with_expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets the absolute expiry of the refresh token, where the provider makes it known.
    ///
    /// Whether a refresh moves it is unknown until [`with_refresh_expiry`](Self::with_refresh_expiry)
    /// says so: a reply that rotates the refresh token without restating its expiry then drops
    /// it (nothing is known of the new token).
    pub fn with_refresh_expires_at(mut self, at: SystemTime) -> Self {
        self.refresh_expires_at = Some(at);
        self
    }

    /// Declares how the refresh token's expiry behaves across refreshes, kept with the grant.
    ///
    /// A refresh whose reply does not restate the refresh token's expiry then keeps a
    /// [`Fixed`](RefreshExpiry::Fixed) end across rotations, and moves a
    /// [`Sliding`](RefreshExpiry::Sliding) one to `idle` after the refresh. A reply that states
    /// it always wins.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tokenkeeper::{AccessToken, RefreshExpiry, RefreshToken, TokenResponse, TokenSet};
    ///
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    /// let end = now + Duration::from_secs(30 * 86_400);
    /// let grant = TokenSet::new(AccessToken::new("at"))
    ///     .with_refresh_token(RefreshToken::new("rt-1"))
    ///     .with_refresh_expires_at(end)
    ///     .with_refresh_expiry(RefreshExpiry::Fixed);
    /// // A rotation that does not restate the end keeps it.
    /// let rotated = grant.apply(
    ///     TokenResponse::new(AccessToken::new("at-2")).with_refresh_token(RefreshToken::new("rt-2")),
    ///     now,
    /// );
    /// assert_eq!(rotated.refresh_expires_at(), Some(end));
    /// ```
    pub fn with_refresh_expiry(mut self, kind: RefreshExpiry) -> Self {
        self.refresh_expiry = Some(kind);
        self
    }

    /// Sets the token type (default `Bearer`).
    pub fn with_token_type(mut self, token_type: impl Into<String>) -> Self {
        self.token_type = TokenType::new(token_type.into());
        self
    }

    /// Sets the granted scopes.
    pub fn with_scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = Some(scopes.into_boxed_slice());
        self
    }

    /// Sets when these tokens were issued.
    pub fn with_issued_at(mut self, at: SystemTime) -> Self {
        self.issued_at = Some(at);
        self
    }

    /// Sets provider-specific extra fields (kept as JSON).
    pub fn with_extra(mut self, extra: Map<String, Value>) -> Self {
        self.extra = boxed_extra(extra);
        self
    }

    /// The access token.
    pub fn access_token(&self) -> &AccessToken {
        &self.access_token
    }

    /// The refresh token, if the grant has one.
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }

    /// The token type, usually `Bearer`.
    pub fn token_type(&self) -> &str {
        self.token_type.as_str()
    }

    /// When the access token expires, if known.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// When the refresh token expires, if the provider said.
    pub fn refresh_expires_at(&self) -> Option<SystemTime> {
        self.refresh_expires_at
    }

    /// How the refresh token's expiry behaves across refreshes, if declared.
    pub fn refresh_expiry(&self) -> Option<RefreshExpiry> {
        self.refresh_expiry
    }

    /// The granted scopes, if the provider said.
    pub fn scopes(&self) -> Option<&[String]> {
        self.scopes.as_deref()
    }

    /// When these tokens were issued, if known.
    pub fn issued_at(&self) -> Option<SystemTime> {
        self.issued_at
    }

    /// Provider-specific fields of the token response, kept as they came.
    pub fn extra(&self) -> &Map<String, Value> {
        static NONE: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
        self.extra.as_deref().unwrap_or(&NONE)
    }

    /// Whether the access token has expired at `now`. Unknown expiry counts as not expired.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        matches!(self.expires_at, Some(at) if at <= now)
    }

    /// Whether the access token is valid at `now` and stays valid for at least `margin`.
    pub fn is_fresh(&self, now: SystemTime, margin: Duration) -> bool {
        match self.expires_at {
            None => true,
            Some(at) => at.duration_since(now).is_ok_and(|left| left > margin),
        }
    }

    /// The refresh margin for these tokens: `margin`, or half the token's lifetime when that
    /// is shorter, so short-lived tokens are not refreshed on every call.
    pub(crate) fn scaled_margin(&self, margin: Duration) -> Duration {
        match (self.issued_at, self.expires_at) {
            (Some(issued), Some(expires)) => match expires.duration_since(issued) {
                Ok(lifetime) => margin.min(lifetime / 2),
                Err(_) => margin,
            },
            _ => margin,
        }
    }

    /// A digest naming the grant these tokens start (for idempotent inserts). Not a secret's
    /// substitute: a 64-bit hash of high-entropy tokens.
    pub(crate) fn origin(&self) -> std::num::NonZeroU64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        self.access_token.secret().hash(&mut hasher);
        self.refresh_token
            .as_ref()
            .map(|t| t.secret())
            .hash(&mut hasher);
        // Never zero, so a record keeps it in 8 bytes (`Option<NonZeroU64>`).
        std::num::NonZeroU64::new(hasher.finish()).unwrap_or(std::num::NonZeroU64::MIN)
    }

    /// Whether the refresh token is known to have expired at `now`.
    pub fn is_refresh_token_expired(&self, now: SystemTime) -> bool {
        matches!(self.refresh_expires_at, Some(at) if at <= now)
    }

    /// Folds a provider's response into a new token set, computed at `now`.
    ///
    /// Relative lifetimes become absolute here (RFC 6749 §5.1). If the response carries no
    /// refresh token, the current one is kept (RFC 6749 §6). The refresh token's expiry is the
    /// response's if it states one; otherwise it follows the grant's declared
    /// [`RefreshExpiry`]: a fixed end is kept, a sliding one moves to `idle` after `now`; with
    /// none declared, a kept refresh token keeps its known expiry and a rotated one has none.
    pub fn apply(&self, response: TokenResponse, now: SystemTime) -> TokenSet {
        let rotated = response.refresh_token.is_some();
        let refresh_expires_at = match (&response.refresh_expires, self.refresh_expiry, rotated) {
            (Some(expiry), _, _) => Some(expiry.at(now)),
            (None, Some(RefreshExpiry::Fixed), _) => self.refresh_expires_at,
            (None, Some(RefreshExpiry::Sliding { idle }), _) => now.checked_add(idle),
            (None, None, true) => None,
            (None, None, false) => self.refresh_expires_at,
        };
        TokenSet {
            access_token: response.access_token,
            refresh_token: response
                .refresh_token
                .or_else(|| self.refresh_token.clone()),
            token_type: response
                .token_type
                .map_or_else(|| self.token_type.clone(), TokenType::new),
            expires_at: response.expires.map(|e| e.at(now)),
            refresh_expires_at,
            refresh_expiry: self.refresh_expiry,
            scopes: response
                .scopes
                .map(Vec::into_boxed_slice)
                .or_else(|| self.scopes.clone()),
            issued_at: Some(now),
            extra: boxed_extra(response.extra),
        }
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &self.access_token)
            .field("refresh_token", &self.refresh_token)
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("refresh_expiry", &self.refresh_expiry)
            .field("scopes", &self.scopes)
            .field("issued_at", &self.issued_at)
            // Extra fields may hold an `id_token` or other secrets: show names only.
            .field("extra", &self.extra().keys().collect::<Vec<_>>())
            .finish()
    }
}

/// How a grant's refresh-token expiry behaves across refreshes (see
/// [`TokenSet::with_refresh_expiry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefreshExpiry {
    /// A hard end no refresh moves: a dashboard-minted refresh token that only a human can
    /// renew, or a grant-level deadline kept across rotations. Such a grant has no idle
    /// lifetime: the background refresher does not keep it alive (a refresh would not move
    /// the end), and warns ahead of the end.
    Fixed,
    /// The end moves with each refresh to `idle` after it: a refresh token that expires after
    /// a period of disuse (180 days unused, say).
    Sliding {
        /// How long the refresh token lives unused.
        #[serde(rename = "idle_secs", with = "duration_secs")]
        idle: Duration,
    },
}

mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// When something expires, as a provider stated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Relative to the time of the response (`expires_in`).
    In(Duration),
    /// An absolute instant (an epoch in the response).
    At(SystemTime),
}

impl Expiry {
    /// The absolute instant, taking `now` as the time of the response.
    pub fn at(self, now: SystemTime) -> SystemTime {
        match self {
            Expiry::In(d) => now.checked_add(d).unwrap_or(now),
            Expiry::At(t) => t,
        }
    }
}

/// What a [`Provider`](crate::Provider) returns from one successful refresh.
#[derive(Clone)]
pub struct TokenResponse {
    pub(crate) access_token: AccessToken,
    pub(crate) refresh_token: Option<RefreshToken>,
    pub(crate) token_type: Option<String>,
    pub(crate) expires: Option<Expiry>,
    pub(crate) refresh_expires: Option<Expiry>,
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) extra: Map<String, Value>,
    pub(crate) malformed: Vec<String>,
}

impl TokenResponse {
    /// A response with only an access token.
    pub fn new(access_token: AccessToken) -> Self {
        Self {
            access_token,
            refresh_token: None,
            token_type: None,
            expires: None,
            refresh_expires: None,
            scopes: None,
            extra: Map::new(),
            malformed: Vec::new(),
        }
    }

    /// Sets the (possibly rotated) refresh token.
    pub fn with_refresh_token(mut self, token: RefreshToken) -> Self {
        self.refresh_token = Some(token);
        self
    }

    /// Sets when the access token expires.
    pub fn with_expires(mut self, expiry: Expiry) -> Self {
        self.expires = Some(expiry);
        self
    }

    /// Sets when the refresh token expires.
    pub fn with_refresh_expires(mut self, expiry: Expiry) -> Self {
        self.refresh_expires = Some(expiry);
        self
    }

    /// Sets the token type.
    pub fn with_token_type(mut self, token_type: impl Into<String>) -> Self {
        self.token_type = Some(token_type.into());
        self
    }

    /// Sets the scopes.
    pub fn with_scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = Some(scopes);
        self
    }

    /// Sets extra provider-specific fields.
    pub fn with_extra(mut self, extra: Map<String, Value>) -> Self {
        self.extra = extra;
        self
    }

    /// The access token.
    pub fn access_token(&self) -> &AccessToken {
        &self.access_token
    }

    /// The refresh token, if the response carried one.
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }

    /// The access token's expiry, as stated.
    pub fn expires(&self) -> Option<Expiry> {
        self.expires
    }

    /// The refresh token's expiry, as stated.
    pub fn refresh_expires(&self) -> Option<Expiry> {
        self.refresh_expires
    }

    /// Names of optional fields that were present in the reply but unusable (a negative,
    /// huge or non-numeric `expires_in`, a `scope` that is a number, …) and were therefore
    /// treated as absent.
    ///
    /// Only field names, in the order they were found, never their values. An empty list
    /// means every field present was used. The reply itself was kept: by the time a token
    /// endpoint answers 2xx it has usually already spent the old refresh token, so throwing
    /// the whole reply away for a bad *optional* field would kill the grant at the next
    /// refresh. Report these to the provider; the tokens are fine.
    ///
    /// A `null` `scope`, `token_type` or `refresh_token` (or an empty `token_type`) is simply
    /// absent and is not listed: many serializers write `null` for "no value". A `null`
    /// expiry is listed: the server stated an expiry it did not give, and the manager then
    /// assumes its fallback lifetime rather than a token that never expires.
    pub fn malformed_fields(&self) -> &[String] {
        &self.malformed
    }

    /// Records that the optional field `name` was present but unusable and was treated as
    /// absent, for custom providers that parse their own replies (see
    /// [`malformed_fields`](Self::malformed_fields)). Pass the field's name only, never its
    /// value.
    pub fn with_malformed_field(mut self, name: impl Into<String>) -> Self {
        self.malformed.push(name.into());
        self
    }

    /// Parses a JSON token response leniently.
    ///
    /// Accepts the RFC 6749 §5.1 fields and the common deviations seen in the field:
    /// `expires_in` as a number or a numeric string; absolute expiries in
    /// `expires_at` / `access_token_expiry` / `refresh_token_expiry` /
    /// `refresh_token_expires_at` / `refresh_expires_at` as epoch seconds or milliseconds,
    /// number or string; `refresh_token_expires_in` / `refresh_expires_in` relative; `scope`
    /// as a space-separated string or an array of strings. Other fields are kept in
    /// [`TokenSet::extra`].
    ///
    /// # Rotation safety
    ///
    /// The tokens are what matter: a server that answers 2xx has usually spent the old
    /// refresh token already. So an *optional* field that is present but unusable (an
    /// `expires_in` that is negative, over 100 years, non-numeric or of the wrong type; a
    /// `scope` or `token_type` of the wrong type; an unreadable absolute or refresh-token
    /// expiry) never fails the parse: it is treated as absent, its name is listed in
    /// [`malformed_fields`](Self::malformed_fields), and a `tracing` warning names it (never
    /// its value). When both a relative and an absolute expiry are sent, a usable one is
    /// taken even if the other is malformed (the relative one wins when both are usable).
    /// `null` is the same as absent (except for expiries, listed as malformed), and so is an
    /// empty `refresh_token` (the old one is kept).
    ///
    /// # Errors
    ///
    /// A [`ParseError`] if the body is not a JSON object, if `access_token` is missing, empty
    /// or not a string, or if `refresh_token` is neither a string nor `null`. When the
    /// access token is unusable but a refresh token came with it,
    /// [`HttpReply::interpret`](crate::HttpReply::interpret) keeps that refresh token in the
    /// error (see [`ProviderError::rotated_refresh_token`](crate::ProviderError::rotated_refresh_token)).
    pub fn from_json(body: &[u8]) -> Result<Self, ParseError> {
        Self::parse(body).map_err(|(e, _)| e)
    }

    /// [`from_json`](Self::from_json), keeping a usable refresh token from a reply that is
    /// otherwise an error.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, (ParseError, Option<RefreshToken>)> {
        let mut obj = fields::Fields::parse(body).map_err(|e| (e, None))?;
        let refresh_token = match obj.remove("refresh_token") {
            Some(Value::String(s)) if !s.is_empty() => Some(RefreshToken::new(s)),
            Some(Value::Null | Value::String(_)) | None => None,
            Some(_) => return Err((ParseError::InvalidField("refresh_token"), None)),
        };
        let access_token = match obj.remove("access_token") {
            Some(Value::String(s)) if !s.is_empty() => AccessToken::new(s),
            Some(_) => return Err((ParseError::InvalidField("access_token"), refresh_token)),
            None => return Err((ParseError::MissingAccessToken, refresh_token)),
        };
        let mut malformed = Malformed::default();
        let token_type = match obj.remove("token_type") {
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(Value::Null | Value::String(_)) | None => None,
            Some(_) => malformed.drop("token_type"),
        };
        let expires = take_expiry(
            &mut obj,
            &["expires_in"],
            &["expires_at", "access_token_expiry"],
            &mut malformed,
        );
        let refresh_expires = take_expiry(
            &mut obj,
            &["refresh_token_expires_in", "refresh_expires_in"],
            &[
                "refresh_token_expiry",
                "refresh_token_expires_at",
                "refresh_expires_at",
            ],
            &mut malformed,
        );
        let scopes = match obj.remove("scope") {
            Some(Value::String(s)) => Some(s.split_whitespace().map(str::to_owned).collect()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .or_else(|| malformed.drop("scope")),
            Some(Value::Null) | None => None,
            Some(_) => malformed.drop("scope"),
        };
        Ok(Self {
            access_token,
            refresh_token,
            token_type,
            expires,
            refresh_expires,
            scopes,
            extra: obj.extra,
            malformed: malformed.0,
        })
    }
}

/// The names of optional fields dropped by a parse.
#[derive(Default)]
struct Malformed(Vec<String>);

impl Malformed {
    /// Records that `field` was present but unusable; it is treated as absent.
    fn drop<T>(&mut self, field: &'static str) -> Option<T> {
        tracing::warn!(
            field,
            "token response field is malformed; treated as absent, tokens kept"
        );
        self.0.push(field.to_owned());
        None
    }
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &self.access_token)
            .field("refresh_token", &self.refresh_token)
            .field("token_type", &self.token_type)
            .field("expires", &self.expires)
            .field("refresh_expires", &self.refresh_expires)
            .field("scopes", &self.scopes)
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .field("malformed", &self.malformed)
            .finish()
    }
}

/// Why a token response body could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The body is not JSON.
    #[error("token response is not JSON")]
    NotJson,
    /// The body is JSON but not an object.
    #[error("token response is not a JSON object")]
    NotAnObject,
    /// No `access_token` field.
    #[error("token response has no access_token")]
    MissingAccessToken,
    /// A field has a type or value that cannot be used.
    #[error("token response field `{0}` is invalid")]
    InvalidField(&'static str),
    /// The body is larger than the limit.
    #[error("token response is larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

/// Largest lifetime accepted from `expires_in`: 100 years. A larger value is treated as
/// malformed (and so as absent), not as a token that never expires.
const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Takes every expiry field out of `obj`: the first usable `absolute` one, overridden by a
/// usable `relative` one (measured at response time, it is the more reliable). Unusable ones
/// are recorded in `malformed` and ignored.
fn take_expiry(
    obj: &mut fields::Fields,
    relative: &[&'static str],
    absolute: &[&'static str],
    malformed: &mut Malformed,
) -> Option<Expiry> {
    let mut found = None;
    for name in absolute {
        match obj.remove(name) {
            // A `null` expiry is stated but unusable: reported like any other.
            None => {}
            Some(v) => match epoch(&v) {
                Some(at) => {
                    found = found.or(Some(Expiry::At(at)));
                }
                None => {
                    malformed.drop::<()>(name);
                }
            },
        }
    }
    for name in relative {
        match obj.remove(name) {
            // A `null` expiry is stated but unusable: reported like any other.
            None => {}
            Some(v) => {
                match number(&v).filter(|s| (0.0..=MAX_LIFETIME.as_secs_f64()).contains(s)) {
                    Some(secs) => found = Some(Expiry::In(Duration::from_secs_f64(secs))),
                    None => {
                        malformed.drop::<()>(name);
                    }
                }
            }
        }
    }
    found
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|n| n.is_finite())
}

/// Reads an epoch in seconds or milliseconds, as a number or a numeric string.
///
/// Values above 10^11 are taken as milliseconds (10^11 seconds is the year 5138).
pub fn epoch(v: &Value) -> Option<SystemTime> {
    let n = number(v)?;
    if n < 0.0 {
        return None;
    }
    let secs = if n >= 1e11 { n / 1000.0 } else { n };
    if secs > 1e11 {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs_f64(secs))
}

pub(crate) mod epoch_ms_opt {
    //! `Option<SystemTime>` as epoch milliseconds, for readable stored records.
    use std::time::{Duration, SystemTime};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => {
                let ms = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                s.serialize_some(&ms)
            }
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_declared_refresh_expiry_survives_serialization() {
        let set =
            TokenSet::new(AccessToken::new("at")).with_refresh_expiry(RefreshExpiry::Sliding {
                idle: Duration::from_secs(180 * 86_400),
            });
        let json = serde_json::to_string(&set).unwrap();
        assert!(
            json.contains(r#""refresh_expiry":{"kind":"sliding","idle_secs":15552000}"#),
            "{json}"
        );
        let back: TokenSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back.refresh_expiry(), set.refresh_expiry());
        // Records written before the field existed read as undeclared.
        let old: TokenSet = serde_json::from_str(r#"{"access_token":"at"}"#).unwrap();
        assert_eq!(old.refresh_expiry(), None);
    }

    use super::*;

    #[test]
    fn key_display_honours_width_and_alignment() {
        let key = TokenKey::from("acme");
        assert_eq!(format!("[{key:<8}]"), "[acme    ]");
        assert_eq!(format!("[{key:>8}]"), "[    acme]");
        assert_eq!(format!("[{key:*^8}]"), "[**acme**]");
        assert_eq!(format!("[{key:.2}]"), "[ac]");
        assert_eq!(format!("{key}"), "acme");
    }

    #[test]
    fn secrets_are_wiped_when_the_last_clone_drops() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroize_on_drop::<AccessToken>();
        zeroize_on_drop::<RefreshToken>();
        zeroize_on_drop::<ClientSecret>();
        // The storage itself is what wipes: one shared `Zeroizing` buffer per value.
        fn storage(token: &AccessToken) -> &Arc<Zeroizing<Box<str>>> {
            &token.0
        }
        zeroize_on_drop::<Zeroizing<Box<str>>>();

        let token = AccessToken::new("at-secret");
        let clone = token.clone();
        assert!(
            Arc::ptr_eq(storage(&token), storage(&clone)),
            "clones share one copy"
        );
        drop(token);
        // Not wiped while a clone still uses it.
        assert_eq!(clone.secret(), "at-secret");
        assert_eq!(Arc::strong_count(storage(&clone)), 1);

        // What the last drop runs: the bytes are overwritten.
        let mut buffer = Zeroizing::new(Box::<str>::from("rt-secret"));
        zeroize::Zeroize::zeroize(&mut *buffer);
        assert!(buffer.bytes().all(|b| b == 0));
    }

    #[test]
    fn a_token_set_is_stored_in_its_established_form() {
        let mut extra = Map::new();
        extra.insert("instance_url".into(), Value::from("https://example.test"));
        let tokens = TokenSet::new(AccessToken::new("at"))
            .with_token_type("bearer")
            .with_scopes(vec!["a".into(), "b".into()])
            .with_extra(extra);
        let json = r#"{"access_token":"at","token_type":"bearer","scopes":["a","b"],"extra":{"instance_url":"https://example.test"}}"#;
        assert_eq!(serde_json::to_string(&tokens).unwrap(), json);
        let back: TokenSet = serde_json::from_str(json).unwrap();
        assert_eq!(back, tokens);
        assert_eq!(back.token_type(), "bearer");
        assert_eq!(back.extra()["instance_url"], "https://example.test");

        // Defaults: `Bearer`, no extra fields (an empty map is the same as none).
        let plain: TokenSet = serde_json::from_str(r#"{"access_token":"at","extra":{}}"#).unwrap();
        assert_eq!(plain, TokenSet::new(AccessToken::new("at")));
        assert_eq!(plain.token_type(), "Bearer");
        assert!(plain.extra().is_empty());
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"access_token":"at","token_type":"Bearer"}"#
        );
        assert_eq!(
            plain.with_token_type("Bearer").with_extra(Map::new()),
            TokenSet::new(AccessToken::new("at"))
        );
    }

    #[test]
    fn a_secret_is_kept_in_exactly_its_length() {
        let mut spare = String::with_capacity(64);
        spare.push_str("at-secret");
        let kept = exact(spare);
        assert_eq!(&*kept, "at-secret");
        let exact_already = String::from("rt-secret");
        let at = exact_already.as_ptr();
        let kept = exact(exact_already);
        assert_eq!((&*kept, kept.as_ptr()), ("rt-secret", at), "not copied");
        assert_eq!(
            AccessToken::new(String::with_capacity(32) + "x").secret(),
            "x"
        );
    }

    #[test]
    fn secrets_compare_hash_and_serialize_by_value() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let hash = |t: &RefreshToken| {
            let mut h = DefaultHasher::new();
            t.hash(&mut h);
            h.finish()
        };
        let (a, b) = (
            RefreshToken::new("rt"),
            RefreshToken::new(String::from("rt")),
        );
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
        assert_ne!(a, RefreshToken::new("other"));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "\"rt\"");
        let back: RefreshToken = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        assert_eq!(
            format!("{:?}", AccessToken::new("at-1")),
            "AccessToken([redacted])"
        );
        assert_eq!(
            format!("{:?}", RefreshToken::new("rt-1")),
            "RefreshToken([redacted])"
        );
        assert_eq!(
            format!("{:?}", ClientSecret::new("cs-1")),
            "ClientSecret([redacted])"
        );
        let mut extra = Map::new();
        extra.insert("id_token".into(), Value::String("idt-secret".into()));
        let set = TokenSet::new(AccessToken::new("at-secret"))
            .with_refresh_token(RefreshToken::new("rt-secret"))
            .with_extra(extra.clone());
        let dbg = format!("{set:?}");
        assert!(!dbg.contains("secret\""), "{dbg}");
        assert!(
            !dbg.contains("at-secret") && !dbg.contains("rt-secret") && !dbg.contains("idt-secret")
        );
        let resp = TokenResponse::new(AccessToken::new("at-secret")).with_extra(extra);
        let dbg = format!("{resp:?}");
        assert!(
            !dbg.contains("at-secret") && !dbg.contains("idt-secret"),
            "{dbg}"
        );
    }

    #[test]
    fn expires_in_becomes_absolute_at_response_time() {
        let r = TokenResponse::from_json(br#"{"access_token":"a","expires_in":3600}"#).unwrap();
        let set = TokenSet::new(AccessToken::new("old")).apply(r, t(1000));
        assert_eq!(set.expires_at(), Some(t(4600)));
        assert_eq!(set.issued_at(), Some(t(1000)));
    }

    #[test]
    fn missing_refresh_token_keeps_the_old_one() {
        let old = TokenSet::new(AccessToken::new("a0"))
            .with_refresh_token(RefreshToken::new("r0"))
            .with_refresh_expires_at(t(9999));
        let r = TokenResponse::from_json(br#"{"access_token":"a1"}"#).unwrap();
        let new = old.apply(r, t(10));
        assert_eq!(new.refresh_token().unwrap().secret(), "r0");
        assert_eq!(new.refresh_expires_at(), Some(t(9999)));
        let r = TokenResponse::from_json(br#"{"access_token":"a2","refresh_token":"r2"}"#).unwrap();
        let newer = new.apply(r, t(20));
        assert_eq!(newer.refresh_token().unwrap().secret(), "r2");
        assert_eq!(newer.refresh_expires_at(), None);
    }

    #[test]
    fn epochs_in_seconds_and_milliseconds_as_numbers_and_strings() {
        for body in [
            r#"{"access_token":"a","access_token_expiry":"1718000000000"}"#,
            r#"{"access_token":"a","access_token_expiry":1718000000000}"#,
            r#"{"access_token":"a","expires_at":1718000000}"#,
            r#"{"access_token":"a","expires_at":"1718000000"}"#,
        ] {
            let r = TokenResponse::from_json(body.as_bytes()).unwrap();
            assert_eq!(r.expires(), Some(Expiry::At(t(1_718_000_000))), "{body}");
        }
        let r = TokenResponse::from_json(
            br#"{"access_token":"a","expires_in":"1296000","refresh_token_expiry":"1720000000000"}"#,
        )
        .unwrap();
        assert_eq!(
            r.expires(),
            Some(Expiry::In(Duration::from_secs(1_296_000)))
        );
        assert_eq!(r.refresh_expires(), Some(Expiry::At(t(1_720_000_000))));
    }

    #[test]
    fn unusable_bodies_are_typed_errors() {
        let cases: &[(&[u8], ParseError)] = &[
            (b"", ParseError::NotJson),
            (b"<html>502</html>", ParseError::NotJson),
            (b"[1,2]", ParseError::NotAnObject),
            (b"null", ParseError::NotAnObject),
            (
                br#"{"token_type":"bearer"}"#,
                ParseError::MissingAccessToken,
            ),
            (
                br#"{"access_token":42}"#,
                ParseError::InvalidField("access_token"),
            ),
            (
                br#"{"access_token":""}"#,
                ParseError::InvalidField("access_token"),
            ),
            (
                br#"{"access_token":"a","refresh_token":7}"#,
                ParseError::InvalidField("refresh_token"),
            ),
            (
                br#"{"access_token":"a","refresh_token":["r"]}"#,
                ParseError::InvalidField("refresh_token"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                TokenResponse::from_json(body).err().as_ref(),
                Some(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Every optional field, broken in every way, beside a rotated refresh token: the server
    /// has already spent the old refresh token, so the reply must be kept.
    const BROKEN_OPTIONAL_FIELDS: &[(&str, &str)] = &[
        ("expires_in", "null"),
        ("expires_in", "-5"),
        ("expires_in", r#""soon""#),
        ("expires_in", r#""-5""#),
        ("expires_in", "1e300"),
        ("expires_in", "18446744073709551616"),
        ("expires_in", "true"),
        ("expires_in", "[3600]"),
        ("expires_in", r#"{"s":3600}"#),
        ("expires_at", "null"),
        ("expires_at", "-1"),
        ("expires_at", r#""tomorrow""#),
        ("expires_at", "1e300"),
        ("expires_at", "false"),
        ("access_token_expiry", r#""never""#),
        ("access_token_expiry", "-1718000000000"),
        ("access_token_expiry", "[]"),
        ("refresh_token_expires_in", "null"),
        ("refresh_token_expires_in", "-1"),
        ("refresh_token_expires_in", r#""a while""#),
        ("refresh_token_expires_in", "1e300"),
        ("refresh_token_expires_in", "{}"),
        ("refresh_expires_in", r#""x""#),
        ("refresh_token_expiry", r#""x""#),
        ("refresh_token_expiry", "1e300"),
        ("refresh_token_expires_at", "-7"),
        ("refresh_token_expires_at", "true"),
        ("refresh_expires_at", "[1]"),
        ("scope", "null"),
        ("scope", "42"),
        ("scope", "true"),
        ("scope", r#"{"a":1}"#),
        ("scope", r#"["a",1]"#),
        ("token_type", "null"),
        ("token_type", "1"),
        ("token_type", r#"["Bearer"]"#),
        ("token_type", r#"{"t":"Bearer"}"#),
    ];

    fn broken_body(field: &str, value: &str) -> String {
        format!(r#"{{"access_token":"a","refresh_token":"rt-2","{field}":{value}}}"#)
    }

    #[test]
    fn a_broken_optional_field_does_not_throw_away_the_rotated_refresh_token() {
        for (field, value) in BROKEN_OPTIONAL_FIELDS {
            let body = broken_body(field, value);
            let r =
                TokenResponse::from_json(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(r.access_token().secret(), "a", "{body}");
            assert_eq!(
                r.refresh_token().map(RefreshToken::secret),
                Some("rt-2"),
                "{body}"
            );
            if field.starts_with("refresh") {
                assert_eq!(r.refresh_expires(), None, "{body}");
            }
            if field.starts_with("expires") || field.starts_with("access") {
                assert_eq!(r.expires(), None, "{body}");
            }
            assert!(!r.extra.contains_key(*field), "{body}: dropped, not kept");
            // A `null` scope or token type is absent; a `null` expiry is stated but unusable.
            let null_is_absent = *value == "null" && (*field == "scope" || *field == "token_type");
            let want: &[&str] = if null_is_absent { &[] } else { &[field] };
            assert_eq!(r.malformed_fields(), want, "{body}");
            assert!(!format!("{r:?}").contains("rt-2"), "{body}");
        }
    }

    #[test]
    fn a_usable_expiry_is_taken_beside_a_malformed_one() {
        let r = TokenResponse::from_json(
            br#"{"access_token":"a","expires_in":"soon","expires_at":1718000000,"refresh_token_expires_in":-1,"refresh_token_expiry":1720000000}"#,
        )
        .unwrap();
        assert_eq!(r.expires(), Some(Expiry::At(t(1_718_000_000))));
        assert_eq!(r.refresh_expires(), Some(Expiry::At(t(1_720_000_000))));
        assert_eq!(
            r.malformed_fields(),
            ["expires_in", "refresh_token_expires_in"]
        );
        let r = TokenResponse::from_json(br#"{"access_token":"a","expires_in":60,"scope":"a b"}"#)
            .unwrap();
        assert!(r.malformed_fields().is_empty());
        let r = TokenResponse::new(AccessToken::new("a")).with_malformed_field("expires_in");
        assert_eq!(r.malformed_fields(), ["expires_in"]);
    }

    #[test]
    fn a_refresh_token_beside_an_unusable_access_token_is_kept_for_the_error() {
        for body in [
            &br#"{"refresh_token":"rt-2","expires_in":60}"#[..],
            br#"{"access_token":"","refresh_token":"rt-2"}"#,
            br#"{"access_token":null,"refresh_token":"rt-2"}"#,
            br#"{"access_token":7,"refresh_token":"rt-2"}"#,
        ] {
            let (_, rotated) = TokenResponse::parse(body).unwrap_err();
            assert_eq!(
                rotated.as_ref().map(RefreshToken::secret),
                Some("rt-2"),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let (_, rotated) = TokenResponse::parse(br#"{"refresh_token":""}"#).unwrap_err();
        assert_eq!(rotated, None);
    }

    #[test]
    fn freshness_honours_the_margin() {
        let set = TokenSet::new(AccessToken::new("a")).with_expires_at(t(100));
        assert!(set.is_fresh(t(30), Duration::from_secs(60)));
        assert!(!set.is_fresh(t(40), Duration::from_secs(60)));
        assert!(!set.is_expired(t(99)));
        assert!(set.is_expired(t(100)));
        assert!(TokenSet::new(AccessToken::new("a")).is_fresh(t(u32::MAX as u64), Duration::ZERO));
    }

    #[test]
    fn stored_form_round_trips() {
        let set = TokenSet::new(AccessToken::new("a"))
            .with_refresh_token(RefreshToken::new("r"))
            .with_expires_at(t(100))
            .with_scopes(vec!["offline_access".into()]);
        let json = serde_json::to_string(&set).unwrap();
        let back: TokenSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, set);
    }
}
