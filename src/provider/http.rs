//! Sending a refresh request and reading the reply with a size limit.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;

use crate::error::{ConfigProblem, ProviderError, UnavailableCause};
use crate::provider::Classifier;
use crate::token::{ParseError, RefreshToken, TokenResponse};

/// Largest reply body read from a token endpoint by default: 1 MiB. Real token responses
/// are a few kilobytes; anything larger is treated as an invalid response.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// A token endpoint's reply: status, headers and (size-limited) body.
///
/// `Debug` shows the status and body length only; the body may hold tokens.
#[derive(Clone)]
pub struct HttpReply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    /// Whether the HTTP client followed a redirect to get this reply.
    redirected: bool,
}

impl HttpReply {
    /// A reply from its parts (for classifiers' tests and custom transports).
    pub fn new(status: u16, headers: HeaderMap, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers,
            body: body.into(),
            redirected: false,
        }
    }

    /// Sends `request` and reads the reply, failing with a classified error on transport
    /// problems or a body over `limit` bytes.
    ///
    /// If `client` follows redirects and did, the reply remembers it, and
    /// [`interpret`](Self::interpret) classifies it as a configuration fault
    /// ([`ConfigProblem::Endpoint`]) whatever its status.
    pub async fn send(
        client: &reqwest::Client,
        request: reqwest::Request,
        limit: usize,
    ) -> Result<Self, ProviderError> {
        let url = request.url().clone();
        let mut response = client.execute(request).await.map_err(transport_error)?;
        let redirected = *response.url() != url;
        let status = response.status().as_u16();
        let headers = std::mem::take(response.headers_mut());
        let too_large = || {
            ProviderError::unavailable(UnavailableCause::InvalidResponse)
                .with_status(status)
                .with_source(ParseError::TooLarge { limit })
        };
        let announced = response.content_length();
        if announced.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        // Sized once when the length is announced (within `limit`, checked above).
        let mut body = Vec::with_capacity(announced.map_or(0, |n| n as usize));
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Self {
            status,
            headers,
            body,
            redirected,
        })
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The reply headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Whether the HTTP client followed a redirect to get this reply.
    pub(crate) fn redirected(&self) -> bool {
        self.redirected
    }

    /// The body. It may hold tokens: never log it.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The RFC 6749 §5.2 `error` code of a JSON error body, if any.
    pub fn oauth_error(&self) -> Option<String> {
        match self.json()? {
            Value::Object(mut obj) => match obj.remove("error")? {
                Value::String(code) => Some(code),
                _ => None,
            },
            _ => None,
        }
    }

    /// The `Retry-After` header as a delay from `now`: delay-seconds or an HTTP-date
    /// (RFC 9110 §10.2.3). A date in the past is a zero delay.
    pub fn retry_after(&self, now: SystemTime) -> Option<Duration> {
        let value = self.headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        let at = httpdate::parse_http_date(value).ok()?;
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    }

    /// Classifies this reply: `classifier` first, then the RFC 6749 rules of
    /// [`StandardClassifier`](crate::StandardClassifier), then the lenient success parse of
    /// [`TokenResponse::from_json`].
    ///
    /// A reply whose access token is missing or unusable is an
    /// `Unavailable(InvalidResponse)` failure with the [`ParseError`] as its source; if it
    /// carried a usable `refresh_token`, the failure keeps it
    /// ([`ProviderError::rotated_refresh_token`]), because the server has probably already
    /// spent the old one. Malformed optional fields do not fail the reply: see
    /// [`TokenResponse::malformed_fields`].
    ///
    /// A `3xx` reply, or any reply reached by following a redirect, is
    /// `Misconfigured(`[`ConfigProblem::Endpoint`]`)`: the token URL is wrong, and only a
    /// developer can fix that. A followed redirect that still yielded a refresh token keeps it
    /// in the error, as above.
    pub fn interpret(
        &self,
        classifier: &dyn Classifier,
        now: SystemTime,
    ) -> Result<TokenResponse, ProviderError> {
        if let Some(err) = classifier.classify(self, now) {
            return Err(err.with_status(self.status));
        }
        if let Some(err) = super::classify::standard(self, now) {
            let err = err.with_status(self.status);
            // The server behind a followed redirect may have rotated the refresh token.
            return Err(match self.redirected.then(|| self.rotated()).flatten() {
                Some(refresh_token) => err.with_rotated_refresh_token(refresh_token),
                None => err,
            });
        }
        TokenResponse::parse(&self.body).map_err(|(e, rotated)| {
            let err = ProviderError::unavailable(UnavailableCause::InvalidResponse)
                .with_status(self.status)
                .with_source(e);
            match rotated {
                Some(refresh_token) => err.with_rotated_refresh_token(refresh_token),
                None => err,
            }
        })
    }
}

impl HttpReply {
    /// A usable refresh token in the body, whether or not the rest of it is usable.
    fn rotated(&self) -> Option<RefreshToken> {
        match TokenResponse::parse(&self.body) {
            Ok(response) => response.refresh_token,
            Err((_, rotated)) => rotated,
        }
    }
}

impl fmt::Debug for HttpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpReply")
            .field("status", &self.status)
            .field("redirected", &self.redirected)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// A transport error, stripped of its URL (which may carry parameters) and classified.
pub(crate) fn transport_error(e: reqwest::Error) -> ProviderError {
    let cause = if e.is_timeout() {
        UnavailableCause::Timeout
    } else if e.is_connect() {
        UnavailableCause::Connect
    } else if e.is_builder() {
        return ProviderError::misconfigured(ConfigProblem::HttpClient)
            .with_source(e.without_url());
    } else {
        UnavailableCause::Network
    };
    ProviderError::unavailable(cause).with_source(e.without_url())
}
